//! Live forwarding in the lab, lbd against its peers on the same topology in the same run:
//!
//! - UDP packets per second forwarded from the client namespace (trafgen, 64 flows of
//!   60-byte frames) to the backends, counted on the backends' interfaces: lbd (XDP NAT) and
//!   nftables DNAT with jhash load balancing. HAProxy has no UDP and no figure here.
//! - HTTP requests per second and latency percentiles with wrk (32 connections): lbd NAT and
//!   DSR, nftables DNAT, HAProxy in TCP mode.
//! - Firewall drops per second under a flood from one denied source: lbd's firewall,
//!   xdp-filter and an nftables `netdev ingress` rule, each by its own drop counter.
//! - lbd's API latency under wrk while lbd runs.

use std::{fmt::Write as _, net::IpAddr, process::Command, time::Duration};

use anyhow::{Context as _, bail};
use lb_tests::{
    daemon::LabDaemon,
    lab::{self, Lab},
    netns::{Netns, wait_for},
};

/// The UDP port of the bench service (nothing listens: backends drop, so no replies load the
/// load balancer).
const UDP_BENCH_PORT: u16 = 9;
/// The flood's source (denied in the firewall runs).
const FLOOD_SOURCE: std::net::Ipv4Addr = lab::CLIENT_V4;

/// One peer's figures.
#[derive(Debug, Default, serde::Serialize)]
struct Figures {
    peer: &'static str,
    udp_pps: Option<f64>,
    offered_pps: Option<f64>,
    http_rps: Option<f64>,
    latency_ms: Option<Latency>,
    firewall_drops_per_sec: Option<f64>,
}

#[derive(Debug, Default, Clone, serde::Serialize)]
struct Latency {
    p50: f64,
    p90: f64,
    p99: f64,
}

pub fn run(quick: bool) -> anyhow::Result<serde_json::Value> {
    let secs: u64 = if quick { 2 } else { 5 };
    let lab = Lab::create(2).context("building the lab")?;
    let front_mac = lab.lb.mac_of(lab::LB_FRONT_IF)?;
    // veth has no queue: trafgen's ring flush fails with EAGAIN when the peer falls behind.
    // A queue makes the generator's excess drops instead.
    lab.client
        .exec(&["tc", "qdisc", "replace", "dev", "eth0", "root", "pfifo", "limit", "10000"])?;
    let backends: Vec<IpAddr> = lab.backends.iter().map(|b| IpAddr::V4(b.v4)).collect();
    let config = format!(
        "{}[[service]]\nname = \"bench-udp\"\naddress = \"{}\"\nprotocol = \"udp\"\nport = {UDP_BENCH_PORT}\npool = \"web4\"\nmode = \"nat\"\nnat_source = \"{}\"\n",
        lab::lab_config(2, &[]),
        lab::VIP_V4,
        lab::LB_BACK_V4
    );
    let mut rows = Vec::new();

    let api = run_lbd(&lab, &config, front_mac, secs, &mut rows)?;
    run_nftables(&lab, &backends, front_mac, secs, &mut rows)?;
    run_haproxy(&lab, &backends, secs, &mut rows)?;
    run_filters(&lab, front_mac, secs, &mut rows)?;

    print_tables(&rows, Some(&api), secs);
    Ok(serde_json::json!({
        "seconds_per_run": secs,
        "peers": rows,
        "api": { "rps": api.0, "latency_ms": api.1 },
    }))
}

