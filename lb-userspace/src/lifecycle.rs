//! What weight each backend really gets: its configured weight, shaped by its administrative
//! state (active, draining, disabled), its health, its pool's panic mode and slow start.
//!
//! The rules ([`effective_weight`], [`in_panic`]) are pure and tested on their own;
//! [`Lifecycle`] keeps the clock-dependent facts they need (when each backend came in, when
//! its state changed, what its checks say) and turns the user's configuration into the one
//! the balancer installs.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap, HashSet},
    time::{Duration, Instant},
};

use tracing::{error, info, warn};

use crate::{
    balancer::BackendIdentity,
    config::{BackendState, Config},
    health::{Flip, Report},
};

/// One backend's inputs.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct BackendInput {
    pub configured: u32,
    pub state: BackendState,
    pub healthy: bool,
    /// Seconds since it came in (added or recovered), for slow start.
    pub since_secs: f64,
}

/// A pool's settings for these rules.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct PoolRules {
    pub slow_start_secs: u64,
    pub min_healthy_share: f64,
    pub fail_closed: bool,
}

/// Whether a pool is in panic: fewer than `min_healthy_share` of its active backends are
/// healthy (and there are active backends at all).
#[must_use]
pub fn in_panic(backends: &[BackendInput], rules: &PoolRules) -> bool {
    let active: Vec<_> =
        backends.iter().filter(|b| b.state == BackendState::Active && b.configured > 0).collect();
    if active.is_empty() {
        return false;
    }
    #[allow(clippy::cast_precision_loss, reason = "counts of backends")]
    let share = active.iter().filter(|b| b.healthy).count() as f64 / active.len() as f64;
    share < rules.min_healthy_share
}

/// The weight a backend gets in its pool's Maglev table.
///
/// Draining and disabled backends take no new flows. Unhealthy backends take none either,
/// unless the pool is in panic and not fail-closed: then every active backend takes its
/// share, as Envoy does, rather than the few healthy ones taking everything. During slow
/// start the weight ramps linearly from 1 to the configured weight.
#[must_use]
pub fn effective_weight(b: &BackendInput, rules: &PoolRules, panic: bool) -> u32 {
    if b.state != BackendState::Active || b.configured == 0 {
        return 0;
    }
    if !b.healthy && (!panic || rules.fail_closed) {
        return 0;
    }
    #[allow(clippy::cast_precision_loss, reason = "slow-start seconds")]
    let total = rules.slow_start_secs as f64;
    if total > 0.0 && b.since_secs < total {
        let share = (b.since_secs / total).clamp(0.0, 1.0);
        #[allow(
            clippy::cast_possible_truncation,
            clippy::cast_sign_loss,
            reason = "0 <= share <= 1"
        )]
        let ramped = (f64::from(b.configured) * share) as u32;
        return ramped.clamp(1, b.configured);
    }
    b.configured
}

/// A backend's latest health-check result.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Health {
    pub healthy: bool,
    /// The last check's failure, if it failed.
    pub last_error: Option<String>,
}

/// How many health checks a backend had, and how many failed, since lbd started: counters
/// for the metrics, kept while the backend is configured (its checks restarting or
/// stopping, as when it is disabled, leave them), dropped with it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CheckCounts {
    pub checks: u64,
    pub failures: u64,
}

/// The lifecycle facts of every backend.
#[derive(Clone, Debug, Default)]
pub struct Lifecycle {
    /// When a backend came in (added while running, recovered, or made active again); absent
    /// for backends that were there at start, which take their full weight at once.
    came_in: HashMap<BackendIdentity, Instant>,
    /// Each backend's state and since when.
    states: HashMap<BackendIdentity, (BackendState, Instant)>,
    /// Each backend's configured weight, as last observed.
    weights: HashMap<BackendIdentity, u32>,
    /// Health of checked backends; unchecked ones count as healthy.
    pub health: HashMap<BackendIdentity, Health>,
    /// Health checks run and failed per backend (see [`CheckCounts`]).
    pub check_counts: HashMap<BackendIdentity, CheckCounts>,
    /// Backends whose established flows were cut (disabled, or drained past the deadline).
    cut: HashSet<BackendIdentity>,
    /// When each retired backend id (removed from its pool) was first seen retired.
    retired_since: HashMap<u32, Instant>,
    /// Each pool's drain deadline as last configured (seconds), kept after a change removes
    /// the pool: its retired backends still drain by it.
    drain_secs: HashMap<String, u64>,
    /// Pools in panic.
    pub panicking: BTreeSet<String>,
    /// The effective weights last installed.
    applied: BTreeMap<BackendIdentity, u32>,
}

