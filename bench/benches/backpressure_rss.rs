//! Backpressure keeps memory flat: the same pipeline over N and 10 N rows (64 KiB each) must
//! peak at about the same resident memory (goal: ratio ≤ 1.2). Each size runs in a fresh child
//! process so the peaks do not mix.

use std::process::Command;

use latentflow_bench::{four_operator_plan, peak_rss_bytes};
use latentflow_engine::{run, RunOptions};

const CHILD: &str = "LATENTFLOW_BENCH_RSS_ROWS";
const PAYLOAD: usize = 64 * 1024;
const BATCH: usize = 32;

fn child(rows: u64) {
    let plan = four_operator_plan(rows, BATCH, PAYLOAD, 2).expect("valid plan");
    let report = run(&plan, &RunOptions { workers: 2, ..RunOptions::default() }).expect("run");
    let through = report.profile.operator("sink").map_or(0, |o| o.items_in);
    assert_eq!(through, rows, "every row reached the sink");
    println!("{} {} {}", peak_rss_bytes().unwrap_or(0), report.profile.wall_seconds, report.max_items_in_flight);
}

fn measure(rows: u64) -> (f64, f64, u64) {
    let out =
        Command::new(std::env::current_exe().expect("own path")).env(CHILD, rows.to_string()).output().expect("child");
    assert!(out.status.success(), "child failed: {}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8_lossy(&out.stdout);
    let mut fields = text.split_whitespace();
    let rss: f64 = fields.next().and_then(|s| s.parse().ok()).expect("rss");
    let secs: f64 = fields.next().and_then(|s| s.parse().ok()).expect("seconds");
    let in_flight: u64 = fields.next().and_then(|s| s.parse().ok()).expect("in flight");
    (rss / (1 << 20) as f64, secs, in_flight)
}

fn main() {
    if let Ok(rows) = std::env::var(CHILD) {
        child(rows.parse().expect("row count"));
        return;
    }
    if std::env::args().any(|a| a == "--list") {
        return; // `cargo test --benches` asks for a listing; there is nothing to list.
    }
    let n = 2_000;
    let (small, t_small, f_small) = measure(n);
    let (large, t_large, f_large) = measure(10 * n);
    println!(
        "backpressure_rss: {n} rows of {} KiB: peak RSS {small:.1} MiB in {t_small:.2} s, max {f_small} rows in flight",
        PAYLOAD / 1024
    );
    println!(
        "backpressure_rss: {} rows of {} KiB: peak RSS {large:.1} MiB in {t_large:.2} s, max {f_large} rows in flight",
        10 * n,
        PAYLOAD / 1024
    );
    println!(
        "backpressure_rss: peak RSS ratio 10N/N = {:.3} (goal <= 1.2; the data is {:.0} MiB at 10N)",
        large / small,
        (10 * n) as f64 * PAYLOAD as f64 / (1 << 20) as f64
    );
}
