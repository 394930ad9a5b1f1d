//! The health of one backend as its checks report it: rise and fall, as HAProxy does them.
//! Pure and clock-free, so it is tested without sleeping; only a flip changes the data path.

/// A change of a backend's health.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Flip {
    Up,
    Down,
}

/// Consecutive check results against the current state.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CheckState {
    healthy: bool,
    /// Results in a row that contradict `healthy`.
    streak: u32,
    rise: u32,
    fall: u32,
}

impl CheckState {
    /// A backend starts healthy: a new backend takes traffic until `fall` checks fail, rather
    /// than none until `rise` pass.
    #[must_use]
    pub const fn new(rise: u32, fall: u32) -> Self {
        Self::starting(true, rise, fall)
    }

    /// A backend whose health is known at the start: one that was failing before lbd
    /// restarted starts unhealthy, and needs `rise` passing checks.
    #[must_use]
    pub const fn starting(healthy: bool, rise: u32, fall: u32) -> Self {
        Self { healthy, streak: 0, rise, fall }
    }

    #[must_use]
    pub const fn is_healthy(&self) -> bool {
        self.healthy
    }

    /// Whether the backend is on its way to a flip (checks then run at the fast interval).
    #[must_use]
    pub const fn is_changing(&self) -> bool {
        self.streak > 0
    }

    /// Records one result; returns the flip it causes, if any.
    pub fn observe(&mut self, ok: bool) -> Option<Flip> {
        if ok == self.healthy {
            self.streak = 0;
            return None;
        }
        self.streak += 1;
        let needed = if self.healthy { self.fall } else { self.rise };
        if self.streak < needed.max(1) {
            return None;
        }
        self.healthy = ok;
        self.streak = 0;
        Some(if ok { Flip::Up } else { Flip::Down })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn falls_after_fall_failures_in_a_row() {
        let mut s = CheckState::new(2, 3);
        assert_eq!(s.observe(false), None);
        assert!(s.is_changing());
        assert_eq!(s.observe(false), None);
        assert_eq!(s.observe(false), Some(Flip::Down));
        assert!(!s.is_healthy() && !s.is_changing());
        assert_eq!(s.observe(false), None, "no second flip");
    }

    #[test]
    fn a_pass_resets_the_failure_streak() {
        let mut s = CheckState::new(2, 3);
        s.observe(false);
        s.observe(false);
        assert_eq!(s.observe(true), None);
        assert!(!s.is_changing());
        s.observe(false);
        s.observe(false);
        assert!(s.is_healthy(), "two failures after the reset are not three");
    }

    #[test]
    fn rises_after_rise_passes_in_a_row() {
        let mut s = CheckState::new(2, 1);
        assert_eq!(s.observe(false), Some(Flip::Down));
        assert_eq!(s.observe(true), None);
        assert_eq!(s.observe(false), None);
        assert_eq!(s.observe(true), None);
        assert_eq!(s.observe(true), Some(Flip::Up));
        assert!(s.is_healthy());
    }

    #[test]
    fn a_backend_known_down_at_start_needs_rise_passes() {
        let mut s = CheckState::starting(false, 3, 1);
        assert!(!s.is_healthy());
        assert_eq!(s.observe(false), None, "already down: no flip");
        assert_eq!(s.observe(true), None);
        assert_eq!(s.observe(true), None);
        assert_eq!(s.observe(true), Some(Flip::Up));
    }
}
