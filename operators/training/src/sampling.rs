//! Preview sampling during training: DDIM (eta 0, diffusers' "leading" timestep spacing with
//! `steps_offset = 1`, as SD2's scheduler config has it) with classifier-free guidance, and the
//! decoded images laid out as one PNG grid.

use std::path::Path;

use std::collections::{BTreeMap, HashMap};

use candle_core::{DType, Device, Tensor, Var};

use super::schedule::{NoiseSchedule, Prediction};
use latentflow_models::config::UNetConfig;
use latentflow_models::error::{ModelError, Result};
use latentflow_models::rng::Rng;
use latentflow_models::weights::Weights;
use latentflow_models::{Autoencoder, UNet};

/// A UNet over the trainer's current weights, detached: sampling with it builds no autograd
/// graph (a UNet over the trainable variables would keep every step's activations alive).
/// The tensors are shared, not copied.
pub fn frozen_unet(config: &UNetConfig, params: &BTreeMap<String, Var>, device: &Device) -> Result<UNet> {
    let tensors = params.iter().map(|(n, v)| (n.clone(), v.as_tensor().detach())).collect();
    UNet::new(config, &Weights::frozen(tensors, device))
}

/// A UNet for sampling from plain `tensors` (the EMA's, say), sharing their storage.
pub fn frozen_unet_of(config: &UNetConfig, tensors: HashMap<String, Tensor>, device: &Device) -> Result<UNet> {
    UNet::new(config, &Weights::frozen(tensors, device))
}

/// A DDIM sampler over a training noise schedule.
///
/// ```
/// use latentflow_training::{sampling::Ddim, NoiseSchedule, SchedulerConfig};
/// let schedule = NoiseSchedule::new(&SchedulerConfig::default(), "default".as_ref()).unwrap();
/// let ddim = Ddim::new(&schedule, 20);
/// assert_eq!(ddim.timesteps()[..3], [951, 901, 851]);
/// ```
#[derive(Clone, Debug)]
pub struct Ddim {
    timesteps: Vec<usize>,
    ratio: usize,
    alphas_cumprod: Vec<f32>,
    prediction: Prediction,
}

impl Ddim {
    /// `steps` denoising steps over `schedule` (at least 1, at most its length).
    pub fn new(schedule: &NoiseSchedule, steps: usize) -> Ddim {
        let total = schedule.len();
        let steps = steps.clamp(1, total);
        let ratio = total / steps;
        let timesteps = (0..steps).rev().map(|i| (i * ratio + 1).min(total - 1)).collect();
        Ddim { timesteps, ratio, alphas_cumprod: schedule.alphas_cumprod.clone(), prediction: schedule.prediction }
    }

    /// The timesteps visited, from the noisiest.
    pub fn timesteps(&self) -> &[usize] {
        &self.timesteps
    }

    /// Latents [B, C, H, W] for text embeddings `context` [B, N, D], guided away from `uncond`
    /// [1, N, D] by `guidance` (1: no guidance), starting from noise drawn from `rng`.
    pub fn sample(
        &self,
        unet: &UNet,
        context: &Tensor,
        uncond: &Tensor,
        guidance: f64,
        latent_shape: (usize, usize, usize),
        rng: &mut Rng,
    ) -> Result<Tensor> {
        let device = context.device();
        let b = context.dims()[0];
        let (c, h, w) = latent_shape;
        let mut x = Tensor::from_vec(rng.normals(b * c * h * w), (b, c, h, w), device)?;
        let uncond = uncond.to_dtype(context.dtype())?.broadcast_as(context.shape())?.contiguous()?;
        let both = Tensor::cat(&[&uncond, context], 0)?;
        for &t in &self.timesteps {
            let input = Tensor::cat(&[&x, &x], 0)?;
            let out = unet.forward(&input, &vec![t as f32; 2 * b], &both)?.to_dtype(DType::F32)?;
            let (u, cond) = (out.narrow(0, 0, b)?, out.narrow(0, b, b)?);
            let guided = (&u + ((cond - &u)? * guidance)?)?;
            let a = f64::from(self.alphas_cumprod[t]);
            let prev = t.checked_sub(self.ratio).map_or(self.alphas_cumprod[0], |p| self.alphas_cumprod[p]);
            let a_prev = f64::from(prev);
            let (x0, eps) = match self.prediction {
                Prediction::Epsilon => {
                    let x0 = ((&x - (&guided * (1.0 - a).sqrt())?)? / a.sqrt())?;
                    (x0, guided)
                }
                Prediction::VPrediction => {
                    let x0 = ((&x * a.sqrt())? - (&guided * (1.0 - a).sqrt())?)?;
                    let eps = ((&guided * a.sqrt())? + (&x * (1.0 - a).sqrt())?)?;
                    (x0, eps)
                }
            };
            // Inference only: whatever `unet` is, no step's graph outlives the step.
            x = ((x0 * a_prev.sqrt())? + (eps * (1.0 - a_prev).sqrt())?)?.detach();
        }
        Ok(x)
    }
}

