//! `tproxy stats`: the counters, flow table and accelerated sockets of the
//! running instance(s), read from their maps through the ids in their
//! runtime records. Once, or with `--watch` every `--interval` with
//! per-second rates: redrawn in place on a terminal, one line per interval
//! when piped, one JSON object per line with `--json`.
use std::{
    io::{self, IsTerminal as _, Write},
    time::{Duration, Instant, SystemTime},
};

use tokio::signal::unix::{SignalKind, signal};
use tproxy_common::{Counter, FLOW_ACTIVE_NS};

use crate::{
    config::options::Steer,
    observe::{Error, Result},
    target::{
        inspect::{Maps, Snapshot},
        record::{self, Record},
    },
};

/// Which instances `tproxy stats` reads, and how it prints them.
#[derive(Clone, Debug)]
pub struct Query {
    /// Only the instance on this interface.
    pub iface: Option<String>,
    /// Every network namespace, not just this one.
    pub all: bool,
    pub json: bool,
    /// Print every `interval` until Ctrl-C.
    pub watch: bool,
    pub interval: Duration,
}

/// `tproxy stats …`. A closed stdout (`| head`) ends it quietly.
pub fn run(args: &Query) -> Result<()> {
    crate::sys::system::check_privileges()?;
    let netns = crate::sys::system::netns_inode()?;
    let records: Vec<Record> = record::live_records()
        .into_iter()
        .filter(|r| args.all || r.installed.netns_inode == netns)
        .filter(|r| args.iface.as_ref().is_none_or(|i| &r.installed.iface == i))
        .collect();
    if records.is_empty() {
        return Err(Error::NoInstance {
            iface: args.iface.clone(),
        });
    }
    let result = if args.watch {
        watch(args, records)
    } else {
        once(args, &records)
    };
    match result {
        Err(Error::Sys(crate::sys::Error::Io { source, .. }))
            if source.kind() == io::ErrorKind::BrokenPipe =>
        {
            Ok(())
        }
        r => r,
    }
}

fn stdout_err(e: io::Error) -> Error {
    Error::io("writing to stdout", e)
}

fn steer_name(s: Steer) -> &'static str {
    match s {
        Steer::Rewrite => "rewrite",
        Steer::Tproxy => "tproxy",
    }
}

/// One instance as `tproxy stats --json` has always printed it.
pub fn instance_json(r: &Record, s: &Snapshot) -> serde_json::Value {
    let counters: serde_json::Map<String, serde_json::Value> = s
        .counters
        .iter()
        .map(|(c, v)| (c.name().to_string(), (*v).into()))
        .collect();
    serde_json::json!({
        "pid": r.pid, "iface": r.installed.iface, "netns_inode": r.installed.netns_inode,
        "steer": r.steer, "flows": s.flows.open, "flows_active": s.flows.active,
        "flows_closing": s.flows.closing, "flows_embryonic": s.flows.embryonic,
        "accel_sockets": s.accel_sockets, "flows_in_use": s.flows_in_use,
        "accel_queued_bytes": s.accel_queued_bytes, "counters": counters
    })
}

fn once(args: &Query, records: &[Record]) -> Result<()> {
    let mut out = io::stdout().lock();
    let mut all = Vec::new();
    for r in records {
        let s = Maps::of(r)
            .and_then(|m| m.snapshot())
            .map_err(|e| crate::target::inspect::explain(e, r.pid))?;
        if args.json {
            all.push(instance_json(r, &s));
            continue;
        }
        writeln!(
            out,
            "tproxy pid {} on {} (netns {}, steer {:?}): {} open flow(s) ({} active in the last {} s), {} closing, {} embryonic; {} accelerated socket(s), {} byte(s) queued",
            r.pid,
            r.installed.iface,
            r.installed.netns_inode,
            r.steer,
            s.flows.open,
            s.flows.active,
            FLOW_ACTIVE_NS / 1_000_000_000,
            s.flows.closing,
            s.flows.embryonic,
            s.accel_sockets,
            s.accel_queued_bytes,
        )
        .map_err(stdout_err)?;
        for (c, v) in &s.counters {
            writeln!(out, "  {:<22} {v}", c.name()).map_err(stdout_err)?;
        }
    }
    if args.json {
        let text = serde_json::to_string_pretty(&all).expect("JSON values serialize");
        writeln!(out, "{text}").map_err(stdout_err)?;
    }
    out.flush().map_err(stdout_err)
}

