//! The layers the models are built from, each differentiable end to end (candle's fused
//! LayerNorm and `softmax_last_dim` have no backward pass, so these are composed from ops
//! that do), with parameters cast to the input's dtype so a bf16 forward trains f32 masters.

use candle_core::{DType, Device, Tensor, D};

use super::error::Result;
use super::weights::{Init, Scope};
use super::{bias_add, conv_patches, fused_attention, fused_norm};

/// Casts a parameter to the compute dtype of `like` (a no-op when they match).
fn cast(p: &Tensor, like: &Tensor) -> Result<Tensor> {
    Ok(if p.dtype() == like.dtype() { p.clone() } else { p.to_dtype(like.dtype())? })
}

/// The dtype statistics are computed in: f32 for half types and f32, f64 for f64.
fn stats_dtype(dtype: DType) -> DType {
    if dtype == DType::F64 {
        DType::F64
    } else {
        DType::F32
    }
}

/// `y = x W^T + b` over the last dimension.
#[derive(Clone, Debug)]
pub struct Linear {
    weight: Tensor,
    bias: Option<Tensor>,
}

impl Linear {
    /// `weight` [out, in] and, when `bias`, `bias` [out], under `s`.
    pub fn new(s: &Scope, in_dim: usize, out_dim: usize, bias: bool) -> Result<Linear> {
        let bound = 1.0 / (in_dim as f64).sqrt();
        let weight = s.get("weight", &[out_dim, in_dim], Init::Uniform(bound))?;
        let bias = bias.then(|| s.get("bias", &[out_dim], Init::Uniform(bound))).transpose()?;
        Ok(Linear { weight, bias })
    }

    /// Applies the layer to `x` of shape `[..., in]`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let dims = x.dims().to_vec();
        let in_dim = dims[dims.len() - 1];
        let rows: usize = dims[..dims.len() - 1].iter().product();
        let w = cast(&self.weight, x)?;
        let mut y = x.reshape((rows, in_dim))?.matmul(&w.t()?)?;
        if let Some(b) = &self.bias {
            y = add_bias(&y, &cast(b, x)?, 1)?;
        }
        let mut out = dims;
        *out.last_mut().expect("non-empty") = self.weight.dim(0)?;
        Ok(y.reshape(out)?)
    }
}

/// `y + bias` along dimension `channel_dim` of `y`: one fused op for f32 on the CPU (its
/// backward sums the bias gradient in parallel), a broadcast add otherwise.
fn add_bias(y: &Tensor, bias: &Tensor, channel_dim: usize) -> Result<Tensor> {
    if bias_add::supported(y, bias) {
        return Ok(bias_add::bias_add(y, bias, channel_dim)?);
    }
    let mut view = vec![1; y.rank()];
    view[channel_dim] = bias.elem_count();
    Ok(y.broadcast_add(&bias.reshape(view)?)?)
}

/// A 2-D convolution with square kernel, stride and symmetric padding.
#[derive(Clone, Debug)]
pub struct Conv2d {
    weight: Tensor,
    bias: Option<Tensor>,
    padding: usize,
    stride: usize,
}

impl Conv2d {
    /// `weight` [out, in, k, k] and `bias` [out] under `s`.
    pub fn new(s: &Scope, in_ch: usize, out_ch: usize, kernel: usize, stride: usize, padding: usize) -> Result<Conv2d> {
        let bound = 1.0 / ((in_ch * kernel * kernel) as f64).sqrt();
        let weight = s.get("weight", &[out_ch, in_ch, kernel, kernel], Init::Uniform(bound))?;
        let bias = Some(s.get("bias", &[out_ch], Init::Uniform(bound))?);
        Ok(Conv2d { weight, bias, padding, stride })
    }