/// Decodes `latents` (scaled by `scaling_factor`) with `vae` and writes them side by side as a
/// PNG at `path`.
pub fn write_grid(path: &Path, vae: &Autoencoder, latents: &Tensor, scaling_factor: f64) -> Result<()> {
    let images = vae.decode(&(latents / scaling_factor)?)?;
    // [-1, 1] -> [0, 255], as diffusers' image processor does.
    let images = ((images.to_dtype(DType::F32)? + 1.0)? * 127.5)?.clamp(0f32, 255f32)?.to_device(&Device::Cpu)?;
    let (b, _, h, w) = images.dims4()?;
    let data = images.flatten_all()?.to_vec1::<f32>()?;
    let (width, plane) = (b * w, h * w);
    let mut rgb = vec![0u8; width * h * 3];
    for i in 0..b {
        for y in 0..h {
            for x in 0..w {
                for ch in 0..3 {
                    let v = data[i * 3 * plane + ch * plane + y * w + x];
                    rgb[(y * width + i * w + x) * 3 + ch] = v.round() as u8;
                }
            }
        }
    }
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)
            .map_err(|e| ModelError::File { path: dir.to_path_buf(), message: e.to_string() })?;
    }
    image::save_buffer(path, &rgb, width as u32, h as u32, image::ExtendedColorType::Rgb8)
        .map_err(|e| ModelError::File { path: path.to_path_buf(), message: e.to_string() })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::SchedulerConfig;
    use latentflow_models::load::{load_unet, load_vae, ModelSource};

    #[test]
    fn leading_spacing_with_offset_matches_diffusers() {
        let schedule = NoiseSchedule::new(&SchedulerConfig::default(), "default".as_ref()).unwrap();
        // DDIMScheduler(steps_offset=1).set_timesteps(50): 981, 961, ..., 1.
        let ddim = Ddim::new(&schedule, 50);
        assert_eq!(ddim.timesteps().len(), 50);
        assert_eq!((ddim.timesteps()[0], ddim.timesteps()[1], ddim.timesteps()[49]), (981, 961, 1));
    }

    #[test]
    fn samples_and_writes_a_grid_of_the_right_size() {
        let tiny = ModelSource::Preset("tiny".into());
        let (unet, _) = load_unet(&tiny, &Device::Cpu, false, 0).unwrap();
        let vae = load_vae(&tiny, &Device::Cpu, 0).unwrap();
        let schedule = NoiseSchedule::new(&SchedulerConfig::default(), "default".as_ref()).unwrap();
        let context = Tensor::ones((2, 77, 32), DType::F32, &Device::Cpu).unwrap();
        let uncond = Tensor::zeros((1, 77, 32), DType::F32, &Device::Cpu).unwrap();
        let ddim = Ddim::new(&schedule, 3);
        let a = ddim.sample(&unet, &context, &uncond, 7.5, (4, 8, 8), &mut Rng::new(1, 2)).unwrap();
        let b = ddim.sample(&unet, &context, &uncond, 7.5, (4, 8, 8), &mut Rng::new(1, 2)).unwrap();
        assert_eq!(a.dims(), [2, 4, 8, 8]);
        assert_eq!(
            a.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            b.flatten_all().unwrap().to_vec1::<f32>().unwrap()
        );
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("samples/step-1.png");
        write_grid(&path, &vae, &a, 0.18215).unwrap();
        let png = image::open(&path).unwrap();
        assert_eq!((png.width(), png.height()), (128, 64));
    }
}
