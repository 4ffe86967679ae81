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

/// How a file's rows are cut into data pages.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Pages {
    /// The parquet crate's defaults: pages of about 1 MiB, dictionary encoding tried first.
    #[default]
    Default,
    /// Pages of about 64 KiB cut at row boundaries, no dictionaries: for rows of tensors, a row
    /// (an SD2 text embedding is 315 kB) takes a page or more of its own, so a reader that wants
    /// some of a row group's rows skips the others' pages through the page index instead of
    /// decompressing and decoding them.
    RowSized,
}

/// The bytes after which a [`Pages::RowSized`] page ends.
const ROW_SIZED_PAGE_BYTES: usize = 64 << 10;

/// A parquet file being written.
pub struct AtomicParquetWriter {
    path: PathBuf,
    temp: PathBuf,
    writer: ArrowWriter<File>,
}

impl AtomicParquetWriter {
    /// Starts `path` with `schema`, snappy compression and these key-value metadata entries.
    pub fn create(path: &Path, schema: SchemaRef, metadata: &[(&str, String)]) -> Result<Self, String> {
        Self::create_with_pages(path, schema, metadata, Pages::Default)
    }

    /// [`create`](Self::create) with rows cut into pages as `pages` says.
    pub fn create_with_pages(
        path: &Path,
        schema: SchemaRef,
        metadata: &[(&str, String)],
        pages: Pages,
    ) -> Result<Self, String> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        }
        let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        let temp = path.with_file_name(format!(".{name}.tmp"));
        let file = File::create(&temp).map_err(|e| format!("{}: {e}", temp.display()))?;
        let kv = metadata.iter().map(|(k, v)| KeyValue::new(k.to_string(), v.clone())).collect();
        let mut props =
            WriterProperties::builder().set_compression(Compression::SNAPPY).set_key_value_metadata(Some(kv));
        if pages == Pages::RowSized {
            // The writer checks a page's size after each batch of `write_batch_size` values (a
            // list's batch runs on to the end of its row): one value keeps pages near the limit
            // for byte columns too, whose rows are one value each.
            props = props
                .set_data_page_size_limit(ROW_SIZED_PAGE_BYTES)
                .set_write_batch_size(1)
                .set_dictionary_enabled(false);
        }
        let props = props.build();
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
