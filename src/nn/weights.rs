//! Reading weight files in the formats real checkpoints come in: safetensors,
//! sharded safetensors (`*.safetensors.index.json`, as `save_pretrained` writes
//! large models), and PyTorch's zip pickles (`torch.save`: diffusers'
//! `diffusion_pytorch_model.bin`, transformers' `pytorch_model.bin`, the
//! original `.ckpt` checkpoints, with their tensors under `state_dict`).
//!
//! Pickles are read by [`super::torch_pickle`] on candle's pickle interpreter,
//! which only rebuilds objects and never runs code from the file (unlike
//! `torch.load` without `weights_only`). The format is found from the file's
//! first bytes, not its name. Floating-point tensors come out as f32 (the
//! models compute in f32 and cast where mixed precision asks for it), or in
//! the f16 / bf16 a frozen component is read in ([`WeightsReader::load_in`]:
//! cast one tensor at a time while reading, so no f32 copy of the whole file
//! is made); integer tensors keep their dtype.

use std::collections::HashMap;
use std::io::Read;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use safetensors::SafeTensors;
use safetensors::tensor::Metadata;

use crate::{Error, Result};

/// An open weight file: the names and shapes of its tensors, read without
/// loading them, and each tensor on demand.
pub enum WeightsReader {
    Safetensors {
        path: PathBuf,
        map: memmap2::Mmap,
        header_len: usize,
        meta: Metadata,
    },
    Pickle {
        path: PathBuf,
        pth: super::torch_pickle::PickledTensors,
    },
    /// A `*.index.json` and its shards; `owner` maps each tensor to its shard.
    Sharded {
        index: PathBuf,
        shards: Vec<WeightsReader>,
        owner: HashMap<String, usize>,
    },
}

impl std::fmt::Debug for WeightsReader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WeightsReader")
            .field("path", &self.path())
            .finish_non_exhaustive()
    }
}

/// The first bytes of a file (fewer when it is shorter).
fn magic(path: &Path) -> Result<Vec<u8>> {
    let mut f = std::fs::File::open(path).map_err(|e| Error::reading(path, e))?;
    let mut buf = Vec::with_capacity(8);
    (&mut f)
        .take(8)
        .read_to_end(&mut buf)
        .map_err(|e| Error::io(path, e))?;
    Ok(buf)
}

/// Whether `path` names a shard index (`*.index.json`).
pub fn is_index(path: &Path) -> bool {
    path.file_name()
        .and_then(|n| n.to_str())
        .is_some_and(|n| n.ends_with(".index.json"))
}

impl WeightsReader {
    /// Opens a safetensors file, a shard index or a PyTorch zip pickle.
    pub fn open(path: &Path) -> Result<Self> {
        if is_index(path) {
            return Self::open_sharded(path);
        }
        let head = magic(path)?;
        if head.starts_with(b"PK\x03\x04") {
            Self::open_pickle(path)
        } else if head.starts_with(&[0x80, 0x02, 0x8a, 0x0a]) {
            // Protocol-2 PROTO, then LONG1 of torch's legacy magic number. As
            // a safetensors header length these bytes would be over 176 MB,
            // past that format's 100 MB limit, so no safetensors file starts so.
            Err(Error::config(
                path,
                "a PyTorch pickle in the legacy (non-zip) format of torch < 1.6, which is not \
                 read; save it again with a newer torch or convert it to .safetensors",
            ))
        } else {
            Self::open_safetensors(path).map_err(|e| match e {
                Error::Safetensors { path, msg }
                    if path.extension().is_none_or(|e| e != "safetensors") =>
                {
                    Error::Safetensors {
                        path,
                        msg: format!("{msg} (nor is it a PyTorch zip pickle)"),
                    }
                }
                e => e,
            })
        }
    }

    /// A safetensors file, mapped; only its header is read here.
    pub fn open_safetensors(path: &Path) -> Result<Self> {
        let file = std::fs::File::open(path).map_err(|e| Error::reading(path, e))?;
        let bad = |e: safetensors::SafeTensorError| Error::Safetensors {
            path: path.to_path_buf(),
            msg: e.to_string(),
        };
        if file.metadata().map_err(|e| Error::io(path, e))?.len() == 0 {
            // An empty file cannot be mapped; it is the format's own error.
            return Err(bad(SafeTensors::read_metadata(&[])
                .err()
                .unwrap_or(safetensors::SafeTensorError::HeaderTooSmall)));
        }
        // SAFETY: the map is only read; like candle's `MmapedSafetensors`, we
        // assume nobody truncates the file while it is being loaded.
        let map = unsafe { memmap2::Mmap::map(&file) }.map_err(|e| Error::io(path, e))?;
        let (header_len, meta) = SafeTensors::read_metadata(&map).map_err(bad)?;
        Ok(Self::Safetensors {
            path: path.to_path_buf(),
            map,
            header_len,
            meta,
        })
    }

