//! The balancer's state: turns the configuration's pools and services into the data path's
//! maps, keeping ids stable across reloads, and retires removed backends only once no flow
//! uses them.
//!
//! Writes happen in an order that never shows a packet a half-made service: backends first,
//! then their next hops, then each service's new Maglev table (switched whole), then the
//! service entries; removals go the other way.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap, HashSet},
    net::{IpAddr, SocketAddr},
};

use lb_common::{
    FlowKey,
    flow::{addr_words, flow_hash, port_raw, scale},
    maglev::{MaglevBackend, build_table, identity_hash, table_size_for},
    service::{
        AddrKey, BACKEND_DOWN, Backend, MAX_BACKENDS, MAX_SERVICES, NextHop, SERVICE_HASH_SOURCE,
        SERVICE_NAT, SERVICE_SYN_COOKIES, SERVICE_SYN_COOKIES_AUTO, Service, ServiceKey,
    },
};
use tracing::{info, warn};

use crate::{
    config::{Config, ForwardingMode, HashInput, ServiceConfig, SynCookies},
    maps::{
        MapError, Maps,
        maglev::{MaglevMap, Table},
    },
    nexthop::{Resolution, Resolver},
};

/// What identifies a backend: its pool, address and port.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BackendIdentity {
    pub pool: String,
    pub addr: IpAddr,
    pub port: Option<u16>,
}

impl BackendIdentity {
    /// The identity of `backend`, a backend of `pool` in the configuration.
    #[must_use]
    pub fn of(pool: &crate::config::PoolConfig, backend: &crate::config::BackendConfig) -> Self {
        Self {
            pool: pool.name.get_ref().clone(),
            addr: *backend.address.get_ref(),
            port: backend.port(),
        }
    }

    /// The stable Maglev identity: address and port only, so every node (whatever ids it
    /// gives) builds the same table.
    #[must_use]
    pub fn maglev_identity(&self, seed: u32) -> u64 {
        let mut bytes = match self.addr {
            IpAddr::V4(a) => a.octets().to_vec(),
            IpAddr::V6(a) => a.octets().to_vec(),
        };
        bytes.extend_from_slice(&self.port.unwrap_or(0).to_be_bytes());
        identity_hash(&bytes, u64::from(seed))
    }
}

#[derive(Clone, Debug)]
struct BackendState {
    id: u32,
    weight: u32,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct TableInput {
    size: u32,
    /// (identity, id, weight), sorted.
    members: Vec<(u64, u32, u32)>,
}

#[derive(Clone, Debug)]
struct ServiceState {
    id: u32,
    key: ServiceKey,
    value: Service,
    table: TableInput,
    pool: String,
}

/// The balancer's view of what the data path holds.
#[derive(Debug, Default)]
pub struct Balancer {
    services: BTreeMap<String, ServiceState>,
    backends: HashMap<BackendIdentity, BackendState>,
    /// Removed backends (id to identity) still carrying flows.
    retired: BTreeMap<u32, BackendIdentity>,
    /// Addresses of every backend id with an entry, for next-hop resolution.
    backend_addrs: BTreeMap<u32, IpAddr>,
    hash_seed: u32,
    ticks_per_second: u64,
    /// Backend ids found in adopted (pinned) maps, by (address, port), not yet claimed:
    /// several when pools share a backend (each pool has an id of its own).
    adoptable_backends: HashMap<(IpAddr, Option<u16>), Vec<u32>>,
    /// Backend ids in each adopted service's Maglev table, by the service's key: which pool
    /// an adopted id belonged to, when pools share a backend.
    adopted_tables: HashMap<ServiceKey, BTreeSet<u32>>,
    /// Backends the adopted maps mark `BACKEND_DOWN`, by (address, port).
    adopted_down: HashSet<(IpAddr, Option<u16>)>,
    /// Backend ids whose `BACKENDS` entry carries `BACKEND_DOWN`.
    flagged_down: HashSet<u32>,
    /// Service addresses and NAT sources the adopted maps held, until the first apply has
    /// compared them with its own (see [`ApplySummary::addresses_gone`]).
    adopted_addresses: (BTreeSet<AddrKey>, BTreeSet<AddrKey>),
    /// Backends that took their id back by their pool's adopted Maglev tables: known to be
    /// their own, not merely the lowest left for their address (see [`Self::id_was_down`]).
    claimed_by_table: HashSet<BackendIdentity>,
    /// Service ids found in adopted maps, by their `SERVICES` key, not yet claimed.
    adoptable_services: HashMap<ServiceKey, u32>,
    /// Adopted `auto` services whose cookies were on (a flood when the last daemon
    /// stopped), by their `SERVICES` key: still on once the service is claimed in `auto`
    /// mode, until the rate has been calm (not off for the first seconds of the new daemon).
    adopted_cookies_on: HashSet<ServiceKey>,
    /// Services the last apply removed, by their `SERVICES` key: their ids, should that
    /// apply be undone (see [`Balancer::take_back_removed`]).
    last_removed: HashMap<ServiceKey, u32>,
}

/// Pool members (identity, id, weight) as the Maglev builder takes them.
fn maglev_members(members: &[(u64, u32, u32)]) -> Vec<MaglevBackend> {
    members
        .iter()
        .map(|(identity, id, weight)| MaglevBackend {
            id: *id,
            identity: *identity,
            weight: *weight,
        })
        .collect()
}

/// A pool's Maglev table held by the daemon (see [`Balancer::pool_table`]).
#[derive(Clone, Debug, Default)]
pub struct PoolTable {
    slots: Vec<u32>,
    /// Backend id to address and port (`None`: the service's port).
    backends: HashMap<u32, (IpAddr, Option<u16>)>,
    hash_seed: u32,
    /// Hash the client's address alone (a service's `hash = "source"`), not the 5-tuple.
    source_only: bool,
}

impl PoolTable {
    /// The table hashing as a service with `hash` does.
    #[must_use]
    pub fn hashing(mut self, hash: crate::config::HashInput) -> Self {
        self.source_only = hash == crate::config::HashInput::Source;
        self
    }

