//! `tproxy --config FILE`: the run's settings in YAML, keyed as the flags
//! are named (`proxy_port` for `--proxy-port`); a flag given on the command
//! line overrides the file. `examples/tproxy.yaml` is an annotated example.
//!
//! The file holds a [`Target`]'s keys and the run's own ([`RunKeys`]: drain
//! timeout, metrics, log format) side by side at the top level, read by
//! [`keys::read`]: values are checked as they are read, so an out-of-range
//! one is an error naming its key, line and column, like an unknown key or
//! a wrong type.
use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
};

use serde::{Deserialize, Deserializer, de};

use super::{
    Error, Target,
    keys::{self, Context},
    options::{LogFormat, MAX_DRAIN_TIMEOUT},
};

/// A `--config` file: what the run steers, and the run's own settings.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct FileConfig {
    pub target: Target,
    pub run: RunKeys,
}

/// The run's own settings: flags, and keys of a `--config` file (never of
/// an agent target). Each is `None` where not given.
#[derive(Clone, Debug, Default, PartialEq, Eq, clap::Args)]
pub struct RunKeys {
    /// On SIGTERM/SIGINT, stop steering new flows at once and let steered
    /// flows finish for up to this many seconds (0: stop at once). A second
    /// signal stops at once [default: 30].
    #[arg(long, value_name = "SECONDS", value_parser = clap::value_parser!(u64).range(..=MAX_DRAIN_TIMEOUT))]
    pub drain_timeout: Option<u64>,

    /// Serve the counters and gauges in the Prometheus (OpenMetrics) text
    /// format on http://ADDR/metrics, e.g. 127.0.0.1:9090 or [::1]:9090.
    #[arg(long, value_name = "ADDR")]
    pub metrics_addr: Option<SocketAddr>,

    /// The flag is the command line's, global to every subcommand.
    #[arg(skip)]
    pub log_format: Option<LogFormat>,
}

impl RunKeys {
    /// `self`'s settings, else `below`'s: the flags over the file.
    pub fn or(self, below: RunKeys) -> RunKeys {
        let RunKeys {
            drain_timeout,
            metrics_addr,
            log_format,
        } = self;
        RunKeys {
            drain_timeout: drain_timeout.or(below.drain_timeout),
            metrics_addr: metrics_addr.or(below.metrics_addr),
            log_format: log_format.or(below.log_format),
        }
    }
}

impl Context for RunKeys {
    const EXPECTING: &'static str = "a mapping of tproxy settings (see examples/tproxy.yaml)";
    const KEYS: &'static [&'static str] = &["drain_timeout", "metrics_addr", "log_format"];

    type Output = FileConfig;

    fn read<'de, A: de::MapAccess<'de>>(
        &mut self,
        key: &'static str,
        map: &mut A,
    ) -> Result<(), A::Error> {
        match key {
            "drain_timeout" => self.drain_timeout = map.next_value_seed(keys::DRAIN_TIMEOUT)?,
            "metrics_addr" => self.metrics_addr = map.next_value()?,
            "log_format" => self.log_format = map.next_value()?,
            _ => unreachable!("{key} is not in KEYS"),
        }
        Ok(())
    }

    fn finish<E: de::Error>(self, target: Target) -> Result<FileConfig, E> {
        Ok(FileConfig { target, run: self })
    }
}

impl<'de> Deserialize<'de> for FileConfig {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        keys::read::<D, RunKeys>(d)
    }
}

impl FileConfig {
    /// Reads and checks `path`. Errors name the file, and (from
    /// serde_norway) the key, line and column.
    pub fn load(path: &Path) -> Result<FileConfig, Error> {
        load(path)
    }

    /// An empty file (or one of comments only) sets nothing; it is not an
    /// error.
    pub fn parse(text: &str) -> Result<FileConfig, serde_norway::Error> {
        serde_norway::from_str(text)
    }
}

/// Reads the YAML file `path` as a `T`: the run's `--config`, the agent's.
/// Errors name the file, and (from serde_norway) the key, line and column.
pub fn load<T: de::DeserializeOwned>(path: &Path) -> Result<T, Error> {
    let text = std::fs::read_to_string(path).map_err(|source| Error::Read {
        path: path.into(),
        source,
    })?;
    serde_norway::from_str(&text).map_err(|source| Error::File {
        path: PathBuf::from(path),
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Steer, options::TcMode};

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
             accel_min_message: 0\n\
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
                target: Target {
                    iface: Some("eth1".into()),
                    ports: Some("8000,8080,9000-9002".parse().unwrap()),
                    cgroup: Some("/sys/fs/cgroup/unified/app".into()),
                    proxy_cgroup: Some("/sys/fs/cgroup/unified/app/proxy".into()),
                    proxy_port: Some(15001),
                    proxy_mark: Some(0x10),
                    no_accel: false,
                    accel: Some(false),
                    accel_max_queued: Some(1 << 20),
                    accel_retire_ms: Some(50),
                    accel_min_message: Some(0),
                    accel_ports: None,
                    tc_mode: Some(TcMode::Netlink),
                    steer: Some(Steer::Tproxy),
                    steer_mark: Some(0x20),
                    route_table: Some(100),
                },
                run: RunKeys {
                    drain_timeout: Some(5),
                    metrics_addr: Some("127.0.0.1:9464".parse().unwrap()),
                    log_format: Some(LogFormat::Json),
                },
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
            assert_eq!(c.target.ports.unwrap().to_string(), want, "{yaml}");
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
            assert_eq!(
                parse(yaml).unwrap().target.proxy_mark,
                Some(0x539),
                "{yaml}"
            );
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

    /// The run's keys and the target's, each set refusing what is not its
    /// own, with the location: an agent target's keys are not a run's.
    #[test]
    fn keys_of_agent_targets_are_refused_with_their_location() {
        for key in [
            "netns: /run/netns/a",
            "name: web",
            "flows_quota: 1",
            "socks_quota: 1",
        ] {
            let e = err(&format!("iface: eth0\n{key}\n"));
            let name = key.split(':').next().unwrap();
            assert!(e.contains(&format!("unknown field `{name}`")), "{e}");
            assert!(e.contains("line 2 column 1"), "{e}");
            assert!(
                e.contains("`drain_timeout`, `metrics_addr`, `log_format`"),
                "{e}"
            );
        }
        let e = err("drain_timeout: 1\ndrain_timeout: 2\n");
        assert!(e.contains("duplicate field `drain_timeout`"), "{e}");
        assert!(e.contains("line 2 column 1"), "{e}");
        let e = err("iface: eth0\niface: eth1\n");
        assert!(e.contains("duplicate field `iface`"), "{e}");
        let e = err("- iface\n");
        assert!(e.contains("expected a mapping of tproxy settings"), "{e}");
    }

    #[test]
    fn load_names_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.yaml");
        std::fs::write(&path, "proxy_port: 0\n").unwrap();
        let e = FileConfig::load(&path).unwrap_err();
        assert!(e.is_usage());
        assert_eq!(e.to_string(), format!("config file {}", path.display()));
        let e = FileConfig::load(&dir.path().join("none.yaml")).unwrap_err();
        assert!(matches!(e, Error::Read { .. }) && e.is_usage(), "{e}");
    }
}
