//! sk_msg on the SOCKHASH: moves each sendmsg on one end of a proxy<->app
//! pair straight into the peer's receive (ingress) queue.
//!
//! Any miss means plain TCP (SK_PASS), never a drop. Ingress redirect has
//! no backpressure of its own, so a sender whose peer has more bytes unread
//! than the peer's receive buffer (at most `accel_max_queued`) goes by TCP
//! (which blocks it when the peer's window is full) until the peer has read
//! every byte it sent; then it redirects again. Order across the two paths: the peer's reader takes
//! its queued redirected bytes before TCP's receive queue, so a switch to
//! TCP is always safe, and a switch back only when nothing sent by TCP is
//! still unread (`SockState` in tproxy-common: `sent` against the peer's
//! `read`).
//!
//! The counts alone are not enough: after a send that TCP refused with
//! EAGAIN (a non-blocking sender with a full send buffer, as Envoy's often
//! is), Linux runs no program on the next send and reuses the last verdict,
//! pass, so those bytes go by TCP unseen (tcp_bpf_send_verdict leaves
//! `psock->eval` set on error). Seen: through Envoy, 1 echo stream in 6 had
//! 128-512 KiB delivered late, after bytes redirected behind them. So each
//! send trues `sent` up from the kernel's `write_seq` (`true_up`), and every
//! redirect first checks the kernel's own figures: the sender's
//! `write_seq` (every byte it gave TCP) must equal the peer's `copied_seq`
//! (every byte its readers took from TCP; `tcpseq.rs`).
//!
//! A continuous stream rarely lets its reader catch up completely, so after
//! a fallback it may stay on TCP for good, and TCP through a socket in the
//! SOCKHASH costs more than plain TCP (every send is first copied into an
//! sk_msg, then pushed to TCP). A sender that stays on TCP for
//! `accel_retire_ms` retires: it never redirects again, and once neither
//! end has redirected bytes left unread, sockops takes the pair out of the
//! SOCKHASH (`retire::leave`; the kernel lets only sockops, not sk_msg,
//! delete from a sockmap), after which both are plain TCP sockets.
use core::ptr::read_volatile;

use aya_ebpf::{
    EbpfContext as _,
    bindings::{BPF_F_INGRESS, sk_action::SK_PASS},
    helpers::{bpf_get_netns_cookie, bpf_msg_pull_data},
    macros::sk_msg,
    programs::SkMsgContext,
};
use tproxy_common::{
    Counter, STREAM_SMALL_WINDOWS, STREAM_WINDOW_MSGS, SockState, flags, sock_api,
    sock_flags::{FAST, RETIRED, SMALL_MESSAGES},
};

use crate::{
    atomic, counters,
    maps::{SOCKHASH, SOCKS},
    tcpseq::{self, Seqs},
};

#[sk_msg]
pub fn tproxy_sk_msg(ctx: SkMsgContext) -> u32 {
    let _ = try_sk_msg(&ctx);
    SK_PASS
}

