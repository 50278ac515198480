//! The global allocator: mimalloc, tuned for burn's CPU backend, which allocates a fresh
//! buffer for every tensor operation. With glibc's allocator every buffer above 32 MiB is a
//! new mapping whose pages the kernel zeroes on first touch, step after step of training
//! (a SmolLM2 step at 512 tokens spends a sixth of its time there). mimalloc reuses freed
//! memory; training, whose steps allocate the same sizes over and over, asks it to keep
//! freed memory instead of returning it to the system ([`keep_freed_memory`]).

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

// The option number of `mi_option_purge_delay` in mimalloc 3 (`mi_option_e` in its
// mimalloc.h); libmimalloc-sys names only some options.
const PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;

/// Keeps freed memory for reuse instead of returning it to the system (training: peak
/// memory is reached in the first step and reused by every later one).
pub fn keep_freed_memory() {
    // SAFETY: mimalloc options are plain integers read by the allocator; setting one is
    // allowed at any time.
    unsafe { libmimalloc_sys::mi_option_set(PURGE_DELAY, -1) }
}
