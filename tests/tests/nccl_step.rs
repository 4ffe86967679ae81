//! With the `nccl` feature on a GPU machine: a training step whose gradients go through a
//! world-size-1 NCCL communicator equals the same step without one (NCCL refuses two ranks on
//! one GPU, so several ranks are checked only where several GPUs exist). Ignored unless asked for
//! (`--include-ignored`), so a machine without a GPU reports it as ignored.

#![cfg(feature = "nccl")]

use std::path::Path;

use candle_core::{Device, Tensor};
use latentflow_gpu_kernels::kernel::gpu_available;
use latentflow_gpu_kernels::nccl::NcclGroup;
use latentflow_operators::models::load::{load_unet, ModelSource};
use latentflow_operators::rng::Rng;
use latentflow_operators::training::{NoiseSchedule, SchedulerConfig, Shard, Trainer, TrainingOptions};

fn trainer() -> Trainer {
    let (unet, weights) = load_unet(&ModelSource::Preset("tiny".into()), &Device::Cpu, true, 5).unwrap();
    let schedule = NoiseSchedule::new(&SchedulerConfig::default(), Path::new("default")).unwrap();
    let options = TrainingOptions { max_grad_norm: Some(1.0), gradient_accumulation_steps: 2, ..Default::default() };
    Trainer::new(unet, &weights, schedule, options).unwrap()
}

#[test]
#[ignore = "needs an NVIDIA GPU: bench/gpu/run.sh runs it with --include-ignored"]
fn a_step_summed_by_nccl_equals_the_step_alone() {
    assert!(gpu_available(), "no NVIDIA GPU on this machine");
    let mut rng = Rng::new(1, 2);
    let latents = Tensor::from_vec(rng.normals(4 * 4 * 8 * 8), (4, 4, 8, 8), &Device::Cpu).unwrap();
    let text = Tensor::from_vec(rng.normals(4 * 77 * 32), (4, 77, 32), &Device::Cpu).unwrap();
    let shard = Shard { first: 0, global_rows: 4 };
    let (mut alone, mut with_nccl) = (trainer(), trainer());
    let expected = alone.train_shard(&latents, &text, None, shard, None).unwrap();
    let mut group = NcclGroup::join(0, 0, 1, &NcclGroup::unique_id().unwrap()).unwrap();
    let report = with_nccl.train_shard(&latents, &text, None, shard, Some(&mut group)).unwrap();
    // The loss crosses the reduction as f32.
    assert!((report.loss - expected.loss).abs() < 1e-6, "{} vs {}", report.loss, expected.loss);
    assert_eq!(report.grad_norm, expected.grad_norm);
    for (name, var) in alone.params() {
        let diff = latentflow_tests::max_abs_diff(var.as_tensor(), with_nccl.params()[name].as_tensor());
        assert_eq!(diff, 0.0, "{name}");
    }
}
