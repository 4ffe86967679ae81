//! Scaled dot-product attention for f32 on the CPU as one op with its own backward pass, in the
//! way of FlashAttention: each query row's scores live only in a row buffer and the backward
//! pass recomputes them, so neither pass stores the [B, H, Nq, Nk] score and probability
//! matrices that the composed version (and its autograd graph) keeps. At 32x32 latents that is
//! ~1.3 GB less allocation per attention layer and far less memory traffic.
//!
//! Layout: `q` [B, Nq, H*d], `k` and `v` [B, Nk, H*d], output [B, Nq, H*d]; head `h` is the
//! slice `h*d..(h+1)*d` of the last dimension, as the projections produce it, so no head
//! transposes are needed. Work is split over (batch, head) pairs with rayon.

// Index loops: the kernels walk several arrays with different strides by the same index.
#![allow(clippy::needless_range_loop)]

use candle_core::{CpuStorage, CustomOp3, Layout, Shape, Tensor};
use rayon::prelude::*;

use super::cpu_values::{contiguous, with_values};

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
    let mut lanes = [0f32; LANES];
    let (ca, cb) = (a.chunks_exact(LANES), b.chunks_exact(LANES));
    let tail: f32 = ca.remainder().iter().zip(cb.remainder()).map(|(x, y)| x * y).sum();
    for (x, y) in ca.zip(cb) {
        for l in 0..LANES {
            lanes[l] += x[l] * y[l];
        }
    }
    lanes.iter().sum::<f32>() + tail
}

/// `exp(x)` for `x <= 0` to ~2 ulp, branch-free so it vectorises: `2^n * p(r)` with
/// `x = n ln2 + r`, `|r| <= ln2 / 2`, and a degree-6 polynomial for `exp(r)`. `n` is read from
/// the bits of the rounding sum (no float-to-int conversion, which would not vectorise).
#[inline(always)]
fn exp_nonpositive(x: f32) -> f32 {
    const LN2_HI: f32 = 0.693_145_75;
    const LN2_LO: f32 = 1.428_606_8e-6;
    const ROUND: f32 = 12_582_912.0; // 1.5 * 2^23: adding it rounds to an integer.
    let x = x.clamp(-87.0, 0.0);
    let shifted = x * std::f32::consts::LOG2_E + ROUND;
    let n = shifted - ROUND;
    let r = (x - n * LN2_HI) - n * LN2_LO;
    let p = 1.0 + r * (1.0 + r * (0.5 + r * (1.0 / 6.0 + r * (1.0 / 24.0 + r * (1.0 / 120.0 + r * (1.0 / 720.0))))));
    // The low mantissa bits of `shifted` hold n (two's complement, |n| < 2^22).
    let n_bits = shifted.to_bits().wrapping_sub(ROUND.to_bits());
    p * f32::from_bits(n_bits.wrapping_add(127) << 23)
}

/// Sum over eight lanes (vectorisable).
#[inline(always)]
fn sum(x: &[f32]) -> f32 {
    let mut lanes = [0f32; LANES];
    let chunks = x.chunks_exact(LANES);
    let tail: f32 = chunks.remainder().iter().sum();
    for c in chunks {
        for l in 0..LANES {
            lanes[l] += c[l];
        }
    }
    lanes.iter().sum::<f32>() + tail
}

/// Keys are processed eight at a time: one AVX2 vector per channel.
const LANES: usize = 8;

/// Scaled scores of the query `qs` (already times the scale) against keys `j..j+LANES` of the
/// transposed keys `kt` [d, nk]: one load and one multiply-add per channel and lane.
#[inline(always)]
fn score_lanes(qs: &[f32], kt: &[f32], nk: usize, j: usize) -> [f32; LANES] {
    let mut acc = [0f32; LANES];
    for (c, &q) in qs.iter().enumerate() {
        let k = &kt[c * nk + j..c * nk + j + LANES];
        for l in 0..LANES {
            acc[l] += q * k[l];
        }
    }
    acc
}

