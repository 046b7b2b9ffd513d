//! `tproxy --config FILE`: the run's settings in YAML, keyed as the flags
//! are named (`proxy_port` for `--proxy-port`); a flag given on the command
//! line overrides the file. `examples/tproxy.yaml` is an annotated example.
//!
//! `TargetConfig` is what one instance steers (interface, ports, proxy…):
//! the part a node agent's per-target files will hold as well.
//! `FileConfig` is that plus the process's own settings (drain timeout,
//! metrics, log format).
//!
//! Values are checked as they are read, so an out-of-range one is an error
//! naming its key, line and column, like an unknown key or a wrong type.
use std::{
    fmt,
    net::SocketAddr,
    path::{Path, PathBuf},
};

use serde::{Deserialize, Deserializer, de};

use crate::{
    Error, PortSet, Result, Steer,
    config::options::{LogFormat, MAX_DRAIN_TIMEOUT, RESERVED_TABLES, TcMode, parse_mark},
};

/// What one instance steers, and how. Every key is optional: flags (or
/// defaults) fill in what a file leaves out.
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TargetConfig {
    #[serde(default, deserialize_with = "iface")]
    pub iface: Option<String>,
    #[serde(default, deserialize_with = "ports")]
    pub ports: Option<PortSet>,
    pub cgroup: Option<PathBuf>,
    pub proxy_cgroup: Option<PathBuf>,
    #[serde(default, deserialize_with = "port")]
    pub proxy_port: Option<u16>,
    #[serde(default, deserialize_with = "mark")]
    pub proxy_mark: Option<u32>,
    pub accel: Option<bool>,
    pub accel_max_queued: Option<u32>,
    pub accel_retire_ms: Option<u32>,
    pub tc_mode: Option<TcMode>,
    pub steer: Option<Steer>,
    #[serde(default, deserialize_with = "mark")]
    pub steer_mark: Option<u32>,
    #[serde(default, deserialize_with = "route_table")]
    pub route_table: Option<u32>,
}

/// A `--config` file: the target's keys and the run's, side by side at the
/// top level (serde cannot flatten a struct and refuse unknown keys, so the
/// target's keys are listed again here; `target()` maps them).
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    #[serde(default, deserialize_with = "iface")]
    pub iface: Option<String>,
    #[serde(default, deserialize_with = "ports")]
    pub ports: Option<PortSet>,
    pub cgroup: Option<PathBuf>,
    pub proxy_cgroup: Option<PathBuf>,
    #[serde(default, deserialize_with = "port")]
    pub proxy_port: Option<u16>,
    #[serde(default, deserialize_with = "mark")]
    pub proxy_mark: Option<u32>,
    pub accel: Option<bool>,
    pub accel_max_queued: Option<u32>,
    pub accel_retire_ms: Option<u32>,
    pub tc_mode: Option<TcMode>,
    pub steer: Option<Steer>,
    #[serde(default, deserialize_with = "mark")]
    pub steer_mark: Option<u32>,
    #[serde(default, deserialize_with = "route_table")]
    pub route_table: Option<u32>,

    #[serde(default, deserialize_with = "drain_timeout")]
    pub drain_timeout: Option<u64>,
    pub metrics_addr: Option<SocketAddr>,
    pub log_format: Option<LogFormat>,
}

impl FileConfig {
    /// Reads and checks `path`. Errors name the file, and (from
    /// serde_norway) the key, line and column.
    pub fn load(path: &Path) -> Result<FileConfig> {
        let text = std::fs::read_to_string(path).map_err(|source| Error::ConfigRead {
            path: path.into(),
            source,
        })?;
        FileConfig::parse(&text).map_err(|source| Error::Config {
            path: path.into(),
            source,
        })
    }

    pub fn parse(text: &str) -> std::result::Result<FileConfig, serde_norway::Error> {
        parse_yaml(text)
    }

