//! Datapath tests of the balancer: the real XDP object, configured by the real `Balancer` from
//! TOML, run through `BPF_PROG_TEST_RUN`. Every case compares the exact output frame, built
//! with the test's packet builder (its checksums computed from scratch, never by the code
//! under test), and the verdict and counters.
//!
//! Next hops come from a fixed resolver: backends "on" the ingress interface (the test
//! namespace's loopback, ifindex 1) are sent with `XDP_TX`; backends behind a veth are sent
//! with `XDP_REDIRECT` through the device map.

#![allow(clippy::too_many_lines, reason = "case tables read best as one list")]

use std::{
    collections::HashMap,
    fmt::Write as _,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
};

use lb_common::{
    Action, Reason,
    conntrack::{FLOW_NAT, FLOW_REPLY, FlowState},
    flow::{raw_port, words_addr},
    net::{IPPROTO_ICMP, IPPROTO_ICMPV6, IPPROTO_TCP, IPPROTO_UDP, tcp_flags},
    service::{NEXTHOP_ON_LINK, NextHop},
};
use lb_tests::{
    netns::{Netns, unique_id},
    packet::{CLIENT_MAC, ExtHeader, LB_MAC, Packet},
    privileged::require_privileges,
    testrun::{Case, Output, TestBed, hex},
};
use lb_userspace::{Balancer, Config, nexthop::StaticResolver, rng::XorShift};

const CLIENT4: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 2);
const VIP4: Ipv4Addr = Ipv4Addr::new(198, 18, 100, 1);
const NAT4: Ipv4Addr = Ipv4Addr::new(198, 18, 1, 1);
const CLIENT6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, 2);
const VIP6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x100, 0, 0, 0, 0, 0, 1);
const NAT6: Ipv6Addr = Ipv6Addr::new(0xfd00, 1, 0, 0, 0, 0, 0, 1);
/// MAC of the load balancer's egress interface in the fixed next hops.
const EGRESS_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0xee];
/// The test namespace's loopback: the interface `BPF_PROG_TEST_RUN` frames arrive on.
const INGRESS_IFINDEX: u32 = 1;

fn backend_mac(addr: IpAddr) -> [u8; 6] {
    let last = match addr {
        IpAddr::V4(a) => a.octets()[3],
        IpAddr::V6(a) => a.octets()[15],
    };
    [0x02, 0, 0, 0, 0x01, last]
}

/// A test bed configured from TOML, in a namespace of its own (for the redirect interface).
struct Lb {
    bed: TestBed,
    balancer: Balancer,
    ns: Netns,
    config: Config,
    /// ifindex of the veth used as the redirect target.
    redirect_ifindex: u32,
}

const INTERFACE: &str = "[[interface]]\nname = \"lo\"\n";

impl Lb {
    fn new(name: &str, toml: &str, redirected: &[IpAddr]) -> Option<Self> {
        if !require_privileges(name) {
            return None;
        }
        // A veth pair in a namespace of the test's own: the redirect target.
        let ns = Netns::create(&unique_id()).unwrap();
        ns.ip(&["link", "add", "name", "out0", "type", "veth", "peer", "name", "out1"]).unwrap();
        ns.ip(&["link", "set", "out0", "up"]).unwrap();
        ns.ip(&["link", "set", "out1", "up"]).unwrap();
        let redirect_ifindex: u32 = ns
            .ip(&["-o", "link", "show", "out0"])
            .unwrap()
            .split(':')
            .next()
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        let config = Config::parse(&format!("{INTERFACE}{toml}"), "fixture").unwrap();
        let mut bed = TestBed::load().unwrap();
        let mut hops = HashMap::new();
        for pool in &config.pools {
            for b in &pool.backends {
                let addr = *b.address.get_ref();
                let ifindex =
                    if redirected.contains(&addr) { redirect_ifindex } else { INGRESS_IFINDEX };
                hops.insert(
                    addr,
                    NextHop {
                        ifindex,
                        flags: NEXTHOP_ON_LINK,
                        dmac: backend_mac(addr),
                        smac: EGRESS_MAC,
                    },
                );
            }
        }
        let mut balancer = Balancer::new(bed.datapath.ticks_per_second().unwrap());
        let maps = bed.datapath.maps_mut();
        // In the namespace: the device map takes interfaces by index there.
        let balancer = ns
            .enter(move || {
                let mut resolver = StaticResolver(hops);
                balancer.apply(&config, maps, &mut resolver).map(|_| (balancer, config))
            })
            .unwrap()
            .unwrap();
        let (balancer, config) = balancer;
        Some(Self { bed, balancer, ns, config, redirect_ifindex })
    }

    /// Applies `toml` (pools and services) as a reload would; every backend's next hop is
    /// the ingress interface.
    fn reapply(&mut self, toml: &str) {
        self.try_apply(toml).unwrap();
    }

    /// [`Lb::reapply`], returning the error of an apply that fails.
    fn try_apply(&mut self, toml: &str) -> anyhow::Result<()> {
        let config = Config::parse(&format!("{INTERFACE}{toml}"), "fixture").unwrap();
        let hops = config
            .pools
            .iter()
            .flat_map(|p| &p.backends)
            .map(|b| (*b.address.get_ref(), on_link_hop(*b.address.get_ref())))
            .collect();
        let mut resolver = StaticResolver(hops);
        self.balancer.apply(&config, self.bed.datapath.maps_mut(), &mut resolver)?;
        self.config = config;
        Ok(())
    }

    /// Opens a cookie connection from client port `cport` (IPv4, initial sequence number
    /// `isn`) to the NAT service: SYN, cookie SYN-ACK, cookie ACK (the backend's SYN), and
    /// the backend's SYN-ACK with sequence number 5000. Returns the cookie and the flow
    /// (backend, its port, NAT port).
    fn cookie_connection(&mut self, cport: u16, isn: u32) -> (u32, (IpAddr, u16, u16)) {
        let client = |flags: u8, seq: u32, ack: u32| {
            Packet::ipv4(CLIENT4, VIP4).tcp(cport, 80).flags(flags).seq_ack(seq, ack).build()
        };
        let answer = self.bed.run(&client(tcp_flags::SYN, isn, 0)).unwrap();
        assert_eq!(answer.verdict, Some(Action::Tx), "the cookie SYN-ACK");
        let (cookie, _) = tcp_seq_and_sport(&answer.output, false);
        let opened = self.bed.run(&client(tcp_flags::ACK, isn + 1, cookie.wrapping_add(1)));
        assert_eq!(opened.unwrap().verdict, Some(Action::Tx), "the cookie ACK opens the flow");
        let flow = self.flow_of(CLIENT4.into(), cport, VIP4.into(), 80, IPPROTO_TCP);
        let (backend, bport, nat_port) = flow;
        let syn_ack = Packet::ipv4(ip4(backend), NAT4)
            .tcp(bport, nat_port)
            .flags(tcp_flags::SYN | tcp_flags::ACK)
            .seq_ack(5000, isn + 1)
            .build();
        assert_eq!(self.bed.run(&syn_ack).unwrap().verdict, Some(Action::Tx), "the backend's");
        (cookie, flow)
    }

    /// Changes the data path's globals (timeouts, refresh interval) as `f` says.
    fn set_globals(&mut self, f: impl FnOnce(&mut lb_common::service::Globals)) {
        let mut g = self.bed.datapath.maps().globals.get().unwrap();
        f(&mut g);
        self.bed.datapath.maps_mut().globals.set(&g).unwrap();
    }

    /// Removes every reply entry, as the LRU may evict one half of a NAT flow alone;
    /// returns how many went.
    fn evict_reply_entries(&mut self) -> u64 {
        let conntrack = &mut self.bed.datapath.maps_mut().conntrack;
        let replies: Vec<_> = conntrack
            .entries()
            .unwrap()
            .into_iter()
            .filter(|(_, f)| f.flags & FLOW_REPLY != 0)
            .map(|(k, _)| k)
            .collect();
        conntrack.evict(replies)
    }

    /// A restarted daemon's balancer: it knows the pinned maps only.
    fn restart_balancer(&mut self) {
        let hz = self.bed.datapath.ticks_per_second().unwrap();
        let mut restarted = Balancer::new(hz);
        restarted.adopt(self.bed.datapath.maps()).unwrap();
        self.balancer = restarted;
    }

    /// The backend (address, port) and NAT port the connection table holds for a flow.
    fn flow_of(
        &self,
        client: IpAddr,
        cport: u16,
        vip: IpAddr,
        vport: u16,
        proto: u8,
    ) -> (IpAddr, u16, u16) {
        let key = lb_common::FlowKey::new((client, cport).into(), (vip, vport).into(), proto);
        let flow = self.bed.datapath.maps().conntrack.get(&key).expect("flow tracked");
        assert_eq!(flow.flags & FLOW_REPLY, 0);
        let backend = self.bed.datapath.maps().backends.get(flow.backend_id).unwrap();
        let port = if backend.port == 0 { vport } else { raw_port(backend.port) };
        (words_addr(backend.addr, backend.family), port, raw_port(flow.nat_port))
    }
}

/// The client, service and NAT source addresses of one family.
fn addresses(v6: bool) -> (IpAddr, IpAddr, IpAddr) {
    if v6 {
        (CLIENT6.into(), VIP6.into(), NAT6.into())
    } else {
        (CLIENT4.into(), VIP4.into(), NAT4.into())
    }
}

/// ICMP(v6) type and code of "port unreachable", then of "fragmentation needed" (v4) or
/// "packet too big" (v6): (unreachable type, its port code, too-big type, its code).
fn icmp_kinds(v6: bool) -> (u8, u8, u8, u8) {
    if v6 { (1, 4, 2, 0) } else { (3, 3, 3, 4) }
}

/// A router on the clients' side of the balancer (sender of "too big" errors about answers).
fn client_side_router(v6: bool) -> IpAddr {
    if v6 { "fd00:2::fe".parse().unwrap() } else { "198.18.2.254".parse().unwrap() }
}

/// The identity of the backend at `addr` (no port of its own) in `pool`.
fn identity(pool: &str, addr: &str) -> lb_userspace::balancer::BackendIdentity {
    lb_userspace::balancer::BackendIdentity {
        pool: pool.into(),
        addr: addr.parse().unwrap(),
        port: None,
    }
}

/// A backend's next hop in the fixtures: on the ingress interface's link.
fn on_link_hop(addr: IpAddr) -> NextHop {
    NextHop {
        ifindex: INGRESS_IFINDEX,
        flags: NEXTHOP_ON_LINK,
        dmac: backend_mac(addr),
        smac: EGRESS_MAC,
    }
}

fn nat_config(v6: bool, proto: &str) -> String {
    let (vip, nat, b1, b2) = if v6 {
        ("fd00:100::1", "fd00:1::1", "fd00:1::11", "fd00:1::12")
    } else {
        ("198.18.100.1", "198.18.1.1", "198.18.1.11", "198.18.1.12")
    };
    format!(
        "[[pool]]\nname = \"p\"\n[[pool.backend]]\naddress = \"{b1}\"\nport = 8080\n[[pool.backend]]\naddress = \"{b2}\"\nport = 8080\n\
         [[service]]\nname = \"s\"\naddress = \"{vip}\"\nprotocol = \"{proto}\"\nport = 80\npool = \"p\"\nmode = \"nat\"\nnat_source = \"{nat}\"\nnat_ports = \"20000-20999\"\n"
    )
}

fn dsr_config(v6: bool, proto: &str) -> String {
    let (vip, b1, b2) = if v6 {
        ("fd00:100::1", "fd00:1::11", "fd00:1::12")
    } else {
        ("198.18.100.1", "198.18.1.11", "198.18.1.12")
    };
    format!(
        "[[pool]]\nname = \"p\"\n[[pool.backend]]\naddress = \"{b1}\"\n[[pool.backend]]\naddress = \"{b2}\"\n\
         [[service]]\nname = \"s\"\naddress = \"{vip}\"\nprotocol = \"{proto}\"\nport = 80\npool = \"p\"\nmode = \"dsr-l2\"\n"
    )
}

fn client_packet(client: IpAddr, vip: IpAddr, proto: u8, cport: u16, vport: u16) -> Packet {
    let base = match (client, vip) {
        (IpAddr::V4(c), IpAddr::V4(v)) => Packet::ipv4(c, v),
        (IpAddr::V6(c), IpAddr::V6(v)) => Packet::ipv6(c, v),
        _ => unreachable!(),
    };
    if proto == IPPROTO_TCP {
        base.tcp(cport, vport).flags(tcp_flags::SYN).seq_ack(1000, 0).payload(b"")
    } else {
        base.udp(cport, vport).payload(b"hello udp")
    }
}

fn rewritten(
    src: IpAddr,
    dst: IpAddr,
    sport: u16,
    dport: u16,
    proto: u8,
    macs: ([u8; 6], [u8; 6]),
) -> Vec<u8> {
    let base = match (src, dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => Packet::ipv4(s, d),
        (IpAddr::V6(s), IpAddr::V6(d)) => Packet::ipv6(s, d),
        _ => unreachable!(),
    };
    let base = base.macs(macs.0, macs.1);
    if proto == IPPROTO_TCP {
        base.tcp(sport, dport).flags(tcp_flags::SYN).seq_ack(1000, 0).build()
    } else {
        base.udp(sport, dport).payload(b"hello udp").build()
    }
}

#[test]
fn vlan_tagged_frames_are_rewritten_with_their_tags_kept() {
    // A frame with one 802.1Q tag, or a QinQ pair, is balanced as the untagged frame is, and
    // leaves with its tags as they came (back out of the interface, on the same VLAN): NAT
    // both ways and DSR, exact frames.
    let tagged = |p: Packet, tags: &[(u16, u16)]| {
        tags.iter().fold(p, |p, (tpid, vid)| p.vlan_tpid(*tpid, *vid))
    };
    let (client, vip, nat) = addresses(false);
    for tags in [vec![(0x8100u16, 100u16)], vec![(0x88a8, 7), (0x8100, 100)]] {
        for mode in ["nat", "dsr"] {
            let name = format!("vlan_{mode}_{}", tags.len());
            let config =
                if mode == "nat" { nat_config(false, "tcp") } else { dsr_config(false, "tcp") };
            let Some(mut lb) = Lb::new(&name, &config, &[]) else { return };
            let cport = 40_100;
            let input = tagged(client_packet(client, vip, IPPROTO_TCP, cport, 80), &tags).build();
            let out = lb.bed.run(&input).unwrap();
            assert_eq!(out.verdict, Some(Action::Tx), "{name}");
            let (backend, bport, nat_port) = lb.flow_of(client, cport, vip, 80, IPPROTO_TCP);
            let IpAddr::V4(b) = backend else { unreachable!() };
            let macs = (EGRESS_MAC, backend_mac(backend));
            let expected = if mode == "nat" {
                let IpAddr::V4(n) = nat else { unreachable!() };
                Packet::ipv4(n, b).tcp(nat_port, bport)
            } else {
                let (IpAddr::V4(c), IpAddr::V4(v)) = (client, vip) else { unreachable!() };
                Packet::ipv4(c, v).tcp(cport, 80)
            };
            let expected =
                tagged(expected.macs(macs.0, macs.1).flags(tcp_flags::SYN).seq_ack(1000, 0), &tags)
                    .build();
            assert_eq!(hex(&out.output), hex(&expected), "{name}: to the backend");
            if mode == "nat" {
                let IpAddr::V4(n) = nat else { unreachable!() };
                let reply = tagged(
                    Packet::ipv4(b, n)
                        .macs(backend_mac(backend), LB_MAC)
                        .tcp(bport, nat_port)
                        .flags(tcp_flags::SYN | tcp_flags::ACK),
                    &tags,
                )
                .build();
                let (IpAddr::V4(c), IpAddr::V4(v)) = (client, vip) else { unreachable!() };
                let back = tagged(
                    Packet::ipv4(v, c)
                        .macs(LB_MAC, CLIENT_MAC)
                        .tcp(80, cport)
                        .flags(tcp_flags::SYN | tcp_flags::ACK),
                    &tags,
                )
                .build();
                let out = lb.bed.run(&reply).unwrap();
                assert_eq!(out.verdict, Some(Action::Tx), "{name}: reply");
                assert_eq!(hex(&out.output), hex(&back), "{name}: back to the client");
            }
        }
    }
}

#[test]
fn nat_forward_and_reply_for_every_family_and_protocol() {
    for (v6, proto_name, proto) in [
        (false, "tcp", IPPROTO_TCP),
        (false, "udp", IPPROTO_UDP),
        (true, "tcp", IPPROTO_TCP),
        (true, "udp", IPPROTO_UDP),
    ] {
        let name = format!("nat_forward_and_reply_{}_{proto_name}", if v6 { "v6" } else { "v4" });
        let (client, vip, nat) = addresses(v6);
        let backends: Vec<IpAddr> = if v6 {
            vec!["fd00:1::11".parse().unwrap(), "fd00:1::12".parse().unwrap()]
        } else {
            vec!["198.18.1.11".parse().unwrap(), "198.18.1.12".parse().unwrap()]
        };
        // The second backend sits behind another interface: its frames are redirected.
        let Some(mut lb) = Lb::new(&name, &nat_config(v6, proto_name), &backends[1..]) else {
            return;
        };
        let mut cases = Vec::new();
        for cport in [40_000u16, 40_001, 40_002, 40_003, 40_004, 40_005] {
            let input = client_packet(client, vip, proto, cport, 80).build();
            // Run it once to learn the backend and port the data path chose, then check the
            // exact frame on a second run of the same packet (the flow is tracked by then).
            let first = lb.bed.run(&input).unwrap();
            let (backend, bport, nat_port) = lb.flow_of(client, cport, vip, 80, proto);
            assert!(
                (20_000..=20_999).contains(&nat_port),
                "{name}: NAT port {nat_port} outside its range"
            );
            assert_eq!(bport, 8080);
            let redirected = backend == backends[1];
            let verdict = if redirected { Action::Redirect } else { Action::Tx };
            let expected =
                rewritten(nat, backend, nat_port, bport, proto, (EGRESS_MAC, backend_mac(backend)));
            assert_eq!(first.output, expected, "{name}: first packet of flow {cport}");
            cases.push(Case {
                description: format!("{name}: client port {cport} to {backend}"),
                input,
                verdict,
                reason: None,
                output: Output::Frame(expected),
            });
            // The reply from the backend to the NAT address goes back to the client, through
            // the client's MAC and the interface the client's packets came in on.
            let reply_in =
                rewritten(backend, nat, bport, nat_port, proto, (backend_mac(backend), LB_MAC));
            let reply_out = rewritten(vip, client, 80, cport, proto, (LB_MAC, CLIENT_MAC));
            cases.push(Case {
                description: format!("{name}: reply from {backend} to client port {cport}"),
                input: reply_in,
                verdict: Action::Tx,
                reason: None,
                output: Output::Frame(reply_out),
            });
        }
        lb.bed.check_all(&cases).unwrap();
        // Both backends got flows, and each flow has exactly its two entries.
        let entries = lb.bed.datapath.maps().conntrack.entries().unwrap();
        assert_eq!(entries.len(), 12, "{name}: six flows, two entries each");
        assert_eq!(entries.iter().filter(|(_, f)| f.flags == FLOW_NAT | FLOW_REPLY).count(), 6);
        let used: std::collections::HashSet<u32> =
            entries.iter().map(|(_, f)| f.backend_id).collect();
        assert_eq!(used.len(), 2, "{name}: six flows should reach both backends");
        let sid = lb.balancer.service_id("s").unwrap();
        let traffic = lb.bed.datapath.maps().traffic.service(sid).unwrap();
        assert_eq!(traffic.new_flows, 6, "{name}");
        assert_eq!(traffic.packets, 12, "{name}");
        assert_eq!(traffic.reply_packets, 6, "{name}");
        let _ = (&lb.ns, &lb.config, lb.redirect_ifindex);
    }
}

#[test]
fn dsr_rewrites_only_the_macs() {
    for (v6, proto_name, proto) in [
        (false, "tcp", IPPROTO_TCP),
        (false, "udp", IPPROTO_UDP),
        (true, "tcp", IPPROTO_TCP),
        (true, "udp", IPPROTO_UDP),
    ] {
        let name = format!("dsr_{}_{proto_name}", if v6 { "v6" } else { "v4" });
        let (client, vip): (IpAddr, IpAddr) =
            if v6 { (CLIENT6.into(), VIP6.into()) } else { (CLIENT4.into(), VIP4.into()) };
        let b2: IpAddr =
            if v6 { "fd00:1::12".parse().unwrap() } else { "198.18.1.12".parse().unwrap() };
        let Some(mut lb) = Lb::new(&name, &dsr_config(v6, proto_name), &[b2]) else { return };
        let mut cases = Vec::new();
        let mut used = std::collections::BTreeSet::new();
        // Six flows or more, until both backends have one (bounded).
        for cport in 41_000u16..41_032 {
            if cases.len() >= 6 && used.len() == 2 {
                break;
            }
            let input = client_packet(client, vip, proto, cport, 80).build();
            lb.bed.run(&input).unwrap();
            let (backend, bport, nat_port) = lb.flow_of(client, cport, vip, 80, proto);
            assert_eq!((bport, nat_port), (80, 0));
            used.insert(backend);
            let verdict = if backend == b2 { Action::Redirect } else { Action::Tx };
            let expected = client_packet(client, vip, proto, cport, 80)
                .macs(EGRESS_MAC, backend_mac(backend))
                .build();
            cases.push(Case {
                description: format!("{name}: client port {cport} to {backend}"),
                input,
                verdict,
                reason: None,
                output: Output::Frame(expected),
            });
        }
        // Both backends, so both transmissions (XDP_TX and the redirect) are checked.
        assert_eq!(used.len(), 2, "{name}: {} flows all went to {used:?}", cases.len());
        lb.bed.check_all(&cases).unwrap();
        let entries = lb.bed.datapath.maps().conntrack.entries().unwrap();
        assert_eq!(entries.len(), cases.len(), "{name}: one entry per DSR flow");
    }
}

