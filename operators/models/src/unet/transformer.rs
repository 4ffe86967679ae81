//! diffusers `Transformer2DModel` with `BasicTransformerBlock`s: self-attention,
//! cross-attention on the text embeddings, and a GEGLU feed-forward, each pre-normalised.

use candle_core::Tensor;

use crate::error::Result;
use crate::nn::{attention, gelu, Conv2d, GroupNorm, LayerNorm, Linear};
use crate::weights::Scope;

struct Attention {
    q: Linear,
    k: Linear,
    v: Linear,
    out: Linear,
    heads: usize,
}

impl Attention {
    fn new(s: &Scope, dim: usize, context_dim: usize, heads: usize) -> Result<Attention> {
        Ok(Attention {
            q: Linear::new(&s.at("to_q"), dim, dim, false)?,
            k: Linear::new(&s.at("to_k"), context_dim, dim, false)?,
            v: Linear::new(&s.at("to_v"), context_dim, dim, false)?,
            out: Linear::new(&s.at("to_out.0"), dim, dim, true)?,
            heads,
        })
    }

    fn forward(&self, x: &Tensor, context: &Tensor) -> Result<Tensor> {
        let a = attention(&self.q.forward(x)?, &self.k.forward(context)?, &self.v.forward(context)?, self.heads, None)?;
        self.out.forward(&a)
    }
}

struct Block {
    norm1: LayerNorm,
    attn1: Attention,
    norm2: LayerNorm,
    attn2: Attention,
    norm3: LayerNorm,
    ff_in: Linear,
    ff_out: Linear,
}

impl Block {
    fn new(s: &Scope, dim: usize, context_dim: usize, heads: usize) -> Result<Block> {
        Ok(Block {
            norm1: LayerNorm::new(&s.at("norm1"), dim, 1e-5)?,
            attn1: Attention::new(&s.at("attn1"), dim, dim, heads)?,
            norm2: LayerNorm::new(&s.at("norm2"), dim, 1e-5)?,
            attn2: Attention::new(&s.at("attn2"), dim, context_dim, heads)?,
            norm3: LayerNorm::new(&s.at("norm3"), dim, 1e-5)?,
            ff_in: Linear::new(&s.at("ff.net.0.proj"), dim, dim * 8, true)?,
            ff_out: Linear::new(&s.at("ff.net.2"), dim * 4, dim, true)?,
        })
    }

    fn forward(&self, x: &Tensor, context: &Tensor) -> Result<Tensor> {
        let h = self.norm1.forward(x)?;
        let x = (self.attn1.forward(&h, &h)? + x)?;
        let x = (self.attn2.forward(&self.norm2.forward(&x)?, context)? + &x)?;
        // GEGLU: project to twice the width, gate one half with GELU of the other.
        let projected = self.ff_in.forward(&self.norm3.forward(&x)?)?;
        let halves = projected.chunk(2, candle_core::D::Minus1)?;
        let ff = self.ff_out.forward(&(&halves[0] * gelu(&halves[1])?)?)?;
        Ok((ff + x)?)
    }
}

enum Projection {
    Linear(Linear),
    Conv(Conv2d),
}

/// A spatial transformer over a [B, C, H, W] feature map, conditioned on text embeddings.
pub struct Transformer2D {
    norm: GroupNorm,
    proj_in: Projection,
    blocks: Vec<Block>,
    proj_out: Projection,
}

impl Transformer2D {
    /// `layers` transformer blocks of `heads` heads over `channels`, with `context_dim`-wide
    /// text; linear projections when `linear` (SD2), 1x1 convolutions otherwise (SD1).
    pub fn new(
        s: &Scope,
        channels: usize,
        heads: usize,
        layers: usize,
        context_dim: usize,
        groups: usize,
        linear: bool,
    ) -> Result<Transformer2D> {
        let proj = |name: &str| -> Result<Projection> {
            Ok(if linear {
                Projection::Linear(Linear::new(&s.at(name), channels, channels, true)?)
            } else {
                Projection::Conv(Conv2d::new(&s.at(name), channels, channels, 1, 1, 0)?)
            })
        };
        Ok(Transformer2D {
            norm: GroupNorm::new(&s.at("norm"), groups, channels, 1e-6)?,
            proj_in: proj("proj_in")?,
            blocks: (0..layers)
                .map(|k| Block::new(&s.at("transformer_blocks").at(k), channels, context_dim, heads))
                .collect::<Result<_>>()?,
            proj_out: proj("proj_out")?,
        })
    }

    /// Applies the transformer (with the residual connection).
    pub fn forward(&self, x: &Tensor, context: &Tensor) -> Result<Tensor> {
        let (b, c, h, w) = x.dims4()?;
        let normed = self.norm.forward(x)?;
        let to_tokens = |t: &Tensor| -> Result<Tensor> { Ok(t.reshape((b, c, h * w))?.transpose(1, 2)?.contiguous()?) };
        let to_map = |t: &Tensor| -> Result<Tensor> { Ok(t.transpose(1, 2)?.reshape((b, c, h, w))?) };
        let mut tokens = match &self.proj_in {
            Projection::Linear(l) => l.forward(&to_tokens(&normed)?)?,
            Projection::Conv(conv) => to_tokens(&conv.forward(&normed)?)?,
        };
        for block in &self.blocks {
            tokens = block.forward(&tokens, context)?;
        }
        let out = match &self.proj_out {
            Projection::Linear(l) => to_map(&l.forward(&tokens)?)?,
            Projection::Conv(conv) => conv.forward(&to_map(&tokens)?)?,
        };
        Ok((out + x)?)
    }
}
