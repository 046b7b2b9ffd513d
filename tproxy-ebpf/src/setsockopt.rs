//! cgroup/setsockopt on `--cgroup` (with acceleration): notes the socket
//! options whose effect redirected bytes would not have, so the socket
//! never takes part in the fast path (`sock_api` in tproxy-common says
//! what each one changes). The call itself always goes ahead unchanged:
//! this program only looks.
//!
//! Where the note goes: an accelerated socket's `SOCKS` entry (its pair
//! then retires, `sk_msg.rs`); a listener's `LISTENER_API` entry by its
//! namespace and port (the sockets it accepts inherit the option, and
//! sockops reads the note when they are established); a socket not yet
//! connected, its `SOCK_API` entry by its address (sockops reads it at
//! ESTABLISHED).
use aya_ebpf::{
    EbpfContext as _, helpers::bpf_get_netns_cookie, macros::cgroup_sockopt,
    programs::SockoptContext,
};
use tproxy_common::{Counter, PortKey, sock_api};

use crate::{
    counters,
    maps::{LISTENER_API, SOCK_API, SOCKS},
};

/// 1 = the call goes ahead.
const PROCEED: i32 = 1;
const SOL_SOCKET: i32 = 1;
const IPPROTO_TCP: i32 = 6;
const SO_TIMESTAMP_OLD: i32 = 29;
const SO_TIMESTAMPNS_OLD: i32 = 35;
const SO_TIMESTAMPING_OLD: i32 = 37;
const SO_RCVLOWAT: i32 = 18;
const SO_ZEROCOPY: i32 = 60;
const SO_TIMESTAMP_NEW: i32 = 63;
const SO_TIMESTAMPNS_NEW: i32 = 64;
const SO_TIMESTAMPING_NEW: i32 = 65;
const TCP_ULP: i32 = 31;
const TCP_INQ: i32 = 36;
const TCP_SYN_SENT: u32 = 2;
const TCP_CLOSE: u32 = 7;
const TCP_LISTEN: u32 = 10;

/// The most a program sees of an option's value.
const SMALLEST_PAGE: i32 = 4096;

#[cgroup_sockopt(setsockopt)]
pub fn tproxy_setsockopt(ctx: SockoptContext) -> i32 {
    let _ = try_setsockopt(&ctx);
    // SAFETY: the kernel passes a valid bpf_sockopt for the program's run.
    let so = unsafe { &mut *ctx.sockopt };
    // `optlen` is left as it is (an earlier program's change stands),
    // except past a page, which kernels before 6.5 fail with EFAULT unless
    // a program sets 0: the kernel then uses the caller's own buffer.
    if so.optlen > SMALLEST_PAGE {
        so.optlen = 0;
    }
    PROCEED
}

#[inline(always)]
fn try_setsockopt(ctx: &SockoptContext) -> Result<(), ()> {
    // SAFETY: as above.
    let so = unsafe { &*ctx.sockopt };
    let fact = fact(so.level, so.optname, int_value(so)).ok_or(())?;
    // SAFETY: the helper takes this program's own context.
    let cookie = unsafe { bpf_get_netns_cookie(ctx.as_ptr()) };
    let target = counters::target(cookie).ok_or(())?;
    counters::inc(target.config.slot, Counter::AccelApiNoted);
    // SAFETY: reading a ctx field the verifier allows for this program type.
    let sk = unsafe { so.__bindgen_anon_1.sk };
    let addr = sk as u64;
    if let Some(st) = SOCKS.get_ptr_mut(&addr) {
        // SAFETY: a live entry; one byte, stored whole (see `sock_api`).
        unsafe { core::ptr::write_volatile(&raw mut (*st).api[fact], 1) };
        return Ok(());
    }
    // SAFETY: the context's socket, as the verifier allows reading it.
    let (state, port) = unsafe { ((*sk).state, (*sk).src_port) };
    match state {
        TCP_LISTEN => {
            let key = PortKey {
                netns_cookie: cookie,
                port,
                _pad0: 0,
            };
            note(&LISTENER_API, &key, fact);
        }
        // Not connected yet: sockops takes the note at ESTABLISHED. An
        // established socket not in SOCKS is not accelerated, and a note by
        // its address would outlive it (a later socket at that address
        // would inherit it).
        TCP_SYN_SENT | TCP_CLOSE => note(&SOCK_API, &addr, fact),
        _ => {}
    }
    Ok(())
}

/// Sets byte `fact` of the note under `key`, adding the entry if needed.
#[inline(always)]
fn note<K>(map: &aya_ebpf::maps::LruHashMap<K, u64>, key: &K, fact: usize) {
    if let Some(v) = map.get_ptr_mut(key) {
        // SAFETY: a live entry; one byte, stored whole.
        unsafe { core::ptr::write_volatile(v.cast::<u8>().add(fact), 1) };
    } else {
        let mut bytes = [0u8; 8];
        bytes[fact & 7] = 1;
        let _ = map.insert(key, &u64::from_ne_bytes(bytes), 0);
    }
}

/// The option's first int, if the caller passed one (0 otherwise).
#[inline(always)]
fn int_value(so: &aya_ebpf::bindings::bpf_sockopt) -> i32 {
    // SAFETY: optval/optval_end are the kernel's bounds for the buffer.
    let (p, end) = unsafe { (so.__bindgen_anon_2.optval, so.__bindgen_anon_3.optval_end) };
    if (p as usize) + 4 > end as usize {
        return 0;
    }
    // SAFETY: 4 bytes at p are in bounds (checked just above).
    unsafe { core::ptr::read_unaligned(p as *const i32) }
}

/// Which `sock_api` fact an option is, if it is one.
#[inline(always)]
fn fact(level: i32, name: i32, value: i32) -> Option<usize> {
    match (level, name) {
        (SOL_SOCKET, SO_ZEROCOPY) if value != 0 => Some(sock_api::OFF_ZEROCOPY),
        (SOL_SOCKET, SO_RCVLOWAT) if value > 1 => Some(sock_api::OFF_RCVLOWAT),
        (
            SOL_SOCKET,
            SO_TIMESTAMP_OLD | SO_TIMESTAMPNS_OLD | SO_TIMESTAMPING_OLD | SO_TIMESTAMP_NEW
            | SO_TIMESTAMPNS_NEW | SO_TIMESTAMPING_NEW,
        ) if value != 0 => Some(sock_api::OFF_RECV_CMSG),
        (IPPROTO_TCP, TCP_INQ) if value != 0 => Some(sock_api::OFF_RECV_CMSG),
        (IPPROTO_TCP, TCP_ULP) => Some(sock_api::OFF_ULP),
        _ => None,
    }
}
