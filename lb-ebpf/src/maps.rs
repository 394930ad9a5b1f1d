//! Every map of the data path. Names, capacities and value types come from `lb_common`.
//!
//! The daemon writes every map but `STATS`, the counter maps, `CONNTRACK`, the caches and
//! `NAT_PORT_GEN`, which only the data path writes (the daemon reads the counters and the
//! table, and removes expired connection pairs).

use aya_ebpf::{
    bindings::BPF_F_INNER_MAP,
    btf_maps::{
        Array, ArrayOfMaps, DevMapHash, HashMap, LpmTrie, LruHashMap, PerCpuArray, PerCpuHashMap,
        RingBuf, SockHash,
    },
    macros::btf_map,
};
use lb_common::{
    Counter, FlowKey,
    conntrack::Flow,
    firewall::{
        Bucket, COUNTER_SLOTS, EVENTS_BYTES, FilterChunk, FwEvent, FwMeta, FwRule, FwV4, FwV6,
        MAX_PREFIXES, MAX_RULES, PORTS_ENTRIES, RATE_ENTRIES, RateKey, RuleBits,
        SRC_FILTER_ENTRIES,
    },
    flowcache::{CachedFlow, FLOW_CACHE_SLOTS},
    maglev::DEFAULT_TABLE_SIZE,
    passthrough::{ListenerKey, MAX_LISTENERS, MAX_RELAYS, RelayKey},
    service::{
        ADDR_FILTER_WORDS, AddrKey, Backend, CachedService, DEFAULT_CONNTRACK_ENTRIES, Globals,
        MAX_BACKENDS, MAX_NAT_SOURCES, MAX_SERVICES, MAX_TX_PORTS, NextHop, SERVICE_CACHE_SLOTS,
        Service, ServiceKey, SynCounter, TrafficCounter,
    },
    stats::STATS_SLOTS,
};

const SERVICES_N: usize = MAX_SERVICES as usize;
const BACKENDS_N: usize = MAX_BACKENDS as usize;

/// Verdict and reason counters; layout in `lb_common::stats`.
#[btf_map]
pub static STATS: PerCpuArray<Counter, { STATS_SLOTS as usize }> = PerCpuArray::new();

/// Services by address, protocol and port (port 0: every port).
#[btf_map]
pub static SERVICES: HashMap<ServiceKey, Service, SERVICES_N> = HashMap::new();

/// Addresses with at least one service (for fragments, which may carry no ports).
#[btf_map]
pub static VIPS: HashMap<AddrKey, u32, SERVICES_N> = HashMap::new();

/// Addresses NAT services use as their source; replies to them are looked up in `CONNTRACK`.
#[btf_map]
pub static NAT_SOURCES: HashMap<AddrKey, u32, { MAX_NAT_SOURCES as usize }> = HashMap::new();

/// Bits of every VIP and NAT source address (see `lb_common::service::addr_filter_bit`).
#[btf_map]
pub static ADDR_FILTER: Array<u64, { ADDR_FILTER_WORDS as usize }> = Array::new();

/// Backends by id.
#[btf_map]
pub static BACKENDS: Array<Backend, BACKENDS_N> = Array::new();

/// Next hop (egress interface and MAC addresses) of each backend, resolved by the daemon.
#[btf_map]
pub static NEXTHOPS: Array<NextHop, BACKENDS_N> = Array::new();

/// Service id to the service's Maglev table. Inner tables may have any size
/// (`BPF_F_INNER_MAP`); each service's size is in its `Service::table_size`.
#[btf_map]
pub static MAGLEV: ArrayOfMaps<
    Array<u32, { DEFAULT_TABLE_SIZE as usize }, { BPF_F_INNER_MAP as usize }>,
    SERVICES_N,
> = ArrayOfMaps::new();

/// Connection table; one shared LRU so both directions of a NAT flow are visible from every
/// CPU. The daemon may resize it at load time.
#[btf_map]
pub static CONNTRACK: LruHashMap<FlowKey, Flow, { DEFAULT_CONNTRACK_ENTRIES as usize }> =
    LruHashMap::new();

/// The flow cache in front of `CONNTRACK` (see `lb_common::flowcache`), the service cache in
/// front of `SERVICES` (see `lb_common::service::CachedService`), and their epoch, which the
/// daemon bumps after removing flows or writing services.
#[btf_map]
pub static FLOW_CACHE: PerCpuArray<CachedFlow, { FLOW_CACHE_SLOTS as usize }> = PerCpuArray::new();
#[btf_map]
pub static SERVICE_CACHE: PerCpuArray<CachedService, { SERVICE_CACHE_SLOTS as usize }> =
    PerCpuArray::new();
#[btf_map]
pub static CACHE_EPOCH: Array<u32, 1> = Array::new();
/// A generation per NAT port, a new random value whenever a flow takes the port (see
/// `lb_common::maps::NAT_PORT_GEN`).
#[btf_map]
pub static NAT_PORT_GEN: Array<u32, 65_536> = Array::new();

/// Settings from the daemon (timeouts, hash seed).
#[btf_map]
pub static GLOBALS: Array<Globals, 1> = Array::new();

