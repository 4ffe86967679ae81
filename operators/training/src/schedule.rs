//! The DDPM noise schedule: betas, `alphas_cumprod`, forward noising and training targets.

use std::path::Path;

use candle_core::{Device, Tensor};
use serde::{Deserialize, Serialize};

use latentflow_models::error::{ModelError, Result};

/// What the model is trained to predict.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Prediction {
    /// The noise (SD1, SD2-base).
    #[default]
    Epsilon,
    /// The velocity `sqrt(a) * noise - sqrt(1 - a) * x0` (SD2 768-v).
    VPrediction,
}

/// `scheduler/scheduler_config.json` of a `DDPMScheduler` (the fields training uses).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SchedulerConfig {
    /// Timesteps (1000).
    #[serde(default = "thousand")]
    pub num_train_timesteps: usize,
    /// First beta.
    #[serde(default = "beta_start")]
    pub beta_start: f64,
    /// Last beta.
    #[serde(default = "beta_end")]
    pub beta_end: f64,
    /// `scaled_linear`, `linear` or `squaredcos_cap_v2`.
    #[serde(default = "scaled_linear")]
    pub beta_schedule: String,
    /// `epsilon` or `v_prediction`.
    #[serde(default)]
    pub prediction_type: Prediction,
    /// Rescale to zero terminal SNR.
    #[serde(default)]
    pub rescale_betas_zero_snr: bool,
}

fn thousand() -> usize {
    1000
}
fn beta_start() -> f64 {
    0.00085
}
fn beta_end() -> f64 {
    0.012
}
fn scaled_linear() -> String {
    "scaled_linear".into()
}

impl Default for SchedulerConfig {
    fn default() -> Self {
        SchedulerConfig {
            num_train_timesteps: 1000,
            beta_start: beta_start(),
            beta_end: beta_end(),
            beta_schedule: scaled_linear(),
            prediction_type: Prediction::Epsilon,
            rescale_betas_zero_snr: false,
        }
    }
}

/// torch's float32 `linspace`: from both ends towards the middle.
fn linspace_f32(start: f32, end: f32, steps: usize) -> Vec<f32> {
    let step = (end - start) / (steps - 1) as f32;
    let half = steps / 2;
    (0..steps).map(|i| if i < half { start + step * i as f32 } else { end - step * (steps - 1 - i) as f32 }).collect()
}

/// The schedule.
#[derive(Clone, Debug, PartialEq)]
pub struct NoiseSchedule {
    /// Cumulative products of `1 - beta`, one per timestep.
    pub alphas_cumprod: Vec<f32>,
    /// The training target.
    pub prediction: Prediction,
}

impl NoiseSchedule {
    /// The schedule of a config, computed in float32 in torch's order.
    pub fn new(config: &SchedulerConfig, origin: &Path) -> Result<NoiseSchedule> {
        let n = config.num_train_timesteps;
        let betas: Vec<f32> = match config.beta_schedule.as_str() {
            "scaled_linear" => {
                // Python computes the square roots in f64, torch the linspace in f32.
                let (start, end) = (config.beta_start.sqrt() as f32, config.beta_end.sqrt() as f32);
                linspace_f32(start, end, n).into_iter().map(|b| b * b).collect()
            }
            "linear" => linspace_f32(config.beta_start as f32, config.beta_end as f32, n),
            "squaredcos_cap_v2" => {
                let alpha_bar = |t: f64| ((t + 0.008) / 1.008 * std::f64::consts::PI / 2.0).cos().powi(2);
                (0..n)
                    .map(|i| {
                        (1.0 - alpha_bar((i + 1) as f64 / n as f64) / alpha_bar(i as f64 / n as f64)).min(0.999) as f32
                    })
                    .collect()
            }
            other => {
                return Err(ModelError::Unsupported {
                    origin: origin.to_path_buf(),
                    field: "beta_schedule".into(),
                    value: other.into(),
                    supported: "scaled_linear, linear, squaredcos_cap_v2".into(),
                })
            }
        };
        let mut acp = Vec::with_capacity(n);
        let mut product = 1f32;
        for b in &betas {
            product *= 1.0 - b;
            acp.push(product);
        }
        if config.rescale_betas_zero_snr {
            acp = rescale_zero_terminal_snr(&acp);
        }
        Ok(NoiseSchedule { alphas_cumprod: acp, prediction: config.prediction_type })
    }

