//! [`Batch`]: the unit of data that flows between operators.

use std::borrow::Cow;

use serde::{Deserialize, Serialize};
use serde_bytes::ByteBuf;

use super::{Column, ColumnType, Field, Schema};

/// Why a batch could not be built or read.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum DataError {
    /// The batch has no column of that name.
    #[error("missing column `{name}` (batch has: {available})")]
    MissingColumn {
        /// The column asked for.
        name: String,
        /// The columns the batch has.
        available: String,
    },
    /// The column exists with another type.
    #[error("column `{name}` is {found}, expected {expected}")]
    WrongType {
        /// The column asked for.
        name: String,
        /// The type asked for.
        expected: ColumnType,
        /// The type it has.
        found: ColumnType,
    },
    /// A column's values could not be copied from their device.
    #[error("column `{name}`: its values could not leave their device: {message}")]
    Device {
        /// The column.
        name: String,
        /// What the device said.
        message: String,
    },
    /// A column's row count differs from the batch's.
    #[error("column `{name}` has {found} rows but the batch has {expected}")]
    RowCount {
        /// The column added.
        name: String,
        /// Rows in the batch.
        expected: usize,
        /// Rows in the column.
        found: usize,
    },
}

/// A set of rows stored as named columns: one epoch's slice of a stream on one worker.
///
/// ```
/// use latentflow_engine::{Batch, Column};
/// let batch = Batch::new()
///     .with(
///         "key",
///         Column::I64(vec![1, 2]),
///     )
///     .unwrap()
///     .with("caption", Column::Str(vec!["a cat".into(), "a dog".into()]))
///     .unwrap();
/// assert_eq!(batch.rows(), 2);
/// assert_eq!(batch.i64s("key").unwrap(), &[1, 2]);
/// ```
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Batch {
    rows: usize,
    columns: Vec<(String, Column)>,
}

impl Batch {
    /// An empty batch with no columns.
    pub fn new() -> Self {
        Batch::default()
    }

    /// Number of rows.
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// True when the batch has no rows.
    pub fn is_empty(&self) -> bool {
        self.rows == 0
    }

    /// Adds (or replaces) a column and returns the batch, for building in one expression.
    pub fn with(mut self, name: impl Into<String>, column: Column) -> Result<Self, DataError> {
        self.insert(name, column)?;
        Ok(self)
    }

    /// Adds a column, replacing one of the same name. The first column sets the row count.
    pub fn insert(&mut self, name: impl Into<String>, column: Column) -> Result<(), DataError> {
        let name = name.into();
        let others = self.columns.iter().filter(|(n, _)| *n != name).count();
        if others > 0 && column.len() != self.rows {
            return Err(DataError::RowCount { name, expected: self.rows, found: column.len() });
        }
        self.rows = column.len();
        match self.columns.iter_mut().find(|(n, _)| *n == name) {
            Some((_, existing)) => *existing = column,
            None => self.columns.push((name, column)),
        }
        Ok(())
    }

    /// Removes a column and returns it.
    pub fn remove(&mut self, name: &str) -> Option<Column> {
        let at = self.columns.iter().position(|(n, _)| n == name)?;
        let (_, column) = self.columns.remove(at);
        if self.columns.is_empty() {
            self.rows = 0;
        }
        Some(column)
    }

