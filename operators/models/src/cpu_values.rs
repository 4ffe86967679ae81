//! Borrowing CPU tensors' f32 values without copying them, for the fused CPU ops.

use candle_core::{CpuStorage, Layout, Storage, Tensor};

/// The values of a contiguous f32 storage region.
pub(crate) fn contiguous<'a>(s: &'a CpuStorage, l: &Layout) -> candle_core::Result<&'a [f32]> {
    let data = s.as_slice::<f32>()?;
    match l.contiguous_offsets() {
        Some((start, end)) => Ok(&data[start..end]),
        None => candle_core::bail!("a fused CPU op needs contiguous inputs"),
    }
}

/// Runs `f` on the f32 values of CPU tensors, in the order given (each copied only when it is
/// not contiguous).
pub(crate) fn with_values<const N: usize, R>(
    tensors: [&Tensor; N],
    f: impl FnOnce([&[f32]; N]) -> R,
) -> candle_core::Result<R> {
    let owned = tensors.map(Tensor::contiguous);
    let mut contiguous_tensors = Vec::with_capacity(N);
    for t in owned {
        contiguous_tensors.push(t?);
    }
    let guards: Vec<_> = contiguous_tensors.iter().map(Tensor::storage_and_layout).collect();
    let mut slices = Vec::with_capacity(N);
    for (storage, layout) in &guards {
        match &**storage {
            Storage::Cpu(s) => slices.push(contiguous(s, layout)?),
            _ => candle_core::bail!("a fused CPU op's backward pass needs its inputs on the CPU"),
        }
    }
    let slices: [&[f32]; N] = slices.try_into().unwrap_or_else(|_| unreachable!("one slice per tensor"));
    Ok(f(slices))
}
