//! Where a model's parameters come from: a safetensors file (diffusers layout),
//! or a seeded random initialisation for training from scratch.
//!
//! Model constructors ask a [`Vb`] for each tensor by its state-dict path
//! (`vb.pp("down_blocks").pp(0).get(&[320, 4, 3, 3], "weight", init)`), so module
//! paths equal diffusers' keys. The store records which keys were used: after
//! building a model, [`Vb::finish`] reports keys of the file the model did not use.
//! In trainable mode every tensor becomes a [`Var`] whose gradient the optimizer reads.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use candle_core::{DType, Device, Tensor, Var};
use rand::SeedableRng;
use rand::rngs::StdRng;
use rand_distr::{Distribution, Normal, Uniform};

use crate::{Error, Result};

/// How a parameter is initialised when it is not loaded from a file.
#[derive(Debug, Clone, Copy)]
pub enum Init {
    Const(f64),
    /// Uniform in `[-bound, bound]`.
    Uniform(f64),
    Normal(f64),
}

impl Init {
    /// PyTorch's default for `nn.Linear` / `nn.Conv2d` weights and biases:
    /// uniform with bound `1/sqrt(fan_in)`.
    pub fn torch_default(fan_in: usize) -> Self {
        Init::Uniform(1.0 / (fan_in as f64).sqrt())
    }
}

enum Source {
    File {
        path: PathBuf,
        tensors: HashMap<String, Tensor>,
    },
    Random {
        rng: Box<Mutex<StdRng>>,
    },
}

struct Inner {
    source: Source,
    device: Device,
    trainable: bool,
    vars: Mutex<BTreeMap<String, Var>>,
    used: Mutex<HashSet<String>>,
}

/// A handle on a parameter store at one path prefix. Cheap to clone.
#[derive(Clone)]
pub struct Vb {
    inner: Arc<Inner>,
    prefix: String,
}

/// Reads every tensor of a safetensors file: floating point as f32, integers
/// as stored, on `device` (files of other formats are refused; see
/// [`super::weights::read_weights`] for those).
pub fn read_safetensors(path: &Path, device: &Device) -> Result<HashMap<String, Tensor>> {
    super::weights::WeightsReader::open_safetensors(path)?.load_all(device)
}

/// Checks that parameters read from `path` may be held in `dtype`: f32, f16
/// or bf16 ([`super::weights::check_float_dtype`]), and f32 when they are
/// trainable (the master weights the optimizer updates stay f32; mixed
/// precision casts them per use, [`super::precision`]).
pub fn check_params_dtype(path: &Path, trainable: bool, dtype: DType) -> Result<()> {
    super::weights::check_float_dtype(path, dtype)?;
    if trainable && dtype != DType::F32 {
        return Err(Error::config(
            path,
            format!(
                "trainable parameters are kept in f32 (the master weights the optimizer \
                 updates), not read in {}; only a frozen component is read in half precision",
                dtype.as_str()
            ),
        ));
    }
    Ok(())
}

impl Vb {
    /// Parameters read from a weight file (safetensors, a shard index or a
    /// PyTorch zip pickle: [`super::weights`]; f32, f16 or bf16 stored; f32 in memory).
    pub fn from_file(path: &Path, device: &Device, trainable: bool) -> Result<Self> {
        Self::from_file_in(path, device, trainable, DType::F32)
    }

    /// [`Self::from_file`] with every floating-point tensor held in `dtype`
    /// (f32, f16 or bf16), each cast as it is read
    /// ([`super::weights::read_weights_in`]): a frozen component in half
    /// precision without an f32 copy of it ever in memory, its tensors
    /// bit-identical to `from_file` followed by [`Self::converted`].
    /// Trainable parameters stay f32: another `dtype` with `trainable` is an
    /// error ([`check_params_dtype`]).
    pub fn from_file_in(
        path: &Path,
        device: &Device,
        trainable: bool,
        dtype: DType,
    ) -> Result<Self> {
        check_params_dtype(path, trainable, dtype)?;
        let tensors = super::weights::read_weights_in(path, device, dtype)?;
        Ok(Self::from_tensors(path, tensors, device, trainable))
    }

