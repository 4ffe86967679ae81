//! What `train` needs besides the UNet: the empty caption's embedding (caption dropout), and for
//! previews the prompts' embeddings, the VAE decoder and the DDIM sampler.

use std::path::Path;

use candle_core::{Device, Tensor};
use latentflow_engine::OpError;

use super::TrainConfig;
use crate::model_keys::{self, op_error};
use crate::models::load::load_vae;
use crate::models::load::ModelSource;
use crate::models::{Autoencoder, TextEncoder, UNet};
use crate::rng::Rng;
use crate::tokenize::TokenizeConfig;
use crate::training::pipeline_folder::FrozenParts;
use crate::training::sampling::{write_grid, Ddim};
use crate::training::NoiseSchedule;

/// What preview sampling needs: the decoder, the prompts' embeddings and the sampler.
pub(super) struct Previews {
    vae: Autoencoder,
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
        let scale = self.vae.scaling_factor();
        write_grid(path, &self.vae, &latents, scale).map_err(op_error)?;
        tracing::info!(path = %path.display(), "preview written");
        Ok(())
    }
}

impl TrainConfig {
    /// The VAE the previews decode with and `final/vae` holds: `vae_preset`, else the `vae`
    /// folder, `model/vae` or the preset.
    fn vae_source(&self) -> Result<ModelSource, OpError> {
        match &self.vae_preset {
            Some(preset) => Ok(ModelSource::Preset(preset.clone())),
            None => model_keys::source(self.model.as_deref(), self.vae.as_deref(), self.preset.as_deref(), "vae"),
        }
    }

    /// The text encoder of the empty caption, the previews and `final/text_encoder`:
    /// `text_encoder_preset`, else the `text_encoder` folder, `model/text_encoder` or the preset.
    fn text_encoder_source(&self) -> Result<ModelSource, OpError> {
        match &self.text_encoder_preset {
            Some(preset) => Ok(ModelSource::Preset(preset.clone())),
            None => model_keys::source(
                self.model.as_deref(),
                self.text_encoder.as_deref(),
                self.preset.as_deref(),
                "text_encoder",
            ),
        }
    }

    /// Where the frozen parts of `final/` come from: the folders or presets the previews and the
    /// empty caption use (`model`'s parts, the `vae` / `text_encoder` / `scheduler` keys, or the
    /// preset with the bundled vocabulary).
    pub(super) fn frozen_parts(&self, seed: u64) -> Result<FrozenParts, OpError> {
        let model = self.model.as_deref();
        let (folder, schedule, changed) = self.scheduler_config()?;
        // A folder whose config the job changed (`prediction_type`) is written out, not linked.
        let scheduler = folder.filter(|_| !changed);
        Ok(FrozenParts {
            vae: self.vae_source()?,
            text_encoder: self.text_encoder_source()?,
            tokenizer: model.map(crate::clip::tokenizer_dir_of_model).filter(|d| d.is_dir()),
            scheduler,
            schedule,
            seed,
        })
    }

    /// Text embeddings [N, 77, D] of `texts`, with the text encoder and tokenizer of `model`
    /// (or `text_encoder`, or the preset and the bundled vocabulary).
    fn encode_texts(&self, texts: &[String], device: &Device, seed: u64) -> Result<Tensor, OpError> {
        let encoder = TextEncoder::load(&self.text_encoder_source()?, device, seed).map_err(op_error)?;
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
        let vae = load_vae(&self.vae_source()?, device, seed).map_err(op_error)?;
        Ok(Some(Previews { context, ddim: Ddim::new(schedule, self.sample_steps), vae }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::training::schedule::Prediction;

    #[test]
    fn prediction_type_overrides_the_scheduler_and_final_records_it() {
        let dir = tempfile::tempdir().unwrap();
        let scheduler = dir.path().join("scheduler");
        std::fs::create_dir_all(&scheduler).unwrap();
        std::fs::write(scheduler.join("scheduler_config.json"), r#"{"beta_end": 0.02}"#).unwrap();
        let plain =
            TrainConfig { preset: Some("tiny".into()), scheduler: Some(scheduler.clone()), ..Default::default() };
        let linked = plain.frozen_parts(0).unwrap();
        assert_eq!(linked.scheduler.as_deref(), Some(scheduler.as_path()), "an unchanged folder is linked");
        assert_eq!(linked.schedule.prediction_type, Prediction::Epsilon);

        let v = TrainConfig { prediction_type: Some(Prediction::VPrediction), ..plain };
        assert_eq!(v.schedule().unwrap().prediction, Prediction::VPrediction);
        let written = v.frozen_parts(0).unwrap();
        assert!(written.scheduler.is_none(), "a changed schedule is written out, not linked");
        assert_eq!((written.schedule.prediction_type, written.schedule.beta_end), (Prediction::VPrediction, 0.02));
    }
}
