//! NCCL for data-parallel trainers on GPUs: one communicator per trainer group, joined with the
//! unique id that rank 0 makes and the engine's collective carries to the other ranks.
//!
//! cudarc's communicator may not leave the thread that made it, so each rank's communicator
//! lives on a thread of its own (one per device, as NCCL likes it) and the handle talks to it
//! over channels. NCCL refuses two ranks on one GPU.

use std::ffi::c_char;

use crossbeam_channel::{Receiver, Sender};
use cudarc::driver::CudaContext;
use cudarc::nccl::safe::{Comm, Id, ReduceOp};

use crate::KernelError;

fn nccl_error(e: cudarc::nccl::result::NcclError) -> KernelError {
    KernelError::Driver(format!("NCCL: {:?}", e.0))
}

/// One rank's NCCL communicator.
pub struct NcclGroup {
    rank: usize,
    world: usize,
    requests: Sender<Vec<f32>>,
    replies: Receiver<Result<Vec<f32>, KernelError>>,
}

impl std::fmt::Debug for NcclGroup {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NcclGroup").field("rank", &self.rank).field("world", &self.world).finish()
    }
}

impl NcclGroup {
    /// A fresh unique id (on rank 0), as the 128 bytes the other ranks join with.
    pub fn unique_id() -> Result<Vec<u8>, KernelError> {
        let id = Id::new().map_err(nccl_error)?;
        Ok(id.internal().iter().map(|&c| c as u8).collect())
    }

    /// Joins the group as `rank` of `world` on GPU `ordinal`, with rank 0's [`unique_id`]
    /// bytes. Returns once every rank has joined.
    ///
    /// [`unique_id`]: NcclGroup::unique_id
    pub fn join(ordinal: usize, rank: usize, world: usize, id: &[u8]) -> Result<NcclGroup, KernelError> {
        let bytes: [c_char; 128] = id
            .iter()
            .map(|&b| b as c_char)
            .collect::<Vec<_>>()
            .try_into()
            .map_err(|_| KernelError::Driver(format!("NCCL: a unique id has 128 bytes, got {}", id.len())))?;
        let (request_tx, request_rx) = crossbeam_channel::unbounded::<Vec<f32>>();
        let (reply_tx, reply_rx) = crossbeam_channel::unbounded();
        std::thread::Builder::new()
            .name(format!("lf-nccl-{rank}"))
            .spawn(move || {
                let joined = CudaContext::new(ordinal).map_err(KernelError::driver).and_then(|context| {
                    let stream = context.default_stream();
                    let comm = Comm::from_rank(stream.clone(), rank, world, Id::uninit(bytes)).map_err(nccl_error)?;
                    Ok((stream, comm))
                });
                let (stream, comm) = match joined {
                    Ok(joined) => {
                        let _ = reply_tx.send(Ok(Vec::new()));
                        joined
                    }
                    Err(e) => {
                        let _ = reply_tx.send(Err(e));
                        return;
                    }
                };
                for buf in request_rx {
                    let summed = stream.clone_htod(&buf).map_err(KernelError::driver).and_then(|mut device| {
                        comm.all_reduce_in_place(&mut device, &ReduceOp::Sum).map_err(nccl_error)?;
                        stream.clone_dtoh(&device).map_err(KernelError::driver)
                    });
                    if reply_tx.send(summed).is_err() {
                        return;
                    }
                }
            })
            .map_err(|e| KernelError::Driver(format!("cannot start the NCCL thread: {e}")))?;
        let group = NcclGroup { rank, world, requests: request_tx, replies: reply_rx };
        group.reply()?;
        Ok(group)
    }

    fn reply(&self) -> Result<Vec<f32>, KernelError> {
        self.replies.recv().map_err(|_| KernelError::Driver("NCCL: the communicator's thread ended".into()))?
    }

    /// This rank.
    pub fn rank(&self) -> usize {
        self.rank
    }

    /// Ranks in the group.
    pub fn world(&self) -> usize {
        self.world
    }

    /// Replaces `buf` by its sum over the ranks (copied to the GPU, reduced there, copied back).
    pub fn all_reduce_sum(&self, buf: &mut [f32]) -> Result<(), KernelError> {
        self.requests
            .send(buf.to_vec())
            .map_err(|_| KernelError::Driver("NCCL: the communicator's thread ended".into()))?;
        let summed = self.reply()?;
        if summed.len() != buf.len() {
            return Err(KernelError::Driver(format!("NCCL returned {} values for {}", summed.len(), buf.len())));
        }
        buf.copy_from_slice(&summed);
        Ok(())
    }
}