    /// Parameters from tensors already in memory; `path` names their origin in errors.
    pub fn from_tensors(
        path: &Path,
        tensors: HashMap<String, Tensor>,
        device: &Device,
        trainable: bool,
    ) -> Self {
        Self::new(
            Source::File {
                path: path.to_path_buf(),
                tensors,
            },
            device,
            trainable,
        )
    }

    /// Frozen random weights for the model `build` creates: drawn from a
    /// seeded RNG into a recording store while `build` runs, then returned
    /// in `dtype` as a frozen store holding them (build the model again from
    /// it). Benchmarks of published architectures use it: no weights can be
    /// downloaded, and a step's cost does not depend on their values.
    pub fn random_frozen(
        seed: u64,
        device: &Device,
        dtype: DType,
        build: impl FnOnce(&Vb) -> Result<()>,
    ) -> Result<Self> {
        let drawn = Self::random(seed, device, true);
        build(&drawn)?;
        drawn.converted(dtype)
    }

    /// Fresh parameters drawn from a seeded RNG (training from scratch, benchmarks).
    pub fn random(seed: u64, device: &Device, trainable: bool) -> Self {
        Self::new(
            Source::Random {
                rng: Box::new(Mutex::new(StdRng::seed_from_u64(seed))),
            },
            device,
            trainable,
        )
    }

    fn new(source: Source, device: &Device, trainable: bool) -> Self {
        Self {
            inner: Arc::new(Inner {
                source,
                device: device.clone(),
                trainable,
                vars: Mutex::new(BTreeMap::new()),
                used: Mutex::new(HashSet::new()),
            }),
            prefix: String::new(),
        }
    }

    /// The store one level down: `vb.pp("conv_in")`.
    pub fn pp(&self, name: impl ToString) -> Self {
        let name = name.to_string();
        let prefix = if self.prefix.is_empty() {
            name
        } else {
            format!("{}.{}", self.prefix, name)
        };
        Self {
            inner: self.inner.clone(),
            prefix,
        }
    }

    pub fn device(&self) -> &Device {
        &self.inner.device
    }

    pub fn is_trainable(&self) -> bool {
        self.inner.trainable
    }

    /// The file the parameters come from (or `<random init>`).
    pub fn path(&self) -> PathBuf {
        match &self.inner.source {
            Source::File { path, .. } => path.clone(),
            Source::Random { .. } => PathBuf::from("<random init>"),
        }
    }

    fn key(&self, name: &str) -> String {
        if self.prefix.is_empty() {
            name.to_string()
        } else {
            format!("{}.{}", self.prefix, name)
        }
    }

    /// Whether the file holds a tensor at this path (always false for random init).
    pub fn contains(&self, name: &str) -> bool {
        match &self.inner.source {
            Source::File { tensors, .. } => tensors.contains_key(&self.key(name)),
            Source::Random { .. } => false,
        }
    }

    /// The tensor at `prefix.name`, checked against `shape`.
    pub fn get(&self, shape: &[usize], name: &str, init: Init) -> Result<Tensor> {
        let key = self.key(name);
        let t = match &self.inner.source {
            Source::File { path, tensors } => {
                let t = tensors.get(&key).ok_or_else(|| Error::MissingKey {
                    path: path.clone(),
                    key: key.clone(),
                    expected: shape.to_vec(),
                })?;
                if t.dims() != shape {
                    return Err(Error::ShapeMismatch {
                        path: path.clone(),
                        key,
                        expected: shape.to_vec(),
                        found: t.dims().to_vec(),
                    });
                }
                self.inner.used.lock().unwrap().insert(key.clone());
                t.clone()
            }
            Source::Random { rng } => {
                let n: usize = shape.iter().product();
                let mut rng = rng.lock().unwrap();
                let data: Vec<f32> = match init {
                    Init::Const(c) => vec![c as f32; n],
                    Init::Uniform(b) => {
                        let d =
                            Uniform::new_inclusive(-b, b).map_err(|e| Error::msg(e.to_string()))?;
                        (0..n).map(|_| d.sample(&mut *rng) as f32).collect()
                    }
                    Init::Normal(s) => {
                        let d = Normal::new(0.0, s).map_err(|e| Error::msg(e.to_string()))?;
                        (0..n).map(|_| d.sample(&mut *rng) as f32).collect()
                    }
                };
                Tensor::from_vec(data, shape, &self.inner.device)?
            }
        };
        if self.inner.trainable {
            let var = Var::from_tensor(&t)?;
            let out = var.as_tensor().clone();
            self.inner.vars.lock().unwrap().insert(key, var);
            Ok(out)
        } else {
            Ok(t)
        }
    }

