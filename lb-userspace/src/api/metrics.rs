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
use crate::{balancer::BackendIdentity, daemon::Daemon, maps::StatsSnapshot};

/// What one scrape reports, read under the daemon's lock.
#[derive(Debug, Default)]
pub struct Snapshot {
    stats: StatsSnapshot,
    /// (service, pool, counters)
    services: Vec<(String, String, TrafficCounter)>,
    /// (pool, backend "address[:port]", counters, weight, active flows)
    backends: Vec<(String, String, TrafficCounter, u32, u64)>,
    conntrack_entries: u64,
    conntrack_capacity: u32,
    /// (interface, mode)
    interfaces: Vec<(String, String)>,
}

impl Snapshot {
    /// Reads every counter the metrics report.
    pub fn take(d: &Daemon) -> Result<Self, crate::maps::MapError> {
        let mut s = Self {
            stats: d.datapath.stats().read()?,
            conntrack_entries: d.conntrack_live,
            conntrack_capacity: d.config.conntrack.max_entries,
            interfaces: d.attached.iter().map(|(i, m)| (i.clone(), m.name().to_owned())).collect(),
            ..Self::default()
        };
        for service in &d.config.services {
            let name = service.name.get_ref();
            if let Some(id) = d.balancer.service_id(name) {
                s.services.push((
                    name.clone(),
                    service.pool.get_ref().clone(),
                    d.datapath.maps().traffic.service(id)?,
                ));
            }
        }
        for pool in &d.config.pools {
            for b in &pool.backends {
                let identity = BackendIdentity {
                    pool: pool.name.get_ref().clone(),
                    addr: *b.address.get_ref(),
                    port: b.port(),
                };
                if let Some(id) = d.balancer.backend_id(&identity) {
                    let label = match b.port() {
                        Some(port) => std::net::SocketAddr::new(identity.addr, port).to_string(),
                        None => identity.addr.to_string(),
                    };
                    s.backends.push((
                        identity.pool.clone(),
                        label,
                        d.datapath.maps().traffic.backend(id)?,
                        *b.weight.get_ref(),
                        d.live_by_backend.get(&id).copied().unwrap_or(0),
                    ));
                }
            }
        }
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

        let backend_rows = |f: &dyn Fn(&TrafficCounter, u32, u64) -> u64| -> Vec<(Labels, u64)> {
            self.backends
                .iter()
                .map(|(pool, backend, c, w, live)| {
                    (vec![("pool", pool.clone()), ("backend", backend.clone())], f(c, *w, *live))
                })
                .collect()
        };
        counter(
            &mut e,
            "lb_backend_packets",
            "Packets forwarded to the backend.",
            &backend_rows(&|c, _, _| c.packets),
        )?;
        counter(
            &mut e,
            "lb_backend_bytes",
            "Bytes forwarded to the backend.",
            &backend_rows(&|c, _, _| c.bytes),
        )?;
        counter(
            &mut e,
            "lb_backend_new_flows",
            "Flows assigned to the backend.",
            &backend_rows(&|c, _, _| c.new_flows),
        )?;
        let to_gauge = |rows: Vec<(Labels, u64)>| -> Vec<(Labels, i64)> {
            rows.into_iter().map(|(l, v)| (l, clamp(v))).collect()
        };
        gauge(
            &mut e,
            "lb_backend_active_flows",
            "Live flows of the backend at the last connection-table sweep.",
            &to_gauge(backend_rows(&|_, _, live| live)),
        )?;
        gauge(
            &mut e,
            "lb_backend_weight",
            "Configured weight of the backend (0: no new flows).",
            &to_gauge(backend_rows(&|_, w, _| u64::from(w))),
        )?;

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

/// `GET /metrics`.
pub async fn scrape(axum::extract::State(state): State<AppState>) -> Result<Response, ApiError> {
    let snapshot = {
        let d = lock(&state)?;
        Snapshot::take(&d).map_err(|e| ApiError::Internal(e.to_string()))?
    };
    let mut registry = Registry::default();
    registry.register_collector(Box::new(snapshot));
    let mut body = String::new();
    prometheus_client::encoding::text::encode(&mut body, &registry)
        .map_err(|e| ApiError::Internal(e.to_string()))?;
    Ok((
        StatusCode::OK,
        [(header::CONTENT_TYPE, "application/openmetrics-text; version=1.0.0; charset=utf-8")],
        body,
    )
        .into_response())
}
