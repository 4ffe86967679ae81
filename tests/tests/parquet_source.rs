//! `parquet_source`: both file layouts, sharding by row group, filters with counted
//! rejections, schema errors at validation, the windowed shuffle and exact resume.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

use arrow_array::{ArrayRef, BinaryArray, Float64Array, Int64Array, RecordBatch, StringArray, StructArray};
use arrow_schema::{DataType, Field, Fields, Schema};
use latentflow_engine::{
    run, InstanceContext, JobConfig, OpContext, OperatorImpl, Plan, RunOptions, Source, WorkerInfo,
};
use latentflow_operators::demo::write_demo_parquet;
use latentflow_operators::tables::AtomicParquetWriter;
use latentflow_tests::testops::{catalog, probe};

/// A file in the img2dataset layout with `rows` rows in groups of `group`: tiny fake images
/// (the source does not decode), widths `100 + key`, `punsafe` = key / rows.
fn laion_file(path: &Path, rows: i64, group: i64, first_key: i64) {
    let schema = Arc::new(Schema::new(vec![
        Field::new("hash", DataType::Int64, false),
        Field::new("caption", DataType::Utf8, true),
        Field::new("width", DataType::Float64, true),
        Field::new("height", DataType::Float64, true),
        Field::new("punsafe", DataType::Float64, true),
        Field::new("jpg", DataType::Binary, true),
    ]));
    let mut writer = AtomicParquetWriter::create(path, Arc::clone(&schema), &[]).unwrap();
    for start in (0..rows).step_by(group as usize) {
        let keys: Vec<i64> = (start..(start + group).min(rows)).map(|k| first_key + k).collect();
        let columns: Vec<ArrayRef> = vec![
            Arc::new(Int64Array::from(keys.clone())),
            Arc::new(StringArray::from_iter(keys.iter().map(|k| (k % 10 != 3).then(|| format!("caption {k}"))))),
            Arc::new(Float64Array::from_iter_values(keys.iter().map(|&k| 100.0 + k as f64))),
            Arc::new(Float64Array::from_iter_values(keys.iter().map(|_| 300.0))),
            Arc::new(Float64Array::from_iter_values(keys.iter().map(|&k| k as f64 / rows as f64))),
            Arc::new(BinaryArray::from_iter(
                keys.iter().map(|k| (k % 7 != 5).then(|| format!("image {k}").into_bytes())),
            )),
        ];
        writer.write(&RecordBatch::try_new(Arc::clone(&schema), columns).unwrap()).unwrap();
        writer.end_row_group().unwrap();
    }
    writer.finish().unwrap();
}

fn topology(path: &str, extra: &str, probe_name: &str) -> String {
    format!(
        "[nodes.read]\ntype = \"parquet_source\"\npath = \"{path}\"\nbatch_size = 8\n{extra}\n\
         [nodes.sink]\ntype = \"probe_sink\"\ninputs = [\"read\"]\nprobe = \"{probe_name}\"\n"
    )
}

fn keys_seen(probe_name: &str) -> BTreeMap<i64, usize> {
    let mut seen = BTreeMap::new();
    for keys in probe(probe_name).keys.lock().unwrap().values() {
        for &k in keys {
            *seen.entry(k).or_default() += 1;
        }
    }
    seen
}

#[test]
fn row_groups_of_several_files_are_split_across_workers_exactly_once() {
    let dir = tempfile::tempdir().unwrap();
    laion_file(&dir.path().join("a.parquet"), 50, 10, 0);
    laion_file(&dir.path().join("b.parquet"), 30, 10, 1000);
    let glob = format!("{}/*.parquet", dir.path().display());
    let plan = Plan::from_toml("t.toml", &topology(&glob, "", "pq-split"), &[], &catalog()).unwrap();
    let report = run(&plan, &RunOptions { workers: 3, ..RunOptions::default() }).unwrap();
    let seen = keys_seen("pq-split");
    // Rows with a null image are rejected; all others arrive once, from all three workers.
    let expected: Vec<i64> = (0..50).chain(1000..1030).filter(|k| k % 7 != 5).collect();
    assert_eq!(seen.keys().copied().collect::<Vec<_>>(), expected);
    assert!(seen.values().all(|&n| n == 1));
    let read = report.profile.operator("read").unwrap();
    assert_eq!(read.items_out + read.rejected["empty_image"], 80, "every row is output or rejected");
    assert_eq!(probe("pq-split").keys.lock().unwrap().len(), 3, "8 row groups over 3 workers");
}

