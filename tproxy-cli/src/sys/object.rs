//! The eBPF object, built from `tproxy-ebpf` by the build script and
//! embedded in the binary: what the loader loads and the probes read the
//! helper calls of.
pub static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/tproxy"));
