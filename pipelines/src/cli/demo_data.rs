//! `latentflow demo-data`: writes demo rows as a parquet file in the img2dataset layout.

use std::path::Path;
use std::time::Instant;

use super::{EXIT_FAILURE, EXIT_OK};

/// Writes `n` demo rows of `seed` to `out`.
pub fn write(out: &Path, n: u64, seed: u64) -> i32 {
    let threads = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
    let started = Instant::now();
    match latentflow_operators::demo::write_demo_parquet(out, n, seed, threads) {
        Ok(()) => {
            let bytes = std::fs::metadata(out).map(|m| m.len()).unwrap_or(0);
            println!(
                "{}: {n} rows (hash, caption, width, height, jpg), {:.1} MB, in {:.1} s",
                out.display(),
                bytes as f64 / 1e6,
                started.elapsed().as_secs_f64()
            );
            EXIT_OK
        }
        Err(e) => {
            eprintln!("error: {e}");
            EXIT_FAILURE
        }
    }
}
