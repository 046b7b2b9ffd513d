//! sockops on `--cgroup`: the flow table's view of the proxy's accepted
//! sockets (a steered flow is established when the proxy's socket is, and
//! ends when that socket closes: `flow.rs`), and, with acceleration, puts
//! exactly the proxy<->app socket pairs in the SOCKHASH, at ESTABLISHED,
//! before any data moves.
//!
//! Two programs: `tproxy_sockops` (flows + acceleration) and
//! `tproxy_sockops_flows` (--no-accel: flows only; it keys nothing by
//! socket address, so it loads without CAP_PERFMON).
//!
//! A pair is the two ends of one connection, both in a cgroup tproxy
//! serves: proxy -> app in one target, or client -> proxy across two
//! targets of this node (`peer.rs` says which, and why nothing else can be
//! paired). The connecting end reaches ACTIVE_ESTABLISHED first (it handles
//! the SYN-ACK and only then sends the ACK that establishes the accepting
//! end); it enters the map and leaves the accepting end's key in
//! PENDING_PEERS, with its own address, key and sequence numbers. The
//! accepting end enters at PASSIVE_ESTABLISHED only if its key is pending
//! and the numbers prove it is the same connection, and then the two learn
//! each other's address (SOCKS). Every other socket in the cgroup stays
//! untouched.
//!
//! It also keeps readers of accelerated sockets from sleeping on TCP bytes
//! (`nudge`): it sees each packet those sockets send.
use aya_ebpf::{
    bindings::{
        BPF_ANY, BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB, BPF_SOCK_OPS_HDR_OPT_LEN_CB,
        BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB, BPF_SOCK_OPS_STATE_CB, BPF_SOCK_OPS_STATE_CB_FLAG,
        BPF_SOCK_OPS_TCP_CONNECT_CB, BPF_SOCK_OPS_TCP_LISTEN_CB,
        BPF_SOCK_OPS_WRITE_HDR_OPT_CB_FLAG,
    },
    helpers::bpf_get_socket_cookie,
    macros::sock_ops,
    programs::SockOpsContext,
};
use tproxy_common::{
    Config, Counter, Pending, PortKey, SockKey, SockState, Target, Upstream, flags, refused,
    sock_api,
    sock_flags::{FAST, LEFT, RETIRED},
};

use crate::{
    atomic, counters, flow, identity,
    maps::{
        ASKED, LISTENER_API, PENDING_PEERS, PROXY_CONNECTS, SOCK_API, SOCK_SCRATCH, SOCKHASH,
        SOCKS, SOCKS_IN_USE, UPSTREAM_FLOWS,
    },
    peer, sockkey, tcpseq,
};

/// TCP_FIN_WAIT1, TCP_CLOSE and TCP_LISTEN in the kernel's TCP state enum.
const TCP_FIN_WAIT1: u32 = 4;
const TCP_CLOSE: u32 = 7;
const TCP_LISTEN: u32 = 10;

#[sock_ops]
pub fn tproxy_sockops(ctx: SockOpsContext) -> u32 {
    let _ = try_sockops::<true>(&ctx);
    1
}

#[sock_ops]
pub fn tproxy_sockops_flows(ctx: SockOpsContext) -> u32 {
    let _ = try_sockops::<false>(&ctx);
    1
}