#[test]
fn retransmitted_syn_keeps_one_entry_and_rst_then_syn_opens_a_new_flow() {
    let Some(mut lb) = Lb::new("retransmitted_syn", &nat_config(false, "tcp"), &[]) else { return };
    let syn = client_packet(CLIENT4.into(), VIP4.into(), IPPROTO_TCP, 45_000, 80).build();
    let first = lb.bed.run(&syn).unwrap();
    let again = lb.bed.run(&syn).unwrap();
    assert_eq!(
        first.output, again.output,
        "a retransmitted SYN takes the same backend and NAT port"
    );
    assert_eq!(lb.bed.datapath.maps().conntrack.entries().unwrap().len(), 2);
    let sid = lb.balancer.service_id("s").unwrap();
    assert_eq!(lb.bed.datapath.maps().traffic.service(sid).unwrap().new_flows, 1);

    // The client resets: the flow is closed; its next SYN is a new connection, and the old
    // NAT pair is released with it (no half-deleted pair stays behind).
    let (_, _, old_port) = lb.flow_of(CLIENT4.into(), 45_000, VIP4.into(), 80, IPPROTO_TCP);
    let rst = Packet::ipv4(CLIENT4, VIP4).tcp(45_000, 80).flags(tcp_flags::RST).build();
    assert_eq!(lb.bed.run(&rst).unwrap().verdict, Some(Action::Tx));
    let key = lb_common::FlowKey::new(
        (IpAddr::from(CLIENT4), 45_000).into(),
        (IpAddr::from(VIP4), 80).into(),
        IPPROTO_TCP,
    );
    assert_eq!(lb.bed.datapath.maps().conntrack.get(&key).unwrap().state, FlowState::Closed as u8);
    lb.bed.run(&syn).unwrap();
    assert_eq!(lb.bed.datapath.maps().traffic.service(sid).unwrap().new_flows, 2);
    let entries = lb.bed.datapath.maps().conntrack.entries().unwrap();
    assert_eq!(entries.len(), 2, "the closed flow's reply entry went with it: {entries:?}");
    let (_, _, new_port) = lb.flow_of(CLIENT4.into(), 45_000, VIP4.into(), 80, IPPROTO_TCP);
    let reply_ports: Vec<u16> = entries
        .iter()
        .filter(|(_, f)| f.flags & FLOW_REPLY != 0)
        .map(|(k, _)| raw_port(k.dport))
        .collect();
    assert_eq!(reply_ports, vec![new_port]);
    assert_eq!(new_port, old_port, "the same backend: the dead flow's port and entries are reused");

    // Reset again, and the backend is drained: the next SYN goes to the other backend, so
    // the dead pair is removed and a new one made (no reply entry left for the first).
    assert_eq!(lb.bed.run(&rst).unwrap().verdict, Some(Action::Tx));
    let (first, _, _) = lb.flow_of(CLIENT4.into(), 45_000, VIP4.into(), 80, IPPROTO_TCP);
    let drained = nat_config(false, "tcp").replace(
        &format!("address = \"{first}\"\nport = 8080\n"),
        &format!("address = \"{first}\"\nport = 8080\nweight = 0\n"),
    );
    lb.reapply(&drained);
    lb.bed.run(&syn).unwrap();
    let (second, _, _) = lb.flow_of(CLIENT4.into(), 45_000, VIP4.into(), 80, IPPROTO_TCP);
    assert_ne!(second, first);
    assert_eq!(lb.bed.datapath.maps().traffic.service(sid).unwrap().new_flows, 3);
    let entries = lb.bed.datapath.maps().conntrack.entries().unwrap();
    let reply_sources: Vec<IpAddr> = entries
        .iter()
        .filter(|(_, f)| f.flags & FLOW_REPLY != 0)
        .map(|(k, _)| words_addr(k.src, k.family))
        .collect();
    assert_eq!(reply_sources, vec![second], "{entries:?}");

    // FIN moves the flow to closing; later packets keep their backend.
    let fin =
        Packet::ipv4(CLIENT4, VIP4).tcp(45_000, 80).flags(tcp_flags::FIN | tcp_flags::ACK).build();
    lb.bed.run(&fin).unwrap();
    assert_eq!(lb.bed.datapath.maps().conntrack.get(&key).unwrap().state, FlowState::Closing as u8);
}

#[test]
fn a_dsr_syn_on_a_closed_tuple_replaces_its_entry() {
    let b2: IpAddr = "198.18.1.12".parse().unwrap();
    let Some(mut lb) = Lb::new("dsr_reopen", &dsr_config(false, "tcp"), &[b2]) else { return };
    let syn = client_packet(CLIENT4.into(), VIP4.into(), IPPROTO_TCP, 45_001, 80).build();
    let first = lb.bed.run(&syn).unwrap();
    let rst = Packet::ipv4(CLIENT4, VIP4).tcp(45_001, 80).flags(tcp_flags::RST).build();
    assert!(lb.bed.run(&rst).unwrap().verdict.is_some_and(|v| v != Action::Pass));
    let key = lb_common::FlowKey::new(
        (IpAddr::from(CLIENT4), 45_001).into(),
        (IpAddr::from(VIP4), 80).into(),
        IPPROTO_TCP,
    );
    let closed = lb.bed.datapath.maps().conntrack.get(&key).unwrap();
    assert_eq!(closed.state, FlowState::Closed as u8);
    // The new connection's entry takes the closed one's place: one entry, fresh state and
    // clock, the same backend by the same hash.
    let again = lb.bed.run(&syn).unwrap();
    assert_eq!(first.output, again.output);
    let sid = lb.balancer.service_id("s").unwrap();
    assert_eq!(lb.bed.datapath.maps().traffic.service(sid).unwrap().new_flows, 2);
    let entries = lb.bed.datapath.maps().conntrack.entries().unwrap();
    assert_eq!(entries.len(), 1, "{entries:?}");
    let open = lb.bed.datapath.maps().conntrack.get(&key).unwrap();
    assert_eq!(open.state, FlowState::SynSeen as u8);
    assert_eq!(open.backend_id, closed.backend_id);
    assert!(open.last_seen >= closed.last_seen);
}

/// A NAT service with one backend and one NAT port: a second flow to the backend can only
/// have the port the first one had.
fn one_port_nat_config() -> String {
    nat_config(false, "tcp")
        .replace("nat_ports = \"20000-20999\"", "nat_ports = \"20000-20000\"")
        .replace("[[pool.backend]]\naddress = \"198.18.1.12\"\nport = 8080\n", "")
}

/// A test bed on the one-port NAT service whose refreshes are far apart: every packet that
/// finds its flow in the flow cache is carried by it.
fn one_port_cached(name: &str) -> Option<Lb> {
    let mut lb = Lb::new(name, &one_port_nat_config(), &[])?;
    lb.set_globals(|g| g.refresh = g.timeouts.established / 2);
    Some(lb)
}

/// Runs `frame` and checks it is dropped for want of a NAT port, counted once.
fn assert_no_port(lb: &mut Lb, frame: &[u8]) {
    let before = lb.bed.datapath.stats().read().unwrap();
    assert_eq!(lb.bed.run(frame).unwrap().verdict, Some(Action::Drop));
    let delta = lb.bed.datapath.stats().read().unwrap().since(&before);
    assert_eq!(delta.reason(Reason::NatPortsExhausted).packets, 1, "{}", delta.summary());
}

/// A client's SYN to the IPv4 service from port `port`.
fn syn4(port: u16) -> Vec<u8> {
    client_packet(CLIENT4.into(), VIP4.into(), IPPROTO_TCP, port, 80).build()
}

/// A client's ACK to the IPv4 service's port 80 from `port`.
fn ack4(port: u16) -> Vec<u8> {
    Packet::ipv4(CLIENT4, VIP4).tcp(port, 80).flags(tcp_flags::ACK).build()
}

/// Opens the flow from client `port` (SYN, ACK) and sends one more ACK, which its slot in
/// the flow cache carries (on a bed whose refreshes are far apart).
fn open_cached(lb: &mut Lb, port: u16) {
    for frame in [syn4(port), ack4(port), ack4(port)] {
        assert_eq!(lb.bed.run(&frame).unwrap().verdict, Some(Action::Tx));
    }
}

/// On the one-port service: the flow from client port `a` closes and (closed flows now
/// expiring at once) the flow from `b` takes its NAT port over. Returns `b`'s backend
/// (address, port) and NAT port.
fn hand_the_port_over(lb: &mut Lb, a: u16, b: u16) -> (IpAddr, u16, u16) {
    assert_eq!(lb.bed.run(&syn4(a)).unwrap().verdict, Some(Action::Tx));
    let rst = Packet::ipv4(CLIENT4, VIP4).tcp(a, 80).flags(tcp_flags::RST).build();
    assert_eq!(lb.bed.run(&rst).unwrap().verdict, Some(Action::Tx));
    lb.set_globals(|g| g.timeouts.closed = 0);
    std::thread::sleep(std::time::Duration::from_millis(30));
    assert_eq!(lb.bed.run(&syn4(b)).unwrap().verdict, Some(Action::Tx));
    let flow = lb.flow_of(CLIENT4.into(), b, VIP4.into(), 80, IPPROTO_TCP);
    assert_eq!(flow.2, 20_000, "the only port");
    flow
}

#[test]
fn a_reopened_nat_tuple_leaves_a_port_another_flow_took_over() {
    // One backend and one NAT port: once a closed flow has expired, the next flow takes its
    // port over, and the closed flow's tuple coming back must not take it away again.
    let Some(mut lb) = Lb::new("nat_port_taken_over", &one_port_nat_config(), &[]) else {
        return;
    };
    let (a, b) = (45_100, 45_101);
    hand_the_port_over(&mut lb, a, b);

    let before = lb.bed.datapath.stats().read().unwrap();
    assert_eq!(lb.bed.run(&syn4(a)).unwrap().verdict, Some(Action::Drop));
    let delta = lb.bed.datapath.stats().read().unwrap().since(&before);
    assert_eq!(delta.reason(Reason::NatPortsExhausted).packets, 1, "{}", delta.summary());
    let entries = lb.bed.datapath.maps().conntrack.entries().unwrap();
    let replies: Vec<(u16, u16)> = entries
        .iter()
        .filter(|(_, f)| f.flags & FLOW_REPLY != 0)
        .map(|(k, f)| (raw_port(k.dport), raw_port(f.peer_port)))
        .collect();
    assert_eq!(replies, vec![(20_000, b)], "the second flow keeps its port: {entries:?}");
}

#[test]
fn a_reopened_nat_tuple_whose_port_was_taken_gets_another_one() {
    // One backend, two NAT ports. Flow a closes and expires; b takes a's port (c holds the
    // other); c closes and expires. a's tuple coming back finds its old port b's: it gets
    // c's, as a new flow, and b's reply entry stays b's.
    let toml = one_port_nat_config().replace("20000-20000", "20000-20001");
    let Some(mut lb) = Lb::new("nat_port_reopened_moves", &toml, &[]) else { return };
    let (a, b, c) = (45_400, 45_401, 45_402);
    let rst = |port: u16| Packet::ipv4(CLIENT4, VIP4).tcp(port, 80).flags(tcp_flags::RST).build();
    let port_of =
        |lb: &Lb, port: u16| lb.flow_of(CLIENT4.into(), port, VIP4.into(), 80, IPPROTO_TCP).2;
    assert_eq!(lb.bed.run(&syn4(a)).unwrap().verdict, Some(Action::Tx));
    assert_eq!(lb.bed.run(&syn4(c)).unwrap().verdict, Some(Action::Tx));
    let (port_a, port_c) = (port_of(&lb, a), port_of(&lb, c));
    assert_ne!(port_a, port_c);
    assert_eq!(lb.bed.run(&rst(a)).unwrap().verdict, Some(Action::Tx));
    lb.set_globals(|g| g.timeouts.closed = 0);
    std::thread::sleep(std::time::Duration::from_millis(30));
    assert_eq!(lb.bed.run(&syn4(b)).unwrap().verdict, Some(Action::Tx));
    assert_eq!(port_of(&lb, b), port_a, "b takes a's expired port");
    assert_eq!(lb.bed.run(&rst(c)).unwrap().verdict, Some(Action::Tx));
    std::thread::sleep(std::time::Duration::from_millis(30));

    assert_eq!(lb.bed.run(&syn4(a)).unwrap().verdict, Some(Action::Tx));
    assert_eq!(port_of(&lb, a), port_c, "a moves to the free port");
    let entries = lb.bed.datapath.maps().conntrack.entries().unwrap();
    let replies: std::collections::BTreeMap<u16, u16> = entries
        .iter()
        .filter(|(_, f)| f.flags & FLOW_REPLY != 0)
        .map(|(k, f)| (raw_port(k.dport), raw_port(f.peer_port)))
        .collect();
    assert_eq!(replies.get(&port_a), Some(&b), "b keeps its reply entry: {entries:?}");
    assert_eq!(replies.get(&port_c), Some(&a), "a's new reply entry: {entries:?}");
    let forward_a =
        entries.iter().filter(|(k, f)| f.flags & FLOW_REPLY == 0 && raw_port(k.sport) == a).count();
    assert_eq!(forward_a, 1, "{entries:?}");
}

#[test]
fn a_nat_flow_that_lost_its_port_to_another_stays_off_it() {
    // One backend and one NAT port. The LRU evicts a live flow's reply entry alone; the
    // next flow takes the port; the first flow's packets must then not reach the backend on
    // the second one's connection, nor its refresh take the second one's reply entry.
    let Some(mut lb) = Lb::new("nat_port_lost", &one_port_nat_config(), &[]) else { return };
    let (a, b) = (45_200, 45_201);
    assert_eq!(lb.bed.run(&syn4(a)).unwrap().verdict, Some(Action::Tx));
    assert_eq!(lb.evict_reply_entries(), 1);
    assert_eq!(lb.bed.run(&syn4(b)).unwrap().verdict, Some(Action::Tx));

    // The first client's ACK moves its flow on (a state change refreshes the reply entry).
    let ack = Packet::ipv4(CLIENT4, VIP4).tcp(a, 80).flags(tcp_flags::ACK).build();
    let before = lb.bed.datapath.stats().read().unwrap();
    assert_eq!(lb.bed.run(&ack).unwrap().verdict, Some(Action::Drop));
    let delta = lb.bed.datapath.stats().read().unwrap().since(&before);
    assert_eq!(delta.reason(Reason::NatPortsExhausted).packets, 1, "{}", delta.summary());
    let entries = lb.bed.datapath.maps().conntrack.entries().unwrap();
    let replies: Vec<(u16, u16, u8)> = entries
        .iter()
        .filter(|(_, f)| f.flags & FLOW_REPLY != 0)
        .map(|(k, f)| (raw_port(k.dport), raw_port(f.peer_port), f.state))
        .collect();
    assert_eq!(replies, vec![(20_000, b, FlowState::SynSeen as u8)], "{entries:?}");
}

#[test]
fn cuts_leave_dead_entries_to_the_sweep() {
    // The data path may be writing a flow that reopens a dead entry's tuple over it in
    // place; a cut removing the entry in that instant would turn the write into one to a
    // freed element. Cuts (a removed service, a drain deadline) stop live flows and leave
    // dead entries to the sweep, which waits out that window.
    let Some(mut lb) = Lb::new("cuts_spare_dead", &dsr_config(false, "tcp"), &[]) else { return };
    let rst = Packet::ipv4(CLIENT4, VIP4).tcp(45_501, 80).flags(tcp_flags::RST).build();
    for frame in [syn4(45_500), syn4(45_501), rst] {
        assert_eq!(lb.bed.run(&frame).unwrap().verdict, Some(Action::Tx));
    }
    lb.set_globals(|g| g.timeouts.closed = 0);
    std::thread::sleep(std::time::Duration::from_millis(30));
    let sports = |lb: &Lb| -> Vec<u16> {
        let entries = lb.bed.datapath.maps().conntrack.entries().unwrap();
        let mut ports: Vec<u16> = entries.iter().map(|(k, _)| raw_port(k.sport)).collect();
        ports.sort_unstable();
        ports
    };
    let sid = lb.balancer.service_id("s").unwrap();
    let clock = lb.bed.datapath.flow_clock().unwrap();
    let removed = lb
        .bed
        .datapath
        .maps_mut()
        .conntrack
        .remove_flows_of_services(&[sid], Some(&clock))
        .unwrap();
    assert_eq!(removed, 1, "the live flow alone");
    assert_eq!(sports(&lb), vec![45_501], "the closed flow stays for the sweep");

    // A drain deadline's cut likewise.
    assert_eq!(lb.bed.run(&syn4(45_502)).unwrap().verdict, Some(Action::Tx));
    let ids: std::collections::HashSet<u32> = lb
        .bed
        .datapath
        .maps()
        .conntrack
        .entries()
        .unwrap()
        .iter()
        .map(|(_, f)| f.backend_id)
        .collect();
    let clock = lb.bed.datapath.flow_clock().unwrap();
    let balancer = &lb.balancer;
    let removed = lb
        .bed
        .datapath
        .maps_mut()
        .conntrack
        .remove_flows_of(&ids, |id| balancer.backend_entry(id), Some(&clock))
        .unwrap();
    assert_eq!(removed, 1, "the live flow alone");
    assert_eq!(sports(&lb), vec![45_501]);
}

#[test]
fn a_backend_reset_closes_both_directions() {
    let Some(mut lb) = Lb::new("backend_reset", &nat_config(false, "tcp"), &[]) else { return };
    let syn = client_packet(CLIENT4.into(), VIP4.into(), IPPROTO_TCP, 46_000, 80).build();
    lb.bed.run(&syn).unwrap();
    let (backend, bport, nat_port) =
        lb.flow_of(CLIENT4.into(), 46_000, VIP4.into(), 80, IPPROTO_TCP);
    let IpAddr::V4(backend4) = backend else { unreachable!() };
    let rst = Packet::ipv4(backend4, NAT4)
        .tcp(bport, nat_port)
        .flags(tcp_flags::RST | tcp_flags::ACK)
        .build();
    assert_eq!(lb.bed.run(&rst).unwrap().verdict, Some(Action::Tx));
    let entries = lb.bed.datapath.maps().conntrack.entries().unwrap();
    assert_eq!(entries.len(), 2, "both directions kept until they expire: {entries:?}");
    for (_, flow) in entries {
        assert_eq!(flow.state, FlowState::Closed as u8);
    }
}

#[test]
fn the_flow_cache_carries_established_packets_until_the_table_must_see_them() {
    // An established flow's packets are carried by the flow cache's copy of its entry (per
    // CPU; the harness keeps the test on one). Seen by the LRU evicting the entry behind the
    // cache's back: the next packet still leaves, exactly as the table would send it, and
    // the table stays without the flow. A cut (the daemon's removals bump the cache's epoch)
    // or a packet that changes the flow's state sends packets to the table again.
    for (v6, nat) in [(false, true), (true, true), (false, false), (true, false)] {
        let name = format!(
            "flow_cache_{}_{}",
            if v6 { "v6" } else { "v4" },
            if nat { "nat" } else { "dsr" }
        );
        let (client, vip, nat_addr) = addresses(v6);
        let config = if nat { nat_config(v6, "tcp") } else { dsr_config(v6, "tcp") };
        let Some(mut lb) = Lb::new(&name, &config, &[]) else { return };
        // No refresh falls due during the test, whatever the machine's pace.
        lb.set_globals(|g| g.refresh = g.timeouts.established / 2);
        let segment = |port: u16, flags: u8| {
            ip_packet(client, vip).tcp(port, 80).flags(flags).seq_ack(1000, 1).payload(b"cached")
        };
        let key = |port: u16| {
            lb_common::FlowKey::new((client, port).into(), (vip, 80).into(), IPPROTO_TCP)
        };
        let data = tcp_flags::ACK | tcp_flags::PSH;

        let port = 46_200;
        for flags in [tcp_flags::SYN, tcp_flags::ACK] {
            assert_eq!(
                lb.bed.run(&segment(port, flags).build()).unwrap().verdict,
                Some(Action::Tx)
            );
        }
        let (backend, bport, nat_port) = lb.flow_of(client, port, vip, 80, IPPROTO_TCP);
        let expected = if nat {
            ip_packet(nat_addr, backend)
                .macs(EGRESS_MAC, backend_mac(backend))
                .tcp(nat_port, bport)
                .flags(data)
                .seq_ack(1000, 1)
                .payload(b"cached")
                .build()
        } else {
            segment(port, data).macs(EGRESS_MAC, backend_mac(backend)).build()
        };
        let sid = lb.balancer.service_id("s").unwrap();
        let before = lb.bed.datapath.maps().traffic.service(sid).unwrap();
        assert_eq!(lb.bed.datapath.maps_mut().conntrack.evict(vec![key(port)]), 1);
        let out = lb.bed.run(&segment(port, data).build()).unwrap();
        assert_eq!(out.verdict, Some(Action::Tx), "{name}");
        assert_eq!(hex(&out.output), hex(&expected), "{name}: the cached flow's frame");
        assert!(lb.bed.datapath.maps().conntrack.get(&key(port)).is_none(), "{name}: by the cache");
        let after = lb.bed.datapath.maps().traffic.service(sid).unwrap();
        assert_eq!(after.packets, before.packets + 1, "{name}: counted");
        assert_eq!(after.new_flows, before.new_flows, "{name}: no new flow");

        // The daemon's cuts bump the epoch: the table's again (it picks the flow up anew).
        let conntrack = &mut lb.bed.datapath.maps_mut().conntrack;
        let cut = conntrack.remove_flows_of_services(&[sid], None).unwrap();
        assert_eq!(cut, u64::from(nat), "{name}: only a NAT flow's reply entry was left");
        assert_eq!(lb.bed.run(&segment(port, data).build()).unwrap().verdict, Some(Action::Tx));
        assert!(lb.bed.datapath.maps().conntrack.get(&key(port)).is_some(), "{name}: by the table");

        // A FIN changes the state: the table takes it, and the slot follows the table (a
        // closing flow is not carried by the cache).
        let port = 46_201;
        for flags in [tcp_flags::SYN, tcp_flags::ACK, data, tcp_flags::FIN | tcp_flags::ACK] {
            assert_eq!(
                lb.bed.run(&segment(port, flags).build()).unwrap().verdict,
                Some(Action::Tx)
            );
        }
        let entry = lb.bed.datapath.maps().conntrack.get(&key(port)).unwrap();
        assert_eq!(entry.state, FlowState::Closing as u8, "{name}");
        assert_eq!(lb.bed.datapath.maps_mut().conntrack.evict(vec![key(port)]), 1);
        assert_eq!(lb.bed.run(&segment(port, data).build()).unwrap().verdict, Some(Action::Tx));
        assert!(lb.bed.datapath.maps().conntrack.get(&key(port)).is_some(), "{name}: after a FIN");
    }
}

#[test]
fn a_flow_the_table_lost_is_not_carried_on_by_its_slot() {
    // The LRU evicts a cached flow's entry and the client starts a new connection on the
    // tuple: the SYN finds no entry and opens the flow afresh, and the slot must not carry
    // the next packets as the old connection's (the ACK completing the handshake goes to
    // the table, which moves the new entry to established).
    let Some(mut lb) = Lb::new("flow_cache_lost", &dsr_config(false, "tcp"), &[]) else { return };
    lb.set_globals(|g| g.refresh = g.timeouts.established / 2);
    let port = 46_300;
    let segment = |flags: u8| Packet::ipv4(CLIENT4, VIP4).tcp(port, 80).flags(flags).build();
    let key = lb_common::FlowKey::new((CLIENT4, port).into(), (VIP4, 80).into(), IPPROTO_TCP);
    for flags in [tcp_flags::SYN, tcp_flags::ACK, tcp_flags::ACK] {
        assert_eq!(lb.bed.run(&segment(flags)).unwrap().verdict, Some(Action::Tx));
    }
    assert_eq!(lb.bed.datapath.maps_mut().conntrack.evict(vec![key]), 1);
    assert_eq!(lb.bed.run(&segment(tcp_flags::SYN)).unwrap().verdict, Some(Action::Tx));
    let opened = lb.bed.datapath.maps().conntrack.get(&key).unwrap();
    assert_eq!(opened.state, FlowState::SynSeen as u8);
    assert_eq!(lb.bed.run(&segment(tcp_flags::ACK)).unwrap().verdict, Some(Action::Tx));
    let entry = lb.bed.datapath.maps().conntrack.get(&key).unwrap();
    assert_eq!(entry.state, FlowState::Established as u8, "the handshake's ACK reached the table");
}

