//! Who the proxy is: the processes of one cgroup (v2) and the cgroups
//! below it (`Config::proxy_cgroup_id`), which no unprivileged process can
//! join. Steering sends new flows only to listeners the proxy opened
//! (`PROXY_LISTENERS`, kept by sockops at TCP_LISTEN_CB); the
//! original-destination hooks answer only the proxy's calls; sockops pairs
//! a proxy->app connection only if the proxy made it (`PROXY_CONNECTS`).
use aya_ebpf::{
    EbpfContext as _,
    bindings::{
        BPF_F_CURRENT_NETNS, BPF_SOCK_OPS_STATE_CB_FLAG, bpf_sock, bpf_sock_ops, bpf_sock_tuple,
        bpf_sock_tuple__bindgen_ty_1__bindgen_ty_1, bpf_sock_tuple__bindgen_ty_1__bindgen_ty_2,
    },
    helpers::{
        bpf_get_current_ancestor_cgroup_id, bpf_get_current_task, bpf_probe_read_kernel,
        bpf_sk_lookup_tcp, bpf_sk_release,
    },
    programs::{SockOpsContext, TcContext},
};
use tproxy_common::{AF_INET, AF_INET6, Config, ListenerKey};

use crate::{
    atomic,
    maps::{NODE, PRIOR_LISTENERS, PROXY_LISTENERS},
    packet::Tcp,
};

/// 1 when the kernel offers bpf_get_current_pid_tgid to sockops and cgroup
/// sockopt programs (Linux >= 6.10), set by the loader (`PID_TGID_GLOBAL`).
/// Read-only data: on older kernels the verifier never looks at the call.
#[unsafe(no_mangle)]
static TPROXY_PID_TGID: u8 = 0;

/// The calling thread (pid_tgid), where the kernel lets this program ask.
#[inline(always)]
pub fn thread() -> Option<u64> {
    // SAFETY: a plain read of our own global.
    if unsafe { core::ptr::read_volatile(&TPROXY_PID_TGID) } == 0 {
        return None;
    }
    // aya-ebpf wraps this helper safely (no arguments).
    Some(aya_ebpf::helpers::bpf_get_current_pid_tgid())
}

/// Is the calling process (a syscall's: cgroup sockopt and sock_addr
/// hooks, sockops at TCP_CONNECT_CB) the proxy? Always true with no
/// identity set (crafted-packet tests).
#[inline(always)]
pub fn caller_is_proxy(cfg: &Config) -> bool {
    if cfg.proxy_cgroup_id == 0 {
        return true;
    }
    // SAFETY: no pointers; 0 if the caller is above that level.
    let id = unsafe { bpf_get_current_ancestor_cgroup_id(cfg.proxy_cgroup_level as i32) };
    id == cfg.proxy_cgroup_id
}

/// 1 when sock_ops programs may call bpf_get_current_ancestor_cgroup_id
/// (Linux 6.4), set by the loader (`SOCKOPS_CGROUP_GLOBAL`). Read-only
/// data: where it is 0 the verifier never sees that call.
#[unsafe(no_mangle)]
static TPROXY_SOCKOPS_CGROUP: u8 = 0;

/// `caller_is_proxy` for sockops (TCP_CONNECT_CB, TCP_LISTEN_CB: the
/// calling process's context). Before 6.4 sock_ops may not call the
/// helper; it may read kernel memory (CAP_PERFMON), so it walks what the
/// helper walks: current->cgroups->dfl_cgrp, its ancestor at the proxy's
/// level, that cgroup's kernfs node id. Offsets come from the kernel's
/// BTF; any read that fails, or an offset BTF did not give, is "not the
/// proxy" (fail closed).
#[inline(always)]
pub fn sockops_caller_is_proxy(cfg: &Config) -> bool {
    if cfg.proxy_cgroup_id == 0 {
        return true;
    }
    // SAFETY: a plain read of our own global.
    if unsafe { core::ptr::read_volatile(&TPROXY_SOCKOPS_CGROUP) } != 0 {
        return caller_is_proxy(cfg);
    }
    current_ancestor_cgroup_id(cfg.proxy_cgroup_level) == Some(cfg.proxy_cgroup_id)
}

#[inline(always)]
fn read_u64(addr: u64) -> Option<u64> {
    // SAFETY: the helper checks the read; a bad address is an error.
    unsafe { bpf_probe_read_kernel(addr as *const u64) }.ok()
}

/// The kernel's `__bpf_get_ancestor_cgroup_id(task_dfl_cgroup(current),
/// level)`, by hand.
#[inline(always)]
fn current_ancestor_cgroup_id(level: u32) -> Option<u64> {
    let n = NODE.get(0)?;
    if n.task_cgroups_offset == 0 || n.kernfs_node_id_offset == 0 {
        return None;
    }
    // SAFETY: no arguments; the current task, read only through the helper.
    let task = unsafe { bpf_get_current_task() };
    let cset = read_u64(task + u64::from(n.task_cgroups_offset))?;
    let cgrp = read_u64(cset + u64::from(n.css_set_dfl_cgrp_offset))?;
    // SAFETY: as read_u64; `level` is an int.
    let own =
        unsafe { bpf_probe_read_kernel((cgrp + u64::from(n.cgroup_level_offset)) as *const i32) }
            .ok()?;
    // cgroup_ancestor(): none past the cgroup's own level.
    if own < 0 || level > own as u32 || level > 255 {
        return None;
    }
    let anc = read_u64(cgrp + u64::from(n.cgroup_ancestors_offset) + 8 * u64::from(level))?;
    let kn = read_u64(anc + u64::from(n.cgroup_kn_offset))?;
    read_u64(kn + u64::from(n.kernfs_node_id_offset))
}