/// lbd: forwarding, HTTP (NAT and DSR), API latency, then its firewall.
fn run_lbd(
    lab: &Lab,
    config: &str,
    front_mac: [u8; 6],
    secs: u64,
    rows: &mut Vec<Figures>,
) -> anyhow::Result<(f64, Latency)> {
    let daemon = LabDaemon::start(lab, config);
    let (pps, offered) = udp_pps(lab, front_mac, secs)?;
    let (rps, latency) = wrk(&lab.client, &format!("http://{}/", lab::VIP_V4), secs)?;
    rows.push(Figures {
        peer: "lbd (XDP, NAT)",
        udp_pps: Some(pps),
        offered_pps: Some(offered),
        http_rps: Some(rps),
        latency_ms: Some(latency),
        ..Figures::default()
    });
    let (rps, latency) = wrk(&lab.client, &format!("http://{}/", lab::DSR_VIP_V4), secs)?;
    rows.push(Figures {
        peer: "lbd (XDP, DSR)",
        http_rps: Some(rps),
        latency_ms: Some(latency),
        ..Figures::default()
    });
    let api = wrk(&lab.lb, "http://127.0.0.1:7070/v1/status", secs)?;
    let with_firewall = format!(
        "{config}\n[firewall]\n[[firewall.rule]]\nname = \"flood\"\naction = \"deny\"\nsource = [\"{FLOOD_SOURCE}/32\"]\n"
    );
    daemon.reload(&with_firewall);
    let applied =
        wait_for(Duration::from_secs(10), || lbd_rule_drops(lab).ok().flatten().map(|_| ()));
    if applied.is_none() {
        bail!("lbd did not take the firewall rule");
    }
    let before = lbd_rule_drops(lab)?.unwrap_or(0);
    let offered = flood(lab, front_mac, secs)?;
    let dropped = lbd_rule_drops(lab)?.unwrap_or(0) - before;
    rows.push(Figures {
        peer: "lbd firewall (XDP)",
        firewall_drops_per_sec: Some(dropped as f64 / secs as f64),
        offered_pps: Some(offered),
        ..Figures::default()
    });
    daemon.finish();
    Ok(api)
}

/// nftables DNAT (jhash over the client's address and port), SNAT to the back address.
fn run_nftables(
    lab: &Lab,
    backends: &[IpAddr],
    front_mac: [u8; 6],
    secs: u64,
    rows: &mut Vec<Figures>,
) -> anyhow::Result<()> {
    let rules = format!(
        "table ip lbbench {{\n chain pre {{ type nat hook prerouting priority dstnat;\n  ip daddr {vip} tcp dport 80 dnat to jhash ip saddr . tcp sport mod 2 map {{ 0 : {b0}, 1 : {b1} }}\n  ip daddr {vip} udp dport {UDP_BENCH_PORT} dnat to jhash ip saddr . udp sport mod 2 map {{ 0 : {b0}, 1 : {b1} }}\n }}\n chain post {{ type nat hook postrouting priority srcnat;\n  ip daddr 198.18.1.0/24 snat to {nat}\n }}\n}}\n",
        vip = lab::VIP_V4,
        b0 = backends[0],
        b1 = backends[1],
        nat = lab::LB_BACK_V4
    );
    nft(&lab.lb, &rules)?;
    let (pps, offered) = udp_pps(lab, front_mac, secs)?;
    let (rps, latency) = wrk(&lab.client, &format!("http://{}/", lab::VIP_V4), secs)?;
    rows.push(Figures {
        peer: "nftables DNAT",
        udp_pps: Some(pps),
        offered_pps: Some(offered),
        http_rps: Some(rps),
        latency_ms: Some(latency),
        ..Figures::default()
    });
    lab.lb.exec(&["nft", "delete", "table", "ip", "lbbench"])?;
    Ok(())
}

/// HAProxy in TCP mode on the service address (held on the load balancer's loopback).
fn run_haproxy(
    lab: &Lab,
    backends: &[IpAddr],
    secs: u64,
    rows: &mut Vec<Figures>,
) -> anyhow::Result<()> {
    lab.lb.ip(&["addr", "add", &format!("{}/32", lab::VIP_V4), "dev", "lo"])?;
    let proxies = format!(
        "frontend f\n bind {}:80\n default_backend b\nbackend b\n balance roundrobin\n server b0 {}:80\n server b1 {}:80\n",
        lab::VIP_V4,
        backends[0],
        backends[1]
    );
    let pid = crate::haproxy::start(lab, "http", &proxies, lab::HTTP_PORT)?;
    let (rps, latency) = wrk(&lab.client, &format!("http://{}/", lab::VIP_V4), secs)?;
    rows.push(Figures {
        peer: "HAProxy (TCP mode)",
        http_rps: Some(rps),
        latency_ms: Some(latency),
        ..Figures::default()
    });
    if let Some(mut child) = lab.lb.take_child(pid) {
        let _ = child.kill();
        let _ = child.wait();
    }
    lab.lb.ip(&["addr", "del", &format!("{}/32", lab::VIP_V4), "dev", "lo"])?;
    Ok(())
}

