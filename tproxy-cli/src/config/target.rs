//! One target, as it is asked for: the interface, the ports, the proxy and
//! the back-end. The same definition makes the run's flags and `tproxy
//! check`'s (clap), and the keys of a `--config` file, of an agent target
//! file and of the agent API's targets (serde); [`Target::resolve`] turns
//! any of them, with the defaults, into the [`Options`] an instance or the
//! agent attaches with.
//!
//! Every key is optional here: a flag not given is `None` (so a `--config`
//! key fills it in, [`Target::or`]), and so is a key left out. What each
//! user requires, and the keys only some of them have, are theirs: a run
//! needs `iface` and `ports`, an agent target `cgroup` as well and has
//! `netns`, `name` and quotas besides (`api::TargetSpec`), a `--config`
//! file has the run's own keys (`file::RunKeys`).
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use super::{
    Error, Options, PortSet, Steer, Via, keys,
    options::{DEFAULT_PROXY_MARK, DEFAULT_PROXY_PORT, TcMode, parse_mark},
};

/// What one instance steers, and how. The doc comments are the flags'
/// help; a `--config` key is its flag's long name with `_` for `-`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, clap::Args)]
#[serde(default, deny_unknown_fields)]
pub struct Target {
    /// Interface whose inbound TCP is intercepted.
    #[arg(short = 'i', long = "iface", value_name = "IFACE")]
    #[serde(
        skip_serializing_if = "Option::is_none",
        deserialize_with = "keys::iface"
    )]
    pub iface: Option<String>,

    /// Intercepted destination ports: 8000 | 8000,8080 | 9000-9010 (also -ports).
    #[arg(short = 'p', long = "ports", value_name = "PORTS", value_parser = ports_flag)]
    #[serde(
        skip_serializing_if = "Option::is_none",
        serialize_with = "keys::ports_str",
        deserialize_with = "keys::ports"
    )]
    pub ports: Option<PortSet>,

    /// cgroup v2 directory holding the proxy and the app (default: the cgroup v2 root).
    #[arg(long, value_name = "PATH")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cgroup: Option<PathBuf>,

    /// The proxy's own cgroup v2 directory, inside --cgroup: only its
    /// processes get original destinations and acceleration (default:
    /// --cgroup itself).
    #[arg(long, value_name = "PATH")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub proxy_cgroup: Option<PathBuf>,

    /// Port of the proxy's inbound listener [default: 15006].
    #[arg(long, value_name = "PORT", value_parser = clap::value_parser!(u16).range(1..))]
    #[serde(
        skip_serializing_if = "Option::is_none",
        deserialize_with = "keys::port"
    )]
    pub proxy_port: Option<u16>,

    /// SO_MARK on the proxy's upstream sockets: such traffic is never steered (decimal or 0x hex) [default: 0x539].
    #[arg(long, value_name = "MARK", value_parser = parse_mark)]
    #[serde(
        skip_serializing_if = "Option::is_none",
        deserialize_with = "keys::mark"
    )]
    pub proxy_mark: Option<u32>,

    /// Leave socket acceleration (sockops + sk_msg) out entirely.
    #[arg(long, overrides_with = "accel")]
    #[serde(skip)]
    pub no_accel: bool,

    /// Socket acceleration on (the default; overrides `accel: false` in --config).
    #[arg(
        long,
        overrides_with = "no_accel",
        num_args = 0,
        default_missing_value = "true"
    )]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub accel: Option<bool>,

    /// Of the intercepted ports, the ones whose proxy<->app connections are
    /// accelerated (e.g. to keep an app that sizes its reads with FIONREAD,
    /// or mixes read(2) and splice(2), on plain TCP) [default: all of them].
    #[arg(long, value_name = "PORTS", value_parser = ports_flag)]
    #[serde(
        skip_serializing_if = "Option::is_none",
        serialize_with = "keys::ports_str",
        deserialize_with = "keys::ports"
    )]
    pub accel_ports: Option<PortSet>,

    /// Upper bound on the unread bytes a socket may hold before its sender
    /// leaves the fast path; the bound itself follows the reader (the larger
    /// of its receive buffer and what it read in the last 8 ms). Past it
    /// (slow reader) plain TCP applies backpressure until the reader has
    /// read every byte, then the sender redirects again [default: 16777216].
    #[arg(long, value_name = "BYTES")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub accel_max_queued: Option<u32>,

    /// A sender that stays on TCP this long (milliseconds) without its
    /// reader ever catching up (a continuous stream after a fallback) leaves
    /// the fast path for good, and the pair becomes plain TCP sockets: TCP
    /// through the sockmap costs more than plain TCP. 0: never [default: 100].
    #[arg(long, value_name = "MS")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub accel_retire_ms: Option<u32>,

    /// A sender whose writes, redirected, average fewer bytes than this
    /// and are read about one per read, over 4 windows of 64 in a row,
    /// while its peer sends nothing (a one-way stream of small writes
    /// whose reader is woken for each) leaves the fast path for good: TCP
    /// merges such writes into larger segments and moved them faster in
    /// the bench. 0: never [default: 49152].
    #[arg(long, value_name = "BYTES")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub accel_min_message: Option<u32>,

    /// How the tc programs attach: TCX links (kernel >= 6.6) or netlink filters [default: auto].
    #[arg(long, value_enum)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tc_mode: Option<TcMode>,

    /// Steering back-end: rewrite the port in tc, or mark for policy routing + nftables tproxy [default: rewrite].
    #[arg(long, value_enum)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub steer: Option<Steer>,

    /// tproxy back-end: mark set by tc and matched by the fwmark rule
    /// [default: 0x7400 + ifindex, or the next mark no ip rule uses].
    #[arg(long, value_name = "MARK", value_parser = parse_mark)]
    #[serde(
        skip_serializing_if = "Option::is_none",
        deserialize_with = "keys::mark"
    )]
    pub steer_mark: Option<u32>,

    /// tproxy back-end: routing table of the local default route, unused and
    /// not reserved [default: the steer mark, or the next unused table].
    #[arg(long, value_name = "ID", value_parser = parse_mark)]
    #[serde(
        skip_serializing_if = "Option::is_none",
        deserialize_with = "keys::route_table"
    )]
    pub route_table: Option<u32>,
}

