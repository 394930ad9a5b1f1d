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

use tracing::{debug, warn};

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
}

impl CheckRoutes {
    /// Makes the installed rules and routes exactly `wanted`.
    pub fn sync(&mut self, wanted: &BTreeMap<u32, CheckRoute>) {
        if !self.cleaned {
            remove_stale();
            self.cleaned = true;
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
            let (backend, vips) = route;
            let s = &mut script[usize::from(backend.is_ipv6())];
            let m = mark(*id);
            let _ = writeln!(s, "rule add priority {RULE_PRIORITY} fwmark {m} table {m}");
            for vip in vips.iter().filter(|v| v.is_ipv6() == backend.is_ipv6()) {
                let len = if vip.is_ipv4() { 32 } else { 128 };
                let _ = writeln!(s, "route replace {vip}/{len} via {backend} table {m}");
            }
        }
        for (family, script) in ["-4", "-6"].iter().zip(&script) {
            if !script.is_empty() {
                run_batch(family, script);
            }
        }
        self.installed.clone_from(wanted);
    }

    /// Removes every rule and route installed.
    pub fn clear(&mut self) {
        self.sync(&BTreeMap::new());
    }
}

/// Removes rules (and their tables) that an earlier run left at our priority.
fn remove_stale() {
    for family in ["-4", "-6"] {
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
            run_batch(family, &script);
        }
    }
}

fn run_batch(family: &str, script: &str) {
    let child = Command::new("ip")
        .args([family, "-force", "-batch", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn();
    let result = child.and_then(|mut child| {
        child.stdin.take().expect("piped stdin").write_all(script.as_bytes())?;
        child.wait_with_output()
    });
    match result {
        Ok(output) if output.status.success() => {}
        Ok(output) => warn!(
            errors = %String::from_utf8_lossy(&output.stderr).trim(),
            "some health-check routes could not be set"
        ),
        Err(error) => warn!(%error, "cannot run ip to set health-check routes"),
    }
}