#[inline(always)]
fn try_sk_msg(ctx: &SkMsgContext) -> Result<(), ()> {
    // SAFETY: the sending socket's kernel address, as a number: its key.
    let sk = unsafe { (*ctx.msg).__bindgen_anon_3.sk } as u64;
    let Some(own) = SOCKS.get_ptr_mut(&sk) else {
        counters::inc(0, Counter::MsgSeen);
        counters::inc(0, Counter::MsgMiss);
        return Ok(());
    };
    // SAFETY: own live entry; written once at insert.
    let slot = unsafe { (*own).slot };
    counters::inc(slot, Counter::MsgSeen);
    // Looked at on every send, whatever the verdict, so that the first
    // (which goes by TCP: its reader has not read yet) is seen too.
    if opens_tls_handshake(ctx) {
        // SAFETY: own live entry; one byte, stored whole (`sock_api`).
        unsafe { core::ptr::write_volatile(&raw mut (*own).api[sock_api::OFF_TLS], 1) };
    }
    // SAFETY (every access to *own below): this socket's live SOCKS entry.
    // `sent`, `redirected_end`, `flags` and `tcp_since` are written only
    // here, by one sendmsg at a time; `peer` is one aligned 8-byte word
    // that sockops sets once.
    let mut sent = unsafe { (*own).sent };
    let mut state = unsafe { (*own).flags };
    let peer_sk = unsafe { read_volatile(&raw const (*own).peer) };
    let size = u64::from(ctx.size());
    // The app side is not established yet: TCP until it has read this.
    let peer = crate::maps::sock_state(peer_sk);
    // The kernel's figures (once there is a peer: its entry holds this
    // socket's address as a number, which the verifier lets us add to).
    // Not needed on the fast path: the last send was redirected, so nothing
    // went by TCP since (Linux skips this program only after a send that
    // went by TCP, and a pass clears FAST); the counts are exact and every
    // TCP byte was read when this socket came back to the redirect.
    let seqs = match peer {
        // SAFETY: the peer's live entry; one aligned word, set at pairing.
        Some(p) if state & FAST == 0 => {
            tcpseq::of(unsafe { read_volatile(&raw const (*p).peer) }, peer_sk)
        }
        _ => Seqs::UNKNOWN,
    };
    if seqs.known {
        sent = true_up(own, sent, seqs.write, slot);
    }
    // Every byte counts, whichever way it goes.
    unsafe { (*own).sent = sent + size };
    // The sender's namespace's target: its limits, and whether it is
    // still accelerated (a target being removed is not).
    // SAFETY: the program's own context.
    let Some(target) = counters::target(unsafe { bpf_get_netns_cookie(ctx.as_ptr()) }) else {
        return pass(own, state, slot, Counter::MsgPassthrough, size);
    };
    let cfg = &target.config;
    // Teardown (tproxy is stopping: everything goes by TCP from here on),
    // or no peer yet.
    let (Some(peer), true) = (peer, cfg.flags & flags::ACCEL != 0) else {
        return pass(own, state, slot, Counter::MsgPassthrough, size);
    };
    // Retired: TCP until sockops takes the pair out of the SOCKHASH.
    if state & RETIRED != 0 {
        return pass(own, state, slot, Counter::MsgPassthrough, size);
    }
    // An API the fast path cannot honour, used by either end (`sock_api`):
    // this pair is done with it. A reader that has not yet made a plain
    // read gets TCP's bytes until it does (it may be one that only
    // splices, or waits with MSG_WAITALL).
    let (own_api, peer_api) = (api(own), api(peer));
    if (own_api | peer_api) & sock_api::OFF_MASK != 0 {
        state = retire(own, state, slot);
        counters::inc(slot, Counter::AccelApiRetired);
        return pass(own, state, slot, Counter::MsgPassthrough, size);
    }
    if peer_api & 0xff == 0 {
        counters::inc(slot, Counter::AccelReaderUnseen);
        return pass(own, state, slot, Counter::MsgPassthrough, size);
    }
    // SAFETY: the peer's live SOCKS entry; `read` is one aligned 8-byte
    // word its readers add to atomically (a stale value only overstates
    // what is unread).
    let unread = sent.wrapping_sub(unsafe { read_volatile(&raw const (*peer).read) }) as i64;
    // SAFETY: as above; one aligned 4-byte word.
    let peer_rcvbuf = unsafe { read_volatile(&raw const (*peer).rcvbuf) };
    if state & FAST == 0 {
        // Bytes sent by TCP still unread: a redirected byte would overtake them.
        if unread != 0 {
            // SAFETY: own entry, see above.
            let since = unsafe { (*own).tcp_since };
            let retire_ns = u64::from(cfg.accel_retire_ms) * 1_000_000;
            if since != 0 && retire_ns != 0 && crate::flow::now().wrapping_sub(since) > retire_ns {
                state = retire(own, state, slot);
            }
            return pass(own, state, slot, Counter::MsgPassthrough, size);
        }
    } else if unread > 0
        && unread + size as i64 > i64::from(bound(cfg.accel_max_queued, peer_rcvbuf))
    {
        // (A reader that has read everything takes the next message whatever
        // its size, as TCP takes a write larger than the receive buffer.)
        // SAFETY: own entry, see above.
        unsafe {
            (*own).tcp_since = crate::flow::now();
            (*own).fallbacks += 1;
        }
        counters::inc(slot, Counter::AccelFallbacks);
        return pass(own, state, slot, Counter::MsgPassthrough, size);
    }
    // Decisive: the peer has taken every byte this end ever gave TCP.
    if seqs.known && seqs.tcp_unread() {
        counters::inc(slot, Counter::AccelOrderHeld);
        return pass(own, state, slot, Counter::MsgPassthrough, size);
    }
    // The kernel would refuse part or all of the bytes (`memory.rs`): TCP,
    // which waits for memory, and the way back as after a fallback.
    let limited = peer_api & 0xff == u64::from(sock_api::PLAIN_TCP_LIMITED);
    if !crate::memory::has_room(peer_sk, limited, size) {
        if state & FAST != 0 {
            // SAFETY: own entry, see above.
            unsafe { (*own).tcp_since = crate::flow::now() };
        }
        counters::inc(slot, Counter::AccelMemoryShort);
        return pass(own, state, slot, Counter::MsgPassthrough, size);
    }
    // Claim the bytes before looking at the peer's flags, and the peer sets
    // its flag before looking at our claim (`leave`): of two sockets doing
    // this at once, at least one sees the other's store, so the peer never
    // leaves the SOCKHASH with these bytes on their way into its queue.
    // SAFETY: own entry, see above.
    let claimed = unsafe { (*own).redirected_end };
    let end = sent + size;
    atomic::publish(unsafe { &raw mut (*own).redirected_end }, claimed, end);
    // SAFETY: the peer's live entry; one aligned 4-byte word.
    if unsafe { read_volatile(&raw const (*peer).flags) } & RETIRED != 0 {
        // The peer retired: so does this end (the pair is done with the
        // fast path); the claim is withdrawn.
        atomic::publish(unsafe { &raw mut (*own).redirected_end }, end, claimed);
        state = retire(own, state, slot);
        return pass(own, state, slot, Counter::MsgPassthrough, size);
    }
    // SAFETY: own entry; `peer_key` is written once at insert.
    let peer_key = unsafe { (*own).peer_key };
    if SOCKHASH.redirect_msg(ctx, peer_key, BPF_F_INGRESS as u64) != SK_PASS as i64 {
        // The peer left the map (closed): plain TCP, like the rest of it.
        atomic::publish(unsafe { &raw mut (*own).redirected_end }, end, claimed);
        return pass(own, state, slot, Counter::MsgMiss, size);
    }
    if state & FAST == 0 && sent != 0 {
        // Back from TCP (counted only once the redirect is really made).
        counters::inc(slot, Counter::AccelResumed);
        // SAFETY: own entry.
        unsafe { (*own).returns += 1 };
    }
    // SAFETY: own entry.
    unsafe {
        (*own).flags = state | FAST;
        (*own).redirected += size;
    }
    counters::inc(slot, Counter::MsgRedirected);
    counters::add(slot, Counter::MsgRedirectedBytes, size);
    small_stream(own, peer, cfg.accel_min_message, size, slot);
    Ok(())
}