/// Every backend of a configuration with its configured state.
pub(crate) fn backends(
    config: &Config,
) -> impl Iterator<Item = (BackendIdentity, &crate::config::BackendConfig)> {
    config.pools.iter().flat_map(pool_backends)
}

/// Every backend of one pool with its configured state, for work done pool by pool.
pub(crate) fn pool_backends(
    pool: &crate::config::PoolConfig,
) -> impl Iterator<Item = (BackendIdentity, &crate::config::BackendConfig)> {
    pool.backends.iter().map(move |b| (BackendIdentity::of(pool, b), b))
}

impl Lifecycle {
    /// Facts for the configuration a daemon starts with: every backend counts as long
    /// established, and healthy but for those in `down` (failing their checks when the
    /// previous daemon stopped), which stay out until their checks pass again.
    #[must_use]
    pub fn starting(config: &Config, now: Instant, down: &HashSet<BackendIdentity>) -> Self {
        let mut l = Self::default();
        for (identity, b) in backends(config) {
            if down.contains(&identity) {
                l.health.insert(
                    identity.clone(),
                    Health {
                        healthy: false,
                        last_error: Some(
                            "failing its checks when lbd last stopped; waiting for them to pass"
                                .to_owned(),
                        ),
                    },
                );
            }
            l.weights.insert(identity.clone(), *b.weight.get_ref());
            l.states.insert(identity, (b.state, now));
        }
        l.note_drain_deadlines(config);
        l
    }

    /// Records every pool's drain deadline (see `drain_secs`).
    fn note_drain_deadlines(&mut self, config: &Config) {
        for pool in &config.pools {
            self.drain_secs.insert(pool.name.get_ref().clone(), pool.drain_timeout_secs);
        }
    }

    /// Backends whose checks fail.
    pub fn unhealthy(&self) -> impl Iterator<Item = &BackendIdentity> {
        self.health.iter().filter(|(_, h)| !h.healthy).map(|(b, _)| b)
    }

    /// Takes in a new configuration: backends that are new, or that become active again,
    /// start their slow start now, and so do active ones given a weight again after 0
    /// (which, as draining, took no new flows); state changes restart their clocks; facts
    /// of removed backends are dropped.
    pub fn observe(&mut self, config: &Config, now: Instant) {
        self.note_drain_deadlines(config);
        let mut seen = HashSet::new();
        for (identity, b) in backends(config) {
            seen.insert(identity.clone());
            let weight = *b.weight.get_ref();
            if self.weights.insert(identity.clone(), weight) == Some(0)
                && weight > 0
                && b.state == BackendState::Active
            {
                self.came_in.insert(identity.clone(), now);
            }
            match self.states.get(&identity) {
                Some((state, _)) if *state == b.state => {}
                previous => {
                    if b.state == BackendState::Active {
                        self.came_in.insert(identity.clone(), now);
                    }
                    if previous.is_some() && b.state == BackendState::Active {
                        self.cut.remove(&identity);
                    }
                    self.states.insert(identity, (b.state, now));
                }
            }
        }
        self.states.retain(|k, _| seen.contains(k));
        self.weights.retain(|k, _| seen.contains(k));
        self.came_in.retain(|k, _| seen.contains(k));
        self.health.retain(|k, _| seen.contains(k));
        self.check_counts.retain(|k, _| seen.contains(k));
        self.cut.retain(|k| seen.contains(k));
    }

