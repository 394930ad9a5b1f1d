//! Prefixes: parsing (inline lists and files of a million lines), the propagation that
//! makes a longest-prefix match return every rule that covers an address, and the source
//! prefilter that lets most addresses skip the match.

use std::{collections::BTreeMap, net::IpAddr};

use lb_common::firewall::{
    FILTER_V4_24, FILTER_V6_32, RuleBits, SRC_FILTER_BITS, filter_v4_16, filter_v4_24, filter_v6_32,
};

pub use crate::maps::firewall::Prefix;

impl Prefix {
    /// Parses `198.18.0.0/15`, `fd00::/8` or a single address. Host bits below the prefix
    /// length are cleared (block lists often carry them).
    pub fn parse(text: &str) -> Result<Self, String> {
        let (addr, len) = match text.split_once('/') {
            Some((a, l)) => (a, Some(l)),
            None => (text, None),
        };
        let addr: IpAddr =
            addr.trim().parse().map_err(|_| format!("{text:?} is not an IP address or prefix"))?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let len = match len {
            None => max,
            Some(l) => l
                .trim()
                .parse::<u8>()
                .ok()
                .filter(|l| *l <= max)
                .ok_or_else(|| format!("{text:?}: prefix length must be 0 to {max}"))?,
        };
        Ok(match addr {
            IpAddr::V4(a) => Self::V4 { addr: a.to_bits() & mask32(len), len },
            IpAddr::V6(a) => Self::V6 { addr: a.to_bits() & mask128(len), len },
        })
    }

    /// Whether `self` covers `other` (same family, shorter or equal, same leading bits).
    #[must_use]
    pub fn contains(&self, other: &Self) -> bool {
        match (*self, *other) {
            (Self::V4 { addr: a, len: l }, Self::V4 { addr: b, len: m }) => {
                l <= m && b & mask32(l) == a
            }
            (Self::V6 { addr: a, len: l }, Self::V6 { addr: b, len: m }) => {
                l <= m && b & mask128(l) == a
            }
            _ => false,
        }
    }
}

impl std::fmt::Display for Prefix {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match *self {
            Self::V4 { addr, len } => write!(f, "{}/{len}", std::net::Ipv4Addr::from_bits(addr)),
            Self::V6 { addr, len } => write!(f, "{}/{len}", std::net::Ipv6Addr::from_bits(addr)),
        }
    }
}

const fn mask32(len: u8) -> u32 {
    if len == 0 { 0 } else { u32::MAX << (32 - len as u32) }
}

const fn mask128(len: u8) -> u128 {
    if len == 0 { 0 } else { u128::MAX << (128 - len as u32) }
}

/// Reads a prefix file: one prefix per line; blank lines and `#` comments are skipped.
/// Every bad line is reported with its number (the first 10 of them).
pub fn read_file(path: &str) -> Result<Vec<Prefix>, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("prefix file {path}: {e}"))?;
    let mut out = Vec::new();
    let mut errors = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.split('#').next().unwrap_or_default().trim();
        if line.is_empty() {
            continue;
        }
        match Prefix::parse(line) {
            Ok(p) => out.push(p),
            Err(e) if errors.len() < 10 => errors.push(format!("{path}:{}: {e}", n + 1)),
            Err(_) => {}
        }
    }
    if errors.is_empty() { Ok(out) } else { Err(errors.join("\n  ")) }
}

/// The trie contents for `entries` (prefix and the rules naming it): each prefix gets the
/// rules of every prefix that covers it and the rules that match any address (`any`), so
/// the longest match alone answers "which rules cover this address".
#[must_use]
pub fn propagate(entries: &[(Prefix, RuleBits)], any: RuleBits) -> BTreeMap<Prefix, RuleBits> {
    let mut merged: BTreeMap<Prefix, RuleBits> = BTreeMap::new();
    for (prefix, bits) in entries {
        *merged.entry(*prefix).or_default() |= bits;
    }
    // In (family, address, length) order, every prefix comes after the prefixes covering
    // it; a stack holds the chain of covering prefixes with their accumulated bits.
    let mut stack: Vec<(Prefix, RuleBits)> = Vec::new();
    let mut out = BTreeMap::new();
    for (prefix, bits) in merged {
        while stack.last().is_some_and(|(top, _)| !top.contains(&prefix)) {
            stack.pop();
        }
        let all = stack.last().map_or(any, |(_, b)| *b) | bits;
        stack.push((prefix, all));
        out.insert(prefix, all);
    }
    out
}

