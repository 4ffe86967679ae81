//! `AutoencoderKL`: the encoder gives the latent posterior's mean and standard deviation; the
//! decoder turns latents back into images (for sample previews).

use candle_core::Tensor;

use super::blocks::{Downsample, ResnetBlock, SpatialAttention, Upsample};
use super::config::VaeConfig;
use super::error::Result;
use super::nn::{Conv2d, GroupNorm};
use super::weights::{Scope, Weights};
use crate::rng::Rng;

const EPS: f64 = 1e-6;

struct MidBlock {
    resnet0: ResnetBlock,
    attention: Option<SpatialAttention>,
    resnet1: ResnetBlock,
}

impl MidBlock {
    fn new(s: &Scope, ch: usize, groups: usize, with_attention: bool) -> Result<MidBlock> {
        Ok(MidBlock {
            resnet0: ResnetBlock::new(&s.at("resnets.0"), ch, ch, None, groups, EPS, 1.0)?,
            attention: with_attention.then(|| SpatialAttention::new(&s.at("attentions.0"), ch, groups)).transpose()?,
            resnet1: ResnetBlock::new(&s.at("resnets.1"), ch, ch, None, groups, EPS, 1.0)?,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let mut x = self.resnet0.forward(x, None)?;
        if let Some(a) = &self.attention {
            x = a.forward(&x)?;
        }
        self.resnet1.forward(&x, None)
    }
}

struct Level {
    resnets: Vec<ResnetBlock>,
    down: Option<Downsample>,
    up: Option<Upsample>,
}

/// The posterior over latents for a batch of images.
pub struct Posterior {
    /// Mean [B, 4, H/8, W/8].
    pub mean: Tensor,
    /// Standard deviation `exp(0.5 * clamp(logvar, -30, 20))`.
    pub std: Tensor,
}

impl Posterior {
    /// A sample `mean + std * N(0, 1)`, drawn from `rng` so a job's latents are reproducible.
    pub fn sample(&self, rng: &mut Rng) -> Result<Tensor> {
        let eps = Tensor::from_vec(rng.normals(self.mean.elem_count()), self.mean.dims(), self.mean.device())?;
        Ok((&self.mean + (&self.std * eps.to_dtype(self.std.dtype())?)?)?)
    }
}

/// The VAE.
pub struct AutoencoderKl {
    config: VaeConfig,
    conv_in: Conv2d,
    down: Vec<Level>,
    encoder_mid: MidBlock,
    encoder_norm: GroupNorm,
    encoder_out: Conv2d,
    quant_conv: Option<Conv2d>,
    post_quant_conv: Option<Conv2d>,
    decoder_in: Conv2d,
    decoder_mid: MidBlock,
    up: Vec<Level>,
    decoder_norm: GroupNorm,
    decoder_out: Conv2d,
}

impl AutoencoderKl {
    /// Builds the model from `weights`.
    pub fn new(config: &VaeConfig, weights: &Weights) -> Result<AutoencoderKl> {
        let c = config;
        let (groups, ch) = (c.norm_num_groups, &c.block_out_channels);
        let last = *ch.last().expect("checked non-empty");
        let enc = weights.at("encoder");
        let mut down = Vec::new();
        let mut in_ch = ch[0];
        for (i, &out_ch) in ch.iter().enumerate() {
            let s = enc.at("down_blocks").at(i);
            let resnets = ResnetBlock::stack(&s, c.layers_per_block, in_ch, out_ch, None, groups, EPS)?;
            let is_final = i + 1 == ch.len();
            let down_sampler =
                (!is_final).then(|| Downsample::new(&s.at("downsamplers.0"), out_ch, 0, true)).transpose()?;
            down.push(Level { resnets, down: down_sampler, up: None });
            in_ch = out_ch;
        }
        let dec = weights.at("decoder");
        let reversed: Vec<usize> = ch.iter().rev().copied().collect();
        let mut up = Vec::new();
        let mut prev = reversed[0];
        for (i, &out_ch) in reversed.iter().enumerate() {
            let s = dec.at("up_blocks").at(i);
            let resnets = ResnetBlock::stack(&s, c.layers_per_block + 1, prev, out_ch, None, groups, EPS)?;
            let is_final = i + 1 == reversed.len();
            let up_sampler = (!is_final).then(|| Upsample::new(&s.at("upsamplers.0"), out_ch)).transpose()?;
            up.push(Level { resnets, down: None, up: up_sampler });
            prev = out_ch;
        }
        let latent = c.latent_channels;
        Ok(AutoencoderKl {
            config: c.clone(),
            conv_in: Conv2d::new(&enc.at("conv_in"), c.in_channels, ch[0], 3, 1, 1)?,
            down,
            encoder_mid: MidBlock::new(&enc.at("mid_block"), last, groups, c.mid_block_add_attention)?,
            encoder_norm: GroupNorm::new(&enc.at("conv_norm_out"), groups, last, EPS)?,
            encoder_out: Conv2d::new(&enc.at("conv_out"), last, 2 * latent, 3, 1, 1)?,
            quant_conv: c
                .use_quant_conv
                .then(|| Conv2d::new(&weights.at("quant_conv"), 2 * latent, 2 * latent, 1, 1, 0))
                .transpose()?,
            post_quant_conv: c
                .use_post_quant_conv
                .then(|| Conv2d::new(&weights.at("post_quant_conv"), latent, latent, 1, 1, 0))
                .transpose()?,
            decoder_in: Conv2d::new(&dec.at("conv_in"), latent, last, 3, 1, 1)?,
            decoder_mid: MidBlock::new(&dec.at("mid_block"), last, groups, c.mid_block_add_attention)?,
            up,
            decoder_norm: GroupNorm::new(&dec.at("conv_norm_out"), groups, ch[0], EPS)?,
            decoder_out: Conv2d::new(&dec.at("conv_out"), ch[0], c.out_channels, 3, 1, 1)?,
        })
    }

    /// The config.
    pub fn config(&self) -> &VaeConfig {
        &self.config
    }

    /// The posterior for images in [-1, 1], [B, 3, H, W].
    pub fn encode(&self, images: &Tensor) -> Result<Posterior> {
        let mut x = self.conv_in.forward(images)?;
        for level in &self.down {
            for r in &level.resnets {
                x = r.forward(&x, None)?;
            }
            if let Some(d) = &level.down {
                x = d.forward(&x)?;
            }
        }
        x = self.encoder_mid.forward(&x)?;
        x = self.encoder_out.forward(&self.encoder_norm.forward_silu(&x)?)?;
        if let Some(q) = &self.quant_conv {
            x = q.forward(&x)?;
        }
        // The posterior in f32 whatever the compute dtype: its exp and the sampling need it.
        let x = x.to_dtype(candle_core::DType::F32)?;
        let latent = self.config.latent_channels;
        let mean = x.narrow(1, 0, latent)?;
        let logvar = x.narrow(1, latent, latent)?.clamp(-30f32, 20f32)?;
        let std = (logvar * 0.5)?.exp()?;
        Ok(Posterior { mean, std })
    }

    /// Images in about [-1, 1] for `latents` (not divided by the scaling factor).
    pub fn decode(&self, latents: &Tensor) -> Result<Tensor> {
        let mut x = match &self.post_quant_conv {
            Some(p) => p.forward(latents)?,
            None => latents.clone(),
        };
        x = self.decoder_in.forward(&x)?;
        x = self.decoder_mid.forward(&x)?;
        for level in &self.up {
            for r in &level.resnets {
                x = r.forward(&x, None)?;
            }
            if let Some(u) = &level.up {
                x = u.forward(&x)?;
            }
        }
        self.decoder_out.forward(&self.decoder_norm.forward_silu(&x)?)
    }
}
