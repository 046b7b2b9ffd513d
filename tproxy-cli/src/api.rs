//! The node agent's API: one JSON request and one JSON answer per
//! connection on a Unix stream socket (default [`DEFAULT_SOCKET`], mode
//! 0600, root only).
//!
//! The client writes one JSON object and a newline; the agent answers one
//! JSON object and a newline, then closes.
//!
//! | request | answer |
//! |---|---|
//! | `{"op":"add","id":ID,"target":TARGET}` | `{"ok":true}`; same ID and target again: ok; same ID, other target: replaced |
//! | `{"op":"del","id":ID}` | `{"ok":true}`, also for an unknown ID (CNI DEL is idempotent) |
//! | `{"op":"check","id":ID}` | `{"ok":true}`, or `{"ok":false,…}` if not attached or degraded |
//! | `{"op":"list"}` | `{"ok":true,"targets":[{"id":ID,"target":TARGET,"state":"…"}]}` |
//!
//! Errors: `{"ok":false,"error":"one line naming the problem and the fix","code":N}`
//! with N one of [`code`]. IDs are CNI container ids, or `file:<stem>` for
//! the agent's own target files. TARGET is [`TargetSpec`]: the keys of a
//! `--config` file's target, snake_case, plus `netns` and `name`.
//!
//! The client side is [`call`]; a blocking server uses [`read_request`] and
//! [`write_response`], an async one [`parse_request`] and
//! [`encode_response`] on its own streams.
use std::{
    io::{self, BufRead as _, BufReader, Read, Write},
    os::unix::net::UnixStream,
    path::{Path, PathBuf},
    time::Duration,
};

use serde::{Deserialize, Deserializer, Serialize, de};

use crate::config::keys;
/// A target's own keys: what it steers, and how (a [`TargetSpec`]'s part
/// that is also a `--config` file's); and the values they are made of.
pub use crate::config::{
    Target,
    error::Error as ConfigError,
    options::{Steer, TcMode, parse_mark},
    ports::PortSet,
};

/// Where the agent listens unless told otherwise.
pub const DEFAULT_SOCKET: &str = "/run/tproxy/agent.sock";

/// The longest request or answer either side reads (a `list` of a few
/// hundred targets fits many times over); a peer sending more is cut off
/// instead of growing our buffer without bound.
pub const MAX_MESSAGE: usize = 1 << 20;

/// Error codes in `{"ok":false,"code":N}`; the CNI plugin maps them to CNI
/// error codes.
pub mod code {
    /// Invalid target or request.
    pub const INVALID_CONFIG: u32 = 7;
    /// `check` of an ID the agent does not know.
    pub const NOT_FOUND: u32 = 4;
    /// Busy or starting: try again later.
    pub const TRY_AGAIN: u32 = 11;
    /// Anything else.
    pub const OTHER: u32 = 999;
}

/// One request: the JSON object's `op` names the variant.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "lowercase")]
#[expect(
    clippy::large_enum_variant,
    reason = "one short-lived request per connection; a Box would only burden the API's users"
)]
pub enum Request {
    /// Attach (or replace) `target` under `id`.
    Add { id: String, target: TargetSpec },
    /// Detach `id`; an unknown one is not an error.
    Del { id: String },
    /// Is `id` attached and whole?
    Check { id: String },
    /// Every target with its state.
    List,
}

/// What one target steers, and where: a [`Target`] (the keys of a
/// `--config` file's target but `proxy_cgroup`; `iface`, `ports` and
/// `cgroup` required) in the network namespace `netns`, with a `name` and
/// quotas of its own. On the wire one JSON object, every key at the top
/// level; keys left out take the `tproxy` run flags' defaults (the quotas:
/// the agent's). Unknown keys are refused (a misspelt key would otherwise
/// be a silent default). The agent's target files are the same keys in
/// YAML.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct TargetSpec {
    /// The network namespace, as a path (`/var/run/netns/cni-…`).
    pub netns: PathBuf,
    /// The interface in that namespace whose ingress is steered (`iface`),
    /// the cgroup v2 directory holding the proxy and the app (`cgroup`, a
    /// pod's: absolute, or relative to the cgroup2 mount), the ports, the
    /// proxy, the back-end.
    #[serde(flatten)]
    pub target: Target,
    /// Most open steered flows (FLOWS entries) the target may hold; past
    /// it its new flows stay embryonic. Left out: the agent's
    /// `--flows-quota`; 0: no quota.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub flows_quota: Option<u32>,
    /// Most sockets the target may have accelerated; past it its new
    /// connections stay plain TCP. Left out: the agent's `--socks-quota`;
    /// 0: no quota.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub socks_quota: Option<u32>,
    /// A label for logs and metrics (the CNI plugin: `namespace/pod`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
}

