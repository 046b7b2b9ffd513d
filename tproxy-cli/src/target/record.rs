//! The runtime record of a running instance: `/run/tproxy/<netns>-<iface>.json`.
//!
//! It is the only thing tproxy keeps outside the kernel. It holds an flock
//! while the instance lives, so a second instance on the same interface is
//! refused, and a record whose lock is free belongs to an instance that died
//! without cleaning up (SIGKILL): the next start, or `tproxy cleanup`,
//! removes what it left.
use std::{
    fs::{self, File, OpenOptions},
    io::{Read as _, Seek as _, Write as _},
    os::{fd::AsRawFd as _, unix::fs::MetadataExt as _},
    path::{Path, PathBuf},
    time::{Duration, SystemTime},
};

use serde::{Deserialize, Serialize};

use crate::{
    config::options::Steer,
    sys::run_dir::run_dir,
    target::{
        Error, Result,
        installed::{Attached, Installed},
    },
};

/// What a running instance installed, and where to find its maps.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Record {
    pub pid: i32,
    /// Where its target is and what outlives it (its interface, namespace,
    /// tc mode, routing: the same keys as ever, flattened).
    #[serde(flatten)]
    pub installed: Installed,
    pub cgroup: PathBuf,
    pub steer: Steer,
    /// Map ids, for `tproxy stats` from another process.
    pub counters_map_id: u32,
    pub flows_map_id: u32,
    /// The embryonic flows (`SYNS`).
    #[serde(default)]
    pub syns_map_id: u32,
    /// The closed flows lingering (`CLOSING`).
    #[serde(default)]
    pub closing_map_id: u32,
    pub sockhash_map_id: u32,
    pub socks_map_id: u32,
    /// Each target's count of FLOWS entries (`FLOWS_IN_USE`); 0: an
    /// instance of an older build.
    #[serde(default)]
    pub flows_in_use_map_id: u32,
    /// Which flow each of the proxy's upstream sockets serves
    /// (`UPSTREAM_FLOWS`, `tproxy flows`); 0: an instance of an older build.
    #[serde(default)]
    pub upstream_flows_map_id: u32,
    /// The intercepted ports, as given to `-ports` (normalized).
    #[serde(default)]
    pub ports: String,
    #[serde(default)]
    pub proxy_port: u16,
    #[serde(default)]
    pub accel: bool,
    /// Unix seconds.
    #[serde(default)]
    pub started_at: u64,
    /// Every program it attaches, with the kernel's ids, for `tproxy
    /// status` to check and `tproxy cleanup` to find.
    #[serde(default)]
    pub attachments: Vec<Attached>,
    /// Everything is attached (the record's last write during start).
    #[serde(default)]
    pub ready: bool,
}

impl Record {
    /// Where its namespace is now (found by inode and cookie).
    pub fn located(&self) -> crate::sys::netns::Located {
        crate::sys::netns::locate(self.installed.netns_inode, self.installed.netns_cookie)
    }
}

/// The held lock on an instance's record; dropping it removes the record.
pub struct InstanceLock {
    file: File,
    path: PathBuf,
}

pub fn record_path(dir: &Path, netns_inode: u64, iface: &str) -> PathBuf {
    dir.join(format!("{netns_inode}-{iface}.json"))
}

fn try_flock(file: &File) -> std::io::Result<bool> {
    // SAFETY: flock on a valid fd.
    let r = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    if r == 0 {
        Ok(true)
    } else {
        let e = std::io::Error::last_os_error();
        if e.raw_os_error() == Some(libc::EWOULDBLOCK) {
            Ok(false)
        } else {
            Err(e)
        }
    }
}

fn read_record(file: &mut File) -> Option<Record> {
    let mut s = String::new();
    file.read_to_string(&mut s).ok()?;
    parse_record(&s)
}

/// A record as written by this build or an earlier one: those name their
/// tc programs only among their attachments.
fn parse_record(json: &str) -> Option<Record> {
    let mut r: Record = serde_json::from_str(json).ok()?;
    if r.installed.tc_progs.is_empty() {
        r.installed.tc_progs = crate::target::installed::tc_progs(&r.attachments);
    }
    Some(r)
}