#[inline(always)]
fn try_sockops<const ACCEL: bool>(ctx: &SockOpsContext) -> Result<(), ()> {
    let op = ctx.op();
    // Every packet an accelerated socket sends: not an event worth counting.
    if ACCEL && op == BPF_SOCK_OPS_HDR_OPT_LEN_CB {
        nudge(ctx);
        return Ok(());
    }
    // Only sockets of a namespace tproxy serves (a target's) are its
    // flows: the cgroup may hold processes of other namespaces.
    let key = sockkey::from_sock_ops(ctx);
    let target = counters::target(key.netns_cookie);
    let slot = target.map_or(0, |t| t.config.slot);
    counters::inc(slot, Counter::SockopsEvents);
    match op {
        // connect(2), in the connecting process: note the proxy's own.
        BPF_SOCK_OPS_TCP_CONNECT_CB => {
            if let Some(t) = target
                && ACCEL
                && t.config.flags & flags::ACCEL != 0
                && identity::sockops_caller_is_proxy(&t.config)
            {
                // SAFETY: the helper takes this program's own context.
                let cookie = unsafe { bpf_get_socket_cookie(ctx.ops.cast()) };
                let _ = PROXY_CONNECTS.insert(&cookie, &1, 0);
                // The flow this thread asked about last is this connection's.
                // (Only if it dials that flow's original destination.)
                if let Some(t) = identity::thread()
                    // SAFETY: a map value, read whole.
                    && let Some(asked) = unsafe { ASKED.get(&t) }
                {
                    let asked = *asked;
                    let _ = ASKED.remove(&t);
                    if asked.flow.local_addr == key.remote_addr
                        && u32::from(asked.port) == key.remote_port
                    {
                        let up = Upstream {
                            flow: asked.flow,
                            refused: refused::NONE,
                            _pad0: 0,
                        };
                        let _ = UPSTREAM_FLOWS.insert(&cookie, &up, 0);
                    }
                }
            }
        }
        BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB | BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB => {
            let target = target.ok_or(())?;
            if op == BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB
                && flow::established(&target.config, &flow::key_of_socket(&key))
            {
                // To see it close.
                let _ = ctx.set_cb_flags(BPF_SOCK_OPS_STATE_CB_FLAG as i32);
            }
            if ACCEL && target.config.flags & flags::ACCEL != 0 {
                if api_refused(ctx, op, &key) {
                    counters::inc(slot, Counter::AccelApiRefused);
                    refuse(ctx, refused::API);
                } else {
                    accelerate(ctx, op, &key, target)?;
                }
            }
        }
        // listen(2), in the listening process: the proxy's listeners.
        BPF_SOCK_OPS_TCP_LISTEN_CB => {
            if let Some(t) = target {
                identity::listening(ctx, &t.config, key.netns_cookie);
            }
        }
        // One of the proxy's listeners closed.
        BPF_SOCK_OPS_STATE_CB if ctx.arg(0) == TCP_LISTEN && ctx.arg(1) == TCP_CLOSE => {
            identity::stopped_listening(ctx, key.netns_cookie);
        }
        // This socket shut down its sending side (or closed): see
        // `half_closed`.
        BPF_SOCK_OPS_STATE_CB if ACCEL && ctx.arg(1) == TCP_FIN_WAIT1 => half_closed(ctx, slot),
        BPF_SOCK_OPS_STATE_CB if ctx.arg(1) == TCP_CLOSE => {
            if target.is_some() {
                flow::closed(slot, &flow::key_of_socket(&key));
            }
            // The kernel drops a closed socket from the SOCKHASH itself;
            // this is our bookkeeping, counted in the slot that inserted it.
            let sk = sk_addr(ctx);
            if ACCEL && let Some(st) = SOCKS.get_ptr(&sk) {
                // SAFETY: a live entry; written once at insert.
                let (own, cookie) = unsafe { ((*st).slot, (*st).cookie) };
                let _ = UPSTREAM_FLOWS.remove(&cookie);
                if SOCKS.remove(&sk).is_ok() {
                    counters::inc(slot, Counter::SockhashRemoved);
                    if let Some(p) = SOCKS_IN_USE.get_ptr_mut(own) {
                        atomic::dec_count(p);
                    }
                }
            }
        }
        _ => {}
    }
    Ok(())
}