/// sockops, TCP_LISTEN_CB (in the listening process): a proxy socket
/// starting to listen is counted in `PROXY_LISTENERS` (on any port: the
/// proxy port may change in place later), and asks for state callbacks to
/// be uncounted when it closes.
#[inline(always)]
pub fn listening(ctx: &SockOpsContext, cfg: &Config, cookie: u64) {
    if !sockops_caller_is_proxy(cfg) {
        return;
    }
    let key = listener_key(ctx, cookie);
    const BPF_NOEXIST: u64 = 1;
    let _ = PROXY_LISTENERS.insert(&key, &0, BPF_NOEXIST);
    if let Some(v) = PROXY_LISTENERS.get_ptr_mut(&key) {
        atomic::add(v, 1);
        let _ = ctx.set_cb_flags(BPF_SOCK_OPS_STATE_CB_FLAG as i32);
    }
}

/// sockops, STATE_CB from LISTEN to CLOSE: one of the proxy's listeners
/// closed (only those ask for state callbacks while listening).
#[inline(always)]
pub fn stopped_listening(ctx: &SockOpsContext, cookie: u64) {
    if let Some(v) = PROXY_LISTENERS.get_ptr_mut(&listener_key(ctx, cookie)) {
        // -1, wrapping.
        atomic::add(v, u64::MAX);
    }
}

#[inline(always)]
fn listener_key(ctx: &SockOpsContext, cookie: u64) -> ListenerKey {
    let c: *const bpf_sock_ops = ctx.ops;
    let family = read_field!(c, family);
    let addr = if family == u32::from(AF_INET6) {
        [
            read_field!(c, local_ip6[0]),
            read_field!(c, local_ip6[1]),
            read_field!(c, local_ip6[2]),
            read_field!(c, local_ip6[3]),
        ]
    } else {
        [read_field!(c, local_ip4), 0, 0, 0]
    };
    ListenerKey {
        addr,
        port: read_field!(c, local_port),
        family,
        netns_cookie: cookie,
    }
}

/// tc ingress, a new SYN about to be rewritten to the proxy port: would
/// the kernel hand it to a listener the proxy opened? Looks the listener
/// up as TCP will (the same tuple, the device's namespace, more specific
/// binds and SO_REUSEPORT included) and finds it in `PROXY_LISTENERS`.
/// Any user may bind a port above 1024: without this, a process listening
/// on the proxy port while the proxy is down (or on a more specific
/// address) would take steered connections. No listener at all: true (the
/// kernel answers with a RST, restored to the dialled port on egress).
/// Only SYNs pay for the lookup.
#[inline(always)]
pub fn proxy_listens(ctx: &TcContext, tcp: &Tcp, cfg: &Config, cookie: u64) -> bool {
    if cfg.proxy_cgroup_id == 0 {
        return true;
    }
    // SAFETY: a zeroed tuple is valid; the union member written is the
    // one whose size is passed.
    let mut tuple: bpf_sock_tuple = unsafe { core::mem::zeroed() };
    let size = if tcp.family == AF_INET {
        // SAFETY: writing the union's IPv4 member.
        let t = unsafe { &mut tuple.__bindgen_anon_1.ipv4 };
        t.saddr = tcp.src[0];
        t.daddr = tcp.dst[0];
        t.sport = tcp.sport;
        t.dport = cfg.proxy_port.to_be();
        core::mem::size_of::<bpf_sock_tuple__bindgen_ty_1__bindgen_ty_1>()
    } else {
        // SAFETY: writing the union's IPv6 member.
        let t = unsafe { &mut tuple.__bindgen_anon_1.ipv6 };
        t.saddr = tcp.src;
        t.daddr = tcp.dst;
        t.sport = tcp.sport;
        t.dport = cfg.proxy_port.to_be();
        core::mem::size_of::<bpf_sock_tuple__bindgen_ty_1__bindgen_ty_2>()
    };
    // SAFETY: the helper reads `size` bytes of the tuple; the socket it
    // returns holds a reference, released below on every path.
    let sk = unsafe {
        bpf_sk_lookup_tcp(
            ctx.as_ptr(),
            &mut tuple,
            size as u32,
            BPF_F_CURRENT_NETNS as u64,
            0,
        )
    };
    if sk.is_null() {
        return true;
    }
    let s: *const bpf_sock = sk;
    let family = read_field!(s, family);
    let addr = if family == u32::from(AF_INET6) {
        [
            read_field!(s, src_ip6[0]),
            read_field!(s, src_ip6[1]),
            read_field!(s, src_ip6[2]),
            read_field!(s, src_ip6[3]),
        ]
    } else {
        [read_field!(s, src_ip4), 0, 0, 0]
    };
    let key = ListenerKey {
        addr,
        port: read_field!(s, src_port),
        family,
        netns_cookie: cookie,
    };
    // SAFETY: the socket the lookup returned, released once.
    unsafe { bpf_sk_release(sk.cast()) };
    // SAFETY: plain lookups; the values are copied out at once.
    unsafe {
        PROXY_LISTENERS.get(&key).is_some_and(|n| *n != 0)
            || PRIOR_LISTENERS.get(&key).is_some_and(|n| *n != 0)
    }
}
