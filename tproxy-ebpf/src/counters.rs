use tproxy_common::Counter;

use crate::maps::COUNTERS;

/// Adds `n` to a per-CPU counter: no atomics needed, userspace sums CPUs.
#[inline(always)]
pub fn add(counter: Counter, n: u64) {
    if let Some(slot) = COUNTERS.get_ptr_mut(counter as u32) {
        // SAFETY: per-CPU slot, only this CPU writes it while we run.
        unsafe { *slot += n };
    }
}

#[inline(always)]
pub fn inc(counter: Counter) {
    add(counter, 1)
}
