//! How a step's rows reach the trainer's device. Rows from host columns go up in one copy per
//! run of them; rows an encoder left on the trainer's own device are read where they are; rows
//! an encoder left on another device (encoders on GPUs of their own, as in
//! `sd2-base-256/online-8gpu.toml`) are gathered there and moved in one device-to-device copy per
//! encoder batch (peer to peer where the GPUs allow it), never through host memory twice.
//!
//! "The trainer's device" is its candle device: an encoder on the same GPU has a device of its
//! own there (its own handle and stream, `Device::new_cuda`), so its rows are moved too, by one
//! copy within the GPU per batch.
//!
//! The [`Plan`] is worked out from where the rows are before anything is copied, so the routing
//! is checked without GPUs; [`super::rows::stack`] carries it out.

use std::ops::Range;

use candle_core::Tensor;

/// Where one of the step's rows is before stacking.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Origin {
    /// In a host column.
    Host,
    /// A row of an encoder's output tensor on a device.
    Device {
        /// The tensor: an index into the step's distinct device batches.
        batch: usize,
        /// The row's index in it.
        row: usize,
        /// Whether the tensor is on the trainer's device already.
        on_trainers_device: bool,
    },
}

/// One copy from another device: rows of one batch, in the step's order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Transfer {
    /// The batch the rows are in.
    pub batch: usize,
    /// Their rows of that batch.
    pub rows: Vec<usize>,
}

/// A run of consecutive rows of the step, stacked from one place.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Run {
    /// Rows from host columns: one upload.
    Host {
        /// The rows' indices in the step.
        rows: Range<usize>,
    },
    /// Consecutive rows of a batch already on the trainer's device: a view of them.
    Local {
        /// The batch.
        batch: usize,
        /// Its rows.
        rows: Range<usize>,
    },
    /// Consecutive rows of a transfer's result on the trainer's device: a view of them.
    Moved {
        /// The transfer, an index into [`Plan::transfers`].
        transfer: usize,
        /// Rows of its result.
        rows: Range<usize>,
    },
}

/// How a step's rows get to the trainer's device: the copies across devices, then the runs the
/// step's tensor is concatenated from.
///
/// ```
/// use latentflow_operators::train::handoff::{Origin, Plan};
///
/// // Encoders on two other GPUs each sent a batch of two rows to the trainer.
/// let elsewhere = |batch, row| Origin::Device { batch, row, on_trainers_device: false };
/// let plan = Plan::new(&[elsewhere(0, 1), elsewhere(1, 0), elsewhere(0, 0), elsewhere(1, 1)]);
/// let counts = plan.counts();
/// assert_eq!((counts.rows_moved, counts.device_copies), (4, 2));
/// ```
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Plan {
    /// One per batch on another device that the step takes rows from.
    pub transfers: Vec<Transfer>,
    /// The step's rows in order.
    pub runs: Vec<Run>,
}

/// What a [`Plan`] copies, as the `train` node counts it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counts {
    /// Rows uploaded from host columns.
    pub rows_from_host: u64,
    /// Rows already on the trainer's device.
    pub rows_on_device: u64,
    /// Rows moved from other devices.
    pub rows_moved: u64,
    /// Device-to-device copies (one per batch on another device).
    pub device_copies: u64,
}

impl Plan {
    /// The plan for rows at `origins` (in the step's order) stacked on the trainer's device.
    pub fn new(origins: &[Origin]) -> Plan {
        let mut plan = Plan::default();
        // Each moved row's place in its transfer's result.
        let mut moved = Vec::with_capacity(origins.len());
        for origin in origins {
            moved.push(match *origin {
                Origin::Device { batch, row, on_trainers_device: false } => {
                    let transfer = match plan.transfers.iter().position(|t| t.batch == batch) {
                        Some(t) => t,
                        None => {
                            plan.transfers.push(Transfer { batch, rows: Vec::new() });
                            plan.transfers.len() - 1
                        }
                    };
                    plan.transfers[transfer].rows.push(row);
                    Some((transfer, plan.transfers[transfer].rows.len() - 1))
                }
                _ => None,
            });
        }
        for (i, (origin, moved)) in origins.iter().zip(moved).enumerate() {
            let run = match (*origin, moved) {
                (_, Some((transfer, at))) => Run::Moved { transfer, rows: at..at + 1 },
                (Origin::Device { batch, row, .. }, None) => Run::Local { batch, rows: row..row + 1 },
                (Origin::Host, _) => Run::Host { rows: i..i + 1 },
            };
            match (plan.runs.last_mut(), run) {
                (Some(Run::Host { rows }), Run::Host { rows: next }) => rows.end = next.end,
                (Some(Run::Local { batch, rows }), Run::Local { batch: b, rows: next })
                    if *batch == b && rows.end == next.start =>
                {
                    rows.end = next.end
                }
                (Some(Run::Moved { transfer, rows }), Run::Moved { transfer: t, rows: next })
                    if *transfer == t && rows.end == next.start =>
                {
                    rows.end = next.end
                }
                (_, run) => plan.runs.push(run),
            }
        }
        plan
    }

