//! What `train` needs besides the UNet: the empty caption's embedding (caption dropout), and for
//! previews the prompts' embeddings, the VAE decoder and the DDIM sampler.

use std::path::Path;

use candle_core::{Device, Tensor};
use latentflow_engine::OpError;

use super::TrainConfig;
use crate::model_keys::{self, op_error};
use crate::models::load::{load_text_encoder, load_vae};
use crate::models::{AutoencoderKl, UNet};
use crate::rng::Rng;
use crate::tokenize::TokenizeConfig;
use crate::training::pipeline_folder::FrozenParts;
use crate::training::sampling::{write_grid, Ddim};
use crate::training::NoiseSchedule;
use crate::training::SchedulerConfig;

/// What preview sampling needs: the decoder, the prompts' embeddings and the sampler.
pub(super) struct Previews {
    vae: AutoencoderKl,
    context: Tensor,
    ddim: Ddim,
}

/// The key of the preview noise ("samples"): the same noise at every preview, so grids compare.
const PREVIEW_STREAM: u64 = 0x0073_616d_706c_6573;

impl Previews {
    /// Samples the prompts with `unet` into `path`, latents shaped `[c, h, w]`.
    pub fn write(
        &self,
        path: &Path,
        unet: &UNet,
        uncond: &Tensor,
        guidance: f64,
        (c, h, w): (usize, usize, usize),
        seed: u64,
    ) -> Result<(), OpError> {
        let mut rng = Rng::new(seed, PREVIEW_STREAM);
        let latents = self.ddim.sample(unet, &self.context, uncond, guidance, (c, h, w), &mut rng).map_err(op_error)?;
        let scale = self.vae.config().scaling_factor;
        write_grid(path, &self.vae, &latents, scale).map_err(op_error)?;
        tracing::info!(path = %path.display(), "preview written");
        Ok(())
    }
}

impl TrainConfig {
    /// Where the frozen parts of `final/` come from: the folders or presets the previews and the
    /// empty caption use (`model`'s parts, the `vae` / `text_encoder` / `scheduler` keys, or the
    /// preset with the bundled vocabulary).
    pub(super) fn frozen_parts(&self, seed: u64) -> Result<FrozenParts, OpError> {
        let (model, preset) = (self.model.as_deref(), self.preset.as_deref());
        let scheduler = self.scheduler.clone().or_else(|| model.map(|m| m.join("scheduler"))).filter(|d| d.is_dir());
        let schedule = match &scheduler {
            Some(dir) => {
                let path = dir.join("scheduler_config.json");
                let text = std::fs::read_to_string(&path).map_err(|e| OpError::io(&path, e))?;
                serde_json::from_str(&text).map_err(|e| OpError::msg(format!("{}: {e}", path.display())))?
            }
            None => SchedulerConfig::default(),
        };
        Ok(FrozenParts {
            vae: model_keys::source(model, self.vae.as_deref(), preset, "vae")?,
            text_encoder: model_keys::source(model, self.text_encoder.as_deref(), preset, "text_encoder")?,
            tokenizer: model.map(crate::clip::tokenizer_dir_of_model).filter(|d| d.is_dir()),
            scheduler,
            schedule,
            seed,
        })
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
    pub(super) fn text_conditions(
        &self,
        device: &Device,
        seed: u64,
    ) -> Result<(Option<Tensor>, Option<Tensor>), OpError> {
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
    pub(super) fn previews(
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
