//! `text_encode`: CLIP token ids (`input_ids`) → text embeddings (`caption_latents`, f32
//! `[77, D]`), on the worker's device.

use std::path::PathBuf;

use candle_core::{Device, Tensor};
use latentflow_engine::{
    Batch, ColumnType, Field, InstanceContext, KeyError, NodeSpec, OpContext, OpError, OperatorConfig, OperatorImpl,
    OperatorKind, Ports, Stage,
};
use serde::{Deserialize, Serialize};

use crate::model_keys::{self, column_tensor, in_chunks, op_error};
use crate::models::load::ModelSource;
use crate::models::{TextEncoder, TEXT_PRESETS};
use crate::training::Precision;

/// Config of `text_encode`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TextEncodeConfig {
    /// A diffusers pipeline folder; its `text_encoder/` is used.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub model: Option<PathBuf>,
    /// The text encoder's own folder.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub path: Option<PathBuf>,
    /// A built-in size with random weights (benchmarks and tests).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub preset: Option<String>,
    /// Use the second-to-last layer (with the final LayerNorm), "CLIP skip".
    pub penultimate: bool,
    /// Captions per forward pass.
    pub batch_size: usize,
    /// Compute precision on GPUs (bf16 unless set to f32; the CPU computes in f32).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub precision: Option<Precision>,
}

impl Default for TextEncodeConfig {
    fn default() -> Self {
        TextEncodeConfig { model: None, path: None, preset: None, penultimate: false, batch_size: 32, precision: None }
    }
}

impl OperatorConfig for TextEncodeConfig {
    const TYPE: &'static str = "text_encode";
    const KIND: OperatorKind = OperatorKind::Stage;
    const SUMMARY: &'static str = "token ids (`input_ids`) -> text embeddings (`caption_latents`, f32 [77, D])";
    const EXAMPLE: &'static str = "preset = \"tiny\"";
    const KEYS: &'static [(&'static str, &'static str)] = &[
        ("model", "a diffusers pipeline folder; its text_encoder/ is used"),
        ("path", "the text encoder's own folder (config.json + model.safetensors)"),
        ("preset", "\"tiny\", \"sd2-base\" or \"sd1\" with random weights (benchmarks and tests only), or \"words\": the demo's fixed text encoder (every position holds the caption's words and word pairs)"),
        ("penultimate", "use the second-to-last layer with the final LayerNorm (CLIP skip; default false)"),
        ("batch_size", "captions per forward pass (default 32)"),
        model_keys::PRECISION_KEY,
    ];
}

impl NodeSpec for TextEncodeConfig {
    fn validate(&self) -> Vec<KeyError> {
        let (model, path, preset) = (self.model.as_deref(), self.path.as_deref(), self.preset.as_deref());
        let mut errors = model_keys::check_source_among(model, path, preset, &TEXT_PRESETS);
        errors.extend(model_keys::check_config(model, ("path", path), preset, "text_encoder"));
        errors.extend(KeyError::check_range("batch_size", self.batch_size, 1, 65536));
        errors
    }

    fn ports(&self) -> Ports {
        Ports {
            requires: vec![Field::new("input_ids", ColumnType::I64Tensor)],
            adds: vec![Field::new("caption_latents", ColumnType::F32Tensor)],
            removes: vec!["input_ids".into()],
        }
    }

    fn instantiate(&self, ctx: &InstanceContext<'_>) -> Result<OperatorImpl, OpError> {
        let source =
            model_keys::source(self.model.as_deref(), self.path.as_deref(), self.preset.as_deref(), "text_encoder")?;
        Ok(OperatorImpl::Stage(Box::new(TextEncode::new(self.clone(), source, ctx.job.seed))))
    }
}

/// The `text_encode` stage.
pub struct TextEncode {
    config: TextEncodeConfig,
    source: ModelSource,
    seed: u64,
    model: Option<(TextEncoder, Device)>,
}

impl TextEncode {
    /// A stage that loads `source` when started.
    pub fn new(config: TextEncodeConfig, source: ModelSource, seed: u64) -> Self {
        TextEncode { config, source, seed, model: None }
    }

    /// Loads the model on `device` (what `start` does with the worker's device).
    pub fn load(&mut self, device: &Device) -> Result<(), OpError> {
        let dtype = model_keys::encoder_dtype(self.config.precision, device);
        let model = TextEncoder::load_in(&self.source, device, dtype, self.seed).map_err(op_error)?;
        self.model = Some((model, device.clone()));
        Ok(())
    }

