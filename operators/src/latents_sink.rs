//! `latents_sink`: writes latents and text embeddings as parquet files in the reference's layout
//! (`hash`, `caption`, `latents_{res}_bytes`, `caption_latents`), which `latents_source` reads
//! back. The tensor columns are Ray Data tensor columns by default (what the reference's own
//! loader, `ray.data.read_parquet`, reads as arrays of the right shape), or Arrow's canonical
//! fixed-shape tensors, or raw bytes. Each file is written under a hidden temporary name and
//! renamed once complete; the `latentflow.*` shapes are in the footer and the arrow schema.

use std::path::PathBuf;
use std::sync::Arc;

use arrow_array::{ArrayRef, Int64Array, RecordBatch, StringArray};
use arrow_schema::{DataType, Field as ArrowField, Schema as ArrowSchema};
use latentflow_engine::{
    Batch, ColumnType, Field, InstanceContext, KeyError, NodeSpec, OpContext, OpError, OperatorConfig, OperatorImpl,
    OperatorKind, Ports, Sink,
};
use serde::{Deserialize, Serialize};

use crate::tables::tensors::{self, TensorLayout};
use crate::tables::{AtomicParquetWriter, Pages};

/// Key-value metadata entry with the per-row shape of the image latents (JSON array).
pub const LATENTS_SHAPE_KEY: &str = "latentflow.latents_shape";
/// Key-value metadata entry with the per-row shape of the text embeddings (JSON array).
pub const CAPTION_LATENTS_SHAPE_KEY: &str = "latentflow.caption_latents_shape";
/// Key-value metadata entry with the element type of both binary columns.
pub const DTYPE_KEY: &str = "latentflow.dtype";
/// The element type written: little-endian f32.
pub const DTYPE: &str = "float32-le";

/// The columns a latents row has, as `latents_sink` needs them and `latents_source` emits them.
pub fn latents_fields() -> Vec<Field> {
    vec![
        Field::new("key", ColumnType::I64),
        Field::new("caption", ColumnType::Str),
        Field::new("latents", ColumnType::F32Tensor),
        Field::new("caption_latents", ColumnType::F32Tensor),
    ]
}

/// Config of `latents_sink`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LatentsSinkConfig {
    /// Folder for the files; `OUTPUT_DIR/latents` by default.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dir: Option<PathBuf>,
    /// Rows per file.
    pub rows_per_file: usize,
    /// How the tensor columns are stored: `"ray"` (default), `"fixed_shape_tensor"` or `"bytes"`.
    pub layout: TensorLayout,
}

impl Default for LatentsSinkConfig {
    fn default() -> Self {
        LatentsSinkConfig { dir: None, rows_per_file: 1000, layout: TensorLayout::Ray }
    }
}

impl OperatorConfig for LatentsSinkConfig {
    const TYPE: &'static str = "latents_sink";
    const KIND: OperatorKind = OperatorKind::Sink;
    const SUMMARY: &'static str = "latents + text embeddings -> parquet files (`part-WORKER-N.parquet`)";
    const EXAMPLE: &'static str = "rows_per_file = 1000";
    const KEYS: &'static [(&'static str, &'static str)] = &[
        ("dir", "folder for the files (default OUTPUT_DIR/latents)"),
        ("rows_per_file", "rows per parquet file (default 1000), written as one row group"),
        ("layout", "tensor columns as \"ray\" (default: Ray Data's arrow_tensor_v2 on large_list<float>, what ray.data.read_parquet reads), \"fixed_shape_tensor\" (Arrow's canonical extension) or \"bytes\" (little-endian f32)"),
    ];
}

impl NodeSpec for LatentsSinkConfig {
    fn validate(&self) -> Vec<KeyError> {
        KeyError::check_range("rows_per_file", self.rows_per_file, 1, 1 << 30).into_iter().collect()
    }

    fn ports(&self) -> Ports {
        Ports { requires: latents_fields(), ..Ports::default() }
    }

    fn instantiate(&self, ctx: &InstanceContext<'_>) -> Result<OperatorImpl, OpError> {
        let dir = self.dir.clone().unwrap_or_else(|| ctx.job.output_dir().join("latents"));
        Ok(OperatorImpl::Sink(Box::new(
            LatentsSink::new(dir, self.rows_per_file, ctx.worker.index).with_layout(self.layout),
        )))
    }
}

/// The `latents_sink` sink.
pub struct LatentsSink {
    dir: PathBuf,
    rows_per_file: usize,
    layout: TensorLayout,
    worker: usize,
    files: usize,
    open: Option<OpenFile>,
}

struct OpenFile {
    writer: AtomicParquetWriter,
    schema: arrow_schema::SchemaRef,
    rows: usize,
    shapes: (Vec<usize>, Vec<usize>),
}

