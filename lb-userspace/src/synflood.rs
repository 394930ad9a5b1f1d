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
    /// sample, and whether its cookies are on as installed; returns `Some(on)` when they
    /// must change. The installed state is the truth: a service that left `auto` mode and
    /// came back, or a change put back, may have them on or off whatever this tracked.
    pub fn observe(
        &mut self,
        service: &str,
        syns: u64,
        threshold: u64,
        (elapsed, now): (Duration, Duration),
        installed: bool,
    ) -> Option<bool> {
        let t = self.services.entry(service.to_owned()).or_default();
        if t.active != installed {
            t.active = installed;
            t.calm_since = None;
        }
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

    /// One `auto` service whose installed state follows every decision, as the daemon's
    /// does; samples a second apart unless said otherwise.
    #[derive(Default)]
    struct Service {
        tracker: AutoCookies,
        on: bool,
    }

    impl Service {
        fn sample(&mut self, syns: u64, elapsed_secs: u64, now_secs: u64) -> Option<bool> {
            let times = (Duration::from_secs(elapsed_secs), Duration::from_secs(now_secs));
            let decision = self.tracker.observe("web", syns, 100, times, self.on);
            if let Some(on) = decision {
                self.on = on;
            }
            decision
        }

        fn at(&mut self, syns: u64, now_secs: u64) -> Option<bool> {
            self.sample(syns, 1, now_secs)
        }
    }

    #[test]
    fn turns_on_above_the_threshold_and_off_after_a_calm() {
        let mut w = Service::default();
        assert_eq!(w.at(0, 0), None, "the first sample sets the base");
        assert_eq!(w.at(90, 1), None, "90/s is below 100/s");
        assert_eq!(w.at(300, 2), Some(true), "210/s");
        assert_eq!(w.at(360, 3), None, "60/s: not below half");
        assert_eq!(w.at(400, 4), None, "40/s: calm starts");
        for s in 5..14 {
            assert_eq!(w.at(400, s), None, "{s}: still within the calm");
        }
        assert_eq!(w.at(400, 14), Some(false), "ten calm seconds");
        assert!(w.tracker.rate("web").abs() < f64::EPSILON);
    }

    #[test]
    fn a_burst_during_the_calm_restarts_it() {
        let mut w = Service::default();
        w.at(0, 0);
        assert_eq!(w.at(500, 1), Some(true));
        w.at(500, 2);
        // Six seconds without a sample: 200 SYNs over them is 33/s, below half.
        assert_eq!(w.sample(700, 6, 8), None, "200 over 6 s is 33/s: calm starts");
        assert!((w.tracker.rate("web") - 200.0 / 6.0).abs() < 0.01, "{}", w.tracker.rate("web"));
        assert_eq!(w.at(1000, 9), None, "300/s: calm over");
        assert_eq!(w.at(1000, 10), None, "calm starts again");
        assert_eq!(w.at(1000, 19), None, "nine seconds of it");
        assert_eq!(w.at(1000, 20), Some(false));
    }

    #[test]
    fn the_installed_state_is_the_truth() {
        // Cookies on when the service left `auto` (its tracking forgotten) and came back
        // with them still on: a calm turns them off, rather than leaving them on until the
        // next flood. And the other way: off while this tracked them on (a change put
        // back) stays off until a flood.
        let mut w = Service::default();
        w.at(0, 0);
        assert_eq!(w.at(500, 1), Some(true));
        w.tracker.retain(|_| false);
        assert_eq!(w.at(500, 2), None, "a new base");
        for s in 3..13 {
            assert_eq!(w.at(500, s), None, "{s}: calm");
        }
        assert_eq!(w.at(500, 13), Some(false), "off after the calm");
        assert_eq!(w.at(800, 14), Some(true), "300/s");
        w.on = false;
        assert_eq!(w.at(850, 15), None, "50/s: stays off");
        assert_eq!(w.at(1100, 16), Some(true), "250/s: on again");
    }
}
