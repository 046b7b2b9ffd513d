//! Which target (network namespace) a tc program's packet belongs to.
//!
//! In tc, `bpf_get_netns_cookie(skb)` is the cookie of `skb->sk`'s
//! namespace, and init_net's when the skb has no socket, as no received
//! packet has: it cannot tell pods apart. A packet's namespace is its
//! device's (`skb->dev->nd_net`), read with three kernel loads whose
//! offsets the loader takes from BTF (`NODE`); the first load takes the
//! context itself as a kernel address, which the verifier allows only with
//! CAP_PERFMON, as the agent has. A single run serves one namespace: its
//! tc programs take the cookie from `NODE` and never read the kernel's
//! structs (so `--no-accel` still needs no CAP_PERFMON).
use core::ptr::read_volatile;

use aya_ebpf::{EbpfContext as _, helpers::bpf_probe_read_kernel, programs::TcContext};

use crate::maps::NODE;

/// 1 in a many-target object, 0 in a single run's; set by the loader
/// (`MULTI_TARGET_GLOBAL`). Read-only data: the verifier knows its value
/// and never looks at the path it rules out.
#[unsafe(no_mangle)]
static TPROXY_MULTI_TARGET: u8 = 0;

/// The cookie of the namespace of the packet's device.
#[inline(always)]
pub fn of_packet(ctx: &TcContext) -> Option<u64> {
    let node = NODE.get(0)?;
    // SAFETY: a plain read of our own global.
    if unsafe { read_volatile(&TPROXY_MULTI_TARGET) } == 0 {
        return Some(node.single_netns_cookie);
    }
    // `next`, `prev`, then `dev`: the first three words of struct sk_buff
    // on every 64-bit kernel (the loader checks `dev` is at 16 in BTF).
    // SAFETY: the helper checks every read; a bad address is an error.
    let head = unsafe { bpf_probe_read_kernel(ctx.as_ptr() as *const [u64; 3]) }.ok()?;
    let dev = head[2];
    if dev == 0 {
        return None;
    }
    let net =
        unsafe { bpf_probe_read_kernel((dev + u64::from(node.dev_nd_net_offset)) as *const u64) }
            .ok()?;
    if net == 0 {
        return None;
    }
    unsafe { bpf_probe_read_kernel((net + u64::from(node.net_cookie_offset)) as *const u64) }.ok()
}