impl InstanceLock {
    /// Takes the lock for (netns, iface). Returns the record a dead instance
    /// left there, if any, for the caller to clean up after.
    pub fn acquire(netns_inode: u64, iface: &str) -> Result<(InstanceLock, Option<Record>)> {
        let dir = run_dir();
        let path = record_path(&dir, netns_inode, iface);
        loop {
            fs::create_dir_all(&dir)
                .map_err(|e| Error::io(format!("creating {}", dir.display()), e))?;
            let mut file = OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(false)
                .open(&path)
                .map_err(|e| Error::io(format!("opening {}", path.display()), e))?;
            if !try_flock(&file).map_err(|e| Error::io(format!("locking {}", path.display()), e))? {
                let pid = read_record(&mut file).map(|r| r.pid).unwrap_or(0);
                return Err(Error::AlreadyRunning {
                    pid,
                    iface: iface.into(),
                });
            }
            // A cleanup (or an exiting instance) may have removed the file
            // between our open and our lock: a lock on an unlinked file
            // guards nothing, open again.
            if !still_linked(&file, &path) {
                continue;
            }
            let stale = read_record(&mut file);
            return Ok((InstanceLock { file, path }, stale));
        }
    }

    pub fn write(&mut self, record: &Record) -> Result<()> {
        let json = serde_json::to_vec_pretty(record).expect("record serializes");
        let io = |e| Error::io(format!("writing {}", self.path.display()), e);
        self.file.set_len(0).map_err(io)?;
        self.file.rewind().map_err(io)?;
        self.file.write_all(&json).map_err(io)?;
        self.file.flush().map_err(io)
    }
}

impl Drop for InstanceLock {
    fn drop(&mut self) {
        // Remove while still holding the lock; the lock goes with the fd.
        let _ = fs::remove_file(&self.path);
        if let Some(dir) = self.path.parent() {
            let _ = fs::remove_dir(dir); // only if empty
        }
    }
}

/// The file at `path` is still the one open as `file`.
fn still_linked(file: &File, path: &Path) -> bool {
    match (file.metadata(), fs::metadata(path)) {
        (Ok(a), Ok(b)) => a.dev() == b.dev() && a.ino() == b.ino(),
        _ => false,
    }
}

/// One file in the run directory, as `tproxy status` sees it: without
/// taking its lock (a starting instance must never find it taken).
#[derive(Debug)]
pub struct RecordFile {
    pub path: PathBuf,
    /// The network namespace and interface its name says.
    pub netns_inode: u64,
    pub iface: String,
    /// `None`: empty or unreadable (an instance killed before its first
    /// write, or one that is just starting).
    pub record: Option<Record>,
    /// The process holding its flock, from /proc/locks; `None` when free.
    pub lock_holder: Option<i32>,
    pub modified: Option<SystemTime>,
}

impl RecordFile {
    /// Free and not just created: the instance died. An empty file whose
    /// lock is free may be a start between its open and its flock.
    pub fn is_stale(&self) -> bool {
        self.lock_holder.is_none()
            && (self.record.is_some()
                || self
                    .modified
                    .and_then(|m| m.elapsed().ok())
                    .is_none_or(|age| age > JUST_CREATED))
    }
}

/// How long an empty, unlocked record counts as a start under way.
const JUST_CREATED: Duration = Duration::from_secs(10);

/// `<netns inode>-<iface>.json`
fn parse_record_name(name: &str) -> Option<(u64, String)> {
    let stem = name.strip_suffix(".json")?;
    let (ino, iface) = stem.split_once('-')?;
    Some((ino.parse().ok()?, iface.to_string()))
}

/// Holders of flocks, by (device major, minor, inode), from /proc/locks
/// lines like `1: FLOCK  ADVISORY  WRITE 10006 fe:00:9822228 0 EOF`
/// (waiters, `1: -> FLOCK …`, hold nothing).
fn parse_flock_holders(locks: &str) -> Vec<((u32, u32, u64), i32)> {
    locks
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            if f.get(1) != Some(&"FLOCK") {
                return None;
            }
            let pid = f.get(4)?.parse().ok()?;
            let mut dev = f.get(5)?.splitn(3, ':');
            let major = u32::from_str_radix(dev.next()?, 16).ok()?;
            let minor = u32::from_str_radix(dev.next()?, 16).ok()?;
            let ino = dev.next()?.parse().ok()?;
            Some(((major, minor, ino), pid))
        })
        .collect()
}