    /// The per-target part.
    pub fn target(&self) -> TargetConfig {
        // Destructured whole: a key added to one struct and not mapped here
        // does not compile.
        let FileConfig {
            iface,
            ports,
            cgroup,
            proxy_cgroup,
            proxy_port,
            proxy_mark,
            accel,
            accel_max_queued,
            accel_retire_ms,
            tc_mode,
            steer,
            steer_mark,
            route_table,
            drain_timeout: _,
            metrics_addr: _,
            log_format: _,
        } = self.clone();
        TargetConfig {
            iface,
            ports,
            cgroup,
            proxy_cgroup,
            proxy_port,
            proxy_mark,
            accel,
            accel_max_queued,
            accel_retire_ms,
            tc_mode,
            steer,
            steer_mark,
            route_table,
        }
    }
}

impl TargetConfig {
    pub fn parse(text: &str) -> std::result::Result<TargetConfig, serde_norway::Error> {
        parse_yaml(text)
    }
}

/// An empty file (or one of comments only) sets nothing; it is not an error.
fn parse_yaml<T: Default + for<'de> Deserialize<'de>>(
    text: &str,
) -> std::result::Result<T, serde_norway::Error> {
    if serde_norway::from_str::<serde_norway::Value>(text)?.is_null() {
        return Ok(T::default());
    }
    serde_norway::from_str(text)
}

// Readers of the keys that need more than their type's own checks. The
// messages read after the key, which serde_norway puts first.

/// A scalar as YAML gave it, for the checks below.
enum Scalar<'a> {
    Int(i128),
    Str(&'a str),
}

/// Reads a scalar and checks it inside the visitor: an error raised there
/// gets the key, line and column from serde_norway; one raised after the
/// value is read would get neither.
struct Checked<F> {
    expecting: &'static str,
    check: F,
}

impl<T, F: FnOnce(Scalar) -> std::result::Result<T, String>> de::Visitor<'_> for Checked<F> {
    type Value = T;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.expecting)
    }

    fn visit_i64<E: de::Error>(self, n: i64) -> std::result::Result<T, E> {
        (self.check)(Scalar::Int(n.into())).map_err(E::custom)
    }

    fn visit_u64<E: de::Error>(self, n: u64) -> std::result::Result<T, E> {
        (self.check)(Scalar::Int(n.into())).map_err(E::custom)
    }

    fn visit_str<E: de::Error>(self, s: &str) -> std::result::Result<T, E> {
        (self.check)(Scalar::Str(s)).map_err(E::custom)
    }
}

fn checked<'de, D: Deserializer<'de>, T>(
    d: D,
    expecting: &'static str,
    check: impl FnOnce(Scalar) -> std::result::Result<T, String>,
) -> std::result::Result<Option<T>, D::Error> {
    d.deserialize_any(Checked { expecting, check }).map(Some)
}

fn iface<'de, D: Deserializer<'de>>(d: D) -> std::result::Result<Option<String>, D::Error> {
    const EXPECTING: &str = "an interface name";
    checked(d, EXPECTING, |v| match v {
        // IFNAMSIZ is 16 with the terminating NUL.
        Scalar::Str(name)
            if !name.is_empty() && name.len() <= 15 && !name.contains(['/', ' ', '\0']) =>
        {
            Ok(name.to_string())
        }
        Scalar::Str(name) => Err(format!(
            "{name:?} is not an interface name (1-15 characters, no '/' or space)"
        )),
        Scalar::Int(n) => Err(format!("invalid type: integer `{n}`, expected {EXPECTING}")),
    })
}

/// `8000`, `"8000,9000-9010"`, or a list of numbers and such strings.
fn ports<'de, D: Deserializer<'de>>(d: D) -> std::result::Result<Option<PortSet>, D::Error> {
    d.deserialize_any(PortsVisitor).map(Some)
}

struct PortsVisitor;

const PORTS_EXPECTED: &str = "a port list: 8000, \"8000,9000-9010\" or [8000, \"9000-9010\"]";

fn port_set<E: de::Error>(list: &str) -> std::result::Result<PortSet, E> {
    list.parse().map_err(|e| match e {
        Error::BadPorts(why) => E::custom(format!(
            "bad port list {why}; write {PORTS_EXPECTED} (ports 1-65535)"
        )),
        other => E::custom(other),
    })
}

