//! One training step of the UNet as diffusers' `train_text_to_image.py` takes it: draw
//! per-sample timesteps and noise, noise the latents, predict, MSE against the target
//! (optionally min-SNR weighted), backward, sum micro-batches, clip, AdamW, EMA.

use std::collections::BTreeMap;
use std::time::Instant;

use candle_core::{DType, Device, Tensor, Var};

use super::adamw::AdamW;
use super::ema::Ema;
use super::grads::{self, Grads};
use super::options::{Precision, TrainingOptions};
use super::schedule::{NoiseSchedule, Prediction};
use crate::models::error::{ModelError, Result};
use crate::models::{UNet, Weights};
use crate::rng::Rng;

/// The key of the training random stream ("train").
const TRAIN_STREAM: u64 = 0x0074_7261_696e;

/// The random choices of one micro-batch.
#[derive(Clone, Debug)]
pub struct Draws {
    /// One timestep per sample.
    pub timesteps: Vec<usize>,
    /// Noise shaped like the latents (noise offset included).
    pub noise: Tensor,
    /// Per sample: false where caption dropout replaces the text by the empty caption.
    pub keep_caption: Vec<bool>,
}

/// What one optimizer step did.
#[derive(Clone, Debug, PartialEq)]
pub struct StepReport {
    /// Optimizer steps taken so far (this one included).
    pub step: u64,
    /// Mean loss over the step's micro-batches.
    pub loss: f64,
    /// Global gradient norm before clipping.
    pub grad_norm: f64,
    /// Learning rate this step used.
    pub lr: f64,
    /// Samples in the step.
    pub samples: usize,
    /// Seconds in forward passes (loss included).
    pub forward_s: f64,
    /// Seconds in backward passes.
    pub backward_s: f64,
    /// Seconds clipping, stepping the optimizer and updating the EMA.
    pub optimizer_s: f64,
}

#[derive(Default)]
struct Pending {
    grads: Grads,
    micro_batches: u64,
    loss_sum: f64,
    samples: usize,
    forward_s: f64,
    backward_s: f64,
}

/// The UNet under training with its optimizer, EMA and random stream.
pub struct Trainer {
    unet: UNet,
    params: BTreeMap<String, Var>,
    schedule: NoiseSchedule,
    options: TrainingOptions,
    optimizer: AdamW,
    ema: Option<Ema>,
    rng: Rng,
    compute: DType,
    pending: Pending,
}

/// The pieces a trainer continues from (a fresh start or a checkpoint).
pub struct TrainerState {
    /// The optimizer.
    pub optimizer: AdamW,
    /// The EMA, when on.
    pub ema: Option<Ema>,
    /// The random stream.
    pub rng: Rng,
}

impl Trainer {
    /// A fresh run: `unet` built from trainable `weights`.
    pub fn new(unet: UNet, weights: &Weights, schedule: NoiseSchedule, options: TrainingOptions) -> Result<Trainer> {
        let params = weights.vars();
        let ema = options.ema_decay.map(|d| Ema::new(&params, d, options.ema_start_step)).transpose()?;
        let state =
            TrainerState { optimizer: AdamW::new(options.adamw()), ema, rng: Rng::new(options.seed, TRAIN_STREAM) };
        Trainer::resume(unet, weights, schedule, options, state)
    }

    /// A run continuing from `state`.
    pub fn resume(
        unet: UNet,
        weights: &Weights,
        schedule: NoiseSchedule,
        options: TrainingOptions,
        state: TrainerState,
    ) -> Result<Trainer> {
        let problems = options.problems();
        if !problems.is_empty() {
            return Err(ModelError::Input(format!("training options: {}", problems.join("; "))));
        }
        let params = weights.vars();
        if params.is_empty() {
            return Err(ModelError::Input(
                "the UNet has no trainable parameters (load it with trainable = true)".into(),
            ));
        }
        let gpu = !matches!(weights.device(), Device::Cpu);
        let compute = if options.precision == Precision::Bf16 && gpu { DType::BF16 } else { DType::F32 };
        Ok(Trainer {
            unet,
            params,
            schedule,
            options,
            optimizer: state.optimizer,
            ema: state.ema,
            rng: state.rng,
            compute,
            pending: Pending::default(),
        })
    }

    /// Optimizer steps taken.
    pub fn step(&self) -> u64 {
        self.optimizer.steps()
    }

    /// The model.
    pub fn unet(&self) -> &UNet {
        &self.unet
    }

    /// The trained parameters by name.
    pub fn params(&self) -> &BTreeMap<String, Var> {
        &self.params
    }

    /// The options.
    pub fn options(&self) -> &TrainingOptions {
        &self.options
    }

