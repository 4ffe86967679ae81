//! The trainers of one job as data-parallel replicas: which rows of a step each trains, the
//! check that they start equal, and one data position for the checkpoint.
//!
//! Every step, the replicas agree on the step's epoch and rows with one small all-gather of
//! their row keys: the step's rows in key order are split into `N` contiguous blocks (rank `r`
//! trains positions `r G / N .. (r + 1) G / N`), and rows that arrived at another trainer are
//! moved to the one whose block holds them. So the split depends on the keys alone, never on
//! which worker a row arrived at or when; and a replica's draws are those of its positions in
//! the step's one random stream, so the step's numbers do not depend on `N` either.
//!
//! A trainer whose epoch brought nothing still takes part, with no rows: an epoch is announced
//! by every replica before it is trained, the lowest announced epoch is trained first, and at
//! the end every replica announces "finished" until all have.

use latentflow_engine::runtime::PositionLedger;
use latentflow_engine::{Collective, OpError};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::rows::{Row, Shapes};
use crate::training::Trainer;

/// The epoch a finished trainer announces.
pub(super) const FINISHED: u64 = u64::MAX;

/// One step's rows as this replica sees them.
pub(super) struct StepRows {
    /// The epoch trained (the lowest announced).
    pub epoch: u64,
    /// This replica's block of the step, in key order.
    pub rows: Vec<Row>,
    /// The position of `rows[0]` in the step.
    pub first: usize,
    /// Rows in the step over all replicas (0: nothing to train).
    pub global_rows: usize,
    /// Every key of the step, in order.
    pub keys: Vec<i64>,
    /// The rows' shapes, when any replica had rows.
    pub shapes: Option<Shapes>,
}

#[derive(Serialize, Deserialize)]
struct Announcement {
    epoch: u64,
    keys: Vec<i64>,
    shapes: Option<Shapes>,
}

/// This trainer's place among the replicas; alone when `collective` is `None`.
pub(super) struct Replicas {
    collective: Option<Collective>,
    /// With the `nccl` feature on CUDA devices: the communicator that sums the gradients.
    #[cfg(feature = "nccl")]
    nccl: Option<latentflow_gpu_kernels::nccl::NcclGroup>,
}

impl Replicas {
    pub fn new(collective: Option<Collective>) -> Self {
        Replicas {
            collective,
            #[cfg(feature = "nccl")]
            nccl: None,
        }
    }

    /// On CUDA device `cuda:N` (`device`), with several replicas: joins an NCCL communicator
    /// over them (rank 0's unique id travels over the engine's collective), which then sums the
    /// gradients instead of the collective.
    #[cfg(feature = "nccl")]
    pub fn join_nccl(&mut self, device: Option<&str>) -> Result<(), OpError> {
        use latentflow_gpu_kernels::nccl::NcclGroup;
        let ordinal = device.and_then(|d| d.strip_prefix("cuda:")).and_then(|n| n.parse::<usize>().ok());
        let (Some(ordinal), Some(collective)) = (ordinal, self.collective.as_mut()) else { return Ok(()) };
        let id = if collective.rank() == 0 { NcclGroup::unique_id().map_err(OpError::wrap)? } else { Vec::new() };
        let id = collective.broadcast(id, 0)?;
        self.nccl = Some(NcclGroup::join(ordinal, collective.rank(), collective.size(), &id).map_err(OpError::wrap)?);
        tracing::info!(rank = collective.rank(), device = ordinal, "gradients summed by NCCL");
        Ok(())
    }