/// [`score_lanes`] for one key (the tail past the last full group of lanes).
#[inline(always)]
fn score_one(qs: &[f32], kt: &[f32], nk: usize, j: usize) -> f32 {
    qs.iter().enumerate().map(|(c, &q)| q * kt[c * nk + j]).sum()
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

    /// The output rows [nq, d] and each row's log-sum-exp of its scaled scores, in two sweeps
    /// over the keys per query: scores and their maximum, then the exponentials, their sum and
    /// the weighted values together (normalised once at the end).
    #[inline(always)]
    fn forward(&self) -> (Vec<f32>, Vec<f32>) {
        let (d, nk) = (self.d, self.nk());
        let nq = self.q.len() / d;
        let full = nk / LANES * LANES;
        let (mut out, mut lse) = (vec![0f32; nq * d], vec![0f32; nq]);
        let (mut row, mut qs, mut weighted) = (vec![0f32; nk], vec![0f32; d], vec![[0f32; LANES]; d]);
        for i in 0..nq {
            for (s, &q) in qs.iter_mut().zip(&self.q[i * d..(i + 1) * d]) {
                *s = q * self.scale;
            }
            let mut top = [f32::NEG_INFINITY; LANES];
            for j in (0..full).step_by(LANES) {
                let scores = score_lanes(&qs, &self.kt, nk, j);
                for l in 0..LANES {
                    top[l] = top[l].max(scores[l]);
                }
                row[j..j + LANES].copy_from_slice(&scores);
            }
            let mut top = top.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v));
            for j in full..nk {
                row[j] = score_one(&qs, &self.kt, nk, j);
                top = top.max(row[j]);
            }
            // Exponentials as one long loop (vectorises), then the weighted values by groups.
            for s in row.iter_mut() {
                *s = exp_nonpositive(*s - top);
            }
            let total = sum(&row);
            weighted.iter_mut().for_each(|w| *w = [0.0; LANES]);
            for j in (0..full).step_by(LANES) {
                let p = &row[j..j + LANES];
                for (c, w) in weighted.iter_mut().enumerate() {
                    let v = &self.vt[c * nk + j..c * nk + j + LANES];
                    for l in 0..LANES {
                        w[l] += p[l] * v[l];
                    }
                }
            }
            let mut tail = vec![0f32; d];
            for j in full..nk {
                for (c, t) in tail.iter_mut().enumerate() {
                    *t += row[j] * self.vt[c * nk + j];
                }
            }
            let inv = 1.0 / total;
            for c in 0..d {
                out[i * d + c] = (weighted[c].iter().sum::<f32>() + tail[c]) * inv;
            }
            lse[i] = top + total.ln();
        }
        (out, lse)
    }

    /// (dq [nq, d], dk [d, nk], dv [d, nk]) from the output `o`, its gradient `go` [nq, d] and
    /// the forward pass's log-sum-exp per row, in one sweep over the keys per query: each
    /// key's probability is recomputed as `exp(score - lse)`, so no row buffer is needed.
    #[inline(always)]
    fn backward(&self, o: &[f32], go: &[f32], lse: &[f32]) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
        let (d, nk) = (self.d, self.nk());
        let nq = self.q.len() / d;
        let full = nk / LANES * LANES;
        let (mut dq, mut dkt, mut dvt) = (vec![0f32; nq * d], vec![0f32; d * nk], vec![0f32; d * nk]);
        let (mut qs, mut dq_lanes) = (vec![0f32; d], vec![[0f32; LANES]; d]);
        let (mut p, mut ds) = (vec![0f32; nk], vec![0f32; nk]);
        for i in 0..nq {
            let (qi, oi, goi) = (&self.q[i * d..(i + 1) * d], &o[i * d..(i + 1) * d], &go[i * d..(i + 1) * d]);
            for (s, &q) in qs.iter_mut().zip(qi) {
                *s = q * self.scale;
            }
            // dS = P * (dP - rowsum(dO * O)) * scale, with dP = dO V^T.
            let (delta, top) = (dot(goi, oi), lse[i]);
            // Scores and dP by groups of keys, then P and dS as long loops (they vectorise),
            // then the three gradients by groups.
            for j in (0..full).step_by(LANES) {
                p[j..j + LANES].copy_from_slice(&score_lanes(&qs, &self.kt, nk, j));
                ds[j..j + LANES].copy_from_slice(&score_lanes(goi, &self.vt, nk, j));
            }
            for j in full..nk {
                p[j] = score_one(&qs, &self.kt, nk, j);
                ds[j] = score_one(goi, &self.vt, nk, j);
            }
            for (p, ds) in p.iter_mut().zip(ds.iter_mut()) {
                *p = exp_nonpositive(*p - top);
                *ds = *p * (*ds - delta) * self.scale;
            }
            dq_lanes.iter_mut().for_each(|a| *a = [0.0; LANES]);
            for j in (0..full).step_by(LANES) {
                let (pj, dsj) = (&p[j..j + LANES], &ds[j..j + LANES]);
                for c in 0..d {
                    let at = c * nk + j;
                    let k = &self.kt[at..at + LANES];
                    let (dk, dv) = (&mut dkt[at..at + LANES], &mut dvt[at..at + LANES]);
                    let (q, g) = (qi[c], goi[c]);
                    for l in 0..LANES {
                        dq_lanes[c][l] += dsj[l] * k[l];
                        dk[l] += q * dsj[l];
                        dv[l] += g * pj[l];
                    }
                }
            }
            for c in 0..d {
                dq[i * d + c] = dq_lanes[c].iter().sum::<f32>();
            }
            for j in full..nk {
                for c in 0..d {
                    dq[i * d + c] += ds[j] * self.kt[c * nk + j];
                    dkt[c * nk + j] += qi[c] * ds[j];
                    dvt[c * nk + j] += goi[c] * p[j];
                }
            }
        }
        (dq, dkt, dvt)
    }
}

