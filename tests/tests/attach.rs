//! Attach tests: the XDP program on a real veth in the lab, real traffic from the client
//! namespace (ping, curl over TCP, UDP datagrams), and the program's counters checked exactly
//! against nftables counters on the same interface.

#![allow(clippy::too_many_lines, reason = "an end-to-end scenario reads best top to bottom")]

use std::{
    net::{IpAddr, SocketAddr, UdpSocket},
    process::Command,
    time::Duration,
};

use lb_common::{Action, Reason};
use lb_tests::{
    lab::{self, LB_FRONT_IF, Lab},
    netns::{Netns, unique_id, veth, wait_for},
    privileged::require_privileges,
};
use lb_userspace::{
    Datapath,
    datapath::{AttachedMode, DatapathError, XdpModeSetting},
    maps::StatsSnapshot,
    nexthop::{KernelResolver, Resolution, Resolver as _},
};

/// nftables counters on the front interface's ingress hook, which sees exactly the frames
/// the XDP program passes.
const NFT_RULES: &str = "table netdev lbtest {
    counter c_all {}
    counter c_ip4 {}
    counter c_ip6 {}
    counter c_echo4 {}
    counter c_echo6 {}
    chain ingress {
        type filter hook ingress device front priority 0;
        counter name c_all
        meta protocol ip counter name c_ip4
        meta protocol ip6 counter name c_ip6
        meta protocol ip icmp type echo-request counter name c_echo4
        meta protocol ip6 icmpv6 type echo-request counter name c_echo6
    }
}";

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct NftCount {
    packets: u64,
    bytes: u64,
}

fn nft_counter(lab: &Lab, name: &str) -> NftCount {
    let out = lab.lb.exec(&["nft", "list", "counter", "netdev", "lbtest", name]).unwrap();
    let field = |key: &str| -> u64 {
        let mut words = out.split_whitespace();
        words
            .find(|w| *w == key)
            .and_then(|_| words.next())
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no {key} in {out}"))
    };
    NftCount { packets: field("packets"), bytes: field("bytes") }
}

#[derive(Clone, Debug, PartialEq, Eq)]
struct Readings {
    xdp: StatsSnapshot,
    all: NftCount,
    ip4: NftCount,
    ip6: NftCount,
    echo4: NftCount,
    echo6: NftCount,
}

fn read(lab: &Lab, datapath: &Datapath) -> Readings {
    Readings {
        xdp: datapath.stats().read().unwrap(),
        all: nft_counter(lab, "c_all"),
        ip4: nft_counter(lab, "c_ip4"),
        ip6: nft_counter(lab, "c_ip6"),
        echo4: nft_counter(lab, "c_echo4"),
        echo6: nft_counter(lab, "c_echo6"),
    }
}

/// Reads until two readings 300 ms apart agree, so no frame is in flight between the XDP
/// and the nftables counters.
fn settled(lab: &Lab, datapath: &Datapath) -> Readings {
    let mut last = read(lab, datapath);
    wait_for(Duration::from_secs(10), || {
        std::thread::sleep(Duration::from_millis(300));
        let now = read(lab, datapath);
        if now == last {
            Some(())
        } else {
            last = now;
            None
        }
    })
    .expect("counters never settled");
    last
}

fn sub(a: NftCount, b: NftCount) -> NftCount {
    NftCount { packets: a.packets - b.packets, bytes: a.bytes - b.bytes }
}