impl<'de> de::Visitor<'de> for PortsVisitor {
    type Value = PortSet;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(PORTS_EXPECTED)
    }

    fn visit_str<E: de::Error>(self, s: &str) -> std::result::Result<PortSet, E> {
        port_set(s)
    }

    fn visit_u64<E: de::Error>(self, n: u64) -> std::result::Result<PortSet, E> {
        port_set(&n.to_string())
    }

    fn visit_i64<E: de::Error>(self, n: i64) -> std::result::Result<PortSet, E> {
        port_set(&n.to_string())
    }

    fn visit_seq<A: de::SeqAccess<'de>>(
        self,
        mut seq: A,
    ) -> std::result::Result<PortSet, A::Error> {
        let mut items = Vec::new();
        while let Some(PortItem(item)) = seq.next_element()? {
            items.push(item);
        }
        port_set(&items.join(","))
    }
}

/// One entry of a port list: a number or a string such as "9000-9010".
struct PortItem(String);

impl<'de> Deserialize<'de> for PortItem {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        struct V;
        impl de::Visitor<'_> for V {
            type Value = PortItem;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a port or a range (8000 or \"9000-9010\")")
            }
            fn visit_str<E: de::Error>(self, s: &str) -> std::result::Result<PortItem, E> {
                Ok(PortItem(s.into()))
            }
            fn visit_u64<E: de::Error>(self, n: u64) -> std::result::Result<PortItem, E> {
                Ok(PortItem(n.to_string()))
            }
            fn visit_i64<E: de::Error>(self, n: i64) -> std::result::Result<PortItem, E> {
                Ok(PortItem(n.to_string()))
            }
        }
        d.deserialize_any(V)
    }
}

fn port<'de, D: Deserializer<'de>>(d: D) -> std::result::Result<Option<u16>, D::Error> {
    const EXPECTING: &str = "a port (1-65535)";
    checked(d, EXPECTING, |v| match v {
        Scalar::Int(n) => match u16::try_from(n) {
            Ok(p) if p > 0 => Ok(p),
            _ => Err(format!("port {n} is out of range: ports are 1-65535")),
        },
        Scalar::Str(s) => Err(format!("invalid type: string {s:?}, expected {EXPECTING}")),
    })
}

/// A 32-bit value as a number (`0x539` too) or a string ("0x539", "1337").
fn u32_value(v: Scalar, what: &str) -> std::result::Result<u32, String> {
    match v {
        Scalar::Int(n) => {
            u32::try_from(n).map_err(|_| format!("{n} is not a 32-bit {what} (0 to 0xffffffff)"))
        }
        Scalar::Str(s) => parse_mark(s.trim()),
    }
}

fn mark<'de, D: Deserializer<'de>>(d: D) -> std::result::Result<Option<u32>, D::Error> {
    checked(
        d,
        "a 32-bit mark (decimal or \"0x…\" hex)",
        |v| match u32_value(v, "mark")? {
            0 => Err("a mark must be non-zero: marks are how tproxy tells traffic apart".into()),
            m => Ok(m),
        },
    )
}

fn route_table<'de, D: Deserializer<'de>>(d: D) -> std::result::Result<Option<u32>, D::Error> {
    checked(d, "a routing table id (decimal or \"0x…\" hex)", |v| {
        let table = u32_value(v, "routing table id")?;
        if RESERVED_TABLES.contains(&table) {
            return Err(format!(
                "table {table} is reserved (0 unspec, 253 default, 254 main, 255 local); choose an unused table (e.g. 100) or leave route_table out to have one picked"
            ));
        }
        Ok(table)
    })
}