    /// The rows it takes from each place and the copies across devices it makes.
    pub fn counts(&self) -> Counts {
        let mut counts = Counts { device_copies: self.transfers.len() as u64, ..Counts::default() };
        for run in &self.runs {
            let (rows, count) = match run {
                Run::Host { rows } => (rows, &mut counts.rows_from_host),
                Run::Local { rows, .. } => (rows, &mut counts.rows_on_device),
                Run::Moved { rows, .. } => (rows, &mut counts.rows_moved),
            };
            *count += rows.len() as u64;
        }
        counts
    }
}

/// Rows `rows` of `batch` (a `[rows, values]` tensor on another device) on `device`: gathered
/// there into a tensor of just those rows, then one device-to-device copy of it.
pub(super) fn move_rows(batch: &Tensor, rows: &[usize], device: &candle_core::Device) -> candle_core::Result<Tensor> {
    #[cfg(feature = "cuda")]
    let _scope = crate::cuda::ContextScope::enter(batch.device())?;
    let ids = Tensor::from_vec(rows.iter().map(|&r| r as u32).collect::<Vec<_>>(), rows.len(), batch.device())?;
    // A fresh tensor of the rows alone: a copy reads a tensor's whole buffer, not its view.
    let gathered = batch.index_select(&ids, 0)?;
    #[cfg(feature = "cuda")]
    crate::cuda::prepare_copy(batch.device(), device)?;
    let moved = gathered.to_device(device)?;
    // `gathered` and `ids` are freed on their device's stream when they go, after the copy.
    #[cfg(feature = "cuda")]
    crate::cuda::free_after_copy(batch.device(), device)?;
    Ok(moved)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Row `row` of batch `batch`, on the trainer's device or not.
    fn on(batch: usize, row: usize, on_trainers_device: bool) -> Origin {
        Origin::Device { batch, row, on_trainers_device }
    }

    #[test]
    fn rows_from_encoder_gpus_move_in_one_copy_per_batch_and_keep_the_steps_order() {
        // The online-8gpu shape: batches from the encoders on two other GPUs, the step's rows
        // sorted by key so the batches interleave.
        let origins = [on(0, 2, false), on(1, 0, false), on(0, 0, false), on(0, 1, false), on(1, 1, false)];
        let plan = Plan::new(&origins);
        assert_eq!(
            plan.transfers,
            [Transfer { batch: 0, rows: vec![2, 0, 1] }, Transfer { batch: 1, rows: vec![0, 1] }]
        );
        assert_eq!(
            plan.runs,
            [
                Run::Moved { transfer: 0, rows: 0..1 },
                Run::Moved { transfer: 1, rows: 0..1 },
                Run::Moved { transfer: 0, rows: 1..3 },
                Run::Moved { transfer: 1, rows: 1..2 },
            ]
        );
        assert_eq!(plan.counts(), Counts { rows_moved: 5, device_copies: 2, ..Counts::default() });
    }

    #[test]
    fn rows_on_the_trainers_device_and_on_the_host_are_not_moved() {
        let origins = [
            on(0, 0, true),
            on(0, 1, true),
            Origin::Host,
            Origin::Host,
            on(1, 3, true),
            on(0, 2, true),
            on(2, 0, false),
        ];
        let plan = Plan::new(&origins);
        assert_eq!(plan.transfers, [Transfer { batch: 2, rows: vec![0] }]);
        assert_eq!(
            plan.runs,
            [
                Run::Local { batch: 0, rows: 0..2 },
                Run::Host { rows: 2..4 },
                Run::Local { batch: 1, rows: 3..4 },
                Run::Local { batch: 0, rows: 2..3 },
                Run::Moved { transfer: 0, rows: 0..1 },
            ]
        );
        assert_eq!(plan.counts(), Counts { rows_from_host: 2, rows_on_device: 4, rows_moved: 1, device_copies: 1 });
    }

    #[test]
    fn a_step_of_host_rows_is_one_upload() {
        let plan = Plan::new(&[Origin::Host; 3]);
        assert_eq!((plan.transfers.len(), &plan.runs[..]), (0, &[Run::Host { rows: 0..3 }][..]));
    }
}
