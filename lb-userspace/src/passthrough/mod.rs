//! TLS passthrough: services routed by the server name of the client's TLS ClientHello,
//! without terminating TLS (the daemon never holds a key and never decrypts).
//!
//! No XDP program can see a server name when the SYN arrives, so these services are the
//! daemon's: the XDP data path passes their packets to the host's stack, an `sk_lookup`
//! program hands the connections to the daemon's listener (`server.rs`), which reads the
//! hello (`hello.rs`), picks the pool by name (`routes.rs`, `policy.rs`) and the backend by
//! the data path's own Maglev hash, connects (optionally with a PROXY v2 header,
//! `proxy_v2.rs`), and leaves the bytes to the kernel (`relay.rs`).

pub mod hello;
pub mod policy;
pub mod proxy_v2;
mod relay;
pub mod routes;
mod server;
pub mod stats;

use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use self::{
    policy::Policy,
    server::{ServiceRuntime, Shared},
    stats::Stats,
};
use crate::{Balancer, Config, config::ForwardingMode, maps::RelayMaps};

/// A service being served.
#[derive(Debug)]
struct Running {
    address: SocketAddr,
    runtime: Arc<ServiceRuntime>,
    cancel: CancellationToken,
}

/// The daemon's passthrough services: the policies the configuration asks for, and, once
/// started, their listeners.
#[derive(Debug, Default)]
pub struct Passthrough {
    wanted: HashMap<String, Arc<Policy>>,
    shared: Option<Arc<Shared>>,
    /// The socket maps (listeners, and relays unless they splice).
    listener_maps: Option<Arc<Mutex<RelayMaps>>>,
    running: HashMap<String, Running>,
    /// When to try again to listen for services whose listener could not start (a socket
    /// refused for want of descriptors or memory): set while one is missing.
    retry_at: Option<Instant>,
    pub stats: Arc<Stats>,
}

/// How long after a listener failed to start it is tried again.
const LISTEN_RETRY: Duration = Duration::from_secs(5);

impl Passthrough {
    /// Whether `config` has passthrough services.
    #[must_use]
    pub fn needed(config: &Config) -> bool {
        config.services.iter().any(|s| s.mode == ForwardingMode::TlsPassthrough)
    }

    /// Whether the kernel half is running.
    #[must_use]
    pub const fn started(&self) -> bool {
        self.shared.is_some()
    }

    /// Whether relays go through the socket map (else splice).
    #[must_use]
    pub fn sockmap(&self) -> bool {
        self.shared.as_ref().is_some_and(|s| s.maps.is_some())
    }

    /// Starts serving with the kernel's half (see `Datapath::start_passthrough`). Needs a
    /// tokio runtime.
    pub fn start(&mut self, maps: RelayMaps, sockmap: bool) {
        let maps = Arc::new(Mutex::new(maps));
        self.shared =
            Some(Arc::new(Shared::new(sockmap.then(|| maps.clone()), self.stats.clone())));
        self.listener_maps = Some(maps);
        self.reconcile();
    }

    /// Makes the services match `effective` (the configuration with the weights installed):
    /// new ones start listening, removed ones stop (their relayed connections carry on), and
    /// the others take the new policy for their next connections.
    pub fn sync(&mut self, effective: &Config, balancer: &Balancer) {
        self.wanted = effective
            .services
            .iter()
            .filter(|s| s.mode == ForwardingMode::TlsPassthrough)
            .map(|s| (s.name.get_ref().clone(), Arc::new(Policy::compile(s, effective, balancer))))
            .collect();
        self.stats.declare(self.wanted.values().flat_map(|policy| {
            policy
                .labels()
                .into_iter()
                .map(|route| (policy.service.clone(), route.label, route.pool))
        }));
        self.reconcile();
    }

    /// Tries again to listen for the services whose listener could not start, once their
    /// retry is due (the daemon's lifecycle tick calls this every second).
    pub fn retry_listeners(&mut self, now: Instant) {
        if self.retry_at.is_some_and(|at| now >= at) {
            self.reconcile();
        }
    }