    /// Records a health-check result; returns whether the backend's health flipped.
    pub fn record(&mut self, report: &Report, now: Instant) -> bool {
        let h = self
            .health
            .entry(report.backend.clone())
            .or_insert(Health { healthy: true, last_error: None });
        h.healthy = report.healthy;
        h.last_error = report.result.as_ref().err().cloned();
        let counts = self.check_counts.entry(report.backend.clone()).or_default();
        counts.checks += 1;
        counts.failures += u64::from(h.last_error.is_some());
        let who = crate::health::describe(&report.backend);
        match report.flip {
            Some(Flip::Down) => {
                warn!(pool = %report.backend.pool, backend = %who, error = h.last_error.as_deref().unwrap_or(""), "backend is DOWN: its health checks fail");
                true
            }
            Some(Flip::Up) => {
                info!(pool = %report.backend.pool, backend = %who, "backend is UP again: its health checks pass");
                // Slow start again only for a backend that was out: one a pool in panic kept
                // serving goes on at the weight it had (ramping it from 1 would hand its
                // share to the few healthy ones as the pool leaves panic).
                if self.applied.get(&report.backend).is_none_or(|w| *w == 0) {
                    self.came_in.insert(report.backend.clone(), now);
                }
                true
            }
            None => false,
        }
    }

    /// Forgets the health of backends whose checks stopped (they count as healthy again),
    /// and of healthy backends whose checks restarted; a backend that is down stays down, for
    /// its new checks start from there (see `Checker::sync`). So does a down backend disabled
    /// in a pool that still checks (`checked_pools`): enabled again before it is mended, it
    /// must pass its checks before it takes flows. Their check counts stay.
    pub fn reset_health(
        &mut self,
        restarted: &[BackendIdentity],
        checked: &HashSet<BackendIdentity>,
        checked_pools: &HashSet<&str>,
    ) {
        for b in restarted {
            if self.is_healthy(b) {
                self.health.remove(b);
            }
        }
        let states = &self.states;
        let disabled = |k: &BackendIdentity| {
            states.get(k).is_some_and(|(state, _)| *state == BackendState::Disabled)
        };
        self.health.retain(|k, h| {
            checked.contains(k)
                || (!h.healthy && disabled(k) && checked_pools.contains(k.pool.as_str()))
        });
    }

    /// Whether a backend counts as healthy.
    #[must_use]
    pub fn is_healthy(&self, backend: &BackendIdentity) -> bool {
        self.health.get(backend).is_none_or(|h| h.healthy)
    }

    /// `config` with every backend's weight replaced by its effective weight, and the pools
    /// in panic.
    #[must_use]
    pub fn effective(&self, config: &Config, now: Instant) -> (Config, BTreeSet<String>) {
        let mut out = config.clone();
        let mut panicking = BTreeSet::new();
        for pool in &mut out.pools {
            let rules = PoolRules {
                slow_start_secs: pool.slow_start_secs,
                min_healthy_share: pool.min_healthy_share,
                fail_closed: pool.fail_closed,
            };
            let inputs: Vec<BackendInput> = pool_backends(pool)
                .map(|(identity, b)| BackendInput {
                    configured: *b.weight.get_ref(),
                    state: b.state,
                    healthy: self.is_healthy(&identity),
                    since_secs: self
                        .came_in
                        .get(&identity)
                        .map_or(f64::INFINITY, |t| now.saturating_duration_since(*t).as_secs_f64()),
                })
                .collect();
            let panic = in_panic(&inputs, &rules);
            if panic {
                panicking.insert(pool.name.get_ref().clone());
            }
            for (b, input) in pool.backends.iter_mut().zip(&inputs) {
                let weight = effective_weight(input, &rules, panic);
                b.weight = toml::Spanned::new(0..0, weight);
            }
        }
        (out, panicking)
    }

    /// Effective weights of an effective configuration.
    #[must_use]
    pub fn weights(effective: &Config) -> BTreeMap<BackendIdentity, u32> {
        backends(effective).map(|(k, b)| (k, *b.weight.get_ref())).collect()
    }

    /// Whether `effective` differs from what was last installed.
    #[must_use]
    pub fn changed(&self, effective: &Config) -> bool {
        Self::weights(effective) != self.applied
    }

