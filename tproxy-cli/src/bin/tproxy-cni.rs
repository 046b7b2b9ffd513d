//! `tproxy-cni`: the CNI plugin (see `tproxy::cni`). The container runtime
//! runs it with `CNI_COMMAND` and the other `CNI_*` variables set and the
//! network config on stdin.
fn main() -> std::process::ExitCode {
    tproxy::cni::main()
}