/// Retires a sender whose redirects averaged less than `min` bytes, read
/// about one per read, over `STREAM_SMALL_WINDOWS` windows of
/// `STREAM_WINDOW_MSGS` in a row while its peer sent nothing: a one-way
/// stream of small writes whose reader is woken for each. Each redirected
/// message is queued and announced to its reader on its own
/// (bpf_tcp_ingress, sk_psock_data_ready), where TCP merges such writes
/// into fewer and larger segments, read with fewer wake-ups; in the bench
/// such streams ran 0.75-0.94x of plain TCP (docs/benchmarks.md). A
/// request and its answer, however small, are two ways and stay (a window
/// restarts whenever the peer sent).
#[inline(always)]
fn small_stream(own: *mut SockState, peer: *mut SockState, min: u32, size: u64, slot: u32) {
    if min == 0 {
        return;
    }
    // SAFETY: own live entry, these words written only by this socket's
    // sk_msg (under its socket lock); the peer's `sent` is one aligned word
    // its sk_msg stores whole.
    unsafe {
        let peer_sent = read_volatile(&raw const (*peer).sent);
        let peer_reads = read_volatile(&raw const (*peer).reads);
        let peer_read = read_volatile(&raw const (*peer).read);
        let redirected = (*own).redirected;
        let msgs = (*own).win_msgs;
        if msgs == 0 || peer_sent != (*own).win_peer_sent {
            // A new window, this redirect its first; the peer sent since
            // the last one: two ways, not a stream.
            if peer_sent != (*own).win_peer_sent {
                (*own).win_small = 0;
            }
            (*own).win_msgs = 1;
            (*own).win_redirected = redirected.wrapping_sub(size);
            (*own).win_peer_sent = peer_sent;
            (*own).win_peer_reads = peer_reads;
            (*own).win_peer_read = peer_read;
            return;
        }
        if msgs + 1 < STREAM_WINDOW_MSGS {
            (*own).win_msgs = msgs + 1;
            return;
        }
        // This redirect completes the window; the next starts fresh.
        (*own).win_msgs = 0;
        // Small messages, and a reader that took them about one per read
        // (its bytes per read at most 4/3 of the window's bytes per
        // message: it was woken for each). A reader whose reads take
        // several at once loses nothing to the redirect's per-message
        // queueing (HAProxy's 16 KiB writes read 128 KiB at a time ran as
        // fast as TCP; read 16 KiB at a time, 0.91x). Bytes read, not
        // messages: a reader's count trails the redirects by what it has
        // queued.
        let bytes = redirected.wrapping_sub((*own).win_redirected);
        let (reads, read) = (
            peer_reads.wrapping_sub((*own).win_peer_reads),
            peer_read.wrapping_sub((*own).win_peer_read),
        );
        if bytes >= u64::from(STREAM_WINDOW_MSGS) * u64::from(min)
            || reads * bytes * 4 < read * u64::from(STREAM_WINDOW_MSGS) * 3
        {
            (*own).win_small = 0;
            return;
        }
        let small = (*own).win_small + 1;
        (*own).win_small = small;
        if small >= STREAM_SMALL_WINDOWS {
            let state = (*own).flags;
            atomic::publish32(
                &raw mut (*own).flags,
                state,
                state | RETIRED | SMALL_MESSAGES,
            );
            counters::inc(slot, Counter::AccelRetired);
            counters::inc(slot, Counter::AccelSmallRetired);
        }
    }
}

