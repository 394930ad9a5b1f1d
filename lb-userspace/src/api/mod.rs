//! The REST API (`/v1`) and `/metrics`: read the running state, change pools and backends,
//! reload the configuration. JSON in and out; every request carries the bearer token when one
//! is configured.
//!
//! Changes are validated and applied as a whole new configuration, then written back to the
//! configuration file (so they survive a restart); a rejected change leaves everything as it
//! was.

pub mod metrics;
pub mod openapi;
pub mod tls;

use std::{net::IpAddr, sync::Arc};

use axum::{
    Json, Router,
    extract::{Path, Query, Request, State, rejection::PathRejection},
    http::{HeaderMap, StatusCode, header},
    middleware::{self, Next},
    response::{IntoResponse, Response},
    routing::{delete, get, post, put},
};
use serde::{Deserialize, Serialize};
use tracing::{error, info};

use crate::{
    balancer::ApplySummary,
    config::{BackendConfig, BackendState, Config, DEFAULT_WEIGHT, MAX_WEIGHT, port_words},
    daemon::{ChangeError, SharedDaemon},
};

/// State shared by the handlers.
#[derive(Clone, Debug)]
pub struct AppState {
    pub daemon: SharedDaemon,
    /// The bearer token; `None` when the API runs without one (loopback only).
    pub token: Option<Arc<str>>,
}

/// The API's routes.
pub fn router(state: AppState) -> Router {
    Router::new()
        .route("/v1/status", get(status))
        .route("/v1/services", get(services))
        .route("/v1/pools", get(pools))
        .route("/v1/pools/{pool}/backends", post(add_backend))
        .route("/v1/pools/{pool}/backends/{address}", delete(remove_backend))
        .route("/v1/pools/{pool}/backends/{address}/weight", put(set_weight))
        .route("/v1/pools/{pool}/backends/{address}/state", put(set_state))
        .route("/v1/firewall", get(firewall))
        .route("/v1/reload", post(reload))
        .route("/v1/openapi.json", get(openapi::document))
        .route("/metrics", get(metrics::scrape))
        .fallback(|| async { ApiError::NotFound("no such endpoint; see /v1/openapi.json".into()) })
        .method_not_allowed_fallback(|| async { ApiError::MethodNotAllowed })
        .layer(middleware::from_fn_with_state(state.clone(), authenticate))
        .with_state(state)
}

/// An API failure: 4xx with its text for what the caller can fix, 500 with a generic body
/// (the cause goes to the log) otherwise.
#[derive(Debug)]
pub enum ApiError {
    Unauthorized,
    BadRequest(String),
    NotFound(String),
    Conflict(String),
    MethodNotAllowed,
    Internal(String),
}

#[derive(Serialize)]
struct ErrorBody {
    error: String,
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let (status, message) = match self {
            Self::Unauthorized => {
                (StatusCode::UNAUTHORIZED, "missing or wrong bearer token".to_owned())
            }
            Self::BadRequest(m) => (StatusCode::BAD_REQUEST, m),
            Self::NotFound(m) => (StatusCode::NOT_FOUND, m),
            Self::Conflict(m) => (StatusCode::CONFLICT, m),
            Self::MethodNotAllowed => (
                StatusCode::METHOD_NOT_ALLOWED,
                "this endpoint does not take that method; see /v1/openapi.json".to_owned(),
            ),
            Self::Internal(m) => {
                error!(cause = %m, "API request failed");
                (
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "internal error; see the daemon's log".to_owned(),
                )
            }
        };
        let mut response = (status, Json(ErrorBody { error: message })).into_response();
        if status == StatusCode::UNAUTHORIZED {
            response
                .headers_mut()
                .insert(header::WWW_AUTHENTICATE, header::HeaderValue::from_static("Bearer"));
        }
        response
    }
}

impl From<ChangeError> for ApiError {
    fn from(e: ChangeError) -> Self {
        match e {
            ChangeError::Invalid(_) => Self::BadRequest(e.to_string()),
            ChangeError::NotFound(m) => Self::NotFound(m),
            ChangeError::Conflict(m) => Self::Conflict(m),
            ChangeError::Apply(_) | ChangeError::Persist(_) | ChangeError::Read(_) => {
                Self::Internal(e.to_string())
            }
        }
    }
}

