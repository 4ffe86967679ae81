//! Collectives over the workers that run one node: all-reduce, broadcast, all-gather, barrier
//! and all-to-all on flat buffers, for data-parallel training.
//!
//! An operator gets a [`Collective`] from its context ([`OpContext::take_collective`]) when its node
//! asks for one ([`NodeSpec::collective`]) and runs on more than one worker. Nothing here names
//! timely: the handle moves byte buffers, and the engine picks the transport. When every member
//! is in this process the buffers move through shared memory ([`local`]); when the group spans
//! processes they cross timely's channels as flat bytes ([`network`]).
//!
//! Every collective is built on one step, [`Collective::exchange`] (each rank hands one buffer to
//! every rank and receives one from each). All-reduce is a reduce-scatter followed by an
//! all-gather, both by direct exchange: rank `c` owns chunk `c`, sums everybody's copy of it in
//! rank order `0, 1, ..., N-1`, and sends the sum back to all. The reduction order is fixed, so a
//! run repeats bit for bit, and threads and processes give the same bits for the same `N`. Each
//! rank sends `2 (N - 1) / N` of the buffer per all-reduce, as a ring all-reduce does.
//!
//! [`OpContext::take_collective`]: crate::OpContext::take_collective
//! [`NodeSpec::collective`]: crate::NodeSpec::collective

pub(crate) mod local;
pub(crate) mod network;

use std::ops::Range;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// Why a collective could not complete.
#[derive(Debug, thiserror::Error)]
pub enum CollectiveError {
    /// Another part of the job failed while this rank waited; the job is stopping.
    #[error("collective `{group}` aborted at rank {rank}: the job is stopping after a failure elsewhere")]
    Aborted {
        /// The group (node id).
        group: String,
        /// This rank.
        rank: usize,
    },
    /// A peer's part of the group is gone (its thread or process ended).
    #[error("collective `{group}` lost its peers at rank {rank}: {reason}")]
    Disconnected {
        /// The group (node id).
        group: String,
        /// This rank.
        rank: usize,
        /// What went away.
        reason: String,
    },
    /// The ranks disagree (different buffer lengths, say): a bug or a mismatched job.
    #[error("collective `{group}` at rank {rank}: {message}")]
    Mismatch {
        /// The group (node id).
        group: String,
        /// This rank.
        rank: usize,
        /// What differs.
        message: String,
    },
}

/// One rank's side of a transport: hands `outgoing[r]` to rank `r` and returns what every rank
/// handed this one, in rank order. Calls happen in the same order on every rank.
pub(crate) trait Endpoint: Send {
    fn exchange(&mut self, round: u64, outgoing: Vec<Vec<u8>>) -> Result<Vec<Vec<u8>>, CollectiveError>;

    /// As `exchange`, with objects handed over as they are; `None` where the transport cannot
    /// (ranks in other processes).
    fn exchange_objects(
        &mut self,
        _round: u64,
        _outgoing: Vec<Box<dyn std::any::Any + Send>>,
    ) -> Option<Result<Vec<Box<dyn std::any::Any + Send>>, CollectiveError>> {
        None
    }

    /// Whether `exchange_objects` works: every rank is a thread of this process.
    fn moves_objects(&self) -> bool {
        false
    }
}

/// Says whether the job failed elsewhere, so a rank waiting for its peers gives up.
pub(crate) type AbortCheck = Arc<dyn Fn() -> bool + Send + Sync>;

/// How often a waiting rank looks at the abort flag.
pub(crate) const ABORT_POLL: Duration = Duration::from_millis(100);

/// Figures of one rank's collectives since it started (for benchmarks and the profile).
#[derive(Debug, Default)]
pub struct CollectiveStats {
    bytes_sent: AtomicU64,
    calls: AtomicU64,
    nanos: AtomicU64,
}

impl CollectiveStats {
    /// Payload bytes this rank sent to other ranks.
    pub fn bytes_sent(&self) -> u64 {
        self.bytes_sent.load(Ordering::Relaxed)
    }

    /// Exchanges made.
    pub fn calls(&self) -> u64 {
        self.calls.load(Ordering::Relaxed)
    }

    /// Seconds spent in collectives (waiting for peers included).
    pub fn seconds(&self) -> f64 {
        self.nanos.load(Ordering::Relaxed) as f64 * 1e-9
    }
}

