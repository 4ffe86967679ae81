//! `latents_source`: reads what `latents_sink` wrote (or the reference's latents parquet with
//! the same columns) back as `key`, `caption`, `latents` and `caption_latents`: split across
//! workers row by row, optionally shuffled with the job's seed, resumable at an exact row.

use std::path::PathBuf;

use arrow_array::{Array, RecordBatch, StringArray};
use arrow_schema::DataType;
use latentflow_engine::{
    Batch, Column, InstanceContext, KeyError, NodeSpec, OpContext, OpError, OperatorConfig, OperatorImpl, OperatorKind,
    Ports, Source,
};
use parquet::arrow::arrow_reader::{
    ArrowReaderMetadata, ParquetRecordBatchReaderBuilder, RowSelection, RowSelectionPolicy,
};
use serde::{Deserialize, Serialize};

use crate::keys::KeyHasher;
use crate::latents_sink::{latents_fields, CAPTION_LATENTS_SHAPE_KEY, DTYPE, DTYPE_KEY, LATENTS_SHAPE_KEY};
use crate::rng::Rng;
use crate::source_rows;
use crate::tables::columns::key_values;
use crate::tables::counted_file::CountedFile;
use crate::tables::files::{expand, open_metadata, open_metadata_with_page_index, unless_corrupt};
use crate::tables::tensors;

/// Config of `latents_source`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LatentsSourceConfig {
    /// A parquet file, a folder of them or a glob.
    pub path: String,
    /// Rows per batch (per worker).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub batch_size: Option<usize>,
    /// Shuffle the order of row groups and of rows within each, with the job's seed.
    pub shuffle: bool,
}

impl OperatorConfig for LatentsSourceConfig {
    const TYPE: &'static str = "latents_source";
    const KIND: OperatorKind = OperatorKind::Source;
    const SUMMARY: &'static str =
        "latents parquet (what latents_sink writes) -> key, caption, latents, caption_latents";
    const EXAMPLE: &'static str = "path = \"runs/preprocess/latents\"\nbatch_size = 8";
    const KEYS: &'static [(&'static str, &'static str)] = &[
        ("path", "a parquet file, a folder of them or a glob"),
        ("batch_size", "rows per epoch on each worker (default 32; left out in a training job: the trainer's global_batch_size split over the source's workers)"),
        ("shuffle", "shuffle row groups and the rows within each with the job's seed (default false)"),
    ];
}

impl NodeSpec for LatentsSourceConfig {
    fn validate(&self) -> Vec<KeyError> {
        let mut errors: Vec<KeyError> =
            self.batch_size.and_then(|b| KeyError::check_range("batch_size", b, 1, 1 << 20)).into_iter().collect();
        if self.path.is_empty() {
            errors.push(KeyError::new("path", "the latents to read: a parquet file, folder or glob"));
        }
        // The files may not exist yet (a preprocess job writes them); those that do are checked now.
        if let Ok(files) = expand(&self.path, &["parquet"]) {
            let layout = open_metadata(&files[0])
                .and_then(|footer| FileLayout::of(&footer).map_err(|e| format!("{}: {e}", files[0].display())));
            if let Err(message) = layout {
                errors.push(KeyError::new("path", message));
            }
        }
        errors
    }

    fn ports(&self) -> Ports {
        Ports { adds: latents_fields(), ..Ports::default() }
    }

    fn source_batch_size(&self) -> Option<usize> {
        self.batch_size
    }

    fn reshard_position(
        &self,
        saved: &[Option<serde_json::Value>],
        _shard: usize,
        _shards: usize,
    ) -> Result<Option<serde_json::Value>, OpError> {
        // Shards take the stream's rows `s % shards == shard` in order, so a new layout goes on
        // from the first row no old shard took, provided the old ones took a prefix of it.
        let next = |p: &Option<serde_json::Value>| -> Result<u64, OpError> {
            match p {
                None => Ok(0),
                Some(p) => p
                    .get("row")
                    .and_then(serde_json::Value::as_u64)
                    .ok_or_else(|| OpError::msg(format!("bad latents_source position {p}: expected {{\"row\": N}}"))),
            }
        };
        let old = saved.len() as u64;
        let taken = |s: u64, upto: u64| if upto > s { (upto - s).div_ceil(old) } else { 0 };
        let took: Vec<u64> =
            saved.iter().enumerate().map(|(s, p)| Ok(taken(s as u64, next(p)?))).collect::<Result<_, OpError>>()?;
        let prefix: u64 = took.iter().sum();
        if took.iter().enumerate().any(|(s, &k)| k != taken(s as u64, prefix)) {
            return Err(OpError::msg(format!(
                "the saved shards took {took:?} rows each, which is not the first {prefix} rows of the stream; \
                 resume with the number of workers that saved it"
            )));
        }
        Ok(Some(serde_json::json!({ "row": prefix })))
    }