/// ESTABLISHED: the connecting end of a connection to pair (`peer.rs`)
/// enters the map and leaves its peer's key pending; the accepting end
/// enters if it is pending and is that connection's other end.
#[inline(always)]
fn accelerate(ctx: &SockOpsContext, op: u32, key: &SockKey, target: &Target) -> Result<(), ()> {
    let slot = target.config.slot;
    if op == BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB {
        let Some(peer_key) = peer::expected(key, target) else {
            return Ok(());
        };
        // The proxy->app leg: only a connection the proxy made (another
        // local process dialling the app stays plain TCP, and cannot fill
        // the maps the proxy's legs need).
        if sockkey::both_local(key) {
            // SAFETY: the helper takes this program's own context.
            let cookie = unsafe { bpf_get_socket_cookie(ctx.ops.cast()) };
            if PROXY_CONNECTS.remove(&cookie).is_err() {
                return Ok(());
            }
        }
        // The port dialled is one its target accelerates (`--accel-ports`).
        if !counters::target(peer_key.netns_cookie)
            .is_some_and(|t| t.accelerates(key.remote_port as u16))
        {
            refuse(ctx, refused::PORT);
            return Ok(());
        }
        let sk = insert(ctx, key, &peer_key, 0, &target.config)?;
        let (snd_nxt, rcv_nxt) = peer::seqs(ctx);
        let pending = Pending {
            sk,
            key: *key,
            snd_nxt,
            rcv_nxt,
        };
        PENDING_PEERS
            .insert(&peer_key, &pending, 0)
            .map_err(|_| ())?;
    } else {
        // The app's port, or the proxy's (a client pod's connection, with
        // rewrite steering): nothing else is ever pending.
        let port = key.local_port as u16;
        if !target.intercepts(port) && port != target.config.proxy_port {
            return Ok(());
        }
        let pending = match peer::take(key, ctx) {
            Ok(Some(p)) => p,
            Ok(None) => return Ok(()),
            Err(()) => {
                counters::inc(slot, Counter::AccelPairsRefused);
                return Ok(());
            }
        };
        // The connecting end may have closed in between.
        if SOCKS.get_ptr(&pending.sk).is_none() {
            return Ok(());
        }
        let sk = insert(ctx, key, &pending.key, pending.sk, &target.config)?;
        // Now the connecting end may redirect to us. Until here its
        // bytes went by TCP, and were counted: it switches only
        // once we have read them all.
        let proxy = SOCKS.get_ptr_mut(&pending.sk).ok_or(())?;
        // SAFETY: a live SOCKS entry; a single aligned 8-byte store.
        unsafe { core::ptr::write_volatile(&raw mut (*proxy).peer, sk) };
        let leg = if pending.key.netns_cookie == key.netns_cookie {
            Counter::AccelPairsApp
        } else {
            Counter::AccelPairsPods
        };
        counters::inc(slot, leg);
    }
    Ok(())
}

/// Notes why this socket (a proxy's upstream one, if `UPSTREAM_FLOWS` knows
/// it) was not paired.
#[inline(always)]
fn refuse(ctx: &SockOpsContext, why: u32) {
    // SAFETY: the helper takes this program's own context.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.ops.cast()) };
    if let Some(up) = UPSTREAM_FLOWS.get_ptr_mut(&cookie) {
        // SAFETY: a live entry; one aligned word.
        unsafe { core::ptr::write_volatile(&raw mut (*up).refused, why) };
    }
}

/// Is this socket one the fast path cannot serve, by the options noted on
/// it before it was established, or on the listener that accepted it
/// (`setsockopt.rs`)? Its note is taken either way.
#[inline(always)]
fn api_refused(ctx: &SockOpsContext, op: u32, key: &SockKey) -> bool {
    let sk = sk_addr(ctx);
    let mut api = 0u64;
    // SAFETY: map values, read whole.
    if let Some(v) = unsafe { SOCK_API.get(&sk) } {
        api |= *v;
        let _ = SOCK_API.remove(&sk);
    }
    if op == BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB {
        let listener = PortKey {
            netns_cookie: key.netns_cookie,
            port: key.local_port,
            _pad0: 0,
        };
        // SAFETY: as above.
        if let Some(v) = unsafe { LISTENER_API.get(&listener) } {
            api |= *v;
        }
    }
    api & sock_api::OFF_MASK != 0
}

/// An accelerated socket shut down its sending side. Linux's
/// tcp_bpf_recvmsg wakes from its wait once and returns EAGAIN if nothing
/// arrived, and the ACK of this socket's own FIN (its move to FIN_WAIT2)
/// is such a wake-up: a blocking reader waiting for its peer's answer
/// after a half-close would see EAGAIN, which TCP never returns to it. So
/// the socket takes no more part in the fast path (its sends are over
/// anyway) and leaves the SOCKHASH now, before its reader can wait there,
/// if nothing redirected to it is left unread (else on a later packet).
#[inline(always)]
fn half_closed(ctx: &SockOpsContext, slot: u32) {
    let sk = sk_addr(ctx);
    let Some(own) = SOCKS.get_ptr_mut(&sk) else {
        return;
    };
    // SAFETY: own live entry; `flags` is written under this socket's lock,
    // which we hold (a state change), as its sk_msg does.
    let flags = unsafe { core::ptr::read_volatile(&raw const (*own).flags) };
    unsafe { core::ptr::write_volatile(&raw mut (*own).api[sock_api::OFF_HALF_CLOSED], 1) };
    if flags & RETIRED == 0 {
        crate::atomic::publish32(unsafe { &raw mut (*own).flags }, flags, flags | RETIRED);
        counters::inc(slot, Counter::AccelApiRetired);
    }
    // SAFETY: as above; one aligned word, set at pairing.
    let peer_sk = unsafe { core::ptr::read_volatile(&raw const (*own).peer) };
    if let Some(peer) = crate::maps::sock_state(peer_sk) {
        crate::retire::leave_own(own, peer);
    }
}

