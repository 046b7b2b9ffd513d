//! Watching a running instance: `tproxy stats --watch` (JSON lines, one
//! line per interval when piped, redrawn on a terminal) and the Prometheus
//! endpoint of `--metrics-addr`, checked against traffic the test sends and
//! against `tproxy stats --json`. Root only; each test makes its own
//! namespaces and child cgroup.
mod common;

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    io::{BufRead as _, BufReader, Read as _, Write as _},
    net::{SocketAddr, TcpListener, TcpStream},
    process::Stdio,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use common::{sandbox::Sandbox, *};
use tproxy_common::Counter;
use tproxy_lab::{Logged, Netns, Proc, topology::*};

// ---------------------------------------------------------------------------
// The exposition, parsed strictly (OpenMetrics 1.0 text, which is what
// Prometheus asks the official client for): every sample belongs to a
// family declared by `# TYPE` before it, with the suffix its type allows;
// labels are quoted and escaped; the text ends with `# EOF`.

#[derive(Debug)]
struct Exposition {
    /// Family name -> type.
    types: HashMap<String, String>,
    /// (sample name, labels) -> value.
    samples: BTreeMap<(String, BTreeMap<String, String>), f64>,
}

impl Exposition {
    /// The value of the one sample named `name` (any labels).
    fn value(&self, name: &str) -> f64 {
        let found: Vec<f64> = self
            .samples
            .iter()
            .filter(|((n, _), _)| n == name)
            .map(|(_, v)| *v)
            .collect();
        assert_eq!(found.len(), 1, "{name}: {found:?}");
        found[0]
    }

    fn labels(&self, name: &str) -> &BTreeMap<String, String> {
        let mut it = self.samples.keys().filter(|(n, _)| n == name);
        let (_, l) = it.next().unwrap_or_else(|| panic!("no sample {name}"));
        assert!(it.next().is_none(), "{name} twice");
        l
    }
}

fn valid_name(s: &str) -> bool {
    let mut c = s.chars();
    c.next()
        .is_some_and(|f| f.is_ascii_alphabetic() || f == '_' || f == ':')
        && c.all(|x| x.is_ascii_alphanumeric() || x == '_' || x == ':')
}

/// `{a="x",b="y\"z"}` at the start of `s`: the labels and the rest.
fn parse_labels(s: &str) -> Result<(BTreeMap<String, String>, &str), String> {
    let mut labels = BTreeMap::new();
    let mut rest = s.strip_prefix('{').ok_or("no {")?;
    loop {
        if let Some(r) = rest.strip_prefix('}') {
            return Ok((labels, r));
        }
        let eq = rest.find('=').ok_or_else(|| format!("no = in {rest:?}"))?;
        let name = &rest[..eq];
        if !valid_name(name) || name.contains(':') {
            return Err(format!("bad label name {name:?}"));
        }
        let mut chars = rest[eq + 1..].char_indices();
        if chars.next().map(|(_, c)| c) != Some('"') {
            return Err(format!("label {name} not quoted"));
        }
        let mut value = String::new();
        let end = loop {
            match chars.next() {
                Some((i, '"')) => break eq + 1 + i + 1,
                Some((_, '\\')) => match chars.next() {
                    Some((_, '\\')) => value.push('\\'),
                    Some((_, '"')) => value.push('"'),
                    Some((_, 'n')) => value.push('\n'),
                    other => return Err(format!("bad escape {other:?} in label {name}")),
                },
                Some((_, '\n')) | None => return Err(format!("unterminated label {name}")),
                Some((_, c)) => value.push(c),
            }
        };
        if labels.insert(name.to_string(), value).is_some() {
            return Err(format!("label {name} twice"));
        }
        rest = &rest[end..];
        rest = rest.strip_prefix(',').unwrap_or(rest);
    }
}

