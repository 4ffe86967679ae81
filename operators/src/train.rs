//! `train`: the UNet's training loop as the graph's last node. Each epoch's rows are one global
//! batch and one optimizer step; it writes `metrics.jsonl`, checkpoints that resume exactly
//! (data position included), and at the end `loss.png` and `final/unet/` in the diffusers layout.

use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use candle_core::{Device, Tensor};
use latentflow_engine::{
    Batch, Column, ColumnType, Field, InstanceContext, JobConfig, KeyError, NodeSpec, OpContext, OpError,
    OperatorConfig, OperatorImpl, OperatorKind, Ports, Sink,
};
use serde::{Deserialize, Serialize};
use serde_json::json;

use crate::model_keys::{self, op_error};
use crate::models::load::{load_text_encoder, load_unet, load_vae, ModelSource};
use crate::models::AutoencoderKl;
use crate::rng::Rng;
use crate::tokenize::TokenizeConfig;
use crate::training::sampling::{write_grid, Ddim};
use crate::training::{checkpoint, loss_plot, NoiseSchedule, SchedulerConfig, StepReport, Trainer, TrainingOptions};

/// Config of `train`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TrainConfig {
    /// A diffusers pipeline folder: its `unet/` is the starting point, `scheduler/` the noise
    /// schedule, `text_encoder/` + `tokenizer/` give the empty caption for caption dropout.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub model: Option<PathBuf>,
    /// The UNet's own folder.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub path: Option<PathBuf>,
    /// A built-in UNet size with random initial weights (training from scratch); with `model`
    /// too, the UNet still starts from scratch and `model` gives the scheduler and text encoder.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub preset: Option<String>,
    /// A scheduler folder (`scheduler_config.json`); default `model/scheduler`, else SD's DDPM.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub scheduler: Option<PathBuf>,
    /// A text encoder folder for the empty caption (caption dropout); default `model/text_encoder`,
    /// else the preset.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub text_encoder: Option<PathBuf>,
    /// Rows per optimizer step: what one epoch brings (sources' batch_size x source workers).
    pub global_batch_size: usize,
    /// Stop after this many optimizer steps (counted over resumes).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_steps: Option<u64>,
    /// Save a checkpoint every this many steps (0: only at the end).
    pub checkpoint_every: u64,
    /// Checkpoints kept (0: all).
    pub keep_last: usize,
    /// `"latest"` (the newest checkpoint under the output folder, if any) or a checkpoint folder.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub resume: Option<String>,
    /// Also write each step's row keys to `metrics.jsonl`.
    pub log_keys: bool,
    /// Every this many steps, sample `sample_prompts` into `samples/step-N.png` (0: never).
    pub sample_every: u64,
    /// The prompts of the preview grid.
    pub sample_prompts: Vec<String>,
    /// DDIM steps per preview.
    pub sample_steps: usize,
    /// Classifier-free guidance scale of the previews.
    pub guidance_scale: f64,
    /// A VAE folder for decoding previews; default `model/vae`, else the preset.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub vae: Option<PathBuf>,
    /// The training hyperparameters (`[nodes.ID.training]`).
    pub training: TrainingOptions,
}

impl Default for TrainConfig {
    fn default() -> Self {
        TrainConfig {
            model: None,
            path: None,
            preset: None,
            scheduler: None,
            text_encoder: None,
            global_batch_size: 8,
            max_steps: None,
            checkpoint_every: 500,
            keep_last: 3,
            resume: None,
            log_keys: false,
            sample_every: 0,
            sample_prompts: vec!["a red circle on a blue background".into(), "a yellow square".into()],
            sample_steps: 20,
            guidance_scale: 7.5,
            vae: None,
            training: TrainingOptions::default(),
        }
    }
}