#[test]
fn the_table_walk_sees_every_entry_once_across_batches() {
    // The sweep and the cuts read the table by BPF_MAP_LOOKUP_BATCH, a bucket cursor at a
    // time: every entry exactly once, whatever the batch size (7 here: hundreds of
    // batches, entries of one bucket never split).
    let Some(mut lb) = Lb::new("table_walk", &dsr_config(false, "tcp"), &[]) else { return };
    let ports: Vec<u16> = (47_000..48_500).collect();
    for &port in &ports {
        assert_eq!(lb.bed.run(&syn4(port)).unwrap().verdict, Some(Action::Tx));
    }
    let conntrack = &lb.bed.datapath.maps().conntrack;
    for batch in [7, 4096] {
        let mut seen = Vec::new();
        conntrack
            .walk_in(batch, |key, flow| seen.push((u16::from_be(key.sport), flow.state)))
            .unwrap();
        seen.sort_unstable();
        let want: Vec<(u16, u8)> = ports.iter().map(|&p| (p, FlowState::SynSeen as u8)).collect();
        assert_eq!(seen, want, "batches of {batch}");
    }
    assert_eq!(conntrack.len(), ports.len());
}

#[test]
fn a_nat_port_taken_over_stops_the_slot_of_the_flow_that_lost_it() {
    // One NAT port. Client port `a`'s flow is cached, then the LRU evicts both its entries
    // and client port `b` takes the port. `a`'s next packet must not leave from that port
    // (into `b`'s connection at the backend): the port's generation moved, the slot is not
    // used, the table has nothing for `a`, and no port is free for a new flow.
    let Some(mut lb) = one_port_cached("flow_cache_port") else { return };
    let (a, b) = (46_310, 46_311);
    open_cached(&mut lb, a);
    let conntrack = &mut lb.bed.datapath.maps_mut().conntrack;
    let all: Vec<_> = conntrack.entries().unwrap().into_iter().map(|(k, _)| k).collect();
    assert_eq!(conntrack.evict(all), 2, "a's two entries");
    assert_eq!(lb.bed.run(&syn4(b)).unwrap().verdict, Some(Action::Tx));
    assert_eq!(lb.flow_of(CLIENT4.into(), b, VIP4.into(), 80, IPPROTO_TCP).2, 20_000);

    assert_no_port(&mut lb, &ack4(a));
}

#[test]
fn a_removed_service_opens_no_flow_from_the_service_cache() {
    // New flows find their service in this CPU's service cache; removing the service (a
    // write to `SERVICES`) must leave no copy that still opens flows.
    // A second service on the address keeps it in the address filter: the packet reaches
    // the service lookup.
    let other = "[[service]]\nname = \"s81\"\naddress = \"198.18.100.1\"\nprotocol = \"tcp\"\nport = 81\npool = \"p\"\nmode = \"dsr-l2\"\n";
    let config = format!("{}{other}", dsr_config(false, "tcp"));
    let Some(mut lb) = Lb::new("service_cache", &config, &[]) else { return };
    assert_eq!(lb.bed.run(&syn4(46_320)).unwrap().verdict, Some(Action::Tx));
    assert_eq!(lb.bed.run(&syn4(46_321)).unwrap().verdict, Some(Action::Tx));
    let pool = dsr_config(false, "tcp");
    lb.reapply(&format!("{}{other}", &pool[..pool.find("[[service]]").unwrap()]));
    let before = lb.bed.datapath.stats().read().unwrap();
    assert_eq!(lb.bed.run(&syn4(46_322)).unwrap().verdict, Some(Action::Pass));
    let delta = lb.bed.datapath.stats().read().unwrap().since(&before);
    assert_eq!(delta.reason(Reason::NotService).packets, 1, "{}", delta.summary());
}

#[test]
fn a_released_backend_id_leaves_no_slot_that_sends_to_it() {
    // A backend removed from the pool keeps its id while a flow uses it; the flow's entry is
    // evicted, the sweep finds no flow left and its id is released (its next hop cleared,
    // the id free again). The flow's slot must not go on naming the id: the next packet is
    // balanced afresh by the table instead of dropped for want of a next hop.
    let config = dsr_config(false, "tcp");
    let Some(mut lb) = Lb::new("flow_cache_released", &config, &[]) else { return };
    lb.set_globals(|g| g.refresh = g.timeouts.established / 2);
    let port = 46_330;
    let segment = |flags: u8| Packet::ipv4(CLIENT4, VIP4).tcp(port, 80).flags(flags).build();
    let key = lb_common::FlowKey::new((CLIENT4, port).into(), (VIP4, 80).into(), IPPROTO_TCP);
    for flags in [tcp_flags::SYN, tcp_flags::ACK] {
        assert_eq!(lb.bed.run(&segment(flags)).unwrap().verdict, Some(Action::Tx));
    }
    let (backend, ..) = lb.flow_of(CLIENT4.into(), port, VIP4.into(), 80, IPPROTO_TCP);
    let kept = if backend == IpAddr::from(Ipv4Addr::new(198, 18, 1, 11)) {
        "198.18.1.12"
    } else {
        "198.18.1.11"
    };
    let gone = if kept == "198.18.1.12" { "198.18.1.11" } else { "198.18.1.12" };
    lb.reapply(&config.replace(&format!("[[pool.backend]]\naddress = \"{gone}\"\n"), ""));
    lb.set_globals(|g| g.refresh = g.timeouts.established / 2);
    // Whatever the reload did to the caches, this packet leaves the slot filled.
    assert_eq!(lb.bed.run(&segment(tcp_flags::ACK)).unwrap().verdict, Some(Action::Tx));
    assert_eq!(lb.bed.datapath.maps_mut().conntrack.evict(vec![key]), 1);
    let result = sweep(&mut lb);
    let released =
        lb.balancer.release_retired(lb.bed.datapath.maps_mut(), &result.kept_by_backend).unwrap();
    assert_eq!(released, 1, "the removed backend's id");
    let out = lb.bed.run(&segment(tcp_flags::ACK)).unwrap();
    assert_eq!(out.verdict, Some(Action::Tx), "balanced afresh, not dropped");
    let kept: IpAddr = kept.parse().unwrap();
    assert_eq!(out.output[..6], backend_mac(kept), "to the backend left");
}

#[test]
fn a_removed_backends_id_is_kept_while_a_reply_entry_alone_names_it() {
    // A NAT flow to a backend removed from the pool loses its forward entry to the LRU; the
    // backend still sends, keeping the reply entry. The id must not be released (and handed
    // to another backend, whose counters the replies would then feed) until that goes too.
    let config = nat_config(false, "tcp");
    let Some(mut lb) = Lb::new("released_with_reply", &config, &[]) else { return };
    let port = 46_335;
    for flags in [tcp_flags::SYN, tcp_flags::ACK] {
        let frame = Packet::ipv4(CLIENT4, VIP4).tcp(port, 80).flags(flags).build();
        assert_eq!(lb.bed.run(&frame).unwrap().verdict, Some(Action::Tx));
    }
    let (backend, ..) = lb.flow_of(CLIENT4.into(), port, VIP4.into(), 80, IPPROTO_TCP);
    lb.reapply(
        &config.replace(&format!("[[pool.backend]]\naddress = \"{backend}\"\nport = 8080\n"), ""),
    );
    let entries = lb.bed.datapath.maps().conntrack.entries().unwrap();
    let (forward, reply): (Vec<_>, Vec<_>) =
        entries.into_iter().partition(|(_, f)| f.flags & lb_common::conntrack::FLOW_REPLY == 0);
    assert_eq!((forward.len(), reply.len()), (1, 1));
    let conntrack = &mut lb.bed.datapath.maps_mut().conntrack;
    assert_eq!(conntrack.evict(vec![forward[0].0]), 1);
    let result = sweep(&mut lb);
    let released =
        lb.balancer.release_retired(lb.bed.datapath.maps_mut(), &result.kept_by_backend).unwrap();
    assert_eq!(released, 0, "the reply entry still names the id: {result:?}");
    assert_eq!(lb.bed.datapath.maps_mut().conntrack.evict(vec![reply[0].0]), 1);
    let result = sweep(&mut lb);
    let released =
        lb.balancer.release_retired(lb.bed.datapath.maps_mut(), &result.kept_by_backend).unwrap();
    assert_eq!(released, 1, "nothing names it now");
}

#[test]
fn a_cached_flow_refreshes_its_entries_once_a_refresh_interval() {
    // The cache carries packets only within a refresh interval of the entry's last write:
    // a busy flow's next packet after that goes to the table, which refreshes the forward
    // entry and (NAT) the reply entry, so neither expires under a live flow.
    for nat in [false, true] {
        let name = if nat { "flow_cache_refresh_nat" } else { "flow_cache_refresh_dsr" };
        let config = if nat { nat_config(false, "tcp") } else { dsr_config(false, "tcp") };
        let Some(mut lb) = Lb::new(name, &config, &[]) else { return };
        lb.set_globals(|g| g.refresh = 1);
        let port = 46_340;
        let segment = |flags: u8| Packet::ipv4(CLIENT4, VIP4).tcp(port, 80).flags(flags).build();
        for flags in [tcp_flags::SYN, tcp_flags::ACK] {
            assert_eq!(lb.bed.run(&segment(flags)).unwrap().verdict, Some(Action::Tx));
        }
        let stamps = |lb: &Lb| -> Vec<u64> {
            let mut s: Vec<u64> = lb
                .bed
                .datapath
                .maps()
                .conntrack
                .entries()
                .unwrap()
                .iter()
                .map(|(_, f)| f.last_seen)
                .collect();
            s.sort_unstable();
            s
        };
        let before = stamps(&lb);
        assert_eq!(before.len(), if nat { 2 } else { 1 }, "{name}");
        std::thread::sleep(std::time::Duration::from_millis(50));
        assert_eq!(lb.bed.run(&segment(tcp_flags::ACK)).unwrap().verdict, Some(Action::Tx));
        let after = stamps(&lb);
        assert_eq!(after.len(), before.len(), "{name}: {before:?} -> {after:?}");
        for (b, a) in before.iter().zip(&after) {
            assert!(a > b, "{name}: every entry refreshed ({before:?} -> {after:?})");
        }
    }
}

#[test]
fn a_nat_flow_whose_cached_port_was_taken_has_its_port_checked() {
    // One NAT port. Client port `a`'s flow is cached; the LRU evicts its reply entry alone
    // and client port `b` takes the port. `a`'s forward entry is still live and no refresh
    // is due, but its slot's port generation moved: the table path checks the port as at a
    // refresh and drops `a`'s packet rather than send it into `b`'s connection.
    let Some(mut lb) = one_port_cached("flow_cache_port_moved") else { return };
    let (a, b) = (46_350, 46_351);
    open_cached(&mut lb, a);
    assert_eq!(lb.evict_reply_entries(), 1);
    assert_eq!(lb.bed.run(&syn4(b)).unwrap().verdict, Some(Action::Tx));
    // Every later packet too: the flow that lost its port loses its forward entry, and a
    // new flow finds no free port (not sent from `b`'s port until the next refresh).
    for _ in 0..3 {
        assert_no_port(&mut lb, &ack4(a));
    }
    let key = lb_common::FlowKey::new((CLIENT4, a).into(), (VIP4, 80).into(), IPPROTO_TCP);
    assert!(lb.bed.datapath.maps().conntrack.get(&key).is_none(), "a's forward entry went");
}

#[test]
fn a_nat_flow_whose_replies_refresh_it_stays_cached() {
    // The backend's replies refresh a NAT flow's entries before the client's packets do:
    // the client's next packet finds its slot past a refresh interval and the table entry
    // not due, and the slot is refilled without a port check (no flow took the port since
    // the last one). Seen by evicting the entry right after: the slot still carries.
    let Some(mut lb) = Lb::new("flow_cache_replies", &nat_config(false, "tcp"), &[]) else {
        return;
    };
    // A refresh interval of three seconds: the steps after the sleep must fit inside it, on
    // a machine that may stall the test for a second or more.
    let hz = lb.bed.datapath.ticks_per_second().unwrap();
    lb.set_globals(|g| g.refresh = 3 * hz);
    let port = 46_380;
    let ack = Packet::ipv4(CLIENT4, VIP4).tcp(port, 80).flags(tcp_flags::ACK).build();
    assert_eq!(lb.bed.run(&syn4(port)).unwrap().verdict, Some(Action::Tx));
    assert_eq!(lb.bed.run(&ack).unwrap().verdict, Some(Action::Tx));
    let (backend, bport, nat_port) = lb.flow_of(CLIENT4.into(), port, VIP4.into(), 80, IPPROTO_TCP);
    let IpAddr::V4(backend4) = backend else { unreachable!() };
    std::thread::sleep(std::time::Duration::from_millis(3100));
    let reply = Packet::ipv4(backend4, NAT4).tcp(bport, nat_port).flags(tcp_flags::ACK).build();
    assert_eq!(lb.bed.run(&reply).unwrap().verdict, Some(Action::Tx));
    assert_eq!(lb.bed.run(&ack).unwrap().verdict, Some(Action::Tx));
    let key = lb_common::FlowKey::new((CLIENT4, port).into(), (VIP4, 80).into(), IPPROTO_TCP);
    assert_eq!(lb.bed.datapath.maps_mut().conntrack.evict(vec![key]), 1);
    assert_eq!(lb.bed.run(&ack).unwrap().verdict, Some(Action::Tx));
    assert!(lb.bed.datapath.maps().conntrack.get(&key).is_none(), "carried by the slot");
}

/// A segment from the backend of the flow from client port `cport` (its address, port and
/// NAT port `flow`) to the NAT address, and that segment as it reaches the client.
fn reply_both_ways(
    client: IpAddr,
    vip: IpAddr,
    nat: IpAddr,
    cport: u16,
    flow: (IpAddr, u16, u16),
    proto: u8,
    flags: u8,
) -> (Vec<u8>, Vec<u8>) {
    let (backend, bport, nat_port) = flow;
    let segment = |p: Packet, sport: u16, dport: u16| {
        if proto == IPPROTO_TCP {
            p.tcp(sport, dport).flags(flags).seq_ack(7000, 1001).payload(b"reply").build()
        } else {
            p.udp(sport, dport).payload(b"reply").build()
        }
    };
    (
        segment(ip_packet(backend, nat).macs(backend_mac(backend), LB_MAC), bport, nat_port),
        segment(ip_packet(vip, client).macs(LB_MAC, CLIENT_MAC), 80, cport),
    )
}

#[test]
fn a_nat_reply_is_carried_by_the_flow_cache_until_the_table_must_see_it() {
    // A backend's replies are carried by the flow cache's copy of the flow's reply entry
    // (per CPU; the harness keeps the test on one), exactly as the table translates them.
    // Seen by the LRU evicting the reply entry behind the cache's back: the next reply still
    // reaches the client and is counted, and the table stays without the entry. A cut (the
    // epoch), a reset from the backend (the table's: it closes the flow, and a closed
    // flow's copy is not used) send replies to the table again.
    for (v6, proto) in [(false, IPPROTO_TCP), (true, IPPROTO_TCP), (false, IPPROTO_UDP)] {
        let tcp = proto == IPPROTO_TCP;
        let name = format!(
            "reply_cache_{}_{}",
            if v6 { "v6" } else { "v4" },
            if tcp { "tcp" } else { "udp" }
        );
        let (client, vip, nat) = addresses(v6);
        let Some(mut lb) = Lb::new(&name, &nat_config(v6, if tcp { "tcp" } else { "udp" }), &[])
        else {
            return;
        };
        lb.set_globals(|g| g.refresh = g.timeouts.established / 2);
        let open = |lb: &mut Lb, port: u16| {
            let frames = if tcp {
                vec![
                    ip_packet(client, vip).tcp(port, 80).flags(tcp_flags::SYN).build(),
                    ip_packet(client, vip).tcp(port, 80).flags(tcp_flags::ACK).build(),
                ]
            } else {
                vec![ip_packet(client, vip).udp(port, 80).payload(b"hello").build()]
            };
            for frame in frames {
                assert_eq!(lb.bed.run(&frame).unwrap().verdict, Some(Action::Tx));
            }
            lb.flow_of(client, port, vip, 80, proto)
        };
        let data = tcp_flags::ACK | tcp_flags::PSH;
        let sid = lb.balancer.service_id("s").unwrap();

        let port = 46_500;
        let flow = open(&mut lb, port);
        let (reply, back) = reply_both_ways(client, vip, nat, port, flow, proto, data);
        let out = lb.bed.run(&reply).unwrap();
        assert_eq!(out.verdict, Some(Action::Tx), "{name}");
        assert_eq!(hex(&out.output), hex(&back), "{name}: by the table");
        assert_eq!(lb.evict_reply_entries(), 1, "{name}");
        let before = lb.bed.datapath.maps().traffic.service(sid).unwrap();
        let out = lb.bed.run(&reply).unwrap();
        assert_eq!(out.verdict, Some(Action::Tx), "{name}");
        assert_eq!(hex(&out.output), hex(&back), "{name}: by the cache, as by the table");
        assert_eq!(lb.evict_reply_entries(), 0, "{name}: the table was not written");
        let after = lb.bed.datapath.maps().traffic.service(sid).unwrap();
        assert_eq!(after.reply_packets, before.reply_packets + 1, "{name}: counted");

        // The daemon's cuts bump the epoch: the table's again, which has no such flow.
        let conntrack = &mut lb.bed.datapath.maps_mut().conntrack;
        assert_eq!(conntrack.remove_flows_of_services(&[sid], None).unwrap(), 1, "{name}");
        assert_eq!(lb.bed.run(&reply).unwrap().verdict, Some(Action::Pass), "{name}: after a cut");

        if tcp {
            // A reset from the backend goes to the table, which closes the flow: the slot
            // follows (a closed flow's copy is not used) and, its entry evicted, the
            // backend's next segment finds nothing to translate it by.
            let port = 46_501;
            let flow = open(&mut lb, port);
            let (reply, _) = reply_both_ways(client, vip, nat, port, flow, proto, data);
            let (rst, _) = reply_both_ways(
                client,
                vip,
                nat,
                port,
                flow,
                proto,
                tcp_flags::RST | tcp_flags::ACK,
            );
            assert_eq!(lb.bed.run(&reply).unwrap().verdict, Some(Action::Tx), "{name}");
            assert_eq!(lb.bed.run(&rst).unwrap().verdict, Some(Action::Tx), "{name}: the reset");
            let key = lb_common::FlowKey::new((client, port).into(), (vip, 80).into(), proto);
            let entry = lb.bed.datapath.maps().conntrack.get(&key).unwrap();
            assert_eq!(entry.state, FlowState::Closed as u8, "{name}: closed by the table");
            assert_eq!(lb.evict_reply_entries(), 1, "{name}");
            assert_eq!(
                lb.bed.run(&reply).unwrap().verdict,
                Some(Action::Pass),
                "{name}: no copy of a closed flow"
            );
        }
    }
}

#[test]
fn a_nat_port_taken_over_sends_its_replies_to_the_flow_that_took_it() {
    // One NAT port, one backend: the backend's replies to port 20000 belong to whichever
    // flow holds it. `a`'s reply entry is cached, then evicted, and `b` takes the port: the
    // backend's next reply to the port must reach `b`, not `a` through the stale copy (the
    // port's generation moved).
    let Some(mut lb) = one_port_cached("reply_cache_port") else { return };
    let (client, vip, nat) = addresses(false);
    let (a, b) = (46_510, 46_511);
    open_cached(&mut lb, a);
    let data = tcp_flags::ACK | tcp_flags::PSH;
    let flow_a = lb.flow_of(client, a, vip, 80, IPPROTO_TCP);
    let (reply, back_to_a) = reply_both_ways(client, vip, nat, a, flow_a, IPPROTO_TCP, data);
    for _ in 0..2 {
        assert_eq!(hex(&lb.bed.run(&reply).unwrap().output), hex(&back_to_a));
    }
    assert_eq!(lb.evict_reply_entries(), 1);
    assert_eq!(lb.bed.run(&syn4(b)).unwrap().verdict, Some(Action::Tx));
    let flow_b = lb.flow_of(client, b, vip, 80, IPPROTO_TCP);
    assert_eq!(flow_b, flow_a, "the same backend and port");
    let (same_reply, back_to_b) = reply_both_ways(client, vip, nat, b, flow_b, IPPROTO_TCP, data);
    assert_eq!(same_reply, reply);
    let out = lb.bed.run(&reply).unwrap();
    assert_eq!(out.verdict, Some(Action::Tx));
    assert_eq!(hex(&out.output), hex(&back_to_b), "to the flow that holds the port now");
}

#[test]
fn a_port_taken_back_by_its_first_flow_stops_the_slot_of_the_flow_between() {
    // One NAT port. `a`'s reply entry is evicted and `c` takes the port, is cached, and then
    // loses both its entries to the LRU. `a`'s next packet finds its port moved, checks it
    // and takes it back (a new reply entry): `c`'s slot must not send `c`'s packets from the
    // port into `a`'s connection.
    let Some(mut lb) = one_port_cached("flow_cache_port_back") else { return };
    let (a, c) = (46_370, 46_371);
    assert_eq!(lb.bed.run(&syn4(a)).unwrap().verdict, Some(Action::Tx));
    assert_eq!(lb.bed.run(&ack4(a)).unwrap().verdict, Some(Action::Tx));
    assert_eq!(lb.evict_reply_entries(), 1);
    open_cached(&mut lb, c);
    let key =
        |port: u16| lb_common::FlowKey::new((CLIENT4, port).into(), (VIP4, 80).into(), IPPROTO_TCP);
    let conntrack = &mut lb.bed.datapath.maps_mut().conntrack;
    let c_entries: Vec<_> =
        conntrack.entries().unwrap().into_iter().map(|(k, _)| k).filter(|k| *k != key(a)).collect();
    assert_eq!(conntrack.evict(c_entries), 2, "c's two entries");
    assert_eq!(lb.bed.run(&ack4(a)).unwrap().verdict, Some(Action::Tx), "a takes its port back");
    assert_no_port(&mut lb, &ack4(c));
}

