//! One training step of the UNet as diffusers' `train_text_to_image.py` takes it: draw
//! per-sample timesteps and noise, noise the latents, predict, MSE against the target
//! (optionally min-SNR weighted), backward, sum micro-batches, clip, AdamW, EMA.

use std::collections::{BTreeMap, HashMap};
use std::time::Instant;

use candle_core::{DType, Device, Tensor, Var};

use super::adamw::AdamW;
use super::buckets::{GradientBuckets, DEFAULT_BUCKET_BYTES};
use super::ema::Ema;
use super::grads::{self, Grads};
use super::options::{Precision, TrainingOptions};
use super::schedule::{NoiseSchedule, Prediction};
use latentflow_models::error::{ModelError, Result};
use latentflow_models::rng::Rng;
use latentflow_models::{UNet, Weights};

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
    /// Sum over micro-batches of rows x mean loss.
    loss_sum: f64,
    samples: usize,
    forward_s: f64,
    backward_s: f64,
}

/// A micro-batch's UNet inputs and target.
struct Prepared {
    noisy: Tensor,
    timesteps: Vec<f32>,
    context: Tensor,
    target: Tensor,
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
    buckets: Option<GradientBuckets>,
}

/// Sums gradients (and a few scalars) over the replicas of a data-parallel trainer: after the
/// call every replica holds the same sum. The engine's collective implements it in the `train`
/// operator; the training math does not know where the other replicas are.
pub trait Replicas {
    /// Replaces `buf` by the element-wise sum of every replica's `buf`.
    fn all_reduce_sum(&mut self, buf: &mut [f32]) -> std::result::Result<(), String>;
}

/// A borrowed summer sums as the one it borrows.
impl<R: Replicas + ?Sized> Replicas for &mut R {
    fn all_reduce_sum(&mut self, buf: &mut [f32]) -> std::result::Result<(), String> {
        (**self).all_reduce_sum(buf)
    }
}

/// NCCL sums the gradients of trainers on GPUs (feature `nccl`).
#[cfg(feature = "nccl")]
impl Replicas for latentflow_gpu_kernels::nccl::NcclGroup {
    fn all_reduce_sum(&mut self, buf: &mut [f32]) -> std::result::Result<(), String> {
        latentflow_gpu_kernels::nccl::NcclGroup::all_reduce_sum(self, buf).map_err(|e| e.to_string())
    }
}

