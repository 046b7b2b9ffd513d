//! Who the proxy is, seen from its sockets: where it listens
//! (`PROXY_LISTENERS`, `PRIOR_LISTENERS`) and which connects are its own
//! (`PROXY_CONNECTS`), so steering and pairing serve no other process
//! (`tproxy-ebpf/src/identity.rs`; the cgroup itself is in
//! `Config::proxy_cgroup_id`).
use core::mem::{offset_of, size_of};

/// `PROXY_LISTENERS` entries: the proxy's distinct listening addresses on
/// its port, node-wide.
pub const PROXY_LISTENERS_MAX: u32 = 4_096;
/// `PROXY_CONNECTS` entries: the proxy's upstream connects between
/// TCP_CONNECT_CB and ESTABLISHED, node-wide.
pub const PROXY_CONNECTS_MAX: u32 = 16_384;

/// `PROXY_LISTENERS` key: a listening socket's address as the kernel's
/// lookup returns it (`bpf_sock`: family, source address, source port
/// host order), in one namespace. A dual-stack listener on `[::]` is
/// AF_INET6 `::` for IPv4 SYNs too, both when it listens and when found.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ListenerKey {
    pub addr: [u32; 4],
    pub port: u32,
    pub family: u32,
    pub netns_cookie: u64,
}

// Layout checks: the eBPF side reads these structs through raw map values,
// so a silent change of size or offset would be a wrong answer, not an error.
const _: () = {
    assert!(size_of::<ListenerKey>() == 32);
    assert!(offset_of!(ListenerKey, port) == 16);
    assert!(offset_of!(ListenerKey, netns_cookie) == 24);
};
