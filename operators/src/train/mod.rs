//! `train`: the UNet's training loop as the graph's last node. Rows wait in one queue per shape
//! (resolution bucket, [`queue`]) until a bucket holds a global batch, which is one optimizer
//! step; a run of one resolution trains each epoch as its step. It writes `metrics.jsonl`,
//! checkpoints that resume exactly (data position and waiting rows included), and at the end
//! `loss.png` and `final/unet/` in the diffusers layout.
//!
//! On several workers the instances are data-parallel replicas of one model ([`replicas`]):
//! each trains its block of every step's rows, gradients are summed over them, and the first
//! writes the files.

mod conditions;
mod config;
pub mod handoff;
mod metrics;
mod queue;
mod replicas;
pub mod rows;

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use candle_core::{Device, Tensor};
use latentflow_engine::{Batch, JobConfig, OpContext, OpError, Sink};

pub use config::TrainConfig;

use crate::model_keys::{self, op_error};
use crate::models::load::{load_unet, ModelSource};
use crate::training::sampling::frozen_unet_of;
use crate::training::{checkpoint, loss_plot, Shard, Trainer};
use conditions::Previews;
use metrics::MetricsLog;
use queue::{BucketQueue, PlannedStep};
use replicas::{Replicas, FINISHED};
use rows::{Row, RowBuffer, RowValues, Shapes};

/// The `train` sink.
pub struct Train {
    config: TrainConfig,
    source: ModelSource,
    output_dir: PathBuf,
    seed: u64,
    resume: Option<PathBuf>,
    run: Option<Run>,
}

/// A started run: the trainer, its replicas and what the current epoch has brought.
struct Run {
    trainer: Trainer,
    replicas: Replicas,
    device: Device,
    empty_caption: Option<Tensor>,
    previews: Option<Previews>,
    metrics: MetricsLog,
    /// The current epoch's rows on this trainer, not yet announced.
    rows: RowBuffer,
    /// The rows every replica knows to be waiting for their step, by shape.
    queue: BucketQueue,
    /// The data of the waiting rows this replica holds, by id.
    held: HashMap<u64, Row>,
    /// The shapes of the last step (what previews sample at).
    last_shapes: Option<Shapes>,
    idle_since: Instant,
    busy_in_writes: Duration,
    /// The job's data position after the last epoch that reached the queue (what the next
    /// checkpoint saves).
    position: Option<serde_json::Value>,
    checkpointed_step: u64,
    /// Rows reached the queue since the last checkpoint.
    unsaved_rows: bool,
    warned_short: bool,
}

/// One step's rows as this replica trains them.
struct StepRows {
    /// This replica's block of the step, in key order.
    rows: Vec<Row>,
    /// The position of `rows[0]` in the step.
    first: usize,
    /// Rows in the step over all replicas.
    global_rows: usize,
    /// Every key of the step, in order.
    keys: Vec<i64>,
    shapes: Shapes,
}

impl Train {
    /// The sink for `config` in `job` (its output folder and seed); the model loads in `start`.
    pub fn new(config: TrainConfig, job: &JobConfig) -> Result<Train, OpError> {
        // A preset means training from scratch even with `model` set (which then gives the
        // scheduler and the empty caption), as the reference trains SD2's UNet.
        let model = if config.preset.is_some() { None } else { config.model.as_deref() };
        let source = model_keys::source(model, config.path.as_deref(), config.preset.as_deref(), "unet")?;
        Ok(Train {
            resume: config.resume_checkpoint(job)?,
            config,
            source,
            output_dir: job.output_dir(),
            seed: job.seed,
            run: None,
        })
    }

    /// The trainer, once started (for tests that compare the saved UNet with the one in memory).
    pub fn trainer(&self) -> Option<&Trainer> {
        self.run.as_ref().map(|r| &r.trainer)
    }

    fn run_mut(&mut self) -> Result<&mut Run, OpError> {
        self.run.as_mut().ok_or_else(|| OpError::msg("train used before start"))
    }

