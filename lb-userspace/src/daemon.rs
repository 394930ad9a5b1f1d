//! The daemon's state: the loaded data path, the balancer that owns its configuration maps,
//! and the configuration they reflect. The run loop, the REST API and the metrics collector
//! share one [`Daemon`] behind a mutex (held only for synchronous work, never across an
//! `.await`).

use std::{
    collections::HashMap,
    path::PathBuf,
    sync::{Arc, Mutex},
};

use anyhow::Context as _;
use lb_common::conntrack::Timeouts;
use tracing::{info, warn};

use crate::{
    Balancer, Config, Datapath,
    balancer::ApplySummary,
    config::ServiceConfig,
    datapath::{AttachedMode, LoadOptions},
    nexthop::KernelResolver,
    sysctl,
};

/// A daemon shared between the run loop and the API.
pub type SharedDaemon = Arc<Mutex<Daemon>>;

/// Why a configuration change was not made; the running state is unchanged.
#[derive(Debug, thiserror::Error)]
pub enum ChangeError {
    #[error("invalid configuration:\n  {}", .0.join("\n  "))]
    Invalid(Vec<String>),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Conflict(String),
    #[error("applying the configuration failed: {0}")]
    Apply(String),
    #[error("writing the configuration back failed: {0}")]
    Persist(String),
}

/// Everything the daemon runs.
#[derive(Debug)]
pub struct Daemon {
    pub datapath: Datapath,
    pub balancer: Balancer,
    resolver: KernelResolver,
    /// The configuration the data path currently reflects.
    pub config: Config,
    /// The file it came from; API changes are written back to it.
    pub config_path: Option<PathBuf>,
    pub hz: u64,
    pub timeouts: Timeouts,
    /// Interfaces and the mode their program runs in.
    pub attached: Vec<(String, AttachedMode)>,
    /// Live flows per backend id, from the last connection-table sweep.
    pub live_by_backend: HashMap<u32, u64>,
    /// Live connection-table entries at the last sweep.
    pub conntrack_live: u64,
}

impl Daemon {
    /// Loads the data path (adopting pinned state), installs `config` and attaches.
    pub fn start(config: Config, config_path: Option<PathBuf>) -> anyhow::Result<Self> {
        let load = LoadOptions {
            conntrack_entries: config.conntrack.max_entries,
            timeouts: config.conntrack.timeouts(),
            hash_seed: config.daemon.hash_seed,
            pin_dir: (!config.daemon.pin_dir.is_empty())
                .then(|| config.daemon.pin_dir.clone().into()),
        };
        let mut datapath =
            Datapath::load_with(&load).context("failed to load the XDP data path")?;
        let hz = datapath.ticks_per_second()?;
        reserve_nat_ports(&config);
        let mut resolver = KernelResolver;
        let mut balancer = Balancer::new(hz);
        if datapath.adopted() {
            balancer.adopt(datapath.maps()).context("failed to read the pinned maps")?;
        }
        balancer
            .apply(&config, datapath.maps_mut(), &mut resolver)
            .context("failed to install the services")?;
        let mut attached = Vec::new();
        for interface in &config.interfaces {
            let name = interface.name.get_ref();
            let mode = datapath
                .attach(name, interface.xdp_mode)
                .with_context(|| format!("failed to attach to {name}"))?;
            info!(interface = %name, mode = mode.name(), "XDP program attached");
            attached.push((name.clone(), mode));
        }
        let timeouts = Timeouts::from_secs(&config.conntrack.timeouts(), hz);
        Ok(Self {
            datapath,
            balancer,
            resolver,
            config,
            config_path,
            hz,
            timeouts,
            attached,
            live_by_backend: HashMap::new(),
            conntrack_live: 0,
        })
    }

    /// Re-resolves next hops; returns how many backends have none yet.
    pub fn refresh_next_hops(&mut self) -> usize {
        match self.balancer.refresh_next_hops(self.datapath.maps_mut(), &mut self.resolver) {
            Ok(unresolved) => unresolved,
            Err(error) => {
                warn!(%error, "next-hop refresh failed");
                0
            }
        }
    }

