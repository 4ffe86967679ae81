//! The three jobs end to end on tiny sizes: preprocess then train equals online (fusion changes
//! nothing), a SIGKILLed online run resumes to exactly the run it would have been, the final
//! UNet loads back with the outputs it had in memory, and the SD2 topologies validate.

use std::path::Path;

use candle_core::{Device, Tensor};
use latentflow_engine::{Batch, Column, JobConfig, OpContext, Sink, Source};
use latentflow_operators::demo::{demo_image_in, SceneStyle, COLOURS};
use latentflow_operators::latents_source::{LatentsSource, LatentsSourceConfig};
use latentflow_operators::models::load::{load_unet, ModelSource};
use latentflow_operators::train::{Train, TrainConfig};
use latentflow_tests::{fixture, kill_run_once_exists, latentflow, text, topology};
use serde_json::Value;

const BIN: &str = env!("CARGO_BIN_EXE_lf");

/// `metrics.jsonl` of a run folder, one JSON object per step.
fn metrics(run: &Path) -> Vec<Value> {
    let text = std::fs::read_to_string(run.join("metrics.jsonl")).unwrap_or_else(|e| panic!("{}: {e}", run.display()));
    text.lines().map(|l| serde_json::from_str(l).unwrap()).collect()
}

fn run_ok(dir: &Path, args: &[&str]) -> String {
    let out = latentflow(BIN, dir, args);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn topo(name: &str) -> String {
    topology(name).display().to_string()
}

#[test]
fn preprocess_then_train_gives_the_losses_of_online() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    // 3 steps of 16 rows, deterministic latents (posterior mean).
    let common = ["--set", "nodes.read.count=48", "--set", "nodes.vae.mode=mean"];
    let profile = run_ok(d, &[&["run", &topo("preprocess.toml")][..], &common].concat());
    assert!(profile.contains("latents_sink"), "the profile table is printed: {profile}");
    let files: Vec<_> = std::fs::read_dir(d.join("runs/preprocess/latents")).unwrap().collect();
    assert_eq!(files.len(), 1, "48 rows, 1000 per file");
    let keys = ["--set", "nodes.train.log_keys=true"];
    run_ok(d, &[&["run", &topo("train.toml")][..], &keys].concat());
    run_ok(d, &[&["run", &topo("online.toml")][..], &common, &keys].concat());

    let (offline, online) = (metrics(&d.join("runs/train")), metrics(&d.join("runs/online")));
    assert_eq!(offline.len(), 3);
    assert_eq!(online.len(), 3);
    for (a, b) in offline.iter().zip(&online) {
        assert_eq!(a["step"], b["step"]);
        assert_eq!(a["keys"], b["keys"], "same data in the same steps");
        let (la, lb) = (a["loss"].as_f64().unwrap(), b["loss"].as_f64().unwrap());
        assert!((la - lb).abs() <= 1e-6, "step {}: offline loss {la} vs online {lb}", a["step"]);
    }
    for run in ["runs/train", "runs/online"] {
        assert!(d.join(run).join("loss.png").is_file(), "{run}/loss.png");
        assert!(d.join(run).join("final/unet/diffusion_pytorch_model.safetensors").is_file());
        assert!(d.join(run).join("checkpoint-3/state.json").is_file(), "a checkpoint at the end");
    }
    assert!(!d.join("runs/online/latents").exists(), "online stores no latents");
}

/// The demo colour nearest `rgb` (0-255).
fn nearest_colour(rgb: [f32; 3]) -> &'static str {
    let distance = |c: &[u8; 3]| (0..3).map(|i| (rgb[i] - f32::from(c[i])).powi(2)).sum::<f32>();
    COLOURS.iter().min_by(|a, b| distance(&a.1).total_cmp(&distance(&b.1))).unwrap().0
}