    /// The column named `name`.
    pub fn column(&self, name: &str) -> Result<&Column, DataError> {
        self.columns
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, c)| c)
            .ok_or_else(|| DataError::MissingColumn { name: name.to_string(), available: self.schema().to_string() })
    }

    /// The columns in order.
    pub fn columns(&self) -> impl Iterator<Item = (&str, &Column)> {
        self.columns.iter().map(|(n, c)| (n.as_str(), c))
    }

    /// An `i64` column's values.
    pub fn i64s(&self, name: &str) -> Result<&[i64], DataError> {
        match self.column(name)? {
            Column::I64(v) => Ok(v),
            other => Err(wrong_type(name, ColumnType::I64, other)),
        }
    }

    /// A string column's values.
    pub fn strs(&self, name: &str) -> Result<&[String], DataError> {
        match self.column(name)? {
            Column::Str(v) => Ok(v),
            other => Err(wrong_type(name, ColumnType::Str, other)),
        }
    }

    /// A bytes column's values.
    pub fn bytes(&self, name: &str) -> Result<&[ByteBuf], DataError> {
        match self.column(name)? {
            Column::Bytes(v) => Ok(v),
            other => Err(wrong_type(name, ColumnType::Bytes, other)),
        }
    }

    /// An f32 tensor column's per-row shape and values on the host (device values copied).
    pub fn f32_tensor(&self, name: &str) -> Result<(&[usize], Cow<'_, [f32]>), DataError> {
        let column = self.column(name)?;
        match column.f32_values() {
            Some(values) => values.map_err(|message| DataError::Device { name: name.to_string(), message }),
            None => Err(wrong_type(name, ColumnType::F32Tensor, column)),
        }
    }

    /// Keeps the rows whose entry in `keep` is true, in every column.
    ///
    /// # Panics
    /// If `keep.len()` differs from [`Batch::rows`].
    pub fn retain_rows(&mut self, keep: &[bool]) {
        assert_eq!(keep.len(), self.rows, "row mask length must equal the row count");
        for (_, column) in &mut self.columns {
            column.retain_rows(keep);
        }
        self.rows = keep.iter().filter(|k| **k).count();
    }

    /// Approximate heap bytes held by the batch.
    pub fn byte_size(&self) -> usize {
        self.columns.iter().map(|(n, c)| n.len() + c.byte_size()).sum()
    }

    /// The batch's column names and types.
    pub fn schema(&self) -> Schema {
        Schema::new(self.columns.iter().map(|(n, c)| Field::new(n.clone(), c.column_type())).collect())
    }

    /// A printable key for row `row`: the `key` column when present, else the row number.
    pub fn row_key(&self, row: usize) -> String {
        match self.i64s("key") {
            Ok(keys) if row < keys.len() => keys[row].to_string(),
            _ => format!("row {row}"),
        }
    }
}

fn wrong_type(name: &str, expected: ColumnType, found: &Column) -> DataError {
    DataError::WrongType { name: name.to_string(), expected, found: found.column_type() }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn insert_checks_row_counts_and_replaces() {
        let mut b = Batch::new().with("key", Column::I64(vec![1, 2, 3])).unwrap();
        let err = b.insert("caption", Column::Str(vec!["x".into()])).unwrap_err();
        assert_eq!(err.to_string(), "column `caption` has 1 rows but the batch has 3");
        b.insert("key", Column::I64(vec![4, 5, 6])).unwrap();
        assert_eq!(b.i64s("key").unwrap(), &[4, 5, 6]);
        // Replacing the only column may change the row count.
        b.insert("key", Column::I64(vec![7])).unwrap();
        assert_eq!(b.rows(), 1);
    }

    #[test]
    fn typed_access_names_the_problem() {
        let b = Batch::new().with("key", Column::I64(vec![1])).unwrap();
        assert_eq!(b.strs("key").unwrap_err().to_string(), "column `key` is i64, expected str");
        assert_eq!(b.strs("caption").unwrap_err().to_string(), "missing column `caption` (batch has: {key: i64})");
    }

    #[test]
    fn retain_rows_updates_every_column() {
        let mut b = Batch::new()
            .with("key", Column::I64(vec![1, 2, 3]))
            .unwrap()
            .with("caption", Column::Str(vec!["a".into(), "b".into(), "c".into()]))
            .unwrap();
        b.retain_rows(&[true, false, true]);
        assert_eq!(b.rows(), 2);
        assert_eq!(b.strs("caption").unwrap(), &["a".to_string(), "c".to_string()]);
        assert_eq!(b.row_key(1), "3");
    }
}
