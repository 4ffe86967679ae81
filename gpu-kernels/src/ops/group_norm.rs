//! GroupNorm, optionally followed by SiLU (the pair that opens every ResNet block), forward and
//! backward: one pass per (sample, group) each way, and the backward recomputes the group's
//! statistics from the input instead of keeping them or the normalised values.

use crate::KernelError;

/// The sizes: `x` is `[batch, channels, spatial]`, normalised over `groups` groups of channels.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GroupNormShape {
    /// Samples.
    pub batch: usize,
    /// Channels (a multiple of `groups`).
    pub channels: usize,
    /// Values per channel (height x width).
    pub spatial: usize,
    /// Groups.
    pub groups: usize,
}

impl GroupNormShape {
    fn len(&self) -> usize {
        self.batch * self.channels * self.spatial
    }

    fn check(&self, x: usize, gamma: usize, beta: usize) -> Result<(), KernelError> {
        self.check_len("group_norm", x)?;
        if self.groups == 0 || self.channels % self.groups != 0 || gamma != self.channels || beta != self.channels {
            return Err(KernelError::Unsupported {
                op: "group_norm",
                message: format!(
                    "{} channels in {} groups with {gamma} scales and {beta} shifts",
                    self.channels, self.groups
                ),
            });
        }
        Ok(())
    }

    fn check_len(&self, op: &'static str, found: usize) -> Result<(), KernelError> {
        if found == self.len() {
            return Ok(());
        }
        Err(KernelError::Shape {
            op,
            shape: vec![self.batch, self.channels, self.spatial],
            expected: self.len(),
            found,
        })
    }

    fn group_len(&self) -> usize {
        self.channels / self.groups * self.spatial
    }
}

/// Mean and `1/sqrt(var + eps)` of one group (sums in f64, biased variance).
fn stats(xs: &[f32], eps: f32) -> (f32, f32) {
    let n = xs.len() as f64;
    let mean = (xs.iter().map(|&v| f64::from(v)).sum::<f64>() / n) as f32;
    let var = xs.iter().map(|&v| f64::from(v - mean).powi(2)).sum::<f64>() / n;
    (mean, 1.0 / (var as f32 + eps).sqrt())
}

fn sigmoid(z: f32) -> f32 {
    1.0 / (1.0 + (-z).exp())
}

/// CPU reference: `(x - mean) / sqrt(var + eps) * gamma + beta` per group, with the biased
/// variance, then SiLU when `silu`, in f32 (sums in f64).
///
/// ```
/// use latentflow_gpu_kernels::ops::group_norm::{group_norm, GroupNormShape};
/// let shape = GroupNormShape { batch: 1, channels: 2, spatial: 1, groups: 1 };
/// let y = group_norm(&[-1.0, 1.0], &[1.0, 1.0], &[0.0, 0.0], shape, 0.0, true).unwrap();
/// let silu = |v: f32| v / (1.0 + (-v).exp());
/// assert!((y[0] - silu(-1.0)).abs() < 1e-6 && (y[1] - silu(1.0)).abs() < 1e-6);
/// ```
pub fn group_norm(
    x: &[f32],
    gamma: &[f32],
    beta: &[f32],
    shape: GroupNormShape,
    eps: f32,
    silu: bool,
) -> Result<Vec<f32>, KernelError> {
    shape.check(x.len(), gamma.len(), beta.len())?;
    let per_group = shape.channels / shape.groups;
    let mut y = vec![0f32; x.len()];
    for (g_index, (xs, ys)) in x.chunks_exact(shape.group_len()).zip(y.chunks_exact_mut(shape.group_len())).enumerate()
    {
        let (mean, rstd) = stats(xs, eps);
        let first_channel = (g_index % shape.groups) * per_group;
        for (i, (&v, out)) in xs.iter().zip(ys.iter_mut()).enumerate() {
            let c = first_channel + i / shape.spatial;
            let z = (v - mean) * rstd * gamma[c] + beta[c];
            *out = if silu { z * sigmoid(z) } else { z };
        }
    }
    Ok(y)
}

