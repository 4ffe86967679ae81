//! Scaled dot-product attention for f32 on the CPU as one op with its own backward pass, in the
//! way of FlashAttention: each query row's scores live only in a row buffer and the backward
//! pass recomputes them, so neither pass stores the [B, H, Nq, Nk] score and probability
//! matrices that the composed version (and its autograd graph) keeps. At 32x32 latents that is
//! ~1.3 GB less allocation per attention layer and far less memory traffic.
//!
//! Layout: `q` [B, Nq, H*d], `k` and `v` [B, Nk, H*d], output [B, Nq, H*d]; head `h` is the
//! slice `h*d..(h+1)*d` of the last dimension, as the projections produce it, so no head
//! transposes are needed. Work is split over (batch, head) pairs with rayon.

use candle_core::{CpuStorage, CustomOp3, Layout, Shape, Tensor};
use rayon::prelude::*;

/// The problem sizes.
#[derive(Clone, Copy, Debug)]
struct Dims {
    b: usize,
    nq: usize,
    nk: usize,
    heads: usize,
    d: usize,
}

impl Dims {
    fn width(&self) -> usize {
        self.heads * self.d
    }

    /// Head `h` of batch `b` (`rows` rows) as a dense row-major [rows, d] buffer.
    fn gather(&self, x: &[f32], b: usize, h: usize, rows: usize) -> Vec<f32> {
        let w = self.width();
        let mut out = Vec::with_capacity(rows * self.d);
        for r in 0..rows {
            let at = (b * rows + r) * w + h * self.d;
            out.extend_from_slice(&x[at..at + self.d]);
        }
        out
    }

    /// Head `h` of batch `b` transposed: [d, rows], so a key's or value's channel is a
    /// contiguous run over positions and the loops below vectorise over keys.
    fn gather_transposed(&self, x: &[f32], b: usize, h: usize, rows: usize) -> Vec<f32> {
        let w = self.width();
        let mut out = vec![0f32; rows * self.d];
        for r in 0..rows {
            let at = (b * rows + r) * w + h * self.d;
            for c in 0..self.d {
                out[c * rows + r] = x[at + c];
            }
        }
        out
    }

    /// Writes per-(batch, head) blocks back into [B, rows, H*d]; blocks are [rows, d], or
    /// [d, rows] when `transposed`.
    fn scatter(&self, blocks: &[Vec<f32>], rows: usize, transposed: bool) -> Vec<f32> {
        let (w, d) = (self.width(), self.d);
        let mut out = vec![0f32; self.b * rows * w];
        for (bh, block) in blocks.iter().enumerate() {
            let (b, h) = (bh / self.heads, bh % self.heads);
            for r in 0..rows {
                let at = (b * rows + r) * w + h * d;
                for c in 0..d {
                    out[at + c] = if transposed { block[c * rows + r] } else { block[r * d + c] };
                }
            }
        }
        out
    }
}

/// Dot product with eight independent accumulators (vectorisable).
#[inline(always)]
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut lanes = [0f32; 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let tail: f32 = ca.remainder().iter().zip(cb.remainder()).map(|(x, y)| x * y).sum();
    for (x, y) in ca.zip(cb) {
        for l in 0..8 {
            lanes[l] += x[l] * y[l];
        }
    }
    lanes.iter().sum::<f32>() + tail
}

/// `y += a * x`.
#[inline(always)]
fn axpy(y: &mut [f32], a: f32, x: &[f32]) {
    for (y, x) in y.iter_mut().zip(x) {
        *y += a * x;
    }
}

/// `exp(x)` for `x <= 0` to ~2 ulp, branch-free so it vectorises: `2^n * p(r)` with
/// `x = n ln2 + r`, `|r| <= ln2 / 2`, and a degree-6 polynomial for `exp(r)`.
#[inline(always)]
fn exp_nonpositive(x: f32) -> f32 {
    const LN2_HI: f32 = 0.693_145_75;
    const LN2_LO: f32 = 1.428_606_8e-6;
    const ROUND: f32 = 12_582_912.0; // 1.5 * 2^23: adding it rounds to an integer.
    let x = x.max(-87.0);
    let n = (x * std::f32::consts::LOG2_E + ROUND) - ROUND;
    let r = (x - n * LN2_HI) - n * LN2_LO;
    let p = 1.0 + r * (1.0 + r * (0.5 + r * (1.0 / 6.0 + r * (1.0 / 24.0 + r * (1.0 / 120.0 + r * (1.0 / 720.0))))));
    p * f32::from_bits(((n as i32 + 127) << 23) as u32)
}

