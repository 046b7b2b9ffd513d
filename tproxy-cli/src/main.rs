//! The `tproxy` binary: everything is in the library's `cmd` layer.
fn main() -> std::process::ExitCode {
    tproxy::cmd::main()
}
