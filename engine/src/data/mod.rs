//! The data model: batches of named, typed columns, and the schemas that type-check edges.

mod batch;
mod column;
mod device_values;
mod f32_bytes;
mod schema;

pub use batch::{Batch, DataError};
pub use column::{row_len, Column};
pub use device_values::{DeviceTensor, DeviceValues};
pub use schema::{ColumnType, Field, Ports, Schema};