#[test]
fn the_demos_pixels_latents_show_each_rows_caption() {
    // Simple scenes: one large shape on a solid background, so each latent's top row of patches
    // is the background the caption names. Through the whole preprocessing job and back.
    let dir = tempfile::tempdir().unwrap();
    let sets = ["nodes.read.count=64", "nodes.read.scenes=\"simple\"", "nodes.vae.mode=\"mean\""];
    let sets: Vec<&str> = sets.iter().flat_map(|s| ["--set", s]).collect();
    run_ok(dir.path(), &[&["run", &topo("preprocess.toml")][..], &sets].concat());
    let latents = dir.path().join("runs/preprocess/latents");
    let config = LatentsSourceConfig { path: latents.display().to_string(), ..Default::default() };
    let mut source = LatentsSource::new(config, 0, 0, 1);
    let mut ctx = OpContext::detached("read");
    source.start(&mut ctx).unwrap();
    let mut rows = 0;
    while let Some(batch) = source.next_batch(&mut ctx).unwrap() {
        let Column::F32Tensor { shape, data } = batch.column("latents").unwrap() else { panic!("f32 latents") };
        assert_eq!(shape, &[4, 8, 8]);
        for (i, &key) in batch.i64s("key").unwrap().iter().enumerate() {
            let row = &data[i * 256..(i + 1) * 256];
            let top = |c: usize| (row[c * 64..c * 64 + 8].iter().sum::<f32>() / 8.0 + 1.0) * 127.5;
            let background = nearest_colour([top(0), top(1), top(2)]);
            let caption = demo_image_in(0, key as u64, 90, SceneStyle::Simple).caption;
            assert!(
                caption.ends_with(&format!("on a {background} background")),
                "row {key}: {caption}, top {background}"
            );
            rows += 1;
        }
    }
    assert_eq!(rows, 64);
}

#[test]
fn a_killed_online_run_resumes_to_the_run_it_would_have_been() {
    // 12 steps, a checkpoint every 3, each step's keys logged.
    let args = |d: &Path| -> Vec<String> {
        let mut a: Vec<String> = vec!["run".into(), topo("online.toml")];
        for set in ["nodes.read.count=192", "nodes.train.checkpoint_every=3", "nodes.train.log_keys=true"] {
            a.extend(["--set".into(), set.into()]);
        }
        a.extend(["--set".into(), format!("job.output_dir={}", d.join("run").display())]);
        a
    };
    let whole = tempfile::tempdir().unwrap();
    let whole_args = args(whole.path());
    run_ok(whole.path(), &whole_args.iter().map(String::as_str).collect::<Vec<_>>());

    let killed = tempfile::tempdir().unwrap();
    let run = killed.path().join("run");
    kill_run_once_exists(BIN, killed.path(), &args(killed.path()), &run.join("checkpoint-3/state.json"));
    assert!(!run.join("final").exists(), "killed before the end");
    let resumed_args = args(killed.path());
    run_ok(killed.path(), &resumed_args.iter().map(String::as_str).collect::<Vec<_>>());

    let (expected, got) = (metrics(&whole.path().join("run")), metrics(&run));
    assert_eq!(got.len(), 12, "every step once");
    for (a, b) in expected.iter().zip(&got) {
        assert_eq!(a["step"], b["step"]);
        assert_eq!(a["keys"], b["keys"], "step {}: same rows, none skipped or repeated", a["step"]);
        assert_eq!(a["loss"], b["loss"], "step {}: the resumed run continues exactly", a["step"]);
    }
    let state = |d: &Path| -> Value {
        serde_json::from_str(&std::fs::read_to_string(d.join("checkpoint-12/state.json")).unwrap()).unwrap()
    };
    let (a, b) = (state(&whole.path().join("run")), state(&run));
    assert_eq!(a["step"], 12);
    assert_eq!(a["data_position"], b["data_position"], "the same data position at the end");
    assert_eq!(a["rng"], b["rng"]);
}

