//! The config layer's errors: settings refused before anything is tried.
//! Each message is one line that names the problem and the fix.

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(
        "the proxy mark and the steer mark are both {0:#x}; they must differ (--proxy-mark / --steer-mark)"
    )]
    MarksCollide(u32),

    #[error(
        "--route-table {0} is a reserved routing table (0 unspec, 253 default, 254 main, 255 local): tproxy's table holds its own route and nothing else; choose an unused table (e.g. 100) or leave --route-table out to have one picked"
    )]
    ReservedTable(u32),
}
