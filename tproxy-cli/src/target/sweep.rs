//! What a removed target leaves in the shared maps, swept out once it is
//! detached (issue #20 item 6). FLOWS is a plain hash that nothing evicts
//! and sockops no longer runs for the target's sockets once its cgroup
//! link is gone (so no close moves their entries out): without a sweep,
//! pod churn fills the node's tables with entries of namespaces that no
//! longer exist.
//!
//! Entries carry their target's netns cookie (`FlowKey`, `SockKey`) or
//! counter slot (`SockState::slot`). The sweep runs after the target's
//! drain and detach (its `TARGETS` entry is gone: no program of ours
//! writes an entry of that namespace any more), and deletes every entry
//! of the cookie from FLOWS, SYNS, CLOSING, PRIOR_FLOWS and PENDING_PEERS,
//! zeroes the slot's `FLOWS_IN_USE` (the next target that takes the slot
//! starts from 0), and takes the target's sockets out of SOCKS and the
//! SOCKHASH.
//!
//! Sockets are the exception. Deleting a socket from the SOCKHASH while
//! redirected bytes sit unread in its ingress queue drops those bytes
//! (the kernel purges the queue with the socket's psock). So a socket
//! whose peer's `redirected_end` is past its own `read` (unread redirected
//! bytes), or whose peer, in another target that is still there, may
//! still redirect to it, is left in both maps and reported; the kernel
//! takes it out of the SOCKHASH when it closes, and its SOCKS entry stays
//! until a later sweep of that slot finds it with nothing unread. A socket
//! the sweep cannot match to its SOCKHASH key (never paired, or its peer
//! gone from SOCKS) loses its SOCKS entry only (sk_msg then passes its
//! sends to TCP; nothing queued at it is lost) and stays in the SOCKHASH
//! until it closes.
//!
//! PROXY_CONNECTS is keyed by socket cookie and LRU: left alone. So are
//! SOCK_API, LISTENER_API, ASKED and UPSTREAM_FLOWS (LRU; keyed by socket
//! address, namespace cookie, thread or socket cookie): a namespace cookie
//! is never reused, and sockops drops a socket's note at ESTABLISHED and
//! an upstream's flow when it closes, so no entry of a removed target
//! can match another's.
use std::{collections::HashMap as Std, os::fd::AsFd as _};

use aya::maps::{Array, HashMap, Map, MapData, SockHash};
use tproxy_common::{
    FlowKey, FlowValue, ListenerKey, Pending, SockKey, SockState, Target, names,
    sock_flags::RETIRED,
};
use tracing::{info, warn};

use crate::target::{Error, Result};

/// New descriptors of every map the sweep touches.
pub struct SweepMaps {
    flows: Map,
    syns: Map,
    closing: Map,
    prior: Map,
    pending: Map,
    listeners: Map,
    prior_listeners: Map,
    in_use: Map,
    socks_in_use: Map,
    targets: Map,
    socks: Option<Map>,
    sockhash: Option<Map>,
}

/// What one sweep took out, and what it left.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Swept {
    pub flows: usize,
    pub syns: usize,
    pub closing: usize,
    pub prior: usize,
    pub pending: usize,
    /// Where the target's proxy listened (`PROXY_LISTENERS`,
    /// `PRIOR_LISTENERS`).
    pub listeners: usize,
    pub socks: usize,
    pub sockhash: usize,
    /// Sockets left in SOCKS and the SOCKHASH: redirected bytes unread at
    /// them, or a peer that may still redirect to them.
    pub sockets_left: usize,
    /// The redirected bytes unread at those.
    pub bytes_left: u64,
}

impl Swept {
    pub fn total(&self) -> usize {
        self.flows
            + self.syns
            + self.closing
            + self.prior
            + self.pending
            + self.listeners
            + self.socks
    }
}

/// A new descriptor for the map `name` (of any kind tproxy has).
pub(crate) fn dup(map: &Map, name: &'static str) -> Result<MapData> {
    let data = match map {
        Map::HashMap(d)
        | Map::LruHashMap(d)
        | Map::Array(d)
        | Map::PerCpuArray(d)
        | Map::SockHash(d) => d,
        other => unreachable!("{name} is a {other:?}"),
    };
    let fd = data
        .fd()
        .as_fd()
        .try_clone_to_owned()
        .map_err(|e| Error::io(format!("duplicating map {name}"), e))?;
    MapData::from_fd(fd).map_err(|source| Error::Map { name, source })
}