/// Who asks for a target: what it requires, what it defaults, and how
/// errors name its settings.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    /// `tproxy`: `iface` and `ports` required; `file`: with `--config`.
    Run { file: bool },
    /// `tproxy check`: nothing required (no interface: it is not checked;
    /// no ports: any but the proxy port). Not validated: the check reports
    /// that as one of its requirements.
    Check,
    /// A node agent's target (the API, a target file): `iface`, `ports`
    /// and `cgroup` required; no `proxy_cgroup` (its key is refused where
    /// one is read); these quotas (its own, else the agent's).
    Agent { flows_quota: u32, socks_quota: u32 },
}

impl Role {
    fn via(self) -> Via {
        match self {
            Role::Run { file: true } => Via::FlagsOrFile,
            Role::Run { file: false } | Role::Check => Via::Flags,
            Role::Agent { .. } => Via::Keys,
        }
    }
}

impl Target {
    /// A target with only its interface set.
    pub fn on(iface: impl Into<String>) -> Target {
        Target {
            iface: Some(iface.into()),
            ..Target::default()
        }
    }

    /// The options `role` attaches with: what is left out takes its
    /// default, what `role` requires must be there, and the whole is
    /// checked (but for `Role::Check`).
    pub fn resolve(&self, role: Role) -> Result<Options, Error> {
        let via = role.via();
        fn given<T: Clone>(v: &Option<T>, key: &'static str, via: Via) -> Result<T, Error> {
            v.clone().ok_or(Error::Missing { key, via })
        }
        let proxy_port = self.proxy_port.unwrap_or(DEFAULT_PROXY_PORT);
        let (iface, ports) = match role {
            Role::Check => (
                self.iface.clone().unwrap_or_else(|| "check".into()),
                match &self.ports {
                    Some(ports) => ports.clone(),
                    None => (if proxy_port == 1 { "2" } else { "1" })
                        .parse()
                        .expect("a valid port"),
                },
            ),
            _ => (
                given(&self.iface, "iface", via)?,
                given(&self.ports, "ports", via)?,
            ),
        };
        let (cgroup, proxy_cgroup, flows_quota, socks_quota) = match role {
            Role::Agent {
                flows_quota,
                socks_quota,
            } => (
                Some(given(&self.cgroup, "cgroup", via)?),
                None,
                flows_quota,
                socks_quota,
            ),
            // A single run's tables are all its target's.
            _ => (self.cgroup.clone(), self.proxy_cgroup.clone(), 0, 0),
        };
        let opts = Options {
            iface,
            ports,
            cgroup,
            proxy_cgroup,
            proxy_port,
            proxy_mark: self.proxy_mark.unwrap_or(DEFAULT_PROXY_MARK),
            accel: !self.no_accel && self.accel.unwrap_or(true),
            accel_ports: self.accel_ports.clone(),
            tc_mode: self.tc_mode.unwrap_or(TcMode::Auto),
            steer: self.steer.unwrap_or(Steer::Rewrite),
            steer_mark: self.steer_mark,
            route_table: self.route_table,
            accel_max_queued: self
                .accel_max_queued
                .unwrap_or(tproxy_common::DEFAULT_ACCEL_MAX_QUEUED),
            accel_retire_ms: self
                .accel_retire_ms
                .unwrap_or(tproxy_common::DEFAULT_ACCEL_RETIRE_MS),
            accel_min_message: self
                .accel_min_message
                .unwrap_or(tproxy_common::DEFAULT_ACCEL_MIN_MESSAGE),
            flows_quota,
            socks_quota,
        };
        if role != Role::Check {
            opts.validate_as(via)?;
        }
        Ok(opts)
    }