async fn authenticate(
    State(state): State<AppState>,
    headers: HeaderMap,
    request: Request,
    next: Next,
) -> Response {
    if let Some(token) = &state.token {
        let given = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .unwrap_or("");
        if !constant_time_eq(given.as_bytes(), token.as_bytes()) {
            return ApiError::Unauthorized.into_response();
        }
    }
    next.run(request).await
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

fn lock(state: &AppState) -> std::sync::MutexGuard<'_, crate::daemon::Daemon> {
    crate::daemon::lock(&state.daemon)
}

/// `GET /v1/status`.
#[derive(Debug, Serialize, Deserialize)]
pub struct Status {
    pub version: String,
    pub interfaces: Vec<InterfaceStatus>,
    pub services: usize,
    pub pools: usize,
    pub backends: usize,
    pub conntrack_entries: u64,
    pub conntrack_capacity: u32,
    pub pinned: bool,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct InterfaceStatus {
    pub name: String,
    pub mode: String,
}

async fn status(_: NoQuery, State(state): State<AppState>) -> Result<Json<Status>, ApiError> {
    let d = lock(&state);
    Ok(Json(Status {
        version: env!("CARGO_PKG_VERSION").to_owned(),
        interfaces: d
            .attached
            .iter()
            .map(|(n, m)| InterfaceStatus { name: n.clone(), mode: m.name().to_owned() })
            .collect(),
        services: d.config.services.len(),
        pools: d.config.pools.len(),
        backends: d.config.pools.iter().map(|p| p.backends.len()).sum(),
        conntrack_entries: d.conntrack_live,
        conntrack_capacity: d.config.conntrack.max_entries,
        pinned: !d.config.daemon.pin_dir.is_empty(),
    }))
}

/// One service, as `GET /v1/services` lists it.
#[derive(Debug, Serialize, Deserialize)]
pub struct ServiceView {
    pub name: String,
    pub address: IpAddr,
    pub protocol: String,
    pub port: Option<u16>,
    pub pool: String,
    pub mode: String,
    pub packets: u64,
    pub bytes: u64,
    pub new_flows: u64,
}

async fn services(
    _: NoQuery,
    State(state): State<AppState>,
) -> Result<Json<Vec<ServiceView>>, ApiError> {
    let d = lock(&state);
    let mut out = Vec::new();
    let passthrough =
        crate::passthrough::Passthrough::needed(&d.config).then(|| d.passthrough.stats.snapshot());
    for s in &d.config.services {
        if let Some(p) = passthrough.as_ref().filter(|_| !s.in_data_path()) {
            // Served by lbd itself: connections relayed and bytes both ways (no packets).
            let name = s.name.get_ref();
            let routes = p.routes.iter().filter(|((service, _, _), _)| service == name);
            let (new_flows, bytes) = routes.fold((0, 0), |(n, b), (_, c)| {
                (n + c.connections, b + c.bytes_to_backend + c.bytes_to_client)
            });
            out.push(ServiceView {
                name: name.clone(),
                address: *s.address.get_ref(),
                protocol: s.protocol.name().to_owned(),
                port: s.port(),
                pool: s.pool.get_ref().clone(),
                mode: s.mode.name().into(),
                packets: 0,
                bytes,
                new_flows,
            });
            continue;
        }
        let counters = d
            .balancer
            .service_id(s.name.get_ref())
            .map(|id| d.datapath.maps().traffic.service(id))
            .transpose()
            .map_err(|e| ApiError::Internal(e.to_string()))?
            .unwrap_or_default();
        out.push(ServiceView {
            name: s.name.get_ref().clone(),
            address: *s.address.get_ref(),
            protocol: s.protocol.name().to_owned(),
            port: s.port(),
            pool: s.pool.get_ref().clone(),
            mode: s.mode.name().into(),
            packets: counters.packets,
            bytes: counters.bytes,
            new_flows: counters.new_flows,
        });
    }
    Ok(Json(out))
}

/// One pool and its backends, as `GET /v1/pools` lists them.
#[derive(Debug, Serialize, Deserialize)]
pub struct PoolView {
    pub name: String,
    /// Fewer than `min_healthy_share` of the active backends are healthy.
    pub panic: bool,
    pub backends: Vec<BackendView>,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct BackendView {
    pub address: IpAddr,
    pub port: Option<u16>,
    /// The configured weight.
    pub weight: u32,
    /// The weight installed: 0 when draining, disabled or down; lower during slow start.
    pub effective_weight: u32,
    pub state: BackendState,
    /// Seconds in that state.
    pub state_secs: u64,
    /// `None` when the pool has no health check, or the backend is disabled (not checked).
    pub healthy: Option<bool>,
    /// Why the last check failed, if it did.
    pub last_check_error: Option<String>,
    pub packets: u64,
    pub bytes: u64,
    pub new_flows: u64,
    pub active_flows: u64,
    /// Removed from the pool, its flows going on (`draining`, weights 0) until they end or
    /// the pool's drain deadline cuts them.
    #[serde(default)]
    pub removed: bool,
}

async fn pools(_: NoQuery, State(state): State<AppState>) -> Result<Json<Vec<PoolView>>, ApiError> {
    let d = lock(&state);
    let now = std::time::Instant::now();
    let mut out = Vec::new();
    for pool in &d.config.pools {
        let mut backends = Vec::new();
        for (identity, b) in crate::lifecycle::pool_backends(pool) {
            let id = d.balancer.backend_id(&identity);
            let counters = id
                .map(|id| d.datapath.maps().traffic.backend(id))
                .transpose()
                .map_err(|e| ApiError::Internal(e.to_string()))?
                .unwrap_or_default();
            let health = d.lifecycle.health.get(&identity);
            backends.push(BackendView {
                address: *b.address.get_ref(),
                port: b.port(),
                weight: *b.weight.get_ref(),
                effective_weight: d.lifecycle.applied_weight(&identity).unwrap_or(0),
                state: b.state,
                state_secs: d
                    .lifecycle
                    .state_age(&identity, now)
                    .map_or(0, |(_, age)| age.as_secs()),
                healthy: pool
                    .health_check
                    .as_ref()
                    .filter(|_| b.state != BackendState::Disabled)
                    .map(|_| health.is_none_or(|h| h.healthy)),
                last_check_error: health.and_then(|h| h.last_error.clone()),
                packets: counters.packets,
                bytes: counters.bytes,
                new_flows: counters.new_flows,
                active_flows: id.and_then(|id| d.live_by_backend.get(&id).copied()).unwrap_or(0),
                removed: false,
            });
        }
        // Backends removed from the pool whose flows go on (by the last sweep's count: one
        // removed without flows is gone from the list at once).
        let carrying = |id: u32| d.live_by_backend.get(&id).is_some_and(|n| *n > 0);
        let removed =
            d.balancer.retired().filter(|(id, i)| i.pool == *pool.name.get_ref() && carrying(*id));
        for (id, identity) in removed {
            if backends
                .iter()
                .any(|b: &BackendView| b.address == identity.addr && b.port == identity.port)
            {
                continue;
            }
            let counters = d
                .datapath
                .maps()
                .traffic
                .backend(id)
                .map_err(|e| ApiError::Internal(e.to_string()))?;
            backends.push(BackendView {
                address: identity.addr,
                port: identity.port,
                weight: 0,
                effective_weight: 0,
                state: BackendState::Draining,
                state_secs: d.lifecycle.retired_age(id, now).map_or(0, |age| age.as_secs()),
                healthy: None,
                last_check_error: None,
                packets: counters.packets,
                bytes: counters.bytes,
                new_flows: counters.new_flows,
                active_flows: d.live_by_backend.get(&id).copied().unwrap_or(0),
                removed: true,
            });
        }
        out.push(PoolView {
            name: pool.name.get_ref().clone(),
            panic: d.lifecycle.panicking.contains(pool.name.get_ref()),
            backends,
        });
    }
    Ok(Json(out))
}

/// `GET /v1/firewall`.
#[derive(Debug, Serialize, Deserialize)]
pub struct FirewallView {
    pub enabled: bool,
    pub default: String,
    pub audit: bool,
    /// Which of the two generations is active.
    pub generation: Option<u32>,
    pub rules: Vec<RuleView>,
    /// Packets no rule matched (the default policy applied).
    pub default_packets: u64,
    pub default_bytes: u64,
    /// Packets audit mode let through that a rule or the policy would have dropped.
    pub audit_would_drop: u64,
    pub source_prefixes: usize,
    pub destination_prefixes: usize,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct RuleView {
    pub name: String,
    pub action: String,
    pub packets: u64,
    pub bytes: u64,
}

async fn firewall(
    _: NoQuery,
    State(state): State<AppState>,
) -> Result<Json<FirewallView>, ApiError> {
    let d = lock(&state);
    Ok(Json(firewall_view(&d).map_err(|e| ApiError::Internal(e.to_string()))?))
}

/// The firewall's state and counters.
pub fn firewall_view(d: &crate::daemon::Daemon) -> Result<FirewallView, crate::maps::MapError> {
    use lb_common::firewall::{AUDIT_SLOT, DEFAULT_SLOT};
    let config = d.config.firewall.clone().unwrap_or_default();
    let generation = d.firewall.active_generation();
    let maps = &d.datapath.maps().firewall;
    let counter = |slot| match generation {
        Some(g) => maps.counter(g, slot),
        None => Ok(lb_common::Counter::default()),
    };
    let mut rules = Vec::new();
    for (i, rule) in config.rules.iter().enumerate() {
        let c = counter(u32::try_from(i).unwrap_or(0))?;
        rules.push(RuleView {
            name: rule.name.clone(),
            action: rule.action.name().to_owned(),
            packets: c.packets,
            bytes: c.bytes,
        });
    }
    let default = counter(DEFAULT_SLOT)?;
    let (sources, destinations) = d.firewall.prefix_counts();
    Ok(FirewallView {
        enabled: generation.is_some(),
        default: match config.default {
            crate::config::Policy::Allow => "allow".into(),
            crate::config::Policy::Deny => "deny".into(),
        },
        audit: config.audit,
        generation,
        rules,
        default_packets: default.packets,
        default_bytes: default.bytes,
        audit_would_drop: counter(AUDIT_SLOT)?.packets,
        source_prefixes: sources,
        destination_prefixes: destinations,
    })
}

/// Body of `POST /v1/pools/{pool}/backends`.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NewBackend {
    pub address: IpAddr,
    #[serde(default)]
    pub port: Option<u16>,
    #[serde(default)]
    pub weight: Option<u32>,
}

/// The query of an endpoint that takes none: anything there is refused (`400`), so that a
/// parameter the endpoint does not read (`POST /v1/pools/web/backends?port=8080`, whose port
/// belongs in the body) is not silently dropped.
#[derive(Debug)]
pub struct NoQuery;

impl<S: Send + Sync> axum::extract::FromRequestParts<S> for NoQuery {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut axum::http::request::Parts,
        _state: &S,
    ) -> Result<Self, ApiError> {
        match parts.uri.query() {
            None | Some("") => Ok(Self),
            Some(query) => Err(ApiError::BadRequest(format!(
                "{} takes no query parameters (got {query:?})",
                parts.uri.path()
            ))),
        }
    }
}

/// Which backend of a pool: its address in the path, and its port when several share it
/// (`port=0`: the one without a port of its own).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BackendSelector {
    #[serde(default)]
    pub port: Option<u16>,
}