    /// The optimizer.
    pub fn optimizer(&self) -> &AdamW {
        &self.optimizer
    }

    /// The EMA, when on.
    pub fn ema(&self) -> Option<&Ema> {
        self.ema.as_ref()
    }

    /// The random stream's state (saved in checkpoints).
    pub fn rng_state(&self) -> u64 {
        self.rng.state()
    }

    /// Micro-batches summed since the last optimizer step (a checkpoint is exact only at 0).
    pub fn pending_micro_batches(&self) -> u64 {
        self.pending.micro_batches
    }

    /// The precision of the forward pass.
    pub fn compute_dtype(&self) -> DType {
        self.compute
    }

    /// Draws timesteps, noise and caption dropout for latents [B, C, H, W].
    pub fn draw(&mut self, latents: &Tensor) -> Result<Draws> {
        let dims = latents.dims4()?;
        let (b, c) = (dims.0, dims.1);
        let timesteps = (0..b).map(|_| self.rng.below(self.schedule.len())).collect();
        let mut noise = Tensor::from_vec(self.rng.normals(latents.elem_count()), latents.dims(), latents.device())?;
        if self.options.noise_offset > 0.0 {
            let offset = Tensor::from_vec(self.rng.normals(b * c), (b, c, 1, 1), latents.device())?;
            noise = noise.broadcast_add(&offset.affine(self.options.noise_offset, 0.0)?)?;
        }
        let keep_caption = if self.options.caption_dropout > 0.0 {
            (0..b).map(|_| self.rng.unit() >= self.options.caption_dropout).collect()
        } else {
            vec![true; b]
        };
        Ok(Draws { timesteps, noise, keep_caption })
    }

    /// The loss of one micro-batch for given draws: latents [B, 4, h, w], text `context`
    /// [B, N, D], `empty_context` [1, N, D] (needed when a caption is dropped).
    pub fn loss(
        &self,
        latents: &Tensor,
        context: &Tensor,
        empty_context: Option<&Tensor>,
        draws: &Draws,
    ) -> Result<Tensor> {
        let latents = latents.to_dtype(DType::F32)?;
        let context = self.captions(context, empty_context, &draws.keep_caption)?;
        let t = &draws.timesteps;
        let (noisy, target) = self.noise_and_target(&latents, &draws.noise, t)?;
        let timesteps: Vec<f32> = t.iter().map(|&t| t as f32).collect();
        let prediction = self
            .unet
            .forward(&noisy.to_dtype(self.compute)?, &timesteps, &context.to_dtype(self.compute)?)?
            .to_dtype(DType::F32)?;
        let squared = (prediction - target)?.sqr()?;
        let Some(gamma) = self.options.snr_gamma else { return Ok(squared.mean_all()?) };
        // Min-SNR-gamma (Hang et al. 2023) as diffusers weights it.
        let weights: Vec<f32> = t
            .iter()
            .map(|&t| {
                let snr = self.schedule.snr(t);
                let base = match self.schedule.prediction {
                    Prediction::Epsilon => snr,
                    Prediction::VPrediction => snr + 1.0,
                };
                if base > 0.0 {
                    (snr.min(gamma) / base) as f32
                } else {
                    1.0
                }
            })
            .collect();
        let b = weights.len();
        let per_sample = squared.reshape((b, ()))?.mean(1)?;
        Ok((per_sample * Tensor::from_vec(weights, b, squared.device())?)?.mean_all()?)
    }

    /// The noised latents and the target: one fused kernel on GPUs, candle ops elsewhere (the
    /// same f32 operations either way).
    fn noise_and_target(&self, latents: &Tensor, noise: &Tensor, t: &[usize]) -> Result<(Tensor, Tensor)> {
        #[cfg(feature = "cuda")]
        if latents.device().is_cuda() {
            let (a, s) = self.schedule.sqrt_coefficients(t);
            let v = self.schedule.prediction == Prediction::VPrediction;
            return Ok(crate::cuda::elementwise::noise_and_target(latents, noise, &a, &s, v)?);
        }
        Ok((self.schedule.add_noise(latents, noise, t)?, self.schedule.target(latents, noise, t)?))
    }

    fn captions(&self, context: &Tensor, empty: Option<&Tensor>, keep: &[bool]) -> Result<Tensor> {
        if keep.iter().all(|&k| k) {
            return Ok(context.clone());
        }
        let empty = empty.ok_or_else(|| {
            ModelError::Input("caption dropout needs the empty caption's embedding, and none was given".into())
        })?;
        let rows: Vec<Tensor> = keep
            .iter()
            .enumerate()
            .map(|(i, &k)| if k { context.narrow(0, i, 1) } else { Ok(empty.to_dtype(context.dtype())?) })
            .collect::<std::result::Result<_, _>>()?;
        Ok(Tensor::cat(&rows, 0)?)
    }

