//! Who the proxy is: the processes of one cgroup (v2) and the cgroups
//! below it (`Config::proxy_cgroup_id`), which no unprivileged process can
//! join. The original-destination hooks answer only the proxy's calls;
//! sockops pairs a proxy->app connection only if the proxy made it
//! (`PROXY_CONNECTS`).
use aya_ebpf::helpers::bpf_get_current_ancestor_cgroup_id;
use tproxy_common::Config;

/// Is the calling process (a syscall's: cgroup sockopt and sock_addr
/// hooks, sockops at TCP_CONNECT_CB) the proxy? Always true with no
/// identity set (crafted-packet tests).
#[inline(always)]
pub fn caller_is_proxy(cfg: &Config) -> bool {
    if cfg.proxy_cgroup_id == 0 {
        return true;
    }
    // SAFETY: no pointers; 0 if the caller is above that level.
    let id = unsafe { bpf_get_current_ancestor_cgroup_id(cfg.proxy_cgroup_level as i32) };
    id == cfg.proxy_cgroup_id
}
