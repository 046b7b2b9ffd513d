//! `tproxy flows`: every steered flow, as `conntrack -L` lists connections:
//! its client, the address it dialled, its state (embryonic, established,
//! closing), and what became of its proxy<->app pair: on the fast path,
//! fallen back to TCP (slow reader), returned, retired, left the SOCKHASH,
//! or never paired, and why; with the bytes redirected each way.
//!
//! The link from a flow to the proxy's upstream socket is made in the
//! kernel (`UPSTREAM_FLOWS`: the proxy thread's original-destination
//! question, then its connect), where Linux lets sockops and
//! cgroup/getsockopt ask for the calling thread (6.10); elsewhere the pair
//! shows as `unknown`.
use std::{
    collections::HashMap,
    io::Write as _,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
};

use aya::maps::{HashMap as BpfHashMap, Map, MapData};
use serde::Serialize;
use tproxy_common::{
    AF_INET, FlowKey, FlowValue, SockState, Upstream, names, refused, sock_api,
    sock_flags::{FAST, LEFT, RETIRED, SMALL_MESSAGES},
};

use crate::{
    observe::{Error, Result},
    target::{
        self,
        inspect::monotonic_coarse_ns,
        record::{self, Record},
    },
};

/// One steered flow, as `tproxy flows` shows it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct FlowRow {
    /// The interface of the instance serving it.
    pub iface: String,
    pub client: SocketAddr,
    /// The address and port the client dialled (its original destination).
    pub dialled: SocketAddr,
    /// embryonic, established or closing.
    pub state: &'static str,
    /// Milliseconds since its last packet.
    pub idle_ms: u64,
    /// fast path, fell back, returned, retired, left, waiting, refused,
    /// not paired, unknown.
    pub pair: &'static str,
    /// Why, where there is a reason (a socket option, an odd read, a slow
    /// reader, a refusal's cause).
    pub why: String,
    /// Bytes redirected from the proxy to the app, and back.
    pub to_app_bytes: u64,
    pub from_app_bytes: u64,
}

/// `tproxy flows [--json] [-i IFACE] [--all]`.
pub fn run(iface: Option<&str>, all: bool, json: bool) -> Result<()> {
    crate::sys::system::check_privileges()?;
    let netns = crate::sys::system::netns_inode()?;
    let records: Vec<Record> = record::live_records()
        .into_iter()
        .filter(|r| all || r.installed.netns_inode == netns)
        .filter(|r| iface.is_none_or(|i| r.installed.iface == i))
        .collect();
    if records.is_empty() {
        return Err(Error::NoInstance {
            iface: iface.map(str::to_string),
        });
    }
    let mut rows = Vec::new();
    for r in &records {
        rows.extend(rows_of(r)?);
    }
    let mut out = std::io::stdout().lock();
    let text = if json {
        serde_json::to_string_pretty(&rows).expect("rows serialize")
    } else {
        render(&rows)
    };
    match writeln!(out, "{text}") {
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
        r => r.map_err(|e| Error::io("writing to stdout", e)),
    }
}

fn open(id: u32, name: &'static str) -> Result<MapData> {
    MapData::from_id(id).map_err(|source| target::Error::Map { name, source }.into())
}

/// Every entry of a hash map of another process.
fn entries<K: aya::Pod + Eq + std::hash::Hash, V: aya::Pod>(
    map: Map,
    name: &'static str,
) -> Result<Vec<(K, V)>> {
    let m: BpfHashMap<&MapData, K, V> = BpfHashMap::try_from(&map)
        .map_err(|source| Error::from(target::Error::Map { name, source }))?;
    Ok(m.iter().flatten().collect())
}

