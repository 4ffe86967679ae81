//! `latentflow demo-data`: demo rows written as parquet in the img2dataset layout (`hash`
//! int64, `caption` string, `width` / `height` float64, `jpg` binary).

use std::path::Path;
use std::sync::Arc;

use arrow_array::{BinaryArray, Float64Array, Int64Array, RecordBatch, StringArray};
use arrow_schema::{DataType, Field, Schema};

use super::demo_image;
use crate::tables::AtomicParquetWriter;

/// Rows per row group in demo files.
pub const ROWS_PER_GROUP: u64 = 128;

/// The img2dataset schema.
pub fn img2dataset_schema() -> Arc<Schema> {
    Arc::new(Schema::new(vec![
        Field::new("hash", DataType::Int64, false),
        Field::new("caption", DataType::Utf8, true),
        Field::new("width", DataType::Float64, true),
        Field::new("height", DataType::Float64, true),
        Field::new("jpg", DataType::Binary, true),
    ]))
}

/// Writes `n` demo rows (keys `0..n` of `seed`) to `path`, generating on `threads` threads.
pub fn write_demo_parquet(path: &Path, n: u64, seed: u64, threads: usize) -> Result<(), String> {
    let schema = img2dataset_schema();
    let mut writer =
        AtomicParquetWriter::create(path, Arc::clone(&schema), &[("latentflow.demo_seed", seed.to_string())])?;
    let mut start = 0;
    while start < n {
        let end = (start + ROWS_PER_GROUP).min(n);
        let keys: Vec<u64> = (start..end).collect();
        let chunk = keys.len().div_ceil(threads.max(1));
        let rows: Vec<_> = std::thread::scope(|scope| {
            let handles: Vec<_> = keys
                .chunks(chunk.max(1))
                .map(|part| scope.spawn(move || part.iter().map(|&k| demo_image(seed, k, 90)).collect::<Vec<_>>()))
                .collect();
            handles.into_iter().flat_map(|h| h.join().expect("demo generation thread")).collect()
        });
        let batch = RecordBatch::try_new(
            Arc::clone(&schema),
            vec![
                Arc::new(Int64Array::from_iter_values(keys.iter().map(|&k| k as i64))),
                Arc::new(StringArray::from_iter_values(rows.iter().map(|r| r.caption.as_str()))),
                Arc::new(Float64Array::from_iter_values(rows.iter().map(|r| f64::from(r.width)))),
                Arc::new(Float64Array::from_iter_values(rows.iter().map(|r| f64::from(r.height)))),
                Arc::new(BinaryArray::from_iter_values(rows.iter().map(|r| r.jpeg.as_slice()))),
            ],
        )
        .map_err(|e| e.to_string())?;
        writer.write(&batch)?;
        writer.end_row_group()?;
        start = end;
    }
    writer.finish().map(|_| ())
}