/// One rank's handle on a group of workers: the workers that run one node.
///
/// ```
/// use latentflow_engine::collective::Collective;
/// // Four ranks in this process; each adds its rank + 1 to a buffer of 5 floats.
/// let handles = Collective::local_group("example", 4);
/// let threads: Vec<_> = handles
///     .into_iter()
///     .map(|mut c| {
///         std::thread::spawn(move || {
///             let mut buf = vec![(c.rank() + 1) as f32; 5];
///             c.all_reduce_sum(&mut buf).unwrap();
///             buf
///         })
///     })
///     .collect();
/// for t in threads {
///     assert_eq!(t.join().unwrap(), vec![10.0; 5]);
/// }
/// ```
pub struct Collective {
    group: String,
    rank: usize,
    size: usize,
    round: u64,
    endpoint: Box<dyn Endpoint>,
    stats: Arc<CollectiveStats>,
}

impl std::fmt::Debug for Collective {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Collective")
            .field("group", &self.group)
            .field("rank", &self.rank)
            .field("size", &self.size)
            .finish()
    }
}

impl Collective {
    pub(crate) fn new(group: &str, rank: usize, size: usize, endpoint: Box<dyn Endpoint>) -> Self {
        Collective { group: group.to_string(), rank, size, round: 0, endpoint, stats: Arc::default() }
    }

    /// `size` handles over shared memory, for tests and plain multi-threaded loops (a running
    /// job makes its own).
    pub fn local_group(group: &str, size: usize) -> Vec<Collective> {
        local::group(group, size, Arc::new(|| false))
    }

    /// This rank, `0..size`.
    pub fn rank(&self) -> usize {
        self.rank
    }

    /// Ranks in the group.
    pub fn size(&self) -> usize {
        self.size
    }

    /// The group's name (the node id).
    pub fn group(&self) -> &str {
        &self.group
    }

    /// This rank's figures.
    pub fn stats(&self) -> &Arc<CollectiveStats> {
        &self.stats
    }

    /// All-to-all: hands `outgoing[r]` to rank `r` (one buffer per rank, this one's own
    /// included) and returns the buffer each rank handed this one, in rank order. Every rank
    /// must call it, in the same order as its other collectives.
    pub fn exchange(&mut self, outgoing: Vec<Vec<u8>>) -> Result<Vec<Vec<u8>>, CollectiveError> {
        if outgoing.len() != self.size {
            return Err(self.mismatch(format!("exchange needs {} buffers, got {}", self.size, outgoing.len())));
        }
        let started = std::time::Instant::now();
        let sent: usize = outgoing.iter().enumerate().filter(|(r, _)| *r != self.rank).map(|(_, b)| b.len()).sum();
        let round = self.round;
        self.round += 1;
        let incoming = self.endpoint.exchange(round, outgoing)?;
        self.stats.bytes_sent.fetch_add(sent as u64, Ordering::Relaxed);
        self.stats.calls.fetch_add(1, Ordering::Relaxed);
        self.stats.nanos.fetch_add(started.elapsed().as_nanos() as u64, Ordering::Relaxed);
        Ok(incoming)
    }

    /// Whether every rank is a thread of this process, so [`Collective::exchange_objects`]
    /// works.
    pub fn is_local(&self) -> bool {
        self.endpoint.moves_objects()
    }

