//! `SERVICES` and the address sets beside it: `VIPS` (every service address),
//! `NAT_SOURCES` (addresses NAT replies come back to) and `ADDR_FILTER`, the bitmap of both
//! that lets the data path pass other traffic without a lookup.

use aya::maps::{Array, HashMap, Map, MapData};
use lb_common::{
    maps,
    service::{ADDR_FILTER_WORDS, AddrKey, Service, ServiceKey, addr_filter_bit},
};

use super::{CacheEpoch, MapError, typed};

/// An address set's entries: address and the number of services using it.
pub type AddressSet = Vec<(AddrKey, u32)>;

pub struct ServicesMap {
    services: HashMap<MapData, ServiceKey, Service>,
    vips: HashMap<MapData, AddrKey, u32>,
    nat_sources: HashMap<MapData, AddrKey, u32>,
    filter: Array<MapData, u64>,
    /// `ADDR_FILTER` as last read or written: read whole once, then kept in step with every
    /// write, so an apply that moves no address (one runs every second during a slow start)
    /// costs no syscall for it. Dropped when a write fails, to be read again.
    filter_words: Option<Vec<u64>>,
    /// Bumped after every write to `SERVICES`: the data path's service cache holds copies.
    epoch: CacheEpoch,
    /// What this handle last wrote to `SERVICES` per key: rewriting a service unchanged (an
    /// apply rewrites every service, once a second during a slow start) is skipped, and
    /// with it the bump that would empty both caches.
    written: std::collections::HashMap<ServiceKey, Service>,
}

impl std::fmt::Debug for ServicesMap {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServicesMap").finish_non_exhaustive()
    }
}

impl ServicesMap {
    pub(crate) fn new(
        services: Map,
        vips: Map,
        nat_sources: Map,
        filter: Map,
        epoch: CacheEpoch,
    ) -> Result<Self, MapError> {
        Ok(Self {
            services: typed(maps::SERVICES, services)?,
            vips: typed(maps::VIPS, vips)?,
            nat_sources: typed(maps::NAT_SOURCES, nat_sources)?,
            filter: typed(maps::ADDR_FILTER, filter)?,
            filter_words: None,
            epoch,
            written: std::collections::HashMap::new(),
        })
    }

    /// Adds or replaces a service (then drops the data path's cached copies); a service
    /// this handle wrote as it is already is left alone.
    pub fn upsert(&mut self, key: &ServiceKey, service: &Service) -> Result<(), MapError> {
        if self.written.get(key) == Some(service) {
            return Ok(());
        }
        self.written.remove(key);
        let written = self
            .services
            .insert(key, service, 0)
            .map_err(|source| MapError::Update { name: maps::SERVICES, source });
        // Even after a failed write: it may have replaced the entry before failing.
        self.epoch.bump()?;
        written?;
        self.written.insert(*key, *service);
        Ok(())
    }

    /// Removes a service (then drops the data path's cached copies); a missing one is not
    /// an error.
    pub fn remove(&mut self, key: &ServiceKey) -> Result<(), MapError> {
        self.written.remove(key);
        let removed = remove_ok_if_missing(&mut self.services, key, maps::SERVICES);
        self.epoch.bump()?;
        removed
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
        // The filter first when addresses are added, so it never hides one that is in the
        // sets; stale bits only cost a lookup, so it is rewritten whole each time.
        let mut words = vec![0u64; ADDR_FILTER_WORDS as usize];
        for (key, _) in vips.iter().chain(nat_sources) {
            let bit = addr_filter_bit(&key.addr);
            words[(bit >> 6) as usize] |= 1 << (bit & 63);
        }
        // Only ever add bits before the sets change; bits are removed after.
        self.update_filter(&words, |current, word| current | word)?;
        replace_all(&mut self.vips, vips, maps::VIPS)?;
        replace_all(&mut self.nat_sources, nat_sources, maps::NAT_SOURCES)?;
        self.update_filter(&words, |_, word| word)
    }

    /// Sets each `ADDR_FILTER` word to `next(current, wanted)`, writing only the words that
    /// change.
    fn update_filter(
        &mut self,
        wanted: &[u64],
        next: impl Fn(u64, u64) -> u64,
    ) -> Result<(), MapError> {
        let mut current = match self.filter_words.take() {
            Some(words) => words,
            None => (0..ADDR_FILTER_WORDS)
                .map(|i| self.filter.get(&i, 0))
                .collect::<Result<Vec<_>, _>>()
                .map_err(|source| MapError::Access { name: maps::ADDR_FILTER, source })?,
        };
        for ((i, word), want) in (0..ADDR_FILTER_WORDS).zip(current.iter_mut()).zip(wanted) {
            let new = next(*word, *want);
            if new != *word {
                // On failure `filter_words` stays empty: the next call reads the map again.
                self.filter
                    .set(i, new, 0)
                    .map_err(|source| MapError::Update { name: maps::ADDR_FILTER, source })?;
                *word = new;
            }
        }
        self.filter_words = Some(current);
        Ok(())
    }
}

/// Makes `map` hold exactly `entries`: removes the keys not among them first (no key that
/// stays is ever missing: they are only written over), then writes the rest, so the map
/// never holds more than the larger of before and after. Inserting first would need room
/// for both: a start adopting a pinned map full of addresses the configuration dropped
/// would be refused for want of room for the new ones, at every start.
fn replace_all(
    map: &mut HashMap<MapData, AddrKey, u32>,
    entries: &[(AddrKey, u32)],
    name: &'static str,
) -> Result<(), MapError> {
    let stale: Vec<AddrKey> = map
        .keys()
        .filter_map(Result::ok)
        .filter(|k| !entries.iter().any(|(e, _)| e == k))
        .collect();
    for key in stale {
        remove_ok_if_missing(map, &key, name)?;
    }
    for (key, value) in entries {
        map.insert(key, value, 0).map_err(|source| MapError::Update { name, source })?;
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
