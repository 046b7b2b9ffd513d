//! sockops on `--cgroup`: puts exactly the proxy<->app socket pairs in the
//! SOCKHASH, at ESTABLISHED, before any data moves.
//!
//! A pair is a connection between two sockets of this host, both in the
//! cgroup, to an intercepted app port. The connecting (proxy) side reaches
//! ACTIVE_ESTABLISHED first (it handles the SYN-ACK and only then sends the
//! ACK that establishes the app side); it enters the map and leaves the
//! app side's key in PENDING_PEERS. The app side enters at
//! PASSIVE_ESTABLISHED only if its key is pending. Every other socket in
//! the cgroup stays untouched.
use aya_ebpf::{
    bindings::{
        BPF_ANY, BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB, BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB,
        BPF_SOCK_OPS_STATE_CB, BPF_SOCK_OPS_STATE_CB_FLAG,
    },
    macros::sock_ops,
    programs::SockOpsContext,
};
use tproxy_common::{Counter, SockKey, SockState, flags};

use crate::{
    counters,
    maps::{CONFIG, INTERCEPT_PORTS, PENDING_PEERS, SK_KEYS, SOCKHASH, SOCKS},
    sockkey,
};

/// TCP_CLOSE in the kernel's TCP state enum.
const TCP_CLOSE: u32 = 7;

#[sock_ops]
pub fn tproxy_sockops(ctx: SockOpsContext) -> u32 {
    let _ = try_sockops(&ctx);
    1
}

#[inline(always)]
fn intercepted(port: u32) -> bool {
    INTERCEPT_PORTS.get(port).is_some_and(|v| *v != 0)
}

#[inline(always)]
fn try_sockops(ctx: &SockOpsContext) -> Result<(), ()> {
    counters::inc(Counter::SockopsEvents);
    let op = ctx.op();
    match op {
        BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB | BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB => {
            let cfg = CONFIG.get(0).ok_or(())?;
            if cfg.flags & flags::ACCEL == 0 {
                return Ok(());
            }
            let key = sockkey::from_sock_ops(ctx);
            if op == BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB {
                if !intercepted(key.remote_port) || !sockkey::both_local(&key) {
                    return Ok(());
                }
                insert(ctx, &key)?;
                PENDING_PEERS.insert(&key.peer(), &1, 0).map_err(|_| ())?;
            } else {
                if !intercepted(key.local_port) || PENDING_PEERS.remove(&key).is_err() {
                    return Ok(());
                }
                insert(ctx, &key)?;
            }
        }
        BPF_SOCK_OPS_STATE_CB if ctx.arg(1) == TCP_CLOSE => {
            // The kernel drops a closed socket from the SOCKHASH itself;
            // this is our bookkeeping.
            let key = sockkey::from_sock_ops(ctx);
            // SAFETY: a plain lookup; the value is copied out at once.
            if let Some(st) = unsafe { SOCKS.get(&key) } {
                let _ = SK_KEYS.remove(&st.sk);
                let _ = SOCKS.remove(&key);
                counters::inc(Counter::SockhashRemoved);
            }
        }
        _ => {}
    }
    Ok(())
}

#[inline(always)]
fn insert(ctx: &SockOpsContext, key: &SockKey) -> Result<(), ()> {
    // The socket's kernel address: what the recvmsg tracepoint sees.
    // SAFETY: reading the context's socket pointer, as a number.
    let sk = unsafe { (*ctx.ops).__bindgen_anon_2.sk } as u64;
    if sk == 0 {
        return Err(());
    }
    let state = SockState {
        sk,
        queued: 0,
        flags: 0,
        _pad0: 0,
    };
    SOCKS.insert(key, &state, 0).map_err(|_| ())?;
    SK_KEYS.insert(&sk, key, 0).map_err(|_| ())?;
    // SAFETY: ctx.ops is the kernel's bpf_sock_ops for this socket.
    SOCKHASH
        .update(*key, unsafe { &mut *ctx.ops }, BPF_ANY as u64)
        .map_err(|_| {
            let _ = SOCKS.remove(key);
            let _ = SK_KEYS.remove(&sk);
        })?;
    // Ask for state callbacks, to forget the socket when it closes.
    let _ = ctx.set_cb_flags(BPF_SOCK_OPS_STATE_CB_FLAG as i32);
    counters::inc(Counter::SockhashInserted);
    Ok(())
}
