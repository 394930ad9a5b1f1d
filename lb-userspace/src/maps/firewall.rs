//! The firewall's maps (`FW_*`): generations of rule sets, the prefix tries, the ports
//! array, rule counters and rate-limit buckets. Layout in `lb_common::firewall`.

use aya::maps::{
    Array, Map, MapData, PerCpuArray, PerCpuValues,
    lpm_trie::{Key, LpmTrie},
};
use lb_common::{
    Counter,
    firewall::{
        ACTIVE_ENABLED, ACTIVE_GENERATION, COUNTER_SLOTS, FilterChunk, FwMeta, FwRule, FwV4, FwV6,
        GENERATION_BITS, MAX_RULES, RuleBits, SRC_FILTER_CHUNKS, counter_index,
    },
    maps,
};

use super::{MapError, typed};

/// A prefix of the tries: the address as an integer (`198.18.0.0` is `0xc612_0000`) with
/// its host bits clear, and the prefix length.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Prefix {
    V4 { addr: u32, len: u8 },
    V6 { addr: u128, len: u8 },
}

/// Which trie.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Direction {
    Source,
    Destination,
}

pub struct FirewallMaps {
    active: Array<MapData, u32>,
    meta: Array<MapData, FwMeta>,
    rules: Array<MapData, FwRule>,
    src_v4: LpmTrie<MapData, FwV4, RuleBits>,
    src_v6: LpmTrie<MapData, FwV6, RuleBits>,
    dst_v4: LpmTrie<MapData, FwV4, RuleBits>,
    dst_v6: LpmTrie<MapData, FwV6, RuleBits>,
    src_filter: Array<MapData, FilterChunk>,
    ports: Array<MapData, RuleBits>,
    counters: PerCpuArray<MapData, Counter>,
}

impl std::fmt::Debug for FirewallMaps {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FirewallMaps").finish_non_exhaustive()
    }
}

fn update(name: &'static str) -> impl Fn(aya::maps::MapError) -> MapError {
    move |source| MapError::Update { name, source }
}

fn access(name: &'static str) -> impl Fn(aya::maps::MapError) -> MapError {
    move |source| MapError::Access { name, source }
}

impl FirewallMaps {
    #[allow(clippy::too_many_arguments, reason = "one argument per map")]
    pub(crate) fn new(
        active: Map,
        meta: Map,
        rules: Map,
        src_v4: Map,
        src_v6: Map,
        dst_v4: Map,
        dst_v6: Map,
        src_filter: Map,
        ports: Map,
        counters: Map,
    ) -> Result<Self, MapError> {
        Ok(Self {
            active: typed(maps::FW_ACTIVE, active)?,
            meta: typed(maps::FW_META, meta)?,
            rules: typed(maps::FW_RULES, rules)?,
            src_v4: typed(maps::FW_SRC_V4, src_v4)?,
            src_v6: typed(maps::FW_SRC_V6, src_v6)?,
            dst_v4: typed(maps::FW_DST_V4, dst_v4)?,
            dst_v6: typed(maps::FW_DST_V6, dst_v6)?,
            src_filter: typed(maps::FW_SRC_FILTER, src_filter)?,
            ports: typed(maps::FW_PORTS, ports)?,
            counters: typed(maps::FW_COUNTERS, counters)?,
        })
    }

    /// The active generation and whether the firewall is on.
    pub fn active(&self) -> Result<(u32, bool), MapError> {
        let v = self.active.get(&0, 0).map_err(access(maps::FW_ACTIVE))?;
        Ok((v & ACTIVE_GENERATION, v & ACTIVE_ENABLED != 0))
    }

    /// Switches the data path to `generation` (or turns the firewall off) with one write.
    pub fn set_active(&mut self, generation: u32, enabled: bool) -> Result<(), MapError> {
        let v = (generation & ACTIVE_GENERATION) | if enabled { ACTIVE_ENABLED } else { 0 };
        self.active.set(0, v, 0).map_err(update(maps::FW_ACTIVE))
    }

    pub fn meta(&self, generation: u32) -> Result<FwMeta, MapError> {
        self.meta.get(&(generation & 1), 0).map_err(access(maps::FW_META))
    }

    pub fn set_meta(&mut self, generation: u32, meta: &FwMeta) -> Result<(), MapError> {
        self.meta.set(generation & 1, meta, 0).map_err(update(maps::FW_META))
    }

