//! `vae_encode`: transformed images (`pixels`, u8 CHW) → VAE latents (`latents`, f32
//! `[4, H/8, W/8]`, already multiplied by the scaling factor), on the worker's device.

use std::path::PathBuf;

use candle_core::{DType, Device, Tensor};
use latentflow_engine::{
    Batch, Column, ColumnType, Field, InstanceContext, KeyError, NodeSpec, OpContext, OpError, OperatorConfig,
    OperatorImpl, OperatorKind, Ports, Stage,
};
use serde::{Deserialize, Serialize};

use latentflow_gpu_kernels::ops::normalize::normalize_u8_chw;

use crate::model_keys::{self, column_tensor, in_chunks, op_error};
use crate::models::load::{load_vae_in, ModelSource};
use crate::models::{Autoencoder, VAE_PRESETS};
use crate::rng::Rng;
use crate::training::Precision;

/// Which latents to keep from the VAE's posterior.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LatentMode {
    /// `mean + std * N(0, 1)`, what diffusers' trainers use (`latent_dist.sample()`).
    #[default]
    Sample,
    /// The posterior mean: deterministic.
    Mean,
}

/// Config of `vae_encode`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct VaeEncodeConfig {
    /// A diffusers pipeline folder; its `vae/` is used.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub model: Option<PathBuf>,
    /// The VAE's own folder (`config.json` + safetensors).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub path: Option<PathBuf>,
    /// A built-in size with random weights (benchmarks and tests), or `pixels`: the fixed demo
    /// autoencoder (patch colours, see [`crate::models::PixelPatches`]).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub preset: Option<String>,
    /// `"sample"` (default) or `"mean"`.
    pub mode: LatentMode,
    /// Multiplies the latents; the VAE config's `scaling_factor` (0.18215 for SD) by default.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub scaling_factor: Option<f64>,
    /// Images per forward pass.
    pub batch_size: usize,
    /// Compute precision on GPUs (bf16 unless set to f32; the CPU computes in f32).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub precision: Option<Precision>,
}

impl Default for VaeEncodeConfig {
    fn default() -> Self {
        VaeEncodeConfig {
            model: None,
            path: None,
            preset: None,
            mode: LatentMode::Sample,
            scaling_factor: None,
            batch_size: 8,
            precision: None,
        }
    }
}

impl OperatorConfig for VaeEncodeConfig {
    const TYPE: &'static str = "vae_encode";
    const KIND: OperatorKind = OperatorKind::Stage;
    const SUMMARY: &'static str = "images (`pixels`) -> VAE latents (`latents`, f32 [4, H/8, W/8]) on the device";
    const EXAMPLE: &'static str = "preset = \"tiny\"\nmode = \"mean\"";
    const KEYS: &'static [(&'static str, &'static str)] = &[
        ("model", "a diffusers pipeline folder; its vae/ is used"),
        ("path", "the VAE's own folder (config.json + diffusion_pytorch_model.safetensors)"),
        ("preset", "\"tiny\", \"sd2-base\" or \"sd1\" with random weights (benchmarks and tests only), or \"pixels\": the demo's fixed autoencoder (each 8x8 patch's mean colour and top-bottom luminance step)"),
        ("mode", "\"sample\" (default, as diffusers' trainers) or \"mean\" of the posterior"),
        ("scaling_factor", "multiplies the latents (default: the VAE config's, 0.18215 for SD)"),
        ("batch_size", "images per forward pass (default 8)"),
        model_keys::PRECISION_KEY,
    ];
}

impl NodeSpec for VaeEncodeConfig {
    fn validate(&self) -> Vec<KeyError> {
        let (model, path, preset) = (self.model.as_deref(), self.path.as_deref(), self.preset.as_deref());
        let mut errors = model_keys::check_source_among(model, path, preset, &VAE_PRESETS);
        errors.extend(model_keys::check_config(model, ("path", path), preset, "vae"));
        errors.extend(KeyError::check_range("batch_size", self.batch_size, 1, 65536));
        if let Some(s) = self.scaling_factor.filter(|s| !(s.is_finite() && *s > 0.0)) {
            errors.push(KeyError::new("scaling_factor", format!("must be > 0, got {s}")));
        }
        errors
    }