    /// Applies the convolution to `x` [B, C, H, W]: through cuDNN on GPUs (forward and
    /// backward), on the CPU as patches times weights when training or when the patches are small.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let weight = cast(&self.weight, x)?;
        // Patches cost k*k times the input's memory; candle's conv2d is leaner (and its forward
        // is fine) when no backward pass follows and the patches would be large.
        let k = weight.dim(2)?;
        let patch_bytes = x.elem_count() * k * k * 4;
        let training = x.track_op() || weight.track_op();
        let y = if let Some(y) = cudnn_conv2d(x, &weight, self.stride, self.padding)? {
            y
        } else if training || (x.device().is_cpu() && patch_bytes <= 256 << 20) {
            conv2d_by_matmul(x, &weight, self.stride, self.padding)?
        } else {
            x.conv2d(&weight, self.padding, self.stride, 1, 1)?
        };
        Ok(match &self.bias {
            Some(b) => add_bias(&y, &cast(b, x)?, 1)?,
            None => y,
        })
    }
}

/// The convolution through cuDNN when `x` is on a GPU in f32 or bf16 (`None` otherwise).
#[cfg(feature = "cuda")]
fn cudnn_conv2d(x: &Tensor, weight: &Tensor, stride: usize, padding: usize) -> Result<Option<Tensor>> {
    if !crate::cuda::conv::supported(x, weight) {
        return Ok(None);
    }
    Ok(Some(crate::cuda::conv::conv2d(x, weight, stride, padding)?))
}

/// Without the `cuda` feature there is no cuDNN.
#[cfg(not(feature = "cuda"))]
fn cudnn_conv2d(_: &Tensor, _: &Tensor, _: usize, _: usize) -> Result<Option<Tensor>> {
    Ok(None)
}

/// A convolution as patches times weights, from ops whose backward passes are matrix products
/// (the patches one fused op for f32 on the CPU, [`conv_patches`]). On the CPU candle's own
/// `conv2d` backward runs a naive transposed convolution and a convolution with an image-sized
/// kernel, which made it most of a training step.
pub fn conv2d_by_matmul(x: &Tensor, weight: &Tensor, stride: usize, padding: usize) -> Result<Tensor> {
    let (b, c, h, w) = x.dims4()?;
    let (out_ch, _, k, _) = weight.dims4()?;
    let (oh, ow) = ((h + 2 * padding - k) / stride + 1, (w + 2 * padding - k) / stride + 1);
    let kernel = weight.reshape((out_ch, c * k * k))?;
    if k == 1 && stride == 1 && padding == 0 {
        let y = kernel.broadcast_matmul(&x.reshape((b, c, h * w))?)?;
        return Ok(y.reshape((b, out_ch, h, w))?);
    }
    let columns = if conv_patches::supported(x) {
        conv_patches::patches(x, k, stride, padding)?
    } else {
        conv_patches::composed_patches(x, k, stride, padding)?
    };
    Ok(kernel.broadcast_matmul(&columns)?.reshape((b, out_ch, oh, ow))?)
}

/// Group normalisation over `[B, C, ...]`, statistics in f32.
#[derive(Clone, Debug)]
pub struct GroupNorm {
    weight: Tensor,
    bias: Tensor,
    groups: usize,
    eps: f64,
}

impl GroupNorm {
    /// `weight` and `bias` [channels] under `s`.
    pub fn new(s: &Scope, groups: usize, channels: usize, eps: f64) -> Result<GroupNorm> {
        Ok(GroupNorm {
            weight: s.get("weight", &[channels], Init::Ones)?,
            bias: s.get("bias", &[channels], Init::Zeros)?,
            groups,
            eps,
        })
    }

    /// `silu(self.forward(x))`: one fused op with its own backward pass, for f32 on the CPU
    /// ([`fused_norm`]) and for f32 and bf16 on GPUs (one kernel each way); candle ops otherwise.
    pub fn forward_silu(&self, x: &Tensor) -> Result<Tensor> {
        if let Some(y) = self.fused(x, true)? {
            return Ok(y);
        }
        silu(&self.composed(x)?)
    }

    /// Normalises `x` (one fused op for f32 on the CPU and on GPUs).
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        if let Some(y) = self.fused(x, false)? {
            return Ok(y);
        }
        self.composed(x)
    }

    /// The fused op for `x`'s device and dtype, if there is one.
    fn fused(&self, x: &Tensor, silu: bool) -> Result<Option<Tensor>> {
        #[cfg(feature = "cuda")]
        if crate::cuda::norms::supported(x, false) {
            let y = crate::cuda::norms::group_norm(x, &self.weight, &self.bias, self.groups, self.eps, silu)?;
            return Ok(Some(y));
        }
        if fused_norm::supported(x, &self.weight, &self.bias) {
            return Ok(Some(fused_norm::group_norm(x, &self.weight, &self.bias, self.groups, self.eps, silu)?));
        }
        Ok(None)
    }

    /// [`GroupNorm::forward`] from candle ops.
    fn composed(&self, x: &Tensor) -> Result<Tensor> {
        composed_group_norm(x, &self.weight, &self.bias, self.groups, self.eps)
    }
}