    /// What sums the gradients: NCCL when joined, else the collective; `None` alone.
    pub fn gradient_sum(&mut self) -> Option<GradientSum<'_>> {
        #[cfg(feature = "nccl")]
        if let Some(group) = self.nccl.as_mut() {
            return Some(GradientSum::new(group, None));
        }
        let collective = self.collective.as_mut()?;
        let stats = std::sync::Arc::clone(collective.stats());
        Some(GradientSum::new(collective, Some(stats)))
    }

    /// This replica's rank.
    pub fn rank(&self) -> usize {
        self.collective.as_ref().map_or(0, Collective::rank)
    }

    /// Number of replicas.
    pub fn size(&self) -> usize {
        self.collective.as_ref().map_or(1, Collective::size)
    }

    /// The first replica writes the run's files.
    pub fn is_first(&self) -> bool {
        self.rank() == 0
    }

    /// Fails unless every replica starts from the same weights, step and random stream.
    pub fn check_identical(&mut self, trainer: &Trainer) -> Result<(), OpError> {
        let Some(collective) = self.collective.as_mut() else { return Ok(()) };
        let sum = trainer.checksum().map_err(crate::model_keys::op_error)?;
        let all = collective.all_gather(&sum.to_le_bytes())?;
        let sums: Vec<u64> = all.iter().map(|b| u64::from_le_bytes(b[..8].try_into().unwrap_or_default())).collect();
        if sums.iter().any(|&s| s != sums[0]) {
            return Err(OpError::msg(format!(
                "the {} trainers do not start from the same weights and state (checksums {sums:x?} by rank): \
                 every trainer must load the same model or checkpoint with the same seed",
                sums.len()
            )));
        }
        Ok(())
    }

    /// Agrees on the next step: announces `epoch` with this replica's `rows` for it, and
    /// returns the step of the lowest announced epoch with this replica's block of its rows.
    /// When that epoch is earlier than `epoch`, `rows` come back untouched (announce them again).
    pub fn next_step(
        &mut self,
        epoch: u64,
        mut rows: Vec<Row>,
        shapes: Option<&Shapes>,
    ) -> Result<(StepRows, Option<Vec<Row>>), OpError> {
        let Some(collective) = self.collective.as_mut() else {
            // Alone: the epoch's rows, in key order, are the step.
            rows.sort_by_key(|r| r.key);
            let keys = rows.iter().map(|r| r.key).collect();
            let global_rows = rows.len();
            let shapes = shapes.cloned();
            return Ok((StepRows { epoch, rows, first: 0, global_rows, keys, shapes }, None));
        };
        let (rank, size) = (collective.rank(), collective.size());
        let mine = Announcement { epoch, keys: rows.iter().map(|r| r.key).collect(), shapes: shapes.cloned() };
        let text = serde_json::to_vec(&mine).map_err(|e| OpError::msg(e.to_string()))?;
        let all: Vec<Announcement> = collective
            .all_gather(&text)?
            .iter()
            .map(|b| serde_json::from_slice(b))
            .collect::<Result<_, _>>()
            .map_err(|e| OpError::msg(format!("a trainer sent an unreadable announcement: {e}")))?;
        let step_epoch = all.iter().map(|a| a.epoch).min().unwrap_or(epoch);
        let taking = |a: &Announcement| a.epoch == step_epoch;
        let mut shape_of_step: Option<Shapes> = None;
        for a in all.iter().filter(|a| taking(a) && !a.keys.is_empty()) {
            match (&shape_of_step, &a.shapes) {
                (None, s) => shape_of_step = s.clone(),
                (Some(s), Some(t)) if s != t => {
                    return Err(OpError::msg(format!(
                        "trainers got rows of different shapes in epoch {step_epoch} ({s:?} and {t:?}): \
                         one run trains one resolution"
                    )))
                }
                _ => {}
            }
        }
        // The step's rows in key order (ties by trainer and arrival: keys should be unique).
        let mut order: Vec<(i64, usize, usize)> = Vec::new();
        for (from, a) in all.iter().enumerate().filter(|(_, a)| taking(a)) {
            order.extend(a.keys.iter().enumerate().map(|(i, &k)| (k, from, i)));
        }
        order.sort_unstable();
        let global_rows = order.len();
        let block = |r: usize| (r * global_rows / size)..((r + 1) * global_rows / size);
        let owner = |position: usize| (0..size).find(|&r| block(r).contains(&position)).unwrap_or(size - 1);
        let keys: Vec<i64> = order.iter().map(|o| o.0).collect();
        // Rows of a later epoch stay with this replica until that epoch's turn.
        let (mine, later) = if step_epoch == epoch { (rows, None) } else { (Vec::new(), Some(rows)) };
        let step = StepRows {
            epoch: step_epoch,
            rows: Vec::new(),
            first: block(rank).start,
            global_rows,
            keys,
            shapes: shape_of_step,
        };
        Ok((self.move_rows(step, &order, mine, &owner)?, later))
    }

    /// Sends each of this replica's `rows` (those in the step) to the replica whose block holds
    /// it and fills `step.rows` with this replica's block, in key order.
    fn move_rows(
        &mut self,
        mut step: StepRows,
        order: &[(i64, usize, usize)],
        rows: Vec<Row>,
        owner: &dyn Fn(usize) -> usize,
    ) -> Result<StepRows, OpError> {
        let collective = self.collective.as_mut().expect("moving rows needs replicas");
        let (rank, size) = (collective.rank(), collective.size());
        let mut rows: Vec<Option<Row>> = rows.into_iter().map(Some).collect();
        let mut outgoing = vec![Vec::new(); size];
        let mut kept = Vec::new();
        for (position, &(_, _, i)) in order.iter().enumerate().filter(|(_, o)| o.1 == rank) {
            let row = rows[i].take().ok_or_else(|| OpError::msg("a row was announced twice"))?;
            let to = owner(position);
            if to == rank {
                kept.push((position, row));
            } else {
                encode_row(&mut outgoing[to], &row);
            }
        }
        let incoming = collective.exchange(outgoing)?;
        let mut block: Vec<(usize, Row)> = kept;
        let (latent_len, caption_len) = match &step.shapes {
            Some((l, c)) => (l.iter().product::<usize>(), c.iter().product::<usize>()),
            None => (0, 0),
        };
        // Rows arrive from each replica in position order.
        let mut cursors: Vec<(usize, &[u8])> = incoming.iter().map(|b| (0, b.as_slice())).collect();
        for (position, &(_, from, _)) in order.iter().enumerate() {
            if owner(position) != rank || from == rank {
                continue;
            }
            let (offset, bytes) = &mut cursors[from];
            let row = decode_row(bytes, offset, latent_len, caption_len)
                .ok_or_else(|| OpError::msg(format!("trainer {from} sent a truncated row")))?;
            block.push((position, row));
        }
        block.sort_by_key(|(p, _)| *p);
        step.rows = block.into_iter().map(|(_, r)| r).collect();
        Ok(step)
    }

    /// The data position of the whole job for a checkpoint: every trainer's process ledger
    /// (`local`), merged. Every replica calls it at the same steps; only the first keeps it.
    pub fn job_position(&mut self, local: Option<Value>) -> Result<Option<Value>, OpError> {
        let Some(collective) = self.collective.as_mut() else { return Ok(local) };
        let text = serde_json::to_vec(&local).map_err(|e| OpError::msg(e.to_string()))?;
        let all = collective.all_gather(&text)?;
        let positions: Vec<Option<Value>> = all.iter().map(|b| serde_json::from_slice(b).unwrap_or(None)).collect();
        Ok(PositionLedger::merge(positions.into_iter().flatten()))
    }
}

