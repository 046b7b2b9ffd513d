//! Which sockets sockops pairs: the two ends of one TCP connection, both in
//! a cgroup tproxy serves, where that connection is a leg of a steered
//! flow. Two kinds of connection qualify:
//!
//! - proxy -> app, in one target's namespace: the proxy's upstream socket
//!   dials an intercepted port of its own address (or loopback);
//! - client -> proxy, across two targets of this node: a client in pod C
//!   dials an intercepted port of pod S's address; S's tc steers the flow
//!   to its proxy, whose accepted socket is the other end. The handshake
//!   still crosses the veth, the bridge and S's tc (the flow table sees
//!   it as always); only the data then goes socket to socket.
//!
//! The connecting end reaches ESTABLISHED first (it handles the SYN-ACK and
//! only then sends the ACK that establishes the accepting end), enters the
//! SOCKHASH and leaves, under the key the accepting end will have, a
//! `Pending` entry; the accepting end pairs with it at its ESTABLISHED.
//!
//! Why no other socket can be paired (a pod is untrusted: its processes
//! may bind any address with IP_FREEBIND, forge packets into their own
//! stack, or even create ESTABLISHED sockets with TCP_REPAIR):
//! - Keys carry the netns cookie, which the kernel gives and no packet
//!   names: a pending entry only matches a socket of the namespace the
//!   dialled address belongs to (`TARGET_ADDRS`, written by userspace).
//! - A client may only leave entries for connections from its own pod's
//!   addresses (`TARGET_ADDRS` again): a pod cannot claim another pod's
//!   connections, even to wait for them.
//! - The decisive check: the accepting socket pairs only if its `rcv_nxt`
//!   and `snd_nxt` at ESTABLISHED are the waiting socket's `snd_nxt` and
//!   `rcv_nxt` at its ESTABLISHED. Those are the two initial sequence
//!   numbers (+1) of the connection, which the kernel of each end chose at
//!   random and which the accepting socket only holds if the handshake it
//!   completed is the one the waiting socket completed. A forged SYN-ACK
//!   or a TCP_REPAIR socket can fake the waiting side's numbers but must
//!   guess the server's 32-bit ISN (and the client's); a tuple reused by
//!   a colliding connection (a client port reused towards another port,
//!   the same 4-tuple at the proxy) has its own numbers. A mismatch is
//!   counted (`accel_pairs_refused`) and both ends stay plain TCP. An
//!   attacker can at most overwrite or evict pending entries (LRU), which
//!   costs a victim its acceleration, never its bytes.
//!
//! So a pair is always the two ends of one TCP connection, which the kernel
//! established; redirecting bytes between them delivers them exactly where
//! TCP would.
use aya_ebpf::{bindings::bpf_sock_ops, programs::SockOpsContext};
use tproxy_common::{Pending, SockKey, SteerMode, Target, TargetAddr, flags};

use crate::{
    counters,
    maps::{PENDING_PEERS, TARGET_ADDRS},
    sockkey,
};

/// The connecting end's `snd_nxt` and `rcv_nxt`.
#[inline(always)]
pub fn seqs(ctx: &SockOpsContext) -> (u32, u32) {
    let ops: *const bpf_sock_ops = ctx.ops;
    (read_field!(ops, snd_nxt), read_field!(ops, rcv_nxt))
}

/// The key the accepting end of this connecting socket will have, if the
/// connection is one to pair (see the module comment); `own` is the
/// connecting socket's target.
#[inline(always)]
pub fn expected(key: &SockKey, own: &Target) -> Option<SockKey> {
    if sockkey::both_local(key) {
        // Proxy -> app, in one namespace.
        return own.intercepts(key.remote_port as u16).then(|| key.peer());
    }
    // A client of this pod dialling another pod of this node, from this
    // pod's own address; only when the node asks for it.
    if crate::maps::NODE
        .get(0)
        .is_none_or(|n| n.flags & tproxy_common::node_flags::SAME_NODE == 0)
    {
        return None;
    }
    if owner(&key.local_addr, key.family)? != key.netns_cookie {
        return None;
    }
    let server_cookie = owner(&key.remote_addr, key.family)?;
    if server_cookie == key.netns_cookie {
        return None;
    }
    let server = counters::target(server_cookie)?;
    let cfg = &server.config;
    let port = key.remote_port as u16;
    if cfg.flags & flags::ACCEL == 0 || !server.intercepts(port) {
        return None;
    }
    // The accepting socket: the proxy's, on the proxy port with rewrite
    // steering; the proxy's transparent one on the dialled port with the
    // tproxy back-end, or the app's own while the target steers no new
    // flows (draining): the dialled port too.
    let local_port =
        if cfg.steer_mode == SteerMode::Rewrite as u8 && cfg.flags & flags::STEER_NEW != 0 {
            u32::from(cfg.proxy_port)
        } else {
            key.remote_port
        };
    Some(SockKey {
        local_addr: key.remote_addr,
        remote_addr: key.local_addr,
        local_port,
        remote_port: key.local_port,
        family: key.family,
        _pad0: 0,
        netns_cookie: server_cookie,
    })
}

/// The netns cookie of the target that owns this address, if any.
#[inline(always)]
fn owner(addr: &[u32; 4], family: u32) -> Option<u64> {
    let k = TargetAddr {
        addr: *addr,
        family,
        _pad0: 0,
    };
    // SAFETY: a plain lookup; the value is copied out at once.
    unsafe { TARGET_ADDRS.get(&k) }.copied()
}

/// What the accepting socket `key` finds about its connecting end: the
/// pending entry, taken out (each is used once), if it is the other end of
/// this very connection; `Err` if one was pending but is not (refused).
#[inline(always)]
pub fn take(key: &SockKey, ctx: &SockOpsContext) -> Result<Option<Pending>, ()> {
    // SAFETY: a plain lookup; the value is copied out at once.
    let Some(&pending) = (unsafe { PENDING_PEERS.get(key) }) else {
        return Ok(None);
    };
    let _ = PENDING_PEERS.remove(key);
    let (snd_nxt, rcv_nxt) = seqs(ctx);
    if pending.snd_nxt != rcv_nxt || pending.rcv_nxt != snd_nxt {
        return Err(());
    }
    Ok(Some(pending))
}
