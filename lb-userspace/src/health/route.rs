//! Policy routes that send a DSR backend's health checks to that backend.
//!
//! A DSR backend serves the service address (held on its loopback), so a check that only
//! reaches the backend's own address proves the host is up, not that it serves the service.
//! The check instead connects to the service address with a firewall mark unique to the
//! backend; a rule sends that mark to a routing table of its own, whose routes point the
//! service addresses at the backend. The backend answers from the service address straight
//! back to this host, as it answers clients.
//!
//! Marks and tables are `MARK_BASE + backend id`; every rule has priority [`RULE_PRIORITY`],
//! so rules left by an earlier run are found and removed at start.

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt::Write as _,
    io::Write as _,
    net::IpAddr,
    process::{Command, Stdio},
};

use tracing::{debug, info, warn};

/// Firewall mark (and routing table) of backend id 0; backend `id` uses `MARK_BASE + id`.
pub const MARK_BASE: u32 = 0x4c42_0000;
/// Priority of the rules (before the `main` table's 32766).
pub const RULE_PRIORITY: u32 = 9911;

/// The mark of a backend's DSR checks.
#[must_use]
pub const fn mark(backend_id: u32) -> u32 {
    MARK_BASE + backend_id
}

/// One backend's check route: its address and the service addresses to route to it.
pub type CheckRoute = (IpAddr, BTreeSet<IpAddr>);

/// The check routes installed, by backend id.
#[derive(Debug, Default)]
pub struct CheckRoutes {
    installed: BTreeMap<u32, CheckRoute>,
    cleaned: bool,
    /// Per family (IPv4, IPv6): its last batch failed in part, so what is installed is not
    /// known; the next sync rebuilds the family whole (see [`CheckRoutes::retry`]).
    failed: [bool; 2],
}

impl CheckRoutes {
    /// Makes the installed rules and routes exactly `wanted`.
    pub fn sync(&mut self, wanted: &BTreeMap<u32, CheckRoute>) {
        if !self.cleaned {
            remove_stale(&["-4", "-6"]);
            self.cleaned = true;
        }
        // A family whose last batch failed: its rules and routes go, as an earlier run's
        // do at start, and every wanted one is added again.
        for (v6, family) in [(false, "-4"), (true, "-6")] {
            if self.failed[usize::from(v6)] {
                remove_stale(&[family]);
                self.installed.retain(|_, route| route.0.is_ipv6() != v6);
            }
        }
        let mut script = [String::new(), String::new()];
        for (id, route) in &self.installed {
            if wanted.get(id) != Some(route) {
                let s = &mut script[usize::from(route.0.is_ipv6())];
                let m = mark(*id);
                let _ = writeln!(s, "rule del priority {RULE_PRIORITY} fwmark {m} table {m}");
                let _ = writeln!(s, "route flush table {m}");
            }
        }
        for (id, route) in wanted {
            if self.installed.get(id) == Some(route) {
                continue;
            }
            let s = &mut script[usize::from(route.0.is_ipv6())];
            let m = mark(*id);
            let _ = writeln!(s, "rule add priority {RULE_PRIORITY} fwmark {m} table {m}");
            write_routes(s, *id, route, "replace");
        }
        for (i, (family, script)) in ["-4", "-6"].iter().zip(&script).enumerate() {
            if script.is_empty() {
                // Nothing to set in this family (its last failed routes removed since).
                self.failed[i] = false;
                continue;
            }
            let ok = run_batch(family, script, self.failed[i]);
            if ok && self.failed[i] {
                info!(family, "health-check routes set");
            }
            self.failed[i] = !ok;
        }
        self.installed.clone_from(wanted);
    }

    /// Adds every installed route again where it is missing (`route add`: one in place is
    /// refused, unchanged, and no route change is announced): the kernel removes routes
    /// through an interface that goes down or loses its address, and nothing else would put
    /// them back. In a thread of its own, not waited for: with thousands of backends the
    /// `ip` run is long, and the daemon's lock is held here. What fails is left to the next
    /// time (the table's unreachable default meanwhile fails the checks).
    pub fn reassert(&self) {
        let mut script = [String::new(), String::new()];
        for (id, route) in &self.installed {
            write_routes(&mut script[usize::from(route.0.is_ipv6())], *id, route, "add");
        }
        let run = move || {
            for (family, script) in ["-4", "-6"].iter().zip(&script) {
                if !script.is_empty() {
                    run_quiet(family, script);
                }
            }
        };
        if let Err(error) = std::thread::Builder::new().name("check-routes".into()).spawn(run) {
            debug!(%error, "cannot start the thread that adds check routes again");
        }
    }

