//! Types shared by the eBPF programs (`tproxy-ebpf`) and userspace
//! (`tproxy-cli`). Every struct is `#[repr(C)]` with explicit padding so both
//! sides agree byte for byte; the size asserts at the bottom of each module
//! fail the build if a field is added without thought. The `aya::Pod` impls
//! that let userspace (feature `user`) put them in aya's maps are at the
//! bottom of this file, all under one safety argument.
//!
//! One module per concept of `tproxy-ebpf`, named like its files (in
//! parentheses: the files of `tproxy-ebpf/src` that use it most):
//! - `names`: the names of the maps, the programs and the one global in the
//!   object (`maps.rs`, the table in `main.rs`).
//! - `target`: a target's settings and intercepted ports (`Config` with its
//!   quotas, `flags`, `SteerMode`, `Target`), its addresses (`TargetAddr`),
//!   what the node's targets share (`NodeConfig`), `TARGETS_MAX` and the
//!   defaults (`counters.rs`'s `target`, `netns.rs`).
//! - `flow`: the flow tables' `FlowKey`, `FlowValue` and `flow_state`, their
//!   sizes and timings (`flow.rs`, `accepted.rs`).
//! - `identity`: the proxy's listeners and connects (`ListenerKey`,
//!   `PROXY_LISTENERS_MAX`, `PROXY_CONNECTS_MAX`; `identity.rs`).
//! - `sock`: acceleration: `SockKey`, `SockState`, `sock_flags`, `Pending`,
//!   `NudgeEvent` and the sizes of their maps (`sockops.rs`, `sk_msg.rs`,
//!   `peer.rs`, `recv.rs`, `nudge_iter.rs`).
//! - `counters`: `Counter`, each event counter with what it counts and the
//!   name userspace shows it by (`counters.rs`).
//!
//! The crate root re-exports every item of them (`tproxy_common::FlowKey`),
//! except the names, which are read as `names::FLOWS`.
#![cfg_attr(not(test), no_std)]

pub mod counters;
pub mod flow;
pub mod identity;
pub mod names;
pub mod sock;
pub mod target;

pub use counters::*;
pub use flow::*;
pub use identity::*;
pub use names::{MULTI_TARGET_GLOBAL, PID_TGID_GLOBAL, SOCKOPS_CGROUP_GLOBAL};
pub use sock::*;
pub use target::*;

/// Address families, as in the `family` of `FlowKey`, `SockKey`,
/// `ListenerKey` and `TargetAddr`.
pub const AF_INET: u8 = 2;
pub const AF_INET6: u8 = 10;

#[cfg(feature = "user")]
mod user {
    use super::*;
    // SAFETY: all of these are #[repr(C)], Copy, with explicit padding fields
    // and no invalid bit patterns.
    unsafe impl aya::Pod for Config {}
    unsafe impl aya::Pod for Target {}
    unsafe impl aya::Pod for NodeConfig {}
    unsafe impl aya::Pod for FlowKey {}
    unsafe impl aya::Pod for FlowValue {}
    unsafe impl aya::Pod for SockKey {}
    unsafe impl aya::Pod for SockState {}
    unsafe impl aya::Pod for Pending {}
    unsafe impl aya::Pod for TargetAddr {}
    unsafe impl aya::Pod for NudgeEvent {}
    unsafe impl aya::Pod for ListenerKey {}
    unsafe impl aya::Pod for PortKey {}
    unsafe impl aya::Pod for Upstream {}
    unsafe impl aya::Pod for Asked {}
}
