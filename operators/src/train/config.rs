//! `train`'s configuration: its keys, their validation, and the checkpoint a run resumes from.

use std::path::{Path, PathBuf};

use latentflow_engine::{
    ColumnType, Field, InstanceContext, JobConfig, KeyError, NodeSpec, OpError, OperatorConfig, OperatorImpl,
    OperatorKind, Ports,
};
use serde::{Deserialize, Serialize};

use super::Train;
use crate::model_keys::{self, op_error};
use crate::models::{TEXT_PRESETS, VAE_PRESETS};
use crate::training::schedule::Prediction;
use crate::training::{checkpoint, NoiseSchedule, SchedulerConfig, TrainingOptions};

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
    /// Rows per optimizer step, over all trainers: what one epoch brings. The sources' share of
    /// it per worker follows from the plan (`batch_size` left out), and the trainers split it
    /// between them by row key.
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
    /// A checkpoint folder (or a run folder: its newest checkpoint) whose optimizer state, AdamW
    /// moments and step, a new run carries over, as a second phase continues the first's
    /// (the step count and learning-rate schedule go on from it). Unset: a fresh optimizer.
    /// A `resume` checkpoint takes precedence.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub optimizer_from: Option<PathBuf>,
    /// Also write each step's row keys to `metrics.jsonl`.
    pub log_keys: bool,
    /// Every this many steps, sample `sample_prompts` into `samples/step-N.png` (0: never).
    pub sample_every: u64,
    /// The prompts of the preview grid (default: two in the demo captions' style).
    pub sample_prompts: Vec<String>,
    /// DDIM steps per preview.
    pub sample_steps: usize,
    /// Classifier-free guidance scale of the previews.
    pub guidance_scale: f64,
    /// A VAE folder for decoding previews; default `model/vae`, else the preset.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub vae: Option<PathBuf>,
    /// What the UNet learns to predict, `epsilon` or `v_prediction`, instead of the scheduler's
    /// (`final/scheduler` records it). v-prediction learns an image's overall colours from the
    /// caption much sooner (its loss at high noise is about the image, not the noise), which is
    /// why the demo uses it; SD2 768-v trains with it too.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub prediction_type: Option<Prediction>,
    /// A text encoder preset for the empty caption, the previews and `final/text_encoder`
    /// instead of `text_encoder` / `model` / `preset`: `words` when `text_encode` uses the
    /// demo's fixed encoder.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub text_encoder_preset: Option<String>,
    /// A VAE preset for the previews and `final/vae` instead of `vae` / `model` / `preset`:
    /// `pixels` when `vae_encode` encodes with the demo's fixed autoencoder.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub vae_preset: Option<String>,
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
            optimizer_from: None,
            log_keys: false,
            sample_every: 0,
            // In the demo captions' own words, so the main job's previews can be read against them.
            sample_prompts: vec![
                "a large red circle in the center on a blue background".into(),
                "a large yellow square in the center on a green background".into(),
            ],
            sample_steps: 20,
            guidance_scale: 7.5,
            vae: None,
            prediction_type: None,
            text_encoder_preset: None,
            vae_preset: None,
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
        ("global_batch_size", "rows per optimizer step over all trainers = rows per epoch (default 8); sources without batch_size emit their share of it"),
        ("max_steps", "stop after this many optimizer steps, counted over resumes"),
        ("checkpoint_every", "save a checkpoint every N steps (default 500; 0: only at the end)"),
        ("keep_last", "checkpoints kept (default 3; 0 keeps all)"),
        ("resume", "\"latest\" (the newest checkpoint under the output folder, if any) or a checkpoint folder"),
        ("optimizer_from", "a checkpoint (or run) folder whose AdamW moments and step a new run carries over, as phase 2 continues phase 1 (default: a fresh optimizer)"),
        ("log_keys", "write each step's row keys to metrics.jsonl (default false)"),
        ("sample_every", "every N steps, decode sample_prompts with DDIM + the VAE into samples/step-N.png (default 0: never)"),
        ("sample_prompts", "prompts of the preview grid"),
        ("sample_steps", "DDIM steps per preview (default 20)"),
        ("guidance_scale", "classifier-free guidance of the previews (default 7.5)"),
        ("vae", "VAE folder for decoding previews (default model/vae or the preset)"),
        ("prediction_type", "\"epsilon\" or \"v_prediction\": what the UNet predicts, instead of the scheduler's (written to final/scheduler)"),
        ("text_encoder_preset", "a text encoder preset for the empty caption, previews and final/text_encoder instead (\"words\": the demo's fixed encoder, as its text_encode uses)"),
        ("vae_preset", "a VAE preset for previews and final/vae instead (\"pixels\": the demo's fixed autoencoder, as its vae_encode uses)"),
        ("training", "table of training options: lr, warmup_steps, lr_decay, total_steps, adam_*, weight_decay, max_grad_norm, gradient_accumulation_steps, snr_gamma, noise_offset, caption_dropout, ema_decay, ema_start_step, precision, gradient_checkpointing, seed"),
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

    /// The scheduler folder (`scheduler`, else `model/scheduler`) if there is one, and the
    /// schedule's config: the folder's (else SD's DDPM) with `prediction_type` applied.
    /// Also says whether `prediction_type` changed the folder's config.
    pub(super) fn scheduler_config(&self) -> Result<(Option<PathBuf>, SchedulerConfig, bool), OpError> {
        let folder = self.scheduler.clone().or_else(|| self.model.as_ref().map(|m| m.join("scheduler")));
        let mut config: SchedulerConfig = match &folder {
            Some(dir) => {
                let path = dir.join("scheduler_config.json");
                let text = std::fs::read_to_string(&path).map_err(|e| OpError::io(&path, e))?;
                serde_json::from_str(&text).map_err(|e| OpError::msg(format!("{}: {e}", path.display())))?
            }
            None => SchedulerConfig::default(),
        };
        let changed = self.prediction_type.is_some_and(|p| p != config.prediction_type);
        if let Some(prediction) = self.prediction_type {
            config.prediction_type = prediction;
        }
        Ok((folder, config, changed))
    }

    pub(super) fn schedule(&self) -> Result<NoiseSchedule, OpError> {
        let (folder, config, _) = self.scheduler_config()?;
        let origin =
            folder.map_or_else(|| PathBuf::from("the default SD schedule"), |d| d.join("scheduler_config.json"));
        NoiseSchedule::new(&config, &origin).map_err(op_error)
    }
}