/// Traffic per service and per backend.
#[btf_map]
pub static SERVICE_STATS: PerCpuArray<TrafficCounter, SERVICES_N> = PerCpuArray::new();
#[btf_map]
pub static BACKEND_STATS: PerCpuArray<TrafficCounter, BACKENDS_N> = PerCpuArray::new();
/// SYN and SYN-cookie counters per service.
#[btf_map]
pub static SYN_STATS: PerCpuArray<SynCounter, SERVICES_N> = PerCpuArray::new();

/// Interfaces `XDP_REDIRECT` may send to, keyed by ifindex.
#[btf_map]
pub static TX_PORTS: DevMapHash<{ MAX_TX_PORTS as usize }> = DevMapHash::new();

/// Firewall (see `lb_common::firewall`): the active generation, per-generation settings and
/// rules, the prefix tries, the port array, rule counters and rate-limit buckets.
#[btf_map]
pub static FW_ACTIVE: Array<u32, 1> = Array::new();
#[btf_map]
pub static FW_META: Array<FwMeta, 2> = Array::new();
#[btf_map]
pub static FW_RULES: Array<FwRule, { 2 * MAX_RULES }> = Array::new();
#[btf_map]
pub static FW_SRC_V4: LpmTrie<FwV4, RuleBits, { MAX_PREFIXES as usize }> = LpmTrie::new();
#[btf_map]
pub static FW_SRC_V6: LpmTrie<FwV6, RuleBits, { MAX_PREFIXES as usize }> = LpmTrie::new();
#[btf_map]
pub static FW_DST_V4: LpmTrie<FwV4, RuleBits, { MAX_PREFIXES as usize }> = LpmTrie::new();
#[btf_map]
pub static FW_DST_V6: LpmTrie<FwV6, RuleBits, { MAX_PREFIXES as usize }> = LpmTrie::new();
#[btf_map]
pub static FW_SRC_FILTER: Array<FilterChunk, { SRC_FILTER_ENTRIES as usize }> = Array::new();
#[btf_map]
pub static FW_PORTS: Array<RuleBits, { PORTS_ENTRIES as usize }> = Array::new();
#[btf_map]
pub static FW_COUNTERS: PerCpuArray<Counter, { 2 * COUNTER_SLOTS as usize }> = PerCpuArray::new();
/// One shared LRU: a source's bucket is the same on every CPU.
#[btf_map]
pub static FW_RATE: LruHashMap<RateKey, Bucket, { RATE_ENTRIES as usize }> = LruHashMap::new();

/// Sampled rule matches for the daemon's log, capped per CPU by `FW_LOG_BUDGET`.
#[btf_map]
pub static FW_EVENTS: RingBuf<FwEvent, { EVENTS_BYTES as usize }> = RingBuf::new();
#[btf_map]
pub static FW_LOG_BUDGET: PerCpuArray<Bucket, 1> = PerCpuArray::new();

/// TLS passthrough: the daemon's listening sockets by service address and port.
#[btf_map]
pub static PASSTHROUGH_LISTENERS: SockHash<ListenerKey, { MAX_LISTENERS as usize }> =
    SockHash::new();
/// TLS passthrough: each relayed socket under its own connection's key; the relay's
/// stream-verdict program is attached here.
#[btf_map]
pub static RELAY_SOCKETS: SockHash<RelayKey, { 2 * MAX_RELAYS as usize }> = SockHash::new();
/// TLS passthrough: each relayed socket, under the key of its partner's connection.
#[btf_map]
pub static RELAY_PEERS: SockHash<RelayKey, { 2 * MAX_RELAYS as usize }> = SockHash::new();
/// TLS passthrough: bytes relayed from each connection, per CPU.
#[btf_map]
pub static RELAY_BYTES: PerCpuHashMap<RelayKey, u64, { 2 * MAX_RELAYS as usize }> =
    PerCpuHashMap::new();

/// Values too large for the 512-byte BPF stack, in per-CPU memory: one program run uses them
/// at a time.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct Scratch {
    pub packet: crate::parse::Packet,
    /// A connection-table entry being built.
    pub buf: crate::conntrack::EntryBuf,
    /// The flow being balanced.
    pub live: crate::conntrack::LiveNat,
    /// Headers copied for the SYN-cookie helpers.
    pub cookie: crate::syncookie::CookieBuf,
    /// The firewall's LPM-trie key (an IPv6 key is 28 bytes): here rather than on the
    /// stack of the entry function, whose frame every call chain carries.
    pub fw_key: [u8; 28],
    /// What this packet's connection lookup found in the way of a new flow.
    pub dead: crate::select::DeadFlow,
}

#[btf_map]
pub static SCRATCH: PerCpuArray<Scratch, 1> = PerCpuArray::new();

/// Saved frame heads for the bench-only wrappers (`bench.rs`).
#[btf_map]
pub static BENCH_SAVE: PerCpuArray<crate::bench::BenchSave, 1> = PerCpuArray::new();

/// The tuple whose connection-table entry the "reused tuple" bench wrappers age before each
/// run (written by the bench; `bench.rs`).
#[btf_map]
pub static BENCH_REOPEN: Array<lb_common::FlowKey, 1> = Array::new();
