//! Every kernel source compiles with NVRTC, for Hopper and Ampere, and defines every entry point
//! the launchers call. Needs libnvrtc (the CUDA toolchain) but no GPU.
#![cfg(feature = "cuda")]

use latentflow_gpu_kernels::kernel::compile;
use latentflow_gpu_kernels::source::Kernel;

#[test]
fn every_kernel_compiles_and_exports_its_entry_points() {
    for arch in ["compute_90", "compute_80"] {
        for kernel in Kernel::all() {
            let ptx = compile(kernel, arch).unwrap_or_else(|e| panic!("{e}"));
            let text = ptx.to_src();
            for function in kernel.functions() {
                assert!(text.contains(&format!(".entry {function}(")), "{} for {arch}: no `{function}`", kernel.file());
            }
        }
    }
}
