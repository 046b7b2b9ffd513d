//! Reading a running instance's maps, from inside it or from another
//! process through the map ids in its runtime record (or the agent's
//! `MapIds`): counters, the flow table, accelerated sockets, and the
//! clock their entries are stamped with. Read-only; the loader, above,
//! fills `MapIds` and reaps lingering flows by this file's clock.

use aya::maps::{HashMap, Map, MapData, PerCpuArray};
use tproxy_common::{
    Counter, FLOW_ACTIVE_NS, FLOW_LINGER_NS, FlowKey, FlowValue, SockState, names,
};

use crate::target::{Error, Result, record::Record};

/// CLOCK_MONOTONIC_COARSE in ns: the clock the programs stamp entries with
/// (bpf_ktime_get_coarse_ns).
pub fn monotonic_coarse_ns() -> u64 {
    let ts = nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC_COARSE)
        .expect("CLOCK_MONOTONIC_COARSE");
    ts.tv_sec() as u64 * 1_000_000_000 + ts.tv_nsec() as u64
}

/// Past its linger.
pub(crate) fn lingered(v: &FlowValue, now: u64) -> bool {
    now.saturating_sub(v.since) > FLOW_LINGER_NS
}

/// A read of another instance's maps failed on their key or value size:
/// that instance runs another tproxy build (a flow key with or without
/// the netns cookie, say), not a broken one.
pub fn other_build(e: &Error) -> bool {
    matches!(
        e,
        Error::Map {
            source: aya::maps::MapError::InvalidKeySize { .. }
                | aya::maps::MapError::InvalidValueSize { .. },
            ..
        }
    )
}

/// `e`, or `OtherBuild` when it says the instance `pid` runs another build.
pub fn explain(e: Error, pid: i32) -> Error {
    if other_build(&e) {
        Error::OtherBuild { pid }
    } else {
        e
    }
}

/// Kernel ids of the maps, for other processes (`stats`, `status`) to open.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct MapIds {
    pub targets: u32,
    pub counters: u32,
    pub flows: u32,
    pub syns: u32,
    pub closing: u32,
    pub sockhash: u32,
    pub socks: u32,
    #[serde(default)]
    pub flows_in_use: u32,
    #[serde(default)]
    pub socks_in_use: u32,
    /// `UPSTREAM_FLOWS` (`tproxy flows`); 0: an object of an older build.
    #[serde(default)]
    pub upstream_flows: u32,
}

/// The flow table at a glance.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct FlowStats {
    /// Established flows whose proxy socket is open.
    pub open: usize,
    /// Of those, seen within `FLOW_ACTIVE_NS`: what drain waits for.
    pub active: usize,
    /// Closed flows lingering for retransmissions.
    pub closing: usize,
    /// Embryonic flows (SYN seen, not established).
    pub embryonic: usize,
}

impl FlowStats {
    /// From the open flows' values and the other tables' sizes.
    pub(crate) fn of(
        open: impl Iterator<Item = FlowValue>,
        embryonic: usize,
        closing: usize,
        now: u64,
    ) -> FlowStats {
        let mut s = FlowStats {
            embryonic,
            closing,
            ..FlowStats::default()
        };
        for v in open {
            s.open += 1;
            if now.saturating_sub(v.last_seen) < FLOW_ACTIVE_NS {
                s.active += 1;
            }
        }
        s
    }
}

pub(crate) fn flow_stats(
    flows: &aya::maps::Map,
    syns: &aya::maps::Map,
    closing: &aya::maps::Map,
) -> Result<FlowStats> {
    let now = monotonic_coarse_ns();
    let m: HashMap<&MapData, FlowKey, FlowValue> =
        HashMap::try_from(flows).map_err(|source| Error::Map {
            name: names::FLOWS,
            source,
        })?;
    Ok(FlowStats::of(
        m.iter().flatten().map(|(_, v)| v),
        count_entries::<FlowKey, FlowValue>(syns, names::SYNS)?,
        count_entries::<FlowKey, FlowValue>(closing, names::CLOSING)?,
        now,
    ))
}

pub(crate) fn socks_state(map: &aya::maps::Map) -> Result<(usize, i64)> {
    let m: HashMap<&MapData, u64, SockState> =
        HashMap::try_from(map).map_err(|source| Error::Map {
            name: names::SOCKS,
            source,
        })?;
    let socks: std::collections::HashMap<u64, SockState> = m.iter().flatten().collect();
    Ok((accelerated(&socks), queued_redirected(&socks)))
}