    /// `self`'s settings, else `below`'s, key by key: a run's flags over
    /// its `--config` file (`--no-accel` and `--accel` over `accel:`).
    pub fn or(self, below: Target) -> Target {
        // Destructured whole: a key added and not merged here does not
        // compile.
        let Target {
            iface,
            ports,
            cgroup,
            proxy_cgroup,
            proxy_port,
            proxy_mark,
            no_accel,
            accel,
            accel_ports,
            accel_max_queued,
            accel_retire_ms,
            accel_min_message,
            tc_mode,
            steer,
            steer_mark,
            route_table,
        } = self;
        Target {
            iface: iface.or(below.iface),
            ports: ports.or(below.ports),
            cgroup: cgroup.or(below.cgroup),
            proxy_cgroup: proxy_cgroup.or(below.proxy_cgroup),
            proxy_port: proxy_port.or(below.proxy_port),
            proxy_mark: proxy_mark.or(below.proxy_mark),
            no_accel: no_accel || (accel.is_none() && below.no_accel),
            accel: accel.or(below.accel),
            accel_ports: accel_ports.or(below.accel_ports),
            accel_max_queued: accel_max_queued.or(below.accel_max_queued),
            accel_retire_ms: accel_retire_ms.or(below.accel_retire_ms),
            accel_min_message: accel_min_message.or(below.accel_min_message),
            tc_mode: tc_mode.or(below.tc_mode),
            steer: steer.or(below.steer),
            steer_mark: steer_mark.or(below.steer_mark),
            route_table: route_table.or(below.route_table),
        }
    }
}

