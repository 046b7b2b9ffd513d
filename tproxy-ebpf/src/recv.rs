//! What a read of one of our sockets does, whichever hook saw it
//! (`recv_length.rs`: the `sock_recv_length` raw tracepoint, Linux >= 6.3,
//! every recvmsg of the host; `recv_fexit.rs`: fexit on tcp_bpf_recvmsg,
//! only sockets in a sockmap; userspace attaches one of them). Keeps
//! SOCKS[..].read exact, which is what bounds a slow reader, what lets a
//! sender come back to the fast path without reordering, and what teardown
//! waits on.
//!
//! It also reports the read that takes the last redirected byte while
//! bytes the peer sent by TCP wait behind it (`report_short_read`).
//!
//! Both hooks see the same calls: every read of a socket in the SOCKHASH
//! goes through tcp_bpf_recvmsg (its proto's recvmsg from insertion on),
//! and the tracepoint fires in sock_recvmsg just after it with the same
//! return value and flags. What only the tracepoint sees: reads before a
//! socket is inserted (none that count: sockops inserts at ESTABLISHED,
//! before accept or connect return and before any byte is sent, and SOCKS
//! has no entry before) and after a pair left the SOCKHASH (their counts
//! are read no more, see below).
use core::ptr::{read_volatile, write_volatile};

use aya_ebpf::helpers::{bpf_ktime_get_ns, bpf_probe_read_kernel};
use tproxy_common::{
    Counter, NudgeEvent, READ_RATE_WINDOW_NS, READ_RATE_WINDOWS, SockState, sock_api,
    sock_flags::{FAST, LEFT},
};

use crate::{
    atomic, counters,
    maps::{NODE, NUDGE_EVENTS, SOCKS},
    tcpseq,
};

const MSG_OOB: i32 = 1;
const MSG_PEEK: i32 = 2;
const MSG_TRUNC: i32 = 0x20;
const MSG_WAITALL: i32 = 0x100;
const ODD_READ: i32 = MSG_OOB | MSG_TRUNC | MSG_WAITALL;
const MSG_ERRQUEUE: i32 = 0x2000;

/// A recvmsg on socket `sk` returned `read` (bytes, or a negative errno)
/// with `flags`. The one body of both read hooks, so they cannot drift.
#[inline(always)]
pub fn on_read(sk: u64, read: i32, flags: i32) -> Result<(), ()> {
    // A peek takes nothing off the stream, nor does a read of the error
    // queue (timestamps, zerocopy notices). Counting either would let a
    // sender think its TCP bytes were read and redirect past them. Checked
    // before the lookup: an event loop's last read of a wake-up often finds
    // nothing (EAGAIN), and those cost no lookup.
    if flags & ODD_READ != 0 {
        // A read the fast path cannot honour (tcp_bpf_recvmsg returns what
        // is queued for MSG_WAITALL, copies for MSG_TRUNC, reads data for
        // MSG_OOB): its peer sends by TCP from its next send on, and the
        // pair retires (sk_msg.rs), whatever this one returned. Bytes
        // redirected before are still read the fast path's way.
        if let Some(st) = SOCKS.get_ptr_mut(&sk) {
            // SAFETY: a live entry; one byte, stored whole.
            unsafe { write_volatile(&raw mut (*st).api[sock_api::OFF_ODD_READ], 1) };
        }
    }
    if read <= 0 || flags & (MSG_PEEK | MSG_ERRQUEUE) != 0 {
        return Ok(());
    }
    let st = SOCKS.get_ptr_mut(&sk).ok_or(())?;
    // A plain read: from now on this reader may be sent redirected bytes.
    // SAFETY: as above.
    if flags & ODD_READ == 0
        && unsafe { read_volatile(&raw const (*st).api[sock_api::READS_PLAIN]) } == 0
    {
        let plain = if crate::memory::tcp_limited(sk) {
            sock_api::PLAIN_TCP_LIMITED
        } else {
            1
        };
        unsafe { write_volatile(&raw mut (*st).api[sock_api::READS_PLAIN], plain) };
    }
    // A pair that left the SOCKHASH is two plain TCP sockets: nothing reads
    // their counts any more (the pair left only once each end had read
    // every byte redirected to it, and the nudge goes by the kernel's
    // sequence numbers), so their reads cost a lookup and no more.
    // SAFETY: st points at a live SOCKS entry; one aligned 4-byte word.
    if unsafe { read_volatile(&raw const (*st).flags) } & LEFT != 0 {
        return Ok(());
    }
    // SAFETY: st points at a live SOCKS entry; two readers of one socket
    // may add at once.
    atomic::add(unsafe { &raw mut (*st).read }, u64::from(read as u32));
    // SAFETY: as above; a plain add (`SockState::reads`).
    unsafe { (*st).reads += 1 };
    // SAFETY: as above; written once at insert.
    counters::add(unsafe { (*st).slot }, Counter::MsgReadBytes, read as u64);
    report_short_read(sk, st, u64::from(read as u32));
    // What the sender may leave queued here, refreshed once a window: the
    // reader's receive buffer (TCP autotunes it while the sender goes by
    // TCP, an app may set SO_RCVBUF; its offset in struct sock is from the
    // kernel's BTF), or the reader's recent pace if that is more.
    // CLOCK_MONOTONIC: tracing programs have no coarse clock; sockops
    // started the window with the coarse one, which lags it by a tick at
    // most (one longer first window).
    // SAFETY: no arguments, no side effects.
    let now = unsafe { bpf_ktime_get_ns() };
    // SAFETY: as above; the window fields are plain words, and a racing
    // reader of the same socket at worst restarts the window.
    let (win_start, win_read, total) = unsafe {
        (
            (*st).win_start,
            (*st).win_read,
            core::ptr::read_volatile(&raw const (*st).read),
        )
    };
    let elapsed = now.wrapping_sub(win_start);
    if elapsed < READ_RATE_WINDOW_NS {
        return Ok(());
    }
    let pace = total.wrapping_sub(win_read) * READ_RATE_WINDOW_NS / elapsed * READ_RATE_WINDOWS;
    let off = NODE.get(0).map_or(0, |c| c.sk_rcvbuf_offset);
    let mut bound = pace.min(u64::from(u32::MAX)) as u32;
    if off != 0 {
        // SAFETY: sk is the live socket the hook fired for; the helper
        // checks the read.
        if let Ok(v) = unsafe { bpf_probe_read_kernel((sk + u64::from(off)) as *const i32) }
            && v > 0
        {
            bound = bound.max(v as u32);
        }
    }
    // SAFETY: one aligned store each into our entry.
    unsafe {
        core::ptr::write_volatile(&raw mut (*st).rcvbuf, bound);
        (*st).win_start = now;
        (*st).win_read = total;
    }
    Ok(())
}

