//! The bridge from candle's CUDA tensors to our NVRTC kernels (`latentflow-gpu-kernels`), behind
//! the `cuda` feature: device views of tensors' storage, and each kernel as a candle-level
//! function or op. Every function here runs on candle's own stream for the tensor's device, so
//! it is ordered with candle's kernels.

pub mod attention;
pub mod conv;
pub mod elementwise;
pub mod norms;
pub mod optimizer;

use std::sync::Arc;

use candle_core::cuda_backend::cudarc::driver::{CudaStream, CudaView, DevicePtr, DeviceRepr, ValidAsZeroBits};
use candle_core::cuda_backend::CudaDType;
use candle_core::{CudaStorage, Layout, Storage, Tensor};

/// An element type both candle's CUDA storage and our kernels take (f32, bf16), so one generic
/// function serves both dtypes.
pub(crate) trait KernelElement:
    CudaDType + latentflow_gpu_kernels::Element + DeviceRepr + ValidAsZeroBits
{
}

impl KernelElement for f32 {}
impl KernelElement for half::bf16 {}

/// A tensor from a fresh device buffer.
pub(crate) fn wrap<T: candle_core::cuda_backend::CudaDType>(
    slice: candle_core::cuda_backend::cudarc::driver::CudaSlice<T>,
    device: &candle_core::CudaDevice,
    shape: &[usize],
) -> Tensor {
    let storage = candle_core::CudaStorage::wrap_cuda_slice(slice, device.clone());
    Tensor::from_storage(Storage::Cuda(storage), shape, candle_core::op::BackpropOp::none(), false)
}

/// Makes `device`'s CUDA context current on this thread (nothing for other devices). cudarc binds
/// it for most calls but not when it frees memory, so threads that only drop or copy device
/// tensors made elsewhere (sinks, engine workers) call this first.
pub fn bind_to_thread(device: &candle_core::Device) -> candle_core::Result<()> {
    if let candle_core::Device::Cuda(cuda) = device {
        cuda.cuda_stream().context().bind_to_thread().map_err(kernel_error)?;
    }
    Ok(())
}

/// A kernel or driver error as a candle error.
pub(crate) fn kernel_error(e: impl std::error::Error + Send + Sync + 'static) -> candle_core::Error {
    candle_core::Error::wrap(e)
}

/// candle's stream for the device of `storage`.
pub(crate) fn stream_of(storage: &CudaStorage) -> Arc<CudaStream> {
    storage.device.cuda_stream()
}

/// The contiguous elements of `storage` that `layout` covers, as a device view.
pub(crate) fn view<'a, T: CudaDType>(
    storage: &'a CudaStorage,
    layout: &Layout,
) -> candle_core::Result<CudaView<'a, T>> {
    let (start, end) = layout
        .contiguous_offsets()
        .ok_or_else(|| candle_core::Error::Msg("CUDA kernels need contiguous inputs".into()))?;
    Ok(storage.as_cuda_slice::<T>()?.slice(start..end))
}

/// The device address of the first element of a contiguous f32 CUDA tensor, for the
/// multi-tensor kernels, and its element count. The tensor must outlive the launch.
pub(crate) fn f32_address(tensor: &Tensor) -> candle_core::Result<(u64, usize)> {
    let (storage, layout) = tensor.storage_and_layout();
    let Storage::Cuda(storage) = &*storage else {
        candle_core::bail!("expected a CUDA tensor, found one on {:?}", tensor.device().location())
    };
    let (start, end) = layout
        .contiguous_offsets()
        .ok_or_else(|| candle_core::Error::Msg("the multi-tensor kernels need contiguous tensors".into()))?;
    let slice = storage.as_cuda_slice::<f32>()?;
    let stream = storage.device.cuda_stream();
    let (base, sync) = slice.device_ptr(&stream);
    drop(sync);
    Ok((base + (start * std::mem::size_of::<f32>()) as u64, end - start))
}