#[test]
fn the_final_unet_loads_back_with_the_outputs_it_had_in_memory() {
    let dir = tempfile::tempdir().unwrap();
    let job = JobConfig { output_dir: Some(dir.path().to_path_buf()), ..JobConfig::default() };
    let config = TrainConfig {
        preset: Some("tiny".into()),
        global_batch_size: 2,
        checkpoint_every: 0,
        sample_every: 2,
        sample_steps: 2,
        ..Default::default()
    };
    let mut train = Train::new(config, &job).unwrap();
    let mut ctx = OpContext::detached("train");
    train.start(&mut ctx).unwrap();
    for epoch in 0..2 {
        let batch = Batch::new()
            .with("key", Column::I64(vec![2 * epoch, 2 * epoch + 1]))
            .unwrap()
            .with(
                "latents",
                Column::F32Tensor { shape: vec![4, 8, 8], data: (0..512).map(|i| (i as f32 * 0.37).sin()).collect() },
            )
            .unwrap()
            .with(
                "caption_latents",
                Column::F32Tensor {
                    shape: vec![77, 32],
                    data: (0..2 * 77 * 32).map(|i| (i as f32 * 0.11).cos()).collect(),
                },
            )
            .unwrap();
        train.write(batch, &mut ctx).unwrap();
        train.end_epoch(epoch as u64, &mut ctx).unwrap();
    }
    train.finish(&mut ctx).unwrap();
    let trainer = train.trainer().unwrap();
    assert_eq!(trainer.step(), 2);

    let sample = Tensor::randn(0f32, 1.0, (1, 4, 8, 8), &Device::Cpu).unwrap();
    let context = Tensor::randn(0f32, 1.0, (1, 77, 32), &Device::Cpu).unwrap();
    let in_memory = trainer.unet().forward(&sample, &[500.0], &context).unwrap();
    let (loaded, _) = load_unet(&ModelSource::Folder(dir.path().join("final/unet")), &Device::Cpu, false, 0).unwrap();
    let reloaded = loaded.forward(&sample, &[500.0], &context).unwrap();
    let diff = latentflow_tests::max_abs_diff(&in_memory, &reloaded);
    assert_eq!(diff, 0.0, "the saved weights are the trained ones");
    assert!(dir.path().join("checkpoint-2/state.json").is_file(), "finish checkpoints the last step");
    assert_eq!(metrics(dir.path()).len(), 2);
    let preview = image::open(dir.path().join("samples/step-2.png")).unwrap();
    assert_eq!((preview.width(), preview.height()), (2 * 64, 64), "two prompts side by side");
}

#[test]
fn a_second_phase_at_twice_the_resolution_continues_the_first() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let out = |name: &str| format!("job.output_dir={}", d.join(name).display());
    // Phase 1: 3 steps at 64 px; phase 2: 2 steps at 128 px from its final UNet and optimizer.
    let p1 = out("phase1");
    run_ok(d, &["run", &topo("online.toml"), "--set", "nodes.read.count=48", "--set", &p1]);
    let unet = format!("nodes.train.path={}", d.join("phase1/final/unet").display());
    let optimizer = format!("nodes.train.optimizer_from={}", d.join("phase1").display());
    let p2 = out("phase2");
    let sets = ["nodes.read.count=32", &unet, &optimizer, &p2, "nodes.train.sample_every=2"];
    let mut args = vec!["run".to_string(), topo("online-phase2.toml")];
    for set in sets {
        args.extend(["--set".into(), set.into()]);
    }
    run_ok(d, &args.iter().map(String::as_str).collect::<Vec<_>>());
    let steps = metrics(&d.join("phase2"));
    let numbers: Vec<u64> = steps.iter().map(|s| s["step"].as_u64().unwrap()).collect();
    assert_eq!(numbers, [4, 5], "the step count goes on from phase 1's");
    assert!(steps.iter().all(|s| s["resolution"] == serde_json::json!([128, 128])), "{steps:?}");
    let first = metrics(&d.join("phase1"));
    assert!(first.iter().all(|s| s["resolution"] == serde_json::json!([64, 64])));
    assert!(d.join("phase2/final/unet/diffusion_pytorch_model.safetensors").is_file());
    let preview = image::open(d.join("phase2/samples/step-4.png")).unwrap();
    assert_eq!((preview.width(), preview.height()), (2 * 128, 128), "previews at the new resolution");
}

