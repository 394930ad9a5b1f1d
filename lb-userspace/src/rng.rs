//! A small pseudo-random generator for what needs spread, not secrecy: health-check jitter,
//! and tests that want reproducible random input.

/// xorshift64* (Vigna, 2016): fast and seedable. Never for anything an attacker must not
/// predict.
#[derive(Clone, Debug)]
pub struct XorShift(u64);

impl XorShift {
    /// A generator from `seed`; zero, a state xorshift never leaves, is replaced.
    #[must_use]
    pub const fn new(seed: u64) -> Self {
        Self(if seed == 0 { 0x9e37_79b9_7f4a_7c15 } else { seed })
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// A number below `bound` (0 when `bound` is 0).
    pub fn below(&mut self, bound: usize) -> usize {
        let bound = u64::try_from(bound).unwrap_or(u64::MAX);
        if bound == 0 {
            return 0;
        }
        usize::try_from(self.next_u64() % bound).unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stays_below_its_bound_and_repeats_from_a_seed() {
        let (mut a, mut b) = (XorShift::new(7), XorShift::new(7));
        let drawn: Vec<usize> = (0..1000).map(|_| a.below(10)).collect();
        assert!(drawn.iter().all(|n| *n < 10));
        assert_eq!(drawn, (0..1000).map(|_| b.below(10)).collect::<Vec<_>>());
        // Every value turns up: the low bits are not stuck.
        assert!((0..10).all(|n| drawn.contains(&n)));
        assert_eq!(XorShift::new(0).below(0), 0);
    }
}