    /// Whether a family's last batch failed: [`CheckRoutes::retry`] has work to do.
    #[must_use]
    pub fn pending(&self) -> bool {
        self.failed.iter().any(|f| *f)
    }

    /// Tries again to set what the last sync could not (a route whose gateway was not
    /// reachable yet, at boot before the interface has its address, say): without it, that
    /// backend's DSR checks would go by the main table until the next change.
    pub fn retry(&mut self) {
        if self.pending() {
            let wanted = self.installed.clone();
            self.sync(&wanted);
        }
    }

    /// Removes every rule and route installed.
    pub fn clear(&mut self) {
        self.sync(&BTreeMap::new());
    }
}

/// Removes the rules (and their tables) at our priority in these families (`-4`, `-6`):
/// an earlier run's, or a family's whose batch failed.
fn remove_stale(families: &[&str]) {
    for family in families {
        let Ok(output) = Command::new("ip")
            .args(["-json", family, "rule", "show", "priority", &RULE_PRIORITY.to_string()])
            .output()
        else {
            continue;
        };
        let rules: Vec<serde_json::Value> =
            serde_json::from_slice(&output.stdout).unwrap_or_default();
        let mut script = String::new();
        for rule in rules {
            let Some(table) = rule.get("table").and_then(|t| t.as_str()) else { continue };
            let _ = writeln!(script, "rule del priority {RULE_PRIORITY} table {table}");
            let _ = writeln!(script, "route flush table {table}");
        }
        if !script.is_empty() {
            debug!(family, "removing check routes left by an earlier run");
            run_batch(family, &script, false);
        }
    }
}

/// Runs `script` through `ip -batch`; whether every line succeeded. A failure is logged as
/// a warning, or (`again`: the family failed before too, retries) at debug level.
/// Writes backend `id`'s check routes to `script`: the service addresses via the backend;
/// the backend's own address thrown back to the next rule (the main table: the backend's
/// checks of NAT services go there, from the same marked sockets); and an unreachable
/// default, so that a check whose route is missing (its interface down) fails instead of
/// going by the main table, to whatever answers the service address there (another
/// backend, through this host's own data path).
fn write_routes(script: &mut String, id: u32, (backend, vips): &CheckRoute, verb: &str) {
    let m = mark(id);
    let len = if backend.is_ipv4() { 32 } else { 128 };
    let _ = writeln!(script, "route {verb} unreachable default table {m}");
    let _ = writeln!(script, "route {verb} throw {backend}/{len} table {m}");
    for vip in vips.iter().filter(|v| v.is_ipv6() == backend.is_ipv6()) {
        let len = if vip.is_ipv4() { 32 } else { 128 };
        let _ = writeln!(script, "route {verb} {vip}/{len} via {backend} table {m}");
    }
}

/// Runs an `ip` batch whose refusals are expected (routes already in place).
fn run_quiet(family: &str, script: &str) {
    if let Err(error) = ip_batch(family, script) {
        debug!(family, %error, "cannot run ip to add check routes again");
    }
}

