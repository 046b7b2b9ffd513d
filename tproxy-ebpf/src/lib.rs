#![no_std]
// The programs live in the `tproxy` binary target (src/main.rs); this empty
// library lets tproxy-cli's build script depend on the package so cargo
// rebuilds the object when it changes.