/// Per-second rates of the counters between two snapshots `dt` apart.
pub fn rates(prev: &Snapshot, cur: &Snapshot, dt: Duration) -> Vec<(Counter, f64)> {
    let secs = dt.as_secs_f64();
    cur.counters
        .iter()
        .zip(&prev.counters)
        .map(|(&(c, now), &(_, before))| (c, now.saturating_sub(before) as f64 / secs))
        .collect()
}

/// How the watch prints.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Mode {
    /// One JSON object per interval, one line each.
    Json,
    /// One line per instance and interval (piped, logged).
    Lines,
    /// Redrawn in place (a terminal).
    Screen,
}

struct Watched {
    record: Record,
    maps: Maps,
}

impl Watched {
    /// The same instance still holds its record's lock.
    fn alive(&self, live: &[Record]) -> bool {
        live.iter().any(|r| {
            (
                r.pid,
                r.installed.netns_inode,
                &r.installed.iface,
                r.counters_map_id,
            ) == (
                self.record.pid,
                self.record.installed.netns_inode,
                &self.record.installed.iface,
                self.record.counters_map_id,
            )
        })
    }

    fn gone(&self) -> Error {
        Error::InstanceGone {
            pid: self.record.pid,
            iface: self.record.installed.iface.clone(),
        }
    }
}

/// Reads every watched instance; a stopped one ends the watch. The maps of
/// an instance that exited can outlive it (accelerated sockets keep the
/// SOCKHASH and, through it, the programs and their maps), so the record's
/// lock is what says whether it still runs.
fn sample(watched: &[Watched]) -> Result<Vec<Snapshot>> {
    let live = record::live_records();
    let mut out = Vec::with_capacity(watched.len());
    for w in watched {
        if !w.alive(&live) {
            return Err(w.gone());
        }
        match w.maps.snapshot() {
            Ok(s) => out.push(s),
            Err(_) if !w.alive(&record::live_records()) => return Err(w.gone()),
            Err(e) => return Err(crate::target::inspect::explain(e, w.record.pid).into()),
        }
    }
    Ok(out)
}

fn watch(args: &Query, records: Vec<Record>) -> Result<()> {
    let watched = records
        .into_iter()
        .map(|record| {
            let maps = Maps::of(&record)?;
            Ok(Watched { record, maps })
        })
        .collect::<Result<Vec<_>>>()?;
    let mode = if args.json {
        Mode::Json
    } else if io::stdout().is_terminal() {
        Mode::Screen
    } else {
        Mode::Lines
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| Error::io("starting the async runtime", e))?;
    rt.block_on(async {
        let sig = |k| signal(k).map_err(|e| Error::io("installing a signal handler", e));
        let (mut int, mut term) = (sig(SignalKind::interrupt())?, sig(SignalKind::terminate())?);
        let mut tick = tokio::time::interval(args.interval);
        // A slow read or write shifts the next sample; it never bunches
        // samples (one line per interval).
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut out = io::stdout().lock();
        let mut prev: Option<(Instant, Vec<Snapshot>)> = None;
        loop {
            tokio::select! {
                _ = int.recv() => break,
                _ = term.recv() => break,
                _ = tick.tick() => {
                    let snaps = sample(&watched)?;
                    let now = Instant::now();
                    let frame = Frame {
                        args,
                        watched: &watched,
                        snaps: &snaps,
                        prev: prev.as_ref().map(|(t, s)| (now - *t, s.as_slice())),
                        time: SystemTime::now(),
                    };
                    let text = match mode {
                        Mode::Json => frame.json(),
                        Mode::Lines => frame.lines(),
                        Mode::Screen => frame.screen(prev.is_none(), terminal_size()),
                    };
                    out.write_all(text.as_bytes()).map_err(stdout_err)?;
                    out.flush().map_err(stdout_err)?;
                    prev = Some((now, snaps));
                }
            }
        }
        Ok(())
    })
}