    /// All-to-all of values as they are (no copy, no serialisation: device tensors stay on
    /// their devices), for groups within one process ([`Collective::is_local`]): hands
    /// `outgoing[r]` to rank `r` and returns what each rank handed this one, in rank order.
    /// Every rank must call it at the same point of its collectives, with the same `T`.
    ///
    /// ```
    /// use latentflow_engine::Collective;
    ///
    /// let ranks = Collective::local_group("g", 2);
    /// let handles: Vec<_> = ranks
    ///     .into_iter()
    ///     .map(|mut c| {
    ///         std::thread::spawn(move || {
    ///             let me = c.rank();
    ///             c.exchange_objects((0..2).map(|to| format!("{me}->{to}")).collect()).unwrap()
    ///         })
    ///     })
    ///     .collect();
    /// let got: Vec<Vec<String>> = handles.into_iter().map(|h| h.join().unwrap()).collect();
    /// assert_eq!(got[1], ["0->1", "1->1"]);
    /// ```
    pub fn exchange_objects<T: Send + 'static>(&mut self, outgoing: Vec<T>) -> Result<Vec<T>, CollectiveError> {
        if outgoing.len() != self.size {
            return Err(self.mismatch(format!("exchange needs {} values, got {}", self.size, outgoing.len())));
        }
        let started = std::time::Instant::now();
        let round = self.round;
        let boxed = outgoing.into_iter().map(|v| Box::new(v) as Box<dyn std::any::Any + Send>).collect();
        let Some(incoming) = self.endpoint.exchange_objects(round, boxed) else {
            return Err(self.mismatch("objects cannot cross processes: the group is not local".into()));
        };
        self.round += 1;
        let incoming = incoming?
            .into_iter()
            .enumerate()
            .map(|(from, object)| {
                object.downcast::<T>().map(|v| *v).map_err(|_| self.mismatch(format!("rank {from} sent another type")))
            })
            .collect::<Result<Vec<T>, _>>()?;
        self.stats.calls.fetch_add(1, Ordering::Relaxed);
        self.stats.nanos.fetch_add(started.elapsed().as_nanos() as u64, Ordering::Relaxed);
        Ok(incoming)
    }

    /// Every rank's `bytes`, in rank order.
    pub fn all_gather(&mut self, bytes: &[u8]) -> Result<Vec<Vec<u8>>, CollectiveError> {
        self.exchange(vec![bytes.to_vec(); self.size])
    }

    /// Rank `root`'s `bytes` on every rank (the others' `bytes` are ignored).
    pub fn broadcast(&mut self, bytes: Vec<u8>, root: usize) -> Result<Vec<u8>, CollectiveError> {
        if root >= self.size {
            return Err(self.mismatch(format!("broadcast from rank {root} in a group of {}", self.size)));
        }
        let outgoing = if self.rank == root { vec![bytes; self.size] } else { vec![Vec::new(); self.size] };
        let mut incoming = self.exchange(outgoing)?;
        Ok(std::mem::take(&mut incoming[root]))
    }

    /// Returns once every rank has called it.
    pub fn barrier(&mut self) -> Result<(), CollectiveError> {
        self.exchange(vec![Vec::new(); self.size]).map(drop)
    }

    /// Replaces `buf` on every rank by the element-wise sum of every rank's `buf`, summed in rank
    /// order (so the bits do not depend on timing). Every rank's `buf` has the same length.
    pub fn all_reduce_sum(&mut self, buf: &mut [f32]) -> Result<(), CollectiveError> {
        if self.size == 1 {
            return Ok(());
        }
        let chunks: Vec<Range<usize>> = (0..self.size).map(|c| chunk(buf.len(), self.size, c)).collect();
        // Reduce-scatter: chunk c goes to rank c, which sums everybody's copy.
        let outgoing = (0..self.size)
            .map(|c| if c == self.rank { Vec::new() } else { to_bytes(&buf[chunks[c].clone()]) })
            .collect();
        let incoming = self.exchange(outgoing)?;
        let own = chunks[self.rank].clone();
        for (from, bytes) in incoming.iter().enumerate().filter(|(from, _)| *from != self.rank) {
            if bytes.len() != own.len() * 4 {
                return Err(self.mismatch(format!(
                    "rank {from} sent {} values for chunk {}, expected {} (buffers of different lengths)",
                    bytes.len() / 4,
                    self.rank,
                    own.len()
                )));
            }
        }
        // Sum in rank order, reading every contribution where it lies (no decoded copies).
        let mut sum: Vec<f32> = match self.rank {
            0 => buf[own.clone()].to_vec(),
            _ => decode(&incoming[0]).collect(),
        };
        for (from, bytes) in incoming.iter().enumerate().skip(1) {
            if from == self.rank {
                sum.iter_mut().zip(&buf[own.clone()]).for_each(|(s, c)| *s += c);
            } else {
                sum.iter_mut().zip(decode(bytes)).for_each(|(s, c)| *s += c);
            }
        }
        // All-gather: every rank's summed chunk to everybody.
        let reduced = to_bytes(&sum);
        let outgoing = (0..self.size).map(|r| if r == self.rank { Vec::new() } else { reduced.clone() }).collect();
        let incoming = self.exchange(outgoing)?;
        buf[own].copy_from_slice(&sum);
        for (from, bytes) in incoming.iter().enumerate().filter(|(from, _)| *from != self.rank) {
            let range = chunks[from].clone();
            if bytes.len() != range.len() * 4 {
                return Err(self.mismatch(format!(
                    "rank {from} sent {} summed values, expected {}",
                    bytes.len() / 4,
                    range.len()
                )));
            }
            buf[range].iter_mut().zip(decode(bytes)).for_each(|(b, v)| *b = v);
        }
        Ok(())
    }

    /// [`Collective::all_reduce_sum`] divided by the group size: PyTorch DDP's gradient average.
    pub fn all_reduce_mean(&mut self, buf: &mut [f32]) -> Result<(), CollectiveError> {
        self.all_reduce_sum(buf)?;
        let scale = 1.0 / self.size as f32;
        buf.iter_mut().for_each(|x| *x *= scale);
        Ok(())
    }

    fn mismatch(&self, message: String) -> CollectiveError {
        CollectiveError::Mismatch { group: self.group.clone(), rank: self.rank, message }
    }
}