    fn instantiate(&self, ctx: &InstanceContext<'_>) -> Result<OperatorImpl, OpError> {
        Ok(OperatorImpl::Source(Box::new(LatentsSource::new(
            Self { batch_size: Some(source_rows::batch_size(ctx, self.batch_size)), ..self.clone() },
            ctx.job.seed,
            ctx.worker.shard,
            ctx.worker.shards,
        ))))
    }
}

/// One row group of one file, at its place in the (shuffled) stream.
#[derive(Clone, Debug)]
struct Unit {
    file: usize,
    row_group: usize,
    rows: u64,
    stream_start: u64,
}

/// The rows of a row group this worker takes (every `shards`-th of the stream), decoded:
/// `by_stream[i]` is where the group's `i`-th stream row sits, for the rows that are this
/// worker's. Only those are held, so a row group costs each worker its share of it.
struct Decoded {
    unit: usize,
    by_stream: Vec<usize>,
    keys: Vec<i64>,
    captions: Vec<String>,
    latents: Vec<Vec<f32>>,
    embeddings: Vec<Vec<f32>>,
    /// Bytes of the file read to decode them.
    bytes_read: u64,
}

/// The `latents_source` source.
pub struct LatentsSource {
    config: LatentsSourceConfig,
    seed: u64,
    shard: u64,
    shards: u64,
    files: Vec<PathBuf>,
    /// Each file's footer, read once when listing.
    footers: Vec<ArrowReaderMetadata>,
    /// Each file's columns.
    layouts: Vec<FileLayout>,
    /// String keys to integers (row groups decode through `&self`).
    keys: std::sync::Mutex<KeyHasher>,
    units: Vec<Unit>,
    total: u64,
    next: u64,
    current: Option<Decoded>,
}

/// An epoch's rows of one shape, as they are gathered.
#[derive(Default)]
struct ShapeGroup {
    shapes: (Vec<usize>, Vec<usize>),
    keys: Vec<i64>,
    captions: Vec<String>,
    latents: Vec<f32>,
    embeddings: Vec<f32>,
}

impl ShapeGroup {
    fn into_batch(self) -> Result<Batch, OpError> {
        Ok(Batch::new()
            .with("key", Column::I64(self.keys))?
            .with("caption", Column::Str(self.captions))?
            .with("latents", Column::F32Tensor { shape: self.shapes.0, data: self.latents })?
            .with("caption_latents", Column::F32Tensor { shape: self.shapes.1, data: self.embeddings })?)
    }
}

/// The key of the shuffle's random stream ("latents").
const SHUFFLE_STREAM: u64 = 0x006c_6174_656e_7473;

impl LatentsSource {
    /// A source for shard `shard` of `shards`; files are listed when it starts.
    pub fn new(config: LatentsSourceConfig, seed: u64, shard: usize, shards: usize) -> Self {
        LatentsSource {
            config,
            seed,
            shard: shard as u64,
            shards: shards.max(1) as u64,
            files: Vec::new(),
            footers: Vec::new(),
            layouts: Vec::new(),
            keys: std::sync::Mutex::new(KeyHasher::default()),
            units: Vec::new(),
            total: 0,
            next: 0,
            current: None,
        }
    }

    /// Rows in every file together (after `start`).
    pub fn total_rows(&self) -> u64 {
        self.total
    }

    fn list(&mut self) -> Result<(), OpError> {
        self.files = expand(&self.config.path, &["parquet"]).map_err(OpError::msg)?;
        let mut units = Vec::new();
        for (file, path) in self.files.iter().enumerate() {
            let footer = open_metadata_with_page_index(path).map_err(OpError::msg)?;
            // Files may differ in shape (resolution buckets): an epoch's rows come out as one
            // batch per shape.
            let layout = FileLayout::of(&footer).map_err(|e| OpError::msg(format!("{}: {e}", path.display())))?;
            for (row_group, rg) in footer.metadata().row_groups().iter().enumerate() {
                units.push(Unit { file, row_group, rows: rg.num_rows() as u64, stream_start: 0 });
            }
            self.footers.push(footer.clone());
            self.layouts.push(layout);
        }
        if self.config.shuffle {
            Rng::new(self.seed, SHUFFLE_STREAM).shuffle(&mut units);
        }
        let mut start = 0;
        for unit in &mut units {
            unit.stream_start = start;
            start += unit.rows;
        }
        self.total = start;
        self.units = units;
        Ok(())
    }