#[test]
fn filters_reject_rows_with_a_reason_per_filter() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("f.parquet");
    laion_file(&file, 100, 25, 0);
    let extra = "min_width = 120\n[[nodes.read.filter]]\ncolumn = \"punsafe\"\nmax = 0.5\n";
    let plan =
        Plan::from_toml("t.toml", &topology(file.to_str().unwrap(), extra, "pq-filter"), &[], &catalog()).unwrap();
    let report = run(&plan, &RunOptions::default()).unwrap();
    let read = report.profile.operator("read").unwrap();
    let empty = (0..100).filter(|k| k % 7 == 5).count() as u64;
    let narrow = (0..20).filter(|k| k % 7 != 5).count() as u64; // width 100..119
    let unsafe_ = (51..100).filter(|k| k % 7 != 5).count() as u64; // punsafe > 0.5
    assert_eq!(read.rejected.get("empty_image"), Some(&empty));
    assert_eq!(read.rejected.get("min_width"), Some(&narrow));
    assert_eq!(read.rejected.get("filter:punsafe"), Some(&unsafe_));
    assert_eq!(read.items_out + empty + narrow + unsafe_, 100);
}

#[test]
fn hugging_face_layout_reads_without_conversion() {
    // `image` is a struct {bytes, path}, the caption is `text`, there is no key column.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("hf.parquet");
    let image_fields =
        Fields::from(vec![Field::new("bytes", DataType::Binary, true), Field::new("path", DataType::Utf8, true)]);
    let schema = Arc::new(Schema::new(vec![
        Field::new("image", DataType::Struct(image_fields.clone()), true),
        Field::new("text", DataType::Utf8, true),
    ]));
    let bytes: ArrayRef = Arc::new(BinaryArray::from(vec![Some(&b"one"[..]), Some(&b"two"[..]), None]));
    let paths: ArrayRef = Arc::new(StringArray::from(vec!["1.jpg", "2.jpg", "3.jpg"]));
    let images = StructArray::new(image_fields, vec![bytes, paths], None);
    let text = StringArray::from(vec!["a", "b", "c"]);
    let mut writer = AtomicParquetWriter::create(&path, Arc::clone(&schema), &[]).unwrap();
    writer.write(&RecordBatch::try_new(schema, vec![Arc::new(images), Arc::new(text)]).unwrap()).unwrap();
    writer.finish().unwrap();
    let config = format!("path = \"{}\"\nimage_column = \"image\"\ncaption_column = \"text\"", path.display());
    let mut source = instantiate(&config);
    let mut ctx = OpContext::detached("read");
    let batch = source.next_batch(&mut ctx).unwrap().unwrap();
    assert_eq!(batch.strs("caption").unwrap(), &["a".to_string(), "b".to_string()]);
    assert_eq!(batch.bytes("image").unwrap()[1].as_ref(), b"two");
    assert_eq!(batch.i64s("key").unwrap(), &[0, 1], "rows numbered within the file");
    assert_eq!(ctx.take_rejections()[0].reason, "empty_image");
}

fn instantiate(config: &str) -> Box<dyn Source> {
    let entry = catalog().get("parquet_source").unwrap().clone();
    let spec = entry.parse(config.parse().unwrap()).unwrap();
    assert!(spec.validate().is_empty(), "{:?}", spec.validate());
    let job = JobConfig { seed: 9, ..JobConfig::default() };
    match spec
        .instantiate(&InstanceContext { node: "read", job: &job, worker: WorkerInfo::single(), batch_size: None })
        .unwrap()
    {
        OperatorImpl::Source(s) => s,
        _ => panic!("a source"),
    }
}

#[test]
fn wrong_schemas_fail_validation_naming_the_column_and_the_columns_found() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("x.parquet");
    laion_file(&file, 5, 5, 0);
    let text = topology(file.to_str().unwrap(), "image_column = \"image\"\ncaption_column = \"text\"", "unused");
    let err = Plan::from_toml("t.toml", &text, &[], &catalog()).unwrap_err().to_string();
    assert!(
        err.contains("node `read`, key `image_column`: ")
            && err.contains("x.parquet: no image column `image`; the file has: hash (Int64), caption (Utf8), width (Float64), height (Float64), punsafe (Float64), jpg (Binary)"),
        "{err}"
    );
    std::fs::write(dir.path().join("bad.parquet"), b"not parquet at all").unwrap();
    let text = topology(dir.path().join("bad.parquet").to_str().unwrap(), "", "unused");
    let err = Plan::from_toml("t.toml", &text, &[], &catalog()).unwrap_err().to_string();
    assert!(err.contains("bad.parquet: not a readable parquet file"), "{err}");
    let text = topology(dir.path().join("none/*.parquet").to_str().unwrap(), "", "unused");
    assert!(Plan::from_toml("t.toml", &text, &[], &catalog())
        .unwrap_err()
        .to_string()
        .contains("no parquet files match"));
}

