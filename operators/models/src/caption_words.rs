//! `words`: a fixed, weightless text encoder for the demo. A caption's embedding is the same at
//! every position: the sum of a fixed +-1 vector per word and per pair of neighbouring words
//! ("blue background", "red circle"), scaled to unit RMS. A random `tiny` CLIP hides the two colour
//! words of a caption among 77 mostly-padding positions, and the demo's UNet does not learn to
//! find them in minutes; with this one every position says what the caption says, so it does.

use std::path::Path;

use candle_core::{DType, Device, Tensor};

use super::error::Result;
use crate::rng::Rng;

/// The preset name (`text_encode` `preset`, `train` `text_encoder_preset`).
pub const WORDS_PRESET: &str = "words";

/// The `_class_name` of its `config.json` in a pipeline folder.
pub const WORDS_CLASS: &str = "CaptionWords";

/// Width of the embeddings: the `tiny` UNet's `cross_attention_dim`.
pub const WORDS_WIDTH: usize = 32;

const BOS: i64 = 49406;
const EOS: i64 = 49407;

/// The `words` text encoder: no weights, the same on every device.
///
/// ```
/// use candle_core::{Device, Tensor};
/// use latentflow_models::CaptionWords;
/// // <|startoftext|> "red" "circle" <|endoftext|>, then padding.
/// let ids = Tensor::new(&[[49406i64, 736, 2760, 49407, 0, 0]], &Device::Cpu).unwrap();
/// let e = CaptionWords.forward(&ids).unwrap();
/// assert_eq!(e.dims(), [1, 6, 32]);
/// ```
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CaptionWords;

impl CaptionWords {
    /// Embeddings `[B, N, 32]` for token ids `[B, N]` (a CLIP tokenizer's, with its start and end
    /// tokens): every position holds the caption's words-and-pairs vector.
    pub fn forward(&self, ids: &Tensor) -> Result<Tensor> {
        let (b, n) = ids.dims2()?;
        let rows = ids.to_device(&Device::Cpu)?.to_dtype(DType::I64)?.to_vec2::<i64>()?;
        let mut out = Vec::with_capacity(b * n * WORDS_WIDTH);
        for row in rows {
            let words: Vec<i64> = row.into_iter().skip_while(|&t| t == BOS).take_while(|&t| t != EOS).collect();
            let mut sum = [0f32; WORDS_WIDTH];
            let features = words.iter().map(|&w| (w, -1)).chain(words.windows(2).map(|p| (p[0], p[1])));
            for (a, b) in features {
                let mut rng = Rng::new(a as u64, b as u64);
                sum.iter_mut().for_each(|x| *x += if rng.unit() < 0.5 { -1.0 } else { 1.0 });
            }
            let rms = (sum.iter().map(|x| x * x).sum::<f32>() / WORDS_WIDTH as f32).sqrt();
            let scale = if rms > 0.0 { 1.0 / rms } else { 0.0 };
            for _ in 0..n {
                out.extend(sum.iter().map(|x| x * scale));
            }
        }
        Ok(Tensor::from_vec(out, (b, n, WORDS_WIDTH), ids.device())?)
    }

    /// Whether the part folder `dir` holds this encoder (its `config.json` names [`WORDS_CLASS`]).
    pub fn is_in(dir: &Path) -> bool {
        super::config::names_class(dir, WORDS_CLASS)
    }

    /// The `config.json` it leaves in a pipeline folder.
    pub fn config_json() -> serde_json::Value {
        serde_json::json!({
            "_class_name": WORDS_CLASS,
            "_latentflow_note": "latentflow's fixed demo text encoder: every position holds the sum of a fixed +-1 \
                                  vector per word and per pair of neighbouring words; no weights",
            "hidden_size": WORDS_WIDTH,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn embed(ids: &[i64]) -> Vec<f32> {
        let ids = Tensor::from_vec(ids.to_vec(), (1, ids.len()), &Device::Cpu).unwrap();
        CaptionWords.forward(&ids).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap()
    }

    #[test]
    fn every_position_says_the_whole_caption_and_padding_changes_nothing() {
        let short = embed(&[BOS, 5, 6, 7, EOS, 0, 0]);
        assert!(short.chunks(WORDS_WIDTH).all(|p| p == &short[..WORDS_WIDTH]));
        let rms = (short[..WORDS_WIDTH].iter().map(|x| x * x).sum::<f32>() / WORDS_WIDTH as f32).sqrt();
        assert!((rms - 1.0).abs() < 1e-5);
        let longer = embed(&[BOS, 5, 6, 7, EOS, 0, 0, 0, 0]);
        assert_eq!(&short[..WORDS_WIDTH], &longer[..WORDS_WIDTH]);
    }

    #[test]
    fn word_order_matters_through_the_pairs() {
        // "red circle on blue background" and "blue circle on red background" share their words.
        let (red, blue, circle, on, background) = (1, 2, 3, 4, 5);
        let a = embed(&[BOS, red, circle, on, blue, background, EOS]);
        let b = embed(&[BOS, blue, circle, on, red, background, EOS]);
        assert_ne!(a[..WORDS_WIDTH], b[..WORDS_WIDTH]);
        assert_eq!(embed(&[BOS, EOS]), vec![0.0; 2 * WORDS_WIDTH], "the empty caption is zero");
    }
}
