//! SOCKHASH keys from the sockops context: the full tuple as the socket
//! sees it, plus its network namespace's cookie. (sk_msg needs no key of
//! its own: it finds its socket's state by address, with the peer's key in
//! it.)
//!
//! Byte orders (they differ by field, and getting them wrong silently
//! breaks the lookup): addresses are network order;
//! `local_port` is host order; `remote_port` is the network-order port in
//! the upper 16 bits of a 32-bit field, i.e. `u32::from_be` of it is the
//! port in host order.
use aya_ebpf::{
    EbpfContext as _, bindings::bpf_sock_ops, helpers::bpf_get_netns_cookie,
    programs::SockOpsContext,
};
use tproxy_common::{AF_INET, AF_INET6, SockKey};

/// The tuple fields of a `bpf_sock_ops` (the same names exist in
/// `sk_msg_md` and `bpf_sock`). The verifier allows
/// only constant-offset loads from a context (no pointer into an array in
/// it), so each field, and each array element, is one volatile load.
macro_rules! key_from {
    ($ptr:expr, $cookie:expr) => {{
        let c = $ptr;
        let mut family = read_field!(c, family);
        let (mut local_addr, mut remote_addr) = if family == AF_INET6 as u32 {
            (
                [
                    read_field!(c, local_ip6[0]),
                    read_field!(c, local_ip6[1]),
                    read_field!(c, local_ip6[2]),
                    read_field!(c, local_ip6[3]),
                ],
                [
                    read_field!(c, remote_ip6[0]),
                    read_field!(c, remote_ip6[1]),
                    read_field!(c, remote_ip6[2]),
                    read_field!(c, remote_ip6[3]),
                ],
            )
        } else {
            (
                [read_field!(c, local_ip4), 0, 0, 0],
                [read_field!(c, remote_ip4), 0, 0, 0],
            )
        };
        // An IPv4 connection on a dual-stack (AF_INET6) socket, e.g. an app
        // listening on [::]: key it as IPv4, as its IPv4 peer keys it.
        if family == AF_INET6 as u32 && v4_mapped(&local_addr) && v4_mapped(&remote_addr) {
            family = AF_INET as u32;
            local_addr = [local_addr[3], 0, 0, 0];
            remote_addr = [remote_addr[3], 0, 0, 0];
        }
        SockKey {
            local_addr,
            remote_addr,
            local_port: read_field!(c, local_port),
            remote_port: u32::from_be(read_field!(c, remote_port)),
            family,
            _pad0: 0,
            netns_cookie: $cookie,
        }
    }};
}

/// `::ffff:a.b.c.d`.
#[inline(always)]
pub fn v4_mapped(a: &[u32; 4]) -> bool {
    a[0] == 0 && a[1] == 0 && a[2] == 0xffff_u32.to_be()
}

#[inline(always)]
pub fn from_sock_ops(ctx: &SockOpsContext) -> SockKey {
    let ops: *const bpf_sock_ops = ctx.ops;
    // SAFETY: the kernel's context for this program run.
    let cookie = unsafe { bpf_get_netns_cookie(ctx.as_ptr()) };
    key_from!(ops, cookie)
}

/// Both ends on this host: the same address, or loopback.
#[inline(always)]
pub fn both_local(k: &SockKey) -> bool {
    if k.local_addr == k.remote_addr {
        return true;
    }
    if k.family == AF_INET as u32 {
        // 127.0.0.0/8, network order: first byte 127.
        u32::from_be(k.remote_addr[0]) >> 24 == 127
    } else {
        k.remote_addr == [0, 0, 0, 1u32.to_be()]
    }
}