impl OperatorConfig for TrainConfig {
    const TYPE: &'static str = "train";
    const KIND: OperatorKind = OperatorKind::Sink;
    const SUMMARY: &'static str = "latents + caption_latents -> one UNet optimizer step per epoch; checkpoints, \
                                   metrics.jsonl, loss.png, final/unet";
    const EXAMPLE: &'static str = "preset = \"tiny\"\nglobal_batch_size = 8\nmax_steps = 100\n\n[training]\nlr = 1e-4";
    const KEYS: &'static [(&'static str, &'static str)] = &[
        ("model", "a diffusers pipeline folder: unet/ to start from, scheduler/, text_encoder/ + tokenizer/"),
        ("path", "the UNet's own folder to start from"),
        ("preset", "\"tiny\", \"sd2-base\" or \"sd1\": train from random weights (even with `model`, which then gives scheduler/ and text_encoder/)"),
        ("scheduler", "a scheduler folder (default model/scheduler, else SD's DDPM schedule)"),
        ("text_encoder", "text encoder folder for the empty caption of caption dropout (default model/text_encoder or the preset)"),
        ("global_batch_size", "rows per optimizer step = rows per epoch (default 8)"),
        ("max_steps", "stop after this many optimizer steps, counted over resumes"),
        ("checkpoint_every", "save a checkpoint every N steps (default 500; 0: only at the end)"),
        ("keep_last", "checkpoints kept (default 3; 0 keeps all)"),
        ("resume", "\"latest\" (the newest checkpoint under the output folder, if any) or a checkpoint folder"),
        ("log_keys", "write each step's row keys to metrics.jsonl (default false)"),
        ("sample_every", "every N steps, decode sample_prompts with DDIM + the VAE into samples/step-N.png (default 0: never)"),
        ("sample_prompts", "prompts of the preview grid"),
        ("sample_steps", "DDIM steps per preview (default 20)"),
        ("guidance_scale", "classifier-free guidance of the previews (default 7.5)"),
        ("vae", "VAE folder for decoding previews (default model/vae or the preset)"),
        ("training", "table of training options: lr, warmup_steps, lr_decay, total_steps, adam_*, weight_decay, max_grad_norm, gradient_accumulation_steps, snr_gamma, noise_offset, caption_dropout, ema_decay, ema_start_step, precision, seed"),
    ];
}

impl TrainConfig {
    /// The checkpoint this run continues from, if any.
    pub fn resume_checkpoint(&self, job: &JobConfig) -> Result<Option<PathBuf>, OpError> {
        match self.resume.as_deref() {
            None => Ok(None),
            Some("latest") => checkpoint::latest(&job.output_dir()).map_err(op_error),
            Some(dir) => {
                let dir = PathBuf::from(dir);
                checkpoint::read_state(&dir).map_err(op_error)?;
                Ok(Some(dir))
            }
        }
    }

    fn schedule(&self) -> Result<NoiseSchedule, OpError> {
        let folder = self.scheduler.clone().or_else(|| self.model.as_ref().map(|m| m.join("scheduler")));
        match folder {
            Some(dir) => NoiseSchedule::from_folder(&dir),
            None => NoiseSchedule::new(&SchedulerConfig::default(), Path::new("the default SD schedule")),
        }
        .map_err(op_error)
    }

    /// Text embeddings [N, 77, D] of `texts`, with the text encoder and tokenizer of `model`
    /// (or `text_encoder`, or the preset and the bundled vocabulary).
    fn encode_texts(&self, texts: &[String], device: &Device, seed: u64) -> Result<Tensor, OpError> {
        let source = model_keys::source(
            self.model.as_deref(),
            self.text_encoder.as_deref(),
            self.preset.as_deref(),
            "text_encoder",
        )?;
        let encoder = load_text_encoder(&source, device, seed).map_err(op_error)?;
        let (tokenizer, padding, length) =
            TokenizeConfig { model: self.model.clone(), ..Default::default() }.build()?;
        let ids: Vec<i64> = texts.iter().flat_map(|t| tokenizer.input_ids(t, padding, length).0).collect();
        let ids = Tensor::from_vec(ids, (texts.len(), length), device).map_err(op_error)?;
        encoder.forward(&ids, false).map_err(op_error)
    }

    /// The empty caption's embedding [1, 77, D] (for caption dropout and previews) and the
    /// preview prompts' [P, 77, D], from one load of the text encoder; `None` where not needed.
    fn text_conditions(&self, device: &Device, seed: u64) -> Result<(Option<Tensor>, Option<Tensor>), OpError> {
        let previews = self.sample_every > 0;
        if self.training.caption_dropout <= 0.0 && !previews {
            return Ok((None, None));
        }
        let prompts = if previews { self.sample_prompts.as_slice() } else { &[] };
        let texts: Vec<String> = std::iter::once(String::new()).chain(prompts.iter().cloned()).collect();
        let all = self.encode_texts(&texts, device, seed)?;
        let empty = all.narrow(0, 0, 1).map_err(op_error)?;
        let prompts = previews.then(|| all.narrow(0, 1, prompts.len())).transpose().map_err(op_error)?;
        Ok((Some(empty), prompts))
    }

