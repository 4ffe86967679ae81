//! Compiling and loading the kernels (behind the `cuda` feature): NVRTC compiles each source
//! once per GPU architecture, and each device (CUDA context) loads the module once; both are
//! cached for the life of the process.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};

use cudarc::driver::{CudaContext, CudaFunction, CudaModule, CudaStream};
use cudarc::nvrtc::{compile_ptx_with_opts, CompileError, CompileOptions, Ptx};

use crate::source::Kernel;
use crate::KernelError;

type PtxCache = Mutex<HashMap<(Kernel, String), Arc<Ptx>>>;
type ModuleCache = Mutex<HashMap<(usize, Kernel), Arc<CudaModule>>>;

fn ptx_cache() -> &'static PtxCache {
    static CACHE: OnceLock<PtxCache> = OnceLock::new();
    CACHE.get_or_init(Default::default)
}

fn module_cache() -> &'static ModuleCache {
    static CACHE: OnceLock<ModuleCache> = OnceLock::new();
    CACHE.get_or_init(Default::default)
}

/// Compiles `kernel` to PTX for `arch` (e.g. `compute_90`) with NVRTC, once per process.
///
/// Needs libnvrtc but no GPU, so the compile tests run on any machine with the toolchain.
pub fn compile(kernel: Kernel, arch: &str) -> Result<Arc<Ptx>, KernelError> {
    let key = (kernel, arch.to_string());
    if let Some(ptx) = ptx_cache().lock().expect("ptx cache").get(&key) {
        return Ok(ptx.clone());
    }
    let mut options: Vec<String> = kernel.options().iter().map(|o| o.to_string()).collect();
    options.push(format!("--gpu-architecture={arch}"));
    options.push("--std=c++17".into());
    let opts = CompileOptions { options, name: Some(kernel.file().into()), ..Default::default() };
    let ptx = compile_ptx_with_opts(kernel.program(), opts).map_err(|e| {
        let message = match e {
            CompileError::CompileError { log, .. } => log.to_string_lossy().into_owned(),
            other => other.to_string(),
        };
        KernelError::Compile { file: kernel.file(), arch: arch.to_string(), message }
    })?;
    let ptx = Arc::new(ptx);
    ptx_cache().lock().expect("ptx cache").insert(key, ptx.clone());
    Ok(ptx)
}

/// The virtual architecture of `context`'s GPU (`compute_XY`), which its driver can JIT.
pub fn arch(context: &CudaContext) -> Result<String, KernelError> {
    let (major, minor) = context.compute_capability().map_err(KernelError::driver)?;
    Ok(format!("compute_{major}{minor}"))
}

/// The function `name` of `kernel`, loaded on the device of `stream` (compiled and loaded on
/// first use, then cached per device).
pub fn function(stream: &Arc<CudaStream>, kernel: Kernel, name: &str) -> Result<CudaFunction, KernelError> {
    let context = stream.context();
    let key = (context.ordinal(), kernel);
    let cached = module_cache().lock().expect("module cache").get(&key).cloned();
    let module = match cached {
        Some(module) => module,
        None => {
            let ptx = compile(kernel, &arch(context)?)?;
            let module = context.load_module((*ptx).clone()).map_err(KernelError::driver)?;
            module_cache().lock().expect("module cache").insert(key, module.clone());
            module
        }
    };
    module.load_function(name).map_err(KernelError::driver)
}

/// True when this machine has an NVIDIA driver and at least one GPU. Checks the driver's
/// device node first, so machines with only the build toolchain (whose `libcuda` is a link
/// stub) never call into the driver.
pub fn gpu_available() -> bool {
    gpu_count().is_ok_and(|n| n > 0)
}

/// How many GPUs the driver sees (0 without a driver; see [`gpu_available`]).
pub fn gpu_count() -> Result<usize, KernelError> {
    if !std::path::Path::new("/dev/nvidiactl").exists() {
        return Ok(0);
    }
    let n = CudaContext::device_count().map_err(KernelError::driver)?;
    Ok(n.max(0) as usize)
}

/// A grid-stride launch over `total` elements: 256 threads per block, at most 65,535 blocks.
pub fn elementwise(total: usize) -> cudarc::driver::LaunchConfig {
    let blocks = total.div_ceil(256).clamp(1, 65_535) as u32;
    cudarc::driver::LaunchConfig { grid_dim: (blocks, 1, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 }
}

/// A launch error as a kernel error.
pub(crate) fn launched(
    result: Result<Option<(cudarc::driver::CudaEvent, cudarc::driver::CudaEvent)>, cudarc::driver::DriverError>,
) -> Result<(), KernelError> {
    result.map(|_| ()).map_err(KernelError::driver)
}

/// Prefix sums of `lens` (`[0, l0, l0 + l1, ...]` without the total) and the total, for the
/// multi-tensor kernels.
pub(crate) fn offsets(lens: impl Iterator<Item = usize>) -> (Vec<i64>, usize) {
    let mut total = 0;
    let starts = lens
        .map(|len| {
            let start = total as i64;
            total += len;
            start
        })
        .collect();
    (starts, total)
}
