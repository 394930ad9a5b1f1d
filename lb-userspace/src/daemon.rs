//! The daemon's state: the loaded data path, the balancer that owns its configuration maps,
//! and the configuration they reflect. The run loop, the REST API and the metrics collector
//! share one [`Daemon`] behind a mutex (held only for synchronous work, never across an
//! `.await`).

use std::{
    collections::{HashMap, HashSet},
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use anyhow::Context as _;
use tracing::{debug, info, warn};

use crate::{
    Balancer, Config, Datapath,
    autoscale::{self, Event},
    balancer::{ApplySummary, BackendIdentity},
    config::{AutoscaleConfig, ServiceConfig, SynCookies},
    datapath::{AttachedMode, LoadOptions},
    firewall::{self, Firewall, Installed},
    health::{self, Checker, Report},
    lifecycle::Lifecycle,
    nexthop::KernelResolver,
    passthrough::Passthrough,
    synflood::AutoCookies,
    sysctl,
};

/// A daemon shared between the run loop and the API.
pub type SharedDaemon = Arc<Mutex<Daemon>>;

/// Locks the daemon for the run loop, the API and the firewall log alike. A panic while it
/// was held (a bug) is logged once and the daemon goes on serving: the data path keeps
/// running on the maps as they are. A change cut short that way may leave the maps and the
/// daemon's configuration apart (until the next reload); the log says so.
pub fn lock(daemon: &SharedDaemon) -> std::sync::MutexGuard<'_, Daemon> {
    daemon.lock().unwrap_or_else(|poisoned| {
        tracing::error!(
            "a task panicked holding the daemon's state; going on with it (reload the configuration to make sure the data path runs it)"
        );
        daemon.clear_poison();
        poisoned.into_inner()
    })
}

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
    /// The file could not be read (not a fault of its contents).
    #[error("{0}")]
    Read(String),
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
    /// The settings read only at start as the file had them then, and as it has them now
    /// (what `persist` writes back; the running ones may differ, see [`StartSettings`]).
    file_at_start: StartSettings,
    /// Digest of the configuration file as lbd last read or wrote it: an API change refuses
    /// to write over edits made since (see [`Daemon::change`]).
    file_digest: Option<u64>,
    file_now: StartSettings,
    pub hz: u64,
    /// Interfaces and the mode their program runs in.
    pub attached: Vec<(String, AttachedMode)>,
    /// Live flows per backend id, from the last connection-table sweep.
    pub live_by_backend: HashMap<u32, u64>,
    /// Live connection-table entries at the last sweep.
    pub conntrack_live: u64,
    /// Backend lifecycle and health facts, which shape the weights installed.
    pub lifecycle: Lifecycle,
    /// The health-check tasks (none until [`Daemon::start_health_checks`]).
    checker: Option<Checker>,
    pub autoscale: autoscale::Engine,
    /// The firewall as installed.
    pub firewall: Firewall,
    /// `auto` SYN-cookie state per service.
    pub auto_cookies: AutoCookies,
    last_tick: Option<Instant>,
    started: Instant,
    /// TLS-passthrough services (started with the first one).
    pub passthrough: Passthrough,
    /// Cuts of removed services' flows (their ids) and of flows using addresses taken away
    /// that failed, tried again at each sweep (see [`Daemon::retry_service_cuts`]).
    pending_cuts: Option<(Vec<u32>, bool)>,
}

/// A configuration file and the text read from it, which the configuration was parsed from.
#[derive(Clone, Debug)]
pub struct ConfigFile {
    pub path: PathBuf,
    pub text: String,
}