fn drain_timeout<'de, D: Deserializer<'de>>(d: D) -> std::result::Result<Option<u64>, D::Error> {
    const EXPECTING: &str = "seconds (0 to 86400)";
    checked(d, EXPECTING, |v| match v {
        Scalar::Int(n) => match u64::try_from(n) {
            Ok(s) if s <= MAX_DRAIN_TIMEOUT => Ok(s),
            _ => Err(format!(
                "{n} s is out of range: 0 (stop at once) to {MAX_DRAIN_TIMEOUT} s (a day)"
            )),
        },
        Scalar::Str(s) => Err(format!("invalid type: string {s:?}, expected {EXPECTING}")),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> std::result::Result<FileConfig, String> {
        FileConfig::parse(text).map_err(|e| e.to_string())
    }

    fn err(text: &str) -> String {
        parse(text).expect_err(text)
    }

    #[test]
    fn a_file_with_every_key() {
        let c = parse(
            "iface: eth1\n\
             ports: [8000, \"9000-9002\", \"8080\"]\n\
             cgroup: /sys/fs/cgroup/unified/app\n\
             proxy_cgroup: /sys/fs/cgroup/unified/app/proxy\n\
             proxy_port: 15001\n\
             proxy_mark: 0x10\n\
             accel: false\n\
             accel_max_queued: 1048576\n\
             accel_retire_ms: 50\n\
             tc_mode: netlink\n\
             steer: tproxy\n\
             steer_mark: \"0x20\"\n\
             route_table: 100\n\
             drain_timeout: 5\n\
             metrics_addr: 127.0.0.1:9464\n\
             log_format: json\n",
        )
        .unwrap();
        assert_eq!(
            c,
            FileConfig {
                iface: Some("eth1".into()),
                ports: Some("8000,8080,9000-9002".parse().unwrap()),
                cgroup: Some("/sys/fs/cgroup/unified/app".into()),
                proxy_cgroup: Some("/sys/fs/cgroup/unified/app/proxy".into()),
                proxy_port: Some(15001),
                proxy_mark: Some(0x10),
                accel: Some(false),
                accel_max_queued: Some(1 << 20),
                accel_retire_ms: Some(50),
                tc_mode: Some(TcMode::Netlink),
                steer: Some(Steer::Tproxy),
                steer_mark: Some(0x20),
                route_table: Some(100),
                drain_timeout: Some(5),
                metrics_addr: Some("127.0.0.1:9464".parse().unwrap()),
                log_format: Some(LogFormat::Json),
            }
        );
    }

    #[test]
    fn ports_as_a_string_a_number_or_a_list() {
        for (yaml, want) in [
            ("ports: \"8000,9000-9010\"", "8000,9000-9010"),
            ("ports: 8000,9000-9010", "8000,9000-9010"),
            ("ports: 8000", "8000"),
            ("ports: [8000, \"9000-9010\"]", "8000,9000-9010"),
            ("ports:\n  - 80\n  - 443\n", "80,443"),
        ] {
            let c = parse(yaml).unwrap_or_else(|e| panic!("{yaml}: {e}"));
            assert_eq!(c.ports.unwrap().to_string(), want, "{yaml}");
        }
    }

    #[test]
    fn marks_as_numbers_or_hex_strings() {
        for yaml in [
            "proxy_mark: 1337",
            "proxy_mark: 0x539",
            "proxy_mark: \"0x539\"",
            "proxy_mark: \"1337\"",
        ] {
            assert_eq!(parse(yaml).unwrap().proxy_mark, Some(0x539), "{yaml}");
        }
    }

    #[test]
    fn an_empty_file_sets_nothing() {
        assert_eq!(parse("").unwrap(), FileConfig::default());
        assert_eq!(parse("# nothing yet\n").unwrap(), FileConfig::default());
    }

    #[test]
    fn unknown_key_with_line_and_column() {
        let e = err("iface: eth0\nports: 8000\nproxy_prot: 15001\n");
        assert!(e.contains("unknown field `proxy_prot`"), "{e}");
        assert!(e.contains("line 3 column 1"), "{e}");
        assert_eq!(e.lines().count(), 1, "{e}");
    }

    #[test]
    fn wrong_type_with_key_line_and_column() {
        let e = err("iface: eth0\nproxy_port: fifteen\n");
        assert!(e.starts_with("proxy_port: invalid type: string"), "{e}");
        assert!(e.contains("line 2 column 13"), "{e}");
        let e = err("iface: eth0\naccel: maybe\n");
        assert!(e.starts_with("accel: invalid type"), "{e}");
        assert!(e.contains("line 2 column 8"), "{e}");
        let e = err("ports: {a: 1}\n");
        assert!(e.starts_with("ports: invalid type: map"), "{e}");
        assert!(e.contains("line 1 column 8"), "{e}");
        let e = err("iface: [eth0]\n");
        assert!(e.starts_with("iface: invalid type: sequence"), "{e}");
    }

    #[test]
    fn out_of_range_values_name_their_key() {
        for (yaml, key, says) in [
            ("proxy_port: 0", "proxy_port", "port 0 is out of range"),
            ("proxy_port: 65536", "proxy_port", "ports are 1-65535"),
            ("proxy_port: -1", "proxy_port", "out of range"),
            ("ports: 0", "ports", "port 0 cannot be intercepted"),
            ("ports: \"80-70000\"", "ports", "70000 is above 65535"),
            ("ports: \"80,x\"", "ports", "\"x\" is not a port number"),
            ("ports: [80, 90-80]", "ports", "runs backwards"),
            ("ports: []", "ports", "empty"),
            ("ports: \"\"", "ports", "empty"),
            ("proxy_mark: 0", "proxy_mark", "non-zero"),
            ("steer_mark: \"0x0\"", "steer_mark", "non-zero"),
            ("proxy_mark: 0x100000000", "proxy_mark", "not a 32-bit mark"),
            ("proxy_mark: -5", "proxy_mark", "not a 32-bit mark"),
            ("steer_mark: zz", "steer_mark", "not a 32-bit mark"),
            ("route_table: 254", "route_table", "table 254 is reserved"),
            (
                "route_table: \"0xff\"",
                "route_table",
                "table 255 is reserved",
            ),
            ("route_table: 0", "route_table", "reserved"),
            ("drain_timeout: 86401", "drain_timeout", "out of range"),
            ("drain_timeout: -1", "drain_timeout", "out of range"),
            ("accel_max_queued: -1", "accel_max_queued", "expected u32"),
            ("iface: \"\"", "iface", "not an interface name"),
            ("iface: a-very-long-interface", "iface", "1-15 characters"),
            ("tc_mode: fast", "tc_mode", "unknown variant `fast`"),
            ("steer: nat", "steer", "expected `rewrite` or `tproxy`"),
            ("log_format: xml", "log_format", "unknown variant `xml`"),
            (
                "metrics_addr: localhost",
                "metrics_addr",
                "invalid socket address",
            ),
        ] {
            let e = err(yaml);
            assert!(e.starts_with(&format!("{key}: ")), "{yaml}: {e}");
            assert!(e.contains(says), "{yaml}: {e:?} does not say {says:?}");
            assert!(e.contains("line 1 column"), "{yaml}: {e}");
        }
    }

    /// A node agent's per-target file: the target's keys only.
    #[test]
    fn target_files_hold_the_per_target_keys() {
        let t =
            TargetConfig::parse("iface: eth0\nports: [8000]\nsteer: tproxy\nproxy_mark: 0x10\n")
                .unwrap();
        assert_eq!(t.iface.as_deref(), Some("eth0"));
        assert_eq!(t.steer, Some(Steer::Tproxy));
        let e = TargetConfig::parse("iface: eth0\nlog_format: json\n").unwrap_err();
        assert!(e.to_string().contains("unknown field `log_format`"), "{e}");
        // The same text read as a --config file gives the same target.
        let text = "iface: eth0\nports: 80\ncgroup: /x\nproxy_port: 1\nproxy_mark: 2\naccel: true\naccel_max_queued: 3\ntc_mode: tcx\nsteer: rewrite\nsteer_mark: 4\nroute_table: 5\n";
        let t = TargetConfig::parse(text).unwrap();
        assert!(t.route_table.is_some() && t.accel_max_queued.is_some());
        assert_eq!(FileConfig::parse(text).unwrap().target(), t);
    }
}
