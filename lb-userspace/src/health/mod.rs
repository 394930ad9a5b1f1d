//! Health checks: one task per checked backend probes it on the pool's schedule, keeps its
//! rise/fall state ([`state`]) and reports every result to the daemon, which takes a backend
//! that flips down out of the Maglev tables and puts it back when it flips up.

pub mod probe;
pub mod route;
pub mod state;

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    hash::{DefaultHasher, Hash as _, Hasher as _},
    net::{IpAddr, SocketAddr},
    time::Duration,
};

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::{
    Balancer,
    balancer::BackendIdentity,
    config::{BackendState, CheckKind, Config, ForwardingMode},
};
pub use probe::Probe;
use route::{CheckRoute, CheckRoutes};
pub use state::{CheckState, Flip};

/// How and how often one backend is checked.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Spec {
    pub probe: Probe,
    pub interval: Duration,
    pub fast_interval: Duration,
    pub jitter: Duration,
    pub rise: u32,
    pub fall: u32,
}

/// How often check routes that could not be set are tried again.
pub const ROUTE_RETRY: Duration = Duration::from_secs(5);
/// How often every check route is written again.
pub const ROUTE_REASSERT: Duration = Duration::from_secs(10);

/// Whether check routes last tried again at `last` may be tried again at `now`.
fn retry_due(last: Option<std::time::Instant>, now: std::time::Instant) -> bool {
    last.is_none_or(|t| now.saturating_duration_since(t) >= ROUTE_RETRY)
}

/// One check's result, sent to the daemon.
#[derive(Clone, Debug)]
pub struct Report {
    pub backend: BackendIdentity,
    /// The check task that sent it (see [`Checker::is_current`]).
    pub task: u64,
    pub result: Result<(), String>,
    /// The flip this result caused, if any.
    pub flip: Option<Flip>,
    /// The backend's health after this result.
    pub healthy: bool,
}

/// What the checks plan for a configuration: a spec per checked backend and the policy
/// routes its DSR checks need.
#[derive(Debug, Default)]
pub struct Plan {
    pub specs: HashMap<BackendIdentity, Spec>,
    pub routes: BTreeMap<u32, CheckRoute>,
}

/// Works out every backend's checks. Disabled backends are not checked; backends of pools
/// without `health_check` are not either (they count as healthy).
#[must_use]
pub fn plan(config: &Config, balancer: &Balancer) -> Plan {
    let mut plan = Plan::default();
    for pool in &config.pools {
        let Some(check) = &pool.health_check else { continue };
        let pool_name = pool.name.get_ref();
        let services: Vec<_> =
            config.services.iter().filter(|s| s.pool.get_ref() == pool_name).collect();
        let enabled = crate::lifecycle::pool_backends(pool)
            .filter(|(_, b)| b.state != BackendState::Disabled);
        for (identity, backend) in enabled {
            let Some(id) = balancer.backend_id(&identity) else { continue };
            let port = config.health_check_port(pool, backend).unwrap_or(0);
            let addr = identity.addr;
            // DSR services are checked at their own addresses (through the backend's check
            // route); NAT services, or none, at the backend's.
            let mut targets = BTreeSet::new();
            let mut vips = BTreeSet::new();
            for service in &services {
                let vip = *service.address.get_ref();
                if service.mode == ForwardingMode::DsrL2 {
                    if vip.is_ipv4() == addr.is_ipv4() {
                        vips.insert(vip);
                        targets.insert(SocketAddr::new(vip, port));
                    }
                } else {
                    targets.insert(SocketAddr::new(addr, port));
                }
            }
            if targets.is_empty() {
                targets.insert(SocketAddr::new(addr, port));
            }
            let mark = (!vips.is_empty()).then(|| route::mark(id));
            if !vips.is_empty() {
                plan.routes.insert(id, (addr, vips.clone()));
            }
            let placeholder_vip = vips.first().copied().unwrap_or(addr);
            let command = check
                .command
                .iter()
                .map(|arg| {
                    arg.replace("{address}", &addr.to_string())
                        .replace("{port}", &port.to_string())
                        .replace("{pool}", pool_name)
                        .replace("{service_address}", &placeholder_vip.to_string())
                })
                .collect();
            let probe = Probe {
                kind: check.kind,
                targets: if check.kind == CheckKind::Command {
                    Vec::new()
                } else {
                    targets.into_iter().collect()
                },
                mark,
                timeout: Duration::from_millis(check.timeout_ms),
                path: check.path.clone(),
                expect_status: check.expect_status,
                expect: check.expect.clone(),
                send: check.send.clone(),
                sni: check.sni.clone(),
                host: check.host.clone(),
                command,
            };
            let spec = Spec {
                probe,
                interval: Duration::from_millis(check.interval_ms),
                fast_interval: Duration::from_millis(check.fast_interval_ms),
                jitter: Duration::from_millis(check.jitter_ms),
                rise: check.rise,
                fall: check.fall,
            };
            plan.specs.insert(identity, spec);
        }
    }
    plan
}

