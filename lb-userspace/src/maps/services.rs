//! `SERVICES` and the address sets beside it: `VIPS` (every service address) and
//! `NAT_SOURCES` (addresses NAT replies come back to).

use aya::maps::{HashMap, Map, MapData};
use lb_common::{
    maps,
    service::{AddrKey, Service, ServiceKey},
};

use super::{MapError, typed};

/// An address set's entries: address and the number of services using it.
pub type AddressSet = Vec<(AddrKey, u32)>;

pub struct ServicesMap {
    services: HashMap<MapData, ServiceKey, Service>,
    vips: HashMap<MapData, AddrKey, u32>,
    nat_sources: HashMap<MapData, AddrKey, u32>,
}

impl std::fmt::Debug for ServicesMap {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServicesMap").finish_non_exhaustive()
    }
}

impl ServicesMap {
    pub(crate) fn new(services: Map, vips: Map, nat_sources: Map) -> Result<Self, MapError> {
        Ok(Self {
            services: typed(maps::SERVICES, services)?,
            vips: typed(maps::VIPS, vips)?,
            nat_sources: typed(maps::NAT_SOURCES, nat_sources)?,
        })
    }

    /// Adds or replaces a service.
    pub fn upsert(&mut self, key: &ServiceKey, service: &Service) -> Result<(), MapError> {
        self.services
            .insert(key, service, 0)
            .map_err(|source| MapError::Update { name: maps::SERVICES, source })
    }

    /// Removes a service; a missing one is not an error.
    pub fn remove(&mut self, key: &ServiceKey) -> Result<(), MapError> {
        remove_ok_if_missing(&mut self.services, key, maps::SERVICES)
    }

    /// Every service in the map.
    pub fn entries(&self) -> Result<Vec<(ServiceKey, Service)>, MapError> {
        self.services
            .iter()
            .collect::<Result<Vec<_>, _>>()
            .map_err(|source| MapError::Access { name: maps::SERVICES, source })
    }

    /// The address sets' entries (VIPS, then NAT_SOURCES), for inspection.
    pub fn addresses(&self) -> Result<(AddressSet, AddressSet), MapError> {
        let vips = self
            .vips
            .iter()
            .collect::<Result<Vec<_>, _>>()
            .map_err(|source| MapError::Access { name: maps::VIPS, source })?;
        let nat = self
            .nat_sources
            .iter()
            .collect::<Result<Vec<_>, _>>()
            .map_err(|source| MapError::Access { name: maps::NAT_SOURCES, source })?;
        Ok((vips, nat))
    }

    /// Replaces the address sets with exactly `vips` and `nat_sources` (address, service count).
    pub fn set_addresses(
        &mut self,
        vips: &[(AddrKey, u32)],
        nat_sources: &[(AddrKey, u32)],
    ) -> Result<(), MapError> {
        replace_all(&mut self.vips, vips, maps::VIPS)?;
        replace_all(&mut self.nat_sources, nat_sources, maps::NAT_SOURCES)
    }
}

/// Makes `map` hold exactly `entries`: inserts first, then removes the rest, so a key that
/// stays is never missing in between.
fn replace_all(
    map: &mut HashMap<MapData, AddrKey, u32>,
    entries: &[(AddrKey, u32)],
    name: &'static str,
) -> Result<(), MapError> {
    for (key, value) in entries {
        map.insert(key, value, 0).map_err(|source| MapError::Update { name, source })?;
    }
    let stale: Vec<AddrKey> = map
        .keys()
        .filter_map(Result::ok)
        .filter(|k| !entries.iter().any(|(e, _)| e == k))
        .collect();
    for key in stale {
        remove_ok_if_missing(map, &key, name)?;
    }
    Ok(())
}

fn remove_ok_if_missing<K: aya::Pod, V: aya::Pod>(
    map: &mut HashMap<MapData, K, V>,
    key: &K,
    name: &'static str,
) -> Result<(), MapError> {
    match map.remove(key) {
        Ok(()) | Err(aya::maps::MapError::KeyNotFound) => Ok(()),
        Err(aya::maps::MapError::SyscallError(e))
            if e.io_error.raw_os_error() == Some(libc::ENOENT) =>
        {
            Ok(())
        }
        Err(source) => Err(MapError::Update { name, source }),
    }
}
