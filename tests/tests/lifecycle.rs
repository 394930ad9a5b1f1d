//! Backend lifecycle in the lab, with `lbd` running its health checks against the lab's real
//! servers: a stopped server leaves the tables and rejoins when it restarts; a draining
//! backend keeps its established iperf3 flow while new curls avoid it; slow start ramps a new
//! backend's share; an autoscaling policy POSTs one signed event to a webhook receiver.

#![allow(clippy::too_many_lines, reason = "an end-to-end scenario reads best top to bottom")]
#![allow(clippy::cast_precision_loss, reason = "shares of a few hundred flows")]

use std::{
    collections::BTreeMap,
    io::{BufRead as _, BufReader, Read as _, Write as _},
    net::{IpAddr, TcpListener},
    process::{Command, Stdio},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use lb_tests::{
    daemon::LabDaemon,
    lab::{self, Lab, PoolExtras, client_sources, spread_http, url},
    netns::wait_for,
    privileged::require_privileges,
};

/// Calls lbd's API (on its default address, inside the load balancer's namespace).
fn api(lab: &Lab, method: &str, path: &str, body: Option<&str>) -> String {
    let url = format!("http://127.0.0.1:7070{path}");
    let mut args = vec!["curl", "-sS", "--fail-with-body", "-X", method, &url];
    if let Some(body) = body {
        args.extend(["-H", "content-type: application/json", "-d", body]);
    }
    lab.lb.exec(&args).unwrap_or_else(|e| panic!("{method} {path}: {e:#}"))
}

/// A backend as `GET /v1/pools` shows it.
fn backend_view(lab: &Lab, pool: &str, addr: IpAddr) -> serde_json::Value {
    let pools: serde_json::Value =
        serde_json::from_str(&api(lab, "GET", "/v1/pools", None)).unwrap();
    pools
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == pool)
        .and_then(|p| {
            p["backends"].as_array().unwrap().iter().find(|b| b["address"] == addr.to_string())
        })
        .cloned()
        .unwrap_or_else(|| panic!("no backend {addr} in pool {pool}: {pools}"))
}

fn healthy(lab: &Lab, pool: &str, addr: IpAddr) -> Option<bool> {
    backend_view(lab, pool, addr)["healthy"].as_bool()
}