#[cfg(target_arch = "x86_64")]
#[allow(unsafe_code)]
mod avx2;

impl Head {
    /// [`Head::forward`] in the fastest build this CPU runs.
    #[allow(unsafe_code)]
    fn forward_fastest(&self) -> (Vec<f32>, Vec<f32>) {
        #[cfg(target_arch = "x86_64")]
        if avx2::available() {
            // SAFETY: the CPU supports AVX2 and FMA (checked above).
            return unsafe { avx2::forward(self) };
        }
        self.forward()
    }

    /// [`Head::backward`] in the fastest build this CPU runs.
    #[allow(unsafe_code)]
    fn backward_fastest(&self, o: &[f32], go: &[f32], lse: &[f32]) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
        #[cfg(target_arch = "x86_64")]
        if avx2::available() {
            // SAFETY: the CPU supports AVX2 and FMA (checked above).
            return unsafe { avx2::backward(self, o, go, lse) };
        }
        self.backward(o, go, lse)
    }
}

/// The output [B, Nq, H*d] and the log-sum-exp of every (batch, head, query) row.
fn forward(q: &[f32], k: &[f32], v: &[f32], dims: Dims, scale: f32) -> (Vec<f32>, Vec<f32>) {
    let blocks: Vec<(Vec<f32>, Vec<f32>)> = (0..dims.b * dims.heads)
        .into_par_iter()
        .map(|bh| Head::new(q, k, v, dims, bh, scale).forward_fastest())
        .collect();
    let (outputs, lse): (Vec<_>, Vec<_>) = blocks.into_iter().unzip();
    (dims.scatter(&outputs, dims.nq, false), lse.concat())
}

/// The values the backward pass reads, as contiguous slices.
struct Saved<'a> {
    q: &'a [f32],
    k: &'a [f32],
    v: &'a [f32],
    o: &'a [f32],
    go: &'a [f32],
}

/// Gradients of q, k and v given the output, its gradient and the forward pass's row
/// log-sum-exps (`lse`, B*H*Nq).
fn backward(saved: &Saved, lse: &[f32], dims: Dims, scale: f32) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let blocks: Vec<(Vec<f32>, Vec<f32>, Vec<f32>)> = (0..dims.b * dims.heads)
        .into_par_iter()
        .map(|bh| {
            let (b, h) = (bh / dims.heads, bh % dims.heads);
            let (oh, goh) = (dims.gather(saved.o, b, h, dims.nq), dims.gather(saved.go, b, h, dims.nq));
            let rows = &lse[bh * dims.nq..(bh + 1) * dims.nq];
            Head::new(saved.q, saved.k, saved.v, dims, bh, scale).backward_fastest(&oh, &goh, rows)
        })
        .collect();
    let (dq, rest): (Vec<_>, Vec<_>) = blocks.into_iter().map(|(q, k, v)| (q, (k, v))).unzip();
    let (dk, dv): (Vec<_>, Vec<_>) = rest.into_iter().unzip();
    (dims.scatter(&dq, dims.nq, false), dims.scatter(&dk, dims.nk, true), dims.scatter(&dv, dims.nk, true))
}

