//! Services, backends and their counters: the `SERVICES`, `BACKENDS`, `NEXTHOPS`, `GLOBALS`
//! and per-service/per-backend counter maps.

use crate::{
    conntrack::Timeouts,
    flow::{pair, top_bits},
};

/// Services the data path holds (and entries of the Maglev outer array). Each service is one
/// address, protocol and port; a thousand covers a busy host with room to spare.
pub const MAX_SERVICES: u32 = 1024;
/// Backends across all pools (entries of `BACKENDS` and of the backend counters).
pub const MAX_BACKENDS: u32 = 65_536;
/// Backends in one pool: 10,000 gives every backend 100 slots of the largest Maglev table.
pub const MAX_BACKENDS_PER_POOL: u32 = 10_000;
/// Default `CONNTRACK` capacity: 2^21 entries hold a million NAT flows (two entries each) or
/// two million DSR flows.
pub const DEFAULT_CONNTRACK_ENTRIES: u32 = 2_097_152;

/// `Service::flags`: full NAT (destination and source rewritten); without it, L2 DSR.
pub const SERVICE_NAT: u32 = 0x01;
/// `Service::flags`: hash the source address only (client affinity) instead of the 5-tuple.
pub const SERVICE_HASH_SOURCE: u32 = 0x02;
/// `Service::flags`: SYNs are answered with SYN cookies now (the service's `syn_cookies` is
/// `on`, or `auto` above its SYN rate).
pub const SERVICE_SYN_COOKIES: u32 = 0x04;
/// `Service::flags`: the service may answer with cookies (`auto`): returning ACKs are
/// checked against cookies even while SYNs are not answered with them.
pub const SERVICE_SYN_COOKIES_AUTO: u32 = 0x08;

/// Key of the `SERVICES` map. `port` zero means every port of the address and protocol.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct ServiceKey {
    /// Service (VIP) address, network order; IPv4 in the first word.
    pub addr: [u32; 4],
    /// Network order; 0 for an all-ports service.
    pub port: u16,
    pub proto: u8,
    /// 4 or 6.
    pub family: u8,
}
const _: () = assert!(core::mem::size_of::<ServiceKey>() == 20);
#[cfg(feature = "user")]
// SAFETY: repr(C), no implicit padding.
unsafe impl aya::Pod for ServiceKey {}

/// An address alone: key of the `VIPS` set (addresses with at least one service, consulted for
/// fragments, which carry no ports) and of the `NAT_SOURCES` set (addresses replies come back
/// to).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct AddrKey {
    /// Network order; IPv4 in the first word.
    pub addr: [u32; 4],
    /// 4 or 6 (a whole word: no padding to zero).
    pub family: u32,
}
const _: () = assert!(core::mem::size_of::<AddrKey>() == 20);
#[cfg(feature = "user")]
// SAFETY: repr(C), no padding.
unsafe impl aya::Pod for AddrKey {}

/// Addresses used as NAT sources (one per NAT service at most, usually one per host).
pub const MAX_NAT_SOURCES: u32 = 256;
/// Interfaces `XDP_REDIRECT` may send to.
pub const MAX_TX_PORTS: u32 = 256;

/// Value of the `SERVICES` map.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Service {
    /// Index of the service's Maglev table and counters, `0..MAX_SERVICES`.
    pub id: u32,
    /// `SERVICE_*` bits.
    pub flags: u32,
    /// Slots in the service's Maglev table (prime).
    pub table_size: u32,
    /// First and last NAT source port (host order), for NAT services.
    pub nat_port_min: u16,
    pub nat_port_max: u16,
    /// NAT source address (network order), for NAT services.
    pub nat_addr: [u32; 4],
}
const _: () = assert!(core::mem::size_of::<Service>() == 32);
#[cfg(feature = "user")]
// SAFETY: repr(C), no implicit padding.
unsafe impl aya::Pod for Service {}

impl ServiceKey {
    /// The key's 20 bytes as five 32-bit words, as they lie in memory (the last holds port,
    /// protocol and family; little-endian, as BPF is).
    #[inline(always)]
    #[must_use]
    pub const fn words(&self) -> [u32; 5] {
        let tail = self.port as u32 | (self.proto as u32) << 16 | (self.family as u32) << 24;
        [self.addr[0], self.addr[1], self.addr[2], self.addr[3], tail]
    }
}

/// Slots of the per-CPU service cache (a power of two): 1,024 slots of 64 bytes, 64 KiB a
/// CPU.
pub const SERVICE_CACHE_SLOTS: u32 = 1 << SERVICE_CACHE_BITS;
const SERVICE_CACHE_BITS: u32 = 10;

