//! The EMA update over every parameter in one launch: `shadow -= (1 - decay) (shadow - param)`,
//! diffusers' `EMAModel.step` in f32.

use crate::KernelError;

/// CPU reference: one EMA update of one tensor in place.
///
/// ```
/// use latentflow_gpu_kernels::ops::ema::ema;
/// let mut shadow = vec![1.0f32];
/// ema(&mut shadow, &[3.0], 0.25).unwrap();
/// assert_eq!(shadow, vec![1.5]);
/// ```
pub fn ema(shadow: &mut [f32], param: &[f32], one_minus_decay: f32) -> Result<(), KernelError> {
    if shadow.len() != param.len() {
        return Err(KernelError::Unsupported {
            op: "ema",
            message: format!("shadow has {} values, param {}", shadow.len(), param.len()),
        });
    }
    for (s, &p) in shadow.iter_mut().zip(param) {
        *s -= one_minus_decay * (*s - p);
    }
    Ok(())
}

/// One tensor of a multi-tensor EMA launch: device addresses of two f32 buffers of `len`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EmaTensor {
    /// The average (updated in place).
    pub shadow: u64,
    /// The current weights.
    pub param: u64,
    /// Values in each buffer.
    pub len: usize,
}

/// The CUDA kernel: [`ema`] for every tensor in one launch on `stream`.
///
/// # Safety
/// Every address must point to a live f32 device allocation of at least `len` values on
/// `stream`'s device, not freed before the launch completes; shadows may not overlap.
#[cfg(feature = "cuda")]
#[allow(unsafe_code)]
pub unsafe fn ema_multi_cuda(
    stream: &std::sync::Arc<cudarc::driver::CudaStream>,
    tensors: &[EmaTensor],
    one_minus_decay: f32,
) -> Result<(), KernelError> {
    use crate::kernel::{elementwise, function, launched, offsets};
    use crate::source::Kernel;
    use cudarc::driver::PushKernelArg;
    let (starts, total) = offsets(tensors.iter().map(|t| t.len));
    if total == 0 {
        return Ok(());
    }
    let shadows = stream.clone_htod(&tensors.iter().map(|t| t.shadow).collect::<Vec<u64>>());
    let params = stream.clone_htod(&tensors.iter().map(|t| t.param).collect::<Vec<u64>>());
    let (shadows, params) = (shadows.map_err(KernelError::driver)?, params.map_err(KernelError::driver)?);
    let starts = stream.clone_htod(&starts).map_err(KernelError::driver)?;
    let func = function(stream, Kernel::Optimizer, "ema_multi")?;
    let (count, total_i64) = (tensors.len() as i32, total as i64);
    let mut launch = stream.launch_builder(&func);
    launch.arg(&shadows).arg(&params).arg(&starts).arg(&count).arg(&total_i64).arg(&one_minus_decay);
    // SAFETY: arguments match `ema_multi`; the caller guarantees the addresses.
    launched(unsafe { launch.launch(elementwise(total)) })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decay_zero_keeps_the_average_and_one_copies_the_weights() {
        let mut shadow = vec![1.0f32, 2.0];
        ema(&mut shadow, &[5.0, 6.0], 0.0).unwrap();
        assert_eq!(shadow, vec![1.0, 2.0]);
        ema(&mut shadow, &[5.0, 6.0], 1.0).unwrap();
        assert_eq!(shadow, vec![5.0, 6.0]);
        assert!(ema(&mut shadow, &[1.0], 0.5).is_err());
    }
}
