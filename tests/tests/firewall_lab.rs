//! The firewall in the lab: `lbd` with a `[firewall]` section on the lab's interfaces, real
//! clients (curl, hping3, ping) on blocked and allowed source addresses.

#![allow(clippy::too_many_lines, reason = "an end-to-end scenario reads best top to bottom")]

use std::{net::IpAddr, time::Duration};

use lb_common::net::tcp_flags::{ACK, SYN};
use lb_tests::{
    daemon::LabDaemon,
    flood::{SynFlood, spoofed_syns},
    lab::{self, Lab, spread_http, url},
    netns::wait_for,
    privileged::require_privileges,
};

/// Sends `count` SYNs with hping3 from `source` to `target:port`; returns how many answers
/// came back.
fn hping_syns(lab: &Lab, source: IpAddr, target: IpAddr, port: u16, count: u32) -> u32 {
    let out = lab
        .client
        .exec_output(&[
            "hping3",
            "-S",
            "-p",
            &port.to_string(),
            "-c",
            &count.to_string(),
            "-i",
            "u20000",
            "-a",
            &source.to_string(),
            &target.to_string(),
        ])
        .unwrap();
    let text =
        format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    let line = text
        .lines()
        .find(|l| l.contains("packets transmitted"))
        .unwrap_or_else(|| panic!("no hping3 statistics: {text}"));
    let numbers: Vec<u32> =
        line.split(|c: char| !c.is_ascii_digit()).filter_map(|n| n.parse().ok()).collect();
    assert_eq!(numbers.first(), Some(&count), "{line}");
    numbers[1]
}

fn firewall(lab: &Lab) -> serde_json::Value {
    let out = lab
        .lb
        .exec(&["curl", "-sS", "--fail-with-body", "http://127.0.0.1:7070/v1/firewall"])
        .unwrap();
    serde_json::from_str(&out).unwrap()
}