    fn open_pickle(path: &Path) -> Result<Self> {
        let pth = super::torch_pickle::PickledTensors::open(path)?;
        if pth.shapes().is_empty() {
            return Err(Error::config(
                path,
                format!(
                    "a PyTorch pickle whose state dict holds no tensor this tool reads \
                     (entries: {})",
                    pth.skipped().join(", ")
                ),
            ));
        }
        Ok(Self::Pickle {
            path: path.to_path_buf(),
            pth,
        })
    }

    fn open_sharded(index: &Path) -> Result<Self> {
        let json: serde_json::Value = crate::util::read_json(index)?;
        let map = json
            .get("weight_map")
            .and_then(|m| m.as_object())
            .ok_or_else(|| Error::config(index, "no `weight_map` object in the shard index"))?;
        let dir = index.parent().unwrap_or(Path::new("."));
        let mut files: Vec<String> = Vec::new();
        let mut listed: HashMap<String, usize> = HashMap::new();
        for (name, file) in map {
            let file = file.as_str().ok_or_else(|| {
                Error::config(index, format!("`weight_map.{name}` is not a file name"))
            })?;
            let i = match files.iter().position(|f| f == file) {
                Some(i) => i,
                None => {
                    files.push(file.to_string());
                    files.len() - 1
                }
            };
            listed.insert(name.clone(), i);
        }
        let mut shards = Vec::with_capacity(files.len());
        for f in &files {
            let p = dir.join(f);
            if !p.is_file() {
                return Err(Error::config(
                    index,
                    format!("the shard `{f}` it lists is missing"),
                ));
            }
            shards.push(Self::open(&p)?);
        }
        // Each tensor is read from the shard that holds it; a tensor the index
        // puts in a shard that lacks it is an error naming both.
        let mut owner = HashMap::new();
        for (i, shard) in shards.iter().enumerate() {
            for (name, _) in shard.shapes() {
                owner.insert(name, i);
            }
        }
        for (name, i) in &listed {
            if owner.get(name) != Some(i) {
                return Err(Error::config(
                    index,
                    format!(
                        "tensor `{name}` is listed in `{}` but is not in it",
                        files[*i]
                    ),
                ));
            }
        }
        Ok(Self::Sharded {
            index: index.to_path_buf(),
            shards,
            owner,
        })
    }

    /// The file this reader reads (the index for a sharded model).
    pub fn path(&self) -> &Path {
        match self {
            Self::Safetensors { path, .. } | Self::Pickle { path, .. } => path,
            Self::Sharded { index, .. } => index,
        }
    }

    /// Every file the weights are in (the index and its shards for a sharded model).
    pub fn files(&self) -> Vec<PathBuf> {
        match self {
            Self::Sharded { index, shards, .. } => std::iter::once(index.clone())
                .chain(shards.iter().flat_map(|s| s.files()))
                .collect(),
            other => vec![other.path().to_path_buf()],
        }
    }

    /// Each tensor's name and shape, without loading it.
    pub fn shapes(&self) -> Vec<(String, Vec<usize>)> {
        match self {
            Self::Safetensors { meta, .. } => meta
                .tensors()
                .into_iter()
                .map(|(k, info)| (k, info.shape.clone()))
                .collect(),
            Self::Pickle { pth, .. } => pth.shapes(),
            Self::Sharded { shards, .. } => shards.iter().flat_map(|s| s.shapes()).collect(),
        }
    }

    /// The safetensors `__metadata__` strings (none for a pickle; a sharded
    /// model's are its first shard's).
    pub fn metadata(&self) -> HashMap<String, String> {
        match self {
            Self::Safetensors { meta, .. } => meta.metadata().clone().unwrap_or_default(),
            Self::Pickle { .. } => HashMap::new(),
            Self::Sharded { shards, .. } => {
                shards.first().map(|s| s.metadata()).unwrap_or_default()
            }
        }
    }

    /// The tensor `name` on `device`: f32 for floating point, integers as stored.
    pub fn load(&self, name: &str, device: &Device) -> Result<Tensor> {
        self.load_in(name, device, DType::F32)
    }