impl SweepMaps {
    /// From a loaded object; `sockhash` is the object's SOCKHASH, which the
    /// loader keeps apart (sk_msg is attached to it).
    pub(crate) fn of(
        ebpf: &aya::Ebpf,
        sockhash: Option<&SockHash<MapData, SockKey>>,
    ) -> Result<SweepMaps> {
        let get = |name: &'static str| -> Result<Map> {
            let map = ebpf.map(name).unwrap_or_else(|| panic!("{name} in object"));
            let data = dup(map, name)?;
            Ok(match map {
                Map::LruHashMap(_) => Map::LruHashMap(data),
                Map::Array(_) => Map::Array(data),
                _ => Map::HashMap(data),
            })
        };
        let sockhash = match sockhash {
            Some(h) => {
                let fd = h
                    .fd()
                    .as_fd()
                    .try_clone_to_owned()
                    .map_err(|e| Error::io("duplicating map SOCKHASH", e))?;
                Some(Map::SockHash(MapData::from_fd(fd).map_err(|source| {
                    Error::Map {
                        name: names::SOCKHASH,
                        source,
                    }
                })?))
            }
            None => None,
        };
        Ok(SweepMaps {
            flows: get(names::FLOWS)?,
            syns: get(names::SYNS)?,
            closing: get(names::CLOSING)?,
            prior: get(names::PRIOR_FLOWS)?,
            pending: get(names::PENDING_PEERS)?,
            listeners: get(names::PROXY_LISTENERS)?,
            prior_listeners: get(names::PRIOR_LISTENERS)?,
            in_use: get(names::FLOWS_IN_USE)?,
            socks_in_use: get(names::SOCKS_IN_USE)?,
            targets: get(names::TARGETS)?,
            socks: sockhash.as_ref().map(|_| get(names::SOCKS)).transpose()?,
            sockhash,
        })
    }

    /// Sets the slot's counts of FLOWS and SOCKS entries to 0: before a
    /// target takes the slot, and after its sweep (the sockets it leaves
    /// never count down: sockops no longer sees them close).
    pub fn zero_in_use(&mut self, slot: u32) -> Result<()> {
        zero_in_use(&mut self.in_use, names::FLOWS_IN_USE, slot)?;
        zero_in_use(&mut self.socks_in_use, names::SOCKS_IN_USE, slot)
    }

    /// Deletes every entry of the namespace `cookie` (counter slot `slot`),
    /// whose target is detached.
    pub fn sweep(&mut self, cookie: u64, slot: u32) -> Swept {
        let mut s = Swept::default();
        // The flow tables by key alone: a full one is 65,536 keys, walked
        // without reading a value.
        let flows = |map: &mut Map, name: &'static str| -> usize {
            remove_keys_where::<FlowKey, FlowValue>(map, name, |k| k.netns_cookie == cookie)
        };
        s.flows = flows(&mut self.flows, names::FLOWS);
        s.syns = flows(&mut self.syns, names::SYNS);
        s.closing = flows(&mut self.closing, names::CLOSING);
        s.prior = remove_keys_where::<FlowKey, u64>(&mut self.prior, names::PRIOR_FLOWS, |k| {
            k.netns_cookie == cookie
        });
        // Waiting for an accepting end in this namespace, or a connecting
        // end of it waiting for another pod's.
        s.pending =
            remove_where::<SockKey, Pending>(&mut self.pending, names::PENDING_PEERS, |k, v| {
                k.netns_cookie == cookie || v.key.netns_cookie == cookie
            });
        for (map, name) in [
            (&mut self.listeners, names::PROXY_LISTENERS),
            (&mut self.prior_listeners, names::PRIOR_LISTENERS),
        ] {
            s.listeners +=
                remove_keys_where::<ListenerKey, u64>(map, name, |k| k.netns_cookie == cookie);
        }
        if let (Some(socks), Some(hash)) = (&mut self.socks, &mut self.sockhash) {
            sweep_sockets(socks, hash, &self.targets, cookie, slot, &mut s);
        }
        if let Err(e) = self.zero_in_use(slot) {
            warn!(
                "zeroing the counts of slot {slot}: {}",
                crate::sys::error::Chain(&e)
            );
        }
        s
    }

    /// `sweep`, logged.
    pub fn sweep_logged(&mut self, what: &str, cookie: u64, slot: u32) -> Swept {
        let s = self.sweep(cookie, slot);
        // Nothing to say when there was nothing (a start that failed
        // before any flow, which must end on its one error line).
        if s.total() == 0 && s.sockhash == 0 && s.sockets_left == 0 {
            tracing::debug!(target_id = what, "swept nothing: the target left no entry");
            return s;
        }
        info!(
            target_id = what,
            netns_cookie = format!("{cookie:#x}"),
            flows = s.flows,
            syns = s.syns,
            closing = s.closing,
            prior_flows = s.prior,
            pending_peers = s.pending,
            listeners = s.listeners,
            socks = s.socks,
            sockhash = s.sockhash,
            "swept the target's entries from the shared maps"
        );
        if s.sockets_left > 0 {
            warn!(
                target_id = what,
                "{} accelerated socket(s) left in SOCKS and the SOCKHASH with {} redirected byte(s) unread (or a peer that may still redirect): taking them out would drop those bytes; the kernel takes them out of the SOCKHASH when they close",
                s.sockets_left,
                s.bytes_left
            );
        }
        s
    }
}

