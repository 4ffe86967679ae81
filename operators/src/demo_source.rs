//! `demo_source`: deterministic procedural captioned images (coloured shapes on varied
//! backgrounds, JPEG, 256-800 px), so every pipeline runs on a fresh machine with no data files.

use latentflow_engine::{
    Batch, InstanceContext, KeyError, NodeSpec, OpContext, OpError, OperatorConfig, OperatorImpl, OperatorKind, Ports,
    Source,
};
use serde::{Deserialize, Serialize};
use serde_bytes::ByteBuf;

use crate::demo::{demo_image_in, SceneStyle};
use crate::sharding::KeyShard;
use crate::source_rows;

/// Config of `demo_source`.
///
/// Row `key` (0..count) is always the same image and caption for the same job seed; rows are
/// split across workers by `key % workers`, so any worker count yields every key once.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DemoSourceConfig {
    /// Rows in total, over all workers.
    pub count: u64,
    /// Rows per batch (one epoch) on each worker.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub batch_size: Option<usize>,
    /// JPEG quality, 1-100.
    pub quality: u8,
    /// `"varied"` (1-3 shapes on solid, gradient or noisy backgrounds) or `"simple"` (one
    /// large shape on a solid background).
    pub scenes: SceneStyle,
}

impl Default for DemoSourceConfig {
    fn default() -> Self {
        DemoSourceConfig { count: 512, batch_size: None, quality: 90, scenes: SceneStyle::Varied }
    }
}

impl OperatorConfig for DemoSourceConfig {
    const TYPE: &'static str = "demo_source";
    const KIND: OperatorKind = OperatorKind::Source;
    const SUMMARY: &'static str = "deterministic procedural captioned JPEG images (no files needed)";
    const EXAMPLE: &'static str = "count = 512\nbatch_size = 32";
    const KEYS: &'static [(&'static str, &'static str)] = &[
        ("count", "rows in total over all workers (default 512)"),
        ("batch_size", "rows per epoch on each worker (default 32; left out in a training job: the trainer's global_batch_size split over the source's workers)"),
        ("quality", "JPEG quality 1-100 (default 90)"),
        ("scenes", "\"varied\" (default: 1-3 shapes on solid, gradient or noisy backgrounds) or \"simple\" (one large shape on a solid background, what the main job learns from)"),
    ];
}

impl NodeSpec for DemoSourceConfig {
    fn validate(&self) -> Vec<KeyError> {
        [
            KeyError::check_range("count", self.count, 1, 1_000_000_000_000),
            self.batch_size.and_then(|b| KeyError::check_range("batch_size", b, 1, 1_000_000)),
            KeyError::check_range("quality", self.quality, 1, 100),
        ]
        .into_iter()
        .flatten()
        .collect()
    }

    fn ports(&self) -> Ports {
        source_rows::ports()
    }

    fn source_batch_size(&self) -> Option<usize> {
        self.batch_size
    }

    fn reshard_position(
        &self,
        saved: &[Option<serde_json::Value>],
        shard: usize,
        shards: usize,
    ) -> Result<Option<serde_json::Value>, OpError> {
        KeyShard::reshard(saved, shard, shards).map(Some)
    }

    fn instantiate(&self, ctx: &InstanceContext<'_>) -> Result<OperatorImpl, OpError> {
        let keys = KeyShard::new(self.count, ctx.worker.shard as u64, ctx.worker.shards as u64);
        Ok(OperatorImpl::Source(Box::new(DemoSource {
            config: Self { batch_size: Some(source_rows::batch_size(ctx, self.batch_size)), ..self.clone() },
            seed: ctx.job.seed,
            keys,
        })))
    }
}

/// One worker's share of the demo images.
#[derive(Debug)]
pub struct DemoSource {
    config: DemoSourceConfig,
    seed: u64,
    keys: KeyShard,
}

impl DemoSource {
    /// The rows `key % shards == shard` of `config` for job seed `seed`.
    pub fn new(config: DemoSourceConfig, seed: u64, shard: u64, shards: u64) -> Self {
        let keys = KeyShard::new(config.count, shard, shards);
        DemoSource { config, seed, keys }
    }
}

impl Source for DemoSource {
    fn next_batch(&mut self, _ctx: &mut OpContext) -> Result<Option<Batch>, OpError> {
        let keys = self.keys.next_keys(self.config.batch_size.unwrap_or(source_rows::DEFAULT_BATCH_SIZE));
        if keys.is_empty() {
            return Ok(None);
        }
        let rows: Vec<_> =
            keys.iter().map(|&k| demo_image_in(self.seed, k as u64, self.config.quality, self.config.scenes)).collect();
        let (captions, images) = rows.into_iter().map(|r| (r.caption, ByteBuf::from(r.jpeg))).unzip();
        Ok(Some(source_rows::batch(keys, captions, images)?))
    }

    fn position(&self) -> serde_json::Value {
        self.keys.position()
    }

    fn seek(&mut self, position: &serde_json::Value) -> Result<(), OpError> {
        self.keys.seek(position)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::demo::demo_image;

    #[test]
    fn emits_captioned_jpegs_in_key_order() {
        let mut source = DemoSource::new(
            DemoSourceConfig { count: 3, batch_size: Some(2), quality: 80, ..Default::default() },
            0,
            0,
            1,
        );
        let mut ctx = OpContext::detached("read");
        let first = source.next_batch(&mut ctx).unwrap().unwrap();
        assert_eq!(first.i64s("key").unwrap(), &[0, 1]);
        assert!(first.bytes("image").unwrap()[0].starts_with(&[0xFF, 0xD8]), "JPEG magic");
        assert_eq!(first.strs("caption").unwrap()[0], demo_image(0, 0, 80).caption);
        assert_eq!(source.next_batch(&mut ctx).unwrap().unwrap().rows(), 1);
        assert!(source.next_batch(&mut ctx).unwrap().is_none());
    }
}
