//! The element-wise kernels on candle tensors: pixel normalisation, noising with the training
//! target, and GroupNorm + SiLU.

use candle_core::cuda_backend::cudarc::driver::CudaView;
use candle_core::{CudaStorage, DType, Layout, Storage, Tensor};
use half::bf16;
use latentflow_gpu_kernels::ops::group_norm_silu::{group_norm_silu_cuda, GroupNormShape};
use latentflow_gpu_kernels::ops::noising::noise_and_target_cuda;
use latentflow_gpu_kernels::ops::normalize::normalize_u8_chw_cuda;

use super::{kernel_error, stream_of, view, KernelElement};

/// A tensor from a fresh device buffer.
fn wrap<T: candle_core::cuda_backend::CudaDType>(
    slice: candle_core::cuda_backend::cudarc::driver::CudaSlice<T>,
    device: &candle_core::CudaDevice,
    shape: &[usize],
) -> Tensor {
    let storage = candle_core::CudaStorage::wrap_cuda_slice(slice, device.clone());
    Tensor::from_storage(Storage::Cuda(storage), shape, candle_core::op::BackpropOp::none(), false)
}

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

/// GroupNorm (`groups`, `eps`, per-channel f32 `gamma` and `beta`) then SiLU of `x`
/// `[B, C, ...]` on a GPU, f32 or bf16, in one kernel. Not differentiable: for inference.
pub fn group_norm_silu(
    x: &Tensor,
    gamma: &Tensor,
    beta: &Tensor,
    groups: usize,
    eps: f64,
) -> candle_core::Result<Tensor> {
    let x = x.contiguous()?;
    let (gamma, beta) = (gamma.to_dtype(DType::F32)?.contiguous()?, beta.to_dtype(DType::F32)?.contiguous()?);
    let dims = x.dims().to_vec();
    let shape = GroupNormShape { batch: dims[0], channels: dims[1], spatial: dims[2..].iter().product(), groups };
    let (x_storage, x_layout) = x.storage_and_layout();
    let (g_storage, g_layout) = gamma.storage_and_layout();
    let (b_storage, b_layout) = beta.storage_and_layout();
    let (Storage::Cuda(xs), Storage::Cuda(gs), Storage::Cuda(bs)) = (&*x_storage, &*g_storage, &*b_storage) else {
        candle_core::bail!("group_norm_silu needs CUDA tensors")
    };
    let (g, b) = (view::<f32>(gs, g_layout)?, view::<f32>(bs, b_layout)?);
    let run = match x.dtype() {
        DType::F32 => group_norm_silu_as::<f32>,
        DType::BF16 => group_norm_silu_as::<bf16>,
        other => candle_core::bail!("group_norm_silu takes f32 or bf16, not {other:?}"),
    };
    run((xs, x_layout), &g, &b, shape, eps as f32, &dims)
}

fn group_norm_silu_as<T: KernelElement>(
    (xs, x_layout): (&CudaStorage, &Layout),
    gamma: &CudaView<'_, f32>,
    beta: &CudaView<'_, f32>,
    shape: GroupNormShape,
    eps: f32,
    dims: &[usize],
) -> candle_core::Result<Tensor> {
    let stream = stream_of(xs);
    let mut y = stream.alloc_zeros::<T>(x_layout.shape().elem_count()).map_err(kernel_error)?;
    let x = view::<T>(xs, x_layout)?;
    group_norm_silu_cuda(&stream, &x, gamma, beta, shape, eps, &mut y.as_view_mut()).map_err(kernel_error)?;
    Ok(wrap(y, &xs.device, dims))
}
