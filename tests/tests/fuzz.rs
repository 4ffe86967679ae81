//! Fuzzing: no input crashes the topology compiler or the parquet reader. Every case either
//! succeeds or fails with an error; a panic is a crash.
//!
//! - Topologies: the shipped topology files, mutated (bytes flipped, lines dropped, duplicated or
//!   swapped, tokens spliced in), then parsed with random `--set` overrides and validated.
//! - Parquet: a small img2dataset file, corrupted (bytes flipped, zeroed runs, truncated),
//!   read through `parquet_source` to the end and every image decoded by `image_transform`.
//!
//! `cargo test` runs a bounded number of cases. `LATENTFLOW_FUZZ_SECONDS=3600 cargo test --release
//! -p latentflow-tests --test fuzz -- --nocapture` fuzzes for an hour and prints the figures
//! recorded in `bench/results/`.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::Path;
use std::time::{Duration, Instant};

use latentflow_engine::{Batch, Column, InstanceContext, JobConfig, Map, OpContext, OperatorImpl, Plan, WorkerInfo};
use latentflow_operators::demo::write_demo_parquet;
use latentflow_operators::image_transform::{ImageTransform, ImageTransformConfig};
use latentflow_tests::testops::catalog;

/// xorshift64*: a small deterministic generator, so every failing case can be replayed.
struct Fuzz(u64);

impl Fuzz {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

/// How long to fuzz each target: `LATENTFLOW_FUZZ_SECONDS`, else `cases` cases.
fn budget(cases: usize) -> (usize, Duration) {
    match std::env::var("LATENTFLOW_FUZZ_SECONDS").ok().and_then(|s| s.parse::<u64>().ok()) {
        Some(s) => (usize::MAX, Duration::from_secs(s)),
        None => (cases, Duration::from_secs(3600)),
    }
}

const TOKENS: &[&str] = &[
    "=",
    "[",
    "]",
    "{",
    "}",
    "\"",
    ",",
    "[nodes.x]",
    "[[nodes.read.filter]]",
    "inputs = [\"read\"]",
    "type = \"train\"",
    "0",
    "-1",
    "1e309",
    "nan",
    "inf",
    "18446744073709551616",
    "\"\"",
    "placement = \"devices:3-1\"",
    "true",
    "\u{0}",
    "é",
    "batch_size = 0",
    "global_batch_size = 7",
    "resolution = 4",
    "[job]",
    "devices = []",
    "model = \"/nonexistent\"",
];

const OVERRIDES: &[&str] = &[
    "job.seed=-5",
    "job.devices=[\"cuda:99\"]",
    "job.max_epochs_in_flight=0",
    "nodes.read.count=0",
    "nodes.read.batch_size=99999999999",
    "nodes.train.global_batch_size=3",
    "nodes.transform.resolution=\"big\"",
    "nodes.nothere.type=\"demo_source\"",
    "nodes.train.training.lr=-1",
    "nodes..x=1",
    "=",
    "job.drain_timeout_s=0",
    "nodes.transform.max_aspect_ratio=0.5",
    "nodes.vae.placement=\"device:7\"",
];

fn mutate(rng: &mut Fuzz, text: &str) -> String {
    let mut lines: Vec<String> = text.lines().map(str::to_string).collect();
    for _ in 0..1 + rng.below(4) {
        if lines.is_empty() {
            lines.push(String::new());
        }
        let i = rng.below(lines.len());
        match rng.below(6) {
            0 => {
                lines.remove(i);
            }
            1 => {
                let copy = lines[i].clone();
                lines.insert(rng.below(lines.len() + 1), copy);
            }
            2 => {
                let j = rng.below(lines.len());
                lines.swap(i, j);
            }
            3 => {
                let token = TOKENS[rng.below(TOKENS.len())];
                let at = rng.below(lines[i].len() + 1);
                if lines[i].is_char_boundary(at) {
                    lines[i].insert_str(at, token);
                }
            }
            4 => {
                let mut bytes = lines[i].clone().into_bytes();
                if !bytes.is_empty() {
                    let at = rng.below(bytes.len());
                    bytes[at] ^= 1 << rng.below(8);
                }
                lines[i] = String::from_utf8_lossy(&bytes).into_owned();
            }
            _ => lines[i] = lines[i].split('=').next().unwrap_or("").to_string(),
        }
    }
    lines.join("\n")
}

/// Replays `case`, returning the panic message if it panicked.
fn crashes(case: impl FnOnce()) -> Option<String> {
    catch_unwind(AssertUnwindSafe(case)).err().map(|p| latentflow_engine::runtime::panic_message(p.as_ref()))
}

#[test]
fn no_topology_crashes_the_compiler() {
    let root = latentflow_tests::root().join("pipelines/topologies");
    let mut seeds = Vec::new();
    for entry in glob_toml(&root) {
        seeds.push(std::fs::read_to_string(&entry).unwrap());
    }
    assert!(seeds.len() >= 8, "the shipped topologies");
    let catalog = catalog();
    let (cases, time) = budget(1500);
    let began = Instant::now();
    let mut rng = Fuzz(0x5EED_0FF0_2200);
    let (mut run, mut valid, mut crashed) = (0usize, 0usize, Vec::new());
    while run < cases && began.elapsed() < time {
        let seed = rng.below(seeds.len());
        let text = mutate(&mut rng, &seeds[seed]);
        let overrides: Vec<String> =
            (0..rng.below(3)).map(|_| OVERRIDES[rng.below(OVERRIDES.len())].to_string()).collect();
        let case = (text.clone(), overrides.clone());
        let outcome = crashes(|| {
            if let Ok(plan) = Plan::from_toml("fuzz.toml", &text, &overrides, &catalog) {
                valid += 1;
                let _ = plan.source_batches(1 + rng.below(3), 1 + rng.below(2));
            }
        });
        if let Some(message) = outcome {
            crashed.push((case, message));
        }
        run += 1;
    }
    println!(
        "topologies: {run} cases in {:.1} s, {valid} valid, {} crashes",
        began.elapsed().as_secs_f64(),
        crashed.len()
    );
    assert!(crashed.is_empty(), "crashes: {crashed:#?}");
    assert!(valid > 0, "some mutations stay valid, so validation itself is exercised");
}

fn glob_toml(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            found.extend(glob_toml(&path));
        } else if path.extension().is_some_and(|e| e == "toml") {
            found.push(path);
        }
    }
    found
}