impl BackendSelector {
    /// The selector's port as a log line says it.
    fn words(&self) -> String {
        match self.port {
            None => "any port".to_owned(),
            Some(0) => "without a port".to_owned(),
            Some(port) => format!("port {port}"),
        }
    }

    /// The index in `backends` of the backend at `addr` this names: without a port, the one
    /// backend at that address (several: refused, listing their ports).
    fn pick(
        &self,
        pool: &str,
        backends: &[BackendConfig],
        addr: IpAddr,
    ) -> Result<usize, ApiError> {
        let at: Vec<usize> =
            (0..backends.len()).filter(|i| *backends[*i].address.get_ref() == addr).collect();
        let ports = || {
            at.iter()
                .map(|i| backends[*i].port().map_or_else(|| "none".to_owned(), |p| p.to_string()))
                .collect::<Vec<_>>()
                .join(", ")
        };
        match self.port {
            None if at.len() > 1 => Err(ApiError::BadRequest(format!(
                "pool {pool:?} has {} backends at {addr} (ports: {}); name one with ?port=P (lbctl: --port P), port 0 for the one without a port",
                at.len(),
                ports()
            ))),
            None => at
                .first()
                .copied()
                .ok_or_else(|| ApiError::NotFound(format!("pool {pool:?} has no backend {addr}"))),
            Some(port) => {
                let wanted = (port != 0).then_some(port);
                at.iter().copied().find(|i| backends[*i].port() == wanted).ok_or_else(|| {
                    let which = if port == 0 {
                        "without a port".to_owned()
                    } else {
                        format!("port {port}")
                    };
                    ApiError::NotFound(format!("pool {pool:?} has no backend {addr} {which}"))
                })
            }
        }
    }
}