/// Every record in the run directory, locked or not, by name.
pub fn record_files() -> Result<Vec<RecordFile>> {
    let dir = run_dir();
    let entries = match fs::read_dir(&dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(Error::io(format!("reading {}", dir.display()), e)),
    };
    let locks =
        fs::read_to_string("/proc/locks").map_err(|e| Error::io("reading /proc/locks", e))?;
    let holders = parse_flock_holders(&locks);
    let mut out = Vec::new();
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let Some((netns_inode, iface)) = parse_record_name(&name) else {
            continue;
        };
        let path = e.path();
        let Ok(mut f) = File::open(&path) else {
            continue; // removed since the listing
        };
        let Ok(meta) = f.metadata() else { continue };
        let key = (libc::major(meta.dev()), libc::minor(meta.dev()), meta.ino());
        out.push(RecordFile {
            netns_inode,
            iface,
            record: read_record(&mut f),
            lock_holder: holders.iter().find(|(k, _)| *k == key).map(|(_, p)| *p),
            modified: meta.modified().ok(),
            path,
        });
    }
    out.sort_by(|a, b| (a.netns_inode, &a.iface).cmp(&(b.netns_inode, &b.iface)));
    Ok(out)
}

/// A dead instance's record, locked by us: no instance can start on its
/// interface while we remove what it left. Dropping it unlocks.
pub struct StaleRecord {
    file: File,
    pub path: PathBuf,
    pub record: Option<Record>,
}

impl StaleRecord {
    /// Locks `path` if its instance is dead; `None` if it lives (or the
    /// file went away).
    pub fn take(path: &Path) -> Result<Option<StaleRecord>> {
        let mut file = match File::open(path) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(Error::io(format!("opening {}", path.display()), e)),
        };
        if !try_flock(&file).map_err(|e| Error::io(format!("locking {}", path.display()), e))? {
            return Ok(None);
        }
        if !still_linked(&file, path) {
            return Ok(None);
        }
        let record = read_record(&mut file);
        Ok(Some(StaleRecord {
            file,
            path: path.to_path_buf(),
            record,
        }))
    }

    /// Removes the record (under its lock), and the run directory if that
    /// leaves it empty.
    pub fn remove(self) -> Result<()> {
        fs::remove_file(&self.path)
            .map_err(|e| Error::io(format!("removing {}", self.path.display()), e))?;
        if let Some(dir) = self.path.parent() {
            let _ = fs::remove_dir(dir); // only if empty
        }
        drop(self.file);
        Ok(())
    }
}

