//! Is this socket the proxy's end of a steered flow, and where was that
//! flow going? Shared by cgroup/getsockopt and cgroup/getsockname.
use aya_ebpf::bindings::bpf_sock;
use tproxy_common::{AF_INET, AF_INET6, FlowKey};

use crate::{flow, sockkey::v4_mapped};

const IPPROTO_TCP: u32 = 6;

/// The original destination of a steered flow, as the proxy's accepted
/// socket should see it. Address network order, IPv4 in `[0]`.
pub struct OrigDst {
    pub family: u8,
    pub addr: [u32; 4],
    /// Network order.
    pub port: u16,
    /// The flow's key in the flow table.
    pub key: FlowKey,
}

/// Looks the socket up in the flow table, by exactly the tuple the steering
/// recorded: its remote end is the client, its local port the proxy port
/// (rewrite) or the dialled port (tproxy), so a direct connection from the
/// same client address and port to some other port is not the steered
/// flow. `netns_cookie` (the socket's namespace, a target's) is part of the
/// key: the cgroup may hold other namespaces' sockets with the same tuple.
#[inline(always)]
pub fn original_dst(sk: *const bpf_sock, netns_cookie: u64) -> Option<OrigDst> {
    if sk.is_null() {
        return None;
    }
    if read_field!(sk, protocol) != IPPROTO_TCP {
        return None;
    }
    let (family, remote, local) = match read_field!(sk, family) as u8 {
        AF_INET => (
            AF_INET,
            [read_field!(sk, dst_ip4), 0, 0, 0],
            [read_field!(sk, src_ip4), 0, 0, 0],
        ),
        AF_INET6 => {
            let r = [
                read_field!(sk, dst_ip6[0]),
                read_field!(sk, dst_ip6[1]),
                read_field!(sk, dst_ip6[2]),
                read_field!(sk, dst_ip6[3]),
            ];
            let l = [
                read_field!(sk, src_ip6[0]),
                read_field!(sk, src_ip6[1]),
                read_field!(sk, src_ip6[2]),
                read_field!(sk, src_ip6[3]),
            ];
            if v4_mapped(&r) {
                (AF_INET, [r[3], 0, 0, 0], [l[3], 0, 0, 0])
            } else {
                (AF_INET6, r, l)
            }
        }
        _ => return None,
    };
    let key = FlowKey {
        client_addr: remote,
        local_addr: local,
        client_port: read_field!(sk, dst_port) as u16,
        local_port: (read_field!(sk, src_port) as u16).to_be(), // host order in bpf_sock
        family,
        _pad0: [0; 3],
        netns_cookie,
    };
    let orig_port = flow::lookup(&key)?.orig_port();
    Some(OrigDst {
        family,
        addr: local,
        port: orig_port,
        key,
    })
}
