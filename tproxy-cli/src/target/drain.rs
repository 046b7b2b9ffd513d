//! Draining a target before it is detached or changed, the same way
//! whoever owns it: a single run on its signal, the agent removing,
//! replacing or changing a target. The owner first turns steering of new
//! flows off (`flags::STEER_NEW`); then `flows` waits for the steered flows
//! to end, up to a timeout, looking at them every `FLOWS_TICK`; then
//! `accel` hands acceleration back: with redirection off (`flags::ACCEL`),
//! a grace for a sender that read the flag just before, and a bounded wait
//! for the readers to read the redirected bytes queued at them (a psock
//! that is destroyed frees its unread ingress queue).
//!
//! The owner counts (its flows, its sockets) and logs; the waiting is
//! here, once.
use std::time::{Duration, Instant};

/// How often a drain looks at the flows it waits for.
pub const FLOWS_TICK: Duration = Duration::from_millis(100);
/// After the redirect flag is cleared, time for a sender that read it just
/// before to finish its enqueue.
pub const ACCEL_GRACE: Duration = Duration::from_millis(100);
/// How often the hand-back looks at the bytes still queued.
pub const ACCEL_TICK: Duration = Duration::from_millis(10);
/// How long the hand-back waits for readers to read their queued
/// redirected bytes.
pub const ACCEL_DRAIN_TIMEOUT: Duration = Duration::from_secs(2);

/// How a flow drain ended: the flows it waited for, and those still active
/// (cut by the detach that follows).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Drained {
    pub start: usize,
    pub left: usize,
}

impl Drained {
    /// The flows that ended while it waited.
    pub fn ended(&self) -> usize {
        self.start.saturating_sub(self.left)
    }
}

/// Waits up to `timeout` for the `start` steered flows `active` counts to
/// end. Between two looks `pause(FLOWS_TICK)` waits and says whether to go
/// on: `false` stops at once (a second signal), after one more count.
pub fn flows<E>(
    start: usize,
    timeout: Duration,
    mut active: impl FnMut() -> Result<usize, E>,
    mut pause: impl FnMut(Duration) -> bool,
) -> Result<Drained, E> {
    let deadline = Instant::now() + timeout;
    let mut left = start;
    while left > 0 && Instant::now() < deadline {
        if !pause(FLOWS_TICK) {
            left = active().unwrap_or(left);
            break;
        }
        left = active()?;
    }
    Ok(Drained { start, left })
}

/// `flows`' pause for an owner nothing stops early: sleeps.
pub fn sleep(d: Duration) -> bool {
    std::thread::sleep(d);
    true
}

/// How handing acceleration back went: the target's accelerated sockets
/// and the redirected bytes queued at them when redirection stopped, the
/// bytes still unread when it gave up (0: all read), and how long it took.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Handback {
    pub sockets: usize,
    pub at_stop: i64,
    pub left: i64,
    pub took: Duration,
}

/// Takes acceleration down without losing a byte: `stop_redirect` clears
/// the target's `ACCEL` flag (no new bytes are redirected: sk_msg passes
/// everything to TCP, which each reader sees only after its queued
/// redirected bytes, so order is kept); after `ACCEL_GRACE`, up to
/// `ACCEL_DRAIN_TIMEOUT` for the readers to read what is queued, as
/// `state` counts it (accelerated sockets, queued bytes). An error of
/// `stop_redirect` returns at once.
pub fn accel<E>(
    stop_redirect: impl FnOnce() -> Result<(), E>,
    mut state: impl FnMut() -> Result<(usize, i64), E>,
) -> Result<Handback, E> {
    stop_redirect()?;
    // A sender that read the flag just before it changed may still be
    // between its verdict and the enqueue: let it finish.
    std::thread::sleep(ACCEL_GRACE);
    let start = Instant::now();
    let (sockets, at_stop) = state().unwrap_or((0, 0));
    let mut left = at_stop;
    while left > 0 && start.elapsed() < ACCEL_DRAIN_TIMEOUT {
        std::thread::sleep(ACCEL_TICK);
        left = state().map(|(_, q)| q).unwrap_or(0);
    }
    Ok(Handback {
        sockets,
        at_stop,
        left,
        took: start.elapsed(),
    })
}

#[cfg(test)]
mod tests {
    use std::cell::Cell;

    use super::*;

    #[test]
    fn a_drain_ends_when_its_flows_do_or_when_told() {
        // Two flows, one ends per look.
        let n = Cell::new(2);
        let active = || {
            n.set(n.get() - 1);
            Ok::<_, ()>(n.get())
        };
        let d = flows(2, Duration::from_secs(5), active, |_| true).unwrap();
        assert_eq!((d.start, d.left, d.ended()), (2, 0, 2));
        // Stopped at the first pause: counted once more, then cut.
        let looks = Cell::new(0);
        let d = flows(
            3,
            Duration::from_secs(5),
            || {
                looks.set(looks.get() + 1);
                Ok::<_, ()>(3)
            },
            |_| false,
        )
        .unwrap();
        assert_eq!((d.left, looks.get()), (3, 1));
        // Nothing to wait for: not even one look.
        let never = || -> Result<usize, ()> { panic!("looked") };
        let d = flows(0, Duration::from_secs(5), never, |_| true).unwrap();
        assert_eq!(d.left, 0);
        // A zero timeout waits for nothing.
        let d = flows(4, Duration::ZERO, never, |_| true).unwrap();
        assert_eq!(d.left, 4);
    }
}
