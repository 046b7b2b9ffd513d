//! Whether the kernel will take a redirect's bytes into the reader's
//! socket memory.
//!
//! An ingress redirect charges the bytes to the reader's socket
//! (bpf_tcp_ingress: sk_wmem_schedule before 6.13, __sk_rmem_schedule
//! since), and that can fail: when the machine's TCP memory is under
//! pressure (`tcp_mem`), or the reader's memory cgroup is at its TCP limit
//! (cgroup v1's `memory.kmem.tcp.limit_in_bytes`). Then the kernel takes
//! part of the message, or none of it: for none, the sender's sendmsg
//! returns ENOMEM, which plain TCP never does (it waits for memory); for
//! part, it runs this program again on the rest, which the counts would
//! take for a new send. Seen in a 4 GiB guest on 6.1, where eight 128 MiB
//! echo streams bring TCP near its pressure mark: a connection broken by
//! ENOMEM, or a sender whose counts never settle, left on TCP with its
//! reader asleep. So a redirect goes only where the kernel's own rules
//! (__sk_mem_raise_allocated) grant it without condition: the machine
//! below its pressure mark, not flagged as under pressure, and the reader's
//! cgroup with room under its TCP limit. Otherwise the bytes go by TCP,
//! which waits for memory as it always does.
//!
//! The check and the charge are not one step: other senders (one per
//! CPU at a time) may charge in between, and the machine's count lags its
//! per-CPU reserves, so each side keeps `NodeConfig::mem_margin_pages`
//! spare. Seven reads per send cost sk_msg 60 % more per run (364 → 591
//! ns through HAProxy at 16 KiB), so the machine's headroom, once read, is
//! split among the CPUs and each spends its share for a few milliseconds
//! (`MEM_BUDGET`) before it reads the figures again; and only a reader
//! whose cgroup limits TCP memory, as its first read found
//! (`sock_api::PLAIN_TCP_LIMITED`), has that limit read per redirect
//! (591 → 468 → 415 ns).
//!
//! Read as the kernel reads them: `sk->sk_prot->memory_allocated`,
//! `->memory_pressure` and `->sysctl_mem[1]`, `sk->sk_memcg->tcpmem`.
//! Offsets from BTF (`NodeConfig`), reads by bpf_probe_read_kernel.
use aya_ebpf::helpers::{bpf_jiffies64, bpf_probe_read_kernel};
use tproxy_common::NodeConfig;

use crate::maps::{MEM_BUDGET, NODE};

/// How long a share read from the kernel's figures is spent before they
/// are read again: until the tick after next (1-2 jiffies: 4-8 ms at
/// HZ=250, 1-2 ms at HZ=1000). Each CPU spends only its share, so all of
/// them together stay below the mark however they send. Jiffies, not the
/// coarse clock: the verifier inlines bpf_jiffies64 into one load, where
/// the clock is a helper call on every redirect.
const BUDGET_JIFFIES: u64 = 2;

/// Room in socket `reader`'s memory (a kernel address) for `size` more
/// bytes; `limited`: its memory cgroup limits TCP memory
/// (`sock_api::PLAIN_TCP_LIMITED`). False when anything cannot be read.
#[inline(always)]
pub fn has_room(reader: u64, limited: bool, size: u64) -> bool {
    let Some(node) = NODE.get(0) else {
        return false;
    };
    if node.sk_prot_offset == 0 || reader == 0 {
        return false;
    }
    // Pages as the kernel charges them (x86-64: 4 KiB), one more for the
    // message's last partial page.
    let pages = (size >> 12) as i64 + 1;
    if !machine_has_room(node, reader, pages) {
        return false;
    }
    if !limited {
        return true;
    }
    match tcp_limit(node, reader) {
        Some((usage, max)) => {
            (usage as i64).saturating_add(pages + i64::from(node.mem_margin_pages)) <= max as i64
        }
        None => false,
    }
}

/// Whether socket `sk`'s memory cgroup limits its TCP memory (cgroup v1;
/// under cgroup v2 the counter is unlimited and unused).
#[inline(always)]
pub fn tcp_limited(sk: u64) -> bool {
    let Some(node) = NODE.get(0) else {
        return false;
    };
    tcp_limit(node, sk).is_some_and(|(_, max)| max < UNLIMITED)
}

