//! Names and capacities of every BPF map, defined once for both sides.
//!
//! Userspace finds maps by these names (never by string literals of its own). A map whose
//! layout changes while it may be pinned gets a new versioned name, so a daemon never misreads
//! a map left behind by an older build.

/// Per-CPU array of [`crate::Counter`]: verdict and reason counters (see [`crate::stats`]).
pub const STATS: &str = "STATS";
/// Hash of [`crate::service::ServiceKey`] to [`crate::service::Service`].
pub const SERVICES: &str = "SERVICES";
/// Array of [`crate::service::Backend`], indexed by backend id.
pub const BACKENDS: &str = "BACKENDS";
/// Array of maps: service id to that service's Maglev table (array of backend ids).
pub const MAGLEV: &str = "MAGLEV";
/// LRU hash of [`crate::FlowKey`] to [`crate::conntrack::Flow`].
pub const CONNTRACK: &str = "CONNTRACK";
/// Array of [`crate::service::NextHop`] per backend id (resolved and written by the daemon).
pub const NEXTHOPS: &str = "NEXTHOPS";
/// Per-CPU array of [`crate::flowcache::CachedFlow`]: the flow cache (see
/// [`crate::flowcache`]). Not pinned: a new load starts with an empty cache.
pub const FLOW_CACHE: &str = "FLOW_CACHE";
/// Per-CPU array of [`crate::service::CachedService`]: the service cache (see
/// [`crate::service::CachedService`]). Not pinned.
pub const SERVICE_CACHE: &str = "SERVICE_CACHE";
/// Array of u32 by NAT port (host order): a new random generation written by the data path
/// whenever a flow takes the port, so a flow-cache copy of another flow on that port stops being used. Pinned: while
/// a restarted daemon swaps interfaces over one by one, the old and the new program share
/// it as they share the table.
pub const NAT_PORT_GEN: &str = "NAT_PORT_GEN";
/// Single-entry array of a u32: the epoch of both caches, bumped by the daemon after it
/// removes flows or writes `SERVICES` (pinned, so a bump reaches the program still attached
/// during a restart too).
pub const CACHE_EPOCH: &str = "CACHE_EPOCH";
/// Single-entry array of [`crate::service::Globals`].
pub const GLOBALS: &str = "GLOBALS";
/// Per-CPU arrays of [`crate::service::TrafficCounter`] by service id and by backend id.
pub const SERVICE_STATS: &str = "SERVICE_STATS";
pub const BACKEND_STATS: &str = "BACKEND_STATS";
/// Per-CPU array of [`crate::service::SynCounter`] by service id.
pub const SYN_STATS: &str = "SYN_STATS";
/// Device map of the interfaces `XDP_REDIRECT` may send to, keyed by ifindex.
pub const TX_PORTS: &str = "TX_PORTS";
/// Set of service addresses ([`crate::service::AddrKey`] to service count).
pub const VIPS: &str = "VIPS";
/// Set of NAT source addresses ([`crate::service::AddrKey`] to service count).
pub const NAT_SOURCES: &str = "NAT_SOURCES";
/// Array of u64 words: a bitmap over [`crate::service::addr_filter_bit`] of every VIP and NAT
/// source address.
pub const ADDR_FILTER: &str = "ADDR_FILTER";

/// Firewall: the active generation and whether the firewall is on (one u32, see
/// [`crate::firewall`]).
pub const FW_ACTIVE: &str = "FW_ACTIVE";
/// Array of [`crate::firewall::FwMeta`], one per generation.
pub const FW_META: &str = "FW_META";
/// Array of [`crate::firewall::FwRule`], [`crate::firewall::MAX_RULES`] per generation.
pub const FW_RULES: &str = "FW_RULES";
/// LPM tries of source and destination prefixes to rule bits, per family.
pub const FW_SRC_V4: &str = "FW_SRC_V4";
pub const FW_SRC_V6: &str = "FW_SRC_V6";
pub const FW_DST_V4: &str = "FW_DST_V4";
pub const FW_DST_V6: &str = "FW_DST_V6";
/// Array of [`crate::firewall::FilterChunk`]s by generation: the source prefilter (see
/// [`crate::firewall::FILTER_V4_16`]).
pub const FW_SRC_FILTER: &str = "FW_SRC_FILTER";
/// Array of rule bits by generation, protocol class and destination port.
pub const FW_PORTS: &str = "FW_PORTS";
/// Per-CPU array of [`crate::Counter`] by generation and rule (then default and audit).
pub const FW_COUNTERS: &str = "FW_COUNTERS";
/// LRU hash of [`crate::firewall::RateKey`] to [`crate::firewall::Bucket`].
pub const FW_RATE: &str = "FW_RATE";
/// Ring buffer of [`crate::firewall::FwEvent`]s (sampled rule matches), and the per-CPU
/// token bucket that caps them.
pub const FW_EVENTS: &str = "FW_EVENTS";
pub const FW_LOG_BUDGET: &str = "FW_LOG_BUDGET";

/// TLS passthrough (see [`crate::passthrough`]), never pinned: they hold the daemon's own
/// sockets, which do not outlive it. Socket hash of [`crate::passthrough::ListenerKey`] to the
/// daemon's listening sockets, for the `sk_lookup` program.
pub const PASSTHROUGH_LISTENERS: &str = "PASSTHROUGH_LISTENERS";
/// Socket hash of [`crate::passthrough::RelayKey`] to that connection's own socket: the
/// stream-verdict program is attached to this map, so a socket in it has its bytes relayed.
pub const RELAY_SOCKETS: &str = "RELAY_SOCKETS";
/// Socket hash of [`crate::passthrough::RelayKey`] to the socket that receives what arrives on
/// the keyed connection (its partner); no program attached.
pub const RELAY_PEERS: &str = "RELAY_PEERS";
/// Per-CPU hash of [`crate::passthrough::RelayKey`] to the bytes relayed from that connection
/// (u64).
pub const RELAY_BYTES: &str = "RELAY_BYTES";

/// Version of the maps' layouts as a whole: pinned maps live under `maps-v<this>`, so a build
/// whose keys or values changed never reads maps pinned by another. Bump it with any change
/// to a pinned map's key, value, type or flags.
pub const MAPS_LAYOUT_VERSION: u32 = 2;

/// Maps pinned under bpffs so they outlive the daemon (scratch maps are not).
pub const PINNED: &[&str] = &[
    STATS,
    SERVICES,
    VIPS,
    NAT_SOURCES,
    ADDR_FILTER,
    BACKENDS,
    NEXTHOPS,
    MAGLEV,
    CONNTRACK,
    CACHE_EPOCH,
    NAT_PORT_GEN,
    GLOBALS,
    SERVICE_STATS,
    BACKEND_STATS,
    SYN_STATS,
    TX_PORTS,
    FW_ACTIVE,
    FW_META,
    FW_RULES,
    FW_SRC_V4,
    FW_SRC_V6,
    FW_DST_V4,
    FW_DST_V6,
    FW_SRC_FILTER,
    FW_PORTS,
    FW_COUNTERS,
    FW_RATE,
];
