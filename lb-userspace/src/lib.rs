//! The load balancer's control plane: loads and attaches the XDP data path, owns every map
//! write, and reports what the data path does.
//!
//! `lbd` (in `bin/`) is a thin shell around [`run`]; tests call the same entry points.

pub mod config;
pub mod datapath;
pub mod maps;

use std::time::Duration;

use anyhow::Context as _;
use tokio_util::sync::CancellationToken;
use tracing::info;

pub use config::Config;
pub use datapath::Datapath;

/// Options of a daemon run that are not part of the configuration file.
#[derive(Clone, Debug, Default)]
pub struct RunOptions {
    /// Remove programs from the interfaces on exit (the lab uses this).
    pub detach_on_exit: bool,
}

/// Runs the daemon until `shutdown` is cancelled: loads the data path, attaches it to every
/// configured interface and logs its counters.
pub async fn run(
    config: Config,
    options: RunOptions,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let mut datapath = Datapath::load().context("failed to load the XDP data path")?;
    for interface in &config.interfaces {
        let mode = datapath
            .attach(&interface.name, interface.xdp_mode)
            .with_context(|| format!("failed to attach to {}", interface.name))?;
        info!(interface = %interface.name, mode = mode.name(), "XDP program attached");
    }

    let interval = config.daemon.stats_log_interval_secs;
    let mut ticker = tokio::time::interval(Duration::from_secs(interval.max(1)));
    ticker.tick().await;
    loop {
        tokio::select! {
            () = shutdown.cancelled() => break,
            _ = ticker.tick(), if interval > 0 => {
                let stats = datapath.stats()?.read().context("failed to read STATS")?;
                info!(summary = %stats.summary(), "data path counters");
            }
        }
    }

    if options.detach_on_exit {
        datapath.detach_all();
        info!("XDP programs detached");
    }
    Ok(())
}
