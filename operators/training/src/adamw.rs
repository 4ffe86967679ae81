//! AdamW with PyTorch's exact semantics (`torch.optim.AdamW`, single-tensor path): decoupled
//! weight decay first, then the moment updates, then the bias-corrected step, each in float32
//! in the same operation order, so one step reproduces PyTorch's parameters to the last bits.

use std::collections::{BTreeMap, HashMap};

use candle_core::{Tensor, Var};
use serde::{Deserialize, Serialize};

use latentflow_models::error::{ModelError, Result};

/// AdamW hyperparameters (PyTorch's defaults except `weight_decay`, diffusers' 1e-2).
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdamWConfig {
    /// First-moment decay.
    pub beta1: f64,
    /// Second-moment decay.
    pub beta2: f64,
    /// Added to the denominator.
    pub eps: f64,
    /// Decoupled weight decay.
    pub weight_decay: f64,
}

impl Default for AdamWConfig {
    fn default() -> Self {
        AdamWConfig { beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 1e-2 }
    }
}

/// The optimizer and its per-parameter moments.
///
/// ```
/// use candle_core::{Device, Tensor, Var};
/// use latentflow_training::{AdamW, AdamWConfig};
///
/// let p = Var::new(&[1.0f32, -2.0], &Device::Cpu).unwrap();
/// let mut opt = AdamW::new(AdamWConfig::default());
/// let grads = [("p".to_string(), Tensor::new(&[0.5f32, -0.5], &Device::Cpu).unwrap())].into();
/// opt.step(&[("p".to_string(), p.clone())].into(), &grads, 1e-3).unwrap();
/// let v: Vec<f32> = p.as_tensor().to_vec1().unwrap();
/// assert!((v[0] - (1.0 * (1.0 - 1e-5) - 1e-3)).abs() < 1e-6);
/// ```
pub struct AdamW {
    config: AdamWConfig,
    step: u64,
    moments: BTreeMap<String, (Tensor, Tensor)>,
}

impl AdamW {
    /// A fresh optimizer (step 0, zero moments).
    pub fn new(config: AdamWConfig) -> AdamW {
        AdamW { config, step: 0, moments: BTreeMap::new() }
    }

    /// Optimizer steps taken.
    pub fn steps(&self) -> u64 {
        self.step
    }

    /// The hyperparameters.
    pub fn config(&self) -> &AdamWConfig {
        &self.config
    }

    /// One step at learning rate `lr` for every parameter that has a gradient; parameters
    /// without one are left alone (PyTorch skips `p.grad is None`).
    pub fn step(&mut self, params: &BTreeMap<String, Var>, grads: &HashMap<String, Tensor>, lr: f64) -> Result<()> {
        self.step_with_grad_scale(params, grads, lr, 1.0)
    }

