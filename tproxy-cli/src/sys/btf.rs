//! Just enough of a BTF reader to find one member's offset in one kernel
//! struct (aya's parser keeps its type lookups private). Used for
//! `sk_rcvbuf` in `struct sock`, which the read hook reads to
//! keep each accelerated socket's receive buffer in view.

/// The kernel's own BTF.
pub const VMLINUX: &str = "/sys/kernel/btf/vmlinux";

const MAGIC: u16 = 0xeb9f;
const KIND_STRUCT: u32 = 4;
const KIND_UNION: u32 = 5;

struct Btf<'a> {
    data: &'a [u8],
    strs: usize,
    /// Where each type's record starts, by id (id 0 is void).
    at: Vec<usize>,
}

impl<'a> Btf<'a> {
    fn parse(data: &'a [u8]) -> Option<Btf<'a>> {
        let mut b = Btf {
            data,
            strs: 0,
            at: vec![0],
        };
        if u16::from_ne_bytes(data.get(0..2)?.try_into().ok()?) != MAGIC {
            return None;
        }
        let hdr_len = b.u32_at(4)? as usize;
        let types = hdr_len + b.u32_at(8)? as usize;
        let end = types + b.u32_at(12)? as usize;
        b.strs = hdr_len + b.u32_at(16)? as usize;
        let mut o = types;
        while o < end {
            b.at.push(o);
            let info = b.u32_at(o + 4)?;
            let vlen = (info & 0xffff) as usize;
            // What follows the 12-byte common part, by kind (uapi/linux/btf.h).
            o += 12
                + match (info >> 24) & 0x1f {
                    2 | 7..=12 | 16 | 18 => 0,
                    1 | 14 | 17 => 4,
                    3 => 12,
                    6 | 13 => 8 * vlen,
                    4 | 5 | 15 | 19 => 12 * vlen,
                    _ => return None,
                };
        }
        Some(b)
    }

    fn u32_at(&self, o: usize) -> Option<u32> {
        Some(u32::from_ne_bytes(
            self.data.get(o..o + 4)?.try_into().ok()?,
        ))
    }

    fn name(&self, off: u32) -> Option<&'a str> {
        let s = self.data.get(self.strs + off as usize..)?;
        std::str::from_utf8(&s[..s.iter().position(|&b| b == 0)?]).ok()
    }

    /// The members of struct or union `id`: (name, type id, bit offset,
    /// bitfield size or 0); None for other kinds.
    fn members(&self, id: usize) -> Option<Vec<(&'a str, usize, u32, u32)>> {
        let o = *self.at.get(id)?;
        let info = self.u32_at(o + 4)?;
        if !matches!((info >> 24) & 0x1f, KIND_STRUCT | KIND_UNION) {
            return None;
        }
        // kind_flag: the top 8 bits of each member's offset are a bitfield size.
        let bitfields = info >> 31 == 1;
        (0..(info & 0xffff) as usize)
            .map(|i| {
                let m = o + 12 + 12 * i;
                let (n, ty, off) = (self.u32_at(m)?, self.u32_at(m + 4)?, self.u32_at(m + 8)?);
                let (bits, size) = if bitfields {
                    (off & 0xff_ffff, off >> 24)
                } else {
                    (off, 0)
                };
                Some((self.name(n)?, ty as usize, bits, size))
            })
            .collect()
    }

    /// Bit offset and bitfield size of `member` in struct or union `id`,
    /// looking through anonymous members (a few levels deep).
    fn find(&self, id: usize, member: &str, depth: u32) -> Option<(u32, u32)> {
        let members = self.members(id)?;
        if let Some(&(_, _, bits, size)) = members.iter().find(|m| m.0 == member) {
            return Some((bits, size));
        }
        if depth >= 8 {
            return None;
        }
        members
            .iter()
            .filter(|m| m.0.is_empty())
            .find_map(|&(_, ty, bits, _)| {
                let (inner, size) = self.find(ty, member, depth + 1)?;
                Some((bits + inner, size))
            })
    }
}