fn zero_in_use(map: &mut Map, name: &'static str, slot: u32) -> Result<()> {
    let mut a: Array<&mut MapData, u64> =
        Array::try_from(map).map_err(|source| Error::Map { name, source })?;
    a.set(slot, 0, 0)
        .map_err(|source| Error::Map { name, source })
}

/// Deletes the entries whose key `f` picks; how many went.
fn remove_keys_where<K: aya::Pod + PartialEq, V: aya::Pod>(
    map: &mut Map,
    name: &'static str,
    f: impl Fn(&K) -> bool,
) -> usize {
    let mut m: HashMap<&mut MapData, K, V> = match HashMap::try_from(map) {
        Ok(m) => m,
        Err(e) => {
            warn!("sweeping {name}: {e}");
            return 0;
        }
    };
    // Collected first: deleting while iterating restarts the kernel's walk.
    let doomed: Vec<K> = m.keys().flatten().filter(|k| f(k)).collect();
    doomed.iter().filter(|k| m.remove(k).is_ok()).count()
}

/// Deletes the entries `f` picks; how many went.
fn remove_where<K: aya::Pod + PartialEq, V: aya::Pod>(
    map: &mut Map,
    name: &'static str,
    f: impl Fn(&K, &V) -> bool,
) -> usize {
    let mut m: HashMap<&mut MapData, K, V> = match HashMap::try_from(map) {
        Ok(m) => m,
        Err(e) => {
            warn!("sweeping {name}: {e}");
            return 0;
        }
    };
    // Collected first: deleting while iterating restarts the kernel's walk.
    let doomed: Vec<K> = m
        .iter()
        .flatten()
        .filter(|(k, v)| f(k, v))
        .map(|(k, _)| k)
        .collect();
    doomed.iter().filter(|k| m.remove(k).is_ok()).count()
}

fn sweep_sockets(
    socks: &mut Map,
    hash: &mut Map,
    targets: &Map,
    cookie: u64,
    slot: u32,
    s: &mut Swept,
) {
    let (Ok(mut socks), Ok(mut hash)) = (
        HashMap::<&mut MapData, u64, SockState>::try_from(socks),
        SockHash::<&mut MapData, SockKey>::try_from(hash),
    ) else {
        warn!("sweeping SOCKS and the SOCKHASH: cannot open them");
        return;
    };
    let targets: Option<HashMap<&MapData, u64, Target>> = HashMap::try_from(targets).ok();
    let all: Std<u64, SockState> = socks.iter().flatten().collect();
    // The namespace's sockets in the SOCKHASH: open, and still paired.
    let in_hash: std::collections::HashSet<SockKey> = hash
        .keys()
        .flatten()
        .filter(|k| k.netns_cookie == cookie)
        .collect();
    let live = |theirs: u64| targets.as_ref().is_some_and(|t| t.get(&theirs, 0).is_ok());
    for (sk, st) in all.iter().filter(|(_, st)| st.slot == slot) {
        match fate(st, all.get(&st.peer), cookie, |k| in_hash.contains(k), live) {
            Fate::Leave { unread } => {
                s.sockets_left += 1;
                s.bytes_left += unread;
                continue;
            }
            Fate::Remove { from_hash } => {
                if let Some(k) = from_hash
                    && hash.remove(&k).is_ok()
                {
                    s.sockhash += 1;
                }
                if socks.remove(sk).is_ok() {
                    s.socks += 1;
                }
            }
        }
    }
}

/// What the sweep does with one socket of the removed target.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Fate {
    /// Left in SOCKS and the SOCKHASH: taking it out of the SOCKHASH
    /// would drop `unread` redirected bytes, or bytes its peer may still
    /// redirect to it.
    Leave { unread: u64 },
    /// Out of SOCKS, and out of the SOCKHASH under this key if it is
    /// still there.
    Remove { from_hash: Option<SockKey> },
}