/// Layer normalisation over the last dimension, statistics in f32.
#[derive(Clone, Debug)]
pub struct LayerNorm {
    weight: Tensor,
    bias: Tensor,
    eps: f64,
}

impl LayerNorm {
    /// `weight` and `bias` [dim] under `s`.
    pub fn new(s: &Scope, dim: usize, eps: f64) -> Result<LayerNorm> {
        Ok(LayerNorm { weight: s.get("weight", &[dim], Init::Ones)?, bias: s.get("bias", &[dim], Init::Zeros)?, eps })
    }

    /// Normalises `x`: one fused op with its own backward pass for f32 on the CPU
    /// ([`fused_norm`]) and for f32 and bf16 on GPUs (one kernel each way); candle ops otherwise.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        #[cfg(feature = "cuda")]
        if crate::cuda::norms::supported(x, true) {
            return Ok(crate::cuda::norms::layer_norm(x, &self.weight, &self.bias, self.eps)?);
        }
        if fused_norm::supported(x, &self.weight, &self.bias) {
            return Ok(fused_norm::layer_norm(x, &self.weight, &self.bias, self.eps)?);
        }
        composed_layer_norm(x, &self.weight, &self.bias, self.eps)
    }
}

/// Group normalisation of `x` [B, C, ...] from candle ops (any device and dtype; statistics in
/// f32), what [`fused_norm::group_norm`] computes in one op.
pub fn composed_group_norm(x: &Tensor, weight: &Tensor, bias: &Tensor, groups: usize, eps: f64) -> Result<Tensor> {
    let dims = x.dims().to_vec();
    let (b, c) = (dims[0], dims[1]);
    let dtype = x.dtype();
    let grouped = x.to_dtype(stats_dtype(dtype))?.reshape((b, groups, ()))?;
    let mean = grouped.mean_keepdim(D::Minus1)?;
    let centred = grouped.broadcast_sub(&mean)?;
    let var = centred.sqr()?.mean_keepdim(D::Minus1)?;
    let normed = centred.broadcast_div(&(var + eps)?.sqrt()?)?.reshape(dims.clone())?.to_dtype(dtype)?;
    let mut shape = vec![1, c];
    shape.resize(dims.len(), 1);
    let w = cast(weight, x)?.reshape(shape.clone())?;
    let bias = cast(bias, x)?.reshape(shape)?;
    Ok(normed.broadcast_mul(&w)?.broadcast_add(&bias)?)
}

/// Layer normalisation over the last dimension from candle ops (any device and dtype;
/// statistics in f32), what [`fused_norm::layer_norm`] computes in one op.
pub fn composed_layer_norm(x: &Tensor, weight: &Tensor, bias: &Tensor, eps: f64) -> Result<Tensor> {
    let dtype = x.dtype();
    let x32 = x.to_dtype(stats_dtype(dtype))?;
    let mean = x32.mean_keepdim(D::Minus1)?;
    let centred = x32.broadcast_sub(&mean)?;
    let var = centred.sqr()?.mean_keepdim(D::Minus1)?;
    let normed = centred.broadcast_div(&(var + eps)?.sqrt()?)?.to_dtype(dtype)?;
    Ok(normed.broadcast_mul(&cast(weight, x)?)?.broadcast_add(&cast(bias, x)?)?)
}

/// Differentiable softmax over the last dimension, computed in f32.
pub fn softmax(x: &Tensor) -> Result<Tensor> {
    let dtype = x.dtype();
    let x = x.to_dtype(stats_dtype(dtype))?;
    let max = x.max_keepdim(D::Minus1)?.detach();
    let e = x.broadcast_sub(&max)?.exp()?;
    Ok(e.broadcast_div(&e.sum_keepdim(D::Minus1)?)?.to_dtype(dtype)?)
}