#[test]
fn blocked_sources_get_nothing_through_while_others_are_untouched() {
    if !require_privileges("blocked_sources_get_nothing_through_while_others_are_untouched") {
        return;
    }
    let lab = Lab::create(2).unwrap();
    let (blocked4, blocked6) = (lab::client_v4(6), lab::client_v6(6));
    let rules = format!(
        "\n[firewall]\n[[firewall.rule]]\nname = \"blocked\"\naction = \"deny\"\nsource = [\"{blocked4}/31\", \"{blocked6}/127\"]\nlog = 1\n"
    );
    let config = format!("{}{rules}", lab::lab_config(2, &[]));
    let daemon = LabDaemon::start(&lab, &config);

    // hping3 SYNs: from the blocked source none is answered, from an allowed one all are.
    let vip = IpAddr::from(lab::VIP_V4);
    assert_eq!(hping_syns(&lab, blocked4.into(), vip, lab::HTTP_PORT, 20), 0);
    let allowed4 = IpAddr::from(lab::client_v4(0));
    assert_eq!(hping_syns(&lab, allowed4, vip, lab::HTTP_PORT, 20), 20);
    // Not even the load balancer's own address answers the blocked source.
    let ping = |source: IpAddr, target: IpAddr| {
        lab.client
            .exec_output(&[
                "ping",
                "-c",
                "2",
                "-i",
                "0.2",
                "-W",
                "1",
                "-I",
                &source.to_string(),
                &target.to_string(),
            ])
            .unwrap()
            .status
            .success()
    };
    assert!(!ping(blocked4.into(), lab::LB_FRONT_V4.into()), "ping from a blocked source");
    assert!(ping(allowed4, lab::LB_FRONT_V4.into()), "ping from an allowed source");
    assert!(!ping(blocked6.into(), lab::LB_FRONT_V6.into()), "ping6 from a blocked source");
    let allowed6 = IpAddr::from(lab::client_v6(0));
    assert!(ping(allowed6, lab::LB_FRONT_V6.into()), "ping6 from an allowed source");

    // curl: the blocked sources time out on every service; the others are all answered.
    for (what, vip, blocked, v6) in [
        ("NAT v4", IpAddr::from(lab::VIP_V4), IpAddr::from(blocked4), false),
        ("DSR v4", IpAddr::from(lab::DSR_VIP_V4), IpAddr::from(blocked4), false),
        ("NAT v6", IpAddr::from(lab::VIP_V6), IpAddr::from(blocked6), true),
        ("DSR v6", IpAddr::from(lab::DSR_VIP_V6), IpAddr::from(blocked6), true),
    ] {
        let out = lab
            .client
            .exec_output(&[
                "curl",
                "-sS",
                "--max-time",
                "1",
                "--interface",
                &blocked.to_string(),
                &url(vip, lab::HTTP_PORT),
            ])
            .unwrap();
        assert!(!out.status.success(), "{what}: a blocked source got an answer");
        let allowed: Vec<IpAddr> = (0..6)
            .map(|i| if v6 { lab::client_v6(i).into() } else { lab::client_v4(i).into() })
            .collect();
        let counts = spread_http(&lab, &allowed, &url(vip, lab::HTTP_PORT), 10);
        assert_eq!(counts.values().sum::<usize>(), 60, "{what}: {counts:?}");
    }

    // The rule counted the blocked packets; nothing reached the balancer from them.
    let fw = firewall(&lab);
    let hits = fw["rules"][0]["packets"].as_u64().unwrap();
    assert!(hits >= 20 + 2 + 2 + 4, "{fw}");
    let metrics = lab.lb.exec(&["curl", "-sS", "http://127.0.0.1:7070/metrics"]).unwrap();
    let line = format!("lb_firewall_rule_packets_total{{rule=\"blocked\",action=\"deny\"}} {hits}");
    assert!(metrics.contains(&line), "{line} missing:\n{metrics}");
    let denied = metrics
        .lines()
        .find_map(|l| l.strip_prefix("lb_dropped_packets_total{reason=\"firewall_deny\"} "))
        .and_then(|v| v.trim().parse::<u64>().ok());
    assert!(denied.is_some_and(|n| n >= hits), "firewall_deny {denied:?} < {hits}:\n{metrics}");

    // A rejected rule set changes nothing: the block stays (the reload has answered by the
    // time the SYNs go).
    let rejected = config.replace(&format!("{blocked4}/31"), "198.18.0.16/33");
    assert_ne!(rejected, config);
    let (status, answer) = daemon.reload_by_api(&lab, &rejected);
    assert_eq!(status, 400, "an invalid prefix was not refused: {answer}");
    assert!(answer.contains("prefix length"), "{answer}");
    assert_eq!(hping_syns(&lab, blocked4.into(), vip, lab::HTTP_PORT, 5), 0);
    // Lifting the block through a reload lets the source in at once.
    daemon.reload(&lab::lab_config(2, &[]));
    let open = wait_for(Duration::from_secs(5), || {
        lab.curl_from(blocked4.into(), vip, lab::HTTP_PORT).ok()
    });
    assert!(open.is_some(), "the source is still blocked after the firewall was removed");
    let log = daemon.finish();
    let logged = log
        .lines()
        .find(|l| l.contains("firewall rule matched") && l.contains(&format!("src={blocked4}:")))
        .unwrap_or_else(|| panic!("no logged match from {blocked4}: {log}"));
    assert!(
        logged.contains("rule=\"blocked\"") && logged.contains("outcome=\"dropped\""),
        "{logged}"
    );
}

/// SYNs in the spoofed flood.
const FLOOD: u32 = 20_000;

/// A spoofed SYN flood of `count` SYNs to the lab's IPv4 NAT service, one every `gap`.
fn flood(count: u32, gap: Duration, seed: u64) -> SynFlood {
    SynFlood { target: lab::VIP_V4, port: lab::HTTP_PORT, count, gap, seed, flags: SYN }
}