    /// Errors if the file holds tensors the model never asked for.
    pub fn finish(&self) -> Result<()> {
        if let Source::File { path, tensors } = &self.inner.source {
            let used = self.inner.used.lock().unwrap();
            let mut unused: Vec<&String> = tensors.keys().filter(|k| !used.contains(*k)).collect();
            unused.sort();
            if let Some(first) = unused.first() {
                return Err(Error::UnexpectedKeys {
                    path: path.clone(),
                    count: unused.len(),
                    first: (*first).clone(),
                });
            }
        }
        Ok(())
    }

    /// Every tensor the model uses, by state-dict key, with trainable ones at
    /// their current values (what an export writes).
    pub fn tensors(&self) -> BTreeMap<String, Tensor> {
        let mut out = BTreeMap::new();
        if let Source::File { tensors, .. } = &self.inner.source {
            let used = self.inner.used.lock().unwrap();
            for (k, t) in tensors {
                if used.contains(k) {
                    out.insert(k.clone(), t.clone());
                }
            }
        }
        for (k, v) in self.inner.vars.lock().unwrap().iter() {
            out.insert(k.clone(), v.as_tensor().detach());
        }
        out
    }

    /// A frozen store holding every tensor of this one converted to `dtype`
    /// (a model rebuilt from it computes in that dtype: an inference or
    /// frozen-base copy for mixed precision).
    pub fn converted(&self, dtype: DType) -> Result<Self> {
        let tensors = self
            .tensors()
            .into_iter()
            .map(|(k, t)| Ok((k, t.to_dtype(dtype)?)))
            .collect::<Result<HashMap<_, _>>>()?;
        Ok(Self::from_tensors(
            &self.path(),
            tensors,
            &self.inner.device,
            false,
        ))
    }

    /// The trainable parameters created so far, by state-dict key.
    pub fn vars(&self) -> BTreeMap<String, Var> {
        self.inner.vars.lock().unwrap().clone()
    }
}

/// The safetensors dtype a tensor is written in: its own for f16, bf16 and the
/// integer types, f32 for the rest.
fn stored_dtype(dtype: DType) -> safetensors::Dtype {
    match dtype {
        DType::F16 => safetensors::Dtype::F16,
        DType::BF16 => safetensors::Dtype::BF16,
        DType::I64 => safetensors::Dtype::I64,
        DType::U32 => safetensors::Dtype::U32,
        DType::U8 => safetensors::Dtype::U8,
        _ => safetensors::Dtype::F32,
    }
}

/// A tensor whose bytes are made only when the writer reaches it, so saving
/// holds one tensor's bytes at a time rather than a copy of the whole file.
struct Streamed<'a> {
    tensor: &'a Tensor,
    /// The float dtype to write a float tensor in (`None`: as it is).
    cast: Option<DType>,
    dtype: safetensors::Dtype,
    shape: Vec<usize>,
    /// The first tensor whose bytes could not be made, and why.
    failed: &'a std::sync::Mutex<Option<String>>,
    name: &'a str,
}