    /// Embeddings `[B, N, D]` for token ids `[B, N]`.
    pub fn encode(&self, ids: &Tensor) -> Result<Tensor, OpError> {
        let (model, device) = self.model.as_ref().ok_or_else(|| OpError::msg("text_encode used before start"))?;
        let ids = ids.to_device(device).map_err(op_error)?;
        model.forward(&ids, self.config.penultimate).map_err(op_error)
    }
}

impl Stage for TextEncode {
    fn start(&mut self, ctx: &mut OpContext) -> Result<(), OpError> {
        self.load(&model_keys::device(ctx)?)
    }

    fn process(&mut self, mut batch: Batch, _ctx: &mut OpContext) -> Result<Option<Batch>, OpError> {
        let ids = batch.remove("input_ids").ok_or_else(|| OpError::msg("missing column `input_ids`"))?;
        let ids = column_tensor(ids, "input_ids", &Device::Cpu)?;
        let rows = ids.dims()[0];
        let hidden = self.model.as_ref().map_or(0, |(m, _)| m.hidden_size());
        let embeddings = in_chunks(rows, self.config.batch_size, vec![ids.dims()[1], hidden], |start, n| {
            self.encode(&ids.narrow(0, start, n).map_err(op_error)?)
        })?;
        batch.insert("caption_latents", embeddings)?;
        Ok(Some(batch))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use latentflow_engine::Column;

    #[test]
    fn embeds_each_row_and_drops_the_ids() {
        let mut stage = TextEncode::new(
            TextEncodeConfig { batch_size: 1, ..Default::default() },
            ModelSource::Preset("tiny".into()),
            0,
        );
        stage.start(&mut OpContext::detached("text")).unwrap();
        let ids: Vec<i64> = (0..2 * 77).map(|i| if i % 77 < 3 { 49406 + (i % 2) } else { 0 }).collect();
        let batch = Batch::new().with("input_ids", Column::I64Tensor { shape: vec![77], data: ids }).unwrap();
        let out = stage.process(batch, &mut OpContext::detached("text")).unwrap().unwrap();
        assert!(out.column("input_ids").is_err());
        // The embeddings stay where the encoder computed them.
        assert!(matches!(out.column("caption_latents").unwrap(), Column::F32Device { .. }));
        let (shape, data) = out.f32_tensor("caption_latents").unwrap();
        assert_eq!(shape, &[77, 32]);
        assert_eq!(data.len(), 2 * 77 * 32);
        assert!(data.iter().all(|v| v.is_finite()));
    }

    /// `precision` parses from topologies; on the CPU bf16 is not used (the same embeddings as f32).
    #[test]
    fn precision_is_a_key_and_the_cpu_stays_f32() {
        let config: TextEncodeConfig = toml::from_str("preset = \"tiny\"\nprecision = \"bf16\"").unwrap();
        assert_eq!(config.precision, Some(Precision::Bf16));
        assert!(toml::from_str::<TextEncodeConfig>("precision = \"fp16\"").is_err());
        let ids = Tensor::from_vec(
            (0..77u32).map(|i| if i < 3 { 49406 + i % 2 } else { 0 }).collect::<Vec<_>>(),
            (1, 77),
            &Device::Cpu,
        )
        .unwrap();
        let embed = |precision| {
            let config = TextEncodeConfig { precision, ..Default::default() };
            let mut stage = TextEncode::new(config, ModelSource::Preset("tiny".into()), 0);
            stage.load(&Device::Cpu).unwrap();
            stage.encode(&ids).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap()
        };
        assert_eq!(embed(Some(Precision::Bf16)), embed(None));
    }

    #[test]
    fn the_words_preset_embeds_with_the_fixed_encoder() {
        let config = TextEncodeConfig { preset: Some("words".into()), ..Default::default() };
        assert!(config.validate().is_empty(), "{:?}", config.validate());
        let mut stage = TextEncode::new(config, ModelSource::Preset("words".into()), 0);
        stage.start(&mut OpContext::detached("text")).unwrap();
        let mut ids = vec![0i64; 77];
        ids[..4].copy_from_slice(&[49406, 736, 2760, 49407]);
        let batch = Batch::new().with("input_ids", Column::I64Tensor { shape: vec![77], data: ids.clone() }).unwrap();
        let out = stage.process(batch, &mut OpContext::detached("text")).unwrap().unwrap();
        let (shape, data) = out.f32_tensor("caption_latents").unwrap();
        assert_eq!(shape, &[77, 32]);
        let direct = crate::models::CaptionWords.forward(&Tensor::from_vec(ids, (1, 77), &Device::Cpu).unwrap());
        assert_eq!(data.to_vec(), direct.unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap());
    }
}