/// Byte offset of `member` in the struct named `strukt`, looking through
/// anonymous struct and union members; None if the BTF does not have it,
/// is malformed, or the member is a bitfield.
pub fn member_offset(btf: &[u8], strukt: &str, member: &str) -> Option<u32> {
    let b = Btf::parse(btf)?;
    let id = (1..b.at.len()).find(|&id| {
        b.u32_at(b.at[id] + 4)
            .is_some_and(|info| (info >> 24) & 0x1f == KIND_STRUCT)
            && b.u32_at(b.at[id]).and_then(|n| b.name(n)) == Some(strukt)
    })?;
    let (bits, size) = b.find(id, member, 0)?;
    (size == 0 && bits % 8 == 0).then_some(bits / 8)
}

/// Where `sk_rcvbuf` is in the running kernel's `struct sock`; 0 if that
/// cannot be read (no BTF): the read hook then leaves each
/// socket's receive buffer as read at insert.
pub fn sk_rcvbuf_offset() -> u32 {
    std::fs::read(VMLINUX)
        .ok()
        .and_then(|btf| member_offset(&btf, "sock", "sk_rcvbuf"))
        .unwrap_or(0)
}

/// Where `msg_flags` is in `struct msghdr`, for the send hook; 0 without
/// BTF (the hook then notes nothing).
pub fn msghdr_flags_offset() -> u32 {
    std::fs::read(VMLINUX)
        .ok()
        .and_then(|btf| member_offset(&btf, "msghdr", "msg_flags"))
        .unwrap_or(0)
}

/// Offsets of `write_seq` and `copied_seq` in `struct tcp_sock`; (0, 0)
/// without BTF.
pub fn tcp_seq_offsets() -> (u32, u32) {
    std::fs::read(VMLINUX)
        .ok()
        .and_then(|btf| {
            Some((
                member_offset(&btf, "tcp_sock", "write_seq")?,
                member_offset(&btf, "tcp_sock", "copied_seq")?,
            ))
        })
        .unwrap_or((0, 0))
}

/// Where sk_msg reads a reader's socket memory (`memory.rs` in
/// tproxy-ebpf): offsets of `sock_common.skc_prot`,
/// `proto.memory_allocated`, `proto.memory_pressure`, `proto.sysctl_mem`,
/// `sock.sk_memcg`, `mem_cgroup.tcpmem` and `page_counter.max` (a
/// `page_counter`'s `usage` is its first member). None without BTF or if
/// one of the first four is missing; the last three are 0 where the
/// kernel has no cgroup v1 TCP counter (a kernel built without cgroup v1
/// memory has none to run into).
pub fn socket_memory_offsets() -> Option<[u32; 7]> {
    let btf = std::fs::read(VMLINUX).ok()?;
    let memcg = (|| {
        (member_offset(&btf, "page_counter", "usage")? == 0).then_some(())?;
        Some([
            member_offset(&btf, "sock", "sk_memcg")?,
            member_offset(&btf, "mem_cgroup", "tcpmem")?,
            member_offset(&btf, "page_counter", "max")?,
        ])
    })()
    .unwrap_or([0; 3]);
    Some([
        member_offset(&btf, "sock_common", "skc_prot")?,
        member_offset(&btf, "proto", "memory_allocated")?,
        member_offset(&btf, "proto", "memory_pressure")?,
        member_offset(&btf, "proto", "sysctl_mem")?,
        memcg[0],
        memcg[1],
        memcg[2],
    ])
}

/// The walk sockops does for the calling process's cgroup where sock_ops
/// may not call bpf_get_current_ancestor_cgroup_id (before Linux 6.4):
/// offsets of `task_struct.cgroups`, `css_set.dfl_cgrp`, `cgroup.level`,
/// `cgroup.ancestors` (6.0's array of pointers), `cgroup.kn` and
/// `kernfs_node.id`. None without BTF or if one is missing.
pub fn task_cgroup_offsets() -> Option<[u32; 6]> {
    let btf = std::fs::read(VMLINUX).ok()?;
    Some([
        member_offset(&btf, "task_struct", "cgroups")?,
        member_offset(&btf, "css_set", "dfl_cgrp")?,
        member_offset(&btf, "cgroup", "level")?,
        member_offset(&btf, "cgroup", "ancestors")?,
        member_offset(&btf, "cgroup", "kn")?,
        member_offset(&btf, "kernfs_node", "id")?,
    ])
    // Offset 0 means "unknown" to the eBPF side; none of these is first.
    .filter(|o| o.iter().all(|&v| v != 0))
}