impl safetensors::View for Streamed<'_> {
    fn dtype(&self) -> safetensors::Dtype {
        self.dtype
    }
    fn shape(&self) -> &[usize] {
        &self.shape
    }
    fn data(&self) -> std::borrow::Cow<'_, [u8]> {
        let bytes = match self.cast {
            Some(dtype) => self
                .tensor
                .to_dtype(dtype)
                .map_err(Error::from)
                .and_then(|t| tensor_bytes(&t)),
            None => tensor_bytes(self.tensor),
        };
        match bytes {
            Ok((bytes, _)) => bytes.into(),
            Err(e) => {
                let mut f = self.failed.lock().unwrap_or_else(|p| p.into_inner());
                f.get_or_insert_with(|| format!("tensor `{}`: {e}", self.name));
                vec![0u8; self.data_len()].into()
            }
        }
    }
    fn data_len(&self) -> usize {
        self.shape.iter().product::<usize>() * self.dtype.bitsize() / 8
    }
}

/// Writes named tensors as a safetensors file (f16, bf16 and integer tensors
/// as they are, others as f32), atomically (temp file + rename), one tensor's
/// bytes in memory at a time.
pub fn save_safetensors(
    tensors: &BTreeMap<String, Tensor>,
    path: &Path,
    metadata: Option<HashMap<String, String>>,
) -> Result<()> {
    save_safetensors_as(tensors, path, metadata, None)
}

/// [`save_safetensors`] with every floating-point tensor written in `dtype`
/// (f32, f16 or bf16; cast one tensor at a time as the writer reaches it),
/// integer tensors as they are; `None` writes each as it is.
pub fn save_safetensors_as(
    tensors: &BTreeMap<String, Tensor>,
    path: &Path,
    metadata: Option<HashMap<String, String>>,
    dtype: Option<DType>,
) -> Result<()> {
    let failed = std::sync::Mutex::new(None);
    let views = tensors.iter().map(|(k, t)| {
        let cast = dtype.filter(|_| t.dtype().is_float());
        let stored = stored_dtype(cast.unwrap_or(t.dtype()));
        (
            k.as_str(),
            Streamed {
                tensor: t,
                cast,
                dtype: stored,
                shape: t.dims().to_vec(),
                failed: &failed,
                name: k,
            },
        )
    });
    // Written beside `path` and renamed over it only once complete and right,
    // so a file already there survives any failure.
    let tmp = crate::util::temp_beside(path)?;
    let written = safetensors::serialize_to_file(views, metadata, &tmp);
    let failed = failed.into_inner().unwrap_or_else(|p| p.into_inner());
    let error = match (written, failed) {
        (_, Some(msg)) => Some(msg),
        (Err(e), None) => Some(e.to_string()),
        (Ok(()), None) => None,
    };
    if let Some(msg) = error {
        std::fs::remove_file(&tmp).ok();
        return Err(Error::Safetensors {
            path: path.to_path_buf(),
            msg,
        });
    }
    std::fs::rename(&tmp, path).map_err(|e| Error::io(path, e))
}

fn tensor_bytes(t: &Tensor) -> Result<(Vec<u8>, safetensors::Dtype)> {
    let t = t.flatten_all()?;
    Ok(match t.dtype() {
        DType::F16 => {
            let v = t.to_vec1::<half::f16>()?;
            (
                v.iter().flat_map(|x| x.to_le_bytes()).collect(),
                safetensors::Dtype::F16,
            )
        }
        DType::BF16 => {
            let v = t.to_vec1::<half::bf16>()?;
            (
                v.iter().flat_map(|x| x.to_le_bytes()).collect(),
                safetensors::Dtype::BF16,
            )
        }
        DType::I64 => {
            let v = t.to_vec1::<i64>()?;
            (
                v.iter().flat_map(|x| x.to_le_bytes()).collect(),
                safetensors::Dtype::I64,
            )
        }
        DType::U32 => {
            let v = t.to_vec1::<u32>()?;
            (
                v.iter().flat_map(|x| x.to_le_bytes()).collect(),
                safetensors::Dtype::U32,
            )
        }
        DType::U8 => (t.to_vec1::<u8>()?, safetensors::Dtype::U8),
        _ => {
            let v = t.to_dtype(DType::F32)?.to_vec1::<f32>()?;
            (
                v.iter().flat_map(|x| x.to_le_bytes()).collect(),
                safetensors::Dtype::F32,
            )
        }
    })
}
