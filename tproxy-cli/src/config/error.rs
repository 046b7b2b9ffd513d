//! The config layer's errors: settings that are missing, malformed or do
//! not go together, and config files that cannot be read. A message names
//! a setting the way whoever gave it wrote it ([`Via`]): a command-line
//! flag, a `--config` key, or an agent target's key.
use std::{io, path::PathBuf};

/// Where the settings an error is about came from: how its message names
/// them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Via {
    /// Command-line flags (`tproxy check`, a run without `--config`):
    /// `--proxy-port`.
    Flags,
    /// A run with `--config`: a flag, or the file's key of the same name:
    /// `proxy_port (--proxy-port)`.
    FlagsOrFile,
    /// An agent target (the API, a target file): its key, `"proxy_port"`.
    Keys,
}

impl Via {
    /// The setting `key` (`proxy_port`) as this source spells it.
    pub fn name(self, key: &str) -> String {
        let flag = || format!("--{}", key.replace('_', "-"));
        match self {
            Via::Flags => flag(),
            Via::FlagsOrFile => format!("{key} ({})", flag()),
            Via::Keys => format!("\"{key}\""),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A port list that does not parse; the reader of the flag, key or
    /// annotation adds how to write one.
    #[error("bad port list: {0}")]
    BadPorts(String),

    #[error(
        "the proxy port {port} is in the intercepted set: the proxy's own listener would be steered to itself; choose another {} or drop {port} from {}",
        .via.name("proxy_port"),
        .via.name("ports")
    )]
    ProxyPortIntercepted { port: u16, via: Via },

    #[error(
        "port {port} is to be accelerated but is not intercepted; drop it from {} or add it to {}",
        .via.name("accel_ports"),
        .via.name("ports")
    )]
    AccelPortNotIntercepted { port: u16, via: Via },

    #[error(
        "the proxy mark and the steer mark are both {mark:#x}; they must differ ({} / {})",
        .via.name("proxy_mark"),
        .via.name("steer_mark")
    )]
    MarksCollide { mark: u32, via: Via },

    #[error(
        "{} and {} must be non-zero: marks are how tproxy tells traffic apart",
        .via.name("proxy_mark"),
        .via.name("steer_mark")
    )]
    ZeroMark { via: Via },

    #[error(
        "{} {table} is a reserved routing table (0 unspec, 253 default, 254 main, 255 local): tproxy's table holds its own route and nothing else; choose an unused table (e.g. 100) or leave {} out to have one picked",
        .via.name("route_table"),
        .via.name("route_table")
    )]
    ReservedTable { table: u32, via: Via },

    /// A required setting nobody gave.
    #[error("{}", missing(key, *via))]
    Missing { key: &'static str, via: Via },

    /// An agent target the agent cannot take as it is.
    #[error("invalid target: {0}")]
    InvalidTarget(String),

    #[error("reading config file {}", .path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: io::Error,
    },

    /// Unknown keys, wrong types and out-of-range values; serde_norway's
    /// message names the key, line and column.
    #[error("config file {}", .path.display())]
    File {
        path: PathBuf,
        #[source]
        source: serde_norway::Error,
    },

    #[error("{var}={value:?} is not a log filter; use e.g. `info`, `debug` or `tproxy=trace`")]
    LogFilter {
        var: &'static str,
        value: String,
        #[source]
        source: tracing_subscriber::filter::ParseError,
    },
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// A bad command line or config file (exit status 2, as clap's usage
    /// errors): nothing was tried.
    pub fn is_usage(&self) -> bool {
        matches!(
            self,
            Error::Read { .. }
                | Error::File { .. }
                | Error::Missing { .. }
                | Error::LogFilter { .. }
        )
    }
}

/// The message of [`Error::Missing`]: how to give `key` where it was missed.
fn missing(key: &str, via: Via) -> String {
    let (what, flag, hint) = match key {
        "iface" => ("interface", "-i IFACE", "(the pod's interface, e.g. eth0)"),
        "ports" => ("ports to intercept", "-ports PORTS", "(e.g. \"8000\")"),
        "cgroup" => (
            "cgroup",
            "--cgroup PATH",
            "to the pod's cgroup (the agent never attaches to the cgroup root)",
        ),
        _ => (key, "", ""),
    };
    match via {
        Via::Flags | Via::FlagsOrFile => {
            format!("no {what} given: pass {flag} or set `{key}:` in the --config file")
        }
        Via::Keys => format!("invalid target: the target has no {key}: set \"{key}\" {hint}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A message names a flag only where flags were given.
    #[test]
    fn messages_name_settings_as_their_source_spells_them() {
        let e = |via| Error::ProxyPortIntercepted { port: 15006, via }.to_string();
        assert!(e(Via::Flags).ends_with("choose another --proxy-port or drop 15006 from --ports"));
        assert!(e(Via::FlagsOrFile).ends_with(
            "choose another proxy_port (--proxy-port) or drop 15006 from ports (--ports)"
        ));
        assert!(
            e(Via::Keys).ends_with("choose another \"proxy_port\" or drop 15006 from \"ports\""),
            "{}",
            e(Via::Keys)
        );
        // Through the agent (API, target files), no flag at all.
        let via = Via::Keys;
        for e in [
            Error::ProxyPortIntercepted { port: 1, via },
            Error::MarksCollide { mark: 1, via },
            Error::ZeroMark { via },
            Error::ReservedTable { table: 254, via },
            Error::Missing { key: "iface", via },
            Error::Missing { key: "ports", via },
            Error::Missing { key: "cgroup", via },
        ] {
            let text = e.to_string();
            assert!(!text.contains("--"), "{text}");
            assert_eq!(text.lines().count(), 1, "{text}");
        }
        assert_eq!(
            Error::Missing {
                key: "iface",
                via: Via::FlagsOrFile
            }
            .to_string(),
            "no interface given: pass -i IFACE or set `iface:` in the --config file"
        );
        assert_eq!(
            Error::Missing {
                key: "ports",
                via: Via::Keys
            }
            .to_string(),
            "invalid target: the target has no ports: set \"ports\" (e.g. \"8000\")"
        );
    }
}
