//! Attach tests of the balancer: `lbd` runs in the lab's load-balancer namespace with NAT and
//! DSR services over IPv4 and IPv6, and real clients (curl, iperf3, UDP sockets) in the client
//! namespace reach the backends through it.

#![allow(clippy::too_many_lines, reason = "an end-to-end scenario reads best top to bottom")]
#![allow(clippy::cast_precision_loss, reason = "shares of a few hundred flows")]

use std::{
    collections::BTreeMap,
    net::{IpAddr, SocketAddr, UdpSocket},
    time::Duration,
};

use lb_tests::{
    daemon::LabDaemon,
    lab::{self, Lab, client_sources, spread_http, url},
    netns::wait_for,
    privileged::require_privileges,
};

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

/// Weights 1:2:3. 40 new connections from each of 9 client addresses per service (360 flows):
/// at p = 1/2 the standard deviation of a share is 2.6 points, so ±12 points is over four and
/// a half (24 shares checked: a chance failure about once in 10,000 runs), while equal
/// weights (a third each) would miss the 1 and 3 shares by almost 17.
#[test]
fn every_mode_and_family_spreads_flows_by_weight() {
    if !require_privileges("every_mode_and_family_spreads_flows_by_weight") {
        return;
    }
    let lab = Lab::create(3).unwrap();
    let weights = [100, 200, 300];
    let daemon = LabDaemon::start(&lab, &lab::lab_config(3, &weights));
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
        assert_shares(what, &counts, &weights, 0.12);
    }
    for (what, addr, v6) in [
        ("NAT IPv4 UDP", IpAddr::from(lab::VIP_V4), false),
        ("NAT IPv6 UDP", IpAddr::from(lab::VIP_V6), true),
        ("DSR IPv4 UDP", IpAddr::from(lab::DSR_VIP_V4), false),
        ("DSR IPv6 UDP", IpAddr::from(lab::DSR_VIP_V6), true),
    ] {
        let counts = spread_udp(&lab, &client_sources(v6), addr, 40);
        assert_eq!(counts.values().sum::<usize>(), 360, "{what}: every datagram answered");
        assert_shares(what, &counts, &weights, 0.12);
    }
    let log = daemon.finish();
    assert!(log.contains("configuration applied"), "{log}");
}

#[test]
fn an_iperf3_flow_survives_backends_added_and_removed() {
    if !require_privileges("an_iperf3_flow_survives_backends_added_and_removed") {
        return;
    }
    let lab = Lab::create(3).unwrap();
    lab.start_iperf_servers().unwrap();
    // Start with two backends; the third joins and one leaves while the flow runs.
    let two = lab::lab_config(2, &[]);
    let daemon = LabDaemon::start(&lab, &two);
    for (what, vip) in [("NAT", IpAddr::from(lab::VIP_V4)), ("DSR", IpAddr::from(lab::DSR_VIP_V4))]
    {
        let client = lab.iperf_client(vip, 8, "200M").unwrap();
        let serving =
            wait_for(Duration::from_secs(5), || lab.iperf_backend()).expect("iperf3 connected");
        std::thread::sleep(Duration::from_secs(2));
        // By SIGHUP (the API's reload comes next), seen applied in the pools' listing.
        daemon.reload(&lab::lab_config(3, &[]));
        assert!(lists_backend(&lab, 2, true), "{what}: backend-3 not added by SIGHUP");
        std::thread::sleep(Duration::from_secs(1));
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
        assert_ne!(config, lab::lab_config(3, &[]), "{what}: no backend removed");
        let (status, answer) = daemon.reload_by_api(&lab, &config);
        assert_eq!(status, 200, "{what}: the removal not applied: {answer}");
        lab::check_iperf(what, client, 8, 10_000_000);
        assert_eq!(lab.iperf_backend(), None, "{what}: the connection is closed");
        // Back to two backends for the next mode.
        daemon.reload(&two);
        assert!(lists_backend(&lab, 2, false), "{what}: backend-3 not removed by SIGHUP");
    }
    let log = daemon.finish();
    assert!(log.contains("configuration reloaded"), "{log}");
}

/// Waits up to 10 s until lbd's `/v1/pools` lists (`listed`) or no longer lists lab backend
/// `i` (by its IPv4 address, as a live backend: a removed one still carrying flows is listed
/// with `"removed": true`); says whether it did.
fn lists_backend(lab: &Lab, i: usize, listed: bool) -> bool {
    let address = lab::backend_v4(i).to_string();
    wait_for(Duration::from_secs(10), || {
        let out = lab
            .lb
            .exec(&["curl", "-sS", "--max-time", "5", "http://127.0.0.1:7070/v1/pools"])
            .ok()?;
        let pools: serde_json::Value = serde_json::from_str(&out).ok()?;
        let found = pools.as_array()?.iter().any(|pool| {
            pool["backends"].as_array().is_some_and(|backends| {
                backends.iter().any(|b| {
                    b["address"].as_str() == Some(&address) && b["removed"].as_bool() != Some(true)
                })
            })
        });
        (found == listed).then_some(())
    })
    .is_some()
}