/// The socket's kernel address: what sk_msg and the read hook see.
#[inline(always)]
fn sk_addr(ctx: &SockOpsContext) -> u64 {
    // SAFETY: reading the context's socket pointer, as a number.
    unsafe { (*ctx.ops).__bindgen_anon_2.sk as u64 }
}

/// Puts the socket in SOCKS and the SOCKHASH; `peer_key` is the other
/// end's key, `peer` its address if it is already in, else 0. Returns this
/// socket's address. A target holding its quota of accelerated sockets
/// (`Config::socks_quota`) gets no more: the socket stays plain TCP (as
/// does its peer: a connecting end refused here leaves nothing pending;
/// an accepting end refused leaves its connecting end without a peer,
/// which sends by TCP). CPUs inserting at the same moment may take a
/// target a few sockets past its quota, never further.
#[inline(always)]
fn insert(
    ctx: &SockOpsContext,
    key: &SockKey,
    peer_key: &SockKey,
    peer: u64,
    cfg: &Config,
) -> Result<u64, ()> {
    let slot = cfg.slot;
    let sk = sk_addr(ctx);
    if sk == 0 {
        return Err(());
    }
    let count = SOCKS_IN_USE.get_ptr_mut(slot);
    if cfg.socks_quota != 0
        && let Some(p) = count
        && atomic::count_reached(p, cfg.socks_quota)
    {
        counters::inc(slot, Counter::AccelQuotaFull);
        refuse(ctx, refused::QUOTA);
        return Err(());
    }
    // Built in this CPU's scratch slot, not on the stack (`SOCK_SCRATCH`),
    // every field written.
    let state = SOCK_SCRATCH.get_ptr_mut(0).ok_or(())?;
    // SAFETY: this CPU's own slot, for this program run only.
    unsafe {
        (*state).peer_key = *peer_key;
        (*state).peer = peer;
        (*state).sent = 0;
        (*state).redirected_end = 0;
        (*state).read = 0;
        (*state).flags = 0;
        (*state).rcvbuf = rcvbuf(ctx);
        (*state).win_start = crate::flow::now();
        (*state).win_read = 0;
        (*state).tcp_since = 0;
        (*state).slot = slot;
        // ESTABLISHED, nothing sent yet: `write_seq` is `snd_nxt`.
        (*state).tcp_seq = peer::seqs(ctx).0;
        (*state).tcp_unsynced = 0;
        (*state).api = [0; 8];
        // The helper takes this program's own context.
        (*state).cookie = bpf_get_socket_cookie(ctx.ops.cast());
        (*state).redirected = 0;
        (*state).fallbacks = 0;
        (*state).returns = 0;
        (*state).win_msgs = 0;
        (*state).win_small = 0;
        (*state).win_redirected = 0;
        (*state).win_peer_sent = 0;
        (*state).win_peer_reads = 0;
        (*state).win_peer_read = 0;
        (*state).reads = 0;
        (*state).left_copied = 0;
    }
    // SAFETY: as above; a whole value, read by the helper.
    SOCKS.insert(&sk, unsafe { &*state }, 0).map_err(|_| ())?;
    // SAFETY: ctx.ops is the kernel's bpf_sock_ops for this socket.
    SOCKHASH
        .update(*key, unsafe { &mut *ctx.ops }, BPF_ANY as u64)
        .map_err(|_| {
            let _ = SOCKS.remove(&sk);
        })?;
    if let Some(p) = count {
        atomic::add(p, 1);
    }
    // Ask for state callbacks, to forget the socket when it closes, and for
    // a look at each packet it sends (we reserve no option space), to nudge
    // its reader.
    let _ =
        ctx.set_cb_flags((BPF_SOCK_OPS_STATE_CB_FLAG | BPF_SOCK_OPS_WRITE_HDR_OPT_CB_FLAG) as i32);
    counters::inc(slot, Counter::SockhashInserted);
    Ok(sk)
}

