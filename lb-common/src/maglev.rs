//! Maglev consistent hashing (Eisenbud et al., NSDI 2016) with weights: the lookup table a
//! service's flows are hashed into.
//!
//! The daemon builds a table per service with [`build_table`] and the data path reads
//! `table[scale(flow_hash, size)]` (see [`crate::flow::scale`]). Every backend has a pseudo-random permutation of the table's
//! slots derived from its identity (address and port), and backends take turns claiming their
//! next free preferred slot, each in proportion to its weight. Removing a backend therefore
//! moves its own slots and only a few others, and nodes that build from the same backends get
//! the same table whatever order the configuration lists them in.

/// Table entry of a slot no backend holds (every backend has weight 0, or there are none).
pub const NO_BACKEND: u32 = u32::MAX;

/// Table size when a pool has at most `DEFAULT_TABLE_SIZE / 100` backends (a prime, as Maglev
/// requires, and the size Katran and the Maglev paper use).
pub const DEFAULT_TABLE_SIZE: u32 = 65_537;

/// Largest table a service may have: a prime near 2^20 (4 MiB of kernel memory), enough for
/// 10,000 backends at the 100-slots-per-backend rule.
pub const MAX_TABLE_SIZE: u32 = 1_048_573;

/// Slots per backend below which imbalance exceeds about 1% (Maglev paper, §5.3).
pub const MIN_SLOTS_PER_BACKEND: u32 = 100;

/// Whether `n` is prime (trial division; tables are at most about a million slots).
#[must_use]
pub const fn is_prime(n: u32) -> bool {
    if n < 2 {
        return false;
    }
    if n.is_multiple_of(2) {
        return n == 2;
    }
    let mut d = 3u32;
    while d as u64 * d as u64 <= n as u64 {
        if n.is_multiple_of(d) {
            return false;
        }
        d += 2;
    }
    true
}

/// The smallest prime table size that gives `backends` backends at least
/// [`MIN_SLOTS_PER_BACKEND`] slots each, and never less than [`DEFAULT_TABLE_SIZE`].
/// `None` when that would exceed [`MAX_TABLE_SIZE`].
#[must_use]
pub const fn table_size_for(backends: u32) -> Option<u32> {
    let wanted = backends as u64 * MIN_SLOTS_PER_BACKEND as u64;
    if wanted <= DEFAULT_TABLE_SIZE as u64 {
        return Some(DEFAULT_TABLE_SIZE);
    }
    if wanted > MAX_TABLE_SIZE as u64 {
        return None;
    }
    #[allow(clippy::cast_possible_truncation, reason = "wanted <= MAX_TABLE_SIZE, a u32")]
    let mut n = wanted as u32;
    while !is_prime(n) {
        n += 1;
    }
    Some(n)
}

/// 64-bit FNV-1a of `bytes`, started from `seed`: a stable identity hash for backends.
#[must_use]
pub const fn identity_hash(bytes: &[u8], seed: u64) -> u64 {
    let mut h = 0xcbf2_9ce4_8422_2325u64 ^ seed;
    let mut i = 0;
    while i < bytes.len() {
        h ^= bytes[i] as u64;
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
        i += 1;
    }
    // FNV's low bits mix poorly; finish with a 64-bit avalanche (splitmix64).
    h ^= h >> 30;
    h = h.wrapping_mul(0xbf58_476d_1ce4_e5b9);
    h ^= h >> 27;
    h = h.wrapping_mul(0x94d0_49bb_1331_11eb);
    h ^ (h >> 31)
}

/// One backend as the table builder sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MaglevBackend {
    /// What the table stores for its slots (the backend's index in `BACKENDS`).
    pub id: u32,
    /// Stable identity (see [`identity_hash`]); decides the backend's slot preferences.
    pub identity: u64,
    /// Relative share of slots; 0 takes none.
    pub weight: u32,
}

#[cfg(any(feature = "user", test))]
mod build {
    use std::{vec, vec::Vec};

    use super::{MaglevBackend, NO_BACKEND};

