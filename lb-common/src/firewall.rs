//! The firewall's rule sets as the data path holds them, and the pure logic both sides run.
//!
//! A rule set has at most [`MAX_RULES`] rules in priority order; rule `i` is bit `i` of a
//! [`RuleBits`]. Matching a packet is three lookups and two ANDs: the source address's bits
//! (longest-prefix match in an LPM trie), the destination's, and the bits of its protocol
//! class and destination port (an array). The lowest set bit of the result whose extra
//! conditions (TCP flags) hold is the first matching rule; none set means the default policy.
//!
//! Two generations of every rule set live side by side: the daemon writes the inactive one,
//! then switches `FW_ACTIVE` with one 4-byte write, so no packet sees half a rule set.

/// Rules per rule set (bits of [`RuleBits`]).
pub const MAX_RULES: usize = 64;
/// [`MAX_RULES`] as a map index.
const RULES_U32: u32 = 64;
const _: () = assert!(MAX_RULES == RULES_U32 as usize);
/// A set of rules, bit `i` for rule `i` (lower bits take precedence).
pub type RuleBits = u64;

/// Protocol classes of the ports array.
pub const CLASS_TCP: u32 = 0;
pub const CLASS_UDP: u32 = 1;
/// ICMP and ICMPv6; the "port" is the message type.
pub const CLASS_ICMP: u32 = 2;
/// Every other protocol; the port is 0.
pub const CLASS_OTHER: u32 = 3;
pub const CLASSES: u32 = 4;
/// Entries of `FW_PORTS`: two generations of four classes of 65,536 ports.
pub const PORTS_ENTRIES: u32 = 2 * CLASSES * 65_536;

/// Capacity of each LPM trie (per family), both generations together: a rule-set change
/// holds the old and the new generation at once.
pub const MAX_PREFIXES: u32 = 4 * 1024 * 1024;

/// Rate-limit buckets (one per rule and source address); the least recently used go first.
pub const RATE_ENTRIES: u32 = 262_144;

/// Counter slots per generation in `FW_COUNTERS`: one per rule, then the default policy's,
/// then packets that audit mode let through although a rule or the policy would drop them.
pub const COUNTER_SLOTS: u32 = RULES_U32 + 2;
pub const DEFAULT_SLOT: u32 = RULES_U32;
pub const AUDIT_SLOT: u32 = RULES_U32 + 1;

/// `FW_ACTIVE` bits: the generation in use (bit 0) and whether the firewall is on at all.
pub const ACTIVE_GENERATION: u32 = 0x1;
pub const ACTIVE_ENABLED: u32 = 0x2;

/// Rule actions.
pub const ACTION_ALLOW: u8 = 0;
pub const ACTION_DENY: u8 = 1;
pub const ACTION_RATE_LIMIT: u8 = 2;

/// `FwRule::flags`: matching events are logged (sampled).
pub const RULE_LOG: u8 = 0x1;

/// One rule's action and the conditions the tries cannot express.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FwRule {
    pub action: u8,
    pub flags: u8,
    /// TCP flags that must equal `tcp_flags_value` under this mask (0: no condition).
    pub tcp_flags_mask: u8,
    pub tcp_flags_value: u8,
    /// Log one matching packet in this many (with `RULE_LOG`).
    pub log_one_in: u32,
    /// Rate limits: tokens (in millionths) added per clock tick, and the bucket's size.
    pub micro_tokens_per_tick: u64,
    pub burst_micro_tokens: u64,
}
const _: () = assert!(core::mem::size_of::<FwRule>() == 24);
#[cfg(feature = "user")]
// SAFETY: repr(C), no implicit padding.
unsafe impl aya::Pod for FwRule {}

/// One micro-token: a packet costs a million.
pub const TOKEN: u64 = 1_000_000;

