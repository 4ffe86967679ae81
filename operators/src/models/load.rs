//! Building each model from a folder (a part folder such as `unet/`, with `config.json` and
//! safetensors) or from a preset with seeded random weights.

use std::path::{Path, PathBuf};

use candle_core::Device;

use super::config::{read_config, ClipTextConfig, UNetConfig, VaeConfig, PRESETS};
use super::error::{ModelError, Result};
use super::weights::Weights;
use super::{AutoencoderKl, ClipTextModel, UNet};

/// Where a model comes from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ModelSource {
    /// A part folder (`.../unet`, `.../vae`, `.../text_encoder`).
    Folder(PathBuf),
    /// A built-in size with random weights from the seed.
    Preset(String),
}

impl ModelSource {
    /// `path` if given, else `model/<part>` if given, else the preset.
    pub fn resolve(model: Option<&Path>, path: Option<&Path>, preset: Option<&str>, part: &str) -> Option<ModelSource> {
        match (path, model, preset) {
            (Some(p), _, _) => Some(ModelSource::Folder(p.to_path_buf())),
            (None, Some(m), _) => Some(ModelSource::Folder(m.join(part))),
            (None, None, Some(p)) => Some(ModelSource::Preset(p.to_string())),
            _ => None,
        }
    }
}

/// Random encoders give meaningless latents and embeddings: fine for benchmarks, never for
/// training a real model, so say so.
fn warn_random_encoder(part: &str, preset: &str) {
    tracing::warn!("{part}: preset `{preset}` has RANDOM weights; its outputs are for benchmarks and tests only");
}

fn unknown_preset(name: &str) -> ModelError {
    ModelError::Unsupported {
        origin: PathBuf::from("preset"),
        field: "preset".into(),
        value: name.into(),
        supported: PRESETS.join(", "),
    }
}

/// The UNet and its parameters.
pub fn load_unet(source: &ModelSource, device: &Device, trainable: bool, seed: u64) -> Result<(UNet, Weights)> {
    let (config, weights) = match source {
        ModelSource::Folder(dir) => {
            let (config, path): (UNetConfig, _) = read_config(dir)?;
            config.check(&path)?;
            (config, Weights::load(dir, device, trainable)?)
        }
        ModelSource::Preset(name) => {
            (UNetConfig::preset(name).ok_or_else(|| unknown_preset(name))?, Weights::random(seed, device, trainable))
        }
    };
    let unet = UNet::new(&config, &weights)?;
    Ok((unet, weights))
}

/// The VAE (frozen). Old checkpoints' `query/key/value/proj_attn` names are accepted.
pub fn load_vae(source: &ModelSource, device: &Device, seed: u64) -> Result<AutoencoderKl> {
    let (config, weights) = match source {
        ModelSource::Folder(dir) => {
            let (config, path): (VaeConfig, _) = read_config(dir)?;
            config.check(&path)?;
            (config, Weights::load(dir, device, false)?)
        }
        ModelSource::Preset(name) => {
            warn_random_encoder("vae", name);
            (VaeConfig::preset(name).ok_or_else(|| unknown_preset(name))?, Weights::random(seed, device, false))
        }
    };
    let weights = weights
        .with_alias("to_q", "query")
        .with_alias("to_k", "key")
        .with_alias("to_v", "value")
        .with_alias("to_out.0", "proj_attn");
    AutoencoderKl::new(&config, &weights)
}

/// The text encoder (frozen).
pub fn load_text_encoder(source: &ModelSource, device: &Device, seed: u64) -> Result<ClipTextModel> {
    let (config, weights) = match source {
        ModelSource::Folder(dir) => {
            let (config, path): (ClipTextConfig, _) = read_config(dir)?;
            config.check(&path)?;
            (config, Weights::load(dir, device, false)?)
        }
        ModelSource::Preset(name) => {
            warn_random_encoder("text_encoder", name);
            (ClipTextConfig::preset(name).ok_or_else(|| unknown_preset(name))?, Weights::random(seed, device, false))
        }
    };
    ClipTextModel::new(&config, &weights)
}