/// A part's preset key (`vae_preset`, `text_encoder_preset`): one of `known`, and not beside
/// the part's folder key.
fn exclusive_preset(
    (folder_key, folder_set): (&str, bool),
    (preset_key, preset): (&str, Option<&str>),
    known: &[&str],
) -> Vec<KeyError> {
    match preset {
        Some(_) if folder_set => {
            vec![KeyError::new(preset_key, format!("set `{folder_key}` (a folder) or `{preset_key}`, not both"))]
        }
        Some(p) if !known.contains(&p) => {
            vec![KeyError::new(preset_key, format!("unknown preset `{p}`; use one of {}", known.join(", ")))]
        }
        _ => Vec::new(),
    }
}

impl NodeSpec for TrainConfig {
    fn validate(&self) -> Vec<KeyError> {
        let (model, path, preset) = (self.model.as_deref(), self.path.as_deref(), self.preset.as_deref());
        let mut errors = model_keys::check_source(model, path, preset);
        // As `Train::new` resolves them: a preset trains from scratch, `model` still gives the
        // frozen parts the previews use.
        errors.extend(model_keys::check_config(
            if preset.is_some() { None } else { model },
            ("path", path),
            preset,
            "unet",
        ));
        match (&self.vae, self.vae_preset.as_deref()) {
            (Some(_), Some(_)) => {
                errors.push(KeyError::new("vae_preset", "set `vae` (a folder) or `vae_preset`, not both"))
            }
            (_, Some(p)) if !VAE_PRESETS.contains(&p) => errors.push(KeyError::new(
                "vae_preset",
                format!("unknown VAE preset `{p}`; use one of {}", VAE_PRESETS.join(", ")),
            )),
            (_, Some(_)) => {}
            (_, None) => errors.extend(model_keys::check_config(model, ("vae", self.vae.as_deref()), preset, "vae")),
        }
        errors.extend(exclusive_preset(
            ("text_encoder", self.text_encoder.is_some()),
            ("text_encoder_preset", self.text_encoder_preset.as_deref()),
            &TEXT_PRESETS,
        ));
        if self.text_encoder_preset.is_none() {
            errors.extend(model_keys::check_config(
                model,
                ("text_encoder", self.text_encoder.as_deref()),
                preset,
                "text_encoder",
            ));
        }
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
        if let Some(from) = &self.optimizer_from {
            if let Err(e) = checkpoint::checkpoint_in(from) {
                errors.push(KeyError::new("optimizer_from", e.to_string()));
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

    fn collective(&self) -> bool {
        true // data-parallel: the instances average their gradients
    }

    fn global_batch_size(&self) -> Option<usize> {
        Some(self.global_batch_size)
    }

    fn resume_data_position(&self, job: &JobConfig) -> Result<Option<serde_json::Value>, OpError> {
        let Some(dir) = self.resume_checkpoint(job)? else { return Ok(None) };
        let state = checkpoint::read_state(&dir).map_err(op_error)?;
        Ok(Some(state.data_position).filter(|p| !p.is_null()))
    }
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
    fn vae_preset_is_a_known_vae_preset_and_excludes_a_vae_folder() {
        let pixels =
            TrainConfig { preset: Some("tiny".into()), vae_preset: Some("pixels".into()), ..Default::default() };
        assert!(pixels.validate().is_empty());
        let unknown = TrainConfig { vae_preset: Some("crayons".into()), ..pixels.clone() };
        assert_eq!(unknown.validate()[0].key, "vae_preset");
        let both = TrainConfig { vae: Some("vae".into()), ..pixels.clone() };
        assert!(both.validate()[0].message.contains("not both"), "{:?}", both.validate());
        let words = TrainConfig { text_encoder_preset: Some("words".into()), ..pixels.clone() };
        assert!(words.validate().is_empty());
        let unknown = TrainConfig { text_encoder_preset: Some("pixels".into()), ..pixels };
        assert_eq!(unknown.validate()[0].key, "text_encoder_preset");
    }
}
