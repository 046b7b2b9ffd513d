//! `tproxy status`: every instance on the host, in every network namespace,
//! from the runtime records, each checked against the kernel: is its
//! process alive and holding its lock, is each of its programs loaded and
//! attached where it should be (links by id, netlink filters on its
//! interface), what its maps say (open flows, accelerated sockets).
//! Read-only: it takes no lock, so it never gets in a start's way.
use std::{
    fmt::Write as _,
    os::{fd::AsFd as _, unix::fs::MetadataExt as _},
    path::{Path, PathBuf},
};

use serde::Serialize;

use crate::{
    Steer,
    config::options::TcMode,
    observe::{Error, Result},
    sys::{
        bpf::{self, LinkInfo, LinkTarget},
        netns::{self, Located},
        routing::TproxySpec,
        system,
        tc::{self, BpfFilter},
    },
    target::{
        inspect::{self, FlowStats},
        installed::{AttachKind, Attached},
        record::{self, Record, RecordFile},
    },
};

#[derive(Clone, Copy, Debug, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum State {
    /// Alive, holding its lock, everything attached.
    Running,
    /// Alive and holding its lock, not done attaching yet.
    Starting,
    /// Alive, but something of it is missing (see `problems`).
    Degraded,
    /// Dead: its lock is free; `tproxy cleanup` removes what it left.
    Stale,
}

impl State {
    fn label(self) -> &'static str {
        match self {
            State::Running => "OK",
            State::Starting => "STARTING",
            State::Degraded => "DEGRADED",
            State::Stale => "STALE",
        }
    }
}

#[derive(Clone, Debug, Serialize)]
pub struct AttachmentStatus {
    #[serde(flatten)]
    pub recorded: Attached,
    /// The kernel has it where the record says.
    pub attached: bool,
}

/// One instance, as its record says and the kernel confirms.
#[derive(Clone, Debug, Serialize)]
pub struct InstanceStatus {
    pub state: State,
    /// What is wrong, one line each (empty when running).
    pub problems: Vec<String>,
    pub record: PathBuf,
    /// 0 if the record is empty.
    pub pid: i32,
    pub pid_alive: bool,
    /// The process holding the record's lock; `null` when free.
    pub lock_holder: Option<i32>,
    pub netns_inode: u64,
    /// Its `ip netns` name, if it has one.
    pub netns_name: Option<String>,
    pub netns_exists: bool,
    pub iface: String,
    pub ifindex: u32,
    pub cgroup: Option<PathBuf>,
    pub ports: String,
    pub proxy_port: u16,
    pub steer: Option<Steer>,
    pub tproxy: Option<TproxySpec>,
    /// `null` when the record does not say (an older tproxy wrote it).
    pub accel: Option<bool>,
    pub tc_mode: Option<TcMode>,
    /// Unix seconds; 0 if not recorded.
    pub started_at: u64,
    pub uptime_s: Option<u64>,
    /// Read from its maps (running instances only).
    pub flows: Option<FlowStats>,
    pub accel_sockets: Option<usize>,
    pub attachments: Vec<AttachmentStatus>,
}

fn now_s() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// The program `id` is loaded.
fn prog_loaded(id: u32) -> bool {
    bpf::prog_get_fd_by_id(id).is_ok()
}

/// What the kernel says about the link `id`; `None` once it is gone.
fn link_state(id: u32) -> Option<LinkInfo> {
    let fd = bpf::link_get_fd_by_id(id).ok()?;
    bpf::link_info(fd.as_fd()).ok()
}

/// What the namespace of a live instance says, asked inside it.
struct InNetns {
    ifindex: Option<u32>,
    /// The bpf filters on its interface (netlink tc mode only).
    filters: Option<std::io::Result<Vec<BpfFilter>>>,
}