/// The socket's receive buffer (`sk_rcvbuf`), what bounds the bytes a
/// sender may leave queued at it; 0 if the kernel cannot tell (SOL_SOCKET
/// in bpf_getsockopt is 6.1+); then the first read fills it in.
#[inline(always)]
fn rcvbuf(ctx: &SockOpsContext) -> u32 {
    const SOL_SOCKET: i32 = 1;
    const SO_RCVBUF: i32 = 8;
    let mut v: i32 = 0;
    // SAFETY: a full socket at ESTABLISHED; the helper writes 4 bytes.
    let r = unsafe {
        aya_ebpf::helpers::bpf_getsockopt(
            ctx.ops.cast(),
            SOL_SOCKET,
            SO_RCVBUF,
            (&raw mut v).cast(),
            4,
        )
    };
    if r == 0 && v > 0 { v as u32 } else { 0 }
}

/// `nudge` for a socket whose pair left the SOCKHASH. Its reads are plain
/// TCP's now, never short; only a reader asleep after a short read from
/// before the leaving still needs waking. So once it has read since then
/// (its `copied_seq` moved from the first value seen here), or has nothing
/// unread, this callback is turned off: in a stream that keeps flowing,
/// nudging on every ACK woke the reader for nothing (HAProxy's 16 KiB
/// stream: the app woke 1.8 times as often per MB as without
/// acceleration, at 0.74x the throughput, after its pair had left).
#[inline(always)]
fn left_nudge(ctx: &SockOpsContext, own: *mut SockState, pure_ack: bool) {
    const MARKED: u64 = 1 << 32;
    // SAFETY: own live entry; aligned words stored whole by their writers.
    let (peer_sk, mark) = unsafe {
        (
            core::ptr::read_volatile(&raw const (*own).peer),
            core::ptr::read_volatile(&raw const (*own).left_copied),
        )
    };
    // The peer's entry holds this socket's address (a number the verifier
    // lets us add to, which the context's pointer is not).
    let Some(peer) = crate::maps::sock_state(peer_sk) else {
        let _ = ctx.set_cb_flags(BPF_SOCK_OPS_STATE_CB_FLAG as i32);
        return;
    };
    // SAFETY: the peer's live entry; one aligned word, set at pairing.
    let seqs = tcpseq::of(peer_sk, unsafe {
        core::ptr::read_volatile(&raw const (*peer).peer)
    });
    let moved = mark & MARKED != 0 && mark as u32 != seqs.copied;
    if !seqs.known || !seqs.tcp_unread() || moved {
        let _ = ctx.set_cb_flags(BPF_SOCK_OPS_STATE_CB_FLAG as i32);
        return;
    }
    if mark & MARKED == 0 {
        // SAFETY: own live entry; written only here, under the socket lock.
        unsafe {
            core::ptr::write_volatile(&raw mut (*own).left_copied, MARKED | u64::from(seqs.copied))
        };
    }
    if pure_ack {
        set_rcvlowat(ctx, own);
    }
}

