//! `pixels`: a fixed, weightless autoencoder for the demo. Its latents are linear statistics of
//! each 8x8 patch (the mean red, green and blue, and the top half's luminance minus the bottom
//! half's), and it decodes by painting each patch back from them. A random `tiny` VAE turns
//! images into noise a newcomer cannot read; with this one the previews show, in colour, what
//! the UNet learned, and encoding costs next to nothing.

use std::path::Path;

use candle_core::{DType, Tensor, D};

use super::error::Result;

/// The preset name (`vae_encode` `preset`, `train` `vae_preset`).
pub const PIXELS_PRESET: &str = "pixels";

/// The `_class_name` of its `config.json` in a pipeline folder.
pub const PIXELS_CLASS: &str = "PixelPatches";

/// Side of a patch: one latent per 8x8 pixels, as SD's VAE.
const PATCH: usize = 8;

/// Luminance weights (ITU-R BT.601) of the fourth channel.
const LUMA: [f32; 3] = [0.299, 0.587, 0.114];

/// Multiplies the latents so the demo's have a spread near 1, as SD's 0.18215 does for its VAE.
pub const PIXELS_SCALING_FACTOR: f64 = 1.0;

/// The `pixels` autoencoder: no weights, the same on every device.
///
/// ```
/// use candle_core::{Device, Tensor};
/// use latentflow_models::PixelPatches;
/// let images = Tensor::rand(-1f32, 1f32, (2, 3, 16, 24), &Device::Cpu).unwrap();
/// let latents = PixelPatches.encode(&images).unwrap();
/// assert_eq!(latents.dims(), [2, 4, 2, 3]);
/// // Decoding paints each patch; encoding that gives the same latents back.
/// let again = PixelPatches.encode(&PixelPatches.decode(&latents).unwrap()).unwrap();
/// let diff = (latents - again).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
/// assert!(diff < 1e-5);
/// ```
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PixelPatches;

impl PixelPatches {
    /// Latents `[B, 4, H/8, W/8]` of images `[B, 3, H, W]` in [-1, 1] (H, W multiples of 8).
    pub fn encode(&self, images: &Tensor) -> Result<Tensor> {
        let (b, c, h, w) = images.dims4()?;
        let (rows, cols) = (h / PATCH, w / PATCH);
        // [B, 3, rows, 2 halves, 4, cols, 8]: each patch's top and bottom halves.
        let halves = images.to_dtype(DType::F32)?.reshape(vec![b, c, rows, 2, PATCH / 2, cols, PATCH])?;
        let half_means = halves.mean(D::Minus1)?.mean(4)?; // [B, 3, rows, 2, cols]
        let colour = half_means.mean(3)?; // [B, 3, rows, cols]
        let top_minus_bottom = (half_means.narrow(3, 0, 1)? - half_means.narrow(3, 1, 1)?)?.squeeze(3)?;
        let luma = Tensor::new(&LUMA, images.device())?.reshape((1, 3, 1, 1))?;
        let step = top_minus_bottom.broadcast_mul(&luma)?.sum_keepdim(1)?; // [B, 1, rows, cols]
        Ok(Tensor::cat(&[colour, step], 1)?.to_dtype(images.dtype())?)
    }

    /// Images `[B, 3, 8h, 8w]` painted from latents `[B, 4, h, w]`: each patch its mean colour,
    /// its top half lighter (and bottom half darker) by half the fourth channel.
    pub fn decode(&self, latents: &Tensor) -> Result<Tensor> {
        let (b, _, rows, cols) = latents.dims4()?;
        let latents = latents.to_dtype(DType::F32)?;
        let colour = latents.narrow(1, 0, 3)?.reshape(vec![b, 3, rows, 1, 1, cols, 1])?;
        let step = latents.narrow(1, 3, 1)?.reshape(vec![b, 1, rows, 1, 1, cols, 1])?;
        // +1/2 on the top half, -1/2 on the bottom: equal on the three channels, so the step in
        // luminance (weights summing to 1) is the fourth channel.
        let sign = Tensor::new(&[0.5f32, -0.5], latents.device())?.reshape(vec![1, 1, 1, 2, 1, 1, 1])?;
        let shape = vec![b, 3, rows, 2, PATCH / 2, cols, PATCH];
        let painted = colour.broadcast_add(&step.broadcast_mul(&sign)?)?.broadcast_as(shape)?;
        Ok(painted.contiguous()?.reshape((b, 3, rows * PATCH, cols * PATCH))?)
    }