#[test]
fn counters_match_real_traffic_exactly() {
    if !require_privileges("counters_match_real_traffic_exactly") {
        return;
    }
    let lab = Lab::create(1).unwrap();
    // One frame in, one skb up: no GRO merging between XDP and the nftables hook.
    lab.lb.exec(&["ethtool", "-K", LB_FRONT_IF, "gro", "off"]).unwrap();
    let nft = lab.lb.exec_output(&["sh", "-c", &format!("echo '{NFT_RULES}' | nft -f -")]).unwrap();
    assert!(nft.status.success(), "nft: {}", String::from_utf8_lossy(&nft.stderr));

    let mut datapath = lab.lb.enter(Datapath::load).unwrap().unwrap();
    let mode =
        lab.lb.enter(|| datapath.attach(LB_FRONT_IF, XdpModeSetting::Auto)).unwrap().unwrap();
    assert_eq!(mode, AttachedMode::Driver, "veth supports driver-mode XDP");

    let before = settled(&lab, &datapath);

    // ICMP: 5 echo requests over IPv4 and 3 over IPv6 to the load balancer itself.
    lab.client
        .exec(&["ping", "-c", "5", "-i", "0.05", "-W", "1", &lab::LB_FRONT_V4.to_string()])
        .unwrap();
    lab.client
        .exec(&["ping", "-6", "-c", "3", "-i", "0.05", "-W", "1", &lab::LB_FRONT_V6.to_string()])
        .unwrap();
    // TCP: curl to the backend, forwarded by the load balancer's kernel.
    assert_eq!(lab.curl(IpAddr::V4(lab::backend_v4(0)), lab::HTTP_PORT).unwrap(), "backend-1\n");
    assert_eq!(lab.curl(IpAddr::V6(lab::backend_v6(0)), lab::HTTP_PORT).unwrap(), "backend-1\n");
    // UDP: four datagrams each way, answered by the backend.
    let replies = lab
        .client
        .enter(|| {
            let mut replies = Vec::new();
            for target in [IpAddr::V4(lab::backend_v4(0)), IpAddr::V6(lab::backend_v6(0))] {
                let bind: SocketAddr =
                    if target.is_ipv4() { "0.0.0.0:0" } else { "[::]:0" }.parse().unwrap();
                let socket = UdpSocket::bind(bind).unwrap();
                socket.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
                for i in 0..4 {
                    socket
                        .send_to(format!("hello {i}").as_bytes(), (target, lab::UDP_PORT))
                        .unwrap();
                    let mut buf = [0u8; 256];
                    let (n, _) = socket.recv_from(&mut buf).unwrap();
                    replies.push(String::from_utf8_lossy(&buf[..n]).into_owned());
                }
            }
            replies
        })
        .unwrap();
    assert_eq!(replies.len(), 8);
    assert!(replies.iter().all(|r| r.starts_with("backend-1 hello")), "{replies:?}");

    let after = settled(&lab, &datapath);
    let xdp = after.xdp.since(&before.xdp);
    let all = sub(after.all, before.all);
    let ip4 = sub(after.ip4, before.ip4);
    let ip6 = sub(after.ip6, before.ip6);

    // The reference saw our traffic...
    assert_eq!(sub(after.echo4, before.echo4).packets, 5, "IPv4 echo requests");
    assert_eq!(sub(after.echo6, before.echo6).packets, 3, "IPv6 echo requests");
    // (5 + 3 pings, two TCP connections of at least 5 client packets each, 8 datagrams.)
    assert!(ip4.packets + ip6.packets >= 5 + 3 + 10 + 8, "too little traffic: {ip4:?} {ip6:?}");
    // ...and the data path counted exactly the same frames: all passed, none dropped.
    assert_eq!(xdp.packets(), all.packets, "XDP saw {} but the stack got {all:?}", xdp.summary());
    assert_eq!(xdp.action(Action::Pass).packets, all.packets);
    assert_eq!(
        xdp.reason(Reason::NotService).packets,
        ip4.packets + ip6.packets,
        "{}",
        xdp.summary()
    );
    assert_eq!(xdp.reason(Reason::NotIp).packets, all.packets - ip4.packets - ip6.packets);
    // XDP counts whole frames; the ingress hook counts from the network header.
    assert_eq!(xdp.action(Action::Pass).bytes, all.bytes + 14 * all.packets);
    for reason in Reason::ALL {
        if !matches!(reason, Reason::NotService | Reason::NotIp) {
            assert_eq!(xdp.reason(reason).packets, 0, "unexpected {}", reason.name());
        }
    }

    datapath.detach_all();
    let link = lab.lb.ip(&["link", "show", LB_FRONT_IF]).unwrap();
    assert!(!link.contains("xdp"), "program still attached after detach: {link}");
}

