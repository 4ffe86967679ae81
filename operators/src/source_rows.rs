//! The rows every source emits: `key` (i64), `caption` (str) and `image` (encoded bytes), what
//! `image_transform` and `tokenize` read.

use latentflow_engine::{Batch, Column, ColumnType, Field, OpError, Ports};
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