    pub fn rule(&self, generation: u32, index: usize) -> Result<FwRule, MapError> {
        let i = rule_index(generation, index);
        self.rules.get(&i, 0).map_err(access(maps::FW_RULES))
    }

    pub fn set_rule(
        &mut self,
        generation: u32,
        index: usize,
        rule: &FwRule,
    ) -> Result<(), MapError> {
        let i = rule_index(generation, index);
        self.rules.set(i, rule, 0).map_err(update(maps::FW_RULES))
    }

    pub fn port_bits(&self, index: u32) -> Result<RuleBits, MapError> {
        self.ports.get(&index, 0).map_err(access(maps::FW_PORTS))
    }

    pub fn set_port_bits(&mut self, index: u32, bits: RuleBits) -> Result<(), MapError> {
        self.ports.set(index, bits, 0).map_err(update(maps::FW_PORTS))
    }

    /// A generation's source prefilter as the maps hold it, as words: bit `b` (see
    /// `lb_common::firewall::FILTER_V4_16`) is bit `b % 64` of word `b / 64`.
    pub fn src_filter(&self, generation: u32) -> Result<Vec<u64>, MapError> {
        let base = (generation & 1) * SRC_FILTER_CHUNKS;
        let mut words = Vec::with_capacity(SRC_FILTER_CHUNKS as usize * 64);
        for i in base..base + SRC_FILTER_CHUNKS {
            let chunk = self.src_filter.get(&i, 0).map_err(access(maps::FW_SRC_FILTER))?;
            words.extend_from_slice(&chunk.words);
        }
        Ok(words)
    }

    /// Writes element `index` of a generation's source prefilter: its words `64 × index` to
    /// `64 × index + 63`, as [`Self::src_filter`] numbers them.
    pub fn set_src_filter_chunk(
        &mut self,
        generation: u32,
        index: usize,
        chunk: &FilterChunk,
    ) -> Result<(), MapError> {
        let index = u32::try_from(index).unwrap_or(u32::MAX);
        if index >= SRC_FILTER_CHUNKS {
            let source = aya::maps::MapError::OutOfBounds { index, max_entries: SRC_FILTER_CHUNKS };
            return Err(MapError::Update { name: maps::FW_SRC_FILTER, source });
        }
        let i = (generation & 1) * SRC_FILTER_CHUNKS + index;
        self.src_filter.set(i, chunk, 0).map_err(update(maps::FW_SRC_FILTER))
    }

    /// Writes one prefix's rule bits in a generation's trie.
    pub fn set_prefix(
        &mut self,
        direction: Direction,
        generation: u32,
        prefix: Prefix,
        bits: RuleBits,
    ) -> Result<(), MapError> {
        match prefix {
            Prefix::V4 { addr, len } => {
                let (trie, name) = self.v4(direction);
                trie.insert(&v4_key(generation, addr, len), bits, 0).map_err(update(name))
            }
            Prefix::V6 { addr, len } => {
                let (trie, name) = self.v6(direction);
                trie.insert(&v6_key(generation, addr, len), bits, 0).map_err(update(name))
            }
        }
    }

    /// Removes one prefix from a generation's trie (absent is not an error).
    pub fn remove_prefix(
        &mut self,
        direction: Direction,
        generation: u32,
        prefix: Prefix,
    ) -> Result<(), MapError> {
        let result = match prefix {
            Prefix::V4 { addr, len } => {
                let (trie, name) = self.v4(direction);
                trie.remove(&v4_key(generation, addr, len)).map_err(|e| (e, name))
            }
            Prefix::V6 { addr, len } => {
                let (trie, name) = self.v6(direction);
                trie.remove(&v6_key(generation, addr, len)).map_err(|e| (e, name))
            }
        };
        match result {
            Ok(()) | Err((aya::maps::MapError::KeyNotFound, _)) => Ok(()),
            Err((source, name)) => Err(MapError::Update { name, source }),
        }
    }