    fn start_run(&mut self, device: Device, replicas: Replicas) -> Result<Run, OpError> {
        let schedule = self.config.schedule()?;
        let (empty_caption, prompts) = self.config.text_conditions(&device, self.seed)?;
        let first = replicas.is_first();
        let previews = if first { self.config.previews(&device, self.seed, &schedule, prompts)? } else { None };
        let options = self.config.training.clone();
        let (mut queue, mut held, mut position) = (BucketQueue::default(), HashMap::new(), None);
        let (trainer, step) = match &self.resume {
            Some(dir) => {
                let (trainer, state) = checkpoint::resume(dir, schedule, options, &device).map_err(op_error)?;
                tracing::info!(checkpoint = %dir.display(), step = state.step, "training resumes");
                position = Some(state.data_position.clone()).filter(|p| !p.is_null());
                if let Some(waiting) = checkpoint::read_waiting(dir, &Device::Cpu).map_err(op_error)? {
                    (queue, held) = restore_waiting(&waiting, replicas.rank(), replicas.size())?;
                    tracing::info!(rows = queue.len(), "rows waiting in their buckets restored");
                }
                (trainer, state.step)
            }
            None => {
                let (unet, weights) = load_unet(&self.source, &device, true, self.seed).map_err(op_error)?;
                let mut trainer = Trainer::new(unet, &weights, schedule, options).map_err(op_error)?;
                if let Some(from) = &self.config.optimizer_from {
                    let dir = checkpoint::checkpoint_in(from).map_err(op_error)?;
                    let optimizer =
                        checkpoint::read_optimizer(&dir, &self.config.training, &device).map_err(op_error)?;
                    trainer.carry_optimizer(optimizer).map_err(op_error)?;
                    tracing::info!(from = %dir.display(), step = trainer.step(), "optimizer state carried over");
                }
                let step = trainer.step();
                (trainer, step)
            }
        };
        if first {
            std::fs::create_dir_all(&self.output_dir).map_err(|e| OpError::io(&self.output_dir, e))?;
            checkpoint::remove_stale(&self.output_dir).map_err(op_error)?;
        }
        let metrics = MetricsLog::open(&self.output_dir.join("metrics.jsonl"), step, first)?;
        Ok(Run {
            trainer,
            replicas,
            device,
            empty_caption,
            previews,
            metrics,
            rows: RowBuffer::default(),
            queue,
            held,
            last_shapes: None,
            idle_since: Instant::now(),
            busy_in_writes: Duration::ZERO,
            position,
            checkpointed_step: step,
            unsaved_rows: false,
            warned_short: false,
        })
    }

    /// Samples the preview prompts with the current weights (the EMA's when it is on) into
    /// `samples/step-N.png`.
    fn preview(&self, step: u64) -> Result<(), OpError> {
        let Some(run) = self.run.as_ref() else { return Ok(()) };
        let (Some(previews), Some(uncond), Some((latent_shape, _))) =
            (&run.previews, &run.empty_caption, &run.last_shapes)
        else {
            return Ok(());
        };
        let [c, h, w] = latent_shape[..] else { return Ok(()) };
        let path = self.output_dir.join("samples").join(format!("step-{step}.png"));
        // The EMA's weights when it is on, as diffusers' validation images use.
        let weights = run.trainer.inference_weights();
        let unet = frozen_unet_of(run.trainer.unet().config(), weights, &run.device).map_err(op_error)?;
        previews.write(&path, &unet, uncond, self.config.guidance_scale, (c, h, w), self.seed)
    }

    fn done(&self) -> bool {
        let (Some(run), Some(max)) = (&self.run, self.config.max_steps) else { return false };
        run.trainer.step() >= max
    }

