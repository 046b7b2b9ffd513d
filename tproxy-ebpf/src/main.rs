//! tproxy's kernel programs. One file per hook; every map is in `maps.rs`.
//!
//! | hook              | program            | file            |
//! |-------------------|--------------------|-----------------|
//! | tc ingress        | `tproxy_steer`     | `steer.rs`      |
//! | tc egress         | `tproxy_restore`   | `restore.rs`    |
//! | cgroup/getsockopt | `tproxy_getsockopt`| `getsockopt.rs` |
//! | cgroup/getsockname4/6 | `tproxy_getsockname4/6` | `getsockname.rs` |
//! | sockops           | `tproxy_sockops`   | `sockops.rs`    |
//! | sk_msg (SOCKHASH) | `tproxy_sk_msg`    | `sk_msg.rs`     |
#![no_std]
#![no_main]

mod accepted;
mod counters;
mod flow;
mod getsockname;
mod getsockopt;
mod maps;
mod packet;
mod restore;
mod sk_msg;
mod sockops;
mod steer;

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
