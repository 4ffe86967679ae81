//! `parquet_source`: image + caption rows from parquet files (img2dataset / LAION or Hugging
//! Face datasets layout), streamed row group by row group, reading only the needed columns.
//! Work is split across workers by (file, row group); an optional shuffle permutes windows of
//! rows with the job seed, so a run can resume at an exact position.

use std::collections::VecDeque;
use std::fs::File;
use std::path::PathBuf;

use bytesize::ByteSize;
use latentflow_engine::{
    Batch, Column, ColumnType, Field, InstanceContext, KeyError, NodeSpec, OpContext, OpError, OperatorConfig,
    OperatorImpl, OperatorKind, Ports, Source,
};
use parquet::arrow::arrow_reader::{ParquetRecordBatchReader, ParquetRecordBatchReaderBuilder};
use parquet::arrow::ProjectionMask;
use serde::{Deserialize, Serialize};
use serde_bytes::ByteBuf;

use crate::keys::KeyHasher;
use crate::rng::Rng;
use crate::source_rows;
use crate::tables::files::{expand, open_metadata, unless_corrupt};
use crate::tables::{extract, resolve, ColumnNames, Resolved};

/// One `[[nodes.ID.filter]]` entry: keep rows whose `column` is within `[min, max]`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FilterSpec {
    /// A numeric column.
    pub column: String,
    /// Smallest kept value.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min: Option<f64>,
    /// Largest kept value.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max: Option<f64>,
}

/// Config of `parquet_source`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ParquetSourceConfig {
    /// A file, a folder (every `.parquet` below it) or a glob.
    pub path: String,
    /// Image bytes column: binary, or a struct `{bytes, path}` (default `jpg`).
    #[serde(default = "default_image_column")]
    pub image_column: String,
    /// Caption column (default `caption`).
    #[serde(default = "default_caption_column")]
    pub caption_column: String,
    /// Key column: integer, or string (all-digit strings are their number, others a stable
    /// 63-bit hash); by default `hash` when the file has it, else rows are numbered.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_column: Option<String>,
    /// Rows per epoch on each worker.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub batch_size: Option<usize>,
    /// Keep rows whose `width` column is at least this.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_width: Option<f64>,
    /// Keep rows whose `height` column is at least this.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_height: Option<f64>,
    /// Range filters on numeric columns.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub filter: Vec<FilterSpec>,
    /// Shuffle windows of this many rows with the job seed (0: file order).
    #[serde(default)]
    pub shuffle_buffer: usize,
    /// A window also ends once its images hold this many bytes (the window is held in memory,
    /// outside the job's byte budget). Default 256 MiB.
    #[serde(default = "default_shuffle_buffer_bytes")]
    pub shuffle_buffer_bytes: ByteSize,
    /// String columns passed through as row columns of the same name (img2dataset's `sha256`,
    /// for `dedup`'s `by`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub extra_columns: Vec<String>,
}

fn default_shuffle_buffer_bytes() -> ByteSize {
    ByteSize::mib(256)
}

fn default_image_column() -> String {
    "jpg".into()
}
fn default_caption_column() -> String {
    "caption".into()
}
impl OperatorConfig for ParquetSourceConfig {
    const TYPE: &'static str = "parquet_source";
    const KIND: OperatorKind = OperatorKind::Source;
    const SUMMARY: &'static str = "image + caption rows from parquet (img2dataset/LAION or Hugging Face layout)";
    const EXAMPLE: &'static str = "path = \"data/*.parquet\"\nimage_column = \"jpg\"\ncaption_column = \"caption\"";
    const KEYS: &'static [(&'static str, &'static str)] = &[
        ("path", "a parquet file, a folder of them (recursive) or a glob"),
        ("image_column", "image bytes column: binary or a struct {bytes, path} (default \"jpg\")"),
        ("caption_column", "caption column (default \"caption\")"),
        ("key_column", "key column: integer, or string (\"000123\" is 123, other strings a stable 63-bit hash; default: \"hash\" if present, else rows are numbered per file)"),
        ("batch_size", "rows per epoch on each worker (default 32; left out in a training job: the trainer's global_batch_size split over the source's workers)"),
        ("min_width", "keep rows whose `width` column is at least this"),
        ("min_height", "keep rows whose `height` column is at least this"),
        ("filter", "[[nodes.ID.filter]] tables: column, min, max (e.g. punsafe, AESTHETIC_SCORE)"),
        ("shuffle_buffer", "shuffle windows of this many rows with the job seed (default 0: file order)"),
        ("shuffle_buffer_bytes", "a window also ends once its images hold this many bytes (default \"256 MiB\")"),
        ("extra_columns", "string columns passed through as row columns, e.g. [\"sha256\"] for dedup's `by` (default none)"),
    ];
}

