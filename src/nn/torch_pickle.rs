//! The tensors of a PyTorch zip pickle (`torch.save` since torch 1.6): a zip
//! whose `*/data.pkl` pickles the state dict, each tensor a persistent
//! reference to a raw storage file `*/data/N` beside it.
//!
//! The pickle is run by candle's pickle interpreter ([`candle_core::pickle`]),
//! which only rebuilds the objects (dicts, tuples, storage references) and
//! never imports or calls anything named in the file. Entries that are not
//! tensors of a supported storage type (step counters, int32 buffers, nested
//! optimizer state) are left out and listed, not printed.

use std::collections::HashMap;
use std::io::{BufReader, Read};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use candle_core::pickle::{Object, Stack, TensorInfo};
use candle_core::{Device, Tensor};

use crate::{Error, Result};

type Archive = zip::ZipArchive<BufReader<std::fs::File>>;

pub struct PickledTensors {
    path: PathBuf,
    infos: HashMap<String, TensorInfo>,
    /// Names of entries that are not readable tensors.
    skipped: Vec<String>,
    zip: Mutex<Archive>,
}

fn entry_name(o: &Object) -> Option<&str> {
    match o {
        Object::Unicode(s) => Some(s),
        _ => None,
    }
}

/// The state dict inside the pickled object: the object itself, a
/// TorchScript module's attributes, or the `state_dict` entry of a training
/// checkpoint (CompVis / Lightning `.ckpt`).
fn state_dict(obj: Object) -> Option<Vec<(Object, Object)>> {
    let obj = match obj {
        Object::Build { callable, args } => match *callable {
            Object::Reduce { callable, .. }
                if matches!(&*callable, Object::Class { module_name, class_name }
                    if module_name == "__torch__" && class_name == "Module") =>
            {
                *args
            }
            _ => return None,
        },
        obj => obj,
    };
    let Object::Dict(entries) = obj else {
        return None;
    };
    let is_tensor = |v: &Object| matches!(v, Object::Reduce { .. });
    if entries.iter().any(|(_, v)| is_tensor(v)) {
        return Some(entries);
    }
    entries
        .into_iter()
        .find(|(k, _)| entry_name(k) == Some("state_dict"))
        .and_then(|(_, v)| match v {
            Object::Dict(d) => Some(d),
            _ => None,
        })
}

impl PickledTensors {
    pub fn open(path: &Path) -> Result<Self> {
        let bad =
            |msg: String| Error::config(path, format!("cannot read this PyTorch pickle: {msg}"));
        let file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
        let mut zip = zip::ZipArchive::new(BufReader::new(file)).map_err(|e| bad(e.to_string()))?;
        let pkl = zip
            .file_names()
            .filter_map(|n| n.ok())
            .find(|n| n.ends_with("data.pkl"))
            .map(|n| n.into_owned())
            .ok_or_else(|| bad("a zip without a `data.pkl`".into()))?;
        let dir = PathBuf::from(pkl.strip_suffix(".pkl").unwrap_or(&pkl));
        let obj = {
            let entry = zip.by_name(&pkl).map_err(|e| bad(e.to_string()))?;
            let mut stack = Stack::empty();
            stack
                .read_loop(&mut BufReader::new(entry))
                .map_err(|e| bad(format!("{pkl}: {e}")))?;
            stack.finalize().map_err(|e| bad(format!("{pkl}: {e}")))?
        };
        let entries = state_dict(obj).ok_or_else(|| {
            Error::config(
                path,
                "a PyTorch pickle without a state dict of tensors (neither at the top level \
                 nor under `state_dict`)",
            )
        })?;
        let mut infos = HashMap::new();
        let mut skipped = Vec::new();
        for (k, v) in entries {
            let name = entry_name(&k).map(str::to_string);
            match v.into_tensor_info(k, &dir) {
                Ok(Some(info)) => {
                    infos.insert(info.name.clone(), info);
                }
                _ => skipped.extend(name),
            }
        }
        Ok(Self {
            path: path.to_path_buf(),
            infos,
            skipped,
            zip: Mutex::new(zip),
        })
    }

    /// Each tensor's name and shape.
    pub fn shapes(&self) -> Vec<(String, Vec<usize>)> {
        self.infos
            .iter()
            .map(|(k, i)| (k.clone(), i.layout.dims().to_vec()))
            .collect()
    }

    /// Entries of the state dict that are not tensors this reader reads.
    pub fn skipped(&self) -> &[String] {
        &self.skipped
    }

    /// The tensor `name` in its stored dtype, on `device`; None when absent.
    pub fn get(&self, name: &str, device: &Device) -> Result<Option<Tensor>> {
        let Some(info) = self.infos.get(name) else {
            return Ok(None);
        };
        let bad = |msg: String| Error::config(&self.path, format!("tensor `{name}`: {msg}"));
        let layout = &info.layout;
        let fortran = layout.is_fortran_contiguous() && !layout.is_contiguous();
        if !layout.is_contiguous() && !fortran {
            return Err(bad(format!(
                "strided storage (shape {:?}, stride {:?}) is not read; save it contiguous",
                layout.dims(),
                layout.stride()
            )));
        }
        let mut zip = self.zip.lock().unwrap_or_else(|e| e.into_inner());
        let mut entry = zip
            .by_name(&info.path)
            .map_err(|e| bad(format!("{}: {e}", info.path)))?;
        let skip = layout.start_offset() as u64;
        std::io::copy(&mut (&mut entry).take(skip), &mut std::io::sink())
            .map_err(|e| bad(e.to_string()))?;
        let dims = layout.dims().to_vec();
        let n: usize = dims.iter().product::<usize>() * info.dtype.size_in_bytes();
        let mut bytes = vec![0u8; n];
        entry
            .read_exact(&mut bytes)
            .map_err(|e| bad(format!("{}: {e}", info.path)))?;
        let t = if fortran {
            // Column-major: the bytes of the transpose, transposed back.
            let rev: Vec<usize> = dims.iter().rev().copied().collect();
            let t = Tensor::from_raw_buffer(&bytes, info.dtype, &rev, &Device::Cpu)?;
            let order: Vec<usize> = (0..dims.len()).rev().collect();
            t.permute(order)?.contiguous()?
        } else {
            Tensor::from_raw_buffer(&bytes, info.dtype, &dims, &Device::Cpu)?
        };
        Ok(Some(t.to_device(device)?))
    }
}
