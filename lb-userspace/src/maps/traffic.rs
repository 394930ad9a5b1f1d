//! `SERVICE_STATS` and `BACKEND_STATS`: per-CPU traffic counters by service and backend id.

use aya::maps::{Map, MapData, PerCpuArray, PerCpuValues};
use lb_common::{
    maps,
    service::{SynCounter, TrafficCounter},
};

use super::{MapError, typed};

pub struct TrafficMaps {
    services: PerCpuArray<MapData, TrafficCounter>,
    backends: PerCpuArray<MapData, TrafficCounter>,
    syn: PerCpuArray<MapData, SynCounter>,
}

impl std::fmt::Debug for TrafficMaps {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TrafficMaps").finish_non_exhaustive()
    }
}

impl TrafficMaps {
    pub(crate) fn new(services: Map, backends: Map, syn: Map) -> Result<Self, MapError> {
        Ok(Self {
            services: typed(maps::SERVICE_STATS, services)?,
            backends: typed(maps::BACKEND_STATS, backends)?,
            syn: typed(maps::SYN_STATS, syn)?,
        })
    }

    /// Service `id`'s SYN and SYN-cookie counters, summed over CPUs.
    pub fn syn(&self, id: u32) -> Result<SynCounter, MapError> {
        sum(&self.syn, id, maps::SYN_STATS)
    }

    /// Service `id`'s counters, summed over CPUs.
    pub fn service(&self, id: u32) -> Result<TrafficCounter, MapError> {
        sum(&self.services, id, maps::SERVICE_STATS)
    }

    /// Backend `id`'s counters, summed over CPUs.
    pub fn backend(&self, id: u32) -> Result<TrafficCounter, MapError> {
        sum(&self.backends, id, maps::BACKEND_STATS)
    }

    /// Zeroes a backend's counters (when its id is given to a new backend).
    pub fn reset_backend(&mut self, id: u32) -> Result<(), MapError> {
        zero(&mut self.backends, id, maps::BACKEND_STATS)
    }

    /// Zeroes a service's counters (when its id is given to a new service).
    pub fn reset_service(&mut self, id: u32) -> Result<(), MapError> {
        zero(&mut self.services, id, maps::SERVICE_STATS)?;
        zero(&mut self.syn, id, maps::SYN_STATS)
    }
}

/// A per-CPU counter: its CPUs' values add up with `plus`.
trait Counter: aya::Pod + Default {
    fn plus(self, other: Self) -> Self;
}

impl Counter for TrafficCounter {
    fn plus(self, other: Self) -> Self {
        Self::plus(self, other)
    }
}

impl Counter for SynCounter {
    fn plus(self, other: Self) -> Self {
        Self::plus(self, other)
    }
}

fn sum<T: Counter>(
    map: &PerCpuArray<MapData, T>,
    id: u32,
    name: &'static str,
) -> Result<T, MapError> {
    let values = map.get(&id, 0).map_err(|source| MapError::Access { name, source })?;
    Ok(values.iter().fold(T::default(), |a, b| Counter::plus(a, *b)))
}

fn zero<T: Counter>(
    map: &mut PerCpuArray<MapData, T>,
    id: u32,
    name: &'static str,
) -> Result<(), MapError> {
    let cpus = aya::util::nr_cpus().map_err(|(_, e)| MapError::Cpus(e))?;
    let values = PerCpuValues::try_from(vec![T::default(); cpus]).map_err(MapError::Cpus)?;
    map.set(id, values, 0).map_err(|source| MapError::Update { name, source })
}
