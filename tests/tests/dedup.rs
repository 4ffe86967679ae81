//! `dedup` over several workers and processes: 100 rows of which 20 repeat an earlier image
//! leave 80 rows, the first of each image, and the profile counts 20 `duplicate` rejections.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;

use arrow_array::{ArrayRef, BinaryArray, Float64Array, Int64Array, RecordBatch, StringArray};
use latentflow_operators::demo::{demo_image, img2dataset_schema};
use latentflow_operators::tables::AtomicParquetWriter;
use latentflow_tests::{free_port, text};

const BIN: &str = env!("CARGO_BIN_EXE_lf");

const TOPOLOGY: &str = r#"
[job]
name = "dedup"
output_dir = "out"
connect_timeout_s = 30

[nodes.read]
type = "parquet_source"
path = "rows.parquet"
batch_size = 10

[nodes.unique]
type = "dedup"
inputs = ["read"]

[nodes.rows]
type = "jsonl_sink"
inputs = ["unique"]
columns = ["key", "caption"]
"#;

/// Rows `0..100` in row groups of 10; row `k >= 80` has the image of row `k - 60`. With 4
/// workers in 2 processes, row groups 8 and 9 go to process 0, and 2 and 3 to process 1.
fn rows_with_duplicates(path: &Path) {
    let schema = img2dataset_schema();
    let mut writer = AtomicParquetWriter::create(path, Arc::clone(&schema), &[]).unwrap();
    for start in (0..100i64).step_by(10) {
        let keys: Vec<i64> = (start..start + 10).collect();
        let images: Vec<Vec<u8>> =
            keys.iter().map(|&k| demo_image(0, if k >= 80 { k - 60 } else { k } as u64, 90).jpeg).collect();
        let columns: Vec<ArrayRef> = vec![
            Arc::new(Int64Array::from(keys.clone())),
            Arc::new(StringArray::from_iter_values(keys.iter().map(|k| format!("caption {k}")))),
            Arc::new(Float64Array::from_iter_values(keys.iter().map(|_| 64.0))),
            Arc::new(Float64Array::from_iter_values(keys.iter().map(|_| 64.0))),
            Arc::new(BinaryArray::from_iter_values(images.iter())),
        ];
        writer.write(&RecordBatch::try_new(Arc::clone(&schema), columns).unwrap()).unwrap();
        writer.end_row_group().unwrap();
    }
    writer.finish().unwrap();
}

fn setup() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    rows_with_duplicates(&dir.path().join("rows.parquet"));
    std::fs::write(dir.path().join("dedup.toml"), TOPOLOGY).unwrap();
    dir
}

/// Keys written by every sink worker, with how often each came.
fn written(dir: &Path) -> BTreeMap<i64, usize> {
    let mut seen = BTreeMap::new();
    for entry in std::fs::read_dir(dir.join("out/rows")).unwrap() {
        for line in std::fs::read_to_string(entry.unwrap().path()).unwrap().lines() {
            let row: serde_json::Value = serde_json::from_str(line).unwrap();
            *seen.entry(row["key"].as_i64().unwrap()).or_default() += 1;
        }
    }
    seen
}

fn duplicates_in(profile: &Path) -> u64 {
    let profile: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(profile).unwrap()).unwrap();
    let unique = profile["operators"].as_array().unwrap().iter().find(|o| o["id"] == "unique").unwrap();
    unique["rejected"]["duplicate"].as_u64().unwrap_or(0)
}

fn check_first_of_each_image_kept(dir: &Path) {
    let seen = written(dir);
    assert_eq!(seen.keys().copied().collect::<Vec<_>>(), (0..80).collect::<Vec<_>>(), "the first of each image");
    assert!(seen.values().all(|n| *n == 1));
}

#[test]
fn two_workers_keep_the_first_of_each_image() {
    let dir = setup();
    let out = Command::new(BIN)
        .args(["run", "dedup.toml", "--workers", "2", "--profile", "profile.json"])
        .current_dir(dir.path())
        .env("RUST_LOG", "warn")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    check_first_of_each_image_kept(dir.path());
    assert_eq!(duplicates_in(&dir.path().join("profile.json")), 20);
}

fn process(dir: &Path, id: usize) -> Child {
    let id = id.to_string();
    Command::new(BIN)
        .args(["run", "dedup.toml", "--workers", "2", "--processes", "2", "--process-id", &id, "--hostfile", "hosts"])
        .args(["--profile", "profile.json"])
        .current_dir(dir)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

#[test]
fn two_processes_drop_duplicates_that_live_in_the_other_process() {
    let dir = setup();
    let hosts = format!("127.0.0.1:{}\n127.0.0.1:{}\n", free_port(), free_port());
    std::fs::write(dir.path().join("hosts"), hosts).unwrap();
    let children = [process(dir.path(), 0), process(dir.path(), 1)];
    for child in children {
        let out = child.wait_with_output().unwrap();
        assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    }
    check_first_of_each_image_kept(dir.path());
    let duplicates: u64 = (0..2).map(|p| duplicates_in(&dir.path().join(format!("profile.p{p}.json")))).sum();
    assert_eq!(duplicates, 20);
}

#[test]
fn img2dataset_sha256_column_identifies_duplicates_when_asked() {
    // Rows 0..10 with a `sha256` column where rows 5..10 repeat the hashes of 0..5 (their images
    // differ, so only the column can tell).
    let dir = tempfile::tempdir().unwrap();
    let schema = Arc::new(arrow_schema::Schema::new(vec![
        arrow_schema::Field::new("hash", arrow_schema::DataType::Int64, false),
        arrow_schema::Field::new("caption", arrow_schema::DataType::Utf8, false),
        arrow_schema::Field::new("jpg", arrow_schema::DataType::Binary, false),
        arrow_schema::Field::new("sha256", arrow_schema::DataType::Utf8, false),
    ]));
    let keys: Vec<i64> = (0..10).collect();
    let hashes: Vec<String> = keys.iter().map(|k| format!("{:064x}", k % 5)).collect();
    let images: Vec<Vec<u8>> = keys.iter().map(|&k| demo_image(0, k as u64, 90).jpeg).collect();
    let mut writer = AtomicParquetWriter::create(&dir.path().join("rows.parquet"), Arc::clone(&schema), &[]).unwrap();
    let columns: Vec<ArrayRef> = vec![
        Arc::new(Int64Array::from(keys.clone())),
        Arc::new(StringArray::from_iter_values(keys.iter().map(|k| format!("caption {k}")))),
        Arc::new(BinaryArray::from_iter_values(images.iter())),
        Arc::new(StringArray::from_iter_values(hashes.iter())),
    ];
    writer.write(&RecordBatch::try_new(schema, columns).unwrap()).unwrap();
    writer.finish().unwrap();
    let topology = TOPOLOGY
        .replace("batch_size = 10", "batch_size = 5\nextra_columns = [\"sha256\"]")
        .replace("inputs = [\"read\"]", "inputs = [\"read\"]\nby = \"sha256\"");
    std::fs::write(dir.path().join("dedup.toml"), topology).unwrap();
    let out = Command::new(BIN)
        .args(["run", "dedup.toml", "--profile", "profile.json"])
        .current_dir(dir.path())
        .env("RUST_LOG", "warn")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    assert_eq!(written(dir.path()).into_keys().collect::<Vec<_>>(), (0..5).collect::<Vec<_>>());
    assert_eq!(duplicates_in(&dir.path().join("profile.json")), 5);
}