    fn ports(&self) -> Ports {
        Ports {
            requires: vec![Field::new("key", ColumnType::I64), Field::new("pixels", ColumnType::U8Tensor)],
            adds: vec![Field::new("latents", ColumnType::F32Tensor)],
            // The crops are 48x the latents' size: nothing downstream needs them.
            removes: vec!["pixels".into()],
        }
    }

    fn instantiate(&self, ctx: &InstanceContext<'_>) -> Result<OperatorImpl, OpError> {
        let source = model_keys::source(self.model.as_deref(), self.path.as_deref(), self.preset.as_deref(), "vae")?;
        Ok(OperatorImpl::Stage(Box::new(VaeEncode::new(self.clone(), source, ctx.job.seed))))
    }
}

/// The `vae_encode` stage.
pub struct VaeEncode {
    config: VaeEncodeConfig,
    source: ModelSource,
    seed: u64,
    model: Option<Loaded>,
}

/// The VAE on its device and the dtype it computes in, the latents' scale, and the 256
/// normalised pixel values there.
struct Loaded {
    vae: Autoencoder,
    device: Device,
    dtype: DType,
    scale: f64,
    pixel_values: Tensor,
}

/// The key of the posterior-sampling random stream ("vae"), mixed with each row's key so a
/// row's latents do not depend on its batch or worker.
const VAE_STREAM: u64 = 0x0076_6165;

impl VaeEncode {
    /// A stage that loads `source` on the CPU when started (for plain loops and tests).
    pub fn new(config: VaeEncodeConfig, source: ModelSource, seed: u64) -> Self {
        VaeEncode { config, source, seed, model: None }
    }

    /// Latents `[B, 4, H/8, W/8]` (scaled) for images `[B, 3, H, W]` u8 with row `keys`.
    pub fn encode(&self, pixels: &Tensor, keys: &[i64]) -> Result<Tensor, OpError> {
        let Loaded { vae, device, dtype, scale, pixel_values } =
            self.model.as_ref().ok_or_else(|| OpError::msg("vae_encode used before start"))?;
        let run = || -> candle_core::Result<Tensor> {
            // [0, 255] -> [-1, 1] on the device: a lookup in the 256 values torchvision's
            // `(x / 255 - 0.5) / 0.5` gives, so the result is bit-identical to the reference.
            let images = normalize_on_device(pixels, device, pixel_values)?.to_dtype(*dtype)?;
            let posterior = vae.encode(&images).map_err(|e| candle_core::Error::Msg(e.to_string()))?;
            let latents = match self.config.mode {
                LatentMode::Mean => posterior.mean,
                LatentMode::Sample => {
                    let per_row = posterior.mean.elem_count() / keys.len().max(1);
                    let eps: Vec<f32> = keys
                        .iter()
                        .flat_map(|&k| Rng::new(self.seed ^ VAE_STREAM, k as u64).normals(per_row))
                        .collect();
                    let eps = Tensor::from_vec(eps, posterior.mean.dims(), device)?;
                    (&posterior.mean + (&posterior.std * eps)?)?
                }
            };
            latents.affine(*scale, 0.0)
        };
        run().map_err(op_error)
    }
}

/// The 256 normalised values of a u8 pixel, from the CPU reference in `latentflow-gpu-kernels`.
/// u8 pixels → f32 [-1, 1] on `device`: one NVRTC kernel on GPUs, a lookup in `table` (the 256
/// values) elsewhere; both give torchvision's values bit for bit.
fn normalize_on_device(pixels: &Tensor, device: &Device, table: &Tensor) -> candle_core::Result<Tensor> {
    let on_device = pixels.to_device(device)?;
    #[cfg(feature = "cuda")]
    if device.is_cuda() {
        return crate::cuda::elementwise::normalize_pixels(&on_device);
    }
    let ids = on_device.to_dtype(DType::U32)?.flatten_all()?;
    table.index_select(&ids, 0)?.reshape(pixels.dims())
}

