//! One named column of a [`Batch`](super::Batch): a typed vector with one entry per row.

use serde::{Deserialize, Serialize};
use serde_bytes::ByteBuf;

use super::ColumnType;

/// The values of one column, one entry per row.
///
/// Tensor columns hold a fixed per-row `shape` and the rows' values back to back, so a batch of
/// image crops is one allocation. Byte payloads and f32 tensors are serialized as byte strings
/// (`serde_bytes`, `f32_bytes`) so they cross processes as raw bytes rather than as a list of
/// numbers.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum Column {
    /// 64-bit integers (keys, sizes).
    I64(Vec<i64>),
    /// 64-bit floats.
    F64(Vec<f64>),
    /// UTF-8 strings (captions).
    Str(Vec<String>),
    /// Opaque byte strings (encoded images).
    Bytes(Vec<ByteBuf>),
    /// A `u8` tensor per row (image crops, CHW).
    U8Tensor {
        /// Shape of one row.
        shape: Vec<usize>,
        /// Row-major values of every row, back to back.
        #[serde(with = "serde_bytes")]
        data: Vec<u8>,
    },
    /// An `f32` tensor per row (latents, embeddings).
    F32Tensor {
        /// Shape of one row.
        shape: Vec<usize>,
        /// Row-major values of every row, back to back (crossing processes as bytes).
        #[serde(with = "super::f32_bytes")]
        data: Vec<f32>,
    },
    /// An `i64` tensor per row (token ids).
    I64Tensor {
        /// Shape of one row.
        shape: Vec<usize>,
        /// Row-major values of every row, back to back.
        data: Vec<i64>,
    },
}

impl Column {
    /// The column's type, as schemas and error messages name it.
    pub fn column_type(&self) -> ColumnType {
        match self {
            Column::I64(_) => ColumnType::I64,
            Column::F64(_) => ColumnType::F64,
            Column::Str(_) => ColumnType::Str,
            Column::Bytes(_) => ColumnType::Bytes,
            Column::U8Tensor { .. } => ColumnType::U8Tensor,
            Column::F32Tensor { .. } => ColumnType::F32Tensor,
            Column::I64Tensor { .. } => ColumnType::I64Tensor,
        }
    }

    /// Number of rows.
    pub fn len(&self) -> usize {
        match self {
            Column::I64(v) => v.len(),
            Column::F64(v) => v.len(),
            Column::Str(v) => v.len(),
            Column::Bytes(v) => v.len(),
            Column::U8Tensor { shape, data } => rows_of(shape, data.len()),
            Column::F32Tensor { shape, data } => rows_of(shape, data.len()),
            Column::I64Tensor { shape, data } => rows_of(shape, data.len()),
        }
    }

    /// True when the column has no rows.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Approximate heap bytes held by the values (what memory budgets count).
    pub fn byte_size(&self) -> usize {
        match self {
            Column::I64(v) => v.len() * 8,
            Column::F64(v) => v.len() * 8,
            Column::Str(v) => v.iter().map(|s| s.len() + 24).sum(),
            Column::Bytes(v) => v.iter().map(|b| b.len() + 24).sum(),
            Column::U8Tensor { data, .. } => data.len(),
            Column::F32Tensor { data, .. } => data.len() * 4,
            Column::I64Tensor { data, .. } => data.len() * 8,
        }
    }

    /// Keeps the rows whose entry in `keep` is true, in order.
    ///
    /// # Panics
    /// If `keep.len()` differs from the number of rows.
    pub fn retain_rows(&mut self, keep: &[bool]) {
        assert_eq!(keep.len(), self.len(), "row mask length must equal the row count");
        fn retain<T>(values: &mut Vec<T>, keep: &[bool]) {
            let mut flags = keep.iter();
            values.retain(|_| *flags.next().unwrap_or(&false));
        }
        fn retain_rows_of<T: Copy>(data: &mut Vec<T>, row: usize, keep: &[bool]) {
            let mut out = Vec::with_capacity(data.len());
            for (chunk, &k) in data.chunks_exact(row.max(1)).zip(keep) {
                if k {
                    out.extend_from_slice(chunk);
                }
            }
            *data = out;
        }
        match self {
            Column::I64(v) => retain(v, keep),
            Column::F64(v) => retain(v, keep),
            Column::Str(v) => retain(v, keep),
            Column::Bytes(v) => retain(v, keep),
            Column::U8Tensor { shape, data } => retain_rows_of(data, row_len(shape), keep),
            Column::F32Tensor { shape, data } => retain_rows_of(data, row_len(shape), keep),
            Column::I64Tensor { shape, data } => retain_rows_of(data, row_len(shape), keep),
        }
    }
}

/// Number of values in one row of a tensor with this per-row shape.
pub fn row_len(shape: &[usize]) -> usize {
    shape.iter().product()
}

fn rows_of(shape: &[usize], values: usize) -> usize {
    match row_len(shape) {
        0 => 0,
        n => values / n,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retain_rows_keeps_tensor_rows_whole() {
        let mut c = Column::U8Tensor { shape: vec![2], data: vec![1, 2, 3, 4, 5, 6] };
        c.retain_rows(&[true, false, true]);
        assert_eq!(c, Column::U8Tensor { shape: vec![2], data: vec![1, 2, 5, 6] });
        assert_eq!(c.len(), 2);
    }

    #[test]
    fn retain_rows_on_plain_columns() {
        let mut c = Column::Str(vec!["a".into(), "b".into()]);
        c.retain_rows(&[false, true]);
        assert_eq!(c, Column::Str(vec!["b".into()]));
    }
}