/// Records of live instances (their lock is held), for `tproxy stats`.
pub fn live_records() -> Vec<Record> {
    let Ok(entries) = fs::read_dir(run_dir()) else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for e in entries.flatten() {
        let Ok(mut f) = File::open(e.path()) else {
            continue;
        };
        if matches!(try_flock(&f), Ok(false))
            && let Some(r) = read_record(&mut f)
        {
            out.push(r);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{config::options::TcMode, sys::routing::TproxySpec, target::installed::AttachKind};

    #[test]
    fn second_lock_is_refused_and_record_is_removed_on_drop() {
        let dir = tempfile::tempdir().unwrap();
        // SAFETY: tests in this module are the only users of the variable.
        unsafe { std::env::set_var("TPROXY_RUN_DIR", dir.path()) };
        let (mut lock, stale) = InstanceLock::acquire(1, "eth9").unwrap();
        assert!(stale.is_none());
        let rec = Record {
            pid: 42,
            installed: Installed {
                iface: "eth9".into(),
                ifindex: 9,
                netns_inode: 1,
                netns_cookie: 4096,
                tc_mode: Some(TcMode::Netlink),
                created_clsact: false,
                tproxy: Some(TproxySpec::new("eth9", 0x7409, 0x7409, 15006)),
                tc_progs: vec![77],
            },
            cgroup: "/sys/fs/cgroup".into(),
            steer: Steer::Tproxy,
            counters_map_id: 1,
            flows_map_id: 2,
            syns_map_id: 5,
            closing_map_id: 6,
            sockhash_map_id: 3,
            socks_map_id: 4,
            flows_in_use_map_id: 0,
            upstream_flows_map_id: 0,
            ports: "8000".into(),
            proxy_port: 15006,
            accel: true,
            started_at: 1_700_000_000,
            attachments: vec![Attached {
                what: "tc ingress tproxy_steer on eth9 (Netlink)".into(),
                kind: AttachKind::TcIngress,
                program: "tproxy_steer".into(),
                prog_id: 77,
                link_id: None,
            }],
            ready: true,
        };
        lock.write(&rec).unwrap();
        match InstanceLock::acquire(1, "eth9") {
            Err(Error::AlreadyRunning { pid, .. }) => assert_eq!(pid, 42),
            Err(e) => panic!("{e}"),
            Ok(_) => panic!("second lock granted"),
        }
        assert_eq!(live_records(), vec![rec]);
        // Another interface or namespace is another instance.
        let (other, _) = InstanceLock::acquire(2, "eth9").unwrap();
        drop(other);
        drop(lock);
        assert!(!record_path(dir.path(), 1, "eth9").exists());
    }

    #[test]
    fn a_record_from_before_the_status_fields_still_reads() {
        let old = r#"{"pid":7,"iface":"eth0","ifindex":2,"netns_inode":9,
            "cgroup":"/sys/fs/cgroup","tc_mode":"netlink","created_clsact":true,
            "steer":"tproxy","tproxy":null,"counters_map_id":1,"flows_map_id":2,
            "sockhash_map_id":3,"socks_map_id":4}"#;
        let r = parse_record(old).unwrap();
        assert_eq!((r.pid, r.installed.tc_mode), (7, Some(TcMode::Netlink)));
        assert_eq!(
            (r.installed.iface.as_str(), r.installed.ifindex),
            ("eth0", 2)
        );
        assert!(r.attachments.is_empty() && !r.ready && r.installed.netns_cookie == 0);
    }

    /// The previous build's record named its tc programs only among its
    /// attachments: the removal finds its filters by those ids all the
    /// same. Its keys are this build's (`installed` is flattened).
    #[test]
    fn a_record_of_the_previous_build_reads_with_its_tc_programs() {
        let old = r#"{"pid":7,"iface":"eth0","ifindex":2,"netns_inode":9,
            "cgroup":"/sys/fs/cgroup","tc_mode":"netlink","created_clsact":true,
            "steer":"tproxy","tproxy":{"nft_table":"tproxy_eth0","mark":29698,
            "table":29698,"proxy_port":15006,"owner":"ab12"},
            "counters_map_id":1,"flows_map_id":2,"syns_map_id":5,"closing_map_id":6,
            "sockhash_map_id":3,"socks_map_id":4,"flows_in_use_map_id":7,
            "ports":"8000","proxy_port":15006,"accel":true,"started_at":1700000000,
            "netns_cookie":4096,"attachments":[
            {"what":"sockops tproxy_sockops to /sys/fs/cgroup","kind":"cgroup",
             "program":"tproxy_sockops","prog_id":70,"link_id":12},
            {"what":"tc egress tproxy_restore on eth0 (Netlink)","kind":"tc_egress",
             "program":"tproxy_restore","prog_id":71,"link_id":null},
            {"what":"tc ingress tproxy_steer on eth0 (Netlink)","kind":"tc_ingress",
             "program":"tproxy_steer","prog_id":72,"link_id":null}],
            "ready":true}"#;
        let r = parse_record(old).unwrap();
        let i = &r.installed;
        assert_eq!(i.tc_progs, vec![71, 72]);
        assert_eq!((i.netns_inode, i.netns_cookie), (9, 4096));
        assert!(i.created_clsact && i.tproxy.as_ref().unwrap().table == 29698);
        // Written again, the keys stay at the top level, with one more.
        let v = serde_json::to_value(&r).unwrap();
        for key in [
            "iface",
            "ifindex",
            "netns_inode",
            "netns_cookie",
            "tc_mode",
            "tproxy",
        ] {
            assert!(v.get(key).is_some(), "{key}: {v:#}");
        }
        assert_eq!(v["tc_progs"], serde_json::json!([71, 72]));
        assert_eq!(serde_json::from_value::<Record>(v).unwrap(), r);
    }

    #[test]
    fn flock_holders_from_proc_locks() {
        let locks = "1: FLOCK  ADVISORY  WRITE 10006 fe:00:9822228 0 EOF\n\
                     2: POSIX  ADVISORY  WRITE 33 00:19:5 0 EOF\n\
                     3: -> FLOCK  ADVISORY  WRITE 11 fe:00:9822228 0 EOF\n\
                     4: FLOCK  ADVISORY  READ 20109 103:1a:77 0 EOF\n";
        assert_eq!(
            parse_flock_holders(locks),
            vec![((0xfe, 0, 9822228), 10006), ((0x103, 0x1a, 77), 20109)]
        );
    }

    #[test]
    fn record_names_give_namespace_and_interface() {
        assert_eq!(
            parse_record_name("4026532315-eth0.json"),
            Some((4026532315, "eth0".into()))
        );
        // Interface names may hold dashes.
        assert_eq!(
            parse_record_name("12-veth-a.json"),
            Some((12, "veth-a".into()))
        );
        assert_eq!(parse_record_name("eth0.json"), None);
        assert_eq!(parse_record_name("12-eth0.json.tmp"), None);
    }
}
