//! `tproxy check`: everything a run needs, one line per requirement, each
//! with why it passes or fails and, for a failure, what to do. Attaches
//! nothing. The checks are the ones `Instance::start` makes (system, probe,
//! routing, tc), asked for all their answers instead of the first error;
//! only the proxy's listener is checked here alone (a run may start before
//! the proxy).
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use aya::programs::ProgramType;
use serde::Serialize;

use crate::{
    Options, Steer,
    config::options::TcMode,
    observe::{Error, Result},
    sys::{
        probe::{self, Feature, Need, ReadHooks},
        routing, system,
    },
};

/// One requirement: whether it is met, why, and (when not) what to do.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Item {
    pub name: String,
    pub ok: bool,
    pub detail: String,
    pub fix: Option<String>,
}

impl Item {
    fn pass(name: impl Into<String>, detail: impl Into<String>) -> Item {
        Item {
            name: name.into(),
            ok: true,
            detail: detail.into(),
            fix: None,
        }
    }

    fn fail(name: impl Into<String>, detail: impl Into<String>, fix: impl Into<String>) -> Item {
        Item {
            name: name.into(),
            ok: false,
            detail: detail.into(),
            fix: Some(fix.into()),
        }
    }

    /// A failure from a library error (of any layer), whose message is
    /// "problem; fix".
    fn from_error(
        name: impl Into<String>,
        e: &(dyn std::error::Error + 'static),
        fallback_fix: &str,
    ) -> Item {
        let top = e.to_string();
        let (problem, fix) = split_fix(&top, fallback_fix);
        // The causes (down to the errno) belong to the problem, not the fix.
        let chain = crate::sys::error::Chain(e).to_string();
        let causes = chain.get(top.len()..).unwrap_or_default();
        Item::fail(name, format!("{problem}{causes}"), fix)
    }

    /// The text form: one line.
    pub fn line(&self) -> String {
        match &self.fix {
            None => format!("ok   {}: {}", self.name, self.detail),
            Some(fix) => format!("FAIL {}: {}; fix: {}", self.name, self.detail, fix),
        }
    }
}

/// Error messages name the problem, then after "; " the fix.
fn split_fix(msg: &str, fallback_fix: &str) -> (String, String) {
    match msg.split_once("; ") {
        Some((problem, fix)) => (problem.to_string(), fix.to_string()),
        None => (msg.to_string(), fallback_fix.to_string()),
    }
}

const ROOT_FIX: &str = "run tproxy as root (sudo)";
const DEBUG_FIX: &str = "run with -v for the details";
const READ_HOOK: &str = "read hook";

/// Every check, in the order a run makes them.
/// Every requirement of a run with `opts`; `iface_given`: the interface
/// was named (else it is not checked), `metrics_addr`: must be free.
pub fn checks(opts: &Options, iface_given: bool, metrics_addr: Option<SocketAddr>) -> Vec<Item> {
    let opts = opts.clone();
    let mut items = Vec::new();
    if let Err(e) = opts.validate() {
        items.push(Item::from_error("options", &e, "change the options"));
    }
    let caps = system::missing_privileges(opts.accel);
    items.push(match &caps {
        None => Item::pass(
            "capabilities",
            format!("has {}", system::needed_privileges(opts.accel)),
        ),
        Some(e) => Item::from_error("capabilities", e, ROOT_FIX),
    });
    items.push(match system::check_kernel_version() {
        Ok(v) => Item::pass(
            "kernel",
            format!(
                "Linux {v} (>= {}.{})",
                system::MIN_KERNEL.0,
                system::MIN_KERNEL.1
            ),
        ),
        Err(e) => Item::from_error("kernel", &e, "upgrade the kernel"),
    });
    items.push(match system::check_btf() {
        Ok(()) => Item::pass("btf", crate::sys::btf::VMLINUX),
        Err(e) => Item::from_error("btf", &e, "use a kernel with BTF"),
    });
    if caps.is_some() {
        // Probes load programs: without the capabilities every one would
        // fail for that reason alone.
        items.push(Item::fail(
            "kernel features",
            "not probed: probing loads small programs, which needs the capabilities above",
            ROOT_FIX,
        ));
    } else {
        items.extend(feature_items(
            &probe::probe_all(opts.accel),
            ReadHooks::probed(),
        ));
    }
    items.push(match system::open_cgroup(opts.cgroup.as_deref()) {
        Ok(c) => {
            let mut detail = format!("{} is a cgroup v2 directory", c.path.display());
            if let Some(how) = c.private_mount {
                detail = format!("{detail}; {how}");
            }
            Item::pass("cgroup", detail)
        }
        Err(e) => Item::from_error("cgroup", &e, "pass --cgroup with a cgroup v2 directory"),
    });
    items.push(match crate::sys::tc::check(opts.tc_mode) {
        Ok(TcMode::Tcx) => Item::pass("tc attach", "TCX links (the kernel answers TCX queries)"),
        Ok(_) if opts.tc_mode == TcMode::Netlink => Item::pass(
            "tc attach",
            "netlink filters on a clsact qdisc (--tc-mode netlink)",
        ),
        Ok(_) => Item::pass(
            "tc attach",
            "netlink filters on a clsact qdisc (the kernel lacks TCX, Linux >= 6.6)",
        ),
        Err(e) => Item::from_error("tc attach", &e, "use --tc-mode auto"),
    });
    let mut ifindex = 0;
    if let Some(iface) = iface_given.then_some(&opts.iface) {
        items.push(
            match system::ifindex(iface).and_then(|i| Ok((i, system::link_header_len(iface)?))) {
                Ok((i, l2)) => {
                    ifindex = i;
                    let kind = if l2 == 0 {
                        "an L3 device, no link header".to_string()
                    } else {
                        format!("{l2}-byte link header")
                    };
                    Item::pass("interface", format!("{iface}: ifindex {i}, {kind}"))
                }
                Err(e) => Item::from_error("interface", &e, "choose another interface"),
            },
        );
    }
    if opts.steer == Steer::Tproxy {
        items.extend(tproxy_items(&opts, ifindex, iface_given));
    }
    if opts.accel {
        let send_hook = ReadHooks::probed().chosen() == Some(probe::ReadHook::Fexit);
        items.push(fast_path_item(&opts, send_hook));
    }
    items.push(listener_item(opts.proxy_port));
    if let Some(addr) = metrics_addr {
        items.push(metrics_item(addr));
    }
    items
}

/// Which connections acceleration takes, and the socket features that keep
/// a socket off the fast path (docs/how-it-works.md, "What acceleration
/// changes").
fn fast_path_item(opts: &Options, send_hook: bool) -> Item {
    let ports = match &opts.accel_ports {
        Some(p) => format!("ports {p} (--accel-ports)"),
        None => format!("every intercepted port ({})", opts.ports),
    };
    Item::pass(
        "fast path",
        format!(
            "{ports}; kept off it: sockets with SO_ZEROCOPY, SO_RCVLOWAT > 1, TCP_INQ, \
             receive timestamps or a ULP (kTLS), streams after a TLS handshake record, \
             readers until their first plain recvmsg and after a MSG_WAITALL, MSG_TRUNC or \
             MSG_OOB read, {}sockets after their own half-close; not detectable here: \
             FIONREAD, splice(2) after recvmsg{} (keep such an app's ports out of \
             --accel-ports)",
            if send_hook {
                "senders after a MSG_OOB send (fentry on tcp_bpf_sendmsg), "
            } else {
                ""
            },
            if send_hook { "" } else { ", MSG_OOB sends" }
        ),
    )
}

/// The metrics address binds (and is let go at once), as the run binds it.
fn metrics_item(addr: std::net::SocketAddr) -> Item {
    const NAME: &str = "metrics address";
    match std::net::TcpListener::bind(addr) {
        Ok(_) => Item::pass(NAME, format!("{addr} is free")),
        Err(source) => Item::from_error(
            NAME,
            &Error::MetricsBind { addr, source },
            "pass a free local address and port to --metrics-addr",
        ),
    }
}

/// One item per program type, map type and the read hook (which one this
/// kernel takes, from `hooks`); the helpers one item per program type (the
/// line names them all).
fn feature_items(probed: &[(Need, Result<bool, String>)], hooks: &ReadHooks) -> Vec<Item> {
    let mut items = Vec::new();
    let mut helper_types: Vec<ProgramType> = Vec::new();
    for (need, r) in probed {
        match need.feature {
            Feature::Helper(t, _) => {
                if !helper_types.contains(&t) {
                    helper_types.push(t);
                }
            }
            Feature::SockopsCaller => items.push(match r {
                Ok(true) => Item::pass(
                    "sock_ops caller's cgroup",
                    if probe::sockops_has_cgroup_helper() {
                        "bpf_get_current_ancestor_cgroup_id (probed)"
                    } else {
                        "read through the task's cgroups with offsets from BTF (probed; the helper is Linux >= 6.4)"
                    },
                ),
                _ => feature_item("sock_ops caller's cgroup".into(), need, r),
            }),
            Feature::ReadHook => items.push(match hooks.detail() {
                Some(detail) => Item::pass(READ_HOOK, detail),
                None => Item::from_error(READ_HOOK, &probe::error_for(need), DEBUG_FIX),
            }),
            _ => items.push(feature_item(need.name.clone(), need, r)),
        }
    }
    for t in helper_types {
        let of_type: Vec<&(Need, Result<bool, String>)> = probed
            .iter()
            .filter(|(n, _)| matches!(n.feature, Feature::Helper(ht, _) if ht == t))
            .collect();
        let names = |pick: &dyn Fn(&Result<bool, String>) -> bool| -> Vec<String> {
            of_type
                .iter()
                .filter(|(_, r)| pick(r))
                .filter_map(|(n, _)| match n.feature {
                    Feature::Helper(_, h) => Some(probe::helper_name(h)),
                    _ => None,
                })
                .collect()
        };
        let name = format!("{} helpers", probe::type_name(t));
        let missing = names(&|r| *r == Ok(false));
        let item = if missing.is_empty() {
            let mut detail = format!("probed: {}", names(&|r| *r == Ok(true)).join(", "));
            let unknown = names(&|r| r.is_err());
            if !unknown.is_empty() {
                detail += &format!("; not probed (a run assumes them): {}", unknown.join(", "));
            }
            Item::pass(name, detail)
        } else {
            let first = of_type
                .iter()
                .find(|(_, r)| *r == Ok(false))
                .map(|(n, _)| n)
                .expect("one is missing");
            let (_, fix) = split_fix(&probe::error_for(first).to_string(), DEBUG_FIX);
            Item::fail(
                name,
                format!("the kernel lacks {}", missing.join(", ")),
                fix,
            )
        };
        items.push(item);
    }
    items
}

fn feature_item(name: String, need: &Need, r: &Result<bool, String>) -> Item {
    match r {
        Ok(true) => Item::pass(name, "present (probed)"),
        Ok(false) => Item::from_error(name, &probe::error_for(need), DEBUG_FIX),
        Err(why) => Item::pass(
            name,
            format!("could not probe ({why}); a run assumes it present"),
        ),
    }
}

/// The tproxy back-end: a free mark and table, `nft`, and nftables taking
/// the `tproxy` rule.
fn tproxy_items(opts: &Options, ifindex: u32, has_iface: bool) -> Vec<Item> {
    let mut items = Vec::new();
    let spec = match routing::plan(opts, ifindex) {
        Ok(spec) => {
            let mut detail = format!(
                "steer mark {:#x} and routing table {} are free",
                spec.mark, spec.table
            );
            if !has_iface && opts.steer_mark.is_none() {
                detail += " (the default mark follows the interface: pass -i)";
            }
            items.push(Item::pass("routing", detail));
            spec
        }
        Err(e) => {
            items.push(Item::from_error(
                "routing",
                &e,
                "pass a free --steer-mark and --route-table",
            ));
            routing::TproxySpec::new(&opts.iface, 0x7400, 0x7400, opts.proxy_port)
        }
    };
    match routing::nft_on_path() {
        None => items.push(Item::from_error("nft", &crate::sys::Error::NoNft, ROOT_FIX)),
        Some(nft) => {
            items.push(Item::pass("nft", nft.display().to_string()));
            items.push(match routing::check_nft(&spec) {
                Ok(_) => Item::pass(
                    "nftables tproxy",
                    "the kernel takes the back-end's table with its `tproxy` rule (nft --check)",
                ),
                Err(e) => Item::from_error("nftables tproxy", &e, "use --steer rewrite"),
            });
        }
    }
    items
}

/// LISTEN sockets on `port` in a /proc/net/tcp or tcp6 listing: their
/// local addresses.
fn listening_on(table: &str, port: u16) -> Vec<IpAddr> {
    const LISTEN: &str = "0A";
    table
        .lines()
        .skip(1)
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            let (addr, p) = f.get(1)?.split_once(':')?;
            (*f.get(3)? == LISTEN && u16::from_str_radix(p, 16).ok()? == port)
                .then(|| parse_proc_addr(addr))
                .flatten()
        })
        .collect()
}

