//! The load balancer's control plane: loads and attaches the XDP data path, owns every map
//! write, and reports what the data path does.
//!
//! `lbd` (in `bin/`) is a thin shell around [`run`]; tests call the same entry points.

pub mod api;
pub mod autoscale;
pub mod balancer;
pub mod config;
pub mod daemon;
pub mod datapath;
pub mod firewall;
pub mod health;
pub mod lifecycle;
pub mod maps;
pub mod nexthop;
pub mod passthrough;
pub mod pins;
pub mod process;
pub mod rng;
pub mod synflood;
pub mod sysctl;

use std::{
    sync::{Arc, Mutex},
    time::Duration,
};

use anyhow::Context as _;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

pub use balancer::Balancer;
pub use config::Config;
pub use datapath::Datapath;

use crate::daemon::{ConfigFile, Daemon, SharedDaemon, lock};

/// Options of a daemon run that are not part of the configuration file.
#[derive(Clone, Debug, Default)]
pub struct RunOptions {
    /// Remove programs from the interfaces on exit (the lab uses this).
    pub detach_on_exit: bool,
    /// The configuration file (re-read on SIGHUP) and the text `config` was parsed from.
    pub config_file: Option<ConfigFile>,
    /// Pin directory instead of the configuration's (`lbd --pin-dir`).
    pub pin_dir: Option<String>,
}

/// How often next hops are re-resolved (route and neighbour changes show up within this).
const NEXT_HOP_INTERVAL: Duration = Duration::from_secs(2);
/// How often the connection table is swept of expired flows.
const SWEEP_INTERVAL: Duration = Duration::from_secs(5);
/// Health-check results taken in at once (see `Daemon::record_health`).
const MAX_REPORT_BATCH: usize = 4096;
/// How often slow-start weights, drain deadlines and autoscaling policies are evaluated.
const LIFECYCLE_INTERVAL: Duration = Duration::from_secs(1);