/// The number the next check task gets.
static NEXT_TASK: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// The running check tasks.
#[derive(Debug)]
pub struct Checker {
    /// Per backend: its check, the task's stop, the task's number.
    tasks: HashMap<BackendIdentity, (Spec, CancellationToken, u64)>,
    reports: mpsc::UnboundedSender<Report>,
    routes: CheckRoutes,
    /// When the check routes were last tried again (see [`Checker::retry_routes`]).
    last_route_retry: Option<std::time::Instant>,
    /// When the check routes were last written again (see [`CheckRoutes::reassert`]).
    last_route_reassert: Option<std::time::Instant>,
    runtime: tokio::runtime::Handle,
}

impl Checker {
    /// A checker whose tasks run on `runtime` and report to `reports`.
    #[must_use]
    pub fn new(reports: mpsc::UnboundedSender<Report>, runtime: tokio::runtime::Handle) -> Self {
        Self {
            tasks: HashMap::new(),
            reports,
            routes: CheckRoutes::default(),
            runtime,
            last_route_retry: None,
            last_route_reassert: None,
        }
    }

    /// Whether `report` comes from the backend's running check task: a result queued
    /// while its check was restarted (a reload, an API change) or stopped (the backend
    /// removed or disabled) is of a check that no longer runs, and would set the new
    /// task's state by the old one's.
    #[must_use]
    pub fn is_current(&self, report: &Report) -> bool {
        self.tasks.get(&report.backend).is_some_and(|(_, _, task)| *task == report.task)
    }

    /// Runs exactly `plan`'s checks: stops those no longer wanted or changed, starts new
    /// ones. Returns the backends whose checks (re)started, which begin healthy, but for
    /// those in `start_down` (known down), which begin unhealthy.
    pub fn sync(
        &mut self,
        plan: Plan,
        start_down: &std::collections::HashSet<BackendIdentity>,
    ) -> Vec<BackendIdentity> {
        self.routes.sync(&plan.routes);
        self.tasks.retain(|backend, (spec, cancel, _)| {
            let keep = plan.specs.get(backend) == Some(spec);
            if !keep {
                cancel.cancel();
            }
            keep
        });
        let mut started = Vec::new();
        for (backend, spec) in plan.specs {
            if self.tasks.contains_key(&backend) {
                continue;
            }
            let cancel = CancellationToken::new();
            // Numbered across checkers too: a report of another checker's task never passes.
            let task = NEXT_TASK.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            self.runtime.spawn(check_loop(
                (backend.clone(), task),
                spec.clone(),
                !start_down.contains(&backend),
                self.reports.clone(),
                cancel.clone(),
            ));
            started.push(backend.clone());
            self.tasks.insert(backend, (spec, cancel, task));
        }
        started
    }

    /// Sets the check routes the last sync could not, at most once every
    /// [`ROUTE_RETRY`] (called every second by the daemon's tick).
    pub fn retry_routes(&mut self, now: std::time::Instant) {
        if self.routes.pending() && retry_due(self.last_route_retry, now) {
            self.last_route_retry = Some(now);
            self.routes.retry();
        }
        // And writes them all again now and then: an interface that went down took its
        // routes with it.
        if self
            .last_route_reassert
            .is_none_or(|t| now.saturating_duration_since(t) >= ROUTE_REASSERT)
        {
            self.last_route_reassert = Some(now);
            self.routes.reassert();
        }
    }

    /// Stops every check and removes the check routes.
    pub fn stop(&mut self) {
        for (_, (_, cancel, _)) in self.tasks.drain() {
            cancel.cancel();
        }
        self.routes.clear();
    }
}

impl Drop for Checker {
    fn drop(&mut self) {
        self.stop();
    }
}