    /// The tensor `name` on `device`, floating point in `float` (f32, f16 or
    /// bf16: [`check_float_dtype`]), integers as stored. The values are those
    /// of [`load`](Self::load) converted to `float` afterwards, bit for bit
    /// (a stored dtype other than `float` goes through f32 as that does), but
    /// only this one tensor is ever held in f32.
    pub fn load_in(&self, name: &str, device: &Device, float: DType) -> Result<Tensor> {
        check_float_dtype(self.path(), float)?;
        let missing = || Error::MissingKey {
            path: self.path().to_path_buf(),
            key: name.to_string(),
            expected: Vec::new(),
        };
        match self {
            Self::Safetensors {
                path,
                map,
                header_len,
                meta,
            } => {
                let info = meta.info(name).ok_or_else(missing)?;
                let start = 8 + header_len;
                let (a, b) = info.data_offsets;
                let view = safetensors::tensor::TensorView::new(
                    info.dtype,
                    info.shape.clone(),
                    &map[start + a..start + b],
                )
                .map_err(|e| Error::Safetensors {
                    path: path.clone(),
                    msg: format!("tensor `{name}`: {e}"),
                })?;
                use candle_core::safetensors::Load;
                use safetensors::Dtype as D;
                match view.dtype() {
                    D::F32 | D::F16 | D::BF16 | D::F64 => as_read(view.load(device)?, float),
                    D::I64 | D::U8 | D::U32 => Ok(view.load(device)?),
                    d => Err(Error::UnsupportedDType {
                        path: path.clone(),
                        key: name.to_string(),
                        dtype: format!("{d:?}"),
                    }),
                }
            }
            Self::Pickle { pth, .. } => {
                let t = pth.get(name, &Device::Cpu)?.ok_or_else(missing)?;
                let t = match t.dtype() {
                    DType::F32 | DType::F16 | DType::BF16 | DType::F64 => as_read(t, float)?,
                    _ => t,
                };
                Ok(t.to_device(device)?)
            }
            Self::Sharded { shards, owner, .. } => {
                let i = owner.get(name).ok_or_else(missing)?;
                shards[*i].load_in(name, device, float)
            }
        }
    }

    /// Every tensor, loaded.
    pub fn load_all(&self, device: &Device) -> Result<HashMap<String, Tensor>> {
        self.load_all_in(device, DType::F32)
    }

    /// Every tensor, loaded with floating point in `float` ([`Self::load_in`]).
    pub fn load_all_in(&self, device: &Device, float: DType) -> Result<HashMap<String, Tensor>> {
        check_float_dtype(self.path(), float)?;
        self.shapes()
            .into_iter()
            .map(|(name, _)| {
                let t = self.load_in(&name, device, float)?;
                Ok((name, t))
            })
            .collect()
    }
}

/// The dtypes floating-point weights are read in: f32, f16 or bf16. Any other
/// is an error naming `path`, the file that was to be read.
pub fn check_float_dtype(path: &Path, dtype: DType) -> Result<()> {
    match dtype {
        DType::F32 | DType::F16 | DType::BF16 => Ok(()),
        other => Err(Error::config(
            path,
            format!(
                "cannot read the weights in {}: floating-point weights are read in f32, f16 \
                 or bf16",
                other.as_str()
            ),
        )),
    }
}

/// A floating-point tensor as stored, in `float`: as it is when already so,
/// else through f32, the dtype [`WeightsReader::load`] reads in, so that
/// reading in `float` and converting an f32 read give the same bits (an f16
/// or bf16 value is exact in f32; an f64 one is rounded once to f32, then
/// to `float`, as a load followed by a conversion would).
fn as_read(t: Tensor, float: DType) -> Result<Tensor> {
    if t.dtype() == float {
        return Ok(t);
    }
    let t = if t.dtype() == DType::F32 {
        t
    } else {
        t.to_dtype(DType::F32)?
    };
    Ok(if float == DType::F32 {
        t
    } else {
        t.to_dtype(float)?
    })
}

/// Every tensor of a weight file in any of the formats above (see
/// [`WeightsReader`]): f32 for floating point, on `device`.
pub fn read_weights(path: &Path, device: &Device) -> Result<HashMap<String, Tensor>> {
    read_weights_in(path, device, DType::F32)
}

/// [`read_weights`] with floating-point tensors in `float` (f32, f16 or
/// bf16), each cast as it is read ([`WeightsReader::load_in`]): the whole
/// file is never held in f32.
pub fn read_weights_in(
    path: &Path,
    device: &Device,
    float: DType,
) -> Result<HashMap<String, Tensor>> {
    check_float_dtype(path, float)?;
    WeightsReader::open(path)?.load_all_in(device, float)
}