/// Multi-head scaled dot-product attention: `q` [B, Nq, H*d], `k`, `v` [B, Nk, H*d], optional
/// additive `mask` broadcastable to [B, H, Nq, Nk].
///
/// Unmasked attention runs as one fused op that never stores the score matrix
/// ([`super::fused_attention`]: f32 on the CPU; f32 and bf16 through the flash-style CUDA
/// kernels on GPUs); everything else is composed from candle ops.
pub fn attention(q: &Tensor, k: &Tensor, v: &Tensor, heads: usize, mask: Option<&Tensor>) -> Result<Tensor> {
    if mask.is_none() && fused_attention::supported(q, heads) {
        return Ok(fused_attention::fused_attention(q, k, v, heads)?);
    }
    composed_attention(q, k, v, heads, mask)
}

/// [`attention`] where query `i` attends to keys `0..=i` (CLIP's text encoder): the tensor-core
/// kernels on GPUs (bf16, no gradient), else the composed attention with `mask`, a
/// [`causal_mask`] of the queries' length.
pub fn causal_attention(q: &Tensor, k: &Tensor, v: &Tensor, heads: usize, mask: &Tensor) -> Result<Tensor> {
    #[cfg(feature = "cuda")]
    if !(q.track_op() || k.track_op() || v.track_op()) {
        if let Some(out) = crate::cuda::attention::causal_forward(q, k, v, heads)? {
            return Ok(out);
        }
    }
    composed_attention(q, k, v, heads, Some(mask))
}

/// [`attention`] from candle ops (any device and dtype, masks; stores the probabilities).
pub fn composed_attention(q: &Tensor, k: &Tensor, v: &Tensor, heads: usize, mask: Option<&Tensor>) -> Result<Tensor> {
    let (b, nq, inner) = q.dims3()?;
    let nk = k.dim(1)?;
    let d = inner / heads;
    let split =
        |t: &Tensor, n: usize| -> Result<Tensor> { Ok(t.reshape((b, n, heads, d))?.transpose(1, 2)?.contiguous()?) };
    let (q, k, v) = (split(q, nq)?, split(k, nk)?, split(v, nk)?);
    let scale = 1.0 / (d as f64).sqrt();
    let mut scores = (q.matmul(&k.t()?)? * scale)?;
    if let Some(mask) = mask {
        scores = scores.broadcast_add(&mask.to_dtype(scores.dtype())?)?;
    }
    let probs = softmax(&scores)?;
    Ok(probs.matmul(&v)?.transpose(1, 2)?.reshape((b, nq, inner))?)
}

/// A [N, N] additive mask that hides later positions (`-inf` above the diagonal).
pub fn causal_mask(n: usize, device: &Device) -> Result<Tensor> {
    let values: Vec<f32> =
        (0..n).flat_map(|i| (0..n).map(move |j| if j > i { f32::NEG_INFINITY } else { 0.0 })).collect();
    Ok(Tensor::from_vec(values, (n, n), device)?)
}

/// Nearest-neighbour 2x upsampling as reshape + broadcast (exact gradient, cheap backward).
pub fn upsample2x(x: &Tensor) -> Result<Tensor> {
    let (b, c, h, w) = x.dims4()?;
    Ok(x.reshape((b, c, h, 1, w, 1))?.broadcast_as((b, c, h, 2, w, 2))?.reshape((b, c, 2 * h, 2 * w))?)
}

/// Exact (erf) GELU.
pub fn gelu(x: &Tensor) -> Result<Tensor> {
    Ok(x.gelu_erf()?)
}

/// OpenAI's `quick_gelu`: `x * sigmoid(1.702 x)`.
pub fn quick_gelu(x: &Tensor) -> Result<Tensor> {
    let s = ((x * -1.702)?.exp()? + 1.0)?.recip()?;
    Ok((x * s)?)
}

/// SiLU.
pub fn silu(x: &Tensor) -> Result<Tensor> {
    Ok(x.silu()?)
}

