//! The flow key and the flow hash: what identifies a connection, and the one hash both the
//! data path and the daemon use to pick its backend.
//!
//! Every load-balancer node that runs the same configuration and seed computes the same hash
//! for a flow, so nodes behind ECMP pick the same backend without sharing state.

/// A connection's 5-tuple as seen in one direction; key of the `CONNTRACK` map.
///
/// Addresses are in network byte order, stored as the raw bytes of the header (IPv4 in the
/// first word, the other three zero). Ports are raw network-order `u16` (zero for protocols
/// without ports).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct FlowKey {
    pub src: [u32; 4],
    pub dst: [u32; 4],
    pub sport: u16,
    pub dport: u16,
    pub proto: u8,
    /// 4 or 6.
    pub family: u8,
    /// Explicit padding, zero (an integer rather than a byte array: zeroing an array is a
    /// `memset` call in BPF code).
    pub _pad: u16,
}
const _: () = assert!(core::mem::size_of::<FlowKey>() == 40);
#[cfg(feature = "user")]
// SAFETY: repr(C), no implicit padding (explicit `_pad`), plain integers.
unsafe impl aya::Pod for FlowKey {}

impl FlowKey {
    /// The key of the same flow seen in the other direction.
    #[inline(always)]
    #[must_use]
    pub const fn reversed(&self) -> Self {
        Self {
            src: self.dst,
            dst: self.src,
            sport: self.dport,
            dport: self.sport,
            proto: self.proto,
            family: self.family,
            _pad: 0,
        }
    }
}

/// Multiplier of the mixing step (2^64 / golden ratio, odd).
const GOLDEN: u64 = 0x9e37_79b9_7f4a_7c15;

/// One step over a 64-bit word. 64-bit arithmetic throughout: BPF registers are 64 bits
/// wide, and without ALU32 every 32-bit step would pay extra instructions to clear the upper
/// half.
#[inline(always)]
const fn mix(h: u64, word: u64) -> u64 {
    (h ^ word).wrapping_mul(GOLDEN).rotate_left(29)
}

/// The top `bits` bits of `h` once its halves are folded and multiplied through: a cache
/// slot index in which every input bit counts.
#[inline(always)]
#[must_use]
#[allow(clippy::cast_possible_truncation, reason = "callers take at most 32 bits")]
pub(crate) const fn top_bits(mut h: u64, bits: u32) -> u32 {
    h ^= h >> 32;
    (h.wrapping_mul(GOLDEN) >> (64 - bits)) as u32
}

/// Two address or port words as one 64-bit word.
#[inline(always)]
pub(crate) const fn pair(lo: u32, hi: u32) -> u64 {
    lo as u64 | (hi as u64) << 32
}

/// Murmur3's 64-bit finaliser: every input bit affects every output bit.
#[inline(always)]
#[must_use]
pub const fn fmix64(mut h: u64) -> u64 {
    h ^= h >> 33;
    h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
    h ^= h >> 33;
    h = h.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    h ^= h >> 33;
    h
}

/// Hash of a flow for backend selection. With `source_only`, only the source address counts
/// (client affinity); otherwise the whole 5-tuple.
///
/// Words are hashed as loaded from the packet (network byte order reinterpreted in the
/// machine's order), so the kernel and userspace on the same architecture agree.
#[inline(always)]
#[must_use]
pub const fn flow_hash(key: &FlowKey, seed: u32, source_only: bool) -> u32 {
    let mut h = seed as u64;
    h = mix(h, pair(key.src[0], key.src[1]));
    h = mix(h, pair(key.src[2], key.src[3]));
    if !source_only {
        h = mix(h, pair(key.dst[0], key.dst[1]));
        h = mix(h, pair(key.dst[2], key.dst[3]));
        h = mix(h, pair((key.sport as u32) << 16 | key.dport as u32, key.proto as u32));
    }
    (fmix64(h) >> 32) as u32
}

/// Where `hash` falls in `0..n`: `hash * n / 2^32`, a multiplication where `hash % n` would
/// take a division (Lemire's range reduction; the hash's high bits decide, and they are as
/// well mixed as its low ones). Maglev slots and NAT port probes both use it.
#[inline(always)]
#[must_use]
pub const fn scale(hash: u32, n: u32) -> u32 {
    ((hash as u64 * n as u64) >> 32) as u32
}

#[cfg(feature = "user")]
mod user {
    use std::net::{IpAddr, SocketAddr};

    use super::FlowKey;

    /// Address words as the data path stores them (network byte order in memory).
    #[must_use]
    pub fn addr_words(addr: IpAddr) -> [u32; 4] {
        match addr {
            IpAddr::V4(a) => [u32::from_ne_bytes(a.octets()), 0, 0, 0],
            IpAddr::V6(a) => {
                let o = a.octets();
                [
                    u32::from_ne_bytes([o[0], o[1], o[2], o[3]]),
                    u32::from_ne_bytes([o[4], o[5], o[6], o[7]]),
                    u32::from_ne_bytes([o[8], o[9], o[10], o[11]]),
                    u32::from_ne_bytes([o[12], o[13], o[14], o[15]]),
                ]
            }
        }
    }

