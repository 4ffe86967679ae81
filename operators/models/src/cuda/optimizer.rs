//! AdamW, EMA and the gradients' sums of squares over every parameter in one launch each, on
//! candle's CUDA tensors (AdamW and EMA in place).

use latentflow_gpu_kernels::ops::adamw::{adamw_multi_cuda, AdamWScalars, AdamWTensor};
use latentflow_gpu_kernels::ops::ema::{ema_multi_cuda, EmaTensor};
use latentflow_gpu_kernels::ops::grad_norm::sums_of_squares_cuda;

use super::{f32_address, kernel_error};
use candle_core::{Storage, Tensor};

/// The stream of the first tensor's device.
fn stream(
    tensor: &Tensor,
) -> candle_core::Result<std::sync::Arc<candle_core::cuda_backend::cudarc::driver::CudaStream>> {
    let (storage, _) = tensor.storage_and_layout();
    match &*storage {
        Storage::Cuda(s) => Ok(s.device.cuda_stream()),
        _ => candle_core::bail!("expected CUDA tensors"),
    }
}

/// One AdamW step over `(param, grad, exp_avg, exp_avg_sq)` quadruples of contiguous f32 CUDA
/// tensors, updating params and moments in place.
pub fn adamw_step(tensors: &[(&Tensor, &Tensor, &Tensor, &Tensor)], scalars: &AdamWScalars) -> candle_core::Result<()> {
    let Some(first) = tensors.first() else { return Ok(()) };
    let stream = stream(first.0)?;
    let mut group = Vec::with_capacity(tensors.len());
    for (p, g, m, v) in tensors {
        let (param, len) = f32_address(p)?;
        let addresses = [f32_address(g)?, f32_address(m)?, f32_address(v)?];
        if addresses.iter().any(|&(_, n)| n != len) {
            candle_core::bail!("AdamW: a parameter of {len} values has a gradient or moments of another size");
        }
        let [grad, exp_avg, exp_avg_sq] = addresses.map(|(a, _)| a);
        group.push(AdamWTensor { param, grad, exp_avg, exp_avg_sq, bf16_copy: 0, len });
    }
    // SAFETY: every address is the contiguous f32 storage of a tensor borrowed by `tensors`,
    // which outlives this call; candle frees buffers in stream order, after the launch.
    #[allow(unsafe_code)]
    unsafe { adamw_multi_cuda(&stream, &group, scalars) }.map_err(kernel_error)
}

/// `shadow -= one_minus_decay * (shadow - param)` for `(shadow, param)` pairs of contiguous f32
/// CUDA tensors, in place.
pub fn ema_step(tensors: &[(&Tensor, &Tensor)], one_minus_decay: f32) -> candle_core::Result<()> {
    let Some(first) = tensors.first() else { return Ok(()) };
    let stream = stream(first.0)?;
    let mut group = Vec::with_capacity(tensors.len());
    for (s, p) in tensors {
        let ((shadow, len), (param, n)) = (f32_address(s)?, f32_address(p)?);
        if n != len {
            candle_core::bail!("EMA: a shadow of {len} values for a parameter of {n}");
        }
        group.push(EmaTensor { shadow, param, len });
    }
    // SAFETY: as in `adamw_step`.
    #[allow(unsafe_code)]
    unsafe { ema_multi_cuda(&stream, &group, one_minus_decay) }.map_err(kernel_error)
}

/// The sum of squares of each contiguous f32 CUDA tensor, from one launch and one copy back.
pub fn sums_of_squares(tensors: &[&Tensor]) -> candle_core::Result<Vec<f64>> {
    let Some(first) = tensors.first() else { return Ok(Vec::new()) };
    let stream = stream(first)?;
    let addresses = tensors.iter().map(|t| f32_address(t)).collect::<candle_core::Result<Vec<_>>>()?;
    // SAFETY: each address is the contiguous f32 storage of a tensor borrowed by `tensors`,
    // which outlives this call (it waits for the sums).
    #[allow(unsafe_code)]
    unsafe { sums_of_squares_cuda(&stream, &addresses) }.map_err(kernel_error)
}
