//! `--metrics-addr`: the instance's counters and gauges for Prometheus, on
//! `http://ADDR/metrics` (404 elsewhere), in the OpenMetrics text format
//! (what the official client writes and Prometheus asks for).
//!
//! A single run's figures are read from the maps when a scrape comes in (a
//! collector), through descriptors of our own duplicated from the
//! instance's, so they are what `tproxy stats` would print at that moment.
//! The server runs on the serve loop's runtime; a scrape is served between
//! two of its ticks.
//!
//! The agent's walk covers node-wide maps (up to 65,536 entries each) and
//! its runtime also serves the agent API: there a thread of its own walks
//! them, at most once a second and only when asked, and scrapes answer
//! from its last snapshot ([`Snapshots`]).
use std::{
    convert::Infallible,
    net::SocketAddr,
    sync::{
        Arc, Condvar, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use http_body_util::Full;
use hyper::{
    Method, Request, Response, StatusCode,
    body::{Bytes, Incoming},
    header,
    server::conn::http1,
    service::service_fn,
};
use hyper_util::rt::{TokioIo, TokioTimer};
use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeMetric},
    metrics::{counter::ConstCounter, gauge::ConstGauge, info::Info},
    registry::Registry,
};
use tokio::{
    net::TcpListener,
    sync::{Semaphore, watch},
};
use tproxy_common::Counter;

use crate::{
    Instance, Options,
    observe::{Error, Result},
    target::inspect::Maps,
};

pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Scrapers served at once; more wait for a slot.
const MAX_CONNECTIONS: usize = 16;
/// A client that has not sent its request head by then is dropped.
const HEADER_TIMEOUT: Duration = Duration::from_secs(10);
/// The agent walks its maps for scrapes at most this often; a scrape
/// within this long of the last walk gets that walk's snapshot.
pub const SNAPSHOT_EVERY: Duration = Duration::from_secs(1);
/// How long an agent scrape waits for a fresh snapshot before it is given
/// the last one (a walk held up by a target's attach holding the lock).
const SNAPSHOT_WAIT: Duration = Duration::from_secs(5);

/// The bound listener. Bound before anything is installed, so a taken
/// address fails the start with nothing to undo.
pub struct Endpoint {
    listener: TcpListener,
}

impl Endpoint {
    pub async fn bind(addr: SocketAddr) -> Result<Endpoint> {
        let listener = TcpListener::bind(addr)
            .await
            .map_err(|source| Error::MetricsBind { addr, source })?;
        Ok(Endpoint { listener })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.listener
            .local_addr()
            .expect("a bound socket has an address")
    }

    /// Serves `instance`'s figures from now on, on the current runtime.
    pub fn start(self, instance: &Instance, opts: &Options) -> Result<()> {
        let registry = registry(instance.maps()?, instance_labels(instance, opts));
        tracing::info!("metrics on http://{}/metrics", self.local_addr());
        tokio::spawn(self.serve(Source::Live(registry)));
        Ok(())
    }

    /// Serves the agent's figures, one series per target (labels `target`
    /// and `pod`), from now on, on the current runtime.
    /// The maps are walked off the runtime, by [`Snapshots`].
    pub fn start_agent(self, maps: Maps, targets: TargetList) -> Result<()> {
        let walks = Arc::new(AtomicU64::new(0));
        let mut registry = Registry::with_prefix("tproxy");
        registry.register_collector(Box::new(AgentCollector {
            maps,
            targets,
            walks,
        }));
        let snapshots = Snapshots::start(registry)?;
        tracing::info!("metrics on http://{}/metrics", self.local_addr());
        tokio::spawn(self.serve(Source::Cached(snapshots)));
        Ok(())
    }

