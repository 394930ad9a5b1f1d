//! `auto` SYN cookies: a service's cookies go on when SYNs arrive faster than its
//! `syn_cookie_threshold` per second, and off again once the rate has stayed below half the
//! threshold for [`CALM`] (so a flood that pauses does not flap them). Clock-free: the daemon
//! feeds it a sample a second.

use std::{collections::HashMap, time::Duration};

/// How long the rate must stay low before cookies go off.
pub const CALM: Duration = Duration::from_secs(10);

#[derive(Clone, Copy, Debug, Default)]
struct Track {
    last_syns: Option<u64>,
    active: bool,
    calm_since: Option<Duration>,
    rate: f64,
}

/// Per-service state of `auto` mode.
#[derive(Debug, Default)]
pub struct AutoCookies {
    services: HashMap<String, Track>,
}

impl AutoCookies {
    /// Takes a service's SYN counter (a running total) at `now`, `elapsed` after the last
    /// sample; returns `Some(on)` when its cookies must change.
    pub fn observe(
        &mut self,
        service: &str,
        syns: u64,
        threshold: u64,
        elapsed: Duration,
        now: Duration,
    ) -> Option<bool> {
        let t = self.services.entry(service.to_owned()).or_default();
        let last = t.last_syns.replace(syns)?;
        let secs = elapsed.as_secs_f64();
        if secs <= 0.0 {
            return None;
        }
        #[allow(clippy::cast_precision_loss, reason = "packet rates")]
        let rate = syns.saturating_sub(last) as f64 / secs;
        t.rate = rate;
        #[allow(clippy::cast_precision_loss, reason = "thresholds")]
        let threshold = threshold as f64;
        if !t.active {
            if rate > threshold {
                t.active = true;
                t.calm_since = None;
                return Some(true);
            }
            return None;
        }
        if rate >= threshold / 2.0 {
            t.calm_since = None;
            return None;
        }
        let since = *t.calm_since.get_or_insert(now);
        if now.saturating_sub(since) >= CALM {
            t.active = false;
            t.calm_since = None;
            return Some(false);
        }
        None
    }

    /// The last SYN rate seen for a service.
    #[must_use]
    pub fn rate(&self, service: &str) -> f64 {
        self.services.get(service).map_or(0.0, |t| t.rate)
    }

    /// Forgets services no longer in `auto` mode.
    pub fn retain(&mut self, keep: impl Fn(&str) -> bool) {
        self.services.retain(|name, _| keep(name));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SEC: Duration = Duration::from_secs(1);

    #[test]
    fn turns_on_above_the_threshold_and_off_after_a_calm() {
        let mut a = AutoCookies::default();
        let at = |s: u64| Duration::from_secs(s);
        assert_eq!(a.observe("web", 0, 100, SEC, at(0)), None, "the first sample sets the base");
        assert_eq!(a.observe("web", 90, 100, SEC, at(1)), None, "90/s is below 100/s");
        assert_eq!(a.observe("web", 300, 100, SEC, at(2)), Some(true), "210/s");
        assert_eq!(a.observe("web", 360, 100, SEC, at(3)), None, "60/s: not below half");
        assert_eq!(a.observe("web", 400, 100, SEC, at(4)), None, "40/s: calm starts");
        for s in 5..14 {
            assert_eq!(a.observe("web", 400, 100, SEC, at(s)), None, "{s}: still within the calm");
        }
        assert_eq!(a.observe("web", 400, 100, SEC, at(14)), Some(false), "ten calm seconds");
        assert!(a.rate("web").abs() < f64::EPSILON);
    }

    #[test]
    fn a_burst_during_the_calm_restarts_it() {
        let mut a = AutoCookies::default();
        let at = |s: u64| Duration::from_secs(s);
        a.observe("web", 0, 100, SEC, at(0));
        assert_eq!(a.observe("web", 500, 100, SEC, at(1)), Some(true));
        a.observe("web", 500, 100, SEC, at(2));
        assert_eq!(a.observe("web", 700, 100, SEC, at(8)), None, "200 over 6 s is 33/s");
        assert_eq!(a.observe("web", 1000, 100, SEC, at(9)), None, "300/s: calm over");
        assert_eq!(a.observe("web", 1000, 100, SEC, at(10)), None, "calm starts again");
        assert_eq!(a.observe("web", 1000, 100, SEC, at(19)), None, "nine seconds of it");
        assert_eq!(a.observe("web", 1000, 100, SEC, at(20)), Some(false));
    }
}