    /// Removes expired connections (pairs together) and releases retired backends.
    pub fn sweep(&mut self) {
        let now = match self.datapath.now_ticks() {
            Ok(now) => now,
            Err(error) => {
                warn!(%error, "cannot read the data path's clock");
                return;
            }
        };
        let swept = {
            let balancer = &self.balancer;
            self.datapath
                .maps_mut()
                .conntrack
                .sweep(&self.timeouts, now, |id| balancer.backend_entry(id))
        };
        match swept {
            Ok(result) => {
                if result.removed > 0 {
                    info!(removed = result.removed, live = result.live, "connection table swept");
                }
                if let Err(error) =
                    self.balancer.release_retired(self.datapath.maps_mut(), &result.live_by_backend)
                {
                    warn!(%error, "releasing retired backends failed");
                }
                self.conntrack_live = result.live;
                self.live_by_backend = result.live_by_backend;
            }
            Err(error) => warn!(%error, "connection table sweep failed"),
        }
    }

    /// Makes `new` the running configuration: validated first (a rejected configuration
    /// changes nothing), then applied. Interfaces and the connection table's size are fixed
    /// for the life of the process.
    pub fn apply(&mut self, new: Config) -> Result<ApplySummary, ChangeError> {
        new.validate().map_err(ChangeError::Invalid)?;
        let interfaces = |c: &Config| {
            c.interfaces.iter().map(|i| (i.name.get_ref().clone(), i.xdp_mode)).collect::<Vec<_>>()
        };
        if interfaces(&new) != interfaces(&self.config) {
            return Err(ChangeError::Invalid(vec![
                "interfaces cannot change while lbd runs; restart it".to_owned(),
            ]));
        }
        if new.conntrack.max_entries != self.config.conntrack.max_entries {
            return Err(ChangeError::Invalid(vec![
                "conntrack.max_entries cannot change while lbd runs; restart it".to_owned(),
            ]));
        }
        reserve_nat_ports(&new);
        let summary = self
            .balancer
            .apply(&new, self.datapath.maps_mut(), &mut self.resolver)
            .map_err(|e| ChangeError::Apply(e.to_string()))?;
        self.timeouts = Timeouts::from_secs(&new.conntrack.timeouts(), self.hz);
        self.config = new;
        Ok(summary)
    }

    /// Re-reads the configuration file and applies it.
    pub fn reload(&mut self) -> Result<ApplySummary, ChangeError> {
        let path = self
            .config_path
            .clone()
            .ok_or_else(|| ChangeError::NotFound("lbd runs without a configuration file".into()))?;
        let new = Config::load(&path).map_err(|e| ChangeError::Invalid(vec![e.to_string()]))?;
        self.apply(new)
    }

    /// Applies `new` and writes it back to the configuration file, so the change survives a
    /// restart. If writing fails, the running state goes back to what it was.
    pub fn change(&mut self, new: Config) -> Result<ApplySummary, ChangeError> {
        let old = self.config.clone();
        let summary = self.apply(new)?;
        if let Err(error) = self.persist() {
            warn!(%error, "rolling back: the change could not be saved");
            let _ = self.apply(old);
            return Err(error);
        }
        Ok(summary)
    }

    fn persist(&self) -> Result<(), ChangeError> {
        let Some(path) = &self.config_path else { return Ok(()) };
        let text = self.config.to_toml().map_err(|e| ChangeError::Persist(e.to_string()))?;
        let backup = path.with_extension("toml.orig");
        if !backup.exists() {
            std::fs::copy(path, &backup)
                .map_err(|e| ChangeError::Persist(format!("{}: {e}", backup.display())))?;
        }
        let tmp = path.with_extension("toml.tmp");
        let header = "# Written by lbd after a change through its API; the original is kept as *.toml.orig.\n";
        std::fs::write(&tmp, format!("{header}{text}"))
            .map_err(|e| ChangeError::Persist(format!("{}: {e}", tmp.display())))?;
        std::fs::rename(&tmp, path)
            .map_err(|e| ChangeError::Persist(format!("{}: {e}", path.display())))?;
        Ok(())
    }
}

fn reserve_nat_ports(config: &Config) {
    for range in
        config.services.iter().filter(|s| s.nat_source.is_some()).map(ServiceConfig::nat_port_range)
    {
        if let Err(error) = sysctl::reserve_local_ports(range) {
            warn!(%error, "could not reserve the NAT ports from the kernel's ephemeral range");
        }
    }
}
