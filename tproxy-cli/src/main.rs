use std::process::ExitCode;

use tokio::signal::unix::{SignalKind, signal};
use tproxy::{
    Instance,
    cli::{Command, LogFormat},
    config::{self, RunSettings},
    error::Chain,
    metrics,
};
use tracing::info;

/// The log filter: RUST_LOG when set, else TPROXY_LOG (the older name),
/// else info, debug (-v) or trace (-vv).
fn log_filter(verbose: u8) -> tproxy::Result<tracing_subscriber::EnvFilter> {
    for var in ["RUST_LOG", "TPROXY_LOG"] {
        if let Some(value) = std::env::var(var).ok().filter(|v| !v.trim().is_empty()) {
            return tracing_subscriber::EnvFilter::builder()
                .parse(&value)
                .map_err(|source| tproxy::Error::LogFilter { var, value, source });
        }
    }
    let default = match verbose {
        0 => "info",
        1 => "debug",
        _ => "trace",
    };
    Ok(tracing_subscriber::EnvFilter::new(default))
}

fn init_logging(filter: tracing_subscriber::EnvFilter, format: LogFormat) {
    let fmt = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_target(false)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => fmt
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .init(),
        LogFormat::Json => fmt.json().init(),
    }
}

/// Usage errors in one line, like every other error.
fn usage_error(e: &clap::Error) -> String {
    let rendered = e.render().to_string();
    let parts: Vec<&str> = rendered
        .lines()
        .map(str::trim)
        .filter(|l| {
            !l.is_empty() && !l.starts_with("Usage:") && !l.starts_with("For more information")
        })
        .collect();
    let msg = parts.join(" ");
    format!(
        "{} (see `tproxy --help`)",
        msg.trim_start_matches("error: ")
    )
}

fn main() -> ExitCode {
    let (cli, matches) = match tproxy::cli::parse_from(std::env::args_os()) {
        Ok(parsed) => parsed,
        Err(e) if !e.use_stderr() => e.exit(), // --help, --version
        Err(e) => {
            eprintln!("tproxy: {}", usage_error(&e));
            return ExitCode::from(2);
        }
    };
    // The run's settings come before logging: the file may set its format.
    let settings = match cli.command {
        None => Some(config::resolve(&cli, &matches)),
        Some(_) => None,
    };
    let format = match &settings {
        Some(Ok(s)) => s.log_format,
        _ => cli.log_format.unwrap_or_default(),
    };
    if let Err(e) = log_filter(cli.verbose).map(|filter| init_logging(filter, format)) {
        eprintln!("tproxy: {}", Chain(&e));
        return ExitCode::from(2);
    }
    let result = match &cli.command {
        Some(Command::Agent(args)) => tproxy::agent::run(args).map_err(Into::into),
        Some(Command::Stats(args)) => tproxy::stats::run(args).map_err(Into::into),
        Some(Command::Check(args)) => tproxy::check::run(args).map_err(Into::into),
        Some(Command::Status {
            json,
            agent,
            agent_state_dir,
        }) => match (agent, agent_state_dir) {
            (false, None) => tproxy::status::run(*json),
            (_, dir) => tproxy::agent::view::run_status(dir.as_deref(), *json),
        }
        .map_err(Into::into),
        Some(Command::Cleanup { all, iface }) => {
            tproxy::recovery::run_cleanup(&tproxy::recovery::Scope::new(*all, iface.as_deref()))
                .map_err(Into::into)
        }
        None => settings
            .expect("resolved for a run")
            .map_err(Into::into)
            .and_then(|s| serve(&s)),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // One line: the error and its causes, down to the errno.
            let line = Chain(e.as_ref()).to_string();
            let usage = e
                .downcast_ref::<tproxy::Error>()
                .is_some_and(tproxy::Error::is_usage);
            if format == LogFormat::Json {
                tracing::error!("{line}");
            } else {
                eprintln!("tproxy: {line}");
            }
            ExitCode::from(if usage { 2 } else { 1 })
        }
    }
}