fn drain(source: &mut dyn Source, batches: Option<usize>) -> Vec<i64> {
    let mut ctx = OpContext::detached("read");
    let mut keys = Vec::new();
    let mut n = 0;
    while batches.is_none_or(|b| n < b) {
        let Some(batch) = source.next_batch(&mut ctx).unwrap() else { break };
        keys.extend_from_slice(batch.i64s("key").unwrap());
        n += 1;
    }
    keys
}

#[test]
fn shuffled_reads_are_deterministic_and_resume_exactly() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("s.parquet");
    laion_file(&file, 100, 16, 0);
    for shuffle in [0, 24] {
        let config = format!("path = \"{}\"\nbatch_size = 8\nshuffle_buffer = {shuffle}", file.display());
        let full = drain(&mut *instantiate(&config), None);
        let mut sorted = full.clone();
        sorted.sort_unstable();
        assert_eq!(sorted, (0..100).filter(|k| k % 7 != 5).collect::<Vec<_>>());
        assert_eq!(full == sorted, shuffle == 0, "shuffle {shuffle} changes the order");
        assert_eq!(full, drain(&mut *instantiate(&config), None), "same seed, same order");
        // Stop after 5 batches, resume a fresh source from the position: the rest is identical.
        let mut first = instantiate(&config);
        let head = drain(&mut *first, Some(5));
        let position = first.position();
        let mut resumed = instantiate(&config);
        resumed.seek(&position).unwrap();
        let tail = drain(&mut *resumed, None);
        assert_eq!([head, tail].concat(), full, "shuffle {shuffle}: resumed at {position}");
    }
}

#[test]
fn demo_data_files_read_back_with_their_captions() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("demo.parquet");
    write_demo_parquet(&file, 20, 4, 2).unwrap();
    let mut source = instantiate(&format!("path = \"{}\"\nbatch_size = 20", file.display()));
    let batch = source.next_batch(&mut OpContext::detached("read")).unwrap().unwrap();
    assert_eq!(batch.i64s("key").unwrap(), (0..20).collect::<Vec<_>>());
    let expected = latentflow_operators::demo::demo_image(4, 7, 90);
    assert_eq!(batch.strs("caption").unwrap()[7], expected.caption);
    assert_eq!(batch.bytes("image").unwrap()[7].as_ref(), expected.jpeg.as_slice());
}

#[test]
fn img2dataset_string_keys_are_their_numbers_and_other_strings_hash() {
    // img2dataset writes `key = "000000123"`; other datasets have keys like "a/b/c".
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("img2dataset.parquet");
    let schema = Arc::new(Schema::new(vec![
        Field::new("key", DataType::Utf8, false),
        Field::new("caption", DataType::Utf8, true),
        Field::new("jpg", DataType::Binary, true),
    ]));
    let keys = StringArray::from(vec!["000000123", "000000007", "laion/part-1/xyz"]);
    let captions = StringArray::from(vec!["a", "b", "c"]);
    let images = BinaryArray::from(vec![&b"one"[..], &b"two"[..], &b"three"[..]]);
    let mut writer = AtomicParquetWriter::create(&path, Arc::clone(&schema), &[]).unwrap();
    let columns: Vec<ArrayRef> = vec![Arc::new(keys), Arc::new(captions), Arc::new(images)];
    writer.write(&RecordBatch::try_new(schema, columns).unwrap()).unwrap();
    writer.finish().unwrap();
    let config = format!("path = \"{}\"\nkey_column = \"key\"", path.display());
    let mut source = instantiate(&config);
    let batch = source.next_batch(&mut OpContext::detached("read")).unwrap().unwrap();
    let hashed = latentflow_operators::keys::hash_key("laion/part-1/xyz");
    assert_eq!(batch.i64s("key").unwrap(), &[123, 7, hashed]);
}
