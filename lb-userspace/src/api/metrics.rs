//! `/metrics` in the Prometheus (OpenMetrics) text format. Kernel counters are read at scrape
//! time into a snapshot, which a `prometheus_client` collector encodes.

use axum::{
    extract::State,
    http::{StatusCode, header},
    response::{IntoResponse, Response},
};
use lb_common::{Action, Reason, service::TrafficCounter};
use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeMetric},
    metrics::{counter::ConstCounter, gauge::ConstGauge},
    registry::Registry,
};

use super::{ApiError, AppState, lock};
use crate::{
    config::{BackendState, Signal},
    daemon::Daemon,
    maps::StatsSnapshot,
};

/// What one scrape reports, read under the daemon's lock.
#[derive(Debug, Default)]
pub struct Snapshot {
    stats: StatsSnapshot,
    /// (service, pool, counters)
    services: Vec<(String, String, TrafficCounter)>,
    backends: Vec<BackendRow>,
    /// (pool, in panic, signal values)
    pools: Vec<(String, bool, crate::autoscale::Signals)>,
    /// Autoscaling events fired, by (pool, policy).
    fired: Vec<((String, String), u64)>,
    /// Deliveries, by (pool, policy, target, result).
    deliveries: Vec<(Delivery, u64)>,
    firewall: Option<super::FirewallView>,
    /// (service, SYN counters, cookies on now) for services with `syn_cookies`.
    syn: Vec<(String, lb_common::service::SynCounter, bool)>,
    conntrack_entries: u64,
    conntrack_capacity: u32,
    /// (interface, mode)
    interfaces: Vec<(String, String)>,
    /// TLS passthrough, when any service uses it.
    passthrough: Option<crate::passthrough::stats::StatsSnapshot>,
}

type Delivery = (String, String, &'static str, &'static str);

/// One backend's row.
#[derive(Debug)]
struct BackendRow {
    pool: String,
    /// `address[:port]`
    label: String,
    counters: TrafficCounter,
    /// Configured and installed weights; `None` for a removed backend still carrying flows
    /// (no weight of its own: an alert on a pool's weights must not count it).
    weight: Option<u32>,
    effective_weight: Option<u32>,
    state: crate::config::BackendState,
    /// `None` when its pool has no health check, or the backend is disabled (not checked).
    healthy: Option<bool>,
    /// `None` when its pool has no health check.
    checks: Option<crate::lifecycle::CheckCounts>,
    live: u64,
}

impl Snapshot {
    /// Reads every counter the metrics report.
    pub fn take(d: &Daemon) -> Result<Self, crate::maps::MapError> {
        let mut s = Self {
            stats: d.datapath.stats().read()?,
            conntrack_entries: d.conntrack_live,
            conntrack_capacity: d.config.conntrack.max_entries,
            interfaces: d.attached.iter().map(|(i, m)| (i.clone(), m.name().to_owned())).collect(),
            // Once passthrough has started, its series stay (relays outlive their service).
            passthrough: d.passthrough.started().then(|| d.passthrough.stats.snapshot()),
            ..Self::default()
        };
        for service in &d.config.services {
            let name = service.name.get_ref();
            if let Some(id) = d.balancer.service_id(name)
                && !service.syn_cookies.is_off()
            {
                let syn = d.datapath.maps().traffic.syn(id)?;
                s.syn.push((name.clone(), syn, d.balancer.cookies_active(name)));
            }
            if let Some(id) = d.balancer.service_id(name) {
                s.services.push((
                    name.clone(),
                    service.pool.get_ref().clone(),
                    d.datapath.maps().traffic.service(id)?,
                ));
            }
        }
        for pool in &d.config.pools {
            for (identity, b) in crate::lifecycle::pool_backends(pool) {
                if let Some(id) = d.balancer.backend_id(&identity) {
                    let label = crate::health::describe(&identity);
                    // Checked pools' backends: their counts; their health while they are
                    // checked (not disabled).
                    let checks = pool.health_check.as_ref().map(|_| {
                        d.lifecycle.check_counts.get(&identity).copied().unwrap_or_default()
                    });
                    let healthy = checks
                        .filter(|_| b.state != BackendState::Disabled)
                        .map(|_| d.lifecycle.is_healthy(&identity));
                    s.backends.push(BackendRow {
                        pool: identity.pool.clone(),
                        label,
                        counters: d.datapath.maps().traffic.backend(id)?,
                        weight: Some(*b.weight.get_ref()),
                        effective_weight: Some(d.lifecycle.applied_weight(&identity).unwrap_or(0)),
                        state: b.state,
                        healthy,
                        checks,
                        live: d.live_by_backend.get(&id).copied().unwrap_or(0),
                    });
                }
            }
            let name = pool.name.get_ref();
            s.pools.push((
                name.clone(),
                d.lifecycle.panicking.contains(name),
                d.autoscale.signals.get(name).cloned().unwrap_or_default(),
            ));
        }
        // Backends removed from their pool whose flows go on (their ids retired until
        // the flows end or the pool's drain deadline cuts them): draining, as they are,
        // so their traffic and flows stay in view and their counters do not jump when
        // one is configured again and takes its id back.
        // One series per (pool, backend): a retired id whose identity another row already
        // has (a live backend adopted at a restart under a second id, or two ids retired
        // under no pool) is left out rather than reported twice.
        for (id, identity) in d.balancer.retired() {
            let label = crate::health::describe(identity);
            if s.backends.iter().any(|b| b.pool == identity.pool && b.label == label) {
                continue;
            }
            s.backends.push(BackendRow {
                pool: identity.pool.clone(),
                label,
                counters: d.datapath.maps().traffic.backend(id)?,
                weight: None,
                effective_weight: None,
                state: BackendState::Draining,
                healthy: None,
                checks: None,
                live: d.live_by_backend.get(&id).copied().unwrap_or(0),
            });
        }
        let counters =
            d.autoscale.counters.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        s.firewall = Some(super::firewall_view(d)?).filter(|f| f.enabled);
        s.fired = counters.fired.iter().map(|(k, v)| (k.clone(), *v)).collect();
        s.deliveries = counters.deliveries.iter().map(|(k, v)| (k.clone(), *v)).collect();
        Ok(s)
    }
}