    /// Builds a lookup table of `size` slots (prime, at least 2) for `backends`.
    ///
    /// Each backend holds a share of slots proportional to its weight, within about one slot.
    /// Backends are ordered by identity first, so the input order does not matter.
    #[must_use]
    pub fn build_table(backends: &[MaglevBackend], size: u32) -> Vec<u32> {
        assert!(size >= 2, "a Maglev table needs at least two slots");
        let m = u64::from(size);
        let mut table = vec![NO_BACKEND; size as usize];
        let mut active: Vec<MaglevBackend> =
            backends.iter().copied().filter(|b| b.weight > 0).collect();
        if active.is_empty() {
            return table;
        }
        active.sort_by_key(|b| (b.identity, b.id));
        let max_weight = u64::from(active.iter().map(|b| b.weight).max().unwrap_or(1));
        // Permutation of backend i: slot(j) = (offset + j * skip) mod m.
        let offsets: Vec<u64> = active.iter().map(|b| (b.identity >> 32) % m).collect();
        let skips: Vec<u64> =
            active.iter().map(|b| (b.identity & 0xffff_ffff) % (m - 1) + 1).collect();
        let mut next = vec![0u64; active.len()];
        let mut credit = vec![0u64; active.len()];
        let mut filled = 0u64;
        loop {
            for i in 0..active.len() {
                credit[i] += u64::from(active[i].weight);
                if credit[i] < max_weight {
                    continue;
                }
                credit[i] -= max_weight;
                loop {
                    #[allow(clippy::cast_possible_truncation, reason = "below m, a u32")]
                    let slot = ((offsets[i] + next[i] * skips[i]) % m) as usize;
                    next[i] += 1;
                    if table[slot] == NO_BACKEND {
                        table[slot] = active[i].id;
                        filled += 1;
                        break;
                    }
                }
                if filled == m {
                    return table;
                }
            }
        }
    }
}
#[cfg(any(feature = "user", test))]
pub use build::build_table;

#[cfg(test)]
#[allow(
    clippy::cast_possible_truncation,
    clippy::cast_precision_loss,
    reason = "test arithmetic on small, known values"
)]
mod tests {
    use std::{collections::HashMap, format, vec::Vec};

    use super::*;

    fn backends(n: u32, weight: impl Fn(u32) -> u32) -> Vec<MaglevBackend> {
        (0..n)
            .map(|i| MaglevBackend {
                id: i,
                identity: identity_hash(format!("198.18.{}.{}:80", i / 250, i % 250).as_bytes(), 0),
                weight: weight(i),
            })
            .collect()
    }

    fn counts(table: &[u32]) -> HashMap<u32, u64> {
        let mut c = HashMap::new();
        for id in table {
            *c.entry(*id).or_insert(0) += 1;
        }
        c
    }

    /// Every backend's slot count is within 1% of its weight share (and within one slot of
    /// it, since a share is often below 100 slots).
    fn assert_balanced(list: &[MaglevBackend], size: u32) {
        let table = build_table(list, size);
        assert!(!table.contains(&NO_BACKEND));
        let c = counts(&table);
        let total: u64 = list.iter().map(|b| u64::from(b.weight)).sum();
        for b in list {
            let expected = f64::from(size) * f64::from(b.weight) / total as f64;
            let got = *c.get(&b.id).unwrap_or(&0) as f64;
            let tolerance = (expected * 0.01).max(1.0);
            assert!(
                (got - expected).abs() <= tolerance,
                "backend {} of {}: {got} slots, expected {expected:.1} ± {tolerance:.1}",
                b.id,
                list.len()
            );
        }
    }

    #[test]
    fn primes_and_sizes() {
        assert!(is_prime(DEFAULT_TABLE_SIZE));
        assert!(is_prime(MAX_TABLE_SIZE));
        assert!(!is_prime(65_535));
        assert_eq!(table_size_for(0), Some(DEFAULT_TABLE_SIZE));
        assert_eq!(table_size_for(655), Some(DEFAULT_TABLE_SIZE));
        let s = table_size_for(1000).unwrap();
        assert!(s >= 100_000 && is_prime(s), "{s}");
        let s = table_size_for(10_485).unwrap();
        assert!((1_048_500..=MAX_TABLE_SIZE).contains(&s) && is_prime(s), "{s}");
        assert_eq!(table_size_for(10_486), None);
    }

    #[test]
    fn equal_weights_balance_within_one_percent() {
        for n in [1, 2, 3, 10, 100, 655] {
            assert_balanced(&backends(n, |_| 100), DEFAULT_TABLE_SIZE);
        }
        assert_balanced(&backends(1000, |_| 100), table_size_for(1000).unwrap());
    }

