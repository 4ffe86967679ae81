//! Convolutions on CUDA through cuDNN as one candle op with its own backward pass: the forward
//! keeps only its input for the backward (no patch matrix, which held k*k copies of every
//! activation), and the two gradients are cuDNN's backward-data and backward-filter calls.

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CudaStorage, CustomOp2, DType, Layout, Shape, Storage, Tensor};
use half::bf16;
use latentflow_gpu_kernels::ops::conv::{
    conv2d_backward_data_cuda, conv2d_backward_filter_cuda, conv2d_cuda, ConvShape, CudnnElement,
};

use super::{kernel_error, stream_of, view, wrap, KernelElement};

/// True when cuDNN takes these tensors: both on a GPU, f32 or bf16, the same dtype.
pub fn supported(x: &Tensor, weight: &Tensor) -> bool {
    x.device().is_cuda() && matches!(x.dtype(), DType::F32 | DType::BF16) && weight.dtype() == x.dtype()
}

/// `conv2d(x, weight)` (no bias) with square `stride` and symmetric `padding` through cuDNN;
/// differentiable in both arguments.
pub fn conv2d(x: &Tensor, weight: &Tensor, stride: usize, padding: usize) -> candle_core::Result<Tensor> {
    x.contiguous()?.apply_op2(&weight.contiguous()?, CudnnConv { stride, padding })
}

/// The problem sizes of `x` `[B, C, H, W]` against `weight` `[O, C, k, k]`.
fn conv_shape(x: &Shape, weight: &Shape, stride: usize, padding: usize) -> candle_core::Result<ConvShape> {
    let (batch, in_channels, height, width) = x.dims4()?;
    let (out_channels, weight_in, kernel, kernel_w) = weight.dims4()?;
    if weight_in != in_channels || kernel != kernel_w {
        candle_core::bail!("cuDNN conv2d: input {x:?} against weights {weight:?}")
    }
    Ok(ConvShape { batch, in_channels, out_channels, height, width, kernel, stride, padding })
}

/// The forward op; its backward pass is two [`gradient`] calls.
struct CudnnConv {
    stride: usize,
    padding: usize,
}

impl CustomOp2 for CudnnConv {
    fn name(&self) -> &'static str {
        "cudnn-conv2d"
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        candle_core::bail!("the cuDNN convolution got CPU tensors")
    }

    fn cuda_fwd(
        &self,
        xs: &CudaStorage,
        xl: &Layout,
        ws: &CudaStorage,
        wl: &Layout,
    ) -> candle_core::Result<(CudaStorage, Shape)> {
        let s = conv_shape(xl.shape(), wl.shape(), self.stride, self.padding)?;
        let storage = match xs.dtype() {
            DType::F32 => forward_as::<f32>(s, (xs, xl), (ws, wl))?,
            DType::BF16 => forward_as::<bf16>(s, (xs, xl), (ws, wl))?,
            other => candle_core::bail!("cuDNN conv2d takes f32 or bf16, not {other:?}"),
        };
        let (oh, ow) = s.output_hw();
        Ok((storage, Shape::from((s.batch, s.out_channels, oh, ow))))
    }

    fn bwd(
        &self,
        x: &Tensor,
        weight: &Tensor,
        _y: &Tensor,
        grad_y: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let grad_y = grad_y.to_dtype(x.dtype())?.contiguous()?;
        let s = conv_shape(x.shape(), weight.shape(), self.stride, self.padding)?;
        let grad_x = x.track_op().then(|| gradient(&grad_y, weight, s, Gradient::Data)).transpose()?;
        let grad_w = weight.track_op().then(|| gradient(x, &grad_y, s, Gradient::Filter)).transpose()?;
        Ok((grad_x, grad_w))
    }
}

fn forward_as<T: CudnnElement + KernelElement>(
    s: ConvShape,
    (xs, xl): (&CudaStorage, &Layout),
    (ws, wl): (&CudaStorage, &Layout),
) -> candle_core::Result<CudaStorage> {
    let stream = stream_of(xs);
    // SAFETY: cuDNN writes every output value (beta = 0).
    #[allow(unsafe_code)]
    let mut y = unsafe { stream.alloc::<T>(s.output_len()) }.map_err(kernel_error)?;
    conv2d_cuda(&stream, &view::<T>(xs, xl)?, &view::<T>(ws, wl)?, s, &mut y.as_view_mut()).map_err(kernel_error)?;
    Ok(CudaStorage::wrap_cuda_slice(y, xs.device.clone()))
}

/// Which gradient a backward call computes.
#[derive(Clone, Copy)]
enum Gradient {
    /// Of the input, from (dy, w).
    Data,
    /// Of the weights, from (x, dy).
    Filter,
}

/// One gradient of the convolution from two contiguous CUDA tensors of one dtype.
fn gradient(a: &Tensor, b: &Tensor, s: ConvShape, which: Gradient) -> candle_core::Result<Tensor> {
    let (a, b) = (a.contiguous()?, b.contiguous()?);
    let (a_storage, a_layout) = a.storage_and_layout();
    let (b_storage, b_layout) = b.storage_and_layout();
    let (Storage::Cuda(a_storage), Storage::Cuda(b_storage)) = (&*a_storage, &*b_storage) else {
        candle_core::bail!("the cuDNN convolution's backward pass got CPU tensors")
    };
    let inputs = ((a_storage, a_layout), (b_storage, b_layout));
    match a.dtype() {
        DType::F32 => gradient_as::<f32>(s, inputs, which),
        DType::BF16 => gradient_as::<bf16>(s, inputs, which),
        other => candle_core::bail!("cuDNN conv2d takes f32 or bf16, not {other:?}"),
    }
}

type Input<'a> = (&'a CudaStorage, &'a Layout);

fn gradient_as<T: CudnnElement + KernelElement>(
    s: ConvShape,
    ((a, al), (b, bl)): (Input<'_>, Input<'_>),
    which: Gradient,
) -> candle_core::Result<Tensor> {
    let (stream, device) = (stream_of(a), a.device.clone());
    let shape = match which {
        Gradient::Data => [s.batch, s.in_channels, s.height, s.width],
        Gradient::Filter => [s.out_channels, s.in_channels, s.kernel, s.kernel],
    };
    let len = shape.iter().product();
    // SAFETY: cuDNN writes every output value (beta = 0).
    #[allow(unsafe_code)]
    let mut out = unsafe { stream.alloc::<T>(len) }.map_err(kernel_error)?;
    let (a, b) = (view::<T>(a, al)?, view::<T>(b, bl)?);
    match which {
        Gradient::Data => conv2d_backward_data_cuda(&stream, &a, &b, s, &mut out.as_view_mut()),
        Gradient::Filter => conv2d_backward_filter_cuda(&stream, &a, &b, s, &mut out.as_view_mut()),
    }
    .map_err(kernel_error)?;
    Ok(wrap(out, &device, &shape))
}
