//! Gradient buckets for data-parallel training: every trained parameter's gradient packed into
//! a few flat f32 buffers (about `bucket_bytes` each, in parameter-name order) so an all-reduce
//! moves a handful of large messages, not one per tensor, and gradient memory grows by one
//! bucket at a time, never by a second copy of all gradients.

use std::collections::BTreeMap;

use candle_core::{DType, Tensor, Var};

use super::grads::Grads;
use latentflow_models::error::Result;

/// PyTorch DDP's default bucket size.
pub const DEFAULT_BUCKET_BYTES: usize = 25 << 20;

/// One parameter's place in a bucket.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Slot {
    name: String,
    shape: Vec<usize>,
    offset: usize,
    len: usize,
}

/// Which parameters go in which bucket, the same on every replica.
///
/// ```
/// use std::collections::BTreeMap;
/// use candle_core::{Device, Var};
/// use latentflow_training::buckets::GradientBuckets;
/// let mut params = BTreeMap::new();
/// for (name, n) in [("a", 3), ("b", 5), ("c", 2)] {
///     params.insert(name.to_string(), Var::zeros(n, candle_core::DType::F32, &Device::Cpu).unwrap());
/// }
/// // 24 bytes (6 values) a bucket, in name order: a (3) | b (5) | c (2), as a + b is 8 values.
/// let buckets = GradientBuckets::new(&params, 24);
/// assert_eq!(buckets.len(), 3);
/// assert_eq!(buckets.elements(), 10);
/// ```
#[derive(Clone, Debug)]
pub struct GradientBuckets {
    buckets: Vec<Vec<Slot>>,
}

impl GradientBuckets {
    /// Buckets of at most `bucket_bytes` (a larger parameter gets a bucket of its own).
    pub fn new(params: &BTreeMap<String, Var>, bucket_bytes: usize) -> Self {
        let cap = (bucket_bytes / 4).max(1);
        let mut buckets: Vec<Vec<Slot>> = Vec::new();
        let mut filled = 0;
        for (name, var) in params {
            let len = var.elem_count();
            if buckets.is_empty() || (filled > 0 && filled + len > cap) {
                buckets.push(Vec::new());
                filled = 0;
            }
            let bucket = buckets.last_mut().expect("a bucket");
            bucket.push(Slot { name: name.clone(), shape: var.dims().to_vec(), offset: filled, len });
            filled += len;
        }
        GradientBuckets { buckets }
    }

    /// Number of buckets.
    pub fn len(&self) -> usize {
        self.buckets.len()
    }

    /// True when there is nothing to reduce.
    pub fn is_empty(&self) -> bool {
        self.buckets.is_empty()
    }

    /// Values over all buckets (the number of trained parameters).
    pub fn elements(&self) -> usize {
        self.buckets.iter().flatten().map(|s| s.len).sum()
    }

    /// Parameter names in bucket order.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.buckets.iter().flatten().map(|s| s.name.as_str())
    }

    /// Bucket `b` as one f32 buffer: each parameter's gradient, zeros where `grads` has none.
    pub fn pack(&self, b: usize, grads: &Grads) -> Result<Vec<f32>> {
        let slots = &self.buckets[b];
        let mut buf = vec![0f32; slots.iter().map(|s| s.len).sum()];
        for slot in slots {
            if let Some(g) = grads.get(&slot.name) {
                let values = g.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
                buf[slot.offset..slot.offset + slot.len].copy_from_slice(&values);
            }
        }
        Ok(buf)
    }

    /// Puts bucket `b`'s values back into `grads` (on `like`'s device), for the parameters in
    /// `present` (the others had no gradient on any replica and stay without one).
    pub fn unpack(
        &self,
        b: usize,
        buf: &[f32],
        grads: &mut Grads,
        present: &dyn Fn(&str) -> bool,
        params: &BTreeMap<String, Var>,
    ) -> Result<()> {
        for slot in &self.buckets[b] {
            if !present(&slot.name) {
                grads.remove(&slot.name);
                continue;
            }
            let device = params[&slot.name].device();
            let values = &buf[slot.offset..slot.offset + slot.len];
            grads.insert(slot.name.clone(), Tensor::from_slice(values, slot.shape.as_slice(), device)?);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn params(sizes: &[(&str, usize)]) -> BTreeMap<String, Var> {
        sizes.iter().map(|(n, s)| (n.to_string(), Var::zeros((*s, 2), DType::F32, &Device::Cpu).unwrap())).collect()
    }

    #[test]
    fn buckets_cover_every_parameter_once_and_round_trip() {
        let params = params(&[("a", 3), ("b", 50), ("c", 2), ("d", 4), ("e", 1)]);
        let buckets = GradientBuckets::new(&params, 48);
        let mut names: Vec<&str> = buckets.names().collect();
        assert_eq!(names.len(), 5);
        names.dedup();
        assert_eq!(names, ["a", "b", "c", "d", "e"], "each once, in name order");
        assert_eq!(buckets.elements(), 60 * 2);
        assert!(buckets.buckets.iter().all(|b| b.iter().map(|s| s.len * 4).sum::<usize>() <= 48 || b.len() == 1));
        let mut grads: Grads = params
            .iter()
            .filter(|(n, _)| *n != "c")
            .map(|(n, v)| (n.clone(), (v.as_tensor().ones_like().unwrap() * n.len() as f64).unwrap()))
            .collect();
        let original = grads.clone();
        for b in 0..buckets.len() {
            let buf = buckets.pack(b, &grads).unwrap();
            buckets.unpack(b, &buf, &mut grads, &|n| n != "c", &params).unwrap();
        }
        assert!(!grads.contains_key("c"), "no gradient stays no gradient");
        for (name, g) in &original {
            assert_eq!(g.to_vec2::<f32>().unwrap(), grads[name].to_vec2::<f32>().unwrap(), "{name}");
        }
    }
}
