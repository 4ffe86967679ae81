//! Group normalisation (optionally followed by SiLU) for f32 on the CPU as one op with its own
//! backward pass.
//!
//! Composed from candle ops, `silu(group_norm(x) * w + b)` is about a dozen ops, each a pass
//! over the activation with a fresh output buffer, and its backward adds as many again plus
//! single-threaded reductions over the broadcast dimensions. Here the forward is two passes over
//! `x` (statistics, then the normalised, scaled, activated output) and the backward three (the
//! SiLU derivative and the per-group and per-channel sums, then the input gradient), all split
//! over (sample, group) pairs with rayon. The per-group mean and `1/std` are kept from the
//! forward pass for the backward one.
//!
//! Layout: `x` [B, C, ...] contiguous; group `g` of sample `b` is the contiguous run of channels
//! `g*C/G..(g+1)*C/G`, so each (sample, group) pair is one contiguous slice.

use std::sync::Mutex;

use candle_core::{CpuStorage, CustomOp3, Layout, Shape, Tensor};
use rayon::prelude::*;

use super::cpu_values::{contiguous, with_values};

/// The sizes of one call.
#[derive(Clone, Copy, Debug)]
struct Dims {
    channels: usize,
    groups: usize,
    /// Elements per channel (H*W for images).
    spatial: usize,
}

impl Dims {
    fn of(shape: &Shape, groups: usize) -> candle_core::Result<Dims> {
        let dims = shape.dims();
        if dims.len() < 2 || groups == 0 || dims[1] % groups != 0 {
            candle_core::bail!("group norm: {groups} groups over shape {dims:?}");
        }
        Ok(Dims { channels: dims[1], groups, spatial: dims[2..].iter().product() })
    }

    /// Elements in one (sample, group) slice.
    fn group_len(&self) -> usize {
        self.channels / self.groups * self.spatial
    }
}

/// `silu(z)` and its derivative at `z`.
#[inline(always)]
fn silu_and_slope(z: f32) -> (f32, f32) {
    let s = 1.0 / (1.0 + (-z).exp());
    (z * s, s * (1.0 + z * (1.0 - s)))
}

/// Mean and `1/sqrt(var + eps)` of one slice, accumulated in f64.
fn group_statistics(x: &[f32], eps: f64) -> (f32, f32) {
    let n = x.len() as f64;
    let mean = x.iter().map(|&v| v as f64).sum::<f64>() / n;
    let var = x.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / n;
    (mean as f32, (1.0 / (var + eps).sqrt()) as f32)
}

/// The forward pass's (mean, 1/std) per slice of `slice_len` values of `x`, or recomputed when
/// the forward pass did not save them (it ran elsewhere than this op's CPU pass).
fn saved_statistics(
    saved: &Mutex<Vec<(f32, f32)>>,
    x: &Tensor,
    slice_len: usize,
    eps: f64,
) -> candle_core::Result<Vec<(f32, f32)>> {
    let statistics = saved.lock().expect("statistics lock").clone();
    if statistics.len() == x.elem_count() / slice_len {
        return Ok(statistics);
    }
    with_values([x], |[x]| x.par_chunks(slice_len).map(|s| group_statistics(s, eps)).collect())
}

/// The op (see the module docs).
struct GroupNormOp {
    groups: usize,
    eps: f64,
    silu: bool,
    /// (mean, 1/std) per (sample, group), from the forward pass.
    statistics: Mutex<Vec<(f32, f32)>>,
}

impl GroupNormOp {
    /// The per-channel scale and shift after normalisation, `z = (x - mean) * rstd * w + b`,
    /// folded into `z = x * a + c` for channel `channel` of a group with these statistics.
    #[inline(always)]
    fn affine(w: &[f32], b: &[f32], channel: usize, (mean, rstd): (f32, f32)) -> (f32, f32) {
        let a = w[channel] * rstd;
        (a, b[channel] - mean * a)
    }
}