impl ParquetSourceConfig {
    fn names(&self) -> ColumnNames {
        let mut numeric: Vec<String> = Vec::new();
        if self.min_width.is_some() {
            numeric.push("width".into());
        }
        if self.min_height.is_some() {
            numeric.push("height".into());
        }
        numeric.extend(self.filter.iter().map(|f| f.column.clone()));
        ColumnNames {
            image: self.image_column.clone(),
            image_is_url: false,
            caption: self.caption_column.clone(),
            key: self.key_column.clone(),
            numeric,
            extra: self.extra_columns.clone(),
        }
    }

    /// `(column index in ColumnNames::numeric, min, max, reason)` for every filter.
    fn checks(&self) -> Vec<(usize, f64, f64, String)> {
        let mut checks = Vec::new();
        let mut at = 0;
        if let Some(w) = self.min_width {
            checks.push((at, w, f64::INFINITY, "min_width".to_string()));
            at += 1;
        }
        if let Some(h) = self.min_height {
            checks.push((at, h, f64::INFINITY, "min_height".to_string()));
            at += 1;
        }
        for f in &self.filter {
            checks.push((
                at,
                f.min.unwrap_or(f64::NEG_INFINITY),
                f.max.unwrap_or(f64::INFINITY),
                format!("filter:{}", f.column),
            ));
            at += 1;
        }
        checks
    }
}

impl ParquetSourceConfig {
    /// What [`NodeSpec::validate`] checks, for a metadata reader whose image column holds URLs.
    pub(crate) fn validate_urls(&self) -> Vec<KeyError> {
        self.validate_with(ColumnNames { image_is_url: true, ..self.names() })
    }

    fn validate_with(&self, names: ColumnNames) -> Vec<KeyError> {
        let mut errors: Vec<KeyError> =
            self.batch_size.and_then(|b| KeyError::check_range("batch_size", b, 1, 1_000_000)).into_iter().collect();
        errors.extend(KeyError::check_range("shuffle_buffer", self.shuffle_buffer, 0, 10_000_000));
        errors.extend(KeyError::check_range(
            "shuffle_buffer_bytes",
            self.shuffle_buffer_bytes.as_u64(),
            1 << 10,
            1 << 36,
        ));
        for f in &self.filter {
            if let (Some(lo), Some(hi)) = (f.min, f.max) {
                if lo > hi {
                    errors.push(KeyError::new("filter", format!("`{}`: min {lo} is above max {hi}", f.column)));
                }
            }
        }
        // Check the first file's schema now, so a wrong column fails before anything runs.
        match expand(&self.path, &["parquet"]) {
            Err(message) => errors.push(KeyError::new("path", message)),
            Ok(files) => match open_metadata(&files[0]) {
                Err(message) => errors.push(KeyError::new("path", message)),
                Ok(meta) => {
                    if let Err((key, message)) = resolve(meta.schema(), &names) {
                        errors.push(KeyError::new(key, format!("{}: {message}", files[0].display())));
                    }
                }
            },
        }
        errors
    }
}

impl NodeSpec for ParquetSourceConfig {
    fn validate(&self) -> Vec<KeyError> {
        self.validate_with(self.names())
    }

    fn ports(&self) -> Ports {
        let mut ports = source_rows::ports();
        ports.adds.extend(self.extra_columns.iter().map(|name| Field::new(name, ColumnType::Str)));
        ports
    }

    fn source_batch_size(&self) -> Option<usize> {
        self.batch_size
    }

    fn instantiate(&self, ctx: &InstanceContext<'_>) -> Result<OperatorImpl, OpError> {
        let files = expand(&self.path, &["parquet"]).map_err(OpError::msg)?;
        Ok(OperatorImpl::Source(Box::new(ParquetSource::new(
            Self { batch_size: Some(source_rows::batch_size(ctx, self.batch_size)), ..self.clone() },
            files,
            ctx.job.seed,
            ctx.worker.shard,
            ctx.worker.shards,
        ))))
    }
}

/// One row group assigned to this worker.
#[derive(Clone, Debug)]
struct Unit {
    file: usize,
    row_group: usize,
    rows: u64,
    /// Index of the group's first row within its file.
    first_row: u64,
    /// Index of the group's first row within this worker's stream.
    stream_start: u64,
}

