use which::which;

/// Building the eBPF object links with bpf-linker; rebuild when it changes
/// (for instance after `cargo xtask setup` reinstalled it).
fn main() {
    let bpf_linker = which("bpf-linker").expect(
        "bpf-linker not found on PATH: run `cargo xtask setup` (it builds bpf-linker against rustc's LLVM)",
    );
    println!("cargo:rerun-if-changed={}", bpf_linker.to_str().unwrap());
}
