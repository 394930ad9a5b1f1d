//! The load balancer's control plane: loads and attaches the XDP data path, owns every map
//! write, and reports what the data path does.
//!
//! `lbd` (in `bin/`) is a thin shell around [`run`]; tests call the same entry points.

pub mod balancer;
pub mod config;
pub mod datapath;
pub mod maps;
pub mod nexthop;
pub mod pins;
pub mod sysctl;

use std::time::Duration;

use anyhow::Context as _;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

pub use balancer::Balancer;
pub use config::Config;
pub use datapath::Datapath;

use crate::{datapath::LoadOptions, nexthop::KernelResolver};

/// Options of a daemon run that are not part of the configuration file.
#[derive(Clone, Debug, Default)]
pub struct RunOptions {
    /// Remove programs from the interfaces on exit (the lab uses this).
    pub detach_on_exit: bool,
    /// The configuration file, re-read on SIGHUP.
    pub config_path: Option<std::path::PathBuf>,
}

/// How often next hops are re-resolved (route and neighbour changes show up within this).
const NEXT_HOP_INTERVAL: Duration = Duration::from_secs(2);
/// How often the connection table is swept of expired flows.
const SWEEP_INTERVAL: Duration = Duration::from_secs(5);

/// Runs the daemon until `shutdown` is cancelled: loads the data path, attaches it to every
/// configured interface, installs the services, and keeps next hops and the connection table
/// fresh.
pub async fn run(
    config: Config,
    options: RunOptions,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let load = LoadOptions {
        conntrack_entries: config.conntrack.max_entries,
        timeouts: config.conntrack.timeouts(),
        hash_seed: config.daemon.hash_seed,
        pin_dir: (!config.daemon.pin_dir.is_empty()).then(|| config.daemon.pin_dir.clone().into()),
    };
    let mut datapath = Datapath::load_with(&load).context("failed to load the XDP data path")?;
    let hz = datapath.ticks_per_second()?;
    for range in config
        .services
        .iter()
        .filter(|s| s.nat_source.is_some())
        .map(config::ServiceConfig::nat_port_range)
    {
        if let Err(error) = sysctl::reserve_local_ports(range) {
            warn!(%error, "could not reserve the NAT ports from the kernel's ephemeral range");
        }
    }
    let mut resolver = KernelResolver;
    let mut balancer = Balancer::new(hz);
    if datapath.adopted() {
        balancer.adopt(datapath.maps()).context("failed to read the pinned maps")?;
    }
    balancer
        .apply(&config, datapath.maps_mut(), &mut resolver)
        .context("failed to install the services")?;
    for interface in &config.interfaces {
        let mode = datapath
            .attach(interface.name.get_ref(), interface.xdp_mode)
            .with_context(|| format!("failed to attach to {}", interface.name.get_ref()))?;
        info!(interface = %interface.name.get_ref(), mode = mode.name(), "XDP program attached");
    }
    // Neighbours probed during the first resolution answer within milliseconds: resolve
    // again until every backend has a next hop (or a few seconds pass), so the first
    // packets of the first flows are not dropped for want of a MAC address.
    for _ in 0..30 {
        let unresolved = balancer.refresh_next_hops(datapath.maps_mut(), &mut resolver)?;
        if unresolved == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    let interval = config.daemon.stats_log_interval_secs;
    let mut stats_tick = tokio::time::interval(Duration::from_secs(interval.max(1)));
    let mut hop_tick = tokio::time::interval(NEXT_HOP_INTERVAL);
    let mut sweep_tick = tokio::time::interval(SWEEP_INTERVAL);
    let mut timeouts = lb_common::conntrack::Timeouts::from_secs(&config.conntrack.timeouts(), hz);
    let mut hangups = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
        .context("failed to listen for SIGHUP")?;
    loop {
        tokio::select! {
            () = shutdown.cancelled() => break,
            _ = hangups.recv() => {
                let Some(path) = &options.config_path else { continue };
                match Config::load(path) {
                    Ok(new) => match balancer.apply(&new, datapath.maps_mut(), &mut resolver) {
                        Ok(summary) => {
                            info!(?summary, "configuration reloaded");
                            timeouts = lb_common::conntrack::Timeouts::from_secs(&new.conntrack.timeouts(), hz);
                        }
                        Err(error) => warn!(%error, "reload failed part-way; fix the cause and send SIGHUP again"),
                    },
                    Err(error) => warn!("reload rejected, running configuration unchanged: {error}"),
                }
            }
            _ = stats_tick.tick(), if interval > 0 => {
                let stats = datapath.stats().read().context("failed to read STATS")?;
                info!(summary = %stats.summary(), "data path counters");
            }
            _ = hop_tick.tick() => {
                if let Err(error) = balancer.refresh_next_hops(datapath.maps_mut(), &mut resolver) {
                    warn!(%error, "next-hop refresh failed");
                }
            }
            _ = sweep_tick.tick() => {
                let now = match datapath.now_ticks() {
                    Ok(now) => now,
                    Err(error) => {
                        warn!(%error, "cannot read the data path's clock");
                        continue;
                    }
                };
                let swept = {
                    let maps = datapath.maps_mut();
                    let backend = |id| balancer.backend_entry(id);
                    maps.conntrack.sweep(&timeouts, now, backend)
                };
                match swept {
                    Ok(result) => {
                        if result.removed > 0 {
                            info!(removed = result.removed, live = result.live, "connection table swept");
                        }
                        if let Err(error) = balancer.release_retired(datapath.maps_mut(), &result.live_by_backend) {
                            warn!(%error, "releasing retired backends failed");
                        }
                    }
                    Err(error) => warn!(%error, "connection table sweep failed"),
                }
            }
        }
    }

    if options.detach_on_exit {
        datapath.detach_all();
        info!("XDP programs detached");
    }
    Ok(())
}
