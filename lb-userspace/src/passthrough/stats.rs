//! Counters of the TLS-passthrough services, kept by the connection tasks and read by
//! `/metrics` (`lb_passthrough_*`).

use std::{
    collections::{BTreeMap, BTreeSet},
    sync::{Mutex, PoisonError},
    time::Duration,
};

/// Upper bounds (seconds) of the accept-to-decision histogram: a hello in one segment takes
/// well under a millisecond; slow clients fill the upper buckets.
pub const DECISION_BUCKETS: [f64; 12] =
    [0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0];

/// (service, route label, pool)
pub type RouteId = (String, String, String);

/// Counters of one route.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RouteCounters {
    /// Connections relayed to a backend.
    pub connections: u64,
    /// Relayed connections open now.
    pub active: u64,
    /// Bytes from clients to backends, and back.
    pub bytes_to_backend: u64,
    pub bytes_to_client: u64,
}

/// The accept-to-decision times of one service: per-bucket counts (not cumulative), then
/// the overflow bucket.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Decisions {
    pub buckets: [u64; DECISION_BUCKETS.len() + 1],
    pub sum_seconds: f64,
    pub count: u64,
}

/// Everything counted, as read at one scrape.
#[derive(Clone, Debug, Default)]
pub struct StatsSnapshot {
    pub routes: BTreeMap<RouteId, RouteCounters>,
    /// (service, reason) to connections closed without reaching a backend.
    pub rejected: BTreeMap<(String, &'static str), u64>,
    /// (service, reason) to attempts to connect to a backend that failed (`connect_failed`,
    /// `connect_timeout`); the connection may have gone on to another backend.
    pub connect_failures: BTreeMap<(String, &'static str), u64>,
    pub decisions: BTreeMap<String, Decisions>,
    /// Connections waiting for their hello now, by service.
    pub pending: BTreeMap<String, u64>,
    /// Relays finished, by how they moved the bytes (`sockmap`, `splice`).
    pub relays: BTreeMap<&'static str, u64>,
}

/// Shared by every connection task; each update holds the lock for a few map operations.
#[derive(Debug, Default)]
pub struct Stats {
    inner: Mutex<Inner>,
}

#[derive(Debug, Default)]
struct Inner {
    counters: StatsSnapshot,
    /// The routes the configuration has now (see [`Stats::declare`]).
    declared: BTreeSet<RouteId>,
}

impl Inner {
    /// Drops the counters of routes the configuration no longer has once none of their
    /// relays is open, and those of services it no longer has once none of their
    /// connections is pending: a reload that renames routes or removes services does not
    /// leave their series behind for the life of the process.
    fn prune(&mut self) {
        let Self { counters: c, declared } = self;
        c.routes.retain(|route, n| n.active > 0 || declared.contains(route));
        let services: BTreeSet<&String> = declared.iter().map(|(service, _, _)| service).collect();
        let pending = &c.pending;
        let keep = |service: &String| {
            services.contains(service) || pending.get(service).is_some_and(|n| *n > 0)
        };
        c.rejected.retain(|(service, _), _| keep(service));
        c.connect_failures.retain(|(service, _), _| keep(service));
        c.decisions.retain(|service, _| keep(service));
        c.pending.retain(|service, n| *n > 0 || services.contains(service));
    }
}

impl Stats {
    fn with<T>(&self, f: impl FnOnce(&mut StatsSnapshot) -> T) -> T {
        f(&mut self.inner.lock().unwrap_or_else(PoisonError::into_inner).counters)
    }

    /// A copy of every counter.
    #[must_use]
    pub fn snapshot(&self) -> StatsSnapshot {
        self.with(|s| s.clone())
    }

    /// Sets the routes the configuration has (their counters exist, at zero, before their
    /// first connection) and drops those of routes and services it no longer has, as soon
    /// as nothing of theirs is open.
    pub fn declare(&self, routes: impl IntoIterator<Item = RouteId>) {
        let mut inner = self.inner.lock().unwrap_or_else(PoisonError::into_inner);
        inner.declared = routes.into_iter().collect();
        let Inner { counters, declared } = &mut *inner;
        for route in declared.iter() {
            counters.routes.entry(route.clone()).or_default();
        }
        inner.prune();
    }

    pub fn reject(&self, service: &str, reason: &'static str) {
        self.with(|s| *s.rejected.entry((service.to_owned(), reason)).or_default() += 1);
    }

    pub fn connect_failed(&self, service: &str, reason: &'static str) {
        self.with(|s| *s.connect_failures.entry((service.to_owned(), reason)).or_default() += 1);
    }

    pub fn pending(&self, service: &str, delta: i64) {
        let mut inner = self.inner.lock().unwrap_or_else(PoisonError::into_inner);
        let n = inner.counters.pending.entry(service.to_owned()).or_default();
        *n = n.saturating_add_signed(delta);
        if *n == 0 {
            inner.prune();
        }
    }

    pub fn decided(&self, service: &str, elapsed: Duration) {
        let seconds = elapsed.as_secs_f64();
        let bucket =
            DECISION_BUCKETS.iter().position(|b| seconds <= *b).unwrap_or(DECISION_BUCKETS.len());
        self.with(|s| {
            let d = s.decisions.entry(service.to_owned()).or_default();
            d.buckets[bucket] += 1;
            d.sum_seconds += seconds;
            d.count += 1;
        });
    }

    /// A connection of `route` reached its backend.
    pub fn opened(&self, route: &RouteId) {
        self.with(|s| {
            let c = s.routes.entry(route.clone()).or_default();
            c.connections += 1;
            c.active += 1;
        });
    }

    /// Bytes relayed on `route` since the last call.
    pub fn relayed(&self, route: &RouteId, to_backend: u64, to_client: u64) {
        if to_backend == 0 && to_client == 0 {
            return;
        }
        self.with(|s| {
            let c = s.routes.entry(route.clone()).or_default();
            c.bytes_to_backend += to_backend;
            c.bytes_to_client += to_client;
        });
    }

    /// A relay of `route` ended; `how` moved its bytes (`None`: it failed).
    pub fn closed(&self, route: &RouteId, how: Option<&'static str>) {
        let mut inner = self.inner.lock().unwrap_or_else(PoisonError::into_inner);
        let s = &mut inner.counters;
        if let Some(how) = how {
            *s.relays.entry(how).or_default() += 1;
        }
        let c = s.routes.entry(route.clone()).or_default();
        c.active = c.active.saturating_sub(1);
        if c.active == 0 {
            inner.prune();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decisions_fall_in_their_buckets() {
        let stats = Stats::default();
        stats.decided("s", Duration::from_micros(100));
        stats.decided("s", Duration::from_millis(3));
        stats.decided("s", Duration::from_secs(30));
        let d = stats.snapshot().decisions["s"].clone();
        assert_eq!(d.count, 3);
        assert_eq!(d.buckets[0], 1);
        assert_eq!(d.buckets[3], 1);
        assert_eq!(d.buckets[DECISION_BUCKETS.len()], 1);
    }

    #[test]
    fn routes_and_services_the_configuration_dropped_go_once_idle() {
        let route =
            |service: &str, label: &str| (service.to_owned(), label.to_owned(), "p".to_owned());
        let stats = Stats::default();
        stats.declare([route("s", "a.example"), route("s", "b.example"), route("t", "*")]);
        stats.opened(&route("s", "a.example"));
        stats.pending("t", 1);
        stats.reject("t", "unknown_sni");
        stats.pending("t", 1);
        // A reload drops route a.example (one relay open) and service t (one connection
        // reading its hello): their series stay while those last.
        stats.declare([route("s", "b.example")]);
        let s = stats.snapshot();
        assert_eq!(s.routes.len(), 2, "{:?}", s.routes);
        assert!(s.rejected.contains_key(&("t".to_owned(), "unknown_sni")));
        stats.closed(&route("s", "a.example"), Some("splice"));
        // As a connection task ends: its refusal counted, then no longer pending.
        stats.pending("t", -1);
        stats.reject("t", "unknown_sni");
        stats.pending("t", -1);
        let s = stats.snapshot();
        assert_eq!(s.routes.keys().collect::<Vec<_>>(), [&route("s", "b.example")]);
        assert!(s.rejected.is_empty() && s.pending.is_empty(), "{s:?}");
        assert_eq!(s.relays["splice"], 1, "totals by relay kind stay");
    }
}