    fn decode(&self, index: usize) -> Result<Decoded, OpError> {
        let unit = &self.units[index];
        let path = &self.files[unit.file];
        let at =
            |e: &dyn std::fmt::Display| OpError::msg(format!("{}: row group {}: {e}", path.display(), unit.row_group));
        let mut order: Vec<usize> = (0..unit.rows as usize).collect();
        if self.config.shuffle {
            let key = ((unit.file as u64) << 32) | unit.row_group as u64;
            Rng::new(self.seed ^ SHUFFLE_STREAM, key).shuffle(&mut order);
        }
        // File row -> slot, for the stream rows this worker takes.
        let (mut slot_of_row, mut by_stream, mut mine) = (vec![NOT_MINE; order.len()], vec![NOT_MINE; order.len()], 0);
        for (i, &row) in order.iter().enumerate() {
            if (unit.stream_start + i as u64) % self.shards == self.shard {
                (slot_of_row[row], by_stream[i]) = (mine, mine);
                mine += 1;
            }
        }
        // The reader decodes this worker's rows only, and with the file's page index skips the
        // pages that hold none of them (latents_sink writes a page or more per row).
        let wanted: Vec<usize> = (0..order.len()).filter(|&row| slot_of_row[row] != NOT_MINE).collect();
        let file = CountedFile::open(path).map_err(|e| OpError::io(path, e))?;
        let bytes_read = file.counter();
        let mut reader = ParquetRecordBatchReaderBuilder::new_with_metadata(file, self.footers[unit.file].clone())
            .with_row_groups(vec![unit.row_group]);
        if wanted.len() < order.len() {
            // Selectors, not a mask: a mask decodes every row and filters.
            reader = reader
                .with_row_selection(selection_of(&wanted, order.len()))
                .with_row_selection_policy(RowSelectionPolicy::Selectors);
        }
        let reader = reader.build().map_err(|e| at(&e))?;
        let mut d = Decoded {
            unit: index,
            by_stream,
            keys: vec![0; mine],
            captions: vec![String::new(); mine],
            latents: vec![Vec::new(); mine],
            embeddings: vec![Vec::new(); mine],
            bytes_read: 0,
        };
        // The parquet crate panics on some corrupt pages (found by tests/tests/fuzz.rs).
        unless_corrupt(path, || {
            let mut read = 0;
            // Rows of files without keys are numbered by their place in the file.
            let groups = self.footers[unit.file].metadata().row_groups();
            let group_start: u64 = groups[..unit.row_group].iter().map(|g| g.num_rows() as u64).sum();
            let base = ((unit.file as i64) << 40) | group_start as i64;
            for batch in reader {
                let batch = batch.map_err(|e| format!("{}: {e}", path.display()))?;
                let rows = wanted.get(read..read + batch.num_rows()).ok_or("more rows than selected")?;
                let slots = Slots { file_rows: rows, slot_of_row: &slot_of_row, base };
                let mut keys = self.keys.lock().expect("keys lock");
                read_columns(&batch, slots, &self.layouts[unit.file], &mut keys, &mut d)
                    .map_err(|e| format!("{}: {e}", path.display()))?;
                read += batch.num_rows();
            }
            Ok(())
        })
        .map_err(|e| OpError::msg(format!("{e} (row group {})", unit.row_group)))?;
        d.bytes_read = bytes_read.load(std::sync::atomic::Ordering::Relaxed);
        Ok(d)
    }
}

/// Marks a row another worker takes.
const NOT_MINE: usize = usize::MAX;

/// The selection of `rows` (ascending) among a row group's `total` rows, as runs of rows.
fn selection_of(rows: &[usize], total: usize) -> RowSelection {
    let mut runs: Vec<std::ops::Range<usize>> = Vec::new();
    for &row in rows {
        match runs.last_mut() {
            Some(run) if run.end == row => run.end += 1,
            _ => runs.push(row..row + 1),
        }
    }
    RowSelection::from_consecutive_ranges(runs.into_iter(), total)
}

/// Where the rows of a record batch go: `file_rows[i]` is the row group's row the batch's
/// `i`-th row is, `slot_of_row` its place in [`Decoded`], `base` the key of the group's row 0
/// for files without keys.
struct Slots<'a> {
    file_rows: &'a [usize],
    slot_of_row: &'a [usize],
    base: i64,
}