/// Reads `path` with `parquet_source` to the end and decodes every image; errors are fine.
fn read_and_decode(path: &Path) {
    let text = format!("path = \"{}\"\nbatch_size = 4\n", path.display());
    let config: latentflow_operators::parquet_source::ParquetSourceConfig = toml::from_str(&text).unwrap();
    if !latentflow_engine::NodeSpec::validate(&config).is_empty() {
        return;
    }
    let job = JobConfig::default();
    let ctx = InstanceContext { node: "read", job: &job, worker: WorkerInfo::single(), batch_size: None };
    let Ok(OperatorImpl::Source(mut source)) = latentflow_engine::NodeSpec::instantiate(&config, &ctx) else {
        return;
    };
    let transform =
        ImageTransform::new(ImageTransformConfig { resolution: 16, ..ImageTransformConfig::default() }, 0).unwrap();
    let mut op = OpContext::detached("read");
    if source.start(&mut op).is_err() {
        return;
    }
    for _ in 0..1000 {
        match source.next_batch(&mut op) {
            Ok(Some(batch)) => {
                let batch: Batch = batch;
                let rows = batch.rows();
                if let Ok(out) = transform.map(batch, &mut OpContext::detached("transform")) {
                    assert!(out.rows() <= rows);
                    if let Ok(Column::U8Tensor { shape, .. }) = out.column("pixels") {
                        assert_eq!(shape, &vec![3, 16, 16]);
                    }
                }
            }
            Ok(None) | Err(_) => return,
        }
    }
}

#[test]
fn no_corrupted_parquet_file_crashes_the_reader_or_the_decoder() {
    let dir = tempfile::tempdir().unwrap();
    let clean = dir.path().join("clean.parquet");
    write_demo_parquet(&clean, 12, 0, 1).unwrap();
    let original = std::fs::read(&clean).unwrap();
    read_and_decode(&clean);
    let (cases, time) = budget(300);
    let began = Instant::now();
    let mut rng = Fuzz(0xC022_F11E);
    let (mut run, mut crashed) = (0usize, Vec::new());
    let path = dir.path().join("corrupt.parquet");
    while run < cases && began.elapsed() < time {
        let mut bytes = original.clone();
        let what = rng.below(4);
        match what {
            0 => {
                for _ in 0..1 + rng.below(16) {
                    let at = rng.below(bytes.len());
                    bytes[at] ^= 1 << rng.below(8);
                }
            }
            1 => {
                let at = rng.below(bytes.len());
                let n = (1 + rng.below(64)).min(bytes.len() - at);
                bytes[at..at + n].fill(0);
            }
            2 => bytes.truncate(rng.below(bytes.len())),
            _ => {
                // The footer: where the reader trusts lengths and offsets most.
                let tail = bytes.len().saturating_sub(1 + rng.below(512));
                let at = tail + rng.below(bytes.len() - tail);
                bytes[at] = rng.next() as u8;
            }
        }
        std::fs::write(&path, &bytes).unwrap();
        if let Some(message) = crashes(|| read_and_decode(&path)) {
            // Kept where the test's own folder does not take them away, to replay.
            let kept = std::env::temp_dir().join("latentflow-fuzz-crashes");
            std::fs::create_dir_all(&kept).unwrap();
            let kept = kept.join(format!("parquet-{run}.parquet"));
            std::fs::write(&kept, &bytes).unwrap();
            crashed.push((run, what, message, kept));
        }
        run += 1;
    }
    println!("parquet: {run} corrupted files in {:.1} s, {} crashes", began.elapsed().as_secs_f64(), crashed.len());
    assert!(crashed.is_empty(), "crashes (case, kind, panic, file): {crashed:#?}");
}
