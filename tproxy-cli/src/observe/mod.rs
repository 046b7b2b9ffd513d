//! Observation from outside the data path: `tproxy stats`, `flows`, `status`,
//! `check`, the Prometheus endpoint, and the agent seen from another
//! process.
pub mod agent_view;
pub mod check;
pub mod error;
pub mod flows;
pub mod metrics;
pub mod stats;
pub mod status;

pub use error::{Error, Result};