    /// Records what was installed, and logs pools entering and leaving panic.
    pub fn installed(&mut self, effective: &Config, panicking: BTreeSet<String>) {
        self.applied = Self::weights(effective);
        for pool in panicking.difference(&self.panicking) {
            let (healthy, total) = self.pool_health(effective, pool);
            if effective.pool(pool).is_some_and(|p| p.fail_closed) {
                error!(pool = %pool, healthy, active = total, "pool in PANIC: too few healthy backends; fail_closed: sending to the healthy ones only");
            } else {
                error!(pool = %pool, healthy, active = total, "pool in PANIC: too few healthy backends; sending to all of them (set fail_closed to send to the healthy ones only)");
            }
        }
        for pool in self.panicking.difference(&panicking) {
            info!(pool = %pool, "pool out of panic");
        }
        self.panicking = panicking;
    }

    fn pool_health(&self, config: &Config, pool: &str) -> (usize, usize) {
        let active: Vec<_> = backends(config)
            .filter(|(k, b)| k.pool == pool && b.state == BackendState::Active)
            .map(|(k, _)| k)
            .collect();
        (active.iter().filter(|k| self.is_healthy(k)).count(), active.len())
    }

    /// Backends whose established flows must be cut now: disabled ones, and draining ones
    /// past their pool's `drain_timeout_secs`. Each is returned once.
    pub fn due_cuts(&mut self, config: &Config, now: Instant) -> Vec<BackendIdentity> {
        let mut due = Vec::new();
        for pool in &config.pools {
            let timeout = Duration::from_secs(pool.drain_timeout_secs);
            for (identity, _) in pool_backends(pool) {
                let Some((state, since)) = self.states.get(&identity) else { continue };
                let cut = match state {
                    BackendState::Active => false,
                    BackendState::Disabled => true,
                    BackendState::Draining => {
                        pool.drain_timeout_secs > 0
                            && now.saturating_duration_since(*since) >= timeout
                    }
                };
                if cut && self.cut.insert(identity.clone()) {
                    due.push(identity);
                }
            }
        }
        due
    }

    /// Backends whose established flows were cut (disabled, or drained past the deadline)
    /// and that stay so.
    pub fn cut_backends(&self) -> impl Iterator<Item = &BackendIdentity> {
        self.cut.iter()
    }

    /// Retired backend ids (removed, still carrying flows) past their pool's drain deadline.
    pub fn due_retired(
        &mut self,
        retired: &[(u32, BackendIdentity)],
        config: &Config,
        now: Instant,
    ) -> Vec<u32> {
        let ids: HashSet<u32> = retired.iter().map(|(id, _)| *id).collect();
        self.retired_since.retain(|id, _| ids.contains(id));
        // Removed pools' deadlines are kept while a backend of theirs is retired.
        self.drain_secs.retain(|pool, _| {
            config.pool(pool).is_some() || retired.iter().any(|(_, b)| b.pool == *pool)
        });
        let mut due = Vec::new();
        // A backend retires under its pool, whose deadline it drains by, also when a change
        // removed that pool (as last configured). One removed while lbd was down, carrying
        // no new flows then, retires under no pool (the adopted maps do not say which): it
        // drains by the longest timeout any pool has (0, never, being the longest), not for
        // ever.
        let longest = config
            .pools
            .iter()
            .map(|p| p.drain_timeout_secs)
            .max_by_key(|t| if *t == 0 { u64::MAX } else { *t })
            .unwrap_or(0);
        for (id, identity) in retired {
            let since = *self.retired_since.entry(*id).or_insert(now);
            let timeout = config
                .pool(&identity.pool)
                .map(|p| p.drain_timeout_secs)
                .or_else(|| self.drain_secs.get(&identity.pool).copied())
                .unwrap_or(longest);
            if timeout > 0 && now.saturating_duration_since(since) >= Duration::from_secs(timeout) {
                due.push(*id);
            }
        }
        due
    }

    /// How long the retired backend id `id` (removed, still carrying flows) has been so,
    /// as the drain deadline counts it (`None` before the first tick saw it).
    #[must_use]
    pub fn retired_age(&self, id: u32, now: Instant) -> Option<std::time::Duration> {
        self.retired_since.get(&id).map(|t| now.saturating_duration_since(*t))
    }