#[test]
fn a_tuple_reopened_on_its_own_port_leaves_other_flows_cached() {
    // One NAT port, two backends: a flow to each holds port 20000 (the reply keys differ by
    // backend), and port generations are per port number. `t` closes and its tuple reopens
    // over the dead flow, keeping the port and overwriting its reply entry: no flow lost
    // the port, so `a`'s copy (on the other backend, same port number) must stay in use.
    // Seen by evicting `a`'s forward entry: its next packet is still carried by the slot.
    let toml = nat_config(false, "tcp").replace("20000-20999", "20000-20000");
    let Some(mut lb) = Lb::new("flow_cache_port_kept", &toml, &[]) else { return };
    lb.set_globals(|g| g.refresh = g.timeouts.established / 2);
    let mut by_backend = std::collections::BTreeMap::<IpAddr, u16>::default();
    for port in 46_400..46_464 {
        if lb.bed.run(&syn4(port)).unwrap().verdict == Some(Action::Tx) {
            let (backend, _, nat_port) =
                lb.flow_of(CLIENT4.into(), port, VIP4.into(), 80, IPPROTO_TCP);
            assert_eq!(nat_port, 20_000);
            assert!(by_backend.insert(backend, port).is_none(), "one flow per backend");
        }
        if by_backend.len() == 2 {
            break;
        }
    }
    let ports: Vec<u16> = by_backend.values().copied().collect();
    let [a, t] = ports[..] else { panic!("no flow to each backend: {by_backend:?}") };
    for _ in 0..2 {
        assert_eq!(lb.bed.run(&ack4(a)).unwrap().verdict, Some(Action::Tx));
    }
    let rst = Packet::ipv4(CLIENT4, VIP4).tcp(t, 80).flags(tcp_flags::RST).build();
    assert_eq!(lb.bed.run(&rst).unwrap().verdict, Some(Action::Tx));
    lb.set_globals(|g| g.timeouts.closed = 0);
    std::thread::sleep(std::time::Duration::from_millis(30));
    assert_eq!(lb.bed.run(&syn4(t)).unwrap().verdict, Some(Action::Tx));
    let key =
        |port: u16| lb_common::FlowKey::new((CLIENT4, port).into(), (VIP4, 80).into(), IPPROTO_TCP);
    let reopened = lb.bed.datapath.maps().conntrack.get(&key(t)).unwrap();
    assert_eq!(reopened.state, FlowState::SynSeen as u8, "t reopened");
    assert_eq!(raw_port(reopened.nat_port), 20_000, "on its own port");

    assert_eq!(lb.bed.datapath.maps_mut().conntrack.evict(vec![key(a)]), 1);
    assert_eq!(lb.bed.run(&ack4(a)).unwrap().verdict, Some(Action::Tx));
    assert!(lb.bed.datapath.maps().conntrack.get(&key(a)).is_none(), "carried by a's slot");
}

#[test]
fn ip_options_on_a_live_flow_are_dropped_and_the_flow_goes_on() {
    // Packets with IPv4 options are not balanced (policy, see architecture.md): also not
    // those of a live flow, whether the table or the flow cache carries it; the flow itself
    // is untouched and its next packet goes to its backend.
    for nat in [false, true] {
        let name = if nat { "ip_options_live_nat" } else { "ip_options_live_dsr" };
        let config = if nat { nat_config(false, "tcp") } else { dsr_config(false, "tcp") };
        let Some(mut lb) = Lb::new(name, &config, &[]) else { return };
        for (cached, port) in [(false, 46_390), (true, 46_391)] {
            let what = format!("{name}, {}", if cached { "cached" } else { "by the table" });
            if cached {
                lb.set_globals(|g| g.refresh = g.timeouts.established / 2);
                open_cached(&mut lb, port);
            } else {
                lb.set_globals(|g| g.refresh = 0);
                for frame in [syn4(port), ack4(port)] {
                    assert_eq!(lb.bed.run(&frame).unwrap().verdict, Some(Action::Tx), "{what}");
                }
            }
            let (backend, ..) = lb.flow_of(CLIENT4.into(), port, VIP4.into(), 80, IPPROTO_TCP);
            let entries = lb.bed.datapath.maps().conntrack.entries().unwrap().len();
            let key =
                lb_common::FlowKey::new((CLIENT4, port).into(), (VIP4, 80).into(), IPPROTO_TCP);
            let state = |lb: &Lb| lb.bed.datapath.maps().conntrack.get(&key).unwrap().state;
            assert_eq!(state(&lb), FlowState::Established as u8, "{what}");
            let with_options = |flags: u8| {
                Packet::ipv4(CLIENT4, VIP4)
                    .ipv4_options(&[1, 1, 1, 1])
                    .tcp(port, 80)
                    .flags(flags)
                    .build()
            };
            let before = lb.bed.datapath.stats().read().unwrap();
            // A reset too: dropped, it must not close the flow it never reached.
            for frame in
                [with_options(tcp_flags::ACK), with_options(tcp_flags::RST | tcp_flags::ACK)]
            {
                let out = lb.bed.run(&frame).unwrap();
                assert_eq!(out.verdict, Some(Action::Drop), "{what}");
                assert_eq!(out.output, frame, "{what}: the frame is left as it came");
            }
            let moved = state(&lb);
            assert_eq!(moved, FlowState::Established as u8, "{what}: the state did not move");
            let delta = lb.bed.datapath.stats().read().unwrap().since(&before);
            assert_eq!(delta.reason(Reason::IpOptions).packets, 2, "{what}: {}", delta.summary());
            let out = lb.bed.run(&ack4(port)).unwrap();
            assert_eq!(out.verdict, Some(Action::Tx), "{what}: the flow goes on");
            assert_eq!(out.output[..6], backend_mac(backend), "{what}: to its backend");
            let after = lb.bed.datapath.maps().conntrack.entries().unwrap().len();
            assert_eq!(after, entries, "{what}: no flow opened or lost");
        }
    }
}

#[test]
fn ip_options_on_a_nat_reply_are_dropped_and_the_flow_goes_on() {
    // The backend's side of a NAT flow likewise: a reply with IPv4 options or an IPv6
    // extension header (a routing header would put another address in the checksum's
    // pseudo-header than the one translated) is dropped, whether the table or the flow
    // cache carries it, a reset with options does not close the flow, and the next reply
    // is translated.
    for v6 in [false, true] {
        let name = if v6 { "reply_options_v6" } else { "reply_options_v4" };
        let (client, vip, nat) = addresses(v6);
        let Some(mut lb) = Lb::new(name, &nat_config(v6, "tcp"), &[]) else { return };
        for (cached, port) in [(false, 46_392), (true, 46_393)] {
            let what = format!("{name}, {}", if cached { "cached" } else { "by the table" });
            lb.set_globals(|g| g.refresh = if cached { g.timeouts.established / 2 } else { 0 });
            for flags in [tcp_flags::SYN, tcp_flags::ACK] {
                let frame = ip_packet(client, vip).tcp(port, 80).flags(flags).build();
                assert_eq!(lb.bed.run(&frame).unwrap().verdict, Some(Action::Tx), "{what}");
            }
            let flow = lb.flow_of(client, port, vip, 80, IPPROTO_TCP);
            let (backend, bport, nat_port) = flow;
            let data = tcp_flags::ACK | tcp_flags::PSH;
            let (reply, back) = reply_both_ways(client, vip, nat, port, flow, IPPROTO_TCP, data);
            assert_eq!(hex(&lb.bed.run(&reply).unwrap().output), hex(&back), "{what}");
            let key = lb_common::FlowKey::new((client, port).into(), (vip, 80).into(), IPPROTO_TCP);
            let state = |lb: &Lb| lb.bed.datapath.maps().conntrack.get(&key).unwrap().state;
            let with_options = |flags: u8| {
                let p = ip_packet(backend, nat).macs(backend_mac(backend), LB_MAC);
                let p = if v6 {
                    p.ext_header(ExtHeader::Routing { len: 2 })
                } else {
                    p.ipv4_options(&[1, 1, 1, 1])
                };
                p.tcp(bport, nat_port).flags(flags).seq_ack(7000, 1001).build()
            };
            let before = lb.bed.datapath.stats().read().unwrap();
            // Cached: the reply entry evicted, so only the slot could carry the segment (a
            // reset always goes to the table: the other variant's). By the table: the epoch
            // moved before each frame, whatever the clock did since the last packet.
            let frames = if cached {
                assert!(lb.evict_reply_entries() >= 1, "{what}");
                vec![with_options(data)]
            } else {
                vec![with_options(data), with_options(tcp_flags::RST | tcp_flags::ACK)]
            };
            for frame in &frames {
                if !cached {
                    lb.bed.datapath.maps_mut().conntrack.invalidate_cache().unwrap();
                }
                let out = lb.bed.run(frame).unwrap();
                assert_eq!(out.verdict, Some(Action::Drop), "{what}");
                assert_eq!(&out.output, frame, "{what}: the frame is left as it came");
            }
            assert_eq!(state(&lb), FlowState::Established as u8, "{what}: the state did not move");
            let delta = lb.bed.datapath.stats().read().unwrap().since(&before);
            let dropped = delta.reason(Reason::IpOptions).packets;
            assert_eq!(dropped, frames.len() as u64, "{what}: {}", delta.summary());
            assert_eq!(hex(&lb.bed.run(&reply).unwrap().output), hex(&back), "{what}: goes on");
        }
    }
}

#[test]
fn a_rewritten_service_is_seen_by_the_next_new_flow() {
    // The service cache holds a NAT service's copy; the daemon switches SYN cookies on (a
    // rewrite of the service entry): the next SYN is answered with a cookie, not balanced.
    let Some(mut lb) = Lb::new("service_cache_upsert", &nat_config(false, "tcp"), &[]) else {
        return;
    };
    assert_eq!(lb.bed.run(&syn4(46_360)).unwrap().verdict, Some(Action::Tx));
    let services = &mut lb.bed.datapath.maps_mut().services;
    let (key, mut service) = services.entries().unwrap()[0];
    service.flags |= lb_common::service::SERVICE_SYN_COOKIES;
    services.upsert(&key, &service).unwrap();
    let out = lb.bed.run(&syn4(46_361)).unwrap();
    assert_eq!(out.verdict, Some(Action::Tx));
    assert_eq!(out.output[..6], CLIENT_MAC, "a cookie SYN-ACK back to the client");
    assert!(lb.bed.datapath.maps().conntrack.entries().unwrap().len() == 2, "no new flow");
}

#[test]
fn removing_a_service_cuts_its_flows() {
    // A live flow is forwarded by its connection entry alone, without the service lookup:
    // removing the service must take its flows (both directions) with it.
    let Some(mut lb) = Lb::new("service_removed", &nat_config(false, "tcp"), &[]) else { return };
    let syn = client_packet(CLIENT4.into(), VIP4.into(), IPPROTO_TCP, 46_001, 80).build();
    let ack = client_packet(CLIENT4.into(), VIP4.into(), IPPROTO_TCP, 46_001, 80)
        .flags(tcp_flags::ACK)
        .build();
    assert_eq!(lb.bed.run(&syn).unwrap().verdict, Some(Action::Tx));
    assert_eq!(lb.bed.run(&ack).unwrap().verdict, Some(Action::Tx));
    let (backend, bport, nat_port) =
        lb.flow_of(CLIENT4.into(), 46_001, VIP4.into(), 80, IPPROTO_TCP);
    let IpAddr::V4(backend4) = backend else { unreachable!() };
    let reply = Packet::ipv4(backend4, NAT4).tcp(bport, nat_port).flags(tcp_flags::ACK).build();
    assert_eq!(lb.bed.run(&reply).unwrap().verdict, Some(Action::Tx));

    let pool_only = nat_config(false, "tcp");
    let pool_only = &pool_only[..pool_only.find("[[service]]").unwrap()];
    let config = Config::parse(&format!("{INTERFACE}{pool_only}"), "fixture").unwrap();
    let mut resolver = StaticResolver(HashMap::new());
    let summary = lb.balancer.apply(&config, lb.bed.datapath.maps_mut(), &mut resolver).unwrap();
    assert_eq!(summary.removed_service_ids.len(), 1);
    let conntrack = &mut lb.bed.datapath.maps_mut().conntrack;
    assert_eq!(conntrack.remove_flows_of_services(&summary.removed_service_ids, None).unwrap(), 2);
    assert!(conntrack.entries().unwrap().is_empty());
    for frame in [&ack, &reply] {
        assert_eq!(lb.bed.run(frame).unwrap().verdict, Some(Action::Pass));
    }
}

#[test]
fn flows_using_an_address_taken_away_are_cut_and_others_go_on() {
    // Service `s` moves its NAT source: its flow's replies would come back to the old
    // address, no longer a NAT source, and the client would hang until the flow idled out.
    // The change cuts that flow (both entries); `t`, unchanged on the same address, keeps
    // its flow. Then `t` moves its port: its flow goes on by its entries.
    let t = "[[service]]\nname = \"t\"\naddress = \"198.18.100.1\"\nprotocol = \"tcp\"\nport = 81\npool = \"p\"\nmode = \"nat\"\nnat_source = \"198.18.1.3\"\nnat_ports = \"21000-21999\"\n";
    let before = format!("{}{t}", nat_config(false, "tcp"));
    let Some(mut lb) = Lb::new("addresses_gone", &before, &[]) else { return };
    let open = |lb: &mut Lb, vport: u16| {
        for flags in [tcp_flags::SYN, tcp_flags::ACK] {
            let frame = Packet::ipv4(CLIENT4, VIP4).tcp(46_100, vport).flags(flags).build();
            assert_eq!(lb.bed.run(&frame).unwrap().verdict, Some(Action::Tx));
        }
    };
    open(&mut lb, 80);
    open(&mut lb, 81);
    assert_eq!(lb.bed.datapath.maps().conntrack.entries().unwrap().len(), 4);
    let apply = |lb: &mut Lb, toml: &str| {
        let config = Config::parse(&format!("{INTERFACE}{toml}"), "fixture").unwrap();
        let mut resolver = StaticResolver(HashMap::new());
        let summary =
            lb.balancer.apply(&config, lb.bed.datapath.maps_mut(), &mut resolver).unwrap();
        let (vips, nats) = lb.balancer.addresses();
        let clock = lb.bed.datapath.flow_clock().unwrap();
        let conntrack = &mut lb.bed.datapath.maps_mut().conntrack;
        (summary.addresses_gone, conntrack.remove_orphans(&vips, &nats, Some(&clock)).unwrap())
    };
    let moved = before.replacen("nat_source = \"198.18.1.1\"", "nat_source = \"198.18.1.2\"", 1);
    assert_ne!(moved, before);
    assert_eq!(apply(&mut lb, &moved), (true, 2), "s's two entries");
    let left = lb.bed.datapath.maps().conntrack.entries().unwrap();
    assert_eq!(left.len(), 2, "{left:?}");
    let s = lb.balancer.service_id("s").unwrap();
    assert!(left.iter().all(|(_, f)| f.service_id != s && f.vip_port == 81u16.to_be()));
    // No address gone: nothing to cut, and the walk finds nothing either.
    let port_moved = moved.replace("port = 81", "port = 82");
    assert_eq!(apply(&mut lb, &port_moved), (false, 0));
    assert_eq!(lb.bed.datapath.maps().conntrack.entries().unwrap().len(), 2);
    // The flow to port 81 goes on by its entries.
    let ack = Packet::ipv4(CLIENT4, VIP4).tcp(46_100, 81).flags(tcp_flags::ACK).build();
    assert_eq!(lb.bed.run(&ack).unwrap().verdict, Some(Action::Tx));
}

#[test]
fn the_daemon_picks_the_backend_the_data_path_picks() {
    // TLS passthrough balances in the daemon with `Balancer::pool_table`: for every flow it
    // must choose the backend the XDP program chooses for the same 5-tuple, with the default
    // table size, with a service's own, and with a hash seed (which load balancers behind
    // one ECMP group share to agree on flows); the seed must change some choices.
    let sized =
        nat_config(false, "tcp").replace("mode = \"nat\"", "mode = \"nat\"\ntable_size = 1009");
    assert_ne!(sized, nat_config(false, "tcp"));
    let seeded = format!("[daemon]\nhash_seed = 2654435761\n{}", nat_config(false, "tcp"));
    let mut choices = Vec::new();
    for (config, size) in [(nat_config(false, "tcp"), None), (sized, Some(1009)), (seeded, None)] {
        let Some(mut lb) = Lb::new("pool_table", &config, &[]) else { return };
        let table = lb.balancer.pool_table("p", &lb.config, size);
        let mut chosen = std::collections::BTreeSet::new();
        let mut each = Vec::new();
        for port in 40_000..40_064 {
            let syn = client_packet(CLIENT4.into(), VIP4.into(), IPPROTO_TCP, port, 80).build();
            assert_eq!(lb.bed.run(&syn).unwrap().verdict, Some(Action::Tx));
            let (backend, bport, _) =
                lb.flow_of(CLIENT4.into(), port, VIP4.into(), 80, IPPROTO_TCP);
            let (_, daemon) = table
                .select((IpAddr::from(CLIENT4), port).into(), (IpAddr::from(VIP4), 80).into())
                .unwrap();
            assert_eq!(daemon, (backend, bport).into(), "table size {size:?}, client port {port}");
            chosen.insert(backend);
            each.push(backend);
        }
        assert_eq!(chosen.len(), 2, "64 flows should reach both backends");
        choices.push(each);
    }
    assert_ne!(choices[0], choices[2], "the hash seed changed no flow's backend");
}

#[test]
fn policies_for_traffic_the_balancer_does_not_forward() {
    let empty_pool = "[[pool]]\nname = \"none\"\n[[service]]\nname = \"empty\"\naddress = \"198.18.100.2\"\nprotocol = \"tcp\"\nport = 80\npool = \"none\"\nmode = \"dsr-l2\"\n";
    let unresolved = "[[pool]]\nname = \"far\"\n[[pool.backend]]\naddress = \"198.18.9.9\"\n[[service]]\nname = \"far\"\naddress = \"198.18.100.3\"\nprotocol = \"tcp\"\nport = 80\npool = \"far\"\nmode = \"dsr-l2\"\n";
    let routed = "[[pool]]\nname = \"routed\"\n[[pool.backend]]\naddress = \"198.18.9.10\"\n[[service]]\nname = \"routed\"\naddress = \"198.18.100.4\"\nprotocol = \"tcp\"\nport = 80\npool = \"routed\"\nmode = \"dsr-l2\"\n";
    let six = "[[pool]]\nname = \"six\"\n[[pool.backend]]\naddress = \"fd00:1::11\"\n[[service]]\nname = \"six\"\naddress = \"fd00:100::1\"\nprotocol = \"tcp\"\nport = 80\npool = \"six\"\nmode = \"dsr-l2\"\n";
    let toml = format!("{}{empty_pool}{unresolved}{routed}{six}", dsr_config(false, "tcp"));
    let Some(mut lb) = Lb::new("policies", &toml, &[]) else { return };
    // The routed backend's next hop is a router: DSR cannot reach it (only the MAC address
    // changes, so the backend must be on the link).
    let routed_backend: IpAddr = "198.18.9.10".parse().unwrap();
    lb.bed
        .datapath
        .maps_mut()
        .backends
        .set_next_hop(
            lb.balancer.backend_id(&identity("routed", "198.18.9.10")).unwrap(),
            &NextHop {
                ifindex: INGRESS_IFINDEX,
                flags: 0,
                dmac: backend_mac(routed_backend),
                smac: EGRESS_MAC,
            },
        )
        .unwrap();
    // The far backend has no next hop at all.
    lb.bed
        .datapath
        .maps_mut()
        .backends
        .set_next_hop(
            lb.balancer.backend_id(&identity("far", "198.18.9.9")).unwrap(),
            &NextHop::default(),
        )
        .unwrap();
    let vip2 = Ipv4Addr::new(198, 18, 100, 2);
    let vip3 = Ipv4Addr::new(198, 18, 100, 3);
    let mut cases = vec![
        Case::pass(
            "TCP to the service address on another port",
            Packet::ipv4(CLIENT4, VIP4).tcp(1, 81).build(),
            Reason::NotService,
        ),
        Case::pass(
            "UDP to a TCP service's port",
            Packet::ipv4(CLIENT4, VIP4).udp(1, 80).build(),
            Reason::NotService,
        ),
        Case::pass(
            "ICMP echo to the service address",
            Packet::ipv4(CLIENT4, VIP4).echo_request(1, 1).build(),
            Reason::NotService,
        ),
        Case::pass(
            "truncated TCP header to the service",
            {
                let mut f = Packet::ipv4(CLIENT4, VIP4).tcp(1, 80).build();
                f.truncate(14 + 20 + 10);
                f[16..18].copy_from_slice(&30u16.to_be_bytes());
                f
            },
            Reason::Truncated,
        ),
    ];
    for (description, input, reason) in [
        (
            "later IPv4 fragment to the service address",
            Packet::ipv4(CLIENT4, VIP4)
                .ipv4_fragment(100, false)
                .proto(IPPROTO_TCP)
                .payload(&[0; 16])
                .build(),
            Reason::Fragment,
        ),
        (
            "first IPv4 fragment to the service",
            Packet::ipv4(CLIENT4, VIP4).ipv4_fragment(0, true).tcp(1, 80).payload(&[0; 16]).build(),
            Reason::Fragment,
        ),
        (
            "IPv4 options on a packet to the service",
            Packet::ipv4(CLIENT4, VIP4).ipv4_options(&[1, 1, 1, 1]).tcp(1, 80).build(),
            Reason::IpOptions,
        ),
        (
            "a service whose pool is empty",
            Packet::ipv4(CLIENT4, vip2).tcp(1, 80).flags(tcp_flags::SYN).build(),
            Reason::NoBackend,
        ),
        (
            "a backend without a resolved next hop",
            Packet::ipv4(CLIENT4, vip3).tcp(1, 80).flags(tcp_flags::SYN).build(),
            Reason::NoNextHop,
        ),
        (
            "a DSR backend behind a router",
            Packet::ipv4(CLIENT4, Ipv4Addr::new(198, 18, 100, 4))
                .tcp(1, 80)
                .flags(tcp_flags::SYN)
                .build(),
            Reason::DsrBackendNotOnLink,
        ),
        (
            "IPv6 extension headers on a packet to the service",
            Packet::ipv6(CLIENT6, VIP6)
                .ext_header(ExtHeader::HopByHop { len: 0 })
                .tcp(1, 80)
                .flags(tcp_flags::SYN)
                .build(),
            Reason::IpOptions,
        ),
        // Transport headers the parser cannot read: not passed to the host, which might
        // reassemble or follow them and answer for the service.
        (
            "first IPv4 fragment to the service holding 8 bytes of its TCP header",
            Packet::ipv4(CLIENT4, VIP4)
                .ipv4_fragment(0, true)
                .proto(IPPROTO_TCP)
                .payload(&[0x9c, 0x40, 0, 80, 0, 0, 0, 1])
                .build(),
            Reason::Fragment,
        ),
        (
            "IPv6 SYN to the service behind seven destination options",
            (0..7)
                .fold(Packet::ipv6(CLIENT6, VIP6), |p, _| {
                    p.ext_header(ExtHeader::DestOpts { len: 0 })
                })
                .tcp(1, 80)
                .flags(tcp_flags::SYN)
                .build(),
            Reason::IpOptions,
        ),
        (
            "IPv4 options and a TCP header cut short, to the service",
            {
                let mut f =
                    Packet::ipv4(CLIENT4, VIP4).ipv4_options(&[1, 1, 1, 1]).tcp(1, 80).build();
                f[14 + 24 + 12] = 0x40;
                f
            },
            Reason::IpOptions,
        ),
    ] {
        cases.push(Case {
            description: description.into(),
            input,
            verdict: Action::Drop,
            reason: Some(reason),
            output: Output::Unchanged,
        });
    }
    lb.bed.check_all(&cases).unwrap();
    assert!(
        lb.bed.datapath.maps().conntrack.entries().unwrap().iter().all(|(k, _)| words_addr(
            k.dst, 4
        ) != IpAddr::from(
            vip2
        ))
    );
}

