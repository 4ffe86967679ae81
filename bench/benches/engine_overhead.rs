//! Engine overhead: the same four operators (`bytes_source → checksum → checksum → null_sink`)
//! run by the engine and called in a plain loop, at batch 64 and 1024, in items per second. The
//! ratios engine / loop (throughput and CPU time) are printed at the end (goal: the engine adds at
//! most 5 % at batch 64).
//!
//! Both sides get one thread for operator work (`cpu_threads = 1`, one worker) so the ratio
//! measures scheduling overhead, not parallelism; the engine's threads still overlap reading
//! with hashing, which the loop cannot.

// `criterion_group!` defines an undocumented public function.
#![allow(missing_docs)]

use std::path::Path;
use std::time::Duration;

use criterion::{criterion_group, Criterion, Throughput};
use latentflow_bench::four_operator_plan;
use latentflow_engine::{run, InstanceContext, JobConfig, OpContext, OperatorImpl, RunOptions, WorkerInfo};

const ROWS: u64 = 20_000;
const BATCHES: [usize; 2] = [64, 1024];
const PAYLOAD: usize = 1024;

/// Calls the plan's operators directly, batch by batch, with no engine.
fn plain_loop(batch_size: usize) -> u64 {
    let plan = four_operator_plan(ROWS, batch_size, PAYLOAD, 1).expect("valid plan");
    let job = JobConfig::default();
    let mut instances = plan.nodes.iter().map(|n| {
        let ctx = InstanceContext { node: &n.id, job: &job, worker: WorkerInfo::single(), batch_size: None };
        n.spec.instantiate(&ctx).expect("instance")
    });
    let (
        Some(OperatorImpl::Source(mut source)),
        Some(OperatorImpl::Map(m1)),
        Some(OperatorImpl::Map(m2)),
        Some(OperatorImpl::Sink(mut sink)),
    ) = (instances.next(), instances.next(), instances.next(), instances.next())
    else {
        panic!("unexpected operator shapes");
    };
    let mut ctx = OpContext::detached("loop");
    let mut rows = 0;
    while let Some(batch) = source.next_batch(&mut ctx).expect("read") {
        let batch = m2.map(m1.map(batch, &mut ctx).expect("map"), &mut ctx).expect("map");
        rows += batch.rows() as u64;
        sink.write(batch, &mut ctx).expect("write");
    }
    sink.finish(&mut ctx).expect("finish");
    rows
}

fn engine(batch_size: usize) -> u64 {
    let plan = four_operator_plan(ROWS, batch_size, PAYLOAD, 1).expect("valid plan");
    let report = run(&plan, &RunOptions::default()).expect("run");
    report.profile.operator("sink").map_or(0, |o| o.items_in)
}

fn overhead(c: &mut Criterion) {
    let mut group = c.benchmark_group("engine_overhead");
    group.throughput(Throughput::Elements(ROWS));
    group.sample_size(20).measurement_time(Duration::from_secs(8));
    for batch in BATCHES {
        assert_eq!(plain_loop(batch), ROWS);
        assert_eq!(engine(batch), ROWS);
        group.bench_function(format!("plain_loop_batch{batch}"), |b| b.iter(|| plain_loop(batch)));
        group.bench_function(format!("engine_batch{batch}"), |b| b.iter(|| engine(batch)));
    }
    group.finish();
}

criterion_group!(benches, overhead);

/// Criterion's mean estimate (ns per iteration) for one benchmark of this run.
fn mean_ns(name: &str) -> Option<f64> {
    let target =
        std::env::var("CARGO_TARGET_DIR").unwrap_or_else(|_| concat!(env!("CARGO_MANIFEST_DIR"), "/../target").into());
    let path = Path::new(&target).join("criterion/engine_overhead").join(name).join("new/estimates.json");
    let json: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(path).ok()?).ok()?;
    json["mean"]["point_estimate"].as_f64()
}

fn main() {
    benches();
    Criterion::default().configure_from_args().final_summary();
    for batch in BATCHES {
        // CPU time per run, outside criterion: what the engine's threads cost in total.
        let cpu_per_run = |f: &dyn Fn() -> u64| {
            let before = latentflow_bench::cpu_seconds().unwrap_or(0.0);
            for _ in 0..20 {
                f();
            }
            (latentflow_bench::cpu_seconds().unwrap_or(0.0) - before) / 20.0
        };
        let cpu_loop = cpu_per_run(&|| plain_loop(batch));
        let cpu_engine = cpu_per_run(&|| engine(batch));
        let (Some(plain), Some(engine)) =
            (mean_ns(&format!("plain_loop_batch{batch}")), mean_ns(&format!("engine_batch{batch}")))
        else {
            continue;
        };
        let rate = |ns: f64| ROWS as f64 / (ns * 1e-9);
        println!(
            "engine_overhead batch {batch}: plain loop {:.0} items/s, engine {:.0} items/s, throughput ratio engine/loop {:.3}; \
             CPU s per run: loop {cpu_loop:.4}, engine {cpu_engine:.4} (ratio {:.2})",
            rate(plain),
            rate(engine),
            plain / engine,
            cpu_engine / cpu_loop.max(1e-9)
        );
    }
}