/// Body of `PUT /v1/pools/{pool}/backends/{address}/weight`.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Weight {
    pub weight: u32,
}

/// Body of `PUT /v1/pools/{pool}/backends/{address}/state`.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StateChange {
    pub state: BackendState,
}

/// What a change did.
#[derive(Debug, Serialize, Deserialize)]
pub struct ChangeResult {
    pub services_added: usize,
    pub services_updated: usize,
    pub services_removed: usize,
    pub tables_installed: usize,
    pub backends_added: usize,
    pub backends_retired: usize,
    /// Settings the reloaded file changes that lbd applies only when it restarts.
    #[serde(default)]
    pub pending_restart: Vec<String>,
}

impl From<ApplySummary> for ChangeResult {
    fn from(s: ApplySummary) -> Self {
        Self {
            services_added: s.services_added,
            services_updated: s.services_updated,
            services_removed: s.services_removed,
            tables_installed: s.tables_installed,
            backends_added: s.backends_added,
            backends_retired: s.backends_retired,
            pending_restart: s.pending_restart.iter().map(|s| (*s).to_owned()).collect(),
        }
    }
}

fn parse_addr(text: &str) -> Result<IpAddr, ApiError> {
    text.parse().map_err(|_| ApiError::BadRequest(format!("{text:?} is not an IP address")))
}