    /// Every prefix of a generation's trie with its bits.
    pub fn prefixes(
        &self,
        direction: Direction,
        generation: u32,
    ) -> Result<std::collections::BTreeMap<Prefix, RuleBits>, MapError> {
        let mut out = std::collections::BTreeMap::new();
        let (v4, v6, name) = match direction {
            Direction::Source => (&self.src_v4, &self.src_v6, maps::FW_SRC_V4),
            Direction::Destination => (&self.dst_v4, &self.dst_v6, maps::FW_DST_V4),
        };
        for entry in v4 {
            let (key, bits) = entry.map_err(access(name))?;
            let data = key.data();
            if data.generation == generation & 1 {
                let len =
                    u8::try_from(key.prefix_len().saturating_sub(GENERATION_BITS)).unwrap_or(32);
                out.insert(Prefix::V4 { addr: u32::from_be_bytes(data.addr), len }, bits);
            }
        }
        for entry in v6 {
            let (key, bits) = entry.map_err(access(name))?;
            let data = key.data();
            if data.generation == generation & 1 {
                let len =
                    u8::try_from(key.prefix_len().saturating_sub(GENERATION_BITS)).unwrap_or(128);
                out.insert(Prefix::V6 { addr: u128::from_be_bytes(data.addr), len }, bits);
            }
        }
        Ok(out)
    }

    /// Looks an address up the way the data path does (for tests and `lbctl`).
    pub fn lookup(
        &self,
        direction: Direction,
        generation: u32,
        addr: std::net::IpAddr,
    ) -> Result<Option<RuleBits>, MapError> {
        let result = match (addr, direction) {
            (std::net::IpAddr::V4(a), Direction::Source) => {
                self.src_v4.get(&v4_key(generation, a.to_bits(), 32), 0)
            }
            (std::net::IpAddr::V4(a), Direction::Destination) => {
                self.dst_v4.get(&v4_key(generation, a.to_bits(), 32), 0)
            }
            (std::net::IpAddr::V6(a), Direction::Source) => {
                self.src_v6.get(&v6_key(generation, a.to_bits(), 128), 0)
            }
            (std::net::IpAddr::V6(a), Direction::Destination) => {
                self.dst_v6.get(&v6_key(generation, a.to_bits(), 128), 0)
            }
        };
        match result {
            Ok(bits) => Ok(Some(bits)),
            Err(aya::maps::MapError::KeyNotFound) => Ok(None),
            Err(source) => Err(MapError::Access { name: maps::FW_SRC_V4, source }),
        }
    }

    /// A generation's counter slot, summed over CPUs.
    pub fn counter(&self, generation: u32, slot: u32) -> Result<Counter, MapError> {
        let values = self
            .counters
            .get(&counter_index(generation, slot), 0)
            .map_err(access(maps::FW_COUNTERS))?;
        Ok(values.iter().fold(Counter::default(), |a, b| Counter {
            packets: a.packets + b.packets,
            bytes: a.bytes + b.bytes,
        }))
    }

    /// Zeroes a generation's counters (before it is filled with a new rule set).
    pub fn reset_counters(&mut self, generation: u32) -> Result<(), MapError> {
        let cpus = aya::util::nr_cpus().map_err(|(_, e)| MapError::Cpus(e))?;
        for slot in 0..COUNTER_SLOTS {
            let zeros =
                PerCpuValues::try_from(vec![Counter::default(); cpus]).map_err(MapError::Cpus)?;
            self.counters
                .set(counter_index(generation, slot), zeros, 0)
                .map_err(update(maps::FW_COUNTERS))?;
        }
        Ok(())
    }

    fn v4(
        &mut self,
        direction: Direction,
    ) -> (&mut LpmTrie<MapData, FwV4, RuleBits>, &'static str) {
        match direction {
            Direction::Source => (&mut self.src_v4, maps::FW_SRC_V4),
            Direction::Destination => (&mut self.dst_v4, maps::FW_DST_V4),
        }
    }

    fn v6(
        &mut self,
        direction: Direction,
    ) -> (&mut LpmTrie<MapData, FwV6, RuleBits>, &'static str) {
        match direction {
            Direction::Source => (&mut self.src_v6, maps::FW_SRC_V6),
            Direction::Destination => (&mut self.dst_v6, maps::FW_DST_V6),
        }
    }
}

fn rule_index(generation: u32, index: usize) -> u32 {
    let per_generation = u32::try_from(MAX_RULES).unwrap_or(0);
    (generation & 1) * per_generation + u32::try_from(index.min(MAX_RULES - 1)).unwrap_or(0)
}

fn v4_key(generation: u32, addr: u32, len: u8) -> Key<FwV4> {
    Key::new(
        GENERATION_BITS + u32::from(len),
        FwV4 { generation: generation & 1, addr: addr.to_be_bytes() },
    )
}

fn v6_key(generation: u32, addr: u128, len: u8) -> Key<FwV6> {
    Key::new(
        GENERATION_BITS + u32::from(len),
        FwV6 { generation: generation & 1, addr: addr.to_be_bytes(), _pad: [0; 4] },
    )
}