    fn reconcile(&mut self) {
        self.retry_at = None;
        let Some(shared) = self.shared.clone() else { return };
        let Some(maps) = self.listener_maps.clone() else { return };
        let gone: Vec<String> = self
            .running
            .iter()
            .filter(|(name, r)| self.wanted.get(*name).is_none_or(|p| p.address != r.address))
            .map(|(name, _)| name.clone())
            .collect();
        for name in gone {
            if let Some(running) = self.running.remove(&name) {
                running.cancel.cancel();
                relay::lock(&maps).remove_listener(running.address);
                info!(service = %name, "passthrough service stopped");
            }
        }
        for (name, policy) in &self.wanted {
            if let Some(running) = self.running.get(name) {
                running.runtime.set_policy(policy.clone());
                continue;
            }
            match Self::listen(policy, &shared, &maps) {
                Ok(running) => {
                    info!(service = %name, address = %policy.address, "passthrough service listening");
                    self.running.insert(name.clone(), running);
                }
                Err(error) => {
                    warn!(service = %name, %error, retry_secs = LISTEN_RETRY.as_secs(), "passthrough service cannot listen; trying again");
                    self.retry_at = Some(Instant::now() + LISTEN_RETRY);
                }
            }
        }
    }

    fn listen(
        policy: &Arc<Policy>,
        shared: &Arc<Shared>,
        maps: &Arc<Mutex<RelayMaps>>,
    ) -> anyhow::Result<Running> {
        let listener = server::bind_listener(policy.address)?;
        relay::lock(maps).set_listener(policy.address, &listener)?;
        let listener = tokio::net::TcpListener::from_std(listener)?;
        let runtime = Arc::new(ServiceRuntime::new(policy.clone()));
        let cancel = CancellationToken::new();
        tokio::spawn(server::serve(listener, runtime.clone(), shared.clone(), cancel.clone()));
        Ok(Running { address: policy.address, runtime, cancel })
    }

    /// Ends the relays to the backends `ids`, running or still connecting, as the data
    /// path's flows of a disabled, overdue draining or removed backend are cut.
    pub fn cut(&self, ids: &std::collections::HashSet<u32>) {
        let Some(shared) = &self.shared else { return };
        if ids.is_empty() {
            return;
        }
        let n = shared.cut(ids);
        if n > 0 {
            info!(relays = n, "passthrough relays cut");
        }
    }

    /// How many relays run or connect to the backend `id`: they keep a removed backend's id
    /// retired, as its data path flows do, so its pool's drain deadline still cuts them.
    #[must_use]
    pub fn relays_to(&self, id: u32) -> usize {
        self.shared.as_ref().map_or(0, |shared| shared.count(id))
    }

    /// Stops every listener (relayed connections carry on until they end).
    pub fn stop(&mut self) {
        self.wanted.clear();
        self.reconcile();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_route_written_with_a_final_dot_counts_under_the_series_it_declared() {
        let config = Config::parse(
            r#"
[[interface]]
name = "eth0"
[[pool]]
name = "web"
[[pool.backend]]
address = "198.18.1.11"
[[pool]]
name = "www"
[[pool.backend]]
address = "198.18.1.12"
[[service]]
name = "tls"
address = "198.18.100.2"
protocol = "tcp"
port = 443
pool = "web"
mode = "tls-passthrough"
[[service.tls.route]]
server_name = "WWW.Example.com."
pool = "www"
"#,
            "t",
        )
        .unwrap();
        let mut passthrough = Passthrough::default();
        passthrough.sync(&config, &Balancer::new(100));
        let policy = passthrough.wanted["tls"].clone();
        let route = policy.route(Some("www.example.com")).unwrap();
        let id = (policy.service.clone(), route.label, route.pool);
        assert_eq!(id.1, "www.example.com");
        // One connection, relayed and ended: its count stays in the route's declared series
        // (a series nobody declared goes once its last relay ends, taking the count along).
        passthrough.stats.opened(&id);
        passthrough.stats.closed(&id, Some("splice"));
        let routes = passthrough.stats.snapshot().routes;
        let counted: Vec<_> = routes.iter().map(|(id, c)| (id.1.as_str(), c.connections)).collect();
        assert_eq!(counted, [("default", 0), ("www.example.com", 1)]);
    }
}
