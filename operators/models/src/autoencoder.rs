//! The image autoencoder a job encodes and previews with: SD's [`AutoencoderKl`] (from a folder
//! or a random preset) or the fixed demo [`PixelPatches`].

use candle_core::Tensor;

use super::error::Result;
use super::pixel_patches::{PixelPatches, PIXELS_SCALING_FACTOR};
use super::vae::{AutoencoderKl, Posterior};

/// An image autoencoder: images `[B, 3, H, W]` in [-1, 1] <-> latents `[B, 4, H/8, W/8]`.
pub enum Autoencoder {
    /// SD's VAE (boxed: it is large, the other is nothing).
    Kl(Box<AutoencoderKl>),
    /// The demo's fixed patch statistics (preset `pixels`).
    Pixels(PixelPatches),
}

impl Autoencoder {
    /// The posterior over latents (not yet scaled); `pixels` is deterministic: its `std` is 0.
    ///
    /// ```
    /// use candle_core::{Device, Tensor};
    /// use latentflow_models::{Autoencoder, PixelPatches};
    /// let images = Tensor::zeros((1, 3, 8, 8), candle_core::DType::F32, &Device::Cpu).unwrap();
    /// let posterior = Autoencoder::Pixels(PixelPatches).encode(&images).unwrap();
    /// assert_eq!(posterior.std.sum_all().unwrap().to_scalar::<f32>().unwrap(), 0.0);
    /// ```
    pub fn encode(&self, images: &Tensor) -> Result<Posterior> {
        match self {
            Autoencoder::Kl(vae) => vae.encode(images),
            Autoencoder::Pixels(pixels) => {
                let mean = pixels.encode(images)?;
                let std = mean.zeros_like()?;
                Ok(Posterior { mean, std })
            }
        }
    }

    /// Images in about [-1, 1] for `latents` (not divided by the scaling factor).
    pub fn decode(&self, latents: &Tensor) -> Result<Tensor> {
        match self {
            Autoencoder::Kl(vae) => vae.decode(latents),
            Autoencoder::Pixels(pixels) => pixels.decode(latents),
        }
    }

    /// What latents are multiplied by before training (0.18215 for SD's VAE).
    pub fn scaling_factor(&self) -> f64 {
        match self {
            Autoencoder::Kl(vae) => vae.config().scaling_factor,
            Autoencoder::Pixels(_) => PIXELS_SCALING_FACTOR,
        }
    }
}