/// Checks one attachment against the kernel: `Err` says what is missing.
fn check(
    a: &Attached,
    rec: &Record,
    cgroup_id: Option<u64>,
    ns: Option<&InNetns>,
) -> Result<(), String> {
    let what = &a.what;
    if !prog_loaded(a.prog_id) {
        return Err(format!("{what}: program id {} is not loaded", a.prog_id));
    }
    let is_tc = matches!(a.kind, AttachKind::TcIngress | AttachKind::TcEgress);
    if is_tc && rec.installed.tc_mode == Some(TcMode::Netlink) {
        let egress = a.kind == AttachKind::TcEgress;
        return match ns.and_then(|n| n.filters.as_ref()) {
            Some(Ok(filters)) => {
                if filters
                    .iter()
                    .any(|f| f.prog_id == a.prog_id && f.egress == egress)
                {
                    Ok(())
                } else {
                    Err(format!(
                        "{what}: no {} filter on {} runs program id {}",
                        if egress { "egress" } else { "ingress" },
                        rec.installed.iface,
                        a.prog_id
                    ))
                }
            }
            Some(Err(e)) => Err(format!(
                "{what}: listing the tc filters on {}: {e}",
                rec.installed.iface
            )),
            None => Err(format!(
                "{what}: its network namespace could not be entered"
            )),
        };
    }
    // sk_msg (attached to the SOCKHASH) is no link: loaded is what can be
    // known. A link recorded must be there, running the program, on its
    // target.
    let Some(link) = a.link_id else {
        return Ok(());
    };
    let Some(l) = link_state(link) else {
        return Err(format!("{what}: link id {link} is gone"));
    };
    if l.prog_id != a.prog_id {
        return Err(format!(
            "{what}: link id {link} now runs program id {}, not {}",
            l.prog_id, a.prog_id
        ));
    }
    let (want, target) = match l.target {
        LinkTarget::Cgroup(id) => (cgroup_id, id),
        LinkTarget::Tcx(ifindex) => (Some(u64::from(rec.installed.ifindex)), u64::from(ifindex)),
        LinkTarget::Other => return Ok(()),
    };
    match want {
        _ if target == 0 => Err(format!("{what}: link id {link} is detached")),
        Some(t) if t != target => Err(format!(
            "{what}: link id {link} is attached elsewhere (target {target})"
        )),
        Some(_) => Ok(()),
        None => Err(format!("{what}: its cgroup is gone")),
    }
}

fn status_of(f: RecordFile) -> Option<InstanceStatus> {
    if f.lock_holder.is_none() && !f.is_stale() {
        return None; // a start between creating its record and locking it
    }
    let located = f
        .record
        .as_ref()
        .map(Record::located)
        .unwrap_or_else(|| netns::locate(f.netns_inode, 0));
    let mut s = InstanceStatus {
        state: State::Running,
        problems: Vec::new(),
        record: f.path.clone(),
        pid: 0,
        pid_alive: false,
        lock_holder: f.lock_holder,
        netns_inode: f.netns_inode,
        netns_name: netns::name_of(f.netns_inode),
        netns_exists: located != Located::Gone,
        iface: f.iface.clone(),
        ifindex: 0,
        cgroup: None,
        ports: String::new(),
        proxy_port: 0,
        steer: None,
        tproxy: None,
        accel: None,
        tc_mode: None,
        started_at: 0,
        uptime_s: None,
        flows: None,
        accel_sockets: None,
        attachments: Vec::new(),
    };
    let Some(rec) = f.record else {
        if f.lock_holder.is_some() {
            s.state = State::Starting;
        } else {
            s.state = State::Stale;
            s.problems.push(
                "an empty record: an instance killed while starting, before it installed anything"
                    .into(),
            );
        }
        return Some(s);
    };
    s.pid = rec.pid;
    s.pid_alive = Path::new(&format!("/proc/{}", rec.pid)).exists();
    s.ifindex = rec.installed.ifindex;
    s.cgroup = Some(rec.cgroup.clone());
    s.ports.clone_from(&rec.ports);
    s.proxy_port = rec.proxy_port;
    s.steer = Some(rec.steer);
    s.tproxy.clone_from(&rec.installed.tproxy);
    // Records written before these fields existed have no start time.
    let legacy = rec.started_at == 0;
    s.accel = (!legacy).then_some(rec.accel);
    s.tc_mode = rec.installed.tc_mode;
    s.started_at = rec.started_at;
    s.uptime_s = (rec.started_at > 0).then(|| now_s().saturating_sub(rec.started_at));
    let not_checked = |a: &Attached| AttachmentStatus {
        recorded: a.clone(),
        attached: false,
    };
    match f.lock_holder {
        None => {
            s.state = State::Stale;
            s.problems.push(format!(
                "tproxy (pid {}) died without cleaning up: its lock is free",
                rec.pid
            ));
            if !s.netns_exists {
                s.problems.push(
                    "its network namespace no longer exists (its tc filters and routing went with it)"
                        .into(),
                );
            }
            s.attachments = rec.attachments.iter().map(not_checked).collect();
            return Some(s);
        }
        // A new instance took the lock of a dead one's record and has not
        // written its own yet.
        Some(h) if h != rec.pid => {
            s.state = State::Starting;
            s.attachments = rec.attachments.iter().map(not_checked).collect();
            return Some(s);
        }
        // An older tproxy's record is never "ready": that instance is
        // running, its programs cannot be checked.
        Some(_) if !rec.ready && !legacy => {
            s.state = State::Starting;
            s.attachments = rec.attachments.iter().map(not_checked).collect();
            return Some(s);
        }
        Some(_) => {}
    }

    // Alive: check it all.
    let netlink = rec.installed.tc_mode == Some(TcMode::Netlink);
    let in_ns = netns::run_located(&located, || InNetns {
        ifindex: system::ifindex(&rec.installed.iface).ok(),
        filters: netlink.then(|| tc::bpf_filters(rec.installed.ifindex)),
    });
    let in_ns = match in_ns {
        Some(Ok(n)) => Some(n),
        Some(Err(e)) => {
            s.problems.push(format!("its network namespace: {e}"));
            None
        }
        None => {
            s.problems
                .push("its network namespace cannot be found".into());
            None
        }
    };
    if let Some(n) = &in_ns
        && n.ifindex != Some(rec.installed.ifindex)
    {
        s.problems.push(format!(
            "its interface {} (index {}) no longer exists",
            rec.installed.iface, rec.installed.ifindex
        ));
    }
    // Under `ip netns exec` (/sys remounted, no cgroup2 in sight) the path
    // resolves the way the run resolved it: through a private mount.
    let cgroup_id = std::fs::metadata(&rec.cgroup)
        .ok()
        .or_else(|| {
            system::open_cgroup(Some(&rec.cgroup))
                .ok()
                .and_then(|c| c.dir.metadata().ok())
        })
        .map(|m| m.ino());
    for a in &rec.attachments {
        let r = check(a, &rec, cgroup_id, in_ns.as_ref());
        if let Err(p) = &r {
            s.problems.push(p.clone());
        }
        s.attachments.push(AttachmentStatus {
            recorded: a.clone(),
            attached: r.is_ok(),
        });
    }
    match inspect::flows_of(&rec) {
        Ok(flows) => s.flows = Some(flows),
        // Another build's maps: nothing wrong with the instance.
        Err(e) if inspect::other_build(&e) => {}
        Err(e) => s.problems.push(format!("reading its flow table: {e}")),
    }
    if rec.accel {
        match inspect::accel_of(&rec) {
            Ok((n, _)) => s.accel_sockets = Some(n),
            Err(e) if inspect::other_build(&e) => {}
            Err(e) => s
                .problems
                .push(format!("reading its accelerated sockets: {e}")),
        }
    }
    if !s.problems.is_empty() {
        s.state = State::Degraded;
    }
    Some(s)
}

