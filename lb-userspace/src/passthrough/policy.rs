//! A passthrough service's routing policy, compiled from its configuration: which pool a
//! server name goes to, and the pools' Maglev tables under the current (effective) weights.

use std::{collections::HashMap, net::SocketAddr, time::Duration};

use super::routes::{Routes, matches_any};
use crate::{
    Balancer, Config,
    balancer::PoolTable,
    config::{RelayMode, ServiceConfig, SniFallback, TlsPassthroughConfig},
};

/// Where a connection goes, by its server name.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Route {
    /// The route's label in metrics: its `server_name` pattern, or `default`.
    pub label: String,
    pub pool: String,
}

/// Why a connection was closed before reaching a backend (the `reason` label of
/// `lb_passthrough_rejected_total`).
pub type RejectReason = &'static str;

/// One passthrough service's policy, swapped whole when the configuration or the weights
/// change; a connection keeps the snapshot it started with.
#[derive(Debug)]
pub struct Policy {
    pub service: String,
    /// The service's address and port (what clients connect to).
    pub address: SocketAddr,
    routes: Routes<String>,
    /// The routes' labels (their patterns as `routes` normalised them) and pools, in the
    /// configuration's order.
    labels: Vec<Route>,
    default_pool: String,
    tls: TlsPassthroughConfig,
    tables: HashMap<String, PoolTable>,
}

impl Policy {
    /// The policy of `service` (a validated `tls-passthrough` service of `config`), with
    /// tables from `balancer` under `effective` weights.
    #[must_use]
    pub fn compile(service: &ServiceConfig, effective: &Config, balancer: &Balancer) -> Self {
        let tls = service.tls.clone().unwrap_or_default();
        let mut routes = Routes::new();
        let mut labels = Vec::new();
        for route in &tls.routes {
            let pool = route.pool.get_ref();
            // Validated (`Config::check`): patterns are well formed and unique as `Routes`
            // judges them, so this cannot fail for a checked configuration.
            match routes.insert(route.server_name.get_ref(), pool.clone()) {
                // Labelled as the table normalised the pattern (lowercase, no final dot),
                // which is the text `route` reports: a route's series is declared under the
                // label its connections are counted under, however the pattern is written.
                Ok(label) => labels.push(Route { label, pool: pool.clone() }),
                Err(error) => {
                    tracing::error!(service = %service.name.get_ref(), %error, "server_name route not installed");
                }
            }
        }
        let default_pool = service.pool.get_ref().clone();
        // The service's own table size applies to its pool; routed pools are sized for
        // themselves.
        let own_size = service.table_size.as_ref().map(|s| *s.get_ref());
        // Every table hashes as the service says (`hash = "source"`: a client keeps its
        // backend across connections, as through the data path's services).
        let table =
            |pool: &str, size| balancer.pool_table(pool, effective, size).hashing(service.hash);
        let mut tables = HashMap::new();
        tables.insert(default_pool.clone(), table(&default_pool, own_size));
        for pool in tls.routes.iter().map(|r| r.pool.get_ref()) {
            tables.entry(pool.clone()).or_insert_with(|| table(pool, None));
        }
        Self {
            service: service.name.get_ref().clone(),
            address: SocketAddr::new(*service.address.get_ref(), service.port().unwrap_or(0)),
            routes,
            labels,
            default_pool,
            tls,
            tables,
        }
    }

    /// The route for a hello naming `server_name` (`None`: no SNI), or why it is refused.
    pub fn route(&self, server_name: Option<&str>) -> Result<Route, RejectReason> {
        let default = || Route { label: "default".to_owned(), pool: self.default_pool.clone() };
        let Some(name) = server_name else {
            return match self.tls.missing_sni {
                SniFallback::Default => Ok(default()),
                SniFallback::Reject => Err("missing_sni"),
            };
        };
        // A name that is no host name (empty here) cannot be told apart from a denied one
        // written otherwise (`secret_x.internal.example.com`): refused wherever a deny list
        // is set.
        if matches_any(&self.tls.deny, name) || (name.is_empty() && !self.tls.deny.is_empty()) {
            return Err("denied");
        }
        if !self.tls.allow.is_empty() && !matches_any(&self.tls.allow, name) {
            return Err("not_allowed");
        }
        match self.routes.lookup(name) {
            Some((pattern, pool)) => Ok(Route { label: pattern.to_owned(), pool: pool.clone() }),
            None => match self.tls.unknown_sni {
                SniFallback::Default => Ok(default()),
                SniFallback::Reject => Err("unknown_sni"),
            },
        }
    }

    /// The backend of `pool` for a connection from `client`: the data path's hash over the
    /// connection's 5-tuple, healthy (weighted) backends only, none of those `tried` (ids:
    /// they failed the connection; see `PoolTable::select_untried`).
    #[must_use]
    pub fn select(
        &self,
        pool: &str,
        client: SocketAddr,
        tried: &[u32],
    ) -> Option<(u32, SocketAddr)> {
        self.tables.get(pool)?.select_untried(client, self.address, tried)
    }

    /// Every route label and its pool, the default last (for metrics).
    #[must_use]
    pub fn labels(&self) -> Vec<Route> {
        self.labels
            .iter()
            .cloned()
            .chain([Route { label: "default".to_owned(), pool: self.default_pool.clone() }])
            .collect()
    }

    #[must_use]
    pub fn hello_timeout(&self) -> Duration {
        Duration::from_millis(self.tls.hello_timeout_ms)
    }

    #[must_use]
    pub const fn max_pending(&self) -> u32 {
        self.tls.max_pending
    }

    #[must_use]
    pub const fn max_pending_per_source(&self) -> u32 {
        self.tls.max_pending_per_source
    }

    /// Backends one connection may try (see [`Policy::select`]).
    #[must_use]
    pub const fn connect_attempts(&self) -> u32 {
        self.tls.connect_attempts
    }

    #[must_use]
    pub const fn proxy_protocol(&self) -> bool {
        self.tls.proxy_protocol
    }

    #[must_use]
    pub const fn relay(&self) -> RelayMode {
        self.tls.relay
    }
}