fn parse_exposition(text: &str) -> Result<Exposition, String> {
    let body = text
        .strip_suffix("# EOF\n")
        .ok_or("does not end with # EOF")?;
    let mut types: HashMap<String, String> = HashMap::new();
    let mut samples = BTreeMap::new();
    let mut current: Option<String> = None;
    let mut done: HashSet<String> = HashSet::new();
    for line in body.lines() {
        if let Some(meta) = line.strip_prefix("# ") {
            let mut w = meta.splitn(3, ' ');
            let (kind, family) = (w.next().unwrap_or(""), w.next().unwrap_or(""));
            let arg = w.next().ok_or_else(|| format!("short line {line:?}"))?;
            if !valid_name(family) {
                return Err(format!("bad family name in {line:?}"));
            }
            if current.as_deref() != Some(family) {
                if let Some(prev) = current.take() {
                    done.insert(prev);
                }
                if done.contains(family) {
                    return Err(format!("family {family} is split"));
                }
                current = Some(family.to_string());
            }
            match kind {
                "HELP" | "UNIT" => {}
                "TYPE" => {
                    let ok = [
                        "counter",
                        "gauge",
                        "info",
                        "stateset",
                        "histogram",
                        "gaugehistogram",
                        "summary",
                        "unknown",
                    ];
                    if !ok.contains(&arg) {
                        return Err(format!("bad type in {line:?}"));
                    }
                    if types.insert(family.into(), arg.into()).is_some() {
                        return Err(format!("{family} typed twice"));
                    }
                }
                _ => return Err(format!("unknown line {line:?}")),
            }
            continue;
        }
        let name_end = line
            .find(['{', ' '])
            .ok_or_else(|| format!("bad sample {line:?}"))?;
        let name = &line[..name_end];
        let (labels, rest) = if line[name_end..].starts_with('{') {
            parse_labels(&line[name_end..])?
        } else {
            (BTreeMap::new(), &line[name_end..])
        };
        let mut rest = rest
            .strip_prefix(' ')
            .ok_or_else(|| format!("no space before the value in {line:?}"))?
            .split(' ');
        let value: f64 = match rest.next().unwrap_or("") {
            "NaN" => f64::NAN,
            "+Inf" => f64::INFINITY,
            "-Inf" => f64::NEG_INFINITY,
            v => v.parse().map_err(|_| format!("bad value in {line:?}"))?,
        };
        let family = current
            .as_deref()
            .ok_or_else(|| format!("sample before any TYPE: {line:?}"))?;
        let ty = types
            .get(family)
            .ok_or_else(|| format!("family {family} has no TYPE"))?;
        let suffixes: &[&str] = match ty.as_str() {
            "counter" => &["_total", "_created"],
            "info" => &["_info"],
            "gauge" | "unknown" => &[""],
            other => return Err(format!("unexpected type {other} for {family}")),
        };
        if !suffixes.iter().any(|s| name == format!("{family}{s}")) {
            return Err(format!("sample {name} does not belong to {ty} {family}"));
        }
        if ty == "counter" && (value.is_nan() || value < 0.0) {
            return Err(format!("counter {name} is {value}"));
        }
        if samples.insert((name.to_string(), labels), value).is_some() {
            return Err(format!("sample {name} twice"));
        }
    }
    Ok(Exposition { types, samples })
}

#[test]
fn the_exposition_parser_rejects_what_it_should() {
    let good = "# HELP a_b x.\n# TYPE a_b counter\na_b_total 3\n# TYPE i info\ni_info{v=\"1\\\"2\",w=\"\"} 1\n# EOF\n";
    let e = parse_exposition(good).unwrap();
    assert_eq!(e.value("a_b_total"), 3.0);
    assert_eq!(e.labels("i_info")["v"], "1\"2");
    for bad in [
        "# TYPE a counter\na_total 3\n",                          // no EOF
        "# TYPE a counter\na 3\n# EOF\n",                         // counter without _total
        "a_total 3\n# EOF\n",                                     // untyped
        "# TYPE a gauge\na{x=1} 3\n# EOF\n",                      // unquoted label
        "# TYPE a gauge\na 3\n# TYPE b gauge\nb 1\na 2\n# EOF\n", // split family
        "# TYPE a gauge\na x\n# EOF\n",                           // bad value
        "# TYPE a counter\na_total -1\n# EOF\n",                  // negative counter
    ] {
        assert!(parse_exposition(bad).is_err(), "accepted {bad:?}");
    }
}