impl CustomOp3 for GroupNormOp {
    fn name(&self) -> &'static str {
        "fused-group-norm"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        ws: &CpuStorage,
        wl: &Layout,
        bs: &CpuStorage,
        bl: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let dims = Dims::of(xl.shape(), self.groups)?;
        let (x, w, b) = (contiguous(xs, xl)?, contiguous(ws, wl)?, contiguous(bs, bl)?);
        let per_group = dims.channels / dims.groups;
        let mut out = vec![0f32; x.len()];
        let statistics: Vec<(f32, f32)> = out
            .par_chunks_mut(dims.group_len())
            .zip(x.par_chunks(dims.group_len()))
            .enumerate()
            .map(|(bg, (out, x))| {
                let stats = group_statistics(x, self.eps);
                let first_channel = (bg % dims.groups) * per_group;
                for (j, (out, x)) in out.chunks_mut(dims.spatial).zip(x.chunks(dims.spatial)).enumerate() {
                    let (a, c) = Self::affine(w, b, first_channel + j, stats);
                    for (o, &v) in out.iter_mut().zip(x) {
                        let z = v * a + c;
                        *o = if self.silu { silu_and_slope(z).0 } else { z };
                    }
                }
                stats
            })
            .collect();
        *self.statistics.lock().expect("statistics lock") = statistics;
        Ok((CpuStorage::F32(out), xl.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        b: &Tensor,
        _out: &Tensor,
        grad_out: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let dims = Dims::of(x.shape(), self.groups)?;
        let statistics = saved_statistics(&self.statistics, x, dims.group_len(), self.eps)?;
        let per_group = dims.channels / dims.groups;
        // Per (sample, group): the input gradient, and per channel sum(dz * xhat) and sum(dz).
        let (dx, sums) = with_values([x, w, b, grad_out], |[x, w_values, b_values, dy]| {
            let mut dx = vec![0f32; x.len()];
            let sums: Vec<Vec<(f64, f64)>> = dx
                .par_chunks_mut(dims.group_len())
                .zip(x.par_chunks(dims.group_len()).zip(dy.par_chunks(dims.group_len())))
                .enumerate()
                .map(|(bg, (dx, (x, dy)))| {
                    let (mean, rstd) = statistics[bg];
                    let first_channel = (bg % dims.groups) * per_group;
                    let mut channel_sums = Vec::with_capacity(per_group);
                    // dx holds dz first (the gradient before the affine scale).
                    let (mut sum_g, mut sum_g_xhat) = (0f64, 0f64);
                    for (j, (dz, (x, dy))) in
                        dx.chunks_mut(dims.spatial).zip(x.chunks(dims.spatial).zip(dy.chunks(dims.spatial))).enumerate()
                    {
                        let channel = first_channel + j;
                        let (a, c) = Self::affine(w_values, b_values, channel, (mean, rstd));
                        let (mut dw, mut db) = (0f32, 0f32);
                        for (dz, (&v, &g)) in dz.iter_mut().zip(x.iter().zip(dy)) {
                            let grad = if self.silu { g * silu_and_slope(v * a + c).1 } else { g };
                            *dz = grad;
                            dw += grad * ((v - mean) * rstd);
                            db += grad;
                        }
                        let (dw, db) = (dw as f64, db as f64);
                        channel_sums.push((dw, db));
                        let wc = w_values[channel] as f64;
                        sum_g += db * wc;
                        sum_g_xhat += dw * wc;
                    }
                    // dx = rstd * (g - mean(g) - xhat * mean(g * xhat)), g = dz * w.
                    let n = dx.len() as f64;
                    let (mean_g, mean_g_xhat) = ((sum_g / n) as f32, (sum_g_xhat / n) as f32);
                    for (j, (dx, x)) in dx.chunks_mut(dims.spatial).zip(x.chunks(dims.spatial)).enumerate() {
                        let wc = w_values[first_channel + j];
                        for (d, &v) in dx.iter_mut().zip(x) {
                            let xhat = (v - mean) * rstd;
                            *d = rstd * (*d * wc - mean_g - xhat * mean_g_xhat);
                        }
                    }
                    channel_sums
                })
                .collect();
            (dx, sums)
        })?;
        // Channel sums over the samples.
        let (mut dw, mut db) = (vec![0f64; dims.channels], vec![0f64; dims.channels]);
        for (bg, channel_sums) in sums.iter().enumerate() {
            let first_channel = (bg % dims.groups) * per_group;
            for (j, &(w_sum, b_sum)) in channel_sums.iter().enumerate() {
                dw[first_channel + j] += w_sum;
                db[first_channel + j] += b_sum;
            }
        }
        let to_tensor = |values: Vec<f64>, like: &Tensor| {
            Tensor::from_vec(values.into_iter().map(|v| v as f32).collect::<Vec<f32>>(), like.shape(), like.device())
        };
        Ok((Some(Tensor::from_vec(dx, x.shape(), x.device())?), Some(to_tensor(dw, w)?), Some(to_tensor(db, b)?)))
    }
}

/// Layer normalisation over the last dimension: rows are handled in blocks (one rayon task
/// per block, not per row), and each block sums its own weight and bias gradients.
struct LayerNormOp {
    eps: f64,
    /// (mean, 1/std) per row, from the forward pass.
    statistics: Mutex<Vec<(f32, f32)>>,
}

/// Rows per rayon task: about 16 K values.
fn rows_per_task(dim: usize) -> usize {
    (16_384 / dim.max(1)).max(1)
}

impl CustomOp3 for LayerNormOp {
    fn name(&self) -> &'static str {
        "fused-layer-norm"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        ws: &CpuStorage,
        wl: &Layout,
        bs: &CpuStorage,
        bl: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (x, w, b) = (contiguous(xs, xl)?, contiguous(ws, wl)?, contiguous(bs, bl)?);
        let dim = w.len();
        let block = rows_per_task(dim) * dim;
        let mut out = vec![0f32; x.len()];
        let statistics: Vec<Vec<(f32, f32)>> = out
            .par_chunks_mut(block)
            .zip(x.par_chunks(block))
            .map(|(out, x)| {
                let mut stats = Vec::with_capacity(x.len() / dim);
                for (out, x) in out.chunks_mut(dim).zip(x.chunks(dim)) {
                    let (mean, rstd) = group_statistics(x, self.eps);
                    for ((o, &v), (&w, &b)) in out.iter_mut().zip(x).zip(w.iter().zip(b)) {
                        *o = (v - mean) * rstd * w + b;
                    }
                    stats.push((mean, rstd));
                }
                stats
            })
            .collect();
        *self.statistics.lock().expect("statistics lock") = statistics.concat();
        Ok((CpuStorage::F32(out), xl.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        b: &Tensor,
        _out: &Tensor,
        grad_out: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let dim = w.elem_count();
        let block_rows = rows_per_task(dim);
        let statistics = saved_statistics(&self.statistics, x, dim, self.eps)?;
        let (dx, sums) = with_values([x, w, grad_out], |[x, w_values, dy]| {
            let mut dx = vec![0f32; x.len()];
            let sums: Vec<(Vec<f32>, Vec<f32>)> = dx
                .par_chunks_mut(block_rows * dim)
                .zip(x.par_chunks(block_rows * dim).zip(dy.par_chunks(block_rows * dim)))
                .zip(statistics.par_chunks(block_rows))
                .map(|((dx, (x, dy)), stats)| {
                    let (mut dw, mut db) = (vec![0f32; dim], vec![0f32; dim]);
                    for ((dx, (x, dy)), &(mean, rstd)) in
                        dx.chunks_mut(dim).zip(x.chunks(dim).zip(dy.chunks(dim))).zip(stats)
                    {
                        // dx = rstd * (g - mean(g) - xhat * mean(g * xhat)), g = dy * w.
                        let (mut sum_g, mut sum_g_xhat) = (0f32, 0f32);
                        for c in 0..dim {
                            let xhat = (x[c] - mean) * rstd;
                            let g = dy[c] * w_values[c];
                            dw[c] += dy[c] * xhat;
                            db[c] += dy[c];
                            sum_g += g;
                            sum_g_xhat += g * xhat;
                        }
                        let n = dim as f32;
                        let (mean_g, mean_g_xhat) = (sum_g / n, sum_g_xhat / n);
                        for c in 0..dim {
                            let xhat = (x[c] - mean) * rstd;
                            dx[c] = rstd * (dy[c] * w_values[c] - mean_g - xhat * mean_g_xhat);
                        }
                    }
                    (dw, db)
                })
                .collect();
            (dx, sums)
        })?;
        let (mut dw, mut db) = (vec![0f32; dim], vec![0f32; dim]);
        for (block_w, block_b) in &sums {
            for c in 0..dim {
                dw[c] += block_w[c];
                db[c] += block_b[c];
            }
        }
        Ok((
            Some(Tensor::from_vec(dx, x.shape(), x.device())?),
            Some(Tensor::from_vec(dw, w.shape(), w.device())?),
            Some(Tensor::from_vec(db, b.shape(), b.device())?),
        ))
    }
}

/// `layer_norm(x) * weight + bias` over the last dimension of `x`, statistics in f64, with a
/// fused backward pass (f32 on the CPU).
///
/// ```
/// use candle_core::{Device, Tensor};
/// use latentflow_models::fused_norm::layer_norm;
///
/// let x = Tensor::new(&[[1f32, 3.0], [2.0, 2.0]], &Device::Cpu)?;
/// let (w, b) = (Tensor::new(&[2f32, 1.0], &Device::Cpu)?, Tensor::new(&[0f32, 1.0], &Device::Cpu)?);
/// let y = layer_norm(&x, &w, &b, 1e-12)?.to_vec2::<f32>()?;
/// assert_eq!(y, [[-2.0, 2.0], [0.0, 1.0]]); // a constant row normalises to zero: only the bias
/// # Ok::<(), candle_core::Error>(())
/// ```
pub fn layer_norm(x: &Tensor, weight: &Tensor, bias: &Tensor, eps: f64) -> candle_core::Result<Tensor> {
    let op = LayerNormOp { eps, statistics: Mutex::new(Vec::new()) };
    x.contiguous()?.apply_op3(&weight.contiguous()?, &bias.contiguous()?, op)
}

/// True when [`group_norm`] can run these inputs: f32 tensors on the CPU.
pub fn supported(x: &Tensor, weight: &Tensor, bias: &Tensor) -> bool {
    [x, weight, bias].iter().all(|t| t.device().is_cpu() && t.dtype() == candle_core::DType::F32)
}

/// `group_norm(x) * weight + bias` over `groups` groups of `x` [B, C, ...], then SiLU when
/// `silu`, with statistics in f64 and a fused backward pass.
///
/// ```
/// use candle_core::{Device, Tensor};
/// use latentflow_models::fused_norm::group_norm;
///
/// let x = Tensor::new(&[[[1f32, 3.0], [5.0, 7.0]]], &Device::Cpu)?; // [1, 2, 2]: one group
/// let (w, b) = (Tensor::new(&[1f32, 1.0], &Device::Cpu)?, Tensor::new(&[0f32, 0.0], &Device::Cpu)?);
/// let y = group_norm(&x, &w, &b, 1, 0.0, false)?.flatten_all()?.to_vec1::<f32>()?;
/// let expected = [-1.3416408f32, -0.4472136, 0.4472136, 1.3416408];
/// assert!(y.iter().zip(expected).all(|(a, b)| (a - b).abs() < 1e-6));
/// # Ok::<(), candle_core::Error>(())
/// ```
pub fn group_norm(
    x: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    groups: usize,
    eps: f64,
    silu: bool,
) -> candle_core::Result<Tensor> {
    let op = GroupNormOp { groups, eps, silu, statistics: Mutex::new(Vec::new()) };
    x.contiguous()?.apply_op3(&weight.contiguous()?, &bias.contiguous()?, op)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nn::{composed_group_norm, composed_layer_norm, silu};
    use crate::rng::Rng;
    use candle_core::{Device, Var};

    fn composed(x: &Tensor, w: &Tensor, b: &Tensor, groups: usize, eps: f64, with_silu: bool) -> Tensor {
        let y = composed_group_norm(x, w, b, groups, eps).unwrap();
        if with_silu {
            silu(&y).unwrap()
        } else {
            y
        }
    }

    #[test]
    fn layer_norm_and_its_gradients_equal_the_composed_one() {
        let mut rng = Rng::new(5, 2);
        // 37 rows of 12 (blocks of rows end mid-way) and one long row.
        for shape in [vec![37, 12], vec![2, 3, 2000]] {
            let dim = *shape.last().unwrap();
            let mut random = |shape: &[usize], scale: f32, shift: f32| {
                let values: Vec<f32> =
                    rng.normals(shape.iter().product()).into_iter().map(|v| v * scale + shift).collect();
                Var::from_tensor(&Tensor::from_vec(values, shape, &Device::Cpu).unwrap()).unwrap()
            };
            let x = random(&shape, 3.0, -1.0);
            let (w, b) = (random(&[dim], 0.5, 1.0), random(&[dim], 0.5, 0.0));
            let upstream = random(&shape, 1.0, 0.0).as_tensor().detach();
            let run = |fused: bool| {
                let y = if fused {
                    layer_norm(x.as_tensor(), w.as_tensor(), b.as_tensor(), 1e-5).unwrap()
                } else {
                    composed_layer_norm(x.as_tensor(), w.as_tensor(), b.as_tensor(), 1e-5).unwrap()
                };
                let grads = (&y * &upstream).unwrap().sum_all().unwrap().backward().unwrap();
                let g = |v: &Var| grads.get(v.as_tensor()).unwrap().clone();
                (y, g(&x), g(&w), g(&b))
            };
            let (fused, reference) = (run(true), run(false));
            assert!(max_diff(&fused.0, &reference.0) < 1e-5, "output {shape:?}");
            assert!(max_diff(&fused.1, &reference.1) < 1e-4, "dx {shape:?}");
            assert!(max_diff(&fused.2, &reference.2) < 1e-3, "dw {shape:?}");
            assert!(max_diff(&fused.3, &reference.3) < 1e-3, "db {shape:?}");
        }
    }

    fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
        (a - b).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar().unwrap()
    }

