//! The models of the Stable Diffusion family, in candle, with every op differentiable:
//! [`ClipTextModel`], [`AutoencoderKl`] and [`UNet`] (per-sample timesteps). They load
//! diffusers / transformers folders (`config.json` + safetensors in f32, f16 or bf16) or start
//! from built-in presets with seeded random weights. The demo's [`PixelPatches`] stands in for
//! the VAE where a fixed, readable autoencoder is wanted ([`Autoencoder`] is either).
//!
//! Beside them: CLIP's tokenizer ([`clip`]), the seeded random streams everything draws from
//! ([`rng`]), and, behind the `cuda` feature, the bridge from candle's CUDA tensors to our NVRTC
//! and cuDNN kernels (`cuda`). This crate sees neither the engine nor any operator: the
//! `latentflow-training` crate and the operators build on it.

pub mod autoencoder;
pub mod bias_add;
pub mod blocks;
pub mod caption_words;
pub mod clip;
pub mod clip_text;
pub mod config;
pub mod conv_patches;
mod cpu_values;
#[cfg(feature = "cuda")]
pub mod cuda;
pub mod error;
pub mod fused_attention;
pub mod fused_norm;
pub mod load;
pub mod nn;
pub mod pixel_patches;
pub mod rng;
pub mod text_encoder;
pub mod unet;
pub mod vae;
pub mod weights;

pub use autoencoder::Autoencoder;
pub use caption_words::{CaptionWords, WORDS_PRESET};
pub use clip_text::ClipTextModel;
pub use config::{ClipTextConfig, UNetConfig, VaeConfig, PRESETS, TEXT_PRESETS, VAE_PRESETS};
pub use error::{ModelError, Result};
pub use pixel_patches::{PixelPatches, PIXELS_PRESET};
pub use text_encoder::TextEncoder;
pub use unet::UNet;
pub use vae::{AutoencoderKl, Posterior};
pub use weights::{Init, Weights};
