//! GroupNorm (optionally followed by SiLU) and LayerNorm on CUDA, each one candle op with its
//! own backward pass: one kernel each way, statistics in f32, and only the input kept for the
//! backward pass (the composed versions launch about a dozen kernels each way and keep f32
//! copies of the activations for their backward).

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::CudaSlice;
use candle_core::{CpuStorage, CudaStorage, CustomOp3, DType, Layout, Shape, Storage, Tensor};
use half::bf16;
use latentflow_gpu_kernels::ops::group_norm::{group_norm_backward_cuda, group_norm_cuda, GroupNormShape};
use latentflow_gpu_kernels::ops::layer_norm::{layer_norm_backward_cuda, layer_norm_cuda, LayerNormShape, MAX_WIDTH};

use super::{kernel_error, stream_of, view, wrap, KernelElement};

/// True when the kernels take `x`: on a GPU, f32 or bf16, at least two dimensions (and, for
/// LayerNorm, rows of at most [`MAX_WIDTH`] values).
pub fn supported(x: &Tensor, layer_norm: bool) -> bool {
    x.device().is_cuda()
        && matches!(x.dtype(), DType::F32 | DType::BF16)
        && x.rank() >= 2
        && (!layer_norm || x.dims().last().is_some_and(|&w| w <= MAX_WIDTH))
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
    apply(x, gamma, beta, Norm::Group { groups, silu }, eps)
}

/// LayerNorm of `x` over its last dimension with `gamma` and `beta` (any float dtype; used in
/// f32); differentiable in all three.
pub fn layer_norm(x: &Tensor, gamma: &Tensor, beta: &Tensor, eps: f64) -> candle_core::Result<Tensor> {
    apply(x, gamma, beta, Norm::Layer, eps)
}

fn apply(x: &Tensor, gamma: &Tensor, beta: &Tensor, norm: Norm, eps: f64) -> candle_core::Result<Tensor> {
    let (gamma, beta) = (gamma.to_dtype(DType::F32)?.contiguous()?, beta.to_dtype(DType::F32)?.contiguous()?);
    x.contiguous()?.apply_op3(&gamma, &beta, NormOp { norm, eps: eps as f32 })
}

/// Which normalisation.
#[derive(Clone, Copy)]
enum Norm {
    Group { groups: usize, silu: bool },
    Layer,
}

/// The problem sizes of one normalisation.
#[derive(Clone, Copy)]
enum Sizes {
    Group(GroupNormShape, bool),
    Layer(LayerNormShape),
}

impl Sizes {
    /// Rows of the per-row-block partial sums of the parameter gradients the backward writes.
    fn partial_rows(&self) -> usize {
        match self {
            Sizes::Group(s, _) => s.batch,
            Sizes::Layer(s) => s.backward_blocks(),
        }
    }

    fn channels(&self) -> usize {
        match self {
            Sizes::Group(s, _) => s.channels,
            Sizes::Layer(s) => s.width,
        }
    }
}

struct NormOp {
    norm: Norm,
    eps: f32,
}

impl NormOp {
    fn sizes(&self, x: &Shape) -> candle_core::Result<Sizes> {
        let dims = x.dims();
        if dims.len() < 2 {
            candle_core::bail!("the CUDA norms need at least two dimensions, got {dims:?}")
        }
        Ok(match self.norm {
            Norm::Group { groups, silu } => Sizes::Group(
                GroupNormShape { batch: dims[0], channels: dims[1], spatial: dims[2..].iter().product(), groups },
                silu,
            ),
            Norm::Layer => {
                let width = dims[dims.len() - 1];
                Sizes::Layer(LayerNormShape { rows: x.elem_count() / width.max(1), width })
            }
        })
    }

    fn forward_as<T: KernelElement>(
        &self,
        sizes: Sizes,
        (xs, xl): (&CudaStorage, &Layout),
        (gs, gl): (&CudaStorage, &Layout),
        (bs, bl): (&CudaStorage, &Layout),
    ) -> candle_core::Result<CudaStorage> {
        let stream = stream_of(xs);
        let (x, gamma, beta) = (view::<T>(xs, xl)?, view::<f32>(gs, gl)?, view::<f32>(bs, bl)?);
        // SAFETY: the kernels write every output value.
        #[allow(unsafe_code)]
        let mut y: CudaSlice<T> = unsafe { stream.alloc::<T>(xl.shape().elem_count()) }.map_err(kernel_error)?;
        let mut out = y.as_view_mut();
        match sizes {
            Sizes::Group(s, silu) => group_norm_cuda(&stream, &x, &gamma, &beta, s, self.eps, silu, &mut out),
            Sizes::Layer(s) => layer_norm_cuda(&stream, &x, &gamma, &beta, s, self.eps, &mut out),
        }
        .map_err(kernel_error)?;
        Ok(CudaStorage::wrap_cuda_slice(y, xs.device.clone()))
    }