/// Where one replica's rows sit in a step's global batch: positions `first..first + n` of
/// `global_rows`, in the batch's key order. A replica's draws (timesteps, noise, caption
/// dropout) are those of its positions in one stream for the whole global batch, so a step's
/// numbers do not depend on how many replicas share it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Shard {
    /// The position of this replica's first row.
    pub first: usize,
    /// Rows in the whole step, over all replicas.
    pub global_rows: usize,
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
            buckets: None,
        })
    }

    /// Continues with `optimizer` (another run's moments and step, as a second training phase
    /// carries the first's); fails when its state does not fit this UNet.
    pub fn carry_optimizer(&mut self, optimizer: AdamW) -> Result<()> {
        let problems = optimizer.mismatches(&self.params);
        if let Some(first) = problems.first() {
            return Err(ModelError::Input(format!(
                "the optimizer state does not fit this UNet ({} problems; {first})",
                problems.len()
            )));
        }
        self.optimizer = optimizer;
        Ok(())
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

    /// The current weights as plain tensors (shared, not copied), for saving.
    pub fn detached_weights(&self) -> HashMap<String, Tensor> {
        self.params.iter().map(|(n, v)| (n.clone(), v.as_tensor().detach())).collect()
    }

    /// The weights to sample and ship: the EMA's when it is on (what diffusers' training
    /// script saves and what its validation images use), else the current ones.
    pub fn inference_weights(&self) -> HashMap<String, Tensor> {
        match &self.ema {
            Some(ema) => ema.tensors().iter().map(|(n, t)| (n.clone(), t.clone())).collect(),
            None => self.detached_weights(),
        }
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
        let b = latents.dims4()?.0;
        let draws = self.draw_at(latents, Shard { first: 0, global_rows: b })?;
        self.rng.skip(self.draws_per_step(latents, b)?);
        Ok(draws)
    }

    /// The draws of rows `shard.first..shard.first + B` of a global batch of
    /// `shard.global_rows`, without moving the stream. The stream holds, for the whole batch
    /// in order: one timestep per row, the noise (row after row, two draws per value), the
    /// noise offsets, then the caption-dropout coins; a replica jumps to its rows in each.
    fn draw_at(&self, latents: &Tensor, shard: Shard) -> Result<Draws> {
        let (b, c, _, _) = latents.dims4()?;
        let per_row = latents.elem_count() / b.max(1);
        let (first, global) = (shard.first as u64, shard.global_rows as u64);
        let at = |skip: u64| {
            let mut rng = self.rng.clone();
            rng.skip(skip);
            rng
        };
        let mut rng = at(first);
        let timesteps = (0..b).map(|_| rng.below(self.schedule.len())).collect();
        let noise_start = global;
        let values = at(noise_start + 2 * first * per_row as u64).normals(latents.elem_count());
        let mut noise = Tensor::from_vec(values, latents.dims(), latents.device())?;
        let mut coins_start = noise_start + 2 * global * per_row as u64;
        if self.options.noise_offset > 0.0 {
            let offsets = at(coins_start + 2 * first * c as u64).normals(b * c);
            let offset = Tensor::from_vec(offsets, (b, c, 1, 1), latents.device())?;
            noise = noise.broadcast_add(&offset.affine(self.options.noise_offset, 0.0)?)?;
            coins_start += 2 * global * c as u64;
        }
        let keep_caption = if self.options.caption_dropout > 0.0 {
            let mut rng = at(coins_start + first);
            (0..b).map(|_| rng.unit() >= self.options.caption_dropout).collect()
        } else {
            vec![true; b]
        };
        Ok(Draws { timesteps, noise, keep_caption })
    }

    /// How far one step of `global_rows` rows shaped like `latents` moves the stream.
    fn draws_per_step(&self, latents: &Tensor, global_rows: usize) -> Result<u64> {
        let (_, c, h, w) = latents.dims4()?;
        let g = global_rows as u64;
        let mut n = g + 2 * g * (c * h * w) as u64;
        if self.options.noise_offset > 0.0 {
            n += 2 * g * c as u64;
        }
        if self.options.caption_dropout > 0.0 {
            n += g;
        }
        Ok(n)
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
        let p = self.prepare(latents, context, empty_context, draws)?;
        let prediction = self.unet.forward(&p.noisy, &p.timesteps, &p.context)?.to_dtype(DType::F32)?;
        self.prediction_loss(&prediction, &p.target, &draws.timesteps)
    }

    /// The UNet's inputs for `draws` (in the compute precision) and the target.
    fn prepare(
        &self,
        latents: &Tensor,
        context: &Tensor,
        empty_context: Option<&Tensor>,
        draws: &Draws,
    ) -> Result<Prepared> {
        let latents = latents.to_dtype(DType::F32)?;
        let context = self.captions(context, empty_context, &draws.keep_caption)?;
        let t = &draws.timesteps;
        let (noisy, target) = self.noise_and_target(&latents, &draws.noise, t)?;
        Ok(Prepared {
            noisy: noisy.to_dtype(self.compute)?,
            timesteps: t.iter().map(|&t| t as f32).collect(),
            context: context.to_dtype(self.compute)?,
            target,
        })
    }

    /// The (min-SNR weighted) MSE of an f32 `prediction` at timesteps `t`.
    fn prediction_loss(&self, prediction: &Tensor, target: &Tensor, t: &[usize]) -> Result<Tensor> {
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
            return Ok(latentflow_models::cuda::elementwise::noise_and_target(latents, noise, &a, &s, v)?);
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
        let rows = latents.dims()[0];
        self.train_shard(latents, context, empty_context, Shard { first: 0, global_rows: rows }, None)
    }

    /// One data-parallel optimizer step: this replica's rows (latents [B, 4, h, w] and
    /// `context` [B, N, D], positions `shard.first..` of the step's batch; B may be 0), split
    /// into `gradient_accumulation_steps` micro-batches, each micro-batch's loss weighted by its
    /// share of the WHOLE batch. `replicas` then sums the gradients over every replica (so the
    /// sum is the gradient of the batch's mean loss, however unevenly it was split) and every
    /// replica clips, steps AdamW and updates the EMA on the same numbers. With `None` this
    /// replica is alone ([`Trainer::train_batch`]).
    pub fn train_shard(
        &mut self,
        latents: &Tensor,
        context: &Tensor,
        empty_context: Option<&Tensor>,
        shard: Shard,
        replicas: Option<&mut dyn Replicas>,
    ) -> Result<StepReport> {
        if self.pending.micro_batches != 0 {
            return Err(ModelError::Input("train_batch called with micro-batches already pending".into()));
        }
        let rows = latents.dims()[0];
        let global = shard.global_rows;
        if global == 0 || shard.first + rows > global {
            return Err(ModelError::Input(format!(
                "an optimizer step needs at least one row, and rows {}..{} within the batch's {global}",
                shard.first,
                shard.first + rows
            )));
        }
        let parts = (self.options.gradient_accumulation_steps as usize).min(rows).max(1);
        let micro = rows.div_ceil(parts);
        let mut start = 0;
        while start < rows {
            let n = micro.min(rows - start);
            let (l, c) = (latents.narrow(0, start, n)?, context.narrow(0, start, n)?);
            let draws = self.draw_at(&l, Shard { first: shard.first + start, global_rows: global })?;
            self.accumulate(&l, &c, empty_context, &draws, n as f64 / global as f64)?;
            start += n;
        }
        self.rng.skip(self.draws_per_step(latents, global)?);
        if let Some(replicas) = replicas {
            self.reduce(replicas)?;
        }
        self.apply()
    }

    /// Sums the pending gradients, loss and sample count over the replicas, bucket by bucket.
    fn reduce(&mut self, replicas: &mut dyn Replicas) -> Result<()> {
        let buckets = self.buckets.get_or_insert_with(|| GradientBuckets::new(&self.params, DEFAULT_BUCKET_BYTES));
        let pending = &mut self.pending;
        let fail = |e: String| ModelError::Replicas(e);
        // Which parameters got a gradient anywhere, the loss and the rows: one small message.
        let names: Vec<String> = buckets.names().map(str::to_string).collect();
        let mut head: Vec<f32> = names.iter().map(|n| f32::from(pending.grads.contains_key(n))).collect();
        head.extend([pending.loss_sum as f32, pending.samples as f32]);
        replicas.all_reduce_sum(&mut head).map_err(fail)?;
        let present: std::collections::HashSet<&str> =
            names.iter().zip(&head).filter(|(_, &n)| n > 0.0).map(|(name, _)| name.as_str()).collect();
        pending.loss_sum = f64::from(head[names.len()]);
        pending.samples = head[names.len() + 1].round() as usize;
        for b in 0..buckets.len() {
            let mut buf = buckets.pack(b, &pending.grads)?;
            replicas.all_reduce_sum(&mut buf).map_err(fail)?;
            buckets.unpack(b, &buf, &mut pending.grads, &|n| present.contains(n), &self.params)?;
        }
        Ok(())
    }

    /// A hash of everything a replica must share at the start: weights, step and stream.
    pub fn checksum(&self) -> Result<u64> {
        let mut hash = 0xcbf2_9ce4_8422_2325u64 ^ self.step() ^ self.rng.state().rotate_left(17);
        for (name, var) in &self.params {
            for byte in name.bytes() {
                hash = (hash ^ u64::from(byte)).wrapping_mul(0x100_0000_01b3);
            }
            let values = var.as_tensor().to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
            for v in values {
                hash = (hash ^ u64::from(v.to_bits())).wrapping_mul(0x100_0000_01b3);
            }
        }
        Ok(hash)
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
        let (loss_value, grads, forward_s) = if self.options.gradient_checkpointing {
            self.checkpointed_grads(latents, context, empty_context, draws, weight)?
        } else {
            let loss = self.loss(latents, context, empty_context, draws)?;
            let loss_value = f64::from(loss.to_scalar::<f32>()?);
            self.check_finite(loss_value)?;
            let scaled = if weight != 1.0 { loss.affine(weight, 0.0)? } else { loss };
            let forward_s = started.elapsed().as_secs_f64();
            let store = scaled.backward()?;
            (loss_value, grads::collect(&self.params, &store), forward_s)
        };
        grads::accumulate(&mut self.pending.grads, grads)?;
        let p = &mut self.pending;
        p.micro_batches += 1;
        p.loss_sum += loss_value * draws.timesteps.len() as f64;
        p.samples += draws.timesteps.len();
        p.forward_s += forward_s;
        p.backward_s += started.elapsed().as_secs_f64() - forward_s;
        Ok(())
    }

    fn check_finite(&self, loss: f64) -> Result<()> {
        if !loss.is_finite() {
            return Err(ModelError::Input(format!("the loss is {loss} at step {}", self.step() + 1)));
        }
        Ok(())
    }

    /// One micro-batch's loss and gradients with gradient checkpointing (each block's
    /// activations recomputed in backward); the forward time is not told apart (0).
    fn checkpointed_grads(
        &self,
        latents: &Tensor,
        context: &Tensor,
        empty_context: Option<&Tensor>,
        draws: &Draws,
        weight: f64,
    ) -> Result<(f64, Grads, f64)> {
        let p = self.prepare(latents, context, empty_context, draws)?;
        let loss_value = std::cell::Cell::new(f64::NAN);
        let loss_of = |prediction: &Tensor| -> Result<Tensor> {
            let loss = self.prediction_loss(&prediction.to_dtype(DType::F32)?, &p.target, &draws.timesteps)?;
            let value = f64::from(loss.to_scalar::<f32>()?);
            self.check_finite(value)?;
            loss_value.set(value);
            Ok(if weight != 1.0 { loss.affine(weight, 0.0)? } else { loss })
        };
        let mut sum = Grads::new();
        let mut on_grads =
            |store: &candle_core::backprop::GradStore| grads::accumulate(&mut sum, grads::collect(&self.params, store));
        self.unet.forward_backward_checkpointed(&p.noisy, &p.timesteps, &p.context, &loss_of, &mut on_grads)?;
        Ok((loss_value.get(), sum, 0.0))
    }

    fn apply(&mut self) -> Result<StepReport> {
        let started = Instant::now();
        let pending = std::mem::take(&mut self.pending);
        let grad_norm = grads::global_norm(&pending.grads)?;
        // Clipping is folded into the optimizer step: one pass over the gradients, not two.
        let grad_scale = self.options.max_grad_norm.map_or(1.0, |max| grads::clip_coefficient(grad_norm, max));
        let lr = self.options.lr_schedule().at(self.optimizer.steps());
        self.optimizer.step_with_grad_scale(&self.params, &pending.grads, lr, grad_scale)?;
        let step = self.optimizer.steps();
        if let Some(ema) = &mut self.ema {
            ema.update(&self.params, step)?;
        }
        Ok(StepReport {
            step,
            loss: pending.loss_sum / pending.samples.max(1) as f64,
            grad_norm,
            lr,
            samples: pending.samples,
            forward_s: pending.forward_s,
            backward_s: pending.backward_s,
            optimizer_s: started.elapsed().as_secs_f64(),
        })
    }
}
