//! A world-size-1 NCCL communicator on the first GPU sums a buffer to itself (NCCL refuses two
//! ranks on one GPU, so more ranks are checked only where several GPUs exist). Ignored unless
//! asked for (`--include-ignored`), so a machine without a GPU reports it as ignored.

#![cfg(feature = "nccl")]

use latentflow_gpu_kernels::kernel::gpu_available;
use latentflow_gpu_kernels::nccl::NcclGroup;

#[test]
#[ignore = "needs an NVIDIA GPU: bench/gpu/run.sh runs it with --include-ignored"]
fn one_rank_sums_to_itself() {
    assert!(gpu_available(), "no NVIDIA GPU on this machine");
    let id = NcclGroup::unique_id().unwrap();
    assert_eq!(id.len(), 128);
    let group = NcclGroup::join(0, 0, 1, &id).unwrap();
    let mut buf = vec![1.5f32, -2.0, 3.25];
    group.all_reduce_sum(&mut buf).unwrap();
    assert_eq!(buf, [1.5, -2.0, 3.25]);
    let gpus = latentflow_gpu_kernels::kernel::gpu_count().unwrap();
    if gpus >= 2 {
        // Two ranks on two GPUs, each thread joining with the same id.
        let id = NcclGroup::unique_id().unwrap();
        let threads: Vec<_> = (0..2)
            .map(|rank| {
                let id = id.clone();
                std::thread::spawn(move || {
                    let group = NcclGroup::join(rank, rank, 2, &id).unwrap();
                    let mut buf = vec![rank as f32 + 1.0; 4];
                    group.all_reduce_sum(&mut buf).unwrap();
                    buf
                })
            })
            .collect();
        for t in threads {
            assert_eq!(t.join().unwrap(), vec![3.0; 4]);
        }
    }
}