// ---------------------------------------------------------------------------
// HTTP, by hand: the test should not trust the server's own library.

struct Response {
    status: u16,
    headers: Vec<(String, String)>,
    body: String,
}

impl Response {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// `GET path` over HTTP/1.1 with `Connection: close`; the body is taken
/// by Content-Length.
fn http(addr: SocketAddr, path: &str) -> Response {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5))
        .unwrap_or_else(|e| panic!("connecting to {addr}: {e}"));
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).unwrap();
    let raw = String::from_utf8(raw).expect("UTF-8 answer");
    let (head, body) = raw.split_once("\r\n\r\n").expect("headers end");
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap();
    let status: u16 = status_line
        .strip_prefix("HTTP/1.1 ")
        .and_then(|s| s[..3].parse().ok())
        .unwrap_or_else(|| panic!("bad status line {status_line:?}"));
    let headers: Vec<(String, String)> = lines
        .map(|l| {
            let (n, v) = l.split_once(':').expect("header");
            (n.to_string(), v.trim().to_string())
        })
        .collect();
    let r = Response {
        status,
        headers,
        body: body.to_string(),
    };
    let len: usize = r
        .header("content-length")
        .expect("Content-Length")
        .parse()
        .unwrap();
    assert_eq!(len, r.body.len(), "body length");
    r
}

fn scrape(ns: &Netns, addr: SocketAddr) -> (Response, Exposition) {
    let r = ns.run(|| http(addr, "/metrics"));
    assert_eq!(r.status, 200, "{}", r.body);
    let ct = r.header("content-type").unwrap_or("");
    assert!(
        ct.starts_with("application/openmetrics-text") || ct.starts_with("text/plain"),
        "{ct}"
    );
    let e = parse_exposition(&r.body).unwrap_or_else(|e| panic!("{e}:\n{}", r.body));
    (r, e)
}

// ---------------------------------------------------------------------------

