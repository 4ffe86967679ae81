//! What a training run is configured with (the `train` operator's keys), with defaults from
//! diffusers' `train_text_to_image.py`.

use serde::{Deserialize, Serialize};

use super::adamw::AdamWConfig;
use super::lr::{LrDecay, LrSchedule};

/// Compute precision of the forward and backward pass (weights stay f32).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Precision {
    /// Everything in f32.
    #[default]
    F32,
    /// bf16 activations on devices that support it; the CPU stays f32.
    Bf16,
}

/// Training hyperparameters.
///
/// ```
/// use latentflow_training::TrainingOptions;
///
/// let o: TrainingOptions = toml::from_str("lr = 1e-4\nsnr_gamma = 5.0").unwrap();
/// assert!(o.problems().is_empty());
/// let bad = TrainingOptions { caption_dropout: 1.5, ..o };
/// assert_eq!(bad.problems(), ["`caption_dropout` = 1.5 must be in [0, 1]"]);
/// ```
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TrainingOptions {
    /// Peak learning rate.
    pub lr: f64,
    /// Linear warmup steps.
    pub warmup_steps: u64,
    /// After warmup: `constant` or `cosine`.
    pub lr_decay: LrDecay,
    /// Optimizer steps the cosine decay spans.
    pub total_steps: u64,
    /// AdamW beta1.
    pub adam_beta1: f64,
    /// AdamW beta2.
    pub adam_beta2: f64,
    /// AdamW epsilon.
    pub adam_eps: f64,
    /// AdamW decoupled weight decay.
    pub weight_decay: f64,
    /// Clip the global gradient norm to this (none: no clipping).
    pub max_grad_norm: Option<f64>,
    /// Micro-batches summed into one optimizer step.
    pub gradient_accumulation_steps: u64,
    /// Min-SNR loss weighting with this gamma (5.0 is the usual choice).
    pub snr_gamma: Option<f64>,
    /// Adds `noise_offset * N(0, 1)` per sample and channel to the noise.
    pub noise_offset: f64,
    /// Probability of replacing a caption's embedding by the empty caption's.
    pub caption_dropout: f64,
    /// Keep an EMA of the weights with this decay (none: no EMA).
    pub ema_decay: Option<f64>,
    /// Optimizer steps before the EMA starts averaging (it copies until then).
    pub ema_start_step: u64,
    /// Forward/backward precision.
    pub precision: Precision,
    /// Recompute each UNet block's activations in backward instead of keeping them: the same
    /// gradients in less memory, for a second forward pass.
    pub gradient_checkpointing: bool,
    /// Seed of the timestep, noise and dropout draws.
    pub seed: u64,
}

impl Default for TrainingOptions {
    fn default() -> Self {
        let adam = AdamWConfig::default();
        TrainingOptions {
            lr: 1e-4,
            warmup_steps: 0,
            lr_decay: LrDecay::Constant,
            total_steps: 0,
            adam_beta1: adam.beta1,
            adam_beta2: adam.beta2,
            adam_eps: adam.eps,
            weight_decay: adam.weight_decay,
            max_grad_norm: Some(1.0),
            gradient_accumulation_steps: 1,
            snr_gamma: None,
            noise_offset: 0.0,
            caption_dropout: 0.0,
            ema_decay: None,
            ema_start_step: 0,
            precision: Precision::F32,
            gradient_checkpointing: false,
            seed: 0,
        }
    }
}

impl TrainingOptions {
    /// The optimizer's hyperparameters.
    pub fn adamw(&self) -> AdamWConfig {
        AdamWConfig {
            beta1: self.adam_beta1,
            beta2: self.adam_beta2,
            eps: self.adam_eps,
            weight_decay: self.weight_decay,
        }
    }

    /// The learning-rate schedule.
    pub fn lr_schedule(&self) -> LrSchedule {
        LrSchedule {
            peak: self.lr,
            warmup_steps: self.warmup_steps,
            decay: self.lr_decay,
            total_steps: self.total_steps,
        }
    }

    /// Every invalid value, as `` `key` = value must ... `` lines.
    pub fn problems(&self) -> Vec<String> {
        let mut out = Vec::new();
        let mut need = |ok: bool, key: &str, value: String, rule: &str| {
            if !ok {
                out.push(format!("`{key}` = {value} must be {rule}"));
            }
        };
        need(self.lr > 0.0 && self.lr.is_finite(), "lr", self.lr.to_string(), "> 0");
        need((0.0..1.0).contains(&self.adam_beta1), "adam_beta1", self.adam_beta1.to_string(), "in [0, 1)");
        need((0.0..1.0).contains(&self.adam_beta2), "adam_beta2", self.adam_beta2.to_string(), "in [0, 1)");
        need(self.adam_eps > 0.0, "adam_eps", self.adam_eps.to_string(), "> 0");
        need(self.weight_decay >= 0.0, "weight_decay", self.weight_decay.to_string(), ">= 0");
        if let Some(n) = self.max_grad_norm {
            need(n > 0.0, "max_grad_norm", n.to_string(), "> 0");
        }
        let accumulation = self.gradient_accumulation_steps;
        need(accumulation >= 1, "gradient_accumulation_steps", accumulation.to_string(), ">= 1");
        if let Some(g) = self.snr_gamma {
            need(g > 0.0, "snr_gamma", g.to_string(), "> 0");
        }
        need(self.noise_offset >= 0.0, "noise_offset", self.noise_offset.to_string(), ">= 0");
        need(
            (0.0..=1.0).contains(&self.caption_dropout),
            "caption_dropout",
            self.caption_dropout.to_string(),
            "in [0, 1]",
        );
        if let Some(d) = self.ema_decay {
            need((0.0..1.0).contains(&d), "ema_decay", d.to_string(), "in [0, 1)");
        }
        if self.lr_decay == LrDecay::Cosine {
            let total = self.total_steps;
            need(total > self.warmup_steps, "total_steps", total.to_string(), "> warmup_steps for a cosine decay");
        }
        out
    }
}
