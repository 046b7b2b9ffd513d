//! The nudger: wakes the reader of an accelerated socket that sleeps on
//! TCP bytes it was never told about.
//!
//! Linux's tcp_bpf_recvmsg reads only the queue of redirected bytes while
//! it is non-empty, so the read that empties it is short even with TCP
//! bytes (sent after a fallback) queued behind. An edge-triggered reader
//! (tokio, HAProxy) takes a short read for "drained" and sleeps; the TCP
//! bytes' wake-up came before that read. sockops' `nudge` wakes it from the
//! next packet its socket sends, but when the writer waits for an answer
//! none comes: both ends sleep for good. After that read nothing of the
//! kernel runs for that socket but the read hook, which may not call
//! bpf_setsockopt; so it reports the read (`NUDGE_EVENTS`), and this
//! thread looks again `SETTLE` later: if the reader has not read since and
//! the TCP bytes are still unread, it puts the socket in `NUDGE` and walks
//! the TCP sockets of its namespace with `tproxy_nudge_iter`, which wakes
//! exactly the sockets in `NUDGE` (SO_RCVLOWAT set to its own value: the
//! kernel's tcp_data_ready wakes the reader).
//!
//! A walk visits every bucket of the kernel's TCP hash table (a namespace
//! shares the host's unless `net.ipv4.tcp_child_ehash_entries` gave it its
//! own): about 2 ms for 262,144 buckets here, whatever the number of
//! sockets. So walks are paced: after a walk that took `d`, the next one
//! (of any namespace) waits `WALK_PACE` times `d`, which keeps the nudger
//! under a tenth of a core however many reports come; each walk takes the
//! namespace with the oldest report waiting, and wakes every socket of it
//! found asleep.
//!
//! What a process in a served cgroup can make it do: only sockets in
//! `SOCKS` (accelerated ones) are ever reported, put in `NUDGE` or woken,
//! each fallback of a sender makes one report at most, reports beyond
//! `MAX_PENDING` waiting ones are dropped, and the pace bounds the walks: a
//! flood of fallbacks in one pod delays other pods' wake-ups (by a walk
//! each), it does not multiply the work.
use std::{
    collections::HashMap as StdHashMap,
    io::Read as _,
    os::fd::{AsFd as _, AsRawFd as _, BorrowedFd, FromRawFd as _, OwnedFd},
    path::PathBuf,
    thread::JoinHandle,
    time::{Duration, Instant},
};

use aya::maps::{HashMap, MapData, RingBuf};
use tproxy_common::{NUDGE_MAX, NudgeEvent, SockState, names, sock_flags::FAST};
use tracing::{debug, warn};

use crate::{
    sys::error::Chain,
    target::{Error, Result},
};

/// How long after a short read a reader that has not read since counts as
/// asleep: a reader that is awake reads its TCP bytes well within it.
pub const SETTLE: Duration = Duration::from_millis(2);
/// After a walk, the nudger rests this many times as long as it took.
pub const WALK_PACE: u32 = 9;
/// Reports waiting for their `SETTLE` at most; more are dropped.
const MAX_PENDING: usize = 4 * NUDGE_MAX as usize;

/// Where a network namespace is, for the walk of its sockets.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Netns {
    /// This process's (a single run serves its own namespace).
    Here,
    /// Entered through this path (the agent's pods).
    At(PathBuf),
    /// Not one this process serves (any more): its reports are dropped.
    Gone,
}

/// What the nudger takes of the loaded object.
pub struct NudgeMaps {
    pub(crate) events: RingBuf<MapData>,
    pub(crate) socks: HashMap<MapData, u64, SockState>,
    pub(crate) nudge: HashMap<MapData, u64, u64>,
    /// The iterator program's link: each walk is a new iterator of it.
    pub(crate) link: OwnedFd,
}

/// The running nudger thread; dropping it stops and joins the thread.
pub struct Nudger {
    stop: OwnedFd,
    thread: Option<JoinHandle<()>>,
}

