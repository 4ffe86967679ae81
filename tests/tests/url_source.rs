//! `url_source` against a test HTTP server on 127.0.0.1 that serves images and every failure a
//! web-scale download meets: each row ends as an image or a rejection with the right reason, in
//! bounded time, and a run stopped with SIGTERM resumes without fetching again what it trained.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use arrow_array::{ArrayRef, RecordBatch, StringArray};
use arrow_schema::{DataType, Field, Schema};
use latentflow_engine::{InstanceContext, JobConfig, NodeSpec, OpContext, OperatorImpl, WorkerInfo};
use latentflow_operators::demo::demo_image;
use latentflow_operators::tables::AtomicParquetWriter;
use latentflow_operators::UrlSourceConfig;
use latentflow_tests::http_server::{Reply, Request, TestServer};
use latentflow_tests::{latentflow, stop_run_after_steps, text, trained_keys};

const BIN: &str = env!("CARGO_BIN_EXE_lf");

/// img2dataset-style metadata: `url`, `caption` and a string `key` ("000000007"), in row groups
/// of 16.
fn write_metadata(path: &Path, urls: &[String]) {
    let schema = Arc::new(Schema::new(vec![
        Field::new("url", DataType::Utf8, false),
        Field::new("caption", DataType::Utf8, false),
        Field::new("key", DataType::Utf8, false),
    ]));
    let mut writer = AtomicParquetWriter::create(path, Arc::clone(&schema), &[]).unwrap();
    for start in (0..urls.len()).step_by(16) {
        let rows = start..(start + 16).min(urls.len());
        let columns: Vec<ArrayRef> = vec![
            Arc::new(StringArray::from_iter_values(urls[rows.clone()].iter())),
            Arc::new(StringArray::from_iter_values(rows.clone().map(|k| format!("caption {k}")))),
            Arc::new(StringArray::from_iter_values(rows.map(|k| format!("{k:09}")))),
        ];
        writer.write(&RecordBatch::try_new(Arc::clone(&schema), columns).unwrap()).unwrap();
        writer.end_row_group().unwrap();
    }
    writer.finish().unwrap();
}

/// What each failing path answers; `/img/K` is a demo JPEG.
fn failures_server() -> TestServer {
    let flaky = Arc::new(AtomicUsize::new(0));
    TestServer::start(move |request: &Request| {
        let path = request.path.as_str();
        match path {
            "/404" => Reply::status(404),
            "/410" => Reply::status(410),
            "/500" => Reply::status(500),
            "/503-then-200" => {
                if flaky.fetch_add(1, Ordering::Relaxed) == 0 {
                    Reply::status(503)
                } else {
                    Reply::ok(demo_image(1, 1, 90).jpeg)
                }
            }
            "/slow" => Reply::After(Duration::from_secs(3), Box::new(Reply::ok(demo_image(1, 2, 90).jpeg))),
            "/loop" => Reply::redirect("/loop"),
            "/html" => Reply::Full {
                status: 200,
                headers: vec![("Content-Type".into(), "image/jpeg".into())],
                body: b"<html><body>Not an image</body></html>".to_vec(),
            },
            "/huge" => Reply::Endless { total: 64 << 20 },
            "/noai" => Reply::Full {
                status: 200,
                headers: vec![("X-Robots-Tag".into(), "noai".into())],
                body: demo_image(1, 3, 90).jpeg,
            },
            _ => match path.strip_prefix("/img/").and_then(|k| k.parse::<u64>().ok()) {
                Some(k) => Reply::ok(demo_image(0, k, 90).jpeg),
                None => Reply::status(404),
            },
        }
    })
}

#[test]
fn every_row_ends_as_an_image_or_a_rejection_with_its_reason() {
    let server = failures_server();
    let dir = tempfile::tempdir().unwrap();
    let failing = ["/404", "/410", "/500", "/503-then-200", "/slow", "/loop", "/html", "/huge", "/noai"];
    let mut urls: Vec<String> = (0..30).map(|k| server.url(&format!("/img/{k}"))).collect();
    urls.extend(failing.iter().map(|p| server.url(p)));
    // Nothing listens on port 1 of loopback.
    urls.push("http://127.0.0.1:1/refused".into());
    let metadata = dir.path().join("meta.parquet");
    write_metadata(&metadata, &urls);

    let config: UrlSourceConfig = toml::from_str(&format!(
        "path = {:?}\nbatch_size = 8\nconcurrency = 16\ntimeout_s = 1\nretry_backoff_s = 0.05",
        metadata.display().to_string()
    ))
    .unwrap();
    assert!(config.validate().is_empty(), "{:?}", config.validate());
    let job = JobConfig::default();
    let ctx = InstanceContext { node: "fetch", job: &job, worker: WorkerInfo::single(), batch_size: None };
    let OperatorImpl::Source(mut source) = config.instantiate(&ctx).unwrap() else { panic!("a source") };
    let began = Instant::now();
    let mut ctx = OpContext::detached("fetch");
    source.start(&mut ctx).unwrap();
    let mut keys = Vec::new();
    while let Some(batch) = source.next_batch(&mut ctx).unwrap() {
        keys.extend(batch.i64s("key").unwrap().iter().copied());
        for (image, caption) in batch.bytes("image").unwrap().iter().zip(batch.strs("caption").unwrap()) {
            assert!(image.starts_with(&[0xFF, 0xD8]), "{caption}: a JPEG");
        }
    }
    // Timeouts are retried twice: the slow row takes ~3 s; everything else is quick.
    assert!(began.elapsed() < Duration::from_secs(20), "took {:?}", began.elapsed());
    keys.sort_unstable();
    let mut want: Vec<i64> = (0..30).collect();
    want.push(33); // 503 then 200: retried
    assert_eq!(keys, want, "string keys \"000000007\" are their numbers");

    let rejected: BTreeMap<i64, String> =
        ctx.take_rejections().into_iter().map(|r| (r.key.parse().unwrap(), r.reason)).collect();
    let reasons: BTreeMap<i64, &str> = [
        (30, "http_404"),
        (31, "http_410"),
        (32, "http_5xx"),
        (34, "timeout"),
        (35, "too_many_redirects"),
        (36, "not_an_image"),
        (37, "too_large"),
        (38, "noai"),
        (39, "connect"),
    ]
    .into_iter()
    .collect();
    assert_eq!(rejected.iter().map(|(k, r)| (*k, r.as_str())).collect::<BTreeMap<_, _>>(), reasons);
    let requests = server.requests();
    assert_eq!(requests["/404"], 1, "4xx is never retried");
    assert_eq!(requests["/500"], 3, "5xx is retried twice");
    assert_eq!(requests["/503-then-200"], 2);
    assert_eq!(requests["/slow"], 3, "timeouts are retried twice");
    assert_eq!(requests["/loop"], 6, "the first request and 5 redirects");
    assert_eq!(requests["/huge"], 1);
    let counts = ctx.take_counts();
    let retries: u64 = counts.iter().filter(|(n, _)| n == "http_retries").map(|(_, n)| n).sum();
    assert_eq!(retries, 2 + 1 + 2, "retries are counted");
}

