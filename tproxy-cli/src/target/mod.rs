//! One target's lifecycle: probe its namespace, load the object, attach
//! it, serve, drain, detach; one record of what a target installed, in the
//! single run's runtime record and the agent's state, and one way to
//! remove it after its owner died. Its files form a stack, each using only
//! the ones before it (and `sys`, `config`, `api` below), lowest first:
//!
//! - `error`: the layer's `Error`, which every file here returns.
//! - `drain`: waiting for a target's flows and accelerated bytes to end.
//! - `attach`: the owners that detach one kernel attachment on drop.
//! - `sweep`: taking a removed target's entries out of the shared maps.
//! - `nudger`: waking readers of accelerated sockets asleep on TCP bytes.
//! - `probe`: a target's facts in its namespace, its steering plan, and
//!   the `TargetEnv` it attaches with.
//! - `installed`: what a target installed (`Installed`, its `Attached`
//!   programs, the `Planned` tc hooks) and its one removal path.
//! - `record`: a single run's runtime record and instance lock.
//! - `agent_state`: the agent's state file and lock.
//! - `inspect`: reading a running instance's maps (`Maps`, `MapIds`).
//! - `loader`: the object, loaded once, its node-wide hooks and pins.
//! - `attachment`: one attached target (`TargetAttachment`).
//! - `recovery`: removing what a dead single run or agent left.
//! - `instance`: a single run, built all-or-nothing from the above.
pub mod agent_state;
pub mod attach;
pub mod attachment;
pub mod drain;
pub mod error;
pub mod inspect;
pub mod installed;
pub mod instance;
pub mod loader;
pub mod nudger;
pub mod probe;
pub mod record;
pub mod recovery;
pub mod sweep;

pub use error::{Error, Result};