    /// The address stored in `words` for `family` (4 or 6).
    #[must_use]
    pub fn words_addr(words: [u32; 4], family: u8) -> IpAddr {
        if family == 4 {
            IpAddr::from(words[0].to_ne_bytes())
        } else {
            let mut o = [0u8; 16];
            for (i, w) in words.iter().enumerate() {
                o[i * 4..i * 4 + 4].copy_from_slice(&w.to_ne_bytes());
            }
            IpAddr::from(o)
        }
    }

    /// A port as the data path stores it (network byte order in memory).
    #[must_use]
    pub const fn port_raw(port: u16) -> u16 {
        u16::from_ne_bytes(port.to_be_bytes())
    }

    /// The port stored raw by the data path.
    #[must_use]
    pub const fn raw_port(raw: u16) -> u16 {
        u16::from_be_bytes(raw.to_ne_bytes())
    }

    impl FlowKey {
        /// The key of a flow from `src` to `dst` over `proto`.
        #[must_use]
        pub fn new(src: SocketAddr, dst: SocketAddr, proto: u8) -> Self {
            Self {
                src: addr_words(src.ip()),
                dst: addr_words(dst.ip()),
                sport: port_raw(src.port()),
                dport: port_raw(dst.port()),
                proto,
                family: if src.is_ipv4() { 4 } else { 6 },
                _pad: 0,
            }
        }
    }
}
#[cfg(feature = "user")]
pub use user::{addr_words, port_raw, raw_port, words_addr};

#[cfg(all(test, feature = "user"))]
#[allow(
    clippy::cast_possible_truncation,
    clippy::cast_precision_loss,
    reason = "test arithmetic on small, known values"
)]
mod tests {
    use std::{collections::HashSet, format, vec};

    use super::*;

    fn key(i: u32) -> FlowKey {
        FlowKey::new(
            format!("198.18.{}.{}:{}", (i >> 8) & 0xff, i & 0xff, 1024 + (i % 50000))
                .parse()
                .unwrap(),
            "198.18.100.1:80".parse().unwrap(),
            6,
        )
    }

    #[test]
    fn reversed_twice_is_identity_and_swaps_ends() {
        let k = key(7);
        assert_eq!(k.reversed().reversed(), k);
        assert_eq!(k.reversed().src, k.dst);
        assert_eq!(k.reversed().sport, k.dport);
    }

    #[test]
    fn hash_spreads_flows_evenly() {
        // 100,000 flows into 100 buckets, as the data path picks slots: each within 10% of
        // the mean.
        let mut buckets = [0u32; 100];
        for i in 0..100_000 {
            buckets[scale(flow_hash(&key(i), 0, false), 100) as usize] += 1;
        }
        for (b, n) in buckets.iter().enumerate() {
            assert!((900..=1100).contains(n), "bucket {b} has {n}");
        }
    }

    #[test]
    fn hash_depends_on_every_field_and_the_seed() {
        let base = key(1);
        let h = flow_hash(&base, 0, false);
        let mut variants = vec![
            FlowKey { sport: base.sport ^ 1, ..base },
            FlowKey { dport: base.dport ^ 1, ..base },
            FlowKey { proto: 17, ..base },
            FlowKey { dst: [base.dst[0] ^ 1, 0, 0, 0], ..base },
            FlowKey { src: [base.src[0] ^ 0x0100_0000, 0, 0, 0], ..base },
        ];
        variants.dedup();
        for v in variants {
            assert_ne!(flow_hash(&v, 0, false), h, "{v:?}");
        }
        assert_ne!(flow_hash(&base, 1, false), h);
        let unique: HashSet<u32> = (0..10_000).map(|i| flow_hash(&key(i), 0, false)).collect();
        assert!(unique.len() > 9_980, "{} distinct hashes of 10,000", unique.len());
    }

    #[test]
    fn scale_stays_in_range_and_keeps_order() {
        for n in [1, 2, 100, 65_537, 1_048_573, u32::MAX] {
            assert_eq!(scale(0, n), 0);
            assert_eq!(scale(u32::MAX, n), n - 1);
            assert!(scale(0x8000_0000, n) <= n / 2);
        }
        let mut last = 0;
        for h in (0..=u32::MAX).step_by(65_521) {
            let s = scale(h, 65_537);
            assert!(s >= last && s < 65_537);
            last = s;
        }
    }

    #[test]
    fn source_affinity_ignores_ports_and_destination() {
        let a = key(5);
        let b = FlowKey { sport: a.sport ^ 0x55, dport: 443, dst: [9, 0, 0, 0], proto: 17, ..a };
        assert_eq!(flow_hash(&a, 3, true), flow_hash(&b, 3, true));
        assert_ne!(flow_hash(&a, 3, false), flow_hash(&b, 3, false));
    }

    #[test]
    fn conversions_round_trip() {
        for addr in ["198.18.0.2", "fd00::1:2", "::ffff:1.2.3.4"] {
            let ip: std::net::IpAddr = addr.parse().unwrap();
            let family = if ip.is_ipv4() { 4 } else { 6 };
            assert_eq!(words_addr(addr_words(ip), family), ip);
        }
        assert_eq!(raw_port(port_raw(8080)), 8080);
        assert_eq!(port_raw(0x1234).to_ne_bytes(), [0x12, 0x34]);
    }
}
