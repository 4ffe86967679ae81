//! GroupNorm then SiLU in one pass (the pair that opens every ResNet block), for inference:
//! encoding with the VAE and sampling previews. Training keeps candle's differentiable ops.

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
    fn check(&self, x: usize, gamma: usize, beta: usize) -> Result<(), KernelError> {
        let expected = self.batch * self.channels * self.spatial;
        if x != expected {
            return Err(KernelError::Shape {
                op: "group_norm_silu",
                shape: vec![self.batch, self.channels, self.spatial],
                expected,
                found: x,
            });
        }
        if self.groups == 0 || self.channels % self.groups != 0 || gamma != self.channels || beta != self.channels {
            return Err(KernelError::Unsupported {
                op: "group_norm_silu",
                message: format!(
                    "{} channels in {} groups with {gamma} scales and {beta} shifts",
                    self.channels, self.groups
                ),
            });
        }
        Ok(())
    }
}

/// CPU reference: `silu((x - mean) / sqrt(var + eps) * gamma + beta)` per group, with the
/// biased variance, in f32 (sums in f64).
///
/// ```
/// use latentflow_gpu_kernels::ops::group_norm_silu::{group_norm_silu, GroupNormShape};
/// let shape = GroupNormShape { batch: 1, channels: 2, spatial: 1, groups: 1 };
/// let y = group_norm_silu(&[-1.0, 1.0], &[1.0, 1.0], &[0.0, 0.0], shape, 0.0).unwrap();
/// let silu = |v: f32| v / (1.0 + (-v).exp());
/// assert!((y[0] - silu(-1.0)).abs() < 1e-6 && (y[1] - silu(1.0)).abs() < 1e-6);
/// ```
pub fn group_norm_silu(
    x: &[f32],
    gamma: &[f32],
    beta: &[f32],
    shape: GroupNormShape,
    eps: f32,
) -> Result<Vec<f32>, KernelError> {
    shape.check(x.len(), gamma.len(), beta.len())?;
    let per_group = shape.channels / shape.groups;
    let group_len = per_group * shape.spatial;
    let mut y = vec![0f32; x.len()];
    for (g_index, (xs, ys)) in x.chunks_exact(group_len).zip(y.chunks_exact_mut(group_len)).enumerate() {
        let mean = (xs.iter().map(|&v| f64::from(v)).sum::<f64>() / group_len as f64) as f32;
        let var = xs.iter().map(|&v| f64::from(v - mean).powi(2)).sum::<f64>() / group_len as f64;
        let rstd = 1.0 / (var as f32 + eps).sqrt();
        let first_channel = (g_index % shape.groups) * per_group;
        for (i, (&v, out)) in xs.iter().zip(ys.iter_mut()).enumerate() {
            let c = first_channel + i / shape.spatial;
            let z = (v - mean) * rstd * gamma[c] + beta[c];
            *out = z / (1.0 + (-z).exp());
        }
    }
    Ok(y)
}

/// The CUDA kernel: [`group_norm_silu`] on device buffers (`x`, `y` f32 or bf16; `gamma`,
/// `beta` f32), one block per (sample, group).
#[cfg(feature = "cuda")]
#[allow(clippy::too_many_arguments)]
pub fn group_norm_silu_cuda<T: crate::Element + cudarc::driver::DeviceRepr>(
    stream: &std::sync::Arc<cudarc::driver::CudaStream>,
    x: &cudarc::driver::CudaView<'_, T>,
    gamma: &cudarc::driver::CudaView<'_, f32>,
    beta: &cudarc::driver::CudaView<'_, f32>,
    shape: GroupNormShape,
    eps: f32,
    y: &mut cudarc::driver::CudaViewMut<'_, T>,
) -> Result<(), KernelError> {
    use crate::kernel::{function, launched};
    use crate::source::Kernel;
    use cudarc::driver::{LaunchConfig, PushKernelArg};
    shape.check(x.len(), gamma.len(), beta.len())?;
    if y.len() != x.len() {
        return Err(KernelError::Shape {
            op: "group_norm_silu",
            shape: vec![shape.batch, shape.channels, shape.spatial],
            expected: x.len(),
            found: y.len(),
        });
    }
    if x.is_empty() {
        return Ok(());
    }
    let func = function(stream, Kernel::GroupNormSilu, &format!("group_norm_silu_{}", T::NAME))?;
    let (channels, spatial, groups) = (shape.channels as i32, shape.spatial as i64, shape.groups as i32);
    let mut launch = stream.launch_builder(&func);
    launch.arg(x).arg(gamma).arg(beta).arg(y).arg(&channels).arg(&spatial).arg(&groups).arg(&eps);
    let blocks = (shape.batch * shape.groups) as u32;
    let config = LaunchConfig { grid_dim: (blocks, 1, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 };
    // SAFETY: arguments match `group_norm_silu_<T>` (GN_THREADS = 256 threads); sizes checked.
    #[allow(unsafe_code)]
    launched(unsafe { launch.launch(config) })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_group_is_normalised_on_its_own() {
        let shape = GroupNormShape { batch: 1, channels: 2, spatial: 2, groups: 2 };
        // Group 0 is [0, 2], group 1 is [10, 30]: both normalise to [-1, 1].
        let y = group_norm_silu(&[0.0, 2.0, 10.0, 30.0], &[1.0, 2.0], &[0.0, 0.5], shape, 0.0).unwrap();
        let silu = |v: f32| v / (1.0 + (-v).exp());
        let want = [silu(-1.0), silu(1.0), silu(-2.0 + 0.5), silu(2.0 + 0.5)];
        for (a, b) in y.iter().zip(want) {
            assert!((a - b).abs() < 1e-6, "{y:?}");
        }
    }

    #[test]
    fn channels_must_split_into_groups() {
        let shape = GroupNormShape { batch: 1, channels: 3, spatial: 1, groups: 2 };
        assert!(group_norm_silu(&[0.0; 3], &[1.0; 3], &[0.0; 3], shape, 1e-5).is_err());
    }
}