/// Sockets still accelerated: in SOCKS, and not of a pair that retired and
/// left the SOCKHASH (its entries stay until the sockets close).
pub fn accelerated(socks: &std::collections::HashMap<u64, SockState>) -> usize {
    let left = |s: &SockState| s.flags & tproxy_common::sock_flags::LEFT != 0;
    socks
        .values()
        .filter(|s| !left(s) && !socks.get(&s.peer).is_some_and(left))
        .count()
}

/// Redirected bytes not yet read, over all pairs: what a reader still has
/// in its ingress queue. A sender's redirected bytes end at its
/// `redirected_end`; its peer has read `read` bytes of the same stream, and
/// reads redirected bytes before any sent later by TCP.
pub fn queued_redirected(socks: &std::collections::HashMap<u64, SockState>) -> i64 {
    socks
        .values()
        .filter_map(|s| {
            let peer = socks.get(&s.peer)?;
            Some(s.redirected_end.saturating_sub(peer.read) as i64)
        })
        .sum()
}

/// Accelerated sockets and queued bytes of another, running instance.
pub fn accel_of(record: &Record) -> Result<(usize, i64)> {
    let data = MapData::from_id(record.socks_map_id).map_err(|source| Error::Map {
        name: names::SOCKS,
        source,
    })?;
    socks_state(&aya::maps::Map::HashMap(data))
}

pub(crate) fn count_entries<K: aya::Pod, V: aya::Pod>(
    map: &aya::maps::Map,
    name: &'static str,
) -> Result<usize> {
    let m: HashMap<&MapData, K, V> =
        HashMap::try_from(map).map_err(|source| Error::Map { name, source })?;
    Ok(m.keys().filter(Result::is_ok).count())
}

/// Another instance's flow table at a glance.
pub fn flows_of(record: &Record) -> Result<FlowStats> {
    let open = |id, name| MapData::from_id(id).map_err(|source| Error::Map { name, source });
    let flows = aya::maps::Map::HashMap(open(record.flows_map_id, names::FLOWS)?);
    let syns = aya::maps::Map::LruHashMap(open(record.syns_map_id, names::SYNS)?);
    let closing = aya::maps::Map::LruHashMap(open(record.closing_map_id, names::CLOSING)?);
    flow_stats(&flows, &syns, &closing)
}

/// An instance's figures at one moment.
#[derive(Clone, Debug, PartialEq)]
pub struct Snapshot {
    /// Totals over all CPUs, in `Counter::ALL` order.
    pub counters: Vec<(Counter, u64)>,
    pub flows: FlowStats,
    pub accel_sockets: usize,
    /// Redirected bytes not yet read (see [`queued_redirected`]).
    pub accel_queued_bytes: i64,
    /// FLOWS entries held, as the programs count them per target
    /// (`FLOWS_IN_USE`, read without walking FLOWS); `None` when the map
    /// cannot be read (an instance of an older build).
    pub flows_in_use: Option<u64>,
    /// The target's quota of FLOWS entries (`Config::flows_quota`); 0: no
    /// quota; `None`: not known (a whole instance or the node).
    pub flows_quota: Option<u32>,
    /// SOCKS entries held (`SOCKS_IN_USE`) and the target's quota of them
    /// (`Config::socks_quota`), likewise.
    pub socks_in_use: Option<u64>,
    pub socks_quota: Option<u32>,
}

/// Handles on an instance's maps, to read them from another task or
/// process: by map id (another process; needs CAP_SYS_ADMIN) or duplicated
/// from the instance's own descriptors (the instance's metrics endpoint).
#[derive(Debug)]
pub struct Maps {
    counters: Map,
    flows: Map,
    syns: Map,
    closing: Map,
    /// `None` when it cannot be opened: acceleration figures read as 0.
    socks: Option<Map>,
    /// `FLOWS_IN_USE` and `TARGETS` (each target's use and quota); `None`
    /// when not known (an instance of an older build).
    in_use: Option<Map>,
    targets: Option<Map>,
    socks_in_use: Option<Map>,
}

/// `FLOWS_IN_USE[slot]`, or every slot summed (`None`).
fn read_in_use(map: &Map, slot: Option<u32>) -> Option<u64> {
    let a: aya::maps::Array<&MapData, u64> = aya::maps::Array::try_from(map).ok()?;
    match slot {
        Some(s) => a.get(&s, 0).ok(),
        None => Some(a.iter().flatten().sum()),
    }
}

