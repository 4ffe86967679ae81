//! The text encoder a job embeds captions with: CLIP (from a folder or a random preset) or the
//! fixed demo [`CaptionWords`].

use candle_core::{DType, Device, Tensor};

use super::caption_words::{CaptionWords, WORDS_PRESET, WORDS_WIDTH};
use super::error::Result;
use super::load::{load_text_encoder_in, ModelSource};
use super::ClipTextModel;

/// A text encoder: token ids `[B, N]` -> embeddings `[B, N, D]`.
pub enum TextEncoder {
    /// CLIP's text transformer (boxed: it is large, the other is nothing).
    Clip(Box<ClipTextModel>),
    /// The demo's fixed words-and-pairs features (preset `words`).
    Words(CaptionWords),
}

impl TextEncoder {
    /// The encoder `source` names: `words` (the preset, or a folder whose config names it), else
    /// CLIP as [`load_text_encoder`] builds it.
    ///
    /// ```
    /// use candle_core::Device;
    /// use latentflow_models::load::ModelSource;
    /// use latentflow_models::TextEncoder;
    /// let words = TextEncoder::load(&ModelSource::Preset("words".into()), &Device::Cpu, 0).unwrap();
    /// assert_eq!(words.hidden_size(), 32);
    /// ```
    pub fn load(source: &ModelSource, device: &Device, seed: u64) -> Result<TextEncoder> {
        TextEncoder::load_in(source, device, DType::F32, seed)
    }

    /// [`TextEncoder::load`] with CLIP's parameters and computation in `dtype` (the fixed
    /// words encoder has none).
    pub fn load_in(source: &ModelSource, device: &Device, dtype: DType, seed: u64) -> Result<TextEncoder> {
        match source {
            ModelSource::Preset(name) if name == WORDS_PRESET => Ok(TextEncoder::Words(CaptionWords)),
            ModelSource::Folder(dir) if CaptionWords::is_in(dir) => Ok(TextEncoder::Words(CaptionWords)),
            _ => Ok(TextEncoder::Clip(Box::new(load_text_encoder_in(source, device, dtype, seed)?))),
        }
    }

    /// Embeddings `[B, N, D]` of `ids` `[B, N]`; `penultimate` (CLIP skip) for CLIP only.
    pub fn forward(&self, ids: &Tensor, penultimate: bool) -> Result<Tensor> {
        match self {
            TextEncoder::Clip(clip) => clip.forward(ids, penultimate),
            TextEncoder::Words(words) => words.forward(ids),
        }
    }

    /// The embedding width D.
    pub fn hidden_size(&self) -> usize {
        match self {
            TextEncoder::Clip(clip) => clip.config().hidden_size,
            TextEncoder::Words(_) => WORDS_WIDTH,
        }
    }
}