#[test]
fn the_sd2_topologies_validate_once_their_paths_are_set() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    run_ok(d, &["demo-data", "--out", "shard.parquet", "--n", "8"]);
    let model = fixture("tiny-sd").display().to_string();
    // (topology, workers, processes, the source rows each worker emits per epoch)
    // Phase 2 starts from phase 1's UNet and optimizer: stand-ins for them.
    let phase1 = d.join("phase1/checkpoint-1");
    std::fs::create_dir_all(&phase1).unwrap();
    std::fs::write(phase1.join("state.json"), "{}").unwrap();
    let layouts = [
        ("sd2-base-256/preprocess.toml", "1", "1", "read emits 120 rows"),
        ("sd2-base-256/train.toml", "1", "1", "read emits 128 rows"),
        ("sd2-base-256/online.toml", "2", "1", "read emits 64 rows"),
        ("sd2-base-256/online-8gpu.toml", "8", "1", "read emits 96 rows"),
        ("sd2-base-256/online-multinode.toml", "8", "4", "read emits 96 rows"),
        ("sd2-base-512/preprocess.toml", "1", "1", "read emits 40 rows"),
        ("sd2-base-512/train.toml", "1", "1", "read emits 32 rows"),
        ("sd2-base-512/online.toml", "2", "1", "read emits 16 rows"),
    ];
    for (name, workers, processes, emits) in layouts {
        let file = topo(name);
        let mut args = vec!["validate".to_string(), file.clone()];
        args.extend(["--workers", workers, "--processes", processes].map(String::from));
        for node in ["read", "tokenize", "vae", "text", "train"] {
            let has = std::fs::read_to_string(&file).unwrap().contains(&format!("[nodes.{node}]"));
            if has && node != "read" {
                args.extend(["--set".into(), format!("nodes.{node}.model={model}")]);
            }
        }
        if name.starts_with("sd2-base-512") && !name.ends_with("preprocess.toml") {
            args.extend(["--set".into(), format!("nodes.train.path={model}/unet")]);
            args.extend(["--set".into(), format!("nodes.train.optimizer_from={}", phase1.display())]);
        }
        if !name.ends_with("/train.toml") {
            args.extend(["--set".into(), "nodes.read.path=shard.parquet".into()]);
        }
        if !cfg!(feature = "cuda") {
            // A build without CUDA refuses the topology's GPUs at validation, naming them.
            let out = latentflow(BIN, d, &args.iter().map(String::as_str).collect::<Vec<_>>());
            let stderr = String::from_utf8_lossy(&out.stderr);
            assert_eq!(out.status.code(), Some(2), "{name}: {}", text(&out));
            assert!(
                stderr.contains("job.devices") && stderr.contains("`cuda:0`: this latentflow was built without CUDA"),
                "{stderr}"
            );
        }
        // The same topology on CPU devices (one per GPU it names) is valid.
        let gpus = std::fs::read_to_string(&file).unwrap().matches("\"cuda:").count();
        let devices = vec!["\"cpu\""; gpus].join(", ");
        args.extend(["--set".into(), format!("job.devices=[{devices}]")]);
        let out = latentflow(BIN, d, &args.iter().map(String::as_str).collect::<Vec<_>>());
        assert_eq!(out.status.code(), Some(0), "{name}: {}", text(&out));
        assert!(String::from_utf8_lossy(&out.stdout).contains(emits), "{name}: {}", text(&out));
    }
    // Unset, the placeholder data path is named.
    let out = latentflow(BIN, d, &["validate", &topo("sd2-base-256/online.toml")]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert!(String::from_utf8_lossy(&out.stderr).contains("DATA_GLOB"), "{}", text(&out));
}

/// The online job from Rust with a step of one's own: a closure over the source's rows that
/// keeps even keys and rejects the others. Every odd row is rejected (and counted) by the
/// closure, and only even rows train.
#[test]
fn a_closure_of_ones_own_filters_the_online_jobs_rows_and_accounts_for_every_drop() {
    use latentflow_engine::{OpError, RunOptions};
    use latentflow_pipelines::{online, Settings};

    let dir = tempfile::tempdir().unwrap();
    let settings = Settings { images: 96, checkpoint_every: 0, sample_every: 0, ..Settings::default() };
    let mut plan = online::plan_with(&settings, |g, read| {
        g.map("even_keys", [read], |mut batch: Batch, ctx: &mut OpContext| -> Result<Batch, OpError> {
            let keep: Vec<bool> = batch.i64s("key")?.iter().map(|k| k % 2 == 0).collect();
            for row in (0..keep.len()).filter(|&r| !keep[r]) {
                ctx.reject(batch.row_key(row), "odd_key");
            }
            batch.retain_rows(&keep);
            Ok(batch)
        })
    })
    .unwrap();
    plan.job.output_dir = Some(dir.path().join("online"));
    let report = latentflow_engine::run(&plan, &RunOptions::default()).unwrap();
    let filter = report.profile.operators.iter().find(|o| o.id == "even_keys").unwrap();
    assert_eq!(filter.type_name, "rust_map");
    assert_eq!((filter.items_in, filter.items_out, filter.rejected.get("odd_key").copied()), (96, 48, Some(48)));
    // Each epoch of 16 rows keeps 8, and one resolution trains each epoch as its step.
    let steps = metrics(&dir.path().join("online"));
    assert_eq!(steps.iter().map(|s| s["samples"].as_u64().unwrap()).collect::<Vec<_>>(), [8; 6]);
    let train = report.profile.operators.iter().find(|o| o.id == "train").unwrap();
    assert_eq!(train.items_in, 48, "only the kept rows reach the trainer");
}