/// Copies the rows of `batch` into their slots in `d`.
fn read_columns(
    batch: &RecordBatch,
    slots: Slots<'_>,
    layout: &FileLayout,
    key_hasher: &mut KeyHasher,
    d: &mut Decoded,
) -> Result<(), String> {
    let column = |name: &str| batch.column_by_name(name).ok_or_else(|| format!("no column `{name}`"));
    let keys = match &layout.key {
        Some(name) => Some(key_values(column(name)?, key_hasher)?),
        None => None,
    };
    let captions = match &layout.caption {
        Some(name) => Some(arrow_cast::cast(column(name)?, &DataType::Utf8).map_err(|e| format!("`{name}`: {e}"))?),
        None => None,
    };
    let captions = captions.as_ref().map(|c| c.as_any().downcast_ref::<StringArray>().expect("cast to utf8"));
    let latents = column(&layout.latents.0)?;
    let embeddings = column(&layout.caption_latents.0)?;
    for (row, &file_row) in slots.file_rows.iter().enumerate() {
        let slot = slots.slot_of_row[file_row];
        d.keys[slot] = keys.as_ref().and_then(|k| k[row]).unwrap_or(slots.base + file_row as i64);
        d.captions[slot] = captions.filter(|c| !c.is_null(row)).map(|c| c.value(row).to_string()).unwrap_or_default();
        d.latents[slot] = tensors::row_values(latents, row)?.unwrap_or_default();
        d.embeddings[slot] = tensors::row_values(embeddings, row)?.unwrap_or_default();
    }
    Ok(())
}

/// Where a latents file keeps its columns, and the per-row shapes of its two tensor columns.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FileLayout {
    /// The integer or string key column (`hash`, else `key`; rows are numbered without).
    pub key: Option<String>,
    /// The caption column, if any.
    pub caption: Option<String>,
    /// The image latents column (`latents_RES_bytes`, `latents_RES` or `latents`) and its shape.
    pub latents: (String, Vec<usize>),
    /// The text embeddings column (`caption_latents`) and its shape.
    pub caption_latents: (String, Vec<usize>),
}

impl FileLayout {
    /// Reads the layout from a file's schema: the columns' extension metadata, else latentflow's
    /// metadata (in the arrow schema or the parquet footer), else for fixed-size lists a shape
    /// inferred from the length (`[4, s, s]` latents, `[77, n / 77]` embeddings).
    pub fn of(footer: &ArrowReaderMetadata) -> Result<FileLayout, String> {
        let schema = footer.schema();
        let names: Vec<&String> = schema.fields().iter().map(|f| f.name()).collect();
        let has = |n: &str| names.iter().any(|m| *m == n);
        let latents = names
            .iter()
            .find(|n| n.starts_with("latents_") || n.as_str() == "latents")
            .map(|n| n.to_string())
            .ok_or_else(|| {
                format!("no latents column (`latents_RES_bytes`, `latents_RES` or `latents`); the file has {names:?}")
            })?;
        if !has("caption_latents") {
            return Err(format!("no `caption_latents` column; the file has {names:?}"));
        }
        let kv = footer.metadata().file_metadata().key_value_metadata();
        let entry = |key: &str| -> Option<String> {
            schema
                .metadata()
                .get(key)
                .cloned()
                .or_else(|| kv.and_then(|kv| kv.iter().find(|e| e.key == key).and_then(|e| e.value.clone())))
        };
        let shape_of =
            |column: &str, key: &str, infer: fn(usize) -> Option<Vec<usize>>| -> Result<Vec<usize>, String> {
                let field = schema.field_with_name(column).map_err(|e| e.to_string())?;
                let found = tensors::find(field)?;
                if found.stored == tensors::Stored::Bytes {
                    if let Some(dtype) = entry(DTYPE_KEY).filter(|d| d != DTYPE) {
                        return Err(format!("dtype {dtype} is not supported (only {DTYPE})"));
                    }
                }
                let saved = entry(key)
                    .map(|text| {
                        serde_json::from_str::<Vec<usize>>(&text)
                            .map_err(|_| format!("`{key}` = {text} is not a shape"))
                    })
                    .transpose()?;
                let shape = found.shape.or(saved).or_else(|| found.fixed_len.and_then(infer));
                let shape = shape.ok_or_else(|| {
                    format!(
                    "no shape for `{column}`: the column carries none (no Ray or arrow.fixed_shape_tensor extension) \
                     and the file's metadata has no `{key}`"
                )
                })?;
                if let Some(n) = found.fixed_len.filter(|&n| n != shape.iter().product::<usize>()) {
                    return Err(format!("`{column}` holds {n} values a row but its shape is {shape:?}"));
                }
                Ok(shape)
            };
        let infer_latents = |n: usize| {
            let side = ((n / 4) as f64).sqrt().round() as usize;
            (n % 4 == 0 && side * side * 4 == n).then(|| vec![4, side, side])
        };
        let infer_embeddings = |n: usize| (n % 77 == 0 && n > 0).then(|| vec![77, n / 77]);
        Ok(FileLayout {
            key: ["hash", "key"].into_iter().find(|n| has(n)).map(str::to_string),
            caption: has("caption").then(|| "caption".to_string()),
            latents: (latents.clone(), shape_of(&latents, LATENTS_SHAPE_KEY, infer_latents)?),
            caption_latents: (
                "caption_latents".into(),
                shape_of("caption_latents", CAPTION_LATENTS_SHAPE_KEY, infer_embeddings)?,
            ),
        })
    }
}