/// Peers of the firewall: xdp-filter (native XDP) and nftables at the ingress hook.
fn run_filters(
    lab: &Lab,
    front_mac: [u8; 6],
    secs: u64,
    rows: &mut Vec<Figures>,
) -> anyhow::Result<()> {
    // libxdp keeps its state in bpffs, which `ip netns exec` hides: one of our own,
    // mounted where every command sees it.
    let bpffs = std::env::temp_dir().join(format!("{}-xdp-filter-bpffs", lab.id));
    std::fs::create_dir_all(&bpffs)?;
    let mounted = Command::new("mount").args(["-t", "bpf", "bpf"]).arg(&bpffs).status()?;
    if !mounted.success() {
        bail!("cannot mount bpffs for xdp-filter");
    }
    let env = format!("LIBXDP_BPFFS={}", bpffs.display());
    let xf = |args: &[&str]| -> anyhow::Result<String> {
        let mut cmd = vec!["env", env.as_str(), "xdp-filter"];
        cmd.extend_from_slice(args);
        lab.lb.exec(&cmd)
    };
    let result = (|| -> anyhow::Result<(u64, f64)> {
        xf(&["load", lab::LB_FRONT_IF, "--mode", "native"])?;
        xf(&["ip", &FLOOD_SOURCE.to_string(), "--mode", "src"])?;
        let before = xdp_filter_drops(&xf(&["status"])?)?;
        let offered = flood(lab, front_mac, secs)?;
        let dropped = xdp_filter_drops(&xf(&["status"])?)? - before;
        xf(&["unload", lab::LB_FRONT_IF])?;
        Ok((dropped, offered))
    })();
    let _ = Command::new("umount").arg(&bpffs).status();
    let _ = std::fs::remove_dir(&bpffs);
    let (dropped, offered) = result?;
    rows.push(Figures {
        peer: "xdp-filter",
        firewall_drops_per_sec: Some(dropped as f64 / secs as f64),
        offered_pps: Some(offered),
        ..Figures::default()
    });
    // A named counter, declared before the chain that uses it.
    let rules = format!(
        "table netdev lbbenchfw {{\n counter flood {{ }}\n chain in {{ type filter hook ingress device {} priority 0;\n  ip saddr {FLOOD_SOURCE} counter name flood drop\n }}\n}}\n",
        lab::LB_FRONT_IF
    );
    nft(&lab.lb, &rules)?;
    let offered = flood(lab, front_mac, secs)?;
    let out = lab.lb.exec(&["nft", "-j", "list", "counter", "netdev", "lbbenchfw", "flood"])?;
    let json: serde_json::Value = serde_json::from_str(&out)?;
    let dropped = json["nftables"]
        .as_array()
        .and_then(|a| a.iter().find_map(|x| x["counter"]["packets"].as_u64()))
        .context("nft counter")?;
    rows.push(Figures {
        peer: "nftables (netdev ingress)",
        firewall_drops_per_sec: Some(dropped as f64 / secs as f64),
        offered_pps: Some(offered),
        ..Figures::default()
    });
    lab.lb.exec(&["nft", "delete", "table", "netdev", "lbbenchfw"])?;
    Ok(())
}

fn print_tables(rows: &[Figures], api: Option<&(f64, Latency)>, secs: u64) {
    let opt = |v: Option<f64>| v.map_or_else(|| "-".to_owned(), |v| format!("{v:.0}"));
    let mut t = format!(
        "{:<28} {:>12} {:>12} {:>10} {:>9} {:>9} {:>9}\n",
        "peer", "UDP pps", "offered pps", "HTTP rps", "p50 ms", "p90 ms", "p99 ms"
    );
    for r in rows.iter().filter(|r| r.udp_pps.is_some() || r.http_rps.is_some()) {
        let l = r.latency_ms.clone().unwrap_or_default();
        let _ = writeln!(
            t,
            "{:<28} {:>12} {:>12} {:>10} {:>9.2} {:>9.2} {:>9.2}",
            r.peer,
            opt(r.udp_pps),
            opt(r.offered_pps),
            opt(r.http_rps),
            l.p50,
            l.p90,
            l.p99
        );
    }
    println!("\nLive forwarding in the lab, {secs} s per run:\n\n{t}");
    let mut f = format!("{:<28} {:>14} {:>12}\n", "firewall", "drops/s", "offered pps");
    for r in rows.iter().filter(|r| r.firewall_drops_per_sec.is_some()) {
        let _ = writeln!(
            f,
            "{:<28} {:>14} {:>12}",
            r.peer,
            opt(r.firewall_drops_per_sec),
            opt(r.offered_pps)
        );
    }
    println!("Firewall under a flood from one denied source, {secs} s per run:\n\n{f}");
    if let Some((rps, l)) = api {
        println!(
            "lbd API (GET /v1/status, 32 connections): {rps:.0} requests/s, p50 {:.2} ms, p99 {:.2} ms\n",
            l.p50, l.p99
        );
    }
}