fn encode_row(out: &mut Vec<u8>, row: &Row) {
    out.extend_from_slice(&row.key.to_le_bytes());
    for v in row.latents.iter().chain(&row.caption) {
        out.extend_from_slice(&v.to_le_bytes());
    }
}

fn decode_row(bytes: &[u8], offset: &mut usize, latent_len: usize, caption_len: usize) -> Option<Row> {
    let size = 8 + 4 * (latent_len + caption_len);
    let raw = bytes.get(*offset..*offset + size)?;
    *offset += size;
    let key = i64::from_le_bytes(raw[..8].try_into().ok()?);
    let floats = latentflow_engine::collective::from_bytes(&raw[8..]);
    let (latents, caption) = floats.split_at(latent_len);
    Some(Row { key, latents: latents.to_vec(), caption: caption.to_vec() })
}

/// Sums gradients over the replicas (the engine's collective or NCCL), timing what it does.
pub(super) struct GradientSum<'a> {
    inner: &'a mut dyn crate::training::Replicas,
    /// The collective's counters, for the bytes it sent.
    stats: Option<std::sync::Arc<latentflow_engine::collective::CollectiveStats>>,
    bytes_before: u64,
    seconds: f64,
}

impl<'a> GradientSum<'a> {
    fn new(
        inner: &'a mut dyn crate::training::Replicas,
        stats: Option<std::sync::Arc<latentflow_engine::collective::CollectiveStats>>,
    ) -> Self {
        let bytes_before = stats.as_ref().map_or(0, |s| s.bytes_sent());
        GradientSum { inner, stats, bytes_before, seconds: 0.0 }
    }

