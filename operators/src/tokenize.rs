//! `tokenize`: captions → CLIP token ids (`input_ids`, 77 per row), offline.

use std::path::PathBuf;
use std::sync::Arc;

use latentflow_engine::{
    Batch, Column, ColumnType, Field, InstanceContext, KeyError, Map, NodeSpec, OpContext, OpError, OperatorConfig,
    OperatorImpl, OperatorKind, Ports,
};
use serde::{Deserialize, Serialize};

use crate::clip::{tokenizer_dir_of_model, Cleanup, ClipTokenizer, Padding, Vocab};

/// Padding style.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PaddingStyle {
    /// `!` (id 0): SD2 / OpenCLIP.
    Sd2,
    /// `<|endoftext|>` (49407): SD1.
    Sd1,
}

/// Whose text clean-up to follow.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CleanupStyle {
    /// OpenAI CLIP / open_clip: ftfy's caption fixes and HTML entities unescaped.
    OpenAi,
    /// Hugging Face `CLIPTokenizer` (what diffusers trainers feed the text encoder).
    HuggingFace,
}

/// What to do with a row whose caption is empty or missing.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EmptyCaption {
    /// Tokenize it as the empty string (start and end tokens only), like an unconditional row.
    #[default]
    Keep,
    /// Drop the row (reason `empty_caption`).
    Reject,
}

/// Config of `tokenize`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TokenizeConfig {
    /// A diffusers pipeline folder; its `tokenizer/` is used.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub model: Option<PathBuf>,
    /// A tokenizer folder (`vocab.json`, `merges.txt`, `tokenizer_config.json`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tokenizer: Option<PathBuf>,
    /// Sequence length (77).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_length: Option<usize>,
    /// `"sd2"` or `"sd1"`; by default the folder's pad token, or `"sd2"` with the bundled file.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub padding: Option<PaddingStyle>,
    /// `"huggingface"` (default with a folder) or `"openai"` (default with the bundled file).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cleanup: Option<CleanupStyle>,
    /// `"keep"` (default) or `"reject"` rows with an empty caption.
    pub empty_caption: EmptyCaption,
}

impl OperatorConfig for TokenizeConfig {
    const TYPE: &'static str = "tokenize";
    const KIND: OperatorKind = OperatorKind::Map;
    const SUMMARY: &'static str = "captions -> CLIP token ids (`input_ids`, 77 per row)";
    const EXAMPLE: &'static str = "padding = \"sd2\"";
    const KEYS: &'static [(&'static str, &'static str)] = &[
        ("model", "a diffusers pipeline folder; its tokenizer/ is used"),
        ("tokenizer", "a tokenizer folder (vocab.json, merges.txt, tokenizer_config.json); default: the bundled OpenAI vocabulary"),
        ("max_length", "sequence length (default: the folder's model_max_length, 77)"),
        ("padding", "\"sd2\" (pad with `!`, id 0) or \"sd1\" (pad with <|endoftext|>); default: the folder's pad token, else sd2"),
        ("cleanup", "\"huggingface\" (default with a folder) or \"openai\" (ftfy + HTML unescape; default with the bundled file)"),
        ("empty_caption", "\"keep\" (default) or \"reject\" rows whose caption is empty"),
    ];
}

impl TokenizeConfig {
    fn folder(&self) -> Option<PathBuf> {
        self.tokenizer.clone().or_else(|| self.model.as_deref().map(tokenizer_dir_of_model))
    }

    /// Builds the tokenizer this config describes, and the padding and length to use.
    pub fn build(&self) -> Result<(ClipTokenizer, Padding, usize), OpError> {
        let vocab = match self.folder() {
            Some(dir) => Vocab::from_folder(&dir),
            None => Vocab::bundled(),
        }
        .map_err(|e| OpError::msg(e.to_string()))?;
        let padding = match self.padding {
            Some(PaddingStyle::Sd1) => Padding::Sd1,
            Some(PaddingStyle::Sd2) => Padding::Sd2,
            None if vocab.config.pad_token.as_deref().is_some_and(|p| p != "!") => Padding::Sd1,
            None => Padding::Sd2,
        };
        let cleanup = match (self.cleanup, self.folder()) {
            (Some(CleanupStyle::OpenAi), _) | (None, None) => Cleanup::OpenAi,
            _ => Cleanup::HuggingFace,
        };
        let max_length = self.max_length.unwrap_or(vocab.config.model_max_length);
        let tokenizer = ClipTokenizer::new(vocab, cleanup).map_err(|e| OpError::msg(e.to_string()))?;
        Ok((tokenizer, padding, max_length))
    }
}