/// Runs `script` through `ip -force -batch` for `family`; its standard error is captured.
fn ip_batch(family: &str, script: &str) -> std::io::Result<std::process::Output> {
    let mut child = Command::new("ip")
        .args([family, "-force", "-batch", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()?;
    child.stdin.take().expect("piped stdin").write_all(script.as_bytes())?;
    child.wait_with_output()
}

fn run_batch(family: &str, script: &str, again: bool) -> bool {
    let result = ip_batch(family, script);
    let error = match result {
        Ok(output) if output.status.success() => return true,
        Ok(output) => String::from_utf8_lossy(&output.stderr).trim().to_owned(),
        Err(error) => format!("cannot run ip: {error}"),
    };
    if again {
        debug!(family, errors = %error, "health-check routes still not set; trying again");
    } else {
        warn!(family, errors = %error, "some health-check routes could not be set; trying again every few seconds");
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::health::probe::tests::own_netns;

    fn ip(args: &[&str]) -> String {
        let out = Command::new("ip").args(args).output().expect("ip runs");
        assert!(out.status.success(), "ip {args:?}: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    #[test]
    fn routes_that_could_not_be_set_are_set_when_tried_again() {
        // Its own namespace (this thread's, which the `ip` children share): rules at the
        // check priority and a backend on a network no interface has yet, as at boot.
        if !own_netns("routes_that_could_not_be_set_are_set_when_tried_again") {
            return;
        }
        let backend: IpAddr = [198, 18, 1, 11].into();
        let vip: IpAddr = [198, 18, 100, 1].into();
        let wanted = BTreeMap::from([(7, (backend, BTreeSet::from([vip])))]);
        let table = mark(7).to_string();
        let mut routes = CheckRoutes::default();
        routes.sync(&wanted);
        assert!(routes.pending(), "the gateway is unreachable: the route cannot be set");
        // Checks meanwhile fail rather than go by the main table (but for the backend's own
        // address, thrown back to it).
        let pending = ip(&["-4", "route", "show", "table", &table]);
        let mut lines: Vec<&str> = pending.lines().map(str::trim).collect();
        lines.sort_unstable();
        assert_eq!(lines, ["throw 198.18.1.11", "unreachable default"], "{pending}");
        // The backend removed meanwhile: nothing left to retry.
        routes.sync(&BTreeMap::new());
        assert!(!routes.pending(), "a removed backend's failed route is retried for ever");
        routes.sync(&wanted);
        assert!(routes.pending());

        // The interface comes up with the backend's network; the retry sets the route, and
        // leaves one rule, not one per attempt.
        ip(&["link", "add", "d0", "type", "veth", "peer", "name", "d1"]);
        ip(&["addr", "add", "198.18.1.1/24", "dev", "d0"]);
        ip(&["link", "set", "d1", "up"]);
        ip(&["link", "set", "d0", "up"]);
        routes.retry();
        assert!(!routes.pending());
        let routed = ip(&["-4", "route", "show", "table", &table]);
        assert!(routed.contains("198.18.100.1 via 198.18.1.11"), "{routed}");
        let rules = ip(&["-4", "rule", "show", "priority", &RULE_PRIORITY.to_string()]);
        assert_eq!(rules.lines().count(), 1, "{rules}");
        // Nothing pending: a retry changes nothing; clearing removes both.
        routes.retry();
        assert_eq!(ip(&["-4", "route", "show", "table", &table]), routed);
        assert_eq!(ip(&["-4", "rule", "show", "priority", &RULE_PRIORITY.to_string()]), rules);
        // The kernel takes the route away (the interface lost its address): the check's
        // lookup is refused, not sent by the main table, and the route comes back when
        // the address does.
        ip(&["addr", "del", "198.18.1.1/24", "dev", "d0"]);
        assert!(!ip(&["-4", "route", "show", "table", &table]).contains("198.18.100.1"));
        let lookup = |to: &str| {
            Command::new("ip").args(["-4", "route", "get", to, "mark", &table]).output().unwrap()
        };
        let vip = lookup("198.18.100.1");
        assert!(!vip.status.success(), "{}", String::from_utf8_lossy(&vip.stdout));

        ip(&["addr", "add", "198.18.1.1/24", "dev", "d0"]);
        routes.reassert();
        // In a thread of its own: at most 10 s.
        let mut back = String::new();
        for _ in 0..200 {
            back = ip(&["-4", "route", "show", "table", &table]);
            if back == routed {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        assert_eq!(back, routed);
        // The backend's own address goes by the main table (its checks of NAT services
        // come from the same marked sockets), not into the unreachable default.
        let own = lookup("198.18.1.11");
        assert!(own.status.success(), "{}", String::from_utf8_lossy(&own.stderr));
        assert!(String::from_utf8_lossy(&own.stdout).contains("dev d0"));
        routes.clear();
        assert_eq!(ip(&["-4", "rule", "show", "priority", &RULE_PRIORITY.to_string()]).trim(), "");
        assert_eq!(ip(&["-4", "route", "show", "table", &table]).trim(), "");
    }
}