    #[test]
    fn forward_and_gradients_equal_the_composed_group_norm() {
        let mut rng = Rng::new(3, 1);
        let mut random = |shape: &[usize], scale: f32, shift: f32| {
            let values: Vec<f32> = rng.normals(shape.iter().product()).into_iter().map(|v| v * scale + shift).collect();
            Var::from_tensor(&Tensor::from_vec(values, shape, &Device::Cpu).unwrap()).unwrap()
        };
        // 6 channels in 3 groups over 5x7 positions (not a multiple of 8), and a 3-D input.
        for (shape, groups) in [(vec![2, 6, 5, 7], 3), (vec![3, 4, 9], 2), (vec![1, 8, 4, 4], 8)] {
            for with_silu in [false, true] {
                let x = random(&shape, 2.0, 0.5);
                let (w, b) = (random(&shape[1..2], 0.5, 1.0), random(&shape[1..2], 0.5, 0.0));
                let upstream = random(&shape, 1.0, 0.0).as_tensor().detach();
                let run = |fused: bool| {
                    let y = if fused {
                        group_norm(x.as_tensor(), w.as_tensor(), b.as_tensor(), groups, 1e-5, with_silu).unwrap()
                    } else {
                        composed(x.as_tensor(), w.as_tensor(), b.as_tensor(), groups, 1e-5, with_silu)
                    };
                    let grads = (&y * &upstream).unwrap().sum_all().unwrap().backward().unwrap();
                    let g = |v: &Var| grads.get(v.as_tensor()).unwrap().clone();
                    (y, g(&x), g(&w), g(&b))
                };
                let (fused, reference) = (run(true), run(false));
                let what = format!("shape {shape:?}, silu {with_silu}");
                assert!(max_diff(&fused.0, &reference.0) < 1e-5, "output, {what}");
                assert!(max_diff(&fused.1, &reference.1) < 1e-4, "dx, {what}");
                assert!(max_diff(&fused.2, &reference.2) < 1e-4, "dw, {what}");
                assert!(max_diff(&fused.3, &reference.3) < 1e-4, "db, {what}");
            }
        }
    }
}