/// The quotas (flows, sockets) of the target of namespace `cookie`.
fn read_quotas(map: &Map, cookie: u64) -> Option<(u32, u32)> {
    let m: HashMap<&MapData, u64, tproxy_common::Target> = HashMap::try_from(map).ok()?;
    m.get(&cookie, 0)
        .ok()
        .map(|t| (t.config.flows_quota, t.config.socks_quota))
}

impl Maps {
    /// Another, running instance's maps, through the ids in its record.
    pub fn of(record: &Record) -> Result<Maps> {
        let open = |id, name| MapData::from_id(id).map_err(|source| Error::Map { name, source });
        Ok(Maps {
            counters: Map::PerCpuArray(open(record.counters_map_id, names::COUNTERS)?),
            flows: Map::HashMap(open(record.flows_map_id, names::FLOWS)?),
            syns: Map::LruHashMap(open(record.syns_map_id, names::SYNS)?),
            closing: Map::LruHashMap(open(record.closing_map_id, names::CLOSING)?),
            socks: MapData::from_id(record.socks_map_id).ok().map(Map::HashMap),
            in_use: (record.flows_in_use_map_id != 0)
                .then(|| MapData::from_id(record.flows_in_use_map_id).ok())
                .flatten()
                .map(Map::Array),
            targets: None,
            socks_in_use: None,
        })
    }

    /// From maps opened elsewhere (the agent's pins).
    pub fn from_parts(
        counters: Map,
        flows: Map,
        syns: Map,
        closing: Map,
        socks: Option<Map>,
    ) -> Maps {
        Maps {
            counters,
            flows,
            syns,
            closing,
            socks,
            in_use: None,
            targets: None,
            socks_in_use: None,
        }
    }

    /// With each target's counts of FLOWS and SOCKS entries and its
    /// quotas (`FLOWS_IN_USE`, `SOCKS_IN_USE`, `TARGETS`).
    pub fn with_counts(
        mut self,
        flows_in_use: Option<Map>,
        socks_in_use: Option<Map>,
        targets: Option<Map>,
    ) -> Maps {
        self.in_use = flows_in_use;
        self.socks_in_use = socks_in_use;
        self.targets = targets;
        self
    }

    /// A loaded object's maps, by the ids `Loaded::map_ids` gives (another
    /// process: the agent's, from its state).
    pub fn of_ids(ids: &MapIds) -> Result<Maps> {
        let open = |id, name| MapData::from_id(id).map_err(|source| Error::Map { name, source });
        Ok(Maps {
            counters: Map::PerCpuArray(open(ids.counters, names::COUNTERS)?),
            flows: Map::HashMap(open(ids.flows, names::FLOWS)?),
            syns: Map::LruHashMap(open(ids.syns, names::SYNS)?),
            closing: Map::LruHashMap(open(ids.closing, names::CLOSING)?),
            socks: MapData::from_id(ids.socks).ok().map(Map::HashMap),
            in_use: MapData::from_id(ids.flows_in_use).ok().map(Map::Array),
            targets: MapData::from_id(ids.targets).ok().map(Map::HashMap),
            socks_in_use: MapData::from_id(ids.socks_in_use).ok().map(Map::Array),
        })
    }

    /// New descriptors for the maps of a loaded object.
    pub(crate) fn dup(ebpf: &aya::Ebpf) -> Result<Maps> {
        let dup = |name: &'static str| -> Result<Map> {
            let map = ebpf.map(name).expect("map in object");
            let data = crate::target::sweep::dup(map, name)?;
            Ok(match map {
                Map::HashMap(_) => Map::HashMap(data),
                Map::LruHashMap(_) => Map::LruHashMap(data),
                Map::PerCpuArray(_) => Map::PerCpuArray(data),
                Map::Array(_) => Map::Array(data),
                other => unreachable!("{name} is a {other:?}"),
            })
        };
        Ok(Maps {
            counters: dup(names::COUNTERS)?,
            flows: dup(names::FLOWS)?,
            syns: dup(names::SYNS)?,
            closing: dup(names::CLOSING)?,
            socks: Some(dup(names::SOCKS)?),
            in_use: Some(dup(names::FLOWS_IN_USE)?),
            targets: Some(dup(names::TARGETS)?),
            socks_in_use: Some(dup(names::SOCKS_IN_USE)?),
        })
    }

    /// Reads every figure now.
    pub fn snapshot(&self) -> Result<Snapshot> {
        let arr: PerCpuArray<&MapData, u64> =
            PerCpuArray::try_from(&self.counters).map_err(|source| Error::Map {
                name: names::COUNTERS,
                source,
            })?;
        let counters = sum_counters(&arr)?;
        let flows = flow_stats(&self.flows, &self.syns, &self.closing)?;
        let (accel_sockets, accel_queued_bytes) = match &self.socks {
            Some(m) => socks_state(m)?,
            None => (0, 0),
        };
        Ok(Snapshot {
            counters,
            flows,
            accel_sockets,
            accel_queued_bytes,
            flows_in_use: self.in_use.as_ref().and_then(|m| read_in_use(m, None)),
            flows_quota: None,
            socks_in_use: self
                .socks_in_use
                .as_ref()
                .and_then(|m| read_in_use(m, None)),
            socks_quota: None,
        })
    }
}

