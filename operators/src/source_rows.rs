//! The rows every source emits: `key` (i64), `caption` (str) and `image` (encoded bytes), what
//! `image_transform` and `tokenize` read.

use latentflow_engine::{Batch, Column, ColumnType, Field, InstanceContext, OpError, Ports};
use serde_bytes::ByteBuf;

/// The columns a source adds.
pub fn ports() -> Ports {
    Ports {
        adds: vec![
            Field::new("key", ColumnType::I64),
            Field::new("caption", ColumnType::Str),
            Field::new("image", ColumnType::Bytes),
        ],
        ..Ports::default()
    }
}

/// A batch of source rows (the three vectors have one entry per row).
///
/// ```
/// use latentflow_operators::source_rows;
/// let batch = source_rows::batch(vec![7], vec!["a cat".into()], vec![b"jpeg".to_vec().into()]).unwrap();
/// assert_eq!(batch.i64s("key").unwrap(), &[7]);
/// ```
pub fn batch(keys: Vec<i64>, captions: Vec<String>, images: Vec<ByteBuf>) -> Result<Batch, OpError> {
    Ok(Batch::new()
        .with("key", Column::I64(keys))?
        .with("caption", Column::Str(captions))?
        .with("image", Column::Bytes(images))?)
}

/// Rows per epoch on each worker of a source whose topology sets no `batch_size` and whose
/// job trains nothing.
pub const DEFAULT_BATCH_SIZE: usize = 32;

/// The rows per epoch a source instance emits: its own `batch_size`, else the plan's share of
/// the trainer's `global_batch_size`, else [`DEFAULT_BATCH_SIZE`].
pub fn batch_size(ctx: &InstanceContext<'_>, configured: Option<usize>) -> usize {
    configured.or(ctx.batch_size).unwrap_or(DEFAULT_BATCH_SIZE)
}