impl Source for LatentsSource {
    fn start(&mut self, _ctx: &mut OpContext) -> Result<(), OpError> {
        self.list()
    }

    /// The epoch's rows when they all have one shape (the engine calls `next_batches`).
    fn next_batch(&mut self, ctx: &mut OpContext) -> Result<Option<Batch>, OpError> {
        let Some(mut batches) = self.next_batches(ctx)? else { return Ok(None) };
        match batches.len() {
            0 => Ok(Some(Batch::new())),
            1 => Ok(batches.pop()),
            n => Err(OpError::msg(format!("the epoch's rows have {n} shapes: read them with next_batches"))),
        }
    }

    /// `batch_size` rows, one batch per shape among them (in the order the shapes appear).
    fn next_batches(&mut self, ctx: &mut OpContext) -> Result<Option<Vec<Batch>>, OpError> {
        let mut groups: Vec<ShapeGroup> = Vec::new();
        let mut taken = 0;
        while taken < self.config.batch_size.unwrap_or(source_rows::DEFAULT_BATCH_SIZE) && self.next < self.total {
            let s = self.next;
            self.next += 1;
            if s % self.shards != self.shard {
                continue;
            }
            taken += 1;
            let unit = self.units.partition_point(|u| u.stream_start + u.rows <= s);
            if self.current.as_ref().is_none_or(|d| d.unit != unit) {
                let decoded = self.decode(unit)?;
                ctx.count("file_bytes_read", decoded.bytes_read);
                self.current = Some(decoded);
            }
            let layout = &self.layouts[self.units[unit].file];
            let shapes = (layout.latents.1.clone(), layout.caption_latents.1.clone());
            let d = self.current.as_mut().expect("decoded");
            let row = d.by_stream[(s - self.units[unit].stream_start) as usize];
            let (l, c) = (shapes.0.iter().product::<usize>(), shapes.1.iter().product::<usize>());
            if d.latents[row].len() != l || d.embeddings[row].len() != c {
                ctx.reject(d.keys[row].to_string(), "bad_latents");
                continue;
            }
            let group = match groups.iter().position(|g| g.shapes == shapes) {
                Some(i) => &mut groups[i],
                None => {
                    groups.push(ShapeGroup { shapes, ..ShapeGroup::default() });
                    groups.last_mut().expect("just pushed")
                }
            };
            group.keys.push(d.keys[row]);
            group.captions.push(std::mem::take(&mut d.captions[row]));
            group.latents.extend_from_slice(&d.latents[row]);
            group.embeddings.extend_from_slice(&d.embeddings[row]);
        }
        ctx.count("key_hash_collisions", self.keys.lock().expect("keys lock").take_collisions());
        if taken == 0 {
            return Ok(None);
        }
        let batches = groups.into_iter().map(ShapeGroup::into_batch).collect::<Result<Vec<_>, _>>()?;
        Ok(Some(batches))
    }

    fn position(&self) -> serde_json::Value {
        serde_json::json!({ "row": self.next })
    }

