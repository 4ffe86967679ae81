//! Blocks shared by the VAE and the UNet: ResNet blocks, down- and upsamplers, and the VAE's
//! single-head spatial self-attention.

use candle_core::Tensor;

use super::error::Result;
use super::nn::{attention, silu, upsample2x, Conv2d, GroupNorm, Linear};
use super::weights::Scope;

/// diffusers `ResnetBlock2D`: GroupNorm, SiLU, conv, (+ time embedding), GroupNorm, SiLU, conv,
/// plus a 1x1 shortcut when the channel count changes.
pub struct ResnetBlock {
    norm1: GroupNorm,
    conv1: Conv2d,
    time_emb_proj: Option<Linear>,
    norm2: GroupNorm,
    conv2: Conv2d,
    shortcut: Option<Conv2d>,
    output_scale: f64,
}

impl ResnetBlock {
    /// A block from `in_ch` to `out_ch` channels, with a time embedding of `temb` channels.
    pub fn new(
        s: &Scope,
        in_ch: usize,
        out_ch: usize,
        temb: Option<usize>,
        groups: usize,
        eps: f64,
        output_scale: f64,
    ) -> Result<ResnetBlock> {
        Ok(ResnetBlock {
            norm1: GroupNorm::new(&s.at("norm1"), groups, in_ch, eps)?,
            conv1: Conv2d::new(&s.at("conv1"), in_ch, out_ch, 3, 1, 1)?,
            time_emb_proj: temb.map(|t| Linear::new(&s.at("time_emb_proj"), t, out_ch, true)).transpose()?,
            norm2: GroupNorm::new(&s.at("norm2"), groups, out_ch, eps)?,
            conv2: Conv2d::new(&s.at("conv2"), out_ch, out_ch, 3, 1, 1)?,
            shortcut: (in_ch != out_ch)
                .then(|| Conv2d::new(&s.at("conv_shortcut"), in_ch, out_ch, 1, 1, 0))
                .transpose()?,
            output_scale,
        })
    }

    /// `count` blocks under `s.resnets.J`, the first from `in_ch` and the rest from `out_ch`
    /// channels, to `out_ch` (VAE encoder and decoder levels, UNet down blocks).
    pub fn stack(
        s: &Scope,
        count: usize,
        in_ch: usize,
        out_ch: usize,
        temb: Option<usize>,
        groups: usize,
        eps: f64,
    ) -> Result<Vec<ResnetBlock>> {
        (0..count)
            .map(|j| {
                ResnetBlock::new(
                    &s.at("resnets").at(j),
                    if j == 0 { in_ch } else { out_ch },
                    out_ch,
                    temb,
                    groups,
                    eps,
                    1.0,
                )
            })
            .collect()
    }

    /// Applies the block; `temb` is the time embedding [B, T] when the block takes one.
    pub fn forward(&self, x: &Tensor, temb: Option<&Tensor>) -> Result<Tensor> {
        let mut h = self.conv1.forward(&self.norm1.forward_silu(x)?)?;
        if let (Some(proj), Some(t)) = (&self.time_emb_proj, temb) {
            let t = proj.forward(&silu(t)?)?;
            h = h.broadcast_add(&t.unsqueeze(2)?.unsqueeze(3)?)?;
        }
        let h = self.conv2.forward(&self.norm2.forward_silu(&h)?)?;
        let skip = match &self.shortcut {
            Some(c) => c.forward(x)?,
            None => x.clone(),
        };
        let out = (skip + h)?;
        Ok(if self.output_scale == 1.0 { out } else { (out / self.output_scale)? })
    }
}

/// Stride-2 convolution. The VAE pads only right and bottom by one (`pad_asymmetric`).
pub struct Downsample {
    conv: Conv2d,
    pad_asymmetric: bool,
}

impl Downsample {
    /// `conv` under `s`; `padding` is the convolution's symmetric padding.
    pub fn new(s: &Scope, channels: usize, padding: usize, pad_asymmetric: bool) -> Result<Downsample> {
        Ok(Downsample { conv: Conv2d::new(&s.at("conv"), channels, channels, 3, 2, padding)?, pad_asymmetric })
    }

    /// Halves the resolution.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        if self.pad_asymmetric {
            self.conv.forward(&x.pad_with_zeros(3, 0, 1)?.pad_with_zeros(2, 0, 1)?)
        } else {
            self.conv.forward(x)
        }
    }
}

/// Nearest 2x upsampling followed by a 3x3 convolution.
pub struct Upsample {
    conv: Conv2d,
}

impl Upsample {
    /// `conv` under `s`.
    pub fn new(s: &Scope, channels: usize) -> Result<Upsample> {
        Ok(Upsample { conv: Conv2d::new(&s.at("conv"), channels, channels, 3, 1, 1)? })
    }

    /// Doubles the resolution.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.conv.forward(&upsample2x(x)?)
    }
}

/// The VAE mid block's self-attention over all positions: GroupNorm, one head, residual.
/// Accepts old checkpoints' `query/key/value/proj_attn` names through weight aliases.
pub struct SpatialAttention {
    norm: GroupNorm,
    q: Linear,
    k: Linear,
    v: Linear,
    out: Linear,
}

impl SpatialAttention {
    /// The block under `s`.
    pub fn new(s: &Scope, channels: usize, groups: usize) -> Result<SpatialAttention> {
        Ok(SpatialAttention {
            norm: GroupNorm::new(&s.at("group_norm"), groups, channels, 1e-6)?,
            q: Linear::new(&s.at("to_q"), channels, channels, true)?,
            k: Linear::new(&s.at("to_k"), channels, channels, true)?,
            v: Linear::new(&s.at("to_v"), channels, channels, true)?,
            out: Linear::new(&s.at("to_out.0"), channels, channels, true)?,
        })
    }

    /// Applies the block to `x` [B, C, H, W].
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (b, c, h, w) = x.dims4()?;
        let tokens = self.norm.forward(x)?.reshape((b, c, h * w))?.transpose(1, 2)?.contiguous()?;
        let a = attention(&self.q.forward(&tokens)?, &self.k.forward(&tokens)?, &self.v.forward(&tokens)?, 1, None)?;
        let out = self.out.forward(&a)?.transpose(1, 2)?.reshape((b, c, h, w))?;
        Ok((out + x)?)
    }
}
