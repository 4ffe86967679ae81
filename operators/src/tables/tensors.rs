//! Tensor columns in parquet, in every layout latents files come in: latentflow's raw bytes
//! (little-endian f32, shape in the file's `latentflow.*` metadata), Ray Data's tensor extension
//! types (`ray.data.arrow_tensor` on `list<T>` and `ray.data.arrow_tensor_v2` on
//! `large_list<T>`, shape as a JSON list in `ARROW:extension:metadata`), Arrow's canonical
//! `arrow.fixed_shape_tensor` (`fixed_size_list<T>`, `{"shape": [...]}`), and plain lists or
//! fixed-size lists. Elements may be f16, f32 or f64; rows are read as f32.

use std::collections::HashMap;
use std::sync::Arc;

use arrow_array::cast::AsArray;
use arrow_array::types::Float32Type;
use arrow_array::{Array, ArrayRef, BinaryArray, FixedSizeListArray, Float32Array, LargeListArray};
use arrow_buffer::OffsetBuffer;
use arrow_schema::{DataType, Field};
use serde::{Deserialize, Serialize};

/// The field metadata key naming an Arrow extension type.
pub const EXTENSION_NAME: &str = "ARROW:extension:name";
/// The field metadata key holding an extension type's parameters.
pub const EXTENSION_METADATA: &str = "ARROW:extension:metadata";
/// Ray Data's first tensor type (`list<T>` storage).
pub const RAY_TENSOR_V1: &str = "ray.data.arrow_tensor";
/// Ray Data's tensor type for large tensors (`large_list<T>` storage), what the reference writes.
pub const RAY_TENSOR_V2: &str = "ray.data.arrow_tensor_v2";
/// Arrow's canonical fixed-shape tensor (`fixed_size_list<T>` storage).
pub const FIXED_SHAPE_TENSOR: &str = "arrow.fixed_shape_tensor";

/// How `latents_sink` writes a tensor column.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TensorLayout {
    /// Ray Data's `ray.data.arrow_tensor_v2` on `large_list<float>`: what the reference writes and
    /// `ray.data.read_parquet` reads as arrays of the right shape.
    #[default]
    Ray,
    /// Arrow's canonical `arrow.fixed_shape_tensor` on `fixed_size_list<float>` (pyarrow's
    /// `FixedShapeTensorArray.to_numpy_ndarray()`).
    FixedShapeTensor,
    /// Raw little-endian f32 bytes; the shape only in the file's `latentflow.*` metadata.
    Bytes,
}

/// How a column found in a file holds its tensors.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Stored {
    /// Raw little-endian f32 bytes.
    Bytes,
    /// One list (or fixed-size list) of numbers per row.
    Numbers,
}

/// A tensor column as found in a file's schema: its layout and, when the column says, its shape.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Found {
    /// Bytes or numbers.
    pub stored: Stored,
    /// The per-row shape from the extension metadata (`None`: not in the column).
    pub shape: Option<Vec<usize>>,
    /// Elements per row a fixed-size list fixes.
    pub fixed_len: Option<usize>,
}

/// What a column of `field`'s type and metadata holds, or why it is no tensor column.
pub fn find(field: &Field) -> Result<Found, String> {
    let metadata = field.metadata();
    let extension = metadata.get(EXTENSION_NAME).map(String::as_str);
    let parameters = metadata.get(EXTENSION_METADATA).map(String::as_str).unwrap_or("");
    let shape = match extension {
        Some(RAY_TENSOR_V1 | RAY_TENSOR_V2) => Some(
            serde_json::from_str::<Vec<usize>>(parameters)
                .map_err(|_| format!("`{}`: {parameters:?} is not a Ray tensor shape", field.name()))?,
        ),
        Some(FIXED_SHAPE_TENSOR) => {
            #[derive(Deserialize)]
            struct Parameters {
                shape: Vec<usize>,
            }
            Some(
                serde_json::from_str::<Parameters>(parameters)
                    .map_err(|_| format!("`{}`: {parameters:?} is not a fixed_shape_tensor shape", field.name()))?
                    .shape,
            )
        }
        _ => None,
    };
    let numeric = |t: &DataType| matches!(t, DataType::Float16 | DataType::Float32 | DataType::Float64);
    match field.data_type() {
        DataType::Binary | DataType::LargeBinary => Ok(Found { stored: Stored::Bytes, shape: None, fixed_len: None }),
        DataType::List(item) | DataType::LargeList(item) if numeric(item.data_type()) => {
            Ok(Found { stored: Stored::Numbers, shape, fixed_len: None })
        }
        DataType::FixedSizeList(item, n) if numeric(item.data_type()) => {
            Ok(Found { stored: Stored::Numbers, shape, fixed_len: Some(*n as usize) })
        }
        other => Err(format!(
            "`{}` is {other}; a tensor column is binary (latentflow's bytes), a list or fixed-size list of floats \
             (Ray's tensor types, arrow.fixed_shape_tensor)",
            field.name()
        )),
    }
}