    /// Whether the part folder `dir` holds this autoencoder (its `config.json` names
    /// [`PIXELS_CLASS`]).
    pub fn is_in(dir: &Path) -> bool {
        super::config::names_class(dir, PIXELS_CLASS)
    }

    /// The `config.json` it leaves in a pipeline folder.
    pub fn config_json() -> serde_json::Value {
        serde_json::json!({
            "_class_name": PIXELS_CLASS,
            "_latentflow_note": "latentflow's fixed demo autoencoder: latents are the mean R, G, B of each 8x8 \
                                  patch and its top-minus-bottom luminance; no weights, not a diffusers class",
            "in_channels": 3,
            "out_channels": 3,
            "latent_channels": 4,
            "patch_size": PATCH,
            "scaling_factor": PIXELS_SCALING_FACTOR,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn a_solid_patch_gives_its_colour_and_no_step() {
        let colour = [0.5f32, -0.25, 1.0];
        let data: Vec<f32> = colour.iter().flat_map(|&c| std::iter::repeat_n(c, 64)).collect();
        let image = Tensor::from_vec(data, (1, 3, 8, 8), &Device::Cpu).unwrap();
        let latents = PixelPatches.encode(&image).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
        for (got, want) in latents.iter().zip(colour.iter().chain(&[0.0])) {
            assert!((got - want).abs() < 1e-6, "{latents:?}");
        }
    }

    #[test]
    fn the_fourth_channel_is_the_top_halfs_luminance_minus_the_bottom_halfs() {
        // White on top, black below: luminance 1 - (-1) = 2.
        let plane: Vec<f32> = (0..64).map(|i| if i < 32 { 1.0 } else { -1.0 }).collect();
        let data: Vec<f32> = plane.iter().cycle().take(3 * 64).copied().collect();
        let image = Tensor::from_vec(data, (1, 3, 8, 8), &Device::Cpu).unwrap();
        let latents = PixelPatches.encode(&image).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert!(latents[..3].iter().all(|m| m.abs() < 1e-6), "{latents:?}");
        assert!((latents[3] - 2.0).abs() < 1e-5, "{latents:?}");
        let back = PixelPatches.decode(&Tensor::new(&[[[[0f32]], [[0.]], [[0.]], [[2.]]]], &Device::Cpu).unwrap());
        let back = back.unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert_eq!(back, data_of(&plane));
    }

    fn data_of(plane: &[f32]) -> Vec<f32> {
        plane.iter().cycle().take(3 * 64).copied().collect()
    }

    #[test]
    fn patches_do_not_mix() {
        // Two patches side by side, different colours: each latent sees only its own.
        let data: Vec<f32> = (0..3 * 8 * 16).map(|i| if i % 16 < 8 { -1.0 } else { 1.0 }).collect();
        let image = Tensor::from_vec(data, (1, 3, 8, 16), &Device::Cpu).unwrap();
        let latents = PixelPatches.encode(&image).unwrap();
        assert_eq!(latents.dims(), [1, 4, 1, 2]);
        let red = latents.narrow(1, 0, 1).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert_eq!(red, [-1.0, 1.0]);
    }

    #[test]
    fn config_folders_are_recognised() {
        let dir = tempfile::tempdir().unwrap();
        assert!(!PixelPatches::is_in(dir.path()));
        std::fs::write(dir.path().join("config.json"), PixelPatches::config_json().to_string()).unwrap();
        assert!(PixelPatches::is_in(dir.path()));
    }
}
