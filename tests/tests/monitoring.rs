//! The shipped monitoring files: the Prometheus alerting rules pass `promtool check rules`
//! and their unit tests (`promtool test rules`), and every metric the rules and the Grafana
//! dashboard use is one `lbd` really exports.

use std::{collections::BTreeSet, path::PathBuf, process::Command, time::Duration};

use lb_tests::{
    config,
    daemon::LbdSandbox,
    lab,
    netns::{ChildOutput, wait_for},
    privileged::require_privileges,
};
use lb_userspace::config::DEFAULT_API_LISTEN;

const TOKEN: &str = "monitoring-test-token-0123456789";

fn docs() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../docs/monitoring")
}

/// Every `lb_…` metric name in `text` (with the `_total` of counters as written).
fn metric_names(text: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let bytes = text.as_bytes();
    let mut i = 0;
    while let Some(pos) = text[i..].find("lb_") {
        let start = i + pos;
        let boundary =
            start == 0 || !(bytes[start - 1].is_ascii_alphanumeric() || bytes[start - 1] == b'_');
        let end = text[start..]
            .find(|c: char| !(c.is_ascii_lowercase() || c == '_'))
            .map_or(text.len(), |e| start + e);
        if boundary && end > start + 3 {
            names.insert(text[start..end].to_owned());
        }
        i = end.max(start + 1);
    }
    names
}

/// Runs `promtool <args>` in `docs/monitoring`; `false` (after saying so) when promtool is
/// missing outside CI.
fn promtool(test: &str, args: &[&str]) -> bool {
    let out = match Command::new("promtool").args(args).current_dir(docs()).output() {
        Ok(out) => out,
        Err(error) => {
            assert!(!lb_tests::privileged::in_ci(), "promtool is missing in CI: {error}");
            eprintln!(
                "SKIPPED {test}: promtool not installed ({error}); `cargo xtask test` installs it"
            );
            return false;
        }
    };
    assert!(
        out.status.success(),
        "promtool {args:?}:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    true
}

#[test]
fn alerting_rules_pass_promtool() {
    promtool("alerting_rules_pass_promtool", &["check", "rules", "alerts.yml"]);
}

/// The pool and backend alerts fire on the series that should raise them, and not on a
/// draining backend that rightly takes no new flows (`alerts-test.yml`).
#[test]
fn alerting_rules_fire_on_their_series() {
    promtool("alerting_rules_fire_on_their_series", &["test", "rules", "alerts-test.yml"]);
}

#[test]
fn rules_and_dashboard_use_only_exported_metrics() {
    if !require_privileges("rules_and_dashboard_use_only_exported_metrics") {
        return;
    }
    let dashboard = std::fs::read_to_string(docs().join("grafana-dashboard.json")).unwrap();
    let parsed: serde_json::Value =
        serde_json::from_str(&dashboard).expect("the dashboard is JSON");
    assert!(parsed["panels"].as_array().is_some_and(|p| p.len() >= 10));
    let alerts = std::fs::read_to_string(docs().join("alerts.yml")).unwrap();
    let used: BTreeSet<String> =
        metric_names(&dashboard).into_iter().chain(metric_names(&alerts)).collect();
    assert!(used.len() >= 10, "{used:?}");

    // What a running lbd exports.
    let sandbox = LbdSandbox::create("mon", TOKEN).unwrap();
    let pool = config::pool("p", &[(lab::backend_v4(0), "")])
        + "[pool.health_check]\nkind = \"tcp\"\ninterval_ms = 200\ntimeout_ms = 100\n\
           [[pool.autoscale]]\nname = \"a\"\nsignal = \"healthy_backends\"\nbelow = 5.0\ncommand = [\"false\"]\n";
    let nat = format!("mode = \"nat\"\nnat_source = \"{}\"", lab::LB_BACK_V4);
    let service = config::tcp_service("s", lab::VIP_V4, lab::HTTP_PORT, "p", &nat);
    sandbox.write_config(DEFAULT_API_LISTEN, "", &(pool + &service)).unwrap();
    let pid = sandbox.spawn_lbd(ChildOutput::Discard).unwrap();
    let bearer = format!("Authorization: Bearer {TOKEN}");
    let url = format!("http://{DEFAULT_API_LISTEN}/metrics");
    let scrape = wait_for(Duration::from_secs(20), || {
        // Every family has samples once the policy (which holds at once) has fired and its
        // command has failed.
        sandbox
            .ns
            .exec(&["curl", "-sf", "--max-time", "2", "-H", &bearer, &url])
            .ok()
            .filter(|text| text.contains("lb_autoscale_deliveries_total{"))
    });
    sandbox.stop_lbd(pid);
    let scrape = scrape.expect("lbd's /metrics answered");
    let exported: BTreeSet<String> = scrape
        .lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| l.split(['{', ' ']).next())
        .map(str::to_owned)
        .collect();
    let missing: Vec<&String> = used.iter().filter(|m| !exported.contains(*m)).collect();
    assert!(
        missing.is_empty(),
        "rules or dashboard use metrics lbd does not export: {missing:?}\nexported: {exported:?}"
    );
}
