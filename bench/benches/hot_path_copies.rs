//! The copies on the hot path between operators, each timed on its own at SD2 sizes:
//!
//! - `image_transform`: one batch of 32 demo JPEGs to 256 px crops (`map_groups`: decode,
//!   resize, crop and the CHW batch column);
//! - `vae_encode` input: a 40-row 3x256x256 pixel column becoming the model's tensor, from the
//!   column the stage owns against a copy of it (the way before), in the same run;
//! - `train` rows: two batches of 32 SD2-size rows (latents 4x32x32, text embeddings 77x1024)
//!   taken in and stacked into the step's tensors;
//! - encoder outputs into `train`: the same rows as the encoders' output tensors, copied out to
//!   host columns (the way before) against left where they were computed, in the same run;
//! - `latents_sink`: 512 such rows in batches of 32 into files of `rows_per_file` 256: time and
//!   row groups per file;
//! - `latents_source` on 4 and 16 workers: the time each takes to read its share of those
//!   files and the bytes of the files it reads, all together against one worker reading them
//!   all (1.0x: nothing read twice).
//!
//! `cargo bench -p latentflow-bench --bench hot_path_copies`

#![allow(missing_docs)]

use std::time::Instant;

use candle_core::{Device, Tensor};
use latentflow_engine::{Batch, Column, Map, OpContext, Sink, Source};
use latentflow_operators::demo::demo_image;
use latentflow_operators::device_column::device_column;
use latentflow_operators::image_transform::{ImageTransform, ImageTransformConfig};
use latentflow_operators::latents_sink::LatentsSink;
use latentflow_operators::latents_source::{LatentsSource, LatentsSourceConfig};
use latentflow_operators::tables::files::open_metadata;
use latentflow_operators::train::rows::{stack, RowBuffer};
use serde_bytes::ByteBuf;

const LATENT: [usize; 3] = [4, 32, 32];
const CAPTION: [usize; 2] = [77, 1024];
const SINK_ROWS: usize = 512;
const ROWS_PER_FILE: usize = 256;
const BATCH: usize = 32;

fn median_s(runs: usize, mut run: impl FnMut()) -> f64 {
    median_with_setup_s(runs, || (), |()| run())
}

/// The median time of `run` alone, on a fresh input from `setup` each time.
fn median_with_setup_s<T>(runs: usize, mut setup: impl FnMut() -> T, mut run: impl FnMut(T)) -> f64 {
    let mut times: Vec<f64> = (0..runs)
        .map(|_| {
            let input = setup();
            let started = Instant::now();
            run(input);
            started.elapsed().as_secs_f64()
        })
        .collect();
    times.sort_by(f64::total_cmp);
    times[times.len() / 2]
}

/// `rows` SD2-size latent rows with keys from `first`.
fn latent_batch(first: i64, rows: usize) -> Batch {
    let (l, c) = (LATENT.iter().product::<usize>(), CAPTION.iter().product::<usize>());
    let values = |n: usize, salt: f32| (0..rows * n).map(|i| ((i as f32) * 0.37 + salt).sin()).collect();
    Batch::new()
        .with("key", Column::I64((first..first + rows as i64).collect()))
        .unwrap()
        .with("caption", Column::Str((0..rows).map(|i| format!("caption {i}")).collect()))
        .unwrap()
        .with("latents", Column::F32Tensor { shape: LATENT.to_vec(), data: values(l, first as f32) })
        .unwrap()
        .with("caption_latents", Column::F32Tensor { shape: CAPTION.to_vec(), data: values(c, 1.0) })
        .unwrap()
}

fn image_transform() -> f64 {
    let jpegs: Vec<ByteBuf> = (0..BATCH as u64).map(|k| ByteBuf::from(demo_image(1, k, 90).jpeg)).collect();
    let transform =
        ImageTransform::new(ImageTransformConfig { resolution: 256, ..ImageTransformConfig::default() }, 0).unwrap();
    let pool = rayon::ThreadPoolBuilder::new().num_threads(2).build().unwrap();
    median_s(11, || {
        let batch = Batch::new()
            .with("key", Column::I64((0..BATCH as i64).collect()))
            .unwrap()
            .with("image", Column::Bytes(jpegs.clone()))
            .unwrap();
        let out = pool.install(|| transform.map_groups(batch, &mut OpContext::detached("transform")).unwrap());
        assert_eq!(out[0].rows(), BATCH);
    })
}

