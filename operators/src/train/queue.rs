//! Rows waiting for their optimizer step, one queue per shape (resolution bucket), so every
//! step trains rows of one shape.
//!
//! Every replica keeps the same queue (it is built from the keys and shapes all of them
//! announce; the rows themselves stay with the replica that holds them until their step), so
//! the steps are the same on every replica and for any number of them. The rules, applied
//! after each epoch's rows are added, until none applies:
//!
//! 1. a bucket with `global_batch_size` rows or more trains that many, oldest first (of several
//!    such buckets, the one whose first row is oldest);
//! 2. when every waiting row arrived in the latest epoch and all have one shape, they train as
//!    one step even if fewer: a run of one resolution trains each epoch as its step, as it
//!    always has, short epochs (rows rejected upstream) included;
//! 3. at the end of the data, what is left trains in short steps, bucket by bucket.
//!
//! The queue is saved with each checkpoint (keys, arrival order and the rows), so a resumed run
//! continues with exactly the rows that were waiting.

use std::collections::{BTreeMap, VecDeque};

use serde::{Deserialize, Serialize};

use super::rows::Shapes;

/// One waiting row: `id` (unique in the run, the same on every replica), its key, the epoch
/// it arrived in (a counter over resumes) and the replica holding its data.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub(super) struct Waiting {
    pub id: u64,
    pub key: i64,
    pub arrival: u64,
    pub holder: usize,
}

impl Waiting {
    fn age(&self) -> (u64, i64, u64) {
        (self.arrival, self.key, self.id)
    }
}

/// The rows of one step, in key order.
#[derive(Debug, PartialEq)]
pub(super) struct PlannedStep {
    pub shapes: Shapes,
    pub rows: Vec<Waiting>,
}

/// The waiting rows of every bucket.
#[derive(Debug, Default, Clone, PartialEq, Serialize, Deserialize)]
pub(super) struct BucketQueue {
    buckets: BTreeMap<String, (Shapes, VecDeque<Waiting>)>,
    next_arrival: u64,
    next_id: u64,
}

fn bucket_name(shapes: &Shapes) -> String {
    format!("{:?}/{:?}", shapes.0, shapes.1)
}

impl BucketQueue {
    /// Adds one epoch's rows, `(key, holder, shapes)` in the order every replica sees them;
    /// returns the ids given to them, in that order.
    pub fn add(&mut self, rows: &[(i64, usize, Shapes)]) -> Vec<u64> {
        let arrival = self.next_arrival;
        self.next_arrival += 1;
        let mut ids = Vec::with_capacity(rows.len());
        for (key, holder, shapes) in rows {
            let id = self.next_id;
            self.next_id += 1;
            let bucket = self.buckets.entry(bucket_name(shapes)).or_insert_with(|| (shapes.clone(), VecDeque::new()));
            bucket.1.push_back(Waiting { id, key: *key, arrival, holder: *holder });
            ids.push(id);
        }
        ids
    }

    /// Rows waiting in every bucket.
    pub fn len(&self) -> usize {
        self.buckets.values().map(|(_, q)| q.len()).sum()
    }

    /// Every waiting row with its shapes, bucket by bucket, oldest first.
    pub fn waiting(&self) -> impl Iterator<Item = (&Shapes, &Waiting)> {
        self.buckets.values().flat_map(|(shapes, q)| q.iter().map(move |w| (shapes, w)))
    }