/// A row as read, before filtering.
struct RawRow {
    key: Option<i64>,
    caption: Option<String>,
    image: Option<Vec<u8>>,
    numeric: Vec<Option<f64>>,
    extra: Vec<Option<String>>,
}

/// A row as [`ParquetSource::next_row`] hands it out.
pub(crate) struct SourceRow {
    pub key: i64,
    pub caption: String,
    /// Image bytes, or the URL's bytes for a source of URLs.
    pub image: Vec<u8>,
}

/// A row that passed the filters.
struct Row {
    key: i64,
    caption: String,
    image: Vec<u8>,
    extra: Vec<String>,
}

struct OpenUnit {
    unit: usize,
    reader: ParquetRecordBatchReader,
    resolved: Resolved,
    /// Rows of the unit read so far.
    offset: u64,
}

/// One worker's share of the row groups.
pub struct ParquetSource {
    config: ParquetSourceConfig,
    names: ColumnNames,
    checks: Vec<(usize, f64, f64, String)>,
    files: Vec<PathBuf>,
    seed: u64,
    shard: usize,
    shards: usize,
    units: Option<Vec<Unit>>,
    open: Option<OpenUnit>,
    raw: VecDeque<RawRow>,
    /// Rows of this worker's stream consumed (emitted or rejected).
    consumed: u64,
    /// The shuffle window being emitted: its first stream row, rows emitted from it, and the
    /// rows still to emit (in emission order, reversed).
    window: Option<(u64, u64, Vec<Row>)>,
    keys: KeyHasher,
}

impl ParquetSource {
    fn new(config: ParquetSourceConfig, files: Vec<PathBuf>, seed: u64, shard: usize, shards: usize) -> Self {
        let names = config.names();
        Self::with_names(config, names, files, seed, shard, shards)
    }

    /// A source of metadata rows whose `image_column` holds URLs (for `url_source`).
    pub(crate) fn of_urls(
        config: ParquetSourceConfig,
        files: Vec<PathBuf>,
        seed: u64,
        shard: usize,
        shards: usize,
    ) -> Self {
        let names = ColumnNames { image_is_url: true, ..config.names() };
        Self::with_names(config, names, files, seed, shard, shards)
    }

    fn with_names(
        config: ParquetSourceConfig,
        names: ColumnNames,
        files: Vec<PathBuf>,
        seed: u64,
        shard: usize,
        shards: usize,
    ) -> Self {
        ParquetSource {
            names,
            checks: config.checks(),
            config,
            files,
            seed,
            shard,
            shards: shards.max(1),
            units: None,
            open: None,
            raw: VecDeque::new(),
            consumed: 0,
            window: None,
            keys: KeyHasher::default(),
        }
    }

    /// Every (file, row group), in file order; this worker takes every `shards`-th.
    fn units(&mut self) -> Result<&[Unit], OpError> {
        if self.units.is_none() {
            let mut units = Vec::new();
            let (mut index, mut stream) = (0usize, 0u64);
            for (file, path) in self.files.iter().enumerate() {
                let meta = open_metadata(path).map_err(OpError::msg)?;
                let mut first_row = 0;
                for (row_group, rg) in meta.metadata().row_groups().iter().enumerate() {
                    let rows = rg.num_rows() as u64;
                    if index % self.shards == self.shard {
                        units.push(Unit { file, row_group, rows, first_row, stream_start: stream });
                        stream += rows;
                    }
                    first_row += rows;
                    index += 1;
                }
            }
            self.units = Some(units);
        }
        Ok(self.units.as_deref().unwrap_or_default())
    }

    /// Opens the reader positioned at stream row `at`, or `None` at the end of the stream.
    fn open_at(&mut self, at: u64) -> Result<Option<OpenUnit>, OpError> {
        let batch_size = self.config.batch_size.unwrap_or(source_rows::DEFAULT_BATCH_SIZE);
        let names = self.names.clone();
        let Some(u) = self.units()?.iter().position(|u| at < u.stream_start + u.rows) else { return Ok(None) };
        let unit = self.units()?[u].clone();
        let path = &self.files[unit.file];
        let meta = open_metadata(path).map_err(OpError::msg)?;
        let resolved =
            resolve(meta.schema(), &names).map_err(|(_, m)| OpError::msg(format!("{}: {m}", path.display())))?;
        let mask = ProjectionMask::roots(meta.parquet_schema(), resolved.roots());
        let file = File::open(path).map_err(|e| OpError::io(path, e))?;
        let offset = at - unit.stream_start;
        let reader = unless_corrupt(path, || {
            ParquetRecordBatchReaderBuilder::new_with_metadata(file, meta)
                .with_projection(mask)
                .with_row_groups(vec![unit.row_group])
                .with_batch_size(batch_size)
                .with_offset(offset as usize)
                .build()
                .map_err(|e| format!("{}: row group {}: {e}", path.display(), unit.row_group))
        })
        .map_err(OpError::msg)?;
        Ok(Some(OpenUnit { unit: u, reader, resolved, offset }))
    }

