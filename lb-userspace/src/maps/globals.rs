//! `GLOBALS`: the data path's settings (timeouts, hash seed), one entry.

use aya::maps::{Array, Map, MapData};
use lb_common::{maps, service::Globals};

use super::{MapError, typed};

pub struct GlobalsMap {
    map: Array<MapData, Globals>,
}

impl std::fmt::Debug for GlobalsMap {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GlobalsMap").finish_non_exhaustive()
    }
}

impl GlobalsMap {
    pub(crate) fn new(map: Map) -> Result<Self, MapError> {
        Ok(Self { map: typed(maps::GLOBALS, map)? })
    }

    pub fn get(&self) -> Result<Globals, MapError> {
        self.map.get(&0, 0).map_err(|source| MapError::Access { name: maps::GLOBALS, source })
    }

    pub fn set(&mut self, globals: &Globals) -> Result<(), MapError> {
        self.map
            .set(0, globals, 0)
            .map_err(|source| MapError::Update { name: maps::GLOBALS, source })
    }
}
