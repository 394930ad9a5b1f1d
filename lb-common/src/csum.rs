//! Incremental Internet checksum updates (RFC 1624), for rewriting addresses and ports without
//! summing the whole packet again.
//!
//! Values are "raw": 16-bit words loaded from the packet in the machine's byte order, exactly
//! as the data path reads them. The one's-complement sum is byte-order independent (RFC 1071
//! §2(B)), so updating a raw checksum with raw words gives the raw new checksum, and no byte
//! swapping is needed anywhere.

/// Folds a 32-bit one's-complement accumulator to 16 bits.
#[inline(always)]
#[must_use]
pub const fn fold(mut sum: u32) -> u16 {
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    #[allow(clippy::cast_possible_truncation, reason = "folded twice, so below 0x10000")]
    let folded = sum as u16;
    folded
}

/// The checksum after replacing the 16-bit word `old` by `new` (RFC 1624 eqn. 3:
/// `HC' = ~(~HC + ~m + m')`).
#[inline(always)]
#[must_use]
pub const fn replace_u16(check: u16, old: u16, new: u16) -> u16 {
    !fold((!check) as u32 + (!old) as u32 + new as u32)
}

/// The checksum after replacing the 32-bit value `old` (two words) by `new`.
#[inline(always)]
#[must_use]
pub const fn replace_u32(check: u16, old: u32, new: u32) -> u16 {
    let sum =
        (!check) as u32 + (!(old >> 16) & 0xffff) + (!old & 0xffff) + (new >> 16) + (new & 0xffff);
    !fold(sum)
}

/// The checksum after replacing a 128-bit address (four words) by another.
#[inline(always)]
#[must_use]
pub const fn replace_u128(check: u16, old: &[u32; 4], new: &[u32; 4]) -> u16 {
    let mut c = check;
    c = replace_u32(c, old[0], new[0]);
    c = replace_u32(c, old[1], new[1]);
    c = replace_u32(c, old[2], new[2]);
    replace_u32(c, old[3], new[3])
}

/// The change replacing words makes to every checksum that covers them, summed once and
/// applied to each (NAT changes addresses covered by both the IPv4 header checksum and the
/// TCP/UDP pseudo-header): `HC' = ~(~HC + Σ~m + Σm')` (RFC 1624 eqn. 3) with one fold at the
/// end instead of one per word. 32-bit words are summed whole in 64 bits: their halves'
/// one's-complement sum is the folded total, as 2^16 ≡ 1 modulo 2^16 - 1. Gives the same
/// checksum, bit for bit, as the word-by-word `replace_*` (tested).
#[derive(Clone, Copy, Debug, Default)]
pub struct Delta(u64);

impl Delta {
    /// No change.
    pub const NONE: Self = Self(0);

    /// With the 16-bit word `old` replaced by `new`.
    #[inline(always)]
    #[must_use]
    pub const fn u16(self, old: u16, new: u16) -> Self {
        Self(self.0 + (!old) as u64 + new as u64)
    }

    /// With the 32-bit value `old` (two words) replaced by `new`.
    #[inline(always)]
    #[must_use]
    pub const fn u32(self, old: u32, new: u32) -> Self {
        Self(self.0 + (!old) as u64 + new as u64)
    }

    /// With a 128-bit address (four 32-bit values) replaced by another.
    #[inline(always)]
    #[must_use]
    pub const fn u128(self, old: &[u32; 4], new: &[u32; 4]) -> Self {
        self.u32(old[0], new[0]).u32(old[1], new[1]).u32(old[2], new[2]).u32(old[3], new[3])
    }

    /// `check` updated for every replacement this delta holds.
    #[inline(always)]
    #[must_use]
    pub const fn apply(self, check: u16) -> u16 {
        // Terms below 2^32 each (a NAT rewrite has 21): the 64-bit sum would need 2^32 of
        // them to overflow.
        let sum = (!check) as u64 + self.0;
        let folded = (sum & 0xffff_ffff) + (sum >> 32);
        let folded = (folded & 0xffff_ffff) + (folded >> 32);
        #[allow(clippy::cast_possible_truncation, reason = "folded twice, so below 2^32")]
        let folded = folded as u32;
        !fold(folded)
    }
}

/// The one's-complement sum of an IP pseudo-header (addresses of a family, protocol,
/// upper-layer length), as raw words like the rest of this module.
#[inline(always)]
#[must_use]
pub const fn pseudo_header_sum(
    src: &[u32; 4],
    dst: &[u32; 4],
    v6: bool,
    proto: u8,
    len: u16,
) -> u32 {
    let words = if v6 { 4 } else { 1 };
    let mut acc = 0u32;
    let mut i = 0;
    while i < words {
        acc += (src[i] & 0xffff) + (src[i] >> 16) + (dst[i] & 0xffff) + (dst[i] >> 16);
        i += 1;
    }
    let be = len.to_be_bytes();
    acc + u16::from_ne_bytes([0, proto]) as u32 + u16::from_ne_bytes(be) as u32
}

/// The checksum of a header given as raw words (its checksum word zero) after `pseudo`.
#[inline(always)]
#[must_use]
pub const fn checksum(pseudo: u32, words: &[u16]) -> u16 {
    let mut acc = pseudo;
    let mut i = 0;
    while i < words.len() {
        acc += words[i] as u32;
        i += 1;
    }
    !fold(fold(acc) as u32)
}

/// The UDP checksum field after an update: a computed zero is sent as all ones (RFC 768), since
/// zero means "no checksum".
#[inline(always)]
#[must_use]
pub const fn udp_nonzero(check: u16) -> u16 {
    if check == 0 { 0xffff } else { check }
}

