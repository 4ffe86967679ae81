//! Parameters by name: loaded from safetensors (f32, f16 or bf16, kept as f32 masters) or
//! initialised from a seed like PyTorch's defaults, frozen (plain tensors) or trainable
//! (`Var`s whose gradients the optimizer reads).

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use candle_core::{DType, Device, Tensor, Var};

use super::error::{ModelError, Result};
use crate::rng::Rng;

/// How a parameter is initialised when there are no weights to load.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Init {
    /// Uniform in `[-bound, bound]` (PyTorch's default for linear and conv layers).
    Uniform(f64),
    /// Normal with this standard deviation (embeddings).
    Normal(f64),
    /// All ones (norm weights).
    Ones,
    /// All zeros (norm biases).
    Zeros,
}

enum Source {
    Loaded { tensors: HashMap<String, Tensor>, origin: PathBuf },
    Random { seed: u64 },
}

/// The parameters of one model.
pub struct Weights {
    source: Source,
    device: Device,
    dtype: DType,
    trainable: bool,
    /// Aliases for old names: `new name` → `old name` tried when the new one is missing.
    aliases: Vec<(String, String)>,
    created: Mutex<BTreeMap<String, Var>>,
}

/// The safetensors files a diffusers/transformers model folder may hold, in preference order.
const WEIGHT_FILES: [&str; 4] = [
    "diffusion_pytorch_model.safetensors",
    "model.safetensors",
    "diffusion_pytorch_model.fp16.safetensors",
    "model.fp16.safetensors",
];

impl Weights {
    /// Loads a model folder's weights (`diffusion_pytorch_model.safetensors`,
    /// `model.safetensors`, their `.fp16` variants, or a sharded `*.safetensors.index.json`).
    pub fn load(dir: &Path, device: &Device, trainable: bool) -> Result<Weights> {
        let files = weight_files(dir)?;
        let mut tensors = HashMap::new();
        for file in &files {
            let loaded = candle_core::safetensors::load(file, &Device::Cpu).map_err(|e| ModelError::File {
                path: file.clone(),
                message: format!("not a readable safetensors file: {e}"),
            })?;
            for (name, t) in loaded {
                tensors.insert(name, t.to_dtype(DType::F32)?.to_device(device)?);
            }
        }
        let origin = if files.len() == 1 { files[0].clone() } else { dir.to_path_buf() };
        Ok(Weights {
            source: Source::Loaded { tensors, origin },
            device: device.clone(),
            dtype: DType::F32,
            trainable,
            aliases: Vec::new(),
            created: Mutex::new(BTreeMap::new()),
        })
    }

    /// Frozen parameters from tensors in memory (a trainer's weights, detached): a model built
    /// from them records no autograd graph, for inference next to training.
    pub fn frozen(tensors: HashMap<String, Tensor>, device: &Device) -> Weights {
        Weights {
            source: Source::Loaded { tensors, origin: PathBuf::from("the trainer's weights") },
            device: device.clone(),
            dtype: DType::F32,
            trainable: false,
            aliases: Vec::new(),
            created: Mutex::new(BTreeMap::new()),
        }
    }

    /// Parameters initialised from `seed`: each one from its name, so the result does not
    /// depend on the order the model asks for them.
    pub fn random(seed: u64, device: &Device, trainable: bool) -> Weights {
        Weights {
            source: Source::Random { seed },
            device: device.clone(),
            dtype: DType::F32,
            trainable,
            aliases: Vec::new(),
            created: Mutex::new(BTreeMap::new()),
        }
    }

    /// Accepts `old` names for tensors the model asks for as `new` (substring replacement).
    pub fn with_alias(mut self, new: &str, old: &str) -> Weights {
        self.aliases.push((new.to_string(), old.to_string()));
        self
    }

    /// Keeps parameters in `dtype` instead of f32 (f64 for gradient checks).
    pub fn in_dtype(mut self, dtype: DType) -> Weights {
        self.dtype = dtype;
        self
    }

    /// The device parameters live on.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// True when a loaded file has a tensor called `name`.
    pub fn contains(&self, name: &str) -> bool {
        matches!(&self.source, Source::Loaded { tensors, .. } if tensors.contains_key(name))
    }

    /// True when parameters are initialised rather than loaded.
    pub fn is_random(&self) -> bool {
        matches!(self.source, Source::Random { .. })
    }