impl Daemon {
    /// Loads the data path (adopting pinned state), installs `config` and attaches.
    /// `pin_dir` overrides the configuration's (`lbd --pin-dir`) without changing the file.
    pub fn start(
        mut config: Config,
        config_file: Option<ConfigFile>,
        pin_dir: Option<String>,
    ) -> anyhow::Result<Self> {
        let file_at_start = StartSettings::of(&config);
        if let Some(dir) = pin_dir {
            config.daemon.pin_dir = dir;
        }
        let secrets = check_secret_files(&config);
        anyhow::ensure!(secrets.is_empty(), "{}", secrets.join("\n"));
        // What can be checked before anything changes is: a pinned data path that forwards
        // while lbd is down keeps its services and firewall when this start is refused.
        for interface in &config.interfaces {
            let name = interface.name.get_ref();
            crate::datapath::if_index(name).with_context(|| format!("cannot attach to {name}"))?;
        }
        let load = LoadOptions {
            conntrack_entries: config.conntrack.max_entries,
            timeouts: config.conntrack.timeouts(),
            hash_seed: config.daemon.hash_seed,
            pin_dir: (!config.daemon.pin_dir.is_empty())
                .then(|| config.daemon.pin_dir.clone().into()),
            object: None,
        };
        let mut datapath =
            Datapath::load_with(&load).context("failed to load the XDP data path")?;
        let hz = datapath.ticks_per_second()?;
        let compiled = compile_firewall(&config, hz)
            .map_err(|e| anyhow::anyhow!("invalid firewall:\n  {}", e.join("\n  ")))?;
        let mut resolver = KernelResolver::default();
        let mut balancer = Balancer::new(hz);
        if datapath.adopted() {
            balancer.adopt(datapath.maps()).context("failed to read the pinned maps")?;
        }
        // Refused before the NAT ports or the firewall change: the pinned data path keeps
        // what it has.
        balancer.check_capacity(&config).context("the configuration does not fit")?;
        // Added before the services apply; what an earlier lbd reserved and this
        // configuration no longer holds is given back once they have (the pinned data path
        // may be handing those ports out until then).
        reserve_nat_ports(&config.daemon.pin_dir, &[&config], false);
        let mut firewall = if datapath.adopted() {
            Firewall::adopt(&mut datapath.maps_mut().firewall)
                .context("failed to read the pinned firewall maps")?
        } else {
            Firewall::fresh()
        };
        firewall
            .install(&mut datapath.maps_mut().firewall, compiled.as_ref())
            .context("failed to install the firewall")?;
        // Backends that were failing their checks when the previous lbd stopped (marked in
        // the adopted maps) stay out until their checks pass again: judged by the ids their
        // pools take back, so that a backend down in one pool (its checks there failed) is
        // not down in another (whose checks passed), before anything is installed.
        balancer.claim_adopted_ids(&config);
        let down_at_start: HashSet<BackendIdentity> = crate::lifecycle::backends(&config)
            .map(|(identity, _)| identity)
            .filter(|b| {
                balancer.id_was_down(b)
                    && config.pool(&b.pool).is_some_and(|p| p.health_check.is_some())
            })
            .collect();
        balancer.forget_start_claims();
        let mut lifecycle = Lifecycle::starting(&config, Instant::now(), &down_at_start);
        let (effective, panicking) = lifecycle.effective(&config, Instant::now());
        let summary = balancer
            .apply(&effective, datapath.maps_mut(), &mut resolver)
            .context("failed to install the services")?;
        if !down_at_start.is_empty() {
            info!(
                backends = down_at_start.len(),
                "backends failing their checks before the restart stay out until they pass"
            );
        }
        reserve_nat_ports(&config.daemon.pin_dir, &[&config], true);
        // Services removed or changed while lbd was down: their flows stop now, as on a
        // reload (a failure is tried again at each sweep: no reason to refuse to start).
        let pending_cuts = match cut_service_flows(&mut datapath, &balancer, &summary) {
            Ok(()) => None,
            Err(error) => {
                warn!(%error, "cutting the flows of services removed or changed while lbd was down failed; trying again at each sweep");
                Some((summary.removed_service_ids.clone(), summary.addresses_gone))
            }
        };
        lifecycle.installed(&effective, panicking);
        balancer
            .mark_down(&down_at_start, datapath.maps_mut())
            .context("failed to mark the backends that are down")?;
        let mut passthrough = Passthrough::default();
        if Passthrough::needed(&config) {
            start_passthrough(&mut datapath, &mut passthrough)?;
        }
        passthrough.sync(&effective, &balancer);
        let mut attached = Vec::new();
        for interface in &config.interfaces {
            let name = interface.name.get_ref();
            let mode = datapath
                .attach(name, interface.xdp_mode)
                .with_context(|| format!("failed to attach to {name}"))?;
            info!(interface = %name, mode = mode.name(), "XDP program attached");
            attached.push((name.clone(), mode));
        }
        // An interface taken out of the configuration is left, not served by a pin.
        let names: Vec<&str> = attached.iter().map(|(name, _)| name.as_str()).collect();
        for interface in datapath.detach_unconfigured(&names) {
            info!(%interface, "detached from an interface no longer configured");
        }
        // The digest of the text `config` came from, not of the file read again: an edit in
        // between would pass for what lbd runs, and an API change would write over it.
        let file_digest = config_file.as_ref().map(|f| digest(f.text.as_bytes()));
        let config_path = config_file.map(|f| f.path);
        Ok(Self {
            datapath,
            balancer,
            resolver,
            config,
            config_path,
            file_now: file_at_start.clone(),
            file_digest,
            file_at_start,
            hz,
            attached,
            live_by_backend: HashMap::new(),
            conntrack_live: 0,
            lifecycle,
            checker: None,
            autoscale: autoscale::Engine::default(),
            firewall,
            auto_cookies: AutoCookies::default(),
            last_tick: None,
            started: Instant::now(),
            passthrough,
            pending_cuts,
        })
    }

    /// Starts the health checks (on the current tokio runtime); results go to `reports`,
    /// which the caller feeds back through [`Daemon::record_health`].
    pub fn start_health_checks(&mut self, reports: tokio::sync::mpsc::UnboundedSender<Report>) {
        self.checker = Some(Checker::new(reports, tokio::runtime::Handle::current()));
        self.sync_health_checks();
    }

    /// Gives back every NAT port lbd reserved from the kernel's ephemeral range, once the
    /// data path is gone (no flow can hold them any more), and then its record of them and
    /// the pin directory, if they are empty. Without a pin directory lbd keeps no record,
    /// so nothing counts as its own and nothing is given back.
    pub fn give_back_nat_ports(&self) {
        let pin_dir = &self.config.daemon.pin_dir;
        reserve_nat_ports(pin_dir, &[], true);
        if !pin_dir.is_empty() {
            sysctl::remove_empty_record(Path::new(pin_dir));
        }
    }