    /// Reads `scheduler_config.json` from a scheduler folder.
    pub fn from_folder(dir: &Path) -> Result<NoiseSchedule> {
        let path = dir.join("scheduler_config.json");
        let text = std::fs::read_to_string(&path)
            .map_err(|e| ModelError::File { path: path.clone(), message: e.to_string() })?;
        let config: SchedulerConfig =
            serde_json::from_str(&text).map_err(|e| ModelError::File { path: path.clone(), message: e.to_string() })?;
        NoiseSchedule::new(&config, &path)
    }

    /// Number of timesteps.
    pub fn len(&self) -> usize {
        self.alphas_cumprod.len()
    }

    /// True for an empty schedule.
    pub fn is_empty(&self) -> bool {
        self.alphas_cumprod.is_empty()
    }

    /// Per sample, `sqrt(a_t)` and `sqrt(1 - a_t)` in f32.
    pub fn sqrt_coefficients(&self, timesteps: &[usize]) -> (Vec<f32>, Vec<f32>) {
        let a = timesteps.iter().map(|&t| self.alphas_cumprod[t].sqrt()).collect();
        let s = timesteps.iter().map(|&t| (1.0 - self.alphas_cumprod[t]).sqrt()).collect();
        (a, s)
    }

    fn coefficients(&self, timesteps: &[usize], dims: usize, device: &Device) -> Result<(Tensor, Tensor)> {
        let mut shape = vec![timesteps.len()];
        shape.resize(dims, 1);
        let (a, s) = self.sqrt_coefficients(timesteps);
        Ok((Tensor::from_vec(a, shape.clone(), device)?, Tensor::from_vec(s, shape, device)?))
    }

    /// `sqrt(a_t) * x0 + sqrt(1 - a_t) * noise`, one timestep per sample.
    pub fn add_noise(&self, x0: &Tensor, noise: &Tensor, timesteps: &[usize]) -> Result<Tensor> {
        let (a, s) = self.coefficients(timesteps, x0.rank(), x0.device())?;
        Ok((x0.broadcast_mul(&a.to_dtype(x0.dtype())?)? + noise.broadcast_mul(&s.to_dtype(x0.dtype())?)?)?)
    }

    /// `sqrt(a_t) * noise - sqrt(1 - a_t) * x0`.
    pub fn velocity(&self, x0: &Tensor, noise: &Tensor, timesteps: &[usize]) -> Result<Tensor> {
        let (a, s) = self.coefficients(timesteps, x0.rank(), x0.device())?;
        Ok((noise.broadcast_mul(&a.to_dtype(x0.dtype())?)? - x0.broadcast_mul(&s.to_dtype(x0.dtype())?)?)?)
    }

    /// What the model should predict for these samples.
    pub fn target(&self, x0: &Tensor, noise: &Tensor, timesteps: &[usize]) -> Result<Tensor> {
        match self.prediction {
            Prediction::Epsilon => Ok(noise.clone()),
            Prediction::VPrediction => self.velocity(x0, noise, timesteps),
        }
    }

    /// Signal-to-noise ratio `a_t / (1 - a_t)`.
    pub fn snr(&self, t: usize) -> f64 {
        let a = f64::from(self.alphas_cumprod[t]);
        a / (1.0 - a).max(1e-20)
    }
}

/// Lin et al. 2023: shift and scale `sqrt(alphas_cumprod)` so the last timestep is pure noise.
fn rescale_zero_terminal_snr(acp: &[f32]) -> Vec<f32> {
    let sqrt: Vec<f64> = acp.iter().map(|&a| f64::from(a).sqrt()).collect();
    let (first, last) = (sqrt[0], sqrt[sqrt.len() - 1]);
    sqrt.iter().map(|s| ((s - last) * first / (first - last)).powi(2) as f32).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schedules_are_decreasing_and_zero_snr_ends_at_zero() {
        for name in ["scaled_linear", "linear", "squaredcos_cap_v2"] {
            let config = SchedulerConfig { beta_schedule: name.into(), ..SchedulerConfig::default() };
            let s = NoiseSchedule::new(&config, Path::new("x")).unwrap();
            assert_eq!(s.len(), 1000);
            assert!(s.alphas_cumprod.windows(2).all(|w| w[1] < w[0]), "{name}");
        }
        let zero = SchedulerConfig { rescale_betas_zero_snr: true, ..SchedulerConfig::default() };
        let s = NoiseSchedule::new(&zero, Path::new("x")).unwrap();
        assert_eq!(s.alphas_cumprod[999], 0.0);
        let bad = SchedulerConfig { beta_schedule: "cosine".into(), ..SchedulerConfig::default() };
        assert!(NoiseSchedule::new(&bad, Path::new("sched.json"))
            .unwrap_err()
            .to_string()
            .contains("`beta_schedule` = cosine"));
    }
}
