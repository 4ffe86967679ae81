//! `Vec<f32>` in serde as one byte string (little-endian), the way `serde_bytes` carries `u8`
//! columns: f32 tensor columns (latents, embeddings) then cross processes as one block of
//! bytes, not as a sequence the serializer walks element by element.

use serde::de::{self, SeqAccess, Visitor};
use serde::{Deserializer, Serializer};

/// Serializes `values` as their little-endian bytes (on little-endian machines the values'
/// own memory, without a copy).
pub fn serialize<S: Serializer>(values: &[f32], serializer: S) -> Result<S::Ok, S::Error> {
    if cfg!(target_endian = "little") {
        return serializer.serialize_bytes(bytemuck::cast_slice(values));
    }
    let bytes: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
    serializer.serialize_bytes(&bytes)
}

/// Reads what [`serialize`] wrote (a byte string, borrowed from the input where the format
/// allows, or a sequence of bytes in formats that have no byte strings).
pub fn deserialize<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Vec<f32>, D::Error> {
    deserializer.deserialize_bytes(F32Bytes)
}

struct F32Bytes;

impl F32Bytes {
    fn values<E: de::Error>(bytes: &[u8]) -> Result<Vec<f32>, E> {
        if bytes.len() % 4 != 0 {
            return Err(E::invalid_length(bytes.len(), &"a multiple of 4 bytes"));
        }
        if cfg!(target_endian = "little") {
            // One copy into an aligned buffer (the input need not be 4-byte aligned).
            let mut values = vec![0f32; bytes.len() / 4];
            bytemuck::cast_slice_mut::<f32, u8>(&mut values).copy_from_slice(bytes);
            return Ok(values);
        }
        Ok(bytes.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect())
    }
}

impl<'de> Visitor<'de> for F32Bytes {
    type Value = Vec<f32>;

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("the little-endian bytes of f32 values")
    }

    fn visit_bytes<E: de::Error>(self, bytes: &[u8]) -> Result<Vec<f32>, E> {
        Self::values(bytes)
    }

    fn visit_byte_buf<E: de::Error>(self, bytes: Vec<u8>) -> Result<Vec<f32>, E> {
        Self::values(&bytes)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Vec<f32>, A::Error> {
        let mut bytes = Vec::with_capacity(seq.size_hint().unwrap_or(0));
        while let Some(b) = seq.next_element::<u8>()? {
            bytes.push(b);
        }
        Self::values(&bytes)
    }
}

#[cfg(test)]
mod tests {
    use crate::data::Column;

    #[test]
    fn f32_columns_round_trip_as_bytes() {
        let values = vec![0.0f32, -1.5, f32::MAX, f32::MIN_POSITIVE, f32::NAN, 1e-30];
        let column = Column::F32Tensor { shape: vec![2, 3], data: values.clone() };
        let json = serde_json::to_string(&column).unwrap();
        // 6 values as 24 bytes, not as 6 numbers.
        assert!(json.starts_with(r#"{"F32Tensor":{"shape":[2,3],"data":[0,0,0,0,0,0,192,191"#), "{json}");
        let back: Column = serde_json::from_str(&json).unwrap();
        let Column::F32Tensor { data, .. } = back else { panic!("not an f32 column: {back:?}") };
        assert_eq!(
            data.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
            values.iter().map(|v| v.to_bits()).collect::<Vec<_>>()
        );
        let bad = r#"{"F32Tensor":{"shape":[1],"data":[0,0,0]}}"#;
        assert!(serde_json::from_str::<Column>(bad).unwrap_err().to_string().contains("multiple of 4 bytes"));
    }
}