async fn check_loop(
    (backend, task): (BackendIdentity, u64),
    spec: Spec,
    healthy: bool,
    reports: mpsc::UnboundedSender<Report>,
    cancel: CancellationToken,
) {
    let mut state = CheckState::starting(healthy, spec.rise, spec.fall);
    let mut jitter = Jitter::new(&backend);
    // The first check comes within one jitter, so a dead backend is found soon after start.
    let mut wait = jitter.next(spec.jitter);
    loop {
        tokio::select! {
            () = cancel.cancelled() => return,
            () = tokio::time::sleep(wait) => {}
        }
        let result = tokio::select! {
            () = cancel.cancelled() => return,
            result = spec.probe.run() => result,
        };
        let flip = state.observe(result.is_ok());
        let healthy = state.is_healthy();
        let report = Report { backend: backend.clone(), task, result, flip, healthy };
        if reports.send(report).is_err() {
            return;
        }
        let base = if state.is_changing() { spec.fast_interval } else { spec.interval };
        wait = base + jitter.next(spec.jitter);
    }
}

/// A small xorshift generator for check jitter, seeded per backend and per start.
struct Jitter(crate::rng::XorShift);

impl Jitter {
    fn new(backend: &BackendIdentity) -> Self {
        let mut h = DefaultHasher::new();
        backend.hash(&mut h);
        std::time::SystemTime::now().hash(&mut h);
        Self(crate::rng::XorShift::new(h.finish()))
    }

    fn next(&mut self, max: Duration) -> Duration {
        let max_ms = u64::try_from(max.as_millis()).unwrap_or(u64::MAX);
        if max_ms == 0 { Duration::ZERO } else { Duration::from_millis(self.0.next_u64() % max_ms) }
    }
}

/// The address a backend's checks appear to come from in logs: its own.
#[must_use]
pub fn describe(backend: &BackendIdentity) -> String {
    match (backend.addr, backend.port) {
        (IpAddr::V6(a), Some(port)) => format!("[{a}]:{port}"),
        (a, Some(port)) => format!("{a}:{port}"),
        (a, None) => a.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::health::probe::tests::{check, own_netns};

    /// A command check that passes, every `every` (restarted when `every` changes).
    fn passing(every: u64) -> Spec {
        let mut probe = check(CheckKind::Command, "127.0.0.1:1".parse().unwrap());
        probe.command = vec!["true".into()];
        let every = Duration::from_millis(every);
        Spec {
            probe,
            interval: every,
            fast_interval: every,
            jitter: Duration::ZERO,
            rise: 1,
            fall: 1,
        }
    }

    #[test]
    fn check_routes_are_tried_again_once_every_few_seconds() {
        let t = std::time::Instant::now();
        assert!(retry_due(None, t), "the first retry at once");
        assert!(!retry_due(Some(t), t));
        assert!(!retry_due(Some(t), t + ROUTE_RETRY.saturating_sub(Duration::from_millis(1))));
        assert!(retry_due(Some(t), t + ROUTE_RETRY));
        assert!(!retry_due(Some(t + ROUTE_RETRY), t), "a clock read out of order");
    }

    #[tokio::test]
    async fn a_restarted_check_s_queued_results_are_not_current() {
        // Its own namespace: the checker clears check routes (`ip rule`) where it runs.
        if !own_netns("a_restarted_check_s_queued_results_are_not_current") {
            return;
        }
        let (tx, mut rx) = mpsc::unbounded_channel();
        let mut checker = Checker::new(tx, tokio::runtime::Handle::current());
        let backend =
            BackendIdentity { pool: "web".into(), addr: [198, 18, 1, 11].into(), port: None };
        let plan = |every| Plan {
            specs: HashMap::from([(backend.clone(), passing(every))]),
            routes: BTreeMap::new(),
        };
        let none = std::collections::HashSet::new();
        checker.sync(plan(20), &none);
        let within = Duration::from_secs(5);
        let first = tokio::time::timeout(within, rx.recv()).await.unwrap().unwrap();
        assert!(checker.is_current(&first));
        // The check's settings change: a new task; the old one's results are stale.
        assert_eq!(checker.sync(plan(30), &none), vec![backend.clone()]);
        assert!(!checker.is_current(&first));
        // Bounded as a whole: an old task that kept reporting would otherwise hold the loop.
        let current = tokio::time::timeout(within, async {
            loop {
                let report = rx.recv().await.unwrap();
                if report.task != first.task {
                    break report;
                }
            }
        })
        .await
        .expect("a report of the new task within 5 s");
        assert!(checker.is_current(&current));
        // Stopped (the backend removed): nothing of it is current.
        checker.sync(Plan::default(), &none);
        assert!(!checker.is_current(&current));
    }
}
