//! Latents files are interchangeable with the reference's Ray Data code, both ways:
//! `latents_source` reads files Ray and pyarrow wrote in every tensor layout
//! (`tests/fixtures/latents/`, made by `bench/interop/ray_latents.py write`) to the values they
//! hold, and when `python3` has Ray, the reference's loader reads what `latents_sink` writes.

use std::process::Command;

use latentflow_engine::{Batch, Column, NodeSpec, OpContext, Sink, Source};
use latentflow_operators::latents_sink::LatentsSink;
use latentflow_operators::latents_source::{LatentsSource, LatentsSourceConfig};
use latentflow_tests::{fixture, root};

/// The rows the fixtures hold: latents [4, 2, 2] = 100 k + i, embeddings [3, 2] = k + i / 10.
fn expected(rows: usize) -> Batch {
    let latents = (0..rows).flat_map(|k| (0..16).map(move |i| (100 * k + i) as f32)).collect();
    let embeddings = (0..rows).flat_map(|k| (0..6).map(move |i| k as f32 + i as f32 / 10.0)).collect();
    Batch::new()
        .with("key", Column::I64((0..rows as i64).collect()))
        .unwrap()
        .with("caption", Column::Str((0..rows).map(|k| format!("caption {k}")).collect()))
        .unwrap()
        .with("latents", Column::F32Tensor { shape: vec![4, 2, 2], data: latents })
        .unwrap()
        .with("caption_latents", Column::F32Tensor { shape: vec![3, 2], data: embeddings })
        .unwrap()
}

fn read(path: &std::path::Path) -> Batch {
    let config = LatentsSourceConfig { path: path.display().to_string(), batch_size: Some(10), shuffle: false };
    assert!(config.validate().is_empty(), "{}: {:?}", path.display(), config.validate());
    let mut source = LatentsSource::new(config, 0, 0, 1);
    let mut ctx = OpContext::detached("latents");
    source.start(&mut ctx).unwrap();
    source.next_batch(&mut ctx).unwrap().expect("rows")
}

#[test]
fn files_ray_and_pyarrow_wrote_read_back_to_their_values() {
    let want = expected(3);
    for name in ["ray_v1", "ray_v2", "fixed_shape_tensor", "fixed_size_list"] {
        let batch = read(&fixture(&format!("latents/{name}.parquet")));
        for column in ["key", "caption", "latents", "caption_latents"] {
            assert_eq!(batch.column(column).unwrap(), want.column(column).unwrap(), "{name}: {column}");
        }
    }
}

/// True when `python3` can import Ray Data (the reference's stack).
fn python_has_ray() -> bool {
    Command::new("python3").args(["-c", "import ray.data, pyarrow"]).output().is_ok_and(|o| o.status.success())
}

#[test]
fn the_references_loader_reads_what_latents_sink_writes() {
    if !python_has_ray() {
        eprintln!("skipped: python3 has no Ray Data (pip install 'ray[data]' to run this check)");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let mut sink = LatentsSink::new(dir.path().to_path_buf(), 100, 0);
    let mut ctx = OpContext::detached("latents");
    sink.start(&mut ctx).unwrap();
    sink.write(expected(5), &mut ctx).unwrap();
    sink.finish(&mut ctx).unwrap();
    let file = std::fs::read_dir(dir.path()).unwrap().next().unwrap().unwrap().path();
    let script = root().join("bench/interop/ray_latents.py");
    let out = Command::new("python3")
        .args([script.to_str().unwrap(), "read", file.to_str().unwrap(), "5"])
        .env("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr).lines().rev().take(30).collect::<Vec<_>>().join("\n")
    );
    assert!(stdout.contains("\"latents\": [5, 4, 2, 2]"), "{stdout}");
}