/// The kernel prints each 32-bit word of the address as a host-order
/// number in hex.
fn parse_proc_addr(hex: &str) -> Option<IpAddr> {
    let words: Vec<[u8; 4]> = (0..hex.len() / 8)
        .map(|i| u32::from_str_radix(hex.get(i * 8..i * 8 + 8)?, 16).ok())
        .map(|w| w.map(u32::to_ne_bytes))
        .collect::<Option<_>>()?;
    match words.as_slice() {
        [a] => Some(IpAddr::V4(Ipv4Addr::from(*a))),
        [a, b, c, d] => {
            let mut o = [0u8; 16];
            for (i, w) in [a, b, c, d].into_iter().enumerate() {
                o[i * 4..i * 4 + 4].copy_from_slice(w);
            }
            Some(IpAddr::V6(Ipv6Addr::from(o)))
        }
        _ => None,
    }
}

/// Whether steered flows can reach one of these listeners: they keep the
/// address the client dialled, so a loopback-only listener misses them.
fn listener_verdict(port: u16, addrs: &[IpAddr]) -> Item {
    const NAME: &str = "proxy listener";
    let shown: Vec<String> = addrs
        .iter()
        .map(|a| std::net::SocketAddr::new(*a, port).to_string())
        .collect();
    if addrs.is_empty() {
        return Item::fail(
            NAME,
            format!("nothing listens on port {port} in this network namespace"),
            format!(
                "start the proxy first (its inbound listener on port {port}), or pass --proxy-port with the port it listens on"
            ),
        );
    }
    if addrs.iter().all(IpAddr::is_loopback) {
        return Item::fail(
            NAME,
            format!(
                "only {} listens: steered flows keep the address the client dialled, which is not loopback",
                shown.join(", ")
            ),
            format!("make the proxy listen on 0.0.0.0:{port} or [::]:{port}"),
        );
    }
    Item::pass(NAME, format!("listening: {}", shown.join(", ")))
}

