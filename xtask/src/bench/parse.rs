//! Parsers for the tools' raw output (kept raw in the results folder).
use anyhow::{Context as _, Result};

/// What an iperf3 client run says (its `-J` JSON).
#[derive(Debug, PartialEq)]
pub struct Iperf3 {
    pub bits_per_second: f64,
    pub bytes: f64,
    pub seconds: f64,
}

pub fn iperf3_json(text: &str) -> Result<Iperf3> {
    let v: serde_json::Value = serde_json::from_str(text).context("iperf3 JSON")?;
    if let Some(e) = v["error"].as_str() {
        anyhow::bail!("iperf3: {e}");
    }
    let r = &v["end"]["sum_received"];
    Ok(Iperf3 {
        bits_per_second: r["bits_per_second"]
            .as_f64()
            .context("end.sum_received.bits_per_second")?,
        bytes: r["bytes"].as_f64().context("end.sum_received.bytes")?,
        seconds: r["seconds"].as_f64().context("end.sum_received.seconds")?,
    })
}

/// sockperf ping-pong latency (µs, sockperf's one-way figure = RTT/2).
#[derive(Debug, PartialEq)]
pub struct Sockperf {
    pub avg: f64,
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
    pub p999: f64,
    pub max: f64,
    pub observations: f64,
    /// Round trips over the whole run, warm-up included ([Total Run]).
    pub round_trips: f64,
}

/// Strips the ANSI colour sequences sockperf puts around some lines.
fn plain(line: &str) -> String {
    let mut out = String::with_capacity(line.len());
    let mut chars = line.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for d in chars.by_ref() {
                if d.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

pub fn sockperf(text: &str) -> Result<Sockperf> {
    let mut avg = None;
    let mut obs = None;
    let mut pct = std::collections::HashMap::new();
    let mut max = None;
    let mut round_trips = None;
    for raw in text.lines() {
        let line = plain(raw);
        if line.contains("[Total Run]") {
            round_trips = line
                .split("SentMessages=")
                .nth(1)
                .and_then(|r| r.split(';').next())
                .and_then(|v| v.trim().parse().ok());
        } else if let Some(rest) = line.split("avg-latency=").nth(1) {
            avg = rest.split_whitespace().next().and_then(|v| v.parse().ok());
        } else if let Some(rest) = line
            .split("Total ")
            .nth(1)
            .filter(|r| r.contains("observations"))
        {
            obs = rest.split_whitespace().next().and_then(|v| v.parse().ok());
        } else if let Some(rest) = line.split("---> percentile ").nth(1) {
            let mut it = rest.split('=');
            if let (Some(p), Some(v)) = (it.next(), it.next()) {
                pct.insert(p.trim().to_string(), v.trim().parse::<f64>()?);
            }
        } else if let Some(rest) = line.split("<MAX> observation =").nth(1) {
            max = rest.trim().parse().ok();
        }
    }
    let p = |k: &str| {
        pct.get(k)
            .copied()
            .with_context(|| format!("sockperf percentile {k} missing"))
    };
    Ok(Sockperf {
        avg: avg.context("sockperf avg-latency missing")?,
        p50: p("50.000")?,
        p90: p("90.000")?,
        p99: p("99.000")?,
        p999: p("99.900")?,
        max: max.context("sockperf <MAX> missing")?,
        observations: obs.unwrap_or(0.0),
        round_trips: round_trips.unwrap_or(0.0),
    })
}

/// An HTTP load run of wrk with `wrk-percentiles.lua`: requests per second
/// (wrk's own line) and latency in µs from the script's line (exact, where
/// `--latency`'s table rounds to its unit and stops at p99).
#[derive(Debug, PartialEq)]
pub struct Wrk {
    pub rps: f64,
    pub requests: f64,
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
    pub p999: f64,
    pub max: f64,
    pub errors: f64,
}

pub fn wrk(text: &str) -> Result<Wrk> {
    let mut rps = None;
    let mut lua = std::collections::HashMap::new();
    for line in text.lines() {
        let line = line.trim();
        if let Some(v) = line.strip_prefix("Requests/sec:") {
            rps = v.trim().parse::<f64>().ok();
        } else if let Some(rest) = line.strip_prefix("tproxy-bench:") {
            for kv in rest.split_whitespace() {
                if let Some((k, v)) = kv.split_once('=')
                    && let Ok(v) = v.parse::<f64>()
                {
                    lua.insert(k.to_string(), v);
                }
            }
        }
    }
    if text.contains("Non-2xx or 3xx responses") {
        anyhow::bail!("wrk: the app answered with errors");
    }
    let l = |k: &str| {
        lua.get(k)
            .copied()
            .with_context(|| format!("wrk: {k} missing (the tproxy-bench Lua line)"))
    };
    Ok(Wrk {
        rps: rps.context("wrk: Requests/sec missing")?,
        requests: l("requests")?,
        p50: l("p50")?,
        p90: l("p90")?,
        p99: l("p99")?,
        p999: l("p99.9")?,
        max: l("max")?,
        errors: l("errors")?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const DATA: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/testdata");

    #[test]
    fn parses_recorded_iperf3() {
        let text = std::fs::read_to_string(format!("{DATA}/iperf3.json")).unwrap();
        let r = iperf3_json(&text).unwrap();
        assert!(r.bits_per_second > 1e8, "{r:?}");
        assert!(r.bytes > 0.0 && r.seconds > 0.5);
        assert!(iperf3_json(r#"{"error": "unable to connect"}"#).is_err());
        assert!(iperf3_json("not json").is_err());
    }

    #[test]
    fn parses_recorded_sockperf() {
        let text = std::fs::read_to_string(format!("{DATA}/sockperf.txt")).unwrap();
        let r = sockperf(&text).unwrap();
        assert_eq!(r.avg, 14.302);
        assert_eq!(r.p50, 13.445);
        assert_eq!(r.p90, 15.549);
        assert_eq!(r.p99, 25.597);
        assert_eq!(r.p999, 36.165);
        assert_eq!(r.max, 242.975);
        assert_eq!(r.observations, 54108.0);
        assert_eq!(r.round_trips, 80624.0);
        assert!(sockperf("sockperf: nothing useful").is_err());
    }

    #[test]
    fn parses_recorded_wrk() {
        let text = std::fs::read_to_string(format!("{DATA}/wrk.txt")).unwrap();
        let r = wrk(&text).unwrap();
        assert_eq!(r.rps, 47981.34);
        assert_eq!(r.requests, 48025.0);
        assert_eq!(
            (r.p50, r.p90, r.p99, r.p999),
            (269.0, 474.0, 3065.0, 4347.0)
        );
        assert_eq!((r.max, r.errors), (8283.0, 0.0));
        // Without the script's line there are no percentiles.
        let plain: String = text
            .lines()
            .filter(|l| !l.starts_with("tproxy-bench:"))
            .map(|l| format!("{l}\n"))
            .collect();
        assert!(wrk(&plain).is_err());
        let bad = text.replace(
            "Requests/sec:",
            "Non-2xx or 3xx responses: 3\nRequests/sec:",
        );
        assert!(wrk(&bad).is_err());
        assert!(wrk("wrk: nothing").is_err());
    }
}