/// A page counter's "no limit" (the kernel's PAGE_COUNTER_MAX, 2^51 pages
/// on x86-64), with room to spare.
const UNLIMITED: u64 = 1 << 50;

/// Pages charged to, and the limit of, socket `sk`'s memory cgroup's TCP
/// counter; None without a memory cgroup (or its offsets).
#[inline(always)]
fn tcp_limit(node: &NodeConfig, sk: u64) -> Option<(u64, u64)> {
    if node.sk_memcg_offset == 0 || node.memcg_tcpmem_offset == 0 || sk == 0 {
        return None;
    }
    // SAFETY (the reads below): a live socket and the memory cgroup it
    // points at, read through the helper, which checks each read.
    let memcg = unsafe { read_u64(sk + u64::from(node.sk_memcg_offset)) }.ok()?;
    // Newer kernels keep flags in the pointer's low bits.
    let memcg = memcg & !3;
    if memcg == 0 {
        return None;
    }
    let tcpmem = memcg + u64::from(node.memcg_tcpmem_offset);
    unsafe {
        Some((
            read_u64(tcpmem).ok()?,
            read_u64(tcpmem + u64::from(node.page_counter_max_offset)).ok()?,
        ))
    }
}

/// The machine's part: spent from this CPU's share while it is fresh,
/// else read from the kernel's figures through `reader`'s protocol.
#[inline(always)]
fn machine_has_room(node: &NodeConfig, reader: u64, pages: i64) -> bool {
    let Some(b) = MEM_BUDGET.get_ptr_mut(0) else {
        return false;
    };
    // SAFETY: no arguments, no side effects.
    let now = unsafe { bpf_jiffies64() };
    // SAFETY: this CPU's own slot; a program preempted on it by another
    // sender at worst spends the share twice, within the margin.
    unsafe {
        if now.wrapping_sub((*b).at) < BUDGET_JIFFIES {
            if (*b).pages >= pages {
                (*b).pages -= pages;
                return true;
            }
            // Found short a moment ago: TCP, without reading again.
            if (*b).pages < 0 {
                return false;
            }
        }
    }
    let headroom = headroom(node, reader).unwrap_or(-1) - pages;
    // SAFETY: as above.
    unsafe {
        (*b).at = now;
        (*b).pages = if headroom < 0 {
            -1
        } else {
            headroom / i64::from(node.possible_cpus.max(1))
        };
    }
    headroom >= 0
}

/// Pages the machine's TCP memory may still grow by before its pressure
/// mark, less the margin; negative when flagged under pressure or past it.
#[inline(always)]
fn headroom(node: &NodeConfig, reader: u64) -> Option<i64> {
    // SAFETY (every read below): a live socket and the kernel structures it
    // points at, read through the helper, which checks each read.
    let prot = unsafe { read_u64(reader + u64::from(node.sk_prot_offset)) }.ok()?;
    let (allocated, pressure, limits) = unsafe {
        (
            read_u64(prot + u64::from(node.proto_memory_allocated_offset)).ok()?,
            read_u64(prot + u64::from(node.proto_memory_pressure_offset)).ok()?,
            read_u64(prot + u64::from(node.proto_sysctl_mem_offset)).ok()?,
        )
    };
    if allocated == 0 || limits == 0 {
        return None;
    }
    let (allocated, mark) = unsafe { (read_u64(allocated).ok()?, read_u64(limits + 8).ok()?) };
    // A protocol without a pressure flag has no pointer to one.
    if pressure != 0 && unsafe { read_u64(pressure) }.map_or(true, |p| p != 0) {
        return Some(-1);
    }
    Some(mark as i64 - allocated as i64 - i64::from(node.mem_margin_pages))
}

#[inline(always)]
unsafe fn read_u64(addr: u64) -> Result<u64, i32> {
    // SAFETY: the caller's; the helper checks the read.
    unsafe { bpf_probe_read_kernel(addr as *const u64) }
}
