//! `job.cpu_threads` is the job's whole CPU budget: a stage's parallel kernels (rayon) run in
//! the pool the map operators run in, sized to the budget, not in a second pool beside it.
//! (Its own test binary: rayon's global pool is sized once per process, by the first job.)

use latentflow_engine::{run, Plan, RunOptions};
use latentflow_tests::testops::{catalog, probe};

#[test]
fn stages_parallelise_on_the_jobs_one_pool_of_cpu_threads() {
    let text = r#"
[job]
cpu_threads = 3

[nodes.read]
type = "probe_source"
probe = "budget-src"
count = 40
batch_size = 10

[nodes.pass]
type = "fail_at"
inputs = ["read"]

[nodes.sum]
type = "epoch_sum"
inputs = ["pass"]
probe = "budget"

[nodes.sink]
type = "probe_sink"
inputs = ["sum"]
probe = "budget-sink"
"#;
    let plan = Plan::from_toml("budget.toml", text, &[], &catalog()).unwrap_or_else(|e| panic!("{e}"));
    run(&plan, &RunOptions { workers: 2, ..RunOptions::default() }).unwrap();
    let pools: Vec<(bool, usize)> = probe("budget").stage_pools.lock().unwrap().iter().copied().collect();
    // The stage runs on its own thread (not a pool thread: it holds none while it waits), and
    // the pool its rayon calls go to has the budget's 3 threads, whatever the core count.
    assert_eq!(pools, [(false, 3)]);
    let (tx, rx) = std::sync::mpsc::channel();
    rayon::spawn(move || tx.send(std::thread::current().name().map(str::to_string)).unwrap());
    let name = rx.recv().unwrap().unwrap_or_default();
    assert!(name.starts_with("lf-pool-"), "the job's map pool is rayon's global pool: {name}");
}