    /// `dx` and the `[partial rows, C]` partial sums of the parameter gradients, from one kernel.
    fn backward_as<T: KernelElement>(
        &self,
        sizes: Sizes,
        x: &Tensor,
        dy: &Tensor,
        gamma: &Tensor,
        beta: &Tensor,
    ) -> candle_core::Result<(Tensor, Tensor, Tensor)> {
        let (xs, xl) = x.storage_and_layout();
        let (dys, dyl) = dy.storage_and_layout();
        let (gs, gl) = gamma.storage_and_layout();
        let (bs, bl) = beta.storage_and_layout();
        let (Storage::Cuda(xs), Storage::Cuda(dys), Storage::Cuda(gs), Storage::Cuda(bs)) = (&*xs, &*dys, &*gs, &*bs)
        else {
            candle_core::bail!("the CUDA norms' backward pass got CPU tensors")
        };
        let stream = stream_of(xs);
        let partial = [sizes.partial_rows(), sizes.channels()];
        // SAFETY: the kernels write every value of the three outputs.
        #[allow(unsafe_code)]
        let (mut dx, mut dgamma, mut dbeta) = unsafe {
            (
                stream.alloc::<T>(xl.shape().elem_count()).map_err(kernel_error)?,
                stream.alloc::<f32>(partial[0] * partial[1]).map_err(kernel_error)?,
                stream.alloc::<f32>(partial[0] * partial[1]).map_err(kernel_error)?,
            )
        };
        let (x_view, dy_view, gamma_view) = (view::<T>(xs, xl)?, view::<T>(dys, dyl)?, view::<f32>(gs, gl)?);
        let (mut dx_out, mut dg_out, mut db_out) = (dx.as_view_mut(), dgamma.as_view_mut(), dbeta.as_view_mut());
        match sizes {
            Sizes::Group(s, silu) => group_norm_backward_cuda(
                &stream,
                &x_view,
                &dy_view,
                &gamma_view,
                &view::<f32>(bs, bl)?,
                s,
                self.eps,
                silu,
                &mut dx_out,
                &mut dg_out,
                &mut db_out,
            ),
            Sizes::Layer(s) => layer_norm_backward_cuda(
                &stream,
                &x_view,
                &dy_view,
                &gamma_view,
                s,
                self.eps,
                &mut dx_out,
                &mut dg_out,
                &mut db_out,
            ),
        }
        .map_err(kernel_error)?;
        Ok((
            wrap(dx, &xs.device, xl.shape().dims()),
            wrap(dgamma, &xs.device, &partial),
            wrap(dbeta, &xs.device, &partial),
        ))
    }
}

impl CustomOp3 for NormOp {
    fn name(&self) -> &'static str {
        "cuda-norm"
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
        candle_core::bail!("the CUDA norms got CPU tensors")
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
        let sizes = self.sizes(xl.shape())?;
        let inputs = ((xs, xl), (gs, gl), (bs, bl));
        let storage = match xs.dtype() {
            DType::F32 => self.forward_as::<f32>(sizes, inputs.0, inputs.1, inputs.2)?,
            DType::BF16 => self.forward_as::<bf16>(sizes, inputs.0, inputs.1, inputs.2)?,
            other => candle_core::bail!("the CUDA norms take f32 or bf16, not {other:?}"),
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
        let sizes = self.sizes(x.shape())?;
        let dy = grad_y.to_dtype(x.dtype())?.contiguous()?;
        let (dx, dgamma, dbeta) = match x.dtype() {
            DType::F32 => self.backward_as::<f32>(sizes, x, &dy, gamma, beta)?,
            DType::BF16 => self.backward_as::<bf16>(sizes, x, &dy, gamma, beta)?,
            other => candle_core::bail!("the CUDA norms take f32 or bf16, not {other:?}"),
        };
        // Partial sums per sample (GroupNorm) or per block of rows (LayerNorm), added in a
        // fixed order.
        Ok((Some(dx), Some(dgamma.sum(0)?), Some(dbeta.sum(0)?)))
    }
}
