//! An operator of your own, in your own crate: `caption_filter` drops rows whose caption is too
//! short or names a banned word (the kind of filter the reference's users write as a Ray Data
//! `map_batches`: aesthetic score, watermark, NSFW, caption cleaning). Each dropped row is
//! rejected with a reason, so the job's accounting and reject log cover it like any built-in
//! operator's.
//!
//! [`catalog`] is latentflow's operators plus this one; `src/main.rs` hands it to latentflow's
//! command line, so `latentflow-filtered run|validate|operators` work as `latentflow` does, with
//! `type = "caption_filter"` available in topology files (`online-filtered.toml`).

use std::sync::Arc;

use latentflow_engine::{
    Batch, Catalog, ColumnType, DuplicateOperator, Field, InstanceContext, Map, NodeSpec, OpContext, OpError,
    OperatorConfig, OperatorEntry, OperatorImpl, OperatorKind, Ports,
};
use serde::{Deserialize, Serialize};

/// The keys of a `caption_filter` node.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CaptionFilterConfig {
    /// Captions with fewer words are rejected (`caption_too_short`).
    #[serde(default = "default_min_words")]
    pub min_words: usize,
    /// Captions with any of these words are rejected (`caption_banned_word`); case-insensitive.
    #[serde(default)]
    pub banned_words: Vec<String>,
}

fn default_min_words() -> usize {
    3
}

impl Default for CaptionFilterConfig {
    fn default() -> Self {
        CaptionFilterConfig { min_words: default_min_words(), banned_words: Vec::new() }
    }
}

impl OperatorConfig for CaptionFilterConfig {
    const TYPE: &'static str = "caption_filter";
    const KIND: OperatorKind = OperatorKind::Map;
    const SUMMARY: &'static str =
        "drops rows whose caption is too short or names a banned word (an example of a user's operator)";
    const EXAMPLE: &'static str = "min_words = 3\nbanned_words = [\"watermark\"]";
    const KEYS: &'static [(&'static str, &'static str)] = &[
        ("min_words", "captions with fewer words are rejected as `caption_too_short` (default 3)"),
        ("banned_words", "captions with any of these words are rejected as `caption_banned_word` (case-insensitive)"),
    ];
}

impl NodeSpec for CaptionFilterConfig {
    fn ports(&self) -> Ports {
        Ports { requires: vec![Field::new("caption", ColumnType::Str)], adds: vec![], removes: vec![] }
    }

    fn validate(&self) -> Vec<latentflow_engine::KeyError> {
        let mut errors = Vec::new();
        if self.min_words == 0 {
            errors.push(latentflow_engine::KeyError::new("min_words", "must be at least 1"));
        }
        if let Some(empty) = self.banned_words.iter().find(|w| w.trim().is_empty()) {
            errors.push(latentflow_engine::KeyError::new(
                "banned_words",
                format!("an empty word ({empty:?}) bans nothing"),
            ));
        }
        errors
    }

    fn instantiate(&self, _ctx: &InstanceContext<'_>) -> Result<OperatorImpl, OpError> {
        let banned = self.banned_words.iter().map(|w| w.to_lowercase()).collect();
        Ok(OperatorImpl::Map(Arc::new(CaptionFilter { min_words: self.min_words, banned })))
    }
}

/// The `caption_filter` map.
#[derive(Debug)]
pub struct CaptionFilter {
    min_words: usize,
    /// Lower case.
    banned: Vec<String>,
}

impl CaptionFilter {
    /// Why `caption` is dropped, if it is.
    pub fn verdict(&self, caption: &str) -> Option<&'static str> {
        let words: Vec<String> = caption.split_whitespace().map(str::to_lowercase).collect();
        if words.len() < self.min_words {
            Some("caption_too_short")
        } else if words.iter().any(|w| self.banned.contains(w)) {
            Some("caption_banned_word")
        } else {
            None
        }
    }
}

impl Map for CaptionFilter {
    fn map(&self, mut batch: Batch, ctx: &mut OpContext) -> Result<Batch, OpError> {
        let verdicts: Vec<Option<&str>> = batch.strs("caption")?.iter().map(|c| self.verdict(c)).collect();
        for (row, reason) in verdicts.iter().enumerate() {
            if let Some(reason) = reason {
                ctx.reject(batch.row_key(row), *reason);
            }
        }
        batch.retain_rows(&verdicts.iter().map(Option::is_none).collect::<Vec<_>>());
        Ok(batch)
    }
}

/// latentflow's operators and `caption_filter`.
///
/// ```
/// let catalog = latentflow_example_custom_operator::catalog().unwrap();
/// assert!(catalog.get("caption_filter").is_some() && catalog.get("train").is_some());
/// ```
pub fn catalog() -> Result<Catalog, DuplicateOperator> {
    latentflow_operators::registry().with(OperatorEntry::of::<CaptionFilterConfig>())
}

#[cfg(test)]
mod tests {
    use super::*;
    use latentflow_engine::Column;

    #[test]
    fn rejects_short_captions_and_banned_words_with_their_reason_and_keeps_the_rest() {
        let filter = CaptionFilterConfig { min_words: 3, banned_words: vec!["Noisy".into()] }; // any case
        let job = latentflow_engine::JobConfig::default();
        let ctx = InstanceContext {
            node: "filter",
            job: &job,
            worker: latentflow_engine::WorkerInfo::single(),
            batch_size: None,
        };
        let OperatorImpl::Map(map) = filter.instantiate(&ctx).unwrap() else { unreachable!() };
        let captions = ["a red circle", "a noisy blue background", "tiny", "a large green square"];
        let batch = Batch::new()
            .with("key", Column::I64(vec![10, 11, 12, 13]))
            .unwrap()
            .with("caption", Column::Str(captions.map(String::from).to_vec()))
            .unwrap();
        let mut ctx = OpContext::detached("filter");
        let kept = map.map(batch, &mut ctx).unwrap();
        assert_eq!(kept.i64s("key").unwrap(), &[10, 13]);
        let rejected: Vec<(String, String)> = ctx.take_rejections().into_iter().map(|r| (r.key, r.reason)).collect();
        assert_eq!(rejected, [("11".into(), "caption_banned_word".into()), ("12".into(), "caption_too_short".into())]);
    }

    #[test]
    fn validation_reports_every_bad_key() {
        let errors = CaptionFilterConfig { min_words: 0, banned_words: vec![" ".into()] }.validate();
        let keys: Vec<&str> = errors.iter().map(|e| e.key.as_str()).collect();
        assert_eq!(keys, ["min_words", "banned_words"]);
    }

    #[test]
    fn registering_it_twice_is_an_error_naming_it() {
        let err = catalog().unwrap().with(OperatorEntry::of::<CaptionFilterConfig>()).err().unwrap();
        assert_eq!(err.to_string(), "operator type `caption_filter` is registered twice");
    }
}