/// The `c`-th of `n` near-equal chunks of `0..len`.
fn chunk(len: usize, n: usize, c: usize) -> Range<usize> {
    (c * len / n)..((c + 1) * len / n)
}

/// f32s as little-endian bytes.
pub fn to_bytes(values: &[f32]) -> Vec<u8> {
    let mut bytes = Vec::with_capacity(values.len() * 4);
    for v in values {
        bytes.extend_from_slice(&v.to_le_bytes());
    }
    bytes
}

/// Little-endian bytes as f32s (a trailing partial value is ignored).
pub fn from_bytes(bytes: &[u8]) -> Vec<f32> {
    decode(bytes).collect()
}

fn decode(bytes: &[u8]) -> impl Iterator<Item = f32> + '_ {
    bytes.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs `f` on each rank of a local group of `size` on its own thread.
    pub(crate) fn on_ranks<T: Send + 'static>(
        handles: Vec<Collective>,
        f: impl Fn(&mut Collective) -> T + Send + Sync + 'static,
    ) -> Vec<T> {
        let f = Arc::new(f);
        let threads: Vec<_> = handles
            .into_iter()
            .map(|mut c| {
                let f = Arc::clone(&f);
                std::thread::spawn(move || f(&mut c))
            })
            .collect();
        threads.into_iter().map(|t| t.join().unwrap()).collect()
    }

    fn values(rank: usize, len: usize) -> Vec<f32> {
        (0..len).map(|i| ((i * 7 + rank * 13) % 17) as f32 * 0.37 - 1.1 + rank as f32 * 1e-3).collect()
    }

    #[test]
    fn all_reduce_equals_the_serial_sum_in_rank_order() {
        for size in 1..=4 {
            for len in [0, 1, 3, 1000] {
                let expected: Vec<f32> = (0..len)
                    .map(|i| {
                        let mut s = values(0, len)[i];
                        for r in 1..size {
                            s += values(r, len)[i];
                        }
                        s
                    })
                    .collect();
                let results = on_ranks(Collective::local_group("t", size), move |c| {
                    let mut buf = values(c.rank(), len);
                    c.all_reduce_sum(&mut buf).unwrap();
                    buf
                });
                for buf in results {
                    assert_eq!(buf, expected, "size {size} len {len}: bit for bit");
                }
            }
        }
    }

    #[test]
    fn broadcast_gather_barrier_and_bytes_sent() {
        let results = on_ranks(Collective::local_group("t", 3), |c| {
            let got = c.broadcast(vec![c.rank() as u8 + 10; 2], 1).unwrap();
            let all = c.all_gather(&[c.rank() as u8]).unwrap();
            c.barrier().unwrap();
            let mut buf = vec![1.0f32; 300];
            let before = c.stats().bytes_sent();
            c.all_reduce_mean(&mut buf).unwrap();
            (got, all, buf[0], c.stats().bytes_sent() - before)
        });
        for (got, all, mean, sent) in results {
            assert_eq!(got, vec![11, 11]);
            assert_eq!(all, vec![vec![0], vec![1], vec![2]]);
            assert_eq!(mean, 1.0);
            // 2 (N-1)/N of the 1200 bytes, as a ring all-reduce.
            assert_eq!(sent, 1600);
        }
    }

    #[test]
    fn mismatched_lengths_are_an_error_not_garbage() {
        let results = on_ranks(Collective::local_group("t", 2), |c| {
            let mut buf = vec![1.0f32; 4 + c.rank()];
            c.all_reduce_sum(&mut buf).map_err(|e| e.to_string())
        });
        assert!(results.iter().any(|r| r.as_ref().is_err_and(|e| e.contains("different lengths"))), "{results:?}");
    }
}