/// A slot of `SERVICE_CACHE` (per-CPU array): a packet's service key and a copy of the
/// service the `SERVICES` lookup gave it (an exact match, or the address's all-ports
/// service), so that a new flow to a busy service costs an inlined array read instead of
/// the kernel's hash lookup. Used only while its epoch is `CACHE_EPOCH`'s, which the daemon
/// bumps after every write to `SERVICES`; misses are not cached.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CachedService {
    pub key: ServiceKey,
    /// `CACHE_EPOCH` when the slot was filled; zero never matches.
    pub epoch: u32,
    pub service: Service,
    pub _pad: [u32; 2],
}
const _: () = assert!(core::mem::size_of::<CachedService>() == 64);
#[cfg(feature = "user")]
// SAFETY: repr(C), no implicit padding (asserted size), plain integers.
unsafe impl aya::Pod for CachedService {}

/// The service-cache slot of a key given as its [`ServiceKey::words`] (below
/// [`SERVICE_CACHE_SLOTS`]), seeded like the flow hash.
#[inline(always)]
#[must_use]
pub const fn service_slot(w: &[u32; 5], seed: u32) -> u32 {
    let h = (seed as u64) ^ pair(w[0] ^ w[2], w[1] ^ w[3]) ^ (w[4] as u64).rotate_left(29);
    top_bits(h, SERVICE_CACHE_BITS)
}

/// Value of the `BACKENDS` array.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Backend {
    /// Network order; IPv4 in the first word.
    pub addr: [u32; 4],
    /// Network order; 0 keeps the port the client used.
    pub port: u16,
    /// 4 or 6; 0 marks an unused slot.
    pub family: u8,
    /// [`BACKEND_DOWN`] or 0. The data path ignores it: the daemon keeps it here so a
    /// restarted daemon, adopting the pinned maps, knows which backends were failing.
    pub flags: u8,
}

/// `Backend::flags`: the backend fails its health checks. A daemon that adopts the maps
/// keeps such a backend out of the tables until it passes `rise` checks again.
pub const BACKEND_DOWN: u8 = 1;
const _: () = assert!(core::mem::size_of::<Backend>() == 20);

impl Backend {
    /// The port the backend receives a flow to the service port `vip_port` on (both raw
    /// network order): its own, or the client's when it has none.
    #[inline(always)]
    #[must_use]
    pub const fn port_for(&self, vip_port: u16) -> u16 {
        if self.port == 0 { vip_port } else { self.port }
    }
}
#[cfg(feature = "user")]
// SAFETY: repr(C), explicit padding.
unsafe impl aya::Pod for Backend {}

/// Value of the `NEXTHOPS` array: where to send a backend's packets, resolved by the daemon
/// from the kernel's routes and neighbours (so the data path needs no route lookup).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NextHop {
    /// Egress interface; 0 while unresolved.
    pub ifindex: u32,
    /// `NEXTHOP_*` bits.
    pub flags: u32,
    /// MAC of the next hop (the backend itself when on link).
    pub dmac: [u8; 6],
    /// MAC of the egress interface.
    pub smac: [u8; 6],
}
const _: () = assert!(core::mem::size_of::<NextHop>() == 20);
#[cfg(feature = "user")]
// SAFETY: repr(C), no implicit padding.
unsafe impl aya::Pod for NextHop {}

/// `NextHop::flags`: the backend is on a directly attached network (required for L2 DSR).
pub const NEXTHOP_ON_LINK: u32 = 0x01;

/// The single entry of the `GLOBALS` array: settings the daemon writes for the data path.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Globals {
    pub timeouts: Timeouts,
    /// Ticks between refreshes of a live flow's `last_seen`.
    pub refresh: u64,
    /// Seed of the flow hash; the same on every node that must agree on backends.
    pub hash_seed: u32,
    /// `GLOBAL_*` bits.
    pub flags: u32,
}

/// `Globals::flags`: at least one service covers every port of its address, so a packet that
/// matches no (address, protocol, port) service needs a second lookup with port 0.
pub const GLOBAL_ALL_PORTS_SERVICES: u32 = 0x01;
const _: () = assert!(core::mem::size_of::<Globals>() == 56);
#[cfg(feature = "user")]
// SAFETY: repr(C), explicit padding.
unsafe impl aya::Pod for Globals {}

/// Words of the `ADDR_FILTER` bitmap (65,536 bits).
pub const ADDR_FILTER_WORDS: u32 = 1024;

/// The `ADDR_FILTER` bit of an address (`AddrKey` layout: IPv4 in the first word). Every
/// service and NAT source address has its bit set, so a clear bit proves a packet is none of
/// ours without a hash-map lookup (this machine pays dearly for every helper call).
#[inline(always)]
#[must_use]
pub const fn addr_filter_bit(addr: &[u32; 4]) -> u32 {
    let folded =
        addr[0] ^ addr[1].rotate_left(7) ^ addr[2].rotate_left(14) ^ addr[3].rotate_left(21);
    folded.wrapping_mul(0x9e37_79b1) >> 16
}