    /// Trains on one micro-batch with fresh draws; returns the report when this micro-batch
    /// completed an optimizer step.
    pub fn train(
        &mut self,
        latents: &Tensor,
        context: &Tensor,
        empty_context: Option<&Tensor>,
    ) -> Result<Option<StepReport>> {
        let draws = self.draw(latents)?;
        self.train_with(latents, context, empty_context, &draws)
    }

    /// [`Trainer::train`] with given draws.
    pub fn train_with(
        &mut self,
        latents: &Tensor,
        context: &Tensor,
        empty_context: Option<&Tensor>,
        draws: &Draws,
    ) -> Result<Option<StepReport>> {
        let accumulation = self.options.gradient_accumulation_steps;
        self.accumulate(latents, context, empty_context, draws, 1.0 / accumulation as f64)?;
        if self.pending.micro_batches < accumulation {
            return Ok(None);
        }
        self.apply().map(Some)
    }

    /// One optimizer step on a whole global batch: latents [B, 4, h, w] and `context` [B, N, D]
    /// split into `gradient_accumulation_steps` micro-batches (fewer when B is smaller), each
    /// with fresh draws and its loss weighted by its share of the rows, so the gradient is that
    /// of the batch's mean loss. With equal micro-batches this is exactly what calling
    /// [`Trainer::train`] on each does.
    pub fn train_batch(
        &mut self,
        latents: &Tensor,
        context: &Tensor,
        empty_context: Option<&Tensor>,
    ) -> Result<StepReport> {
        if self.pending.micro_batches != 0 {
            return Err(ModelError::Input("train_batch called with micro-batches already pending".into()));
        }
        let rows = latents.dims()[0];
        if rows == 0 {
            return Err(ModelError::Input("an optimizer step needs at least one row".into()));
        }
        let parts = (self.options.gradient_accumulation_steps as usize).min(rows);
        let micro = rows.div_ceil(parts);
        let mut start = 0;
        while start < rows {
            let n = micro.min(rows - start);
            let (l, c) = (latents.narrow(0, start, n)?, context.narrow(0, start, n)?);
            let draws = self.draw(&l)?;
            self.accumulate(&l, &c, empty_context, &draws, n as f64 / rows as f64)?;
            start += n;
        }
        self.apply()
    }

    /// Forward and backward on one micro-batch; its gradient, times `weight`, joins the pending sum.
    fn accumulate(
        &mut self,
        latents: &Tensor,
        context: &Tensor,
        empty_context: Option<&Tensor>,
        draws: &Draws,
        weight: f64,
    ) -> Result<()> {
        let started = Instant::now();
        let loss = self.loss(latents, context, empty_context, draws)?;
        let loss_value = f64::from(loss.to_scalar::<f32>()?);
        if !loss_value.is_finite() {
            return Err(ModelError::Input(format!("the loss is {loss_value} at step {}", self.step() + 1)));
        }
        let scaled = if weight != 1.0 { loss.affine(weight, 0.0)? } else { loss };
        let forward_s = started.elapsed().as_secs_f64();
        let store = scaled.backward()?;
        grads::accumulate(&mut self.pending.grads, grads::collect(&self.params, &store))?;
        let p = &mut self.pending;
        p.micro_batches += 1;
        p.loss_sum += loss_value;
        p.samples += draws.timesteps.len();
        p.forward_s += forward_s;
        p.backward_s += started.elapsed().as_secs_f64() - forward_s;
        Ok(())
    }

    fn apply(&mut self) -> Result<StepReport> {
        let started = Instant::now();
        let mut pending = std::mem::take(&mut self.pending);
        let grad_norm = match self.options.max_grad_norm {
            Some(max) => grads::clip(&mut pending.grads, max)?,
            None => grads::global_norm(&pending.grads)?,
        };
        let lr = self.options.lr_schedule().at(self.optimizer.steps());
        self.optimizer.step(&self.params, &pending.grads, lr)?;
        let step = self.optimizer.steps();
        if let Some(ema) = &mut self.ema {
            ema.update(&self.params, step)?;
        }
        Ok(StepReport {
            step,
            loss: pending.loss_sum / pending.micro_batches as f64,
            grad_norm,
            lr,
            samples: pending.samples,
            forward_s: pending.forward_s,
            backward_s: pending.backward_s,
            optimizer_s: started.elapsed().as_secs_f64(),
        })
    }
}
