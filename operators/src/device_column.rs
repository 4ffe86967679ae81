//! Encoder outputs that stay on their device: a candle tensor as the values of an
//! [`Column::F32Device`] column. `vae_encode` and `text_encode` emit their outputs this way, so
//! `train` on the same device stacks a step's rows from them on that device (one copy of each
//! row) instead of device -> host column -> step buffer -> device. Other consumers read them
//! through [`Batch::f32_tensor`](latentflow_engine::Batch::f32_tensor) (a host copy), and a
//! batch that crosses processes carries them as host values.

use candle_core::{DType, DeviceLocation, Tensor};
use latentflow_engine::{Column, DeviceTensor, DeviceValues, OpError};

use crate::model_keys::op_error;

/// A `[rows, ...]` f32 tensor holding a column's values (contiguous, with no autograd graph).
#[derive(Debug)]
pub struct CandleValues(Option<Tensor>); // taken only by `drop`

impl CandleValues {
    /// The `[rows, ...]` tensor.
    pub fn tensor(&self) -> &Tensor {
        self.0.as_ref().expect("values are there until dropped")
    }
}

impl Drop for CandleValues {
    /// Makes the values' CUDA context current on the dropping thread first: cudarc frees device
    /// memory without binding its context, and a sink or engine thread that never ran a CUDA op
    /// has none current, so the free would fail there and poison the context's next call from
    /// any thread (`CUDA_ERROR_INVALID_CONTEXT` in the encoder that made the values). A thread
    /// working on another device (a trainer) gets its own context back once they are freed.
    fn drop(&mut self) {
        #[cfg(feature = "cuda")]
        let _scope = crate::cuda::ContextScope::enter(self.tensor().device())
            .inspect_err(|e| {
                tracing::warn!(
                    "freeing device values on {:?} without their CUDA context: {e}",
                    self.tensor().device().location()
                )
            })
            .ok();
        drop(self.0.take()); // before the scope ends
    }
}

impl DeviceTensor for CandleValues {
    fn device(&self) -> String {
        match self.tensor().device().location() {
            DeviceLocation::Cpu => "cpu".into(),
            DeviceLocation::Cuda { gpu_id } => format!("cuda:{gpu_id}"),
            DeviceLocation::Metal { gpu_id } => format!("metal:{gpu_id}"),
        }
    }

    fn len(&self) -> usize {
        self.tensor().elem_count()
    }

    fn to_host(&self) -> Result<Vec<f32>, String> {
        #[cfg(feature = "cuda")]
        let _scope = crate::cuda::ContextScope::enter(self.tensor().device()).map_err(|e| e.to_string())?;
        self.tensor().flatten_all().and_then(|t| t.to_vec1::<f32>()).map_err(|e| e.to_string())
    }

    fn as_any(&self) -> &dyn std::any::Any {
        self
    }
}

/// A `[rows, ...]` tensor as an f32 tensor column whose values stay where the tensor is (one
/// row per entry of the first dimension; other dtypes are cast to f32 there).
///
/// ```
/// use candle_core::{Device, Tensor};
/// use latentflow_operators::device_column::{device_column, rows_tensor};
///
/// let tensor = Tensor::new(&[[1f32, 2.0], [3.0, 4.0], [5.0, 6.0]], &Device::Cpu)?;
/// let column = device_column(&tensor)?;
/// assert_eq!((column.len(), column.column_type().to_string()), (3, "f32 tensor".to_string()));
/// let latentflow_engine::Column::F32Device { values, .. } = &column else { unreachable!() };
/// assert_eq!(rows_tensor(values).unwrap().to_vec2::<f32>()?, [[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]]);
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub fn device_column(tensor: &Tensor) -> Result<Column, OpError> {
    let shape = tensor.dims().get(1..).unwrap_or_default().to_vec();
    let values = tensor.to_dtype(DType::F32).and_then(|t| t.contiguous()).map_err(op_error)?.detach();
    Ok(Column::F32Device { shape, values: DeviceValues::new(CandleValues(Some(values))) })
}

/// The `[rows, ...]` tensor of device values this crate made, if they are.
pub fn rows_tensor(values: &DeviceValues) -> Option<&Tensor> {
    values.downcast_ref::<CandleValues>().map(CandleValues::tensor)
}
