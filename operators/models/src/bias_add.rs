//! Adding a per-channel bias for f32 on the CPU as one op with its own backward pass.
//!
//! Composed from candle ops, a bias add is a broadcast add whose backward sums the gradient
//! over every dimension but the channel's, on one thread (for the UNet's convolutions and
//! linear layers about a twentieth of a training step, with the other cores idle). Here both
//! passes are split over rayon tasks, and the bias gradient is summed in f64 per channel.
//!
//! Layout: `y` contiguous, seen as [outer, channels, inner] around its channel dimension
//! (`[B, C, H, W]` convolution outputs: outer B, inner H*W; `[rows, C]` linear outputs: outer
//! rows, inner 1).

use candle_core::{CpuStorage, CustomOp2, Layout, Shape, Tensor};
use rayon::prelude::*;

use super::cpu_values::{contiguous, with_values};

/// Values per rayon task, about.
const TASK_VALUES: usize = 16_384;

/// [outer, channels, inner] of `shape` around `channel_dim`.
fn split(shape: &Shape, channel_dim: usize) -> candle_core::Result<(usize, usize, usize)> {
    let dims = shape.dims();
    if channel_dim >= dims.len() {
        candle_core::bail!("bias add: channel dimension {channel_dim} of shape {dims:?}");
    }
    Ok((dims[..channel_dim].iter().product(), dims[channel_dim], dims[channel_dim + 1..].iter().product()))
}

/// The op (see the module docs).
struct BiasAdd {
    channel_dim: usize,
}

impl CustomOp2 for BiasAdd {
    fn name(&self) -> &'static str {
        "fused-bias-add"
    }

    fn cpu_fwd(
        &self,
        ys: &CpuStorage,
        yl: &Layout,
        bs: &CpuStorage,
        bl: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (_, channels, inner) = split(yl.shape(), self.channel_dim)?;
        let (y, bias) = (contiguous(ys, yl)?, contiguous(bs, bl)?);
        if bias.len() != channels {
            candle_core::bail!("bias add: {} biases for {channels} channels", bias.len());
        }
        // Tasks of whole [channels, inner] rows (one or more), each adding the bias row.
        let row = channels * inner;
        let task = row * (TASK_VALUES / row.max(1)).max(1);
        let mut out = vec![0f32; y.len()];
        out.par_chunks_mut(task).zip(y.par_chunks(task)).for_each(|(out, y)| {
            if inner == 1 {
                // [rows, C] (linear layers): the bias row against each row.
                for (out, y) in out.chunks_mut(channels).zip(y.chunks(channels)) {
                    for ((o, &v), &b) in out.iter_mut().zip(y).zip(bias) {
                        *o = v + b;
                    }
                }
            } else {
                // A task starts at a row's start: its `i`-th run of `inner` values is channel i % C.
                for (i, (out, y)) in out.chunks_mut(inner).zip(y.chunks(inner)).enumerate() {
                    let b = bias[i % channels];
                    for (o, &v) in out.iter_mut().zip(y) {
                        *o = v + b;
                    }
                }
            }
        });
        Ok((CpuStorage::F32(out), yl.shape().clone()))
    }

    fn bwd(
        &self,
        y: &Tensor,
        bias: &Tensor,
        _out: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let (_, channels, inner) = split(y.shape(), self.channel_dim)?;
        let row = channels * inner;
        let task = row * (TASK_VALUES / row.max(1)).max(1);
        let sums = with_values([grad], |[grad]| {
            grad.par_chunks(task)
                .map(|rows| {
                    let mut sums = vec![0f64; channels];
                    if inner == 1 {
                        for row in rows.chunks(channels) {
                            for (sum, &v) in sums.iter_mut().zip(row) {
                                *sum += v as f64;
                            }
                        }
                    } else {
                        for (i, run) in rows.chunks(inner).enumerate() {
                            sums[i % channels] += run.iter().map(|&v| v as f64).sum::<f64>();
                        }
                    }
                    sums
                })
                .reduce(
                    || vec![0f64; channels],
                    |mut a, b| {
                        a.iter_mut().zip(b).for_each(|(a, b)| *a += b);
                        a
                    },
                )
        })?;
        let db: Vec<f32> = sums.into_iter().map(|v| v as f32).collect();
        Ok((Some(grad.clone()), Some(Tensor::from_vec(db, bias.shape(), bias.device())?)))
    }
}