    async fn serve(self, source: Source) {
        let source = Arc::new(source);
        let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
        loop {
            let Ok(slot) = slots.clone().acquire_owned().await else {
                return;
            };
            let stream = match self.listener.accept().await {
                Ok((stream, _)) => stream,
                Err(e) => {
                    // Out of descriptors, typically: wait instead of spinning.
                    tracing::warn!("metrics: accept: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let source = source.clone();
            tokio::spawn(async move {
                let svc = service_fn(move |req: Request<Incoming>| {
                    let source = source.clone();
                    async move {
                        let r = match &*source {
                            Source::Live(registry) => answer(&req, registry),
                            Source::Cached(s) => match refusal(req.method(), req.uri().path()) {
                                Some(r) => r,
                                None => exposition(s.latest().await.as_ref()),
                            },
                        };
                        Ok::<_, Infallible>(r)
                    }
                });
                let conn = http1::Builder::new()
                    .timer(TokioTimer::new())
                    .header_read_timeout(HEADER_TIMEOUT)
                    .serve_connection(TokioIo::new(stream), svc);
                if let Err(e) = conn.await {
                    tracing::debug!("metrics: connection: {e}");
                }
                drop(slot);
            });
        }
    }
}

/// `GET /metrics`: the exposition; anything else: 404 or 405.
pub fn answer(req: &Request<Incoming>, registry: &Registry) -> Response<Full<Bytes>> {
    answer_to(req.method(), req.uri().path(), registry)
}

fn answer_to(method: &Method, path: &str, registry: &Registry) -> Response<Full<Bytes>> {
    refusal(method, path).unwrap_or_else(|| exposition(encode(registry).as_ref()))
}

/// What scrapes are served from.
enum Source {
    /// Encoded at each scrape (a single run).
    Live(Registry),
    /// The last snapshot (the agent).
    Cached(Arc<Snapshots>),
}

fn plain(status: StatusCode, body: &str) -> Response<Full<Bytes>> {
    Response::builder()
        .status(status)
        .header(header::CONTENT_TYPE, "text/plain; charset=utf-8")
        .body(Full::new(Bytes::from(body.to_string())))
        .expect("valid response")
}

/// 404 for anything but /metrics, 405 for anything but GET and HEAD.
fn refusal(method: &Method, path: &str) -> Option<Response<Full<Bytes>>> {
    if path != "/metrics" {
        return Some(plain(
            StatusCode::NOT_FOUND,
            "not found; tproxy's metrics are on /metrics\n",
        ));
    }
    if method != Method::GET && method != Method::HEAD {
        let mut r = plain(StatusCode::METHOD_NOT_ALLOWED, "use GET\n");
        r.headers_mut()
            .insert(header::ALLOW, header::HeaderValue::from_static("GET, HEAD"));
        return Some(r);
    }
    None
}

/// The registry's exposition; `None` if a collector failed.
fn encode(registry: &Registry) -> Option<Bytes> {
    let mut body = String::new();
    prometheus_client::encoding::text::encode(&mut body, registry).ok()?;
    Some(Bytes::from(body))
}

/// The 200 with the exposition, or a 500 when there is none.
fn exposition(body: Option<&Bytes>) -> Response<Full<Bytes>> {
    match body {
        Some(body) => Response::builder()
            .header(header::CONTENT_TYPE, CONTENT_TYPE)
            .body(Full::new(body.clone()))
            .expect("valid response"),
        None => plain(
            StatusCode::INTERNAL_SERVER_ERROR,
            "reading tproxy's maps failed; see tproxy's log\n",
        ),
    }
}

/// One walk of the maps, encoded; `body` is `None` if it failed.
struct Snapshot {
    seq: u64,
    /// When the walk ended.
    taken: Instant,
    body: Option<Bytes>,
}

/// The agent's scrape snapshots: a thread of their own walks the maps and
/// encodes the exposition when a scrape asks and the last snapshot is
/// older than [`SNAPSHOT_EVERY`], at most once per [`SNAPSHOT_EVERY`]
/// however many scrape; the runtime (which also serves the agent API)
/// only waits for it, asynchronously and for at most [`SNAPSHOT_WAIT`].
/// One walk at a time, and the exposition is bounded by the maps' and the
/// targets' sizes.
pub struct Snapshots {
    /// A scrape wants a fresh snapshot.
    wanted: Mutex<bool>,
    ask: Condvar,
    last: watch::Sender<Option<Arc<Snapshot>>>,
}

impl Snapshots {
    fn start(registry: Registry) -> Result<Arc<Snapshots>> {
        let s = Arc::new(Snapshots {
            wanted: Mutex::new(false),
            ask: Condvar::new(),
            last: watch::Sender::new(None),
        });
        let walker = s.clone();
        std::thread::Builder::new()
            .name("metrics".into())
            .spawn(move || walker.walk_when_asked(&registry))
            .map_err(|e| Error::io("starting the metrics thread", e))?;
        Ok(s)
    }

    fn walk_when_asked(&self, registry: &Registry) {
        let mut seq = 0;
        loop {
            {
                let mut wanted = self.wanted.lock().unwrap_or_else(|e| e.into_inner());
                while !*wanted {
                    wanted = self.ask.wait(wanted).unwrap_or_else(|e| e.into_inner());
                }
                *wanted = false;
            }
            let started = Instant::now();
            let body = encode(registry);
            seq += 1;
            let took = started.elapsed();
            if took > SNAPSHOT_EVERY {
                tracing::warn!("metrics: walking the maps took {took:?}");
            }
            let taken = Instant::now();
            self.last
                .send_replace(Some(Arc::new(Snapshot { seq, taken, body })));
            // At most one walk a second, and walking at most half the time
            // when a walk takes longer than that.
            std::thread::sleep(SNAPSHOT_EVERY.saturating_sub(took).max(took));
        }
    }

    /// The exposition of a snapshot at most [`SNAPSHOT_EVERY`] old, or of
    /// the last one if none comes within [`SNAPSHOT_WAIT`].
    async fn latest(&self) -> Option<Bytes> {
        let mut rx = self.last.subscribe();
        let seen = match &*rx.borrow_and_update() {
            Some(s) if s.taken.elapsed() < SNAPSHOT_EVERY => return s.body.clone(),
            Some(s) => s.seq,
            None => 0,
        };
        *self.wanted.lock().unwrap_or_else(|e| e.into_inner()) = true;
        self.ask.notify_one();
        let newer = |s: &Option<Arc<Snapshot>>| s.as_ref().is_some_and(|s| s.seq > seen);
        if tokio::time::timeout(SNAPSHOT_WAIT, rx.wait_for(newer))
            .await
            .is_err()
        {
            tracing::warn!(
                "metrics: no fresh snapshot within {SNAPSHOT_WAIT:?}; serving the last one"
            );
        }
        let last = rx.borrow();
        last.as_ref().and_then(|s| s.body.clone())
    }
}

/// Labels of `tproxy_instance_info`.
fn instance_labels(instance: &Instance, opts: &Options) -> Vec<(String, String)> {
    let r = instance.record();
    let name = |v: serde_json::Value| v.as_str().unwrap_or_default().to_string();
    vec![
        ("iface".into(), r.installed.iface.clone()),
        ("steer".into(), name(serde_json::json!(r.steer))),
        ("accel".into(), if opts.accel { "on" } else { "off" }.into()),
        (
            "tc_mode".into(),
            name(serde_json::json!(r.installed.tc_mode)),
        ),
        ("pid".into(), r.pid.to_string()),
    ]
}

/// The registry of one instance: every figure comes from `maps` at scrape
/// time.
pub fn registry(maps: Maps, instance: Vec<(String, String)>) -> Registry {
    let mut registry = Registry::with_prefix("tproxy");
    registry.register_collector(Box::new(InstanceCollector { maps, instance }));
    registry
}

#[derive(Debug)]
struct InstanceCollector {
    maps: Maps,
    instance: Vec<(String, String)>,
}

impl Collector for InstanceCollector {
    fn encode(&self, mut enc: DescriptorEncoder) -> std::fmt::Result {
        let s = self.maps.snapshot().map_err(|e| {
            tracing::warn!("metrics: {e}");
            std::fmt::Error
        })?;
        for &(c, v) in &s.counters {
            let m = ConstCounter::new(v);
            m.encode(enc.encode_descriptor(c.name(), c.help(), None, m.metric_type())?)?;
        }
        let gauges: [(&str, &str, i64); 7] = [
            (
                "flows_open",
                "Steered flows whose proxy socket is established.",
                s.flows.open as i64,
            ),
            (
                "flows_in_use",
                "FLOWS entries held, as the programs count them.",
                s.flows_in_use.unwrap_or(0) as i64,
            ),
            (
                "flows_active",
                "Open steered flows that saw a packet lately (what a drain waits for).",
                s.flows.active as i64,
            ),
            (
                "flows_closing",
                "Closed steered flows lingering for retransmissions.",
                s.flows.closing as i64,
            ),
            (
                "flows_embryonic",
                "Steered flows whose SYN was seen, not yet established.",
                s.flows.embryonic as i64,
            ),
            (
                "accel_sockets",
                "Sockets in the acceleration map (two per proxy<->app connection).",
                s.accel_sockets as i64,
            ),
            (
                "accel_queued_bytes",
                "Redirected bytes not yet read by their receivers.",
                s.accel_queued_bytes,
            ),
        ];
        for (name, help, v) in gauges {
            let m = ConstGauge::new(v);
            m.encode(enc.encode_descriptor(name, help, None, m.metric_type())?)?;
        }
        encode_build(&mut enc)?;
        let instance = Info::new(self.instance.clone());
        instance.encode(enc.encode_descriptor(
            "instance",
            "What this tproxy instance serves and how.",
            None,
            instance.metric_type(),
        )?)
    }
}

/// One target as the metrics label it: (id, pod name, netns cookie, slot).
pub type TargetLabels = (String, String, u64, u32);
/// The agent's targets at scrape time.
pub type TargetList = Arc<dyn Fn() -> Vec<TargetLabels> + Send + Sync>;

struct AgentCollector {
    maps: Maps,
    targets: TargetList,
    /// Walks made: the scrape snapshots' sequence number.
    walks: Arc<AtomicU64>,
}

impl std::fmt::Debug for AgentCollector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AgentCollector").finish_non_exhaustive()
    }
}

impl Collector for AgentCollector {
    fn encode(&self, mut enc: DescriptorEncoder) -> std::fmt::Result {
        let walks = self.walks.fetch_add(1, Ordering::Relaxed) + 1;
        let m = ConstCounter::new(walks);
        m.encode(enc.encode_descriptor(
            "scrape_snapshots",
            "Walks of the maps for scrapes (at most one a second; scrapes in between get the last one).",
            None,
            m.metric_type(),
        )?)?;
        let mut targets = (self.targets)();
        // Slot 0: events of no target (a target being removed, a socket of
        // another namespace in a cgroup).
        targets.push(("(none)".into(), String::new(), 0, 0));
        let keys: Vec<(u64, u32)> = targets.iter().map(|t| (t.2, t.3)).collect();
        let snaps = self.maps.snapshots_by_target(&keys).map_err(|e| {
            tracing::warn!("metrics: {e}");
            std::fmt::Error
        })?;
        let labels: Vec<Vec<(&str, &str)>> = targets
            .iter()
            .map(|(id, pod, _, _)| vec![("target", id.as_str()), ("pod", pod.as_str())])
            .collect();
        for (i, &c) in Counter::ALL.iter().enumerate() {
            let mut family = enc.encode_descriptor(
                c.name(),
                c.help(),
                None,
                prometheus_client::metrics::MetricType::Counter,
            )?;
            for (l, s) in labels.iter().zip(&snaps) {
                let v = s.counters.get(i).map_or(0, |(_, v)| *v);
                ConstCounter::new(v).encode(family.encode_family(l)?)?;
            }
        }
        type Gauge = (
            &'static str,
            &'static str,
            fn(&crate::target::inspect::Snapshot) -> i64,
        );
        let gauges: [Gauge; 8] = [
            (
                "flows_open",
                "Steered flows whose proxy socket is established.",
                |s| s.flows.open as i64,
            ),
            (
                "flows_in_use",
                "FLOWS entries the target holds, as the programs count them (what its quota is checked against).",
                |s| s.flows_in_use.unwrap_or(0) as i64,
            ),
            (
                "flows_quota",
                "Most FLOWS entries the target may hold (0: no quota); past it its new flows stay embryonic.",
                |s| i64::from(s.flows_quota.unwrap_or(0)),
            ),
            (
                "socks_in_use",
                "Sockets the target has accelerated (SOCKS entries), as the programs count them.",
                |s| s.socks_in_use.unwrap_or(0) as i64,
            ),
            (
                "socks_quota",
                "Most sockets the target may have accelerated (0: no quota); past it its connections stay plain TCP.",
                |s| i64::from(s.socks_quota.unwrap_or(0)),
            ),
            (
                "flows_active",
                "Open steered flows that saw a packet lately.",
                |s| s.flows.active as i64,
            ),
            ("accel_sockets", "Sockets in the acceleration map.", |s| {
                s.accel_sockets as i64
            }),
            (
                "accel_queued_bytes",
                "Redirected bytes not yet read by their receivers.",
                |s| s.accel_queued_bytes,
            ),
        ];
        for (name, h, f) in gauges {
            let mut family = enc.encode_descriptor(
                name,
                h,
                None,
                prometheus_client::metrics::MetricType::Gauge,
            )?;
            for (l, s) in labels.iter().zip(&snaps) {
                ConstGauge::new(f(s)).encode(family.encode_family(l)?)?;
            }
        }
        encode_build(&mut enc)
    }
}

/// `tproxy_build_info{version=…}`, served by a single run and the agent.
fn encode_build(enc: &mut DescriptorEncoder) -> std::fmt::Result {
    let build = Info::new(vec![("version", env!("CARGO_PKG_VERSION"))]);
    build.encode(enc.encode_descriptor("build", "The tproxy build.", None, build.metric_type())?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_counter_has_its_own_help() {
        let mut seen = std::collections::BTreeSet::new();
        for c in Counter::ALL {
            let h = c.help();
            assert!(
                h.ends_with('.') && !h.starts_with(' ') && !h.contains("  "),
                "{c:?}: {h:?}"
            );
            assert!(seen.insert(h), "{c:?} shares its help {h:?}");
        }
    }

    /// A registry whose collector fails: a 500, not a half exposition.
    #[derive(Debug)]
    struct Failing;
    impl Collector for Failing {
        fn encode(&self, _: DescriptorEncoder) -> std::fmt::Result {
            Err(std::fmt::Error)
        }
    }

    #[test]
    fn only_get_metrics_is_served() {
        let mut ok = Registry::with_prefix("tproxy");
        ok.register_collector(Box::new(Const));
        let r = answer_to(&Method::GET, "/metrics", &ok);
        assert_eq!(r.status(), StatusCode::OK);
        assert_eq!(r.headers()[header::CONTENT_TYPE], CONTENT_TYPE);
        assert_eq!(
            answer_to(&Method::GET, "/", &ok).status(),
            StatusCode::NOT_FOUND
        );
        assert_eq!(
            answer_to(&Method::POST, "/metrics", &ok).status(),
            StatusCode::METHOD_NOT_ALLOWED
        );
        let mut bad = Registry::default();
        bad.register_collector(Box::new(Failing));
        assert_eq!(
            answer_to(&Method::GET, "/metrics", &bad).status(),
            StatusCode::INTERNAL_SERVER_ERROR
        );
    }

    #[derive(Debug)]
    struct Const;
    impl Collector for Const {
        fn encode(&self, mut enc: DescriptorEncoder) -> std::fmt::Result {
            let m = ConstCounter::new(3u64);
            m.encode(enc.encode_descriptor("x", "X.", None, m.metric_type())?)
        }
    }

    #[test]
    fn names_carry_the_prefix_and_suffix() {
        let mut reg = Registry::with_prefix("tproxy");
        reg.register_collector(Box::new(Const));
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &reg).unwrap();
        assert_eq!(
            text,
            "# HELP tproxy_x X.\n# TYPE tproxy_x counter\ntproxy_x_total 3\n# EOF\n"
        );
    }
}