fn listener_item(port: u16) -> Item {
    let mut addrs = Vec::new();
    for f in ["/proc/net/tcp", "/proc/net/tcp6"] {
        if let Ok(s) = std::fs::read_to_string(f) {
            addrs.extend(listening_on(&s, port));
        }
    }
    listener_verdict(port, &addrs)
}

/// `tproxy check`: prints the lines (or the JSON); an error when any fails.
pub fn run(
    opts: &Options,
    iface_given: bool,
    metrics_addr: Option<SocketAddr>,
    json: bool,
) -> Result<()> {
    let items = checks(opts, iface_given, metrics_addr);
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(&items).expect("items serialize")
        );
    } else {
        for i in &items {
            println!("{}", i.line());
        }
    }
    let failed = items.iter().filter(|i| !i.ok).count();
    if failed > 0 {
        return Err(Error::ChecksFailed {
            failed,
            total: items.len(),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_listeners_from_proc_net_tcp() {
        let v4 = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n\
                  0: 0100007F:3A9E 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 1 1 0 100 0 0 10 0\n\
                  1: 00000000:1F40 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 2 1 0 100 0 0 10 0\n\
                  2: 0AB2A8C0:3A9E 14000A0A:C350 01 00000000:00000000 00:00000000 00000000     0        0 3 1 0 100 0 0 10 0\n";
        assert_eq!(listening_on(v4, 15006), vec![IpAddr::from([127, 0, 0, 1])]);
        assert_eq!(listening_on(v4, 8000), vec![IpAddr::from([0, 0, 0, 0])]);
        // Established (01), not listening.
        assert!(listening_on(v4, 9999).is_empty());
        let v6 = "  sl  local_address                         remote_address                        st\n\
                  0: 00000000000000000000000000000000:3A9E 00000000000000000000000000000000:0000 0A 0\n\
                  1: 00000000000000000000000001000000:3A9F 00000000000000000000000000000000:0000 0A 0\n";
        assert_eq!(
            listening_on(v6, 15006),
            vec![IpAddr::V6(Ipv6Addr::UNSPECIFIED)]
        );
        assert_eq!(
            listening_on(v6, 15007),
            vec![IpAddr::V6(Ipv6Addr::LOCALHOST)]
        );
    }

    #[test]
    fn a_listener_must_be_reachable_by_steered_flows() {
        let v = listener_verdict(15006, &[]);
        assert!(!v.ok && v.fix.as_deref().unwrap().starts_with("start the proxy"));
        let lo = listener_verdict(15006, &[IpAddr::from([127, 0, 0, 1])]);
        assert!(!lo.ok, "{lo:?}");
        assert!(lo.fix.as_deref().unwrap().contains("0.0.0.0:15006"));
        let any = listener_verdict(
            15006,
            &[
                IpAddr::from([127, 0, 0, 1]),
                IpAddr::V6(Ipv6Addr::UNSPECIFIED),
            ],
        );
        assert!(any.ok && any.detail.contains("[::]:15006"), "{any:?}");
        assert!(listener_verdict(1, &[IpAddr::from([192, 168, 1, 1])]).ok);
    }

    #[test]
    fn failures_split_into_problem_and_fix() {
        let e = crate::sys::Error::NoSuchInterface("x0".into());
        let i = Item::from_error("interface", &e, "unused");
        assert!(!i.ok);
        assert!(i.detail.contains("\"x0\"") && !i.detail.contains("ip link"));
        assert!(i.fix.as_deref().unwrap().contains("ip link"));
        assert!(i.line().starts_with("FAIL interface: "), "{}", i.line());
        assert!(!i.line().contains('\n'));
        let io = Error::io("reading x", std::io::Error::other("boom"));
        let i = Item::from_error("x", &io, "the fallback");
        assert_eq!(i.fix.as_deref(), Some("the fallback"));
        assert_eq!(Item::pass("a", "b").line(), "ok   a: b");
        let json = serde_json::to_value(Item::pass("a", "b")).unwrap();
        assert_eq!(
            json,
            serde_json::json!({"name": "a", "ok": true, "detail": "b", "fix": null})
        );
    }

    /// Every missing need becomes a failing line with a fix; helpers are
    /// grouped by program type.
    #[test]
    fn missing_features_fail_with_a_fix() {
        let no_hook = ReadHooks {
            fexit: Ok(false),
            tracepoint: Ok(false),
        };
        let probed: Vec<(Need, Result<bool, String>)> = probe::needs(true, None)
            .into_iter()
            .map(|n| {
                let r = match n.feature {
                    Feature::ReadHook => Ok(false),
                    Feature::Helper(ProgramType::SkMsg, _) => Ok(false),
                    Feature::Map(_) => Err("EPERM".into()),
                    _ => Ok(true),
                };
                (n, r)
            })
            .collect();
        let items = feature_items(&probed, &no_hook);
        let get = |name: &str| items.iter().find(|i| i.name == name).unwrap();
        let hook = get("read hook");
        assert!(
            !hook.ok && hook.fix.as_deref().unwrap().contains("--no-accel"),
            "{hook:?}"
        );
        assert!(
            hook.detail.contains("tcp_bpf_recvmsg") && hook.detail.contains("sock_recv_length"),
            "{hook:?}"
        );
        let sk = get("sk_msg helpers");
        assert!(
            !sk.ok && sk.detail.contains("bpf_msg_redirect_hash"),
            "{sk:?}"
        );
        assert!(sk.fix.as_deref().unwrap().contains("--no-accel"), "{sk:?}");
        assert!(get("sched_cls helpers").ok);
        // Could not tell: a run goes ahead, so the check does too, and says so.
        let m = get("SOCKHASH maps");
        assert!(m.ok && m.detail.contains("EPERM"), "{m:?}");
        assert_eq!(items.iter().filter(|i| !i.ok).count(), 2, "{items:#?}");
    }

    /// The read hook line names the hook this kernel takes.
    #[test]
    fn the_read_hook_line_names_the_chosen_hook() {
        let probed: Vec<(Need, Result<bool, String>)> = probe::needs(true, None)
            .into_iter()
            .filter(|n| n.feature == Feature::ReadHook)
            .map(|n| (n, Ok(true)))
            .collect();
        for (fexit, want) in [
            (Ok(true), "fexit on tcp_bpf_recvmsg (probed)"),
            (Ok(false), "sock_recv_length tracepoint (probed)"),
        ] {
            let hooks = ReadHooks {
                fexit,
                tracepoint: Ok(true),
            };
            let items = feature_items(&probed, &hooks);
            assert_eq!(items.len(), 1);
            assert!(
                items[0].ok && items[0].detail.starts_with(want),
                "{items:?}"
            );
            assert!(items[0].line().starts_with("ok   read hook: "));
        }
    }
}
