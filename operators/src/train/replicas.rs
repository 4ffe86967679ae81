//! The trainers of one job as data-parallel replicas: which rows of a step each trains, the
//! check that they start equal, and one data position for the checkpoint.
//!
//! Every epoch, the replicas agree on its rows with one small all-gather of their row keys and
//! shapes, which every replica adds to the same [`BucketQueue`]; a step's rows in key order are
//! split into `N` contiguous blocks (rank `r` trains positions `r G / N .. (r + 1) G / N`), and
//! rows held by another trainer are moved to the one whose block holds them: as they are between
//! trainers of one process (rows an encoder left on its GPU stay there until the step moves them
//! to the trainer's GPU, [`super::handoff`]), as bytes between processes. So the split
//! depends on the keys alone, never on which worker a row arrived at or when; and a replica's
//! draws are those of its positions in the step's one random stream, so the step's numbers do
//! not depend on `N` either.
//!
//! A trainer whose epoch brought nothing still takes part, with no rows: an epoch is announced
//! by every replica before it is trained, the lowest announced epoch is trained first, and at
//! the end every replica announces "finished" until all have.

use latentflow_engine::runtime::PositionLedger;
use latentflow_engine::{Collective, OpError};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use std::collections::HashMap;

use super::queue::{BucketQueue, PlannedStep};
use super::rows::{Row, RowValues, Shapes};
use crate::training::Trainer;

/// The epoch a finished trainer announces.
pub(super) const FINISHED: u64 = u64::MAX;

/// One epoch's rows as the replicas announced them.
pub(super) struct Arrivals {
    /// The epoch (the lowest announced).
    pub epoch: u64,
    /// Its rows over all replicas, `(key, holder, shapes)` in key order (ties by holder, then
    /// arrival).
    pub rows: Vec<(i64, usize, Shapes)>,
    /// For each of `rows` this replica holds, its index among the rows it announced.
    pub mine: Vec<Option<usize>>,
    /// Every replica has finished its data without being stopped: what waits trains now.
    pub at_end: bool,
}

#[derive(Serialize, Deserialize)]
struct Announcement {
    epoch: u64,
    keys: Vec<i64>,
    /// The distinct shapes of the rows, and each row's index into them.
    shapes: Vec<Shapes>,
    shape_of: Vec<u32>,
    /// Stopped (Ctrl-C, SIGTERM, a peer): the rows that wait stay for the checkpoint.
    stopping: bool,
}

impl Announcement {
    fn new(epoch: u64, rows: &[Row], stopping: bool) -> Self {
        let mut shapes: Vec<Shapes> = Vec::new();
        let shape_of = rows
            .iter()
            .map(|r| match shapes.iter().position(|s| s == &r.shapes) {
                Some(i) => i as u32,
                None => {
                    shapes.push(r.shapes.clone());
                    (shapes.len() - 1) as u32
                }
            })
            .collect();
        Announcement { epoch, keys: rows.iter().map(|r| r.key).collect(), shapes, shape_of, stopping }
    }