impl Maps {
    /// Every figure of each target (`(netns cookie, counter slot)`), read
    /// in one pass over each map: flows by the cookie in their keys,
    /// accelerated sockets by their slot, counters from the target's slot.
    pub fn snapshots_by_target(&self, targets: &[(u64, u32)]) -> Result<Vec<Snapshot>> {
        use std::collections::HashMap as Std;
        let arr: PerCpuArray<&MapData, u64> =
            PerCpuArray::try_from(&self.counters).map_err(|source| Error::Map {
                name: names::COUNTERS,
                source,
            })?;
        let now = monotonic_coarse_ns();
        let flows: HashMap<&MapData, FlowKey, FlowValue> =
            HashMap::try_from(&self.flows).map_err(|source| Error::Map {
                name: names::FLOWS,
                source,
            })?;
        let mut open: Std<u64, Vec<FlowValue>> = Std::new();
        for (k, v) in flows.iter().flatten() {
            open.entry(k.netns_cookie).or_default().push(v);
        }
        let by_cookie = |map: &Map, name| -> Result<Std<u64, usize>> {
            let m: HashMap<&MapData, FlowKey, FlowValue> =
                HashMap::try_from(map).map_err(|source| Error::Map { name, source })?;
            let mut n = Std::new();
            for k in m.keys().flatten() {
                *n.entry(k.netns_cookie).or_default() += 1;
            }
            Ok(n)
        };
        let syns = by_cookie(&self.syns, names::SYNS)?;
        let closing = by_cookie(&self.closing, names::CLOSING)?;
        let socks: Std<u64, SockState> = match &self.socks {
            Some(m) => {
                let m: HashMap<&MapData, u64, SockState> =
                    HashMap::try_from(m).map_err(|source| Error::Map {
                        name: names::SOCKS,
                        source,
                    })?;
                m.iter().flatten().collect()
            }
            None => Std::new(),
        };
        targets
            .iter()
            .map(|&(cookie, slot)| {
                let quotas = self.targets.as_ref().and_then(|m| read_quotas(m, cookie));
                let own: Std<u64, SockState> = socks
                    .iter()
                    .filter(|(_, s)| s.slot == slot)
                    .map(|(k, s)| (*k, *s))
                    .collect();
                // A pair's peer may be of another target (both legs of a
                // same-node request): look it up among all sockets.
                let with_peers: Std<u64, SockState> = own
                    .values()
                    .filter_map(|s| socks.get_key_value(&s.peer).map(|(k, v)| (*k, *v)))
                    .chain(own.iter().map(|(k, v)| (*k, *v)))
                    .collect();
                let left = |s: &SockState| s.flags & tproxy_common::sock_flags::LEFT != 0;
                let accel_sockets = own
                    .values()
                    .filter(|s| !left(s) && !socks.get(&s.peer).is_some_and(left))
                    .count();
                // Bytes queued at this target's sockets: sent by their peers.
                let accel_queued_bytes = own
                    .values()
                    .filter_map(|s| {
                        let peer = with_peers.get(&s.peer)?;
                        Some(peer.redirected_end.saturating_sub(s.read) as i64)
                    })
                    .sum();
                Ok(Snapshot {
                    counters: slot_counters(&arr, slot)?,
                    flows: FlowStats::of(
                        open.get(&cookie).into_iter().flatten().copied(),
                        syns.get(&cookie).copied().unwrap_or(0),
                        closing.get(&cookie).copied().unwrap_or(0),
                        now,
                    ),
                    accel_sockets,
                    accel_queued_bytes,
                    flows_in_use: self
                        .in_use
                        .as_ref()
                        .and_then(|m| read_in_use(m, Some(slot))),
                    flows_quota: quotas.map(|q| q.0),
                    socks_in_use: self
                        .socks_in_use
                        .as_ref()
                        .and_then(|m| read_in_use(m, Some(slot))),
                    socks_quota: quotas.map(|q| q.1),
                })
            })
            .collect()
    }
}