    /// Seconds spent summing (waiting for the others included) and bytes sent (0 for NCCL,
    /// whose traffic this does not see).
    pub fn figures(&self) -> (f64, u64) {
        (self.seconds, self.stats.as_ref().map_or(0, |s| s.bytes_sent() - self.bytes_before))
    }
}

impl crate::training::Replicas for GradientSum<'_> {
    fn all_reduce_sum(&mut self, buf: &mut [f32]) -> Result<(), String> {
        let started = std::time::Instant::now();
        let result = self.inner.all_reduce_sum(buf);
        self.seconds += started.elapsed().as_secs_f64();
        result
    }
}

impl crate::training::Replicas for Collective {
    fn all_reduce_sum(&mut self, buf: &mut [f32]) -> Result<(), String> {
        Collective::all_reduce_sum(self, buf).map_err(|e| e.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(key: i64) -> Row {
        Row { key, latents: vec![key as f32; 4], caption: vec![-key as f32; 2] }
    }

    /// Runs `next_step` on every rank of a local group with its `rows` (announcing `epochs`).
    fn step(epochs: Vec<u64>, rows: Vec<Vec<i64>>) -> Vec<(StepRows, Option<Vec<Row>>)> {
        let shapes: Shapes = (vec![4], vec![2]);
        let handles = Collective::local_group("train", rows.len());
        let threads: Vec<_> = handles
            .into_iter()
            .zip(rows.into_iter().zip(epochs))
            .map(|(c, (keys, epoch))| {
                let shapes = shapes.clone();
                std::thread::spawn(move || {
                    let mut replicas = Replicas::new(Some(c));
                    replicas.next_step(epoch, keys.into_iter().map(row).collect(), Some(&shapes)).unwrap()
                })
            })
            .collect();
        threads.into_iter().map(|t| t.join().unwrap()).collect()
    }

    #[test]
    fn rows_split_by_key_into_contiguous_blocks_wherever_they_arrived() {
        // Keys arrive scattered; the step is keys 0..7 in order, 3 + 4 (7 * r / 2).
        let steps = step(vec![5, 5], vec![vec![6, 1, 3, 0], vec![5, 2, 4]]);
        let blocks: Vec<Vec<i64>> = steps.iter().map(|(s, _)| s.rows.iter().map(|r| r.key).collect()).collect();
        assert_eq!(blocks, [vec![0, 1, 2], vec![3, 4, 5, 6]]);
        assert_eq!(steps[1].0.first, 3);
        assert!(steps.iter().all(|(s, left)| s.global_rows == 7 && s.epoch == 5 && left.is_none()));
        assert_eq!(steps[1].0.rows[0], row(3), "payload intact after the move");
    }

    #[test]
    fn the_lowest_announced_epoch_goes_first_and_later_rows_wait() {
        let steps = step(vec![4, 3, FINISHED], vec![vec![9, 8], vec![1], vec![]]);
        assert!(steps.iter().all(|(s, _)| s.epoch == 3 && s.global_rows == 1 && s.keys == [1]));
        let trained: Vec<usize> = steps.iter().map(|(s, _)| s.rows.len()).collect();
        assert_eq!(trained, [0, 0, 1], "the one row goes to the last block");
        assert_eq!(steps[0].1.as_ref().map(Vec::len), Some(2), "epoch 4's rows come back");
        assert!(steps[1].1.is_none());
    }
}
