use tproxy_common::{Counter, Target};

use crate::maps::{COUNTERS, TARGETS};

/// Adds `n` to counter `counter` of counter slot `slot` (a target's, or 0):
/// per-CPU, so no atomics needed; userspace sums CPUs.
#[inline(always)]
pub fn add(slot: u32, counter: Counter, n: u64) {
    if let Some(v) = COUNTERS.get_ptr_mut(counter.index(slot)) {
        // SAFETY: per-CPU slot, only this CPU writes it while we run.
        unsafe { *v += n };
    }
}

#[inline(always)]
pub fn inc(slot: u32, counter: Counter) {
    add(slot, counter, 1)
}

/// The target serving network namespace `cookie`, if any.
#[inline(always)]
pub fn target(cookie: u64) -> Option<&'static Target> {
    // SAFETY: a map value, valid for this program run; userspace replaces
    // entries whole (never a torn read of one field).
    unsafe { TARGETS.get(&cookie) }
}