    /// Saves a checkpoint with the whole job's data position (every replica takes part; the
    /// first writes it).
    fn save_checkpoint(&mut self) -> Result<(), OpError> {
        let keep_last = self.config.keep_last;
        let output_dir = self.output_dir.clone();
        let run = self.run_mut()?;
        let position = run.replicas.job_position(run.position.clone())?;
        let waiting = match run.queue.len() {
            0 => None,
            _ => run.replicas.gather_waiting(&run.queue, &run.held)?,
        };
        run.checkpointed_step = run.trainer.step();
        run.unsaved_rows = false;
        if !run.replicas.is_first() {
            return Ok(());
        }
        let waiting = waiting.map(|rows| save_waiting(&run.queue, rows)).transpose()?;
        let loss = run.metrics.losses.last().map(|l| l.1);
        let position = position.unwrap_or(serde_json::Value::Null);
        let path =
            checkpoint::save_with_waiting(&output_dir, &run.trainer, position, loss, keep_last, waiting.as_ref())
                .map_err(op_error)?;
        tracing::info!(checkpoint = %path.display(), "checkpoint saved");
        Ok(())
    }

    /// Agrees with the other replicas on epochs until `epoch` has reached the queue
    /// (`FINISHED`: until every replica has finished), training every step the queue gives.
    fn train_through(&mut self, epoch: u64, ctx: &mut OpContext) -> Result<(), OpError> {
        let stopping = epoch == FINISHED && ctx.stop_reason().is_some();
        let run = self.run_mut()?;
        let mut rows = Some(run.rows.take());
        // Steps a restored queue still owes (none otherwise), before any new row joins it.
        self.train_waiting(false, ctx)?;
        while let Some(mine) = rows.take() {
            if self.done() {
                // Every replica is at the same step, so all stop here; a resume reads these again.
                mine.iter().for_each(|r| ctx.reject(r.key.to_string(), "after_max_steps"));
                return Ok(());
            }
            let run = self.run_mut()?;
            let arrivals = run.replicas.announce(epoch, &mine, stopping)?;
            let ids = run.queue.add(&arrivals.rows);
            if arrivals.epoch == epoch {
                let mut mine: Vec<Option<Row>> = mine.into_iter().map(Some).collect();
                for (id, index) in ids.into_iter().zip(&arrivals.mine) {
                    if let Some(row) = index.and_then(|i| mine[i].take()) {
                        run.held.insert(id, row);
                    }
                }
            } else {
                rows = Some(mine); // an earlier epoch of another replica: announce ours again
            }
            if arrivals.epoch != FINISHED {
                run.position = ctx.data_position(arrivals.epoch).or(run.position.take());
                run.unsaved_rows |= !arrivals.rows.is_empty();
            }
            self.train_waiting(arrivals.at_end, ctx)?;
        }
        Ok(())
    }

    /// Trains the steps the queue gives now (`at_end`: the data has ended, what is left trains).
    fn train_waiting(&mut self, at_end: bool, ctx: &mut OpContext) -> Result<(), OpError> {
        loop {
            if self.done() {
                return Ok(());
            }
            let global = self.config.global_batch_size;
            let run = self.run_mut()?;
            let Some(planned) = run.queue.next_step(global, at_end) else { return Ok(()) };
            let (rows, first) = run.replicas.take_block(&planned, &mut run.held)?;
            let PlannedStep { shapes, rows: all } = planned;
            let keys = all.iter().map(|w| w.key).collect();
            self.train_step(StepRows { rows, first, global_rows: all.len(), keys, shapes }, ctx)?;
        }
    }