/// Every instance with a record on this host.
pub fn collect() -> Result<Vec<InstanceStatus>> {
    Ok(record::record_files()?
        .into_iter()
        .filter_map(status_of)
        .collect())
}

/// `YYYY-MM-DDTHH:MM:SSZ` for unix seconds.
fn utc(ts: u64) -> String {
    humantime::format_rfc3339_seconds(std::time::UNIX_EPOCH + std::time::Duration::from_secs(ts))
        .to_string()
}

/// `3d4h`, `2h5m`, `5m13s`, `42s`.
fn human_duration(s: u64) -> String {
    let (d, h, m, sec) = (s / 86_400, s % 86_400 / 3600, s % 3600 / 60, s % 60);
    if d > 0 {
        format!("{d}d{h}h")
    } else if h > 0 {
        format!("{h}h{m}m")
    } else if m > 0 {
        format!("{m}m{sec}s")
    } else {
        format!("{sec}s")
    }
}

fn heading(s: &InstanceStatus) -> String {
    let ns = match (&s.netns_name, s.netns_exists) {
        (Some(n), _) => format!("{n} ({})", s.netns_inode),
        (None, true) => s.netns_inode.to_string(),
        (None, false) => format!("{} (gone)", s.netns_inode),
    };
    format!("tproxy on {} in netns {ns}: {}", s.iface, s.state.label())
}

