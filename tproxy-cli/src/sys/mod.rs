//! The kernel and the host, one kind of object per file: the bpf(2)
//! commands aya does not offer, bpf pins and links, BTF, network
//! namespaces, tc over netlink, policy routing and nftables, host checks
//! (privileges, cgroups, interfaces), the runtime directory, the embedded
//! eBPF object, and the kernel features probed before anything is loaded.
//! Nothing here uses a layer above (`target` and up).
pub mod bpf;
pub mod btf;
pub mod error;
pub mod netns;
pub mod object;
pub mod pins;
pub mod probe;
pub mod removal;
pub mod routing;
pub mod run_dir;
pub mod system;
pub mod tc;

pub use error::{Error, Result};