/// SYN-cookie counters per service (per CPU; the daemon sums them).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SynCounter {
    /// SYNs opening a connection (cookies or not): the rate `auto` mode watches.
    pub syns: u64,
    /// SYN-ACKs with a cookie sent from the data path.
    pub cookies_sent: u64,
    /// ACKs whose cookie was valid: connections handed to a backend.
    pub cookies_valid: u64,
    /// ACKs without a flow whose cookie was not valid (dropped).
    pub cookies_invalid: u64,
}
const _: () = assert!(core::mem::size_of::<SynCounter>() == 32);
#[cfg(feature = "user")]
// SAFETY: repr(C), four u64.
unsafe impl aya::Pod for SynCounter {}

impl SynCounter {
    #[must_use]
    pub const fn plus(self, o: Self) -> Self {
        Self {
            syns: self.syns + o.syns,
            cookies_sent: self.cookies_sent + o.cookies_sent,
            cookies_valid: self.cookies_valid + o.cookies_valid,
            cookies_invalid: self.cookies_invalid + o.cookies_invalid,
        }
    }
}

/// Per-service and per-backend counters (per CPU; the daemon sums them).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TrafficCounter {
    /// Packets and bytes forwarded towards backends.
    pub packets: u64,
    pub bytes: u64,
    /// Connections (or UDP flows) newly assigned.
    pub new_flows: u64,
    /// Reply packets translated back to clients (NAT).
    pub reply_packets: u64,
}
const _: () = assert!(core::mem::size_of::<TrafficCounter>() == 32);
#[cfg(feature = "user")]
// SAFETY: repr(C), plain u64s.
unsafe impl aya::Pod for TrafficCounter {}

impl TrafficCounter {
    #[must_use]
    pub const fn plus(self, o: Self) -> Self {
        Self {
            packets: self.packets.wrapping_add(o.packets),
            bytes: self.bytes.wrapping_add(o.bytes),
            new_flows: self.new_flows.wrapping_add(o.new_flows),
            reply_packets: self.reply_packets.wrapping_add(o.reply_packets),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn service_key_words_are_its_memory_and_slots_spread() {
        let key = ServiceKey {
            addr: [0x0102_0304, 0x0506_0708, 0x090a_0b0c, 0x0d0e_0f10],
            port: 0x1112,
            proto: 0x13,
            family: 0x14,
        };
        // SAFETY: `ServiceKey` is 20 bytes of plain integers without implicit padding.
        let bytes: [u8; 20] = unsafe { core::mem::transmute(key) };
        let words: std::vec::Vec<u8> = key.words().iter().flat_map(|w| w.to_le_bytes()).collect();
        assert_eq!(words, bytes);
        // 256 ports of one address and 256 addresses on one port: few share a slot.
        for keys in [
            (0..256u16)
                .map(|p| ServiceKey {
                    port: p.to_be(),
                    proto: 6,
                    family: 4,
                    ..ServiceKey::default()
                })
                .collect::<std::vec::Vec<_>>(),
            (0..=u8::MAX)
                .map(|a| ServiceKey {
                    addr: [u32::from_be_bytes([198, 18, 100, a]), 0, 0, 0],
                    port: 443u16.to_be(),
                    proto: 6,
                    family: 4,
                })
                .collect(),
        ] {
            let slots: std::collections::HashSet<u32> =
                keys.iter().map(|k| service_slot(&k.words(), 9)).collect();
            assert!(slots.iter().all(|s| *s < SERVICE_CACHE_SLOTS));
            assert!(slots.len() > 200, "{} slots for 256 services", slots.len());
        }
    }

    #[test]
    fn addr_filter_bits_stay_in_the_bitmap_and_spread() {
        let mut seen = std::collections::HashSet::new();
        for i in 0..4096u32 {
            let [_, _, hi, lo] = i.to_be_bytes();
            let v4 = [u32::from_be_bytes([198, 18, hi, lo]), 0, 0, 0];
            let bit = addr_filter_bit(&v4);
            assert!(bit < ADDR_FILTER_WORDS * 64);
            seen.insert(bit);
        }
        // 4,096 neighbouring addresses land on nearly as many bits (few collisions).
        assert!(seen.len() > 3900, "{}", seen.len());
        let v6 = [0xfd00_0000u32.to_be(), 0, 0, 1u32.to_be()];
        assert!(addr_filter_bit(&v6) < ADDR_FILTER_WORDS * 64);
    }
}
