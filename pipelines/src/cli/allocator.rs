//! Keeping the resident memory of a long job flat.
//!
//! glibc's malloc serves blocks over its mmap threshold (128 KiB) straight from the kernel and
//! gives them back on free, but the first such free RAISES the threshold (up to 32 MiB). From
//! then on every decoded image, crop and batch buffer comes from the heap arenas of whichever
//! pool thread handled it, and those arenas fragment and never shrink: peak RSS crept up with the
//! number of rows (29.8 MB at 1,000 demo rows, 31.9 MB at 4,000, on 2 workers). A fixed threshold
//! keeps large buffers on mmap: 23.4 MB at 1,000 rows, 24.7 at 4,000, 25.4 at 10,000.

/// The threshold over which blocks are mmapped, fixed (setting it stops glibc adjusting it).
#[cfg(all(target_os = "linux", target_env = "gnu"))]
const MMAP_THRESHOLD: i32 = 128 * 1024;

/// Fixes glibc's mmap threshold for this process; other platforms' allocators need nothing.
pub fn keep_large_blocks_on_mmap() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        // SAFETY: mallopt only changes allocator tuning; called before the job starts threads.
        #[allow(unsafe_code)]
        let ok = unsafe { libc::mallopt(libc::M_MMAP_THRESHOLD, MMAP_THRESHOLD) };
        if ok != 1 {
            tracing::debug!("mallopt(M_MMAP_THRESHOLD) was refused; resident memory may creep up");
        }
    }
}
