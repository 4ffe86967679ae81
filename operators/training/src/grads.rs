//! Gradients by parameter name: collecting them from candle's `GradStore`, summing
//! micro-batches, the global norm and clipping as `torch.nn.utils.clip_grad_norm_` does.

use std::collections::{BTreeMap, HashMap};

use candle_core::backprop::GradStore;
use candle_core::{DType, Tensor, Var};

use latentflow_models::error::Result;

/// Gradients keyed by parameter name.
pub type Grads = HashMap<String, Tensor>;

/// The gradient of every parameter in `params` that the loss reached.
pub fn collect(params: &BTreeMap<String, Var>, store: &GradStore) -> Grads {
    // Detached: a gradient carries the op graph it was computed with, which would otherwise
    // stay alive (with the whole forward pass) in optimizer state.
    params.iter().filter_map(|(name, var)| store.get(var.as_tensor()).map(|g| (name.clone(), g.detach()))).collect()
}

/// Adds `more` into `sum`, name by name.
pub fn accumulate(sum: &mut Grads, more: Grads) -> Result<()> {
    for (name, g) in more {
        let total = match sum.remove(&name) {
            Some(s) => (s + g)?,
            None => g,
        };
        sum.insert(name, total);
    }
    Ok(())
}

/// The 2-norm of the per-tensor 2-norms, in f32 per tensor like PyTorch and summed in f64. On a
/// GPU the sums of squares come from one multi-tensor launch and one read back, instead of a
/// reduction and a host read per tensor.
pub fn global_norm(grads: &Grads) -> Result<f64> {
    let mut names: Vec<&String> = grads.keys().collect();
    names.sort();
    #[cfg(feature = "cuda")]
    if names.iter().all(|n| grads[*n].device().is_cuda() && grads[*n].dtype() == DType::F32) {
        let tensors = names.iter().map(|n| grads[*n].contiguous()).collect::<candle_core::Result<Vec<_>>>()?;
        let sums = latentflow_models::cuda::optimizer::sums_of_squares(&tensors.iter().collect::<Vec<_>>())?;
        return Ok(sums.iter().map(|&s| f64::from((s as f32).sqrt()).powi(2)).sum::<f64>().sqrt());
    }
    let mut sum = 0f64;
    for name in names {
        let norm = grads[name].to_dtype(DType::F32)?.sqr()?.sum_all()?.sqrt()?.to_scalar::<f32>()?;
        sum += f64::from(norm) * f64::from(norm);
    }
    Ok(sum.sqrt())
}

/// What `clip_grad_norm_` multiplies the gradients by for a global norm `norm`: `max_norm /
/// (norm + 1e-6)` when that is below 1, else 1.
///
/// ```
/// use latentflow_training::grads::clip_coefficient;
/// assert_eq!(clip_coefficient(0.5, 1.0), 1.0);
/// assert!((clip_coefficient(4.0, 1.0) - 0.25).abs() < 1e-6);
/// ```
pub fn clip_coefficient(norm: f64, max_norm: f64) -> f64 {
    (max_norm / (norm + 1e-6)).min(1.0)
}

/// Scales every gradient by [`clip_coefficient`] when it is below 1, like `clip_grad_norm_`;
/// returns the norm before clipping. (The trainer folds the coefficient into the optimizer
/// step instead.)
pub fn clip(grads: &mut Grads, max_norm: f64) -> Result<f64> {
    let norm = global_norm(grads)?;
    let coefficient = clip_coefficient(norm, max_norm);
    if coefficient < 1.0 {
        for g in grads.values_mut() {
            *g = g.affine(coefficient, 0.0)?;
        }
    }
    Ok(norm)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn grads(values: &[(&str, Vec<f32>)]) -> Grads {
        values.iter().map(|(n, v)| (n.to_string(), Tensor::new(v.as_slice(), &Device::Cpu).unwrap())).collect()
    }

    #[test]
    fn norm_clip_and_accumulate() {
        let mut g = grads(&[("a", vec![3.0]), ("b", vec![0.0, 4.0])]);
        assert_eq!(global_norm(&g).unwrap(), 5.0);
        assert_eq!(clip(&mut g, 10.0).unwrap(), 5.0);
        assert_eq!(g["a"].to_vec1::<f32>().unwrap(), [3.0]);
        clip(&mut g, 1.0).unwrap();
        assert!((global_norm(&g).unwrap() - 1.0).abs() < 1e-5);
        let mut sum = grads(&[("a", vec![1.0])]);
        accumulate(&mut sum, grads(&[("a", vec![2.0]), ("c", vec![5.0])])).unwrap();
        assert_eq!(sum["a"].to_vec1::<f32>().unwrap(), [3.0]);
        assert_eq!(sum["c"].to_vec1::<f32>().unwrap(), [5.0]);
    }
}
