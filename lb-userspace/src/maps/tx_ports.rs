//! `TX_PORTS`: the interfaces `XDP_REDIRECT` may send to.

use aya::maps::{Map, MapData, xdp::DevMapHash};
use lb_common::maps;

use super::{MapError, typed};

pub struct TxPortsMap {
    map: DevMapHash<MapData>,
}

impl std::fmt::Debug for TxPortsMap {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TxPortsMap").finish_non_exhaustive()
    }
}

impl TxPortsMap {
    pub(crate) fn new(map: Map) -> Result<Self, MapError> {
        Ok(Self { map: typed(maps::TX_PORTS, map)? })
    }

    /// Lets the data path redirect to the interface `ifindex`.
    pub fn add(&mut self, ifindex: u32) -> Result<(), MapError> {
        self.map
            .insert(ifindex, ifindex, None, 0)
            .map_err(|source| MapError::Devmap { name: maps::TX_PORTS, source })
    }

    /// The interfaces currently in the map.
    pub fn ifindexes(&self) -> Vec<u32> {
        self.map.keys().filter_map(Result::ok).collect()
    }
}