    /// Stops the health checks and removes their routes.
    pub fn stop_health_checks(&mut self) {
        if let Some(mut checker) = self.checker.take() {
            checker.stop();
        }
    }

    fn sync_health_checks(&mut self) {
        let Some(checker) = &mut self.checker else { return };
        let plan = health::plan(&self.config, &self.balancer);
        let checked: HashSet<BackendIdentity> = plan.specs.keys().cloned().collect();
        // A backend known down (at a restart of lbd, or of its checks) starts its checks down.
        let down: HashSet<BackendIdentity> = self.lifecycle.unhealthy().cloned().collect();
        let started = checker.sync(plan, &down);
        let checked_pools: HashSet<&str> = self
            .config
            .pools
            .iter()
            .filter(|p| p.health_check.is_some())
            .map(|p| p.name.get_ref().as_str())
            .collect();
        self.lifecycle.reset_health(&started, &checked, &checked_pools);
        self.mark_down();
    }

    /// Keeps `BACKEND_DOWN` in `BACKENDS` in step with the backends' health, for the next
    /// lbd to read if this one stops.
    fn mark_down(&mut self) {
        let down: HashSet<BackendIdentity> = self.lifecycle.unhealthy().cloned().collect();
        if let Err(error) = self.balancer.mark_down(&down, self.datapath.maps_mut()) {
            warn!(%error, "marking the backends that are down in the maps failed");
        }
    }

    /// Takes in health-check results (those waiting, taken together); flips among them
    /// change the weights installed, once for all: a thousand backends failing together (a
    /// partition) rebuild their pools' tables once, not a thousand times under the lock the
    /// API and the ticks wait on.
    pub fn record_health(&mut self, reports: &[Report]) {
        let now = Instant::now();
        let mut flipped = false;
        for report in reports {
            // A result of a check that no longer runs (restarted or stopped since it was sent).
            if self.checker.as_ref().is_some_and(|c| !c.is_current(report)) {
                continue;
            }
            flipped |= self.lifecycle.record(report, now);
        }
        if flipped {
            self.refresh_weights();
            self.mark_down();
        }
    }

    /// Installs the effective weights if they changed (health, slow start, panic).
    pub fn refresh_weights(&mut self) {
        let (effective, panicking) = self.lifecycle.effective(&self.config, Instant::now());
        if !self.lifecycle.changed(&effective) && panicking == self.lifecycle.panicking {
            return;
        }
        match self.balancer.apply(&effective, self.datapath.maps_mut(), &mut self.resolver) {
            Ok(_) => {
                self.lifecycle.installed(&effective, panicking);
                self.passthrough.sync(&effective, &self.balancer);
            }
            Err(error) => warn!(%error, "installing new backend weights failed"),
        }
    }

    /// The once-a-second work: weights of backends in slow start, cuts of disabled and
    /// overdue draining backends, and autoscaling policies. Returns the events to deliver.
    pub fn tick(&mut self) -> Vec<(Event, AutoscaleConfig)> {
        let now = Instant::now();
        self.refresh_weights();
        self.cut_flows(now);
        self.govern_cookies(now);
        if let Some(checker) = &mut self.checker {
            checker.retry_routes(now);
        }
        self.passthrough.retry_listeners(now);
        let ids: HashMap<BackendIdentity, u32> =
            self.balancer.backends().map(|(k, id)| (k.clone(), id)).collect();
        let mut counters = autoscale::BackendCounters::new();
        for id in ids.values() {
            if let Ok(c) = self.datapath.maps().traffic.backend(*id) {
                counters.insert(*id, (c.new_flows, c.bytes));
            }
        }
        let inputs = autoscale::Inputs {
            config: &self.config,
            lifecycle: &self.lifecycle,
            ids: &ids,
            counters,
            live: &self.live_by_backend,
            relays: self.passthrough.stats.snapshot().routes,
        };
        let events = self.autoscale.sample(&inputs, now);
        for (event, _) in &events {
            warn!(pool = %event.pool, policy = %event.policy, signal = %event.signal, value = event.value, threshold = event.threshold, id = %event.id, "autoscaling policy fired");
            let mut c =
                self.autoscale.counters.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            *c.fired.entry((event.pool.clone(), event.policy.clone())).or_default() += 1;
        }
        events
    }

    /// Turns `auto` services' SYN cookies on and off by their SYN rate.
    fn govern_cookies(&mut self, now: Instant) {
        let elapsed = self.last_tick.map_or(Duration::ZERO, |t| now.saturating_duration_since(t));
        self.last_tick = Some(now);
        let since_start = now.saturating_duration_since(self.started);
        let auto: Vec<(String, u64)> = self
            .config
            .services
            .iter()
            .filter(|s| s.syn_cookies == SynCookies::Auto)
            .map(|s| (s.name.get_ref().clone(), s.syn_cookie_threshold))
            .collect();
        self.auto_cookies.retain(|name| auto.iter().any(|(n, _)| n == name));
        for (name, threshold) in auto {
            let Some(id) = self.balancer.service_id(&name) else { continue };
            let Ok(counter) = self.datapath.maps().traffic.syn(id) else { continue };
            let installed = self.balancer.cookies_active(&name);
            let times = (elapsed, since_start);
            // Segments that would open a flow: SYNs, and those refused without a cookie
            // (counted as SYNs while cookies are off, as invalid while they are on: a
            // spoofed ACK flood must keep them on as long as it lasts).
            let opening = counter.syns.saturating_add(counter.cookies_invalid);
            let Some(on) = self.auto_cookies.observe(&name, opening, threshold, times, installed)
            else {
                continue;
            };
            let rate = self.auto_cookies.rate(&name);
            if on {
                warn!(service = %name, rate, threshold, "SYN flood: SYN cookies ON for the service");
            } else {
                info!(service = %name, rate, "SYN rate back to normal: SYN cookies off");
            }
            if let Err(error) =
                self.balancer.set_cookies_active(&name, on, self.datapath.maps_mut())
            {
                warn!(%error, service = %name, "switching SYN cookies failed");
            }
        }
    }