/// The gradients of [`group_norm`]: `dx` (as `x`), and `dgamma`, `dbeta` per sample and channel
/// (`[batch, channels]`, to be summed over the batch).
#[derive(Clone, Debug, PartialEq)]
pub struct GroupNormGrads {
    /// Gradient of the input.
    pub dx: Vec<f32>,
    /// Gradient of the scales, per sample: `[batch, channels]`.
    pub dgamma: Vec<f32>,
    /// Gradient of the shifts, per sample: `[batch, channels]`.
    pub dbeta: Vec<f32>,
}

/// CPU reference of the backward pass: with `xhat` the normalised input, `z = xhat gamma + beta`
/// and `dz = dy silu'(z)` (`dy` without SiLU), `dgamma = sum dz xhat`, `dbeta = sum dz`, and
/// `dx = rstd (dz gamma - mean(dz gamma) - xhat mean(dz gamma xhat))` over each group.
///
/// ```
/// use latentflow_gpu_kernels::ops::group_norm::{group_norm_backward, GroupNormShape};
/// // A constant gradient through a plain normalisation moves no input (the mean absorbs it).
/// let shape = GroupNormShape { batch: 1, channels: 1, spatial: 3, groups: 1 };
/// let g = group_norm_backward(&[1.0, 2.0, 4.0], &[1.0; 3], &[2.0], &[0.0], shape, 1e-6, false).unwrap();
/// assert!(g.dx.iter().all(|v| v.abs() < 1e-5) && (g.dbeta[0] - 3.0).abs() < 1e-6);
/// ```
#[allow(clippy::too_many_arguments)]
pub fn group_norm_backward(
    x: &[f32],
    dy: &[f32],
    gamma: &[f32],
    beta: &[f32],
    shape: GroupNormShape,
    eps: f32,
    silu: bool,
) -> Result<GroupNormGrads, KernelError> {
    shape.check(x.len(), gamma.len(), beta.len())?;
    shape.check_len("group_norm_backward", dy.len())?;
    let (per_group, n) = (shape.channels / shape.groups, shape.group_len());
    let mut grads = GroupNormGrads {
        dx: vec![0f32; x.len()],
        dgamma: vec![0f32; shape.batch * shape.channels],
        dbeta: vec![0f32; shape.batch * shape.channels],
    };
    for (g_index, (xs, dys)) in x.chunks_exact(n).zip(dy.chunks_exact(n)).enumerate() {
        let (mean, rstd) = stats(xs, eps);
        let (b, first_channel) = (g_index / shape.groups, (g_index % shape.groups) * per_group);
        let channel = |i: usize| first_channel + i / shape.spatial;
        let xhat: Vec<f32> = xs.iter().map(|&v| (v - mean) * rstd).collect();
        let dz: Vec<f32> = (0..n)
            .map(|i| {
                let c = channel(i);
                let z = xhat[i] * gamma[c] + beta[c];
                if silu {
                    let s = sigmoid(z);
                    dys[i] * s * (1.0 + z * (1.0 - s))
                } else {
                    dys[i]
                }
            })
            .collect();
        let (mut sum_g, mut sum_gx) = (0f64, 0f64);
        for i in 0..n {
            let c = channel(i);
            grads.dgamma[b * shape.channels + c] += dz[i] * xhat[i];
            grads.dbeta[b * shape.channels + c] += dz[i];
            sum_g += f64::from(dz[i] * gamma[c]);
            sum_gx += f64::from(dz[i] * gamma[c] * xhat[i]);
        }
        let (mean_g, mean_gx) = ((sum_g / n as f64) as f32, (sum_gx / n as f64) as f32);
        for i in 0..n {
            let c = channel(i);
            grads.dx[g_index * n + i] = rstd * (dz[i] * gamma[c] - mean_g - xhat[i] * mean_gx);
        }
    }
    Ok(grads)
}