    /// One optimizer step on this replica's block of `step`, then metrics, checkpoint, preview.
    fn train_step(&mut self, step: StepRows, ctx: &mut OpContext) -> Result<(), OpError> {
        let global = self.config.global_batch_size;
        let log_keys = self.config.log_keys;
        let run = self.run_mut()?;
        if step.global_rows < global && !run.warned_short && run.replicas.is_first() {
            run.warned_short = true;
            tracing::warn!(
                "a step of {} rows, fewer than global_batch_size {global} (rows rejected upstream, or the end of the \
                 data or of a bucket): such steps train on the rows they have",
                step.global_rows
            );
        }
        let shapes = step.shapes.clone();
        let waited = run.idle_since.elapsed().saturating_sub(run.busy_in_writes).as_secs_f64();
        let stacked = rows::stack(&step.rows, &shapes, &run.device)?;
        let (latents, context) = (stacked.latents, stacked.captions);
        ctx.count("rows_from_host", stacked.handoff.rows_from_host);
        ctx.count("rows_on_device", stacked.handoff.rows_on_device);
        ctx.count("rows_moved_between_devices", stacked.handoff.rows_moved);
        ctx.count("device_to_device_copies", stacked.handoff.device_copies);
        let began = Instant::now();
        let shard = Shard { first: step.first, global_rows: step.global_rows };
        let empty = run.empty_caption.as_ref();
        let mut reduced = None;
        let report = match run.replicas.gradient_sum() {
            Some(mut sum) => {
                let report = run.trainer.train_shard(&latents, &context, empty, shard, Some(&mut sum));
                reduced = Some(sum.figures());
                report
            }
            None => run.trainer.train_shard(&latents, &context, empty, shard, None),
        }
        .map_err(op_error)?;
        let step_s = began.elapsed().as_secs_f64();
        let keys = log_keys.then_some(step.keys.as_slice());
        run.metrics.write(&report, waited, step_s, keys, reduced, resolution(&shapes))?;
        run.last_shapes = Some(shapes);
        run.idle_since = Instant::now();
        run.busy_in_writes = Duration::ZERO;
        let first = run.replicas.is_first();
        let step = report.step;
        if self.config.checkpoint_every > 0 && step % self.config.checkpoint_every == 0 {
            self.save_checkpoint()?;
        }
        let every = self.config.sample_every;
        if first && every > 0 && step % every == 0 {
            self.preview(step)?;
        }
        if self.done() {
            tracing::info!(step, "max_steps reached");
            ctx.request_stop();
        }
        Ok(())
    }
}

/// The pixel `[width, height]` of a step's latents `[c, h, w]` (the VAE's factor of 8).
fn resolution(shapes: &Shapes) -> Option<[usize; 2]> {
    match shapes.0[..] {
        [_, h, w] => Some([w * 8, h * 8]),
        _ => None,
    }
}

/// The waiting rows' tensors for a checkpoint (`rows` in `queue`'s order), named by row id.
fn save_waiting(queue: &BucketQueue, rows: Vec<Row>) -> Result<checkpoint::WaitingRows, OpError> {
    let index = serde_json::to_value(queue).map_err(|e| OpError::msg(e.to_string()))?;
    let mut tensors = HashMap::new();
    for ((_, w), row) in queue.waiting().zip(rows) {
        let latents = Tensor::from_slice(&row.latents.to_host()?, row.shapes.0, &Device::Cpu).map_err(op_error)?;
        let caption = Tensor::from_slice(&row.caption.to_host()?, row.shapes.1, &Device::Cpu).map_err(op_error)?;
        tensors.insert(format!("latents.{}", w.id), latents);
        tensors.insert(format!("caption.{}", w.id), caption);
    }
    Ok(checkpoint::WaitingRows { index, tensors })
}

/// The queue a checkpoint saved, its rows given out anew over `size` replicas, and the rows
/// replica `rank` holds.
fn restore_waiting(
    waiting: &checkpoint::WaitingRows,
    rank: usize,
    size: usize,
) -> Result<(BucketQueue, HashMap<u64, Row>), OpError> {
    let mut queue: BucketQueue = serde_json::from_value(waiting.index.clone())
        .map_err(|e| OpError::msg(format!("the checkpoint's waiting rows are unreadable: {e}")))?;
    queue.reassign(size);
    let mut held = HashMap::new();
    for (shapes, w) in queue.waiting().filter(|(_, w)| w.holder == rank) {
        let values = |name: String| -> Result<Vec<f32>, OpError> {
            let tensor = waiting
                .tensors
                .get(&name)
                .ok_or_else(|| OpError::msg(format!("the checkpoint's waiting rows lack `{name}`")))?;
            tensor.flatten_all().and_then(|t| t.to_vec1::<f32>()).map_err(op_error)
        };
        let row = Row {
            key: w.key,
            shapes: shapes.clone(),
            latents: RowValues::owned(values(format!("latents.{}", w.id))?),
            caption: RowValues::owned(values(format!("caption.{}", w.id))?),
        };
        held.insert(w.id, row);
    }
    Ok((queue, held))
}

