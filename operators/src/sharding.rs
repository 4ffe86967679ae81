//! Splitting a numbered range of rows across workers, deterministically and resumably.

use latentflow_engine::OpError;

/// The keys `k < count` with `k % shards == shard`, handed out in order.
///
/// ```
/// use latentflow_operators::sharding::KeyShard;
/// let mut shard = KeyShard::new(10, 1, 3);
/// assert_eq!(shard.next_keys(2), vec![1, 4]);
/// assert_eq!(shard.next_keys(5), vec![7]);
/// assert!(shard.next_keys(5).is_empty());
/// ```
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KeyShard {
    count: u64,
    shard: u64,
    shards: u64,
    /// Keys of this shard handed out so far.
    emitted: u64,
}

impl KeyShard {
    /// Shard `shard` of `shards` over keys `0..count`.
    pub fn new(count: u64, shard: u64, shards: u64) -> Self {
        KeyShard { count, shard, shards: shards.max(1), emitted: 0 }
    }

    fn len(&self) -> u64 {
        self.count / self.shards + u64::from(self.shard < self.count % self.shards)
    }

    /// The next `n` keys (fewer at the end, none when done).
    pub fn next_keys(&mut self, n: usize) -> Vec<i64> {
        let end = (self.emitted + n as u64).min(self.len());
        let keys = (self.emitted..end).map(|i| (i * self.shards + self.shard) as i64).collect();
        self.emitted = end.max(self.emitted);
        keys
    }

    /// `{"emitted": n}`.
    pub fn position(&self) -> serde_json::Value {
        serde_json::json!({ "emitted": self.emitted })
    }

    /// Continues after a [`KeyShard::position`].
    pub fn seek(&mut self, position: &serde_json::Value) -> Result<(), OpError> {
        let emitted = position
            .get("emitted")
            .and_then(|v| v.as_u64())
            .ok_or_else(|| OpError::msg(format!("bad source position {position}: expected {{\"emitted\": N}}")))?;
        self.emitted = emitted.min(self.len());
        Ok(())
    }
}