#[test]
fn every_program_passes_the_verifier() {
    // Some programs' refusal would otherwise go unseen here: `cargo xtask bench` runs the
    // data path inside wrappers whose own stack adds to its deepest call chain (512 bytes
    // in all), and the bench is not part of the test run; the daemon survives a refused
    // relay program by splicing. The object is built with misaligned access allowed, so
    // LLVM may merge stack stores misaligned, which the verifier refuses (it did in the
    // relay program, whose keys are now stored field by field).
    if !require_privileges("every_program_passes_the_verifier") {
        return;
    }
    let mut bed = TestBed::load().unwrap();
    let names = bed.datapath.program_names();
    assert!(names.len() >= 12, "programs in the object: {names:?}");
    for name in names {
        let name: &'static str = Box::leak(name.into_boxed_str());
        if let Err(error) = bed.datapath.load_unattached(name) {
            panic!("{name}: {error}");
        }
    }
}

#[test]
fn all_ports_services_and_source_affinity() {
    let toml = "[[pool]]\nname = \"p\"\n[[pool.backend]]\naddress = \"198.18.1.11\"\n[[pool.backend]]\naddress = \"198.18.1.12\"\n[[pool.backend]]\naddress = \"198.18.1.13\"\n\
                [[service]]\nname = \"any\"\naddress = \"198.18.100.1\"\nprotocol = \"udp\"\npool = \"p\"\nmode = \"dsr-l2\"\nhash = \"source\"\n";
    let Some(mut lb) = Lb::new("all_ports", toml, &[]) else { return };
    // Twelve clients, five flows each (other ports, both ends): one backend per client, and
    // not one backend for all (a hash of nothing would pass the first half).
    let mut all = std::collections::BTreeSet::new();
    for host in 10u8..22 {
        let client = Ipv4Addr::new(198, 18, 0, host);
        let mut chosen = std::collections::BTreeSet::new();
        for (i, dport) in [53u16, 123, 5353, 9999, 65_000].into_iter().enumerate() {
            let cport = 50_000 + u16::try_from(i).unwrap();
            let input = Packet::ipv4(client, VIP4).udp(cport, dport).payload(b"x").build();
            let result = lb.bed.run(&input).unwrap();
            assert_eq!(result.verdict, Some(Action::Tx), "{client} port {dport}");
            let (backend, bport, _) =
                lb.flow_of(client.into(), cport, VIP4.into(), dport, IPPROTO_UDP);
            assert_eq!(bport, dport, "all-ports DSR keeps the port");
            chosen.insert(backend);
        }
        assert_eq!(chosen.len(), 1, "source affinity sends {client} to one backend: {chosen:?}");
        all.extend(chosen);
    }
    assert!(all.len() >= 2, "twelve clients all sent to {all:?}");
}

#[test]
fn udp_without_checksum_keeps_it_zero_through_nat() {
    // IPv4 UDP may carry no checksum; IPv6 UDP only in tunnels that allow it, but the
    // balancer leaves that judgement to the receiver, as Linux's NAT does: zero stays zero,
    // both ways.
    for v6 in [false, true] {
        let family = if v6 { "v6" } else { "v4" };
        let (client, vip, nat) = addresses(v6);
        let name = format!("udp_zero_checksum_{family}");
        let Some(mut lb) = Lb::new(&name, &nat_config(v6, "udp"), &[]) else { return };
        let check_at = 14 + if v6 { 40 } else { 20 } + 6;
        let zeroed = |mut frame: Vec<u8>| {
            frame[check_at] = 0;
            frame[check_at + 1] = 0;
            frame
        };
        let input = zeroed(client_packet(client, vip, IPPROTO_UDP, 47_000, 80).build());
        let out = lb.bed.run(&input).unwrap();
        assert_eq!(out.verdict, Some(Action::Tx), "{name}");
        let (backend, bport, nat_port) = lb.flow_of(client, 47_000, vip, 80, IPPROTO_UDP);
        let macs = (EGRESS_MAC, backend_mac(backend));
        let expected = zeroed(rewritten(nat, backend, nat_port, bport, IPPROTO_UDP, macs));
        assert_eq!(hex(&out.output), hex(&expected), "{name}: to the backend");
        let reply = zeroed(rewritten(
            backend,
            nat,
            bport,
            nat_port,
            IPPROTO_UDP,
            (backend_mac(backend), LB_MAC),
        ));
        let out = lb.bed.run(&reply).unwrap();
        assert_eq!(out.verdict, Some(Action::Tx), "{name}: reply");
        let expected =
            zeroed(rewritten(vip, client, 80, 47_000, IPPROTO_UDP, (LB_MAC, CLIENT_MAC)));
        assert_eq!(hex(&out.output), hex(&expected), "{name}: back to the client");
    }
}

/// Builds an ICMP or ICMPv6 error from `src` to `dst` quoting `quoted` (an IP packet).
fn icmp_error(
    src: IpAddr,
    dst: IpAddr,
    kind: u8,
    code: u8,
    rest: [u8; 4],
    quoted: &[u8],
    macs: ([u8; 6], [u8; 6]),
) -> Vec<u8> {
    let base = match (src, dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => Packet::ipv4(s, d),
        (IpAddr::V6(s), IpAddr::V6(d)) => Packet::ipv6(s, d),
        _ => unreachable!(),
    };
    base.macs(macs.0, macs.1).icmp(kind, code, rest).payload(quoted).build()
}

#[test]
fn icmp_errors_about_nat_flows_are_translated_back_to_the_client() {
    for v6 in [false, true] {
        let family = if v6 { "v6" } else { "v4" };
        let (client, vip, nat) = addresses(v6);
        let router: IpAddr =
            if v6 { "fd00:1::fe".parse().unwrap() } else { "198.18.1.254".parse().unwrap() };
        let toml = format!(
            "{}{}",
            nat_config(v6, "udp"),
            nat_config(v6, "tcp")
                .split("[[service]]")
                .nth(1)
                .map(|s| format!("[[service]]{}", s.replace("name = \"s\"", "name = \"t\"")))
                .unwrap()
        );
        let Some(mut lb) = Lb::new(&format!("icmp_errors_{family}"), &toml, &[]) else { return };
        let (unreach, port_unreach, too_big, too_big_code) = icmp_kinds(v6);
        let mtu = [0, 0, 0x05, 0x00];
        let mut cases = Vec::new();
        for (proto, cport) in [(IPPROTO_UDP, 48_000u16), (IPPROTO_TCP, 48_001)] {
            let original = client_packet(client, vip, proto, cport, 80).build();
            lb.bed.run(&original).unwrap();
            let (backend, bport, nat_port) = lb.flow_of(client, cport, vip, 80, proto);
            let sent =
                rewritten(nat, backend, nat_port, bport, proto, (EGRESS_MAC, backend_mac(backend)));
            let ip_len = if v6 { 40 } else { 20 };
            for (who, from, kind, code, rest) in [
                ("backend: port unreachable", backend, unreach, port_unreach, [0; 4]),
                ("router: too big", router, too_big, too_big_code, mtu),
            ] {
                // The whole packet quoted, then only the IP header and eight bytes (where a TCP
                // checksum is not quoted and so not rewritten).
                for quote_len in [sent.len() - 14, ip_len + 8] {
                    let input = icmp_error(
                        from,
                        nat,
                        kind,
                        code,
                        rest,
                        &sent[14..14 + quote_len],
                        (backend_mac(backend), LB_MAC),
                    );
                    let out_from = if from == backend { vip } else { router };
                    let expected = icmp_error(
                        out_from,
                        client,
                        kind,
                        code,
                        rest,
                        &original[14..14 + quote_len],
                        (LB_MAC, CLIENT_MAC),
                    );
                    cases.push(Case {
                        description: format!(
                            "{family} {} {who}, {quote_len} bytes quoted",
                            if proto == IPPROTO_TCP { "TCP" } else { "UDP" }
                        ),
                        input,
                        verdict: Action::Tx,
                        reason: None,
                        output: Output::Frame(expected),
                    });
                }
            }
            if proto == IPPROTO_TCP {
                // Frame padding behind an error quoting eight bytes, where the quoted TCP
                // checksum would be: not part of the message, so left as it came.
                let pad = [0xa5u8; 12];
                let quote = |frame: &[u8]| frame[14..14 + ip_len + 8].to_vec();
                let mut input = icmp_error(
                    backend,
                    nat,
                    unreach,
                    port_unreach,
                    [0; 4],
                    &quote(&sent),
                    (backend_mac(backend), LB_MAC),
                );
                input.extend_from_slice(&pad);
                let mut expected = icmp_error(
                    vip,
                    client,
                    unreach,
                    port_unreach,
                    [0; 4],
                    &quote(&original),
                    (LB_MAC, CLIENT_MAC),
                );
                expected.extend_from_slice(&pad);
                cases.push(Case {
                    description: format!("{family} TCP error with frame padding behind it"),
                    input,
                    verdict: Action::Tx,
                    reason: None,
                    output: Output::Frame(expected),
                });
                // ICMPv6's number on IPv4 (or ICMP's on IPv6) is no error message of either.
                // Type 3 is an error under either number.
                let other = if v6 { IPPROTO_ICMP } else { IPPROTO_ICMPV6 };
                let mut message = vec![3, 3, 0, 0, 0, 0, 0, 0];
                message.extend_from_slice(&quote(&sent));
                let base = match (backend, nat) {
                    (IpAddr::V4(s), IpAddr::V4(d)) => Packet::ipv4(s, d),
                    (IpAddr::V6(s), IpAddr::V6(d)) => Packet::ipv6(s, d),
                    _ => unreachable!(),
                };
                cases.push(Case::pass(
                    format!("{family} error under the other family's ICMP protocol number"),
                    base.macs(backend_mac(backend), LB_MAC).proto(other).payload(&message).build(),
                    Reason::NotService,
                ));
            }
            // An error quoting a flow the balancer does not know goes to the kernel untouched.
            let unknown = rewritten(
                nat,
                backend,
                nat_port.wrapping_add(1),
                bport,
                proto,
                (EGRESS_MAC, backend_mac(backend)),
            );
            cases.push(Case::pass(
                format!("{family} error about an unknown flow"),
                icmp_error(
                    backend,
                    nat,
                    unreach,
                    port_unreach,
                    [0; 4],
                    &unknown[14..],
                    (backend_mac(backend), LB_MAC),
                ),
                Reason::NotService,
            ));
        }
        lb.bed.check_all(&cases).unwrap();
    }
}

#[test]
fn icmp_errors_to_a_service_reach_the_flows_backend() {
    // A router on the client's path too small for a backend's answer (or the client itself)
    // sends its error to the service address, quoting the answer as the client's side saw
    // it: DSR flows' errors go to the backend as they are, NAT flows' translated into an
    // error about the backend's own packet (backend to NAT address and port).
    for v6 in [false, true] {
        let family = if v6 { "v6" } else { "v4" };
        let (client, vip, nat) = addresses(v6);
        let router = client_side_router(v6);
        let (unreach, port_unreach, too_big, too_big_code) = icmp_kinds(v6);
        let mtu = [0, 0, 0x05, 0x00];
        let ip_len = if v6 { 40 } else { 20 };
        // The router's "too big" to the service address, quoting `quoted` (from the IP header).
        let too_big_to_service = |quoted: &[u8]| {
            icmp_error(router, vip, too_big, too_big_code, mtu, quoted, (CLIENT_MAC, LB_MAC))
        };
        for mode in ["nat", "dsr"] {
            let mut toml = String::new();
            for proto in ["udp", "tcp"] {
                let config =
                    if mode == "nat" { nat_config(v6, proto) } else { dsr_config(v6, proto) };
                let service = config.split("[[service]]").nth(1).unwrap();
                if toml.is_empty() {
                    toml = config.split("[[service]]").next().unwrap().to_string();
                }
                toml.push_str("[[service]]");
                toml.push_str(&service.replace("name = \"s\"", &format!("name = \"{proto}\"")));
            }
            let name = format!("icmp_to_service_{mode}_{family}");
            let Some(mut lb) = Lb::new(&name, &toml, &[]) else { return };
            let mut cases = Vec::new();
            for (proto, cport) in [(IPPROTO_UDP, 48_100u16), (IPPROTO_TCP, 48_101)] {
                lb.bed.run(&client_packet(client, vip, proto, cport, 80).build()).unwrap();
                let (backend, bport, nat_port) = lb.flow_of(client, cport, vip, 80, proto);
                // The backend's answer as the client received it, and as the backend sent it.
                let answer = rewritten(vip, client, 80, cport, proto, (LB_MAC, CLIENT_MAC));
                let sent = if mode == "nat" {
                    rewritten(backend, nat, bport, nat_port, proto, (backend_mac(backend), LB_MAC))
                } else {
                    answer.clone()
                };
                for (who, from, kind, code, rest) in [
                    ("router: too big", router, too_big, too_big_code, mtu),
                    ("client: port unreachable", client, unreach, port_unreach, [0; 4]),
                ] {
                    for quote_len in [answer.len() - 14, ip_len + 8] {
                        let input = icmp_error(
                            from,
                            vip,
                            kind,
                            code,
                            rest,
                            &answer[14..14 + quote_len],
                            (CLIENT_MAC, LB_MAC),
                        );
                        let expected = if mode == "nat" {
                            let out_from = if from == client { nat } else { router };
                            icmp_error(
                                out_from,
                                backend,
                                kind,
                                code,
                                rest,
                                &sent[14..14 + quote_len],
                                (EGRESS_MAC, backend_mac(backend)),
                            )
                        } else {
                            let mut frame = input.clone();
                            frame[..6].copy_from_slice(&backend_mac(backend));
                            frame[6..12].copy_from_slice(&EGRESS_MAC);
                            frame
                        };
                        cases.push(Case {
                            description: format!(
                                "{name} {} {who}, {quote_len} bytes quoted",
                                if proto == IPPROTO_TCP { "TCP" } else { "UDP" }
                            ),
                            input,
                            verdict: Action::Tx,
                            reason: None,
                            output: Output::Frame(expected),
                        });
                    }
                }
                // Quoting a packet that did not come from the service address: the kernel's.
                let other = rewritten(router, client, 80, cport, proto, (LB_MAC, CLIENT_MAC));
                cases.push(Case::pass(
                    format!("{name} error quoting another sender's packet"),
                    too_big_to_service(&other[14..]),
                    Reason::NotService,
                ));
            }
            lb.bed.check_all(&cases).unwrap();

            // No flow on the quoted tuple: a NAT service has nothing to translate it with (the
            // kernel's); a DSR service sends it where its table sends the flow.
            // Eight tuples, so that a wrong hash key cannot pass by chance (two backends).
            let mut chosen = std::collections::HashSet::new();
            for cport in 48_200..48_208 {
                let answer = rewritten(vip, client, 80, cport, IPPROTO_TCP, (LB_MAC, CLIENT_MAC));
                let error = too_big_to_service(&answer[14..]);
                let tracked = lb.bed.datapath.maps().conntrack.entries().unwrap().len();
                let out = lb.bed.run(&error).unwrap();
                if mode == "nat" {
                    assert_eq!(out.verdict, Some(Action::Pass), "{name}: no flow");
                    continue;
                }
                assert_eq!(out.verdict, Some(Action::Tx), "{name}: no flow");
                let now_tracked = lb.bed.datapath.maps().conntrack.entries().unwrap().len();
                assert_eq!(now_tracked, tracked, "{name}: an error opens no flow");
                lb.bed.run(&client_packet(client, vip, IPPROTO_TCP, cport, 80).build()).unwrap();
                let (backend, _, _) = lb.flow_of(client, cport, vip, 80, IPPROTO_TCP);
                assert_eq!(out.output[..6], backend_mac(backend), "{name}: the flow's backend");
                assert_eq!(out.output[12..], error[12..], "{name}: sent as it came");
                chosen.insert(backend);
            }
            assert!(mode == "nat" || chosen.len() == 2, "{name}: both backends seen: {chosen:?}");
            // A DSR backend's IPv6 UDP answer larger than the path, fragmented at its source:
            // the error quotes the first fragment (a fragment header, offset 0), and reaches
            // the flow's backend, as it came; a later fragment has no ports.
            if v6 && mode == "dsr" {
                lb.bed.run(&client_packet(client, vip, IPPROTO_UDP, 48_300, 80).build()).unwrap();
                let (backend, _, _) = lb.flow_of(client, 48_300, vip, 80, IPPROTO_UDP);
                let fragment = |offset: u16, more: bool| {
                    Packet::ipv6(VIP6, CLIENT6)
                        .ext_header(ExtHeader::Fragment { offset, more, id: 7 })
                        .udp(80, 48_300)
                        .payload(&[0x5a; 64])
                        .build()
                };
                let first = too_big_to_service(&fragment(0, true)[14..]);
                let mut expected = first.clone();
                expected[..6].copy_from_slice(&backend_mac(backend));
                expected[6..12].copy_from_slice(&EGRESS_MAC);
                lb.bed
                    .check_all(&[
                        Case {
                            description: format!("{name}: quoting a first fragment"),
                            input: first,
                            verdict: Action::Tx,
                            reason: None,
                            output: Output::Frame(expected),
                        },
                        Case::pass(
                            format!("{name}: quoting a later fragment"),
                            too_big_to_service(&fragment(1400, false)[14..]),
                            Reason::NotService,
                        ),
                    ])
                    .unwrap();
            }
            // A quoted later fragment has no ports: not read as a flow's.
            if !v6 {
                let fragment = Packet::ipv4(VIP4, CLIENT4)
                    .ipv4_fragment(16, false)
                    .tcp(80, 48_100)
                    .payload(b"later bytes")
                    .build();
                let error = too_big_to_service(&fragment[14..]);
                lb.bed
                    .check_all(&[Case::pass(
                        format!("{name}: quoting a later fragment"),
                        error,
                        Reason::NotService,
                    )])
                    .unwrap();
            }
        }
    }
}

#[test]
fn a_quoted_udp_checksum_that_comes_to_zero_is_written_as_ffff() {
    // A client datagram whose checksum computes to zero carries 0xffff (zero would say "no
    // checksum"). Quoted in an ICMP error after NAT and translated back, it must read
    // 0xffff again, as the client sent it: the exact frame compares it.
    let Some(mut lb) = Lb::new("icmp_quoted_udp_ffff", &nat_config(false, "udp"), &[]) else {
        return;
    };
    let udp = |payload: &[u8]| Packet::ipv4(CLIENT4, VIP4).udp(48_500, 80).payload(payload).build();
    let checksum = |frame: &[u8]| u16::from_be_bytes([frame[14 + 20 + 6], frame[14 + 20 + 7]]);
    let payload = (0..=u16::MAX)
        .map(u16::to_be_bytes)
        .find(|p| checksum(&udp(p)) == 0xffff)
        .expect("a payload whose checksum computes to zero");
    let original = udp(&payload);
    let out = lb.bed.run(&original).unwrap();
    assert_eq!(out.verdict, Some(Action::Tx));
    let (backend, ..) = lb.flow_of(CLIENT4.into(), 48_500, VIP4.into(), 80, IPPROTO_UDP);
    let bmac = backend_mac(backend);
    let sent = out.output;
    assert_ne!(checksum(&sent), 0, "the NAT rewrite keeps a checksum");
    lb.bed
        .check_all(&[Case {
            description: "port unreachable about the datagram".into(),
            input: icmp_error(backend, NAT4.into(), 3, 3, [0; 4], &sent[14..], (bmac, LB_MAC)),
            verdict: Action::Tx,
            reason: None,
            output: Output::Frame(icmp_error(
                VIP4.into(),
                CLIENT4.into(),
                3,
                3,
                [0; 4],
                &original[14..],
                (LB_MAC, CLIENT_MAC),
            )),
        }])
        .unwrap();
}

#[test]
fn an_icmp_error_to_another_nat_source_is_not_translated() {
    // Two NAT sources: an error sent to the second, quoting a packet the first sent a
    // backend, is about no flow of the address it reached (forged, or misrouted) and goes to
    // the kernel untouched rather than to the first flow's client.
    let other_source = Ipv4Addr::new(198, 18, 1, 2);
    let toml = nat_config(false, "tcp")
        + &format!(
            "[[service]]\nname = \"u\"\naddress = \"198.18.100.1\"\nprotocol = \"tcp\"\nport = 81\npool = \"p\"\nmode = \"nat\"\nnat_source = \"{other_source}\"\n"
        );
    let Some(mut lb) = Lb::new("icmp_other_nat_source", &toml, &[]) else { return };
    let (client, vip) = (IpAddr::from(CLIENT4), IpAddr::from(VIP4));
    let original = client_packet(client, vip, IPPROTO_TCP, 48_400, 80).build();
    assert_eq!(lb.bed.run(&original).unwrap().verdict, Some(Action::Tx));
    let (backend, bport, nat_port) = lb.flow_of(client, 48_400, vip, 80, IPPROTO_TCP);
    let bmac = backend_mac(backend);
    let sent = rewritten(NAT4.into(), backend, nat_port, bport, IPPROTO_TCP, (EGRESS_MAC, bmac));
    let quoting = |to: IpAddr| icmp_error(backend, to, 3, 3, [0; 4], &sent[14..], (bmac, LB_MAC));
    lb.bed
        .check_all(&[Case::pass(
            "an error to the other NAT source",
            quoting(other_source.into()),
            Reason::NotService,
        )])
        .unwrap();
    // The same error to the address that sent the packet is translated (the control).
    assert_eq!(lb.bed.run(&quoting(NAT4.into())).unwrap().verdict, Some(Action::Tx));
}

#[test]
fn an_icmp_error_with_ip_options_is_not_translated() {
    // An error about a NAT flow carrying IPv4 options or an IPv6 extension header (a routing
    // header would put another address in the ICMPv6 checksum's pseudo-header than the one
    // translated) goes to the host untouched, as the flow's own packets with them are
    // dropped; the same error without is translated (the control).
    for v6 in [false, true] {
        let name = if v6 { "icmp_options_v6" } else { "icmp_options_v4" };
        let (client, vip, nat) = addresses(v6);
        let Some(mut lb) = Lb::new(name, &nat_config(v6, "udp"), &[]) else { return };
        let original = client_packet(client, vip, IPPROTO_UDP, 48_500, 80).build();
        assert_eq!(lb.bed.run(&original).unwrap().verdict, Some(Action::Tx));
        let (backend, bport, nat_port) = lb.flow_of(client, 48_500, vip, 80, IPPROTO_UDP);
        let bmac = backend_mac(backend);
        let sent = rewritten(nat, backend, nat_port, bport, IPPROTO_UDP, (EGRESS_MAC, bmac));
        let (unreach, port_unreach, ..) = icmp_kinds(v6);
        let error = |options: bool| {
            let p = ip_packet(backend, nat).macs(bmac, LB_MAC);
            let p = match (options, v6) {
                (false, _) => p,
                (true, true) => p.ext_header(ExtHeader::Routing { len: 2 }),
                (true, false) => p.ipv4_options(&[1, 1, 1, 1]),
            };
            p.icmp(unreach, port_unreach, [0; 4]).payload(&sent[14..]).build()
        };
        lb.bed
            .check_all(&[Case::pass("an error with options", error(true), Reason::NotService)])
            .unwrap();
        assert_eq!(lb.bed.run(&error(false)).unwrap().verdict, Some(Action::Tx), "{name}");
    }
}

