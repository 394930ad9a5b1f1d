//! A real Prometheus server scrapes `lbd`'s `/metrics` (with the bearer token), and a query
//! through its HTTP API returns the per-backend and per-service counters after known traffic.

use std::time::Duration;

use lb_tests::{
    lab::{self, Lab},
    netns::{ChildOutput, wait_for},
    privileged::require_privileges,
};

const TOKEN: &str = "prometheus-test-token-0123456789";

/// Runs an instant query against the Prometheus in the load balancer's namespace and returns
/// the values of the result vector.
fn query(lab: &Lab, promql: &str) -> Option<Vec<(serde_json::Value, f64)>> {
    let out = lab
        .lb
        .exec(&[
            "curl",
            "-sS",
            "--max-time",
            "3",
            "-G",
            "http://127.0.0.1:9090/api/v1/query",
            "--data-urlencode",
            &format!("query={promql}"),
        ])
        .ok()?;
    let v: serde_json::Value = serde_json::from_str(&out).ok()?;
    let result = v["data"]["result"].as_array()?;
    Some(
        result
            .iter()
            .map(|r| {
                (
                    r["metric"].clone(),
                    r["value"][1].as_str().and_then(|s| s.parse().ok()).unwrap_or(f64::NAN),
                )
            })
            .collect(),
    )
}

#[test]
fn prometheus_scrapes_the_counters_of_known_traffic() {
    if !require_privileges("prometheus_scrapes_the_counters_of_known_traffic") {
        return;
    }
    // Made before the lab, so dropped after it (and the Prometheus writing into it).
    let dir = lb_tests::daemon::TempDir(
        std::env::temp_dir().join(format!("{}-prom", lb_tests::netns::unique_id())),
    );
    let dir = &dir.0;
    let lab = Lab::create(2).unwrap();
    std::fs::create_dir_all(dir.join("data")).unwrap();
    let token_file = dir.join("token");
    std::fs::write(&token_file, TOKEN).unwrap();
    std::fs::set_permissions(&token_file, std::os::unix::fs::PermissionsExt::from_mode(0o600))
        .unwrap();
    let config = lab::lab_config_with(
        2,
        &[],
        "pin_dir = \"\"\n",
        &format!("listen = \"127.0.0.1:7070\"\ntoken_file = \"{}\"\n", token_file.display()),
    );
    let config_path = dir.join("lb.toml");
    std::fs::write(&config_path, &config).unwrap();
    let lbd_pid = lb_tests::daemon::spawn_lbd(&lab.lb, &config_path, ChildOutput::Discard).unwrap();
    let up =
        wait_for(Duration::from_secs(20), || lab.curl(lab::VIP_V4.into(), lab::HTTP_PORT).ok());
    assert!(up.is_some(), "lbd did not start serving");

    let prom_config = dir.join("prometheus.yml");
    std::fs::write(
        &prom_config,
        format!(
            "global:\n  scrape_interval: 1s\nscrape_configs:\n  - job_name: lbd\n    authorization:\n      type: Bearer\n      credentials_file: {}\n    static_configs:\n      - targets: ['127.0.0.1:7070']\n",
            token_file.display()
        ),
    )
    .unwrap();
    let prom_args = [
        "prometheus".to_owned(),
        format!("--config.file={}", prom_config.display()),
        format!("--storage.tsdb.path={}", dir.join("data").display()),
        "--web.listen-address=127.0.0.1:9090".to_owned(),
    ];
    let _prom = lab.lb.spawn(&prom_args, ChildOutput::Discard).unwrap();
    let scraping = wait_for(Duration::from_mins(1), || {
        let up = query(&lab, "up{job=\"lbd\"}")?;
        (up.first().map(|(_, v)| *v) == Some(1.0)).then_some(())
    });
    assert!(scraping.is_some(), "Prometheus never scraped lbd successfully");

    // Known traffic: 30 new connections to the NAT service (the warm-up request made one).
    let before = wait_for(Duration::from_secs(10), || {
        query(&lab, "lb_service_new_flows_total{service=\"web4\"}")?.first().map(|(_, v)| *v)
    })
    .expect("the service's counter never reached Prometheus");
    for _ in 0..30 {
        assert!(lab.curl(lab::VIP_V4.into(), lab::HTTP_PORT).unwrap().starts_with("backend-"));
    }
    let want = before + 30.0;
    let service = wait_for(Duration::from_secs(30), || {
        let v = query(&lab, "lb_service_new_flows_total{service=\"web4\"}")?.first()?.1;
        (v >= want).then_some(v)
    });
    assert_eq!(service, Some(want), "service counter in Prometheus");
    // The per-backend counters add up to the same, each backend labelled by pool and address.
    let backends = query(&lab, "lb_backend_new_flows_total{pool=\"web4\"}").unwrap();
    assert_eq!(backends.len(), 2, "{backends:?}");
    let sum: f64 = backends.iter().map(|(_, v)| v).sum();
    assert!(
        (sum - want).abs() < f64::EPSILON,
        "backends sum to {sum}, the service counted {want}: {backends:?}"
    );
    assert!(
        backends
            .iter()
            .all(|(m, _)| m["backend"].as_str().is_some_and(|b| b.starts_with("198.18.1."))),
        "{backends:?}"
    );
    // Traffic that is not a service's (IPv6 neighbour discovery on the lab's links, for one)
    // passes to the host, and is counted.
    let passed = query(&lab, "lb_passed_packets_total{reason=\"not_service\"}").unwrap();
    assert_eq!(passed.len(), 1, "{passed:?}");
    assert!(passed[0].1 > 0.0, "nothing counted as passed: {passed:?}");
    // A client that does not ask for OpenMetrics gets the text format, which Prometheus'
    // own linter accepts whole (help, types, names).
    let text = lab
        .lb
        .exec(&["sh", "-c", &format!("curl -sS -D {0}/headers -H 'Authorization: Bearer {TOKEN}' http://127.0.0.1:7070/metrics > {0}/metrics.txt && promtool check metrics < {0}/metrics.txt 2>&1; echo exit=$?", dir.display())])
        .unwrap();
    assert!(text.trim_end().ends_with("exit=0"), "promtool check metrics: {text}");
    let headers = std::fs::read_to_string(dir.join("headers")).unwrap();
    assert!(headers.contains("text/plain; version=0.0.4"), "{headers}");
    let body = std::fs::read_to_string(dir.join("metrics.txt")).unwrap();
    assert!(body.contains("# TYPE lb_service_new_flows_total counter"), "{body}");

    if let Some(mut child) = lab.lb.take_child(lbd_pid) {
        let stopped = lb_tests::netns::stop_child(&mut child, "-TERM", Duration::from_secs(20));
        assert!(stopped.in_time, "lbd did not stop on SIGTERM");
    }
}
