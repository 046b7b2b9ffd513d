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
//! spare.
//!
//! Read as the kernel reads them: `sk->sk_prot->memory_allocated`,
//! `->memory_pressure` and `->sysctl_mem[1]`, `sk->sk_memcg->tcpmem`.
//! Offsets from BTF (`NodeConfig`), reads by bpf_probe_read_kernel.
use aya_ebpf::helpers::bpf_probe_read_kernel;

use crate::maps::NODE;

/// Room in socket `reader`'s memory (a kernel address) for `size` more
/// bytes. False when anything cannot be read.
#[inline(always)]
pub fn has_room(reader: u64, size: u64) -> bool {
    let Some(node) = NODE.get(0) else {
        return false;
    };
    if node.sk_prot_offset == 0 || reader == 0 {
        return false;
    }
    // Pages as the kernel charges them (x86-64: 4 KiB), one more for the
    // message's last partial page.
    let pages = (size >> 12) as i64 + 1;
    // SAFETY (every read below): a live socket and the kernel structures it
    // points at, read through the helper, which checks each read.
    let Ok(prot) = (unsafe { read_u64(reader + u64::from(node.sk_prot_offset)) }) else {
        return false;
    };
    let (Ok(allocated), Ok(pressure), Ok(limits)) = (unsafe {
        (
            read_u64(prot + u64::from(node.proto_memory_allocated_offset)),
            read_u64(prot + u64::from(node.proto_memory_pressure_offset)),
            read_u64(prot + u64::from(node.proto_sysctl_mem_offset)),
        )
    }) else {
        return false;
    };
    if allocated == 0 || limits == 0 {
        return false;
    }
    let (Ok(allocated), Ok(mark)) = (unsafe { (read_u64(allocated), read_u64(limits + 8)) }) else {
        return false;
    };
    // A protocol without a pressure flag has no pointer to one.
    let flagged = pressure != 0 && unsafe { read_u64(pressure) }.map_or(true, |p| p != 0);
    if flagged || (allocated as i64) + pages + i64::from(node.mem_margin_pages) > mark as i64 {
        return false;
    }
    if node.sk_memcg_offset == 0 || node.memcg_tcpmem_offset == 0 {
        return true;
    }
    let Ok(memcg) = (unsafe { read_u64(reader + u64::from(node.sk_memcg_offset)) }) else {
        return false;
    };
    // Newer kernels keep flags in the pointer's low bits.
    let memcg = memcg & !3;
    if memcg == 0 {
        return true;
    }
    // cgroup v1's TCP counter (unlimited, and unused, under cgroup v2).
    let tcpmem = memcg + u64::from(node.memcg_tcpmem_offset);
    let (Ok(usage), Ok(max)) = (unsafe {
        (
            read_u64(tcpmem),
            read_u64(tcpmem + u64::from(node.page_counter_max_offset)),
        )
    }) else {
        return false;
    };
    (usage as i64).saturating_add(pages + i64::from(node.mem_margin_pages))
        <= max.min(i64::MAX as u64) as i64
}

#[inline(always)]
unsafe fn read_u64(addr: u64) -> Result<u64, i32> {
    // SAFETY: the caller's; the helper checks the read.
    unsafe { bpf_probe_read_kernel(addr as *const u64) }
}