#[test]
fn icmp_errors_when_the_nat_source_is_the_service_address() {
    // One address for both: an error to it may quote a NAT flow's packet to a backend (back
    // to the client) or a reply to a client (on to the backend); the quoted packet decides.
    let vip: IpAddr = VIP4.into();
    let toml = nat_config(false, "tcp")
        .replace("nat_source = \"198.18.1.1\"", "nat_source = \"198.18.100.1\"");
    let Some(mut lb) = Lb::new("icmp_nat_source_is_vip", &toml, &[]) else { return };
    let client: IpAddr = CLIENT4.into();
    let router = client_side_router(false);
    let original = client_packet(client, vip, IPPROTO_TCP, 48_300, 80).build();
    lb.bed.run(&original).unwrap();
    let (backend, bport, nat_port) = lb.flow_of(client, 48_300, vip, 80, IPPROTO_TCP);
    let bmac = backend_mac(backend);
    let sent = rewritten(vip, backend, nat_port, bport, IPPROTO_TCP, (EGRESS_MAC, bmac));
    let answer = rewritten(vip, client, 80, 48_300, IPPROTO_TCP, (LB_MAC, CLIENT_MAC));
    let from_backend = rewritten(backend, vip, bport, nat_port, IPPROTO_TCP, (bmac, LB_MAC));
    let mtu = [0, 0, 5, 0];
    lb.bed
        .check_all(&[
            Case {
                description: "too big about the packet to the backend: to the client".into(),
                input: icmp_error(router, vip, 3, 4, mtu, &sent[14..], (bmac, LB_MAC)),
                verdict: Action::Tx,
                reason: None,
                output: Output::Frame(icmp_error(
                    router,
                    client,
                    3,
                    4,
                    mtu,
                    &original[14..],
                    (LB_MAC, CLIENT_MAC),
                )),
            },
            Case {
                description: "too big about the reply to the client: to the backend".into(),
                input: icmp_error(router, vip, 3, 4, mtu, &answer[14..], (CLIENT_MAC, LB_MAC)),
                verdict: Action::Tx,
                reason: None,
                output: Output::Frame(icmp_error(
                    router,
                    backend,
                    3,
                    4,
                    mtu,
                    &from_backend[14..],
                    (EGRESS_MAC, bmac),
                )),
            },
        ])
        .unwrap();
}

#[test]
fn an_icmp_error_about_a_flow_that_lost_its_nat_port_stays_off_the_backend() {
    // One backend, one NAT port. The LRU evicts a live flow's reply entry alone and the next
    // flow takes the port: an error about the first flow's replies would name the second
    // one's connection at the backend (a "port unreachable" resetting another client).
    let Some(mut lb) = Lb::new("icmp_lost_port", &one_port_nat_config(), &[]) else { return };
    let (a, b) = (45_300, 45_301);
    assert_eq!(lb.bed.run(&syn4(a)).unwrap().verdict, Some(Action::Tx));
    assert_eq!(lb.evict_reply_entries(), 1);
    let (client, vip): (IpAddr, IpAddr) = (CLIENT4.into(), VIP4.into());
    let error = |port: u16| {
        let answer = rewritten(vip, client, 80, port, IPPROTO_TCP, (LB_MAC, CLIENT_MAC));
        icmp_error(client, vip, 3, 3, [0; 4], &answer[14..], (CLIENT_MAC, LB_MAC))
    };
    // Evicted, but nobody else on the port yet: still this flow's connection at the backend.
    let out = lb.bed.run(&error(a)).unwrap();
    assert_eq!(out.verdict, Some(Action::Tx), "the flow whose reply entry is gone");
    assert_eq!(lb.bed.run(&syn4(b)).unwrap().verdict, Some(Action::Tx));
    let out = lb.bed.run(&error(a)).unwrap();
    assert_eq!(out.verdict, Some(Action::Pass), "the flow that lost its port");
    let out = lb.bed.run(&error(b)).unwrap();
    assert_eq!(out.verdict, Some(Action::Tx), "the flow that holds it");
}

/// A frame's TCP sequence number, source port and length, read from its bytes (no VLAN).
fn tcp_seq_and_sport(frame: &[u8], v6: bool) -> (u32, u16) {
    let l4 = if v6 { 14 + 40 } else { 14 + 20 };
    let sport = u16::from_be_bytes([frame[l4], frame[l4 + 1]]);
    let seq = u32::from_be_bytes([frame[l4 + 4], frame[l4 + 5], frame[l4 + 6], frame[l4 + 7]]);
    (seq, sport)
}

fn ip_packet(src: IpAddr, dst: IpAddr) -> Packet {
    match (src, dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => Packet::ipv4(s, d),
        (IpAddr::V6(s), IpAddr::V6(d)) => Packet::ipv6(s, d),
        _ => unreachable!(),
    }
}

/// A client on a jumbo link offers an MSS of 8960: its cookie carries 8940 (IPv6's table),
/// but the cookie SYN-ACK offers the backend side's 1440 (IPv6; IPv4's table tops out at
/// the 1460 it offers), else the client would send segments a 1500-byte backend link drops.
#[test]
fn a_cookie_syn_ack_offers_the_backend_sides_mss_not_the_clients() {
    for v6 in [false, true] {
        let name = format!("cookie_mss_{}", if v6 { "v6" } else { "v4" });
        let config = nat_config(v6, "tcp") + "syn_cookies = \"on\"\n";
        let Some(mut lb) = Lb::new(&name, &config, &[]) else { return };
        let (client, vip, _) = addresses(v6);
        let syn = ip_packet(client, vip)
            .tcp(40_100, 80)
            .flags(tcp_flags::SYN)
            .seq_ack(9_000, 0)
            .tcp_options(&[2, 4, 0x23, 0x00])
            .build();
        let answer = lb.bed.run(&syn).unwrap();
        assert_eq!(answer.verdict, Some(Action::Tx), "{name}");
        let (cookie, _) = tcp_seq_and_sport(&answer.output, v6);
        let [hi, lo] = (if v6 { 1440u16 } else { 1460 }).to_be_bytes();
        let expected = ip_packet(vip, client)
            .macs(LB_MAC, CLIENT_MAC)
            .tcp(80, 40_100)
            .flags(tcp_flags::SYN | tcp_flags::ACK)
            .seq_ack(cookie, 9_001)
            .tcp_options(&[2, 4, hi, lo])
            .build();
        assert_eq!(hex(&answer.output), hex(&expected), "{name}: the cookie SYN-ACK");
    }
}

/// The whole SYN-cookie handshake as exact frames, for both families: the cookie SYN-ACK,
/// the validated ACK turned into the backend's SYN, the backend's SYN-ACK answered with an
/// ACK, then data both ways with sequence numbers shifted; and the ACKs that must not pass.
#[test]
fn syn_cookies_handshake_frame_by_frame() {
    for v6 in [false, true] {
        let name = format!("syn_cookies_handshake_{}", if v6 { "v6" } else { "v4" });
        let config = nat_config(v6, "tcp") + "syn_cookies = \"on\"\n";
        let Some(mut lb) = Lb::new(&name, &config, &[]) else { return };
        let (client, vip, nat) = addresses(v6);
        // The kernel's cookie MSS table: 1460 is exact for IPv4, 1440 for IPv6.
        let mss: u16 = if v6 { 1440 } else { 1460 };
        let [hi, lo] = mss.to_be_bytes();
        let mss_option = [2, 4, hi, lo];
        let (cport, client_isn) = (40_000u16, 7_000_000u32);
        // A SYN with the options a Linux client sends, 35 hops away (29 of its 64 left), with
        // DSCP 8 and ECT(0): the answer keeps only the MSS, starts at hop limit 64 and
        // carries no ECN codepoint.
        let syn = ip_packet(client, vip)
            .ttl(29)
            .tos(0x22)
            .tcp(cport, 80)
            .flags(tcp_flags::SYN)
            .seq_ack(client_isn, 0)
            .tcp_options(&[2, 4, hi, lo, 4, 2, 8, 10, 0, 0, 0, 1, 0, 0, 0, 0, 1, 3, 3, 7])
            .build();
        let answer = lb.bed.run(&syn).unwrap();
        assert_eq!(answer.verdict, Some(Action::Tx), "{name}: the SYN is answered here");
        let (cookie, _) = tcp_seq_and_sport(&answer.output, v6);
        let expected = ip_packet(vip, client)
            .macs(LB_MAC, CLIENT_MAC)
            .tos(0x20)
            .tcp(80, cport)
            .flags(tcp_flags::SYN | tcp_flags::ACK)
            .seq_ack(cookie, client_isn + 1)
            .tcp_options(&mss_option)
            .build();
        assert_eq!(hex(&answer.output), hex(&expected), "{name}: the cookie SYN-ACK");
        assert!(
            lb.bed.datapath.maps().conntrack.entries().unwrap().is_empty(),
            "{name}: nothing stored"
        );

        // Invalid ACKs: a forged cookie, and the right cookie on another connection.
        let ack = |port: u16, ack: u32| {
            ip_packet(client, vip)
                .tcp(port, 80)
                .flags(tcp_flags::ACK)
                .seq_ack(client_isn + 1, ack)
                .build()
        };
        let drop = |description: &str, input: Vec<u8>| Case {
            description: format!("{name}: {description}"),
            input,
            verdict: Action::Drop,
            reason: Some(Reason::SynCookieInvalid),
            output: Output::Unchanged,
        };
        lb.bed
            .check_all(&[
                drop("a forged cookie", ack(cport, (cookie ^ 0x0012_3400).wrapping_add(1))),
                drop(
                    "the cookie replayed from another port",
                    ack(cport + 1, cookie.wrapping_add(1)),
                ),
            ])
            .unwrap();

        // The good ACK opens the flow and becomes the backend's SYN (from the NAT address).
        let opened = lb.bed.run(&ack(cport, cookie.wrapping_add(1))).unwrap();
        assert_eq!(opened.verdict, Some(Action::Tx), "{name}");
        let (backend, bport, nat_port) = lb.flow_of(client, cport, vip, 80, IPPROTO_TCP);
        let bmac = backend_mac(backend);
        let expected = ip_packet(nat, backend)
            .macs(EGRESS_MAC, bmac)
            .tcp(nat_port, bport)
            .flags(tcp_flags::SYN)
            .seq_ack(client_isn, 0)
            .tcp_options(&mss_option)
            .build();
        assert_eq!(hex(&opened.output), hex(&expected), "{name}: the SYN to the backend");
        // Until the backend answers, the client's packets wait (it retransmits).
        let data = |payload: &[u8]| {
            ip_packet(client, vip)
                .tcp(cport, 80)
                .flags(tcp_flags::ACK | tcp_flags::PSH)
                .seq_ack(client_isn + 1, cookie.wrapping_add(1))
                .payload(payload)
                .build()
        };
        lb.bed
            .check_all(&[Case {
                description: format!("{name}: data before the backend's SYN-ACK"),
                input: data(b"GET"),
                verdict: Action::Drop,
                reason: Some(Reason::SynProxyPending),
                output: Output::Unchanged,
            }])
            .unwrap();

        // The backend's SYN-ACK is answered with the ACK the client would have sent.
        let backend_isn = 0xfff0_0000u32;
        let syn_ack = ip_packet(backend, nat)
            .macs(bmac, LB_MAC)
            .tcp(bport, nat_port)
            .flags(tcp_flags::SYN | tcp_flags::ACK)
            .seq_ack(backend_isn, client_isn + 1)
            .tcp_options(&mss_option)
            .build();
        let ack_to_backend = ip_packet(nat, backend)
            .macs(LB_MAC, bmac)
            .tcp(nat_port, bport)
            .flags(tcp_flags::ACK)
            .seq_ack(client_isn + 1, backend_isn.wrapping_add(1))
            .build();
        // Then data both ways: acknowledgements from the client gain the offset, sequence
        // numbers from the backend lose it (here across the 2^32 wrap).
        let to_backend = ip_packet(nat, backend)
            .macs(EGRESS_MAC, bmac)
            .tcp(nat_port, bport)
            .flags(tcp_flags::ACK | tcp_flags::PSH)
            .seq_ack(client_isn + 1, backend_isn.wrapping_add(1))
            .payload(b"GET")
            .build();
        let reply = |src: (IpAddr, u16), dst: (IpAddr, u16), macs: ([u8; 6], [u8; 6]), seq: u32| {
            ip_packet(src.0, dst.0)
                .macs(macs.0, macs.1)
                .tcp(src.1, dst.1)
                .flags(tcp_flags::ACK | tcp_flags::PSH)
                .seq_ack(seq, client_isn + 4)
                .payload(b"HTTP")
                .build()
        };
        // A SYN-ACK that does not acknowledge the load balancer's SYN (another connection's
        // on this port, or forged) would set the flow's offset wrong for its whole life;
        // one with IP options would get an ACK built for a header without them.
        let stray = ip_packet(backend, nat)
            .macs(bmac, LB_MAC)
            .tcp(bport, nat_port)
            .flags(tcp_flags::SYN | tcp_flags::ACK)
            .seq_ack(backend_isn ^ 0x5555, client_isn + 2)
            .tcp_options(&mss_option)
            .build();
        let mut refused = vec![Case {
            description: format!("{name}: a SYN-ACK acknowledging something else"),
            input: stray,
            verdict: Action::Drop,
            reason: Some(Reason::SynProxyPending),
            output: Output::Unchanged,
        }];
        if let (IpAddr::V4(backend4), IpAddr::V4(nat4)) = (backend, nat) {
            refused.push(Case {
                description: format!("{name}: a SYN-ACK with IP options"),
                input: Packet::ipv4(backend4, nat4)
                    .macs(bmac, LB_MAC)
                    .ipv4_options(&[1, 1, 1, 1])
                    .tcp(bport, nat_port)
                    .flags(tcp_flags::SYN | tcp_flags::ACK)
                    .seq_ack(backend_isn, client_isn + 1)
                    .build(),
                verdict: Action::Drop,
                reason: Some(Reason::IpOptions),
                output: Output::Unchanged,
            });
        }
        lb.bed.check_all(&refused).unwrap();
        lb.bed
            .check_all(&[
                Case {
                    description: format!("{name}: the backend's SYN-ACK"),
                    input: syn_ack,
                    verdict: Action::Tx,
                    reason: None,
                    output: Output::Frame(ack_to_backend),
                },
                Case {
                    description: format!("{name}: client data, acknowledgement shifted"),
                    input: data(b"GET"),
                    verdict: Action::Tx,
                    reason: None,
                    output: Output::Frame(to_backend),
                },
                Case {
                    description: format!("{name}: backend data, sequence number shifted"),
                    input: reply(
                        (backend, bport),
                        (nat, nat_port),
                        (bmac, LB_MAC),
                        backend_isn.wrapping_add(1),
                    ),
                    verdict: Action::Tx,
                    reason: None,
                    output: Output::Frame(reply(
                        (vip, 80),
                        (client, cport),
                        (LB_MAC, CLIENT_MAC),
                        cookie.wrapping_add(1),
                    )),
                },
            ])
            .unwrap();
        let sid = lb.balancer.service_id("s").unwrap();
        let syn_stats = lb.bed.datapath.maps().traffic.syn(sid).unwrap();
        assert_eq!(
            (
                syn_stats.syns,
                syn_stats.cookies_sent,
                syn_stats.cookies_valid,
                syn_stats.cookies_invalid
            ),
            (1, 1, 1, 2),
            "{name}"
        );
        let entries = lb.bed.datapath.maps().conntrack.entries().unwrap();
        assert_eq!(entries.len(), 2, "{name}: one flow, two entries");
        assert!(entries.iter().all(|(_, f)| f.flags & lb_common::conntrack::FLOW_SEQ_ADJ != 0
            && f.seq_delta == backend_isn.wrapping_sub(cookie)));

        // A router's "too big" about the backend's data as the client got it reaches the
        // backend about its own packet, in its own numbering (which its stack checks).
        let router = client_side_router(v6);
        let (kind, code) = if v6 { (2, 0) } else { (3, 4) };
        let seen = reply((vip, 80), (client, cport), (LB_MAC, CLIENT_MAC), cookie.wrapping_add(1));
        let sent =
            reply((backend, bport), (nat, nat_port), (bmac, LB_MAC), backend_isn.wrapping_add(1));
        let ip_len = if v6 { 40 } else { 20 };
        let cases: Vec<Case> = [seen.len() - 14, ip_len + 8]
            .into_iter()
            .map(|quote_len| Case {
                description: format!("{name}: too big, {quote_len} bytes quoted"),
                input: icmp_error(
                    router,
                    vip,
                    kind,
                    code,
                    [0, 0, 5, 0],
                    &seen[14..14 + quote_len],
                    (CLIENT_MAC, LB_MAC),
                ),
                verdict: Action::Tx,
                reason: None,
                output: Output::Frame(icmp_error(
                    router,
                    backend,
                    kind,
                    code,
                    [0, 0, 5, 0],
                    &sent[14..14 + quote_len],
                    (EGRESS_MAC, bmac),
                )),
            })
            .collect();
        lb.bed.check_all(&cases).unwrap();
    }
}

/// The backend refuses the connection the load balancer opened for a cookie's client: its
/// reset reaches the client at the sequence number the client expects (the cookie + 1) and
/// closes the flow. Only a reset acknowledging the load balancer's SYN (the client's ISN +
/// 1), as a kernel in SYN-SENT takes it: a blind one ends nothing.
#[test]
fn with_syn_cookies_a_backend_reset_refuses_the_handshake_only_if_it_acknowledges_it() {
    let config = nat_config(false, "tcp") + "syn_cookies = \"on\"\n";
    let name = "with_syn_cookies_a_backend_reset_refuses_the_handshake";
    let Some(mut lb) = Lb::new(name, &config, &[]) else { return };
    let (client, vip, nat) = addresses(false);
    let (cport, client_isn) = (40_500u16, 9_000_000u32);
    let syn = ip_packet(client, vip).tcp(cport, 80).flags(tcp_flags::SYN).seq_ack(client_isn, 0);
    let answer = lb.bed.run(&syn.build()).unwrap();
    let (cookie, _) = tcp_seq_and_sport(&answer.output, false);
    let ack = ip_packet(client, vip)
        .tcp(cport, 80)
        .flags(tcp_flags::ACK)
        .seq_ack(client_isn + 1, cookie.wrapping_add(1))
        .build();
    assert_eq!(lb.bed.run(&ack).unwrap().verdict, Some(Action::Tx), "the SYN to the backend");
    let (backend, bport, nat_port) = lb.flow_of(client, cport, vip, 80, IPPROTO_TCP);
    let reset = |flags: u8, ack: u32| {
        ip_packet(backend, nat)
            .macs(backend_mac(backend), LB_MAC)
            .tcp(bport, nat_port)
            .flags(flags)
            .seq_ack(0, ack)
            .build()
    };
    let blind = |description: &str, input: Vec<u8>| Case {
        description: description.into(),
        input,
        verdict: Action::Drop,
        reason: Some(Reason::SynProxyPending),
        output: Output::Unchanged,
    };
    lb.bed
        .check_all(&[
            blind("a reset without ACK", reset(tcp_flags::RST, 0)),
            blind(
                "a reset acknowledging something else",
                reset(tcp_flags::RST | tcp_flags::ACK, client_isn + 2),
            ),
        ])
        .unwrap();
    let key = lb_common::FlowKey::new((client, cport).into(), (vip, 80).into(), IPPROTO_TCP);
    let state = |lb: &Lb| lb.bed.datapath.maps().conntrack.get(&key).unwrap().state;
    assert_eq!(state(&lb), FlowState::SynSeen as u8, "the blind resets ended nothing");

    let refused = lb.bed.run(&reset(tcp_flags::RST | tcp_flags::ACK, client_isn + 1)).unwrap();
    assert_eq!(refused.verdict, Some(Action::Tx));
    let expected = ip_packet(vip, client)
        .macs(LB_MAC, CLIENT_MAC)
        .tcp(80, cport)
        .flags(tcp_flags::RST | tcp_flags::ACK)
        .seq_ack(cookie.wrapping_add(1), client_isn + 1)
        .build();
    assert_eq!(hex(&refused.output), hex(&expected), "the client's reset, in its numbering");
    assert_eq!(state(&lb), FlowState::Closed as u8, "the flow closed");
}

/// `auto` while the SYN rate is low: SYNs open flows as usual (no cookie), and a stray ACK
/// is picked up mid-stream rather than dropped; both count toward the rate (a spoofed ACK
/// flood opens flows as a SYN flood does).
#[test]
fn syn_cookies_auto_stays_out_of_the_way_below_its_rate() {
    let config = nat_config(false, "tcp") + "syn_cookies = \"auto\"\nsyn_cookie_threshold = 1000\n";
    let Some(mut lb) =
        Lb::new("syn_cookies_auto_stays_out_of_the_way_below_its_rate", &config, &[])
    else {
        return;
    };
    let syn = client_packet(CLIENT4.into(), VIP4.into(), IPPROTO_TCP, 40_000, 80).build();
    let out = lb.bed.run(&syn).unwrap();
    assert_eq!(out.verdict, Some(Action::Tx));
    let (backend, bport, nat_port) =
        lb.flow_of(CLIENT4.into(), 40_000, VIP4.into(), 80, IPPROTO_TCP);
    let expected = rewritten(
        NAT4.into(),
        backend,
        nat_port,
        bport,
        IPPROTO_TCP,
        (EGRESS_MAC, backend_mac(backend)),
    );
    assert_eq!(out.output, expected, "an ordinary SYN to the backend");
    let stray =
        Packet::ipv4(CLIENT4, VIP4).tcp(40_001, 80).flags(tcp_flags::ACK).seq_ack(5, 5).build();
    assert_eq!(lb.bed.run(&stray).unwrap().verdict, Some(Action::Tx), "picked up mid-stream");
    let sid = lb.balancer.service_id("s").unwrap();
    assert_eq!(
        lb.bed.datapath.maps().traffic.syn(sid).unwrap().syns,
        2,
        "the SYN and the picked-up ACK are counted for the rate"
    );
    // An ACK of a live flow opens nothing: not counted.
    let ack = Packet::ipv4(CLIENT4, VIP4).tcp(40_000, 80).flags(tcp_flags::ACK).build();
    assert_eq!(lb.bed.run(&ack).unwrap().verdict, Some(Action::Tx));
    assert_eq!(lb.bed.datapath.maps().traffic.syn(sid).unwrap().syns, 2);
}

/// A cookie goes stale when the kernel's cookie clock (jiffies / 60 s) has moved on twice:
/// waits for that (60 to 121 s), then the ACK that would have been valid is refused.
#[test]
fn a_stale_cookie_is_refused() {
    let config = nat_config(false, "tcp") + "syn_cookies = \"on\"\n";
    let Some(mut lb) = Lb::new("a_stale_cookie_is_refused", &config, &[]) else { return };
    let syn =
        Packet::ipv4(CLIENT4, VIP4).tcp(40_000, 80).flags(tcp_flags::SYN).seq_ack(100, 0).build();
    let answer = lb.bed.run(&syn).unwrap();
    assert_eq!(answer.verdict, Some(Action::Tx));
    let (cookie, _) = tcp_seq_and_sport(&answer.output, false);
    let hz = lb.bed.datapath.ticks_per_second().unwrap();
    let period = 60 * hz;
    let now = lb.bed.datapath.now_ticks().unwrap();
    let to_next = period - now % period;
    let wait = std::time::Duration::from_millis((to_next + period) * 1000 / hz + 1500);
    eprintln!("waiting {wait:?} for the cookie clock to move on twice");
    std::thread::sleep(wait);
    let ack = Packet::ipv4(CLIENT4, VIP4)
        .tcp(40_000, 80)
        .flags(tcp_flags::ACK)
        .seq_ack(101, cookie.wrapping_add(1))
        .build();
    lb.bed
        .check_all(&[Case {
            description: "the cookie's ACK two cookie periods later".into(),
            input: ack,
            verdict: Action::Drop,
            reason: Some(Reason::SynCookieInvalid),
            output: Output::Unchanged,
        }])
        .unwrap();
}