/// trafgen's configuration: 60-byte UDP frames from `src` to the service's UDP port, source
/// ports cycling over 64 values (64 flows).
fn trafgen_config(mac: [u8; 6], src: std::net::Ipv4Addr, dst: std::net::Ipv4Addr) -> String {
    let m: Vec<String> = mac.iter().map(|b| format!("0x{b:02x}")).collect();
    let s = src.octets();
    let d = dst.octets();
    format!(
        "{{\n {}, 0x02, 0x00, 0x00, 0x00, 0x00, 0x02, 0x08, 0x00,\n 0x45, 0x00, const16(46), const16(0), 0x40, 0x00, 64, 17, csumip(14, 33),\n {}, {}, {}, {}, {}, {}, {}, {},\n 0x27, dinc(0x10, 0x4f, 1), const16({UDP_BENCH_PORT}), const16(26), const16(0),\n fill(0x61, 18)\n}}\n",
        m.join(", "),
        s[0],
        s[1],
        s[2],
        s[3],
        d[0],
        d[1],
        d[2],
        d[3]
    )
}

/// Runs trafgen in the client namespace for `secs` (through the qdisc, `--qdisc-path`);
/// returns the packets it sent per second. trafgen gives up when a ring flush meets a full
/// queue (EAGAIN); it is restarted until the time is up.
fn trafgen(lab: &Lab, config: &str, secs: u64) -> anyhow::Result<f64> {
    let path = std::env::temp_dir().join(format!("{}-trafgen.cfg", lab.id));
    std::fs::write(&path, config)?;
    let before = link_counter(&lab.client, "eth0", "tx_packets")?;
    let started = std::time::Instant::now();
    let budget = Duration::from_secs(secs);
    let mut failures = 0;
    while started.elapsed() < budget {
        let left = budget.saturating_sub(started.elapsed()).as_secs_f64().max(0.001);
        let out = lab.client.exec_output(&[
            "timeout",
            &format!("{left:.3}"),
            "trafgen",
            "--dev",
            "eth0",
            "--conf",
            path.to_str().unwrap_or_default(),
            "--cpus",
            "1",
            "--no-sock-mem",
            "--qdisc-path",
        ])?;
        // timeout ends trafgen with status 124.
        if out.status.code() != Some(124) && !out.status.success() {
            let err = String::from_utf8_lossy(&out.stderr);
            failures += 1;
            if !err.contains("Resource temporarily unavailable") || failures > 1000 {
                bail!("trafgen failed: {err}");
            }
        }
    }
    let elapsed = started.elapsed().as_secs_f64();
    let sent = link_counter(&lab.client, "eth0", "tx_packets")? - before;
    let _ = std::fs::remove_file(&path);
    Ok(sent as f64 / elapsed)
}

/// UDP packets per second that reach the backends, and the rate offered.
fn udp_pps(lab: &Lab, front_mac: [u8; 6], secs: u64) -> anyhow::Result<(f64, f64)> {
    let config = trafgen_config(front_mac, lab::client_v4(0), lab::VIP_V4);
    let received = |lab: &Lab| -> anyhow::Result<u64> {
        lab.backends.iter().map(|b| link_counter(&b.ns, "eth0", "rx_packets")).sum()
    };
    let before = received(lab)?;
    let offered = trafgen(lab, &config, secs)?;
    std::thread::sleep(Duration::from_millis(200));
    let forwarded = received(lab)? - before;
    Ok((forwarded as f64 / secs as f64, offered))
}