/// What one generation needs besides its rules.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FwMeta {
    /// Rules that match any source (the bits of an address no prefix covers).
    pub any_src: RuleBits,
    /// Rules that match any destination.
    pub any_dst: RuleBits,
    /// Rules with TCP-flag conditions (checked one by one).
    pub flag_rules: RuleBits,
    /// `META_*` bits.
    pub flags: u32,
    /// A digest of the rules' names in order, which the data path does not read: counters
    /// are kept by rule position, so the daemon switches in a rule set whose names moved
    /// (counters from zero) rather than update prefixes in place, and after a restart it
    /// knows the names of the rule set it adopts only by this. Zero in a generation written
    /// before it was.
    pub rule_names: u32,
    /// Budget of logged events per CPU: a token bucket like a rate-limit rule's.
    pub log_micro_tokens_per_tick: u64,
    pub log_burst_micro_tokens: u64,
}
const _: () = assert!(core::mem::size_of::<FwMeta>() == 48);
#[cfg(feature = "user")]
// SAFETY: repr(C), no padding.
unsafe impl aya::Pod for FwMeta {}

/// `FwMeta::flags`: no rule matched means drop.
pub const META_DEFAULT_DENY: u32 = 0x1;
/// Count what would be dropped, drop nothing.
pub const META_AUDIT: u32 = 0x2;
/// Some rule names destinations (else the destination lookup is skipped).
pub const META_HAS_DST: u32 = 0x4;
/// No rule names sources: the source lookup is skipped. The other way round from
/// `META_HAS_DST` so that a generation written before the flag existed (pinned, adopted by a
/// newer lbd) still has its sources looked up.
pub const META_NO_SRC: u32 = 0x8;
/// The generation's source prefilter in `FW_SRC_FILTER` is written, in the layout of
/// [`FILTER_V4_16`]: a packet with a clear bit there matches no source prefix, and the trie
/// lookup is skipped. Set only by a daemon that writes this layout, so a generation pinned by
/// another is looked up as before (until its first install switches a generation in). 0x10
/// is retired: a development build's layout (one word per element, no /24 part), which a
/// program of this layout must not trust.
pub const META_SRC_FILTER: u32 = 0x20;

/// Events logged per second per CPU at most, whatever the rules' sampling says.
pub const LOG_EVENTS_PER_SECOND: u64 = 100;
/// Size of the `FW_EVENTS` ring buffer in bytes.
pub const EVENTS_BYTES: u32 = 256 * 1024;

/// What happened to a logged packet.
pub const EVENT_PASSED: u8 = 0;
pub const EVENT_DROPPED: u8 = 1;
/// Audit mode let it through although it would have been dropped.
pub const EVENT_AUDITED: u8 = 2;

/// One sampled packet a logging rule matched, sent to the daemon through `FW_EVENTS`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FwEvent {
    pub src: [u32; 4],
    pub dst: [u32; 4],
    /// Ports in network order (zero without ports).
    pub sport: u16,
    pub dport: u16,
    /// Frame length.
    pub len: u16,
    pub rule: u8,
    /// `EVENT_*`.
    pub outcome: u8,
    pub family: u8,
    pub proto: u8,
    pub tcp_flags: u8,
    pub generation: u8,
}
const _: () = assert!(core::mem::size_of::<FwEvent>() == 44);

/// Data of an IPv4 key of the LPM tries: the generation (always matched in full), then the
/// address in network order. The prefix length counts the generation's 32 bits.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct FwV4 {
    pub generation: u32,
    pub addr: [u8; 4],
}
#[cfg(feature = "user")]
// SAFETY: repr(C), no padding.
unsafe impl aya::Pod for FwV4 {}

/// Data of an IPv6 key, like [`FwV4`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct FwV6 {
    pub generation: u32,
    pub addr: [u8; 16],
    /// Beyond every prefix (never compared); keeps the trie's values 8-byte aligned.
    pub _pad: [u8; 4],
}
const _: () = assert!(core::mem::size_of::<FwV6>() == 24);
#[cfg(feature = "user")]
// SAFETY: repr(C), no padding.
unsafe impl aya::Pod for FwV6 {}

/// Bits of the generation in an LPM key's prefix length.
pub const GENERATION_BITS: u32 = 32;

