//! `bytes_source`: a deterministic stream of rows with random byte payloads: cheap to make, for
//! exercising and measuring the engine (`demo_source` makes real images).

use latentflow_engine::{
    Batch, InstanceContext, KeyError, NodeSpec, OpContext, OpError, OperatorConfig, OperatorImpl, OperatorKind, Ports,
    Source,
};
use serde::{Deserialize, Serialize};
use serde_bytes::ByteBuf;

use crate::rng::Rng;
use crate::sharding::KeyShard;
use crate::source_rows;

/// Config of `bytes_source`.
///
/// Rows have a `key` (0..count), a `caption` and an `image` payload of `payload_bytes`
/// deterministic bytes derived from the job seed and the key (not a real image). Rows are split
/// across workers by `key % workers`, so any worker count yields every key exactly once.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BytesSourceConfig {
    /// Rows in total, over all workers.
    pub count: u64,
    /// Rows per batch (one epoch) on each worker.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub batch_size: Option<usize>,
    /// Bytes of the synthetic `image` payload per row.
    pub payload_bytes: usize,
}

impl Default for BytesSourceConfig {
    fn default() -> Self {
        BytesSourceConfig { count: 512, batch_size: None, payload_bytes: 1024 }
    }
}

impl OperatorConfig for BytesSourceConfig {
    const TYPE: &'static str = "bytes_source";
    const KIND: OperatorKind = OperatorKind::Source;
    const SUMMARY: &'static str = "deterministic rows with random byte payloads, for engine tests and benchmarks";
    const EXAMPLE: &'static str = "count = 512\nbatch_size = 32";
    const KEYS: &'static [(&'static str, &'static str)] = &[
        ("count", "rows in total over all workers (default 512)"),
        ("batch_size", "rows per epoch on each worker (default 32; left out in a training job: the trainer's global_batch_size split over the source's workers)"),
        ("payload_bytes", "bytes of the synthetic `image` payload per row (default 1024)"),
    ];
}

impl NodeSpec for BytesSourceConfig {
    fn validate(&self) -> Vec<KeyError> {
        [
            KeyError::check_range("count", self.count, 1, 1_000_000_000_000),
            self.batch_size.and_then(|b| KeyError::check_range("batch_size", b, 1, 1_000_000)),
            KeyError::check_range("payload_bytes", self.payload_bytes, 0, 1_000_000_000),
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
        Ok(OperatorImpl::Source(Box::new(BytesSource::new(
            Self { batch_size: Some(source_rows::batch_size(ctx, self.batch_size)), ..self.clone() },
            ctx.job.seed,
            ctx.worker.shard as u64,
            ctx.worker.shards as u64,
        ))))
    }
}

/// One worker's share of the rows.
#[derive(Debug)]
pub struct BytesSource {
    config: BytesSourceConfig,
    seed: u64,
    keys: KeyShard,
}

impl BytesSource {
    /// The rows `key % shards == shard` of `config`.
    pub fn new(config: BytesSourceConfig, seed: u64, shard: u64, shards: u64) -> Self {
        let keys = KeyShard::new(config.count, shard, shards);
        BytesSource { config, seed, keys }
    }
}

impl Source for BytesSource {
    fn next_batch(&mut self, _ctx: &mut OpContext) -> Result<Option<Batch>, OpError> {
        let keys = self.keys.next_keys(self.config.batch_size.unwrap_or(source_rows::DEFAULT_BATCH_SIZE));
        if keys.is_empty() {
            return Ok(None);
        }
        let captions = keys.iter().map(|k| format!("row {k}")).collect();
        let images =
            keys.iter().map(|&k| ByteBuf::from(payload(self.seed, k as u64, self.config.payload_bytes))).collect();
        Ok(Some(source_rows::batch(keys, captions, images)?))
    }

    fn position(&self) -> serde_json::Value {
        self.keys.position()
    }

    fn seek(&mut self, position: &serde_json::Value) -> Result<(), OpError> {
        self.keys.seek(position)
    }
}

/// Deterministic bytes for row `key` (a splitmix64 stream).
fn payload(seed: u64, key: u64, len: usize) -> Vec<u8> {
    let mut rng = Rng::from_state(seed ^ key.wrapping_mul(0x9E37_79B9_7F4A_7C15));
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        out.extend_from_slice(&rng.next_u64().to_le_bytes());
    }
    out.truncate(len);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn drain(source: &mut BytesSource) -> Vec<i64> {
        let mut ctx = OpContext::detached("read");
        let mut keys = Vec::new();
        while let Some(batch) = source.next_batch(&mut ctx).unwrap() {
            keys.extend_from_slice(batch.i64s("key").unwrap());
        }
        keys
    }

    #[test]
    fn shards_cover_every_key_once() {
        let config = BytesSourceConfig { count: 10, batch_size: Some(3), payload_bytes: 4 };
        let mut all: Vec<i64> = (0..3).flat_map(|s| drain(&mut BytesSource::new(config.clone(), 0, s, 3))).collect();
        all.sort_unstable();
        assert_eq!(all, (0..10).collect::<Vec<_>>());
    }

    #[test]
    fn rows_are_deterministic_and_seeded() {
        let config = BytesSourceConfig { count: 4, batch_size: Some(4), payload_bytes: 16 };
        let mut ctx = OpContext::detached("read");
        let a = BytesSource::new(config.clone(), 1, 0, 1).next_batch(&mut ctx).unwrap().unwrap();
        let b = BytesSource::new(config.clone(), 1, 0, 1).next_batch(&mut ctx).unwrap().unwrap();
        let c = BytesSource::new(config, 2, 0, 1).next_batch(&mut ctx).unwrap().unwrap();
        assert_eq!(a, b);
        assert_ne!(a.bytes("image").unwrap(), c.bytes("image").unwrap());
        assert_eq!(a.strs("caption").unwrap()[3], "row 3");
    }

    #[test]
    fn seek_resumes_after_the_last_batch() {
        let config = BytesSourceConfig { count: 10, batch_size: Some(4), payload_bytes: 0 };
        let mut first = BytesSource::new(config.clone(), 0, 0, 1);
        first.next_batch(&mut OpContext::detached("read")).unwrap();
        let mut resumed = BytesSource::new(config, 0, 0, 1);
        resumed.seek(&first.position()).unwrap();
        assert_eq!(drain(&mut resumed), (4..10).collect::<Vec<_>>());
        assert!(resumed.seek(&serde_json::json!({})).is_err());
    }
}