/// One sample of every watched instance, and the one before it.
struct Frame<'a> {
    args: &'a Query,
    watched: &'a [Watched],
    snaps: &'a [Snapshot],
    /// Time since the previous sample, and its snapshots.
    prev: Option<(Duration, &'a [Snapshot])>,
    time: SystemTime,
}

impl Frame<'_> {
    fn rates(&self, i: usize) -> Option<Vec<(Counter, f64)>> {
        self.prev.map(|(dt, p)| rates(&p[i], &self.snaps[i], dt))
    }

    /// `{"time": unix s, "elapsed_s": s since the previous sample (null on
    /// the first), "instances": [one-shot object + "rates" (null on the
    /// first)]}`.
    fn json(&self) -> String {
        let instances: Vec<serde_json::Value> = self
            .watched
            .iter()
            .zip(self.snaps)
            .enumerate()
            .map(|(i, (w, s))| {
                let mut v = instance_json(&w.record, s);
                v["rates"] = match self.rates(i) {
                    Some(r) => r
                        .iter()
                        .map(|(c, v)| (c.name().to_string(), serde_json::Value::from(*v)))
                        .collect::<serde_json::Map<_, _>>()
                        .into(),
                    None => serde_json::Value::Null,
                };
                v
            })
            .collect();
        let time = self
            .time
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap_or_default()
            .as_secs_f64();
        let line = serde_json::json!({
            "time": (time * 1000.0).round() / 1000.0,
            "elapsed_s": self.prev.map(|(dt, _)| dt.as_secs_f64()),
            "instances": instances,
        });
        format!("{line}\n")
    }

    /// `TIME IFACE pid N: flows …; accel …; counter total (+rate/s), …`
    /// for the counters that are not zero.
    fn lines(&self) -> String {
        let mut out = String::new();
        let ts = utc_timestamp(self.time);
        for (i, (w, s)) in self.watched.iter().zip(self.snaps).enumerate() {
            let rates = self.rates(i);
            let counters: Vec<String> = s
                .counters
                .iter()
                .enumerate()
                .filter(|(_, (_, v))| *v > 0)
                .map(|(j, (c, v))| match &rates {
                    Some(r) => format!("{} {v} (+{}/s)", c.name(), fmt_rate(r[j].1)),
                    None => format!("{} {v}", c.name()),
                })
                .collect();
            out += &format!(
                "{ts} {} pid {}: flows {} open, {} active, {} closing, {} embryonic; accel {} sockets, {} bytes queued; {}\n",
                w.record.installed.iface,
                w.record.pid,
                s.flows.open,
                s.flows.active,
                s.flows.closing,
                s.flows.embryonic,
                s.accel_sockets,
                s.accel_queued_bytes,
                counters.join(", ")
            );
        }
        out
    }

    /// The whole screen: cursor home, each line cleared to its end, the
    /// rest of the screen cleared. Cut to the terminal's size so that
    /// nothing scrolls (which would break the redraw).
    fn screen(&self, first: bool, size: Option<(usize, usize)>) -> String {
        let (rows, cols) = size.unwrap_or((usize::MAX, usize::MAX));
        let mut lines = vec![
            format!(
                "tproxy stats every {} s at {} (Ctrl-C to quit)",
                self.args.interval.as_secs_f64(),
                utc_timestamp(self.time)
            ),
            String::new(),
        ];
        for (i, (w, s)) in self.watched.iter().zip(self.snaps).enumerate() {
            let r = &w.record;
            lines.push(format!(
                "tproxy pid {} on {} (netns {}, steer {})",
                r.pid,
                r.installed.iface,
                r.installed.netns_inode,
                steer_name(r.steer)
            ));
            lines.push(format!(
                "  flows: {} open ({} active in the last {} s), {} closing, {} embryonic",
                s.flows.open,
                s.flows.active,
                FLOW_ACTIVE_NS / 1_000_000_000,
                s.flows.closing,
                s.flows.embryonic
            ));
            lines.push(format!(
                "  accel: {} socket(s), {} byte(s) queued",
                s.accel_sockets, s.accel_queued_bytes
            ));
            let rates = self.rates(i);
            // Two columns of counters fit in 80 columns.
            let cell =
                |name: &str, total: &str, rate: &str| format!("{name:<20} {total:>10} {rate:>7}");
            let cells: Vec<String> = s
                .counters
                .iter()
                .enumerate()
                .map(|(j, (c, v))| {
                    let rate = rates
                        .as_ref()
                        .map(|r| fmt_rate(r[j].1))
                        .unwrap_or_else(|| "-".into());
                    cell(c.name(), &v.to_string(), &rate)
                })
                .collect();
            let header = cell("counter", "total", "rate/s");
            const SEP: &str = "  ";
            let ncols = ((cols.saturating_add(SEP.len())) / (header.len() + SEP.len())).clamp(1, 4);
            let nrows = cells.len().div_ceil(ncols);
            lines.push(vec![header; ncols.min(cells.len())].join(SEP));
            for row in 0..nrows {
                let row: Vec<&str> = (0..ncols)
                    .filter_map(|col| cells.get(col * nrows + row).map(String::as_str))
                    .collect();
                lines.push(row.join(SEP));
            }
            lines.push(String::new());
        }
        let mut out = String::from(if first { "\x1b[H\x1b[2J" } else { "\x1b[H" });
        for l in lines.iter().take(rows.saturating_sub(1)) {
            out.extend(l.chars().take(cols));
            out += "\x1b[K\n";
        }
        out += "\x1b[J";
        out
    }
}

