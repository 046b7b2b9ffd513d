//! Atomic adds on shared map values: BPF_ATOMIC ADD (XADD), which every
//! BPF CPU version has. Rust offers `fetch_add` only where the target has
//! compare-and-swap, which bpfel-unknown-none does not claim.
//!
//! The JIT makes each a locked instruction on x86-64 (`lock add`), which is
//! also a full memory barrier: `publish` relies on that. (arm64's JIT emits
//! STADD, which orders nothing; there `publish` would need the fetching
//! form, BPF_FETCH, which LLVM emits only for -mcpu=v3 objects.)
use core::intrinsics::{AtomicOrdering, atomic_xadd};

/// `*p += n`, atomically, result unused (so LLVM emits a plain XADD).
#[inline(always)]
pub fn add(p: *mut u64, n: u64) {
    // SAFETY: callers pass a pointer into a live map value.
    unsafe {
        atomic_xadd::<u64, u64, { AtomicOrdering::Relaxed }>(p, n);
    }
}

/// `*p` goes from `old` to `new` (the caller is its only writer), with a
/// full barrier after the store: what this CPU reads next is read after
/// the store is visible to every other CPU (the store-load order two
/// sockets need to agree on who stops redirecting; see sk_msg.rs).
#[inline(always)]
pub fn publish(p: *mut u64, old: u64, new: u64) {
    // SeqCst: LLVM must not move the caller's next reads above it either.
    // SAFETY: callers pass a pointer into a live map value.
    unsafe {
        atomic_xadd::<u64, u64, { AtomicOrdering::SeqCst }>(p, new.wrapping_sub(old));
    }
}

/// 32-bit `publish`.
#[inline(always)]
pub fn publish32(p: *mut u32, old: u32, new: u32) {
    // SAFETY: callers pass a pointer into a live map value.
    unsafe {
        atomic_xadd::<u32, u32, { AtomicOrdering::SeqCst }>(p, new.wrapping_sub(old));
    }
}

/// `*p -= 1`, atomically, unless it reads 0: a per-target count of map
/// entries (`FLOWS_IN_USE`, `SOCKS_IN_USE`) that started after its entries
/// did reads low rather than wrapping to "full". Two racing decrements of
/// a count of 1 may both go ahead (then it wraps: `count_reached` takes a
/// wrapped count for "under quota"), or, the read stale, one may be
/// skipped (then it reads one high): the count is zeroed when its slot's
/// target is swept.
#[inline(always)]
pub fn dec_count(p: *mut u64) {
    // SAFETY: callers pass a pointer into a live map value; one aligned word.
    if unsafe { core::ptr::read_volatile(p) } > 0 {
        add(p, u64::MAX);
    }
}

/// Has the count at `p` reached `quota`? A count wrapped below 0 (racing
/// decrements, see `dec_count`) has not: better a few entries past a quota
/// than a target locked out of the table for good.
#[inline(always)]
pub fn count_reached(p: *mut u64, quota: u32) -> bool {
    // SAFETY: callers pass a pointer into a live map value; one aligned word.
    let n = unsafe { core::ptr::read_volatile(p) } as i64;
    n >= i64::from(quota)
}