    /// The backend for a TCP connection from `client` to `service`, hashed as the data path
    /// hashes a 5-tuple (or the client's address, see [`PoolTable::hashing`]); `None` when
    /// the pool has no backend with weight.
    #[must_use]
    pub fn select(&self, client: SocketAddr, service: SocketAddr) -> Option<(u32, SocketAddr)> {
        self.select_untried(client, service, &[])
    }

    /// [`PoolTable::select`] for a connection whose backends `tried` (ids) failed it: the
    /// first backend not tried in the table from the connection's own slot on. The slots
    /// interleave the backends by weight, so a failed backend's connections spread over
    /// the others as its slots would on its removal, and the same connection always gets
    /// the same next backend. `None` once every backend with weight has been tried.
    #[must_use]
    pub fn select_untried(
        &self,
        client: SocketAddr,
        service: SocketAddr,
        tried: &[u32],
    ) -> Option<(u32, SocketAddr)> {
        let size = u32::try_from(self.slots.len()).ok().filter(|s| *s > 0)?;
        let key = FlowKey::new(client, service, lb_common::net::IPPROTO_TCP);
        let start = scale(flow_hash(&key, self.hash_seed, self.source_only), size) as usize;
        let (first, wrapped) = self.slots.split_at(start);
        let id = wrapped.iter().chain(first).find(|id| !tried.contains(id))?;
        let (addr, port) = self.backends.get(id)?;
        Some((*id, SocketAddr::new(*addr, port.unwrap_or(service.port()))))
    }
}

/// What one `apply` changed.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ApplySummary {
    pub services_added: usize,
    pub services_updated: usize,
    pub services_removed: usize,
    pub tables_installed: usize,
    pub backends_added: usize,
    pub backends_retired: usize,
    /// Settings the reloaded file changes that only a restart applies (`api.listen`, ...).
    pub pending_restart: Vec<&'static str>,
    /// Ids of the services removed: their flows must be cut, since the data path forwards
    /// a live flow by its connection entry alone.
    pub removed_service_ids: Vec<u32>,
    /// Whether a service address or a NAT source stopped being one (at a start, of those
    /// the adopted maps held): flows using it must be cut (see
    /// `ConntrackMap::remove_orphans`).
    pub addresses_gone: bool,
}

