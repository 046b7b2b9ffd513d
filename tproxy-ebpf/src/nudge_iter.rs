//! `iter/tcp`: the nudger's hand. Userspace runs this TCP socket iterator
//! over one network namespace (the one current when it creates the
//! iterator) after putting the sockets to wake in `NUDGE`; for each of
//! them whose reader still has not read since, it does what sockops'
//! `nudge` does from a packet: SO_RCVLOWAT set to the value it has, so
//! tcp_set_rcvlowat calls tcp_data_ready, which wakes the reader since TCP
//! bytes are readable. (A socket iterator is the one program type that may
//! call bpf_setsockopt on a socket it did not get from a packet or a
//! syscall of that socket; the kernel holds the socket's lock around it.)
//!
//! Only sockets userspace put in `NUDGE`, which holds only sockets it was
//! told about by `recv.rs`, which reports only sockets in `SOCKS`:
//! nothing else in the namespace is touched.
//!
//! aya-ebpf has no macro for iterators: the section name is what tells the
//! loader (aya-obj) the program type.
use core::ffi::c_void;

use tproxy_common::Counter;

use crate::{
    counters,
    maps::{NUDGE, SOCKS},
};

/// The kernel's `struct bpf_iter__tcp { struct bpf_iter_meta *meta; struct
/// sock_common *sk_common; uid_t uid; }`.
#[repr(C)]
struct IterTcp {
    meta: *mut c_void,
    sk_common: *mut c_void,
    uid: u32,
}

#[unsafe(no_mangle)]
#[unsafe(link_section = "iter/tcp")]
pub fn tproxy_nudge_iter(ctx: *mut c_void) -> i32 {
    // SAFETY: the kernel passes a bpf_iter__tcp; sk_common may be NULL
    // (the end of the walk).
    let sk = unsafe { (*ctx.cast::<IterTcp>()).sk_common };
    if !sk.is_null() {
        wake(sk);
    }
    0
}

#[inline(always)]
fn wake(sk: *mut c_void) {
    const SOL_SOCKET: i32 = 1;
    const SO_RCVLOWAT: i32 = 18;
    // The socket's address, as sockops, sk_msg and the read hook see it
    // (struct sock starts with its sock_common).
    let addr = sk as u64;
    // SAFETY: a map value, valid for this run.
    let Some(&want) = (unsafe { NUDGE.get(&addr) }) else {
        return;
    };
    let Some(own) = SOCKS.get_ptr(&addr) else {
        return;
    };
    // SAFETY: a live SOCKS entry; `read` is one aligned word (atomic adds).
    let (read, slot) = unsafe {
        (
            core::ptr::read_volatile(&raw const (*own).read),
            (*own).slot,
        )
    };
    // Read since userspace looked: awake after all.
    if read != want {
        return;
    }
    let mut v: i32 = 1;
    // SAFETY: a socket the iterator holds locked; 4-byte buffers. Both
    // helpers refuse a socket that is not a full one (request, timewait).
    unsafe {
        if aya_ebpf::helpers::bpf_getsockopt(sk, SOL_SOCKET, SO_RCVLOWAT, (&raw mut v).cast(), 4)
            != 0
        {
            return;
        }
        if aya_ebpf::helpers::bpf_setsockopt(sk, SOL_SOCKET, SO_RCVLOWAT, (&raw mut v).cast(), 4)
            == 0
        {
            counters::inc(slot, Counter::AccelWakeups);
        }
    }
}