/// The v4 and v6 NAT and DSR HTTP services, with their sources.
fn http_services() -> [(&'static str, IpAddr, bool); 4] {
    [
        ("NAT IPv4", lab::VIP_V4.into(), false),
        ("DSR IPv4", lab::DSR_VIP_V4.into(), false),
        ("NAT IPv6", lab::VIP_V6.into(), true),
        ("DSR IPv6", lab::DSR_VIP_V6.into(), true),
    ]
}

const CHECK: &str = r#"
[pool.health_check]
kind = "http"
interval_ms = 300
fast_interval_ms = 100
timeout_ms = 250
jitter_ms = 50
rise = 2
fall = 2
expect = "backend-"
"#;

/// The checks' worst case to notice a change: `n` results in a row, the first up to a full
/// interval (plus jitter) away, the rest at the fast interval, each taking up to the timeout.
fn detection_bound(n: u64) -> Duration {
    Duration::from_millis(300 + 50 + (n - 1) * (100 + 50) + n * 250)
}

/// Slack for a loaded machine: the test polls the API every 50 ms and lbd's tasks share two
/// CPUs with the rest of the suite (an iperf3 flow included).
const SLACK: Duration = Duration::from_secs(4);

#[test]
fn a_stopped_server_leaves_the_tables_and_rejoins_after_restart() {
    if !require_privileges("a_stopped_server_leaves_the_tables_and_rejoins_after_restart") {
        return;
    }
    let lab = Lab::create(3).unwrap();
    lab.start_iperf_servers().unwrap();
    let extras = PoolExtras { keys: "", tables: CHECK };
    let daemon = LabDaemon::start(&lab, &lab::lab_config_pools(3, &[], "", "", &extras));
    // Every backend passes its checks: those of the DSR services go to the service address
    // through the backend's check route, in both families.
    for b in &lab.backends {
        for (pool, addr) in [("web4", IpAddr::from(b.v4)), ("web6", IpAddr::from(b.v6))] {
            let view = backend_view(&lab, pool, addr);
            assert_eq!(view["healthy"], true, "{pool} {addr}: {view}");
            assert_eq!(view["last_check_error"], serde_json::Value::Null, "{pool} {addr}: {view}");
        }
    }
    // An established flow to another backend must not notice.
    let iperf = lab.iperf_client(lab::VIP_V4.into(), 8, "100M").unwrap();
    let serving = wait_for(Duration::from_secs(5), || lab.iperf_backend()).expect("iperf3 up");
    let victim = (serving + 1) % 3;
    let name = lab.backends[victim].name.clone();
    let (v4, v6) = (IpAddr::from(lab.backends[victim].v4), IpAddr::from(lab.backends[victim].v6));
    std::thread::sleep(Duration::from_secs(1));

    lab.stop_server(victim).unwrap();
    let stopped = Instant::now();
    let bound = detection_bound(2) + SLACK;
    let down = wait_for(bound, || {
        (healthy(&lab, "web4", v4) == Some(false) && healthy(&lab, "web6", v6) == Some(false))
            .then(Instant::now)
    });
    let took = down.map(|t| t - stopped);
    assert!(took.is_some(), "{name} still healthy {bound:?} after its server stopped");
    eprintln!("{name} marked down {:?} after its server stopped", took.unwrap());
    let metrics = api(&lab, "GET", "/metrics", None);
    assert!(
        metrics.contains(&format!("lb_backend_healthy{{pool=\"web4\",backend=\"{v4}\"}} 0")),
        "{metrics}"
    );
    // New flows of every service avoid it, and every one is answered.
    for (what, vip, v6) in http_services() {
        let counts = spread_http(&lab, &client_sources(v6), &url(vip, lab::HTTP_PORT), 10);
        assert_eq!(
            counts.values().sum::<usize>(),
            90,
            "{what}: every request answered: {counts:?}"
        );
        assert!(!counts.contains_key(&name), "{what}: {name} still gets new flows: {counts:?}");
    }
    lab::check_iperf("the flow to a healthy backend", iperf, 8, 5_000_000);

    lab.start_server(victim).unwrap();
    let restarted = Instant::now();
    let bound = detection_bound(2) + SLACK;
    let up = wait_for(bound, || {
        (healthy(&lab, "web4", v4) == Some(true) && healthy(&lab, "web6", v6) == Some(true))
            .then(Instant::now)
    });
    assert!(up.is_some(), "{name} not healthy {bound:?} after its server restarted");
    eprintln!("{name} back up {:?} after its server restarted", up.unwrap() - restarted);
    for (what, vip, v6) in http_services() {
        let counts = spread_http(&lab, &client_sources(v6), &url(vip, lab::HTTP_PORT), 10);
        assert_eq!(counts.values().sum::<usize>(), 90, "{what}: {counts:?}");
        assert!(counts.get(&name).copied().unwrap_or(0) > 0, "{what}: {name} not back: {counts:?}");
    }

    // A DSR backend whose host is up but that no longer holds the service address fails its
    // checks: they go to the service address, not the host's.
    let other = (victim + 1) % 3;
    let b = &lab.backends[other];
    b.ns.ip(&["addr", "del", &format!("{}/32", lab::DSR_VIP_V4), "dev", "lo"]).unwrap();
    let bound = detection_bound(2) + SLACK;
    let down =
        wait_for(bound, || (healthy(&lab, "web4", b.v4.into()) == Some(false)).then_some(()));
    assert!(down.is_some(), "{} without the service address still healthy", b.name);
    let view = backend_view(&lab, "web4", b.v4.into());
    let error = view["last_check_error"].as_str().unwrap_or_default();
    assert!(error.contains(&lab::DSR_VIP_V4.to_string()), "the failing target: {view}");
    assert_eq!(
        healthy(&lab, "web6", b.v6.into()),
        Some(true),
        "its IPv6 service address is still there"
    );
    b.ns.ip(&["addr", "add", &format!("{}/32", lab::DSR_VIP_V4), "dev", "lo"]).unwrap();
    let up = wait_for(bound, || (healthy(&lab, "web4", b.v4.into()) == Some(true)).then_some(()));
    assert!(up.is_some(), "{} with the service address back is not healthy", b.name);

    let log = daemon.finish();
    assert!(log.contains("backend is DOWN") && log.contains("backend is UP again"), "{log}");
    // lbd removed its check routes when it stopped.
    let rules = lab.lb.exec(&["ip", "rule", "show", "priority", "9911"]).unwrap();
    assert!(rules.trim().is_empty(), "check rules left behind: {rules}");
}

#[test]
fn a_draining_backend_keeps_its_flow_while_new_ones_avoid_it() {
    if !require_privileges("a_draining_backend_keeps_its_flow_while_new_ones_avoid_it") {
        return;
    }
    let lab = Lab::create(3).unwrap();
    lab.start_iperf_servers().unwrap();
    let daemon = LabDaemon::start(&lab, &lab::lab_config(3, &[]));
    let iperf = lab.iperf_client(lab::VIP_V4.into(), 6, "100M").unwrap();
    let serving = wait_for(Duration::from_secs(5), || lab.iperf_backend()).expect("iperf3 up");
    let name = lab.backends[serving].name.clone();
    let addr = IpAddr::from(lab.backends[serving].v4);
    std::thread::sleep(Duration::from_secs(1));

    api(
        &lab,
        "PUT",
        &format!("/v1/pools/web4/backends/{addr}/state"),
        Some(r#"{"state":"draining"}"#),
    );
    let view = backend_view(&lab, "web4", addr);
    assert_eq!(view["state"], "draining", "{view}");
    assert_eq!(view["effective_weight"], 0, "{view}");
    assert_eq!(view["weight"], 100, "{view}");
    let counts =
        spread_http(&lab, &client_sources(false), &url(lab::VIP_V4.into(), lab::HTTP_PORT), 10);
    assert_eq!(counts.values().sum::<usize>(), 90, "{counts:?}");
    assert!(!counts.contains_key(&name), "draining {name} got new flows: {counts:?}");
    assert_eq!(lab.iperf_backend(), Some(serving), "the established flow stays on {name}");
    lab::check_iperf("the draining backend's flow", iperf, 6, 5_000_000);

    // Active again: it takes new flows.
    api(
        &lab,
        "PUT",
        &format!("/v1/pools/web4/backends/{addr}/state"),
        Some(r#"{"state":"active"}"#),
    );
    let counts =
        spread_http(&lab, &client_sources(false), &url(lab::VIP_V4.into(), lab::HTTP_PORT), 10);
    assert!(counts.get(&name).copied().unwrap_or(0) > 0, "{name} not back: {counts:?}");
    daemon.finish();
}

#[test]
fn a_draining_backend_past_its_deadline_has_its_flows_cut() {
    // drain_timeout_secs = 2: the draining backend's established flow is cut once the
    // deadline passes (its table entries go, the client's connection ends), not before.
    if !require_privileges("a_draining_backend_past_its_deadline_has_its_flows_cut") {
        return;
    }
    let lab = Lab::create(2).unwrap();
    lab.start_iperf_servers().unwrap();
    let extras = PoolExtras { keys: "drain_timeout_secs = 2", tables: "" };
    let daemon = LabDaemon::start(&lab, &lab::lab_config_pools(2, &[], "", "", &extras));
    let started = Instant::now();
    let iperf = lab.iperf_client(lab::VIP_V4.into(), 20, "50M").unwrap();
    let serving = wait_for(Duration::from_secs(5), || lab.iperf_backend()).expect("iperf3 up");
    let addr = IpAddr::from(lab.backends[serving].v4);
    let active = || backend_view(&lab, "web4", addr)["active_flows"].as_u64();
    // The connection-table sweep (every 5 s) counts the flow.
    let live = wait_for(Duration::from_secs(12), || active().filter(|n| *n > 0));
    assert!(live.is_some(), "the sweep never counted the flow: {:?}", active());

    // The drain clock starts in the API's handler: take the time before the request.
    let drained = Instant::now();
    api(
        &lab,
        "PUT",
        &format!("/v1/pools/web4/backends/{addr}/state"),
        Some(r#"{"state":"draining"}"#),
    );
    // Past the deadline the backend's flows are cut: the next sweeps count none.
    let gone = wait_for(Duration::from_secs(15), || (active()? == 0).then(Instant::now));
    let took = gone.map(|t| t - drained);
    assert!(took.is_some(), "flows still counted 15 s after draining: {:?}", active());
    assert!(took.unwrap() >= Duration::from_secs(2), "cut after {took:?}, before the deadline");
    // The client's view: full seconds of data until a second after draining (before the
    // deadline), and not a clean run to its end.
    let output = iperf.wait_with_output().unwrap();
    let report: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap_or_default();
    let bytes: Vec<u64> = report["intervals"]
        .as_array()
        .map(|i| i.iter().map(|x| x["sum"]["bytes"].as_u64().unwrap_or(0)).collect())
        .unwrap_or_default();
    let kept = usize::try_from((drained - started).as_secs()).unwrap() + 1;
    assert!(
        bytes.len() > kept && bytes[..=kept].iter().all(|b| *b > 0),
        "the flow stalled before the deadline (drained after {:?}): {bytes:?}",
        drained - started
    );
    let clean = report.get("error").is_none() && bytes.len() >= 19 && bytes.iter().all(|b| *b > 0);
    assert!(!clean, "the flow ran on past the cut: {report}");
    daemon.finish();
}

#[test]
fn a_removed_backend_carrying_a_flow_stays_in_the_metrics_as_draining() {
    // Removed while its iperf3 flow runs (no drain deadline), the backend keeps carrying
    // it; its series stay, as draining, with its flow and its traffic still counted.
    if !require_privileges("a_removed_backend_carrying_a_flow_stays_in_the_metrics_as_draining") {
        return;
    }
    let lab = Lab::create(2).unwrap();
    lab.start_iperf_servers().unwrap();
    let daemon = LabDaemon::start(&lab, &lab::lab_config(2, &[]));
    let iperf = lab.iperf_client(lab::VIP_V4.into(), 14, "50M").unwrap();
    let serving = wait_for(Duration::from_secs(5), || lab.iperf_backend()).expect("iperf3 up");
    let addr = IpAddr::from(lab.backends[serving].v4);
    api(&lab, "DELETE", &format!("/v1/pools/web4/backends/{addr}"), None);
    let series = |name: &str, extra: &str| -> Option<u64> {
        let metrics = api(&lab, "GET", "/metrics", None);
        let prefix = format!("{name}{{pool=\"web4\",backend=\"{addr}\"{extra}}} ");
        metrics.lines().find_map(|l| l.strip_prefix(prefix.as_str())?.trim().parse().ok())
    };
    assert_eq!(series("lb_backend_state", ",state=\"draining\""), Some(1));
    // No weight series: a pool's weights (and the alert on them) count configured backends.
    assert_eq!(series("lb_backend_effective_weight", ""), None);
    // The next sweep (every 5 s) counts its flows: iperf3's control connection and data
    // flow (and the lab's readiness requests, while they close).
    let live = wait_for(Duration::from_secs(12), || {
        series("lb_backend_active_flows", "").filter(|n| *n >= 2)
    });
    assert!(
        live.is_some(),
        "the removed backend's flows: {:?}",
        series("lb_backend_active_flows", "")
    );
    // `/v1/pools` (and `lbctl pools`) list it too, as removed.
    let view = backend_view(&lab, "web4", addr);
    assert_eq!((&view["removed"], &view["state"]), (&true.into(), &"draining".into()), "{view}");
    assert!(view["active_flows"].as_u64().is_some_and(|n| n >= 2), "{view}");
    let before = series("lb_backend_packets_total", "").expect("its packet counter");
    std::thread::sleep(Duration::from_secs(1));
    let after = series("lb_backend_packets_total", "").expect("its packet counter");
    assert!(after > before, "its traffic still counted: {before} -> {after}");
    lab::check_iperf("the removed backend's flow", iperf, 14, 5_000_000);
    daemon.finish();
}

/// 20 s of slow start for a backend joining two others at weight 100. Its weight is about
/// 5 at 1 s (share ~2%), 50 at 10 s (20%), 100 after 20 s (33%). 162 flows for the first
/// sample, 324 and 486 for the next two: the growth checks compare shares about 11 points
/// apart whose difference has a standard deviation near 3 (a chance failure about once in
/// 6,000 runs), the bounds are five or more deviations away.
#[test]
fn slow_start_grows_a_new_backend_share_over_the_ramp() {
    if !require_privileges("slow_start_grows_a_new_backend_share_over_the_ramp") {
        return;
    }
    let lab = Lab::create(3).unwrap();
    let extras = PoolExtras { keys: "slow_start_secs = 20", tables: "" };
    let daemon = LabDaemon::start(&lab, &lab::lab_config_pools(2, &[], "", "", &extras));
    let newcomer = lab.backends[2].name.clone();
    let body = format!(r#"{{"address":"{}"}}"#, lab.backends[2].v4);
    api(&lab, "POST", "/v1/pools/web4/backends", Some(&body));
    let added = Instant::now();
    // 9 sources: 162 connections, then 324 and 486 (the last share, a third expected, is
    // held to 22%: five standard deviations below).
    let share = |per_source: usize| {
        let sources = client_sources(false);
        let counts =
            spread_http(&lab, &sources, &url(lab::VIP_V4.into(), lab::HTTP_PORT), per_source);
        let total: usize = counts.values().sum();
        assert_eq!(total, sources.len() * per_source, "{counts:?}");
        (counts.get(&newcomer).copied().unwrap_or(0) as f64 / total as f64, counts)
    };
    let mut shares = Vec::new();
    for (at, per_source) in [(0u64, 18), (10, 36), (21, 54)] {
        if let Some(wait) = Duration::from_secs(at).checked_sub(added.elapsed()) {
            std::thread::sleep(wait);
        }
        let weight =
            backend_view(&lab, "web4", lab.backends[2].v4.into())["effective_weight"].clone();
        let (s, counts) = share(per_source);
        eprintln!(
            "{:>5.1} s: effective weight {weight}, share {:.1}% {counts:?}",
            added.elapsed().as_secs_f64(),
            s * 100.0
        );
        shares.push(s);
    }
    assert!(shares[0] < 0.12, "at the start of the ramp: {shares:?}");
    assert!(shares[0] < shares[1] && shares[1] < shares[2], "shares must grow: {shares:?}");
    assert!(shares[2] > 0.22, "after the ramp the full share: {shares:?}");
    daemon.finish();
}

/// One HTTP request as the webhook receiver saw it.
#[derive(Debug, Clone)]
struct Received {
    headers: BTreeMap<String, String>,
    body: Vec<u8>,
}

/// A webhook receiver on a socket inside the load balancer's namespace; answers 200.
struct Receiver {
    port: u16,
    received: Arc<Mutex<Vec<Received>>>,
    stop: Arc<AtomicBool>,
}

impl Receiver {
    fn start(lab: &Lab) -> Self {
        let listener = lab.lb.enter(|| TcpListener::bind("127.0.0.1:0")).unwrap().unwrap();
        listener.set_nonblocking(true).unwrap();
        let port = listener.local_addr().unwrap().port();
        let received = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let (r, s) = (received.clone(), stop.clone());
        std::thread::spawn(move || {
            while !s.load(Ordering::SeqCst) {
                match listener.accept() {
                    Ok((stream, _)) => {
                        stream.set_nonblocking(false).unwrap();
                        stream.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
                        if let Some(request) = read_request(&stream) {
                            r.lock().unwrap().push(request);
                        }
                        let _ = (&stream).write_all(
                            b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
                        );
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(20)),
                }
            }
        });
        Self { port, received, stop }
    }

    fn received(&self) -> Vec<Received> {
        self.received.lock().unwrap().clone()
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
    }
}

fn read_request(stream: &std::net::TcpStream) -> Option<Received> {
    let mut reader = BufReader::new(stream);
    let mut line = String::new();
    reader.read_line(&mut line).ok()?;
    let mut headers = BTreeMap::new();
    headers.insert(":request".to_owned(), line.trim().to_owned());
    loop {
        line.clear();
        reader.read_line(&mut line).ok()?;
        let trimmed = line.trim();
        if trimmed.is_empty() {
            break;
        }
        let (k, v) = trimmed.split_once(':')?;
        headers.insert(k.trim().to_ascii_lowercase(), v.trim().to_owned());
    }
    let length: usize = headers.get("content-length")?.parse().ok()?;
    let mut body = vec![0; length];
    reader.read_exact(&mut body).ok()?;
    Some(Received { headers, body })
}

/// HMAC-SHA256 of `body` by openssl: an implementation independent of lbd's.
fn openssl_hmac(secret: &str, body: &[u8]) -> String {
    let mut child = Command::new("openssl")
        .args(["dgst", "-sha256", "-hmac", secret])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("openssl");
    child.stdin.take().unwrap().write_all(body).unwrap();
    let out = child.wait_with_output().unwrap();
    String::from_utf8_lossy(&out.stdout).split_whitespace().last().unwrap_or_default().to_owned()
}

#[test]
fn a_new_flow_surge_fires_one_signed_webhook_per_cooldown() {
    if !require_privileges("a_new_flow_surge_fires_one_signed_webhook_per_cooldown") {
        return;
    }
    let lab = Lab::create(3).unwrap();
    let receiver = Receiver::start(&lab);
    let secret = "a-shared-secret-for-the-webhook";
    let secret_file = std::env::temp_dir().join(format!("{}-hook-secret", lab.id));
    std::fs::write(&secret_file, format!("{secret}\n")).unwrap();
    let policy = format!(
        "[[pool.autoscale]]\nname = \"scale-out\"\nsignal = \"new_flows_per_second\"\nabove = 5.0\nfor_secs = 3\ncooldown_secs = 300\nwebhook = \"http://127.0.0.1:{}/hook\"\nsecret_file = \"{}\"\n",
        receiver.port,
        secret_file.display()
    );
    let extras = PoolExtras { keys: "", tables: &policy };
    let mut daemon = LabDaemon::start(&lab, &lab::lab_config_pools(3, &[], "", "", &extras));
    // Idle: nothing fires.
    std::thread::sleep(Duration::from_secs(3));
    assert!(receiver.received().is_empty(), "an event without load: {:?}", receiver.received());

    // A bounded load: batches of 90 new connections until the event comes (at most 20 s),
    // then 8 s more, over the policy's duration again but within its cooldown.
    let target = url(lab::VIP_V4.into(), lab::HTTP_PORT);
    let start = Instant::now();
    let mut fired_at = None;
    while start.elapsed() < Duration::from_secs(20) {
        spread_http(&lab, &client_sources(false), &target, 10);
        if !receiver.received().is_empty() {
            fired_at = Some(start.elapsed());
            break;
        }
    }
    let fired_at =
        fired_at.unwrap_or_else(|| panic!("no event within 20 s of load: {}", daemon.stop()));
    assert!(
        fired_at >= Duration::from_secs(3),
        "fired after {fired_at:?}, before the condition held 3 s"
    );
    let more = Instant::now();
    while more.elapsed() < Duration::from_secs(8) {
        spread_http(&lab, &client_sources(false), &target, 10);
    }
    let received = receiver.received();
    assert_eq!(received.len(), 1, "one event per cooldown: {received:?}");

    let request = &received[0];
    assert_eq!(request.headers[":request"], "POST /hook HTTP/1.1");
    assert_eq!(request.headers["content-type"], "application/json");
    let expected = format!("sha256={}", openssl_hmac(secret, &request.body));
    assert_eq!(request.headers["x-lb-signature"], expected, "signature of the body");
    let event: serde_json::Value = serde_json::from_slice(&request.body).unwrap();
    assert_eq!(request.headers["x-lb-event-id"], event["id"].as_str().unwrap());
    assert_eq!(event["version"], 1);
    assert_eq!(event["pool"], "web4");
    assert_eq!(event["policy"], "scale-out");
    assert_eq!(event["signal"], "new_flows_per_second");
    assert_eq!(event["direction"], "above");
    assert_eq!(event["threshold"], 5.0);
    assert!(event["value"].as_f64().unwrap() > 5.0, "{event}");
    assert_eq!(event["backends"].as_array().unwrap().len(), 3, "{event}");
    assert_eq!(event["healthy_backends"], 3);

    let metrics = api(&lab, "GET", "/metrics", None);
    for line in [
        "lb_autoscale_events_total{pool=\"web4\",policy=\"scale-out\"} 1",
        "lb_autoscale_deliveries_total{pool=\"web4\",policy=\"scale-out\",target=\"webhook\",result=\"ok\"} 1",
    ] {
        assert!(metrics.contains(line), "{line} missing from:\n{metrics}");
    }
    let log = daemon.finish();
    assert!(
        log.contains("autoscaling policy fired") && log.contains("autoscaling webhook delivered"),
        "{log}"
    );
    let _ = std::fs::remove_file(&secret_file);
}