impl LatentsSink {
    /// A sink writing `dir/part-WORKER-N.parquet`.
    pub fn new(dir: PathBuf, rows_per_file: usize, worker: usize) -> Self {
        LatentsSink { dir, rows_per_file, layout: TensorLayout::default(), worker, files: 0, open: None }
    }

    /// Stores the tensor columns in `layout`.
    pub fn with_layout(self, layout: TensorLayout) -> Self {
        LatentsSink { layout, ..self }
    }

    fn open(&mut self, latents: &[usize], caption: &[usize]) -> Result<OpenFile, OpError> {
        let resolution = latents.last().copied().unwrap_or(0) * 8;
        let metadata = [
            (LATENTS_SHAPE_KEY, serde_json::to_string(latents).expect("shape")),
            (CAPTION_LATENTS_SHAPE_KEY, serde_json::to_string(caption).expect("shape")),
            (DTYPE_KEY, DTYPE.to_string()),
        ];
        // In the footer and in the arrow schema, so `pyarrow.parquet.read_schema(f).metadata` shows it.
        let schema_metadata = metadata.iter().map(|(k, v)| (k.to_string(), v.clone())).collect();
        let schema = Arc::new(ArrowSchema::new_with_metadata(
            vec![
                ArrowField::new("hash", DataType::Int64, false),
                ArrowField::new("caption", DataType::Utf8, false),
                tensors::field(&format!("latents_{resolution}_bytes"), self.layout, latents),
                tensors::field("caption_latents", self.layout, caption),
            ],
            schema_metadata,
        ));
        let path = self.dir.join(format!("part-{:05}-{:05}.parquet", self.worker, self.files));
        self.files += 1;
        let writer = AtomicParquetWriter::create_with_pages(&path, schema.clone(), &metadata, Pages::RowSized)
            .map_err(OpError::msg)?;
        Ok(OpenFile { writer, schema, rows: 0, shapes: (latents.to_vec(), caption.to_vec()) })
    }

    fn close(&mut self) -> Result<(), OpError> {
        if let Some(file) = self.open.take() {
            let path = file.writer.finish().map_err(OpError::msg)?;
            tracing::debug!(path = %path.display(), rows = file.rows, "latents file complete");
        }
        Ok(())
    }
}

impl Sink for LatentsSink {
    fn start(&mut self, _ctx: &mut OpContext) -> Result<(), OpError> {
        // This worker's files a killed run left unfinished (other workers sweep their own).
        let own = format!(".part-{:05}-", self.worker);
        crate::durable::remove_stale(&self.dir, |n| n.starts_with(&own) && n.ends_with(".parquet.tmp"))
            .map_err(|e| OpError::io(&self.dir, e))?;
        Ok(())
    }

    fn write(&mut self, batch: Batch, _ctx: &mut OpContext) -> Result<(), OpError> {
        let keys = batch.i64s("key")?;
        let captions = batch.strs("caption")?;
        // Values an encoder left on its device come to the host here, once.
        let (latent_shape, latents) = batch.f32_tensor("latents")?;
        let (caption_shape, embeddings) = batch.f32_tensor("caption_latents")?;
        let mut row = 0;
        while row < keys.len() {
            if let Some(open) = &self.open {
                if open.shapes != (latent_shape.to_vec(), caption_shape.to_vec()) {
                    // A file holds one shape (its metadata says which): start another.
                    self.close()?;
                }
            }
            if self.open.is_none() {
                self.open = Some(self.open(latent_shape, caption_shape)?);
            }
            let open = self.open.as_mut().expect("opened");
            let n = (self.rows_per_file - open.rows).min(keys.len() - row);
            let (l, c) = (latent_shape.iter().product::<usize>(), caption_shape.iter().product::<usize>());
            let columns: Vec<ArrayRef> = vec![
                Arc::new(Int64Array::from(keys[row..row + n].to_vec())),
                Arc::new(StringArray::from(captions[row..row + n].to_vec())),
                tensors::column(self.layout, &latents[row * l..(row + n) * l], l).map_err(OpError::msg)?,
                tensors::column(self.layout, &embeddings[row * c..(row + n) * c], c).map_err(OpError::msg)?,
            ];
            let record = RecordBatch::try_new(open.schema.clone(), columns).map_err(|e| OpError::msg(e.to_string()))?;
            // The file's rows make one row group (readers decode a row group at a time; a group
            // per incoming batch made them small): the writer holds the encoded rows until then.
            open.writer.write(&record).map_err(OpError::msg)?;
            open.rows += n;
            row += n;
            if open.rows == self.rows_per_file {
                self.close()?;
            }
        }
        Ok(())
    }

    fn finish(&mut self, _ctx: &mut OpContext) -> Result<(), OpError> {
        self.close()
    }
}