/// Corrupts `frame` one of four ways: bytes overwritten (mostly in the headers), the frame
/// cut short, grown with garbage, or a header byte set to 0 or 0xff.
fn corrupt(rng: &mut XorShift, frame: &[u8]) -> Vec<u8> {
    let mut out = frame.to_vec();
    let headers = out.len().min(96);
    match rng.below(4) {
        0 => {
            for _ in 0..=rng.below(4) {
                let at = if rng.below(4) == 0 { rng.below(out.len()) } else { rng.below(headers) };
                out[at] = rng.next_u64().to_le_bytes()[0];
            }
        }
        // BPF_PROG_TEST_RUN takes no frame shorter than an Ethernet header.
        1 => out.truncate(14 + rng.below(out.len() - 14)),
        2 => out.extend((0..rng.below(64)).map(|_| rng.next_u64().to_le_bytes()[0])),
        _ => {
            let at = rng.below(headers);
            out[at] = if rng.below(2) == 0 { 0 } else { 0xff };
        }
    }
    out
}

/// Frames of every shape the balancer forwards, corrupted at random, never abort the program,
/// are each counted once by verdict (and, unless forwarded, once by reason), and leave the
/// live flows as they were.
#[test]
fn corrupted_frames_never_abort_and_are_each_counted_once() {
    let setups = [
        ("nat4", nat_config(false, "tcp"), IpAddr::from(CLIENT4), IpAddr::from(VIP4), IPPROTO_TCP),
        ("nat6", nat_config(true, "udp"), IpAddr::from(CLIENT6), IpAddr::from(VIP6), IPPROTO_UDP),
        ("dsr4", dsr_config(false, "udp"), IpAddr::from(CLIENT4), IpAddr::from(VIP4), IPPROTO_UDP),
        ("dsr6", dsr_config(true, "tcp"), IpAddr::from(CLIENT6), IpAddr::from(VIP6), IPPROTO_TCP),
    ];
    let mut rng = XorShift::new(0x5eed_1b5a_fe00_0001);
    for (name, toml, client, vip, proto) in setups {
        let Some(mut lb) = Lb::new(&format!("corrupted_frames_{name}"), &toml, &[]) else {
            return;
        };
        let packet = |port, flags| {
            let p = client_packet(client, vip, proto, port, 80);
            if proto == IPPROTO_TCP { p.flags(flags) } else { p }
        };
        let opening = packet(41_000, tcp_flags::SYN).build();
        assert_eq!(lb.bed.run(&opening).unwrap().verdict, Some(Action::Tx), "{name}");
        let data = packet(41_000, tcp_flags::ACK).build();
        let (backend, bport, nat_port) = lb.flow_of(client, 41_000, vip, 80, proto);
        let mut seeds = vec![opening, data.clone()];
        seeds.push(packet(41_001, tcp_flags::SYN).vlan(7).build());
        if toml.contains("mode = \"nat\"") {
            let nat: IpAddr = if client.is_ipv4() { NAT4.into() } else { NAT6.into() };
            let reply = match (backend, nat) {
                (IpAddr::V4(b), IpAddr::V4(n)) => Packet::ipv4(b, n),
                (IpAddr::V6(b), IpAddr::V6(n)) => Packet::ipv6(b, n),
                _ => unreachable!(),
            };
            let reply = if proto == IPPROTO_TCP {
                reply.tcp(bport, nat_port).flags(tcp_flags::ACK).payload(b"answer")
            } else {
                reply.udp(bport, nat_port).payload(b"answer")
            };
            assert_eq!(lb.bed.run(&reply.build()).unwrap().verdict, Some(Action::Tx), "{name}");
            seeds.push(reply.build());
            // The backend's "port unreachable" about the flow, quoting what it received.
            let macs = (EGRESS_MAC, backend_mac(backend));
            let sent = rewritten(nat, backend, nat_port, bport, proto, macs);
            let (kind, code) = if client.is_ipv4() { (3, 3) } else { (1, 4) };
            let error = icmp_error(
                backend,
                nat,
                kind,
                code,
                [0; 4],
                &sent[14..],
                (backend_mac(backend), LB_MAC),
            );
            assert_eq!(lb.bed.run(&error).unwrap().verdict, Some(Action::Tx), "{name}: icmp");
            seeds.push(error);
        }
        // A router's "too big" about the flow's answer, sent to the service address.
        let router = client_side_router(client.is_ipv6());
        let answer = rewritten(vip, client, 80, 41_000, proto, (LB_MAC, CLIENT_MAC));
        let (kind, code) = if client.is_ipv4() { (3, 4) } else { (2, 0) };
        let macs = (CLIENT_MAC, LB_MAC);
        let too_big = icmp_error(router, vip, kind, code, [0, 0, 5, 0], &answer[14..], macs);
        assert_eq!(lb.bed.run(&too_big).unwrap().verdict, Some(Action::Tx), "{name}: too big");
        seeds.push(too_big);

        let before = lb.bed.stats().unwrap();
        let runs = 5_000;
        for i in 0..runs {
            let frame = corrupt(&mut rng, &seeds[i % seeds.len()]);
            let result = lb.bed.run(&frame).unwrap();
            assert!(
                matches!(
                    result.verdict,
                    Some(Action::Pass | Action::Drop | Action::Tx | Action::Redirect)
                ),
                "{name}: run {i}: verdict {} for {}",
                result.raw_verdict,
                hex(&frame)
            );
        }
        let delta = lb.bed.stats().unwrap().since(&before);
        assert_eq!(delta.packets(), runs as u64, "{name}: every frame counted once by verdict");
        let not_forwarded = delta.action(Action::Pass).packets + delta.action(Action::Drop).packets;
        let by_reason: u64 = Reason::ALL.iter().map(|r| delta.reason(*r).packets).sum();
        assert_eq!(by_reason, not_forwarded, "{name}: every frame not forwarded has one reason");
        assert!(
            delta.action(Action::Tx).packets > 0 && not_forwarded > 0,
            "{name}: the corruption reaches both outcomes: {delta:?}"
        );

        // The flow opened before still goes to the same backend.
        let after = lb.bed.run(&data).unwrap();
        assert_eq!(after.verdict, Some(Action::Tx), "{name}");
        assert_eq!(lb.flow_of(client, 41_000, vip, 80, proto).0, backend, "{name}");
    }
}

#[test]
fn a_service_address_moving_to_another_service_stays_served() {
    // A rename (or a blue/green swap) moves the address from one service to another in one
    // apply: the new service's entry must survive the old one's removal.
    let Some(mut lb) = Lb::new("service_address_moves", &dsr_config(false, "tcp"), &[]) else {
        return;
    };
    assert_eq!(lb.bed.run(&syn4(45_200)).unwrap().verdict, Some(Action::Tx));
    let old = lb.balancer.service_id("s").unwrap();
    lb.reapply(&dsr_config(false, "tcp").replace("name = \"s\"", "name = \"s-green\""));
    let new = lb.balancer.service_id("s-green").unwrap();
    assert_ne!(old, new);
    assert_eq!(lb.bed.run(&syn4(45_201)).unwrap().verdict, Some(Action::Tx), "renamed");
    assert_eq!(lb.bed.datapath.maps().traffic.service(new).unwrap().new_flows, 1);

    // Two services trading addresses: both stay served, each under its new owner.
    let two = |a: &str, b: &str| {
        format!(
            "{}[[service]]\nname = \"t\"\naddress = \"{b}\"\nprotocol = \"tcp\"\nport = 80\npool = \"p\"\nmode = \"dsr-l2\"\n",
            dsr_config(false, "tcp")
                .replace("name = \"s\"", "name = \"s-green\"")
                .replace("198.18.100.1", a)
        )
    };
    lb.reapply(&two("198.18.100.1", "198.18.100.2"));
    lb.reapply(&two("198.18.100.2", "198.18.100.1"));
    let (s, t) = (lb.balancer.service_id("s-green").unwrap(), lb.balancer.service_id("t").unwrap());
    let before = (
        lb.bed.datapath.maps().traffic.service(s).unwrap().new_flows,
        lb.bed.datapath.maps().traffic.service(t).unwrap().new_flows,
    );
    let other =
        client_packet(CLIENT4.into(), "198.18.100.2".parse().unwrap(), IPPROTO_TCP, 45_202, 80);
    assert_eq!(lb.bed.run(&syn4(45_203)).unwrap().verdict, Some(Action::Tx), "swapped: first");
    assert_eq!(lb.bed.run(&other.build()).unwrap().verdict, Some(Action::Tx), "swapped: second");
    let after = (
        lb.bed.datapath.maps().traffic.service(s).unwrap().new_flows,
        lb.bed.datapath.maps().traffic.service(t).unwrap().new_flows,
    );
    assert_eq!((after.0 - before.0, after.1 - before.1), (1, 1), "one new flow each");
}

/// Runs the daemon's sweep of the connection table with the timeouts the data path has.
fn sweep(lb: &mut Lb) -> lb_userspace::maps::SweepResult {
    let clock = lb.bed.datapath.flow_clock().unwrap();
    let entries = lb.balancer.backend_entries();
    // The daemon's table of entries says what the one-by-one lookup says, for every id.
    for id in 0..lb_common::service::MAX_BACKENDS {
        assert_eq!(entries.get(&id).copied(), lb.balancer.backend_entry(id), "backend id {id}");
    }
    lb.bed.datapath.maps_mut().conntrack.sweep(&clock, |id| entries.get(&id).copied()).unwrap()
}

#[test]
fn the_sweep_leaves_a_taken_over_nat_port_alone() {
    // A closed flow expires; the next flow to the backend takes its NAT port over (one port).
    // The sweep removing the expired flow must not take the new flow's reply entry with it.
    let Some(mut lb) = Lb::new("sweep_taken_over_port", &one_port_nat_config(), &[]) else {
        return;
    };
    let (a, b) = (45_300, 45_301);
    let (backend, bport, nat_port) = hand_the_port_over(&mut lb, a, b);

    // Just expired: inside the window in which the data path may still write a reopened
    // flow over it in place (two refresh intervals), so the sweep leaves it.
    let swept = sweep(&mut lb);
    assert_eq!(swept.removed, 0, "inside the overwrite window: {swept:?}");
    // One tick a refresh interval: the window and the sweep's margin are three ticks.
    lb.set_globals(|g| g.refresh = 1);
    std::thread::sleep(std::time::Duration::from_millis(60));
    let swept = sweep(&mut lb);
    assert_eq!(swept.removed, 1, "the closed flow's forward entry alone: {swept:?}");
    let entries = lb.bed.datapath.maps().conntrack.entries().unwrap();
    assert_eq!(entries.len(), 2, "the new flow's two entries: {entries:?}");
    // The backend's answer still reaches the new flow's client.
    let answer = Packet::ipv4(ip4(backend), NAT4)
        .tcp(bport, nat_port)
        .flags(tcp_flags::SYN | tcp_flags::ACK)
        .seq_ack(5000, 1001)
        .build();
    let out = lb.bed.run(&answer).unwrap();
    assert_eq!(out.verdict, Some(Action::Tx));
    let dport = u16::from_be_bytes([out.output[14 + 20 + 2], out.output[14 + 20 + 3]]);
    assert_eq!(dport, b, "translated back to the new flow");
}

#[test]
fn a_one_way_udp_stream_from_the_backend_outlives_the_datagram_timeout() {
    // One datagram from the client, then the backend streams: the flow lives on its
    // replies, in the data path and through the daemon's sweep.
    let Some(mut lb) = Lb::new("one_way_udp", &nat_config(false, "udp"), &[]) else { return };
    let hz = lb.bed.datapath.ticks_per_second().unwrap();
    lb.set_globals(|g| {
        g.timeouts.datagram = hz * 3 / 2; // 1.5 s: a step may stall for 1.2 s
        g.refresh = 0;
    });
    let cport = 45_400;
    let first = client_packet(CLIENT4.into(), VIP4.into(), IPPROTO_UDP, cport, 80).build();
    assert_eq!(lb.bed.run(&first).unwrap().verdict, Some(Action::Tx));
    let (backend, bport, nat_port) =
        lb.flow_of(CLIENT4.into(), cport, VIP4.into(), 80, IPPROTO_UDP);
    let datagram = Packet::ipv4(ip4(backend), NAT4).udp(bport, nat_port).payload(b"stream").build();
    // 3.6 s of replies (over twice the timeout), 300 ms apart, sweeping as the daemon does.
    for i in 0..12 {
        std::thread::sleep(std::time::Duration::from_millis(300));
        let out = lb.bed.run(&datagram).unwrap();
        assert_eq!(out.verdict, Some(Action::Tx), "reply {i}");
        let swept = sweep(&mut lb);
        assert_eq!(swept.removed, 0, "after reply {i}: {swept:?}");
    }
    // Both halves alive: the client's next datagram belongs to the same flow.
    let sid = lb.balancer.service_id("s").unwrap();
    let before = lb.bed.datapath.maps().traffic.service(sid).unwrap().new_flows;
    assert_eq!(lb.bed.run(&first).unwrap().verdict, Some(Action::Tx));
    assert_eq!(lb.bed.datapath.maps().traffic.service(sid).unwrap().new_flows, before);
    // Silence on both sides: the sweep takes the pair.
    std::thread::sleep(std::time::Duration::from_millis(3600));
    assert_eq!(sweep(&mut lb).removed, 2);
}

fn ip4(addr: IpAddr) -> Ipv4Addr {
    match addr {
        IpAddr::V4(a) => a,
        IpAddr::V6(_) => panic!("an IPv4 backend expected"),
    }
}

#[test]
fn with_syn_cookies_on_only_a_cookie_opens_a_flow() {
    // Under a flood, spoofed packets that are neither a SYN nor an ACK must not open flows
    // (each would take two entries and a NAT port), nor be answered.
    let config = nat_config(false, "tcp") + "syn_cookies = \"on\"\n";
    let Some(mut lb) = Lb::new("cookies_only_a_cookie_opens", &config, &[]) else { return };
    let cases: Vec<Case> = [
        ("no flags", 0),
        ("SYN-ACK", tcp_flags::SYN | tcp_flags::ACK),
        ("RST", tcp_flags::RST),
        ("RST-ACK", tcp_flags::RST | tcp_flags::ACK),
        ("FIN", tcp_flags::FIN),
        ("PSH", tcp_flags::PSH),
        ("URG", tcp_flags::URG),
        // Not a connection's first SYN (Linux discards both): no cookie SYN-ACK for them.
        ("SYN-RST", tcp_flags::SYN | tcp_flags::RST),
        ("SYN-FIN", tcp_flags::SYN | tcp_flags::FIN),
    ]
    .into_iter()
    .zip(46_000u16..)
    .map(|((name, flags), cport)| Case {
        description: format!("{name} without a flow, cookies on"),
        input: Packet::ipv4(CLIENT4, VIP4)
            .tcp(cport, 80)
            .flags(flags)
            .seq_ack(1000, 2000)
            .payload(b"x")
            .build(),
        verdict: Action::Drop,
        reason: Some(Reason::SynCookieInvalid),
        output: Output::Unchanged,
    })
    .collect();
    lb.bed.check_all(&cases).unwrap();
    let entries = lb.bed.datapath.maps().conntrack.entries().unwrap();
    assert!(entries.is_empty(), "{entries:?}");
    // Each counted for `auto`'s rate, which must not fall while such a flood goes on: the
    // two with SYN as SYNs, the seven others as refused (invalid).
    let sid = lb.balancer.service_id("s").unwrap();
    let stats = lb.bed.datapath.maps().traffic.syn(sid).unwrap();
    assert_eq!((stats.syns, stats.cookies_invalid), (2, 7));
}

#[test]
fn a_restart_gives_each_pool_its_own_id_of_a_shared_backend_back() {
    // Two pools share a backend: each has an id of its own for it. A restarted daemon
    // adopting the pinned maps must give both back, to their own pools: an id left out
    // would go to the next backend added while flows still point at it.
    let shared = "[[pool]]\nname = \"b\"\n[[pool.backend]]\naddress = \"198.18.1.11\"\n\
                  [[pool.backend]]\naddress = \"198.18.1.13\"\n\
                  [[service]]\nname = \"t\"\naddress = \"198.18.100.2\"\nprotocol = \"tcp\"\nport = 80\npool = \"b\"\nmode = \"dsr-l2\"\n";
    let config = dsr_config(false, "tcp").replace("198.18.1.12", "198.18.1.13") + shared;
    let Some(mut lb) = Lb::new("restart_shared_backend", &config, &[]) else { return };
    let ids = |b: &Balancer| -> Vec<(String, IpAddr, u32)> {
        let mut v: Vec<_> = b.backends().map(|(k, id)| (k.pool.clone(), k.addr, id)).collect();
        v.sort();
        v
    };
    let before = ids(&lb.balancer);
    assert_eq!(before.len(), 4, "{before:?}");
    // The restarted balancer knows the maps only; pool "b" sorts first but has the higher
    // ids, so taking the lowest id per address would swap the pools' ids.
    lb.restart_balancer();
    lb.reapply(&config);
    assert_eq!(ids(&lb.balancer), before, "every pool keeps its ids");
    // A backend added now gets an id nobody had.
    lb.reapply(&config.replace(
        "[[service]]\nname = \"t\"",
        "[[pool.backend]]\naddress = \"198.18.1.14\"\n[[service]]\nname = \"t\"",
    ));
    let after = ids(&lb.balancer);
    let added = after.iter().find(|(_, a, _)| *a == "198.18.1.14".parse::<IpAddr>().unwrap());
    let added = added.expect("the new backend").2;
    assert!(before.iter().all(|(_, _, id)| *id != added), "{after:?}");
}

#[test]
fn with_syn_cookies_on_a_client_reopening_a_closed_tuple_gets_a_new_connection() {
    // A cookie-opened connection ends with the client's reset; the client reuses its port at
    // once. Its new cookie ACK must open a new flow (a SYN to a backend), not go on as the
    // closed flow's ACK to the old backend and port, which would reset it.
    let config = nat_config(false, "tcp") + "syn_cookies = \"on\"\n";
    let Some(mut lb) = Lb::new("cookies_reopen_closed_tuple", &config, &[]) else { return };
    let cport = 46_100;
    let client = |flags: u8, seq: u32, ack: u32| {
        Packet::ipv4(CLIENT4, VIP4).tcp(cport, 80).flags(flags).seq_ack(seq, ack).build()
    };
    let flags_of = |frame: &[u8]| frame[14 + 20 + 13];
    let handshake = |lb: &mut Lb, isn: u32| {
        let answer = lb.bed.run(&client(tcp_flags::SYN, isn, 0)).unwrap();
        assert_eq!(answer.verdict, Some(Action::Tx), "the cookie SYN-ACK");
        let (cookie, _) = tcp_seq_and_sport(&answer.output, false);
        let out = lb.bed.run(&client(tcp_flags::ACK, isn + 1, cookie.wrapping_add(1))).unwrap();
        assert_eq!(out.verdict, Some(Action::Tx));
        out.output
    };
    let syn = handshake(&mut lb, 100);
    assert_eq!(flags_of(&syn), tcp_flags::SYN, "the cookie ACK becomes the backend's SYN");
    let (backend, bport, nat_port) =
        lb.flow_of(CLIENT4.into(), cport, VIP4.into(), 80, IPPROTO_TCP);
    let syn_ack = Packet::ipv4(ip4(backend), NAT4)
        .tcp(bport, nat_port)
        .flags(tcp_flags::SYN | tcp_flags::ACK)
        .seq_ack(5000, 101)
        .build();
    assert_eq!(lb.bed.run(&syn_ack).unwrap().verdict, Some(Action::Tx), "answered with an ACK");
    assert_eq!(lb.bed.run(&client(tcp_flags::RST, 101, 0)).unwrap().verdict, Some(Action::Tx));

    let again = handshake(&mut lb, 9000);
    assert_eq!(flags_of(&again), tcp_flags::SYN, "the new cookie ACK opens a new connection");
    let seq = u32::from_be_bytes(again[14 + 20 + 4..14 + 20 + 8].try_into().unwrap());
    assert_eq!(seq, 9000, "with the new client's sequence numbers");
}

#[test]
fn a_forged_reset_and_syn_do_not_end_a_connection_while_cookies_are_on() {
    // Someone who knows a live connection's tuple sends a reset (any sequence number) and a
    // SYN on it. With cookies on, the SYN gets a cookie SYN-ACK; the flow's entries used to
    // be removed then, so the connection's next segments found no flow and no valid cookie,
    // and were dropped. Now they stay, marked: only an ACK with a valid cookie starts the
    // tuple over, and the connection's own segments go on as before.
    let config = nat_config(false, "tcp") + "syn_cookies = \"on\"\n";
    let Some(mut lb) = Lb::new("forged_rst_syn", &config, &[]) else { return };
    let cport = 46_700;
    let client = |flags: u8, seq: u32, ack: u32| {
        Packet::ipv4(CLIENT4, VIP4)
            .tcp(cport, 80)
            .flags(flags)
            .seq_ack(seq, ack)
            .payload(b"x")
            .build()
    };
    let (cookie, before) = lb.cookie_connection(cport, 100);
    assert_eq!(
        lb.bed.run(&client(tcp_flags::ACK, 102, cookie + 1)).unwrap().verdict,
        Some(Action::Tx)
    );
    // The forgeries: a reset at any sequence number, then a SYN (answered with a cookie,
    // which goes to the real client: its answer carries no valid cookie).
    assert_eq!(lb.bed.run(&client(tcp_flags::RST, 77_777, 0)).unwrap().verdict, Some(Action::Tx));
    assert_eq!(lb.bed.run(&client(tcp_flags::SYN, 88_888, 0)).unwrap().verdict, Some(Action::Tx));
    // The connection's next segment: to its backend and port, its acknowledgement still
    // shifted from the cookie's numbering to the backend's (5000 + 1).
    let next = lb.bed.run(&client(tcp_flags::ACK | tcp_flags::PSH, 103, cookie + 1)).unwrap();
    assert_eq!(next.verdict, Some(Action::Tx), "the connection's segment was dropped");
    let ack = u32::from_be_bytes(next.output[14 + 20 + 8..14 + 20 + 12].try_into().unwrap());
    assert_eq!(ack, 5001, "shifted as the connection's segments are");
    assert_eq!(lb.flow_of(CLIENT4.into(), cport, VIP4.into(), 80, IPPROTO_TCP), before);
    // And it goes on: its next one too (a cookie-opened connection stays closed, carried
    // while its segments come within the closed timeout: see the next test).
    let more = lb.bed.run(&client(tcp_flags::ACK, 104, cookie + 1)).unwrap();
    assert_eq!(more.verdict, Some(Action::Tx));
    assert_eq!(lb.flow_of(CLIENT4.into(), cport, VIP4.into(), 80, IPPROTO_TCP), before);
}

