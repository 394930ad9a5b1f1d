//! `BACKENDS` and `NEXTHOPS`: every backend's address and port, and where its packets go.

use aya::maps::{Array, Map, MapData};
use lb_common::{
    maps,
    service::{Backend, NextHop},
};

use super::{MapError, typed};

pub struct BackendsMap {
    backends: Array<MapData, Backend>,
    nexthops: Array<MapData, NextHop>,
}

impl std::fmt::Debug for BackendsMap {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BackendsMap").finish_non_exhaustive()
    }
}

impl BackendsMap {
    pub(crate) fn new(backends: Map, nexthops: Map) -> Result<Self, MapError> {
        Ok(Self {
            backends: typed(maps::BACKENDS, backends)?,
            nexthops: typed(maps::NEXTHOPS, nexthops)?,
        })
    }

    /// Writes backend `id`.
    pub fn set(&mut self, id: u32, backend: &Backend) -> Result<(), MapError> {
        self.backends
            .set(id, backend, 0)
            .map_err(|source| MapError::Update { name: maps::BACKENDS, source })
    }

    /// Clears backend `id` (and its next hop).
    pub fn clear(&mut self, id: u32) -> Result<(), MapError> {
        self.set(id, &Backend::default())?;
        self.set_next_hop(id, &NextHop::default())
    }

    pub fn get(&self, id: u32) -> Result<Backend, MapError> {
        self.backends
            .get(&id, 0)
            .map_err(|source| MapError::Access { name: maps::BACKENDS, source })
    }

    /// Writes where backend `id`'s packets go.
    pub fn set_next_hop(&mut self, id: u32, hop: &NextHop) -> Result<(), MapError> {
        self.nexthops
            .set(id, hop, 0)
            .map_err(|source| MapError::Update { name: maps::NEXTHOPS, source })
    }

    pub fn next_hop(&self, id: u32) -> Result<NextHop, MapError> {
        self.nexthops
            .get(&id, 0)
            .map_err(|source| MapError::Access { name: maps::NEXTHOPS, source })
    }
}