fn serve(settings: &RunSettings) -> anyhow::Result<()> {
    let opts = &settings.options;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        // Signal handlers first: a signal during attach must still tear down.
        let mut term = signal(SignalKind::terminate())?;
        let mut int = signal(SignalKind::interrupt())?;
        // Bound before anything is installed: a taken address is an error
        // with nothing to undo, and scrapes work once "serving" is logged.
        let endpoint = match settings.metrics_addr {
            Some(addr) => Some(metrics::Endpoint::bind(addr).await?),
            None => None,
        };
        // One line for the whole start (Instance::start's "attached"); each
        // attachment has its own line at debug.
        let mut instance = Instance::start(opts)?;
        if let Some(endpoint) = endpoint {
            endpoint.start(&instance, opts)?;
        }
        info!("serving; SIGINT or SIGTERM to stop");
        // Closed flows linger for retransmissions, then go.
        let mut reap = tokio::time::interval(std::time::Duration::from_secs(1));
        let sig = loop {
            tokio::select! {
                _ = term.recv() => break "SIGTERM",
                _ = int.recv() => break "SIGINT",
                _ = reap.tick() => reap_flows(&mut instance),
            }
        };
        drain(
            &mut instance,
            sig,
            settings.drain_timeout,
            &mut term,
            &mut int,
        )
        .await?;
        let counters = instance.counters()?;
        instance.shutdown();
        let summary: Vec<String> = counters
            .iter()
            .filter(|(_, v)| *v > 0)
            .map(|(c, v)| format!("{}={v}", c.name()))
            .collect();
        if summary.is_empty() {
            info!("counters: all zero");
        } else {
            info!("counters: {}", summary.join(" "));
        }
        Ok(())
    })
}

/// Graceful stop: new connections to intercepted ports are refused from now
/// on (their SYNs dropped: none reaches the app around the proxy), flows
/// already steered keep their path until they end or the timeout runs out.
async fn drain(
    instance: &mut Instance,
    sig: &str,
    timeout_s: u64,
    term: &mut tokio::signal::unix::Signal,
    int: &mut tokio::signal::unix::Signal,
) -> anyhow::Result<()> {
    instance.stop_steering_new()?;
    // Only flows seen lately: a client that went silent would hold the
    // drain for its whole timeout and gain nothing.
    let flows = instance.flows()?;
    let start = flows.active;
    if start == 0 || timeout_s == 0 {
        info!(
            "{sig}: detaching ({start} active steered flow(s) cut; {} idle)",
            flows.open - flows.active
        );
        return Ok(());
    }
    info!(
        "{sig}: new connections to intercepted ports are now refused; draining {start} active steered flow(s) for up to {timeout_s} s ({} idle ones are not waited for; signal again to stop now)",
        flows.open - flows.active
    );
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(timeout_s);
    let mut tick = tokio::time::interval(std::time::Duration::from_millis(100));
    let mut left = start;
    loop {
        tokio::select! {
            _ = tick.tick() => {
                reap_flows(instance);
                left = instance.flows()?.active;
                if left == 0 || tokio::time::Instant::now() >= deadline {
                    break;
                }
            }
            _ = term.recv() => { info!("second signal: stopping now"); break; }
            _ = int.recv() => { info!("second signal: stopping now"); break; }
        }
    }
    let left = instance.flows().map(|f| f.active).unwrap_or(left);
    info!(
        "drained {} flow(s), cut {left}; detaching",
        start.saturating_sub(left)
    );
    Ok(())
}

fn reap_flows(instance: &mut Instance) {
    match instance.reap_flows() {
        Ok(0) => {}
        Ok(n) => tracing::debug!("removed {n} closed flow(s) after their linger"),
        Err(e) => tracing::warn!("reaping closed flows: {}", Chain(&e)),
    }
}
