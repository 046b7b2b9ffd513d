//! One target's lifecycle: probe its namespace (`probe`), load the object
//! (`loader`) and attach it (`attachment`, one owner per attachment in
//! `attach`), serve (a single run's `instance`, the nudger, reading the
//! maps in `inspect`), drain (`drain`), detach (the owners' drops, then
//! `sweep` of the shared maps). One record of what a target installed
//! (`installed`), in the single run's runtime record (`record`) and the
//! agent's state (`agent_state`), and one way to remove it after its owner
//! died (`installed`, used by `recovery`).
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
