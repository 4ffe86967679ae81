//! The rows of the current epoch as they arrive, and their stacking into the step's tensors.

use candle_core::{Device, Tensor};
use latentflow_engine::{Batch, Column, OpError};

use crate::model_keys::op_error;

/// The per-row shapes of `latents` and `caption_latents`: rows of one step share them (a
/// resolution bucket).
pub(super) type Shapes = (Vec<usize>, Vec<usize>);

/// One training row: its key, shapes, latents and caption embedding, flattened.
#[derive(Clone, Debug, PartialEq)]
pub(super) struct Row {
    pub key: i64,
    pub shapes: Shapes,
    pub latents: Vec<f32>,
    pub caption: Vec<f32>,
}

/// What the current epoch has brought to this trainer.
#[derive(Default)]
pub(super) struct RowBuffer {
    rows: Vec<Row>,
}

fn f32_rows<'a>(batch: &'a Batch, name: &str) -> Result<(&'a [usize], &'a [f32]), OpError> {
    match batch.column(name)? {
        Column::F32Tensor { shape, data } => Ok((shape, data)),
        other => Err(OpError::msg(format!("`{name}` is a {} column, not f32", other.column_type()))),
    }
}

impl RowBuffer {
    /// Adds a batch's rows (a batch has one shape; batches may differ).
    pub fn push(&mut self, batch: &Batch) -> Result<(), OpError> {
        let keys = batch.i64s("key")?;
        let (latent_shape, latents) = f32_rows(batch, "latents")?;
        let (caption_shape, captions) = f32_rows(batch, "caption_latents")?;
        let shapes: Shapes = (latent_shape.to_vec(), caption_shape.to_vec());
        let (l, c) = (latent_shape.iter().product::<usize>(), caption_shape.iter().product::<usize>());
        for (i, &key) in keys.iter().enumerate() {
            self.rows.push(Row {
                key,
                shapes: shapes.clone(),
                latents: latents[i * l..(i + 1) * l].to_vec(),
                caption: captions[i * c..(i + 1) * c].to_vec(),
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
/// (n may be 0).
pub(super) fn stack(rows: &[Row], shapes: &Shapes, device: &Device) -> Result<(Tensor, Tensor), OpError> {
    let n = rows.len();
    if let Some(row) = rows.iter().find(|r| &r.shapes != shapes) {
        return Err(OpError::msg(format!("row {} of shapes {:?} in a step of {shapes:?}", row.key, row.shapes)));
    }
    let one = |shape: &[usize], pick: fn(&Row) -> &[f32]| -> Result<Tensor, OpError> {
        let data: Vec<f32> = rows.iter().flat_map(|r| pick(r).iter().copied()).collect();
        let dims: Vec<usize> = std::iter::once(n).chain(shape.iter().copied()).collect();
        Tensor::from_vec(data, dims, device).map_err(op_error)
    };
    Ok((one(&shapes.0, |r| &r.latents)?, one(&shapes.1, |r| &r.caption)?))
}