    fn shapes_of(&self, i: usize) -> Shapes {
        self.shapes[self.shape_of[i] as usize].clone()
    }
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
            return Some(GradientSum::new(Box::new(group), None));
        }
        let collective = self.collective.as_mut()?;
        let stats = std::sync::Arc::clone(collective.stats());
        Some(GradientSum::new(Box::new(CollectiveSum(collective)), Some(stats)))
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

    /// Announces `epoch` with this replica's `rows` for it and returns the lowest epoch any
    /// replica announced with its rows. When that epoch is earlier than `epoch`, none of
    /// `rows` are in it (announce them again).
    pub fn announce(&mut self, epoch: u64, rows: &[Row], stopping: bool) -> Result<Arrivals, OpError> {
        let mine = Announcement::new(epoch, rows, stopping);
        let all: Vec<Announcement> = match self.collective.as_mut() {
            None => vec![mine],
            Some(collective) => {
                let text = serde_json::to_vec(&mine).map_err(|e| OpError::msg(e.to_string()))?;
                collective
                    .all_gather(&text)?
                    .iter()
                    .map(|b| serde_json::from_slice(b))
                    .collect::<Result<_, _>>()
                    .map_err(|e| OpError::msg(format!("a trainer sent an unreadable announcement: {e}")))?
            }
        };
        let rank = self.rank();
        let step_epoch = all.iter().map(|a| a.epoch).min().unwrap_or(epoch);
        let mut order: Vec<(i64, usize, usize)> = Vec::new();
        for (from, a) in all.iter().enumerate().filter(|(_, a)| a.epoch == step_epoch) {
            order.extend(a.keys.iter().enumerate().map(|(i, &k)| (k, from, i)));
        }
        order.sort_unstable();
        Ok(Arrivals {
            epoch: step_epoch,
            rows: order.iter().map(|&(k, from, i)| (k, from, all[from].shapes_of(i))).collect(),
            mine: order.iter().map(|&(_, from, i)| (from == rank).then_some(i)).collect(),
            at_end: step_epoch == FINISHED && all.iter().all(|a| !a.stopping),
        })
    }

    /// Moves the rows of `step` (in its key order) from the replicas holding them (`held`,
    /// by id) to the one whose block holds them: rank `r` trains positions `r n / N .. (r + 1)
    /// n / N`. Returns this replica's block and the position of its first row.
    pub fn take_block(
        &mut self,
        step: &PlannedStep,
        held: &mut HashMap<u64, Row>,
    ) -> Result<(Vec<Row>, usize), OpError> {
        let (rank, size) = (self.rank(), self.size());
        let n = step.rows.len();
        let block = |r: usize| (r * n / size)..((r + 1) * n / size);
        let owner = |position: usize| (0..size).find(|&r| block(r).contains(&position)).unwrap_or(size - 1);
        let mut take = |id: u64| held.remove(&id).ok_or_else(|| OpError::msg(format!("waiting row {id} is not here")));
        let mine: Vec<(usize, Row)> = step
            .rows
            .iter()
            .enumerate()
            .filter(|(_, w)| w.holder == rank)
            .map(|(position, w)| Ok((position, take(w.id)?)))
            .collect::<Result<_, OpError>>()?;
        let Some(collective) = self.collective.as_mut() else {
            return Ok((mine.into_iter().map(|(_, r)| r).collect(), 0));
        };
        let mut rows: Vec<(usize, Row)> = if collective.is_local() {
            // Trainers in one process hand each other the rows as they are: rows still on an
            // encoder's device stay there until the step moves them to the trainer's device.
            let mut outgoing: Vec<Vec<(usize, Row)>> = (0..size).map(|_| Vec::new()).collect();
            for (position, row) in mine {
                outgoing[owner(position)].push((position, row));
            }
            collective.exchange_objects(outgoing)?.into_iter().flatten().collect()
        } else {
            let mut outgoing = vec![Vec::new(); size];
            let mut kept = Vec::new();
            for (position, row) in mine {
                match owner(position) {
                    to if to == rank => kept.push((position, row)),
                    to => encode_row(&mut outgoing[to], &row)?,
                }
            }
            let incoming = collective.exchange(outgoing)?;
            let mut cursors: Vec<usize> = vec![0; size];
            for (position, w) in step.rows.iter().enumerate() {
                if owner(position) != rank || w.holder == rank {
                    continue;
                }
                let row = decode_row(&incoming[w.holder], &mut cursors[w.holder], &step.shapes)
                    .ok_or_else(|| OpError::msg(format!("trainer {} sent a truncated row", w.holder)))?;
                kept.push((position, row));
            }
            kept
        };
        rows.sort_by_key(|(p, _)| *p);
        Ok((rows.into_iter().map(|(_, r)| r).collect(), block(rank).start))
    }

    /// Every row waiting in `queue`, in its order, on the first replica (copied from the
    /// replicas holding them, which keep theirs); `None` on the others.
    pub fn gather_waiting(
        &mut self,
        queue: &BucketQueue,
        held: &HashMap<u64, Row>,
    ) -> Result<Option<Vec<Row>>, OpError> {
        let rank = self.rank();
        let find =
            |id: u64| held.get(&id).cloned().ok_or_else(|| OpError::msg(format!("waiting row {id} is not here")));
        let Some(collective) = self.collective.as_mut() else {
            return queue.waiting().map(|(_, w)| find(w.id)).collect::<Result<_, _>>().map(Some);
        };
        let mut outgoing = vec![Vec::new(); collective.size()];
        if rank != 0 {
            for (_, w) in queue.waiting().filter(|(_, w)| w.holder == rank) {
                encode_row(&mut outgoing[0], &find(w.id)?)?;
            }
        }
        let incoming = collective.exchange(outgoing)?;
        if rank != 0 {
            return Ok(None);
        }
        let mut cursors = vec![0; incoming.len()];
        let mut rows = Vec::with_capacity(queue.len());
        for (shapes, w) in queue.waiting() {
            rows.push(match w.holder {
                0 => find(w.id)?,
                from => decode_row(&incoming[from], &mut cursors[from], shapes)
                    .ok_or_else(|| OpError::msg(format!("trainer {from} sent a truncated waiting row")))?,
            });
        }
        Ok(Some(rows))
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

/// A row on the wire: its key and values (the shapes are known to both sides).
fn encode_row(out: &mut Vec<u8>, row: &Row) -> Result<(), OpError> {
    out.extend_from_slice(&row.key.to_le_bytes());
    for v in row.latents.to_host()?.iter().chain(row.caption.to_host()?.iter()) {
        out.extend_from_slice(&v.to_le_bytes());
    }
    Ok(())
}

fn decode_row(bytes: &[u8], offset: &mut usize, shapes: &Shapes) -> Option<Row> {
    let latent_len = shapes.0.iter().product::<usize>();
    let caption_len = shapes.1.iter().product::<usize>();
    let size = 8 + 4 * (latent_len + caption_len);
    let raw = bytes.get(*offset..*offset + size)?;
    *offset += size;
    let key = i64::from_le_bytes(raw[..8].try_into().ok()?);
    let floats = latentflow_engine::collective::from_bytes(&raw[8..]);
    let (latents, caption) = floats.split_at(latent_len);
    Some(Row {
        key,
        shapes: shapes.clone(),
        latents: RowValues::owned(latents.to_vec()),
        caption: RowValues::owned(caption.to_vec()),
    })
}

/// Sums gradients over the replicas (the engine's collective or NCCL), timing what it does.
pub(super) struct GradientSum<'a> {
    inner: Box<dyn crate::training::Replicas + 'a>,
    /// The collective's counters, for the bytes it sent.
    stats: Option<std::sync::Arc<latentflow_engine::collective::CollectiveStats>>,
    bytes_before: u64,
    seconds: f64,
}

