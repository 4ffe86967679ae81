//! AdamW over every parameter in one launch (multi-tensor apply) with torch.optim.AdamW's
//! operation order in f32, f32 master weights and an optional bf16 working copy written in the
//! same pass.

use crate::KernelError;

/// The per-step scalars, computed in f64 as Python does and rounded to f32 where they meet a
/// tensor.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AdamWScalars {
    /// `1 - lr * weight_decay`.
    pub decay_factor: f32,
    /// `1 - beta1` (the lerp weight).
    pub one_minus_beta1: f32,
    /// `beta2`.
    pub beta2: f32,
    /// `1 - beta2`.
    pub one_minus_beta2: f32,
    /// `-lr / (1 - beta1^step)`.
    pub neg_step_size: f32,
    /// `sqrt(1 - beta2^step)`.
    pub bias_correction2_sqrt: f32,
    /// `eps`.
    pub eps: f32,
    /// What each gradient is multiplied by first (the clipping coefficient; 1 without).
    pub grad_scale: f32,
}

impl AdamWScalars {
    /// The scalars of optimizer step `step` (1-based).
    ///
    /// ```
    /// use latentflow_gpu_kernels::ops::adamw::AdamWScalars;
    /// let s = AdamWScalars::new(1e-3, 0.9, 0.999, 1e-8, 0.01, 1);
    /// assert_eq!(s.neg_step_size, (-1e-3f64 / (1.0 - 0.9)) as f32);
    /// ```
    pub fn new(lr: f64, beta1: f64, beta2: f64, eps: f64, weight_decay: f64, step: u64) -> AdamWScalars {
        let step = step as i32;
        AdamWScalars {
            decay_factor: (1.0 - lr * weight_decay) as f32,
            one_minus_beta1: (1.0 - beta1) as f32,
            beta2: beta2 as f32,
            one_minus_beta2: (1.0 - beta2) as f32,
            neg_step_size: (-(lr / (1.0 - beta1.powi(step)))) as f32,
            bias_correction2_sqrt: (1.0 - beta2.powi(step)).sqrt() as f32,
            eps: eps as f32,
            grad_scale: 1.0,
        }
    }

    /// The same step on gradients scaled by `grad_scale` (gradient clipping folded into the
    /// update instead of a pass over every gradient).
    ///
    /// ```
    /// use latentflow_gpu_kernels::ops::adamw::AdamWScalars;
    /// let s = AdamWScalars::new(1e-3, 0.9, 0.999, 1e-8, 0.01, 1).with_grad_scale(0.5);
    /// assert_eq!(s.grad_scale, 0.5);
    /// ```
    pub fn with_grad_scale(self, grad_scale: f64) -> AdamWScalars {
        AdamWScalars { grad_scale: grad_scale as f32, ..self }
    }
}

/// CPU reference: one AdamW step of one tensor in place.
///
/// ```
/// use latentflow_gpu_kernels::ops::adamw::{adamw, AdamWScalars};
/// let (mut p, mut m, mut v) = (vec![1.0f32], vec![0.0f32], vec![0.0f32]);
/// adamw(&mut p, &[0.5], &mut m, &mut v, &AdamWScalars::new(1e-3, 0.9, 0.999, 1e-8, 0.0, 1)).unwrap();
/// assert!((p[0] - (1.0 - 1e-3)).abs() < 1e-6);
/// ```
pub fn adamw(
    param: &mut [f32],
    grad: &[f32],
    exp_avg: &mut [f32],
    exp_avg_sq: &mut [f32],
    s: &AdamWScalars,
) -> Result<(), KernelError> {
    let n = param.len();
    if grad.len() != n || exp_avg.len() != n || exp_avg_sq.len() != n {
        return Err(KernelError::Unsupported {
            op: "adamw",
            message: format!(
                "param has {n} values, grad {}, exp_avg {}, exp_avg_sq {}",
                grad.len(),
                exp_avg.len(),
                exp_avg_sq.len()
            ),
        });
    }
    for j in 0..n {
        let g = grad[j] * s.grad_scale;
        let p = param[j] * s.decay_factor;
        let m = exp_avg[j] + s.one_minus_beta1 * (g - exp_avg[j]);
        let v = exp_avg_sq[j] * s.beta2 + (s.one_minus_beta2 * g) * g;
        let denom = v.sqrt() / s.bias_correction2_sqrt + s.eps;
        param[j] = p + (s.neg_step_size * m) / denom;
        exp_avg[j] = m;
        exp_avg_sq[j] = v;
    }
    Ok(())
}