/// The source prefilter: a bitmap per generation in which every source prefix of the
/// generation has the bits of all the addresses it covers set (a superset: a set bit only
/// means "look the trie up"), so a clear bit proves the trie holds nothing for an address.
/// Three parts, by an address's first 32 bits: an IPv4 address has a bit for its /16 (8 KiB
/// of bits, which stay in cache) and, when that is set, one for its /24 (2 MiB); an IPv6
/// address has a hashed bit for its /32. These are the parts' first bits.
pub const FILTER_V4_16: u32 = 0;
pub const FILTER_V6_32: u32 = 1 << 16;
pub const FILTER_V4_24: u32 = 1 << 17;
/// Bits of a generation's prefilter.
pub const SRC_FILTER_BITS: u32 = FILTER_V4_24 + (1 << 24);
/// Bits of one `FW_SRC_FILTER` element ([`FilterChunk`]).
pub const FILTER_CHUNK_BITS: u32 = 64 * 64;
/// `FW_SRC_FILTER` elements of a generation.
pub const SRC_FILTER_CHUNKS: u32 = SRC_FILTER_BITS / FILTER_CHUNK_BITS;
/// `FW_SRC_FILTER` entries: two generations.
pub const SRC_FILTER_ENTRIES: u32 = 2 * SRC_FILTER_CHUNKS;

/// One element of `FW_SRC_FILTER`: 4,096 bits of a generation's prefilter, bit `b` in word
/// `b / 64 % 64` at `b % 64` (elements of words keep the daemon's writes few).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FilterChunk {
    pub words: [u64; 64],
}
impl Default for FilterChunk {
    fn default() -> Self {
        Self { words: [0; 64] }
    }
}
#[cfg(feature = "user")]
// SAFETY: repr(C), no padding.
unsafe impl aya::Pod for FilterChunk {}

/// The prefilter bit of an IPv4 address's /16 (`top`: the address, host order).
#[inline(always)]
#[must_use]
pub const fn filter_v4_16(top: u32) -> u32 {
    FILTER_V4_16 + (top >> 16)
}

/// The prefilter bit of an IPv4 address's /24.
#[inline(always)]
#[must_use]
pub const fn filter_v4_24(top: u32) -> u32 {
    FILTER_V4_24 + (top >> 8)
}

/// The prefilter bit of an IPv6 address's /32 (`top`: its first 32 bits, host order), hashed.
#[inline(always)]
#[must_use]
pub const fn filter_v6_32(top: u32) -> u32 {
    FILTER_V6_32 + (top.wrapping_mul(0x9e37_79b1) >> 16)
}

/// Index in `FW_SRC_FILTER` of the element holding prefilter bit `bit` of a generation.
#[inline(always)]
#[must_use]
pub const fn filter_chunk(generation: u32, bit: u32) -> u32 {
    (generation & 1) * SRC_FILTER_CHUNKS + bit / FILTER_CHUNK_BITS
}

/// Key of the per-source rate-limit buckets.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct RateKey {
    pub addr: [u32; 4],
    pub rule: u8,
    pub family: u8,
    pub _pad: [u8; 2],
}
const _: () = assert!(core::mem::size_of::<RateKey>() == 20);
#[cfg(feature = "user")]
// SAFETY: repr(C), explicit padding.
unsafe impl aya::Pod for RateKey {}

/// A token bucket: micro-tokens left and the tick of the last refill.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Bucket {
    pub micro_tokens: u64,
    pub last: u64,
}
#[cfg(feature = "user")]
// SAFETY: repr(C), two u64.
unsafe impl aya::Pod for Bucket {}

impl Bucket {
    /// A full bucket at `now`.
    #[must_use]
    pub const fn full(rule: &FwRule, now: u64) -> Self {
        Self { micro_tokens: rule.burst_micro_tokens, last: now }
    }

    /// Refills for the ticks since the last packet, then takes one packet's token if there
    /// is one. Returns whether the packet is admitted.
    #[inline(always)]
    pub fn take(&mut self, rule: &FwRule, now: u64) -> bool {
        let ticks = now.saturating_sub(self.last);
        if ticks > 0 {
            // Without a 128-bit multiply (BPF has none): a long idle time fills the bucket.
            let room = rule.burst_micro_tokens.saturating_sub(self.micro_tokens);
            let rate = rule.micro_tokens_per_tick;
            let added = if rate == 0 {
                0
            } else if ticks > room / rate {
                room
            } else {
                ticks * rate
            };
            self.micro_tokens = (self.micro_tokens + added).min(rule.burst_micro_tokens);
            self.last = now;
        }
        if self.micro_tokens >= TOKEN {
            self.micro_tokens -= TOKEN;
            true
        } else {
            false
        }
    }
}