type Labels = Vec<(&'static str, String)>;

fn counter(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    rows: &[(Labels, u64)],
) -> Result<(), std::fmt::Error> {
    let mut family =
        encoder.encode_descriptor(name, help, None, ConstCounter::new(0u64).metric_type())?;
    for (labels, value) in rows {
        ConstCounter::new(*value).encode(family.encode_family(labels)?)?;
    }
    Ok(())
}

fn gauge(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    rows: &[(Labels, i64)],
) -> Result<(), std::fmt::Error> {
    let mut family =
        encoder.encode_descriptor(name, help, None, ConstGauge::new(0i64).metric_type())?;
    for (labels, value) in rows {
        ConstGauge::new(*value).encode(family.encode_family(labels)?)?;
    }
    Ok(())
}

fn clamp(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

impl Collector for Snapshot {
    fn encode(&self, mut e: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let verdicts: Vec<(Labels, u64)> = Action::ALL
            .iter()
            .map(|a| (vec![("verdict", a.name().to_owned())], self.stats.action(*a).packets))
            .collect();
        counter(&mut e, "lb_packets", "Packets seen by the XDP program, by verdict.", &verdicts)?;
        let verdict_bytes: Vec<(Labels, u64)> = Action::ALL
            .iter()
            .map(|a| (vec![("verdict", a.name().to_owned())], self.stats.action(*a).bytes))
            .collect();
        counter(
            &mut e,
            "lb_bytes",
            "Bytes of the frames seen by the XDP program, by verdict.",
            &verdict_bytes,
        )?;
        let by_reason = |action: Action| -> Vec<(Labels, u64)> {
            Reason::ALL
                .iter()
                .filter(|r| r.action() == action)
                .map(|r| (vec![("reason", r.name().to_owned())], self.stats.reason(*r).packets))
                .collect()
        };
        counter(
            &mut e,
            "lb_dropped_packets",
            "Packets dropped by the data path, by reason.",
            &by_reason(Action::Drop),
        )?;
        counter(
            &mut e,
            "lb_passed_packets",
            "Packets passed to the kernel, by reason.",
            &by_reason(Action::Pass),
        )?;

        let service_rows = |f: fn(&TrafficCounter) -> u64| -> Vec<(Labels, u64)> {
            self.services
                .iter()
                .map(|(name, pool, c)| {
                    (vec![("service", name.clone()), ("pool", pool.clone())], f(c))
                })
                .collect()
        };
        counter(
            &mut e,
            "lb_service_packets",
            "Packets forwarded to the service's backends.",
            &service_rows(|c| c.packets),
        )?;
        counter(
            &mut e,
            "lb_service_bytes",
            "Bytes forwarded to the service's backends.",
            &service_rows(|c| c.bytes),
        )?;
        counter(
            &mut e,
            "lb_service_new_flows",
            "Flows (connections) the service opened.",
            &service_rows(|c| c.new_flows),
        )?;
        counter(
            &mut e,
            "lb_service_reply_packets",
            "Reply packets of NAT flows translated back to clients.",
            &service_rows(|c| c.reply_packets),
        )?;

        let backend_rows = |f: &dyn Fn(&BackendRow) -> Option<u64>| self.backend_rows(f);
        counter(
            &mut e,
            "lb_backend_packets",
            "Packets forwarded to the backend.",
            &backend_rows(&|b| Some(b.counters.packets)),
        )?;
        counter(
            &mut e,
            "lb_backend_bytes",
            "Bytes forwarded to the backend.",
            &backend_rows(&|b| Some(b.counters.bytes)),
        )?;
        counter(
            &mut e,
            "lb_backend_new_flows",
            "Flows assigned to the backend.",
            &backend_rows(&|b| Some(b.counters.new_flows)),
        )?;
        let to_gauge = |rows: Vec<(Labels, u64)>| -> Vec<(Labels, i64)> {
            rows.into_iter().map(|(l, v)| (l, clamp(v))).collect()
        };
        gauge(
            &mut e,
            "lb_backend_active_flows",
            "Live flows of the backend at the last connection-table sweep.",
            &to_gauge(backend_rows(&|b| Some(b.live))),
        )?;
        gauge(
            &mut e,
            "lb_backend_weight",
            "Configured weight of the backend.",
            &to_gauge(backend_rows(&|b| b.weight.map(u64::from))),
        )?;
        self.encode_lifecycle(&mut e)?;
        self.encode_firewall(&mut e)?;
        self.encode_syn(&mut e)?;
        self.encode_passthrough(&mut e)?;

        gauge(
            &mut e,
            "lb_conntrack_entries",
            "Live connection-table entries at the last sweep.",
            &[(vec![], clamp(self.conntrack_entries))],
        )?;
        gauge(
            &mut e,
            "lb_conntrack_capacity",
            "Connection-table size (entries).",
            &[(vec![], i64::from(self.conntrack_capacity))],
        )?;
        let attached: Vec<(Labels, i64)> = self
            .interfaces
            .iter()
            .map(|(i, m)| (vec![("interface", i.clone()), ("mode", m.clone())], 1))
            .collect();
        gauge(
            &mut e,
            "lb_xdp_attached",
            "Interfaces the data path is attached to, and how.",
            &attached,
        )?;
        gauge(
            &mut e,
            "lb_build_info",
            "The running lbd's version.",
            &[(vec![("version", env!("CARGO_PKG_VERSION").to_owned())], 1)],
        )?;
        Ok(())
    }
}

impl Snapshot {
    /// SYN and SYN-cookie counters of services that use cookies.
    /// TLS passthrough: per route, per rejection reason, and the time to a decision.
    fn encode_passthrough(&self, e: &mut DescriptorEncoder) -> Result<(), std::fmt::Error> {
        use crate::passthrough::stats::{DECISION_BUCKETS, RouteCounters};
        let Some(p) = &self.passthrough else { return Ok(()) };
        let route_labels = |(service, route, pool): &(String, String, String)| -> Labels {
            vec![("service", service.clone()), ("route", route.clone()), ("pool", pool.clone())]
        };
        let rows = |f: fn(&RouteCounters) -> u64| -> Vec<(Labels, u64)> {
            p.routes.iter().map(|(id, c)| (route_labels(id), f(c))).collect()
        };
        counter(
            e,
            "lb_passthrough_connections",
            "Connections relayed to a backend, by service and route (server-name pattern, or default).",
            &rows(|c| c.connections),
        )?;
        let mut bytes = Vec::new();
        for (id, c) in &p.routes {
            for (direction, value) in
                [("to_backend", c.bytes_to_backend), ("to_client", c.bytes_to_client)]
            {
                let mut labels = route_labels(id);
                labels.push(("direction", direction.to_owned()));
                bytes.push((labels, value));
            }
        }
        counter(
            e,
            "lb_passthrough_bytes",
            "Bytes relayed, by route and direction (relays report at least once a second).",
            &bytes,
        )?;
        let active: Vec<(Labels, i64)> =
            p.routes.iter().map(|(id, c)| (route_labels(id), clamp(c.active))).collect();
        gauge(e, "lb_passthrough_active_connections", "Relayed connections open now.", &active)?;
        // (service, reason) counters.
        let by_reason = |counts: &std::collections::BTreeMap<(String, &'static str), u64>| -> Vec<(Labels, u64)> {
            counts
                .iter()
                .map(|((service, reason), n)| {
                    (vec![("service", service.clone()), ("reason", (*reason).to_owned())], *n)
                })
                .collect()
        };
        counter(
            e,
            "lb_passthrough_rejected",
            "Connections closed before reaching a backend, by reason.",
            &by_reason(&p.rejected),
        )?;
        counter(
            e,
            "lb_passthrough_connect_failures",
            "Attempts to connect to a backend that failed, by reason (the connection then tries another backend, up to connect_attempts).",
            &by_reason(&p.connect_failures),
        )?;
        let pending: Vec<(Labels, i64)> = p
            .pending
            .iter()
            .map(|(service, n)| (vec![("service", service.clone())], clamp(*n)))
            .collect();
        gauge(
            e,
            "lb_passthrough_pending_handshakes",
            "Connections waiting for their ClientHello or for a backend to answer now.",
            &pending,
        )?;
        let relays: Vec<(Labels, u64)> =
            p.relays.iter().map(|(how, n)| (vec![("relay", (*how).to_owned())], *n)).collect();
        counter(
            e,
            "lb_passthrough_relays",
            "Relays finished, by how they moved bytes (sockmap: in the kernel; splice); relays ended by an error are not counted.",
            &relays,
        )?;
        let mut family = e.encode_descriptor(
            "lb_passthrough_decision_seconds",
            "Time from accepting a connection to routing it to a pool (reading the hello included; connecting to the backend not).",
            None,
            prometheus_client::metrics::MetricType::Histogram,
        )?;
        for (service, d) in &p.decisions {
            let buckets: Vec<(f64, u64)> = DECISION_BUCKETS
                .iter()
                .copied()
                .chain([f64::INFINITY])
                .zip(d.buckets.iter().copied())
                .collect();
            let labels: Labels = vec![("service", service.clone())];
            family
                .encode_family(&labels)?
                .encode_histogram::<prometheus_client::encoding::NoLabelSet>(
                    d.sum_seconds,
                    d.count,
                    &buckets,
                    None,
                )?;
        }
        Ok(())
    }

    fn encode_syn(&self, e: &mut DescriptorEncoder) -> Result<(), std::fmt::Error> {
        type Field = fn(&lb_common::service::SynCounter) -> u64;
        let families: [(&str, &str, Field); 4] = [
            (
                "lb_service_syns",
                "SYNs opening connections to the service, and segments that open a flow without one while cookies are off (the rate auto mode watches).",
                |c| c.syns,
            ),
            (
                "lb_service_syn_cookies_sent",
                "SYN-ACKs with a cookie sent from the data path.",
                |c| c.cookies_sent,
            ),
            (
                "lb_service_syn_cookies_valid",
                "ACKs whose cookie was valid: connections handed to a backend.",
                |c| c.cookies_valid,
            ),
            (
                "lb_service_syn_cookies_invalid",
                "Segments without a flow dropped while cookies are on: ACKs whose cookie was not valid, and segments neither SYN nor ACK.",
                |c| c.cookies_invalid,
            ),
        ];
        for (name, help, field) in families {
            let rows: Vec<(Labels, u64)> =
                self.syn.iter().map(|(s, c, _)| (vec![("service", s.clone())], field(c))).collect();
            counter(e, name, help, &rows)?;
        }
        let active: Vec<(Labels, i64)> = self
            .syn
            .iter()
            .map(|(s, _, on)| (vec![("service", s.clone())], i64::from(*on)))
            .collect();
        gauge(
            e,
            "lb_service_syn_cookies_active",
            "1 while the service answers SYNs with cookies.",
            &active,
        )
    }

    /// Rule hits, default-policy and audit counters, prefixes loaded.
    fn encode_firewall(&self, e: &mut DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let Some(fw) = &self.firewall else { return Ok(()) };
        let rows = |f: fn(&super::RuleView) -> u64| -> Vec<(Labels, u64)> {
            fw.rules
                .iter()
                .map(|r| (vec![("rule", r.name.clone()), ("action", r.action.clone())], f(r)))
                .collect()
        };
        counter(
            e,
            "lb_firewall_rule_packets",
            "Packets the firewall rule matched.",
            &rows(|r| r.packets),
        )?;
        counter(
            e,
            "lb_firewall_rule_bytes",
            "Bytes of the packets the firewall rule matched.",
            &rows(|r| r.bytes),
        )?;
        let policy = vec![("policy", fw.default.clone())];
        counter(
            e,
            "lb_firewall_default_packets",
            "Packets no firewall rule matched (the default policy applied).",
            &[(policy, fw.default_packets)],
        )?;
        counter(
            e,
            "lb_firewall_audit_would_drop_packets",
            "Packets audit mode let through that a rule or the policy would have dropped.",
            &[(vec![], fw.audit_would_drop)],
        )?;
        let prefixes = [("source", fw.source_prefixes), ("destination", fw.destination_prefixes)]
            .map(|(d, n)| (vec![("direction", d.to_owned())], clamp(n as u64)));
        gauge(e, "lb_firewall_prefixes", "Prefixes in the firewall's active tries.", &prefixes)?;
        Ok(())
    }

    /// One row per backend for which `f` has a value, labelled with pool and backend.
    fn backend_rows(&self, f: &dyn Fn(&BackendRow) -> Option<u64>) -> Vec<(Labels, u64)> {
        self.backends
            .iter()
            .filter_map(|b| {
                Some((vec![("pool", b.pool.clone()), ("backend", b.label.clone())], f(b)?))
            })
            .collect()
    }

    /// Backend states, health, panic, autoscaling signals and hook deliveries.
    fn encode_lifecycle(&self, e: &mut DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let backend_rows = |f: &dyn Fn(&BackendRow) -> Option<u64>| self.backend_rows(f);
        let to_gauge = |rows: Vec<(Labels, u64)>| -> Vec<(Labels, i64)> {
            rows.into_iter().map(|(l, v)| (l, clamp(v))).collect()
        };
        gauge(
            e,
            "lb_backend_effective_weight",
            "Weight installed in the Maglev tables: 0 when draining, disabled or down, lower during slow start.",
            &to_gauge(backend_rows(&|b| b.effective_weight.map(u64::from))),
        )?;
        let states: Vec<(Labels, i64)> = self
            .backends
            .iter()
            .flat_map(|b| {
                [BackendState::Active, BackendState::Draining, BackendState::Disabled].map(|s| {
                    let labels = vec![
                        ("pool", b.pool.clone()),
                        ("backend", b.label.clone()),
                        ("state", s.name().to_owned()),
                    ];
                    (labels, i64::from(b.state == s))
                })
            })
            .collect();
        gauge(e, "lb_backend_state", "1 for the backend's administrative state.", &states)?;
        gauge(
            e,
            "lb_backend_healthy",
            "1 if the backend passes its health checks (backends of checked pools, but disabled ones, which are not checked).",
            &to_gauge(backend_rows(&|b| b.healthy.map(u64::from))),
        )?;
        counter(
            e,
            "lb_health_checks",
            "Health checks run against the backend.",
            &backend_rows(&|b| b.checks.map(|c| c.checks)),
        )?;
        counter(
            e,
            "lb_health_check_failures",
            "Health checks of the backend that failed.",
            &backend_rows(&|b| b.checks.map(|c| c.failures)),
        )?;
        let panics: Vec<(Labels, i64)> = self
            .pools
            .iter()
            .map(|(p, panic, _)| (vec![("pool", p.clone())], i64::from(*panic)))
            .collect();
        gauge(
            e,
            "lb_pool_panic",
            "1 while fewer than the pool's min_healthy_share of its backends are healthy (it then sends to all of them, or to the healthy ones only if fail_closed).",
            &panics,
        )?;
        {
            let mut signals = e.encode_descriptor(
                "lb_pool_signal",
                "The autoscaling signals of the pool at the last evaluation.",
                None,
                ConstGauge::new(0f64).metric_type(),
            )?;
            for (pool, _, values) in &self.pools {
                for signal in [
                    Signal::NewFlowsPerSecond,
                    Signal::ActiveFlowsPerBackend,
                    Signal::BytesPerSecond,
                    Signal::HealthyBackends,
                ] {
                    let labels = [("pool", pool.clone()), ("signal", signal.name().to_owned())];
                    ConstGauge::new(values.get(signal)).encode(signals.encode_family(&labels)?)?;
                }
            }
        }
        let fired: Vec<(Labels, u64)> = self
            .fired
            .iter()
            .map(|((pool, policy), n)| {
                (vec![("pool", pool.clone()), ("policy", policy.clone())], *n)
            })
            .collect();
        counter(e, "lb_autoscale_events", "Autoscaling policies that fired.", &fired)?;
        let deliveries: Vec<(Labels, u64)> = self
            .deliveries
            .iter()
            .map(|((pool, policy, target, result), n)| {
                let labels = vec![
                    ("pool", pool.clone()),
                    ("policy", policy.clone()),
                    ("target", (*target).to_owned()),
                    ("result", (*result).to_owned()),
                ];
                (labels, *n)
            })
            .collect();
        counter(
            e,
            "lb_autoscale_deliveries",
            "Autoscaling events delivered to webhooks and commands (after retries), by result.",
            &deliveries,
        )?;
        Ok(())
    }
}

/// The exposition formats `/metrics` speaks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Format {
    /// OpenMetrics 1.0, for clients that ask for it (Prometheus does).
    OpenMetrics,
    /// The Prometheus text format 0.0.4, for every other client (`curl`, `promtool check
    /// metrics`, older agents): OpenMetrics' counters would read as untyped there.
    Text,
}

const OPENMETRICS_CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// The format for a request's `Accept` header: OpenMetrics if it names
/// `application/openmetrics-text` with a non-zero quality, else the text format (as
/// Prometheus' own client libraries choose).
fn negotiate(accept: Option<&str>) -> Format {
    let wants_openmetrics = accept.is_some_and(|accept| {
        accept.split(',').any(|range| {
            let mut parts = range.split(';').map(str::trim);
            let media = parts.next().unwrap_or("");
            let quality = parts
                .filter_map(|p| p.strip_prefix("q="))
                .find_map(|q| q.parse::<f32>().ok())
                .unwrap_or(1.0);
            media.eq_ignore_ascii_case("application/openmetrics-text") && quality > 0.0
        })
    });
    if wants_openmetrics { Format::OpenMetrics } else { Format::Text }
}

/// `GET /metrics`.
pub async fn scrape(
    axum::extract::State(state): State<AppState>,
    headers: axum::http::HeaderMap,
) -> Result<Response, ApiError> {
    let snapshot = {
        let d = lock(&state);
        Snapshot::take(&d).map_err(|e| ApiError::Internal(e.to_string()))?
    };
    let mut registry = Registry::default();
    registry.register_collector(Box::new(snapshot));
    let mut body = String::new();
    let accept = headers.get(header::ACCEPT).and_then(|v| v.to_str().ok());
    let content_type = match negotiate(accept) {
        Format::OpenMetrics => {
            prometheus_client::encoding::text::encode(&mut body, &registry)
                .map_err(|e| ApiError::Internal(e.to_string()))?;
            OPENMETRICS_CONTENT_TYPE
        }
        Format::Text => {
            prometheus_client::encoding::prometheus_text::encode(&mut body, &registry)
                .map_err(|e| ApiError::Internal(e.to_string()))?;
            prometheus_client::encoding::prometheus_text::CONTENT_TYPE
        }
    };
    Ok((StatusCode::OK, [(header::CONTENT_TYPE, content_type)], body).into_response())
}

#[cfg(test)]
mod tests {
    use super::{Format, negotiate};

    #[test]
    fn openmetrics_only_for_clients_that_ask_for_it() {
        // What Prometheus 2.x and 3.x send.
        let prometheus = "application/openmetrics-text;version=1.0.0,application/openmetrics-text;version=0.0.1;q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1";
        assert_eq!(negotiate(Some(prometheus)), Format::OpenMetrics);
        assert_eq!(
            negotiate(Some("text/plain, Application/OpenMetrics-Text; q=0.3")),
            Format::OpenMetrics
        );
        // curl, promtool, a browser, no header, or OpenMetrics refused.
        assert_eq!(negotiate(Some("*/*")), Format::Text);
        assert_eq!(negotiate(Some("text/plain;version=0.0.4")), Format::Text);
        assert_eq!(negotiate(None), Format::Text);
        assert_eq!(negotiate(Some("application/openmetrics-text;q=0, text/plain")), Format::Text);
    }
}
