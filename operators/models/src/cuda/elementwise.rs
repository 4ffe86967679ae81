//! The element-wise kernels on candle tensors: pixel normalisation, noising with the training
//! target.

use candle_core::{DType, Storage, Tensor};
use latentflow_gpu_kernels::ops::noising::noise_and_target_cuda;
use latentflow_gpu_kernels::ops::normalize::normalize_u8_chw_cuda;

use super::{kernel_error, stream_of, view, wrap};

/// u8 images `[n, c, h, w]` on a GPU → f32 in [-1, 1], torchvision's `(x / 255 - 0.5) / 0.5`,
/// in one kernel.
pub fn normalize_pixels(pixels: &Tensor) -> candle_core::Result<Tensor> {
    let pixels = pixels.contiguous()?;
    let dims = pixels.dims().to_vec();
    let [n, c, h, w] = <[usize; 4]>::try_from(dims.as_slice())
        .map_err(|_| candle_core::Error::Msg(format!("pixels must be [n, c, h, w], got {dims:?}")))?;
    let (storage, layout) = pixels.storage_and_layout();
    let Storage::Cuda(storage) = &*storage else { candle_core::bail!("normalize_pixels needs a CUDA tensor") };
    let stream = stream_of(storage);
    let src = view::<u8>(storage, layout)?;
    let mut out = stream.alloc_zeros::<f32>(n * c * h * w).map_err(kernel_error)?;
    normalize_u8_chw_cuda(&stream, &src, None, [n, c, h, w], &mut out.as_view_mut()).map_err(kernel_error)?;
    Ok(wrap(out, &storage.device, &dims))
}

/// `(noisy, target)` for f32 latents `x0` and `noise` on a GPU with per-sample coefficients
/// `sqrt(a_t)` and `sqrt(1 - a_t)` (one each per sample), in one kernel.
pub fn noise_and_target(
    x0: &Tensor,
    noise: &Tensor,
    sqrt_alpha: &[f32],
    sqrt_one_minus_alpha: &[f32],
    v_prediction: bool,
) -> candle_core::Result<(Tensor, Tensor)> {
    let (x0, noise) = (x0.to_dtype(DType::F32)?.contiguous()?, noise.to_dtype(DType::F32)?.contiguous()?);
    let dims = x0.dims().to_vec();
    let total = x0.elem_count();
    let per_sample = total / sqrt_alpha.len().max(1);
    let (x_storage, x_layout) = x0.storage_and_layout();
    let (n_storage, n_layout) = noise.storage_and_layout();
    let (Storage::Cuda(xs), Storage::Cuda(ns)) = (&*x_storage, &*n_storage) else {
        candle_core::bail!("noise_and_target needs CUDA tensors")
    };
    let stream = stream_of(xs);
    let a = stream.clone_htod(sqrt_alpha).map_err(kernel_error)?;
    let s = stream.clone_htod(sqrt_one_minus_alpha).map_err(kernel_error)?;
    let mut noisy = stream.alloc_zeros::<f32>(total).map_err(kernel_error)?;
    let mut target = stream.alloc_zeros::<f32>(total).map_err(kernel_error)?;
    noise_and_target_cuda(
        &stream,
        &view::<f32>(xs, x_layout)?,
        &view::<f32>(ns, n_layout)?,
        &a.as_view(),
        &s.as_view(),
        per_sample,
        v_prediction,
        &mut noisy.as_view_mut(),
        &mut target.as_view_mut(),
    )
    .map_err(kernel_error)?;
    Ok((wrap(noisy, &xs.device, &dims), wrap(target, &xs.device, &dims)))
}
