//! Atomic add on a shared map value: BPF_ATOMIC ADD (XADD), which every
//! BPF CPU version has. Rust offers `fetch_add` only where the target has
//! compare-and-swap, which bpfel-unknown-none does not claim.
use core::intrinsics::{AtomicOrdering, atomic_xadd};

/// `*p += n`, atomically, result unused (so LLVM emits a plain XADD).
#[inline(always)]
pub fn add(p: *mut u64, n: u64) {
    // SAFETY: callers pass a pointer into a live map value.
    unsafe {
        atomic_xadd::<u64, u64, { AtomicOrdering::Relaxed }>(p, n);
    }
}