    /// What previews need, when on: the VAE decoder and the sampler for the prompts `context`.
    fn previews(
        &self,
        device: &Device,
        seed: u64,
        schedule: &NoiseSchedule,
        context: Option<Tensor>,
    ) -> Result<Option<Previews>, OpError> {
        let Some(context) = context else { return Ok(None) };
        let source = model_keys::source(self.model.as_deref(), self.vae.as_deref(), self.preset.as_deref(), "vae")?;
        let vae = load_vae(&source, device, seed).map_err(op_error)?;
        Ok(Some(Previews { context, ddim: Ddim::new(schedule, self.sample_steps), vae }))
    }
}

impl NodeSpec for TrainConfig {
    fn validate(&self) -> Vec<KeyError> {
        let mut errors = model_keys::check_source(self.model.as_deref(), self.path.as_deref(), self.preset.as_deref());
        errors.extend(KeyError::check_range("global_batch_size", self.global_batch_size, 1, 1 << 24));
        if let Some(max) = self.max_steps {
            errors.extend(KeyError::check_range("max_steps", max, 1, u64::MAX));
        }
        errors.extend(self.training.problems().into_iter().map(|p| KeyError::new("training", p)));
        if self.sample_every > 0 {
            if self.sample_prompts.is_empty() {
                errors.push(KeyError::new("sample_prompts", "previews need at least one prompt"));
            }
            errors.extend(KeyError::check_range("sample_steps", self.sample_steps, 1, 1000));
            if !(self.guidance_scale.is_finite() && self.guidance_scale >= 1.0) {
                errors.push(KeyError::new("guidance_scale", format!("must be >= 1, got {}", self.guidance_scale)));
            }
        }
        if let Some(dir) = self.resume.as_deref().filter(|r| *r != "latest") {
            if !Path::new(dir).join("state.json").is_file() {
                errors.push(KeyError::new(
                    "resume",
                    format!(
                        "`{dir}` is not a checkpoint folder (no state.json); use \"latest\" or a checkpoint-N folder"
                    ),
                ));
            }
        }
        errors
    }

    fn ports(&self) -> Ports {
        Ports {
            requires: vec![
                Field::new("key", ColumnType::I64),
                Field::new("latents", ColumnType::F32Tensor),
                Field::new("caption_latents", ColumnType::F32Tensor),
            ],
            ..Ports::default()
        }
    }

    fn instantiate(&self, ctx: &InstanceContext<'_>) -> Result<OperatorImpl, OpError> {
        Ok(OperatorImpl::Sink(Box::new(Train::new(self.clone(), ctx.job)?)))
    }

    fn resume_data_position(&self, job: &JobConfig) -> Result<Option<serde_json::Value>, OpError> {
        let Some(dir) = self.resume_checkpoint(job)? else { return Ok(None) };
        let state = checkpoint::read_state(&dir).map_err(op_error)?;
        Ok(Some(state.data_position).filter(|p| !p.is_null()))
    }
}

/// The `train` sink.
pub struct Train {
    config: TrainConfig,
    source: ModelSource,
    output_dir: PathBuf,
    seed: u64,
    resume: Option<PathBuf>,
    run: Option<Run>,
}

/// A started run: the trainer and what the current epoch has brought.
struct Run {
    trainer: Trainer,
    device: Device,
    empty_caption: Option<Tensor>,
    previews: Option<Previews>,
    metrics: File,
    losses: Vec<(u64, f64)>,
    rows: Vec<Row>,
    shapes: Option<(Vec<usize>, Vec<usize>)>,
    idle_since: Instant,
    busy_in_writes: Duration,
    position: Option<serde_json::Value>,
    checkpointed_step: u64,
    warned_short: bool,
}

/// What preview sampling needs: the decoder, the prompts' embeddings and the sampler.
struct Previews {
    vae: AutoencoderKl,
    context: Tensor,
    ddim: Ddim,
}

/// The key of the preview noise ("samples"): the same noise at every preview, so grids compare.
const PREVIEW_STREAM: u64 = 0x0073_616d_706c_6573;

