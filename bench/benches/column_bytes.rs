//! How f32 tensor columns cross processes: bincode (what timely serializes exchanged data
//! with) of one batch of SD2-size rows (latents 4x64x64 + text embeddings 77x1024 per row),
//! the column as `Column::F32Tensor` (its values as one byte string) against the same values as
//! a plain serde `Vec<f32>` (element by element, the encoding before), in the same run.
//!
//! `cargo bench -p latentflow-bench --bench column_bytes`

#![allow(missing_docs)]

use std::time::Instant;

use latentflow_engine::Column;
use serde::{Deserialize, Serialize};

const ROWS: usize = 16;
const ROW: usize = 4 * 64 * 64 + 77 * 1024;

/// The encoding before: serde's default for `Vec<f32>`.
#[derive(Serialize, Deserialize)]
struct ElementByElement {
    shape: Vec<usize>,
    data: Vec<f32>,
}

fn median_s(mut run: impl FnMut()) -> f64 {
    let mut times: Vec<f64> = (0..11)
        .map(|_| {
            let started = Instant::now();
            run();
            started.elapsed().as_secs_f64()
        })
        .collect();
    times.sort_by(f64::total_cmp);
    times[times.len() / 2]
}

fn main() {
    // The allocator policy jobs run with (freed buffers reused, not faulted in again).
    latentflow_engine::memory::keep_freed_memory();
    let data: Vec<f32> = (0..ROWS * ROW).map(|i| (i as f32 * 0.37).sin()).collect();
    let column = Column::F32Tensor { shape: vec![ROW], data: data.clone() };
    let plain = ElementByElement { shape: vec![ROW], data };
    let (mut bytes_len, mut plain_len) = (0, 0);
    let ours = median_s(|| {
        let bytes = bincode::serialize(&column).expect("serialize");
        bytes_len = bytes.len();
        let back: Column = bincode::deserialize(&bytes).expect("deserialize");
        assert_eq!(back.len(), ROWS);
    });
    let before = median_s(|| {
        let bytes = bincode::serialize(&plain).expect("serialize");
        plain_len = bytes.len();
        let back: ElementByElement = bincode::deserialize(&bytes).expect("deserialize");
        assert_eq!(back.data.len(), ROWS * ROW);
    });
    let mb = (ROWS * ROW * 4) as f64 / 1e6;
    println!("f32 tensor column, {ROWS} SD2-size rows ({mb:.1} MB), bincode serialize + deserialize, median of 11, freed memory kept as in a job:");
    println!("| encoding | encoded bytes | time | MB/s |");
    println!("| --- | --- | --- | --- |");
    println!("| element by element (before) | {plain_len} | {:.2} ms | {:.0} |", before * 1e3, mb / before);
    println!("| one byte string (Column::F32Tensor) | {bytes_len} | {:.2} ms | {:.0} |", ours * 1e3, mb / ours);
    println!("speed-up: {:.2}x", before / ours);
}
