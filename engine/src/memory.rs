//! The process's allocator policy: freed tensor buffers stay in the heap for the next step.
//!
//! A training step allocates and frees the same few hundred buffers (activations, gradients,
//! convolution patches) every step. With glibc's defaults every buffer over its dynamic mmap
//! threshold is a fresh `mmap`, and freed heap tops are trimmed back to the kernel, so each step
//! faults and zeroes its pages again: on the CPU tiny-UNet step that was ~2 million page faults
//! in a dozen steps and ~20% of the CPU time. [`keep_freed_memory`] raises the mmap threshold to
//! glibc's maximum (32 MiB) and turns trimming off, so those buffers are reused instead.
//!
//! The cost: the process keeps its peak heap until it exits (its RSS does not fall between
//! steps), which is what a long training job does anyway.

use std::sync::Once;

/// Applies the policy once per process (later calls do nothing); a no-op off glibc.
///
/// ```
/// latentflow_engine::memory::keep_freed_memory();
/// ```
pub fn keep_freed_memory() {
    static APPLIED: Once = Once::new();
    APPLIED.call_once(apply);
}

/// glibc's largest `M_MMAP_THRESHOLD` on 64-bit targets (`4 * 1024 * 1024 * sizeof(long)`).
#[cfg(all(target_os = "linux", target_env = "gnu"))]
const MMAP_THRESHOLD_MAX: libc::c_int = 32 << 20;

#[cfg(all(target_os = "linux", target_env = "gnu"))]
#[allow(unsafe_code)]
fn apply() {
    // An explicit setting in the environment (glibc's MALLOC_*_ tunables) wins.
    let set_by_user = |name: &str| std::env::var_os(name).is_some();
    // SAFETY: mallopt only changes allocator parameters; it is called before the job's
    // threads allocate in earnest, and glibc serialises it against concurrent malloc calls.
    unsafe {
        if !set_by_user("MALLOC_MMAP_THRESHOLD_") {
            libc::mallopt(libc::M_MMAP_THRESHOLD, MMAP_THRESHOLD_MAX);
        }
        if !set_by_user("MALLOC_TRIM_THRESHOLD_") {
            libc::mallopt(libc::M_TRIM_THRESHOLD, libc::c_int::MAX);
        }
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn apply() {}
