//! Web-scale inputs, on one worker: `url_source` downloading ~50 kB images from a server on
//! loopback (64 and 256 requests in flight, with the process's peak resident memory after
//! each), and `webdataset_source` reading shards from disk and over loopback HTTP against
//! `parquet_source` on the same rows. The server runs in this process, on the same cores.
//!
//! `cargo bench -p latentflow-bench --bench web_inputs`; results in `bench/results/`.

use std::sync::Arc;
use std::time::Instant;

use arrow_array::{ArrayRef, RecordBatch, StringArray};
use arrow_schema::{DataType, Field, Schema};
use latentflow_bench::peak_rss_bytes;
use latentflow_engine::{InstanceContext, JobConfig, NodeSpec, OpContext, OperatorImpl, Source, WorkerInfo};
use latentflow_operators::demo::{demo_image, write_demo_parquet};
use latentflow_operators::tables::AtomicParquetWriter;
use latentflow_operators::webdataset::write;
use latentflow_operators::{ParquetSourceConfig, UrlSourceConfig, WebdatasetSourceConfig};
use latentflow_tests::http_server::{Reply, Request, TestServer};

const DOWNLOADS: usize = 20_000;
const ROWS: u64 = 2000;

fn instantiate(spec: &dyn NodeSpec) -> Box<dyn Source> {
    let job = JobConfig::default();
    let ctx = InstanceContext { node: "bench", job: &job, worker: WorkerInfo::single(), batch_size: None };
    match spec.instantiate(&ctx).expect("instantiate") {
        OperatorImpl::Source(s) => s,
        _ => unreachable!("a source"),
    }
}

/// Reads every batch; returns (rows, image bytes, seconds).
fn drain(mut source: Box<dyn Source>) -> (u64, u64, f64) {
    let mut ctx = OpContext::detached("bench");
    let began = Instant::now();
    source.start(&mut ctx).expect("start");
    let (mut rows, mut bytes) = (0u64, 0u64);
    while let Some(batch) = source.next_batch(&mut ctx).expect("batch") {
        rows += batch.rows() as u64;
        bytes += batch.bytes("image").expect("images").iter().map(|b| b.len() as u64).sum::<u64>();
    }
    let rejected = ctx.take_rejections();
    assert!(rejected.is_empty(), "{} rejections, first {:?}", rejected.len(), rejected.first());
    (rows, bytes, began.elapsed().as_secs_f64())
}

/// A JPEG of about 50 kB.
fn fifty_kb_jpeg() -> Vec<u8> {
    (0..200).map(|k| demo_image(7, k, 95).jpeg).min_by_key(|j| j.len().abs_diff(50_000)).expect("images")
}

fn url_source(dir: &std::path::Path) {
    let image = Arc::new(fifty_kb_jpeg());
    let body = Arc::clone(&image);
    let server = TestServer::start(move |_: &Request| Reply::ok(body.to_vec()));
    let schema = Arc::new(Schema::new(vec![
        Field::new("url", DataType::Utf8, false),
        Field::new("caption", DataType::Utf8, false),
    ]));
    let path = dir.join("urls.parquet");
    let mut writer = AtomicParquetWriter::create(&path, Arc::clone(&schema), &[]).unwrap();
    let urls: Vec<String> = (0..DOWNLOADS).map(|k| server.url(&format!("/img/{k}"))).collect();
    let columns: Vec<ArrayRef> = vec![
        Arc::new(StringArray::from_iter_values(urls.iter())),
        Arc::new(StringArray::from_iter_values((0..DOWNLOADS).map(|k| format!("caption {k}")))),
    ];
    writer.write(&RecordBatch::try_new(schema, columns).unwrap()).unwrap();
    writer.finish().unwrap();
    // 64 twice: the first run also opens the connections.
    for concurrency in [64, 64, 256] {
        let config: UrlSourceConfig = serde_json::from_value(serde_json::json!({
            "path": path.display().to_string(), "batch_size": 64, "concurrency": concurrency,
        }))
        .unwrap();
        let (rows, bytes, seconds) = drain(instantiate(&config));
        println!(
            "url_source, 1 worker, {concurrency} in flight: {rows} images of {} kB in {seconds:.2} s = {:.0} images/s, {:.1} MB/s; peak RSS so far {:.0} MB",
            image.len() / 1000,
            rows as f64 / seconds,
            bytes as f64 / seconds / 1e6,
            peak_rss_bytes().unwrap_or(0) as f64 / 1e6
        );
    }
}

fn shards_and_parquet(dir: &std::path::Path) {
    let parquet = dir.join("rows.parquet");
    write_demo_parquet(&parquet, ROWS, 3, 2).unwrap();
    let images: Vec<_> = (0..ROWS).map(|k| demo_image(3, k, 90)).collect();
    let shards = dir.join("shards");
    std::fs::create_dir_all(&shards).unwrap();
    let mut tars = Vec::new();
    for (s, chunk) in images.chunks(ROWS as usize / 4).enumerate() {
        let members: Vec<(String, Vec<u8>)> = chunk
            .iter()
            .enumerate()
            .flat_map(|(i, image)| {
                let k = s * chunk.len() + i;
                [
                    (format!("{k:09}.jpg"), image.jpeg.clone()),
                    (format!("{k:09}.txt"), image.caption.clone().into_bytes()),
                ]
            })
            .collect();
        let refs: Vec<(&str, &[u8])> = members.iter().map(|(n, d)| (n.as_str(), d.as_slice())).collect();
        let tar = write::tar(&refs);
        std::fs::write(shards.join(format!("{s:05}.tar")), &tar).unwrap();
        tars.push(tar);
    }
    let tars = Arc::new(tars);
    let served = Arc::clone(&tars);
    let server = TestServer::start(move |request: &Request| {
        let index = request.path.trim_start_matches("/s/").trim_end_matches(".tar").parse::<usize>().ok();
        match index.and_then(|i| served.get(i)) {
            Some(tar) => Reply::ranged(tar, request.headers.get("range").map(String::as_str)),
            None => Reply::status(404),
        }
    });
    let report = |name: &str, (rows, bytes, seconds): (u64, u64, f64)| {
        println!(
            "{name}: {rows} rows in {seconds:.3} s = {:.0} rows/s, {:.0} MB/s of images",
            rows as f64 / seconds,
            bytes as f64 / seconds / 1e6
        );
    };
    let parquet: ParquetSourceConfig =
        serde_json::from_value(serde_json::json!({"path": parquet.display().to_string(), "batch_size": 64})).unwrap();
    report("parquet_source, local", drain(instantiate(&parquet)));
    let local: WebdatasetSourceConfig =
        serde_json::from_value(serde_json::json!({"path": shards.display().to_string(), "batch_size": 64})).unwrap();
    report("webdataset_source, local", drain(instantiate(&local)));
    let http: WebdatasetSourceConfig =
        serde_json::from_value(serde_json::json!({"path": server.url("/s/{00000..00003}.tar"), "batch_size": 64}))
            .unwrap();
    report("webdataset_source, loopback HTTP", drain(instantiate(&http)));
}

fn main() {
    // `cargo bench` passes `--bench`; nothing to parse.
    let dir = tempfile::tempdir().unwrap();
    // Downloads first, so the peak memory they report is theirs.
    url_source(dir.path());
    shards_and_parquet(dir.path());
}