    fn seek(&mut self, position: &serde_json::Value) -> Result<(), OpError> {
        self.next = position
            .get("row")
            .and_then(serde_json::Value::as_u64)
            .ok_or_else(|| OpError::msg(format!("bad latents_source position {position}")))?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::latents_sink::LatentsSink;
    use latentflow_engine::Sink;

    fn rows(keys: std::ops::Range<i64>) -> Batch {
        let n = (keys.end - keys.start) as usize;
        Batch::new()
            .with("key", Column::I64(keys.clone().collect()))
            .unwrap()
            .with("caption", Column::Str(keys.clone().map(|k| format!("caption {k}")).collect()))
            .unwrap()
            .with("latents", Column::F32Tensor { shape: vec![4, 2, 2], data: (0..n * 16).map(|v| v as f32).collect() })
            .unwrap()
            .with("caption_latents", Column::F32Tensor { shape: vec![3, 2], data: vec![0.5; n * 6] })
            .unwrap()
    }

    /// Writes `batches` through a `latents_sink` of `rows_per_file` rows a file, in `layout`.
    fn sink_batches(
        dir: &std::path::Path,
        rows_per_file: usize,
        layout: crate::tables::tensors::TensorLayout,
        batches: impl IntoIterator<Item = Batch>,
    ) {
        let mut sink = LatentsSink::new(dir.to_path_buf(), rows_per_file, 0).with_layout(layout);
        let mut ctx = OpContext::detached("latents");
        sink.start(&mut ctx).unwrap();
        for batch in batches {
            sink.write(batch, &mut ctx).unwrap();
        }
        sink.finish(&mut ctx).unwrap();
    }

    fn write(dir: &std::path::Path) {
        let mut sink = LatentsSink::new(dir.to_path_buf(), 4, 0);
        let mut ctx = OpContext::detached("latents");
        sink.start(&mut ctx).unwrap();
        sink.write(rows(0..3), &mut ctx).unwrap();
        sink.write(rows(3..10), &mut ctx).unwrap();
        assert_eq!(std::fs::read_dir(dir).unwrap().count(), 3, "two complete files and a hidden partial one");
        sink.finish(&mut ctx).unwrap();
    }

    #[test]
    fn the_sink_writes_each_file_as_one_row_group_of_its_rows() {
        let dir = tempfile::tempdir().unwrap();
        write(dir.path()); // batches of 3 and 7 rows into files of 4
        let mut files: Vec<_> = std::fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().path()).collect();
        files.sort();
        let groups: Vec<Vec<i64>> = files
            .iter()
            .map(|f| open_metadata(f).unwrap().metadata().row_groups().iter().map(|g| g.num_rows()).collect())
            .collect();
        assert_eq!(groups, [vec![4], vec![4], vec![2]], "{files:?}");
    }

    #[test]
    fn rows_of_several_shapes_come_back_in_their_epochs_one_batch_per_shape() {
        let dir = tempfile::tempdir().unwrap();
        let wide = |keys: std::ops::Range<i64>| {
            let n = (keys.end - keys.start) as usize;
            let mut b = rows(keys);
            b.insert("latents", Column::F32Tensor { shape: vec![4, 2, 4], data: vec![7.0; n * 32] }).unwrap();
            b
        };
        // Epochs of 4 as an online run of two buckets writes them: 0..2 square, 2..4 wide, ...
        let batches = [(0..2, 2..4), (4..7, 7..8)].into_iter().flat_map(|(square, tall)| [rows(square), wide(tall)]);
        sink_batches(dir.path(), 100, Default::default(), batches);
        let mut ctx = OpContext::detached("read");
        let config =
            LatentsSourceConfig { path: dir.path().display().to_string(), batch_size: Some(4), shuffle: false };
        let mut source = LatentsSource::new(config, 0, 0, 1);
        source.start(&mut ctx).unwrap();
        let epoch = |s: &mut LatentsSource| -> Vec<(Vec<usize>, Vec<i64>)> {
            let batches = s.next_batches(&mut OpContext::detached("read")).unwrap().unwrap();
            batches
                .iter()
                .map(|b| {
                    let Column::F32Tensor { shape, .. } = b.column("latents").unwrap() else { panic!() };
                    (shape.clone(), b.i64s("key").unwrap().to_vec())
                })
                .collect()
        };
        assert_eq!(epoch(&mut source), [(vec![4, 2, 2], vec![0, 1]), (vec![4, 2, 4], vec![2, 3])]);
        assert_eq!(epoch(&mut source), [(vec![4, 2, 2], vec![4, 5, 6]), (vec![4, 2, 4], vec![7])]);
        assert!(source.next_batches(&mut ctx).unwrap().is_none());
    }

    fn read_all(source: &mut LatentsSource) -> Vec<Batch> {
        let mut ctx = OpContext::detached("read");
        let mut out = Vec::new();
        while let Some(b) = source.next_batch(&mut ctx).unwrap() {
            out.push(b);
        }
        out
    }