const TRAIN_ON_URLS: &str = r#"
[job]
name = "urls"
max_epochs_in_flight = 2

[nodes.fetch]
type = "url_source"
path = "meta.parquet"
concurrency = 8
timeout_s = 5
reject_log = "rejects.jsonl"

[nodes.transform]
type = "image_transform"
inputs = ["fetch"]
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
checkpoint_every = 4
resume = "latest"
log_keys = true
"#;

#[test]
fn a_stopped_download_job_resumes_without_fetching_what_it_trained() {
    let rows = 160u64;
    // Every 10th row is missing; the rest are images served a little slowly, so the stop comes
    // mid-download.
    let server = TestServer::start(|request: &Request| {
        match request.path.strip_prefix("/img/").and_then(|k| k.parse::<u64>().ok()) {
            Some(k) if k % 10 == 5 => Reply::status(404),
            Some(k) => Reply::After(Duration::from_millis(20), Box::new(Reply::ok(demo_image(0, k, 90).jpeg))),
            None => Reply::status(404),
        }
    });
    let dir = tempfile::tempdir().unwrap();
    let urls: Vec<String> = (0..rows).map(|k| server.url(&format!("/img/{k}"))).collect();
    write_metadata(&dir.path().join("meta.parquet"), &urls);
    std::fs::write(dir.path().join("job.toml"), TRAIN_ON_URLS).unwrap();
    let metrics = dir.path().join("runs/urls/metrics.jsonl");

    let out = stop_run_after_steps(BIN, dir.path(), &metrics, 5, "-TERM");
    assert_eq!(out.status.code(), Some(130), "{}", text(&out));
    let trained_first: Vec<i64> = trained_keys(&metrics).into_keys().collect();
    let fetched_first = server.requests();

    let out = latentflow(BIN, dir.path(), &["run", "job.toml"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let good: Vec<i64> = (0..rows as i64).filter(|k| k % 10 != 5).collect();
    let trained = trained_keys(&metrics);
    assert_eq!(trained.keys().copied().collect::<Vec<_>>(), good, "every good row trained");
    assert!(trained.values().all(|n| *n == 1), "no row trained twice: {trained:?}");
    let fetched = server.requests();
    for key in &trained_first {
        let path = format!("/img/{key}");
        assert_eq!(fetched[&path], fetched_first[&path], "row {key} was trained, then fetched again");
    }
    let log = std::fs::read_to_string(dir.path().join("rejects.jsonl")).unwrap();
    let logged: Vec<i64> = log
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["key"].as_str().unwrap().parse().unwrap())
        .collect();
    let mut sorted = logged.clone();
    sorted.sort_unstable();
    let missing: Vec<i64> = (0..rows as i64).filter(|k| k % 10 == 5).collect();
    assert_eq!(sorted, missing, "every 404 logged once:\n{log}");
}

#[test]
fn the_url_download_example_validates_once_its_path_is_set() {
    let dir = tempfile::tempdir().unwrap();
    // LAION's metadata columns.
    let schema = Arc::new(Schema::new(vec![
        Field::new("URL", DataType::Utf8, false),
        Field::new("TEXT", DataType::Utf8, false),
        Field::new("hash", DataType::Int64, false),
        Field::new("punsafe", DataType::Float64, false),
    ]));
    let mut writer = AtomicParquetWriter::create(&dir.path().join("meta.parquet"), Arc::clone(&schema), &[]).unwrap();
    let columns: Vec<ArrayRef> = vec![
        Arc::new(StringArray::from(vec!["http://127.0.0.1:1/a.jpg"])),
        Arc::new(StringArray::from(vec!["a cat"])),
        Arc::new(arrow_array::Int64Array::from(vec![7])),
        Arc::new(arrow_array::Float64Array::from(vec![0.1])),
    ];
    writer.write(&RecordBatch::try_new(schema, columns).unwrap()).unwrap();
    writer.finish().unwrap();
    let example = latentflow_tests::topology("examples/url-download.toml");
    let out = latentflow(BIN, dir.path(), &["validate", example.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(2), "the placeholder path is named: {}", text(&out));
    assert!(String::from_utf8_lossy(&out.stderr).contains("METADATA"), "{}", text(&out));
    let out =
        latentflow(BIN, dir.path(), &["validate", example.to_str().unwrap(), "--set", "nodes.fetch.path=meta.parquet"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
}