impl Nudger {
    /// Starts the thread; `resolve` says where a netns cookie's namespace is.
    pub fn start(
        maps: NudgeMaps,
        resolve: impl Fn(u64) -> Netns + Send + 'static,
    ) -> Result<Nudger> {
        // SAFETY: eventfd returns a new descriptor or -1.
        let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
        if fd < 0 {
            return Err(Error::io(
                "creating the nudger's eventfd",
                std::io::Error::last_os_error(),
            ));
        }
        // SAFETY: a descriptor we own from here on.
        let stop = unsafe { OwnedFd::from_raw_fd(fd) };
        let stop_rx = stop
            .try_clone()
            .map_err(|e| Error::io("duplicating the nudger's eventfd", e))?;
        let thread = std::thread::Builder::new()
            .name("nudger".into())
            .spawn(move || {
                Worker {
                    maps,
                    resolve: Box::new(resolve),
                    pending: StdHashMap::new(),
                    next_walk: Instant::now(),
                }
                .run(&stop_rx)
            })
            .map_err(|e| Error::io("starting the nudger thread", e))?;
        Ok(Nudger {
            stop,
            thread: Some(thread),
        })
    }
}

impl Drop for Nudger {
    fn drop(&mut self) {
        let one: u64 = 1;
        // SAFETY: an 8-byte write to our eventfd.
        unsafe { libc::write(self.stop.as_raw_fd(), (&raw const one).cast(), 8) };
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

#[derive(Clone, Copy)]
struct Pending {
    ev: NudgeEvent,
    came: Instant,
    due: Instant,
}

struct Worker {
    maps: NudgeMaps,
    resolve: Box<dyn Fn(u64) -> Netns + Send>,
    /// Reported sockets by address: the report, when it came, when to look.
    pending: StdHashMap<u64, Pending>,
    /// No walk before this (`WALK_PACE`).
    next_walk: Instant,
}

impl Worker {
    fn run(mut self, stop: &OwnedFd) {
        let ring = self.maps.events.as_raw_fd();
        loop {
            let timeout = self.next_due().map_or(-1, |due| {
                let us = due.saturating_duration_since(Instant::now()).as_micros();
                // poll's resolution is a millisecond: round up.
                us.div_ceil(1000).min(1000) as i32
            });
            let mut fds = [
                libc::pollfd {
                    fd: ring,
                    events: libc::POLLIN,
                    revents: 0,
                },
                libc::pollfd {
                    fd: stop.as_raw_fd(),
                    events: libc::POLLIN,
                    revents: 0,
                },
            ];
            // SAFETY: two valid pollfds.
            let r = unsafe { libc::poll(fds.as_mut_ptr(), 2, timeout) };
            if r < 0 && std::io::Error::last_os_error().kind() != std::io::ErrorKind::Interrupted {
                warn!(
                    "nudger: poll failed ({}); stopping",
                    std::io::Error::last_os_error()
                );
                return;
            }
            if fds[1].revents != 0 {
                return;
            }
            self.take_reports();
            self.look();
        }
    }

    fn next_due(&self) -> Option<Instant> {
        self.pending.values().map(|p| p.due).min()
    }

    fn take_reports(&mut self) {
        let now = Instant::now();
        while let Some(item) = self.maps.events.next() {
            if item.len() < size_of::<NudgeEvent>() {
                continue;
            }
            // SAFETY: the program writes whole NudgeEvents; read unaligned.
            let ev = unsafe { std::ptr::read_unaligned(item.as_ptr().cast::<NudgeEvent>()) };
            if self.pending.len() >= MAX_PENDING && !self.pending.contains_key(&ev.sk) {
                continue;
            }
            // A newer report of the same socket replaces the older one.
            self.pending.insert(
                ev.sk,
                Pending {
                    ev,
                    came: now,
                    due: now + SETTLE,
                },
            );
        }
    }

    /// Sockets whose `SETTLE` is over: the ones that read since are
    /// dropped; of the namespaces with sockets still asleep, the one with
    /// the oldest report is walked (if the pace allows), the others wait.
    fn look(&mut self) {
        let now = Instant::now();
        let due: Vec<Pending> = self
            .pending
            .values()
            .filter(|p| p.due <= now)
            .copied()
            .collect();
        let mut oldest: Option<Pending> = None;
        for p in due {
            if !self.still_asleep(&p.ev) {
                self.pending.remove(&p.ev.sk);
                continue;
            }
            if oldest.is_none_or(|o| p.came < o.came) {
                oldest = Some(p);
            }
        }
        let Some(first) = oldest else {
            return;
        };
        if now < self.next_walk {
            let at = self.next_walk;
            for p in self.pending.values_mut().filter(|p| p.due <= now) {
                p.due = at;
            }
            return;
        }
        let cookie = first.ev.netns_cookie;
        let mut evs = Vec::new();
        self.pending.retain(|_, p| {
            // (`NUDGE` holds so many; the rest wait for the next walk.)
            if p.due <= now && p.ev.netns_cookie == cookie && evs.len() < NUDGE_MAX as usize {
                evs.push(*p);
                false
            } else {
                true
            }
        });
        let started = Instant::now();
        self.wake(cookie, &evs);
        let took = started.elapsed();
        self.next_walk = Instant::now() + took * WALK_PACE;
        // The other namespaces' sleepers: at the next walk.
        let at = self.next_walk;
        for p in self.pending.values_mut().filter(|p| p.due <= now) {
            p.due = at;
        }
    }

    /// The reader has not read since the report, and its peer's TCP bytes
    /// are still unread.
    fn still_asleep(&self, ev: &NudgeEvent) -> bool {
        let Ok(own) = self.maps.socks.get(&ev.sk, 0) else {
            return false; // closed
        };
        if own.read != ev.read {
            return false;
        }
        let Ok(peer) = self.maps.socks.get(&own.peer, 0) else {
            return false;
        };
        peer.flags & FAST == 0 && peer.sent > own.read
    }

    fn wake(&mut self, cookie: u64, evs: &[Pending]) {
        let at = (self.resolve)(cookie);
        if at == Netns::Gone {
            return;
        }
        let mut put = Vec::new();
        for ev in evs.iter().map(|p| &p.ev) {
            if self.maps.nudge.insert(ev.sk, ev.read, 0).is_ok() {
                put.push(ev.sk);
            }
        }
        let link = self.maps.link.as_fd();
        let started = Instant::now();
        let r = match &at {
            Netns::Here => walk(link),
            Netns::At(path) => crate::sys::netns::run_in(path, move || walk(link))
                .map_err(Error::from)
                .and_then(|r| r),
            Netns::Gone => unreachable!(),
        };
        for sk in &put {
            let _ = self.maps.nudge.remove(sk);
        }
        match r {
            Ok(()) => debug!(
                netns_cookie = cookie,
                sockets = put.len(),
                walk_us = started.elapsed().as_micros() as u64,
                // From the first report to the wake-up.
                after_us = evs
                    .iter()
                    .map(|p| p.came.elapsed())
                    .max()
                    .unwrap_or_default()
                    .as_micros() as u64,
                "nudger: woke readers asleep on TCP bytes"
            ),
            Err(e) => warn!("nudger: walking the TCP sockets: {}", Chain(&e)),
        }
    }
}

/// One walk of the TCP sockets of the calling thread's network namespace
/// (the kernel takes the namespace at BPF_ITER_CREATE) with the program of
/// `link`. aya's `IterLink::into_file` gives its link up for one iterator;
/// the nudger walks many times, so it creates them itself.
fn walk(link: BorrowedFd<'_>) -> Result<()> {
    let mut f = crate::sys::bpf::iter_create(link)
        .map_err(|e| Error::io("creating a TCP socket iterator (BPF_ITER_CREATE)", e))?;
    // The program writes nothing: each read walks until the end.
    let mut buf = [0u8; 64];
    loop {
        match f.read(&mut buf) {
            Ok(0) => return Ok(()),
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(Error::io("walking the TCP sockets", e)),
        }
    }
}

/// Creates the iterator program's link (BPF_LINK_CREATE, attach type
/// BPF_TRACE_ITER, no parameters): aya's `Iter::attach` keeps its link
/// descriptor to itself.
pub(crate) fn iter_link(prog: &aya::programs::Iter) -> Result<OwnedFd> {
    let prog_fd = prog
        .fd()
        .map_err(|e| Error::load_program(names::PROG_NUDGE_ITER, e))?;
    crate::sys::bpf::iter_link_create(prog_fd.as_fd()).map_err(|e| {
        Error::io(
            "creating the nudger's TCP iterator link (BPF_LINK_CREATE)",
            e,
        )
    })
}