struct Row {
    key: i64,
    latents: Vec<f32>,
    caption: Vec<f32>,
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

    fn metrics_path(&self) -> PathBuf {
        self.output_dir.join("metrics.jsonl")
    }

    fn start_run(&mut self, device: Device) -> Result<Run, OpError> {
        let schedule = self.config.schedule()?;
        let (empty_caption, prompts) = self.config.text_conditions(&device, self.seed)?;
        let previews = self.config.previews(&device, self.seed, &schedule, prompts)?;
        let options = self.config.training.clone();
        let (trainer, step) = match &self.resume {
            Some(dir) => {
                let (trainer, state) = checkpoint::resume(dir, schedule, options, &device).map_err(op_error)?;
                tracing::info!(checkpoint = %dir.display(), step = state.step, "training resumes");
                (trainer, state.step)
            }
            None => {
                let (unet, weights) = load_unet(&self.source, &device, true, self.seed).map_err(op_error)?;
                (Trainer::new(unet, &weights, schedule, options).map_err(op_error)?, 0)
            }
        };
        std::fs::create_dir_all(&self.output_dir).map_err(|e| OpError::io(&self.output_dir, e))?;
        // Steps after the checkpoint are trained again: drop their lines.
        let losses = keep_metrics_up_to(&self.metrics_path(), step)?;
        let path = self.metrics_path();
        let metrics = OpenOptions::new().create(true).append(true).open(&path).map_err(|e| OpError::io(&path, e))?;
        Ok(Run {
            trainer,
            device,
            empty_caption,
            previews,
            metrics,
            losses,
            rows: Vec::new(),
            shapes: None,
            idle_since: Instant::now(),
            busy_in_writes: Duration::ZERO,
            position: None,
            checkpointed_step: step,
            warned_short: false,
        })
    }

    /// Samples the preview prompts with the current weights into `samples/step-N.png`.
    fn preview(&self, step: u64) -> Result<(), OpError> {
        let run = self.run.as_ref().ok_or_else(|| OpError::msg("train used before start"))?;
        let (Some(previews), Some(uncond), Some((latent_shape, _))) = (&run.previews, &run.empty_caption, &run.shapes)
        else {
            return Ok(());
        };
        let [c, h, w] = latent_shape[..] else { return Ok(()) };
        let mut rng = Rng::new(self.seed, PREVIEW_STREAM);
        let unet = run.trainer.unet();
        let guidance = self.config.guidance_scale;
        let latents =
            previews.ddim.sample(unet, &previews.context, uncond, guidance, (c, h, w), &mut rng).map_err(op_error)?;
        let path = self.output_dir.join("samples").join(format!("step-{step}.png"));
        let scale = previews.vae.config().scaling_factor;
        write_grid(&path, &previews.vae, &latents, scale).map_err(op_error)?;
        tracing::info!(path = %path.display(), "preview written");
        Ok(())
    }

    fn done(&self) -> bool {
        let (Some(run), Some(max)) = (&self.run, self.config.max_steps) else { return false };
        run.trainer.step() >= max
    }

    fn save_checkpoint(&mut self) -> Result<(), OpError> {
        let keep_last = self.config.keep_last;
        let run = self.run.as_mut().ok_or_else(|| OpError::msg("train used before start"))?;
        let position = run.position.clone().unwrap_or(serde_json::Value::Null);
        let loss = run.losses.last().map(|l| l.1);
        let path = checkpoint::save(&self.output_dir, &run.trainer, position, loss, keep_last).map_err(op_error)?;
        run.checkpointed_step = run.trainer.step();
        tracing::info!(checkpoint = %path.display(), "checkpoint saved");
        Ok(())
    }
}

/// Reads `(step, loss)` from an existing `metrics.jsonl`, keeping only the lines up to `step`.
fn keep_metrics_up_to(path: &Path, step: u64) -> Result<Vec<(u64, f64)>, OpError> {
    if !path.exists() {
        return Ok(Vec::new());
    }
    let file = File::open(path).map_err(|e| OpError::io(path, e))?;
    let mut kept = String::new();
    let mut losses = Vec::new();
    for line in BufReader::new(file).lines() {
        let line = line.map_err(|e| OpError::io(path, e))?;
        let value: serde_json::Value = serde_json::from_str(&line).unwrap_or_default();
        let (Some(s), Some(loss)) = (value["step"].as_u64(), value["loss"].as_f64()) else { continue };
        if s <= step {
            losses.push((s, loss));
            kept.push_str(&line);
            kept.push('\n');
        }
    }
    std::fs::write(path, kept).map_err(|e| OpError::io(path, e))?;
    Ok(losses)
}

