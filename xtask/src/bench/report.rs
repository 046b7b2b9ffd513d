//! results.json and report.md from the samples of a run.
use std::{collections::BTreeMap, fmt::Write as _};

use serde::Serialize;

use super::{
    Sample, Setup, size_label,
    stats::{Summary, summarize},
};

#[derive(Serialize)]
pub struct Results {
    pub environment: serde_json::Value,
    pub setups: Vec<&'static str>,
    pub sizes: Vec<u64>,
    pub reps: usize,
    pub seconds_per_measurement: u64,
    /// setup -> metric -> summary over repetitions.
    pub summary: BTreeMap<String, BTreeMap<String, Summary>>,
    pub units: BTreeMap<String, &'static str>,
    /// The ratios that matter, from medians.
    pub ratios: BTreeMap<String, f64>,
    pub samples: Vec<Sample>,
}

pub const LATENCY_KEYS: [&str; 6] = ["avg", "p50", "p90", "p99", "p99.9", "max"];

impl Results {
    pub fn new(
        environment: serde_json::Value,
        setups: &[Setup],
        sizes: &[u64],
        reps: usize,
        seconds: u64,
        samples: Vec<Sample>,
    ) -> Results {
        let mut grouped: BTreeMap<(String, String), Vec<f64>> = BTreeMap::new();
        let mut units = BTreeMap::new();
        for s in &samples {
            grouped
                .entry((s.setup.to_string(), s.metric.clone()))
                .or_default()
                .push(s.value);
            units.insert(s.metric.clone(), s.unit);
        }
        let mut summary: BTreeMap<String, BTreeMap<String, Summary>> = BTreeMap::new();
        for ((setup, metric), v) in grouped {
            if let Some(s) = summarize(&v) {
                summary.entry(setup).or_default().insert(metric, s);
            }
        }
        let mut r = Results {
            environment,
            setups: setups.iter().map(|s| s.name()).collect(),
            sizes: sizes.to_vec(),
            reps,
            seconds_per_measurement: seconds,
            summary,
            units,
            ratios: BTreeMap::new(),
            samples,
        };
        r.ratios = r.compute_ratios();
        r
    }

    pub fn median(&self, setup: &str, metric: &str) -> Option<f64> {
        Some(self.summary.get(setup)?.get(metric)?.median)
    }

    fn compute_ratios(&self) -> BTreeMap<String, f64> {
        let mut out = BTreeMap::new();
        let mut ratio = |name: String, a: Option<f64>, b: Option<f64>| {
            if let (Some(a), Some(b)) = (a, b)
                && b != 0.0
            {
                out.insert(name, a / b);
            }
        };
        let pairs = [
            ("proxy", "base"),
            ("proxy+accel", "proxy"),
            ("proxy+accel", "nft-redirect"),
            ("proxy+accel", "base"),
            ("proxy", "nft-redirect"),
        ];
        for size in &self.sizes {
            let m = format!("throughput/{}", size_label(*size));
            for (a, b) in pairs {
                ratio(
                    format!("{m} {a}/{b}"),
                    self.median(a, &m),
                    self.median(b, &m),
                );
            }
        }
        for m in ["latency/p50", "latency/p99", "loopback/p50", "conn_rate"] {
            for (a, b) in pairs {
                ratio(format!("{m} {a}/{b}"), self.median(a, m), self.median(b, m));
            }
        }
        // The proxy's own cost on p50 latency, with and without accel.
        if let (Some(base), Some(p), Some(a)) = (
            self.median("base", "latency/p50"),
            self.median("proxy", "latency/p50"),
            self.median("proxy+accel", "latency/p50"),
        ) && p - base != 0.0
        {
            out.insert(
                "latency/p50 overhead (proxy+accel - base)/(proxy - base)".into(),
                (a - base) / (p - base),
            );
        }
        out
    }
}

fn cell(r: &Results, setup: &str, metric: &str) -> String {
    match r.summary.get(setup).and_then(|m| m.get(metric)) {
        Some(s) if s.n > 1 => format!("{:.2} ({:.2}–{:.2})", s.median, s.min, s.max),
        Some(s) => format!("{:.2}", s.median),
        None => "–".into(),
    }
}

fn table(out: &mut String, r: &Results, title: &str, rows: &[(String, String)]) {
    let _ = writeln!(out, "\n### {title}\n");
    let _ = write!(out, "| |");
    for s in &r.setups {
        let _ = write!(out, " {s} |");
    }
    let _ = write!(out, "\n|---|");
    for _ in &r.setups {
        let _ = write!(out, "---|");
    }
    let _ = writeln!(out);
    for (label, metric) in rows {
        let _ = write!(out, "| {label} |");
        for s in &r.setups {
            let _ = write!(out, " {} |", cell(r, s, metric));
        }
        let _ = writeln!(out);
    }
}