/// Wakes this socket's reader when it has read every redirected byte while
/// bytes its peer sent by TCP wait in the receive queue.
///
/// Linux's tcp_bpf_recvmsg reads only the psock's queue of redirected bytes
/// while it is non-empty, so the read that empties it is short even when TCP
/// bytes are queued behind. An edge-triggered reader (tokio, HAProxy) takes
/// a short read as "drained" and waits for the next wake-up; the TCP bytes
/// woke it before that read. If they filled the window (or the sender has
/// nothing more to say), none comes: both ends sit in zero-window probes
/// for good. The reader answers each probe with an ACK, which brings us
/// here; setting SO_RCVLOWAT (to the value it has) makes tcp_set_rcvlowat
/// call tcp_data_ready, which wakes the reader if TCP bytes are readable.
/// When the socket sends nothing at all (its writer waits for an answer),
/// the read hook's report and tproxy's nudger wake it instead
/// (`recv.rs`, `nudge_iter.rs`).
/// The same callback (every packet an accelerated socket sends) is where a
/// retired pair leaves the SOCKHASH (`retire::leave`).
/// Only pure ACKs (no payload: not the sends of its own writer, nor the
/// header-size queries made for them); a reader that is merely slow gets a
/// spurious wake-up on its window updates, which costs a read.
#[inline(always)]
fn nudge(ctx: &SockOpsContext) {
    const TCP_FLAG_ACK: u32 = 0x10;
    let Some(own) = SOCKS.get_ptr_mut(&sk_addr(ctx)) else {
        return;
    };
    // SAFETY: own live entry; one aligned 4-byte word.
    if unsafe { core::ptr::read_volatile(&raw const (*own).flags) } & RETIRED != 0 {
        // A retired sender's packets (its data goes by TCP now): take the
        // pair out of the SOCKHASH once nothing redirected is left unread.
        let peer_sk = unsafe { core::ptr::read_volatile(&raw const (*own).peer) };
        if let Some(peer) = SOCKS.get_ptr_mut(&peer_sk) {
            crate::retire::leave(own, peer);
        }
    }
    // SAFETY: reading the context; skb fields are 0 without a packet.
    let (len, tcp_flags) = unsafe { ((*ctx.ops).skb_len, (*ctx.ops).skb_tcp_flags) };
    // SAFETY: own live entry; one aligned 4-byte word.
    let own_flags = unsafe { core::ptr::read_volatile(&raw const (*own).flags) };
    if own_flags & LEFT != 0 {
        // Out of the SOCKHASH: plain TCP from here on, on every packet.
        left_nudge(ctx, own, len == 0 && tcp_flags & TCP_FLAG_ACK != 0);
        return;
    }
    if len != 0 || tcp_flags & TCP_FLAG_ACK == 0 {
        return;
    }
    // SAFETY: live SOCKS entries; aligned 8-byte and 4-byte words that
    // their writers store whole (a stale value delays the nudge to the
    // next packet, or wakes the reader once for nothing).
    let (peer_sk, read) = unsafe {
        (
            core::ptr::read_volatile(&raw const (*own).peer),
            core::ptr::read_volatile(&raw const (*own).read),
        )
    };
    let Some(peer) = crate::maps::sock_state(peer_sk) else {
        return;
    };
    let (flags, sent, redirected_end) = unsafe {
        (
            core::ptr::read_volatile(&raw const (*peer).flags),
            core::ptr::read_volatile(&raw const (*peer).sent),
            core::ptr::read_volatile(&raw const (*peer).redirected_end),
        )
    };
    // The end that took the pair out marks the other at best effort.
    if flags & LEFT != 0 {
        left_nudge(ctx, own, true);
        return;
    }
    // The peer redirects, or redirected bytes are still queued here: no
    // short read to wake from (the common case: no kernel reads below).
    if flags & FAST != 0 || read < redirected_end {
        return;
    }
    // Some of what the peer sent by TCP is not read yet: by the kernel's
    // sequence numbers (the peer's `sent` misses a send that went by TCP
    // unseen until its next send), else by the counts. The peer's entry
    // holds this socket's address.
    // SAFETY: the peer's live entry; one aligned word, set at pairing.
    let seqs = tcpseq::of(peer_sk, unsafe {
        core::ptr::read_volatile(&raw const (*peer).peer)
    });
    let tcp_unread = if seqs.known {
        seqs.tcp_unread()
    } else {
        read < sent
    };
    // The peer sends by TCP, nothing redirected is left to read, and some
    // of what it sent is not read yet.
    if tcp_unread {
        set_rcvlowat(ctx, own);
    }
}

/// Sets SO_RCVLOWAT to the value it has: tcp_set_rcvlowat then calls
/// tcp_data_ready, which wakes the reader if TCP bytes are readable.
#[inline(always)]
fn set_rcvlowat(ctx: &SockOpsContext, own: *mut SockState) {
    const SOL_SOCKET: i32 = 1;
    const SO_RCVLOWAT: i32 = 18;
    let mut v: i32 = 1;
    // SAFETY: a full, locked socket (a packet it sends); 4-byte buffers.
    unsafe {
        if aya_ebpf::helpers::bpf_getsockopt(
            ctx.ops.cast(),
            SOL_SOCKET,
            SO_RCVLOWAT,
            (&raw mut v).cast(),
            4,
        ) != 0
        {
            v = 1;
        }
        if aya_ebpf::helpers::bpf_setsockopt(
            ctx.ops.cast(),
            SOL_SOCKET,
            SO_RCVLOWAT,
            (&raw mut v).cast(),
            4,
        ) == 0
        {
            counters::inc((*own).slot, Counter::AccelNudges);
        }
    }
}