fn f32_rows<'a>(batch: &'a Batch, name: &str) -> Result<(&'a [usize], &'a [f32]), OpError> {
    match batch.column(name)? {
        Column::F32Tensor { shape, data } => Ok((shape, data)),
        other => Err(OpError::msg(format!("`{name}` is a {} column, not f32", other.column_type()))),
    }
}

impl Sink for Train {
    fn start(&mut self, ctx: &mut OpContext) -> Result<(), OpError> {
        if ctx.worker().shards > 1 {
            return Err(OpError::msg(format!(
                "train runs on {} workers; data-parallel training needs a gradient all-reduce, which is not \
                 implemented yet: give the job one device (job.devices) and set placement = \"gpu\" on this node",
                ctx.worker().shards
            )));
        }
        let device = model_keys::device(ctx)?;
        self.run = Some(self.start_run(device)?);
        Ok(())
    }

    fn write(&mut self, batch: Batch, ctx: &mut OpContext) -> Result<(), OpError> {
        let began = Instant::now();
        let done = self.done();
        let run = self.run.as_mut().ok_or_else(|| OpError::msg("train used before start"))?;
        let keys = batch.i64s("key")?;
        if done {
            // In flight when max_steps was reached: not trained, and a resume reads them again.
            for key in keys {
                ctx.reject(key.to_string(), "after_max_steps");
            }
            return Ok(());
        }
        let (latent_shape, latents) = f32_rows(&batch, "latents")?;
        let (caption_shape, captions) = f32_rows(&batch, "caption_latents")?;
        let shapes = (latent_shape.to_vec(), caption_shape.to_vec());
        if run.shapes.get_or_insert_with(|| shapes.clone()) != &shapes {
            return Err(OpError::msg(format!(
                "rows of shapes {shapes:?} after rows of shapes {:?}: one run trains one resolution",
                run.shapes
            )));
        }
        let (l, c) = (latent_shape.iter().product::<usize>(), caption_shape.iter().product::<usize>());
        for (i, &key) in keys.iter().enumerate() {
            run.rows.push(Row {
                key,
                latents: latents[i * l..(i + 1) * l].to_vec(),
                caption: captions[i * c..(i + 1) * c].to_vec(),
            });
        }
        run.busy_in_writes += began.elapsed();
        Ok(())
    }

    fn end_epoch(&mut self, epoch: u64, ctx: &mut OpContext) -> Result<(), OpError> {
        let global = self.config.global_batch_size;
        let log_keys = self.config.log_keys;
        let run = self.run.as_mut().ok_or_else(|| OpError::msg("train used before start"))?;
        if run.rows.is_empty() {
            return Ok(());
        }
        let waited = run.idle_since.elapsed().saturating_sub(run.busy_in_writes).as_secs_f64();
        let mut rows = std::mem::take(&mut run.rows);
        if rows.len() > global {
            return Err(OpError::msg(format!(
                "epoch {epoch} brought {} rows but global_batch_size is {global}: set the source's batch_size x \
                 source workers to {global}",
                rows.len()
            )));
        }
        if rows.len() < global && !run.warned_short {
            run.warned_short = true;
            tracing::warn!(
                "epoch {epoch} brought {} rows, fewer than global_batch_size {global} (rows rejected upstream, or the \
                 end of the data): such steps train on the rows they have",
                rows.len()
            );
        }
        // Arrival order across workers varies; the key order does not.
        rows.sort_by_key(|r| r.key);
        let (latent_shape, caption_shape) = run.shapes.clone().expect("rows have shapes");
        let n = rows.len();
        let stack = |shape: &[usize], pick: fn(&Row) -> &[f32]| -> Result<Tensor, OpError> {
            let data: Vec<f32> = rows.iter().flat_map(|r| pick(r).iter().copied()).collect();
            let dims: Vec<usize> = std::iter::once(n).chain(shape.iter().copied()).collect();
            Tensor::from_vec(data, dims, &run.device).map_err(op_error)
        };
        let latents = stack(&latent_shape, |r| &r.latents)?;
        let context = stack(&caption_shape, |r| &r.caption)?;
        let began = Instant::now();
        let report = run.trainer.train_batch(&latents, &context, run.empty_caption.as_ref()).map_err(op_error)?;
        let step_s = began.elapsed().as_secs_f64();
        run.position = ctx.data_position(epoch);
        let keys: Vec<i64> = rows.iter().map(|r| r.key).collect();
        write_metrics(run, &report, waited, step_s, log_keys.then_some(&keys))?;
        run.idle_since = Instant::now();
        run.busy_in_writes = Duration::ZERO;
        let step = report.step;
        if self.config.checkpoint_every > 0 && step % self.config.checkpoint_every == 0 {
            self.save_checkpoint()?;
        }
        let every = self.config.sample_every;
        if every > 0 && step % every == 0 {
            self.preview(step)?;
        }
        if self.done() {
            tracing::info!(step, "max_steps reached");
            ctx.request_stop();
        }
        Ok(())
    }

