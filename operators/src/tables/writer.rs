//! Writing parquet files atomically: rows go to a hidden temporary file (`.NAME.tmp`) that is
//! fsynced and renamed into place once complete, so a crash never leaves a half file under the
//! final name.

use std::fs::File;
use std::path::{Path, PathBuf};

use arrow_array::RecordBatch;
use arrow_schema::SchemaRef;
use parquet::arrow::ArrowWriter;
use parquet::basic::Compression;
use parquet::file::metadata::KeyValue;
use parquet::file::properties::WriterProperties;

/// A parquet file being written.
pub struct AtomicParquetWriter {
    path: PathBuf,
    temp: PathBuf,
    writer: ArrowWriter<File>,
}

impl AtomicParquetWriter {
    /// Starts `path` with `schema`, snappy compression and these key-value metadata entries.
    pub fn create(path: &Path, schema: SchemaRef, metadata: &[(&str, String)]) -> Result<Self, String> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        }
        let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        let temp = path.with_file_name(format!(".{name}.tmp"));
        let file = File::create(&temp).map_err(|e| format!("{}: {e}", temp.display()))?;
        let kv = metadata.iter().map(|(k, v)| KeyValue::new(k.to_string(), v.clone())).collect();
        let props =
            WriterProperties::builder().set_compression(Compression::SNAPPY).set_key_value_metadata(Some(kv)).build();
        let writer = ArrowWriter::try_new(file, schema, Some(props)).map_err(|e| format!("{}: {e}", temp.display()))?;
        Ok(AtomicParquetWriter { path: path.to_path_buf(), temp, writer })
    }

    /// Appends `batch` as (part of) the current row group.
    pub fn write(&mut self, batch: &RecordBatch) -> Result<(), String> {
        self.writer.write(batch).map_err(|e| format!("{}: {e}", self.temp.display()))
    }

    /// Ends the current row group.
    pub fn end_row_group(&mut self) -> Result<(), String> {
        self.writer.flush().map_err(|e| format!("{}: {e}", self.temp.display()))
    }

    /// Finishes the file, flushes it to disk and moves it to its final name.
    pub fn finish(self) -> Result<PathBuf, String> {
        let file = self.writer.into_inner().map_err(|e| format!("{}: {e}", self.temp.display()))?;
        file.sync_all().map_err(|e| format!("{}: {e}", self.temp.display()))?;
        crate::durable::rename(&self.temp, &self.path).map_err(|e| format!("{}: {e}", self.path.display()))?;
        Ok(self.path)
    }
}
