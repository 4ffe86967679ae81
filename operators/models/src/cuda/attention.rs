//! Attention on CUDA through the flash-style kernels: the forward pass and a backward op that
//! recomputes probabilities from per-query statistics, so training never stores the
//! `[B, H, Nq, Nk]` probabilities that the composed attention keeps for its backward pass.

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CudaStorage, CustomOp3, DType, Layout, Shape, Storage, Tensor};
use half::bf16;
use latentflow_gpu_kernels::ops::attention::{
    attention_backward_cuda, attention_forward_cuda, AttentionShape, HEAD_DIMS, TENSOR_CORE_HEAD_DIMS,
};

use super::{kernel_error, stream_of, view, KernelElement};

/// True when the kernels take this head size and element type.
pub fn supported(q: &Tensor, head_dim: usize) -> bool {
    q.device().is_cuda() && matches!(q.dtype(), DType::F32 | DType::BF16) && HEAD_DIMS.contains(&head_dim)
}

/// The sizes of `q` [B, Nq, H*D] against `k` [B, Nk, H*D].
pub(crate) fn shape(q: &Shape, k: &Shape, heads: usize) -> candle_core::Result<AttentionShape> {
    let (batch, nq, width) = q.dims3()?;
    let nk = k.dims3()?.1;
    Ok(AttentionShape { batch, heads, head_dim: width / heads, nq, nk, causal: false })
}

/// Causal attention (query `i` attends to keys `0..=i`, as in CLIP's text encoder) through the
/// tensor-core kernels, without gradients: `None` unless `q` is bf16 on an sm_80 or newer GPU
/// with a head size those kernels take.
pub fn causal_forward(q: &Tensor, k: &Tensor, v: &Tensor, heads: usize) -> candle_core::Result<Option<Tensor>> {
    let head_dim = q.dim(2)? / heads.max(1);
    if !q.device().is_cuda() || q.dtype() != DType::BF16 || !TENSOR_CORE_HEAD_DIMS.contains(&head_dim) {
        return Ok(None);
    }
    let stream = q.device().as_cuda_device()?.cuda_stream();
    if stream.context().compute_capability().map_err(kernel_error)?.0 < 8 {
        return Ok(None);
    }
    let (q, k, v) = (q.contiguous()?, k.to_dtype(DType::BF16)?.contiguous()?, v.to_dtype(DType::BF16)?.contiguous()?);
    let s = AttentionShape { causal: true, ..shape(q.shape(), k.shape(), heads)? };
    let (qs, ql) = q.storage_and_layout();
    let (ks, kl) = k.storage_and_layout();
    let (vs, vl) = v.storage_and_layout();
    let (Storage::Cuda(qs), Storage::Cuda(ks), Storage::Cuda(vs)) = (&*qs, &*ks, &*vs) else {
        candle_core::bail!("causal attention on CUDA got CPU tensors")
    };
    let out = forward_as::<bf16>(s, (qs, ql), (ks, kl), (vs, vl))?;
    Ok(Some(Tensor::from_storage(Storage::Cuda(out), q.shape().clone(), candle_core::op::BackpropOp::none(), false)))
}

/// `softmax(q k^T / sqrt(D)) v` on CUDA (f32 or bf16) for [`crate::fused_attention`].
pub(crate) fn forward(
    heads: usize,
    (s1, l1): (&CudaStorage, &Layout),
    (s2, l2): (&CudaStorage, &Layout),
    (s3, l3): (&CudaStorage, &Layout),
) -> candle_core::Result<(CudaStorage, Shape)> {
    let s = shape(l1.shape(), l2.shape(), heads)?;
    let out = match s1.dtype() {
        DType::F32 => forward_as::<f32>(s, (s1, l1), (s2, l2), (s3, l3))?,
        DType::BF16 => forward_as::<bf16>(s, (s1, l1), (s2, l2), (s3, l3))?,
        other => candle_core::bail!("CUDA attention takes f32 or bf16, not {other:?}"),
    };
    Ok((out, l1.shape().clone()))
}

