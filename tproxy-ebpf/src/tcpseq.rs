//! The kernel's own count of a connection's TCP bytes, for the one question
//! byte order hangs on: has the reader taken every byte the writer gave
//! TCP? The writer's `tcp_sock.write_seq` (end of what it queued to TCP)
//! against the reader's `tcp_sock.copied_seq` (end of what its readers took
//! from TCP): one sequence space, equal exactly when nothing sent by TCP
//! is unread, in flight or still queued at the writer. Redirected bytes
//! move neither.
//!
//! sk_msg's byte counts (`SockState::sent`) cannot answer it alone: after
//! a send that TCP refused with EAGAIN, Linux runs no program on the next
//! send and reuses the last verdict (tcp_bpf_send_verdict leaves
//! `psock->eval` set on error), so that send goes by TCP unseen until the
//! next program run trues the count up (sk_msg.rs).
//!
//! Offsets are from the kernel's BTF (`NodeConfig`); the reads use
//! bpf_probe_read_kernel, which acceleration's CAP_PERFMON allows. The
//! addresses are `SOCKS` keys taken from map values (plain numbers: the
//! verifier refuses arithmetic on a context's socket pointer).
use aya_ebpf::helpers::bpf_probe_read_kernel;

use crate::maps::NODE;

/// A writer's `write_seq` and its reader's `copied_seq`. Plain fields, not
/// an Option: LLVM spills an Option's unset payload, which the verifier
/// refuses as an uninitialized register.
#[derive(Clone, Copy)]
pub struct Seqs {
    pub known: bool,
    pub write: u32,
    pub copied: u32,
}

impl Seqs {
    pub const UNKNOWN: Seqs = Seqs {
        known: false,
        write: 0,
        copied: 0,
    };

    /// Known, and some TCP byte of the writer is not read yet.
    #[inline(always)]
    pub fn tcp_unread(&self) -> bool {
        self.write != self.copied
    }
}

/// `writer`'s `write_seq` and `reader`'s `copied_seq` (kernel addresses of
/// two live sockets, 0: unknown); UNKNOWN without BTF offsets.
#[inline(always)]
pub fn of(writer: u64, reader: u64) -> Seqs {
    let Some(node) = NODE.get(0) else {
        return Seqs::UNKNOWN;
    };
    let (write_off, copied_off) = (node.tcp_write_seq_offset, node.tcp_copied_seq_offset);
    if write_off == 0 || copied_off == 0 || writer == 0 || reader == 0 {
        return Seqs::UNKNOWN;
    }
    // SAFETY: both are live sockets (each is in SOCKS until its close); the
    // helper checks the reads. Each is one u32 the kernel stores whole.
    let (write, copied) = unsafe {
        (
            bpf_probe_read_kernel((writer + u64::from(write_off)) as *const u32),
            bpf_probe_read_kernel((reader + u64::from(copied_off)) as *const u32),
        )
    };
    match (write, copied) {
        (Ok(write), Ok(copied)) => Seqs {
            known: true,
            write,
            copied,
        },
        _ => Seqs::UNKNOWN,
    }
}