/// A bounded spoofed SYN flood (random sources in 198.18.128.0/17, a fixed count, see
/// `lb_tests::flood`) against a NAT service with SYN cookies while a real client keeps
/// opening connections through it: every request succeeds, and the flood leaves nothing in
/// the connection table.
#[test]
fn a_spoofed_syn_flood_neither_stops_clients_nor_fills_the_table() {
    if !require_privileges("a_spoofed_syn_flood_neither_stops_clients_nor_fills_the_table") {
        return;
    }
    let lab = Lab::create(2).unwrap();
    let config = lab::lab_config(2, &[]).replace(
        "[[service]]\nname = \"web4\"\n",
        "[[service]]\nname = \"web4\"\nsyn_cookies = \"on\"\n",
    );
    assert!(config.contains("syn_cookies = \"on\""));
    let daemon = LabDaemon::start(&lab, &config);
    let url = url(lab::VIP_V4.into(), lab::HTTP_PORT);
    // 25,000 SYNs a second; a real client meanwhile: new connections, one after another,
    // every one answered.
    let (sent, answered) = std::thread::scope(|scope| {
        let flood =
            scope.spawn(|| spoofed_syns(&lab, flood(FLOOD, Duration::from_micros(40), 0x5eed)));
        let mut answered = 0;
        let start = std::time::Instant::now();
        while !flood.is_finished() || answered < 20 {
            let body = lab
                .client
                .exec(&["curl", "-sS", "--max-time", "5", &url])
                .unwrap_or_else(|e| panic!("request {answered} during the flood failed: {e:#}"));
            assert!(body.starts_with("backend-"), "{body}");
            answered += 1;
            assert!(start.elapsed() < Duration::from_mins(2), "the flood did not end");
        }
        (flood.join().unwrap().unwrap(), answered)
    });
    assert_eq!(sent, FLOOD);
    eprintln!("{answered} requests answered during a flood of {FLOOD} spoofed SYNs");

    let metrics = lab.lb.exec(&["curl", "-sS", "http://127.0.0.1:7070/metrics"]).unwrap();
    let value = |name: &str| -> u64 {
        let prefix = format!("{name}{{service=\"web4\"}} ");
        metrics
            .lines()
            .find_map(|l| l.strip_prefix(&prefix))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or_else(|| panic!("{prefix} missing:\n{metrics}"))
    };
    let sent = value("lb_service_syn_cookies_sent_total");
    let valid = value("lb_service_syn_cookies_valid_total");
    assert!(sent >= u64::from(FLOOD) * 9 / 10, "cookies sent: {sent}");
    assert!(valid >= answered, "every real connection came through a cookie: {valid} < {answered}");
    // The table holds the real connections (closing or closed) and no half-open flood.
    let conntrack = wait_for(Duration::from_secs(10), || {
        let status: serde_json::Value = serde_json::from_str(
            &lab.lb.exec(&["curl", "-sS", "http://127.0.0.1:7070/v1/status"]).ok()?,
        )
        .ok()?;
        status["conntrack_entries"].as_u64().filter(|n| *n > 0)
    })
    .expect("a sweep reported the table");
    assert!(conntrack <= 2 * (answered + 10), "{conntrack} entries after {answered} connections");
    daemon.finish();
}

/// The lab's configuration with `auto` SYN cookies on service web4, above 200 SYNs a second.
fn auto_cookies_config() -> String {
    let config = lab::lab_config(2, &[]).replace(
        "[[service]]\nname = \"web4\"\n",
        "[[service]]\nname = \"web4\"\nsyn_cookies = \"auto\"\nsyn_cookie_threshold = 200\n",
    );
    assert!(config.contains("syn_cookies = \"auto\""));
    config
}

/// Service web4's value of the metric family `name`, as lbd exports it now.
fn web4_metric(lab: &Lab, name: &str) -> Option<u64> {
    let metrics = lab.lb.exec(&["curl", "-sS", "http://127.0.0.1:7070/metrics"]).ok()?;
    let prefix = format!("{name}{{service=\"web4\"}} ");
    metrics.lines().find_map(|l| l.strip_prefix(&prefix)).and_then(|v| v.trim().parse().ok())
}

