//! glibc malloc settings for a process that allocates and frees the same large tensors every
//! training step.
//!
//! Why: by default glibc returns freed memory above 128 KiB to the kernel (munmap, or trimming
//! the heap top), so every step pays page faults and kernel page zeroing for its activation and
//! gradient buffers again. Measured with `camflow bench ml` (vgg-small, batch 32, 2 cores): a
//! training step at 64x64 took 63-66 ms with the defaults and 48-55 ms with these settings
//! (BENCHMARKS.md). The cost is that freed memory stays with the process up to the trim
//! threshold, which is what a training run needs again on its next step anyway.

/// Serve allocations up to this size from the heap instead of fresh mmaps (glibc's maximum).
#[cfg(all(target_os = "linux", target_env = "gnu"))]
const MMAP_THRESHOLD: i32 = 32 << 20;
/// Return the heap top to the kernel only when this much of it is free.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
const TRIM_THRESHOLD: i32 = 256 << 20;

/// Applies the settings; a no-op off glibc. Call once, first thing in `main`.
pub fn tune() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes allocator parameters; it is called before any thread starts.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, MMAP_THRESHOLD);
        libc::mallopt(libc::M_TRIM_THRESHOLD, TRIM_THRESHOLD);
    }
}