/// Reports this read to the nudger if it took the last redirected byte
/// queued here while bytes the peer sent by TCP are not read yet.
///
/// Linux's tcp_bpf_recvmsg reads only the queue of redirected bytes while
/// it is non-empty, so that read is short even with TCP bytes queued
/// behind; an edge-triggered reader (tokio, HAProxy) takes a short read for
/// "drained" and sleeps, and the TCP bytes' wake-up came before it. If
/// nothing more arrives (the writer waits for an answer), nothing wakes it:
/// sockops' `nudge` needs a packet from this socket, and neither read hook
/// may call bpf_setsockopt. So userspace is told, looks again a moment
/// later, and wakes a reader that is still asleep (`nudge_iter.rs`).
/// Once per fallback at most: only the read that crosses the peer's
/// `redirected_end`.
#[inline(always)]
fn report_short_read(sk: u64, st: *mut SockState, n: u64) {
    // SAFETY: st is our live SOCKS entry; aligned words stored whole.
    let (total, peer_sk, slot) = unsafe {
        (
            core::ptr::read_volatile(&raw const (*st).read),
            core::ptr::read_volatile(&raw const (*st).peer),
            (*st).slot,
        )
    };
    let Some(peer) = crate::maps::sock_state(peer_sk) else {
        return;
    };
    // SAFETY: the peer's live entry; its sk_msg stores these whole. A
    // stale value misses a report (sockops' nudge remains) or makes one
    // the nudger finds needless.
    let (end, sent, flags, cookie) = unsafe {
        (
            core::ptr::read_volatile(&raw const (*peer).redirected_end),
            core::ptr::read_volatile(&raw const (*peer).sent),
            core::ptr::read_volatile(&raw const (*peer).flags),
            // The peer's peer key is this socket's key.
            (*peer).peer_key.netns_cookie,
        )
    };
    // This read took the last redirected byte (another reader of the same
    // socket may have added to `total` too: at worst one report too many
    // or too few), the peer is on TCP, and some of it is unread: by the
    // kernel's sequence numbers (the peer's `sent` misses a send that went
    // by TCP unseen until its next send), else by the counts.
    let crossed = total.wrapping_sub(n) < end && end <= total;
    if !crossed || flags & FAST != 0 {
        return;
    }
    let seqs = tcpseq::of(peer_sk, sk);
    if !(if seqs.known {
        seqs.tcp_unread()
    } else {
        total < sent
    }) {
        return;
    }
    counters::inc(slot, Counter::AccelShortReads);
    let ev = NudgeEvent {
        sk,
        netns_cookie: cookie,
        read: total,
    };
    let _ = NUDGE_EVENTS.output::<NudgeEvent>(&ev, 0);
}