#[cfg(feature = "cuda")]
pub use gpu::{group_norm_backward_cuda, group_norm_cuda};

#[cfg(feature = "cuda")]
mod gpu {
    use std::sync::Arc;

    use cudarc::driver::{CudaStream, CudaView, CudaViewMut, DeviceRepr, LaunchConfig, PushKernelArg};

    use super::GroupNormShape;
    use crate::kernel::{function, launched};
    use crate::source::Kernel;
    use crate::KernelError;

    /// One block of 256 threads (GN_THREADS) per (sample, group).
    fn config(shape: GroupNormShape) -> LaunchConfig {
        LaunchConfig {
            grid_dim: ((shape.batch * shape.groups) as u32, 1, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        }
    }

    /// The kernel: [`super::group_norm`] on device buffers (`x`, `y` f32 or bf16; `gamma`, `beta`
    /// f32).
    #[allow(clippy::too_many_arguments)]
    pub fn group_norm_cuda<T: crate::Element + DeviceRepr>(
        stream: &Arc<CudaStream>,
        x: &CudaView<'_, T>,
        gamma: &CudaView<'_, f32>,
        beta: &CudaView<'_, f32>,
        shape: GroupNormShape,
        eps: f32,
        silu: bool,
        y: &mut CudaViewMut<'_, T>,
    ) -> Result<(), KernelError> {
        shape.check(x.len(), gamma.len(), beta.len())?;
        shape.check_len("group_norm output", y.len())?;
        if x.is_empty() {
            return Ok(());
        }
        let func = function(stream, Kernel::GroupNorm, &format!("group_norm_forward_{}", T::NAME))?;
        let (channels, spatial, groups, silu) =
            (shape.channels as i32, shape.spatial as i64, shape.groups as i32, i32::from(silu));
        let mut launch = stream.launch_builder(&func);
        launch.arg(x).arg(gamma).arg(beta).arg(y).arg(&channels).arg(&spatial).arg(&groups).arg(&eps).arg(&silu);
        // SAFETY: arguments match `group_norm_forward_<T>`; sizes checked.
        #[allow(unsafe_code)]
        launched(unsafe { launch.launch(config(shape)) })
    }

    /// The kernel: [`super::group_norm_backward`] on device buffers; `dgamma` and `dbeta` are
    /// f32 `[batch, channels]` partial sums.
    #[allow(clippy::too_many_arguments)]
    pub fn group_norm_backward_cuda<T: crate::Element + DeviceRepr>(
        stream: &Arc<CudaStream>,
        x: &CudaView<'_, T>,
        dy: &CudaView<'_, T>,
        gamma: &CudaView<'_, f32>,
        beta: &CudaView<'_, f32>,
        shape: GroupNormShape,
        eps: f32,
        silu: bool,
        dx: &mut CudaViewMut<'_, T>,
        dgamma: &mut CudaViewMut<'_, f32>,
        dbeta: &mut CudaViewMut<'_, f32>,
    ) -> Result<(), KernelError> {
        shape.check(x.len(), gamma.len(), beta.len())?;
        shape.check_len("group_norm_backward dy", dy.len())?;
        shape.check_len("group_norm_backward dx", dx.len())?;
        let per_sample = shape.batch * shape.channels;
        for found in [dgamma.len(), dbeta.len()] {
            if found != per_sample {
                return Err(KernelError::Shape {
                    op: "group_norm_backward parameter gradients",
                    shape: vec![shape.batch, shape.channels],
                    expected: per_sample,
                    found,
                });
            }
        }
        if x.is_empty() {
            return Ok(());
        }
        let func = function(stream, Kernel::GroupNorm, &format!("group_norm_backward_{}", T::NAME))?;
        let (channels, spatial, groups, silu) =
            (shape.channels as i32, shape.spatial as i64, shape.groups as i32, i32::from(silu));
        let mut launch = stream.launch_builder(&func);
        launch.arg(x).arg(dy).arg(gamma).arg(beta).arg(dx).arg(dgamma).arg(dbeta);
        launch.arg(&channels).arg(&spatial).arg(&groups).arg(&eps).arg(&silu);
        // SAFETY: arguments match `group_norm_backward_<T>`; sizes checked.
        #[allow(unsafe_code)]
        launched(unsafe { launch.launch(config(shape)) })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_group_is_normalised_on_its_own() {
        let shape = GroupNormShape { batch: 1, channels: 2, spatial: 2, groups: 2 };
        // Group 0 is [0, 2], group 1 is [10, 30]: both normalise to [-1, 1].
        let y = group_norm(&[0.0, 2.0, 10.0, 30.0], &[1.0, 2.0], &[0.0, 0.5], shape, 0.0, true).unwrap();
        let silu = |v: f32| v / (1.0 + (-v).exp());
        let want = [silu(-1.0), silu(1.0), silu(-2.0 + 0.5), silu(2.0 + 0.5)];
        for (a, b) in y.iter().zip(want) {
            assert!((a - b).abs() < 1e-6, "{y:?}");
        }
    }

    #[test]
    fn channels_must_split_into_groups() {
        let shape = GroupNormShape { batch: 1, channels: 3, spatial: 1, groups: 2 };
        assert!(group_norm(&[0.0; 3], &[1.0; 3], &[0.0; 3], shape, 1e-5, false).is_err());
    }

    /// The backward reference against central differences of the forward one (in f64 terms:
    /// small sizes, a loose step), with and without SiLU.
    #[test]
    fn backward_matches_finite_differences() {
        let shape = GroupNormShape { batch: 2, channels: 4, spatial: 3, groups: 2 };
        let n = shape.len();
        let x: Vec<f32> = (0..n).map(|i| ((i * 37 % 23) as f32 / 7.0) - 1.5).collect();
        let dy: Vec<f32> = (0..n).map(|i| ((i * 11 % 13) as f32 / 6.0) - 1.0).collect();
        let (gamma, beta) = ([0.5, -1.5, 2.0, 1.0], [0.1, 0.0, -0.3, 0.7]);
        let eps = 1e-5;
        for silu in [false, true] {
            let loss = |x: &[f32], gamma: &[f32], beta: &[f32]| -> f64 {
                let y = group_norm(x, gamma, beta, shape, eps, silu).unwrap();
                y.iter().zip(&dy).map(|(a, b)| f64::from(*a) * f64::from(*b)).sum()
            };
            let g = group_norm_backward(&x, &dy, &gamma, &beta, shape, eps, silu).unwrap();
            let h = 1e-2f32;
            for i in 0..n {
                let (mut up, mut down) = (x.clone(), x.clone());
                up[i] += h;
                down[i] -= h;
                let numeric = (loss(&up, &gamma, &beta) - loss(&down, &gamma, &beta)) / (2.0 * f64::from(h));
                assert!((numeric as f32 - g.dx[i]).abs() < 2e-2, "silu {silu} dx[{i}]: {numeric} vs {}", g.dx[i]);
            }
            for c in 0..4 {
                let total = |v: &[f32]| (0..shape.batch).map(|b| v[b * 4 + c]).sum::<f32>();
                let (mut up, mut down) = (gamma, gamma);
                up[c] += h;
                down[c] -= h;
                let numeric = (loss(&x, &up, &beta) - loss(&x, &down, &beta)) / (2.0 * f64::from(h));
                assert!((numeric as f32 - total(&g.dgamma)).abs() < 2e-2, "silu {silu} dgamma[{c}]");
                let (mut up, mut down) = (beta, beta);
                up[c] += h;
                down[c] -= h;
                let numeric = (loss(&x, &gamma, &up) - loss(&x, &gamma, &down)) / (2.0 * f64::from(h));
                assert!((numeric as f32 - total(&g.dbeta)).abs() < 2e-2, "silu {silu} dbeta[{c}]");
            }
        }
    }
}