    /// The next raw row of the stream, or `None` at its end.
    fn next_raw(&mut self) -> Result<Option<RawRow>, OpError> {
        loop {
            if let Some(row) = self.raw.pop_front() {
                return Ok(Some(row));
            }
            if self.open.is_none() {
                let at = self.consumed;
                self.open = self.open_at(at)?;
                if self.open.is_none() {
                    return Ok(None);
                }
            }
            let open = self.open.as_mut().expect("opened");
            let unit = self.units.as_ref().expect("listed")[open.unit].clone();
            // The parquet crate panics on some corrupt pages (found by tests/tests/fuzz.rs).
            let next = unless_corrupt(&self.files[unit.file], || Ok(open.reader.next()))
                .map_err(|e| OpError::msg(format!("{e} (row group {})", unit.row_group)))?;
            match next {
                None => self.open = None,
                Some(Err(e)) => {
                    let path = self.files[unit.file].display();
                    return Err(OpError::msg(format!("{path}: row group {}: {e}", unit.row_group)));
                }
                Some(Ok(batch)) => {
                    let mut rows = extract(&batch, &open.resolved, &mut self.keys)
                        .map_err(|e| OpError::msg(format!("{}: {e}", self.files[unit.file].display())))?;
                    let n = rows.images.len();
                    let synthetic =
                        |i: usize| ((unit.file as i64) << 40) | (unit.first_row + open.offset + i as u64) as i64;
                    let mut images = rows.images.into_iter();
                    let mut captions = rows.captions.into_iter();
                    for i in 0..n {
                        let key = match &rows.keys {
                            Some(keys) => keys[i],
                            None => Some(synthetic(i)),
                        };
                        let numeric = rows.numeric.iter().map(|c| c[i]).collect();
                        let extra = rows.extra.iter_mut().map(|c| c[i].take()).collect();
                        self.raw.push_back(RawRow {
                            key,
                            caption: captions.next().flatten(),
                            image: images.next().flatten(),
                            numeric,
                            extra,
                        });
                    }
                    open.offset += n as u64;
                }
            }
        }
    }

    /// Reads the next raw row and filters it: `Some(Some(row))` kept, `Some(None)` rejected,
    /// `None` at the end of the stream.
    fn next_filtered(&mut self, ctx: &mut OpContext) -> Result<Option<Option<Row>>, OpError> {
        let Some(raw) = self.next_raw()? else { return Ok(None) };
        let index = self.consumed;
        self.consumed += 1;
        let label = raw.key.map_or_else(|| format!("stream row {index}"), |k| k.to_string());
        let reason = if raw.key.is_none() {
            Some("null_key".to_string())
        } else if raw.image.as_ref().is_none_or(|b| b.is_empty()) {
            Some(if self.names.image_is_url { "empty_url" } else { "empty_image" }.to_string())
        } else {
            self.checks
                .iter()
                .find(|(col, lo, hi, _)| !raw.numeric[*col].is_some_and(|v| v >= *lo && v <= *hi))
                .map(|c| c.3.clone())
        };
        if let Some(reason) = reason {
            ctx.reject(label, reason);
            return Ok(Some(None));
        }
        Ok(Some(Some(Row {
            key: raw.key.expect("checked"),
            caption: raw.caption.unwrap_or_default(),
            image: raw.image.expect("checked"),
            extra: raw.extra.into_iter().map(Option::unwrap_or_default).collect(),
        })))
    }

    /// The next row in stream order (no shuffle): its index in this worker's stream and the row
    /// (`None` when the filters rejected it, on `ctx`); `None` at the end of the stream.
    pub(crate) fn next_row(&mut self, ctx: &mut OpContext) -> Result<Option<(u64, Option<SourceRow>)>, OpError> {
        let index = self.consumed;
        Ok(self
            .next_filtered(ctx)?
            .map(|row| (index, row.map(|r| SourceRow { key: r.key, caption: r.caption, image: r.image }))))
    }

    /// Continues at row `row` of this worker's stream (no shuffle).
    pub(crate) fn seek_row(&mut self, row: u64) {
        self.open = None;
        self.raw.clear();
        self.window = None;
        self.consumed = row;
    }

