//! One target's lifecycle: the loaded object (`loader`), one owner per
//! attachment (`attach`), a target attached to it (`attachment`), a single
//! run's instance (`instance`), the runtime records (`record`,
//! `agent_state`), removing what a dead one left (`recovery`), sweeping a
//! removed target out of the shared maps (`sweep`), the nudger, and
//! reading the maps (`inspect`).
pub mod agent_state;
pub mod attach;
pub mod attachment;
pub mod drain;
pub mod inspect;
pub mod instance;
pub mod loader;
pub mod nudger;
pub mod probe;
pub mod record;
pub mod recovery;
pub mod sweep;