    /// The weight a backend got in the last install.
    #[must_use]
    pub fn applied_weight(&self, backend: &BackendIdentity) -> Option<u32> {
        self.applied.get(backend).copied()
    }

    /// A backend's state and how long it has been in it.
    #[must_use]
    pub fn state_age(
        &self,
        backend: &BackendIdentity,
        now: Instant,
    ) -> Option<(BackendState, Duration)> {
        self.states.get(backend).map(|(s, t)| (*s, now.saturating_duration_since(*t)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const RULES: PoolRules =
        PoolRules { slow_start_secs: 0, min_healthy_share: 0.5, fail_closed: false };

    fn b(healthy: bool) -> BackendInput {
        BackendInput { configured: 100, state: BackendState::Active, healthy, since_secs: 1000.0 }
    }

    #[test]
    fn unhealthy_draining_and_disabled_take_nothing() {
        assert_eq!(effective_weight(&b(true), &RULES, false), 100);
        assert_eq!(effective_weight(&b(false), &RULES, false), 0);
        let draining = BackendInput { state: BackendState::Draining, ..b(true) };
        assert_eq!(effective_weight(&draining, &RULES, false), 0);
        let disabled = BackendInput { state: BackendState::Disabled, ..b(true) };
        assert_eq!(effective_weight(&disabled, &RULES, true), 0);
    }

    #[test]
    fn panic_below_the_healthy_share_serves_everyone_unless_fail_closed() {
        let pool = [b(true), b(false), b(false)];
        assert!(in_panic(&pool, &RULES));
        assert_eq!(effective_weight(&pool[1], &RULES, true), 100);
        let closed = PoolRules { fail_closed: true, ..RULES };
        assert_eq!(effective_weight(&pool[1], &closed, true), 0);
        assert!(!in_panic(&[b(true), b(false)], &RULES), "half healthy is not below half");
        assert!(!in_panic(&[], &RULES));
    }

    const CONFIG: &str = r#"
[[interface]]
name = "eth0"
[[pool]]
name = "web"
slow_start_secs = 10
drain_timeout_secs = 30
[[pool.backend]]
address = "198.18.1.11"
[[pool.backend]]
address = "198.18.1.12"
[[service]]
name = "web"
address = "198.18.100.1"
protocol = "tcp"
port = 80
pool = "web"
mode = "dsr-l2"
"#;

    fn identity(last: u8) -> BackendIdentity {
        BackendIdentity {
            pool: "web".into(),
            addr: format!("198.18.1.{last}").parse().unwrap(),
            port: None,
        }
    }

    fn weights(l: &Lifecycle, config: &Config, now: Instant) -> Vec<u32> {
        Lifecycle::weights(&l.effective(config, now).0).into_values().collect()
    }

    #[test]
    fn backends_at_start_take_full_weight_and_new_ones_ramp() {
        let t0 = Instant::now();
        let config = Config::parse(CONFIG, "t").unwrap();
        let mut l = Lifecycle::starting(&config, t0, &HashSet::new());
        assert_eq!(weights(&l, &config, t0), [100, 100]);
        let added = Config::parse(
            &CONFIG
                .replace("[[service]]", "[[pool.backend]]\naddress = \"198.18.1.13\"\n[[service]]"),
            "t",
        )
        .unwrap();
        l.observe(&added, t0 + Duration::from_secs(1));
        assert_eq!(weights(&l, &added, t0 + Duration::from_secs(1)), [100, 100, 1]);
        assert_eq!(weights(&l, &added, t0 + Duration::from_secs(6)), [100, 100, 50]);
        assert_eq!(weights(&l, &added, t0 + Duration::from_secs(11)), [100, 100, 100]);
    }

    #[test]
    fn a_backend_given_a_weight_again_after_0_ramps() {
        // Weight 0 takes no new flows, as draining: back to 100, the backend starts slow,
        // not at full weight at once.
        let t0 = Instant::now();
        let config = Config::parse(CONFIG, "t").unwrap();
        let mut l = Lifecycle::starting(&config, t0, &HashSet::new());
        let weighted = |w: u32| {
            Config::parse(
                &CONFIG.replace(
                    "address = \"198.18.1.12\"\n",
                    &format!("address = \"198.18.1.12\"\nweight = {w}\n"),
                ),
                "t",
            )
            .unwrap()
        };
        l.observe(&weighted(0), t0 + Duration::from_secs(1));
        assert_eq!(weights(&l, &weighted(0), t0 + Duration::from_secs(1)), [100, 0]);
        l.observe(&weighted(100), t0 + Duration::from_secs(20));
        assert_eq!(weights(&l, &weighted(100), t0 + Duration::from_secs(20)), [100, 1]);
        assert_eq!(weights(&l, &weighted(100), t0 + Duration::from_secs(25)), [100, 50]);
        // Another weight (not from 0) takes effect at once.
        l.observe(&weighted(60), t0 + Duration::from_secs(40));
        assert_eq!(weights(&l, &weighted(60), t0 + Duration::from_secs(40)), [100, 60]);
    }

    #[test]
    fn a_recovered_backend_ramps_and_a_down_one_takes_nothing() {
        let t0 = Instant::now();
        let config = Config::parse(CONFIG, "t").unwrap();
        let mut l = Lifecycle::starting(&config, t0, &HashSet::new());
        let report = |healthy, flip| Report {
            backend: identity(12),
            task: 0,
            result: Ok(()),
            flip,
            healthy,
        };
        assert!(l.record(&report(false, Some(Flip::Down)), t0));
        // One of two down is not below half: no panic, the down one gets nothing.
        assert_eq!(weights(&l, &config, t0), [100, 0]);
        assert!(l.effective(&config, t0).1.is_empty());
        assert!(!l.record(&report(false, None), t0));
        assert!(l.record(&report(true, Some(Flip::Up)), t0 + Duration::from_secs(2)));
        assert_eq!(weights(&l, &config, t0 + Duration::from_secs(7)), [100, 50]);
    }

    #[test]
    fn check_counts_survive_restarted_and_stopped_checks_until_the_backend_goes() {
        let t0 = Instant::now();
        let config = Config::parse(CONFIG, "t").unwrap();
        let mut l = Lifecycle::starting(&config, t0, &HashSet::new());
        let report = |result: Result<(), String>| Report {
            backend: identity(11),
            task: 0,
            healthy: true,
            result,
            flip: None,
        };
        for _ in 0..4 {
            l.record(&report(Ok(())), t0);
        }
        l.record(&report(Err("refused".into())), t0);
        let five = CheckCounts { checks: 5, failures: 1 };
        assert_eq!(l.check_counts[&identity(11)], five);
        // Its checks restart (a pool's interval changed), then stop (disabled): counters
        // never go back.
        l.reset_health(&[identity(11)], &HashSet::from([identity(11)]), &HashSet::from(["web"]));
        l.reset_health(&[], &HashSet::new(), &HashSet::new());
        assert!(!l.health.contains_key(&identity(11)));
        assert_eq!(l.check_counts[&identity(11)], five);
        l.observe(&config, t0);
        assert_eq!(l.check_counts[&identity(11)], five);
        // Removed from the configuration: its series go with it.
        let without = Config::parse(&CONFIG.replace("198.18.1.11", "198.18.1.13"), "t").unwrap();
        l.observe(&without, t0);
        assert!(!l.check_counts.contains_key(&identity(11)));
    }

    #[test]
    fn a_backend_a_panicking_pool_kept_serving_does_not_ramp_again_when_it_recovers() {
        // Four backends, three down: the pool panics and serves all four. One recovers: the
        // pool leaves panic, and that backend keeps its full weight rather than ramping
        // from 1 (which would put nearly every new flow on the one that never failed).
        let config = Config::parse(
            &CONFIG
                .replace("slow_start_secs = 10", "slow_start_secs = 300\nmin_healthy_share = 0.5")
                .replace(
                    "[[service]]",
                    "[[pool.backend]]\naddress = \"198.18.1.13\"\n[[pool.backend]]\naddress = \"198.18.1.14\"\n[[service]]",
                ),
            "t",
        )
        .unwrap();
        let t0 = Instant::now();
        let mut l = Lifecycle::starting(&config, t0, &HashSet::new());
        let flip = |l: &mut Lifecycle, last: u8, healthy: bool, at: Instant| {
            let report = Report {
                backend: identity(last),
                task: 0,
                result: Ok(()),
                flip: Some(if healthy { Flip::Up } else { Flip::Down }),
                healthy,
            };
            assert!(l.record(&report, at));
            let (effective, panicking) = l.effective(&config, at);
            l.installed(&effective, panicking);
        };
        for last in [12, 13, 14] {
            flip(&mut l, last, false, t0);
        }
        assert_eq!(weights(&l, &config, t0), [100, 100, 100, 100], "panic");
        let later = t0 + Duration::from_secs(10);
        flip(&mut l, 13, true, later);
        assert!(l.panicking.is_empty());
        assert_eq!(weights(&l, &config, later), [100, 0, 100, 0]);
        // One that was out (fail_closed, or down outside panic) still ramps.
        flip(&mut l, 12, true, later);
        assert_eq!(weights(&l, &config, later + Duration::from_secs(150)), [100, 50, 100, 0]);
    }

    #[test]
    fn a_down_backend_disabled_then_enabled_starts_down() {
        let t0 = Instant::now();
        let config = Config::parse(CONFIG, "t").unwrap();
        let mut l = Lifecycle::starting(&config, t0, &HashSet::new());
        let down = Report {
            backend: identity(12),
            task: 0,
            result: Err("refused".into()),
            flip: Some(Flip::Down),
            healthy: false,
        };
        assert!(l.record(&down, t0));
        // Disabled: its checks stop, but its pool still checks; it stays known down.
        let disabled = Config::parse(
            &CONFIG.replace(
                "address = \"198.18.1.12\"",
                "address = \"198.18.1.12\"\nstate = \"disabled\"",
            ),
            "t",
        )
        .unwrap();
        l.observe(&disabled, t0);
        let pools = HashSet::from(["web"]);
        l.reset_health(&[], &HashSet::from([identity(11)]), &pools);
        assert_eq!(l.unhealthy().collect::<Vec<_>>(), [&identity(12)]);
        // Enabled again: its checks start down (the daemon passes `unhealthy()` on), and it
        // takes nothing until they pass.
        l.observe(&config, t0);
        assert_eq!(weights(&l, &config, t0), [100, 0]);
        // A pool that stops checking forgets it: nothing would ever bring it up.
        l.observe(&disabled, t0);
        l.reset_health(&[], &HashSet::new(), &HashSet::new());
        assert_eq!(l.unhealthy().count(), 0);
    }

    #[test]
    fn a_backend_down_before_a_restart_takes_nothing_until_it_recovers() {
        let t0 = Instant::now();
        let config = Config::parse(CONFIG, "t").unwrap();
        let down = HashSet::from([identity(12)]);
        let mut l = Lifecycle::starting(&config, t0, &down);
        assert_eq!(weights(&l, &config, t0), [100, 0]);
        assert_eq!(l.unhealthy().collect::<Vec<_>>(), [&identity(12)]);
        // Its checks start (failing): the health stays; another backend's start resets.
        l.reset_health(&[identity(11), identity(12)], &down, &HashSet::from(["web"]));
        assert_eq!(weights(&l, &config, t0), [100, 0]);
        let up = Report {
            backend: identity(12),
            task: 0,
            result: Ok(()),
            flip: Some(Flip::Up),
            healthy: true,
        };
        assert!(l.record(&up, t0 + Duration::from_secs(1)));
        assert_eq!(l.unhealthy().count(), 0);
        assert_eq!(weights(&l, &config, t0 + Duration::from_secs(6)), [100, 50], "slow start");
    }

    #[test]
    fn disabled_backends_are_cut_at_once_and_draining_ones_at_the_deadline() {
        let t0 = Instant::now();
        let config = Config::parse(CONFIG, "t").unwrap();
        let mut l = Lifecycle::starting(&config, t0, &HashSet::new());
        let set = |state: &str| {
            Config::parse(
                &CONFIG.replacen(
                    "address = \"198.18.1.12\"\n",
                    &format!("address = \"198.18.1.12\"\nstate = \"{state}\"\n"),
                    1,
                ),
                "t",
            )
            .unwrap()
        };
        let draining = set("draining");
        l.observe(&draining, t0 + Duration::from_secs(1));
        assert_eq!(weights(&l, &draining, t0 + Duration::from_secs(1)), [100, 0]);
        assert!(
            l.due_cuts(&draining, t0 + Duration::from_secs(30)).is_empty(),
            "29 s into a 30 s drain"
        );
        assert_eq!(l.due_cuts(&draining, t0 + Duration::from_secs(31)), [identity(12)]);
        assert!(l.due_cuts(&draining, t0 + Duration::from_secs(32)).is_empty(), "cut once");
        // Active again, then disabled: cut at once.
        l.observe(&config, t0 + Duration::from_secs(40));
        assert_eq!(
            weights(&l, &config, t0 + Duration::from_secs(40)),
            [100, 1],
            "slow start again"
        );
        let disabled = set("disabled");
        l.observe(&disabled, t0 + Duration::from_secs(50));
        assert_eq!(l.due_cuts(&disabled, t0 + Duration::from_secs(50)), [identity(12)]);
        // Removed backends: cut once their pool's deadline passes.
        let retired = [(7, identity(13))];
        assert!(l.due_retired(&retired, &config, t0).is_empty());
        assert!(l.due_retired(&retired, &config, t0 + Duration::from_secs(29)).is_empty());
        assert_eq!(l.due_retired(&retired, &config, t0 + Duration::from_secs(30)), [7]);
        // One whose pool is not known (removed while lbd was down, at weight 0): the longest
        // timeout of the configuration's pools, here the one pool's 30 s.
        let unknown = [(8, BackendIdentity { pool: String::new(), ..identity(14) })];
        assert!(l.due_retired(&unknown, &config, t0 + Duration::from_secs(40)).is_empty());
        assert_eq!(l.due_retired(&unknown, &config, t0 + Duration::from_secs(70)), [8]);
    }

    #[test]
    fn a_removed_pools_backends_drain_by_its_own_deadline() {
        // Pool "web" (30 s) removed with its backend while pool "other" drains never (0):
        // the backend still drains by web's 30 s, not by the longest remaining (never).
        let t0 = Instant::now();
        let config = Config::parse(
            "[[interface]]\nname = \"eth0\"\n[[pool]]\nname = \"web\"\ndrain_timeout_secs = 30\n[[pool.backend]]\naddress = \"198.18.1.13\"\n[[pool]]\nname = \"other\"\n[[pool.backend]]\naddress = \"198.18.1.14\"\n",
            "t",
        )
        .unwrap();
        let mut l = Lifecycle::starting(&config, t0, &HashSet::new());
        let without_web = Config::parse(
            "[[interface]]\nname = \"eth0\"\n[[pool]]\nname = \"other\"\n[[pool.backend]]\naddress = \"198.18.1.14\"\n",
            "t",
        )
        .unwrap();
        l.observe(&without_web, t0);
        let retired = [(7, identity(13))];
        assert!(l.due_retired(&retired, &without_web, t0).is_empty(), "first seen retired");
        assert!(l.due_retired(&retired, &without_web, t0 + Duration::from_secs(29)).is_empty());
        assert_eq!(l.due_retired(&retired, &without_web, t0 + Duration::from_secs(30)), [7]);
    }

    #[test]
    fn slow_start_ramps_linearly() {
        let rules = PoolRules { slow_start_secs: 10, ..RULES };
        let at =
            |secs| effective_weight(&BackendInput { since_secs: secs, ..b(true) }, &rules, false);
        assert_eq!(at(0.0), 1);
        assert_eq!(at(2.5), 25);
        assert_eq!(at(5.0), 50);
        assert_eq!(at(10.0), 100);
        assert_eq!(at(60.0), 100);
    }
}
