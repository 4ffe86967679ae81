//! `jsonl_sink`: writes rows as JSON lines, one file per worker, for looking at what a pipeline
//! produced. Byte and tensor columns are summarised by their length and shape.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::PathBuf;

use latentflow_engine::{
    Batch, Column, InstanceContext, NodeSpec, OpContext, OpError, OperatorConfig, OperatorImpl, OperatorKind, Ports,
    Sink,
};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

/// Config of `jsonl_sink`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct JsonlSinkConfig {
    /// Folder for the files; `OUTPUT_DIR/<node id>` by default.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dir: Option<PathBuf>,
    /// Columns to write; every column by default.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub columns: Option<Vec<String>>,
}

impl OperatorConfig for JsonlSinkConfig {
    const TYPE: &'static str = "jsonl_sink";
    const KIND: OperatorKind = OperatorKind::Sink;
    const SUMMARY: &'static str = "writes rows as JSON lines, `part-WORKER.jsonl` per worker";
    const EXAMPLE: &'static str = "columns = [\"key\", \"caption\"]";
    const KEYS: &'static [(&'static str, &'static str)] = &[
        ("dir", "folder for the files (default OUTPUT_DIR/<node id>)"),
        ("columns", "columns to write (default all); bytes and tensors are written as length and shape"),
    ];
}

impl NodeSpec for JsonlSinkConfig {
    fn ports(&self) -> Ports {
        Ports::default()
    }

    fn instantiate(&self, ctx: &InstanceContext<'_>) -> Result<OperatorImpl, OpError> {
        let dir = self.dir.clone().unwrap_or_else(|| ctx.job.output_dir().join(ctx.node));
        let path = dir.join(format!("part-{:05}.jsonl", ctx.worker.index));
        Ok(OperatorImpl::Sink(Box::new(JsonlSink { path, columns: self.columns.clone(), out: None })))
    }
}

/// The `jsonl_sink` sink. Writes to a temporary file renamed into place at the end, so a file
/// with the final name is always complete.
#[derive(Debug)]
pub struct JsonlSink {
    path: PathBuf,
    columns: Option<Vec<String>>,
    out: Option<BufWriter<File>>,
}

impl JsonlSink {
    fn temp_path(&self) -> PathBuf {
        let name = self.path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        self.path.with_file_name(format!(".{name}.tmp"))
    }
}

impl Sink for JsonlSink {
    fn start(&mut self, _ctx: &mut OpContext) -> Result<(), OpError> {
        if let Some(dir) = self.path.parent() {
            std::fs::create_dir_all(dir).map_err(|e| OpError::io(dir, e))?;
        }
        let temp = self.temp_path();
        self.out = Some(BufWriter::new(File::create(&temp).map_err(|e| OpError::io(&temp, e))?));
        Ok(())
    }

    fn write(&mut self, batch: Batch, _ctx: &mut OpContext) -> Result<(), OpError> {
        let columns: Vec<(&str, &Column)> = match &self.columns {
            None => batch.columns().collect(),
            Some(names) => names.iter().map(|n| Ok((n.as_str(), batch.column(n)?))).collect::<Result<_, OpError>>()?,
        };
        let temp = self.temp_path();
        let out = self.out.as_mut().ok_or_else(|| OpError::msg("jsonl_sink written before start"))?;
        for row in 0..batch.rows() {
            let mut object = serde_json::Map::new();
            for (name, column) in &columns {
                object.insert(name.to_string(), cell(column, row));
            }
            serde_json::to_writer(&mut *out, &object).map_err(|e| OpError::io(&temp, e.into()))?;
            out.write_all(b"\n").map_err(|e| OpError::io(&temp, e))?;
        }
        Ok(())
    }

    fn finish(&mut self, _ctx: &mut OpContext) -> Result<(), OpError> {
        let temp = self.temp_path();
        if let Some(mut out) = self.out.take() {
            out.flush().map_err(|e| OpError::io(&temp, e))?;
            std::fs::rename(&temp, &self.path).map_err(|e| OpError::io(&self.path, e))?;
        }
        Ok(())
    }
}

fn cell(column: &Column, row: usize) -> Value {
    match column {
        Column::I64(v) => json!(v[row]),
        Column::F64(v) => json!(v[row]),
        Column::Str(v) => json!(v[row]),
        Column::Bytes(v) => json!({ "len": v[row].len() }),
        Column::U8Tensor { shape, .. }
        | Column::F32Tensor { shape, .. }
        | Column::I64Tensor { shape, .. }
        | Column::F32Device { shape, .. } => {
            json!({ "shape": shape })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_bytes::ByteBuf;

    #[test]
    fn writes_rows_and_renames_into_place_at_finish() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("part-00000.jsonl");
        let mut sink = JsonlSink { path: path.clone(), columns: None, out: None };
        let mut ctx = OpContext::detached("out");
        sink.start(&mut ctx).unwrap();
        let batch = Batch::new()
            .with("key", Column::I64(vec![7]))
            .unwrap()
            .with("image", Column::Bytes(vec![ByteBuf::from(vec![1, 2, 3])]))
            .unwrap();
        sink.write(batch, &mut ctx).unwrap();
        assert!(!path.exists(), "the final name appears only once complete");
        sink.finish(&mut ctx).unwrap();
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "{\"key\":7,\"image\":{\"len\":3}}\n");
    }

    #[test]
    fn names_a_missing_column() {
        let dir = tempfile::tempdir().unwrap();
        let mut sink = JsonlSink { path: dir.path().join("p.jsonl"), columns: Some(vec!["caption".into()]), out: None };
        let mut ctx = OpContext::detached("out");
        sink.start(&mut ctx).unwrap();
        let batch = Batch::new().with("key", Column::I64(vec![7])).unwrap();
        let err = sink.write(batch, &mut ctx).unwrap_err();
        assert_eq!(err.to_string(), "missing column `caption` (batch has: {key: i64})");
    }
}