/// The source prefilter of `prefixes`, as `FW_SRC_FILTER` holds a generation's (bit `b` of
/// the prefilter is bit `b % 64` of word `b / 64`): the bits of every address a prefix covers
/// are set (see `lb_common::firewall::FILTER_V4_16`).
#[must_use]
pub fn src_filter<'a>(prefixes: impl IntoIterator<Item = &'a Prefix>) -> Vec<u64> {
    let mut out = vec![0u64; (SRC_FILTER_BITS / 64) as usize];
    for prefix in prefixes {
        // Host bits cleared (as parsing does; a key read back from the trie may carry them).
        let prefix = match *prefix {
            Prefix::V4 { addr, len } => Prefix::V4 { addr: addr & mask32(len.min(32)), len },
            Prefix::V6 { addr, len } => Prefix::V6 { addr: addr & mask128(len.min(128)), len },
        };
        match prefix {
            Prefix::V4 { addr, len } => {
                // The /16 (/24) of a prefix as long or longer; every one of a shorter prefix.
                set_bits(&mut out, filter_v4_16(addr), 1 << 16u8.saturating_sub(len));
                set_bits(&mut out, filter_v4_24(addr), 1 << 24u8.saturating_sub(len));
            }
            // The hashed bit of each /32 the prefix covers: one for a /32 or longer, eight
            // for a /29, up to 65,536 for a /16.
            Prefix::V6 { addr, len } if len >= 16 => {
                let first = (addr >> 96) as u32;
                for top in first..=first + ((1u32 << 32u8.saturating_sub(len)) - 1) {
                    set_bits(&mut out, filter_v6_32(top), 1);
                }
            }
            // Shorter: every IPv6 bit (setting them one /32 at a time would take longer).
            Prefix::V6 { .. } => set_bits(&mut out, FILTER_V6_32, FILTER_V4_24 - FILTER_V6_32),
        }
    }
    out
}

/// Sets `count` bits from bit `first`, whole words at a time where it can.
fn set_bits(words: &mut [u64], first: u32, count: u32) {
    let (mut bit, end) = (first as usize, first as usize + count as usize);
    while bit < end {
        if bit % 64 == 0 && end - bit >= 64 {
            words[bit / 64] = u64::MAX;
            bit += 64;
        } else {
            words[bit / 64] |= 1 << (bit % 64);
            bit += 1;
        }
    }
}

#[cfg(test)]
mod tests {
    use lb_common::firewall::FILTER_V4_16;

    use super::*;

    fn p(text: &str) -> Prefix {
        Prefix::parse(text).unwrap()
    }

    #[test]
    fn an_ipv4_mapped_prefix_stays_an_ipv6_prefix() {
        // As bogon lists mean `::ffff:0:0/96`: IPv6 packets with such addresses, not every
        // IPv4 packet.
        assert!(matches!(p("::ffff:0:0/96"), Prefix::V6 { len: 96, .. }));
        assert!(matches!(p("::ffff:198.18.0.0/111"), Prefix::V6 { len: 111, .. }));
    }

    #[test]
    fn parses_prefixes_and_clears_host_bits() {
        assert_eq!(p("198.18.0.0/15"), Prefix::V4 { addr: 0xc612_0000, len: 15 });
        assert_eq!(p("198.19.7.9/15"), p("198.18.0.0/15"));
        assert_eq!(p("198.18.0.1"), Prefix::V4 { addr: 0xc612_0001, len: 32 });
        assert_eq!(p("fd00::1/8"), Prefix::V6 { addr: 0xfd << 120, len: 8 });
        assert_eq!(p("0.0.0.0/0"), Prefix::V4 { addr: 0, len: 0 });
        assert!(Prefix::parse("198.18.0.0/33").unwrap_err().contains("0 to 32"));
        assert!(Prefix::parse("fd00::/129").is_err());
        assert!(Prefix::parse("example.com").unwrap_err().contains("not an IP"));
        assert_eq!(p("fd00::/8").to_string(), "fd00::/8");
        assert!(p("198.18.0.0/15").contains(&p("198.19.255.255")));
        assert!(!p("198.18.0.0/16").contains(&p("198.19.0.0/16")));
        assert!(!p("0.0.0.0/0").contains(&p("::/0")));
    }

    #[test]
    fn covering_prefixes_pass_their_rules_down() {
        let entries = [
            (p("198.18.0.0/15"), 0b001),
            (p("198.18.1.0/24"), 0b010),
            (p("198.18.1.128/25"), 0b100),
            (p("198.19.0.0/16"), 0b100),
            (p("203.0.113.0/24"), 0b100),
            (p("fd00::/8"), 0b001),
        ];
        let t = propagate(&entries, 0b1000);
        assert_eq!(t[&p("198.18.0.0/15")], 0b1001);
        assert_eq!(t[&p("198.18.1.0/24")], 0b1011);
        assert_eq!(t[&p("198.18.1.128/25")], 0b1111);
        assert_eq!(t[&p("198.19.0.0/16")], 0b1101, "a sibling subtree: the /15 covers it");
        assert_eq!(t[&p("203.0.113.0/24")], 0b1100, "nothing covers it but `any`");
        assert_eq!(t[&p("fd00::/8")], 0b1001, "families never cover each other");
    }

