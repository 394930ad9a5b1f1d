//! Attach tests of the balancer: `lbd` runs in the lab's load-balancer namespace with NAT and
//! DSR services over IPv4 and IPv6, and real clients (curl, iperf3, UDP sockets) in the client
//! namespace reach the backends through it.

#![allow(clippy::too_many_lines, reason = "an end-to-end scenario reads best top to bottom")]
#![allow(clippy::cast_precision_loss, reason = "shares of a few hundred flows")]

use std::{
    collections::BTreeMap,
    net::{IpAddr, SocketAddr, UdpSocket},
    path::PathBuf,
    process::{Child, Command},
    time::Duration,
};

use lb_tests::{
    lab::{self, Lab},
    netns::{ChildOutput, wait_for},
    privileged::require_privileges,
};

/// `lbd` running in the lab with a configuration file it can be told to reload.
struct Daemon {
    child: Option<Child>,
    config: PathBuf,
}

impl Daemon {
    fn start(lab: &Lab, config: &str) -> Self {
        let path = std::env::temp_dir().join(format!("{}-lbd.toml", lab.id));
        std::fs::write(&path, config).unwrap();
        let lbd = lab::bin_path("lbd").unwrap();
        let pid = lab
            .lb
            .spawn(
                &[
                    lbd.as_os_str(),
                    "--config".as_ref(),
                    path.as_os_str(),
                    "--detach-on-exit".as_ref(),
                ],
                ChildOutput::Capture,
            )
            .unwrap();
        let child = lab.lb.take_child(pid).unwrap();
        let daemon = Self { child: Some(child), config: path };
        // Ready when the service answers.
        let ready =
            wait_for(Duration::from_secs(20), || lab.curl(lab::VIP_V4.into(), lab::HTTP_PORT).ok());
        assert!(ready.is_some(), "lbd did not start serving: {}", daemon.stop());
        daemon
    }

    fn reload(&self, lab: &Lab, config: &str) {
        std::fs::write(&self.config, config).unwrap();
        let pid = self.child.as_ref().unwrap().id();
        let status = Command::new("kill").args(["-HUP", &pid.to_string()]).status().unwrap();
        assert!(status.success());
        let _ = lab;
    }

    /// Stops lbd and returns its log.
    fn stop(&self) -> String {
        let Some(child) = &self.child else { return String::new() };
        let _ = Command::new("kill").args(["-TERM", &child.id().to_string()]).status();
        String::new()
    }