impl<'a> GradientSum<'a> {
    fn new(
        inner: Box<dyn crate::training::Replicas + 'a>,
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

/// The engine's collective as what sums a trainer's gradients.
struct CollectiveSum<'a>(&'a mut Collective);

impl crate::training::Replicas for CollectiveSum<'_> {
    fn all_reduce_sum(&mut self, buf: &mut [f32]) -> Result<(), String> {
        self.0.all_reduce_sum(buf).map_err(|e| e.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shapes() -> Shapes {
        (vec![4], vec![2])
    }

    fn row(key: i64) -> Row {
        Row {
            key,
            shapes: shapes(),
            latents: RowValues::owned(vec![key as f32; 4]),
            caption: RowValues::owned(vec![-key as f32; 2]),
        }
    }

    /// On every rank of a local group: announces `epochs` with `rows`, adds the arrivals to a
    /// queue and takes this rank's block of its first step.
    fn step(epochs: Vec<u64>, rows: Vec<Vec<i64>>) -> Vec<(Arrivals, Vec<Row>, usize)> {
        let handles = Collective::local_group("train", rows.len());
        let threads: Vec<_> = handles
            .into_iter()
            .zip(rows.into_iter().zip(epochs))
            .map(|(c, (keys, epoch))| {
                std::thread::spawn(move || {
                    let mut replicas = Replicas::new(Some(c));
                    let mine: Vec<Row> = keys.into_iter().map(row).collect();
                    let arrivals = replicas.announce(epoch, &mine, false).unwrap();
                    let mut queue = BucketQueue::default();
                    let ids = queue.add(&arrivals.rows);
                    let mut held = HashMap::new();
                    for (id, index) in ids.iter().zip(&arrivals.mine) {
                        if let Some(i) = index {
                            held.insert(*id, mine[*i].clone());
                        }
                    }
                    let planned = queue.next_step(16, false).unwrap();
                    let (block, first) = replicas.take_block(&planned, &mut held).unwrap();
                    (arrivals, block, first)
                })
            })
            .collect();
        threads.into_iter().map(|t| t.join().unwrap()).collect()
    }

    #[test]
    fn rows_split_by_key_into_contiguous_blocks_wherever_they_arrived() {
        // Keys arrive scattered; the step is keys 0..7 in order, 3 + 4 (7 * r / 2).
        let steps = step(vec![5, 5], vec![vec![6, 1, 3, 0], vec![5, 2, 4]]);
        let blocks: Vec<Vec<i64>> = steps.iter().map(|(_, b, _)| b.iter().map(|r| r.key).collect()).collect();
        assert_eq!(blocks, [vec![0, 1, 2], vec![3, 4, 5, 6]]);
        assert_eq!(steps[1].2, 3);
        assert!(steps.iter().all(|(a, _, _)| a.rows.len() == 7 && a.epoch == 5));
        assert_eq!(steps[1].1[0], row(3), "payload intact after the move");
    }

    #[test]
    fn the_lowest_announced_epoch_goes_first() {
        let steps = step(vec![4, 3, FINISHED], vec![vec![9, 8], vec![1], vec![]]);
        assert!(steps.iter().all(|(a, _, _)| a.epoch == 3 && a.rows.len() == 1 && a.rows[0].0 == 1));
        let trained: Vec<usize> = steps.iter().map(|(_, b, _)| b.len()).collect();
        assert_eq!(trained, [0, 0, 1], "the one row goes to the last block");
        assert_eq!(steps[0].0.mine, [None], "epoch 4's rows are not in it");
        assert!(!steps[0].0.at_end);
    }

    #[test]
    fn waiting_rows_gather_on_the_first_replica_in_queue_order() {
        let handles = Collective::local_group("train", 2);
        let threads: Vec<_> = handles
            .into_iter()
            .map(|c| {
                std::thread::spawn(move || {
                    let mut replicas = Replicas::new(Some(c));
                    let rank = replicas.rank();
                    let mut queue = BucketQueue::default();
                    let ids = queue.add(&[(7, 1, shapes()), (3, 0, shapes()), (5, 1, shapes())]);
                    let held: HashMap<u64, Row> = ids
                        .iter()
                        .zip([(7, 1), (3, 0), (5, 1)])
                        .filter(|(_, (_, holder))| *holder == rank)
                        .map(|(&id, (key, _))| (id, row(key)))
                        .collect();
                    replicas.gather_waiting(&queue, &held).unwrap()
                })
            })
            .collect();
        let gathered: Vec<_> = threads.into_iter().map(|t| t.join().unwrap()).collect();
        let keys: Vec<i64> = gathered[0].as_ref().unwrap().iter().map(|r| r.key).collect();
        assert_eq!(keys, [7, 3, 5]);
        assert_eq!(gathered[0].as_ref().unwrap()[0], row(7));
        assert!(gathered[1].is_none());
    }
}