#[test]
fn auto_mode_falls_back_to_generic_where_the_driver_has_no_xdp() {
    if !require_privileges("auto_mode_falls_back_to_generic_where_the_driver_has_no_xdp") {
        return;
    }
    let ns = lb_tests::netns::Netns::create(&lb_tests::netns::unique_id()).unwrap();
    let (mode, driver_error) = ns
        .enter(|| {
            let mut datapath = Datapath::load().unwrap();
            // Loopback has no driver-mode XDP.
            let driver = datapath.attach("lo", XdpModeSetting::Driver);
            let mode = datapath.attach("lo", XdpModeSetting::Auto).unwrap();
            let unknown = datapath.attach("nosuchif0", XdpModeSetting::Auto);
            assert!(matches!(unknown, Err(DatapathError::UnknownInterface { .. })), "{unknown:?}");
            datapath.detach_all();
            (mode, driver.err().map(|e| e.to_string()))
        })
        .unwrap();
    assert_eq!(mode, AttachedMode::Generic);
    let driver_error = driver_error.expect("driver mode on lo must fail");
    assert!(driver_error.contains("xdp_mode = \"generic\""), "no hint in: {driver_error}");
}

#[test]
fn lbd_attaches_on_start_and_detaches_on_sigterm() {
    if !require_privileges("lbd_attaches_on_start_and_detaches_on_sigterm") {
        return;
    }
    let lab = Lab::create(1).unwrap();
    let config = std::env::temp_dir().join(format!("{}-lbd.toml", lab.id));
    std::fs::write(
        &config,
        "[daemon]\nstats_log_interval_secs = 1\n[[interface]]\nname = \"front\"\n[[interface]]\nname = \"back\"\nxdp_mode = \"generic\"\n",
    )
    .unwrap();
    let pid = lb_tests::daemon::spawn_lbd(&lab.lb, &config, lb_tests::netns::ChildOutput::Capture)
        .unwrap();
    let attached = wait_for(Duration::from_secs(10), || {
        let front = lab.lb.ip(&["link", "show", "front"]).ok()?;
        let back = lab.lb.ip(&["link", "show", "back"]).ok()?;
        (front.contains("xdp") && back.contains("xdpgeneric")).then_some(())
    });
    assert!(
        attached.is_some(),
        "lbd did not attach in driver mode to front and generic mode to back"
    );
    // Traffic still flows through the load balancer while lbd runs.
    assert_eq!(lab.curl(IpAddr::V4(lab::backend_v4(0)), lab::HTTP_PORT).unwrap(), "backend-1\n");

    // Let one counter summary (every second) reach the log.
    std::thread::sleep(Duration::from_millis(1500));
    let mut child = lab.lb.take_child(pid).unwrap();
    let stopped = lb_tests::netns::stop_child(&mut child, "-TERM", Duration::from_secs(20));
    let log = stopped.log;
    assert!(stopped.in_time, "lbd did not exit within 20 s of SIGTERM: {log}");
    assert!(child.wait().unwrap().success(), "lbd failed: {log}");
    assert!(log.contains("XDP program attached") && log.contains("mode=\"driver\""), "{log}");
    assert!(log.contains("data path counters"), "no counter summary logged: {log}");
    for interface in ["front", "back"] {
        let link = lab.lb.ip(&["link", "show", interface]).unwrap();
        assert!(!link.contains("xdp"), "{interface} still has XDP after lbd exited: {link}");
    }
    let _ = std::fs::remove_file(config);
}