#[test]
fn auto_syn_cookies_go_on_under_a_flood_and_off_after_it() {
    // `syn_cookies = "auto"`: the daemon switches a service's cookies on when its SYN rate
    // passes the threshold, and off once the rate has stayed low for the calm period, each
    // seen in the service's gauge; real clients are answered throughout.
    if !require_privileges("auto_syn_cookies_go_on_under_a_flood_and_off_after_it") {
        return;
    }
    let lab = Lab::create(2).unwrap();
    let daemon = LabDaemon::start(&lab, &auto_cookies_config());
    let active = || web4_metric(&lab, "lb_service_syn_cookies_active");
    assert_eq!(active(), Some(0), "cookies on before any flood");
    // About 2,000 spoofed SYNs a second for 3 s: ten times the threshold.
    let sent = spoofed_syns(&lab, flood(6000, Duration::from_micros(500), 0xf100d));
    assert_eq!(sent.unwrap(), 6000);
    // On (a sample a second; the calm period keeps them on for 10 s after the flood).
    let on = wait_for(Duration::from_secs(5), || (active()? == 1).then_some(()));
    assert!(on.is_some(), "cookies not on after the flood: {:?}", active());
    assert!(lab.curl(lab::VIP_V4.into(), lab::HTTP_PORT).unwrap().starts_with("backend-"));
    // Off again once the rate has stayed below half the threshold for the calm period.
    let off = wait_for(Duration::from_secs(25), || (active()? == 0).then_some(()));
    assert!(off.is_some(), "cookies still on 25 s after the flood: {:?}", active());
    assert!(lab.curl(lab::VIP_V4.into(), lab::HTTP_PORT).unwrap().starts_with("backend-"));
    daemon.finish();
}

#[test]
fn auto_syn_cookies_stay_on_as_long_as_a_spoofed_ack_flood_lasts() {
    // A spoofed ACK flood turns `auto` cookies on (each ACK would open a flow without them);
    // once they are on, its ACKs are refused as invalid cookies, and must keep counting:
    // else the rate falls, cookies go off after the calm period, and the flood opens flows
    // again until they come back, over and over.
    if !require_privileges("auto_syn_cookies_stay_on_as_long_as_a_spoofed_ack_flood_lasts") {
        return;
    }
    let lab = Lab::create(2).unwrap();
    let daemon = LabDaemon::start(&lab, &auto_cookies_config());
    let metric = |name: &str| web4_metric(&lab, name);
    assert_eq!(metric("lb_service_syn_cookies_active"), Some(0), "cookies on before any flood");
    // About 2,000 spoofed ACKs a second (ten times the threshold) for 18 s: longer than the
    // second or two cookies take to go on plus the ten-second calm period.
    let ack_flood = SynFlood {
        target: lab::VIP_V4,
        port: lab::HTTP_PORT,
        count: 36_000,
        gap: Duration::from_micros(500),
        seed: 0xacc,
        flags: ACK,
    };
    let (samples, sent) = std::thread::scope(|scope| {
        let flood = scope.spawn(|| spoofed_syns(&lab, ack_flood));
        let on = wait_for(Duration::from_secs(6), || {
            (metric("lb_service_syn_cookies_active")? == 1).then_some(())
        });
        assert!(on.is_some(), "cookies not on under the ACK flood");
        // Then sampled every half second until the flood ends (bounded by its length).
        let mut samples = Vec::new();
        for _ in 0..80 {
            if flood.is_finished() {
                break;
            }
            samples.push(metric("lb_service_syn_cookies_active"));
            std::thread::sleep(Duration::from_millis(500));
        }
        (samples, flood.join().unwrap().unwrap())
    });
    assert_eq!(sent, 36_000);
    assert!(samples.len() >= 20, "the flood ran on for {} samples only", samples.len());
    assert!(
        samples.iter().all(|s| *s == Some(1)),
        "cookies went off while the ACK flood went on: {samples:?}"
    );
    let invalid = metric("lb_service_syn_cookies_invalid_total").unwrap_or(0);
    assert!(invalid >= 20_000, "the flood's ACKs refused as invalid: {invalid}");
    daemon.finish();
}