fn pool_mut<'a>(
    config: &'a mut Config,
    pool: &str,
) -> Result<&'a mut crate::config::PoolConfig, ApiError> {
    config
        .pools
        .iter_mut()
        .find(|p| p.name.get_ref() == pool)
        .ok_or_else(|| ApiError::NotFound(format!("no pool named {pool:?}")))
}

/// The path's segments, or a JSON `400` saying why they cannot be read (a percent-escape
/// that is not UTF-8), as every other error is answered.
fn segments<T>(path: Result<Path<T>, PathRejection>) -> Result<T, ApiError> {
    path.map(|Path(segments)| segments).map_err(|e| ApiError::BadRequest(e.body_text()))
}

/// Applies an edited copy of the configuration; logs what changed.
fn change(
    state: &AppState,
    what: &str,
    edit: impl FnOnce(&mut Config) -> Result<(), ApiError>,
) -> Result<Json<ChangeResult>, ApiError> {
    let mut d = lock(state);
    let mut new = d.config.clone();
    edit(&mut new)?;
    // Asked for what is already so (a backend's own state or weight again): nothing to
    // apply, and the file (the operator's, with its comments) is not rewritten.
    if matches!((new.to_toml(), d.config.to_toml()), (Ok(a), Ok(b)) if a == b) {
        info!(change = what, "configuration unchanged: already so");
        return Ok(Json(crate::balancer::ApplySummary::default().into()));
    }
    let summary = d.change(new)?;
    info!(change = what, ?summary, "configuration changed through the API");
    Ok(Json(summary.into()))
}

async fn add_backend(
    _: NoQuery,
    State(state): State<AppState>,
    pool: Result<Path<String>, PathRejection>,
    body: Result<Json<NewBackend>, axum::extract::rejection::JsonRejection>,
) -> Result<(StatusCode, Json<ChangeResult>), ApiError> {
    let pool = segments(pool)?;
    let Json(body) = body.map_err(|e| ApiError::BadRequest(e.body_text()))?;
    let weight = body.weight.unwrap_or(DEFAULT_WEIGHT);
    if weight > MAX_WEIGHT {
        return Err(ApiError::BadRequest(format!(
            "weight {weight} is above the maximum {MAX_WEIGHT}"
        )));
    }
    let what = format!("add backend {} ({}) to pool {pool}", body.address, port_words(body.port));
    let result = change(&state, &what, |config| {
        let p = pool_mut(config, &pool)?;
        if p.backends.iter().any(|b| *b.address.get_ref() == body.address && b.port() == body.port)
        {
            return Err(ApiError::Conflict(format!(
                "pool {pool:?} already has backend {} ({})",
                body.address,
                port_words(body.port)
            )));
        }
        p.backends.push(BackendConfig {
            address: toml::Spanned::new(0..0, body.address),
            port: body.port.map(|port| toml::Spanned::new(0..0, port)),
            weight: toml::Spanned::new(0..0, weight),
            state: BackendState::Active,
        });
        Ok(())
    })?;
    Ok((StatusCode::CREATED, result))
}