impl Sink for Train {
    fn start(&mut self, ctx: &mut OpContext) -> Result<(), OpError> {
        let device = model_keys::device(ctx)?;
        let replicas = Replicas::new(ctx.take_collective());
        let mut run = self.start_run(device, replicas)?;
        run.replicas.check_identical(&run.trainer)?;
        #[cfg(feature = "nccl")]
        run.replicas.join_nccl(ctx.worker().device.as_deref())?;
        if run.replicas.size() > 1 && run.replicas.is_first() {
            tracing::info!(replicas = run.replicas.size(), "data-parallel training");
        }
        self.run = Some(run);
        Ok(())
    }

    fn write(&mut self, batch: Batch, ctx: &mut OpContext) -> Result<(), OpError> {
        let began = Instant::now();
        if self.done() {
            // In flight when max_steps was reached: not trained, and a resume reads them again.
            for key in batch.i64s("key")? {
                ctx.reject(key.to_string(), "after_max_steps");
            }
            return Ok(());
        }
        let run = self.run_mut()?;
        run.rows.push(batch)?;
        run.busy_in_writes += began.elapsed();
        Ok(())
    }

    fn end_epoch(&mut self, epoch: u64, ctx: &mut OpContext) -> Result<(), OpError> {
        if ctx.job_failed() {
            return Ok(()); // this epoch may be missing rows: never train (or checkpoint) on it
        }
        self.train_through(epoch, ctx)
    }

    fn finish(&mut self, ctx: &mut OpContext) -> Result<(), OpError> {
        if self.run.is_none() {
            return Ok(());
        }
        if ctx.job_failed() {
            let step = self.run.as_ref().map_or(0, |r| r.checkpointed_step);
            tracing::warn!(step, "the job failed: no final model; the last checkpoint (step {step}) is kept");
            return Ok(());
        }
        // Steps some replicas still hold rows for; then every replica is finished.
        self.train_through(FINISHED, ctx)?;
        let done = self.done();
        let run = self.run_mut()?;
        if done {
            // Waiting when max_steps was reached: not trained (the checkpoint keeps them).
            run.held.values().for_each(|r| ctx.reject(r.key.to_string(), "after_max_steps"));
        }
        if run.trainer.step() > run.checkpointed_step || run.unsaved_rows {
            self.save_checkpoint()?;
        }
        let run = self.run.as_ref().expect("started");
        if !run.replicas.is_first() {
            return Ok(());
        }
        let trainer = &run.trainer;
        // Only a run that trained to its end (the data ran out, or max_steps) leaves a final model;
        // one stopped early (Ctrl-C, SIGTERM, a peer) leaves its checkpoint to resume from.
        if let (Some(reason), false) = (ctx.stop_reason(), self.done()) {
            tracing::warn!(
                step = trainer.step(),
                ?reason,
                "training stopped before the end of its data: no final model; resume from the checkpoint with \
                 resume = \"latest\""
            );
            return Ok(());
        }
        // A complete diffusers pipeline: the EMA's UNet when EMA is on (the raw one beside it).
        let tensors = trainer.inference_weights();
        let raw = trainer.ema().is_some().then(|| trainer.detached_weights());
        let parts = self.config.frozen_parts(self.seed)?;
        let config = trainer.unet().config();
        let final_dir = checkpoint::write_final_pipeline(&self.output_dir, config, &tensors, raw.as_ref(), &parts)
            .map_err(op_error)?;
        let plot = self.output_dir.join("loss.png");
        if !run.metrics.losses.is_empty() {
            loss_plot::draw(&plot, &run.metrics.losses).map_err(OpError::msg)?;
        }
        tracing::info!(steps = trainer.step(), pipeline = %final_dir.display(), loss_plot = %plot.display(), "training finished");
        Ok(())
    }
}
