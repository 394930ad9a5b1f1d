//! `MAGLEV`: per service, the Maglev table of backend ids, swapped whole.
//!
//! A new table is written into a fresh inner array that no packet can see yet, then the
//! outer entry is switched to it with one map update, so a packet sees either the old table
//! or the new one, never a mix. The old inner array is freed when the last reference (the
//! outer entry, or a program run still using it) goes.

use aya::maps::{Array, ArrayOfMaps, Map, MapData};
use lb_common::maps;

use super::{MapError, typed};

/// `BPF_F_INNER_MAP`: lets inner arrays differ in size from the template, so each service
/// has a table of its own size.
const BPF_F_INNER_MAP: u32 = 0x1000;

/// A filled Maglev table, ready to be switched in.
pub struct Table(Array<MapData, u32>);

impl std::fmt::Debug for Table {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Table").finish_non_exhaustive()
    }
}

pub struct MaglevMap {
    outer: ArrayOfMaps<MapData, Array<MapData, u32>>,
}

impl std::fmt::Debug for MaglevMap {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MaglevMap").finish_non_exhaustive()
    }
}

impl MaglevMap {
    pub(crate) fn new(map: Map) -> Result<Self, MapError> {
        Ok(Self { outer: typed(maps::MAGLEV, map)? })
    }

    /// Installs `table` as service `service_id`'s table in one atomic switch.
    pub fn install(&mut self, service_id: u32, table: &[u32]) -> Result<(), MapError> {
        let table = Self::create(table)?;
        self.set(service_id, &table)
    }

    /// Writes `table` into a fresh inner array no packet sees yet. Services whose tables are
    /// equal (same pool, same size) share one: see [`MaglevMap::set`].
    pub fn create(table: &[u32]) -> Result<Table, MapError> {
        let size = u32::try_from(table.len()).unwrap_or(u32::MAX);
        let mut inner = Array::<MapData, u32>::create(size, BPF_F_INNER_MAP)
            .map_err(|source| MapError::CreateTable { size, source })?;
        for (slot, backend) in (0..size).zip(table) {
            inner
                .set(slot, backend, 0)
                .map_err(|source| MapError::Update { name: maps::MAGLEV, source })?;
        }
        Ok(Table(inner))
    }

    /// Switches service `service_id` to `table` in one map update.
    pub fn set(&mut self, service_id: u32, table: &Table) -> Result<(), MapError> {
        self.outer
            .set(service_id, &table.0, 0)
            .map_err(|source| MapError::Update { name: maps::MAGLEV, source })
    }

    /// Service `service_id`'s current table, if it has one.
    pub fn table(&self, service_id: u32) -> Result<Option<Vec<u32>>, MapError> {
        match self.outer.get(&service_id, 0) {
            Ok(inner) => inner
                .iter()
                .collect::<Result<Vec<u32>, _>>()
                .map(Some)
                .map_err(|source| MapError::Access { name: maps::MAGLEV, source }),
            Err(aya::maps::MapError::KeyNotFound) => Ok(None),
            Err(source) => Err(MapError::Access { name: maps::MAGLEV, source }),
        }
    }
}