    /// Fills the next shuffle window: reads `shuffle_buffer` stream rows (fewer once the kept
    /// images hold `shuffle_buffer_bytes`; the same rows on every run) and permutes the kept
    /// ones with a generator seeded by (job seed, worker shard, window start).
    fn fill_window(&mut self, ctx: &mut OpContext) -> Result<(), OpError> {
        let start = self.consumed;
        let mut rows = Vec::new();
        let (max_bytes, mut bytes) = (self.config.shuffle_buffer_bytes.as_u64(), 0u64);
        for _ in 0..self.config.shuffle_buffer {
            match self.next_filtered(ctx)? {
                None => break,
                Some(Some(row)) => {
                    bytes += row.image.len() as u64;
                    rows.push(row);
                }
                Some(None) => {}
            }
            if bytes >= max_bytes {
                break;
            }
        }
        let mut rng = Rng::new(self.seed ^ 0x5EED_5A0F_u64, ((self.shard as u64) << 48) ^ start);
        rng.shuffle(&mut rows);
        rows.reverse(); // emitted by popping from the end
        self.window = Some((start, 0, rows));
        Ok(())
    }
}

impl Source for ParquetSource {
    fn next_batch(&mut self, ctx: &mut OpContext) -> Result<Option<Batch>, OpError> {
        let batch_size = self.config.batch_size.unwrap_or(source_rows::DEFAULT_BATCH_SIZE);
        let mut rows = Vec::with_capacity(batch_size);
        while rows.len() < batch_size {
            if self.config.shuffle_buffer > 0 {
                if self.window.as_ref().is_none_or(|w| w.2.is_empty()) {
                    let before = self.consumed;
                    self.fill_window(ctx)?;
                    if self.consumed == before {
                        break; // end of the stream
                    }
                    continue;
                }
                let window = self.window.as_mut().expect("filled");
                window.1 += 1;
                rows.push(window.2.pop().expect("non-empty"));
            } else {
                match self.next_filtered(ctx)? {
                    None => break,
                    Some(Some(row)) => rows.push(row),
                    Some(None) => {}
                }
            }
        }
        ctx.count("key_hash_collisions", self.keys.take_collisions());
        if rows.is_empty() {
            return Ok(None);
        }
        let keys = rows.iter().map(|r| r.key).collect();
        let mut extra: Vec<Vec<String>> = vec![Vec::with_capacity(rows.len()); self.config.extra_columns.len()];
        let (captions, images) = rows
            .into_iter()
            .map(|r| {
                for (column, value) in extra.iter_mut().zip(r.extra) {
                    column.push(value);
                }
                (r.caption, ByteBuf::from(r.image))
            })
            .unzip();
        let mut batch = source_rows::batch(keys, captions, images)?;
        for (name, values) in self.config.extra_columns.iter().zip(extra) {
            batch = batch.with(name, Column::Str(values))?;
        }
        Ok(Some(batch))
    }

    fn position(&self) -> serde_json::Value {
        // With a shuffle, resume re-reads the current window and skips what it already emitted.
        let (row, emitted) = match &self.window {
            Some((start, emitted, _)) if self.config.shuffle_buffer > 0 => (*start, *emitted),
            _ => (self.consumed, 0),
        };
        let mut position = serde_json::json!({ "row": row, "emitted_in_window": emitted });
        // Where that is, for people reading checkpoints.
        if let Some(unit) = self.units.as_ref().and_then(|us| us.iter().find(|u| row < u.stream_start + u.rows)) {
            position["file"] = self.files[unit.file].display().to_string().into();
            position["row_group"] = unit.row_group.into();
            position["row_in_group"] = (row - unit.stream_start).into();
        }
        position
    }

    fn seek(&mut self, position: &serde_json::Value) -> Result<(), OpError> {
        let row = position
            .get("row")
            .and_then(|v| v.as_u64())
            .ok_or_else(|| OpError::msg(format!("bad parquet_source position {position}")))?;
        let emitted = position.get("emitted_in_window").and_then(|v| v.as_u64()).unwrap_or(0);
        self.open = None;
        self.raw.clear();
        self.window = None;
        self.consumed = row;
        if self.config.shuffle_buffer > 0 && emitted > 0 {
            // Rebuild the window silently (its rejections were counted before) and skip ahead.
            self.fill_window(&mut OpContext::detached("seek"))?;
            if let Some((_, done, rows)) = self.window.as_mut() {
                for _ in 0..emitted.min(rows.len() as u64) {
                    rows.pop();
                }
                *done = emitted;
            }
        }
        Ok(())
    }
}
