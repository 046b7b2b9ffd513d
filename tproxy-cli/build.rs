use std::path::PathBuf;

use aya_build::{Package, Toolchain};

/// Builds tproxy-ebpf for the BPF target with the nightly toolchain and
/// leaves the object in OUT_DIR, where `include_bytes_aligned!` embeds it in
/// the `tproxy` binary: the release binary is one self-contained file.
fn main() -> anyhow::Result<()> {
    let ebpf_dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tproxy-ebpf");
    let ebpf_dir = ebpf_dir.canonicalize()?;
    let common_dir = ebpf_dir.join("../tproxy-common").canonicalize()?;
    println!("cargo:rerun-if-changed={}", common_dir.display());
    aya_build::build_ebpf(
        [Package {
            name: "tproxy-ebpf",
            root_dir: ebpf_dir.to_str().expect("utf-8 path"),
            ..Default::default()
        }],
        Toolchain::Nightly,
    )
}