/// The op (see the module docs).
struct FusedAttention {
    heads: usize,
    /// The row log-sum-exps of the CPU forward pass, for the backward pass.
    lse: std::sync::Mutex<Vec<f32>>,
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
        let (out, lse) = forward(contiguous(s1, l1)?, contiguous(s2, l2)?, contiguous(s3, l3)?, dims, self.scale(dims));
        *self.lse.lock().expect("lse lock") = lse;
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
        let scale = self.scale(dims);
        let (dq, dk, dv) = with_values([q, k, v, out, grad_out], |[q, k, v, o, go]| {
            let mut lse = self.lse.lock().expect("lse lock").clone();
            if lse.len() != dims.b * dims.heads * dims.nq {
                lse = forward(q, k, v, dims, scale).1; // not from this op's CPU forward
            }
            backward(&Saved { q, k, v, o, go }, &lse, dims, scale)
        })?;
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
    q.contiguous()?.apply_op3(&k.contiguous()?, &v.contiguous()?, FusedAttention { heads, lse: Default::default() })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nn::composed_attention;
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
    fn the_portable_passes_equal_the_fastest_ones() {
        let mut rng = Rng::new(7, 3);
        // Head dims compiled as constants (4, 8, 40, 64) and read at run time (5).
        for (nq, nk, d) in [(9, 21, 4), (16, 16, 8), (3, 77, 5), (6, 19, 40), (5, 24, 64)] {
            let dims = Dims { b: 1, nq, nk, heads: 2, d };
            let (q, k, v) = (rng.normals(nq * 2 * d), rng.normals(nk * 2 * d), rng.normals(nk * 2 * d));
            let head = Head::new(&q, &k, &v, dims, 1, 0.3);
            let (portable, fastest) = (head.forward(), head.forward_fastest());
            let close = |a: &[f32], b: &[f32]| a.iter().zip(b).all(|(x, y)| (x - y).abs() <= 1e-5 * (1.0 + x.abs()));
            assert!(close(&portable.0, &fastest.0) && close(&portable.1, &fastest.1), "forward {nq}x{nk}, d {d}");
            let go = rng.normals(nq * d);
            let (a, b) =
                (head.backward(&portable.0, &go, &portable.1), head.backward_fastest(&portable.0, &go, &portable.1));
            assert!(close(&a.0, &b.0) && close(&a.1, &b.1) && close(&a.2, &b.2), "backward {nq}x{nk}, d {d}");
        }
    }

    #[test]
    fn forward_and_gradients_equal_the_composed_attention() {
        let mut rng = Rng::new(1, 2);
        // Cross-attention with fewer keys than one group of lanes, self-attention over 19
        // positions (two full groups and a tail), and 24 keys (groups only); head dim 12 (not a
        // multiple of 8), 3 heads.
        for (nq, nk) in [(10, 7), (19, 19), (5, 24)] {
            let (q, k, v) =
                (random(&mut rng, (2, nq, 36)), random(&mut rng, (2, nk, 36)), random(&mut rng, (2, nk, 36)));
            let w = Tensor::from_vec(rng.normals(2 * nq * 36), (2, nq, 36), &Device::Cpu).unwrap();
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
            assert!(max_diff(&fused.0, &composed.0) < 1e-5, "output, {nq}x{nk}");
            assert!(max_diff(&fused.1, &composed.1) < 1e-5, "dq, {nq}x{nk}");
            assert!(max_diff(&fused.2, &composed.2) < 1e-5, "dk, {nq}x{nk}");
            assert!(max_diff(&fused.3, &composed.3) < 1e-5, "dv, {nq}x{nk}");
        }
        for x in [-80.0f32, -20.0, -1.0, -0.3465, -1e-3, 0.0] {
            let (ours, libm) = (exp_nonpositive(x), x.exp());
            assert!((ours - libm).abs() <= 3.0 * f32::EPSILON * libm, "exp({x}): {ours} vs {libm}");
        }
    }
}
