//! What tproxy is asked to do, as values: the port set, the resolved
//! options of one target, and the `--config` file. Touches nothing.
pub mod error;
pub mod file;
pub mod options;
pub mod ports;

pub use error::Error;