    #[test]
    fn weights_set_the_share() {
        // 1:2:3:...:10, and a pool where one backend outweighs the rest together.
        assert_balanced(&backends(10, |i| (i + 1) * 10), DEFAULT_TABLE_SIZE);
        assert_balanced(&backends(5, |i| if i == 0 { 1000 } else { 1 }), DEFAULT_TABLE_SIZE);
        assert_balanced(&backends(300, |i| 1 + i % 7), DEFAULT_TABLE_SIZE);
    }

    #[test]
    fn weight_zero_takes_no_slots_and_no_backends_leaves_the_table_empty() {
        let list = backends(4, |i| u32::from(i != 2));
        let c = counts(&build_table(&list, 101));
        assert!(!c.contains_key(&2));
        assert_eq!(c.len(), 3);
        assert!(build_table(&[], 101).iter().all(|s| *s == NO_BACKEND));
        assert!(build_table(&backends(3, |_| 0), 101).iter().all(|s| *s == NO_BACKEND));
    }

    #[test]
    fn input_order_does_not_matter() {
        let list = backends(50, |i| 1 + i % 3);
        let mut reversed = list.clone();
        reversed.reverse();
        assert_eq!(
            build_table(&list, DEFAULT_TABLE_SIZE),
            build_table(&reversed, DEFAULT_TABLE_SIZE)
        );
    }

    /// Slots that changed owner between two tables, not counting those of `except`.
    fn moved_excluding(a: &[u32], b: &[u32], except: u32) -> usize {
        a.iter().zip(b).filter(|(x, y)| x != y && **x != except && **y != except).count()
    }

    #[test]
    fn removing_or_adding_one_backend_moves_little_else() {
        for n in [3u32, 10, 100, 500] {
            let size = table_size_for(n + 1).unwrap();
            let all = backends(n + 1, |_| 100);
            let full = build_table(&all, size);
            let without: Vec<_> = all.iter().copied().filter(|b| b.id != n).collect();
            let reduced = build_table(&without, size);
            // Removing backend n: its slots move, and at most 1% of the others.
            let others = full.iter().filter(|s| **s != n).count();
            let moved = moved_excluding(&full, &reduced, n);
            assert!(moved * 100 <= others, "n={n}: removing moved {moved} of {others} other slots");
            // Every slot that backend n held now belongs to a survivor.
            assert!(reduced.iter().all(|s| *s != n && *s != NO_BACKEND));
            // Adding it back is the same table again.
            assert_eq!(build_table(&all, size), full);
        }
    }

    #[test]
    fn reweighting_one_backend_moves_about_its_change() {
        let size = DEFAULT_TABLE_SIZE;
        let before = backends(10, |_| 100);
        let after = backends(10, |i| if i == 4 { 50 } else { 100 });
        let a = build_table(&before, size);
        let b = build_table(&after, size);
        let changed = a.iter().zip(&b).filter(|(x, y)| x != y).count();
        // Backend 4 gives up about half its tenth (≈ 3450 slots); allow twice that.
        assert!(changed < 7_000, "{changed} slots changed");
    }

    #[test]
    fn identity_hash_is_stable_and_seeded() {
        // Pinned (computed apart from this code): every node, and every version of a node in
        // a rolling upgrade, must rank backends alike, or flows move between them.
        assert_eq!(identity_hash(b"198.18.1.11:80", 0), 0x6386_bc8b_d79f_c524);
        assert_eq!(identity_hash(b"198.18.1.11:80", 1), 0xb707_b3ba_890b_2e0f);
        assert_ne!(identity_hash(b"198.18.1.11:80", 0), identity_hash(b"198.18.1.11:81", 0));
    }

    #[test]
    fn a_table_is_the_same_on_every_node_and_version() {
        // Three backends by the identities of 198.18.1.11-13 without a port (the daemon's
        // bytes: address octets, then the port big-endian), weights 1, 2, 1, ids given in
        // another order than their identities': the table computed apart from this code.
        let identity = |last: u8| identity_hash(&[198, 18, 1, last, 0, 0], 0);
        assert_eq!(identity(11), 0xc016_bdf6_1957_ca90);
        let backends = [
            MaglevBackend { id: 2, identity: identity(13), weight: 1 },
            MaglevBackend { id: 0, identity: identity(11), weight: 1 },
            MaglevBackend { id: 1, identity: identity(12), weight: 2 },
        ];
        assert_eq!(build_table(&backends, 13), [1, 2, 1, 1, 2, 2, 0, 1, 0, 0, 1, 1, 1]);
    }
}