fn vae_input() -> (f64, f64) {
    let shape = vec![3, 256, 256];
    let data: Vec<u8> = (0..40 * 3 * 256 * 256).map(|i| (i % 251) as u8).collect();
    let dims = [40, 3, 256, 256];
    let copied = median_s(21, || {
        let column = Column::U8Tensor { shape: shape.clone(), data: data.clone() };
        let Column::U8Tensor { data, .. } = &column else { unreachable!() };
        std::hint::black_box(Tensor::from_slice(data, &dims, &Device::Cpu).unwrap());
    });
    let owned = median_s(21, || {
        let column = Column::U8Tensor { shape: shape.clone(), data: data.clone() };
        std::hint::black_box(latentflow_operators::model_keys::column_tensor(column, "pixels", &Device::Cpu).unwrap());
    });
    // Both include building the column (one copy of `data`); the difference is the stage's copy.
    (copied, owned)
}

fn train_rows() -> f64 {
    let batches = [latent_batch(0, BATCH), latent_batch(BATCH as i64, BATCH)];
    let shapes = (LATENT.to_vec(), CAPTION.to_vec());
    median_with_setup_s(
        11,
        || batches.clone(),
        |batches| {
            let mut buffer = RowBuffer::default();
            for batch in batches {
                buffer.push(batch).unwrap();
            }
            let mut rows = buffer.take();
            rows.sort_by_key(|r| std::cmp::Reverse(r.key));
            let step = stack(&rows, &shapes, &Device::Cpu).unwrap();
            assert_eq!(step.latents.dims()[0] + step.captions.dims()[0], 4 * BATCH);
        },
    )
}

/// Two batches of 32 encoder outputs at SD2 sizes into one 64-row step: as host columns (the
/// tensors copied out, what encoders emitted before) and left where the encoder computed them
/// (`device_column`), in the same run.
fn encoder_to_train() -> (f64, f64) {
    let tensor = |dims: &[usize], salt: f32| {
        let n: usize = dims.iter().product();
        Tensor::from_vec((0..n).map(|i| ((i as f32) * 0.37 + salt).sin()).collect::<Vec<f32>>(), dims, &Device::Cpu)
            .unwrap()
    };
    let outputs: Vec<(Tensor, Tensor)> = (0..2)
        .map(|b| (tensor(&[BATCH, 4, 32, 32], b as f32), tensor(&[BATCH, CAPTION[0], CAPTION[1]], 1.0 + b as f32)))
        .collect();
    let shapes = (LATENT.to_vec(), CAPTION.to_vec());
    let run = |on_device: bool| {
        median_s(11, || {
            let mut buffer = RowBuffer::default();
            for (b, (latents, captions)) in outputs.iter().enumerate() {
                let column = |t: &Tensor| {
                    if on_device {
                        device_column(t).unwrap()
                    } else {
                        let data = t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
                        Column::F32Tensor { shape: t.dims()[1..].to_vec(), data }
                    }
                };
                let keys = Column::I64((0..BATCH as i64).map(|k| k + (b * BATCH) as i64).collect());
                let batch = Batch::new().with("key", keys).unwrap();
                let batch = batch.with("latents", column(latents)).unwrap();
                buffer.push(batch.with("caption_latents", column(captions)).unwrap()).unwrap();
            }
            let mut rows = buffer.take();
            rows.sort_by_key(|r| std::cmp::Reverse(r.key));
            let step = stack(&rows, &shapes, &Device::Cpu).unwrap();
            assert_eq!(step.latents.dims()[0] + step.captions.dims()[0], 4 * BATCH);
        })
    };
    (run(false), run(true))
}

