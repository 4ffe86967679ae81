//! The rows of the current epoch as they arrive, and their stacking into the step's tensors.

use candle_core::{Device, Tensor};
use latentflow_engine::{Batch, Column, OpError};

use crate::model_keys::op_error;

/// One training row: its key, latents and caption embedding, flattened.
#[derive(Clone, Debug, PartialEq)]
pub(super) struct Row {
    pub key: i64,
    pub latents: Vec<f32>,
    pub caption: Vec<f32>,
}

/// The per-row shapes of `latents` and `caption_latents`.
pub(super) type Shapes = (Vec<usize>, Vec<usize>);

/// What the current epoch has brought to this trainer.
#[derive(Default)]
pub(super) struct RowBuffer {
    rows: Vec<Row>,
    /// The shapes of the run's rows, fixed by the first batch.
    pub shapes: Option<Shapes>,
}

fn f32_rows<'a>(batch: &'a Batch, name: &str) -> Result<(&'a [usize], &'a [f32]), OpError> {
    match batch.column(name)? {
        Column::F32Tensor { shape, data } => Ok((shape, data)),
        other => Err(OpError::msg(format!("`{name}` is a {} column, not f32", other.column_type()))),
    }
}

impl RowBuffer {
    /// Adds a batch's rows; every row of a run has the same shapes.
    pub fn push(&mut self, batch: &Batch) -> Result<(), OpError> {
        let keys = batch.i64s("key")?;
        let (latent_shape, latents) = f32_rows(batch, "latents")?;
        let (caption_shape, captions) = f32_rows(batch, "caption_latents")?;
        self.check_shapes((latent_shape.to_vec(), caption_shape.to_vec()))?;
        let (l, c) = (latent_shape.iter().product::<usize>(), caption_shape.iter().product::<usize>());
        for (i, &key) in keys.iter().enumerate() {
            self.rows.push(Row {
                key,
                latents: latents[i * l..(i + 1) * l].to_vec(),
                caption: captions[i * c..(i + 1) * c].to_vec(),
            });
        }
        Ok(())
    }

    /// Fixes the run's shapes on first use and refuses others.
    pub fn check_shapes(&mut self, shapes: Shapes) -> Result<(), OpError> {
        if self.shapes.get_or_insert_with(|| shapes.clone()) != &shapes {
            return Err(OpError::msg(format!(
                "rows of shapes {shapes:?} after rows of shapes {:?}: one run trains one resolution",
                self.shapes
            )));
        }
        Ok(())
    }

    /// The epoch's rows, leaving the buffer empty.
    pub fn take(&mut self) -> Vec<Row> {
        std::mem::take(&mut self.rows)
    }
}

/// `rows` stacked into latents `[n, ...]` and captions `[n, ...]` on `device` (n may be 0).
pub(super) fn stack(rows: &[Row], shapes: &Shapes, device: &Device) -> Result<(Tensor, Tensor), OpError> {
    let n = rows.len();
    let one = |shape: &[usize], pick: fn(&Row) -> &[f32]| -> Result<Tensor, OpError> {
        let data: Vec<f32> = rows.iter().flat_map(|r| pick(r).iter().copied()).collect();
        let dims: Vec<usize> = std::iter::once(n).chain(shape.iter().copied()).collect();
        Tensor::from_vec(data, dims, device).map_err(op_error)
    };
    Ok((one(&shapes.0, |r| &r.latents)?, one(&shapes.1, |r| &r.caption)?))
}
