//! The rows of the current epoch as they arrive, and their stacking into the step's tensors.

use std::borrow::Cow;
use std::ops::Range;
use std::sync::Arc;

use candle_core::{Device, Tensor};
use latentflow_engine::{Batch, Column, DeviceValues, OpError};

use super::handoff::{self, Counts, Origin, Plan, Run};
use crate::model_keys::op_error;

/// The per-row shapes of `latents` and `caption_latents`: rows of one step share them (a
/// resolution bucket).
pub type Shapes = (Vec<usize>, Vec<usize>);

/// A row's values where they arrived: its range of the batch's host column, or its row of the
/// batch's device tensor (an encoder's output), shared by the batch's rows, so taking a batch in
/// copies nothing and a step copies each row once, into the step's tensor.
#[derive(Clone, Debug)]
pub struct RowValues(Values);

#[derive(Clone, Debug)]
enum Values {
    Host {
        column: Arc<Vec<f32>>,
        range: Range<usize>,
    },
    /// Row `row` of a `[rows, values]` tensor.
    Device {
        rows: Tensor,
        row: usize,
        /// The encoder's output the tensor is a view of, held so its memory is freed where its
        /// device's context is current, whichever thread lets go of it last.
        _owner: DeviceValues,
    },
}

impl RowValues {
    /// Values of their own (a row restored from a checkpoint or sent by another replica).
    pub fn owned(values: Vec<f32>) -> Self {
        let range = 0..values.len();
        RowValues(Values::Host { column: Arc::new(values), range })
    }

    /// The values on the host: borrowed, or copied from their device.
    pub fn to_host(&self) -> Result<Cow<'_, [f32]>, OpError> {
        match &self.0 {
            Values::Host { column, range } => Ok(Cow::Borrowed(&column[range.clone()])),
            Values::Device { rows, row, .. } => {
                Ok(Cow::Owned(rows.get(*row).and_then(|r| r.to_vec1()).map_err(op_error)?))
            }
        }
    }
}

impl PartialEq for RowValues {
    fn eq(&self, other: &Self) -> bool {
        matches!((self.to_host(), other.to_host()), (Ok(a), Ok(b)) if a == b)
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
/// let step = stack(&rows, &(vec![2], vec![1]), &Device::Cpu)?;
/// assert_eq!(step.latents.to_vec2::<f32>()?, [[3.0, 3.5], [7.0, 7.5]]);
/// assert_eq!(step.captions.to_vec2::<f32>()?, [[-3.0], [-7.0]]);
/// assert_eq!(step.handoff.rows_from_host, 2);
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Default)]
pub struct RowBuffer {
    rows: Vec<Row>,
}

/// A batch column's per-row shape and its rows' values: a host column, or a device tensor
/// reshaped to `[rows, values]`.
fn f32_rows(batch: &mut Batch, name: &str) -> Result<(Vec<usize>, Column32), OpError> {
    match batch.remove(name) {
        Some(Column::F32Tensor { shape, data }) => Ok((shape, Column32::Host(Arc::new(data)))),
        Some(Column::F32Device { shape, values }) => {
            let per_row = shape.iter().product::<usize>();
            let rows = match crate::device_column::rows_tensor(&values) {
                Some(tensor) => tensor.reshape((values.len() / per_row.max(1), per_row)).map_err(op_error)?,
                None => {
                    let host = values.to_host().map_err(|e| OpError::msg(format!("`{name}`: {e}")))?;
                    return Ok((shape, Column32::Host(Arc::new(host))));
                }
            };
            Ok((shape, Column32::Device(rows, values)))
        }
        Some(other) => Err(OpError::msg(format!("`{name}` is a {} column, not f32", other.column_type()))),
        None => Err(OpError::msg(format!("missing column `{name}`"))),
    }
}

/// A batch's f32 column as [`RowBuffer::push`] takes it apart.
enum Column32 {
    Host(Arc<Vec<f32>>),
    /// `[rows, values]`, a view of the device values.
    Device(Tensor, DeviceValues),
}

impl Column32 {
    fn len(&self) -> usize {
        match self {
            Column32::Host(values) => values.len(),
            Column32::Device(rows, _) => rows.elem_count(),
        }
    }

    /// Row `i` of rows of `per_row` values.
    fn row(&self, i: usize, per_row: usize) -> RowValues {
        RowValues(match self {
            Column32::Host(column) => Values::Host { column: column.clone(), range: i * per_row..(i + 1) * per_row },
            Column32::Device(rows, owner) => Values::Device { rows: rows.clone(), row: i, _owner: owner.clone() },
        })
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
                latents: latents.row(i, l),
                caption: captions.row(i, c),
            });
        }
        Ok(())
    }

    /// The epoch's rows, leaving the buffer empty.
    pub fn take(&mut self) -> Vec<Row> {
        std::mem::take(&mut self.rows)
    }
}