/// The flows of one instance, with their pairs.
pub fn rows_of(r: &Record) -> Result<Vec<FlowRow>> {
    let flows: Vec<(FlowKey, FlowValue)> = entries(
        Map::HashMap(open(r.flows_map_id, names::FLOWS)?),
        names::FLOWS,
    )?;
    let syns: Vec<(FlowKey, FlowValue)> = entries(
        Map::LruHashMap(open(r.syns_map_id, names::SYNS)?),
        names::SYNS,
    )?;
    let closing: Vec<(FlowKey, FlowValue)> = entries(
        Map::LruHashMap(open(r.closing_map_id, names::CLOSING)?),
        names::CLOSING,
    )?;
    let socks: Vec<(u64, SockState)> = match open(r.socks_map_id, names::SOCKS) {
        Ok(m) => entries(Map::HashMap(m), names::SOCKS)?,
        Err(_) => Vec::new(),
    };
    let upstreams: Vec<(u64, Upstream)> = match r.upstream_flows_map_id {
        0 => Vec::new(),
        id => entries(
            Map::LruHashMap(open(id, names::UPSTREAM_FLOWS)?),
            names::UPSTREAM_FLOWS,
        )?,
    };
    let pairs = Pairs::new(&socks, &upstreams, r.accel);
    let now = monotonic_coarse_ns();
    let mut rows = Vec::new();
    for (table, state) in [
        (&syns, "embryonic"),
        (&flows, "established"),
        (&closing, "closing"),
    ] {
        for (k, v) in table {
            let (pair, why, to_app, from_app) = pairs.of(k);
            rows.push(FlowRow {
                iface: r.installed.iface.clone(),
                client: addr(k.family, k.client_addr, u16::from_be(k.client_port)),
                dialled: addr(k.family, k.local_addr, u16::from_be(v.orig_port)),
                state,
                idle_ms: now.saturating_sub(v.last_seen) / 1_000_000,
                pair,
                why,
                to_app_bytes: to_app,
                from_app_bytes: from_app,
            });
        }
    }
    rows.sort_by_key(|r| (r.state != "established", r.client));
    Ok(rows)
}

fn addr(family: u8, a: [u32; 4], port: u16) -> SocketAddr {
    let ip = if family == AF_INET {
        IpAddr::V4(Ipv4Addr::from(u32::from_be(a[0])))
    } else {
        let mut b = [0u8; 16];
        for (i, w) in a.iter().enumerate() {
            b[i * 4..i * 4 + 4].copy_from_slice(&w.to_ne_bytes());
        }
        IpAddr::V6(Ipv6Addr::from(b))
    };
    SocketAddr::new(ip, port)
}

/// The accelerated sockets, by cookie and by address, and which flow each
/// proxy upstream socket serves.
struct Pairs<'a> {
    by_flow: HashMap<FlowKey, (u64, &'a Upstream)>,
    by_cookie: HashMap<u64, &'a SockState>,
    by_addr: HashMap<u64, &'a SockState>,
    accel: bool,
}

impl<'a> Pairs<'a> {
    fn new(socks: &'a [(u64, SockState)], ups: &'a [(u64, Upstream)], accel: bool) -> Pairs<'a> {
        Pairs {
            by_flow: ups.iter().map(|(c, u)| (u.flow, (*c, u))).collect(),
            by_cookie: socks.iter().map(|(_, s)| (s.cookie, s)).collect(),
            by_addr: socks.iter().map(|(a, s)| (*a, s)).collect(),
            accel,
        }
    }

    /// (pair, why, bytes redirected to the app, from the app) of flow `k`.
    fn of(&self, k: &FlowKey) -> (&'static str, String, u64, u64) {
        if !self.accel {
            return ("not paired", "acceleration off".into(), 0, 0);
        }
        let Some(&(cookie, up)) = self.by_flow.get(k) else {
            return ("unknown", String::new(), 0, 0);
        };
        let Some(proxy) = self.by_cookie.get(&cookie) else {
            return match up.refused {
                refused::NONE => ("not paired", String::new(), 0, 0),
                r => (
                    "refused",
                    refused::NAMES.get(r as usize).copied().unwrap_or("").into(),
                    0,
                    0,
                ),
            };
        };
        let app = self.by_addr.get(&proxy.peer).copied();
        let (pair, why) = classify(proxy, app);
        (pair, why, proxy.redirected, app.map_or(0, |a| a.redirected))
    }
}