impl TargetSpec {
    /// A target with only `netns` and `iface` set.
    pub fn new(netns: impl Into<PathBuf>, iface: impl Into<String>) -> TargetSpec {
        TargetSpec {
            netns: netns.into(),
            target: Target::on(iface),
            flows_quota: None,
            socks_quota: None,
            name: None,
        }
    }

    /// The interface (empty if the target has none, which the agent
    /// refuses).
    pub fn iface(&self) -> &str {
        self.target.iface.as_deref().unwrap_or_default()
    }
}

/// The keys a target has as an agent's, beside the [`Target`]'s.
#[derive(Default)]
struct AgentKeys {
    netns: Option<PathBuf>,
    flows_quota: Option<u32>,
    socks_quota: Option<u32>,
    name: Option<String>,
}

impl keys::Context for AgentKeys {
    const EXPECTING: &'static str = "a target: a mapping of its keys (netns, iface, ports…)";
    const KEYS: &'static [&'static str] = &["netns", "flows_quota", "socks_quota", "name"];
    /// An agent target's proxy is its whole cgroup (a pod's): the agent
    /// has never taken a proxy cgroup of its own.
    const REFUSED: &'static [&'static str] = &["proxy_cgroup"];

    type Output = TargetSpec;

    fn read<'de, A: de::MapAccess<'de>>(
        &mut self,
        key: &'static str,
        map: &mut A,
    ) -> Result<(), A::Error> {
        match key {
            "netns" => self.netns = map.next_value()?,
            "flows_quota" => self.flows_quota = map.next_value()?,
            "socks_quota" => self.socks_quota = map.next_value()?,
            "name" => self.name = map.next_value()?,
            _ => unreachable!("{key} is not in KEYS"),
        }
        Ok(())
    }

    fn finish<E: de::Error>(self, target: Target) -> Result<TargetSpec, E> {
        Ok(TargetSpec {
            netns: self.netns.ok_or_else(|| E::missing_field("netns"))?,
            target,
            flows_quota: self.flows_quota,
            socks_quota: self.socks_quota,
            name: self.name,
        })
    }
}

impl<'de> Deserialize<'de> for TargetSpec {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        keys::read::<D, AgentKeys>(d)
    }
}

/// One entry of a `list` answer.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TargetStatus {
    pub id: String,
    pub target: TargetSpec,
    /// As `tproxy status` says it: `OK`, `STARTING`, `DEGRADED …`.
    pub state: String,
}

/// The agent's answer. Keys it does not set are left out on the wire;
/// unknown keys are ignored, so an older client reads a newer agent.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Response {
    pub ok: bool,
    /// With `ok: false`: one line naming the problem and the fix.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// With `ok: false`: one of [`code`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub code: Option<u32>,
    /// `check`: the target's state.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub state: Option<String>,
    /// `list`: every target.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub targets: Option<Vec<TargetStatus>>,
}

impl Response {
    /// `{"ok":true}`
    pub fn ok() -> Response {
        Response {
            ok: true,
            ..Response::default()
        }
    }

    /// `{"ok":false,"error":…,"code":…}`
    pub fn error(code: u32, error: impl Into<String>) -> Response {
        Response {
            ok: false,
            error: Some(error.into()),
            code: Some(code),
            ..Response::default()
        }
    }

