//! `tproxy check`: its flags, and the options of the run they describe.
use crate::config::{Role, Target};

/// `tproxy check` takes the target flags of the run it checks for (the
/// run's, with what they mean to a check).
#[derive(Debug, Clone, clap::Args)]
#[command(
    mut_arg("iface", |a| a.help("Interface the run would steer on (left out: not checked)")),
    mut_arg("ports", |a| a.help(
        "Ports the run would intercept: 8000 | 8000,8080 | 9000-9010 [default: any but the proxy port]"
    )),
    mut_arg("proxy_port", |a| a.help(
        "Port of the proxy's inbound listener: something must listen there [default: 15006]"
    )),
    mut_arg("no_accel", |a| a.help("Check for a run without socket acceleration")),
    mut_arg("accel", |a| a.help("Check for a run with socket acceleration (the default)")),
)]
pub struct CheckArgs {
    #[command(flatten)]
    pub target: Target,

    /// Address the run would serve Prometheus metrics on: it must be free.
    #[arg(long, value_name = "ADDR")]
    pub metrics_addr: Option<std::net::SocketAddr>,

    /// One JSON array of {name, ok, detail, fix} instead of lines.
    #[arg(long)]
    pub json: bool,
}

impl CheckArgs {
    /// Prints every requirement; an error if one fails.
    pub fn run(&self) -> crate::observe::Result<()> {
        crate::observe::check::run(
            &self.target.resolve(Role::Check)?,
            self.target.iface.is_some(),
            self.metrics_addr,
            self.json,
        )
    }
}
