//! `webdataset_source` over HTTP: shards named with brace notation, served by a test server on
//! 127.0.0.1, streamed into a training job that is stopped mid-shard and resumed: every sample
//! trains once, captions stay with their images, and the resume asks for the rest of the shard
//! with a `Range` request instead of reading it again.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use latentflow_operators::demo::demo_image;
use latentflow_operators::webdataset::write;
use latentflow_tests::http_server::{Reply, Request, TestServer};
use latentflow_tests::{latentflow, stop_run_after_steps, text, trained_keys};

const BIN: &str = env!("CARGO_BIN_EXE_lf");

const SHARDS: u64 = 3;
const PER_SHARD: u64 = 40;

/// Shard `s`: samples `s * 40 ..`, img2dataset-style keys, with a caption naming the key.
fn shard(s: u64) -> Vec<u8> {
    let mut members = Vec::new();
    for k in s * PER_SHARD..(s + 1) * PER_SHARD {
        members.push((format!("{k:09}.jpg"), demo_image(0, k, 90).jpeg));
        members.push((format!("{k:09}.txt"), format!("caption of {k}").into_bytes()));
        members.push((format!("{k:09}.json"), format!("{{\"key\": \"{k:09}\"}}").into_bytes()));
    }
    let refs: Vec<(&str, &[u8])> = members.iter().map(|(n, d)| (n.as_str(), d.as_slice())).collect();
    write::tar(&refs)
}

const TRAIN_ON_SHARDS: &str = r#"
[job]
name = "wds"
max_epochs_in_flight = 2

[nodes.read]
type = "webdataset_source"
path = "URL/{00000..00002}.tar"

[nodes.transform]
type = "image_transform"
inputs = ["read"]
resolution = 32

[nodes.tokenize]
type = "tokenize"
inputs = ["transform"]

[nodes.vae]
type = "vae_encode"
inputs = ["tokenize"]
preset = "tiny"

[nodes.text]
type = "text_encode"
inputs = ["vae"]
preset = "tiny"

[nodes.train]
type = "train"
inputs = ["text"]
preset = "tiny"
global_batch_size = 8
checkpoint_every = 2
resume = "latest"
log_keys = true
"#;

#[test]
fn shards_over_http_stream_into_training_and_resume_mid_shard() {
    let shards: Vec<Vec<u8>> = (0..SHARDS).map(shard).collect();
    let ranges = Arc::new(Mutex::new(Vec::new()));
    let seen_ranges = Arc::clone(&ranges);
    let server = TestServer::start(move |request: &Request| {
        let index = request.path.strip_prefix("/shards/").and_then(|p| p.strip_suffix(".tar"));
        match index.and_then(|i| i.parse::<usize>().ok()).and_then(|i| shards.get(i)) {
            Some(bytes) => {
                let range = request.headers.get("range").cloned();
                if let Some(range) = &range {
                    seen_ranges.lock().unwrap().push((request.path.clone(), range.clone()));
                }
                // Slowly, so the stop comes mid-shard.
                Reply::After(Duration::from_millis(5), Box::new(Reply::ranged(bytes, range.as_deref())))
            }
            None => Reply::status(404),
        }
    });
    let dir = tempfile::tempdir().unwrap();
    let topology = TRAIN_ON_SHARDS.replace("URL", &server.url("/shards"));
    std::fs::write(dir.path().join("job.toml"), topology).unwrap();
    let metrics = dir.path().join("runs/wds/metrics.jsonl");

    // Stop in the second shard: past step 6 of 15 (40 samples a shard, 8 a step).
    let out = stop_run_after_steps(BIN, dir.path(), &metrics, 7, "-TERM");
    assert_eq!(out.status.code(), Some(130), "{}", text(&out));
    let steps_first = trained_keys(&metrics).values().sum::<usize>() / 8;
    assert!(steps_first < 15, "the first run stopped early ({steps_first} steps)");

    let out = latentflow(BIN, dir.path(), &["run", "job.toml"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let trained = trained_keys(&metrics);
    let all: Vec<i64> = (0..(SHARDS * PER_SHARD) as i64).collect();
    assert_eq!(trained.keys().copied().collect::<Vec<_>>(), all, "every sample trained");
    assert!(trained.values().all(|n| *n == 1), "no sample trained twice: {trained:?}");
    let ranges = ranges.lock().unwrap().clone();
    assert!(
        ranges.iter().any(|(_, r)| r != "bytes=0-"),
        "the resume continued inside a shard with a Range request: {ranges:?}"
    );
}

#[test]
fn the_shards_example_validates_once_its_path_is_set() {
    let dir = tempfile::tempdir().unwrap();
    for s in 0..2 {
        std::fs::write(dir.path().join(format!("{s:05}.tar")), shard(s)).unwrap();
    }
    let example = latentflow_tests::topology("examples/img2dataset-shards.toml");
    let out = latentflow(BIN, dir.path(), &["validate", example.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(2), "the placeholder path is named: {}", text(&out));
    assert!(String::from_utf8_lossy(&out.stderr).contains("SHARDS"), "{}", text(&out));
    let set = format!("nodes.read.path={}/{{00000..00001}}.tar", dir.path().display());
    let out = latentflow(BIN, dir.path(), &["validate", example.to_str().unwrap(), "--set", &set]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
}
