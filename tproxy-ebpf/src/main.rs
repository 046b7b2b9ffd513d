//! tproxy's kernel programs. One file per hook; every map is in `maps.rs`.
//!
//! | hook              | program            | file            |
//! |-------------------|--------------------|-----------------|
//! | tc ingress        | `tproxy_steer`     | `steer.rs`      |
//! | tc egress         | `tproxy_restore`   | `restore.rs`    |
//! | cgroup/getsockopt | `tproxy_getsockopt`| `getsockopt.rs` |
//! | cgroup/getsockname4/6 | `tproxy_getsockname4/6` | `getsockname.rs` |
//! | cgroup/setsockopt | `tproxy_setsockopt`| `setsockopt.rs` |
//! | sockops           | `tproxy_sockops`   | `sockops.rs`    |
//! | sk_msg (SOCKHASH) | `tproxy_sk_msg`    | `sk_msg.rs`     |
//! | raw tracepoint sock_recv_length | `tproxy_recv_length` | `recv_length.rs` |
//! | fexit tcp_bpf_recvmsg | `tproxy_recv_fexit` | `recv_fexit.rs` |
//! | fentry tcp_bpf_sendmsg | `tproxy_send_fentry` | `send_fentry.rs` |
//! | iter/tcp (run by userspace) | `tproxy_nudge_iter` | `nudge_iter.rs` |
//!
//! `peer.rs`: which sockets sockops pairs, and why no other can be.
//! `identity.rs`: who the proxy is (its cgroup), which every hook checks.
//! `recv.rs`: what a read does, for both read hooks (userspace attaches
//! one of the two).
//! `tcpseq.rs`: the kernel's sequence numbers that byte order hangs on.
//! `retire.rs`: sockops takes a pair that gave up the fast path out of the
//! SOCKHASH (sk_msg may not delete from it).
#![no_std]
#![no_main]
// Atomic add on map values (the BPF target has no CAS, so core's
// AtomicI64::fetch_add is not offered; XADD is).
#![feature(core_intrinsics)]
#![allow(internal_features)]

#[macro_use]
mod macros;

mod accepted;
mod atomic;
mod counters;
mod flow;
mod getsockname;
mod getsockopt;
mod identity;
mod maps;
mod memory;
mod netns;
mod nudge_iter;
mod packet;
mod peer;
mod recv;
mod recv_fexit;
mod recv_length;
mod restore;
mod retire;
mod send_fentry;
mod setsockopt;
mod sk_msg;
mod sockkey;
mod sockops;
mod steer;
mod tcpseq;

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    // The verifier proves there is no path here; this only satisfies no_std.
    loop {}
}

// GPL-compatible: the sockmap and checksum helpers are GPL-only.
#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
