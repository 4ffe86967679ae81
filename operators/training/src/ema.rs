//! Exponential moving average of the trained weights, as diffusers' `EMAModel`: the decay
//! ramps up as `(1 + s) / (10 + s)` capped at `decay`, and until `start_step` the average
//! simply copies the weights.

use std::collections::{BTreeMap, HashMap};

use candle_core::{Tensor, Var};

use latentflow_models::error::Result;

/// Shadow copies of the trained parameters.
///
/// ```
/// use candle_core::{Device, Var};
/// use latentflow_training::Ema;
///
/// let w = Var::new(&[1.0f32], &Device::Cpu).unwrap();
/// let params = [("w".to_string(), w.clone())].into();
/// let mut ema = Ema::new(&params, 0.999, 0).unwrap();
/// w.set(&w.as_tensor().affine(0.0, 3.0).unwrap()).unwrap();
/// ema.update(&params, 2).unwrap(); // decay (1 + 1) / (10 + 1)
/// let v: f32 = ema.tensors()["w"].to_vec1::<f32>().unwrap()[0];
/// assert!((v - (1.0 * 2.0 / 11.0 + 3.0 * 9.0 / 11.0)).abs() < 1e-6);
/// ```
pub struct Ema {
    decay: f64,
    start_step: u64,
    shadow: BTreeMap<String, Tensor>,
}

impl Ema {
    /// Starts from the current weights.
    pub fn new(params: &BTreeMap<String, Var>, decay: f64, start_step: u64) -> Result<Ema> {
        let shadow = params.iter().map(|(n, v)| Ok((n.clone(), v.as_tensor().copy()?))).collect::<Result<_>>()?;
        Ok(Ema { decay, start_step, shadow })
    }

    /// Continues from saved averages (a checkpoint's `unet_ema`).
    pub fn restore(decay: f64, start_step: u64, tensors: HashMap<String, Tensor>) -> Ema {
        Ema { decay, start_step, shadow: tensors.into_iter().collect() }
    }

    /// The decay used after optimizer step `step` (1-based).
    pub fn decay_at(&self, step: u64) -> f64 {
        let s = step.saturating_sub(self.start_step + 1);
        if s == 0 {
            return 0.0;
        }
        ((1.0 + s as f64) / (10.0 + s as f64)).min(self.decay)
    }

    /// Folds in the weights after optimizer step `step`: `shadow -= (1 - d) * (shadow - w)`.
    pub fn update(&mut self, params: &BTreeMap<String, Var>, step: u64) -> Result<()> {
        let keep = self.decay_at(step);
        #[cfg(feature = "cuda")]
        if keep > 0.0
            && params.iter().all(|(n, v)| {
                v.device().is_cuda() && v.dtype() == candle_core::DType::F32 && self.shadow.contains_key(n)
            })
        {
            // One multi-tensor kernel launch, in place, same f32 operations.
            let pairs: Vec<(&Tensor, &Tensor)> = params.iter().map(|(n, v)| (&self.shadow[n], v.as_tensor())).collect();
            latentflow_models::cuda::optimizer::ema_step(&pairs, (1.0 - keep) as f32)?;
            return Ok(());
        }
        for (name, var) in params {
            let w = var.as_tensor().detach();
            let next = match self.shadow.get(name) {
                Some(s) if keep > 0.0 => (s - (s - &w)?.affine(1.0 - keep, 0.0)?)?,
                _ => w.copy()?,
            };
            self.shadow.insert(name.clone(), next);
        }
        Ok(())
    }

    /// The averaged weights by name.
    pub fn tensors(&self) -> &BTreeMap<String, Tensor> {
        &self.shadow
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn copies_until_the_start_step_then_averages() {
        let w = Var::new(&[0.0f32], &Device::Cpu).unwrap();
        let params: BTreeMap<String, Var> = [("w".to_string(), w.clone())].into();
        let mut ema = Ema::new(&params, 0.5, 3).unwrap();
        assert_eq!((1..=6).map(|s| ema.decay_at(s)).collect::<Vec<_>>(), [0.0, 0.0, 0.0, 0.0, 2.0 / 11.0, 0.25]);
        for step in 1..=6 {
            w.set(&Tensor::new(&[step as f32], &Device::Cpu).unwrap()).unwrap();
            ema.update(&params, step).unwrap();
        }
        // Step 4 copies 4; step 5 keeps 2/11 of it; step 6 keeps 1/4 of that.
        let after5 = 4.0 * 2.0 / 11.0 + 5.0 * 9.0 / 11.0;
        let expected = after5 * 0.25 + 6.0 * 0.75;
        assert!((ema.tensors()["w"].to_vec1::<f32>().unwrap()[0] - expected).abs() < 1e-5);
    }
}