    /// Cuts the established flows of disabled backends, of draining ones past their
    /// deadline, and of removed ones past their pool's deadline.
    fn cut_flows(&mut self, now: Instant) {
        let mut ids = HashSet::new();
        // TLS passthrough relays go by id too: a backend without a port of its own and one
        // with the service's port are two backends at one address.
        let mut cut = HashSet::new();
        for backend in self.lifecycle.due_cuts(&self.config, now) {
            if let Some(id) = self.balancer.backend_id(&backend) {
                info!(pool = %backend.pool, backend = %health::describe(&backend), "cutting the backend's established flows");
                ids.insert(id);
                cut.insert(id);
            }
        }
        // Backends cut before whose flows the last sweep still found alive (a cut that
        // failed, or a flow it spared as about to expire that a packet then refreshed): cut
        // again. They take no new flows, so this ends; at most once a sweep (a cut forgets
        // the count until the next sweep makes it again).
        for backend in self.lifecycle.cut_backends() {
            if let Some(id) = self.balancer.backend_id(backend)
                && self.live_by_backend.get(&id).copied().unwrap_or(0) > 0
            {
                ids.insert(id);
            }
        }
        let retired: Vec<(u32, BackendIdentity)> =
            self.balancer.retired().map(|(id, k)| (id, k.clone())).collect();
        for id in self.lifecycle.due_retired(&retired, &self.config, now) {
            cut.insert(id);
            if self.live_by_backend.get(&id).copied().unwrap_or(0) > 0 {
                ids.insert(id);
            }
        }
        // TLS passthrough relays to those backends end the same way.
        self.passthrough.cut(&cut);
        if ids.is_empty() {
            return;
        }
        let entries = self.balancer.backend_entries();
        let clock = self.datapath.flow_clock().ok();
        match self.datapath.maps_mut().conntrack.remove_flows_of(
            &ids,
            |id| entries.get(&id).copied(),
            clock.as_ref(),
        ) {
            Ok(removed) => {
                info!(removed, backends = ids.len(), "established flows cut");
                for id in &ids {
                    self.live_by_backend.remove(id);
                }
            }
            Err(error) => warn!(%error, "cutting flows failed"),
        }
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

    /// Removes expired connections (pairs together) and releases retired backends. With
    /// the timeouts the data path has (`GLOBALS`), not the configuration's: a change that
    /// failed after writing them must not make the two judge entries differently.
    pub fn sweep(&mut self) {
        self.retry_service_cuts();
        let clock = match self.datapath.flow_clock() {
            Ok(clock) => clock,
            Err(error) => {
                warn!(%error, "cannot read the data path's clock and settings");
                return;
            }
        };
        let swept = {
            let entries = self.balancer.backend_entries();
            self.datapath.maps_mut().conntrack.sweep(&clock, |id| entries.get(&id).copied())
        };
        match swept {
            Ok(mut result) => {
                if result.removed > 0 {
                    info!(removed = result.removed, live = result.live, "connection table swept");
                }
                // TLS passthrough relays to a removed backend keep its id as its flows do:
                // released, it would never be due for its pool's drain deadline, and the
                // relays would run on to a backend long gone from the configuration.
                for (id, _) in self.balancer.retired() {
                    let relays = self.passthrough.relays_to(id) as u64;
                    if relays > 0 {
                        *result.kept_by_backend.entry(id).or_default() += relays;
                    }
                }
                if let Err(error) =
                    self.balancer.release_retired(self.datapath.maps_mut(), &result.kept_by_backend)
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
        self.apply_with(new, false)
    }

    /// [`Daemon::apply`]; `reread` re-reads the firewall's prefix files even when the
    /// `[firewall]` section is unchanged (a reload does, an API change does not).
    fn apply_with(&mut self, new: Config, reread: bool) -> Result<ApplySummary, ChangeError> {
        let prepared = self.prepare(new, reread)?;
        self.install(prepared)
    }

    /// Every check of a change, with nothing changed yet: what [`Daemon::install`] needs, or
    /// why the change is refused.
    fn prepare(&self, new: Config, reread: bool) -> Result<Prepared, ChangeError> {
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
        let secrets = check_secret_files(&new);
        if !secrets.is_empty() {
            return Err(ChangeError::Invalid(secrets));
        }
        // A reloaded file may change settings read only at start: they wait for a restart.
        let mut new = new;
        let file_now = reread.then(|| StartSettings::of(&new));
        let pending = file_now.as_ref().map(|f| f.differences(&self.file_at_start));
        StartSettings::of(&self.config).put(&mut new);
        let firewall = if reread || new.firewall != self.config.firewall {
            FirewallChange::Install(compile_firewall(&new, self.hz).map_err(ChangeError::Invalid)?)
        } else {
            FirewallChange::Keep
        };
        let now = Instant::now();
        let mut lifecycle = self.lifecycle.clone();
        lifecycle.observe(&new, now);
        let (effective, panicking) = lifecycle.effective(&new, now);
        // Also checked by `Balancer::apply`; here too, so that nothing (passthrough's start,
        // port reservations, the file) changes for a change that does not fit.
        self.balancer
            .check_capacity(&effective)
            .map_err(|e| ChangeError::Invalid(vec![e.to_string()]))?;
        Ok(Prepared { new, file_now, pending, firewall, lifecycle, effective, panicking, now })
    }

    /// Applies a prepared change: the data path, then the daemon's own state.
    fn install(&mut self, prepared: Prepared) -> Result<ApplySummary, ChangeError> {
        let Prepared { new, file_now, pending, firewall, mut lifecycle, effective, panicking, now } =
            prepared;
        if let Some(pending) = &pending
            && !pending.is_empty()
        {
            warn!(
                settings = %pending.join(", "),
                "changed in the configuration file; they take effect when lbd restarts"
            );
        }
        // What the firewall filters by now, to put back should a later step fail after it
        // was installed (set once it is).
        let firewall_before = self.firewall.installed();
        let mut firewall_touched = false;
        // The new ranges are reserved before any flow can take their ports; the old ones
        // are given back once the change has applied (or the new ones, if it fails).
        reserve_nat_ports(&self.config.daemon.pin_dir, &[&self.config, &new], false);
        // Every step that can fail, in order; a failure puts the earlier ones back.
        let applied = self
            .balancer
            .apply(&effective, self.datapath.maps_mut(), &mut self.resolver)
            .map_err(|e| match e {
                crate::balancer::ApplyError::Capacity(message) => {
                    ChangeError::Invalid(vec![message])
                }
                e => ChangeError::Apply(e.to_string()),
            })
            .and_then(|summary| {
                if let FirewallChange::Install(compiled) = &firewall {
                    firewall_touched = true;
                    let installed = self
                        .firewall
                        .install(&mut self.datapath.maps_mut().firewall, compiled.as_ref())
                        .map_err(|e| ChangeError::Apply(format!("firewall: {e}")))?;
                    info!(summary = ?installed, "firewall installed");
                }
                // After the services: a passthrough service's packets reach the host only
                // once it is in the data path, and until its listener is up, connections
                // are refused as they were before the change.
                if Passthrough::needed(&new) && !self.passthrough.started() {
                    start_passthrough(&mut self.datapath, &mut self.passthrough)
                        .map_err(|e| ChangeError::Apply(format!("{e:#}")))?;
                }
                Ok(summary)
            });
        let mut summary = match applied {
            Ok(summary) => summary,
            Err(error) => {
                self.put_back(now, firewall_touched.then_some(&firewall_before));
                reserve_nat_ports(&self.config.daemon.pin_dir, &[&self.config], true);
                return Err(error);
            }
        };
        // Nothing below fails.
        summary.pending_restart = pending.unwrap_or_default();
        lifecycle.installed(&effective, panicking);
        self.lifecycle = lifecycle;
        self.passthrough.sync(&effective, &self.balancer);
        self.cut_service_flows(&summary);
        self.config = new;
        reserve_nat_ports(&self.config.daemon.pin_dir, &[&self.config], true);
        if let Some(file) = file_now {
            self.file_now = file;
        }
        self.sync_health_checks();
        self.cut_flows(now);
        Ok(summary)
    }

    /// Puts the data path back to the running configuration after a change failed part-way
    /// (a map write or program attach the kernel refused): the services, pools and
    /// settings as `self.config` and the lifecycle have them, and the firewall as it was
    /// (`firewall`: what it filtered by before, when the change installed one). A change
    /// that fails this way thus changes nothing but flows of services it added in the
    /// meantime, which are cut. Best effort: a write refused once may be refused again
    /// (logged as an error; the next reload or change tries again).
    fn put_back(&mut self, now: Instant, firewall: Option<&crate::firewall::Installed>) {
        let (effective, _) = self.lifecycle.effective(&self.config, now);
        self.balancer.take_back_removed();
        match self.balancer.apply(&effective, self.datapath.maps_mut(), &mut self.resolver) {
            Ok(summary) => self.cut_service_flows(&summary),
            Err(error) => tracing::error!(
                %error,
                "a failed change could not be undone: the data path may serve part of it until the next reload"
            ),
        }
        let before = match firewall {
            None => return,
            Some(Installed::Off) => None,
            Some(Installed::Rules(rules)) => Some(&**rules),
            Some(Installed::Unknown) => {
                tracing::error!(
                    "the firewall could not be put back after a failed change: what it held is unknown"
                );
                return;
            }
        };
        let maps = &mut self.datapath.maps_mut().firewall;
        if let Err(error) = self.firewall.install(maps, before) {
            tracing::error!(%error, "the firewall could not be put back after a failed change");
        }
    }

    /// Cuts the flows of services a change removed, and those using an address it took
    /// away (see [`cut_service_flows`]); a failure is tried again at each sweep.
    fn cut_service_flows(&mut self, summary: &ApplySummary) {
        if let Err(error) = cut_service_flows(&mut self.datapath, &self.balancer, summary) {
            warn!(%error, "cutting flows of removed or changed services failed; trying again at each sweep");
            let (ids, gone) = self.pending_cuts.get_or_insert_with(|| (Vec::new(), false));
            ids.extend(&summary.removed_service_ids);
            *gone |= summary.addresses_gone;
        }
    }

    /// Tries again the cuts that failed: a removed service's established flows would go on
    /// to its backends until they idle out (hours), keeping their backends retired. A
    /// removed id a service has taken since is left out: its old flows cannot be told from
    /// the new service's, and idle out.
    fn retry_service_cuts(&mut self) {
        let Some((mut ids, addresses_gone)) = self.pending_cuts.take() else { return };
        let in_use: HashSet<u32> = self.balancer.services().map(|(_, id)| id).collect();
        ids.retain(|id| !in_use.contains(id));
        ids.sort_unstable();
        ids.dedup();
        if ids.is_empty() && !addresses_gone {
            return;
        }
        let summary =
            ApplySummary { removed_service_ids: ids, addresses_gone, ..ApplySummary::default() };
        match cut_service_flows(&mut self.datapath, &self.balancer, &summary) {
            Ok(()) => info!("the flows of removed or changed services are cut, tried again"),
            Err(error) => {
                debug!(%error, "cutting flows of removed or changed services failed again");
                self.pending_cuts = Some((summary.removed_service_ids, addresses_gone));
            }
        }
    }

    /// Re-reads the configuration file and applies it.
    pub fn reload(&mut self) -> Result<ApplySummary, ChangeError> {
        let path = self
            .config_path
            .clone()
            .ok_or_else(|| ChangeError::NotFound("lbd runs without a configuration file".into()))?;
        let (new, text) = Config::load_with_text(&path).map_err(|e| match e {
            crate::config::ConfigError::Read { .. } => ChangeError::Read(e.to_string()),
            e => ChangeError::Invalid(vec![e.to_string()]),
        })?;
        let summary = self.apply_with(new, true)?;
        self.file_digest = Some(digest(text.as_bytes()));
        Ok(summary)
    }

    /// Applies `new` and writes it back to the configuration file, so the change survives a
    /// restart. Every check comes first, then the file is written (beside the old one, then
    /// renamed over it), then the change is applied: a refused change or a file that cannot
    /// be written leaves everything as it was. Should applying fail after that (a map write
    /// refused by the kernel), the old file is put back.
    pub fn change(&mut self, new: Config) -> Result<ApplySummary, ChangeError> {
        let prepared = self.prepare(new, false)?;
        let staged = self.stage(&prepared.new)?;
        if let Some(staged) = &staged {
            staged.commit()?;
        }
        match self.install(prepared) {
            Ok(summary) => {
                if let Some(staged) = staged {
                    self.file_digest = Some(staged.digest);
                }
                Ok(summary)
            }
            Err(error) => {
                if let Some(staged) = staged
                    && let Err(restore) = staged.restore()
                {
                    // The file holds the refused change: a later API change is refused as
                    // a conflict until the file is mended and reloaded.
                    tracing::error!(%restore, "the configuration file could not be put back");
                    self.file_digest = None;
                }
                Err(error)
            }
        }
    }

    /// Writes what the file will hold after `new` is applied to a temporary file beside it,
    /// with the file's mode and owner, and keeps the original as `<file>.orig` (once).
    /// Writes through a symbolic link to the file it names.
    fn stage(&self, new: &Config) -> Result<Option<Staged>, ChangeError> {
        let Some(link) = &self.config_path else { return Ok(None) };
        let fail = |what: &std::path::Path, e: std::io::Error| {
            ChangeError::Persist(format!("{}: {e}", what.display()))
        };
        let path = std::fs::canonicalize(link).map_err(|e| fail(link, e))?;
        // Edits to the file since lbd last read it (not reloaded yet, or rejected) are not
        // written over: the change is refused until the file is reloaded or put back.
        let current = std::fs::read(&path).map_err(|e| fail(&path, e))?;
        if Some(digest(&current)) != self.file_digest {
            return Err(ChangeError::Conflict(format!(
                "{} was edited since lbd last read it; reload it (or undo the edit) before changing the configuration through the API, which would write over the edit",
                link.display()
            )));
        }
        let mut on_disk = new.clone();
        self.file_now.put(&mut on_disk);
        let text = on_disk.to_toml().map_err(|e| ChangeError::Persist(e.to_string()))?;
        // Whole or not at all (copied beside it, then renamed): a partial copy would pass for
        // the original from then on.
        let backup = beside(&path, ".orig");
        let new_backup = !backup.exists();
        if new_backup {
            let partial = beside(&path, ".orig.tmp");
            let copied = std::fs::copy(&path, &partial)
                .and_then(|_| std::fs::File::open(&partial)?.sync_all())
                .and_then(|()| std::fs::rename(&partial, &backup));
            if let Err(e) = copied {
                let _ = std::fs::remove_file(&partial);
                return Err(fail(&backup, e));
            }
        }
        let tmp = beside(&path, ".tmp");
        let header =
            "# Written by lbd after a change through its API; the original is kept as *.orig.\n";
        let contents = format!("{header}{text}");
        let backup = new_backup.then_some(backup);
        if let Err(e) = write_beside(&path, &tmp, contents.as_bytes()) {
            if let Some(backup) = &backup {
                let _ = std::fs::remove_file(backup);
            }
            return Err(fail(&tmp, e));
        }
        Ok(Some(Staged {
            tmp,
            path,
            digest: digest(contents.as_bytes()),
            previous: current,
            backup,
        }))
    }
}

/// Writes `contents` to `tmp` (beside `path`, to be renamed over it) with `path`'s mode and
/// owner, durably; on failure `tmp` is gone.
fn write_beside(
    path: &std::path::Path,
    tmp: &std::path::Path,
    contents: &[u8],
) -> std::io::Result<()> {
    use std::os::unix::fs::{MetadataExt as _, OpenOptionsExt as _};
    let meta = std::fs::metadata(path)?;
    let _ = std::fs::remove_file(tmp);
    let written = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(meta.mode() & 0o7777)
        .open(tmp)
        .and_then(|mut file| {
            use std::io::Write as _;
            // The mode given at creation is masked by the umask: set it whole.
            file.set_permissions(meta.permissions())?;
            file.write_all(contents)?;
            file.sync_all()?;
            file.metadata()
        });
    let created = match written {
        Ok(created) => created,
        Err(e) => {
            let _ = std::fs::remove_file(tmp);
            return Err(e);
        }
    };
    // The owner too, when it is not lbd's own; lbd may lack the right to (a unit without
    // CAP_CHOWN): then the file keeps its mode and changes owner, which is logged.
    if (created.uid(), created.gid()) != (meta.uid(), meta.gid())
        && let Err(error) = std::os::unix::fs::chown(tmp, Some(meta.uid()), Some(meta.gid()))
    {
        warn!(%error, file = %path.display(), "could not keep the configuration file's owner");
    }
    Ok(())
}

/// A configuration file's next contents, written beside it and not yet in its place.
struct Staged {
    tmp: PathBuf,
    path: PathBuf,
    /// Of the new contents.
    digest: u64,
    /// The file's contents before the change, to put back if the change fails to apply.
    previous: Vec<u8>,
    /// The `.orig` copy this change made (the first through the API), removed with it.
    backup: Option<PathBuf>,
}

/// What a change does to the firewall.
enum FirewallChange {
    /// Nothing: its section and prefix files are as installed.
    Keep,
    /// Installs this rule set (`None`: no firewall).
    Install(Option<firewall::Compiled>),
}

/// Cuts the flows of the services `summary`'s change removed, and the flows using a service
/// address or NAT source it took away (a service's address or NAT source changed, a NAT
/// service made DSR): neither can go on (see `ConntrackMap::remove_orphans`).
fn cut_service_flows(
    datapath: &mut Datapath,
    balancer: &Balancer,
    summary: &ApplySummary,
) -> Result<(), crate::maps::MapError> {
    if summary.removed_service_ids.is_empty() && !summary.addresses_gone {
        return Ok(());
    }
    let clock = datapath.flow_clock().ok();
    let conntrack = &mut datapath.maps_mut().conntrack;
    if !summary.removed_service_ids.is_empty() {
        let removed =
            conntrack.remove_flows_of_services(&summary.removed_service_ids, clock.as_ref())?;
        info!(removed, "flows of removed services cut");
    }
    if summary.addresses_gone {
        let (vips, nat_sources) = balancer.addresses();
        let removed = conntrack.remove_orphans(&vips, &nat_sources, clock.as_ref())?;
        if removed > 0 {
            info!(removed, "flows using an address no longer the data path's cut");
        }
    }
    Ok(())
}

/// A change that passed every check ([`Daemon::prepare`]), ready for [`Daemon::install`].
struct Prepared {
    /// The configuration to run (settings read only at start kept as running).
    new: Config,
    /// What the file holds of those settings, after a reload.
    file_now: Option<StartSettings>,
    /// Settings the file changed that wait for a restart.
    pending: Option<Vec<&'static str>>,
    firewall: FirewallChange,
    lifecycle: Lifecycle,
    /// `new` under the lifecycle's weights, and the pools in panic mode.
    effective: Config,
    panicking: std::collections::BTreeSet<String>,
    now: Instant,
}

/// A digest of a configuration file's bytes, to notice edits (not a security measure).
fn digest(bytes: &[u8]) -> u64 {
    use std::hash::{Hash as _, Hasher as _};
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    bytes.hash(&mut hasher);
    hasher.finish()
}

impl Staged {
    /// Puts the new file in place of the old one (and makes the rename durable); on failure
    /// the old file stays and the new one goes.
    fn commit(&self) -> Result<(), ChangeError> {
        if let Err(e) = std::fs::rename(&self.tmp, &self.path) {
            let _ = std::fs::remove_file(&self.tmp);
            self.forget_backup();
            return Err(ChangeError::Persist(format!("{}: {e}", self.path.display())));
        }
        sync_parent(&self.path);
        Ok(())
    }

    /// Puts the file's previous contents back the same way (a file beside it, renamed over
    /// it), with the committed file's mode and owner (the old file's, as staged).
    fn restore(&self) -> std::io::Result<()> {
        write_beside(&self.path, &self.tmp, &self.previous)?;
        if let Err(e) = std::fs::rename(&self.tmp, &self.path) {
            let _ = std::fs::remove_file(&self.tmp);
            return Err(e);
        }
        sync_parent(&self.path);
        self.forget_backup();
        Ok(())
    }

    /// Removes the `.orig` copy this change made: the file is the original again.
    fn forget_backup(&self) {
        if let Some(backup) = &self.backup {
            let _ = std::fs::remove_file(backup);
        }
    }
}

/// Makes a rename in `path`'s directory durable (best effort).
fn sync_parent(path: &std::path::Path) {
    if let Some(dir) = path.parent()
        && let Ok(dir) = std::fs::File::open(dir)
    {
        let _ = dir.sync_all();
    }
}

/// The firewall a configuration asks for, compiled (its prefix files read); `None` without a
/// `[firewall]` section.
pub fn compile_firewall(
    config: &Config,
    hz: u64,
) -> Result<Option<firewall::Compiled>, Vec<String>> {
    config.firewall.as_ref().map(|f| firewall::compile(f, hz)).transpose()
}

/// Autoscaling webhooks sign with secrets read at delivery; a missing or unreadable one is
/// caught here, at start, reload and `lbd check-config`.
pub fn check_secret_files(config: &Config) -> Vec<String> {
    config
        .pools
        .iter()
        .flat_map(|p| &p.autoscale)
        .filter_map(|a| a.secret_file.as_deref())
        .filter_map(|path| autoscale::read_secret(path).err())
        .collect()
}

/// Settings read only when lbd starts: the API's socket and token file, the pin directory
/// and the stats log interval. A reload keeps the running values (and logs which changed in
/// the file); the file keeps its own, which a restart applies.
#[derive(Clone, Debug, PartialEq, Eq)]
struct StartSettings {
    api: crate::config::ApiConfig,
    pin_dir: String,
    stats_log_interval_secs: u64,
}

impl StartSettings {
    fn of(config: &Config) -> Self {
        Self {
            api: config.api.clone(),
            pin_dir: config.daemon.pin_dir.clone(),
            stats_log_interval_secs: config.daemon.stats_log_interval_secs,
        }
    }

    fn put(&self, config: &mut Config) {
        config.api.clone_from(&self.api);
        config.daemon.pin_dir.clone_from(&self.pin_dir);
        config.daemon.stats_log_interval_secs = self.stats_log_interval_secs;
    }

    /// The settings' names where `self` and `other` differ.
    fn differences(&self, other: &Self) -> Vec<&'static str> {
        let mut names = Vec::new();
        if self.api.listen != other.api.listen {
            names.push("api.listen");
        }
        if self.api.token_file != other.api.token_file {
            names.push("api.token_file");
        }
        if self.api.tls_cert_file != other.api.tls_cert_file
            || self.api.tls_key_file != other.api.tls_key_file
        {
            names.push("api.tls");
        }
        if self.pin_dir != other.pin_dir {
            names.push("daemon.pin_dir");
        }
        if self.stats_log_interval_secs != other.stats_log_interval_secs {
            names.push("daemon.stats_log_interval_secs");
        }
        names
    }
}

/// `path` with `suffix` added to its file name (`lbd.toml` to `lbd.toml.orig`).
fn beside(path: &Path, suffix: &str) -> PathBuf {
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(suffix);
    path.with_file_name(name)
}

/// Reserves the NAT source ports of `configs`' services from the kernel's ephemeral range
/// and, with `give_back`, gives back those lbd reserved for services in none of them (see
/// `sysctl`).
fn reserve_nat_ports(pin_dir: &str, configs: &[&Config], give_back: bool) {
    let ranges: Vec<(u16, u16)> = configs
        .iter()
        .flat_map(|c| &c.services)
        .filter(|s| s.nat_source.is_some())
        .map(ServiceConfig::nat_port_range)
        .collect();
    let state_dir = (!pin_dir.is_empty()).then(|| Path::new(pin_dir));
    let wanted = sysctl::Ports::of_ranges(&ranges);
    if let Err(error) = sysctl::reserve_nat_ports(&wanted, state_dir, give_back) {
        warn!(%error, "could not reserve the NAT ports from the kernel's ephemeral range");
    }
}

/// Starts the kernel's half of TLS passthrough and the daemon's (on the current tokio
/// runtime, which serves the connections).
fn start_passthrough(datapath: &mut Datapath, passthrough: &mut Passthrough) -> anyhow::Result<()> {
    tokio::runtime::Handle::try_current()
        .context("TLS passthrough services need the daemon's async runtime")?;
    let (maps, sockmap) =
        datapath.start_passthrough().context("failed to start TLS passthrough")?;
    passthrough.start(maps, sockmap);
    info!(relay = if sockmap { "sockmap" } else { "splice" }, "TLS passthrough started");
    Ok(())
}