    /// The step the rules above give next (`at_end`: the data has ended), removed from the
    /// queue; `None` when the rows wait for more.
    pub fn next_step(&mut self, global_batch_size: usize, at_end: bool) -> Option<PlannedStep> {
        let oldest = |pick: &dyn Fn(&VecDeque<Waiting>) -> bool| {
            self.buckets
                .iter()
                .filter(|(_, (_, q))| !q.is_empty() && pick(q))
                .min_by_key(|(_, (_, q))| q[0].age())
                .map(|(name, _)| name.clone())
        };
        let latest = self.next_arrival.saturating_sub(1);
        let (name, take) = if let Some(name) = oldest(&|q| q.len() >= global_batch_size) {
            (name, global_batch_size)
        } else if at_end
            || (self.buckets.values().filter(|(_, q)| !q.is_empty()).count() == 1
                && self.waiting().all(|(_, w)| w.arrival == latest))
        {
            (oldest(&|_| true)?, global_batch_size)
        } else {
            return None;
        };
        let (shapes, queue) = self.buckets.get_mut(&name).expect("the bucket just found");
        let take = take.min(queue.len());
        let mut rows: Vec<Waiting> = queue.drain(..take).collect();
        let shapes = shapes.clone();
        if queue.is_empty() {
            self.buckets.remove(&name);
        }
        rows.sort_by_key(|w| (w.key, w.id));
        Some(PlannedStep { shapes, rows })
    }

    /// Gives every waiting row to replica `id % replicas` (after a resume, on any number).
    pub fn reassign(&mut self, replicas: usize) {
        for (_, queue) in self.buckets.values_mut() {
            for w in queue.iter_mut() {
                w.holder = (w.id % replicas.max(1) as u64) as usize;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shapes(side: usize) -> Shapes {
        (vec![4, side, side], vec![2, 3])
    }

    fn keys(step: &PlannedStep) -> Vec<i64> {
        step.rows.iter().map(|w| w.key).collect()
    }

    #[test]
    fn one_resolution_trains_every_epoch_as_its_step_short_ones_too() {
        let mut q = BucketQueue::default();
        q.add(&[(1, 0, shapes(8)), (2, 0, shapes(8)), (0, 0, shapes(8))]);
        assert_eq!(keys(&q.next_step(3, false).unwrap()), [0, 1, 2]);
        q.add(&[(5, 0, shapes(8))]);
        assert_eq!(keys(&q.next_step(3, false).unwrap()), [5], "a short epoch trains as it is");
        assert!(q.next_step(3, false).is_none());
    }

    #[test]
    fn buckets_fill_across_epochs_and_the_rest_trains_at_the_end() {
        let mut q = BucketQueue::default();
        q.add(&[(0, 0, shapes(8)), (1, 1, shapes(4)), (2, 0, shapes(8))]);
        assert!(q.next_step(3, false).is_none(), "two buckets, neither full");
        q.add(&[(3, 1, shapes(4)), (4, 0, shapes(8)), (5, 1, shapes(4))]);
        // Both are full now: the one whose first row is oldest (key 0 < key 1) goes first.
        let first = q.next_step(3, false).unwrap();
        assert_eq!((keys(&first), first.shapes.clone()), (vec![0, 2, 4], shapes(8)));
        assert_eq!(keys(&q.next_step(3, false).unwrap()), [1, 3, 5]);
        q.add(&[(7, 0, shapes(4)), (6, 1, shapes(8)), (8, 0, shapes(4))]);
        assert!(q.next_step(3, false).is_none());
        assert_eq!(q.len(), 3);
        assert_eq!(keys(&q.next_step(3, true).unwrap()), [6], "the oldest first row first at the end");
        assert_eq!(keys(&q.next_step(3, true).unwrap()), [7, 8]);
        assert!(q.next_step(3, true).is_none());
    }

    #[test]
    fn a_full_bucket_trains_its_oldest_rows_and_keeps_the_others() {
        let mut q = BucketQueue::default();
        q.add(&[(9, 0, shapes(8)), (3, 0, shapes(4))]);
        q.add(&[(1, 0, shapes(8)), (2, 0, shapes(8))]);
        assert_eq!(keys(&q.next_step(2, false).unwrap()), [1, 9], "epoch order first, keys within an epoch");
        let saved = q.clone();
        let text = serde_json::to_string(&saved).unwrap();
        let mut back: BucketQueue = serde_json::from_str(&text).unwrap();
        assert_eq!(back, q, "the queue survives a checkpoint");
        back.reassign(3);
        assert!(back.waiting().all(|(_, w)| w.holder == (w.id % 3) as usize));
    }
}