/// Writes the sink's files into `dir`; returns the time and the row groups of each file.
fn latents_sink(dir: &std::path::Path) -> (f64, Vec<usize>) {
    let batches: Vec<Batch> = (0..SINK_ROWS / BATCH).map(|b| latent_batch((b * BATCH) as i64, BATCH)).collect();
    let time = median_s(3, || {
        let _ = std::fs::remove_dir_all(dir);
        std::fs::create_dir_all(dir).unwrap();
        let mut sink = LatentsSink::new(dir.to_path_buf(), ROWS_PER_FILE, 0);
        let mut ctx = OpContext::detached("sink");
        sink.start(&mut ctx).unwrap();
        for batch in &batches {
            sink.write(batch.clone(), &mut ctx).unwrap();
        }
        sink.finish(&mut ctx).unwrap();
    });
    let mut files: Vec<_> = std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().path()).collect();
    files.sort();
    let groups = files.iter().map(|f| open_metadata(f).unwrap().metadata().num_row_groups()).collect();
    (time, groups)
}

/// Seconds for shard `shard` of `shards` to read all its rows, and the bytes of the files it read.
fn read_shard(dir: &std::path::Path, shard: usize, shards: usize) -> (f64, u64) {
    let config = LatentsSourceConfig { path: dir.display().to_string(), batch_size: Some(BATCH), ..Default::default() };
    let mut bytes = 0;
    let time = median_s(3, || {
        let mut source = LatentsSource::new(config.clone(), 0, shard, shards);
        let mut ctx = OpContext::detached("read");
        source.start(&mut ctx).unwrap();
        let mut rows = 0;
        while let Some(batch) = source.next_batch(&mut ctx).unwrap() {
            rows += batch.rows();
        }
        assert_eq!(rows, (SINK_ROWS + shards - 1 - shard) / shards);
        bytes = ctx.take_counts().iter().filter(|(name, _)| name == "file_bytes_read").map(|(_, n)| n).sum();
    });
    (time, bytes)
}

fn main() {
    latentflow_engine::memory::keep_freed_memory();
    println!("| path | figure |");
    println!("| --- | --- |");
    let transform = image_transform();
    println!("| image_transform, {BATCH} demo JPEGs -> 256 px, 2 threads | {:.1} ms per batch |", transform * 1e3);
    let (copied, owned) = vae_input();
    println!(
        "| vae_encode input, 40 x 3x256x256 u8 | a copy {:.2} ms, the owned column {:.3} ms |",
        copied * 1e3,
        owned * 1e3
    );
    let train = train_rows();
    println!("| train rows, 2 x {BATCH} SD2-size rows in, one step stacked | {:.2} ms |", train * 1e3);
    let (host, device) = encoder_to_train();
    println!(
        "| encoder outputs -> train, 2 x {BATCH} SD2-size rows, one step stacked | host columns {:.2} ms, left on the \
         device {:.2} ms |",
        host * 1e3,
        device * 1e3
    );
    let dir = tempfile::tempdir().unwrap();
    let (sink, groups) = latents_sink(dir.path());
    println!(
        "| latents_sink, {SINK_ROWS} rows in batches of {BATCH}, rows_per_file {ROWS_PER_FILE} | {:.1} ms, row groups per file {groups:?} |",
        sink * 1e3
    );
    let (one, one_bytes) = read_shard(dir.path(), 0, 1);
    println!("| latents_source, 1 worker | {:.1} ms, {:.1} MB of the files read |", one * 1e3, one_bytes as f64 / 1e6);
    for shards in [4, 16] {
        let per_worker: Vec<(f64, u64)> = (0..shards).map(|shard| read_shard(dir.path(), shard, shards)).collect();
        let sum: f64 = per_worker.iter().map(|(t, _)| t).sum();
        let bytes: u64 = per_worker.iter().map(|(_, b)| b).sum();
        let times = per_worker.iter().map(|(t, _)| *t);
        let (least, most) = (times.clone().fold(f64::MAX, f64::min), times.fold(0.0, f64::max));
        println!(
            "| latents_source, {shards} workers | each {:.1}-{:.1} ms, all together {:.1} ms: {:.2}x one worker's; \
             {:.2}x its bytes read |",
            least * 1e3,
            most * 1e3,
            sum * 1e3,
            sum / one,
            bytes as f64 / one_bytes as f64
        );
    }
}