/// Whether [`bias_add`] runs as the fused op: f32 on the CPU.
pub fn supported(y: &Tensor, bias: &Tensor) -> bool {
    [y, bias].iter().all(|t| t.device().is_cpu() && t.dtype() == candle_core::DType::F32)
}

/// `y + bias` with `bias` [C] added along dimension `channel_dim` of `y` (C = its size there),
/// differentiable (see the module docs).
///
/// ```
/// use candle_core::{Device, Tensor};
/// use latentflow_models::bias_add::bias_add;
///
/// let y = Tensor::new(&[[[1f32, 2.0], [3.0, 4.0]]], &Device::Cpu)?; // [1, 2 channels, 2]
/// let bias = Tensor::new(&[10f32, 20.0], &Device::Cpu)?;
/// assert_eq!(bias_add(&y, &bias, 1)?.to_vec3::<f32>()?, [[[11.0, 12.0], [23.0, 24.0]]]);
/// # Ok::<(), candle_core::Error>(())
/// ```
pub fn bias_add(y: &Tensor, bias: &Tensor, channel_dim: usize) -> candle_core::Result<Tensor> {
    y.contiguous()?.apply_op2(&bias.contiguous()?, BiasAdd { channel_dim })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::Rng;
    use candle_core::{Device, Var};

    #[test]
    fn outputs_and_gradients_match_the_broadcast_add() {
        let mut rng = Rng::new(9, 0);
        // A convolution's [B, C, H, W] (channel dim 1), a linear layer's [rows, C] (dim 1, inner
        // 1) and [B, tokens, C] (dim 2), with rows spanning several tasks.
        for (shape, channel_dim) in
            [(vec![2, 3, 5, 7], 1), (vec![5000, 8], 1), (vec![3, 77, 40], 2), (vec![1, 1, 1], 1), (vec![2, 9000, 1], 1)]
        {
            let n: usize = shape.iter().product();
            let channels = shape[channel_dim];
            let y = Var::from_vec(rng.normals(n), shape.as_slice(), &Device::Cpu).unwrap();
            let b = Var::from_vec(rng.normals(channels), channels, &Device::Cpu).unwrap();
            let mut view = vec![1; shape.len()];
            view[channel_dim] = channels;
            let fused = bias_add(y.as_tensor(), b.as_tensor(), channel_dim).unwrap();
            let composed = y.as_tensor().broadcast_add(&b.as_tensor().reshape(view.as_slice()).unwrap()).unwrap();
            let same = |a: &Tensor, e: &Tensor, what: &str, tolerance: f32| {
                let (a, e) = (
                    a.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
                    e.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
                );
                for (i, (a, e)) in a.iter().zip(&e).enumerate() {
                    assert!((a - e).abs() <= tolerance * (1.0 + e.abs()), "{shape:?} {what} {i}: {a} vs {e}");
                }
            };
            same(&fused, &composed, "output", 0.0);
            let weights = Tensor::from_vec(rng.normals(n), shape.as_slice(), &Device::Cpu).unwrap();
            let grads = |out: &Tensor| (out * &weights).unwrap().sum_all().unwrap().backward().unwrap();
            let (got, want) = (grads(&fused), grads(&composed));
            for (var, what) in [(&y, "dy"), (&b, "dbias")] {
                same(got.get(var.as_tensor()).unwrap(), want.get(var.as_tensor()).unwrap(), what, 1e-5);
            }
        }
    }
}
