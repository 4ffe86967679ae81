//! Preview sampling builds no autograd graph: its peak memory does not grow with the number of
//! DDIM steps. Heap bytes are counted by this test binary's own allocator, so the figure is
//! exact and independent of what else the machine runs.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};

use candle_core::{DType, Device, Tensor};
use latentflow_operators::models::load::{load_unet, ModelSource};
use latentflow_operators::rng::Rng;
use latentflow_operators::training::sampling::{frozen_unet, Ddim};
use latentflow_operators::training::{NoiseSchedule, SchedulerConfig};

struct Counting;

static LIVE: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

#[allow(unsafe_code)]
// SAFETY: forwards to the system allocator unchanged; only counts bytes.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let p = System.alloc(layout);
        if !p.is_null() {
            let now = LIVE.fetch_add(layout.size(), SeqCst) + layout.size();
            PEAK.fetch_max(now, SeqCst);
        }
        p
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        System.dealloc(ptr, layout);
        LIVE.fetch_sub(layout.size(), SeqCst);
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

/// Heap bytes above the starting point at the peak of `f`.
fn peak_during(f: impl FnOnce()) -> usize {
    let base = LIVE.load(SeqCst);
    PEAK.store(base, SeqCst);
    f();
    PEAK.load(SeqCst) - base
}

#[test]
fn a_preview_s_peak_memory_does_not_grow_with_its_sampling_steps() {
    // Trainable weights, as the trainer holds them.
    let (unet, weights) = load_unet(&ModelSource::Preset("tiny".into()), &Device::Cpu, true, 0).unwrap();
    let params = weights.vars();
    assert!(!params.is_empty());
    let schedule = NoiseSchedule::new(&SchedulerConfig::default(), "default".as_ref()).unwrap();
    let context = Tensor::ones((2, 77, 32), DType::F32, &Device::Cpu).unwrap();
    let uncond = Tensor::zeros((1, 77, 32), DType::F32, &Device::Cpu).unwrap();
    let sample = |steps: usize| {
        let frozen = frozen_unet(unet.config(), &params, &Device::Cpu).unwrap();
        let mut latents = None;
        let peak = peak_during(|| {
            let ddim = Ddim::new(&schedule, steps);
            let x = ddim.sample(&frozen, &context, &uncond, 7.5, (4, 16, 16), &mut Rng::new(1, 2)).unwrap();
            latents = Some(x);
        });
        (peak, latents.unwrap())
    };
    let _warm_up = sample(1);
    let (few, latents) = sample(2);
    let (many, _) = sample(12);
    println!("peak heap above the start: {few} B with 2 steps, {many} B with 12 steps");
    assert!(!latents.track_op(), "the sampled latents carry no graph");
    // Nor does one forward pass of the frozen UNet, although the weights it reads are the
    // trainer's variables.
    let frozen = frozen_unet(unet.config(), &params, &Device::Cpu).unwrap();
    let x = Tensor::zeros((1, 4, 16, 16), DType::F32, &Device::Cpu).unwrap();
    let out = frozen.forward(&x, &[500.0], &context.narrow(0, 0, 1).unwrap()).unwrap();
    assert!(!out.track_op());
    assert!(unet.forward(&x, &[500.0], &context.narrow(0, 0, 1).unwrap()).unwrap().track_op(), "the trainer's does");
    assert!(many as f64 <= few as f64 * 1.2, "2 steps: {few} B, 12 steps: {many} B: memory grows with the steps");
}