/// A step's latents and captions on the trainer's device, and how its rows got there.
#[derive(Debug)]
pub struct Stacked {
    /// `[n, ...]` latents.
    pub latents: Tensor,
    /// `[n, ...]` caption embeddings.
    pub captions: Tensor,
    /// What was copied from where, for the latents and captions alike.
    pub handoff: Counts,
}

/// `rows` (all of `shapes`) stacked into latents `[n, ...]` and captions `[n, ...]` on `device`
/// (n may be 0), in the order given, following a [`Plan`]: rows from host columns are gathered
/// on the host, rows on `device` are read in place, rows on other devices are moved in one
/// device-to-device copy per batch; then one copy of each row into the step's tensor.
pub fn stack(rows: &[Row], shapes: &Shapes, device: &Device) -> Result<Stacked, OpError> {
    stack_from(rows, shapes, device, |tensor| tensor.device().same_device(device))
}

/// [`stack`], with whether a device batch is on the trainer's device given by
/// `on_trainers_device` (tests place CPU tensors on pretend GPUs to check the routing).
fn stack_from(
    rows: &[Row],
    shapes: &Shapes,
    device: &Device,
    on_trainers_device: impl Fn(&Tensor) -> bool,
) -> Result<Stacked, OpError> {
    if let Some(row) = rows.iter().find(|r| &r.shapes != shapes) {
        return Err(OpError::msg(format!("row {} of shapes {:?} in a step of {shapes:?}", row.key, row.shapes)));
    }
    let column = |shape: &[usize], pick: fn(&Row) -> &RowValues| -> Result<(Tensor, Counts), OpError> {
        let per_row = shape.iter().product::<usize>();
        let dims: Vec<usize> = std::iter::once(rows.len()).chain(shape.iter().copied()).collect();
        // The step's distinct device batches, and each row's origin.
        let mut batches: Vec<&Tensor> = Vec::new();
        let origins: Vec<Origin> = rows
            .iter()
            .map(|r| match &pick(r).0 {
                Values::Host { .. } => Origin::Host,
                Values::Device { rows: tensor, row, .. } => {
                    let batch = batches.iter().position(|b| b.id() == tensor.id()).unwrap_or_else(|| {
                        batches.push(tensor);
                        batches.len() - 1
                    });
                    Origin::Device { batch, row: *row, on_trainers_device: on_trainers_device(tensor) }
                }
            })
            .collect();
        let plan = Plan::new(&origins);
        let moved: Vec<Tensor> = plan
            .transfers
            .iter()
            .map(|t| handoff::move_rows(batches[t.batch], &t.rows, device))
            .collect::<candle_core::Result<_>>()
            .map_err(op_error)?;
        let mut pieces = Vec::with_capacity(plan.runs.len());
        for run in &plan.runs {
            pieces.push(
                match run {
                    Run::Host { rows: range } => {
                        let mut host = Vec::with_capacity(range.len() * per_row);
                        for r in &rows[range.clone()] {
                            host.extend_from_slice(&pick(r).to_host()?);
                        }
                        Tensor::from_vec(host, (range.len(), per_row), device)
                    }
                    Run::Local { batch, rows: range } => batches[*batch].narrow(0, range.start, range.len()),
                    Run::Moved { transfer, rows: range } => moved[*transfer].narrow(0, range.start, range.len()),
                }
                .map_err(op_error)?,
            );
        }
        let stacked = match pieces.is_empty() {
            true => Tensor::zeros(dims, candle_core::DType::F32, device), // n is 0
            // `cat` of one piece is that piece, without a copy.
            false => Tensor::cat(&pieces, 0).and_then(|t| t.reshape(dims)),
        };
        Ok((stacked.map_err(op_error)?, plan.counts()))
    };
    let (latents, handoff) = column(&shapes.0, |r| &r.latents)?;
    let (captions, _) = column(&shapes.1, |r| &r.caption)?;
    Ok(Stacked { latents, captions, handoff })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::device_column::device_column;

    /// A batch of `keys` whose latents are `[key, key + 0.5]` and captions `[-key]`, on the
    /// host or as an encoder leaves them (on its device).
    fn batch(keys: &[i64], on_device: bool) -> Batch {
        let latents: Vec<f32> = keys.iter().flat_map(|&k| [k as f32, k as f32 + 0.5]).collect();
        let captions: Vec<f32> = keys.iter().map(|&k| -k as f32).collect();
        let column = |data: Vec<f32>, shape: Vec<usize>| {
            if on_device {
                let dims: Vec<usize> = std::iter::once(keys.len()).chain(shape.iter().copied()).collect();
                device_column(&Tensor::from_vec(data, dims, &Device::Cpu).unwrap()).unwrap()
            } else {
                Column::F32Tensor { shape, data }
            }
        };
        Batch::new()
            .with("key", Column::I64(keys.to_vec()))
            .unwrap()
            .with("latents", column(latents, vec![2]))
            .unwrap()
            .with("caption_latents", column(captions, vec![1]))
            .unwrap()
    }

    #[test]
    fn rows_left_on_the_device_stack_in_the_steps_order_with_host_rows() {
        for devices in [[true, true, true], [true, false, true], [false, false, false]] {
            let mut buffer = RowBuffer::default();
            for (keys, on_device) in [(&[5, 1][..], devices[0]), (&[4, 2][..], devices[1]), (&[3][..], devices[2])] {
                buffer.push(batch(keys, on_device)).unwrap();
            }
            let mut rows = buffer.take();
            let on_device: usize = [2, 2, 1].iter().zip(devices).filter(|(_, d)| *d).map(|(n, _)| n).sum();
            assert_eq!(
                rows.iter().filter(|r| matches!(r.latents.0, Values::Device { .. })).count(),
                on_device,
                "kept on the device"
            );
            rows.sort_by_key(|r| r.key);
            let Stacked { latents, captions, handoff } = stack(&rows, &(vec![2], vec![1]), &Device::Cpu).unwrap();
            assert_eq!((handoff.rows_on_device, handoff.rows_from_host), (on_device as u64, 5 - on_device as u64));
            let want: Vec<Vec<f32>> = (1..=5).map(|k| vec![k as f32, k as f32 + 0.5]).collect();
            assert_eq!(latents.to_vec2::<f32>().unwrap(), want, "{devices:?}");
            assert_eq!(captions.to_vec2::<f32>().unwrap(), (1..=5).map(|k| vec![-k as f32]).collect::<Vec<_>>());
            // Checkpoints and other replicas read a row's values on the host.
            assert_eq!(rows[2].latents.to_host().unwrap().as_ref(), &[3.0, 3.5]);
        }
    }

    #[test]
    fn a_step_of_no_rows_stacks_into_empty_tensors_of_the_shapes() {
        let step = stack(&[], &(vec![4, 2, 2], vec![77, 8]), &Device::Cpu).unwrap();
        assert_eq!((step.latents.dims(), step.captions.dims()), (&[0, 4, 2, 2][..], &[0, 77, 8][..]));
    }

    #[test]
    fn rows_from_encoders_on_other_devices_arrive_in_the_steps_order_in_one_copy_per_batch() {
        // Three encoder batches: two "on cuda:6" and "cuda:7" (CPU tensors placed there by the
        // test), one on the trainer's own device, and a host batch, interleaved by key.
        let mut buffer = RowBuffer::default();
        for (keys, on_device) in
            [(&[6, 1, 9][..], true), (&[7, 2][..], true), (&[3, 8][..], true), (&[4, 5][..], false)]
        {
            buffer.push(batch(keys, on_device)).unwrap();
        }
        let mut rows = buffer.take();
        rows.sort_by_key(|r| r.key);
        let gpu_of = |key: i64| match key {
            6 | 1 | 9 => 6,
            7 | 2 => 7,
            _ => 0,
        };
        // Each batch's tensor, by the key of one of its rows (latents and captions alike).
        let mut places: Vec<(candle_core::TensorId, usize)> = Vec::new();
        for r in &rows {
            for values in [&r.latents, &r.caption] {
                if let Values::Device { rows: tensor, .. } = &values.0 {
                    places.push((tensor.id(), gpu_of(r.key)));
                }
            }
        }
        // The trainer is "cuda:0": the CPU here stands in for it.
        let on_trainer = |tensor: &Tensor| places.iter().any(|(id, gpu)| *id == tensor.id() && *gpu == 0);
        let step = stack_from(&rows, &(vec![2], vec![1]), &Device::Cpu, on_trainer).unwrap();
        let want: Vec<Vec<f32>> = (1..=9).map(|k| vec![k as f32, k as f32 + 0.5]).collect();
        assert_eq!(step.latents.to_vec2::<f32>().unwrap(), want);
        assert_eq!(step.captions.to_vec2::<f32>().unwrap(), (1..=9).map(|k| vec![-k as f32]).collect::<Vec<_>>());
        assert_eq!(step.handoff, Counts { rows_from_host: 2, rows_on_device: 2, rows_moved: 5, device_copies: 2 });
    }
}