    fn finish(mut self) -> String {
        let child = self.child.take().unwrap();
        let _ = Command::new("kill").args(["-TERM", &child.id().to_string()]).status();
        let output = child.wait_with_output().unwrap();
        let _ = std::fs::remove_file(&self.config);
        String::from_utf8_lossy(&output.stderr).into_owned()
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Opens `per_source` new connections from each client address to `url` with curl (one
/// process per source; `Connection: close` makes every request a new connection, so a new
/// flow) and counts the answering backends.
fn spread_http(
    lab: &Lab,
    sources: &[IpAddr],
    url: &str,
    per_source: usize,
) -> BTreeMap<String, usize> {
    let mut counts = BTreeMap::new();
    for source in sources {
        let mut args = vec![
            "curl".to_owned(),
            "-sS".into(),
            "--max-time".into(),
            "20".into(),
            "-H".into(),
            "Connection: close".into(),
        ];
        args.extend(["--interface".into(), source.to_string()]);
        for _ in 0..per_source {
            args.push(url.to_owned());
        }
        let out =
            lab.client.exec(&args).unwrap_or_else(|e| panic!("curl from {source} to {url}: {e:#}"));
        for line in out.lines() {
            *counts.entry(line.to_owned()).or_insert(0) += 1;
        }
    }
    counts
}

/// Sends `per_source` datagrams from new sockets on each client address and counts the
/// answering backends (each socket is a new UDP flow).
fn spread_udp(
    lab: &Lab,
    sources: &[IpAddr],
    target: IpAddr,
    per_source: usize,
) -> BTreeMap<String, usize> {
    lab.client
        .enter(|| {
            let mut counts = BTreeMap::new();
            for source in sources {
                for i in 0..per_source {
                    let socket = UdpSocket::bind(SocketAddr::new(*source, 0)).unwrap();
                    socket.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
                    socket.connect((target, lab::UDP_PORT)).unwrap();
                    socket.send(format!("ping {i}").as_bytes()).unwrap();
                    let mut buf = [0u8; 256];
                    let n = socket
                        .recv(&mut buf)
                        .unwrap_or_else(|e| panic!("no UDP reply from {target} to {source}: {e}"));
                    let reply = String::from_utf8_lossy(&buf[..n]).into_owned();
                    let name = reply.split_whitespace().next().unwrap_or_default().to_owned();
                    assert!(reply.ends_with(&format!("ping {i}")), "{reply}");
                    *counts.entry(name).or_insert(0) += 1;
                }
            }
            counts
        })
        .unwrap()
}

/// Every backend's share is within `tolerance` (a fraction) of its weight share.
fn assert_shares(what: &str, counts: &BTreeMap<String, usize>, weights: &[u32], tolerance: f64) {
    let total: usize = counts.values().sum();
    let weight_total: u32 = weights.iter().sum();
    for (i, weight) in weights.iter().enumerate() {
        let name = format!("backend-{}", i + 1);
        let got = counts.get(&name).copied().unwrap_or(0) as f64 / total as f64;
        let want = f64::from(*weight) / f64::from(weight_total);
        assert!(
            (got - want).abs() <= tolerance,
            "{what}: {name} took {:.1}% of {total} flows, its weight share is {:.1}% (± {:.0} points): {counts:?}",
            got * 100.0,
            want * 100.0,
            tolerance * 100.0
        );
    }
    assert!(
        counts.keys().all(|k| k.starts_with("backend-")),
        "{what}: unexpected answers {counts:?}"
    );
}

fn client_sources(v6: bool) -> Vec<IpAddr> {
    let mut v: Vec<IpAddr> =
        if v6 { vec![lab::CLIENT_V6.into()] } else { vec![lab::CLIENT_V4.into()] };
    for i in 0..lab::EXTRA_CLIENT_ADDRESSES {
        v.push(if v6 { lab::client_v6(i).into() } else { lab::client_v4(i).into() });
    }
    v
}

fn url(addr: IpAddr, port: u16) -> String {
    match addr {
        IpAddr::V4(a) => format!("http://{a}:{port}/"),
        IpAddr::V6(a) => format!("http://[{a}]:{port}/"),
    }
}

/// Weights 1:2:3. 40 new connections from each of 9 client addresses per service (360 flows):
/// at p = 1/2 the standard deviation of a share is 2.6 points, so ±10 points is nearly four.
#[test]
fn every_mode_and_family_spreads_flows_by_weight() {
    if !require_privileges("every_mode_and_family_spreads_flows_by_weight") {
        return;
    }
    let lab = Lab::create(3).unwrap();
    let weights = [100, 200, 300];
    let daemon = Daemon::start(&lab, &lab::lab_config(3, &weights));
    for (what, addr, v6) in [
        ("NAT IPv4 TCP", IpAddr::from(lab::VIP_V4), false),
        ("NAT IPv6 TCP", IpAddr::from(lab::VIP_V6), true),
        ("DSR IPv4 TCP", IpAddr::from(lab::DSR_VIP_V4), false),
        ("DSR IPv6 TCP", IpAddr::from(lab::DSR_VIP_V6), true),
    ] {
        let counts = spread_http(&lab, &client_sources(v6), &url(addr, lab::HTTP_PORT), 40);
        assert_eq!(
            counts.values().sum::<usize>(),
            360,
            "{what}: every request answered: {counts:?}"
        );
        assert_shares(what, &counts, &weights, 0.10);
    }
    for (what, addr, v6) in [
        ("NAT IPv4 UDP", IpAddr::from(lab::VIP_V4), false),
        ("NAT IPv6 UDP", IpAddr::from(lab::VIP_V6), true),
        ("DSR IPv4 UDP", IpAddr::from(lab::DSR_VIP_V4), false),
        ("DSR IPv6 UDP", IpAddr::from(lab::DSR_VIP_V6), true),
    ] {
        let counts = spread_udp(&lab, &client_sources(v6), addr, 40);
        assert_eq!(counts.values().sum::<usize>(), 360, "{what}: every datagram answered");
        assert_shares(what, &counts, &weights, 0.10);
    }
    let log = daemon.finish();
    assert!(log.contains("configuration applied"), "{log}");
}

/// Which backend holds an established iperf3 connection.
fn iperf_backend(lab: &Lab) -> Option<usize> {
    lab.backends.iter().position(|b| {
        b.ns.exec(&[
            "ss",
            "-Htn",
            "state",
            "established",
            "sport",
            "=",
            &format!(":{}", lab::IPERF_PORT),
        ])
        .is_ok_and(|out| !out.trim().is_empty())
    })
}

#[test]
fn an_iperf3_flow_survives_backends_added_and_removed() {
    if !require_privileges("an_iperf3_flow_survives_backends_added_and_removed") {
        return;
    }
    let lab = Lab::create(3).unwrap();
    for backend in &lab.backends {
        backend
            .ns
            .spawn(&["iperf3", "-s", "-p", &lab::IPERF_PORT.to_string()], ChildOutput::Discard)
            .unwrap();
    }
    for b in &lab.backends {
        let up = wait_for(Duration::from_secs(10), || {
            let out =
                b.ns.exec(&["ss", "-Htln", "sport", "=", &format!(":{}", lab::IPERF_PORT)]).ok()?;
            (!out.trim().is_empty()).then_some(())
        });
        assert!(up.is_some(), "iperf3 server on {} did not start", b.name);
    }
    // Start with two backends; the third joins and one leaves while the flow runs.
    let two = lab::lab_config(2, &[]);
    let daemon = Daemon::start(&lab, &two);
    for (what, vip) in [("NAT", IpAddr::from(lab::VIP_V4)), ("DSR", IpAddr::from(lab::DSR_VIP_V4))]
    {
        let pid = lab
            .client
            .spawn(
                &[
                    "iperf3",
                    "-c",
                    &vip.to_string(),
                    "-p",
                    &lab::IPERF_PORT.to_string(),
                    "-t",
                    "8",
                    "-i",
                    "1",
                    "-J",
                    "-b",
                    "200M",
                ],
                ChildOutput::Capture,
            )
            .unwrap();
        let client = lab.client.take_child(pid).unwrap();
        let serving =
            wait_for(Duration::from_secs(5), || iperf_backend(&lab)).expect("iperf3 connected");
        std::thread::sleep(Duration::from_secs(2));
        daemon.reload(&lab, &lab::lab_config(3, &[]));
        std::thread::sleep(Duration::from_secs(2));
        // Remove a backend that is not carrying the flow (keep backend-3, just added).
        let keep: Vec<usize> = (0..3).filter(|i| *i == serving || *i == 2).collect();
        let mut config = lab::lab_config(3, &[]);
        for i in 0..3 {
            if !keep.contains(&i) {
                config = config.replace(
                    &format!(
                        "[[pool.backend]]\naddress = \"{}\"\nweight = 100\n",
                        lab::backend_v4(i)
                    ),
                    "",
                );
            }
        }
        daemon.reload(&lab, &config);
        let output = client.wait_with_output().unwrap();
        let report: serde_json::Value =
            serde_json::from_slice(&output.stdout).unwrap_or_else(|e| {
                panic!(
                    "{what}: iperf3 output is not JSON ({e}): {}",
                    String::from_utf8_lossy(&output.stderr)
                )
            });
        assert!(report.get("error").is_none(), "{what}: iperf3 failed: {}", report["error"]);
        let intervals = report["intervals"].as_array().expect("intervals");
        assert!(intervals.len() >= 7, "{what}: {} intervals", intervals.len());
        for (i, interval) in intervals.iter().enumerate() {
            let bytes = interval["sum"]["bytes"].as_u64().unwrap_or(0);
            assert!(bytes > 0, "{what}: the flow stalled in second {i}");
        }
        let received = report["end"]["sum_received"]["bytes"].as_u64().unwrap_or(0);
        assert!(received > 10_000_000, "{what}: only {received} bytes arrived");
        assert_eq!(iperf_backend(&lab), None, "{what}: the connection is closed");
        // Back to two backends for the next mode.
        daemon.reload(&lab, &two);
        std::thread::sleep(Duration::from_millis(500));
    }
    let log = daemon.finish();
    assert!(log.contains("configuration reloaded"), "{log}");
}
