//! Building each model from a folder (a part folder such as `unet/`, with `config.json` and
//! safetensors) or from a preset with seeded random weights.

use std::path::{Path, PathBuf};

use candle_core::{DType, Device};
use serde::de::DeserializeOwned;

use super::caption_words::CaptionWords;
use super::config::{read_config, ClipTextConfig, UNetConfig, VaeConfig, PRESETS};
use super::error::{ModelError, Result};
use super::pixel_patches::{PixelPatches, PIXELS_PRESET};
use super::weights::Weights;
use super::{Autoencoder, AutoencoderKl, ClipTextModel, UNet};

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
fn warn_random_encoder(part: &str, source: &ModelSource) {
    if let ModelSource::Preset(preset) = source {
        tracing::warn!("{part}: preset `{preset}` has RANDOM weights; its outputs are for benchmarks and tests only");
    }
}

fn unknown_preset(name: &str) -> ModelError {
    ModelError::Unsupported {
        origin: PathBuf::from("preset"),
        field: "preset".into(),
        value: name.into(),
        supported: PRESETS.join(", "),
    }
}

/// A part's config and weights: read and checked from its folder, or a preset's with weights
/// initialised from `seed`.
fn config_and_weights<C: DeserializeOwned>(
    source: &ModelSource,
    device: &Device,
    trainable: bool,
    seed: u64,
    preset: fn(&str) -> Option<C>,
    check: fn(&C, &Path) -> Result<()>,
) -> Result<(C, Weights)> {
    match source {
        ModelSource::Folder(dir) => {
            let (config, path) = read_config(dir)?;
            check(&config, &path)?;
            Ok((config, Weights::load(dir, device, trainable)?))
        }
        ModelSource::Preset(name) => {
            Ok((preset(name).ok_or_else(|| unknown_preset(name))?, Weights::random(seed, device, trainable)))
        }
    }
}

/// Checks the `config.json` of a part folder (`unet`, `vae` or `text_encoder`) as loading would,
/// without reading any weights: for `validate`. A folder with no `config.json` yet passes (a
/// later phase may train from what an earlier one will write).
pub fn check_part_config(dir: &Path, part: &str) -> Result<()> {
    if !dir.join("config.json").is_file() {
        return Ok(());
    }
    match part {
        "unet" => read_config::<UNetConfig>(dir).and_then(|(c, path)| c.check(&path)),
        "vae" if PixelPatches::is_in(dir) => Ok(()),
        "vae" => read_config::<VaeConfig>(dir).and_then(|(c, path)| c.check(&path)),
        "text_encoder" if CaptionWords::is_in(dir) => Ok(()),
        "text_encoder" => read_config::<ClipTextConfig>(dir).and_then(|(c, path)| c.check(&path)),
        other => Err(ModelError::Input(format!("no model part `{other}`"))),
    }
}

/// The UNet and its parameters.
pub fn load_unet(source: &ModelSource, device: &Device, trainable: bool, seed: u64) -> Result<(UNet, Weights)> {
    let (config, weights) = config_and_weights(source, device, trainable, seed, UNetConfig::preset, UNetConfig::check)?;
    let unet = UNet::new(&config, &weights)?;
    Ok((unet, weights))
}

/// The image autoencoder (frozen): SD's VAE, or the fixed [`PixelPatches`] for the preset
/// `pixels` or a folder whose config names it. Old checkpoints' `query/key/value/proj_attn`
/// names are accepted.
pub fn load_vae(source: &ModelSource, device: &Device, seed: u64) -> Result<Autoencoder> {
    load_vae_in(source, device, DType::F32, seed)
}

/// [`load_vae`] with its parameters kept in `dtype` (bf16 for encoding on GPUs: half the memory,
/// and no cast of every weight at every forward pass). Its input sets the compute dtype.
pub fn load_vae_in(source: &ModelSource, device: &Device, dtype: DType, seed: u64) -> Result<Autoencoder> {
    match source {
        ModelSource::Preset(name) if name == PIXELS_PRESET => return Ok(Autoencoder::Pixels(PixelPatches)),
        ModelSource::Folder(dir) if PixelPatches::is_in(dir) => return Ok(Autoencoder::Pixels(PixelPatches)),
        _ => {}
    }
    warn_random_encoder("vae", source);
    let (config, weights) = config_and_weights(source, device, false, seed, VaeConfig::preset, VaeConfig::check)?;
    let weights = weights
        .in_dtype(dtype)
        .with_alias("to_q", "query")
        .with_alias("to_k", "key")
        .with_alias("to_v", "value")
        .with_alias("to_out.0", "proj_attn");
    Ok(Autoencoder::Kl(Box::new(AutoencoderKl::new(&config, &weights)?)))
}

/// The text encoder (frozen).
pub fn load_text_encoder(source: &ModelSource, device: &Device, seed: u64) -> Result<ClipTextModel> {
    load_text_encoder_in(source, device, DType::F32, seed)
}

/// [`load_text_encoder`] with its parameters (and so its computation) in `dtype`.
pub fn load_text_encoder_in(source: &ModelSource, device: &Device, dtype: DType, seed: u64) -> Result<ClipTextModel> {
    warn_random_encoder("text_encoder", source);
    let (config, weights) =
        config_and_weights(source, device, false, seed, ClipTextConfig::preset, ClipTextConfig::check)?;
    ClipTextModel::new(&config, &weights.in_dtype(dtype))
}
