//! 2-D convolutions (cross-correlation, square kernel, stride and symmetric padding) and their
//! two gradients: CPU references here, cuDNN on GPUs (behind the `cuda` feature).
//!
//! Tensors are NCHW and contiguous: `x` `[B, C, H, W]`, weights `[O, C, k, k]`, output
//! `[B, O, OH, OW]`. On the GPU each (stream, shape, element type) gets its cuDNN descriptors
//! and algorithms once, from cuDNN's heuristics, and keeps them for the life of the thread; bf16
//! runs on tensor cores with f32 accumulation, f32 without TF32 (the parity tests compare f32
//! results to 1e-4).

use crate::KernelError;

/// The sizes of one convolution.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ConvShape {
    /// Samples.
    pub batch: usize,
    /// Input channels.
    pub in_channels: usize,
    /// Output channels.
    pub out_channels: usize,
    /// Input height.
    pub height: usize,
    /// Input width.
    pub width: usize,
    /// Kernel height and width.
    pub kernel: usize,
    /// Stride in both directions.
    pub stride: usize,
    /// Zero padding on every side.
    pub padding: usize,
}

impl ConvShape {
    /// Output height and width.
    ///
    /// ```
    /// use latentflow_gpu_kernels::ops::conv::ConvShape;
    /// let s = ConvShape { batch: 1, in_channels: 4, out_channels: 8, height: 9, width: 8, kernel: 3, stride: 2, padding: 1 };
    /// assert_eq!(s.output_hw(), (5, 4));
    /// ```
    pub fn output_hw(&self) -> (usize, usize) {
        let out = |n: usize| (n + 2 * self.padding - self.kernel) / self.stride + 1;
        (out(self.height), out(self.width))
    }

    /// Values in `x`.
    pub fn input_len(&self) -> usize {
        self.batch * self.in_channels * self.height * self.width
    }

    /// Values in the weights.
    pub fn weight_len(&self) -> usize {
        self.out_channels * self.in_channels * self.kernel * self.kernel
    }

    /// Values in the output.
    pub fn output_len(&self) -> usize {
        let (oh, ow) = self.output_hw();
        self.batch * self.out_channels * oh * ow
    }

