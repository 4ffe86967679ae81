//! Column types and schemas: what flows on an edge, checked when a topology is compiled.

use std::fmt;

use serde::{Deserialize, Serialize};

/// The type of a column.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum ColumnType {
    /// 64-bit integers.
    I64,
    /// 64-bit floats.
    F64,
    /// UTF-8 strings.
    Str,
    /// Byte strings.
    Bytes,
    /// A `u8` tensor per row.
    U8Tensor,
    /// An `f32` tensor per row.
    F32Tensor,
    /// An `i64` tensor per row.
    I64Tensor,
}

impl fmt::Display for ColumnType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ColumnType::I64 => "i64",
            ColumnType::F64 => "f64",
            ColumnType::Str => "str",
            ColumnType::Bytes => "bytes",
            ColumnType::U8Tensor => "u8 tensor",
            ColumnType::F32Tensor => "f32 tensor",
            ColumnType::I64Tensor => "i64 tensor",
        })
    }
}

/// A named, typed column in a schema.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Field {
    /// Column name.
    pub name: String,
    /// Column type.
    pub ty: ColumnType,
}

impl Field {
    /// A field named `name` of type `ty`.
    pub fn new(name: impl Into<String>, ty: ColumnType) -> Self {
        Field { name: name.into(), ty }
    }
}

impl fmt::Display for Field {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.name, self.ty)
    }
}

/// The columns a stream carries, in order.
///
/// ```
/// use latentflow_engine::{ColumnType, Field, Schema};
/// let s = Schema::new(vec![Field::new("key", ColumnType::I64), Field::new("caption", ColumnType::Str)]);
/// assert_eq!(s.to_string(), "{key: i64, caption: str}");
/// ```
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Schema {
    fields: Vec<Field>,
}

impl Schema {
    /// A schema of these fields.
    pub fn new(fields: Vec<Field>) -> Self {
        Schema { fields }
    }

    /// The fields in order.
    pub fn fields(&self) -> &[Field] {
        &self.fields
    }

    /// The field named `name`.
    pub fn get(&self, name: &str) -> Option<&Field> {
        self.fields.iter().find(|f| f.name == name)
    }

    /// Replaces a field of the same name or appends it.
    pub fn upsert(&mut self, field: Field) {
        match self.fields.iter_mut().find(|f| f.name == field.name) {
            Some(existing) => *existing = field,
            None => self.fields.push(field),
        }
    }

    /// Removes the field named `name` if present.
    pub fn remove(&mut self, name: &str) {
        self.fields.retain(|f| f.name != name);
    }
}

impl fmt::Display for Schema {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("{")?;
        for (i, field) in self.fields.iter().enumerate() {
            if i > 0 {
                f.write_str(", ")?;
            }
            write!(f, "{field}")?;
        }
        f.write_str("}")
    }
}

/// What an operator does to the schema of its input: the columns it needs, adds and drops.
///
/// Sources require nothing and add their columns; sinks add nothing. The compiler checks
/// `requires` against the input's schema and derives the output schema from the rest, so a
/// topology whose edges do not fit fails before anything runs.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Ports {
    /// Columns the operator reads, with their types.
    pub requires: Vec<Field>,
    /// Columns the operator writes (replacing a column of the same name).
    pub adds: Vec<Field>,
    /// Columns the operator drops.
    pub removes: Vec<String>,
}

impl Ports {
    /// Checks `input` against `requires` and returns the output schema, or one message per
    /// missing or mistyped column.
    pub fn apply(&self, input: &Schema) -> Result<Schema, Vec<String>> {
        let mut problems = Vec::new();
        for need in &self.requires {
            match input.get(&need.name) {
                None => {
                    problems.push(format!("needs column `{}` ({}) but its input has {}", need.name, need.ty, input))
                }
                Some(have) if have.ty != need.ty => problems
                    .push(format!("needs column `{}` as {} but its input has it as {}", need.name, need.ty, have.ty)),
                Some(_) => {}
            }
        }
        if !problems.is_empty() {
            return Err(problems);
        }
        let mut out = input.clone();
        for name in &self.removes {
            out.remove(name);
        }
        for field in &self.adds {
            out.upsert(field.clone());
        }
        Ok(out)
    }

    /// The required columns as a schema, for listings.
    pub fn accepts(&self) -> Schema {
        Schema::new(self.requires.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn apply_adds_removes_and_checks_types() {
        let input = Schema::new(vec![Field::new("key", ColumnType::I64), Field::new("image", ColumnType::Bytes)]);
        let ports = Ports {
            requires: vec![Field::new("image", ColumnType::Bytes)],
            adds: vec![Field::new("pixels", ColumnType::U8Tensor)],
            removes: vec!["image".into()],
        };
        assert_eq!(ports.apply(&input).unwrap().to_string(), "{key: i64, pixels: u8 tensor}");
        let wrong = Ports { requires: vec![Field::new("key", ColumnType::Str)], ..Ports::default() };
        assert_eq!(
            wrong.apply(&input).unwrap_err(),
            vec!["needs column `key` as str but its input has it as i64".to_string()]
        );
    }
}