/// Sinusoidal timestep embedding of `timesteps` (one per sample), computed in f32 exactly as
/// diffusers does: `[cos, sin]` when `flip_sin_to_cos`.
pub fn timestep_embedding(
    timesteps: &[f32],
    dim: usize,
    flip_sin_to_cos: bool,
    freq_shift: f32,
    device: &Device,
) -> Result<Tensor> {
    let half = dim / 2;
    let freqs: Vec<f32> = (0..half).map(|i| (-(10000f32.ln()) * i as f32 / (half as f32 - freq_shift)).exp()).collect();
    let mut values = Vec::with_capacity(timesteps.len() * dim);
    for &t in timesteps {
        let args: Vec<f32> = freqs.iter().map(|f| t * f).collect();
        let (sin, cos): (Vec<f32>, Vec<f32>) = args.iter().map(|a| (a.sin(), a.cos())).unzip();
        if flip_sin_to_cos {
            values.extend(cos);
            values.extend(sin);
        } else {
            values.extend(sin);
            values.extend(cos);
        }
        values.resize(values.len() + dim % 2, 0.0);
    }
    Ok(Tensor::from_vec(values, (timesteps.len(), dim), device)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Var;

    fn diff(a: &Tensor, b: &Tensor) -> f32 {
        (a - b).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar().unwrap()
    }

    /// The causal attention's composed path takes bf16 inputs with the f32 mask, and position
    /// 0 sees only itself.
    #[test]
    fn causal_attention_masks_later_keys_in_f32_and_bf16() {
        let mut rng = crate::rng::Rng::new(5, 5);
        let (b, n, heads, d) = (2, 5, 2, 4);
        let x = |rng: &mut crate::rng::Rng| {
            Tensor::from_vec(rng.normals(b * n * heads * d), (b, n, heads * d), &Device::Cpu)
        };
        let (q, k, v) = (x(&mut rng).unwrap(), x(&mut rng).unwrap(), x(&mut rng).unwrap());
        let mask = causal_mask(n, &Device::Cpu).unwrap();
        let out = causal_attention(&q, &k, &v, heads, &mask).unwrap();
        // The first query attends to the first key alone: its output is the first value.
        assert!(diff(&out.narrow(1, 0, 1).unwrap(), &v.narrow(1, 0, 1).unwrap()) < 1e-6);
        let bf16 = |t: &Tensor| t.to_dtype(DType::BF16).unwrap();
        let low = causal_attention(&bf16(&q), &bf16(&k), &bf16(&v), heads, &mask).unwrap();
        assert_eq!(low.dtype(), DType::BF16);
        assert!(diff(&low.to_dtype(DType::F32).unwrap(), &out) < 5e-2);
    }

    #[test]
    fn convolution_by_matmul_equals_candle_conv2d_with_gradients() {
        let mut rng = crate::rng::Rng::new(4, 4);
        let mut random = |shape: &[usize]| {
            let values = Tensor::from_vec(rng.normals(shape.iter().product()), shape, &Device::Cpu).unwrap();
            Var::from_tensor(&values).unwrap()
        };
        for (k, stride, padding, size) in [(3, 1, 1, 7), (3, 2, 1, 8), (3, 2, 1, 7), (1, 1, 0, 5), (3, 2, 0, 9)] {
            let (x, w) = (random(&[2, 3, size, size]), random(&[4, 3, k, k]));
            let ours = conv2d_by_matmul(x.as_tensor(), w.as_tensor(), stride, padding).unwrap();
            let theirs = x.as_tensor().conv2d(w.as_tensor(), padding, stride, 1, 1).unwrap();
            assert_eq!(ours.dims(), theirs.dims());
            assert!(diff(&ours, &theirs) < 1e-5, "k {k} stride {stride} size {size}");
            let g1 = ours.sqr().unwrap().sum_all().unwrap().backward().unwrap();
            let g2 = theirs.sqr().unwrap().sum_all().unwrap().backward().unwrap();
            for v in [&x, &w] {
                let (a, b) = (g1.get(v.as_tensor()).unwrap(), g2.get(v.as_tensor()).unwrap());
                let scale: f32 = a.abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar().unwrap();
                assert!(diff(a, b) <= 1e-5 * scale, "gradient, k {k} stride {stride} size {size}");
            }
        }
    }
}