#[test]
fn lbd_rejects_a_bad_config_without_touching_the_kernel() {
    // An interface no host has: a `check-config` that touched the kernel would fail on it
    // rather than attach to a real one (this test runs in the host's namespace).
    let lbd = lab::bin_path("lbd").unwrap();
    let dir = std::env::temp_dir().join(lb_tests::netns::unique_id());
    std::fs::create_dir_all(&dir).unwrap();
    let bad = dir.join("bad.toml");
    std::fs::write(&bad, "[[interface]]\nname = \"lbtcheck0\"\nxdp_mode = \"fast\"\n").unwrap();
    let out = Command::new(&lbd).args(["check-config"]).arg(&bad).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("line 3, column 12"), "{err}");
    let good = dir.join("good.toml");
    std::fs::write(&good, "[[interface]]\nname = \"lbtcheck0\"\n").unwrap();
    let out = Command::new(&lbd).args(["check-config"]).arg(&good).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    // Files lbd reads only at start are read too: a token others can read, and a TLS
    // certificate that is not one, would stop it there.
    let token = dir.join("token");
    std::fs::write(&token, "0123456789abcdef0123").unwrap();
    std::fs::set_permissions(&token, std::os::unix::fs::PermissionsExt::from_mode(0o644)).unwrap();
    let cert = dir.join("api.crt");
    std::fs::write(&cert, "not a certificate\n").unwrap();
    let api = dir.join("api.toml");
    let text = format!(
        "[[interface]]\nname = \"lbtcheck0\"\n[api]\ntoken_file = \"{}\"\ntls_cert_file = \"{}\"\ntls_key_file = \"{}\"\n",
        token.display(),
        cert.display(),
        cert.display()
    );
    std::fs::write(&api, text).unwrap();
    let out = Command::new(&lbd).args(["check-config"]).arg(&api).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("readable by others") && err.contains("certificate"), "{err}");
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn a_backend_behind_an_ipv6_link_local_gateway_gets_its_next_hop() {
    // A routed IPv6 backend's gateway is link-local (as routers advertise themselves). The
    // resolver's probe must make the kernel resolve it on the route's interface: a datagram
    // to the gateway itself carries no scope, which the kernel refuses (and with two links
    // it could not tell which). The load balancer has two links; the route uses the second.
    if !require_privileges("a_backend_behind_an_ipv6_link_local_gateway_gets_its_next_hop") {
        return;
    }
    let id = unique_id();
    let lb = Netns::create(&format!("{id}-lb")).unwrap();
    let other = Netns::create(&format!("{id}-ot")).unwrap();
    let router = Netns::create(&format!("{id}-rt")).unwrap();
    veth(&lb, "ln0", &other, "ln0").unwrap();
    veth(&lb, "ln1", &router, "ln1").unwrap();
    // The router's link-local address, once its duplicate detection is over.
    let gateway = wait_for(Duration::from_secs(10), || {
        let out = router.ip(&["-6", "-o", "addr", "show", "dev", "ln1", "scope", "link"]).ok()?;
        let line = out.lines().find(|l| !l.contains("tentative"))?;
        let addr = line.split_whitespace().skip_while(|w| *w != "inet6").nth(1)?;
        Some(addr.split('/').next()?.to_owned())
    })
    .expect("the router's link-local address");
    lb.ip(&["-6", "route", "add", "fd00:77::/64", "via", &gateway, "dev", "ln1"]).unwrap();
    let backend: IpAddr = "fd00:77::10".parse().unwrap();
    let router_mac = router.mac_of("ln1").unwrap();
    let hop = wait_for(Duration::from_secs(5), || {
        let resolved = lb.enter(|| KernelResolver::default().resolve(&[backend])).ok()?;
        match resolved.get(&backend) {
            Some(Resolution::Resolved(hop)) => Some(*hop),
            _ => None,
        }
    });
    let hop = hop.expect("the gateway's neighbour entry never appeared");
    assert_eq!(hop.dmac, router_mac, "the router's MAC");
    assert_eq!(hop.flags, 0, "through a gateway, not on the link");
}