fn fmt_rate(r: f64) -> String {
    if r >= 100.0 || r == 0.0 {
        format!("{r:.0}")
    } else {
        format!("{r:.1}")
    }
}

/// Rows and columns of the terminal on stdout.
fn terminal_size() -> Option<(usize, usize)> {
    let mut ws: libc::winsize = unsafe { std::mem::zeroed() };
    // SAFETY: TIOCGWINSZ fills the winsize we pass.
    let r = unsafe { libc::ioctl(libc::STDOUT_FILENO, libc::TIOCGWINSZ, &mut ws) };
    (r == 0 && ws.ws_row > 0 && ws.ws_col > 0).then_some((ws.ws_row as usize, ws.ws_col as usize))
}

/// `2026-05-04T03:02:01.123Z`
pub fn utc_timestamp(t: SystemTime) -> String {
    humantime::format_rfc3339_millis(t).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn snap(base: u64) -> Snapshot {
        Snapshot {
            counters: Counter::ALL
                .iter()
                .enumerate()
                .map(|(i, &c)| (c, base * i as u64))
                .collect(),
            flows: Default::default(),
            flows_in_use: None,
            flows_quota: None,
            socks_in_use: None,
            socks_quota: None,
            accel_sockets: 0,
            accel_queued_bytes: 0,
        }
    }

    #[test]
    fn rates_are_the_change_per_second() {
        let r = rates(&snap(10), &snap(12), Duration::from_millis(500));
        assert_eq!(r.len(), Counter::ALL.len());
        for (i, (c, v)) in r.iter().enumerate() {
            assert_eq!(*c, Counter::ALL[i]);
            assert_eq!(*v, (2 * i) as f64 / 0.5);
        }
        // A counter that went down (not expected) is no negative rate.
        assert!(
            rates(&snap(3), &snap(1), Duration::from_secs(1))
                .iter()
                .all(|(_, v)| *v == 0.0)
        );
    }

    #[test]
    fn timestamps_are_utc_iso8601() {
        let t = |s: u64, ms: u64| {
            utc_timestamp(SystemTime::UNIX_EPOCH + Duration::from_millis(s * 1000 + ms))
        };
        assert_eq!(t(0, 0), "1970-01-01T00:00:00.000Z");
        assert_eq!(t(951_782_400, 5), "2000-02-29T00:00:00.005Z");
        assert_eq!(t(1_700_000_000, 123), "2023-11-14T22:13:20.123Z");
        assert_eq!(t(4_107_542_399, 999), "2100-02-28T23:59:59.999Z");
    }
}