pub fn sum_counters(arr: &PerCpuArray<&MapData, u64>) -> Result<Vec<(Counter, u64)>> {
    let have = arr.len();
    // An instance started by an older tproxy has one slot, and maybe fewer
    // counters: the ones it lacks are left out rather than failing the
    // whole read. Otherwise the node total: every slot summed.
    let (slots, per_slot) = if have < Counter::COUNT || !have.is_multiple_of(Counter::COUNT) {
        (1, have)
    } else {
        (have / Counter::COUNT, Counter::COUNT)
    };
    let mut out: Vec<(Counter, u64)> = Counter::ALL
        .iter()
        .filter(|&&c| (c as u32) < per_slot)
        .map(|&c| (c, 0))
        .collect();
    for slot in 0..slots {
        for (c, total) in out.iter_mut() {
            let v = arr
                .get(&(slot * per_slot + *c as u32), 0)
                .map_err(|source| Error::Map {
                    name: names::COUNTERS,
                    source,
                })?;
            *total += v.iter().sum::<u64>();
        }
    }
    Ok(out)
}

/// One counter slot's counters (a target's: `Config::slot`).
pub fn slot_counters(arr: &PerCpuArray<&MapData, u64>, slot: u32) -> Result<Vec<(Counter, u64)>> {
    Counter::ALL
        .iter()
        .map(|&c| {
            let v = arr.get(&c.index(slot), 0).map_err(|source| Error::Map {
                name: names::COUNTERS,
                source,
            })?;
            Ok((c, v.iter().sum()))
        })
        .collect()
}

/// Counters of another, running instance, read through its map id.
pub fn counters_of(record: &Record) -> Result<Vec<(Counter, u64)>> {
    let data = MapData::from_id(record.counters_map_id).map_err(|source| Error::Map {
        name: names::COUNTERS,
        source,
    })?;
    let map = aya::maps::Map::PerCpuArray(data);
    let arr: PerCpuArray<&MapData, u64> =
        PerCpuArray::try_from(&map).map_err(|source| Error::Map {
            name: names::COUNTERS,
            source,
        })?;
    sum_counters(&arr)
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;

    fn sock(peer: u64, redirected_end: u64, read: u64) -> SockState {
        // SAFETY: SockState is plain data; all-zero is a valid value.
        let mut s: SockState = unsafe { std::mem::zeroed() };
        s.peer = peer;
        s.sent = redirected_end + 100;
        s.redirected_end = redirected_end;
        s.read = read;
        s.slot = 1;
        s
    }

    #[test]
    fn a_map_of_another_layout_means_another_build() {
        let size = |source| Error::Map {
            name: names::FLOWS,
            source,
        };
        let e = size(aya::maps::MapError::InvalidKeySize {
            size: 48,
            expected: 40,
        });
        assert!(other_build(&e));
        assert!(explain(e, 7).to_string().contains("pid 7"));
        let e = size(aya::maps::MapError::KeyNotFound);
        assert!(!other_build(&e));
        assert!(matches!(explain(e, 7), Error::Map { .. }));
    }

    #[test]
    fn a_pair_that_left_the_sockhash_is_not_accelerated() {
        let mut left = sock(4, 10, 10);
        left.flags = tproxy_common::sock_flags::LEFT | tproxy_common::sock_flags::RETIRED;
        // 1<->2 accelerated; 3<->4 left (flag on 4 only); 5 has no peer yet.
        let socks = HashMap::from([
            (1, sock(2, 0, 0)),
            (2, sock(1, 0, 0)),
            (3, sock(4, 0, 0)),
            (4, left),
            (5, sock(0, 0, 0)),
        ]);
        assert_eq!(accelerated(&socks), 3);
    }

    #[test]
    fn queued_is_redirected_but_unread_per_direction() {
        // proxy (1) -> app (2): 1000 redirected, the app read 300 (the
        // 100 sent later by TCP are not "queued"); app -> proxy: 50
        // redirected, all read; a socket whose peer is not in yet counts 0.
        let socks = HashMap::from([
            (1, sock(2, 1000, 50)),
            (2, sock(1, 50, 300)),
            (3, sock(0, 7, 0)),
        ]);
        assert_eq!(queued_redirected(&socks), 700);
    }
}