    /// The parameter `name` of `shape`.
    pub fn get(&self, name: &str, shape: &[usize], init: Init) -> Result<Tensor> {
        let tensor = match &self.source {
            Source::Loaded { tensors, origin } => {
                let found = tensors.get(name).or_else(|| {
                    self.aliases
                        .iter()
                        .filter(|(new, _)| name.contains(new.as_str()))
                        .find_map(|(new, old)| tensors.get(&name.replace(new.as_str(), old)))
                });
                let t = found.ok_or_else(|| ModelError::MissingTensor {
                    origin: origin.clone(),
                    name: name.to_string(),
                    expected: shape.to_vec(),
                })?;
                let t = match t.dims() {
                    d if d == shape => t.clone(),
                    // Old VAE checkpoints store attention projections as 1x1 convs.
                    [o, i, 1, 1] if shape == [*o, *i] => t.reshape(shape)?,
                    d => {
                        return Err(ModelError::Shape {
                            origin: origin.clone(),
                            name: name.to_string(),
                            expected: shape.to_vec(),
                            found: d.to_vec(),
                        })
                    }
                };
                t
            }
            Source::Random { seed } => initialise(*seed, name, shape, init, &self.device)?,
        };
        let tensor = tensor.to_dtype(self.dtype)?;
        if !self.trainable {
            return Ok(tensor);
        }
        let var = Var::from_tensor(&tensor)?;
        let t = var.as_tensor().clone();
        self.created.lock().expect("weights lock").insert(name.to_string(), var);
        Ok(t)
    }

    /// Every trainable parameter created so far, by name.
    pub fn vars(&self) -> BTreeMap<String, Var> {
        self.created.lock().expect("weights lock").clone()
    }

    /// A view that prefixes names with `prefix.` (`""` for none).
    pub fn at(&self, prefix: &str) -> Scope<'_> {
        Scope { weights: self, prefix: prefix.to_string() }
    }
}

fn weight_files(dir: &Path) -> Result<Vec<PathBuf>> {
    for name in WEIGHT_FILES {
        if dir.join(name).is_file() {
            return Ok(vec![dir.join(name)]);
        }
    }
    let index = std::fs::read_dir(dir)
        .map_err(|e| ModelError::File { path: dir.to_path_buf(), message: e.to_string() })?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| p.to_string_lossy().ends_with(".safetensors.index.json"));
    if let Some(index) = index {
        let text = std::fs::read_to_string(&index)
            .map_err(|e| ModelError::File { path: index.clone(), message: e.to_string() })?;
        let json: serde_json::Value = serde_json::from_str(&text)
            .map_err(|e| ModelError::File { path: index.clone(), message: e.to_string() })?;
        let mut shards: Vec<String> = json["weight_map"]
            .as_object()
            .map(|m| m.values().filter_map(|v| v.as_str().map(str::to_string)).collect())
            .unwrap_or_default();
        shards.sort();
        shards.dedup();
        return Ok(shards.into_iter().map(|s| dir.join(s)).collect());
    }
    Err(ModelError::File {
        path: dir.to_path_buf(),
        message: format!("no weights: expected one of {}", WEIGHT_FILES.join(", ")),
    })
}

fn initialise(seed: u64, name: &str, shape: &[usize], init: Init, device: &Device) -> Result<Tensor> {
    let n: usize = shape.iter().product();
    let values: Vec<f32> = match init {
        Init::Ones => vec![1.0; n],
        Init::Zeros => vec![0.0; n],
        Init::Uniform(bound) | Init::Normal(bound) => {
            let mut key = 0xcbf2_9ce4_8422_2325u64;
            for b in name.bytes() {
                key = (key ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3);
            }
            let mut rng = Rng::new(seed, key);
            match init {
                Init::Uniform(_) => (0..n).map(|_| rng.range(-bound, bound) as f32).collect(),
                _ => (0..n).map(|_| (bound * rng.normal()) as f32).collect(),
            }
        }
    };
    Ok(Tensor::from_vec(values, shape, device)?)
}

/// Parameters under a name prefix, as the model tree is built.
#[derive(Clone)]
pub struct Scope<'w> {
    weights: &'w Weights,
    prefix: String,
}

impl<'w> Scope<'w> {
    /// The parameter `prefix.name`.
    pub fn get(&self, name: &str, shape: &[usize], init: Init) -> Result<Tensor> {
        self.weights.get(&self.name(name), shape, init)
    }

    /// The full name of `name` here.
    pub fn name(&self, name: &str) -> String {
        if self.prefix.is_empty() {
            name.to_string()
        } else {
            format!("{}.{name}", self.prefix)
        }
    }

    /// A child scope.
    pub fn at(&self, name: impl std::fmt::Display) -> Scope<'w> {
        Scope { weights: self.weights, prefix: self.name(&name.to_string()) }
    }

    /// The device.
    pub fn device(&self) -> &Device {
        self.weights.device()
    }
}
