//! Parquet and file plumbing for the sources and sinks: path expansion, column resolution and
//! atomic writing.

pub mod columns;
pub mod counted_file;
pub mod files;
pub mod tensors;
pub mod writer;

pub use columns::{extract, resolve, ColumnNames, Resolved, Rows};
pub use writer::{AtomicParquetWriter, Pages};
