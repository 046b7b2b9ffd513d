//! Names of the maps and programs in the eBPF object, so userspace finds each
//! one by the same constant the eBPF side is named after (`tproxy-ebpf/src/
//! maps.rs` and the program table in `tproxy-ebpf/src/main.rs`), and of the
//! one global the loader sets.

pub const TARGETS: &str = "TARGETS";
pub const NODE: &str = "NODE";
pub const COUNTERS: &str = "COUNTERS";
pub const FLOWS: &str = "FLOWS";
pub const SYNS: &str = "SYNS";
pub const CLOSING: &str = "CLOSING";
pub const SOCKHASH: &str = "SOCKHASH";
pub const SOCKS: &str = "SOCKS";
pub const PENDING_PEERS: &str = "PENDING_PEERS";
pub const TARGET_ADDRS: &str = "TARGET_ADDRS";
pub const NUDGE_EVENTS: &str = "NUDGE_EVENTS";
pub const NUDGE: &str = "NUDGE";
pub const MEM_BUDGET: &str = "MEM_BUDGET";
pub const PRIOR_FLOWS: &str = "PRIOR_FLOWS";
pub const PROXY_CONNECTS: &str = "PROXY_CONNECTS";
pub const PROXY_LISTENERS: &str = "PROXY_LISTENERS";
pub const PRIOR_LISTENERS: &str = "PRIOR_LISTENERS";
pub const FLOWS_IN_USE: &str = "FLOWS_IN_USE";
pub const SOCKS_IN_USE: &str = "SOCKS_IN_USE";
pub const SOCK_API: &str = "SOCK_API";
pub const LISTENER_API: &str = "LISTENER_API";
pub const ASKED: &str = "ASKED";
pub const UPSTREAM_FLOWS: &str = "UPSTREAM_FLOWS";
/// 1 when the kernel lets sockops and cgroup/getsockopt call
/// bpf_get_current_pid_tgid (Linux >= 6.10): the link from a steered flow to
/// the proxy's upstream socket (`tproxy flows`).
pub const PID_TGID_GLOBAL: &str = "TPROXY_PID_TGID";
/// Read-only global: 1 when sock_ops programs may call
/// bpf_get_current_ancestor_cgroup_id (Linux 6.4); 0: sockops walks the
/// calling task's cgroups itself (`NodeConfig::task_cgroups_offset`…).
pub const SOCKOPS_CGROUP_GLOBAL: &str = "TPROXY_SOCKOPS_CGROUP";

pub const PROG_STEER: &str = "tproxy_steer";
pub const PROG_RESTORE: &str = "tproxy_restore";
pub const PROG_GETSOCKOPT: &str = "tproxy_getsockopt";
pub const PROG_GETSOCKNAME4: &str = "tproxy_getsockname4";
pub const PROG_GETSOCKNAME6: &str = "tproxy_getsockname6";
pub const PROG_SOCKOPS: &str = "tproxy_sockops";
/// sockops without acceleration (--no-accel): flow tracking only, no
/// socket addresses as map keys (so no CAP_PERFMON needed).
pub const PROG_SOCKOPS_FLOWS: &str = "tproxy_sockops_flows";
pub const PROG_SK_MSG: &str = "tproxy_sk_msg";
/// cgroup/setsockopt (acceleration): notes the options the fast path
/// cannot honour.
pub const PROG_SETSOCKOPT: &str = "tproxy_setsockopt";
/// The read hook on kernels without fexit: the raw tracepoint below.
pub const PROG_RECV_LENGTH: &str = "tproxy_recv_length";
/// Raw tracepoint after every recvmsg (socket, bytes read, flags).
pub const RECV_TRACEPOINT: &str = "sock_recv_length";
/// The read hook where the kernel has fexit: on the function below.
pub const PROG_RECV_FEXIT: &str = "tproxy_recv_fexit";
/// The recvmsg of sockets in a sockmap or SOCKHASH (net/ipv4/tcp_bpf.c).
pub const RECV_FEXIT_FUNCTION: &str = "tcp_bpf_recvmsg";
/// The send hook where the kernel has fentry: on the function below (it
/// sees a send's flags, which sk_msg does not).
pub const PROG_SEND_FENTRY: &str = "tproxy_send_fentry";
/// The sendmsg of sockets in a sockmap or SOCKHASH (net/ipv4/tcp_bpf.c).
pub const SEND_FENTRY_FUNCTION: &str = "tcp_bpf_sendmsg";
/// The nudger's TCP socket iterator (`iter/tcp`).
pub const PROG_NUDGE_ITER: &str = "tproxy_nudge_iter";
/// Its iterator type: the kernel's `bpf_iter_tcp`.
pub const NUDGE_ITER_TYPE: &str = "tcp";

/// Name of the read-only global the loader sets to 1 for a many-target
/// object (the agent): its tc programs then read each packet's namespace
/// from the device; 0 (a single run): `NodeConfig::single_netns_cookie`.
pub const MULTI_TARGET_GLOBAL: &str = "TPROXY_MULTI_TARGET";