fn forward_as<T: KernelElement>(
    s: AttentionShape,
    (s1, l1): (&CudaStorage, &Layout),
    (s2, l2): (&CudaStorage, &Layout),
    (s3, l3): (&CudaStorage, &Layout),
) -> candle_core::Result<CudaStorage> {
    let stream = stream_of(s1);
    let mut o = stream.alloc_zeros::<T>(l1.shape().elem_count()).map_err(kernel_error)?;
    let (q, k, v) = (view::<T>(s1, l1)?, view::<T>(s2, l2)?, view::<T>(s3, l3)?);
    attention_forward_cuda(&stream, &q, &k, &v, s, &mut o.as_view_mut()).map_err(kernel_error)?;
    Ok(CudaStorage::wrap_cuda_slice(o, s1.device.clone()))
}

/// The gradients of q, k and v as one op over (q, k, v) holding the output and its gradient;
/// its result is `[dq | dk | dv]` flattened, split by [`backward`].
struct AttentionBackward {
    heads: usize,
    out: Tensor,
    grad_out: Tensor,
}

impl CustomOp3 for AttentionBackward {
    fn name(&self) -> &'static str {
        "flash-attention-backward"
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
        candle_core::bail!("the CUDA attention backward pass got CPU tensors")
    }

    fn cuda_fwd(
        &self,
        s1: &CudaStorage,
        l1: &Layout,
        s2: &CudaStorage,
        l2: &Layout,
        s3: &CudaStorage,
        l3: &Layout,
    ) -> candle_core::Result<(CudaStorage, Shape)> {
        let s = shape(l1.shape(), l2.shape(), self.heads)?;
        let (o_storage, o_layout) = self.out.storage_and_layout();
        let (g_storage, g_layout) = self.grad_out.storage_and_layout();
        let (Storage::Cuda(o_storage), Storage::Cuda(g_storage)) = (&*o_storage, &*g_storage) else {
            candle_core::bail!("the CUDA attention backward pass got CPU tensors")
        };
        let inputs = [(s1, l1), (s2, l2), (s3, l3), (o_storage, o_layout), (g_storage, g_layout)];
        let grads = match s1.dtype() {
            DType::F32 => backward_as::<f32>(s, inputs)?,
            DType::BF16 => backward_as::<bf16>(s, inputs)?,
            other => candle_core::bail!("CUDA attention takes f32 or bf16, not {other:?}"),
        };
        let total = l1.shape().elem_count() + 2 * l2.shape().elem_count();
        Ok((grads, Shape::from(total)))
    }
}

/// `[dq | dk | dv]` from q, k, v, the output and its gradient (storage and layout each).
fn backward_as<T: KernelElement>(
    s: AttentionShape,
    [q, k, v, o, go]: [(&CudaStorage, &Layout); 5],
) -> candle_core::Result<CudaStorage> {
    let (stream, device) = (stream_of(q.0), q.0.device.clone());
    let (nq, nk) = (q.1.shape().elem_count(), k.1.shape().elem_count());
    let mut grads = stream.alloc_zeros::<T>(nq + 2 * nk).map_err(kernel_error)?;
    {
        let (mut dq, mut rest) = grads.split_at_mut(nq);
        let (mut dk, mut dv) = rest.split_at_mut(nk);
        let (q, k, v) = (view::<T>(q.0, q.1)?, view::<T>(k.0, k.1)?, view::<T>(v.0, v.1)?);
        let (o, go) = (view::<T>(o.0, o.1)?, view::<T>(go.0, go.1)?);
        attention_backward_cuda(&stream, &q, &k, &v, &o, &go, s, &mut dq, &mut dk, &mut dv).map_err(kernel_error)?;
    }
    Ok(CudaStorage::wrap_cuda_slice(grads, device))
}

/// `(dq, dk, dv)` for the attention of `q`, `k`, `v` whose output `out` got gradient `grad_out`.
pub(crate) fn backward(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    out: &Tensor,
    grad_out: &Tensor,
    heads: usize,
) -> candle_core::Result<(Tensor, Tensor, Tensor)> {
    let op = AttentionBackward { heads, out: out.contiguous()?, grad_out: grad_out.contiguous()?.to_dtype(q.dtype())? };
    let flat = q.contiguous()?.apply_op3_no_bwd(&k.contiguous()?, &v.contiguous()?, &op)?;
    let (nq, nk) = (q.elem_count(), k.elem_count());
    Ok((
        flat.narrow(0, 0, nq)?.reshape(q.shape())?,
        flat.narrow(0, nq, nk)?.reshape(k.shape())?,
        flat.narrow(0, nq + nk, nk)?.reshape(v.shape())?,
    ))
}