    #[test]
    fn reads_back_what_the_sink_wrote_in_order() {
        let dir = tempfile::tempdir().unwrap();
        write(dir.path());
        let names: Vec<_> = std::fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(names.len(), 3, "{names:?}");
        let config =
            LatentsSourceConfig { path: dir.path().display().to_string(), batch_size: Some(4), shuffle: false };
        let mut source = LatentsSource::new(config, 0, 0, 1);
        source.start(&mut OpContext::detached("read")).unwrap();
        assert_eq!(source.total_rows(), 10);
        let batches = read_all(&mut source);
        let keys: Vec<i64> = batches.iter().flat_map(|b| b.i64s("key").unwrap().to_vec()).collect();
        assert_eq!(keys, (0..10).collect::<Vec<_>>());
        let Column::F32Tensor { shape, data } = batches[0].column("latents").unwrap() else { panic!() };
        assert_eq!(shape, &[4, 2, 2]);
        assert_eq!(&data[..3], &[0.0, 1.0, 2.0]);
        assert_eq!(batches[0].strs("caption").unwrap()[1], "caption 1");
    }

    #[test]
    fn a_position_saved_by_two_shards_continues_on_three() {
        let dir = tempfile::tempdir().unwrap();
        write(dir.path());
        let config = LatentsSourceConfig { path: dir.path().display().to_string(), batch_size: Some(2), shuffle: true };
        let mut ctx = OpContext::detached("read");
        let mut seen = Vec::new();
        let mut saved = Vec::new();
        for shard in 0..2 {
            let mut source = LatentsSource::new(config.clone(), 7, shard, 2);
            source.start(&mut ctx).unwrap();
            for _ in 0..2 {
                seen.extend(source.next_batch(&mut ctx).unwrap().unwrap().i64s("key").unwrap().to_vec());
            }
            saved.push(Some(source.position()));
        }
        for shard in 0..3 {
            let mut source = LatentsSource::new(config.clone(), 7, shard, 3);
            source.start(&mut ctx).unwrap();
            source.seek(&config.reshard_position(&saved, shard, 3).unwrap().unwrap()).unwrap();
            while let Some(batch) = source.next_batch(&mut ctx).unwrap() {
                seen.extend(batch.i64s("key").unwrap().to_vec());
            }
        }
        let total = seen.len();
        seen.sort_unstable();
        seen.dedup();
        assert_eq!(seen.len(), total, "no row twice");
        let mut all = LatentsSource::new(config.clone(), 7, 0, 1);
        all.start(&mut ctx).unwrap();
        assert_eq!(total as u64, all.total_rows(), "every row once");
        let gap = [Some(serde_json::json!({"row": 4})), None];
        assert!(config.reshard_position(&gap, 0, 1).unwrap_err().to_string().contains("not the first"));
    }

    #[test]
    fn shards_cover_every_row_once_and_seek_resumes_exactly() {
        let dir = tempfile::tempdir().unwrap();
        write(dir.path());
        let path = dir.path().display().to_string();
        let config = LatentsSourceConfig { path, batch_size: Some(2), shuffle: true };
        let mut seen = Vec::new();
        for shard in 0..2 {
            let mut source = LatentsSource::new(config.clone(), 7, shard, 2);
            source.start(&mut OpContext::detached("read")).unwrap();
            seen.extend(read_all(&mut source).iter().flat_map(|b| b.i64s("key").unwrap().to_vec()));
        }
        let mut sorted = seen.clone();
        sorted.sort_unstable();
        assert_eq!(sorted, (0..10).collect::<Vec<_>>());
        assert_ne!(seen, (0..10).collect::<Vec<_>>(), "shuffled");

        let mut whole = LatentsSource::new(config.clone(), 7, 0, 1);
        whole.start(&mut OpContext::detached("read")).unwrap();
        let all: Vec<i64> = read_all(&mut whole).iter().flat_map(|b| b.i64s("key").unwrap().to_vec()).collect();
        let mut first = LatentsSource::new(config.clone(), 7, 0, 1);
        first.start(&mut OpContext::detached("read")).unwrap();
        let head = first.next_batch(&mut OpContext::detached("read")).unwrap().unwrap();
        let mut resumed = LatentsSource::new(config, 7, 0, 1);
        resumed.start(&mut OpContext::detached("read")).unwrap();
        resumed.seek(&first.position()).unwrap();
        let rest: Vec<i64> = read_all(&mut resumed).iter().flat_map(|b| b.i64s("key").unwrap().to_vec()).collect();
        let joined: Vec<i64> = head.i64s("key").unwrap().iter().copied().chain(rest).collect();
        assert_eq!(joined, all);
    }