async fn remove_backend(
    State(state): State<AppState>,
    path: Result<Path<(String, String)>, PathRejection>,
    selector: Result<Query<BackendSelector>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<ChangeResult>, ApiError> {
    let (pool, address) = segments(path)?;
    let Query(selector) = selector.map_err(|e| ApiError::BadRequest(e.body_text()))?;
    let addr = parse_addr(&address)?;
    let what = format!("remove backend {addr} ({}) from pool {pool}", selector.words());
    change(&state, &what, |config| {
        let p = pool_mut(config, &pool)?;
        let index = selector.pick(&pool, &p.backends, addr)?;
        p.backends.remove(index);
        Ok(())
    })
}

async fn set_weight(
    State(state): State<AppState>,
    path: Result<Path<(String, String)>, PathRejection>,
    selector: Result<Query<BackendSelector>, axum::extract::rejection::QueryRejection>,
    body: Result<Json<Weight>, axum::extract::rejection::JsonRejection>,
) -> Result<Json<ChangeResult>, ApiError> {
    let (pool, address) = segments(path)?;
    let Query(selector) = selector.map_err(|e| ApiError::BadRequest(e.body_text()))?;
    let Json(body) = body.map_err(|e| ApiError::BadRequest(e.body_text()))?;
    let addr = parse_addr(&address)?;
    if body.weight > MAX_WEIGHT {
        return Err(ApiError::BadRequest(format!(
            "weight {} is above the maximum {MAX_WEIGHT}",
            body.weight
        )));
    }
    let what = format!("set weight of backend {addr} in pool {pool} to {}", body.weight);
    edit_backend(&state, &what, &pool, addr, &selector, |b| {
        b.weight = toml::Spanned::new(0..0, body.weight);
    })
}

async fn set_state(
    State(state): State<AppState>,
    path: Result<Path<(String, String)>, PathRejection>,
    selector: Result<Query<BackendSelector>, axum::extract::rejection::QueryRejection>,
    body: Result<Json<StateChange>, axum::extract::rejection::JsonRejection>,
) -> Result<Json<ChangeResult>, ApiError> {
    let (pool, address) = segments(path)?;
    let Query(selector) = selector.map_err(|e| ApiError::BadRequest(e.body_text()))?;
    let Json(body) = body.map_err(|e| ApiError::BadRequest(e.body_text()))?;
    let addr = parse_addr(&address)?;
    let what = format!("set backend {addr} in pool {pool} {}", body.state.name());
    edit_backend(&state, &what, &pool, addr, &selector, |b| b.state = body.state)
}

/// Applies `edit` to the backend of `pool` at `addr` that `selector` names.
fn edit_backend(
    state: &AppState,
    what: &str,
    pool: &str,
    addr: IpAddr,
    selector: &BackendSelector,
    edit: impl Fn(&mut BackendConfig),
) -> Result<Json<ChangeResult>, ApiError> {
    change(state, what, |config| {
        let p = pool_mut(config, pool)?;
        let index = selector.pick(pool, &p.backends, addr)?;
        edit(&mut p.backends[index]);
        Ok(())
    })
}

async fn reload(_: NoQuery, State(state): State<AppState>) -> Result<Json<ChangeResult>, ApiError> {
    let mut d = lock(&state);
    let summary = d.reload()?;
    info!(?summary, "configuration reloaded through the API");
    Ok(Json(summary.into()))
}

/// What `lbd` would refuse at start in the `[api]` files (the token file, the TLS
/// certificate and key), for `lbd check-config`: read as the start reads them.
#[must_use]
pub fn check_files(api: &crate::config::ApiConfig) -> Vec<String> {
    let mut problems = Vec::new();
    if let Some(path) = &api.token_file
        && let Err(error) = read_token(std::path::Path::new(path))
    {
        problems.push(format!("{error:#}"));
    }
    if let (Some(cert), Some(key)) = (&api.tls_cert_file, &api.tls_key_file)
        && let Err(error) =
            tls::server_config(std::path::Path::new(cert), std::path::Path::new(key))
    {
        problems.push(format!("{error:#}"));
    }
    problems
}

/// Reads the bearer token from `path`, refusing a file that group or others can read.
pub fn read_token(path: &std::path::Path) -> anyhow::Result<String> {
    use std::os::unix::fs::PermissionsExt as _;
    let meta = std::fs::metadata(path)
        .map_err(|e| anyhow::anyhow!("token file {}: {e}", path.display()))?;
    let mode = meta.permissions().mode();
    if mode & 0o077 != 0 {
        anyhow::bail!(
            "token file {} is readable by others (mode {:o}); run `chmod 600 {}`",
            path.display(),
            mode & 0o777,
            path.display()
        );
    }
    let token = std::fs::read_to_string(path)?.trim().to_owned();
    if token.len() < 16 {
        anyhow::bail!("token in {} is shorter than 16 characters", path.display());
    }
    Ok(token)
}
