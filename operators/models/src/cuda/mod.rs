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

use candle_core::cuda_backend::cudarc::driver::{
    result, sys, CudaStream, CudaView, DevicePtr, DeviceRepr, ValidAsZeroBits,
};
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

/// `device`'s CUDA context made current until the scope is dropped, which makes the one that was
/// current before current again. A thread that works on one device and now and then frees or
/// reads another's memory (a trainer taking rows an encoder left on its own GPU) uses this, so
/// its own device's libraries (cuBLAS, cuDNN) keep finding their context current afterwards.
pub struct ContextScope {
    previous: Option<Option<sys::CUcontext>>,
}

impl ContextScope {
    /// Makes `device`'s context current (nothing for other devices, and nothing to restore).
    pub fn enter(device: &candle_core::Device) -> candle_core::Result<ContextScope> {
        let candle_core::Device::Cuda(cuda) = device else { return Ok(ContextScope { previous: None }) };
        let previous = result::ctx::get_current().map_err(kernel_error)?;
        cuda.cuda_stream().context().bind_to_thread().map_err(kernel_error)?;
        Ok(ContextScope { previous: Some(previous) })
    }
}

impl Drop for ContextScope {
    fn drop(&mut self) {
        if let Some(Some(previous)) = self.previous {
            // Safety: the context was current on this thread when the scope began, and contexts
            // (candle's primary ones) live as long as the process.
            #[allow(unsafe_code)]
            if let Err(e) = unsafe { result::ctx::set_current(previous) } {
                tracing::warn!("could not make the previous CUDA context current again: {e}");
            }
        }
    }
}

/// Lets `device`'s kernels and copies reach `peer`'s memory directly (NVLink or PCIe peer
/// access), once per pair and process; returns whether the hardware allows it. Copies between
/// the two work either way: without peer access the driver stages them through host memory.
pub fn enable_peer_access(
    device: &candle_core::CudaDevice,
    peer: &candle_core::CudaDevice,
) -> candle_core::Result<bool> {
    static ENABLED: std::sync::Mutex<Vec<((usize, usize), bool)>> = std::sync::Mutex::new(Vec::new());
    let (ctx, peer_ctx) = (device.cuda_stream().context().clone(), peer.cuda_stream().context().clone());
    let pair = (ctx.ordinal(), peer_ctx.ordinal());
    let mut enabled = ENABLED.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    if let Some((_, allowed)) = enabled.iter().find(|(p, _)| *p == pair) {
        return Ok(*allowed);
    }
    let allowed = pair.0 != pair.1 && {
        let mut can = 0;
        #[allow(unsafe_code)]
        // Safety: both devices are initialised (their contexts exist) and `can` outlives the call.
        unsafe { sys::cuDeviceCanAccessPeer(&mut can, ctx.cu_device(), peer_ctx.cu_device()) }
            .result()
            .map_err(kernel_error)?;
        can != 0
    };
    if allowed {
        let _scope = ContextScope::enter(&candle_core::Device::Cuda(device.clone()))?;
        // Safety: `device`'s context is current and `peer`'s is a live context.
        #[allow(unsafe_code)]
        match unsafe { sys::cuCtxEnablePeerAccess(peer_ctx.cu_ctx(), 0) } {
            sys::CUresult::CUDA_SUCCESS | sys::CUresult::CUDA_ERROR_PEER_ACCESS_ALREADY_ENABLED => {}
            failed => failed.result().map_err(kernel_error)?,
        }
    }
    enabled.push((pair, allowed));
    Ok(allowed)
}

/// Readies a copy from `source` to `target` (CUDA devices on two GPUs, or nothing is done): peer
/// access for `target` to `source`'s memory where the GPUs allow it.
pub fn prepare_copy(source: &candle_core::Device, target: &candle_core::Device) -> candle_core::Result<()> {
    if let (candle_core::Device::Cuda(source_gpu), candle_core::Device::Cuda(target_gpu)) = (source, target) {
        if source.location() != target.location() && !enable_peer_access(target_gpu, source_gpu)? {
            tracing::debug!(
                "no peer access from {:?} to {:?}: the driver stages copies through the host",
                target,
                source
            );
        }
    }
    Ok(())
}

/// After a copy from `source` to `target` queued on `target`'s stream: makes `source`'s stream
/// wait for it, so source buffers freed from now on (on `source`'s stream) outlive the copy, and
/// makes `source`'s context current for freeing them (both CUDA devices, or nothing is done).
pub fn free_after_copy(source: &candle_core::Device, target: &candle_core::Device) -> candle_core::Result<()> {
    if let (candle_core::Device::Cuda(source), candle_core::Device::Cuda(target)) = (source, target) {
        source.cuda_stream().join(&target.cuda_stream()).map_err(kernel_error)?;
        source.cuda_stream().context().bind_to_thread().map_err(kernel_error)?;
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