/// The protocol class of an IP protocol number.
#[inline(always)]
#[must_use]
pub const fn class_of(proto: u8) -> u32 {
    match proto {
        6 => CLASS_TCP,
        17 => CLASS_UDP,
        1 | 58 => CLASS_ICMP,
        _ => CLASS_OTHER,
    }
}

/// Whether an ICMPv6 message of type `kind`, arriving with `hop_limit` from `src` (network
/// order words), is IPv6's link control, which neither a `default = "deny"` nor a rate
/// limit drops (ARP, IPv4's, is not IP and never meets the firewall): neighbour discovery
/// (router and neighbour solicitations and advertisements, redirects) with hop limit 255,
/// and multicast listener discovery (queries, reports) with hop limit 1 from a link-local
/// source (or the unspecified one, a report's before its address is configured). Routers
/// forward neither hop limit 255 nor link-local sources: only a sender on the link produces
/// them (RFC 4861, RFC 3810). A `deny` rule that matches one still drops it.
#[inline(always)]
#[must_use]
pub fn is_link_control(kind: u8, hop_limit: u8, src: &[u32; 4]) -> bool {
    match kind {
        133..=137 => hop_limit == 255,
        130..=132 | 143 => {
            let link_local = u32::from_be(src[0]) & 0xffc0_0000 == 0xfe80_0000;
            let unspecified = src[0] | src[1] | src[2] | src[3] == 0;
            hop_limit == 1 && (link_local || unspecified)
        }
        _ => false,
    }
}

/// Index in `FW_PORTS` of a generation, class and port (host order).
#[inline(always)]
#[must_use]
pub const fn ports_index(generation: u32, class: u32, port: u16) -> u32 {
    ((generation & 1) * CLASSES + (class & 3)) * 65_536 + port as u32
}

/// Index in `FW_COUNTERS` of a generation's slot.
#[inline(always)]
#[must_use]
pub const fn counter_index(generation: u32, slot: u32) -> u32 {
    (generation & 1) * COUNTER_SLOTS + slot
}

/// Index of the lowest set bit of a non-zero `bits` (64 for zero). Written out because BPF
/// has no count-trailing-zeros instruction and LLVM's lowering wants a lookup table.
#[inline(always)]
#[must_use]
#[allow(clippy::verbose_bit_mask, reason = "trailing_zeros is what this avoids")]
pub const fn lowest_bit(bits: RuleBits) -> u32 {
    if bits == 0 {
        return 64;
    }
    let mut x = bits;
    let mut n = 0;
    if x & 0xffff_ffff == 0 {
        n += 32;
        x >>= 32;
    }
    if x & 0xffff == 0 {
        n += 16;
        x >>= 16;
    }
    if x & 0xff == 0 {
        n += 8;
        x >>= 8;
    }
    if x & 0xf == 0 {
        n += 4;
        x >>= 4;
    }
    if x & 0x3 == 0 {
        n += 2;
        x >>= 2;
    }
    if x & 0x1 == 0 {
        n += 1;
    }
    n
}

#[cfg(test)]
mod tests {

    #[test]
    fn link_control_is_nd_at_hop_limit_255_and_link_local_mld_at_1() {
        let addr = |text: &str| {
            let bits = text.parse::<std::net::Ipv6Addr>().unwrap().octets();
            let word =
                |i: usize| u32::from_ne_bytes([bits[i], bits[i + 1], bits[i + 2], bits[i + 3]]);
            [word(0), word(4), word(8), word(12)]
        };
        let (link, global, site, none) =
            (addr("fe80::1"), addr("fd00::1"), addr("fec0::1"), addr("::"));
        for kind in 133..=137 {
            assert!(super::is_link_control(kind, 255, &global), "ND {kind}");
            assert!(!super::is_link_control(kind, 254, &link), "ND {kind} forwarded");
        }
        for kind in [130, 131, 132, 143] {
            assert!(super::is_link_control(kind, 1, &link), "MLD {kind}");
            assert!(super::is_link_control(kind, 1, &none), "MLD {kind} before an address");
            assert!(!super::is_link_control(kind, 1, &global), "MLD {kind} from afar");
            assert!(!super::is_link_control(kind, 1, &site), "MLD {kind} from fec0::");
            assert!(!super::is_link_control(kind, 2, &link), "MLD {kind} at hop limit 2");
        }
        for kind in [128, 129, 1, 2, 3, 4, 138] {
            assert!(!super::is_link_control(kind, 255, &link), "type {kind}");
        }
    }
    use super::*;

