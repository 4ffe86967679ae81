//! `UNet2DConditionModel` (the SD1 and SD2 families) with one timestep per sample.

mod checkpointed;
mod transformer;

use candle_core::Tensor;

pub use transformer::Transformer2D;

use super::blocks::{Downsample, ResnetBlock, Upsample};
use super::config::UNetConfig;
use super::error::Result;
use super::nn::{silu, timestep_embedding, Conv2d, GroupNorm, Linear};
use super::weights::Weights;

struct DownBlock {
    resnets: Vec<ResnetBlock>,
    attentions: Vec<Transformer2D>,
    down: Option<Downsample>,
}

struct UpBlock {
    resnets: Vec<ResnetBlock>,
    attentions: Vec<Transformer2D>,
    up: Option<Upsample>,
}

/// The denoising UNet.
pub struct UNet {
    config: UNetConfig,
    conv_in: Conv2d,
    time_linear1: Linear,
    time_linear2: Linear,
    down: Vec<DownBlock>,
    mid_resnet0: ResnetBlock,
    mid_attention: Transformer2D,
    mid_resnet1: ResnetBlock,
    up: Vec<UpBlock>,
    norm_out: GroupNorm,
    conv_out: Conv2d,
}

impl UNet {
    /// Builds the model from `weights`.
    pub fn new(config: &UNetConfig, weights: &Weights) -> Result<UNet> {
        let c = config;
        let ch = &c.block_out_channels;
        let (groups, eps) = (c.norm_num_groups, c.norm_eps);
        let temb = ch[0] * 4;
        let root = weights.at("");
        let transformer = |s: &super::weights::Scope, channels: usize, level: usize| {
            Transformer2D::new(
                s,
                channels,
                c.heads(level),
                c.transformer_layers_per_block.get(level),
                c.cross_attention_dim,
                groups,
                c.use_linear_projection,
            )
        };
        let mut down = Vec::new();
        let mut out_ch = ch[0];
        for (i, kind) in c.down_block_types.iter().enumerate() {
            let in_ch = out_ch;
            out_ch = ch[i];
            let s = root.at("down_blocks").at(i);
            let resnets = ResnetBlock::stack(&s, c.layers_per_block, in_ch, out_ch, Some(temb), groups, eps)?;
            let attentions = if kind == "CrossAttnDownBlock2D" {
                (0..c.layers_per_block)
                    .map(|j| transformer(&s.at("attentions").at(j), out_ch, i))
                    .collect::<Result<_>>()?
            } else {
                Vec::new()
            };
            let is_final = i + 1 == ch.len();
            let down_sampler = (!is_final)
                .then(|| Downsample::new(&s.at("downsamplers.0"), out_ch, c.downsample_padding, false))
                .transpose()?;
            down.push(DownBlock { resnets, attentions, down: down_sampler });
        }
        let last = *ch.last().expect("checked non-empty");
        let mid = root.at("mid_block");
        let mid_resnet = |j: usize| {
            ResnetBlock::new(&mid.at("resnets").at(j), last, last, Some(temb), groups, eps, c.mid_block_scale_factor)
        };
        let levels = ch.len();
        let reversed: Vec<usize> = ch.iter().rev().copied().collect();
        let mut up = Vec::new();
        let mut prev_out = reversed[0];
        for (i, kind) in c.up_block_types.iter().enumerate() {
            let out_ch = reversed[i];
            let in_ch = reversed[(i + 1).min(levels - 1)];
            let level = levels - 1 - i;
            let s = root.at("up_blocks").at(i);
            let n = c.layers_per_block + 1;
            let resnets = (0..n)
                .map(|j| {
                    let skip = if j + 1 == n { in_ch } else { out_ch };
                    let res_in = if j == 0 { prev_out } else { out_ch };
                    ResnetBlock::new(&s.at("resnets").at(j), res_in + skip, out_ch, Some(temb), groups, eps, 1.0)
                })
                .collect::<Result<_>>()?;
            let attentions = if kind == "CrossAttnUpBlock2D" {
                (0..n).map(|j| transformer(&s.at("attentions").at(j), out_ch, level)).collect::<Result<_>>()?
            } else {
                Vec::new()
            };
            let is_final = i + 1 == levels;
            let up_sampler = (!is_final).then(|| Upsample::new(&s.at("upsamplers.0"), out_ch)).transpose()?;
            up.push(UpBlock { resnets, attentions, up: up_sampler });
            prev_out = out_ch;
        }
        Ok(UNet {
            config: c.clone(),
            conv_in: Conv2d::new(&root.at("conv_in"), c.in_channels, ch[0], 3, 1, 1)?,
            time_linear1: Linear::new(&root.at("time_embedding.linear_1"), ch[0], temb, true)?,
            time_linear2: Linear::new(&root.at("time_embedding.linear_2"), temb, temb, true)?,
            down,
            mid_resnet0: mid_resnet(0)?,
            mid_attention: transformer(&mid.at("attentions.0"), last, levels - 1)?,
            mid_resnet1: mid_resnet(1)?,
            up,
            norm_out: GroupNorm::new(&root.at("conv_norm_out"), groups, ch[0], eps)?,
            conv_out: Conv2d::new(&root.at("conv_out"), ch[0], c.out_channels, 3, 1, 1)?,
        })
    }

    /// The config.
    pub fn config(&self) -> &UNetConfig {
        &self.config
    }

    /// The model output for noisy latents `sample` [B, 4, h, w], one timestep per sample, and
    /// text embeddings `context` [B, N, D].
    pub fn forward(&self, sample: &Tensor, timesteps: &[f32], context: &Tensor) -> Result<Tensor> {
        let c = &self.config;
        let t =
            timestep_embedding(timesteps, c.block_out_channels[0], c.flip_sin_to_cos, c.freq_shift, sample.device())?
                .to_dtype(sample.dtype())?;
        let temb = self.time_linear2.forward(&silu(&self.time_linear1.forward(&t)?)?)?;
        let context = context.to_dtype(sample.dtype())?;
        let mut x = self.conv_in.forward(sample)?;
        let mut skips = vec![x.clone()];
        for block in &self.down {
            for (j, resnet) in block.resnets.iter().enumerate() {
                x = resnet.forward(&x, Some(&temb))?;
                if let Some(a) = block.attentions.get(j) {
                    x = a.forward(&x, &context)?;
                }
                skips.push(x.clone());
            }
            if let Some(d) = &block.down {
                x = d.forward(&x)?;
                skips.push(x.clone());
            }
        }
        x = self.mid_resnet0.forward(&x, Some(&temb))?;
        x = self.mid_attention.forward(&x, &context)?;
        x = self.mid_resnet1.forward(&x, Some(&temb))?;
        for block in &self.up {
            for (j, resnet) in block.resnets.iter().enumerate() {
                let skip = skips.pop().expect("one skip per up resnet");
                x = resnet.forward(&Tensor::cat(&[&x, &skip], 1)?, Some(&temb))?;
                if let Some(a) = block.attentions.get(j) {
                    x = a.forward(&x, &context)?;
                }
            }
            if let Some(u) = &block.up {
                x = u.forward(&x)?;
            }
        }
        self.conv_out.forward(&self.norm_out.forward_silu(&x)?)
    }
}