    /// Bytes of the files and rows each of `shards` workers read, reading everything.
    fn bytes_and_keys_per_shard(config: &LatentsSourceConfig, shards: usize) -> Vec<(u64, Vec<i64>)> {
        (0..shards)
            .map(|shard| {
                let mut source = LatentsSource::new(config.clone(), 3, shard, shards);
                let mut ctx = OpContext::detached("read");
                source.start(&mut ctx).unwrap();
                let mut keys = Vec::new();
                while let Some(batch) = source.next_batch(&mut ctx).unwrap() {
                    keys.extend(batch.i64s("key").unwrap());
                }
                let counts = ctx.take_counts();
                let bytes = counts.iter().filter(|(name, _)| name == "file_bytes_read").map(|(_, n)| n).sum();
                (bytes, keys)
            })
            .collect()
    }

    #[test]
    fn each_worker_reads_its_own_rows_pages_not_the_whole_row_group() {
        use crate::tables::tensors::TensorLayout;
        for layout in [TensorLayout::Ray, TensorLayout::FixedShapeTensor, TensorLayout::Bytes] {
            // Rows as large as the real ones' embeddings (77 x 256 floats, 79 kB): a page or more each.
            let dir = tempfile::tempdir().unwrap();
            let batches = [0, 24, 48, 72].map(|first| {
                let mut batch = rows(first..first + 24);
                let data = Rng::new(first as u64, 0).normals(24 * 77 * 256);
                batch.insert("caption_latents", Column::F32Tensor { shape: vec![77, 256], data }).unwrap();
                batch
            });
            sink_batches(dir.path(), 48, layout, batches);
            for shuffle in [false, true] {
                let config =
                    LatentsSourceConfig { path: dir.path().display().to_string(), batch_size: Some(4), shuffle };
                let one = bytes_and_keys_per_shard(&config, 1);
                let four = bytes_and_keys_per_shard(&config, 4);
                let mut keys: Vec<i64> = four.iter().flat_map(|(_, k)| k.clone()).collect();
                keys.sort_unstable();
                assert_eq!(keys, (0..96).collect::<Vec<_>>(), "every row once");
                let total: u64 = four.iter().map(|(b, _)| b).sum();
                // Every worker decoding every row group would read 4x one worker's bytes.
                let ratio = total as f64 / one[0].0 as f64;
                assert!(one[0].0 > 96 * 77 * 256 * 4, "one worker reads every row: {}", one[0].0);
                assert!(ratio < 1.3, "{layout:?}, shuffle {shuffle}: 4 workers read {ratio:.2}x one worker's bytes");
            }
        }
    }

    #[test]
    fn a_file_without_latents_metadata_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("other.parquet");
        crate::demo::write_demo_parquet(&path, 2, 0, 1).unwrap();
        let config = LatentsSourceConfig { path: path.display().to_string(), ..Default::default() };
        let mut source = LatentsSource::new(config, 0, 0, 1);
        let err = source.start(&mut OpContext::detached("read")).unwrap_err().to_string();
        assert!(err.contains("other.parquet") && err.contains("no latents column"), "{err}");
        let errors = LatentsSourceConfig { path: path.display().to_string(), ..Default::default() }.validate();
        assert!(errors[0].message.contains("no latents column"), "validate checks the schema: {errors:?}");
    }

    #[test]
    fn every_layout_the_sink_writes_reads_back_the_same_values() {
        use crate::tables::tensors::TensorLayout;
        for layout in [TensorLayout::Ray, TensorLayout::FixedShapeTensor, TensorLayout::Bytes] {
            let dir = tempfile::tempdir().unwrap();
            sink_batches(dir.path(), 100, layout, [rows(0..5)]);
            let mut ctx = OpContext::detached("read");
            let file = std::fs::read_dir(dir.path()).unwrap().next().unwrap().unwrap().path();
            let footer = open_metadata(&file).unwrap();
            // The shapes are in the arrow schema too, not only in the footer.
            assert_eq!(footer.schema().metadata()[LATENTS_SHAPE_KEY], "[4,2,2]", "{layout:?}");
            let config = LatentsSourceConfig { path: file.display().to_string(), batch_size: Some(8), shuffle: false };
            assert!(config.validate().is_empty(), "{layout:?}: {:?}", config.validate());
            let mut source = LatentsSource::new(config, 0, 0, 1);
            source.start(&mut ctx).unwrap();
            let batch = source.next_batch(&mut ctx).unwrap().unwrap();
            let want = rows(0..5);
            for column in ["key", "caption", "latents", "caption_latents"] {
                assert_eq!(batch.column(column).unwrap(), want.column(column).unwrap(), "{layout:?} {column}");
            }
        }
    }
}
