//! One named column of a [`Batch`](super::Batch): a typed vector with one entry per row.

use std::borrow::Cow;

use serde::{Deserialize, Serialize, Serializer};
use serde_bytes::ByteBuf;

use super::{ColumnType, DeviceValues};

/// The values of one column, one entry per row.
///
/// Tensor columns hold a fixed per-row `shape` and the rows' values back to back, so a batch of
/// image crops is one allocation. Byte payloads and f32 tensors are serialized as byte strings
/// (`serde_bytes`, `f32_bytes`) so they cross processes as raw bytes rather than as a list of
/// numbers. An f32 tensor column may also hold its values on a device ([`Column::F32Device`]);
/// it has the type `F32Tensor` all the same, and crosses processes as a host `F32Tensor`.
#[derive(Clone, Debug, PartialEq, Deserialize)]
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
    /// An `f32` tensor per row whose values stay on the device that computed them (an
    /// encoder's output for a trainer on the same device); type `F32Tensor`.
    #[serde(skip_deserializing)]
    F32Device {
        /// Shape of one row.
        shape: Vec<usize>,
        /// Row-major values of every row, back to back.
        values: DeviceValues,
    },
}

/// [`Column`] as it crosses processes: device values as a host `F32Tensor` (the variants in
/// `Column`'s order, so `Column`'s derived deserializer reads them).
#[derive(Serialize)]
#[serde(rename = "Column")]
enum ColumnOnWire<'a> {
    I64(&'a [i64]),
    F64(&'a [f64]),
    Str(&'a [String]),
    Bytes(&'a [ByteBuf]),
    U8Tensor {
        shape: &'a [usize],
        #[serde(with = "serde_bytes")]
        data: &'a [u8],
    },
    F32Tensor {
        shape: &'a [usize],
        #[serde(serialize_with = "super::f32_bytes::serialize")]
        data: &'a [f32],
    },
    I64Tensor {
        shape: &'a [usize],
        data: &'a [i64],
    },
}

impl Serialize for Column {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        match self {
            Column::I64(v) => ColumnOnWire::I64(v),
            Column::F64(v) => ColumnOnWire::F64(v),
            Column::Str(v) => ColumnOnWire::Str(v),
            Column::Bytes(v) => ColumnOnWire::Bytes(v),
            Column::U8Tensor { shape, data } => ColumnOnWire::U8Tensor { shape, data },
            Column::F32Tensor { shape, data } => ColumnOnWire::F32Tensor { shape, data },
            Column::I64Tensor { shape, data } => ColumnOnWire::I64Tensor { shape, data },
            Column::F32Device { shape, values } => {
                let data = values.to_host().map_err(serde::ser::Error::custom)?;
                return ColumnOnWire::F32Tensor { shape, data: &data }.serialize(serializer);
            }
        }
        .serialize(serializer)
    }
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
            Column::F32Tensor { .. } | Column::F32Device { .. } => ColumnType::F32Tensor,
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
            Column::F32Device { shape, values } => rows_of(shape, values.len()),
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
            Column::F32Device { values, .. } => values.len() * 4,
        }
    }

    /// An f32 tensor column's per-row shape and values on the host: a host column's own, or a
    /// copy of device values. `None` for other columns.
    ///
    /// ```
    /// use latentflow_engine::Column;
    /// let column = Column::F32Tensor { shape: vec![2], data: vec![1.0, 2.0, 3.0, 4.0] };
    /// let (shape, values) = column.f32_values().unwrap().unwrap();
    /// assert_eq!((shape, &values[..]), (&[2][..], &[1.0, 2.0, 3.0, 4.0][..]));
    /// ```
    #[allow(clippy::type_complexity)]
    pub fn f32_values(&self) -> Option<Result<(&[usize], Cow<'_, [f32]>), String>> {
        match self {
            Column::F32Tensor { shape, data } => Some(Ok((shape, Cow::Borrowed(data)))),
            Column::F32Device { shape, values } => Some(values.to_host().map(|v| (shape.as_slice(), Cow::Owned(v)))),
            _ => None,
        }
    }

    /// The column with device values copied to the host (`F32Device` becomes `F32Tensor`).
    pub fn into_host(self) -> Result<Column, String> {
        match self {
            Column::F32Device { shape, values } => Ok(Column::F32Tensor { shape, data: values.to_host()? }),
            other => Ok(other),
        }
    }

    /// Keeps the rows whose entry in `keep` is true, in order (device values come to the host).
    ///
    /// # Panics
    /// If `keep.len()` differs from the number of rows, or the device fails to copy its values.
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
            Column::F32Device { shape, values } => {
                let mut data = values.to_host().unwrap_or_else(|e| panic!("device values to filter rows: {e}"));
                retain_rows_of(&mut data, row_len(shape), keep);
                *self = Column::F32Tensor { shape: std::mem::take(shape), data };
            }
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
    use crate::data::DeviceTensor;

    /// Values "on a device" that count their copies to the host.
    #[derive(Debug)]
    struct Counted(Vec<f32>, std::sync::atomic::AtomicUsize);

    impl DeviceTensor for Counted {
        fn device(&self) -> String {
            "test:0".into()
        }
        fn len(&self) -> usize {
            self.0.len()
        }
        fn to_host(&self) -> Result<Vec<f32>, String> {
            self.1.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            Ok(self.0.clone())
        }
        fn as_any(&self) -> &dyn std::any::Any {
            self
        }
    }

    fn on_device(shape: Vec<usize>, values: Vec<f32>) -> Column {
        Column::F32Device { shape, values: DeviceValues::new(Counted(values, Default::default())) }
    }

    fn host_copies(column: &Column) -> usize {
        let Column::F32Device { values, .. } = column else { panic!("not on a device: {column:?}") };
        values.downcast_ref::<Counted>().unwrap().1.load(std::sync::atomic::Ordering::Relaxed)
    }

    #[test]
    fn device_columns_are_f32_tensors_that_cross_processes_as_host_values() {
        let column = on_device(vec![2], vec![1.0, 2.0, 3.0, 4.0, 5.0, 6.0]);
        assert_eq!((column.column_type(), column.len(), column.byte_size()), (ColumnType::F32Tensor, 3, 24));
        let moved = column.clone();
        assert_eq!(host_copies(&column), 0, "a clone shares the values");
        let json = serde_json::to_string(&moved).unwrap();
        let host = Column::F32Tensor { shape: vec![2], data: vec![1.0, 2.0, 3.0, 4.0, 5.0, 6.0] };
        assert_eq!(json, serde_json::to_string(&host).unwrap(), "serialized as the host column");
        assert_eq!(serde_json::from_str::<Column>(&json).unwrap(), host);
        assert_eq!(host_copies(&column), 1);
        let (shape, values) = column.f32_values().unwrap().unwrap();
        assert_eq!((shape, &values[..]), (&[2][..], &[1.0, 2.0, 3.0, 4.0, 5.0, 6.0][..]));
        assert_eq!(column.clone().into_host().unwrap(), host);
    }

    #[test]
    fn filtering_device_rows_brings_them_to_the_host() {
        let mut column = on_device(vec![2], vec![1.0, 2.0, 3.0, 4.0, 5.0, 6.0]);
        column.retain_rows(&[true, false, true]);
        assert_eq!(column, Column::F32Tensor { shape: vec![2], data: vec![1.0, 2.0, 5.0, 6.0] });
    }

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
