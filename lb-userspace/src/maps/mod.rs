//! Typed wrappers around the data path's maps, one module per map family. Nothing outside
//! this module touches `aya::maps` directly, and only the daemon (through these wrappers)
//! writes the configuration maps.

pub mod backends;
pub mod conntrack;
pub mod epoch;
pub mod firewall;
pub mod globals;
pub mod maglev;
pub mod relay;
pub mod services;
pub mod stats;
pub mod traffic;
pub mod tx_ports;

use aya::{Ebpf, maps::Map};
use thiserror::Error;

pub use backends::BackendsMap;
pub use conntrack::{ConntrackMap, FlowClock, SweepResult};
pub use epoch::CacheEpoch;
pub use firewall::FirewallMaps;
pub use globals::GlobalsMap;
pub use maglev::MaglevMap;
pub use relay::RelayMaps;
pub use services::ServicesMap;
pub use stats::{StatsMap, StatsSnapshot};
pub use traffic::TrafficMaps;
pub use tx_ports::TxPortsMap;

/// Failure to find or use one of the data path's maps.
#[derive(Debug, Error)]
pub enum MapError {
    #[error("map {name} is missing from the XDP object")]
    Missing { name: &'static str },
    #[error("map {name} has an unexpected type or layout: {source}")]
    Layout { name: &'static str, source: aya::maps::MapError },
    #[error("failed to access map {name}: {source}")]
    Access { name: &'static str, source: aya::maps::MapError },
    #[error("failed to update map {name}: {source}")]
    Update { name: &'static str, source: aya::maps::MapError },
    #[error("failed to update device map {name}: {source}")]
    Devmap { name: &'static str, source: aya::maps::xdp::XdpMapError },
    #[error("failed to count the possible CPUs: {0}")]
    Cpus(std::io::Error),
    #[error("failed to create a Maglev table of {size} slots: {source}")]
    CreateTable { size: u32, source: aya::maps::MapError },
}

/// Every map of the data path, taken out of the loaded object and typed.
#[derive(Debug)]
pub struct Maps {
    pub stats: StatsMap,
    pub services: ServicesMap,
    pub backends: BackendsMap,
    pub maglev: MaglevMap,
    pub conntrack: ConntrackMap,
    pub globals: GlobalsMap,
    pub traffic: TrafficMaps,
    pub tx_ports: TxPortsMap,
    pub firewall: FirewallMaps,
    /// The firewall's sampled events, until the daemon's reader takes them.
    pub firewall_events: Option<FirewallEvents>,
    /// The TLS-passthrough maps, until the daemon's passthrough service takes them.
    pub relay: Option<RelayMaps>,
}

/// `FW_EVENTS`, the firewall's ring buffer of sampled matches.
pub struct FirewallEvents(pub aya::maps::RingBuf<aya::maps::MapData>);

impl std::fmt::Debug for FirewallEvents {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FirewallEvents").finish_non_exhaustive()
    }
}

impl Maps {
    /// Takes the maps out of `ebpf` (the programs keep their own references to them).
    pub fn take(ebpf: &mut Ebpf) -> Result<Self, MapError> {
        let epoch = CacheEpoch::new(take(ebpf, lb_common::maps::CACHE_EPOCH)?)?;
        Ok(Self {
            stats: StatsMap::new(take(ebpf, lb_common::maps::STATS)?)?,
            services: ServicesMap::new(
                take(ebpf, lb_common::maps::SERVICES)?,
                take(ebpf, lb_common::maps::VIPS)?,
                take(ebpf, lb_common::maps::NAT_SOURCES)?,
                take(ebpf, lb_common::maps::ADDR_FILTER)?,
                epoch.another()?,
            )?,
            backends: BackendsMap::new(
                take(ebpf, lb_common::maps::BACKENDS)?,
                take(ebpf, lb_common::maps::NEXTHOPS)?,
            )?,
            maglev: MaglevMap::new(take(ebpf, lb_common::maps::MAGLEV)?)?,
            conntrack: ConntrackMap::new(take(ebpf, lb_common::maps::CONNTRACK)?, epoch)?,
            globals: GlobalsMap::new(take(ebpf, lb_common::maps::GLOBALS)?)?,
            traffic: TrafficMaps::new(
                take(ebpf, lb_common::maps::SERVICE_STATS)?,
                take(ebpf, lb_common::maps::BACKEND_STATS)?,
                take(ebpf, lb_common::maps::SYN_STATS)?,
            )?,
            tx_ports: TxPortsMap::new(take(ebpf, lb_common::maps::TX_PORTS)?)?,
            firewall: FirewallMaps::new(
                take(ebpf, lb_common::maps::FW_ACTIVE)?,
                take(ebpf, lb_common::maps::FW_META)?,
                take(ebpf, lb_common::maps::FW_RULES)?,
                take(ebpf, lb_common::maps::FW_SRC_V4)?,
                take(ebpf, lb_common::maps::FW_SRC_V6)?,
                take(ebpf, lb_common::maps::FW_DST_V4)?,
                take(ebpf, lb_common::maps::FW_DST_V6)?,
                take(ebpf, lb_common::maps::FW_SRC_FILTER)?,
                take(ebpf, lb_common::maps::FW_PORTS)?,
                take(ebpf, lb_common::maps::FW_COUNTERS)?,
            )?,
            firewall_events: Some(FirewallEvents(typed(
                lb_common::maps::FW_EVENTS,
                take(ebpf, lb_common::maps::FW_EVENTS)?,
            )?)),
            relay: Some(RelayMaps::new(
                take(ebpf, lb_common::maps::PASSTHROUGH_LISTENERS)?,
                take(ebpf, lb_common::maps::RELAY_SOCKETS)?,
                take(ebpf, lb_common::maps::RELAY_PEERS)?,
                take(ebpf, lb_common::maps::RELAY_BYTES)?,
            )?),
        })
    }
}

impl Maps {
    /// Everything the daemon writes, rendered deterministically: two equal fingerprints mean
    /// the configuration maps hold the same bytes (tests compare them around rejected
    /// changes). Maglev tables are summarised by a hash of their contents.
    pub fn fingerprint(&self) -> Result<String, MapError> {
        use std::{
            fmt::Write as _,
            hash::{Hash as _, Hasher as _},
        };
        let mut out = String::new();
        let mut services = self.services.entries()?;
        services.sort_by_key(|(k, _)| (k.family, k.addr, k.proto, k.port));
        for (key, service) in &services {
            let _ = writeln!(out, "service {key:?} = {service:?}");
            let table = self.maglev.table(service.id)?;
            let mut hasher = std::collections::hash_map::DefaultHasher::new();
            table.hash(&mut hasher);
            let _ = writeln!(
                out,
                "maglev {} = {} slots, hash {:016x}",
                service.id,
                table.as_ref().map_or(0, Vec::len),
                hasher.finish()
            );
        }
        let (mut vips, mut nat) = self.services.addresses()?;
        vips.sort();
        nat.sort();
        let _ = writeln!(out, "vips {vips:?}\nnat_sources {nat:?}");
        for id in 0..lb_common::service::MAX_BACKENDS {
            let backend = self.backends.get(id)?;
            let hop = self.backends.next_hop(id)?;
            if backend != lb_common::service::Backend::default()
                || hop != lb_common::service::NextHop::default()
            {
                let _ = writeln!(out, "backend {id} = {backend:?} via {hop:?}");
            }
        }
        let mut ports = self.tx_ports.ifindexes();
        ports.sort_unstable();
        let _ = writeln!(out, "globals {:?}\ntx_ports {ports:?}", self.globals.get()?);
        let fw = &self.firewall;
        let _ = writeln!(out, "firewall active {:?}", fw.active()?);
        for generation in 0..2 {
            let _ = writeln!(out, "firewall meta {generation} {:?}", fw.meta(generation)?);
            for i in 0..lb_common::firewall::MAX_RULES {
                let rule = fw.rule(generation, i)?;
                if rule != lb_common::firewall::FwRule::default() {
                    let _ = writeln!(out, "firewall rule {generation}/{i} {rule:?}");
                }
            }
            for direction in [firewall::Direction::Source, firewall::Direction::Destination] {
                let _ = writeln!(
                    out,
                    "firewall {direction:?} {generation} {:?}",
                    fw.prefixes(direction, generation)?
                );
            }
        }
        Ok(out)
    }
}

/// How [`wait_for_program_runs`] waited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Waited {
    /// For an RCU grace period: every program run that began before the call has ended.
    GracePeriod,
    /// For a fixed pause, the kernel having refused to wait for a grace period.
    Pause,
}

/// How long [`wait_for_program_runs`] pauses where the kernel will not wait for a grace
/// period: orders of magnitude longer than a program run (microseconds, never sleeping).
const PROGRAM_RUN_PAUSE: std::time::Duration = std::time::Duration::from_millis(50);

/// Waits until every data-path program run that may have read a map before the call has
/// ended, so that what a switch made unreachable (the firewall's old generation) can be
/// rewritten without a packet reading it half-written. XDP programs run inside RCU
/// read-side critical sections, and `membarrier(MEMBARRIER_CMD_GLOBAL)` waits for an RCU
/// grace period (the kernel implements it with `synchronize_rcu`: a few milliseconds). A
/// kernel booted with `nohz_full` refuses that command: there, a fixed pause.
pub fn wait_for_program_runs() -> Waited {
    const MEMBARRIER_CMD_GLOBAL: libc::c_long = 1;
    // SAFETY: a system call without pointer arguments.
    if unsafe { libc::syscall(libc::SYS_membarrier, MEMBARRIER_CMD_GLOBAL, 0) } == 0 {
        return Waited::GracePeriod;
    }
    std::thread::sleep(PROGRAM_RUN_PAUSE);
    Waited::Pause
}

fn take(ebpf: &mut Ebpf, name: &'static str) -> Result<Map, MapError> {
    ebpf.take_map(name).ok_or(MapError::Missing { name })
}

/// Converts a generic map into its typed wrapper, naming it in the error.
fn typed<T>(name: &'static str, map: Map) -> Result<T, MapError>
where
    T: TryFrom<Map, Error = aya::maps::MapError>,
{
    T::try_from(map).map_err(|source| MapError::Layout { name, source })
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_kernel_waits_for_a_grace_period() {
        // The firewall's switch relies on it before emptying the old generation; the pause
        // is only for kernels booted with `nohz_full`, which these machines are not.
        assert_eq!(super::wait_for_program_runs(), super::Waited::GracePeriod);
    }
}
