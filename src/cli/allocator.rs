//! Allocator tuning for the whole process.
//!
//! glibc gives each thread that allocates its own arena. Volumes read or computed on a
//! worker thread are then freed into that thread's arena, and the next volume the main
//! thread allocates gets fresh pages instead of reusing them: on the peer benchmark grid
//! this made background removal 60 % slower and raised peak memory. One shared arena
//! reuses them; the lock it adds is cheap because the pipeline's allocations are few and
//! large.

/// Keeps every thread on one malloc arena (glibc only; a no-op elsewhere). Call before any
/// worker thread starts.
pub fn use_one_malloc_arena() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes an allocator parameter; it is called before other
    // threads exist.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 1);
    }
}
