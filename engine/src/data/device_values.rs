//! f32 tensor values that stay where they were computed (an encoder's output tensor on its GPU),
//! so that an operator of the same process on the same device (the trainer) takes them without
//! a trip through host memory. The engine sees them only through [`DeviceTensor`]: how many
//! values, on which device, and a host copy for where they must leave the device (another
//! process, a sink, a row filter).

use std::any::Any;
use std::fmt;
use std::sync::Arc;

/// A block of f32 values held by an operator crate's tensor type (candle's, for latentflow's
/// operators), row-major.
pub trait DeviceTensor: Send + Sync + fmt::Debug + 'static {
    /// The device holding the values, as `job.devices` names it (`cpu`, `cuda:0`).
    fn device(&self) -> String;
    /// Number of values.
    fn len(&self) -> usize;
    /// True when there are no values.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// A host copy of the values.
    fn to_host(&self) -> Result<Vec<f32>, String>;
    /// The tensor itself, for the crate that made it to take back.
    fn as_any(&self) -> &dyn Any;
}

/// Shared [`DeviceTensor`] values: cloning shares them, as moving a batch between operators of
/// one process does.
///
/// ```
/// use latentflow_engine::{DeviceTensor, DeviceValues};
///
/// #[derive(Debug)]
/// struct OnHost(Vec<f32>);
/// impl DeviceTensor for OnHost {
///     fn device(&self) -> String { "cpu".into() }
///     fn len(&self) -> usize { self.0.len() }
///     fn to_host(&self) -> Result<Vec<f32>, String> { Ok(self.0.clone()) }
///     fn as_any(&self) -> &dyn std::any::Any { self }
/// }
///
/// let values = DeviceValues::new(OnHost(vec![1.0, 2.0]));
/// assert_eq!(values.len(), 2);
/// assert_eq!(values.downcast_ref::<OnHost>().unwrap().0, [1.0, 2.0]);
/// assert_eq!(values.to_host().unwrap(), [1.0, 2.0]);
/// ```
#[derive(Clone)]
pub struct DeviceValues(Arc<dyn DeviceTensor>);

impl DeviceValues {
    /// Wraps `tensor`.
    pub fn new(tensor: impl DeviceTensor) -> Self {
        DeviceValues(Arc::new(tensor))
    }

    /// Number of values.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// True when there are no values.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The device holding them.
    pub fn device(&self) -> String {
        self.0.device()
    }

    /// A host copy of the values.
    pub fn to_host(&self) -> Result<Vec<f32>, String> {
        self.0.to_host()
    }

    /// The wrapped tensor as `T`, when it is one.
    pub fn downcast_ref<T: 'static>(&self) -> Option<&T> {
        self.0.as_any().downcast_ref()
    }
}

impl fmt::Debug for DeviceValues {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "DeviceValues({} values on {})", self.len(), self.device())
    }
}

/// Equal when their host values are (tests compare batches; a device error compares unequal).
impl PartialEq for DeviceValues {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.0, &other.0) || matches!((self.to_host(), other.to_host()), (Ok(a), Ok(b)) if a == b)
    }
}
