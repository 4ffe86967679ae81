//! The data path per core: decode, full transform (DCT shortcut off and on) and tokenize, on
//! demo-data JPEGs of 256-800 px to a 256 px crop; then, in the same run, Pillow's rate on the
//! same images (if `python3` with Pillow and NumPy is installed) and the engine's scaling from
//! one to two threads.

// `criterion_group!` defines an undocumented public function.
#![allow(missing_docs)]

use std::path::Path;
use std::time::{Duration, Instant};

use criterion::{criterion_group, Criterion, Throughput};
use latentflow_engine::{run, Plan, RunOptions};
use latentflow_operators::demo::{demo_image, write_demo_parquet};
use latentflow_operators::image_transform::{ImageTransform, ImageTransformConfig};
use latentflow_operators::pixels::{decode, DecodeOptions};
use latentflow_operators::tokenize::TokenizeConfig;

const IMAGES: u64 = 200;
const RES: u32 = 256;

struct Data {
    jpegs: Vec<Vec<u8>>,
    captions: Vec<String>,
}

fn data() -> Data {
    let rows: Vec<_> = (0..IMAGES).map(|k| demo_image(1, k, 90)).collect();
    Data {
        captions: rows.iter().map(|r| r.caption.clone()).collect(),
        jpegs: rows.into_iter().map(|r| r.jpeg).collect(),
    }
}

fn transform(dct: bool) -> ImageTransform {
    ImageTransform::new(
        ImageTransformConfig { resolution: RES, dct_scaling: dct, ..ImageTransformConfig::default() },
        0,
    )
    .expect("a square transform")
}

fn data_path(c: &mut Criterion) {
    let data = data();
    let mut group = c.benchmark_group("data_path");
    group.sample_size(10).measurement_time(Duration::from_secs(6));
    group.throughput(Throughput::Elements(IMAGES));
    let full =
        DecodeOptions { exif_transpose: true, max_pixels: 100_000_000, max_aspect_ratio: 20.0, dct_target: None };
    group.bench_function("decode", |b| {
        b.iter(|| data.jpegs.iter().map(|j| decode(j, &full).unwrap().width).sum::<u32>())
    });
    let scaled = DecodeOptions { dct_target: Some(RES), ..full };
    group.bench_function("decode_dct", |b| {
        b.iter(|| data.jpegs.iter().map(|j| decode(j, &scaled).unwrap().width).sum::<u32>())
    });
    for (name, dct) in [("transform", false), ("transform_dct", true)] {
        let t = transform(dct);
        group.bench_function(name, |b| {
            b.iter(|| data.jpegs.iter().map(|j| t.apply(j, 0).unwrap().pixels.len()).sum::<usize>())
        });
    }
    let (tokenizer, padding, max_length) = TokenizeConfig::default().build().unwrap();
    let captions: Vec<String> = (0..50).flat_map(|_| data.captions.iter().cloned()).collect();
    group.throughput(Throughput::Elements(captions.len() as u64));
    group.bench_function("tokenize", |b| {
        b.iter(|| captions.iter().map(|c| tokenizer.input_ids(c, padding, max_length).0.len()).sum::<usize>())
    });
    group.finish();
}

criterion_group!(benches, data_path);

fn mean_ns(name: &str) -> Option<f64> {
    let target =
        std::env::var("CARGO_TARGET_DIR").unwrap_or_else(|_| concat!(env!("CARGO_MANIFEST_DIR"), "/../target").into());
    let path = Path::new(&target).join("criterion/data_path").join(name).join("new/estimates.json");
    let json: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(path).ok()?).ok()?;
    json["mean"]["point_estimate"].as_f64()
}

/// Pillow on the same images, one core, via `bench/python/pillow_transform.py`.
fn pillow(jpegs: &[Vec<u8>]) -> Option<serde_json::Value> {
    let dir = std::env::temp_dir().join(format!("latentflow-pillow-{}", std::process::id()));
    std::fs::create_dir_all(&dir).ok()?;
    for (i, j) in jpegs.iter().enumerate() {
        std::fs::write(dir.join(format!("{i:05}.jpg")), j).ok()?;
    }
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/python/pillow_transform.py");
    let out = std::process::Command::new("python3").args([script, dir.to_str()?, &RES.to_string(), "3"]).output().ok();
    let _ = std::fs::remove_dir_all(&dir);
    let out = out?;
    if !out.status.success() {
        eprintln!("Pillow baseline skipped: {}", String::from_utf8_lossy(&out.stderr).lines().last().unwrap_or(""));
        return None;
    }
    serde_json::from_slice(&out.stdout).ok()
}

/// Images per second through `parquet_source → image_transform → null_sink` with `threads`
/// pool threads and as many workers (best of three).
fn engine_rate(file: &Path, threads: usize) -> f64 {
    let text = format!(
        "[job]\nname = \"scaling\"\ncpu_threads = {threads}\n[nodes.read]\ntype = \"parquet_source\"\npath = \"{}\"\n\
         [nodes.transform]\ntype = \"image_transform\"\ninputs = [\"read\"]\nresolution = {RES}\n\
         [nodes.sink]\ntype = \"null_sink\"\ninputs = [\"transform\"]\n",
        file.display()
    );
    let plan = Plan::from_toml("scaling.toml", &text, &[], &latentflow_operators::registry()).expect("valid");
    (0..3)
        .map(|_| {
            let t = Instant::now();
            // One source worker; the map pool has `threads` threads.
            run(&plan, &RunOptions { workers: 1, ..RunOptions::default() }).expect("run");
            IMAGES as f64 * 4.0 / t.elapsed().as_secs_f64()
        })
        .fold(0.0, f64::max)
}

fn main() {
    benches();
    Criterion::default().configure_from_args().final_summary();
    let rate = |name: &str, n: f64| mean_ns(name).map(|ns| n / (ns * 1e-9));
    let images = IMAGES as f64;
    let (Some(decode), Some(full), Some(dct)) =
        (rate("decode", images), rate("transform", images), rate("transform_dct", images))
    else {
        return;
    };
    let tokenize = rate("tokenize", images * 50.0).unwrap_or(0.0);
    println!("data_path per core: decode {decode:.0}/s, decode_dct {:.0}/s, transform {full:.0}/s, transform_dct {dct:.0}/s, tokenize {tokenize:.0} captions/s", rate("decode_dct", images).unwrap_or(0.0));
    let data = data();
    match pillow(&data.jpegs) {
        Some(p) => {
            let pt = p["pillow_transform_per_s"].as_f64().unwrap_or(f64::NAN);
            let pd = p["pillow_decode_per_s"].as_f64().unwrap_or(f64::NAN);
            println!(
                "data_path vs Pillow {} (same images, one core): Pillow decode {pd:.0}/s, transform {pt:.0}/s; ours/Pillow transform {:.2}x (DCT off), {:.2}x (DCT on)",
                p["pillow"], full / pt, dct / pt
            );
        }
        None => println!("data_path: Pillow baseline not measured (needs python3 with pillow and numpy)"),
    }
    // Scaling: 4 copies of the images so each run is long enough to time.
    let file = std::env::temp_dir().join(format!("latentflow-scaling-{}.parquet", std::process::id()));
    write_demo_parquet(&file, IMAGES * 4, 1, 2).expect("demo parquet");
    let (one, two) = (engine_rate(&file, 1), engine_rate(&file, 2));
    let _ = std::fs::remove_file(&file);
    println!(
        "data_path engine scaling (one parquet_source -> transform, cpu_threads 1 and 2): 1 thread {one:.0}/s, 2 threads {two:.0}/s, ratio {:.2}",
        two / one
    );
}
