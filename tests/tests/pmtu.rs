//! Path-MTU discovery through the balancer. A far client sits behind a router whose link
//! towards it is narrower (1280 bytes) than the backends' (1500): the backends' full-size
//! answers meet the router's "fragmentation needed" / "packet too big", which it sends to
//! the service address. The balancer must hand that error to the flow's backend (as it is
//! for DSR, translated for NAT) or the backend resends full-size segments until the client
//! gives up: a path-MTU black hole.
//!
//! ```text
//!  far ns                client ns (router)        lb ns
//!  eth0 198.18.3.2 ───── far0 198.18.3.1  eth0 ───── front ... (the lab)
//!       fd00:3::2  1500       fd00:3::1   1280
//! ```

use std::net::IpAddr;

use lb_tests::{
    daemon::LabDaemon,
    lab::{self, Lab, url},
    netns::{Netns, veth},
    privileged::require_privileges,
};

/// Size of the answer downloaded: about 160 full-size segments.
const ANSWER_BYTES: usize = 200_000;

/// A counter of the kernel's SNMP statistics in `ns` (`/proc/net/snmp` rows come in pairs:
/// names, then values; `/proc/net/snmp6` has one name and value per line).
fn snmp(ns: &Netns, table: &str, name: &str) -> u64 {
    if table == "Icmp6" {
        let text = ns.exec(&["cat", "/proc/net/snmp6"]).unwrap();
        return text
            .lines()
            .find_map(|l| l.strip_prefix(&format!("Icmp6{name} ")))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or_else(|| panic!("no Icmp6{name} in /proc/net/snmp6"));
    }
    let text = ns.exec(&["cat", "/proc/net/snmp"]).unwrap();
    let rows: Vec<&str> = text.lines().filter(|l| l.starts_with(&format!("{table}:"))).collect();
    let names: Vec<&str> = rows[0].split_whitespace().collect();
    let values: Vec<&str> = rows[1].split_whitespace().collect();
    let at = names.iter().position(|n| *n == name).unwrap_or_else(|| panic!("no {table} {name}"));
    values[at].parse().unwrap()
}

#[test]
fn large_answers_reach_a_client_behind_a_narrow_link() {
    if !require_privileges("large_answers_reach_a_client_behind_a_narrow_link") {
        return;
    }
    let lab = Lab::create(2).unwrap();
    let far = Netns::create(&format!("{}-far", lab.id)).unwrap();
    veth(&lab.client, "far0", &far, "eth0").unwrap();
    lab.client.ip(&["addr", "add", "198.18.3.1/24", "dev", "far0"]).unwrap();
    lab.client.ip(&["addr", "add", "fd00:3::1/64", "dev", "far0", "nodad"]).unwrap();
    lab.client.ip(&["link", "set", "far0", "mtu", "1280"]).unwrap();
    lab.client.sysctl("net.ipv4.ip_forward", "1").unwrap();
    lab.client.sysctl("net.ipv6.conf.all.forwarding", "1").unwrap();
    far.ip(&["addr", "add", "198.18.3.2/24", "dev", "eth0"]).unwrap();
    far.ip(&["addr", "add", "fd00:3::2/64", "dev", "eth0", "nodad"]).unwrap();
    far.ip(&["route", "add", "198.18.0.0/15", "via", "198.18.3.1"]).unwrap();
    far.ip(&["-6", "route", "add", "fd00::/8", "via", "fd00:3::1"]).unwrap();
    // Full checksums from the far client, as a real NIC hands them over (see `lab.rs`).
    far.exec(&["ethtool", "-K", "eth0", "tx", "off"]).unwrap();
    // DSR backends answer through the load balancer's kernel: it routes to the far client.
    lab.lb.ip(&["route", "add", "198.18.3.0/24", "via", &lab::CLIENT_V4.to_string()]).unwrap();
    lab.lb.ip(&["-6", "route", "add", "fd00:3::/64", "via", &lab::CLIENT_V6.to_string()]).unwrap();
    let daemon = LabDaemon::start(&lab, &lab::lab_config(2, &[]));

    for (what, vip) in [
        ("NAT IPv4", IpAddr::from(lab::VIP_V4)),
        ("DSR IPv4", IpAddr::from(lab::DSR_VIP_V4)),
        ("NAT IPv6", IpAddr::from(lab::VIP_V6)),
        ("DSR IPv6", IpAddr::from(lab::DSR_VIP_V6)),
    ] {
        // Several connections: each backend has to learn the narrow path once.
        for i in 0..4 {
            let (too_big, counter) = if vip.is_ipv4() {
                (snmp(&lab.client, "Icmp", "OutDestUnreachs"), "Icmp OutDestUnreachs")
            } else {
                (snmp(&lab.client, "Icmp6", "OutPktTooBigs"), "Icmp6OutPktTooBigs")
            };
            let target = format!("{}bytes/{ANSWER_BYTES}", url(vip, lab::HTTP_PORT));
            let out = far
                .exec(&[
                    "curl",
                    "-sS",
                    "--max-time",
                    "10",
                    "-o",
                    "/dev/null",
                    "-w",
                    "%{size_download} %{http_code}",
                    &target,
                ])
                .unwrap_or_else(|e| panic!("{what}, download {i}: {e:#}"));
            assert_eq!(out.trim(), format!("{ANSWER_BYTES} 200"), "{what}, download {i}");
            let after = if vip.is_ipv4() {
                snmp(&lab.client, "Icmp", "OutDestUnreachs")
            } else {
                snmp(&lab.client, "Icmp6", "OutPktTooBigs")
            };
            // The first download from each backend met the narrow link (a backend that
            // learnt it already sends small segments): the path was really exercised.
            if i == 0 {
                assert!(after > too_big, "{what}: the router sent no {counter}");
            }
        }
    }
    let log = daemon.finish();
    assert!(log.contains("configuration applied"), "{log}");
}