    #[test]
    fn the_source_prefilter_covers_every_address_of_every_prefix() {
        let has = |filter: &[u64], bit: u32| filter[(bit / 64) as usize] & (1 << (bit % 64)) != 0;
        let ones = |filter: &[u64]| filter.iter().map(|w| w.count_ones()).sum::<u32>();
        let part = |filter: &[u64], from: u32, to: u32| {
            ones(&filter[(from / 64) as usize..(to / 64) as usize])
        };
        let f = src_filter(&[p("198.18.7.0/25"), p("fd00:1::/48")]);
        assert!(has(&f, filter_v4_16(0xc612_0000)) && has(&f, filter_v4_16(0xc612_ffff)));
        assert!(has(&f, filter_v4_24(0xc612_0700)) && has(&f, filter_v4_24(0xc612_07ff)));
        assert!(!has(&f, filter_v4_16(0xc613_0000)), "another /16");
        assert!(!has(&f, filter_v4_24(0xc612_0800)), "another /24");
        assert!(has(&f, filter_v6_32(0xfd00_0001)));
        assert_eq!(ones(&f), 3);
        // Shorter than a /16: every /16 and /24 it covers, and no other.
        let f = src_filter(&[p("198.18.0.0/15"), p("10.0.0.0/8"), p("203.0.113.0/24")]);
        assert!(has(&f, filter_v4_16(0xc613_ffff)) && has(&f, filter_v4_24(0xc612_0000)));
        assert!(has(&f, filter_v4_16(0x0a00_0000)) && has(&f, filter_v4_16(0x0aff_ffff)));
        assert!(!has(&f, filter_v4_16(0x0b00_0000)) && !has(&f, filter_v4_16(0x09ff_ffff)));
        assert!(!has(&f, filter_v4_24(0x0b00_0000)) && !has(&f, filter_v4_24(0xc614_0000)));
        assert_eq!(part(&f, FILTER_V4_16, FILTER_V6_32), 2 + 256 + 1);
        assert_eq!(part(&f, FILTER_V4_24, SRC_FILTER_BITS), 2 * 256 + 65_536 + 1);
        // Between a /16 and a /24: its /16, and each of its /24s (here within one word).
        let f = src_filter(&[p("198.18.16.0/20")]);
        assert!(has(&f, filter_v4_24(0xc612_1000)) && has(&f, filter_v4_24(0xc612_1fff)));
        assert!(!has(&f, filter_v4_24(0xc612_0fff)) && !has(&f, filter_v4_24(0xc612_2000)));
        assert_eq!(part(&f, FILTER_V4_24, SRC_FILTER_BITS), 16);
        assert_eq!(ones(&f), 17);
        // Host bits, as a key read back from the trie may carry, are cleared first.
        let unmasked = Prefix::V4 { addr: 0x0a01_0000, len: 8 };
        assert_eq!(src_filter(&[unmasked]), src_filter(&[p("10.0.0.0/8")]));
        let top = Prefix::V6 { addr: u128::MAX, len: 16 };
        assert_eq!(src_filter(&[top]), src_filter(&[p("ffff::/16")]));
        let all = src_filter(&[p("0.0.0.0/0")]);
        assert_eq!(part(&all, FILTER_V4_16, FILTER_V6_32), 65_536);
        assert_eq!(part(&all, FILTER_V4_24, SRC_FILTER_BITS), 1 << 24);
        assert_eq!(part(&all, FILTER_V6_32, FILTER_V4_24), 0);
        // IPv6 shorter than a /32: the bit of each /32 in it, down to a /16; every bit below.
        let f = src_filter(&[p("fd00:10::/29")]);
        assert!((0..8).all(|i| has(&f, filter_v6_32(0xfd00_0010 + i))));
        assert!((1..=8).contains(&ones(&f)));
        let f = src_filter(&[p("fd00::/16")]);
        assert!(has(&f, filter_v6_32(0xfd00_0000)) && has(&f, filter_v6_32(0xfd00_ffff)));
        let f = src_filter(&[p("fd00::/15")]);
        assert_eq!(part(&f, FILTER_V6_32, FILTER_V4_24), 65_536);
        assert_eq!(ones(&f), 65_536);
        assert_eq!(ones(&src_filter(&[])), 0);
    }

    #[test]
    fn duplicates_merge() {
        let t = propagate(&[(p("198.18.0.0/16"), 1), (p("198.18.0.0/16"), 4)], 0);
        assert_eq!(t.len(), 1);
        assert_eq!(t[&p("198.18.0.0/16")], 5);
    }
}
