//! `dedup`: drops rows whose content was seen before, on any worker of any process, counted as
//! `duplicate` rejections. The content key is the SHA-256 of the image bytes by default, or of
//! another column; a string column of 64 hex digits (img2dataset's `sha256`) is used as the hash
//! itself. The engine keeps the first row of each key with differential-dataflow's `distinct`,
//! holding only the 32-byte keys (memory O(distinct rows)).

use std::sync::Arc;

use latentflow_engine::{
    Batch, Column, ColumnType, ContentKey, ContentKeys, Field, InstanceContext, KeyError, NodeSpec, OpContext, OpError,
    OperatorConfig, OperatorImpl, OperatorKind, Ports,
};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// Config of `dedup`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DedupConfig {
    /// The column whose content identifies a row: `image` (default), `caption`, `key`, or a
    /// string column such as `sha256`.
    pub by: String,
}

impl Default for DedupConfig {
    fn default() -> Self {
        DedupConfig { by: "image".into() }
    }
}

impl OperatorConfig for DedupConfig {
    const TYPE: &'static str = "dedup";
    const KIND: OperatorKind = OperatorKind::Distinct;
    const SUMMARY: &'static str = "drop rows whose image (or another column) was seen before, over all workers";
    const EXAMPLE: &'static str = "by = \"image\"";
    const KEYS: &'static [(&'static str, &'static str)] = &[(
        "by",
        "column that identifies a row: \"image\" (default: SHA-256 of the bytes), \"caption\", \"key\", or a string column (64 hex digits are taken as the hash itself)",
    )];
}

impl DedupConfig {
    fn column_type(&self) -> ColumnType {
        match self.by.as_str() {
            "image" => ColumnType::Bytes,
            "key" => ColumnType::I64,
            _ => ColumnType::Str,
        }
    }
}

impl NodeSpec for DedupConfig {
    fn validate(&self) -> Vec<KeyError> {
        if self.by.trim().is_empty() {
            return vec![KeyError::new("by", "name the column that identifies a row (default \"image\")")];
        }
        Vec::new()
    }

    fn ports(&self) -> Ports {
        Ports { requires: vec![Field::new(&self.by, self.column_type())], ..Ports::default() }
    }

    fn instantiate(&self, _ctx: &InstanceContext<'_>) -> Result<OperatorImpl, OpError> {
        Ok(OperatorImpl::Distinct(Arc::new(Dedup { by: self.by.clone() })))
    }
}

/// The `dedup` keys.
#[derive(Debug)]
pub struct Dedup {
    by: String,
}

impl ContentKeys for Dedup {
    fn keys(&self, batch: &Batch, _ctx: &mut OpContext) -> Result<Vec<ContentKey>, OpError> {
        Ok(match batch.column(&self.by)? {
            Column::Bytes(values) => values.iter().map(|v| sha256(v)).collect(),
            Column::Str(values) => values.iter().map(|v| hex_hash(v).unwrap_or_else(|| sha256(v.as_bytes()))).collect(),
            Column::I64(values) => values.iter().map(|v| sha256(&v.to_le_bytes())).collect(),
            other => {
                return Err(OpError::msg(format!(
                    "`{}` is a {} column; dedup reads bytes, strings or i64",
                    self.by,
                    other.column_type()
                )))
            }
        })
    }
}

/// SHA-256 of `bytes`.
///
/// ```
/// let key = latentflow_operators::dedup::sha256(b"abc");
/// assert_eq!(key[..4], [0xba, 0x78, 0x16, 0xbf]);
/// ```
pub fn sha256(bytes: &[u8]) -> ContentKey {
    Sha256::digest(bytes).into()
}

/// A hash written as 64 hex digits, as img2dataset's `sha256` column holds it.
fn hex_hash(text: &str) -> Option<ContentKey> {
    let text = text.trim();
    if text.len() != 64 {
        return None;
    }
    let mut key = [0u8; 32];
    for (i, byte) in key.iter_mut().enumerate() {
        *byte = u8::from_str_radix(text.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(key)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_bytes::ByteBuf;

    #[test]
    fn equal_content_equal_keys_and_hex_hashes_are_taken_as_they_are() {
        let batch = Batch::new()
            .with(
                "image",
                Column::Bytes(vec![
                    ByteBuf::from(b"a".to_vec()),
                    ByteBuf::from(b"a".to_vec()),
                    ByteBuf::from(b"b".to_vec()),
                ]),
            )
            .unwrap();
        let keys = Dedup { by: "image".into() }.keys(&batch, &mut OpContext::detached("dedup")).unwrap();
        assert_eq!(keys[0], keys[1]);
        assert_ne!(keys[0], keys[2]);
        let hex = "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad";
        assert_eq!(hex_hash(hex), Some(sha256(b"abc")));
        assert_eq!(hex_hash("not hex"), None);
        assert_eq!(hex_hash(&"zz".repeat(32)), None);
    }
}
