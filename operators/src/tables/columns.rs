//! Finding the image, caption, key and filter columns in a parquet file's schema, and reading
//! them out of Arrow record batches. Both layouts users have read without conversion:
//! img2dataset / LAION (`jpg` binary) and Hugging Face datasets (`image` struct of
//! `{bytes, path}`).

use std::sync::Arc;

use arrow_array::cast::AsArray;
use arrow_array::{Array, ArrayRef, RecordBatch};
use arrow_schema::{DataType, Schema};

use crate::keys::KeyHasher;

/// Column names to read.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ColumnNames {
    /// Encoded image bytes (binary, or a struct with a `bytes` field); with `image_is_url`, a
    /// string column of image addresses instead.
    pub image: String,
    /// The `image` column holds URLs (strings), not bytes.
    pub image_is_url: bool,
    /// Caption text.
    pub caption: String,
    /// Row key: an integer column, or a string column read through [`crate::keys`] (`"000123"`
    /// is 123, other strings a stable hash). `None` means "use `hash` if the file has it, else
    /// number the rows".
    pub key: Option<String>,
    /// Numeric columns the filters read.
    pub numeric: Vec<String>,
    /// String columns passed through to the rows (img2dataset's `sha256`, `url`, ...).
    pub extra: Vec<String>,
}

/// Where each wanted column is in a file (indices into its top-level fields).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Resolved {
    /// The image column; for a struct column, the index of its `bytes` child.
    pub image: (usize, Option<usize>),
    /// The caption column.
    pub caption: usize,
    /// The key column, if any.
    pub key: Option<usize>,
    /// The numeric columns, in [`ColumnNames::numeric`] order.
    pub numeric: Vec<usize>,
    /// The passed-through string columns, in [`ColumnNames::extra`] order.
    pub extra: Vec<usize>,
}

impl Resolved {
    /// Top-level columns to read (the projection).
    pub fn roots(&self) -> Vec<usize> {
        let mut roots: Vec<usize> = [self.image.0, self.caption]
            .into_iter()
            .chain(self.key)
            .chain(self.numeric.iter().chain(&self.extra).copied())
            .collect();
        roots.sort_unstable();
        roots.dedup();
        roots
    }
}

/// Resolves `names` in `schema`, or says which column is missing or mistyped and which
/// columns the file has. Errors come with the config key they concern (`image_column`, ...).
pub fn resolve(schema: &Schema, names: &ColumnNames) -> Result<Resolved, (&'static str, String)> {
    resolve_inner(schema, names).map_err(|message| {
        let key = if message.contains("image column") {
            "image_column"
        } else if message.contains("caption column") {
            "caption_column"
        } else if message.contains("key column") {
            "key_column"
        } else if message.contains("extra column") {
            "extra_columns"
        } else {
            "filter"
        };
        (key, message)
    })
}

fn resolve_inner(schema: &Schema, names: &ColumnNames) -> Result<Resolved, String> {
    let found =
        || schema.fields().iter().map(|f| format!("{} ({})", f.name(), f.data_type())).collect::<Vec<_>>().join(", ");
    let index = |name: &str| schema.index_of(name).ok();
    let missing = |what: &str, name: &str| format!("no {what} column `{name}`; the file has: {}", found());
    let image_at = index(&names.image).ok_or_else(|| missing("image", &names.image))?;
    let image = match schema.field(image_at).data_type() {
        t if names.image_is_url => {
            if !is_string(t) {
                return Err(format!(
                    "image column `{}` is {t}, expected a string of URLs; the file has: {}",
                    names.image,
                    found()
                ));
            }
            (image_at, None)
        }
        DataType::Binary | DataType::LargeBinary | DataType::BinaryView => (image_at, None),
        DataType::Struct(fields) => match fields.iter().position(|f| f.name() == "bytes" && is_binary(f.data_type())) {
            Some(child) => (image_at, Some(child)),
            None => {
                return Err(format!(
                    "image column `{}` is a struct without a binary `bytes` field; the file has: {}",
                    names.image,
                    found()
                ))
            }
        },
        other => {
            return Err(format!(
                "image column `{}` is {other}, expected binary or a struct {{bytes, path}}; the file has: {}",
                names.image,
                found()
            ))
        }
    };
    // A column `name` (`what` says which, in messages) whose type passes `ok`.
    let typed = |what: &str, name: &str, ok: fn(&DataType) -> bool, expected: &str| -> Result<usize, String> {
        let at = index(name).ok_or_else(|| missing(what, name))?;
        let t = schema.field(at).data_type();
        if !ok(t) {
            return Err(format!("{what} column `{name}` is {t}, expected {expected}; the file has: {}", found()));
        }
        Ok(at)
    };
    let caption = typed("caption", &names.caption, is_string, "a string")?;
    let key = match &names.key {
        Some(name) => Some(typed("key", name, |t| t.is_integer() || is_string(t), "an integer or a string")?),
        None => index("hash").filter(|&at| schema.field(at).data_type().is_integer()),
    };
    let numeric =
        names.numeric.iter().map(|n| typed("filter", n, DataType::is_numeric, "a number")).collect::<Result<_, _>>()?;
    let extra = names.extra.iter().map(|n| typed("extra", n, is_string, "a string")).collect::<Result<_, _>>()?;
    Ok(Resolved { image, caption, key, numeric, extra })
}