/// Largest element, over eight lanes (vectorisable).
#[inline(always)]
fn max(x: &[f32]) -> f32 {
    let mut lanes = [f32::NEG_INFINITY; 8];
    let chunks = x.chunks_exact(8);
    let tail = chunks.remainder().iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v));
    for c in chunks {
        for l in 0..8 {
            lanes[l] = lanes[l].max(c[l]);
        }
    }
    lanes.iter().fold(tail, |m, &v| m.max(v))
}

/// Sum over eight lanes (vectorisable).
#[inline(always)]
fn sum(x: &[f32]) -> f32 {
    let mut lanes = [0f32; 8];
    let chunks = x.chunks_exact(8);
    let tail: f32 = chunks.remainder().iter().sum();
    for c in chunks {
        for l in 0..8 {
            lanes[l] += c[l];
        }
    }
    lanes.iter().sum::<f32>() + tail
}

/// Softmax probabilities of query `qi` against the keys `kt` [d, nk], into `row` [nk].
#[inline(always)]
fn probabilities(qi: &[f32], kt: &[f32], scale: f32, row: &mut [f32]) {
    let nk = row.len();
    row.fill(0.0);
    for (c, &q) in qi.iter().enumerate() {
        axpy(row, q * scale, &kt[c * nk..(c + 1) * nk]);
    }
    let top = max(row);
    for s in row.iter_mut() {
        *s = exp_nonpositive(*s - top);
    }
    let inv = 1.0 / sum(row);
    for s in row.iter_mut() {
        *s *= inv;
    }
}

/// The inputs of one (batch, head) pair.
struct Head {
    q: Vec<f32>,
    kt: Vec<f32>,
    vt: Vec<f32>,
    d: usize,
    scale: f32,
}

impl Head {
    fn new(q: &[f32], k: &[f32], v: &[f32], dims: Dims, bh: usize, scale: f32) -> Head {
        let (b, h) = (bh / dims.heads, bh % dims.heads);
        Head {
            q: dims.gather(q, b, h, dims.nq),
            kt: dims.gather_transposed(k, b, h, dims.nk),
            vt: dims.gather_transposed(v, b, h, dims.nk),
            d: dims.d,
            scale,
        }
    }

    fn nk(&self) -> usize {
        self.kt.len() / self.d
    }

    /// The output rows [nq, d].
    #[inline(always)]
    fn forward(&self) -> Vec<f32> {
        let (d, nk) = (self.d, self.nk());
        let nq = self.q.len() / d;
        let mut out = vec![0f32; nq * d];
        let mut row = vec![0f32; nk];
        for i in 0..nq {
            probabilities(&self.q[i * d..(i + 1) * d], &self.kt, self.scale, &mut row);
            for c in 0..d {
                out[i * d + c] = dot(&row, &self.vt[c * nk..(c + 1) * nk]);
            }
        }
        out
    }

    /// (dq [nq, d], dk [d, nk], dv [d, nk]) from the output `o` and its gradient `go` [nq, d].
    #[inline(always)]
    fn backward(&self, o: &[f32], go: &[f32]) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
        let (d, nk) = (self.d, self.nk());
        let nq = self.q.len() / d;
        let (mut dq, mut dkt, mut dvt) = (vec![0f32; nq * d], vec![0f32; d * nk], vec![0f32; d * nk]);
        let (mut p, mut ds) = (vec![0f32; nk], vec![0f32; nk]);
        for i in 0..nq {
            let (qi, oi, goi) = (&self.q[i * d..(i + 1) * d], &o[i * d..(i + 1) * d], &go[i * d..(i + 1) * d]);
            probabilities(qi, &self.kt, self.scale, &mut p);
            // dP = dO V^T, then dS = P * (dP - rowsum(dO * O)) * scale.
            ds.fill(0.0);
            for (c, &g) in goi.iter().enumerate() {
                axpy(&mut ds, g, &self.vt[c * nk..(c + 1) * nk]);
            }
            let delta = dot(goi, oi);
            for (s, &pj) in ds.iter_mut().zip(&p) {
                *s = pj * (*s - delta) * self.scale;
            }
            for c in 0..d {
                dq[i * d + c] = dot(&ds, &self.kt[c * nk..(c + 1) * nk]);
                axpy(&mut dkt[c * nk..(c + 1) * nk], qi[c], &ds);
                axpy(&mut dvt[c * nk..(c + 1) * nk], goi[c], &p);
            }
        }
        (dq, dkt, dvt)
    }
}

