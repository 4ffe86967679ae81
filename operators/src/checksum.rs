//! `checksum`: a cheap map that fingerprints each row's `image` bytes (FNV-1a), useful for
//! checking that data arrives intact and for measuring engine overhead.

use std::sync::Arc;

use latentflow_engine::{
    Batch, Column, ColumnType, Field, InstanceContext, Map, NodeSpec, OpContext, OpError, OperatorConfig, OperatorImpl,
    OperatorKind, Ports,
};
use serde::{Deserialize, Serialize};

/// Config of `checksum` (no keys).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChecksumConfig {}

impl OperatorConfig for ChecksumConfig {
    const TYPE: &'static str = "checksum";
    const KIND: OperatorKind = OperatorKind::Map;
    const SUMMARY: &'static str = "adds `checksum`, the FNV-1a hash of each row's `image` bytes";
    const EXAMPLE: &'static str = "";
    const KEYS: &'static [(&'static str, &'static str)] = &[];
}

impl NodeSpec for ChecksumConfig {
    fn ports(&self) -> Ports {
        Ports {
            requires: vec![Field::new("image", ColumnType::Bytes)],
            adds: vec![Field::new("checksum", ColumnType::I64)],
            removes: vec![],
        }
    }

    fn instantiate(&self, _ctx: &InstanceContext<'_>) -> Result<OperatorImpl, OpError> {
        Ok(OperatorImpl::Map(Arc::new(Checksum)))
    }
}

/// The `checksum` map.
#[derive(Debug, Default)]
pub struct Checksum;

impl Map for Checksum {
    fn map(&self, mut batch: Batch, _ctx: &mut OpContext) -> Result<Batch, OpError> {
        let sums = batch.bytes("image")?.iter().map(|b| fnv1a(b) as i64).collect();
        batch.insert("checksum", Column::I64(sums))?;
        Ok(batch)
    }
}

/// 64-bit FNV-1a.
pub fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_bytes::ByteBuf;

    #[test]
    fn adds_a_checksum_per_row() {
        let batch = Batch::new()
            .with("image", Column::Bytes(vec![ByteBuf::from(b"a".to_vec()), ByteBuf::from(Vec::new())]))
            .unwrap();
        let out = Checksum.map(batch, &mut OpContext::detached("sum")).unwrap();
        // Known FNV-1a values: "a" and the empty string.
        assert_eq!(out.i64s("checksum").unwrap(), &[0xaf63dc4c8601ec8c_u64 as i64, 0xcbf29ce484222325_u64 as i64]);
    }

    #[test]
    fn names_a_missing_column() {
        let batch = Batch::new().with("key", Column::I64(vec![1])).unwrap();
        let err = Checksum.map(batch, &mut OpContext::detached("sum")).unwrap_err();
        assert_eq!(err.to_string(), "missing column `image` (batch has: {key: i64})");
    }
}