fn normalized_values(device: &Device) -> candle_core::Result<Tensor> {
    let all: Vec<u8> = (0..=255).collect();
    let table = normalize_u8_chw(&all, [1, 1, 1, 256], &[]).map_err(|e| candle_core::Error::Msg(e.to_string()))?;
    Tensor::from_vec(table, 256, device)
}

impl Stage for VaeEncode {
    fn start(&mut self, ctx: &mut OpContext) -> Result<(), OpError> {
        let device = model_keys::device(ctx)?;
        let dtype = model_keys::encoder_dtype(self.config.precision, &device);
        let vae = load_vae_in(&self.source, &device, dtype, self.seed).map_err(op_error)?;
        let scale = self.config.scaling_factor.unwrap_or(vae.scaling_factor());
        let pixel_values = normalized_values(&device).map_err(op_error)?;
        self.model = Some(Loaded { vae, device, dtype, scale, pixel_values });
        Ok(())
    }

    fn process(&mut self, mut batch: Batch, _ctx: &mut OpContext) -> Result<Option<Batch>, OpError> {
        let pixels = batch.remove("pixels").ok_or_else(|| OpError::msg("missing column `pixels`"))?;
        let shape = match &pixels {
            Column::U8Tensor { shape, .. } => shape.clone(),
            other => return Err(OpError::msg(format!("`pixels` is a {} column, not u8", other.column_type()))),
        };
        if shape.len() != 3 || shape[0] != 3 || shape[1] % 8 != 0 || shape[2] % 8 != 0 {
            return Err(OpError::msg(format!(
                "`pixels` rows have shape {shape:?}; the VAE needs [3, H, W] with H and W multiples of 8"
            )));
        }
        let all = column_tensor(pixels, "pixels", &Device::Cpu)?;
        let keys = batch.i64s("key")?.to_vec();
        let empty_shape = vec![4, shape[1] / 8, shape[2] / 8];
        let latents = in_chunks(keys.len(), self.config.batch_size, empty_shape, |start, n| {
            self.encode(&all.narrow(0, start, n).map_err(op_error)?, &keys[start..start + n])
        })?;
        batch.insert("latents", latents)?;
        Ok(Some(batch))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stage(mode: LatentMode, batch_size: usize) -> VaeEncode {
        let config = VaeEncodeConfig { mode, batch_size, ..VaeEncodeConfig::default() };
        let mut stage = VaeEncode::new(config, ModelSource::Preset("tiny".into()), 3);
        stage.start(&mut OpContext::detached("vae")).unwrap();
        stage
    }

    fn images(rows: usize) -> Batch {
        let data: Vec<u8> = (0..rows * 3 * 16 * 16).map(|i| (i * 7 % 256) as u8).collect();
        Batch::new()
            .with("key", Column::I64((0..rows as i64).collect()))
            .unwrap()
            .with("pixels", Column::U8Tensor { shape: vec![3, 16, 16], data })
            .unwrap()
    }

    fn latents(batch: &Batch) -> (Vec<usize>, Vec<f32>) {
        let (shape, data) = batch.f32_tensor("latents").unwrap();
        (shape.to_vec(), data.into_owned())
    }

    #[test]
    fn latents_replace_pixels_and_do_not_depend_on_the_batch_split() {
        let mut whole = stage(LatentMode::Sample, 8);
        let out = whole.process(images(3), &mut OpContext::detached("vae")).unwrap().unwrap();
        assert!(out.column("pixels").is_err(), "pixels are dropped");
        let (shape, a) = latents(&out);
        assert_eq!(shape, [4, 2, 2]);
        let mut split = stage(LatentMode::Sample, 1);
        let (_, b) = latents(&split.process(images(3), &mut OpContext::detached("vae")).unwrap().unwrap());
        let diff = a.iter().zip(&b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max);
        assert!(diff < 1e-5, "per-row sampling noise: {diff}");
        let mut mean = stage(LatentMode::Mean, 8);
        let (_, m) = latents(&mean.process(images(3), &mut OpContext::detached("vae")).unwrap().unwrap());
        assert!(a.iter().zip(&m).any(|(x, y)| (x - y).abs() > 1e-4), "sampling adds noise to the mean");
    }

    #[test]
    fn pixels_are_normalised_as_torchvision_does() {
        let ids = Tensor::new(&[0u32, 1, 128, 255], &Device::Cpu).unwrap();
        let values = normalized_values(&Device::Cpu).unwrap().index_select(&ids, 0).unwrap().to_vec1::<f32>().unwrap();
        let torchvision = |x: f32| (x / 255.0 - 0.5) / 0.5;
        assert_eq!(values, [torchvision(0.0), torchvision(1.0), torchvision(128.0), torchvision(255.0)]);
        assert_eq!((values[0], values[3]), (-1.0, 1.0));
    }

    #[test]
    fn scaling_factor_multiplies_the_mean() {
        let mut one = stage(LatentMode::Mean, 8);
        let (_, base) = latents(&one.process(images(1), &mut OpContext::detached("vae")).unwrap().unwrap());
        let config = VaeEncodeConfig { mode: LatentMode::Mean, scaling_factor: Some(1.0), ..Default::default() };
        let mut unscaled = VaeEncode::new(config, ModelSource::Preset("tiny".into()), 3);
        unscaled.start(&mut OpContext::detached("vae")).unwrap();
        let (_, raw) = latents(&unscaled.process(images(1), &mut OpContext::detached("vae")).unwrap().unwrap());
        for (b, r) in base.iter().zip(&raw) {
            assert!((b - r * 0.18215).abs() < 1e-6);
        }
    }

    #[test]
    fn the_pixels_preset_gives_each_patchs_mean_colour_without_noise() {
        let config = VaeEncodeConfig { preset: Some("pixels".into()), ..Default::default() };
        assert!(config.validate().is_empty(), "{:?}", config.validate());
        let mut pixels = VaeEncode::new(config, ModelSource::Preset("pixels".into()), 3);
        pixels.start(&mut OpContext::detached("vae")).unwrap();
        // One 16x16 image: every pixel of channel c is 64 * c + 10.
        let data: Vec<u8> = (0..3 * 256).map(|i| (i / 256 * 64 + 10) as u8).collect();
        let batch = Batch::new()
            .with("key", Column::I64(vec![5]))
            .unwrap()
            .with("pixels", Column::U8Tensor { shape: vec![3, 16, 16], data })
            .unwrap();
        let (shape, latents) = latents(&pixels.process(batch, &mut OpContext::detached("vae")).unwrap().unwrap());
        assert_eq!(shape, [4, 2, 2]);
        let torchvision = |x: f32| (x / 255.0 - 0.5) / 0.5;
        for (c, plane) in latents.chunks(4).enumerate() {
            // Sample mode adds no noise: the autoencoder is deterministic.
            let want = if c < 3 { torchvision((64 * c + 10) as f32) } else { 0.0 };
            assert!(plane.iter().all(|v| (v - want).abs() < 1e-6), "channel {c}: {plane:?}");
        }
    }

    #[test]
    fn rejects_sizes_the_vae_cannot_take_and_bad_keys() {
        let mut s = stage(LatentMode::Mean, 8);
        let batch = Batch::new()
            .with("key", Column::I64(vec![1]))
            .unwrap()
            .with("pixels", Column::U8Tensor { shape: vec![3, 12, 12], data: vec![0; 432] })
            .unwrap();
        let err = s.process(batch, &mut OpContext::detached("vae")).unwrap_err().to_string();
        assert!(err.contains("multiples of 8"), "{err}");
        let bad = VaeEncodeConfig { batch_size: 0, preset: Some("huge".into()), ..Default::default() };
        let keys: Vec<_> = bad.validate().into_iter().map(|e| e.key).collect();
        assert_eq!(keys, ["preset", "batch_size"]);
    }
}
