//! What tproxy is asked to do, as values: one [`Target`] (from flags, a
//! `--config` file, an agent target file or the agent API), the options it
//! resolves into, and the port set. Touches nothing.
pub mod file;
pub mod keys;
pub mod options;
pub mod ports;
pub mod target;

pub use options::{Options, Steer};
pub use ports::PortSet;
pub use target::{Role, Target};