impl NodeSpec for TokenizeConfig {
    fn validate(&self) -> Vec<KeyError> {
        let mut errors = Vec::new();
        if self.model.is_some() && self.tokenizer.is_some() {
            errors.push(KeyError::new("tokenizer", "set `model` or `tokenizer`, not both"));
        }
        if let Some(dir) = self.folder() {
            let key = if self.tokenizer.is_some() { "tokenizer" } else { "model" };
            for file in ["vocab.json", "merges.txt"] {
                if !dir.join(file).is_file() {
                    errors.push(KeyError::new(key, format!("{} has no {file}", dir.display())));
                }
            }
        }
        if let Some(n) = self.max_length {
            errors.extend(KeyError::check_range("max_length", n, 2, 4096));
        }
        errors
    }

    fn ports(&self) -> Ports {
        Ports {
            requires: vec![Field::new("caption", ColumnType::Str)],
            adds: vec![Field::new("input_ids", ColumnType::I64Tensor)],
            removes: vec![],
        }
    }

    fn instantiate(&self, _ctx: &InstanceContext<'_>) -> Result<OperatorImpl, OpError> {
        let (tokenizer, padding, max_length) = self.build()?;
        Ok(OperatorImpl::Map(Arc::new(Tokenize { tokenizer, padding, max_length, empty: self.empty_caption })))
    }
}

/// The `tokenize` map.
#[derive(Debug)]
pub struct Tokenize {
    tokenizer: ClipTokenizer,
    padding: Padding,
    max_length: usize,
    empty: EmptyCaption,
}

impl Map for Tokenize {
    fn map(&self, mut batch: Batch, ctx: &mut OpContext) -> Result<Batch, OpError> {
        let captions = batch.strs("caption")?;
        let mut keep = vec![true; captions.len()];
        let mut ids = Vec::with_capacity(captions.len() * self.max_length);
        for (row, caption) in captions.iter().enumerate() {
            if self.empty == EmptyCaption::Reject && caption.trim().is_empty() {
                keep[row] = false;
                ctx.reject(batch.row_key(row), "empty_caption");
                continue;
            }
            let (row_ids, truncated) = self.tokenizer.input_ids(caption, self.padding, self.max_length);
            if truncated {
                tracing::debug!(node = ctx.node(), key = %batch.row_key(row), "caption truncated to {} tokens", self.max_length);
            }
            ids.extend(row_ids);
        }
        if keep.iter().any(|k| !k) {
            batch.retain_rows(&keep);
        }
        batch.insert("input_ids", Column::I64Tensor { shape: vec![self.max_length], data: ids })?;
        Ok(batch)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokenizes_and_rejects_empty_captions_when_asked() {
        let config = TokenizeConfig { empty_caption: EmptyCaption::Reject, ..TokenizeConfig::default() };
        let (tokenizer, padding, max_length) = config.build().unwrap();
        let op = Tokenize { tokenizer, padding, max_length, empty: config.empty_caption };
        let batch = Batch::new()
            .with("key", Column::I64(vec![1, 2]))
            .unwrap()
            .with("caption", Column::Str(vec!["a photo of a cat".into(), "  ".into()]))
            .unwrap();
        let mut ctx = OpContext::detached("tok");
        let out = op.map(batch, &mut ctx).unwrap();
        assert_eq!(out.rows(), 1);
        let Column::I64Tensor { shape, data } = out.column("input_ids").unwrap() else { panic!("tensor") };
        assert_eq!(shape, &[77]);
        assert_eq!(&data[..7], &[49406, 320, 1125, 539, 320, 2368, 49407]);
        let rejected = ctx.take_rejections();
        assert_eq!((rejected[0].key.as_str(), rejected[0].reason.as_str()), ("2", "empty_caption"));
    }

    #[test]
    fn missing_folders_are_named_at_validation() {
        let config = TokenizeConfig { tokenizer: Some("/nonexistent/tok".into()), ..TokenizeConfig::default() };
        let errors = config.validate();
        assert_eq!(errors[0].message, "/nonexistent/tok has no vocab.json");
        let both = TokenizeConfig { model: Some("m".into()), tokenizer: Some("t".into()), ..TokenizeConfig::default() };
        assert_eq!(both.validate()[0].message, "set `model` or `tokenizer`, not both");
    }
}
