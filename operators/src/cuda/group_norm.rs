//! GroupNorm (optionally followed by SiLU) on CUDA as one candle op with its own backward pass:
//! one kernel each way, statistics in f32, and only the input kept for the backward pass (the
//! composed version launches about a dozen kernels each way and keeps f32 copies of the
//! activations for its backward).

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CudaStorage, CustomOp3, DType, Layout, Shape, Storage, Tensor};
use half::bf16;
use latentflow_gpu_kernels::ops::group_norm::{group_norm_backward_cuda, group_norm_cuda, GroupNormShape};

use super::{kernel_error, stream_of, view, wrap, KernelElement};

/// True when the kernels take `x`: on a GPU, f32 or bf16, `[B, C, ...]`.
pub fn supported(x: &Tensor) -> bool {
    x.device().is_cuda() && matches!(x.dtype(), DType::F32 | DType::BF16) && x.rank() >= 2
}

/// GroupNorm of `x` `[B, C, ...]` in `groups` groups with per-channel `gamma` and `beta` (any
/// float dtype; used in f32), then SiLU when `silu`; differentiable in all three.
pub fn group_norm(
    x: &Tensor,
    gamma: &Tensor,
    beta: &Tensor,
    groups: usize,
    eps: f64,
    silu: bool,
) -> candle_core::Result<Tensor> {
    let (gamma, beta) = (gamma.to_dtype(DType::F32)?.contiguous()?, beta.to_dtype(DType::F32)?.contiguous()?);
    x.contiguous()?.apply_op3(&gamma, &beta, GroupNormOp { groups, eps: eps as f32, silu })
}

struct GroupNormOp {
    groups: usize,
    eps: f32,
    silu: bool,
}

impl GroupNormOp {
    fn shape(&self, x: &Shape) -> candle_core::Result<GroupNormShape> {
        let dims = x.dims();
        if dims.len() < 2 {
            candle_core::bail!("group_norm needs [B, C, ...], got {dims:?}")
        }
        Ok(GroupNormShape {
            batch: dims[0],
            channels: dims[1],
            spatial: dims[2..].iter().product(),
            groups: self.groups,
        })
    }
}

impl CustomOp3 for GroupNormOp {
    fn name(&self) -> &'static str {
        "cuda-group-norm"
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        candle_core::bail!("the CUDA GroupNorm got CPU tensors")
    }

    fn cuda_fwd(
        &self,
        xs: &CudaStorage,
        xl: &Layout,
        gs: &CudaStorage,
        gl: &Layout,
        bs: &CudaStorage,
        bl: &Layout,
    ) -> candle_core::Result<(CudaStorage, Shape)> {
        let shape = self.shape(xl.shape())?;
        let (gamma, beta) = (view::<f32>(gs, gl)?, view::<f32>(bs, bl)?);
        let stream = stream_of(xs);
        macro_rules! run {
            ($t:ty) => {{
                // SAFETY: the kernel writes every output value.
                #[allow(unsafe_code)]
                let mut y = unsafe { stream.alloc::<$t>(xl.shape().elem_count()) }.map_err(kernel_error)?;
                let x = view::<$t>(xs, xl)?;
                group_norm_cuda(&stream, &x, &gamma, &beta, shape, self.eps, self.silu, &mut y.as_view_mut())
                    .map_err(kernel_error)?;
                CudaStorage::wrap_cuda_slice(y, xs.device.clone())
            }};
        }
        let storage = match xs.dtype() {
            DType::F32 => run!(f32),
            DType::BF16 => run!(bf16),
            other => candle_core::bail!("group_norm takes f32 or bf16, not {other:?}"),
        };
        Ok((storage, xl.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        gamma: &Tensor,
        beta: &Tensor,
        _y: &Tensor,
        grad_y: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let shape = self.shape(x.shape())?;
        let dy = grad_y.to_dtype(x.dtype())?.contiguous()?;
        let (dx, dgamma, dbeta) = match x.dtype() {
            DType::F32 => self.backward_as::<f32>(x, &dy, gamma, beta, shape)?,
            DType::BF16 => self.backward_as::<bf16>(x, &dy, gamma, beta, shape)?,
            other => candle_core::bail!("group_norm takes f32 or bf16, not {other:?}"),
        };
        // Per-sample partial sums, added over the batch in a fixed order.
        Ok((Some(dx), Some(dgamma.sum(0)?), Some(dbeta.sum(0)?)))
    }
}

impl GroupNormOp {
    /// `dx` and the per-sample `[B, C]` partial gradients of gamma and beta, from one kernel.
    fn backward_as<T: KernelElement>(
        &self,
        x: &Tensor,
        dy: &Tensor,
        gamma: &Tensor,
        beta: &Tensor,
        shape: GroupNormShape,
    ) -> candle_core::Result<(Tensor, Tensor, Tensor)> {
        let (xs, xl) = x.storage_and_layout();
        let (dys, dyl) = dy.storage_and_layout();
        let (gs, gl) = gamma.storage_and_layout();
        let (bs, bl) = beta.storage_and_layout();
        let (Storage::Cuda(xs), Storage::Cuda(dys), Storage::Cuda(gs), Storage::Cuda(bs)) = (&*xs, &*dys, &*gs, &*bs)
        else {
            candle_core::bail!("the CUDA GroupNorm's backward pass got CPU tensors")
        };
        let stream = stream_of(xs);
        let per_sample = shape.batch * shape.channels;
        // SAFETY: the kernel writes every value of the three outputs.
        #[allow(unsafe_code)]
        let (mut dx, mut dgamma, mut dbeta) = unsafe {
            (
                stream.alloc::<T>(xl.shape().elem_count()).map_err(kernel_error)?,
                stream.alloc::<f32>(per_sample).map_err(kernel_error)?,
                stream.alloc::<f32>(per_sample).map_err(kernel_error)?,
            )
        };
        group_norm_backward_cuda(
            &stream,
            &view::<T>(xs, xl)?,
            &view::<T>(dys, dyl)?,
            &view::<f32>(gs, gl)?,
            &view::<f32>(bs, bl)?,
            shape,
            self.eps,
            self.silu,
            &mut dx.as_view_mut(),
            &mut dgamma.as_view_mut(),
            &mut dbeta.as_view_mut(),
        )
        .map_err(kernel_error)?;
        let per_sample = [shape.batch, shape.channels];
        Ok((
            wrap(dx, &xs.device, xl.shape().dims()),
            wrap(dgamma, &xs.device, &per_sample),
            wrap(dbeta, &xs.device, &per_sample),
        ))
    }
}