#[test]
fn a_change_too_big_to_apply_side_by_side_is_refused_with_nothing_changed() {
    // 520 services renamed at once: new ids are taken before the old ones are let go, so the
    // change needs 1,040 service ids where 1,024 exist. It must be refused before anything
    // is written, not run out of ids halfway.
    let services = |prefix: &str| -> String {
        let mut out = String::new();
        for i in 0..520u16 {
            let _ = write!(
                out,
                "[[service]]\nname = \"{prefix}{i}\"\naddress = \"198.18.100.1\"\nprotocol = \"tcp\"\nport = {}\npool = \"p\"\nmode = \"dsr-l2\"\ntable_size = 101\n",
                1000 + i
            );
        }
        out
    };
    let pool = "[[pool]]\nname = \"p\"\n[[pool.backend]]\naddress = \"198.18.1.11\"\n";
    let Some(mut lb) = Lb::new("too_big_side_by_side", &format!("{pool}{}", services("a")), &[])
    else {
        return;
    };
    let before = lb.bed.datapath.maps().fingerprint().unwrap();
    let renamed = Config::parse(&format!("{INTERFACE}{pool}{}", services("b")), "t").unwrap();
    let mut resolver = StaticResolver(HashMap::new());
    let result = lb.balancer.apply(&renamed, lb.bed.datapath.maps_mut(), &mut resolver);
    let Err(lb_userspace::balancer::ApplyError::Capacity(message)) = result else {
        panic!("expected a capacity error, got {result:?}");
    };
    assert!(message.contains("1040 service ids"), "{message}");
    assert_eq!(lb.bed.datapath.maps().fingerprint().unwrap(), before, "the maps changed");
    assert!(lb.balancer.service_id("a7").is_some() && lb.balancer.service_id("b0").is_none());
    let syn = client_packet(CLIENT4.into(), VIP4.into(), IPPROTO_TCP, 46_200, 1007).build();
    assert_eq!(lb.bed.run(&syn).unwrap().verdict, Some(Action::Tx), "still served");
}

#[test]
fn a_fragmented_reply_to_a_nat_source_goes_to_the_host() {
    // No fragment of a backend's oversized reply can be translated back (later fragments
    // carry no ports), and the NAT source is often the host's own address, whose own traffic
    // may be fragmented: the host gets them, untouched (see architecture.md).
    let Some(mut lb) = Lb::new("nat_reply_fragments", &nat_config(false, "udp"), &[]) else {
        return;
    };
    let backend = Ipv4Addr::new(198, 18, 1, 11);
    lb.bed
        .check_all(&[
            Case::pass(
                "first fragment of a reply to the NAT source",
                Packet::ipv4(backend, NAT4)
                    .ipv4_fragment(0, true)
                    .udp(8080, 20_000)
                    .payload(&[0; 16])
                    .build(),
                Reason::NotService,
            ),
            Case::pass(
                "later fragment of a reply to the NAT source",
                Packet::ipv4(backend, NAT4)
                    .ipv4_fragment(100, false)
                    .proto(IPPROTO_UDP)
                    .payload(&[0; 16])
                    .build(),
                Reason::NotService,
            ),
        ])
        .unwrap();
}

#[test]
fn a_packet_the_transmission_refuses_is_counted_dropped_only() {
    // A next hop on an interface the device map does not hold: the packet is dropped as
    // tx_port_missing and must not also count as forwarded to its service and backend.
    let one = dsr_config(false, "tcp").replace("[[pool.backend]]\naddress = \"198.18.1.12\"\n", "");
    let Some(mut lb) = Lb::new("tx_port_missing", &one, &[]) else { return };
    let id = lb.balancer.backend_id(&identity("p", "198.18.1.11")).unwrap();
    let hop = NextHop {
        ifindex: 999_999,
        flags: NEXTHOP_ON_LINK,
        dmac: [2, 0, 0, 0, 1, 11],
        smac: EGRESS_MAC,
    };
    lb.bed.datapath.maps_mut().backends.set_next_hop(id, &hop).unwrap();
    // (The MAC addresses are already rewritten when the device map refuses: a dropped
    // frame's bytes do not matter.)
    let before = lb.bed.datapath.stats().read().unwrap();
    assert_eq!(lb.bed.run(&syn4(46_300)).unwrap().verdict, Some(Action::Drop));
    let delta = lb.bed.datapath.stats().read().unwrap().since(&before);
    assert_eq!(delta.reason(Reason::TxPortMissing).packets, 1, "{}", delta.summary());
    let sid = lb.balancer.service_id("s").unwrap();
    let service = lb.bed.datapath.maps().traffic.service(sid).unwrap();
    let backend = lb.bed.datapath.maps().traffic.backend(id).unwrap();
    assert_eq!((service.packets, service.new_flows, backend.packets), (0, 0, 0));
}

#[test]
fn with_syn_cookies_a_lost_syn_to_the_backend_is_sent_again() {
    // The cookie ACK became a SYN to the backend, and no SYN-ACK came back (lost). The
    // client's segments wait while it may still come; after that, the client's next
    // retransmission carries the cookie again and the backend gets the SYN again, from the
    // same NAT port.
    let config = nat_config(false, "tcp") + "syn_cookies = \"on\"\n";
    let Some(mut lb) = Lb::new("cookies_lost_syn", &config, &[]) else { return };
    let cport = 46_400;
    let client = |flags: u8, seq: u32, ack: u32, data: &[u8]| {
        Packet::ipv4(CLIENT4, VIP4)
            .tcp(cport, 80)
            .flags(flags)
            .seq_ack(seq, ack)
            .payload(data)
            .build()
    };
    let answer = lb.bed.run(&client(tcp_flags::SYN, 700, 0, b"")).unwrap();
    let (cookie, _) = tcp_seq_and_sport(&answer.output, false);
    let first = lb.bed.run(&client(tcp_flags::ACK, 701, cookie.wrapping_add(1), b"")).unwrap();
    assert_eq!(first.verdict, Some(Action::Tx));
    let segment = |frame: &[u8]| {
        let l4 = &frame[14 + 20..];
        let seq = u32::from_be_bytes(l4[4..8].try_into().unwrap());
        (u16::from_be_bytes([l4[0], l4[1]]), seq, l4[13])
    };
    let (nat_port, seq, flags) = segment(&first.output);
    assert_eq!((seq, flags), (700, tcp_flags::SYN));

    // The client's data right away: the SYN-ACK may still come, so it waits.
    let data = client(tcp_flags::ACK | tcp_flags::PSH, 701, cookie.wrapping_add(1), b"GET /");
    let before = lb.bed.datapath.stats().read().unwrap();
    assert_eq!(lb.bed.run(&data).unwrap().verdict, Some(Action::Drop));
    let delta = lb.bed.datapath.stats().read().unwrap().since(&before);
    assert_eq!(delta.reason(Reason::SynProxyPending).packets, 1, "{}", delta.summary());

    // Past the wait (the refresh interval, shortened here), its retransmission sends the
    // SYN again.
    lb.set_globals(|g| g.refresh = 0);
    std::thread::sleep(std::time::Duration::from_millis(30));
    let sid = lb.balancer.service_id("s").unwrap();
    let flows = lb.bed.datapath.maps().traffic.service(sid).unwrap().new_flows;
    let again = lb.bed.run(&data).unwrap();
    assert_eq!(again.verdict, Some(Action::Tx), "the retransmission is answered");
    let after = lb.bed.datapath.maps().traffic.service(sid).unwrap().new_flows;
    assert_eq!(after, flows, "the same connection, not a new flow");
    assert_eq!(segment(&again.output), (nat_port, 700, tcp_flags::SYN), "the same SYN again");
    assert_eq!(again.output.len(), first.output.len(), "without the client's data");
}

#[test]
fn a_backend_answer_for_a_cookie_flow_whose_client_side_is_gone_is_dropped() {
    // The cookie ACK became a SYN to the backend; then the flow's forward entry went (evicted
    // when the table is full, here by hand). The backend's SYN-ACK must not complete a
    // handshake no client packet can reach any more: dropped, the reply entry left waiting.
    let config = nat_config(false, "tcp") + "syn_cookies = \"on\"\n";
    let Some(mut lb) = Lb::new("cookies_client_side_gone", &config, &[]) else { return };
    let cport = 46_500;
    let client = |flags: u8, seq: u32, ack: u32| {
        Packet::ipv4(CLIENT4, VIP4).tcp(cport, 80).flags(flags).seq_ack(seq, ack).build()
    };
    let answer = lb.bed.run(&client(tcp_flags::SYN, 900, 0)).unwrap();
    let (cookie, _) = tcp_seq_and_sport(&answer.output, false);
    let opened = lb.bed.run(&client(tcp_flags::ACK, 901, cookie.wrapping_add(1))).unwrap();
    assert_eq!(opened.verdict, Some(Action::Tx));
    let (backend, bport, nat_port) =
        lb.flow_of(CLIENT4.into(), cport, VIP4.into(), 80, IPPROTO_TCP);
    let key = lb_common::FlowKey::new((CLIENT4, cport).into(), (VIP4, 80).into(), IPPROTO_TCP);
    assert_eq!(lb.bed.datapath.maps_mut().conntrack.evict(vec![key]), 1);
    let IpAddr::V4(backend4) = backend else { unreachable!() };
    let syn_ack = Packet::ipv4(backend4, NAT4)
        .macs(backend_mac(backend), LB_MAC)
        .tcp(bport, nat_port)
        .flags(tcp_flags::SYN | tcp_flags::ACK)
        .seq_ack(0x1234_5678, 901)
        .build();
    lb.bed
        .check_all(&[Case {
            description: "the backend's SYN-ACK after the client's side went".into(),
            input: syn_ack,
            verdict: Action::Drop,
            reason: Some(Reason::SynProxyPending),
            output: Output::Unchanged,
        }])
        .unwrap();
    let entries = lb.bed.datapath.maps().conntrack.entries().unwrap();
    assert_eq!(entries.len(), 1, "the reply entry alone: {entries:?}");
    let reply = entries[0].1;
    assert!(reply.flags & FLOW_REPLY != 0, "{reply:?}");
    assert!(
        reply.flags & lb_common::conntrack::FLOW_SYN_PROXY != 0,
        "still waiting, not completed: {reply:?}"
    );
}

#[test]
fn a_removed_backend_configured_again_takes_its_id_back() {
    // Removed, its flows draining under its retired id; configured again before they end:
    // the same id, so its flows go on as its own (not cut at a drain deadline) and its
    // counters keep counting.
    let config = dsr_config(false, "tcp");
    let Some(mut lb) = Lb::new("retired_taken_back", &config, &[]) else { return };
    let b = identity("p", "198.18.1.12");
    let id = lb.balancer.backend_id(&b).unwrap();
    lb.reapply(&config.replace("[[pool.backend]]\naddress = \"198.18.1.12\"\n", ""));
    assert_eq!(lb.balancer.retired().map(|(i, _)| i).collect::<Vec<_>>(), vec![id]);
    lb.reapply(&config);
    assert_eq!(lb.balancer.backend_id(&b), Some(id), "the same id");
    assert_eq!(lb.balancer.retired().count(), 0, "no longer retired");
}

#[test]
fn a_backend_removed_while_lbd_was_down_retires_under_its_pool() {
    // Removed from the file while lbd was down: the restarted lbd finds its id in the pinned
    // maps only, and must know its pool, or the pool's drain deadline never cuts its flows.
    let config = dsr_config(false, "tcp").replace("198.18.1.12", "198.18.1.13");
    let Some(mut lb) = Lb::new("removed_while_down", &config, &[]) else { return };
    let gone = identity("p", "198.18.1.13");
    let id = lb.balancer.backend_id(&gone).unwrap();
    lb.restart_balancer();
    lb.reapply(&config.replace("[[pool.backend]]\naddress = \"198.18.1.13\"\n", ""));
    let retired: Vec<_> = lb.balancer.retired().map(|(i, b)| (i, b.clone())).collect();
    assert_eq!(retired, vec![(id, gone)], "retired under its pool");
}

#[test]
fn auto_syn_cookies_on_at_a_restart_stay_on() {
    // A flood had switched an `auto` service's cookies on when the daemon stopped: the
    // restarted one (knowing the maps only) keeps them on rather than turning them off for
    // its first seconds, the flood's SYNs opening flows meanwhile. A service no longer in
    // `auto` mode takes its mode's setting.
    let config = nat_config(false, "tcp") + "syn_cookies = \"auto\"\n";
    let Some(mut lb) = Lb::new("auto_cookies_restart", &config, &[]) else { return };
    let cookies = |lb: &Lb| {
        let services = lb.bed.datapath.maps().services.entries().unwrap();
        services[0].1.flags & lb_common::service::SERVICE_SYN_COOKIES != 0
    };
    assert!(!cookies(&lb));
    lb.balancer.set_cookies_active("s", true, lb.bed.datapath.maps_mut()).unwrap();
    assert!(cookies(&lb));
    lb.restart_balancer();
    lb.reapply(&config);
    assert!(cookies(&lb), "the restarted daemon turned the cookies off");
    assert!(lb.balancer.cookies_active("s"));
    // Restarted again with the service set to "off": off.
    lb.restart_balancer();
    lb.reapply(&config.replace("syn_cookies = \"auto\"", "syn_cookies = \"off\""));
    assert!(!cookies(&lb), "an off service kept an auto state");
}

#[test]
fn a_change_that_fails_after_a_services_new_table_gets_the_old_table_back() {
    // Service `s` moves to port 81 with one backend fewer, and a new service takes its port
    // 80: `s`'s new table goes in, then its new entry is refused (the service map is full,
    // and its old key stays, claimed by the new service). The daemon puts a failed change
    // back by applying the old configuration again, which must install `s`'s old table
    // again: left on the new one, `s` would balance new flows by a rejected configuration.
    let Some(mut lb) = Lb::new("failed_table_put_back", &dsr_config(false, "tcp"), &[]) else {
        return;
    };
    let sid = lb.balancer.service_id("s").unwrap();
    let before = lb.bed.datapath.maps().maglev.table(sid).unwrap().unwrap();
    let changed = dsr_config(false, "tcp")
        .replace("[[pool.backend]]\naddress = \"198.18.1.12\"\n", "")
        .replace("port = 80\n", "port = 81\n")
        + "[[service]]\nname = \"t\"\naddress = \"198.18.100.1\"\nprotocol = \"tcp\"\nport = 80\npool = \"p\"\nmode = \"dsr-l2\"\n";
    let services = &mut lb.bed.datapath.maps_mut().services;
    let used = services.entries().unwrap().len();
    let filler = |i: usize| lb_common::service::ServiceKey {
        addr: [(0xc613_0000 | u32::try_from(i).unwrap()).to_be(), 0, 0, 0],
        port: 80u16.to_be(),
        proto: IPPROTO_TCP,
        family: 4,
    };
    let fillers = lb_common::service::MAX_SERVICES as usize - used;
    let dummy = services.entries().unwrap()[0].1;
    for i in 0..fillers {
        services.upsert(&filler(i), &dummy).unwrap();
    }
    let error = lb.try_apply(&changed).expect_err("the full service map refuses the new entry");
    assert_ne!(
        lb.bed.datapath.maps().maglev.table(sid).unwrap().unwrap(),
        before,
        "the new table went in before the failure: {error:#}"
    );
    let services = &mut lb.bed.datapath.maps_mut().services;
    for i in 0..fillers {
        services.remove(&filler(i)).unwrap();
    }
    lb.reapply(&dsr_config(false, "tcp"));
    assert_eq!(
        lb.bed.datapath.maps().maglev.table(sid).unwrap().unwrap(),
        before,
        "the old table is back"
    );
}

#[test]
fn the_address_sets_are_replaced_within_their_room() {
    // A full set of NAT sources replaced by as many others (a start adopting a pinned data
    // path whose services all moved to new addresses): the old ones leave before the new
    // ones come in, or the map would need room for both and refuse the change, at every
    // start. The service addresses are left as they are.
    let Some(mut lb) = Lb::new("address_sets_room", &nat_config(false, "tcp"), &[]) else {
        return;
    };
    let services = &mut lb.bed.datapath.maps_mut().services;
    let (vips, _) = services.addresses().unwrap();
    let set = |third: u8| -> Vec<(lb_common::service::AddrKey, u32)> {
        (0..lb_common::service::MAX_NAT_SOURCES)
            .map(|i| {
                let addr = Ipv4Addr::from(0xc613_0000 | u32::from(third) << 8 | i);
                (
                    lb_common::service::AddrKey {
                        addr: [u32::from(addr).to_be(), 0, 0, 0],
                        family: 4,
                    },
                    1,
                )
            })
            .collect()
    };
    services.set_addresses(&vips, &set(0)).unwrap();
    services.set_addresses(&vips, &set(8)).expect("a full set replaced by another");
    let (_, sources) = services.addresses().unwrap();
    let mut sources: Vec<_> = sources.into_iter().map(|(k, _)| k.addr[0]).collect();
    sources.sort_unstable();
    let mut wanted: Vec<_> = set(8).into_iter().map(|(k, _)| k.addr[0]).collect();
    wanted.sort_unstable();
    assert_eq!(sources, wanted);
}

#[test]
fn a_flow_picked_up_mid_stream_is_unconfirmed_until_its_next_packet() {
    // An ACK without a flow opens one (a failover's or a restart's live connection). A NAT
    // one on the SYN timeout until its next packet: a spoofed ACK flood's entries and NAT
    // ports must not be held for the established timeout (and a picked-up NAT connection
    // cannot go on anyway). A DSR one established at once: a live connection taken over,
    // pinned to its backend however rarely it sends.
    for (name, config, first) in [
        ("nat", nat_config(false, "tcp"), FlowState::SynSeen),
        ("dsr", dsr_config(false, "tcp"), FlowState::Established),
    ] {
        let Some(mut lb) = Lb::new(&format!("pickup_{name}"), &config, &[]) else { return };
        let port = 46_600;
        let ack = Packet::ipv4(CLIENT4, VIP4).tcp(port, 80).flags(tcp_flags::ACK).build();
        let key = lb_common::FlowKey::new((CLIENT4, port).into(), (VIP4, 80).into(), IPPROTO_TCP);
        let state = |lb: &Lb| lb.bed.datapath.maps().conntrack.get(&key).expect("tracked").state;
        assert_eq!(lb.bed.run(&ack).unwrap().verdict, Some(Action::Tx), "{name}");
        assert_eq!(state(&lb), first as u8, "{name}: picked up");
        assert_eq!(lb.bed.run(&ack).unwrap().verdict, Some(Action::Tx), "{name}");
        assert_eq!(state(&lb), FlowState::Established as u8, "{name}: its next packet");
    }
}

#[test]
fn a_young_cookie_connection_s_own_ack_after_a_forged_syn_is_not_a_new_connection() {
    // Before either side sends data, a cookie-opened connection's client segments carry a
    // valid cookie (sequence ISN + 1, acknowledgement cookie + 1). After a forged RST and
    // SYN, the client's challenge ACK is such a segment: it must go on as the connection's,
    // shifted, not start the tuple over.
    let config = nat_config(false, "tcp") + "syn_cookies = \"on\"\n";
    let Some(mut lb) = Lb::new("young_cookie_ack", &config, &[]) else { return };
    let cport = 46_800;
    let client = |flags: u8, seq: u32, ack: u32| {
        Packet::ipv4(CLIENT4, VIP4).tcp(cport, 80).flags(flags).seq_ack(seq, ack).build()
    };
    let (cookie, before) = lb.cookie_connection(cport, 100);
    assert_eq!(lb.bed.run(&client(tcp_flags::RST, 55_555, 0)).unwrap().verdict, Some(Action::Tx));
    assert_eq!(lb.bed.run(&client(tcp_flags::SYN, 66_666, 0)).unwrap().verdict, Some(Action::Tx));
    let own = lb.bed.run(&client(tcp_flags::ACK, 101, cookie.wrapping_add(1))).unwrap();
    assert_eq!(own.verdict, Some(Action::Tx));
    assert_eq!(own.output[14 + 20 + 13], tcp_flags::ACK, "not a SYN to the backend");
    let ack = u32::from_be_bytes(own.output[14 + 20 + 8..14 + 20 + 12].try_into().unwrap());
    assert_eq!(ack, 5001, "shifted as the connection's segments are");
    assert_eq!(lb.flow_of(CLIENT4.into(), cport, VIP4.into(), 80, IPPROTO_TCP), before);
    // A cookie connection is not brought back from a reset by its stray segments: the
    // client's next SYN on the tuple gets a cookie, not the old connection's numbering.
    let key = lb_common::FlowKey::new((CLIENT4, cport).into(), (VIP4, 80).into(), IPPROTO_TCP);
    let state = lb.bed.datapath.maps().conntrack.get(&key).unwrap().state;
    assert_eq!(state, FlowState::Closed as u8);
    let again = lb.bed.run(&client(tcp_flags::SYN, 9_000, 0)).unwrap();
    assert_eq!(again.verdict, Some(Action::Tx));
    assert_eq!(again.output[14 + 20 + 13], tcp_flags::SYN | tcp_flags::ACK, "a cookie SYN-ACK");
}

#[test]
fn a_tuple_whose_port_probes_met_taken_ports_finds_the_free_one_by_trying_again() {
    // A hundred NAT ports to one backend, ninety-nine of them held: a new tuple's sixteen
    // probes miss the one free port most of the time. Its retransmitted SYN must draw other
    // ports (not walk the same sixteen again, refused for as long as it tries). Eight
    // tuples in turn, each freed after it got the port: with fixed probes, all eight would
    // have to have the free port among their own by chance.
    let config = one_port_nat_config().replace("20000-20000", "20000-20099");
    let Some(mut lb) = Lb::new("probes_draw_again", &config, &[]) else { return };
    let syn = |cport: u16| Packet::ipv4(CLIENT4, VIP4).tcp(cport, 80).flags(tcp_flags::SYN).build();
    let key = |cport: u16| {
        lb_common::FlowKey::new((CLIENT4, cport).into(), (VIP4, 80).into(), IPPROTO_TCP)
    };
    let mut held = 0;
    for cport in 30_000..35_000u16 {
        if held == 99 {
            break;
        }
        if lb.bed.run(&syn(cport)).unwrap().verdict == Some(Action::Tx) {
            held += 1;
        }
    }
    assert_eq!(held, 99, "ninety-nine ports held");
    for cport in 40_000..40_008u16 {
        let took = (0..150).any(|_| lb.bed.run(&syn(cport)).unwrap().verdict == Some(Action::Tx));
        assert!(took, "client port {cport}: the free port never found in 150 SYNs");
        // Free the port again for the next tuple: the flow's two entries go.
        let (_, bport, nat_port) = lb.flow_of(CLIENT4.into(), cport, VIP4.into(), 80, IPPROTO_TCP);
        let backend = Ipv4Addr::new(198, 18, 1, 11);
        let reply =
            lb_common::FlowKey::new((backend, bport).into(), (NAT4, nat_port).into(), IPPROTO_TCP);
        assert_eq!(lb.bed.datapath.maps_mut().conntrack.evict(vec![key(cport), reply]), 2);
    }
}