/// A flood from the denied source; returns the rate offered.
fn flood(lab: &Lab, front_mac: [u8; 6], secs: u64) -> anyhow::Result<f64> {
    trafgen(lab, &trafgen_config(front_mac, FLOOD_SOURCE, lab::VIP_V4), secs)
}

fn link_counter(ns: &Netns, dev: &str, field: &str) -> anyhow::Result<u64> {
    let out = ns.exec(&["ip", "-j", "-s", "link", "show", dev])?;
    let json: serde_json::Value = serde_json::from_str(&out)?;
    let dir = if field.starts_with("tx") { "tx" } else { "rx" };
    json[0]["stats64"][dir]["packets"].as_u64().with_context(|| format!("{dev} {field}"))
}

/// wrk for `secs` against `url` from `ns`: requests per second and latency percentiles.
fn wrk(ns: &Netns, url: &str, secs: u64) -> anyhow::Result<(f64, Latency)> {
    let out =
        ns.exec(&["wrk", "-t", "2", "-c", "32", "-d", &format!("{secs}s"), "--latency", url])?;
    let rps = out
        .lines()
        .find_map(|l| l.strip_prefix("Requests/sec:"))
        .and_then(|v| v.trim().parse().ok())
        .with_context(|| format!("no rate in wrk's output: {out}"))?;
    let pct = |p: &str| -> anyhow::Result<f64> {
        let line = out
            .lines()
            .map(str::trim)
            .find(|l| l.starts_with(p))
            .with_context(|| format!("no {p} in wrk's output"))?;
        parse_duration_ms(line.split_whitespace().nth(1).unwrap_or_default())
    };
    Ok((rps, Latency { p50: pct("50%")?, p90: pct("90%")?, p99: pct("99%")? }))
}

/// wrk's durations: `850.00us`, `1.23ms`, `2.00s`.
fn parse_duration_ms(text: &str) -> anyhow::Result<f64> {
    let (number, factor) = if let Some(n) = text.strip_suffix("us") {
        (n, 0.001)
    } else if let Some(n) = text.strip_suffix("ms") {
        (n, 1.0)
    } else if let Some(n) = text.strip_suffix('s') {
        (n, 1000.0)
    } else {
        bail!("duration {text:?}")
    };
    Ok(number.parse::<f64>()? * factor)
}

fn nft(ns: &Netns, rules: &str) -> anyhow::Result<()> {
    let path = std::env::temp_dir().join(format!("{}-bench.nft", ns.name()));
    std::fs::write(&path, rules)?;
    let out = ns.exec_output(&["nft", "-f", path.to_str().unwrap_or_default()])?;
    let _ = std::fs::remove_file(&path);
    if !out.status.success() {
        bail!("nft: {}\n{rules}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(())
}

/// The packets lbd's firewall rule "flood" dropped, if it is installed.
fn lbd_rule_drops(lab: &Lab) -> anyhow::Result<Option<u64>> {
    let out = lab.lb.exec(&["curl", "-sS", "http://127.0.0.1:7070/v1/firewall"])?;
    let json: serde_json::Value = serde_json::from_str(&out)?;
    Ok(json["rules"]
        .as_array()
        .and_then(|r| r.iter().find(|r| r["name"] == "flood"))
        .and_then(|r| r["packets"].as_u64()))
}

/// Packets xdp-filter dropped so far, from its `status` output.
fn xdp_filter_drops(out: &str) -> anyhow::Result<u64> {
    out.lines()
        .find(|l| l.trim_start().starts_with("XDP_DROP"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|n| n.parse().ok())
        .with_context(|| format!("no XDP_DROP count in xdp-filter status: {out}"))
}

#[cfg(test)]
mod tests {
    use super::parse_duration_ms;

    #[test]
    fn wrk_durations() {
        assert!((parse_duration_ms("850.00us").unwrap() - 0.85).abs() < 1e-9);
        assert!((parse_duration_ms("1.50ms").unwrap() - 1.5).abs() < 1e-9);
        assert!((parse_duration_ms("2.00s").unwrap() - 2000.0).abs() < 1e-9);
        assert!(parse_duration_ms("3m").is_err());
    }
}
