//! A retired pair leaves the SOCKHASH (called from sockops, on each packet
//! a retired socket sends: the kernel lets sockops, not sk_msg, delete from
//! a sockmap). After it, both ends are plain TCP sockets: no sk_msg on
//! their sends, no sockmap receive path. See sk_msg.rs for why and when a
//! sender retires.
use core::ptr::{read_volatile, write_volatile};

use aya_ebpf::helpers::bpf_map_delete_elem;
use tproxy_common::{
    Counter, SockKey, SockState,
    sock_flags::{LEFT, RETIRED},
};

use crate::{counters, maps::SOCKHASH};

/// Takes `own`'s pair out of the SOCKHASH if `own` retired and that loses
/// nothing. A socket's leaving frees its queue of redirected bytes, so both
/// queues must have been read to the end, and the peer must not be
/// redirecting: it never will once it has seen `own`'s RETIRED flag, and
/// one it claimed before that shows here as its `redirected_end`, not yet
/// read (sk_msg stores the claim, then reads our flag; we stored the flag
/// with a full barrier, in sk_msg, before getting here).
#[inline(always)]
pub fn leave(own: *mut SockState, peer: *mut SockState) {
    // SAFETY: own live entry; written once at insert.
    let slot = unsafe { (*own).slot };
    // SAFETY: both live SOCKS entries; aligned words stored whole by their
    // writers (`read` added to atomically by readers).
    let (flags, own_end, own_read, peer_end, peer_read) = unsafe {
        (
            read_volatile(&raw const (*own).flags),
            read_volatile(&raw const (*own).redirected_end),
            read_volatile(&raw const (*own).read),
            read_volatile(&raw const (*peer).redirected_end),
            read_volatile(&raw const (*peer).read),
        )
    };
    if flags & RETIRED == 0 || flags & LEFT != 0 {
        return;
    }
    if peer_read < own_end || own_read < peer_end {
        // Redirected bytes still queued (or on their way): a later packet.
        return;
    }
    // SAFETY: `peer_key` fields are written once at insert; ours is the
    // one the peer points at.
    let mut keys: [SockKey; 2] = unsafe { [(*own).peer_key, (*peer).peer_key] };
    let mut left = false;
    for key in keys.iter_mut() {
        // SAFETY: SOCKHASH is a map of this object, the key a full SockKey
        // on the stack. A socket another CPU is sending or reading on may
        // be deleted: the kernel frees its psock after its last user.
        let r = unsafe {
            bpf_map_delete_elem(
                (&raw const SOCKHASH).cast_mut().cast(),
                (key as *mut SockKey).cast(),
            )
        };
        left |= r == 0;
    }
    if left {
        counters::inc(slot, Counter::AccelLeft);
    }
    // (sk_msg stores this word too, but runs no more once the socket has
    // left; a store it was making at this moment would lose LEFT, and the
    // next packet here only finds the keys gone and sets it again.)
    // SAFETY: own live entry, one aligned 4-byte word.
    unsafe { write_volatile(&raw mut (*own).flags, flags | LEFT) };
    // The peer too, so that its reads stop costing the read hook more
    // than a lookup (`recv.rs`): a slow reader, the usual reason a
    // pair leaves, reads often. A plain store, racing only a sk_msg of the
    // peer's that was already running when the keys went: the mark may be
    // lost (its reads go on being counted, as before the mark), or a flag
    // that sk_msg set may be (its RETIRED, which only brings its sockops
    // here, where LEFT now stops it; FAST, unread once out of the map).
    // Everything else that asks whether the pair left checks both ends.
    if left {
        // SAFETY: the peer's live entry, one aligned 4-byte word.
        unsafe {
            let peer_flags = read_volatile(&raw const (*peer).flags);
            write_volatile(&raw mut (*peer).flags, peer_flags | LEFT);
        }
    }
}

/// Takes `own` alone out of the SOCKHASH (it half-closed: see sockops.rs
/// `half_closed`) if nothing redirected to it is left unread, so its reads
/// are TCP's from now on. Its own redirected bytes queued at the peer stay
/// there: the peer's queue is the peer's, and the peer leaves by `leave`
/// once it has read them. `own` must have published RETIRED first (the
/// order `leave` relies on: the peer's claim shows here, or the peer sees
/// the flag and withdraws it).
#[inline(always)]
pub fn leave_own(own: *mut SockState, peer: *mut SockState) {
    // SAFETY: both live SOCKS entries; aligned words stored whole by their
    // writers (`read` added to atomically by readers).
    let (flags, own_read, peer_end) = unsafe {
        (
            read_volatile(&raw const (*own).flags),
            read_volatile(&raw const (*own).read),
            read_volatile(&raw const (*peer).redirected_end),
        )
    };
    if flags & RETIRED == 0 || flags & LEFT != 0 || own_read < peer_end {
        return;
    }
    // SAFETY: the peer's `peer_key` is this socket's key (written once at
    // insert); SOCKHASH is a map of this object.
    let mut key: SockKey = unsafe { (*peer).peer_key };
    let r = unsafe {
        bpf_map_delete_elem(
            (&raw const SOCKHASH).cast_mut().cast(),
            (&raw mut key).cast(),
        )
    };
    if r == 0 {
        // SAFETY: own live entry; written under this socket's lock. (Not
        // counted in `accel_left`, which counts pairs: the peer's `leave`
        // counts this one.)
        unsafe { write_volatile(&raw mut (*own).flags, flags | LEFT) };
    }
}