/// The per-head passes compiled for AVX2 (8-wide vectors instead of the 4-wide SSE2 of the
/// x86-64 baseline), used when the CPU has it.
#[cfg(target_arch = "x86_64")]
#[allow(unsafe_code)]
mod avx2 {
    use super::Head;

    /// [`Head::forward`] with AVX2.
    #[target_feature(enable = "avx2")]
    pub(super) unsafe fn forward(head: &Head) -> Vec<f32> {
        head.forward()
    }

    /// [`Head::backward`] with AVX2.
    #[target_feature(enable = "avx2")]
    pub(super) unsafe fn backward(head: &Head, o: &[f32], go: &[f32]) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
        head.backward(o, go)
    }

    pub(super) fn available() -> bool {
        is_x86_feature_detected!("avx2")
    }
}

impl Head {
    /// [`Head::forward`] in the fastest build this CPU runs.
    #[allow(unsafe_code)]
    fn forward_fastest(&self) -> Vec<f32> {
        #[cfg(target_arch = "x86_64")]
        if avx2::available() {
            // SAFETY: the CPU supports AVX2 (checked above).
            return unsafe { avx2::forward(self) };
        }
        self.forward()
    }

    /// [`Head::backward`] in the fastest build this CPU runs.
    #[allow(unsafe_code)]
    fn backward_fastest(&self, o: &[f32], go: &[f32]) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
        #[cfg(target_arch = "x86_64")]
        if avx2::available() {
            // SAFETY: the CPU supports AVX2 (checked above).
            return unsafe { avx2::backward(self, o, go) };
        }
        self.backward(o, go)
    }
}

fn forward(q: &[f32], k: &[f32], v: &[f32], dims: Dims, scale: f32) -> Vec<f32> {
    let blocks: Vec<Vec<f32>> = (0..dims.b * dims.heads)
        .into_par_iter()
        .map(|bh| Head::new(q, k, v, dims, bh, scale).forward_fastest())
        .collect();
    dims.scatter(&blocks, dims.nq, false)
}

/// Gradients of q, k and v given the output `o` and its gradient `go`.
fn backward(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    o: &[f32],
    go: &[f32],
    dims: Dims,
    scale: f32,
) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let blocks: Vec<(Vec<f32>, Vec<f32>, Vec<f32>)> = (0..dims.b * dims.heads)
        .into_par_iter()
        .map(|bh| {
            let (b, h) = (bh / dims.heads, bh % dims.heads);
            let (oh, goh) = (dims.gather(o, b, h, dims.nq), dims.gather(go, b, h, dims.nq));
            Head::new(q, k, v, dims, bh, scale).backward_fastest(&oh, &goh)
        })
        .collect();
    let (dq, rest): (Vec<_>, Vec<_>) = blocks.into_iter().map(|(q, k, v)| (q, (k, v))).unzip();
    let (dk, dv): (Vec<_>, Vec<_>) = rest.into_iter().unzip();
    (dims.scatter(&dq, dims.nq, false), dims.scatter(&dk, dims.nk, true), dims.scatter(&dv, dims.nk, true))
}

/// The op (see the module docs).
struct FusedAttention {
    heads: usize,
}

impl FusedAttention {
    fn dims(&self, q: &Shape, k: &Shape) -> candle_core::Result<Dims> {
        let (b, nq, width) = q.dims3()?;
        let nk = k.dims3()?.1;
        Ok(Dims { b, nq, nk, heads: self.heads, d: width / self.heads })
    }

    fn scale(&self, dims: Dims) -> f32 {
        (1.0 / (dims.d as f64).sqrt()) as f32
    }
}

fn contiguous<'a>(s: &'a CpuStorage, l: &Layout) -> candle_core::Result<&'a [f32]> {
    let data = s.as_slice::<f32>()?;
    match l.contiguous_offsets() {
        Some((start, end)) => Ok(&data[start..end]),
        None => candle_core::bail!("fused attention needs contiguous inputs"),
    }
}

fn values(t: &Tensor) -> candle_core::Result<Vec<f32>> {
    t.flatten_all()?.to_vec1::<f32>()
}