    /// `{"ok":true,"targets":[…]}`
    pub fn targets(targets: Vec<TargetStatus>) -> Response {
        Response {
            ok: true,
            targets: Some(targets),
            ..Response::default()
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error(
        "no agent socket at {0}: the tproxy agent is not running on this node (or listens elsewhere: set \"agentSocket\")"
    )]
    NoSocket(PathBuf),

    #[error(
        "the tproxy agent at {0} refuses connections: it is not running (a stale socket) or not yet listening; start or restart it"
    )]
    Refused(PathBuf),

    #[error("talking to the tproxy agent at {path}: {source}")]
    Io { path: PathBuf, source: io::Error },

    #[error(
        "the tproxy agent at {path} did not answer within {after:?}: it is busy or stuck; try again, or look at its log"
    )]
    Timeout { path: PathBuf, after: Duration },

    #[error("the peer closed the connection before sending a whole JSON line")]
    Truncated,

    #[error(
        "a message longer than {MAX_MESSAGE} bytes; requests and answers are one short JSON line"
    )]
    TooLong,

    #[error("not a valid agent API message: {0}")]
    Decode(#[from] serde_json::Error),

    #[error("reading from the peer: {0}")]
    Read(#[source] io::Error),

    #[error("writing to the peer: {0}")]
    Write(#[source] io::Error),
}

impl ApiError {
    /// Nobody serves the socket: no agent on this node right now.
    pub fn unreachable(&self) -> bool {
        matches!(self, ApiError::NoSocket(_) | ApiError::Refused(_))
    }
}

/// Sends `req` to the agent at `socket` and returns its answer (which may be
/// `ok: false`). Connecting, writing and reading each give up after
/// `timeout`.
pub fn call(socket: &Path, req: &Request, timeout: Duration) -> Result<Response, ApiError> {
    let io_err = |source: io::Error| match source.kind() {
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => ApiError::Timeout {
            path: socket.into(),
            after: timeout,
        },
        _ => ApiError::Io {
            path: socket.into(),
            source,
        },
    };
    let mut stream = UnixStream::connect(socket).map_err(|e| match e.kind() {
        io::ErrorKind::NotFound => ApiError::NoSocket(socket.into()),
        io::ErrorKind::ConnectionRefused => ApiError::Refused(socket.into()),
        _ => io_err(e),
    })?;
    stream.set_read_timeout(Some(timeout)).map_err(io_err)?;
    stream.set_write_timeout(Some(timeout)).map_err(io_err)?;
    stream.write_all(&encode(req)?).map_err(io_err)?;
    let line = read_line(&mut stream).map_err(|e| match e {
        ApiError::Read(e) => io_err(e),
        e => e,
    })?;
    Ok(serde_json::from_slice(&line)?)
}

/// Server side: reads the one request of a connection.
pub fn read_request(stream: &mut impl Read) -> Result<Request, ApiError> {
    parse_request(&read_line(stream)?)
}

/// Server side: writes the one answer of a connection.
pub fn write_response(stream: &mut impl Write, resp: &Response) -> Result<(), ApiError> {
    stream
        .write_all(&encode_response(resp))
        .and_then(|()| stream.flush())
        .map_err(ApiError::Write)
}

/// A request from its JSON line (the newline may be there or not).
pub fn parse_request(line: &[u8]) -> Result<Request, ApiError> {
    Ok(serde_json::from_slice(line)?)
}

/// An answer as its JSON line, newline included.
pub fn encode_response(resp: &Response) -> Vec<u8> {
    // Plain data with string keys: serializing it cannot fail.
    encode(resp).expect("a Response serializes")
}

fn encode(v: &impl Serialize) -> Result<Vec<u8>, ApiError> {
    let mut out = serde_json::to_vec(v)?;
    out.push(b'\n');
    Ok(out)
}

/// Reads up to the first newline (or the end, if the peer closes after a
/// whole object without one), at most [`MAX_MESSAGE`] bytes.
fn read_line(stream: &mut impl Read) -> Result<Vec<u8>, ApiError> {
    let mut line = Vec::new();
    let mut r = BufReader::new(stream.take(MAX_MESSAGE as u64 + 1));
    r.read_until(b'\n', &mut line).map_err(ApiError::Read)?;
    if line.len() > MAX_MESSAGE {
        return Err(ApiError::TooLong);
    }
    if line.iter().all(u8::is_ascii_whitespace) {
        return Err(ApiError::Truncated);
    }
    Ok(line)
}

#[cfg(test)]
mod tests {
    use std::{os::unix::net::UnixListener, thread};

    use serde_json::json;

    use super::*;
    use crate::{Steer, config::options::TcMode};

    fn full_target() -> TargetSpec {
        TargetSpec {
            target: Target {
                cgroup: Some("kubepods/pod1".into()),
                ports: Some("8000,9000-9010".parse().unwrap()),
                proxy_port: Some(15006),
                proxy_mark: Some(1337),
                accel: Some(false),
                steer: Some(Steer::Tproxy),
                tc_mode: Some(TcMode::Netlink),
                accel_max_queued: Some(65536),
                accel_retire_ms: Some(500),
                steer_mark: Some(0x7401),
                route_table: Some(100),
                ..Target::on("eth0")
            },
            name: Some("default/web-0".into()),
            ..TargetSpec::new("/var/run/netns/cni-1", "eth0")
        }
    }

    #[test]
    fn requests_are_the_documented_json() {
        let add = Request::Add {
            id: "c1".into(),
            target: full_target(),
        };
        assert_eq!(
            serde_json::to_value(&add).unwrap(),
            json!({"op": "add", "id": "c1", "target": {
                "netns": "/var/run/netns/cni-1", "iface": "eth0",
                "cgroup": "kubepods/pod1", "ports": "8000,9000-9010",
                "proxy_port": 15006, "proxy_mark": 1337, "accel": false,
                "steer": "tproxy", "tc_mode": "netlink",
                "accel_max_queued": 65536, "accel_retire_ms": 500,
                "steer_mark": 0x7401, "route_table": 100,
                "name": "default/web-0"}})
        );
        assert_eq!(
            serde_json::to_string(&Request::Del { id: "c1".into() }).unwrap(),
            r#"{"op":"del","id":"c1"}"#
        );
        assert_eq!(
            serde_json::to_string(&Request::Check { id: "c1".into() }).unwrap(),
            r#"{"op":"check","id":"c1"}"#
        );
        assert_eq!(
            serde_json::to_string(&Request::List).unwrap(),
            r#"{"op":"list"}"#
        );
        // Unset keys are left out, not null.
        assert_eq!(
            serde_json::to_string(&TargetSpec::new("/n", "lo")).unwrap(),
            r#"{"netns":"/n","iface":"lo"}"#
        );
    }

    #[test]
    fn requests_round_trip() {
        for req in [
            Request::Add {
                id: "c1".into(),
                target: full_target(),
            },
            Request::Add {
                id: "file:web".into(),
                target: TargetSpec::new("/proc/1/ns/net", "lo"),
            },
            Request::Del { id: "c1".into() },
            Request::Check { id: "c1".into() },
            Request::List,
        ] {
            let line = encode(&req).unwrap();
            assert_eq!(line.last(), Some(&b'\n'));
            assert_eq!(parse_request(&line).unwrap(), req);
        }
    }

    /// What the agent took before its targets were a `config::Target`: the
    /// ports as a string (now also a number or a list), every key null or
    /// left out but `netns`.
    #[test]
    fn targets_read_as_before() {
        let line = br#"{"op":"add","id":"c","target":{"netns":"/n","iface":"eth0","ports":"80, 90-91","proxy_port":null,"flows_quota":5,"name":"a/b"}}"#;
        let Request::Add { target, .. } = parse_request(line).unwrap() else {
            panic!("not an add")
        };
        assert_eq!(
            target,
            TargetSpec {
                target: Target {
                    ports: Some("80,90-91".parse().unwrap()),
                    ..Target::on("eth0")
                },
                flows_quota: Some(5),
                name: Some("a/b".into()),
                ..TargetSpec::new("/n", "eth0")
            }
        );
        let list = json!({"netns": "/n", "iface": "eth0", "ports": [80, "90-91"]});
        let t: TargetSpec = serde_json::from_value(list).unwrap();
        assert_eq!(t.target.ports.unwrap().to_string(), "80,90-91");
    }

    #[test]
    fn responses_round_trip() {
        for resp in [
            Response::ok(),
            Response::error(code::TRY_AGAIN, "starting; try again"),
            Response::targets(vec![TargetStatus {
                id: "c1".into(),
                target: full_target(),
                state: "OK".into(),
            }]),
        ] {
            let line = encode_response(&resp);
            assert_eq!(serde_json::from_slice::<Response>(&line).unwrap(), resp);
        }
        assert_eq!(encode_response(&Response::ok()), b"{\"ok\":true}\n");
        // A newer agent's extra keys do not break an older client.
        let r: Response = serde_json::from_str(r#"{"ok":true,"since":"x"}"#).unwrap();
        assert!(r.ok);
    }

    #[test]
    fn bad_targets_are_refused() {
        let refused = |target: serde_json::Value| {
            let line = json!({"op": "add", "id": "c", "target": target}).to_string();
            parse_request(line.as_bytes()).unwrap_err().to_string()
        };
        let e = refused(json!({"netns": "/n", "iface": "eth0", "prots": "80"}));
        assert!(e.contains("unknown field `prots`"), "{e}");
        let e = refused(json!({"iface": "eth0"}));
        assert!(e.contains("missing field `netns`"), "{e}");
        let e = refused(json!({"netns": "/n", "iface": "eth0", "ports": "0"}));
        assert!(e.contains("bad port list"), "{e}");
        let e = refused(json!({"netns": "/n", "iface": "eth0", "steer": "nat"}));
        assert!(e.contains("unknown variant `nat`"), "{e}");
        let e = refused(json!({"netns": "/n", "iface": "eth0", "proxy_port": 70000}));
        assert!(e.contains("70000"), "{e}");
        // A run's keys, not a target's.
        for key in [
            "proxy_cgroup",
            "drain_timeout",
            "log_format",
            "metrics_addr",
        ] {
            let e = refused(json!({"netns": "/n", "iface": "eth0", key: "x"}));
            assert!(e.contains(&format!("unknown field `{key}`")), "{e}");
            let (_, expected) = e.split_once("expected one of").unwrap();
            assert!(expected.contains("`cgroup`, `proxy_port`"), "{e}");
            assert!(expected.contains("`netns`, `flows_quota`"), "{e}");
        }
        let e = parse_request(br#"{"op":"add","id":"c","target":{"netns":"/n","netns":"/m"}}"#)
            .unwrap_err()
            .to_string();
        assert!(e.contains("duplicate field `netns`"), "{e}");
        let e = parse_request(br#"{"op":"restart"}"#)
            .unwrap_err()
            .to_string();
        assert!(e.contains("unknown variant `restart`"), "{e}");
    }

    #[test]
    fn lines_are_bounded_and_whole() {
        assert!(matches!(
            read_request(&mut &b""[..]),
            Err(ApiError::Truncated)
        ));
        let long = vec![b' '; MAX_MESSAGE + 10];
        assert!(matches!(
            read_request(&mut &long[..]),
            Err(ApiError::TooLong)
        ));
        // Without a newline, a whole object still reads (the peer closed).
        assert_eq!(
            read_request(&mut &br#"{"op":"list"}"#[..]).unwrap(),
            Request::List
        );
    }

    #[test]
    fn call_talks_to_a_server_using_the_helpers() {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("agent.sock");
        let listener = UnixListener::bind(&sock).unwrap();
        let server = thread::spawn(move || {
            let (mut s, _) = listener.accept().unwrap();
            let req = read_request(&mut s).unwrap();
            write_response(&mut s, &Response::error(code::NOT_FOUND, "no such id")).unwrap();
            req
        });
        let resp = call(
            &sock,
            &Request::Check { id: "c9".into() },
            Duration::from_secs(60),
        )
        .unwrap();
        assert_eq!(resp, Response::error(code::NOT_FOUND, "no such id"));
        assert_eq!(server.join().unwrap(), Request::Check { id: "c9".into() });
    }

    #[test]
    fn call_names_a_missing_silent_or_dead_agent() {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("agent.sock");
        let t = Duration::from_millis(200);
        let e = call(&sock, &Request::List, t).unwrap_err();
        assert!(matches!(e, ApiError::NoSocket(_)) && e.unreachable(), "{e}");

        // A socket file nobody listens on: a dead agent.
        drop(UnixListener::bind(&sock).unwrap());
        let e = call(&sock, &Request::List, t).unwrap_err();
        assert!(matches!(e, ApiError::Refused(_)) && e.unreachable(), "{e}");

        // Listening, never answering.
        std::fs::remove_file(&sock).unwrap();
        let _listener = UnixListener::bind(&sock).unwrap();
        let e = call(&sock, &Request::List, t).unwrap_err();
        assert!(
            matches!(e, ApiError::Timeout { .. }) && !e.unreachable(),
            "{e}"
        );
    }
}
