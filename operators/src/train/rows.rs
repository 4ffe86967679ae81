//! The rows of the current epoch as they arrive, and their stacking into the step's tensors.

use std::ops::Range;
use std::sync::Arc;

use candle_core::{Device, Tensor};
use latentflow_engine::{Batch, Column, OpError};

use crate::model_keys::op_error;

/// The per-row shapes of `latents` and `caption_latents`: rows of one step share them (a
/// resolution bucket).
pub type Shapes = (Vec<usize>, Vec<usize>);

/// A row's values: its range of the batch column it arrived in, shared by the batch's rows, so
/// taking a batch in copies nothing and a step copies each row once, into the step's tensor.
#[derive(Clone, Debug)]
pub struct RowValues {
    column: Arc<Vec<f32>>,
    range: Range<usize>,
}

impl RowValues {
    /// Values of their own (a row restored from a checkpoint or sent by another replica).
    pub fn owned(values: Vec<f32>) -> Self {
        let range = 0..values.len();
        RowValues { column: Arc::new(values), range }
    }

    /// The values.
    pub fn as_slice(&self) -> &[f32] {
        &self.column[self.range.clone()]
    }
}

impl PartialEq for RowValues {
    fn eq(&self, other: &Self) -> bool {
        self.as_slice() == other.as_slice()
    }
}

/// One training row: its key, shapes, latents and caption embedding, flattened.
#[derive(Clone, Debug, PartialEq)]
pub struct Row {
    /// The row's key.
    pub key: i64,
    /// The per-row shapes of its latents and caption embedding.
    pub shapes: Shapes,
    /// The latents.
    pub latents: RowValues,
    /// The caption embedding.
    pub caption: RowValues,
}

/// What the current epoch has brought to this trainer.
///
/// ```
/// use candle_core::Device;
/// use latentflow_engine::{Batch, Column};
/// use latentflow_operators::train::rows::{stack, RowBuffer};
///
/// let batch = Batch::new()
///     .with("key", Column::I64(vec![7, 3]))?
///     .with("latents", Column::F32Tensor { shape: vec![2], data: vec![7.0, 7.5, 3.0, 3.5] })?
///     .with("caption_latents", Column::F32Tensor { shape: vec![1], data: vec![-7.0, -3.0] })?;
/// let mut buffer = RowBuffer::default();
/// buffer.push(batch)?;
/// let mut rows = buffer.take();
/// rows.sort_by_key(|r| r.key);
/// let (latents, captions) = stack(&rows, &(vec![2], vec![1]), &Device::Cpu)?;
/// assert_eq!(latents.to_vec2::<f32>()?, [[3.0, 3.5], [7.0, 7.5]]);
/// assert_eq!(captions.to_vec2::<f32>()?, [[-3.0], [-7.0]]);
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Default)]
pub struct RowBuffer {
    rows: Vec<Row>,
}

fn f32_rows(batch: &mut Batch, name: &str) -> Result<(Vec<usize>, Arc<Vec<f32>>), OpError> {
    match batch.remove(name) {
        Some(Column::F32Tensor { shape, data }) => Ok((shape, Arc::new(data))),
        Some(other) => Err(OpError::msg(format!("`{name}` is a {} column, not f32", other.column_type()))),
        None => Err(OpError::msg(format!("missing column `{name}`"))),
    }
}

impl RowBuffer {
    /// Adds a batch's rows (a batch has one shape; batches may differ). The rows keep the
    /// batch's columns, without a copy.
    pub fn push(&mut self, mut batch: Batch) -> Result<(), OpError> {
        let keys = batch.i64s("key")?.to_vec();
        let (latent_shape, latents) = f32_rows(&mut batch, "latents")?;
        let (caption_shape, captions) = f32_rows(&mut batch, "caption_latents")?;
        let (l, c) = (latent_shape.iter().product::<usize>(), caption_shape.iter().product::<usize>());
        if latents.len() != keys.len() * l || captions.len() != keys.len() * c {
            return Err(OpError::msg(format!(
                "{} keys with {} latent and {} caption values: rows of {l} and {c} expected",
                keys.len(),
                latents.len(),
                captions.len()
            )));
        }
        let shapes: Shapes = (latent_shape, caption_shape);
        for (i, &key) in keys.iter().enumerate() {
            self.rows.push(Row {
                key,
                shapes: shapes.clone(),
                latents: RowValues { column: latents.clone(), range: i * l..(i + 1) * l },
                caption: RowValues { column: captions.clone(), range: i * c..(i + 1) * c },
            });
        }
        Ok(())
    }

    /// The epoch's rows, leaving the buffer empty.
    pub fn take(&mut self) -> Vec<Row> {
        std::mem::take(&mut self.rows)
    }
}

/// `rows` (all of `shapes`) stacked into latents `[n, ...]` and captions `[n, ...]` on `device`
/// (n may be 0): one copy of each row, into the step's buffer, in the order given.
pub fn stack(rows: &[Row], shapes: &Shapes, device: &Device) -> Result<(Tensor, Tensor), OpError> {
    let n = rows.len();
    if let Some(row) = rows.iter().find(|r| &r.shapes != shapes) {
        return Err(OpError::msg(format!("row {} of shapes {:?} in a step of {shapes:?}", row.key, row.shapes)));
    }
    let one = |shape: &[usize], pick: fn(&Row) -> &RowValues| -> Result<Tensor, OpError> {
        let per_row = shape.iter().product::<usize>();
        let mut data = Vec::with_capacity(n * per_row);
        rows.iter().for_each(|r| data.extend_from_slice(pick(r).as_slice()));
        let dims: Vec<usize> = std::iter::once(n).chain(shape.iter().copied()).collect();
        Tensor::from_vec(data, dims, device).map_err(op_error)
    };
    Ok((one(&shapes.0, |r| &r.latents)?, one(&shapes.1, |r| &r.caption)?))
}