/// What became of a pair, from its two `SOCKS` entries (`app`: `None` while
/// the app's end is not in).
pub fn classify(proxy: &SockState, app: Option<&SockState>) -> (&'static str, String) {
    let Some(app) = app else {
        return ("waiting", "for the app's end to be paired".into());
    };
    let both = [proxy, app];
    let mut off: Vec<&str> = both
        .iter()
        .flat_map(|s| {
            s.api
                .iter()
                .enumerate()
                .skip(1)
                .filter(|(_, b)| **b != 0)
                .map(|(i, _)| sock_api::NAMES.get(i).copied().unwrap_or("?"))
        })
        .collect();
    off.sort_unstable();
    off.dedup();
    let why = if !off.is_empty() {
        off.join(", ")
    } else if both.iter().any(|s| s.flags & SMALL_MESSAGES != 0) {
        "a one-way stream of small writes (under --accel-min-message), which TCP moves faster"
            .into()
    } else if both.iter().any(|s| s.flags & RETIRED != 0) {
        "on TCP past --accel-retire-ms (a reader that never caught up)".into()
    } else {
        String::new()
    };
    if both.iter().any(|s| s.flags & LEFT != 0) {
        return ("left", why);
    }
    if both.iter().any(|s| s.flags & RETIRED != 0) || !off.is_empty() {
        return ("retired", why);
    }
    if both.iter().any(|s| s.flags & FAST != 0) {
        if both.iter().any(|s| s.fallbacks > 0) {
            return (
                "returned",
                "back on the fast path after a slow reader".into(),
            );
        }
        return ("fast path", String::new());
    }
    if both.iter().any(|s| s.fallbacks > s.returns) {
        return ("fell back", "a slow reader: TCP until it catches up".into());
    }
    if both.iter().any(|s| s.api[sock_api::READS_PLAIN] == 0) {
        return ("waiting", "for a reader's first plain read".into());
    }
    ("fast path", String::new())
}

fn render(rows: &[FlowRow]) -> String {
    let mut out = format!(
        "{:<12} {:<44} {:<44} {:>8} {:<10} {:>12} {:>12}  {}\n",
        "STATE", "CLIENT", "DIALLED", "IDLE ms", "PAIR", "TO APP B", "FROM APP B", "WHY"
    );
    for r in rows {
        out.push_str(&format!(
            "{:<12} {:<44} {:<44} {:>8} {:<10} {:>12} {:>12}  {}\n",
            r.state,
            r.client.to_string(),
            r.dialled.to_string(),
            r.idle_ms,
            r.pair,
            r.to_app_bytes,
            r.from_app_bytes,
            r.why
        ));
    }
    out.push_str(&format!("{} flows", rows.len()));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sock(flags: u32, api: [u8; 8]) -> SockState {
        // SAFETY: SockState is plain data; all-zero is a valid value.
        let mut s: SockState = unsafe { std::mem::zeroed() };
        s.flags = flags;
        s.api = api;
        s
    }

    #[test]
    fn a_pair_reads_as_what_became_of_it() {
        let plain = [1, 0, 0, 0, 0, 0, 0, 0];
        let (p, a) = (sock(FAST, plain), sock(0, plain));
        assert_eq!(classify(&p, Some(&a)).0, "fast path");
        assert_eq!(classify(&p, None).0, "waiting");
        let lowat = [1, 0, 0, 1, 0, 0, 0, 0];
        let (pair, why) = classify(&sock(RETIRED, plain), Some(&sock(0, lowat)));
        assert_eq!((pair, why.as_str()), ("retired", "so_rcvlowat"));
        assert_eq!(classify(&sock(RETIRED | LEFT, plain), Some(&a)).0, "left");
        // Back from the first message's TCP is no return from a fallback.
        let mut first = sock(FAST, plain);
        first.returns = 1;
        assert_eq!(classify(&first, Some(&a)).0, "fast path");
        let mut slow = sock(0, plain);
        slow.fallbacks = 2;
        slow.returns = 1;
        assert_eq!(classify(&slow, Some(&a)).0, "fell back");
        slow.flags = FAST;
        assert_eq!(classify(&slow, Some(&a)).0, "returned");
        let unseen = sock(0, [0; 8]);
        assert_eq!(classify(&sock(0, plain), Some(&unseen)).0, "waiting");
    }

    #[test]
    fn a_pair_retired_for_small_writes_says_so() {
        let plain = [1, 0, 0, 0, 0, 0, 0, 0];
        let (p, a) = (sock(RETIRED | SMALL_MESSAGES, plain), sock(0, plain));
        let (pair, why) = classify(&p, Some(&a));
        assert_eq!(pair, "retired");
        assert!(why.contains("small writes"), "{why}");
    }

    #[test]
    fn addresses_read_back_from_the_flow_key() {
        let a = addr(AF_INET, [u32::from_ne_bytes([10, 0, 0, 20]), 0, 0, 0], 4711);
        assert_eq!(a.to_string(), "10.0.0.20:4711");
        let mut w = [0u32; 4];
        w[0] = u32::from_ne_bytes([0xfd, 0, 0, 0]);
        w[3] = u32::from_ne_bytes([0, 0, 0, 1]);
        assert_eq!(addr(10, w, 80).to_string(), "[fd00::1]:80");
    }
}
