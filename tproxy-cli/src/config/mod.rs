//! What tproxy is asked to do, as values: one [`Target`] (from flags, a
//! `--config` file, an agent target file or the agent API), the options it
//! resolves into, the port set, and the errors of all that. Touches
//! nothing; the lowest layer.
pub mod error;
pub mod file;
pub mod keys;
pub mod options;
pub mod ports;
pub mod target;

pub use error::{Error, Result, Via};
pub use options::{Options, Steer};
pub use ports::PortSet;
pub use target::{Role, Target};