/// `--ports`: the port list, its error with how to write one.
fn ports_flag(s: &str) -> Result<PortSet, String> {
    s.parse().map_err(|e: Error| {
        format!("{e}; use e.g. `-ports 8000` or `-ports 8000,8080,9000-9010` (ports 1-65535)")
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn target(yaml: &str) -> Target {
        serde_norway::from_str(yaml).unwrap()
    }

    #[test]
    fn defaults_fill_in_what_is_left_out() {
        let o = Target {
            ports: Some("80".parse().unwrap()),
            ..Target::on("eth0")
        }
        .resolve(Role::Run { file: false })
        .unwrap();
        assert_eq!(
            o,
            Options {
                iface: "eth0".into(),
                ports: "80".parse().unwrap(),
                cgroup: None,
                proxy_cgroup: None,
                proxy_port: DEFAULT_PROXY_PORT,
                proxy_mark: DEFAULT_PROXY_MARK,
                accel: true,
                accel_ports: None,
                tc_mode: TcMode::Auto,
                steer: Steer::Rewrite,
                steer_mark: None,
                route_table: None,
                accel_max_queued: tproxy_common::DEFAULT_ACCEL_MAX_QUEUED,
                accel_retire_ms: tproxy_common::DEFAULT_ACCEL_RETIRE_MS,
                accel_min_message: tproxy_common::DEFAULT_ACCEL_MIN_MESSAGE,
                flows_quota: 0,
                socks_quota: 0,
            }
        );
    }

    #[test]
    fn accelerated_ports_must_be_intercepted_ones() {
        let t = target("iface: eth0\nports: 8000,9000-9010\naccel_ports: 9005\n");
        let o = t.resolve(Role::Run { file: true }).unwrap();
        assert_eq!(o.accel_ports, Some("9005".parse().unwrap()));
        let t = target("iface: eth0\nports: 8000\naccel_ports: 8000,8080\n");
        let e = t.resolve(Role::Run { file: true }).unwrap_err().to_string();
        assert!(
            e.starts_with("port 8080 is to be accelerated but is not intercepted"),
            "{e}"
        );
    }

    #[test]
    fn each_role_requires_its_keys_and_names_them_its_way() {
        let t = target("iface: eth0\nports: 8000\n");
        assert!(t.resolve(Role::Run { file: true }).is_ok());
        let e = t
            .resolve(Role::Agent {
                flows_quota: 1,
                socks_quota: 2,
            })
            .unwrap_err();
        assert!(
            matches!(
                e,
                Error::Missing {
                    key: "cgroup",
                    via: Via::Keys
                }
            ),
            "{e}"
        );
        let t = Target {
            cgroup: Some("pods/a".into()),
            proxy_cgroup: Some("pods/a/proxy".into()),
            ..t
        };
        let o = t
            .resolve(Role::Agent {
                flows_quota: 1,
                socks_quota: 2,
            })
            .unwrap();
        assert_eq!((o.proxy_cgroup, o.flows_quota, o.socks_quota), (None, 1, 2));
        let e = Target::default()
            .resolve(Role::Run { file: true })
            .unwrap_err();
        assert!(matches!(e, Error::Missing { key: "iface", .. }), "{e}");
        // `tproxy check` needs nothing, and leaves the checking to itself.
        let o = Target {
            proxy_port: Some(1),
            ..Target::default()
        }
        .resolve(Role::Check)
        .unwrap();
        assert_eq!(
            (o.iface.as_str(), o.ports.to_string()),
            ("check", "2".into())
        );
        let clash = Target {
            ports: Some("15006".parse().unwrap()),
            ..Target::on("eth0")
        };
        assert!(clash.resolve(Role::Check).is_ok());
        for (role, says) in [
            (Role::Run { file: false }, "--proxy-port"),
            (Role::Run { file: true }, "proxy_port (--proxy-port)"),
            (
                Role::Agent {
                    flows_quota: 0,
                    socks_quota: 0,
                },
                "\"proxy_port\"",
            ),
        ] {
            let clash = Target {
                cgroup: Some("x".into()),
                ..clash.clone()
            };
            let e = clash.resolve(role).unwrap_err();
            assert!(
                matches!(e, Error::ProxyPortIntercepted { port: 15006, .. }),
                "{e}"
            );
            assert!(e.to_string().contains(&format!("another {says} ")), "{e}");
        }
    }

    #[test]
    fn flags_over_the_file_key_by_key() {
        let file = target("iface: eth1\nports: 80\nproxy_port: 1\naccel: false\n");
        let flags = Target {
            proxy_port: Some(2),
            ..Target::default()
        };
        let t = flags.or(file.clone());
        assert_eq!(t.iface.as_deref(), Some("eth1"));
        assert_eq!(t.proxy_port, Some(2));
        assert!(!t.resolve(Role::Check).unwrap().accel);
        let accel = Target {
            accel: Some(true),
            ..Target::default()
        };
        assert!(accel.or(file.clone()).resolve(Role::Check).unwrap().accel);
        let no_accel = Target {
            no_accel: true,
            ..Target::default()
        };
        let on = target("accel: true\n");
        assert!(!no_accel.or(on).resolve(Role::Check).unwrap().accel);
    }

    /// The agent API's wire format: unset keys left out, ports one string.
    #[test]
    fn serializes_set_keys_only_ports_as_a_string() {
        let t = Target {
            ports: Some("8000,9000-9010".parse().unwrap()),
            no_accel: true,
            ..Target::on("eth0")
        };
        assert_eq!(
            serde_json::to_string(&t).unwrap(),
            r#"{"iface":"eth0","ports":"8000,9000-9010"}"#
        );
        let back: Target =
            serde_json::from_str(r#"{"iface":"eth0","ports":"8000,9000-9010"}"#).unwrap();
        assert_eq!(
            back,
            Target {
                no_accel: false,
                ..t
            }
        );
        assert_eq!(serde_json::to_string(&Target::default()).unwrap(), "{}");
    }

    /// A null is a key left out, in JSON as in YAML.
    #[test]
    fn null_is_left_out() {
        let t: Target = serde_json::from_str(
            r#"{"iface":null,"ports":null,"proxy_port":null,"proxy_mark":null,"route_table":null,"cgroup":null}"#,
        )
        .unwrap();
        assert_eq!(t, Target::default());
        assert_eq!(target("proxy_port: ~\nports:\n"), Target::default());
    }

    #[test]
    fn the_keys_are_the_fields() {
        let keys = keys::target_keys();
        assert_eq!(keys.len(), 15, "{keys:?}");
        assert_eq!(keys[0], "iface");
        assert!(!keys.contains(&"no_accel"));
    }
}