/// Offsets of `nd_net` in `struct net_device` and of `net_cookie` in
/// `struct net`, if `dev` is where the tc programs expect it in `struct
/// sk_buff` (the third word); None otherwise (or without BTF).
pub fn netns_offsets() -> Option<(u32, u32)> {
    let btf = std::fs::read(VMLINUX).ok()?;
    if member_offset(&btf, "sk_buff", "dev")? != 16 {
        return None;
    }
    // possible_net_t holds one pointer, `net`, at its start.
    let nd_net = member_offset(&btf, "net_device", "nd_net")?;
    let cookie = member_offset(&btf, "net", "net_cookie")?;
    Some((nd_net, cookie))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_tcp_sequence_numbers_in_the_running_kernel() {
        let (write, copied) = tcp_seq_offsets();
        // Inside struct tcp_sock, after its inet_connection_sock (over 1 KiB).
        assert!(write > 1024 && copied > 1024, "{write} {copied}");
        assert_ne!(write, copied);
        eprintln!("tcp_sock.write_seq at {write}, copied_seq at {copied}");
    }

    #[test]
    fn finds_the_socket_memory_counters_in_the_running_kernel() {
        let o = socket_memory_offsets().expect("this machine's BTF has them");
        // skc_prot follows the addresses, ports, family, state, flags,
        // bound_dev_if and the two hash nodes; sk_memcg is far into sock.
        assert!(o[0] >= 40, "{o:?}");
        assert!(o[4] > 200, "this machine has cgroup v1 memory: {o:?}");
        assert!(o.iter().all(|&x| x % 8 == 0), "pointers and longs: {o:?}");
    }

    #[test]
    fn finds_msghdr_flags_in_the_running_kernel() {
        // After msg_name, msg_namelen and the iov_iter (over 40 bytes
        // on every kernel since 5.x), inside the 96-128-byte struct; an
        // int, so 4-aligned. A bitfield before it in the struct (its BTF
        // has kind_flag set) must not shift the answer.
        let off = msghdr_flags_offset();
        assert!((40..128).contains(&off) && off.is_multiple_of(4), "{off}");
        eprintln!("msghdr.msg_flags at {off}");
    }

    #[test]
    fn finds_the_task_cgroup_walk_in_the_running_kernel() {
        let o = task_cgroup_offsets().expect("this machine's BTF has them");
        // kernfs_node.id and cgroup.level are small structs' early words;
        // task_struct.cgroups is deep in a large struct.
        assert!(o[0] > 1000, "{o:?}");
        assert!(o.iter().all(|&v| v % 4 == 0), "{o:?}");
    }

    #[test]
    fn finds_sk_rcvbuf_in_the_running_kernel() {
        let btf = std::fs::read(VMLINUX).expect("this machine has BTF");
        let off = member_offset(&btf, "sock", "sk_rcvbuf").expect("sock.sk_rcvbuf");
        // After struct sock_common (more than 100 bytes), well inside struct sock.
        assert!((100..1024).contains(&off), "{off}");
        eprintln!("sock.sk_rcvbuf at {off}");
        // A member of an anonymous union inside struct sock_common.
        let port = member_offset(&btf, "sock_common", "skc_dport").expect("skc_dport");
        assert!(port < 64, "{port}");
        assert_eq!(member_offset(&btf, "sock", "no_such_member"), None);
        assert_eq!(member_offset(&btf, "no_such_struct", "sk_rcvbuf"), None);
        assert_eq!(member_offset(b"not btf", "sock", "sk_rcvbuf"), None);
    }
}