    /// [`AdamW::step`] on the gradients times `grad_scale` (the clipping coefficient: below 1
    /// scales them as `clip_grad_norm_` does, 1 leaves them as they are).
    pub fn step_with_grad_scale(
        &mut self,
        params: &BTreeMap<String, Var>,
        grads: &HashMap<String, Tensor>,
        lr: f64,
        grad_scale: f64,
    ) -> Result<()> {
        self.step += 1;
        #[cfg(feature = "cuda")]
        if params.values().all(|v| v.device().is_cuda() && v.dtype() == candle_core::DType::F32) {
            return self.step_cuda(params, grads, lr, grad_scale);
        }
        let c = self.config;
        // Python computes these scalars in f64; each is rounded to f32 where it meets a tensor.
        let bias_correction1 = 1.0 - c.beta1.powi(self.step as i32);
        let bias_correction2_sqrt = (1.0 - c.beta2.powi(self.step as i32)).sqrt();
        let step_size = lr / bias_correction1;
        for (name, var) in params {
            let Some(grad) = grads.get(name) else { continue };
            let p = &var.as_tensor().detach();
            let (m, v) = match self.moments.get(name) {
                Some(state) => state.clone(),
                None => (p.zeros_like()?, p.zeros_like()?),
            };
            let mut grad = grad.detach().to_dtype(p.dtype())?;
            if grad_scale < 1.0 {
                grad = grad.affine(grad_scale, 0.0)?;
            }
            let decayed = p.affine(1.0 - lr * c.weight_decay, 0.0)?;
            // lerp(m, g, w) = m + w * (g - m) for w < 0.5.
            let m = (&m + (&grad - &m)?.affine(1.0 - c.beta1, 0.0)?)?;
            // addcmul: v * b2 + ((1 - b2) * g) * g.
            let v = (v.affine(c.beta2, 0.0)? + (grad.affine(1.0 - c.beta2, 0.0)? * &grad)?)?;
            let denom = v.sqrt()?.broadcast_div(&scalar(bias_correction2_sqrt, p)?)?.affine(1.0, c.eps)?;
            // addcdiv: p + ((-step_size) * m) / denom.
            let updated = (decayed + (m.affine(-step_size, 0.0)? / &denom)?)?;
            var.set(&updated)?;
            self.moments.insert(name.clone(), (m.detach(), v.detach()));
        }
        Ok(())
    }

    /// [`AdamW::step`] on a GPU: every parameter in one multi-tensor kernel launch, in place,
    /// with the same f32 operations (`latentflow_gpu_kernels::ops::adamw`).
    #[cfg(feature = "cuda")]
    fn step_cuda(
        &mut self,
        params: &BTreeMap<String, Var>,
        grads: &HashMap<String, Tensor>,
        lr: f64,
        grad_scale: f64,
    ) -> Result<()> {
        use latentflow_gpu_kernels::ops::adamw::AdamWScalars;
        let c = self.config;
        let scalars =
            AdamWScalars::new(lr, c.beta1, c.beta2, c.eps, c.weight_decay, self.step).with_grad_scale(grad_scale);
        let mut work = Vec::new();
        for (name, var) in params {
            let Some(grad) = grads.get(name) else { continue };
            let p = var.as_tensor();
            if !self.moments.contains_key(name) {
                self.moments.insert(name.clone(), (p.zeros_like()?, p.zeros_like()?));
            }
            let grad = grad.detach().to_dtype(p.dtype())?.contiguous()?;
            let (m, v) = self.moments[name].clone();
            work.push((p.clone(), grad, m, v));
        }
        let refs: Vec<_> = work.iter().map(|(p, g, m, v)| (p, g, m, v)).collect();
        latentflow_models::cuda::optimizer::adamw_step(&refs, &scalars)?;
        Ok(())
    }

    /// The moments as named tensors (`exp_avg.NAME`, `exp_avg_sq.NAME`) for a checkpoint.
    pub fn state_tensors(&self) -> HashMap<String, Tensor> {
        let mut out = HashMap::new();
        for (name, (m, v)) in &self.moments {
            out.insert(format!("exp_avg.{name}"), m.clone());
            out.insert(format!("exp_avg_sq.{name}"), v.clone());
        }
        out
    }

    /// Problems with continuing to train `params` with this state: a moment for a parameter
    /// the model lacks, or of another shape (a different architecture).
    pub fn mismatches(&self, params: &BTreeMap<String, Var>) -> Vec<String> {
        let mut out = Vec::new();
        for (name, (m, _)) in &self.moments {
            match params.get(name) {
                None => out.push(format!("`{name}` is not a parameter of this UNet")),
                Some(p) if p.dims() != m.dims() => {
                    out.push(format!("`{name}` is {:?} here but {:?} in the optimizer state", p.dims(), m.dims()))
                }
                Some(_) => {}
            }
        }
        out
    }