    fn rule(rate: u64, burst: u64, hz: u64) -> FwRule {
        FwRule {
            action: ACTION_RATE_LIMIT,
            micro_tokens_per_tick: rate * TOKEN / hz,
            burst_micro_tokens: burst * TOKEN,
            ..FwRule::default()
        }
    }

    #[test]
    fn a_bucket_admits_its_burst_then_its_rate() {
        let r = rule(100, 10, 1000);
        let mut b = Bucket::full(&r, 5);
        let burst = (0..50).filter(|_| b.take(&r, 5)).count();
        assert_eq!(burst, 10, "the burst at one instant");
        // 100 per second at 1000 ticks per second: one packet per 10 ticks.
        let mut admitted = 0;
        for tick in 6..=1005 {
            admitted += usize::from(b.take(&r, tick)) + usize::from(b.take(&r, tick));
        }
        assert_eq!(admitted, 100, "a second's worth at two packets per tick");
    }

    #[test]
    fn an_idle_bucket_refills_only_to_its_burst() {
        let r = rule(1000, 5, 250);
        let mut b = Bucket::full(&r, 0);
        while b.take(&r, 0) {}
        let admitted = (0..100).filter(|_| b.take(&r, 1_000_000)).count();
        assert_eq!(admitted, 5);
        // A clock that goes backwards (another CPU's older `now`) adds nothing.
        assert!(!b.take(&r, 10));
    }

    #[test]
    fn lowest_bit_is_trailing_zeros() {
        for i in 0..64 {
            assert_eq!(lowest_bit(1 << i), i);
            assert_eq!(lowest_bit(u64::MAX << i), i);
        }
        assert_eq!(lowest_bit(0), 64);
        assert_eq!(lowest_bit(0b1010_0000), 5);
    }

    #[test]
    fn indexes_stay_in_their_generation() {
        assert_eq!(ports_index(0, CLASS_TCP, 0), 0);
        assert_eq!(ports_index(1, CLASS_OTHER, 65_535), PORTS_ENTRIES - 1);
        assert_eq!(counter_index(1, AUDIT_SLOT), 2 * COUNTER_SLOTS - 1);
        assert_eq!(class_of(58), CLASS_ICMP);
        assert_eq!(class_of(47), CLASS_OTHER);
        assert_eq!(filter_chunk(0, filter_v4_16(0)), 0);
        assert_eq!(filter_chunk(1, filter_v4_16(0)), SRC_FILTER_CHUNKS);
        assert_eq!(filter_chunk(1, filter_v4_24(u32::MAX)), SRC_FILTER_ENTRIES - 1);
        assert_eq!(SRC_FILTER_BITS % FILTER_CHUNK_BITS, 0);
    }

    #[test]
    fn the_source_prefilter_parts_do_not_overlap() {
        assert_eq!(filter_v4_16(0xc612_0000), 0xc612);
        assert_eq!(filter_v4_16(0xc612_ffff), 0xc612);
        assert_ne!(filter_v4_16(0xc613_0000), 0xc612);
        assert_eq!(filter_v4_16(u32::MAX), FILTER_V6_32 - 1);
        assert_eq!(filter_v4_24(0xc612_07ff), FILTER_V4_24 + 0xc6_1207);
        assert_ne!(filter_v4_24(0xc612_0800), filter_v4_24(0xc612_07ff));
        assert_eq!(filter_v4_24(u32::MAX), SRC_FILTER_BITS - 1);
        // IPv6: within its part, and spread (the /32s of one /16 do not share a bit).
        let bits: std::collections::HashSet<u32> =
            (0..1000).map(|i| filter_v6_32(0x2001_0000 + i)).collect();
        assert!(bits.iter().all(|b| (FILTER_V6_32..FILTER_V4_24).contains(b)));
        assert!(bits.len() > 990, "{} distinct bits for 1000 /32s", bits.len());
    }
}
