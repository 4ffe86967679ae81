//! The forward diffusion and the training target for a batch with per-sample timesteps, in one
//! pass: `noisy = a x0 + s noise` and `target = noise` (epsilon) or `a noise - s x0` (v), where
//! `a = sqrt(alphas_cumprod[t])` and `s = sqrt(1 - alphas_cumprod[t])` come per sample from the
//! host. Replaces four broadcast kernels and two temporaries per training step.

use crate::KernelError;

/// CPU reference: `x0` and `noise` hold `sqrt_alpha.len()` samples of `per_sample` values.
/// Returns `(noisy, target)`; each product is rounded to f32 before the sum, as the kernel
/// (compiled without FMA contraction) and candle's element-wise ops do.
///
/// ```
/// use latentflow_gpu_kernels::ops::noising::noise_and_target;
/// let (noisy, v) = noise_and_target(&[1.0], &[2.0], &[0.6], &[0.8], 1, true).unwrap();
/// assert_eq!(noisy, vec![0.6 * 1.0 + 0.8 * 2.0]);
/// assert_eq!(v, vec![0.6 * 2.0 - 0.8 * 1.0]);
/// ```
pub fn noise_and_target(
    x0: &[f32],
    noise: &[f32],
    sqrt_alpha: &[f32],
    sqrt_one_minus_alpha: &[f32],
    per_sample: usize,
    v_prediction: bool,
) -> Result<(Vec<f32>, Vec<f32>), KernelError> {
    check(x0.len(), noise.len(), sqrt_alpha.len(), sqrt_one_minus_alpha.len(), per_sample)?;
    let mut noisy = Vec::with_capacity(x0.len());
    let mut target = Vec::with_capacity(x0.len());
    for (i, (&x, &n)) in x0.iter().zip(noise).enumerate() {
        let (a, s) = (sqrt_alpha[i / per_sample], sqrt_one_minus_alpha[i / per_sample]);
        noisy.push(a * x + s * n);
        target.push(if v_prediction { a * n - s * x } else { n });
    }
    Ok((noisy, target))
}

fn check(x0: usize, noise: usize, alpha: usize, one_minus: usize, per_sample: usize) -> Result<(), KernelError> {
    let expected = alpha * per_sample;
    if x0 != expected || noise != expected {
        return Err(KernelError::Shape {
            op: "noise_and_target",
            shape: vec![alpha, per_sample],
            expected,
            found: if x0 != expected { x0 } else { noise },
        });
    }
    if alpha != one_minus {
        return Err(KernelError::Unsupported {
            op: "noise_and_target",
            message: format!("{alpha} sqrt(alpha) coefficients but {one_minus} sqrt(1 - alpha)"),
        });
    }
    Ok(())
}

/// The CUDA kernel: the same as [`noise_and_target`] on device buffers, writing `noisy` and
/// `target`.
#[cfg(feature = "cuda")]
#[allow(clippy::too_many_arguments)]
pub fn noise_and_target_cuda(
    stream: &std::sync::Arc<cudarc::driver::CudaStream>,
    x0: &cudarc::driver::CudaView<'_, f32>,
    noise: &cudarc::driver::CudaView<'_, f32>,
    sqrt_alpha: &cudarc::driver::CudaView<'_, f32>,
    sqrt_one_minus_alpha: &cudarc::driver::CudaView<'_, f32>,
    per_sample: usize,
    v_prediction: bool,
    noisy: &mut cudarc::driver::CudaViewMut<'_, f32>,
    target: &mut cudarc::driver::CudaViewMut<'_, f32>,
) -> Result<(), KernelError> {
    use crate::kernel::{elementwise, function, launched};
    use crate::source::Kernel;
    use cudarc::driver::PushKernelArg;
    check(x0.len(), noise.len(), sqrt_alpha.len(), sqrt_one_minus_alpha.len(), per_sample)?;
    let total = x0.len();
    if noisy.len() != total || target.len() != total {
        return Err(KernelError::Shape {
            op: "noise_and_target",
            shape: vec![sqrt_alpha.len(), per_sample],
            expected: total,
            found: noisy.len().min(target.len()),
        });
    }
    if total == 0 {
        return Ok(());
    }
    let func = function(stream, Kernel::Noising, "noise_and_target_f32")?;
    let (per, all, v) = (per_sample as i64, total as i64, i32::from(v_prediction));
    let mut launch = stream.launch_builder(&func);
    launch.arg(x0).arg(noise).arg(sqrt_alpha).arg(sqrt_one_minus_alpha).arg(noisy).arg(target);
    launch.arg(&per).arg(&all).arg(&v);
    // SAFETY: arguments match `noise_and_target_f32`; every buffer has the sizes checked above.
    #[allow(unsafe_code)]
    launched(unsafe { launch.launch(elementwise(total)) })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn epsilon_target_is_the_noise_and_coefficients_are_per_sample() {
        let (noisy, target) =
            noise_and_target(&[1.0, 1.0, 2.0, 2.0], &[3.0, 4.0, 5.0, 6.0], &[0.5, 0.25], &[0.5, 0.75], 2, false)
                .unwrap();
        assert_eq!(noisy, vec![2.0, 2.5, 4.25, 5.0]);
        assert_eq!(target, vec![3.0, 4.0, 5.0, 6.0]);
    }

    #[test]
    fn sizes_that_disagree_are_refused() {
        assert!(noise_and_target(&[1.0; 3], &[1.0; 4], &[1.0; 2], &[1.0; 2], 2, false).is_err());
        assert!(noise_and_target(&[1.0; 4], &[1.0; 4], &[1.0; 2], &[1.0; 1], 2, false).is_err());
    }
}
