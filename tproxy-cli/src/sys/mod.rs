//! The kernel and the host, one kind of object per file: the bpf(2)
//! commands aya does not offer, bpf pins and links, BTF, network namespaces, tc over netlink, policy routing and
//! nftables, host checks (privileges, cgroups, interfaces), and the kernel
//! features probed before anything is loaded.
pub mod bpf;
pub mod btf;
pub mod error;
pub mod netns;
pub mod object;
pub mod pins;
pub mod probe;
pub mod removal;
pub mod routing;
pub mod system;
pub mod tc;

pub use error::{Error, Result};
