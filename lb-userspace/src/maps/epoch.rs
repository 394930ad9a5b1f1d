//! `CACHE_EPOCH`: the epoch of the data path's per-CPU caches (the flow cache and the service
//! cache). A slot filled in another epoch is never used, so bumping it drops every cached
//! copy at once; the map wrappers whose writes a copy could outlive (`ConntrackMap`'s
//! removals, `ServicesMap`'s writes) each hold a handle and bump it after writing.

use aya::maps::{Array, Map, MapData};
use lb_common::maps;

use super::{MapError, typed};

pub struct CacheEpoch {
    map: Array<MapData, u32>,
}

impl std::fmt::Debug for CacheEpoch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CacheEpoch").finish_non_exhaustive()
    }
}

impl CacheEpoch {
    pub(crate) fn new(map: Map) -> Result<Self, MapError> {
        Ok(Self { map: typed(maps::CACHE_EPOCH, map)? })
    }

    /// A second handle on the same map.
    pub(crate) fn another(&self) -> Result<Self, MapError> {
        use aya::maps::IterableMap as _;
        let access = |source| MapError::Access { name: maps::CACHE_EPOCH, source };
        let id = self.map.map().info().map_err(access)?.id();
        Self::new(Map::Array(MapData::from_id(id).map_err(access)?))
    }

    /// The epoch now.
    pub fn get(&self) -> Result<u32, MapError> {
        self.map.get(&0, 0).map_err(|source| MapError::Access { name: maps::CACHE_EPOCH, source })
    }

    /// Moves to the next epoch (skipping zero, which never matches): every slot filled
    /// before is ignored from now on.
    pub fn bump(&mut self) -> Result<(), MapError> {
        let next = lb_common::flowcache::next_epoch(self.get()?);
        self.map
            .set(0, next, 0)
            .map_err(|source| MapError::Update { name: maps::CACHE_EPOCH, source })
    }
}