/// N connections held open through the accelerated proxy: the endpoint
/// (bound before "serving": scraped at once, no retry) reports what was
/// sent, the same figures as `tproxy stats --json` at the same moment.
#[test]
fn metrics_endpoint_reports_the_traffic_sent() {
    const N: usize = 12;
    let metrics: SocketAddr = "127.0.0.1:9464".parse().unwrap();
    let lab = Lab::new();
    let _p = lab.proxy(Proxy::Ours, Steer::Rewrite);
    let t = lab.tproxy(Steer::Rewrite, &["--metrics-addr", &metrics.to_string()]);
    let server = &lab.topo.server;

    let (_, before) = scrape(server, metrics);
    assert_eq!(before.value("tproxy_flows_open"), 0.0);
    assert_eq!(before.value("tproxy_flows_created_total"), 0.0);

    lab.topo.client.run(|| {
        let mut held = Vec::new();
        for i in 0..N {
            let ip = if i % 2 == 0 { SERVER_IP } else { SERVER_IP6 };
            let mut c = TcpStream::connect(addr(ip, 8000)).unwrap();
            c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
            c.write_all(format!("hold {i}\n").as_bytes()).unwrap();
            let mut b = [0u8; 1];
            c.read_exact(&mut b).unwrap(); // the app answered: the pair exists
            held.push(c);
        }
        eventually(
            "both ends of every held connection accelerated",
            Duration::from_secs(120),
            || stats(server)["accel_sockets"] == 2 * N as u64,
        );
        // Quiet now (only connection-driven counters are compared: ARP
        // and router solicitations may still move the packet counters).
        let (resp, m) = scrape(server, metrics);
        let s = stats(server);
        eprintln!("{}", resp.body);

        // Every counter, as a Prometheus counter.
        for c in Counter::ALL {
            let family = format!("tproxy_{}", c.name());
            assert_eq!(
                m.types.get(&family).map(String::as_str),
                Some("counter"),
                "{family}"
            );
            let v = m.value(&format!("{family}_total"));
            assert!(v >= 0.0);
        }
        let created = m.value("tproxy_flows_created_total");
        assert!(created >= N as f64, "steered SYNs {created} < {N}");
        for name in [
            "flows_created",
            "flows_established",
            "sockhash_inserted",
            "getsockopt_answered",
            "flows_closed",
        ] {
            assert_eq!(
                m.value(&format!("tproxy_{name}_total")),
                s["counters"][name].as_u64().unwrap() as f64,
                "{name}: scrape and `stats --json` differ"
            );
        }
        assert!(m.value("tproxy_ingress_steered_total") >= N as f64);

        // Gauges.
        for (metric, key, want) in [
            ("tproxy_flows_open", "flows", Some(N)),
            ("tproxy_flows_active", "flows_active", Some(N)),
            ("tproxy_flows_closing", "flows_closing", Some(0)),
            ("tproxy_flows_embryonic", "flows_embryonic", Some(0)),
            ("tproxy_accel_sockets", "accel_sockets", Some(2 * N)),
            ("tproxy_accel_queued_bytes", "accel_queued_bytes", None),
        ] {
            assert_eq!(m.types[metric], "gauge", "{metric}");
            let v = m.value(metric);
            assert_eq!(v, s[key].as_i64().unwrap() as f64, "{metric} vs {key}");
            if let Some(w) = want {
                assert_eq!(v, w as f64, "{metric}");
            }
        }

        // What is running.
        assert_eq!(m.types["tproxy_build"], "info");
        assert_eq!(
            m.labels("tproxy_build_info")["version"],
            env!("CARGO_PKG_VERSION")
        );
        let info = m.labels("tproxy_instance_info");
        assert_eq!(m.value("tproxy_instance_info"), 1.0);
        assert_eq!(info["iface"], "eth0");
        assert_eq!(info["steer"], "rewrite");
        assert_eq!(info["accel"], "on");
        assert_eq!(info["pid"], t.proc.pid().to_string());

        drop(held);
    });

    // Values are read at scrape time: the closed flows show at once.
    eventually(
        "closed flows on the next scrape",
        Duration::from_secs(120),
        || {
            let (_, m) = scrape(server, metrics);
            m.value("tproxy_flows_open") == 0.0 && m.value("tproxy_accel_sockets") == 0.0
        },
    );

    // Only /metrics.
    for path in ["/", "/metricsx", "/other"] {
        let r = server.run(|| http(metrics, path));
        assert_eq!(r.status, 404, "{path}");
    }
}

/// IPv6 listen address, --no-accel and the tproxy back-end in the info
/// metric; SIGTERM stops the endpoint with the rest.
#[test]
fn metrics_on_ipv6_loopback_name_the_instance() {
    let sb = Sandbox::new("tpx-mx-");
    let metrics: SocketAddr = "[::1]:9464".parse().unwrap();
    let t = sb.start(&[
        "--metrics-addr",
        &metrics.to_string(),
        "--no-accel",
        "--steer",
        "tproxy",
    ]);
    let (_, m) = scrape(&sb.ns, metrics);
    let info = m.labels("tproxy_instance_info");
    assert_eq!(info["steer"], "tproxy");
    assert_eq!(info["accel"], "off");
    assert_eq!(m.value("tproxy_accel_sockets"), 0.0);
    let (st, log) = t.terminate().unwrap();
    assert!(st.success(), "{log}");
    assert!(
        sb.ns
            .run(|| TcpStream::connect_timeout(&metrics, Duration::from_secs(1)))
            .is_err(),
        "endpoint still up after exit"
    );
}