    fn finish(&mut self, _ctx: &mut OpContext) -> Result<(), OpError> {
        let Some(run) = self.run.as_ref() else { return Ok(()) };
        if run.trainer.step() > run.checkpointed_step {
            self.save_checkpoint()?;
        }
        let run = self.run.as_ref().expect("started");
        let trainer = &run.trainer;
        let tensors = match trainer.ema() {
            Some(ema) => ema.tensors().iter().map(|(n, t)| (n.clone(), t.clone())).collect(),
            None => trainer.params().iter().map(|(n, v)| (n.clone(), v.as_tensor().detach())).collect(),
        };
        let final_dir = self.output_dir.join("final").join("unet");
        checkpoint::write_unet(&final_dir, trainer.unet().config(), &tensors).map_err(op_error)?;
        let plot = self.output_dir.join("loss.png");
        if !run.losses.is_empty() {
            loss_plot::draw(&plot, &run.losses).map_err(OpError::msg)?;
        }
        tracing::info!(steps = trainer.step(), unet = %final_dir.display(), loss_plot = %plot.display(), "training finished");
        Ok(())
    }
}

fn write_metrics(
    run: &mut Run,
    report: &StepReport,
    waited_s: f64,
    step_s: f64,
    keys: Option<&Vec<i64>>,
) -> Result<(), OpError> {
    let samples_per_s = report.samples as f64 / (step_s + waited_s).max(1e-9);
    let mut line = json!({
        "step": report.step,
        "loss": report.loss,
        "lr": report.lr,
        "grad_norm": report.grad_norm,
        "samples": report.samples,
        "samples_per_s": samples_per_s,
        "step_s": step_s,
        "wait_s": waited_s,
    });
    if let Some(keys) = keys {
        line["keys"] = json!(keys);
    }
    writeln!(run.metrics, "{line}").map_err(|e| OpError::io("metrics.jsonl", e))?;
    run.metrics.flush().map_err(|e| OpError::io("metrics.jsonl", e))?;
    run.losses.push((report.step, report.loss));
    if report.step % 10 == 0 || report.step == 1 {
        tracing::info!(
            step = report.step,
            loss = format!("{:.4}", report.loss),
            lr = report.lr,
            samples_per_s = format!("{samples_per_s:.1}"),
            "train"
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn validation_reports_every_problem() {
        let config = TrainConfig {
            preset: Some("huge".into()),
            global_batch_size: 0,
            resume: Some("/nonexistent".into()),
            training: TrainingOptions { lr: -1.0, ..Default::default() },
            ..Default::default()
        };
        let keys: Vec<_> = config.validate().into_iter().map(|e| e.key).collect();
        assert_eq!(keys, ["preset", "global_batch_size", "training", "resume"]);
    }

    #[test]
    fn metrics_after_the_resumed_step_are_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("metrics.jsonl");
        std::fs::write(&path, "{\"step\":1,\"loss\":0.5}\n{\"step\":2,\"loss\":0.4}\n{\"step\":3,\"loss\":0.3}\n")
            .unwrap();
        assert_eq!(keep_metrics_up_to(&path, 2).unwrap(), [(1, 0.5), (2, 0.4)]);
        assert_eq!(std::fs::read_to_string(&path).unwrap().lines().count(), 2);
    }
}