/// Row `row` of a tensor column as f32 values (`None` when null).
pub fn row_values(array: &ArrayRef, row: usize) -> Result<Option<Vec<f32>>, String> {
    if array.is_null(row) {
        return Ok(None);
    }
    let values: ArrayRef = match array.data_type() {
        DataType::Binary => {
            let bytes = array.as_binary::<i32>().value(row);
            return Ok(Some(le_floats(bytes)));
        }
        DataType::LargeBinary => return Ok(Some(le_floats(array.as_binary::<i64>().value(row)))),
        DataType::List(_) => array.as_list::<i32>().value(row),
        DataType::LargeList(_) => array.as_list::<i64>().value(row),
        DataType::FixedSizeList(..) => array.as_fixed_size_list().value(row),
        other => return Err(format!("{other} is not a tensor column")),
    };
    let floats = arrow_cast::cast(&values, &DataType::Float32).map_err(|e| e.to_string())?;
    Ok(Some(floats.as_primitive::<Float32Type>().values().to_vec()))
}

fn le_floats(bytes: &[u8]) -> Vec<f32> {
    bytes.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect()
}

/// The field `layout` writes a column of per-row `shape` under.
pub fn field(name: &str, layout: TensorLayout, shape: &[usize]) -> Field {
    let item = Arc::new(Field::new("item", DataType::Float32, true));
    let shape_json = serde_json::to_string(shape).expect("shape");
    let (data_type, metadata) = match layout {
        TensorLayout::Bytes => (DataType::Binary, HashMap::new()),
        TensorLayout::Ray => (
            DataType::LargeList(item),
            HashMap::from([
                (EXTENSION_NAME.to_string(), RAY_TENSOR_V2.to_string()),
                (EXTENSION_METADATA.to_string(), shape_json),
            ]),
        ),
        TensorLayout::FixedShapeTensor => (
            DataType::FixedSizeList(item, shape.iter().product::<usize>() as i32),
            HashMap::from([
                (EXTENSION_NAME.to_string(), FIXED_SHAPE_TENSOR.to_string()),
                (EXTENSION_METADATA.to_string(), format!("{{\"shape\":{shape_json}}}")),
            ]),
        ),
    };
    Field::new(name, data_type, false).with_metadata(metadata)
}

/// `rows` tensors of `per_row` values each (`values` holds them one after another) as a column
/// of `layout`.
pub fn column(layout: TensorLayout, values: &[f32], per_row: usize) -> Result<ArrayRef, String> {
    let rows = values.len().checked_div(per_row).unwrap_or(0);
    let item = Arc::new(Field::new("item", DataType::Float32, true));
    let floats = Arc::new(Float32Array::from(values.to_vec()));
    Ok(match layout {
        TensorLayout::Bytes => Arc::new(BinaryArray::from_iter_values(
            values.chunks(per_row.max(1)).map(|row| row.iter().flat_map(|v| v.to_le_bytes()).collect::<Vec<u8>>()),
        )),
        TensorLayout::Ray => Arc::new(
            LargeListArray::try_new(item, OffsetBuffer::from_lengths(std::iter::repeat_n(per_row, rows)), floats, None)
                .map_err(|e| e.to_string())?,
        ),
        TensorLayout::FixedShapeTensor => {
            Arc::new(FixedSizeListArray::try_new(item, per_row as i32, floats, None).map_err(|e| e.to_string())?)
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_layout_reads_back_its_values_and_shape() {
        let values: Vec<f32> = (0..24).map(|v| v as f32 * 0.5).collect();
        for layout in [TensorLayout::Ray, TensorLayout::FixedShapeTensor, TensorLayout::Bytes] {
            let field = field("t", layout, &[2, 3, 2]);
            let column = column(layout, &values, 12).unwrap();
            assert_eq!(column.data_type(), field.data_type(), "{layout:?}");
            let found = find(&field).unwrap();
            let want_shape = if layout == TensorLayout::Bytes { None } else { Some(vec![2, 3, 2]) };
            assert_eq!(found.shape, want_shape, "{layout:?}");
            assert_eq!(row_values(&column, 1).unwrap().unwrap(), values[12..], "{layout:?}");
        }
        let bad = Field::new("t", DataType::Utf8, false);
        assert!(find(&bad).unwrap_err().contains("is Utf8"));
    }
}