/// One tensor of a multi-tensor AdamW launch, as device addresses of f32 buffers of `len`
/// values (`bf16_copy` is 0 for none, else a bf16 buffer of `len` values).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AdamWTensor {
    /// The f32 master weights (updated in place).
    pub param: u64,
    /// The gradient.
    pub grad: u64,
    /// First moments (updated in place).
    pub exp_avg: u64,
    /// Second moments (updated in place).
    pub exp_avg_sq: u64,
    /// The bf16 working copy to refresh, or 0.
    pub bf16_copy: u64,
    /// Values in each buffer.
    pub len: usize,
}

/// The CUDA kernel: [`adamw`] for every tensor of a parameter group in one launch on `stream`.
///
/// # Safety
/// Every address must point to a live device allocation of at least `len` elements of its
/// type on `stream`'s device, not freed before the launch completes, and no two tensors may
/// overlap.
#[cfg(feature = "cuda")]
#[allow(unsafe_code)]
pub unsafe fn adamw_multi_cuda(
    stream: &std::sync::Arc<cudarc::driver::CudaStream>,
    tensors: &[AdamWTensor],
    s: &AdamWScalars,
) -> Result<(), KernelError> {
    use crate::kernel::{elementwise, function, launched, offsets};
    use crate::source::Kernel;
    use cudarc::driver::PushKernelArg;
    let (starts, total) = offsets(tensors.iter().map(|t| t.len));
    if total == 0 {
        return Ok(());
    }
    let upload = |f: fn(&AdamWTensor) -> u64| {
        stream.clone_htod(&tensors.iter().map(f).collect::<Vec<u64>>()).map_err(KernelError::driver)
    };
    let (params, grads) = (upload(|t| t.param)?, upload(|t| t.grad)?);
    let (ms, vs, copies) = (upload(|t| t.exp_avg)?, upload(|t| t.exp_avg_sq)?, upload(|t| t.bf16_copy)?);
    let starts = stream.clone_htod(&starts).map_err(KernelError::driver)?;
    let func = function(stream, Kernel::Optimizer, "adamw_multi")?;
    let (count, total_i64) = (tensors.len() as i32, total as i64);
    let mut launch = stream.launch_builder(&func);
    launch.arg(&params).arg(&grads).arg(&ms).arg(&vs).arg(&copies).arg(&starts).arg(&count).arg(&total_i64);
    launch.arg(&s.decay_factor).arg(&s.one_minus_beta1).arg(&s.beta2).arg(&s.one_minus_beta2);
    launch.arg(&s.neg_step_size).arg(&s.bias_correction2_sqrt).arg(&s.eps).arg(&s.grad_scale);
    // SAFETY: arguments match `adamw_multi`; the caller guarantees the addresses (see above);
    // the pointer tables live until the launch is done (freed in stream order on drop).
    launched(unsafe { launch.launch(elementwise(total)) })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_step_moves_each_weight_by_about_lr_against_its_gradient() {
        let s = AdamWScalars::new(0.1, 0.9, 0.999, 1e-8, 0.0, 1);
        let (mut p, mut m, mut v) = (vec![1.0f32, 1.0], vec![0.0; 2], vec![0.0; 2]);
        adamw(&mut p, &[2.0, -3.0], &mut m, &mut v, &s).unwrap();
        assert!((p[0] - 0.9).abs() < 1e-6 && (p[1] - 1.1).abs() < 1e-6, "{p:?}");
        assert!((m[0] - 0.2).abs() < 1e-7 && (v[1] - 0.009).abs() < 1e-7);
    }

    #[test]
    fn weight_decay_is_decoupled_from_the_moments() {
        let s = AdamWScalars::new(0.1, 0.9, 0.999, 1e-8, 0.5, 1);
        let (mut p, mut m, mut v) = (vec![2.0f32], vec![0.0], vec![0.0]);
        adamw(&mut p, &[0.0], &mut m, &mut v, &s).unwrap();
        assert_eq!(p[0], 2.0 * 0.95);
        assert!(adamw(&mut p, &[0.0, 1.0], &mut m, &mut v, &s).is_err());
    }
}