/// The fate of socket `st` of the target of namespace `cookie`, whose
/// peer's entry is `peer`; `in_hash`: a key is in the SOCKHASH; `live`:
/// a namespace has a target.
fn fate(
    st: &SockState,
    peer: Option<&SockState>,
    cookie: u64,
    in_hash: impl Fn(&SockKey) -> bool,
    live: impl Fn(u64) -> bool,
) -> Fate {
    let Some(peer) = peer else {
        // Never paired, or its peer closed: no key to find it by. Only its
        // SOCKS entry goes (sk_msg then passes its sends to TCP); what is
        // queued at it stays readable (it stays in the SOCKHASH until it
        // closes).
        return Fate::Remove { from_hash: None };
    };
    // This socket's own key: what its peer's entry says its peer is.
    let own = peer.peer_key;
    if !in_hash(&own) {
        // Closed (the kernel took it out), or its pair left: nothing
        // queued at it can be lost.
        return Fate::Remove { from_hash: None };
    }
    // Redirected bytes its reader has not taken.
    let unread = peer.redirected_end.saturating_sub(st.read);
    // A peer in another target that is still there, and not retired, may
    // redirect to it at any moment.
    let theirs = st.peer_key.netns_cookie;
    let peer_live = peer.flags & RETIRED == 0 && theirs != cookie && live(theirs);
    if unread > 0 || peer_live {
        Fate::Leave { unread }
    } else {
        Fate::Remove {
            from_hash: Some(own),
        }
    }
}

#[cfg(test)]
mod tests {
    use tproxy_common::AF_INET;

    use super::*;

    fn key(local: u32, remote: u32, cookie: u64) -> SockKey {
        SockKey {
            local_addr: [1, 0, 0, 0],
            remote_addr: [1, 0, 0, 0],
            local_port: local,
            remote_port: remote,
            family: u32::from(AF_INET),
            _pad0: 0,
            netns_cookie: cookie,
        }
    }

    /// A socket whose peer's key is `peer_key`, having sent `sent` bytes
    /// (all redirected) and read `read`.
    fn sock(peer_key: SockKey, sent: u64, read: u64) -> SockState {
        // SAFETY: SockState is plain data; all-zero is a valid value.
        let mut s: SockState = unsafe { std::mem::zeroed() };
        s.peer_key = peer_key;
        s.peer = 1;
        s.sent = sent;
        s.redirected_end = sent;
        s.read = read;
        s.slot = 3;
        s
    }

    #[test]
    fn a_socket_with_unread_redirected_bytes_is_left_and_others_go() {
        // Proxy (40000 -> 8000) and app (8000 -> 40000) in namespace 7.
        let (proxy_key, app_key) = (key(40000, 8000, 7), key(8000, 40000, 7));
        let all_in = |_: &SockKey| true;
        let none_live = |_: u64| false;
        // The app has read all the proxy redirected: both go, by key.
        let proxy = sock(app_key, 100, 50);
        let app = sock(proxy_key, 50, 100);
        assert_eq!(
            fate(&app, Some(&proxy), 7, all_in, none_live),
            Fate::Remove {
                from_hash: Some(app_key)
            }
        );
        assert_eq!(
            fate(&proxy, Some(&app), 7, all_in, none_live),
            Fate::Remove {
                from_hash: Some(proxy_key)
            }
        );
        // 30 bytes the proxy redirected are still queued at the app.
        let app = sock(proxy_key, 50, 70);
        assert_eq!(
            fate(&app, Some(&proxy), 7, all_in, none_live),
            Fate::Leave { unread: 30 }
        );
        // Closed (out of the SOCKHASH): its entry goes, whatever it had.
        assert_eq!(
            fate(&app, Some(&proxy), 7, |_| false, none_live),
            Fate::Remove { from_hash: None }
        );
        // No peer: its entry only.
        assert_eq!(
            fate(&app, None, 7, all_in, none_live),
            Fate::Remove { from_hash: None }
        );
    }

    #[test]
    fn a_socket_whose_peer_in_a_live_pod_may_still_redirect_is_left() {
        // The removed pod's proxy socket (namespace 7), paired with a
        // client in pod 9.
        let (ours, client_key) = (key(15006, 40000, 7), key(40000, 8000, 9));
        let mut client = sock(ours, 10, 10);
        let proxy = sock(client_key, 10, 10);
        let all_in = |_: &SockKey| true;
        assert_eq!(
            fate(&proxy, Some(&client), 7, all_in, |c| c == 9),
            Fate::Leave { unread: 0 }
        );
        // Pod 9 gone too, or the client retired: it may go.
        assert_eq!(
            fate(&proxy, Some(&client), 7, all_in, |_| false),
            Fate::Remove {
                from_hash: Some(ours)
            }
        );
        client.flags = RETIRED;
        assert_eq!(
            fate(&proxy, Some(&client), 7, all_in, |c| c == 9),
            Fate::Remove {
                from_hash: Some(ours)
            }
        );
    }
}