fn is_string(t: &DataType) -> bool {
    matches!(t, DataType::Utf8 | DataType::LargeUtf8 | DataType::Utf8View)
}

fn is_binary(t: &DataType) -> bool {
    matches!(t, DataType::Binary | DataType::LargeBinary | DataType::BinaryView)
}

/// The wanted columns of one record batch, row by row.
pub struct Rows {
    /// Image bytes (`None` when null).
    pub images: Vec<Option<Vec<u8>>>,
    /// Captions (`None` when null).
    pub captions: Vec<Option<String>>,
    /// Keys, when the file has a key column.
    pub keys: Option<Vec<Option<i64>>>,
    /// Numeric columns as f64 (`None` when null), in [`ColumnNames::numeric`] order.
    pub numeric: Vec<Vec<Option<f64>>>,
    /// The passed-through string columns (`None` when null), in [`ColumnNames::extra`] order.
    pub extra: Vec<Vec<Option<String>>>,
}

/// Extracts the wanted columns from a record batch read with the projection of `resolved`
/// (so its columns are the projected roots, in file order). String keys go through `keys`,
/// which counts hash collisions.
pub fn extract(batch: &RecordBatch, resolved: &Resolved, keys: &mut KeyHasher) -> Result<Rows, String> {
    let roots = resolved.roots();
    let column = |root: usize| -> &ArrayRef { batch.column(roots.iter().position(|&r| r == root).expect("projected")) };
    let image_column = match resolved.image.1 {
        None => Arc::clone(column(resolved.image.0)),
        Some(child) => {
            let parent = column(resolved.image.0).as_struct();
            let bytes = Arc::clone(parent.column(child));
            // A null struct means a null image even if its child has a value.
            match parent.nulls() {
                Some(nulls) => arrow_array::make_array(
                    bytes.to_data().into_builder().nulls(Some(nulls.clone())).build().map_err(|e| e.to_string())?,
                ),
                None => bytes,
            }
        }
    };
    let images = if is_string(image_column.data_type()) {
        string_values(&image_column)?.into_iter().map(|v| v.map(String::into_bytes)).collect()
    } else {
        binary_values(&image_column)?
    };
    let captions = string_values(column(resolved.caption))?;
    let keys = resolved.key.map(|k| key_values(column(k), keys)).transpose()?;
    let numeric = resolved.numeric.iter().map(|&n| numeric_f64(column(n))).collect::<Result<_, _>>()?;
    let extra = resolved.extra.iter().map(|&n| string_values(column(n))).collect::<Result<_, _>>()?;
    Ok(Rows { images, captions, keys, numeric, extra })
}

fn binary_values(array: &ArrayRef) -> Result<Vec<Option<Vec<u8>>>, String> {
    Ok(match array.data_type() {
        DataType::Binary => array.as_binary::<i32>().iter().map(|v| v.map(<[u8]>::to_vec)).collect(),
        DataType::LargeBinary => array.as_binary::<i64>().iter().map(|v| v.map(<[u8]>::to_vec)).collect(),
        DataType::BinaryView => array.as_binary_view().iter().map(|v| v.map(<[u8]>::to_vec)).collect(),
        other => return Err(format!("image column is {other}")),
    })
}

fn string_values(array: &ArrayRef) -> Result<Vec<Option<String>>, String> {
    Ok(match array.data_type() {
        DataType::Utf8 => array.as_string::<i32>().iter().map(|v| v.map(str::to_string)).collect(),
        DataType::LargeUtf8 => array.as_string::<i64>().iter().map(|v| v.map(str::to_string)).collect(),
        DataType::Utf8View => array.as_string_view().iter().map(|v| v.map(str::to_string)).collect(),
        other => return Err(format!("caption column is {other}")),
    })
}

fn numeric_f64(array: &ArrayRef) -> Result<Vec<Option<f64>>, String> {
    let cast = arrow_cast::cast(array, &DataType::Float64).map_err(|e| e.to_string())?;
    Ok(cast.as_primitive::<arrow_array::types::Float64Type>().iter().collect())
}

/// An integer key column as i64, or a string one through [`KeyHasher::key`].
pub fn key_values(array: &ArrayRef, keys: &mut KeyHasher) -> Result<Vec<Option<i64>>, String> {
    if is_string(array.data_type()) {
        return Ok(string_values(array)?.into_iter().map(|v| v.map(|text| keys.key(&text))).collect());
    }
    numeric_i64(array)
}

fn numeric_i64(array: &ArrayRef) -> Result<Vec<Option<i64>>, String> {
    let cast = arrow_cast::cast(array, &DataType::Int64).map_err(|e| e.to_string())?;
    Ok(cast.as_primitive::<arrow_array::types::Int64Type>().iter().collect())
}
