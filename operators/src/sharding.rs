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

    /// Where shard `shard` of `shards` continues when the keys were handed out by `saved.len()`
    /// other shards that stood at `saved` ([`KeyShard::position`] each, `None` for nothing yet):
    /// possible when what they handed out together is a prefix `0..P` of the keys, as it is
    /// after any whole number of epochs of equal shares. The new shard then goes on with its
    /// keys from `P` on.
    ///
    /// ```
    /// use latentflow_operators::sharding::KeyShard;
    /// use serde_json::json;
    /// // Two shards handed out 3 keys each: keys 0..6. Three shards continue with 2 each.
    /// let saved = [Some(json!({"emitted": 3})), Some(json!({"emitted": 3}))];
    /// assert_eq!(KeyShard::reshard(&saved, 1, 3).unwrap(), json!({"emitted": 2}));
    /// let mut shard = KeyShard::new(100, 1, 3);
    /// shard.seek(&json!({"emitted": 2})).unwrap();
    /// assert_eq!(shard.next_keys(1), vec![7]);
    /// ```
    pub fn reshard(
        saved: &[Option<serde_json::Value>],
        shard: usize,
        shards: usize,
    ) -> Result<serde_json::Value, OpError> {
        let old = saved.len() as u64;
        let emitted = saved
            .iter()
            .map(|p| match p {
                None => Ok(0),
                Some(p) => p
                    .get("emitted")
                    .and_then(|v| v.as_u64())
                    .ok_or_else(|| OpError::msg(format!("bad source position {p}: expected {{\"emitted\": N}}"))),
            })
            .collect::<Result<Vec<u64>, OpError>>()?;
        let prefix: u64 = emitted.iter().sum();
        // Keys below `prefix` that belong to shard `s` of `n`.
        let below = |s: u64, n: u64| if prefix > s { (prefix - s).div_ceil(n) } else { 0 };
        if emitted.iter().enumerate().any(|(s, &e)| e != below(s as u64, old)) {
            return Err(OpError::msg(format!(
                "the saved shards handed out {emitted:?} keys each, which is not the first {prefix} keys; \
                 resume with the number of workers that saved it"
            )));
        }
        Ok(serde_json::json!({ "emitted": below(shard as u64, shards as u64) }))
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resharding_continues_with_the_same_keys_and_refuses_gaps() {
        // 4 shards over 10 keys, 2 keys each so far: keys 0..8 handed out.
        let mut old: Vec<KeyShard> = (0..4).map(|s| KeyShard::new(10, s, 4)).collect();
        let mut seen: Vec<i64> = old.iter_mut().flat_map(|s| s.next_keys(2)).collect();
        let saved: Vec<_> = old.iter().map(|s| Some(s.position())).collect();
        for shards in [1, 2, 3, 4, 5] {
            let mut rest: Vec<i64> = (0..shards)
                .flat_map(|s| {
                    let mut shard = KeyShard::new(10, s as u64, shards as u64);
                    shard.seek(&KeyShard::reshard(&saved, s, shards).unwrap()).unwrap();
                    shard.next_keys(100)
                })
                .collect();
            rest.sort_unstable();
            assert_eq!(rest, [8, 9], "{shards} shards continue after the prefix");
        }
        seen.sort_unstable();
        assert_eq!(seen, (0..8).collect::<Vec<_>>());
        let gap = [Some(serde_json::json!({"emitted": 2})), None];
        assert!(KeyShard::reshard(&gap, 0, 1).unwrap_err().to_string().contains("not the first 2 keys"));
    }
}