/// Failure to apply a configuration.
#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    #[error("no free {what} id (at most {max})")]
    NoFreeId { what: &'static str, max: u32 },
    /// The change would not fit the data path's maps while old and new stand side by side;
    /// found before anything is written.
    #[error("{0}")]
    Capacity(String),
    #[error(transparent)]
    Map(#[from] MapError),
}

impl Balancer {
    #[must_use]
    /// A balancer for a data path whose clock ticks `ticks_per_second` times a second
    /// ([`crate::Datapath::ticks_per_second`]).
    pub fn new(ticks_per_second: u64) -> Self {
        Self { ticks_per_second, ..Self::default() }
    }

    /// The id of a backend, if it is live.
    #[must_use]
    pub fn backend_id(&self, identity: &BackendIdentity) -> Option<u32> {
        self.backends.get(identity).map(|b| b.id)
    }

    /// The id of a service, if it exists.
    #[must_use]
    pub fn service_id(&self, name: &str) -> Option<u32> {
        self.services.get(name).map(|s| s.id)
    }

    /// Live backends with their ids.
    pub fn backends(&self) -> impl Iterator<Item = (&BackendIdentity, u32)> {
        self.backends.iter().map(|(k, v)| (k, v.id))
    }

    /// Lets the services the last apply removed have their ids back when applied again, as
    /// pinned services do after a restart: the daemon undoing a change that failed after its
    /// apply (their flows, not cut, keep counting under them). Backends need nothing of the
    /// kind: one configured again takes its retired id back (see [`Balancer::apply`]).
    pub fn take_back_removed(&mut self) {
        self.adoptable_services.extend(self.last_removed.drain());
    }

    /// Removed backends still carrying flows, with their ids.
    pub fn retired(&self) -> impl Iterator<Item = (u32, &BackendIdentity)> {
        self.retired.iter().map(|(id, k)| (*id, k))
    }

    /// Services with their ids.
    pub fn services(&self) -> impl Iterator<Item = (&str, u32)> {
        self.services.iter().map(|(k, v)| (k.as_str(), v.id))
    }

    /// Takes over the ids an earlier run left in pinned maps: services by their key and
    /// backends by address and port, so the connection table's flows keep pointing at the
    /// same backends. Call before the first [`Balancer::apply`].
    pub fn adopt(&mut self, maps: &Maps) -> Result<(), MapError> {
        let (vips, nat_sources) = maps.services.addresses()?;
        self.adopted_addresses = (
            vips.into_iter().map(|(a, _)| a).collect(),
            nat_sources.into_iter().map(|(a, _)| a).collect(),
        );
        for (key, service) in maps.services.entries()? {
            self.adoptable_services.insert(key, service.id);
            let auto_on = SERVICE_SYN_COOKIES_AUTO | SERVICE_SYN_COOKIES;
            if service.flags & auto_on == auto_on {
                self.adopted_cookies_on.insert(key);
            }
            if let Some(table) = maps.maglev.table(service.id)? {
                self.adopted_tables.insert(key, table.into_iter().collect());
            }
        }
        for id in 0..MAX_BACKENDS {
            let backend = maps.backends.get(id)?;
            if backend.family == 0 {
                continue;
            }
            let addr = lb_common::flow::words_addr(backend.addr, backend.family);
            let port = (backend.port != 0).then(|| lb_common::flow::raw_port(backend.port));
            self.adoptable_backends.entry((addr, port)).or_default().push(id);
            if backend.flags & BACKEND_DOWN != 0 {
                self.adopted_down.insert((addr, port));
                self.flagged_down.insert(id);
            }
        }
        info!(
            services = self.adoptable_services.len(),
            backends = self.adoptable_backends.len(),
            down = self.adopted_down.len(),
            "adopted ids from pinned maps"
        );
        Ok(())
    }

    /// Forgets which backends took their ids back by their pools' adopted tables, once the
    /// start has judged them (see [`Self::id_was_down`]): later applies adopt nothing.
    pub fn forget_start_claims(&mut self) {
        self.claimed_by_table.clear();
    }

    /// Whether the adopted maps marked the backend at `addr` and `port` as failing its
    /// health checks when the previous daemon stopped, in any pool: before the pools have
    /// taken their ids back (see [`Self::id_was_down`] after).
    #[must_use]
    pub fn was_down(&self, addr: IpAddr, port: Option<u16>) -> bool {
        self.adopted_down.contains(&(addr, port))
    }

    /// Whether the backend `identity`, its id taken back from the adopted maps, counts as
    /// failing its checks when the previous daemon stopped: a backend in two pools has an id
    /// in each, and only the pool whose checks failed had it down. Its own id unflagged
    /// clears it only if the pool took that id back by its adopted tables; an id taken as
    /// the lowest left for the address may be another pool's (a down backend has no slots
    /// in its pool's tables), and then it stays down, the safe side.
    /// For the start only: [`Self::forget_start_claims`] ends it.
    #[must_use]
    pub fn id_was_down(&self, identity: &BackendIdentity) -> bool {
        match self.backend_id(identity) {
            Some(id) if self.flagged_down.contains(&id) => true,
            Some(_) if self.claimed_by_table.contains(identity) => false,
            _ => self.was_down(identity.addr, identity.port),
        }
    }

    /// Gives `config`'s backends the ids the adopted maps hold for them, so their flows keep
    /// going: each pool its own first (by its services' adopted tables), then the lowest
    /// left for the address. Writes nothing; [`Self::apply`] does it first, and a start
    /// calls it before, to judge the backends that were down by the ids they take back
    /// (see [`Self::id_was_down`]) before anything is installed.
    pub fn claim_adopted_ids(&mut self, config: &Config) {
        if self.adoptable_backends.is_empty() {
            return;
        }
        let wanted = wanted_backends(config);
        let adopted_pool = self.adopted_pools(config);
        let mut claimed = self.claim_pools_own_ids(&wanted, &adopted_pool);
        for (identity, weight) in &wanted {
            if self.backends.contains_key(identity) {
                continue;
            }
            let adopted =
                claimed.remove(identity).or_else(|| self.claim_adopted(identity, |_| true));
            if let Some(id) = adopted {
                self.backend_addrs.insert(id, identity.addr);
                self.backends.insert(identity.clone(), BackendState { id, weight: *weight });
            }
        }
    }

    /// Marks exactly the backends in `down` (by identity) `BACKEND_DOWN` in `BACKENDS`,
    /// writing only the entries that change.
    pub fn mark_down(
        &mut self,
        down: &HashSet<BackendIdentity>,
        maps: &mut Maps,
    ) -> Result<(), MapError> {
        let wanted: HashSet<u32> =
            self.backends.iter().filter(|(i, _)| down.contains(*i)).map(|(_, s)| s.id).collect();
        for (identity, state) in &self.backends {
            let flag = wanted.contains(&state.id);
            if flag != self.flagged_down.contains(&state.id) {
                let value = backend_value(identity, if flag { BACKEND_DOWN } else { 0 });
                maps.backends.set(state.id, &value)?;
            }
        }
        self.flagged_down = wanted;
        Ok(())
    }

    /// Makes the data path serve exactly `config`'s pools and services.
    pub fn apply(
        &mut self,
        config: &Config,
        maps: &mut Maps,
        resolver: &mut dyn Resolver,
    ) -> Result<ApplySummary, ApplyError> {
        self.check_capacity(config)?;
        self.last_removed.clear();
        let mut summary = ApplySummary::default();
        self.hash_seed = config.daemon.hash_seed;
        let all_ports = config.services.iter().any(|s| s.port().is_none());
        let flags = if all_ports { lb_common::service::GLOBAL_ALL_PORTS_SERVICES } else { 0 };
        // Raised before services are installed (and lowered only after): an all-ports service
        // is never unreachable for want of the flag.
        let old_flags = maps.globals.get()?.flags;
        maps.globals.set(&crate::datapath::globals(
            &config.conntrack.timeouts(),
            config.daemon.hash_seed,
            self.ticks_per_second,
            flags | old_flags,
        ))?;

        // 1. Backends: keep ids of those that stay, give new ones free ids, retire the rest.
        let wanted = wanted_backends(config);
        self.claim_adopted_ids(config);
        for (identity, weight) in &wanted {
            if let Some(state) = self.backends.get_mut(identity) {
                state.weight = *weight;
                continue;
            }
            // One removed and configured again while its flows drain keeps its id (they go
            // on as its flows, not cut at the drain deadline of a backend no longer there).
            if let Some(id) = self.take_back_retired(identity) {
                self.backend_addrs.insert(id, identity.addr);
                self.backends.insert(identity.clone(), BackendState { id, weight: *weight });
                continue;
            }
            let id = self.free_backend_id()?;
            maps.traffic.reset_backend(id)?;
            maps.backends.set(id, &backend_value(identity, 0))?;
            self.backend_addrs.insert(id, identity.addr);
            self.backends.insert(identity.clone(), BackendState { id, weight: *weight });
            summary.backends_added += 1;
        }

        // 2. Next hops of every backend, before any table can send a flow to it.
        let _unresolved = self.refresh_next_hops(maps, resolver)?;

        // 3. Services. Their addresses first: replies of NAT flows must be recognised before
        // the first flow opens (the union of old and new until the old services are gone).
        let mut vips: BTreeMap<AddrKey, u32> = BTreeMap::new();
        let mut nat_sources: BTreeMap<AddrKey, u32> = BTreeMap::new();
        // TLS passthrough services are the daemon's, not the data path's: their packets
        // must reach the host's stack (see `passthrough`).
        let balanced: Vec<&ServiceConfig> =
            config.services.iter().filter(|s| s.in_data_path()).collect();
        for service in &balanced {
            *vips.entry(addr_key(*service.address.get_ref())).or_default() += 1;
            if let Some(source) =
                service.nat_source.as_ref().filter(|_| service.mode == ForwardingMode::Nat)
            {
                *nat_sources.entry(addr_key(*source.get_ref())).or_default() += 1;
            }
        }
        let (vips_before, nat_sources_before) = (self.current_vips(), self.current_nat_sources());
        let (adopted_vips, adopted_nat_sources) = std::mem::take(&mut self.adopted_addresses);
        summary.addresses_gone =
            vips_before.keys().chain(&adopted_vips).any(|a| !vips.contains_key(a))
                || nat_sources_before
                    .keys()
                    .chain(&adopted_nat_sources)
                    .any(|a| !nat_sources.contains_key(a));
        maps.services.set_addresses(
            &union(&vips_before, &vips),
            &union(&nat_sources_before, &nat_sources),
        )?;
        // Then each service: its table (switched whole), then its entry. An address may move
        // from one service to another in one apply (a rename, a blue/green swap): a key
        // written here is never removed here, whichever service had it before.
        let claimed: HashSet<ServiceKey> = balanced.iter().map(|s| service_key(s)).collect();
        let mut kept = BTreeSet::new();
        let mut built: HashMap<TableInput, Table> = HashMap::new();
        for service in balanced {
            let name = service.name.get_ref().clone();
            kept.insert(name.clone());
            let previous = self.services.get(&name).cloned();
            let key = service_key(service);
            let adopted = previous.is_none() && self.adoptable_services.contains_key(&key);
            // Cookies `auto` switched on stay on while the service stays in `auto` mode, as
            // its installed entry (or, adopted, the pinned one) says: one set to "off" and
            // back to "auto" starts with them off.
            let auto_on = SERVICE_SYN_COOKIES_AUTO | SERVICE_SYN_COOKIES;
            let was_on = match &previous {
                Some(state) => state.value.flags & auto_on == auto_on,
                None => adopted && self.adopted_cookies_on.remove(&key),
            };
            let cookies_on = was_on && service.syn_cookies == SynCookies::Auto;
            let id = match &previous {
                Some(state) => state.id,
                None => match self.adoptable_services.remove(&key) {
                    Some(id) => id,
                    None => self.free_service_id()?,
                },
            };
            let value = service_value(config, service, id, cookies_on);
            let table = TableInput {
                size: config.table_size(service),
                members: self.members(service.pool.get_ref(), config),
            };
            if previous.as_ref().is_none_or(|p| p.table != table) {
                // Services of one pool and size share a table: built and written once.
                if !built.contains_key(&table) {
                    let filled = MaglevMap::create(&build_table(
                        &maglev_members(&table.members),
                        table.size,
                    ))?;
                    built.insert(table.clone(), filled);
                }
                maps.maglev.set(id, &built[&table])?;
                summary.tables_installed += 1;
                // Recorded at once: should the service's entry fail below, the change is put
                // back by comparing with this, and must find the old table to install again.
                if let Some(state) = self.services.get_mut(&name) {
                    state.table = table.clone();
                }
            }
            match &previous {
                None => {
                    // A fresh id starts its counters at zero; an adopted one keeps counting.
                    if !adopted {
                        maps.traffic.reset_service(id)?;
                    }
                    summary.services_added += 1;
                }
                Some(p) if p.key != key || p.value != value || p.table != table => {
                    summary.services_updated += 1;
                }
                Some(_) => {}
            }
            if let Some(p) = previous.as_ref().filter(|p| !claimed.contains(&p.key)) {
                maps.services.remove(&p.key)?;
            }
            maps.services.upsert(&key, &value)?;
            self.services.insert(
                name,
                ServiceState { id, key, value, table, pool: service.pool.get_ref().clone() },
            );
        }
        self.remove_services(&kept, &claimed, maps, &mut summary)?;
        maps.services.set_addresses(
            &vips.into_iter().collect::<Vec<_>>(),
            &nat_sources.into_iter().collect::<Vec<_>>(),
        )?;

        // 4. Backends no longer configured: retired, cleared once their flows are gone.
        let gone: Vec<BackendIdentity> =
            self.backends.keys().filter(|k| !wanted.contains_key(*k)).cloned().collect();
        for identity in gone {
            if let Some(state) = self.backends.remove(&identity) {
                self.retired.insert(state.id, identity);
                summary.backends_retired += 1;
            }
        }
        // Adopted backends the configuration no longer has: retired the same way, under the
        // pool whose (still configured) services' tables held them, so its drain deadline
        // applies (none known: never cut, the default).
        let adopted_pool = self.adopted_pools(config);
        for ((addr, port), ids) in std::mem::take(&mut self.adoptable_backends) {
            for id in ids {
                let pool = adopted_pool.get(&id).cloned().unwrap_or_default();
                self.retired.insert(id, BackendIdentity { pool, addr, port });
                self.backend_addrs.insert(id, addr);
                summary.backends_retired += 1;
            }
        }
        self.adopted_tables.clear();
        if !all_ports && old_flags & lb_common::service::GLOBAL_ALL_PORTS_SERVICES != 0 {
            let mut g = maps.globals.get()?;
            g.flags &= !lb_common::service::GLOBAL_ALL_PORTS_SERVICES;
            maps.globals.set(&g)?;
        }
        info!(?summary, "configuration applied");
        Ok(summary)
    }

    /// Re-resolves every backend's next hop and writes the ones that changed. Returns how
    /// many backends have no next hop yet.
    pub fn refresh_next_hops(
        &mut self,
        maps: &mut Maps,
        resolver: &mut dyn Resolver,
    ) -> Result<usize, MapError> {
        let mut unresolved = 0;
        let addrs: Vec<IpAddr> =
            self.backend_addrs.values().copied().collect::<BTreeSet<_>>().into_iter().collect();
        let resolved = resolver.resolve(&addrs);
        for (id, addr) in &self.backend_addrs {
            let hop = match resolved.get(addr) {
                Some(Resolution::Resolved(hop)) => *hop,
                Some(Resolution::NoNeighbour | Resolution::NoRoute) | None => {
                    unresolved += 1;
                    NextHop::default()
                }
            };
            let current = maps.backends.next_hop(*id)?;
            if current != hop {
                if hop.ifindex != 0 && !maps.tx_ports.ifindexes().contains(&hop.ifindex) {
                    maps.tx_ports.add(hop.ifindex)?;
                }
                if hop.ifindex == 0 && current.ifindex != 0 {
                    warn!(backend = %addr, "next hop lost; keeping the last known one");
                    continue;
                }
                maps.backends.set_next_hop(*id, &hop)?;
            }
        }
        Ok(unresolved)
    }

    /// Clears retired backends that no live flow uses any more. `live` gives the number of
    /// live flows per backend id (from a connection-table sweep).
    pub fn release_retired(
        &mut self,
        maps: &mut Maps,
        live: &HashMap<u32, u64>,
    ) -> Result<usize, MapError> {
        let done: Vec<u32> = self
            .retired
            .keys()
            .filter(|id| live.get(id).copied().unwrap_or(0) == 0)
            .copied()
            .collect();
        if !done.is_empty() {
            // A flow the LRU evicted may still be carried by a flow-cache copy naming the id:
            // dropped before the id is cleared (and may be handed out again).
            maps.conntrack.invalidate_cache()?;
        }
        for id in &done {
            maps.backends.clear(*id)?;
            self.retired.remove(id);
            self.backend_addrs.remove(id);
        }
        Ok(done.len())
    }

    /// The entry of backend `id` (live or retired). One lookup walks every backend: the
    /// connection table's sweep and cuts take [`Self::backend_entries`] once instead.
    #[must_use]
    pub fn backend_entry(&self, id: u32) -> Option<Backend> {
        let identity = self
            .backends
            .iter()
            .find(|(_, s)| s.id == id)
            .map(|(k, _)| k)
            .or_else(|| self.retired.get(&id))?;
        let flags = if self.flagged_down.contains(&id) { BACKEND_DOWN } else { 0 };
        Some(backend_value(identity, flags))
    }

    /// Every backend's entry (live and retired) by id, for the connection table's sweep and
    /// cuts, which look up a backend for each NAT flow they meet.
    #[must_use]
    pub fn backend_entries(&self) -> HashMap<u32, Backend> {
        let live = self.backends.iter().map(|(identity, s)| (s.id, identity));
        live.chain(self.retired.iter().map(|(id, identity)| (*id, identity)))
            .map(|(id, identity)| {
                let flags = if self.flagged_down.contains(&id) { BACKEND_DOWN } else { 0 };
                (id, backend_value(identity, flags))
            })
            .collect()
    }

    /// Pool `pool`'s Maglev table under `config`'s (effective) weights, for the daemon's own
    /// balancing (TLS passthrough): the same builder, identities and flow hash as the data
    /// path's tables, so a connection picks the backend an XDP service would. `table_size`
    /// is the service's own (`table_size` in its configuration); `None` sizes the table for
    /// the pool as the data path would.
    #[must_use]
    pub fn pool_table(&self, pool: &str, config: &Config, table_size: Option<u32>) -> PoolTable {
        let members = self.members(pool, config);
        // The same backends as `members`, by id.
        let backends: HashMap<u32, (IpAddr, Option<u16>)> = config
            .pool(pool)
            .into_iter()
            .flat_map(|p| p.backends.iter().map(move |b| BackendIdentity::of(p, b)))
            .filter_map(|identity| {
                let state = self.backends.get(&identity)?;
                Some((state.id, (identity.addr, identity.port)))
            })
            .collect();
        let size = table_size.unwrap_or_else(|| {
            table_size_for(u32::try_from(members.len()).unwrap_or(u32::MAX))
                .unwrap_or(lb_common::maglev::MAX_TABLE_SIZE)
        });
        PoolTable {
            slots: build_table(&maglev_members(&members), size),
            backends,
            hash_seed: self.hash_seed,
            source_only: false,
        }
    }

    fn members(&self, pool: &str, config: &Config) -> Vec<(u64, u32, u32)> {
        let Some(pool_config) = config.pool(pool) else { return Vec::new() };
        let mut members: Vec<(u64, u32, u32)> = pool_config
            .backends
            .iter()
            .filter_map(|b| {
                let identity = BackendIdentity::of(pool_config, b);
                let state = self.backends.get(&identity)?;
                Some((identity.maglev_identity(self.hash_seed), state.id, state.weight))
            })
            .collect();
        members.sort_unstable();
        members
    }

    /// Whether `config` fits the maps while it applies: new services, backends and addresses
    /// are written before the ones they replace go, so both count until then. Refusing here
    /// leaves everything as it was; running out halfway would not.
    pub fn check_capacity(&self, config: &Config) -> Result<(), ApplyError> {
        let balanced: Vec<&ServiceConfig> =
            config.services.iter().filter(|s| s.in_data_path()).collect();
        let fits = |what: &str, n: usize, max: u32| {
            if n > max as usize {
                Err(ApplyError::Capacity(format!(
                    "this change needs {n} {what} at once (the old ones stay until the new ones are in place); at most {max} fit: make it in two steps, removing first"
                )))
            } else {
                Ok(())
            }
        };
        let new_service_ids = balanced
            .iter()
            .filter(|s| {
                !self.services.contains_key(s.name.get_ref())
                    && !self.adoptable_services.contains_key(&service_key(s))
            })
            .count();
        let held = self.services.len() + self.adoptable_services.len();
        fits("service ids", held + new_service_ids, MAX_SERVICES)?;
        let keys: HashSet<ServiceKey> = self
            .services
            .values()
            .map(|s| s.key)
            .chain(self.adoptable_services.keys().copied())
            .chain(balanced.iter().map(|s| service_key(s)))
            .collect();
        fits("service entries", keys.len(), MAX_SERVICES)?;
        let vips: HashSet<AddrKey> = self
            .current_vips()
            .into_keys()
            .chain(balanced.iter().map(|s| addr_key(*s.address.get_ref())))
            .collect();
        fits("service addresses", vips.len(), MAX_SERVICES)?;
        let sources: HashSet<AddrKey> = self
            .current_nat_sources()
            .into_keys()
            .chain(
                balanced
                    .iter()
                    .filter(|s| s.mode == ForwardingMode::Nat)
                    .filter_map(|s| s.nat_source.as_ref())
                    .map(|a| addr_key(*a.get_ref())),
            )
            .collect();
        fits("NAT source addresses", sources.len(), lb_common::service::MAX_NAT_SOURCES)?;
        let new_backends = config
            .pools
            .iter()
            .flat_map(|pool| pool.backends.iter().map(move |b| BackendIdentity::of(pool, b)))
            .filter(|b| {
                !self.backends.contains_key(b)
                    && !self.adoptable_backends.contains_key(&(b.addr, b.port))
            })
            .count();
        let held = self.backends.len()
            + self.retired.len()
            + self.adoptable_backends.values().map(Vec::len).sum::<usize>();
        fits("backend ids", held + new_backends, MAX_BACKENDS)
    }

    /// The service addresses and NAT sources installed, for cutting the flows of those gone
    /// (see [`ApplySummary::addresses_gone`]).
    #[must_use]
    pub fn addresses(&self) -> (HashSet<AddrKey>, HashSet<AddrKey>) {
        (
            self.current_vips().into_keys().collect(),
            self.current_nat_sources().into_keys().collect(),
        )
    }

    fn current_vips(&self) -> BTreeMap<AddrKey, u32> {
        let mut m: BTreeMap<AddrKey, u32> = BTreeMap::new();
        for s in self.services.values() {
            *m.entry(AddrKey { addr: s.key.addr, family: u32::from(s.key.family) }).or_default() +=
                1;
        }
        m
    }

    fn current_nat_sources(&self) -> BTreeMap<AddrKey, u32> {
        let mut m: BTreeMap<AddrKey, u32> = BTreeMap::new();
        for s in self.services.values().filter(|s| s.value.flags & SERVICE_NAT != 0) {
            *m.entry(AddrKey { addr: s.value.nat_addr, family: u32::from(s.key.family) })
                .or_default() += 1;
        }
        m
    }

    /// Adopted ids each pool's services' tables held (`adopted_pool`): a backend in two pools
    /// had an id in each, and each pool takes its own back first (before any takes the lowest
    /// left, which could be another pool's).
    fn claim_pools_own_ids(
        &mut self,
        wanted: &BTreeMap<BackendIdentity, u32>,
        adopted_pool: &HashMap<u32, String>,
    ) -> HashMap<BackendIdentity, u32> {
        let mut claimed = HashMap::new();
        for identity in wanted.keys() {
            if self.backends.contains_key(identity) {
                continue;
            }
            let own = |id: u32| adopted_pool.get(&id) == Some(&identity.pool);
            if let Some(id) = self.claim_adopted(identity, own) {
                claimed.insert(identity.clone(), id);
                self.claimed_by_table.insert(identity.clone());
            }
        }
        claimed
    }

    /// The pool of each backend id in an adopted Maglev table, by the configured service with
    /// that table's key (an id belongs to one pool).
    fn adopted_pools(&self, config: &Config) -> HashMap<u32, String> {
        let mut pools = HashMap::new();
        for service in config.services.iter().filter(|s| s.in_data_path()) {
            if let Some(ids) = self.adopted_tables.get(&service_key(service)) {
                for id in ids {
                    pools.insert(*id, service.pool.get_ref().clone());
                }
            }
        }
        pools
    }

    /// Takes the lowest adopted id left for `identity`'s address and port that `pick` accepts.
    fn claim_adopted(
        &mut self,
        identity: &BackendIdentity,
        pick: impl Fn(u32) -> bool,
    ) -> Option<u32> {
        let key = (identity.addr, identity.port);
        let ids = self.adoptable_backends.get_mut(&key)?;
        ids.sort_unstable();
        let at = ids.iter().position(|id| pick(*id))?;
        let id = ids.remove(at);
        if ids.is_empty() {
            self.adoptable_backends.remove(&key);
        }
        Some(id)
    }

    /// Removes the services not `kept` (by name), adopted ones the configuration no longer
    /// has included; a key another service `claimed` stays in `SERVICES` (it was written
    /// for that one).
    fn remove_services(
        &mut self,
        kept: &BTreeSet<String>,
        claimed: &HashSet<ServiceKey>,
        maps: &mut Maps,
        summary: &mut ApplySummary,
    ) -> Result<(), ApplyError> {
        let adopted: Vec<(ServiceKey, u32)> = self.adoptable_services.drain().collect();
        // Their cookie states go with them (a key taken back later starts as configured).
        self.adopted_cookies_on.clear();
        let removed: Vec<String> =
            self.services.keys().filter(|n| !kept.contains(*n)).cloned().collect();
        let gone: Vec<(ServiceKey, u32)> = removed
            .iter()
            .filter_map(|name| self.services.remove(name))
            .map(|state| (state.key, state.id))
            .chain(adopted)
            .collect();
        // All recorded before any is removed from the map: should a removal fail, putting
        // the change back finds every one of them, to install under its id again.
        for (key, id) in &gone {
            summary.services_removed += 1;
            summary.removed_service_ids.push(*id);
            self.last_removed.insert(*key, *id);
        }
        for (key, _) in gone {
            if !claimed.contains(&key) {
                maps.services.remove(&key)?;
            }
        }
        Ok(())
    }

    /// The retired id of a backend with this identity, taken out of retirement.
    fn take_back_retired(&mut self, identity: &BackendIdentity) -> Option<u32> {
        let id =
            self.retired.iter().find(|(_, retired)| *retired == identity).map(|(id, _)| *id)?;
        self.retired.remove(&id);
        Some(id)
    }

    fn free_backend_id(&self) -> Result<u32, ApplyError> {
        let used: BTreeSet<u32> = self
            .backends
            .values()
            .map(|b| b.id)
            .chain(self.retired.keys().copied())
            .chain(self.adoptable_backends.values().flatten().copied())
            .collect();
        (0..MAX_BACKENDS)
            .find(|id| !used.contains(id))
            .ok_or(ApplyError::NoFreeId { what: "backend", max: MAX_BACKENDS })
    }

    fn free_service_id(&self) -> Result<u32, ApplyError> {
        let used: BTreeSet<u32> = self
            .services
            .values()
            .map(|s| s.id)
            .chain(self.adoptable_services.values().copied())
            .collect();
        (0..MAX_SERVICES)
            .find(|id| !used.contains(id))
            .ok_or(ApplyError::NoFreeId { what: "service", max: MAX_SERVICES })
    }

    /// Turns an `auto` service's SYN cookies on or off (a rewrite of its `SERVICES` entry).
    pub fn set_cookies_active(
        &mut self,
        name: &str,
        active: bool,
        maps: &mut Maps,
    ) -> Result<(), MapError> {
        let Some(state) = self.services.get_mut(name) else { return Ok(()) };
        if (state.value.flags & SERVICE_SYN_COOKIES != 0) == active {
            return Ok(());
        }
        state.value.flags ^= SERVICE_SYN_COOKIES;
        maps.services.upsert(&state.key, &state.value)?;
        Ok(())
    }

    /// Whether a service answers SYNs with cookies now.
    #[must_use]
    pub fn cookies_active(&self, name: &str) -> bool {
        self.services.get(name).is_some_and(|s| s.value.flags & SERVICE_SYN_COOKIES != 0)
    }

    /// Pools each service uses (for metrics).
    pub fn service_pools(&self) -> impl Iterator<Item = (&str, &str)> {
        self.services.iter().map(|(name, s)| (name.as_str(), s.pool.as_str()))
    }
}

/// Every backend of `config`'s pools with its configured weight.
fn wanted_backends(config: &Config) -> BTreeMap<BackendIdentity, u32> {
    config
        .pools
        .iter()
        .flat_map(|pool| {
            pool.backends.iter().map(move |b| (BackendIdentity::of(pool, b), *b.weight.get_ref()))
        })
        .collect()
}

fn union(a: &BTreeMap<AddrKey, u32>, b: &BTreeMap<AddrKey, u32>) -> Vec<(AddrKey, u32)> {
    let mut m = a.clone();
    for (k, v) in b {
        *m.entry(*k).or_default() += v;
    }
    m.into_iter().collect()
}

fn family(addr: IpAddr) -> u8 {
    if addr.is_ipv4() { 4 } else { 6 }
}

fn addr_key(addr: IpAddr) -> AddrKey {
    AddrKey { addr: addr_words(addr), family: u32::from(family(addr)) }
}

fn backend_value(identity: &BackendIdentity, flags: u8) -> Backend {
    Backend {
        addr: addr_words(identity.addr),
        port: identity.port.map_or(0, port_raw),
        family: family(identity.addr),
        flags,
    }
}

/// The `SERVICES` key of a service.
#[must_use]
pub fn service_key(service: &ServiceConfig) -> ServiceKey {
    let addr = *service.address.get_ref();
    ServiceKey {
        addr: addr_words(addr),
        port: service.port().map_or(0, port_raw),
        proto: service.protocol.number(),
        family: family(addr),
    }
}

fn service_value(config: &Config, service: &ServiceConfig, id: u32, cookies_on: bool) -> Service {
    let mut flags = 0;
    match service.syn_cookies {
        SynCookies::Off => {}
        SynCookies::On => flags |= SERVICE_SYN_COOKIES,
        SynCookies::Auto => {
            flags |= SERVICE_SYN_COOKIES_AUTO;
            if cookies_on {
                flags |= SERVICE_SYN_COOKIES;
            }
        }
    }
    if service.mode == ForwardingMode::Nat {
        flags |= SERVICE_NAT;
    }
    if service.hash == HashInput::Source {
        flags |= SERVICE_HASH_SOURCE;
    }
    let (min, max) = service.nat_port_range();
    let nat_addr = service.nat_source.as_ref().map_or([0; 4], |s| addr_words(*s.get_ref()));
    Service {
        id,
        flags,
        table_size: config.table_size(service),
        nat_port_min: if service.mode == ForwardingMode::Nat { min } else { 0 },
        nat_port_max: if service.mode == ForwardingMode::Nat { max } else { 0 },
        nat_addr,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_maglev_identity_is_the_address_and_port_alone() {
        // The bytes lb-common's pinned table test hashes: octets, then the port big-endian
        // (0 for none); not the pool, nor the id this node gave.
        let identity = |pool: &str, port| BackendIdentity {
            pool: pool.to_owned(),
            addr: IpAddr::from([198, 18, 1, 11]),
            port,
        };
        assert_eq!(identity("web", None).maglev_identity(0), 0xc016_bdf6_1957_ca90);
        assert_eq!(identity("api", None).maglev_identity(0), 0xc016_bdf6_1957_ca90);
        assert_eq!(
            identity("web", Some(8080)).maglev_identity(7),
            lb_common::maglev::identity_hash(&[198, 18, 1, 11, 0x1f, 0x90], 7)
        );
    }

    /// A pool table of backends 1 to `n` (198.18.1.1 to .n, port 8443), equal weights.
    fn table(n: u8) -> PoolTable {
        let members: Vec<(u64, u32, u32)> =
            (1..=n).map(|id| (u64::from(id), u32::from(id), 1)).collect();
        PoolTable {
            slots: build_table(&maglev_members(&members), 65_537),
            backends: (1..=n)
                .map(|id| (u32::from(id), (IpAddr::from([198, 18, 1, id]), Some(8443))))
                .collect(),
            hash_seed: 7,
            source_only: false,
        }
    }

    #[test]
    fn a_source_hashed_table_gives_a_client_one_backend_and_one_failover_order() {
        let t = table(4).hashing(crate::config::HashInput::Source);
        let five_tuple = table(4);
        let service: SocketAddr = "198.18.100.1:443".parse().unwrap();
        let mut spread = HashMap::<u32, u32>::new();
        for client in 1..=200u8 {
            let from = |port: u16| SocketAddr::from(([198, 18, 0, client], port));
            let order = |port: u16| -> Vec<u32> {
                let mut tried = Vec::new();
                while let Some((id, _)) = t.select_untried(from(port), service, &tried) {
                    assert!(!tried.contains(&id) && tried.len() < 4, "{id} after {tried:?}");
                    tried.push(id);
                }
                tried
            };
            let first = order(40_000);
            for port in [40_001, 50_000, 65_535] {
                assert_eq!(order(port), first, "client {client}, port {port}");
            }
            *spread.entry(first[0]).or_default() += 1;
        }
        // Clients still spread over the backends; the 5-tuple table moves a client's ports.
        assert_eq!(spread.len(), 4, "{spread:?}");
        let client = |port: u16| SocketAddr::from(([198, 18, 0, 9], port));
        let ids: std::collections::HashSet<u32> = (40_000..40_064)
            .filter_map(|p| five_tuple.select(client(p), service))
            .map(|s| s.0)
            .collect();
        assert!(ids.len() > 1, "{ids:?}");
    }

    #[test]
    fn a_connection_that_failed_on_its_backends_goes_on_to_the_others_in_turn() {
        let t = table(4);
        let service: SocketAddr = "198.18.100.1:443".parse().unwrap();
        let mut next_counts = HashMap::<u32, u32>::new();
        for port in 40_000..41_000u16 {
            let client = SocketAddr::from(([198, 18, 0, 2], port));
            let first = t.select(client, service).unwrap();
            assert_eq!(t.select_untried(client, service, &[]), Some(first));
            // Every backend once, each time another, then none; the same order every time.
            let mut tried = Vec::new();
            while let Some((id, addr)) = t.select_untried(client, service, &tried) {
                assert!(!tried.contains(&id) && tried.len() < 4, "{id} after {tried:?}");
                assert_eq!(addr, SocketAddr::new(t.backends[&id].0, 8443));
                tried.push(id);
            }
            assert_eq!(tried.len(), 4, "every backend once: {tried:?}");
            assert_eq!(tried[0], first.0);
            *next_counts.entry(tried[1]).or_default() += 1;
            let again: Vec<u32> =
                (0..4).map(|i| t.select_untried(client, service, &tried[..i]).unwrap().0).collect();
            assert_eq!(again, tried, "the order is the connection's own");
        }
        // The second choices spread over the other backends, not onto one of them.
        assert_eq!(next_counts.len(), 4, "{next_counts:?}");
        for n in next_counts.values() {
            assert!((180..320).contains(n), "{next_counts:?}");
        }
    }

    #[test]
    fn an_empty_pool_selects_nothing() {
        let t = PoolTable::default();
        let (client, service) =
            ("198.18.0.2:40000".parse().unwrap(), "198.18.100.1:443".parse().unwrap());
        assert_eq!(t.select_untried(client, service, &[]), None);
    }
}