/// One block per instance, `cilium status` style: a heading with the
/// verdict, then one aligned line per aspect.
pub fn render(all: &[InstanceStatus]) -> String {
    if all.is_empty() {
        return "no tproxy instance on this host\n".into();
    }
    let mut out = String::new();
    for s in all {
        let _ = writeln!(out, "{}", heading(s));
        let mut line = |k: &str, v: String| {
            let _ = writeln!(out, "  {:<14}{v}", format!("{k}:"));
        };
        for p in &s.problems {
            line("Problem", p.clone());
        }
        if s.state == State::Stale {
            line(
                "Fix",
                format!(
                    "`tproxy cleanup --all` (or `tproxy cleanup -i {}` in its namespace)",
                    s.iface
                ),
            );
        }
        if s.pid != 0 {
            let mut p = format!("pid {}", s.pid);
            match (s.lock_holder, s.pid_alive) {
                (Some(h), _) if h == s.pid => p += " (holds its lock)",
                (Some(h), _) => {
                    let _ = write!(p, " (its lock is held by pid {h})");
                }
                (None, true) => p += " (alive, but its lock is free)",
                (None, false) => p += " (dead)",
            }
            if s.started_at > 0 {
                let _ = write!(p, ", started {}", utc(s.started_at));
                if let Some(up) = s.uptime_s.filter(|_| s.state != State::Stale) {
                    let _ = write!(p, ", up {}", human_duration(up));
                }
            }
            line("Process", p);
        }
        if let Some(cg) = &s.cgroup {
            line("Cgroup", cg.display().to_string());
        }
        if let Some(steer) = s.steer {
            let mut v = String::new();
            if !s.ports.is_empty() {
                let _ = write!(v, "ports {} -> proxy port {}, ", s.ports, s.proxy_port);
            }
            match (&s.tproxy, steer) {
                (Some(t), _) => {
                    let _ = write!(
                        v,
                        "back-end tproxy (mark {:#x}, table {}, nftables inet {})",
                        t.mark, t.table, t.nft_table
                    );
                }
                (None, Steer::Tproxy) => v += "back-end tproxy",
                (None, Steer::Rewrite) => v += "back-end rewrite",
            }
            if let Some(tc) = s.tc_mode {
                let _ = write!(v, ", tc {}", format!("{tc:?}").to_lowercase());
            }
            line("Steering", v);
            let accel = match (s.accel, s.accel_sockets) {
                (None, _) => "not recorded (an older tproxy started it)".to_string(),
                (Some(false), _) => "off".to_string(),
                (Some(true), Some(n)) => format!("on, {n} accelerated socket(s)"),
                (Some(true), None) => "on".to_string(),
            };
            line("Acceleration", accel);
        }
        if let Some(f) = &s.flows {
            line(
                "Flows",
                format!(
                    "{} open ({} active), {} closing, {} embryonic",
                    f.open, f.active, f.closing, f.embryonic
                ),
            );
        }
        if matches!(s.state, State::Running | State::Degraded) {
            let ok = s.attachments.iter().filter(|a| a.attached).count();
            line(
                "Programs",
                if s.attachments.is_empty() {
                    "not recorded (an older tproxy started it)".into()
                } else {
                    format!("{ok}/{} attached", s.attachments.len())
                },
            );
        }
        out.push('\n');
    }
    let count = |st: State| all.iter().filter(|s| s.state == st).count();
    let _ = writeln!(
        out,
        "{} instance(s): {} OK, {} degraded, {} stale, {} starting",
        all.len(),
        count(State::Running),
        count(State::Degraded),
        count(State::Stale),
        count(State::Starting)
    );
    out
}

/// `tproxy status [--json]`: prints every instance; an error (exit 1)
/// when one is dead or degraded, after printing.
pub fn run(json: bool) -> Result<()> {
    system::check_privileges()?;
    let all = collect()?;
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(&all).expect("status serializes")
        );
    } else {
        print!("{}", render(&all));
    }
    let stale = all.iter().filter(|s| s.state == State::Stale).count();
    let degraded = all.iter().filter(|s| s.state == State::Degraded).count();
    if stale + degraded > 0 {
        return Err(Error::Unhealthy { stale, degraded });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dates_and_durations_read_like_dates_and_durations() {
        assert_eq!(utc(0), "1970-01-01T00:00:00Z");
        assert_eq!(utc(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(utc(1_763_814_245), "2025-11-22T12:24:05Z");
        assert_eq!(human_duration(42), "42s");
        assert_eq!(human_duration(313), "5m13s");
        assert_eq!(human_duration(7500), "2h5m");
        assert_eq!(human_duration(3 * 86_400 + 4 * 3600 + 59), "3d4h");
    }

    #[test]
    fn a_program_id_nobody_uses_is_not_loaded_and_a_link_id_not_there() {
        // Ids count up from 1; the largest is never handed out this early.
        assert!(!prog_loaded(u32::MAX - 1));
        assert_eq!(link_state(u32::MAX - 1), None);
    }
}