/// An address already in use: one line naming the address and the flag,
/// exit 1, nothing installed.
#[test]
fn metrics_addr_in_use_is_one_line_and_installs_nothing() {
    let sb = Sandbox::new("tpx-mx-");
    let before = sb.tc_listing();
    let taken = sb.ns.run(|| TcpListener::bind("127.0.0.1:9464")).unwrap();
    let cg = sb.cg();
    let out = sb
        .ns
        .command(BIN)
        .args(["-i", "eth0", "-ports", "8000", "--cgroup", &cg])
        .args(["--metrics-addr", "127.0.0.1:9464"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    let lines: Vec<&str> = err.lines().collect();
    assert_eq!(lines.len(), 1, "{err}");
    assert!(
        lines[0].starts_with("tproxy: ")
            && lines[0].contains("127.0.0.1:9464")
            && lines[0].contains("--metrics-addr"),
        "{err}"
    );
    assert!(!sb.record_exists(), "runtime record left");
    assert_eq!(sb.tc_listing(), before, "tc state changed");
    assert_eq!(
        tproxy_lab::kernel::cgroup_programs(sb.cgroup.path()).unwrap(),
        vec![]
    );
    drop(taken);
}

// ---------------------------------------------------------------------------
// stats --watch

/// Connections through the proxy from the client namespace until `stop`
/// (at most 600 s), so the counters move while they are watched.
fn traffic(client: &Netns, stop: &AtomicBool) -> usize {
    client.run(|| {
        let started = Instant::now();
        let mut n = 0;
        while !stop.load(Ordering::Relaxed) && started.elapsed() < Duration::from_secs(600) {
            let r = exchange(addr(SERVER_IP, 8000), b"x\n").unwrap();
            assert_eq!(r.echoed, b"x\n");
            n += 1;
            std::thread::sleep(Duration::from_millis(5));
        }
        n
    })
}

/// `--json --interval 0.2`, piped: one JSON object a line, each with every
/// instance in the one-shot shape plus per-second rates; the rates are the
/// change of the totals over the time between the samples. SIGINT ends it
/// with status 0. Watched until it has given 8 samples and one of them saw
/// the traffic move (not for a fixed time: a busy machine gives fewer).
#[test]
fn stats_watch_json_streams_totals_and_consistent_rates() {
    let lab = Lab::new();
    let _p = lab.proxy(Proxy::Ours, Steer::Rewrite);
    let t = lab.tproxy(Steer::Rewrite, &[]);
    let stop = Arc::new(AtomicBool::new(false));
    std::thread::scope(|s| {
        let load = s.spawn(|| traffic(&lab.topo.client, &stop));
        let mut cmd = lab.topo.server.command(BIN);
        cmd.args(["stats", "--watch", "--json", "--interval", "0.2"]);
        let mut w = Logged::spawn("stats --watch", &mut cmd).unwrap();
        let saw_traffic = |lines: &[String]| {
            lines.iter().any(|l| {
                serde_json::from_str::<serde_json::Value>(l).is_ok_and(|v| {
                    v["instances"][0]["rates"]["flows_created"]
                        .as_f64()
                        .is_some_and(|r| r > 0.0)
                })
            })
        };
        let deadline = Instant::now() + Duration::from_secs(300);
        loop {
            let lines = w.lines();
            if lines.len() >= 8 && saw_traffic(&lines) {
                break;
            }
            assert!(w.proc.is_running(), "the watch ended: {}", w.log());
            assert!(Instant::now() < deadline, "{}", w.log());
            std::thread::sleep(Duration::from_millis(50));
        }
        stop.store(true, Ordering::Relaxed);
        w.proc.signal(libc::SIGINT);
        let st = w.wait_timeout(Duration::from_secs(120)).unwrap();
        let lines = w.lines();
        assert!(st.success(), "SIGINT: {st}\n{}", w.log());
        assert!(lines.len() >= 8, "{}", w.log());
        let sent = load.join().unwrap();
        assert!(sent > 0);

        let mut prev: Option<serde_json::Value> = None;
        let mut moving = 0;
        for line in &lines {
            let v: serde_json::Value =
                serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line:?}"));
            assert!(v["time"].as_f64().unwrap() > 1.6e9, "{v}");
            let insts = v["instances"].as_array().unwrap();
            assert_eq!(insts.len(), 1, "{v}");
            let i = &insts[0];
            // The one-shot object's fields.
            assert_eq!(i["pid"], t.proc.pid());
            assert_eq!(i["iface"], "eth0");
            assert_eq!(i["steer"], "rewrite");
            for k in [
                "netns_inode",
                "flows",
                "flows_active",
                "flows_closing",
                "flows_embryonic",
                "accel_sockets",
                "accel_queued_bytes",
            ] {
                assert!(i[k].is_u64() || i[k].is_i64(), "{k}: {i}");
            }
            for c in Counter::ALL {
                assert!(i["counters"][c.name()].is_u64(), "{}: {i}", c.name());
            }
            match &prev {
                None => assert!(i["rates"].is_null(), "first sample has no rates: {i}"),
                Some(p) => {
                    // The time between the samples, as measured: the wall
                    // clock's `time` of each says the same (both are read
                    // at the sample; 0.1 s leaves room for a preemption
                    // between the two reads). Not a range around the 0.2 s
                    // interval: a busy machine stretches it.
                    let dt = v["elapsed_s"].as_f64().unwrap();
                    let wall = v["time"].as_f64().unwrap() - p["time"].as_f64().unwrap();
                    assert!(dt > 0.0, "elapsed {dt}");
                    assert!(
                        (dt - wall).abs() < 0.1,
                        "elapsed {dt} s, but the samples' times are {wall} s apart"
                    );
                    let pi = &p["instances"][0];
                    for c in Counter::ALL {
                        let n = c.name();
                        let delta = i["counters"][n].as_u64().unwrap()
                            - pi["counters"][n].as_u64().unwrap();
                        let rate = i["rates"][n].as_f64().unwrap();
                        let want = delta as f64 / dt;
                        assert!(
                            (rate - want).abs() <= 1e-6 * want.max(1.0),
                            "{n}: rate {rate}, {delta} in {dt} s"
                        );
                    }
                    if i["rates"]["flows_created"].as_f64().unwrap() > 0.0 {
                        moving += 1;
                    }
                }
            }
            prev = Some(v);
        }
        assert!(moving > 0, "no sample saw the traffic: {lines:?}");
    });
}

/// The human form when piped: one line per interval (a timestamp, the
/// instance, its flows, the counters that moved); a closed pipe ends it
/// quietly with status 0. Samples never come faster than the interval: the
/// k-th line arrives at least k intervals after the start (a slow sample
/// delays the next, it never bunches them). How much later is the
/// machine's business, so no upper bound.
#[test]
fn stats_watch_piped_prints_a_line_per_interval_and_ends_on_a_closed_pipe() {
    let sb = Sandbox::new("tpx-sw-");
    let t = sb.start(&[]);
    let (reader, writer) = std::io::pipe().unwrap();
    let (err_r, err_w) = std::io::pipe().unwrap();
    let mut cmd = sb.ns.command(BIN);
    cmd.args(["stats", "--watch", "--interval", "0.2"])
        .stdin(Stdio::null())
        .stdout(writer)
        .stderr(err_w);
    let spawned = Instant::now();
    let mut w = Proc::spawn("stats --watch", &mut cmd).unwrap();
    drop(cmd); // our copies of the pipes' write ends
    let mut got: Vec<(String, Duration)> = Vec::new();
    let mut lines = BufReader::new(reader).lines();
    while got.len() < 6 {
        let line = lines.next().expect("watch ended early").unwrap();
        got.push((line, spawned.elapsed()));
    }
    drop(lines); // closes the pipe
    let st = w.wait_timeout(Duration::from_secs(120)).unwrap();
    let mut err = String::new();
    BufReader::new(err_r).read_to_string(&mut err).unwrap();
    assert!(st.success(), "closed pipe: {st}; stderr: {err}");
    assert!(err.is_empty(), "stderr: {err}");

    let pid = format!("pid {}", t.proc.pid());
    for (l, _) in &got {
        assert!(l.contains("eth0") && l.contains(&pid), "{l}");
        assert!(l.contains("flows 0 open"), "{l}");
        assert!(!l.contains('\x1b'), "terminal escapes when piped: {l:?}");
        // A UTC time first: `2026-05-04T03:02:01.123Z`.
        let ts = l.split_whitespace().next().unwrap();
        assert!(
            ts.len() == 24 && ts.ends_with('Z') && ts.as_bytes()[10] == b'T',
            "no timestamp in {l:?}"
        );
    }
    // Sample k is due k intervals after the watch started (after we
    // spawned it), and comes no earlier (5 ms for clock rounding).
    for (k, (l, at)) in got.iter().enumerate() {
        let due = Duration::from_millis(200 * k as u64).saturating_sub(Duration::from_millis(5));
        assert!(
            *at >= due,
            "line {k} came {at:?} after the start, before {due:?}: {l}; all: {got:?}"
        );
    }
}

/// On a terminal (a pty from `script`): the screen is redrawn in place
/// (cursor home and clear to the end each interval), with rates; SIGINT
/// ends it with status 0. Watched until it has drawn four frames (not for a
/// fixed time: a busy machine draws fewer), and never more frames than
/// intervals passed.
#[test]
fn stats_watch_on_a_terminal_redraws_in_place() {
    let sb = Sandbox::new("tpx-sw-");
    let _t = sb.start(&[]);
    let inner = format!("exec {BIN} stats --watch --interval 0.2");
    let started = Instant::now();
    let mut script = sb
        .ns
        .command("script")
        .args(["-qefc", &inner, "/dev/null"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let screen = Arc::new(std::sync::Mutex::new(Vec::new()));
    let mut out = script.stdout.take().unwrap();
    let reader = {
        let screen = screen.clone();
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n) = out.read(&mut buf) {
                if n == 0 {
                    break;
                }
                screen.lock().unwrap().extend_from_slice(&buf[..n]);
            }
        })
    };
    let frames = || {
        let s = screen.lock().unwrap();
        s.windows(3).filter(|w| *w == b"\x1b[H").count()
    };
    eventually("four frames", Duration::from_secs(300), || frames() >= 4);
    // The watch itself: script's child (it execs it).
    let children =
        std::fs::read_to_string(format!("/proc/{0}/task/{0}/children", script.id())).unwrap();
    let watch: i32 = children.split_whitespace().next().unwrap().parse().unwrap();
    // SAFETY: kill(2) on the child of our own child.
    unsafe { libc::kill(watch, libc::SIGINT) };
    let status = script.wait().unwrap();
    let took = started.elapsed();
    reader.join().unwrap();
    let mut err = String::new();
    script
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut err)
        .unwrap();
    let screen = String::from_utf8_lossy(&screen.lock().unwrap()).into_owned();
    assert!(status.success(), "{status}: {screen:?} {err}");
    let frames = screen.matches("\x1b[H").count();
    // One frame per interval at most (and one at the start).
    let most = (took.as_secs_f64() / 0.2) as usize + 1;
    assert!(
        (4..=most).contains(&frames),
        "{frames} redraws in {took:?} at 0.2 s: {screen:?}"
    );
    assert!(screen.contains("\x1b[J"), "{screen:?}");
    assert!(screen.contains("/s"), "no rates: {screen:?}");
    assert!(screen.contains("ingress_packets"), "{screen:?}");
}

/// The watched instance stops: the watch ends with one error line naming
/// it, status 1.
#[test]
fn stats_watch_ends_with_an_error_when_the_instance_goes_away() {
    let sb = Sandbox::new("tpx-sw-");
    let t = sb.start(&[]);
    let pid = t.proc.pid();
    let mut cmd = sb.ns.command(BIN);
    cmd.args(["stats", "--watch", "--interval", "0.2"]);
    let mut w = Logged::spawn("stats --watch", &mut cmd).unwrap();
    w.wait_for("eth0", STARTUP).unwrap();
    let (st, log) = t.terminate().unwrap();
    assert!(st.success(), "{log}");
    let st = w.wait_timeout(Duration::from_secs(120)).unwrap();
    let lines = w.lines();
    assert_eq!(st.code(), Some(1), "{}", w.log());
    let last = lines.last().unwrap();
    assert!(
        last.starts_with("tproxy: ") && last.contains(&format!("pid {pid}")),
        "{}",
        w.log()
    );
    assert_eq!(
        lines.iter().filter(|l| l.starts_with("tproxy: ")).count(),
        1,
        "{}",
        w.log()
    );
}
