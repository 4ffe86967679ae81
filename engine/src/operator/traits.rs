//! The four operator shapes the engine schedules. Operators implement one of these and never
//! see timely: the engine decides which thread runs them and when.

use std::sync::Arc;

use crate::data::Batch;
use crate::error::OpError;

use super::OpContext;

/// Emits batches, one per epoch, and knows its position so a run can resume.
///
/// Runs on its own thread, one batch ahead of the epoch gate.
pub trait Source: Send {
    /// Called once on the source's thread before the first batch.
    fn start(&mut self, _ctx: &mut OpContext) -> Result<(), OpError> {
        Ok(())
    }

    /// The next batch, or `None` when the source is exhausted.
    fn next_batch(&mut self, ctx: &mut OpContext) -> Result<Option<Batch>, OpError>;

    /// Where the source is: everything needed to continue after the last batch returned.
    fn position(&self) -> serde_json::Value;

    /// Continues from a position returned by [`Source::position`].
    fn seek(&mut self, position: &serde_json::Value) -> Result<(), OpError>;

    /// The next epoch's rows as one or more batches (several when its rows have different
    /// tensor shapes, as latents of several resolution buckets do; a batch holds one shape per
    /// column), or `None` when the source is exhausted. The engine calls this; the default is
    /// [`Source::next_batch`]'s one batch.
    fn next_batches(&mut self, ctx: &mut OpContext) -> Result<Option<Vec<Batch>>, OpError> {
        Ok(self.next_batch(ctx)?.map(|batch| vec![batch]))
    }
}

/// Stateless per-batch CPU work. Runs on the job's thread pool, many batches at once, never on a
/// timely worker thread.
pub trait Map: Send + Sync {
    /// Transforms one batch. Rows that cannot be processed are dropped from the output and
    /// reported with [`OpContext::reject`].
    fn map(&self, batch: Batch, ctx: &mut OpContext) -> Result<Batch, OpError>;

    /// Transforms one batch into one or more (several when its rows come out in different
    /// tensor shapes, as images cropped to resolution buckets do; a batch holds one shape per
    /// column). The engine calls this; the default is [`Map::map`]'s one batch.
    fn map_groups(&self, batch: Batch, ctx: &mut OpContext) -> Result<Vec<Batch>, OpError> {
        Ok(vec![self.map(batch, ctx)?])
    }
}

/// A long-lived thread per worker that owns heavy state (a model on a device) and sees batches
/// in epoch order.
pub trait Stage: Send {
    /// Called once on the stage's thread before the first batch: load models here.
    fn start(&mut self, _ctx: &mut OpContext) -> Result<(), OpError> {
        Ok(())
    }

    /// Handles one batch of the current epoch; may emit a batch at that epoch.
    fn process(&mut self, batch: Batch, ctx: &mut OpContext) -> Result<Option<Batch>, OpError>;

    /// Called once every batch of `epoch` has been processed on this worker; may emit a batch
    /// at that epoch (a training step's metrics, say).
    fn end_epoch(&mut self, _epoch: u64, _ctx: &mut OpContext) -> Result<Option<Batch>, OpError> {
        Ok(None)
    }

    /// Called once when the input has ended, or on Ctrl-C after in-flight work drained.
    fn finish(&mut self, _ctx: &mut OpContext) -> Result<Option<Batch>, OpError> {
        Ok(None)
    }
}

/// Consumes batches. Runs on its own thread; the job is done when every sink has finished.
pub trait Sink: Send {
    /// Called once on the sink's thread before the first batch.
    fn start(&mut self, _ctx: &mut OpContext) -> Result<(), OpError> {
        Ok(())
    }

    /// Consumes one batch.
    fn write(&mut self, batch: Batch, ctx: &mut OpContext) -> Result<(), OpError>;

    /// Called once every batch of `epoch` has been written on this worker.
    fn end_epoch(&mut self, _epoch: u64, _ctx: &mut OpContext) -> Result<(), OpError> {
        Ok(())
    }

    /// Called once at the end (and on Ctrl-C after in-flight work drained): flush files here.
    fn finish(&mut self, _ctx: &mut OpContext) -> Result<(), OpError> {
        Ok(())
    }
}

/// A content key of 32 bytes (a SHA-256, say): rows with equal keys are duplicates.
pub type ContentKey = [u8; 32];

/// The per-row keys of a [`OperatorKind::Distinct`](super::OperatorKind::Distinct) node; the
/// engine keeps, over all workers and processes, the first row of each key (the lowest worker,
/// then batch, then row within the first epoch the key appears in) and rejects the others as
/// `duplicate`. Runs on the worker thread: keep it to hashing.
pub trait ContentKeys: Send + Sync {
    /// One key per row of `batch`, in row order.
    fn keys(&self, batch: &Batch, ctx: &mut OpContext) -> Result<Vec<ContentKey>, OpError>;
}

/// One instance of an operator, as [`NodeSpec::instantiate`](super::NodeSpec::instantiate)
/// returns it.
pub enum OperatorImpl {
    /// A source.
    Source(Box<dyn Source>),
    /// A map, shared by the pool threads.
    Map(Arc<dyn Map>),
    /// A stateful stage.
    Stage(Box<dyn Stage>),
    /// A sink.
    Sink(Box<dyn Sink>),
    /// The keys of a distinct node.
    Distinct(Arc<dyn ContentKeys>),
}

impl OperatorImpl {
    /// The shape of this instance.
    pub fn kind(&self) -> super::OperatorKind {
        match self {
            OperatorImpl::Source(_) => super::OperatorKind::Source,
            OperatorImpl::Map(_) => super::OperatorKind::Map,
            OperatorImpl::Stage(_) => super::OperatorKind::Stage,
            OperatorImpl::Sink(_) => super::OperatorKind::Sink,
            OperatorImpl::Distinct(_) => super::OperatorKind::Distinct,
        }
    }
}