impl CustomOp3 for FusedAttention {
    fn name(&self) -> &'static str {
        "fused-attention"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let dims = self.dims(l1.shape(), l2.shape())?;
        let out = forward(contiguous(s1, l1)?, contiguous(s2, l2)?, contiguous(s3, l3)?, dims, self.scale(dims));
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
        s3: &candle_core::CudaStorage,
        l3: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        crate::cuda::attention::forward(self.heads, (s1, l1), (s2, l2), (s3, l3))
    }

    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        out: &Tensor,
        grad_out: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        #[cfg(feature = "cuda")]
        if q.device().is_cuda() {
            let (dq, dk, dv) = crate::cuda::attention::backward(q, k, v, out, grad_out, self.heads)?;
            return Ok((Some(dq), Some(dk), Some(dv)));
        }
        let dims = self.dims(q.shape(), k.shape())?;
        let (dq, dk, dv) =
            backward(&values(q)?, &values(k)?, &values(v)?, &values(out)?, &values(grad_out)?, dims, self.scale(dims));
        let device = q.device();
        Ok((
            Some(Tensor::from_vec(dq, q.shape(), device)?),
            Some(Tensor::from_vec(dk, k.shape(), device)?),
            Some(Tensor::from_vec(dv, v.shape(), device)?),
        ))
    }
}

/// True when [`fused_attention`] can run these inputs: f32 on the CPU, or (with the `cuda`
/// feature) f32 or bf16 on a GPU with a head size the CUDA kernels are compiled for.
pub fn supported(q: &Tensor, heads: usize) -> bool {
    if q.device().is_cpu() {
        return q.dtype() == candle_core::DType::F32;
    }
    #[cfg(feature = "cuda")]
    if let Ok(width) = q.dim(candle_core::D::Minus1) {
        return crate::cuda::attention::supported(q, width / heads.max(1));
    }
    let _ = heads;
    false
}

/// Multi-head attention of `q` [B, Nq, H*d] over `k`, `v` [B, Nk, H*d] with scale `1/sqrt(d)`.
pub fn fused_attention(q: &Tensor, k: &Tensor, v: &Tensor, heads: usize) -> candle_core::Result<Tensor> {
    q.contiguous()?.apply_op3(&k.contiguous()?, &v.contiguous()?, FusedAttention { heads })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::models::nn::composed_attention;
    use crate::rng::Rng;
    use candle_core::{Device, Var};

    fn random(rng: &mut Rng, shape: (usize, usize, usize)) -> Var {
        let n = shape.0 * shape.1 * shape.2;
        Var::from_tensor(&Tensor::from_vec(rng.normals(n), shape, &Device::Cpu).unwrap()).unwrap()
    }

    fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
        (a - b).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar().unwrap()
    }

    #[test]
    fn forward_and_gradients_equal_the_composed_attention() {
        let mut rng = Rng::new(1, 2);
        // Nq != Nk (cross-attention), head dim 12 (not a multiple of 8), 3 heads.
        let (q, k, v) = (random(&mut rng, (2, 10, 36)), random(&mut rng, (2, 7, 36)), random(&mut rng, (2, 7, 36)));
        let w = Tensor::from_vec(rng.normals(2 * 10 * 36), (2, 10, 36), &Device::Cpu).unwrap();
        let run = |fused: bool| {
            let out = if fused {
                fused_attention(q.as_tensor(), k.as_tensor(), v.as_tensor(), 3).unwrap()
            } else {
                composed_attention(q.as_tensor(), k.as_tensor(), v.as_tensor(), 3, None).unwrap()
            };
            let grads = (&out * &w).unwrap().sum_all().unwrap().backward().unwrap();
            let g = |x: &Var| grads.get(x.as_tensor()).unwrap().clone();
            (out, g(&q), g(&k), g(&v))
        };
        let (fused, composed) = (run(true), run(false));
        for x in [-80.0f32, -20.0, -1.0, -0.3465, -1e-3, 0.0] {
            let (ours, libm) = (exp_nonpositive(x), x.exp());
            assert!((ours - libm).abs() <= 3.0 * f32::EPSILON * libm, "exp({x}): {ours} vs {libm}");
        }
        assert!(max_diff(&fused.0, &composed.0) < 1e-5, "output");
        assert!(max_diff(&fused.1, &composed.1) < 1e-5, "dq");
        assert!(max_diff(&fused.2, &composed.2) < 1e-5, "dk");
        assert!(max_diff(&fused.3, &composed.3) < 1e-5, "dv");
    }
}
