//! `cargo xtask dist`'s worker: writes tproxy's shell completions and man
//! pages into the folder given. An example of this package rather than
//! code in xtask: xtask does not link the tproxy library, whose build needs
//! the eBPF toolchain that `cargo xtask setup` installs.
use std::path::PathBuf;

fn main() -> std::io::Result<()> {
    let out = PathBuf::from(std::env::args_os().nth(1).expect("usage: dist OUT_DIR"));
    let completions = tproxy::cmd::dist::write_completions(&out.join("completions"))?;
    let man = tproxy::cmd::dist::write_man(&out.join("man"))?;
    for f in completions.iter().chain(&man) {
        println!("{}", f.display());
    }
    Ok(())
}