    /// An optimizer continuing from a checkpoint's [`AdamW::state_tensors`] at `step`.
    pub fn restore(config: AdamWConfig, step: u64, mut tensors: HashMap<String, Tensor>) -> Result<AdamW> {
        let mut moments = BTreeMap::new();
        let names: Vec<String> = tensors.keys().filter_map(|k| k.strip_prefix("exp_avg.").map(String::from)).collect();
        for name in names {
            let m = tensors.remove(&format!("exp_avg.{name}")).expect("listed above");
            let v = tensors.remove(&format!("exp_avg_sq.{name}")).ok_or_else(|| ModelError::MissingTensor {
                origin: "optimizer state".into(),
                name: format!("exp_avg_sq.{name}"),
                expected: m.dims().to_vec(),
            })?;
            moments.insert(name, (m, v));
        }
        Ok(AdamW { config, step, moments })
    }
}

/// `value` as a one-element tensor like `like` (exact f32 division, unlike `affine(1 / x)`).
fn scalar(value: f64, like: &Tensor) -> Result<Tensor> {
    Ok(Tensor::new(&[value], like.device())?.to_dtype(like.dtype())?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn reference(p: f64, grads: &[f64], lr: f64, c: AdamWConfig) -> f64 {
        let (mut p, mut m, mut v) = (p, 0.0, 0.0);
        for (i, g) in grads.iter().enumerate() {
            let t = (i + 1) as i32;
            p *= 1.0 - lr * c.weight_decay;
            m = c.beta1 * m + (1.0 - c.beta1) * g;
            v = c.beta2 * v + (1.0 - c.beta2) * g * g;
            let denom = v.sqrt() / (1.0 - c.beta2.powi(t)).sqrt() + c.eps;
            p -= lr / (1.0 - c.beta1.powi(t)) * m / denom;
        }
        p
    }

    #[test]
    fn several_steps_follow_the_float64_formula_and_state_round_trips() {
        let c = AdamWConfig::default();
        let grads = [0.3, -0.1, 0.05, 2.0, 1e-9];
        let var = Var::new(&[0.7f32], &Device::Cpu).unwrap();
        let params: BTreeMap<String, Var> = [("w".to_string(), var.clone())].into();
        let mut opt = AdamW::new(c);
        for (i, g) in grads.iter().enumerate() {
            if i == 2 {
                opt = AdamW::restore(c, opt.steps(), opt.state_tensors()).unwrap();
            }
            let grad = [("w".to_string(), Tensor::new(&[*g as f32], &Device::Cpu).unwrap())].into();
            opt.step(&params, &grad, 1e-2).unwrap();
        }
        let ours: Vec<f32> = var.as_tensor().to_vec1().unwrap();
        let expected = reference(0.7, &grads.iter().map(|&g| f64::from(g as f32)).collect::<Vec<_>>(), 1e-2, c);
        assert!((f64::from(ours[0]) - expected).abs() < 1e-6, "{} vs {expected}", ours[0]);
        assert_eq!(opt.steps(), 5);
    }

    #[test]
    fn optimizer_state_holds_no_op_graph() {
        // A gradient from backward carries ops; keeping them would keep every step's graph.
        let var = Var::new(&[1.0f32, 2.0], &Device::Cpu).unwrap();
        let loss = var.as_tensor().sqr().unwrap().exp().unwrap().sum_all().unwrap();
        let store = loss.backward().unwrap();
        let params: BTreeMap<String, Var> = [("w".to_string(), var.clone())].into();
        let grads = crate::grads::collect(&params, &store);
        let mut opt = AdamW::new(AdamWConfig::default());
        opt.step(&params, &grads, 1e-3).unwrap();
        assert!(opt.state_tensors().values().all(|t| !t.track_op()));
    }

    #[test]
    fn a_parameter_without_gradient_is_untouched() {
        let var = Var::new(&[1.0f32], &Device::Cpu).unwrap();
        let mut opt = AdamW::new(AdamWConfig::default());
        opt.step(&[("w".to_string(), var.clone())].into(), &HashMap::new(), 1.0).unwrap();
        assert_eq!(var.as_tensor().to_vec1::<f32>().unwrap(), [1.0]);
    }
}