    fn check(&self, what: [(&'static str, usize, usize); 2]) -> Result<(), KernelError> {
        if self.kernel == 0 || self.stride == 0 || self.height + 2 * self.padding < self.kernel {
            return Err(KernelError::Unsupported { op: "conv2d", message: format!("{self:?}") });
        }
        for (op, found, expected) in what {
            if found != expected {
                return Err(KernelError::Shape { op, shape: self.dims(op), expected, found });
            }
        }
        Ok(())
    }

    fn dims(&self, op: &str) -> Vec<usize> {
        let (oh, ow) = self.output_hw();
        match op {
            "conv2d weights" => vec![self.out_channels, self.in_channels, self.kernel, self.kernel],
            "conv2d output gradient" => vec![self.batch, self.out_channels, oh, ow],
            _ => vec![self.batch, self.in_channels, self.height, self.width],
        }
    }

    /// For each output position along one axis of length `n`, the input positions it reads:
    /// `(output index, kernel index, input index)`, padding left out.
    fn taps(&self, n: usize, out: usize) -> Vec<(usize, usize, usize)> {
        let mut taps = Vec::new();
        for o in 0..out {
            for t in 0..self.kernel {
                let i = (o * self.stride + t) as isize - self.padding as isize;
                if i >= 0 && (i as usize) < n {
                    taps.push((o, t, i as usize));
                }
            }
        }
        taps
    }

    /// Calls `f(x index, weight index, output index)` for every product the convolution sums.
    fn for_each_product(&self, mut f: impl FnMut(usize, usize, usize)) {
        let (oh, ow) = self.output_hw();
        let (rows, cols) = (self.taps(self.height, oh), self.taps(self.width, ow));
        let k = self.kernel;
        for b in 0..self.batch {
            for o in 0..self.out_channels {
                for c in 0..self.in_channels {
                    for &(y, ky, iy) in &rows {
                        for &(x, kx, ix) in &cols {
                            let xi = ((b * self.in_channels + c) * self.height + iy) * self.width + ix;
                            let wi = ((o * self.in_channels + c) * k + ky) * k + kx;
                            let yi = ((b * self.out_channels + o) * oh + y) * ow + x;
                            f(xi, wi, yi);
                        }
                    }
                }
            }
        }
    }
}

/// CPU reference of the forward pass: `y[b, o] = sum_c x[b, c] (*) w[o, c]`, summed in f64.
///
/// ```
/// use latentflow_gpu_kernels::ops::conv::{conv2d, ConvShape};
/// // A 1x1 convolution of two channels is a weighted sum of them.
/// let s = ConvShape { batch: 1, in_channels: 2, out_channels: 1, height: 1, width: 2, kernel: 1, stride: 1, padding: 0 };
/// let y = conv2d(&[1.0, 2.0, 10.0, 20.0], &[3.0, 0.5], s).unwrap();
/// assert_eq!(y, vec![3.0 + 5.0, 6.0 + 10.0]);
/// ```
pub fn conv2d(x: &[f32], w: &[f32], s: ConvShape) -> Result<Vec<f32>, KernelError> {
    s.check([("conv2d input", x.len(), s.input_len()), ("conv2d weights", w.len(), s.weight_len())])?;
    let mut y = vec![0f64; s.output_len()];
    s.for_each_product(|xi, wi, yi| y[yi] += f64::from(x[xi]) * f64::from(w[wi]));
    Ok(y.into_iter().map(|v| v as f32).collect())
}

/// CPU reference of the input gradient: `dx = sum over products of dy * w`.
pub fn conv2d_backward_data(dy: &[f32], w: &[f32], s: ConvShape) -> Result<Vec<f32>, KernelError> {
    s.check([("conv2d output gradient", dy.len(), s.output_len()), ("conv2d weights", w.len(), s.weight_len())])?;
    let mut dx = vec![0f64; s.input_len()];
    s.for_each_product(|xi, wi, yi| dx[xi] += f64::from(dy[yi]) * f64::from(w[wi]));
    Ok(dx.into_iter().map(|v| v as f32).collect())
}

/// CPU reference of the weight gradient: `dw = sum over products of dy * x`.
pub fn conv2d_backward_filter(x: &[f32], dy: &[f32], s: ConvShape) -> Result<Vec<f32>, KernelError> {
    s.check([("conv2d input", x.len(), s.input_len()), ("conv2d output gradient", dy.len(), s.output_len())])?;
    let mut dw = vec![0f64; s.weight_len()];
    s.for_each_product(|xi, wi, yi| dw[wi] += f64::from(dy[yi]) * f64::from(x[xi]));
    Ok(dw.into_iter().map(|v| v as f32).collect())
}

#[cfg(feature = "cuda")]
pub use gpu::{conv2d_backward_data_cuda, conv2d_backward_filter_cuda, conv2d_cuda, CudnnElement};

#[cfg(feature = "cuda")]
mod gpu {
    use std::any::Any;
    use std::cell::RefCell;
    use std::collections::HashMap;
    use std::sync::Arc;

    use cudarc::cudnn::sys::{
        cudnnConvolutionBwdDataAlgo_t, cudnnConvolutionBwdFilterAlgo_t, cudnnConvolutionFwdAlgo_t,
        cudnnConvolutionMode_t, cudnnMathType_t, cudnnTensorFormat_t,
    };
    use cudarc::cudnn::{
        ConvBackwardData, ConvBackwardFilter, ConvDescriptor, ConvForward, Cudnn, CudnnDataType, FilterDescriptor,
        TensorDescriptor,
    };
    use cudarc::driver::{CudaSlice, CudaStream, CudaView, CudaViewMut, DeviceRepr};

    use super::ConvShape;
    use crate::KernelError;

    /// An element type cuDNN convolves here: f32 (FMA math, no TF32) or bf16 (tensor cores).
    pub trait CudnnElement: crate::Element + CudnnDataType + DeviceRepr {
        /// The scale cuDNN multiplies its result by (`alpha = 1`).
        fn one() -> Self;
        /// The scale of what the output held before (`beta = 0`: overwrite).
        fn zero() -> Self;
        /// The math cuDNN may use for this type.
        const MATH: cudnnMathType_t;
    }

    impl CudnnElement for f32 {
        const MATH: cudnnMathType_t = cudnnMathType_t::CUDNN_FMA_MATH;
        fn one() -> Self {
            1.0
        }
        fn zero() -> Self {
            0.0
        }
    }

    impl CudnnElement for half::bf16 {
        const MATH: cudnnMathType_t = cudnnMathType_t::CUDNN_TENSOR_OP_MATH;
        fn one() -> Self {
            half::bf16::ONE
        }
        fn zero() -> Self {
            half::bf16::ZERO
        }
    }

    fn cudnn_error(e: cudarc::cudnn::CudnnError) -> KernelError {
        KernelError::Cudnn(format!("{e:?}"))
    }

    /// A shape's descriptors and, once asked for, each pass's algorithm and workspace bytes.
    struct Plan<T> {
        conv: ConvDescriptor<f32>,
        x: TensorDescriptor<T>,
        w: FilterDescriptor<T>,
        y: TensorDescriptor<T>,
        forward: Option<(cudnnConvolutionFwdAlgo_t, usize)>,
        data: Option<(cudnnConvolutionBwdDataAlgo_t, usize)>,
        filter: Option<(cudnnConvolutionBwdFilterAlgo_t, usize)>,
    }

    impl<T: CudnnElement> Plan<T> {
        fn new(cudnn: &Arc<Cudnn>, s: ConvShape) -> Result<Plan<T>, KernelError> {
            let (oh, ow) = s.output_hw();
            let dims = |a: usize, b: usize, c: usize, d: usize| [a as i32, b as i32, c as i32, d as i32];
            let nchw = cudnnTensorFormat_t::CUDNN_TENSOR_NCHW;
            let (p, st) = (s.padding as i32, s.stride as i32);
            let mut conv = cudnn
                .create_conv2d::<f32>([p, p], [st, st], [1, 1], cudnnConvolutionMode_t::CUDNN_CROSS_CORRELATION)
                .map_err(cudnn_error)?;
            conv.set_math_type(T::MATH).map_err(cudnn_error)?;
            Ok(Plan {
                conv,
                x: cudnn
                    .create_4d_tensor::<T>(nchw, dims(s.batch, s.in_channels, s.height, s.width))
                    .map_err(cudnn_error)?,
                w: cudnn
                    .create_4d_filter::<T>(nchw, dims(s.out_channels, s.in_channels, s.kernel, s.kernel))
                    .map_err(cudnn_error)?,
                y: cudnn.create_4d_tensor::<T>(nchw, dims(s.batch, s.out_channels, oh, ow)).map_err(cudnn_error)?,
                forward: None,
                data: None,
                filter: None,
            })
        }
    }

    /// One cuDNN handle per stream and the plans made on it, per thread: cuDNN handles are
    /// neither `Send` nor `Sync`.
    #[derive(Default)]
    struct Handles {
        handles: HashMap<usize, Arc<Cudnn>>,
        plans: HashMap<(usize, ConvShape, &'static str), Box<dyn Any>>,
    }

    thread_local! {
        static HANDLES: RefCell<Handles> = RefCell::new(Handles::default());
    }

    /// Runs `f` with this thread's handle for `stream` and the plan for `s` (both made on first
    /// use).
    fn with_plan<T: CudnnElement, R>(
        stream: &Arc<CudaStream>,
        s: ConvShape,
        f: impl FnOnce(&mut Plan<T>) -> Result<R, KernelError>,
    ) -> Result<R, KernelError> {
        let key = stream.cu_stream() as usize;
        HANDLES.with(|handles| {
            let mut handles = handles.borrow_mut();
            let handles = &mut *handles;
            let cudnn = match handles.handles.get(&key) {
                Some(cudnn) => cudnn.clone(),
                None => {
                    let cudnn = Cudnn::new(stream.clone()).map_err(cudnn_error)?;
                    handles.handles.insert(key, cudnn.clone());
                    cudnn
                }
            };
            let plan = match handles.plans.entry((key, s, T::NAME)) {
                std::collections::hash_map::Entry::Occupied(e) => e.into_mut(),
                std::collections::hash_map::Entry::Vacant(e) => e.insert(Box::new(Plan::<T>::new(&cudnn, s)?)),
            };
            f(plan.downcast_mut::<Plan<T>>().expect("plans are keyed by element type"))
        })
    }

    /// cuDNN's scratch memory for one call (none when the algorithm needs none).
    fn workspace(stream: &Arc<CudaStream>, bytes: usize) -> Result<Option<CudaSlice<u8>>, KernelError> {
        if bytes == 0 {
            return Ok(None);
        }
        // SAFETY: cuDNN writes its workspace before reading it.
        #[allow(unsafe_code)]
        let buffer = unsafe { stream.alloc::<u8>(bytes) }.map_err(KernelError::driver)?;
        Ok(Some(buffer))
    }

    /// The algorithm and workspace bytes cached in `slot`, picked by `pick` on first use.
    fn picked<A: Copy>(
        slot: &mut Option<(A, usize)>,
        pick: impl FnOnce() -> Result<(A, usize), cudarc::cudnn::CudnnError>,
    ) -> Result<(A, usize), KernelError> {
        if slot.is_none() {
            *slot = Some(pick().map_err(cudnn_error)?);
        }
        Ok(slot.expect("just picked"))
    }

    fn check_output(op: &'static str, s: ConvShape, expected: usize, found: usize) -> Result<(), KernelError> {
        if found == expected {
            Ok(())
        } else {
            Err(KernelError::Shape { op, shape: s.dims(op), expected, found })
        }
    }

    /// [`super::conv2d`] on device buffers, on `stream`: `y = conv(x, w)`.
    pub fn conv2d_cuda<T: CudnnElement>(
        stream: &Arc<CudaStream>,
        x: &CudaView<'_, T>,
        w: &CudaView<'_, T>,
        s: ConvShape,
        y: &mut CudaViewMut<'_, T>,
    ) -> Result<(), KernelError> {
        s.check([("conv2d input", x.len(), s.input_len()), ("conv2d weights", w.len(), s.weight_len())])?;
        check_output("conv2d output", s, s.output_len(), y.len())?;
        with_plan::<T, _>(stream, s, |plan| {
            let op = ConvForward { conv: &plan.conv, x: &plan.x, w: &plan.w, y: &plan.y };
            let (algo, bytes) = picked(&mut plan.forward, || {
                let algo = op.pick_algorithm()?;
                Ok((algo, op.get_workspace_size(algo)?))
            })?;
            let mut ws = workspace(stream, bytes)?;
            // SAFETY: the descriptors were made from `s`, whose sizes the buffers were checked against.
            #[allow(unsafe_code)]
            unsafe { op.launch(algo, ws.as_mut(), (T::one(), T::zero()), x, w, y) }.map_err(cudnn_error)
        })
    }

    /// [`super::conv2d_backward_data`] on device buffers: `dx` from `dy` and `w`.
    pub fn conv2d_backward_data_cuda<T: CudnnElement>(
        stream: &Arc<CudaStream>,
        dy: &CudaView<'_, T>,
        w: &CudaView<'_, T>,
        s: ConvShape,
        dx: &mut CudaViewMut<'_, T>,
    ) -> Result<(), KernelError> {
        s.check([("conv2d output gradient", dy.len(), s.output_len()), ("conv2d weights", w.len(), s.weight_len())])?;
        check_output("conv2d input gradient", s, s.input_len(), dx.len())?;
        with_plan::<T, _>(stream, s, |plan| {
            let op = ConvBackwardData { conv: &plan.conv, dx: &plan.x, w: &plan.w, dy: &plan.y };
            let (algo, bytes) = picked(&mut plan.data, || {
                let algo = op.pick_algorithm()?;
                Ok((algo, op.get_workspace_size(algo)?))
            })?;
            let mut ws = workspace(stream, bytes)?;
            // SAFETY: as in `conv2d_cuda`.
            #[allow(unsafe_code)]
            unsafe { op.launch(algo, ws.as_mut(), (T::one(), T::zero()), dx, w, dy) }.map_err(cudnn_error)
        })
    }

    /// [`super::conv2d_backward_filter`] on device buffers: `dw` from `x` and `dy`.
    pub fn conv2d_backward_filter_cuda<T: CudnnElement>(
        stream: &Arc<CudaStream>,
        x: &CudaView<'_, T>,
        dy: &CudaView<'_, T>,
        s: ConvShape,
        dw: &mut CudaViewMut<'_, T>,
    ) -> Result<(), KernelError> {
        s.check([("conv2d input", x.len(), s.input_len()), ("conv2d output gradient", dy.len(), s.output_len())])?;
        check_output("conv2d weights gradient", s, s.weight_len(), dw.len())?;
        with_plan::<T, _>(stream, s, |plan| {
            let op = ConvBackwardFilter { conv: &plan.conv, x: &plan.x, dw: &plan.w, dy: &plan.y };
            let (algo, bytes) = picked(&mut plan.filter, || {
                let algo = op.pick_algorithm()?;
                Ok((algo, op.get_workspace_size(algo)?))
            })?;
            let mut ws = workspace(stream, bytes)?;
            // SAFETY: as in `conv2d_cuda`.
            #[allow(unsafe_code)]
            unsafe { op.launch(algo, ws.as_mut(), (T::one(), T::zero()), x, dw, dy) }.map_err(cudnn_error)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shape(kernel: usize, stride: usize, padding: usize, size: usize) -> ConvShape {
        ConvShape { batch: 2, in_channels: 3, out_channels: 4, height: size, width: size + 1, kernel, stride, padding }
    }

    fn values(n: usize, seed: u32) -> Vec<f32> {
        (0..n).map(|i| ((i as u32).wrapping_mul(2654435761).wrapping_add(seed) >> 20) as f32 / 2048.0 - 1.0).collect()
    }

    /// The gradients are the adjoints of the forward pass: <conv(x, w), dy> = <x, dx(dy)> =
    /// <w, dw(x, dy)>, which pins both backward references to the forward one.
    #[test]
    fn gradients_are_the_adjoints_of_the_forward_pass() {
        for (k, stride, padding, size) in [(3, 1, 1, 6), (3, 2, 1, 7), (1, 1, 0, 4), (3, 2, 0, 9)] {
            let s = shape(k, stride, padding, size);
            let (x, w, dy) = (values(s.input_len(), 1), values(s.weight_len(), 2), values(s.output_len(), 3));
            let dot = |a: &[f32], b: &[f32]| a.iter().zip(b).map(|(a, b)| f64::from(*a) * f64::from(*b)).sum::<f64>();
            let forward = dot(&conv2d(&x, &w, s).unwrap(), &dy);
            let data = dot(&x, &conv2d_backward_data(&dy, &w, s).unwrap());
            let filter = dot(&w, &conv2d_backward_filter(&x, &dy, s).unwrap());
            assert!(
                (forward - data).abs() < 1e-3 && (forward - filter).abs() < 1e-3,
                "{s:?}: {forward} {data} {filter}"
            );
        }
    }

    #[test]
    fn padding_reads_zeros() {
        // A 3x3 box filter over a 1x1 image padded by 1: every output sees only the centre.
        let s = ConvShape {
            batch: 1,
            in_channels: 1,
            out_channels: 1,
            height: 1,
            width: 1,
            kernel: 3,
            stride: 1,
            padding: 1,
        };
        assert_eq!(conv2d(&[2.0], &[1.0; 9], s).unwrap(), vec![2.0]);
    }

    #[test]
    fn wrong_lengths_are_errors() {
        let s = shape(3, 1, 1, 4);
        assert!(conv2d(&[0.0; 3], &values(s.weight_len(), 0), s).is_err());
        assert!(conv2d_backward_filter(&values(s.input_len(), 0), &[0.0], s).is_err());
    }
}