pub fn markdown(r: &Results) -> String {
    let mut out = String::new();
    let env = &r.environment;
    let _ = writeln!(out, "## tproxy benchmark\n");
    let _ = writeln!(
        out,
        "Kernel {}, {} ({} CPUs); {}; {}; {}; commit {}; {}.",
        env["kernel"].as_str().unwrap_or("?"),
        env["cpu"].as_str().unwrap_or("?"),
        env["cpus"],
        env["iperf3"].as_str().unwrap_or("?"),
        env["sockperf"].as_str().unwrap_or("?"),
        env["haproxy"].as_str().unwrap_or("?"),
        env["git_commit"].as_str().unwrap_or("?"),
        env["date_utc"].as_str().unwrap_or("?"),
    );
    let _ = writeln!(
        out,
        "\nMedians of {} interleaved repetitions, (min–max) beside them; {} s per measurement; \
         CPU placement: {}. \
         Proxy: HAProxy (tcp mode). base = client→app; proxy = tproxy rewrite steering, no accel; \
         proxy+accel = with sockops/sk_msg; nft-redirect = the same proxy behind an nftables REDIRECT; \
         proxy-tproxy-backend = tproxy's tproxy back-end.",
        r.reps,
        r.seconds_per_measurement,
        env["placement"]
            .as_str()
            .unwrap_or("the scheduler's (nothing pinned)")
    );
    let rows: Vec<(String, String)> = r
        .sizes
        .iter()
        .map(|s| {
            (
                format!("{} writes", size_label(*s)),
                format!("throughput/{}", size_label(*s)),
            )
        })
        .collect();
    table(
        &mut out,
        r,
        "iperf3 throughput, client → app (Gbit/s)",
        &rows,
    );
    let lat = |prefix: &str| -> Vec<(String, String)> {
        LATENCY_KEYS
            .iter()
            .map(|k| (k.to_string(), format!("{prefix}/{k}")))
            .collect()
    };
    table(
        &mut out,
        r,
        "sockperf ping-pong latency, 64 B, client → app (µs)",
        &lat("latency"),
    );
    table(
        &mut out,
        r,
        "Process-to-process loopback latency, 64 B (µs): the proxy→app leg's shape; the SOCKHASH is in play under proxy+accel only",
        &lat("loopback"),
    );
    table(
        &mut out,
        r,
        "CPU time per ping-pong round trip (µs, schedstat): where the proxy tax goes",
        &[
            ("HAProxy".into(), "rt_cpu/haproxy".into()),
            ("app (sockperf server)".into(), "rt_cpu/app".into()),
        ],
    );
    table(
        &mut out,
        r,
        "Connection rate (new connections/s, 2 clients, one small exchange each)",
        &[("conn/s".into(), "conn_rate".into())],
    );
    let cpu: Vec<(String, String)> = r
        .sizes
        .iter()
        .map(|s| {
            (
                format!("{} writes", size_label(*s)),
                format!("cpu_s_per_gb/{}", size_label(*s)),
            )
        })
        .collect();
    table(
        &mut out,
        r,
        "CPU seconds per GB moved (whole host, during iperf3)",
        &cpu,
    );
    let progs: std::collections::BTreeSet<String> = r
        .summary
        .values()
        .flat_map(|m| m.keys())
        .filter_map(|k| k.strip_prefix("bpf_ns_per_run/").map(String::from))
        .collect();
    let rows: Vec<(String, String)> = progs
        .iter()
        .map(|p| (p.clone(), format!("bpf_ns_per_run/{p}")))
        .collect();
    if !rows.is_empty() {
        table(
            &mut out,
            r,
            "eBPF cost: ns per program run (kernel.bpf_stats_enabled on for a window of its own: 1 s of iperf3 at 16 KiB, 1 s of sockperf and 0.5 s of new connections per set-up; off during every other measurement, where it would cost ~10 % at 1448 B)",
            &rows,
        );
    }
    let _ = writeln!(out, "\n### Ratios (of medians)\n");
    let _ = writeln!(out, "| ratio | value |\n|---|---|");
    for (k, v) in &r.ratios {
        let _ = writeln!(out, "| {k} | {v:.3} |");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(setup: &'static str, rep: usize, metric: &str, value: f64) -> Sample {
        Sample {
            setup,
            rep,
            metric: metric.into(),
            unit: "x",
            value,
        }
    }

    #[test]
    fn summaries_ratios_and_markdown() {
        let mut samples = Vec::new();
        for rep in 1..=3 {
            let f = rep as f64;
            samples.push(sample("base", rep, "throughput/64 KiB", 10.0 + f));
            samples.push(sample("proxy", rep, "throughput/64 KiB", 8.0 + f));
            samples.push(sample("proxy+accel", rep, "throughput/64 KiB", 14.0 + f));
            samples.push(sample("base", rep, "latency/p50", 20.0));
            samples.push(sample("proxy", rep, "latency/p50", 40.0));
            samples.push(sample("proxy+accel", rep, "latency/p50", 28.0));
        }
        let r = Results::new(
            serde_json::json!({"kernel": "6.18"}),
            &[Setup::Base, Setup::Proxy, Setup::ProxyAccel],
            &[64 << 10],
            3,
            1,
            samples,
        );
        assert_eq!(r.median("base", "throughput/64 KiB"), Some(12.0));
        assert_eq!(r.ratios["throughput/64 KiB proxy+accel/proxy"], 16.0 / 10.0);
        assert_eq!(
            r.ratios["latency/p50 overhead (proxy+accel - base)/(proxy - base)"],
            8.0 / 20.0
        );
        let md = markdown(&r);
        assert!(
            md.contains(
                "| 64 KiB writes | 12.00 (11.00–13.00) | 10.00 (9.00–11.00) | 16.00 (15.00–17.00) |"
            ),
            "{md}"
        );
        assert!(md.contains("| latency/p50 proxy/base | 2.000 |"), "{md}");
        assert_eq!(size_label(1448), "1448 B");
        assert_eq!(size_label(16 << 10), "16 KiB");
        assert_eq!(size_label(1 << 20), "1 MiB");
    }
}
