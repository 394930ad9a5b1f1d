//! Counters of the TLS-passthrough services, kept by the connection tasks and read by
//! `/metrics` (`lb_passthrough_*`).

use std::{
    collections::BTreeMap,
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
    inner: Mutex<StatsSnapshot>,
}

impl Stats {
    fn with<T>(&self, f: impl FnOnce(&mut StatsSnapshot) -> T) -> T {
        f(&mut self.inner.lock().unwrap_or_else(PoisonError::into_inner))
    }

    /// A copy of every counter.
    #[must_use]
    pub fn snapshot(&self) -> StatsSnapshot {
        self.with(|s| s.clone())
    }

    /// Makes a route's counters exist (at zero) before its first connection.
    pub fn declare(&self, route: &RouteId) {
        self.with(|s| {
            s.routes.entry(route.clone()).or_default();
        });
    }

    pub fn reject(&self, service: &str, reason: &'static str) {
        self.with(|s| *s.rejected.entry((service.to_owned(), reason)).or_default() += 1);
    }

    pub fn connect_failed(&self, service: &str, reason: &'static str) {
        self.with(|s| *s.connect_failures.entry((service.to_owned(), reason)).or_default() += 1);
    }

    pub fn pending(&self, service: &str, delta: i64) {
        self.with(|s| {
            let n = s.pending.entry(service.to_owned()).or_default();
            *n = n.saturating_add_signed(delta);
        });
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
        self.with(|s| {
            if let Some(how) = how {
                *s.relays.entry(how).or_default() += 1;
            }
            let c = s.routes.entry(route.clone()).or_default();
            c.active = c.active.saturating_sub(1);
        });
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
}