/// Runs the daemon until `shutdown` is cancelled: loads the data path (adopting pinned state),
/// installs the services, attaches, serves the API, and keeps next hops and the connection
/// table fresh.
pub async fn run(
    config: Config,
    options: RunOptions,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    raise_fd_limit();
    // Before anything is attached: a SIGHUP (a reload) arriving while lbd starts is taken
    // once it runs, not the signal's default action, which ends the process.
    let mut hangups = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
        .context("failed to listen for SIGHUP")?;
    let api_config = config.api.clone();
    let token = api_config
        .token_file
        .as_deref()
        .map(|p| api::read_token(std::path::Path::new(p)))
        .transpose()?;
    // Read before anything is loaded: an unusable certificate stops lbd at once.
    let tls = match (&api_config.tls_cert_file, &api_config.tls_key_file) {
        (Some(cert), Some(key)) => {
            Some(api::tls::server_config(std::path::Path::new(cert), std::path::Path::new(key))?)
        }
        _ => None,
    };
    let interval = config.daemon.stats_log_interval_secs;
    let listener =
        if api_config.listen.is_empty() {
            None
        } else {
            Some(tokio::net::TcpListener::bind(&api_config.listen).await.with_context(|| {
                format!("failed to listen on {} for the API", api_config.listen)
            })?)
        };
    let daemon = Daemon::start(config, options.config_file, options.pin_dir.clone())?;
    let daemon: SharedDaemon = Arc::new(Mutex::new(daemon));
    // Neighbours probed during the first resolution answer within milliseconds: resolve
    // again until every backend has a next hop (or a few seconds pass), so the first
    // packets of the first flows are not dropped for want of a MAC address.
    for _ in 0..30 {
        if lock(&daemon).refresh_next_hops() == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    if let Some(listener) = listener {
        let state = api::AppState { daemon: daemon.clone(), token: token.map(Into::into) };
        let app = api::router(state);
        info!(address = %listener.local_addr()?, https = tls.is_some(), "API listening");
        match tls {
            Some(config) => {
                spawn_api(api::tls::TlsListener::new(listener, config)?, app, shutdown.clone());
            }
            None => spawn_api(listener, app, shutdown.clone()),
        }
    }

    if let Some(events) = lock(&daemon).datapath.maps_mut().firewall_events.take() {
        tokio::spawn(firewall::log::run(events.0, daemon.clone(), shutdown.clone()));
    }
    let (report_tx, mut reports) = tokio::sync::mpsc::unbounded_channel();
    lock(&daemon).start_health_checks(report_tx);
    let mut lifecycle_tick = tokio::time::interval(LIFECYCLE_INTERVAL);
    let mut stats_tick = tokio::time::interval(Duration::from_secs(interval.max(1)));
    let mut hop_tick = tokio::time::interval(NEXT_HOP_INTERVAL);
    let mut sweep_tick = tokio::time::interval(SWEEP_INTERVAL);
    // Ticks missed while the daemon was busy (a long sweep, a reload) are not fired back to
    // back: each tick's work reads rates and deadlines over the time since the last.
    for tick in [&mut lifecycle_tick, &mut stats_tick, &mut hop_tick, &mut sweep_tick] {
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    }
    loop {
        tokio::select! {
            () = shutdown.cancelled() => break,
            _ = hangups.recv() => match lock(&daemon).reload() {
                Ok(summary) => info!(?summary, "configuration reloaded"),
                Err(error) => warn!("reload rejected, running configuration unchanged: {error}"),
            },
            _ = stats_tick.tick(), if interval > 0 => {
                let stats = lock(&daemon).datapath.stats().read().context("failed to read STATS")?;
                info!(summary = %stats.summary(), "data path counters");
            }
            _ = hop_tick.tick() => {
                lock(&daemon).refresh_next_hops();
            }
            _ = sweep_tick.tick() => lock(&daemon).sweep(),
            Some(report) = reports.recv() => {
                // With every other result already waiting (bounded): one install for all.
                let mut batch = vec![report];
                while batch.len() < MAX_REPORT_BATCH
                    && let Ok(report) = reports.try_recv()
                {
                    batch.push(report);
                }
                lock(&daemon).record_health(&batch);
            }
            _ = lifecycle_tick.tick() => {
                let (events, counters) = {
                    let mut d = lock(&daemon);
                    (d.tick(), d.autoscale.counters.clone())
                };
                for (event, policy) in events {
                    tokio::spawn(autoscale::deliver(event, policy, counters.clone()));
                }
            }
        }
    }
    lock(&daemon).stop_health_checks();
    lock(&daemon).passthrough.stop();

    if options.detach_on_exit {
        // The programs first: until they are gone they may still hand out NAT ports, which
        // must stay reserved from the kernel's ephemeral range meanwhile.
        lock(&daemon).datapath.detach_all();
        lock(&daemon).give_back_nat_ports();
        info!("XDP programs detached, pins removed and NAT ports given back");
    } else {
        // By design (a restart must not drop traffic), but an operator who meant to stop
        // the load balancer must hear it, and how to take it down.
        // (Without a pin directory the links die with lbd's descriptors.)
        let d = lock(&daemon);
        let interfaces: Vec<&str> = d.attached.iter().map(|(i, _)| i.as_str()).collect();
        let pin_dir = &d.config.daemon.pin_dir;
        if !interfaces.is_empty() && !pin_dir.is_empty() {
            warn!(
                interfaces = %interfaces.join(", "),
                pin_dir = %pin_dir,
                "lbd stopped; the data path stays attached and keeps forwarding (without health checks) until lbd starts again. To take it down: start lbd with --detach-on-exit and stop it, or remove the pin directory"
            );
        }
    }
    Ok(())
}

/// Raises the soft limit on open files to the hard one: TLS passthrough holds two sockets
/// per relayed connection, and the usual soft limit (1024) would run out long before the
/// services' own caps.
fn raise_fd_limit() {
    let mut limit = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit and setrlimit read and write the struct we pass.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &raw mut limit) == 0
            && limit.rlim_cur < limit.rlim_max
        {
            limit.rlim_cur = limit.rlim_max;
            if libc::setrlimit(libc::RLIMIT_NOFILE, &raw const limit) != 0 {
                warn!("could not raise the open-file limit");
            }
        }
    }
}

/// Serves the API on `listener` until `shutdown`.
fn spawn_api<L>(listener: L, app: axum::Router, shutdown: CancellationToken)
where
    L: axum::serve::Listener,
    L::Addr: std::fmt::Debug,
{
    tokio::spawn(async move {
        let serve = axum::serve(listener, app)
            .with_graceful_shutdown(async move { shutdown.cancelled().await });
        if let Err(error) = serve.await {
            warn!(%error, "API server stopped");
        }
    });
}