#[cfg(test)]
#[allow(
    clippy::cast_possible_truncation,
    clippy::cast_precision_loss,
    reason = "test arithmetic on small, known values"
)]
mod tests {
    use std::vec::Vec;

    use super::*;

    /// Full checksum over big-endian words, the reference the incremental updates must match.
    fn full(words: &[u16]) -> u16 {
        let sum: u32 = words.iter().map(|w| u32::from(*w)).sum();
        !fold(sum)
    }

    fn raw(w: u16) -> u16 {
        u16::from_ne_bytes(w.to_be_bytes())
    }

    #[test]
    fn replacing_words_matches_recomputation() {
        let mut words: Vec<u16> =
            (0..40u16).map(|i| i.wrapping_mul(0x1357).wrapping_add(7)).collect();
        let mut check = full(&words);
        let mut state = 0x1234_5678u32;
        for _ in 0..10_000 {
            state ^= state << 13;
            state ^= state >> 17;
            state ^= state << 5;
            let i = (state as usize) % (words.len() - 1);
            let new = (state >> 8) as u16;
            if state & 1 == 0 {
                check = replace_u16(check, words[i], new);
                words[i] = new;
            } else {
                let old = (u32::from(words[i]) << 16) | u32::from(words[i + 1]);
                let new32 = state.rotate_left(7);
                check = replace_u32(check, old, new32);
                words[i] = (new32 >> 16) as u16;
                words[i + 1] = new32 as u16;
            }
            // The two encodings of zero are equivalent; the recomputation yields the canonical one.
            let expected = full(&words);
            assert!(
                check == expected
                    || (check == 0xffff && expected == 0)
                    || (check == 0 && expected == 0xffff)
            );
        }
    }

    #[test]
    fn raw_byte_order_gives_raw_result() {
        // The same update done on big-endian values and on their raw (byte-swapped on little
        // endian) forms gives the same bytes on the wire.
        let words =
            [0x4500u16, 0x0054, 0x1c46, 0x4000, 0x4006, 0x0000, 0xc0a8, 0x0001, 0xc0a8, 0x00c7];
        let check = full(&words);
        let old = 0xc0a8_00c7u32;
        let new = 0x0a00_0001u32;
        let be = replace_u32(check, old, new);
        let raw_old = u32::from_ne_bytes(old.to_be_bytes());
        let raw_new = u32::from_ne_bytes(new.to_be_bytes());
        let raw_result = replace_u32(raw(check), raw_old, raw_new);
        assert_eq!(raw_result.to_ne_bytes(), be.to_be_bytes());
    }

    #[test]
    fn udp_zero_becomes_all_ones() {
        assert_eq!(udp_nonzero(0), 0xffff);
        assert_eq!(udp_nonzero(0x1234), 0x1234);
    }

    #[test]
    fn delta_matches_word_by_word_replacement() {
        // Random checksums and replacements of addresses, 32-bit values and ports, compared
        // bit for bit (including which encoding of zero) with the `replace_*` chain.
        let mut state = 0x9e37_79b9u32;
        let mut next = || {
            state ^= state << 13;
            state ^= state >> 17;
            state ^= state << 5;
            state
        };
        for round in 0..20_000 {
            // Now and then all-ones and all-zero words, where the encodings of zero meet.
            let pick = |r: u32, x: u32| match r % 8 {
                0 => 0,
                1 => u32::MAX,
                _ => x,
            };
            let check = if round % 16 == 0 { 0xffff } else { next() as u16 };
            let old: [u32; 4] = core::array::from_fn(|_| pick(next(), next()));
            let new: [u32; 4] = core::array::from_fn(|_| pick(next(), next()));
            let (old32, new32) = (pick(next(), next()), pick(next(), next()));
            let (old16, new16) = (next() as u16, next() as u16);
            let mut by_word = replace_u128(check, &old, &new);
            by_word = replace_u32(by_word, old32, new32);
            by_word = replace_u16(by_word, old16, new16);
            let delta = Delta::NONE.u128(&old, &new).u32(old32, new32).u16(old16, new16);
            assert_eq!(delta.apply(check), by_word, "round {round}");
            assert_eq!(Delta::NONE.apply(check), check);
        }
        // Where the two encodings of zero meet: every term zero gives all ones, as the chain
        // does; a sum of all ones gives zero.
        let ones = [u32::MAX; 4];
        let all_zero = Delta::NONE.u128(&ones, &[0; 4]).u32(u32::MAX, 0).u16(0xffff, 0);
        let chain =
            replace_u16(replace_u32(replace_u128(0xffff, &ones, &[0; 4]), u32::MAX, 0), 0xffff, 0);
        assert_eq!((all_zero.apply(0xffff), chain), (0xffff, 0xffff));
        assert_eq!(Delta::NONE.u16(0, 0xffff).apply(0xffff), replace_u16(0xffff, 0, 0xffff));
        assert_eq!(Delta::NONE.u16(0, 0xffff).apply(0xffff), 0);
    }

    #[test]
    fn replace_u128_matches_four_u32_replacements() {
        let old = [1, 2, 3, 4];
        let new = [0xdead_beef, 0, 0x1234_5678, 0xffff_ffff];
        let mut c = 0xabcd;
        for i in 0..4 {
            c = replace_u32(c, old[i], new[i]);
        }
        assert_eq!(replace_u128(0xabcd, &old, &new), c);
    }
}
