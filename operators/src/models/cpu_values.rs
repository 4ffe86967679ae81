//! Borrowing a CPU tensor's f32 values without copying them, for the fused CPU ops.

use candle_core::{CpuStorage, Layout, Storage, Tensor};

/// The values of a contiguous f32 storage region.
pub(crate) fn contiguous<'a>(s: &'a CpuStorage, l: &Layout) -> candle_core::Result<&'a [f32]> {
    let data = s.as_slice::<f32>()?;
    match l.contiguous_offsets() {
        Some((start, end)) => Ok(&data[start..end]),
        None => candle_core::bail!("a fused CPU op needs contiguous inputs"),
    }
}

/// Runs `f` on the f32 values of a CPU tensor (copied only when it is not contiguous).
pub(crate) fn with_values<R>(t: &Tensor, f: impl FnOnce(&[f32]) -> R) -> candle_core::Result<R> {
    let t = t.contiguous()?;
    let (storage, layout) = t.storage_and_layout();
    match &*storage {
        Storage::Cpu(s) => Ok(f(contiguous(s, layout)?)),
        _ => candle_core::bail!("a fused CPU op's backward pass needs its inputs on the CPU"),
    }
}