/// Whether the message begins like a TLS record of the handshake (type 22,
/// version 3.x, a length a record may have): a ClientHello or ServerHello,
/// also one after a STARTTLS exchange. Application data records (type 23)
/// and other streams pass unnoticed but for one send in millions of random
/// bytes, which then only loses the fast path.
#[inline(always)]
fn opens_tls_handshake(ctx: &SkMsgContext) -> bool {
    const HEAD: usize = 5;
    if ctx.size() < HEAD as u32 {
        return false;
    }
    if ctx.data() + HEAD > ctx.data_end() {
        // The first fragment is shorter (the sender's page frag was almost
        // full): make the first bytes one run. Rare.
        // SAFETY: the program's own message; a range inside it.
        if unsafe { bpf_msg_pull_data(ctx.msg, 0, HEAD as u32, 0) } != 0 {
            return false;
        }
    }
    let (data, end) = (ctx.data(), ctx.data_end());
    if data + HEAD > end {
        return false;
    }
    // SAFETY: HEAD bytes at data are inside the message (checked above).
    let h = unsafe { core::ptr::read_unaligned(data as *const [u8; HEAD]) };
    let len = u16::from_be_bytes([h[3], h[4]]);
    h[0] == 0x16 && h[1] == 3 && h[2] <= 4 && len != 0 && len <= (1 << 14) + 2048
}

/// A socket's `api` bytes as one word (each byte is stored whole by its
/// writer; a stale read sees a fact one send late).
#[inline(always)]
fn api(st: *mut SockState) -> u64 {
    // SAFETY: a live SOCKS entry; 8 aligned bytes.
    unsafe { read_volatile((&raw const (*st).api).cast::<u64>()) }
}

/// This message goes by TCP; the sender is off the fast path.
#[inline(always)]
fn pass(own: *mut SockState, state: u32, slot: u32, counter: Counter, size: u64) -> Result<(), ()> {
    // SAFETY: the caller's own live entry; these words are written only
    // under the sender's socket lock.
    unsafe {
        (*own).flags = state & !FAST;
        (*own).tcp_unsynced += size;
    }
    counters::inc(slot, counter);
    Ok(())
}

/// `sent` with its TCP part replaced by the kernel's: the bytes `write_seq`
/// moved since the last true-up, instead of the bytes this program passed
/// (fewer when a send went by TCP unseen, more when TCP took only part of
/// one). Called under the sender's socket lock, with no send in between.
#[inline(always)]
fn true_up(own: *mut SockState, sent: u64, write_seq: u32, slot: u32) -> u64 {
    // SAFETY: own live entry; these words are written only here and in
    // `pass`, under the sender's socket lock.
    let (base, counted) = unsafe { ((*own).tcp_seq, (*own).tcp_unsynced) };
    let actual = u64::from(write_seq.wrapping_sub(base));
    unsafe {
        (*own).tcp_seq = write_seq;
        (*own).tcp_unsynced = 0;
    }
    if actual > counted {
        counters::inc(slot, Counter::AccelUncounted);
    }
    sent.wrapping_sub(counted).wrapping_add(actual)
}

/// This end never redirects again. The flag is stored with a full barrier:
/// `retire::leave`, which reads the peer's claim, runs after it.
#[inline(always)]
fn retire(own: *mut SockState, state: u32, slot: u32) -> u32 {
    // SAFETY: the caller's own live entry; this socket is its flags' only
    // writer.
    atomic::publish32(unsafe { &raw mut (*own).flags }, state, state | RETIRED);
    counters::inc(slot, Counter::AccelRetired);
    state | RETIRED
}

/// Unread bytes a sender may leave at its peer: the larger of what the
/// peer's receive buffer would let TCP hold there and what its reader takes
/// in a few milliseconds (`SockState::rcvbuf`, kept by the read
/// hook), at most `max` (`--accel-max-queued`).
/// Redirected bytes are charged to the peer's sk_rmem_alloc but not limited
/// by its sk_rcvbuf; past it, TCP's own segments meet a full buffer and the
/// kernel grows sk_rcvbuf to what is allocated (tcp_clamp_window), for the
/// rest of the connection. 0 (not known yet): `max`.
#[inline(always)]
fn bound(max: u32, rcvbuf: u32) -> u32 {
    if rcvbuf == 0 { max } else { max.min(rcvbuf) }
}
