//! Datapath tests of the packet parser: the real XDP object run through `BPF_PROG_TEST_RUN`
//! on well-formed and malformed frames. With no service configured, every frame must pass
//! untouched, counted once by verdict and once by the reason the parser gives.

#![allow(clippy::too_many_lines, reason = "case tables read best as one list")]

use std::net::{Ipv4Addr, Ipv6Addr};

use lb_common::{
    Reason,
    net::{ETH_P_8021AD, IPPROTO_TCP, IPPROTO_UDP},
};
use lb_tests::{
    packet::{ExtHeader, Packet, tcp_flags},
    privileged::require_privileges,
    testrun::{Case, TestBed},
};

const SRC4: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 2);
const DST4: Ipv4Addr = Ipv4Addr::new(198, 18, 100, 1);
const SRC6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, 2);
const DST6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x100, 0, 0, 0, 0, 0, 1);

fn v4() -> Packet {
    Packet::ipv4(SRC4, DST4)
}

fn v6() -> Packet {
    Packet::ipv6(SRC6, DST6)
}

fn testbed(name: &str) -> Option<TestBed> {
    if !require_privileges(name) {
        return None;
    }
    Some(TestBed::load().expect("load the XDP object"))
}

/// Sets the IPv4 total length of a frame without VLAN tags.
fn set_ipv4_total_len(frame: &mut [u8], len: usize) {
    frame[16..18].copy_from_slice(&u16::try_from(len).unwrap().to_be_bytes());
}

#[test]
fn well_formed_frames_pass_untouched() {
    let Some(mut bed) = testbed("well_formed_frames_pass_untouched") else {
        return;
    };
    let cases = vec![
        Case::pass(
            "IPv4 TCP SYN",
            v4().tcp(40000, 80).flags(tcp_flags::SYN).build(),
            Reason::NotService,
        ),
        Case::pass(
            "IPv4 TCP with payload",
            v4().tcp(40000, 80).payload(b"GET / HTTP/1.1\r\n\r\n").build(),
            Reason::NotService,
        ),
        Case::pass("IPv4 UDP", v4().udp(5353, 53).payload(b"query").build(), Reason::NotService),
        Case::pass(
            "IPv4 ICMP echo request",
            v4().echo_request(1, 1).payload(&[0; 56]).build(),
            Reason::NotService,
        ),
        Case::pass(
            "IPv4 GRE (no L4 parsed)",
            v4().proto(47).payload(&[0; 8]).build(),
            Reason::NotService,
        ),
        Case::pass(
            "IPv6 TCP",
            v6().tcp(40000, 443).flags(tcp_flags::SYN).build(),
            Reason::NotService,
        ),
        Case::pass("IPv6 UDP", v6().udp(40000, 53).payload(b"q").build(), Reason::NotService),
        Case::pass("IPv6 ICMPv6 echo request", v6().echo_request(1, 1).build(), Reason::NotService),
        Case::pass("ARP request", Packet::arp_request(SRC4, DST4).build(), Reason::NotIp),
        Case::pass("LLDP frame", Packet::raw(0x88cc, &[0; 46]).build(), Reason::NotIp),
        Case::pass("802.1Q-tagged IPv4 UDP", v4().vlan(100).udp(1, 53).build(), Reason::NotService),
        Case::pass(
            "802.1Q-tagged IPv6 TCP",
            v6().vlan(4094).tcp(1, 80).build(),
            Reason::NotService,
        ),
        Case::pass(
            "QinQ (802.1ad + 802.1Q) IPv4 TCP",
            v4().vlan_tpid(ETH_P_8021AD, 10).vlan(20).tcp(1, 80).build(),
            Reason::NotService,
        ),
        Case::pass(
            "802.1Q-tagged ARP",
            Packet::arp_request(SRC4, DST4).vlan(7).build(),
            Reason::NotIp,
        ),
        Case::pass(
            "IPv4 with 20 bytes of options, TCP",
            v4().ipv4_options(&[0x94, 4, 0, 0, 1, 1, 1, 1, 7, 11, 4, 0, 0, 0, 0, 0, 0, 0, 0, 0])
                .tcp(1, 80)
                .build(),
            Reason::NotService,
        ),
        Case::pass(
            "IPv4 with the maximum 40 bytes of options, UDP",
            v4().ipv4_options(&[1; 40]).udp(1, 53).build(),
            Reason::NotService,
        ),
        Case::pass(
            "IPv4 first fragment, UDP",
            v4().ipv4_fragment(0, true).udp(1, 53).payload(&[0; 32]).build(),
            Reason::NotService,
        ),
        Case::pass(
            "IPv4 later fragment (no L4 header)",
            v4().ipv4_fragment(185, false).proto(IPPROTO_UDP).payload(&[0xff; 3]).build(),
            Reason::NotService,
        ),
        Case::pass(
            "IPv6 with hop-by-hop, destination options, routing and fragment headers, TCP",
            v6().ext_header(ExtHeader::HopByHop { len: 0 })
                .ext_header(ExtHeader::DestOpts { len: 1 })
                .ext_header(ExtHeader::Routing { len: 2 })
                .ext_header(ExtHeader::Fragment { offset: 0, more: true, id: 7 })
                .tcp(1, 80)
                .build(),
            Reason::NotService,
        ),
        Case::pass(
            "IPv6 with six extension headers (the limit), UDP",
            (0..6)
                .fold(v6(), |p, _| p.ext_header(ExtHeader::DestOpts { len: 0 }))
                .udp(1, 53)
                .build(),
            Reason::NotService,
        ),
        Case::pass(
            "IPv6 later fragment (no L4 header)",
            v6().ext_header(ExtHeader::Fragment { offset: 100, more: false, id: 7 })
                .proto(IPPROTO_TCP)
                .payload(&[1, 2, 3])
                .build(),
            Reason::NotService,
        ),
        Case::pass(
            "IPv4 UDP with Ethernet padding to 60 bytes",
            {
                let mut f = v4().udp(1, 53).build();
                f.resize(60, 0);
                f
            },
            Reason::NotService,
        ),
        Case::pass(
            "TCP with options (MSS, SACK, timestamps)",
            v4().tcp(1, 80)
                .flags(tcp_flags::SYN)
                .tcp_options(&[2, 4, 5, 0xb4, 4, 2, 8, 10, 0, 0, 0, 1, 0, 0, 0, 0, 1, 3, 3, 7])
                .build(),
            Reason::NotService,
        ),
    ];
    bed.check_all(&cases).unwrap();
}

#[test]
fn malformed_headers_pass_to_the_kernel_with_their_reason() {
    let Some(mut bed) = testbed("malformed_headers_pass_to_the_kernel_with_their_reason") else {
        return;
    };
    let tcp4 = v4().tcp(40000, 80).payload(b"data").build();
    let mut cases = Vec::new();

    let mut f = tcp4.clone();
    f[14] = 0x44;
    cases.push(Case::pass("IPv4 IHL 4 (below 5)", f, Reason::BadIpv4Header));
    let mut f = tcp4.clone();
    f[14] = 0x40;
    cases.push(Case::pass("IPv4 IHL 0", f, Reason::BadIpv4Header));
    let mut f = tcp4.clone();
    f[14] = 0x65;
    cases.push(Case::pass("IPv4 EtherType with version 6", f, Reason::BadIpv4Header));
    let mut f = tcp4.clone();
    let len = f.len() - 14;
    set_ipv4_total_len(&mut f, len + 1);
    cases.push(Case::pass("IPv4 total length one byte beyond the frame", f, Reason::BadIpv4Header));
    let mut f = tcp4.clone();
    set_ipv4_total_len(&mut f, 0xffff);
    cases.push(Case::pass("IPv4 total length 65535", f, Reason::BadIpv4Header));
    let mut f = tcp4.clone();
    set_ipv4_total_len(&mut f, 19);
    cases.push(Case::pass("IPv4 total length below the header length", f, Reason::BadIpv4Header));
    let mut f = v4().udp(1, 2).build();
    f[14] = 0x4f;
    cases.push(Case::pass("IPv4 IHL 15 with a total length of 28", f, Reason::BadIpv4Header));

    let mut f = tcp4.clone();
    f[14 + 20 + 12] = 0x40;
    cases.push(Case::pass("TCP data offset 4 (below 5)", f, Reason::BadTcpHeader));
    let mut f = tcp4.clone();
    f[14 + 20 + 12] = 0xf0;
    cases.push(Case::pass("TCP data offset 15, beyond the packet", f, Reason::Truncated));
    // Lengths consistent with a cut-off L4 header: IP says the packet ends inside it.
    for (name, base, keep) in [
        ("TCP header cut to 19 bytes", v4().tcp(1, 80).build(), 19),
        ("UDP header cut to 7 bytes", v4().udp(1, 53).build(), 7),
        ("ICMP header cut to 4 bytes", v4().echo_request(1, 1).build(), 4),
    ] {
        let mut f = base[..14 + 20 + keep].to_vec();
        set_ipv4_total_len(&mut f, 20 + keep);
        cases.push(Case::pass(format!("IPv4 {name}"), f, Reason::Truncated));
    }

    let udp6 = v6().udp(1, 53).payload(b"x").build();
    let mut f = udp6.clone();
    f[14] = 0x40;
    cases.push(Case::pass("IPv6 EtherType with version 4", f, Reason::BadIpv6Header));
    let mut f = udp6.clone();
    let payload = u16::try_from(f.len() - 54 + 1).unwrap();
    f[18..20].copy_from_slice(&payload.to_be_bytes());
    cases.push(Case::pass(
        "IPv6 payload length one byte beyond the frame",
        f,
        Reason::BadIpv6Header,
    ));
    cases.push(Case::pass(
        "IPv6 with seven extension headers (one beyond the limit)",
        (0..7).fold(v6(), |p, _| p.ext_header(ExtHeader::DestOpts { len: 0 })).udp(1, 53).build(),
        Reason::TooManyExtHeaders,
    ));
    cases.push(Case::pass(
        "IPv6 hop-by-hop header of 1,128 bytes (past the parse bound)",
        v6().ext_header(ExtHeader::HopByHop { len: 140 }).udp(1, 53).build(),
        Reason::HeadersTooLong,
    ));
    let mut f = v6().ext_header(ExtHeader::HopByHop { len: 0 }).udp(1, 53).build();
    f[54 + 1] = 255;
    cases.push(Case::pass(
        "IPv6 hop-by-hop header claiming 2,048 bytes in a short frame",
        f,
        Reason::Truncated,
    ));

    cases.push(Case::pass(
        "three stacked VLAN tags (one beyond the limit)",
        v4().vlan_tpid(ETH_P_8021AD, 1).vlan(2).vlan(3).udp(1, 53).build(),
        Reason::TooManyVlanTags,
    ));
    bed.check_all(&cases).unwrap();
}

/// The reason a frame cut to `len` bytes gets, from where its headers end.
fn truncation_reason(len: usize, l3_off: usize, l3_hdr: usize, v6: bool) -> Reason {
    if len < l3_off + l3_hdr {
        Reason::Truncated
    } else if v6 {
        // The fixed header fits, so the payload length now points past the frame.
        Reason::BadIpv6Header
    } else {
        Reason::BadIpv4Header
    }
}

#[test]
fn frames_truncated_at_every_length_are_counted_not_misread() {
    let Some(mut bed) = testbed("frames_truncated_at_every_length_are_counted_not_misread") else {
        return;
    };
    let frames = [
        ("IPv4 TCP", v4().tcp(1, 80).payload(b"abc").build_layout(), false, 20),
        ("IPv4 UDP", v4().udp(1, 53).payload(b"abc").build_layout(), false, 20),
        ("IPv4 ICMP", v4().echo_request(1, 1).build_layout(), false, 20),
        (
            "IPv4 with options, TCP",
            v4().ipv4_options(&[1; 12]).tcp(1, 80).build_layout(),
            false,
            20,
        ),
        ("802.1Q IPv4 UDP", v4().vlan(5).udp(1, 53).build_layout(), false, 20),
        (
            "QinQ IPv6 TCP",
            v6().vlan_tpid(ETH_P_8021AD, 1).vlan(2).tcp(1, 80).build_layout(),
            true,
            40,
        ),
        (
            "IPv6 hop-by-hop + fragment, UDP",
            v6().ext_header(ExtHeader::HopByHop { len: 0 })
                .ext_header(ExtHeader::Fragment { offset: 0, more: true, id: 1 })
                .udp(1, 53)
                .payload(b"abc")
                .build_layout(),
            true,
            40,
        ),
        ("IPv6 ICMPv6", v6().echo_request(1, 1).build_layout(), true, 40),
    ];
    let mut cases = Vec::new();
    for (name, layout, is_v6, l3_hdr) in frames {
        // BPF_PROG_TEST_RUN refuses XDP input shorter than an Ethernet header, so cuts start
        // there; the parser's own Ethernet bound is covered by the VLAN cuts below it.
        for len in 14..layout.bytes.len() {
            let reason = if len < layout.l3_off {
                Reason::Truncated
            } else {
                truncation_reason(len, layout.l3_off, l3_hdr, is_v6)
            };
            cases.push(Case::pass(
                format!("{name} cut to {len} bytes"),
                layout.bytes[..len].to_vec(),
                reason,
            ));
        }
    }
    assert!(cases.len() > 300, "only {} truncation cases", cases.len());
    bed.check_all(&cases).unwrap();
}

#[test]
fn counters_add_up_over_a_mixed_batch() {
    let Some(mut bed) = testbed("counters_add_up_over_a_mixed_batch") else {
        return;
    };
    let frames = [
        v4().tcp(1, 80).build(),
        v6().udp(1, 53).build(),
        Packet::arp_request(SRC4, DST4).build(),
        v4().tcp(1, 80).build()[..30].to_vec(),
    ];
    let before = bed.stats().unwrap();
    for round in 0..25 {
        for frame in &frames {
            let result = bed.run(frame).unwrap();
            assert_eq!(result.output, *frame, "round {round}: frame changed");
        }
    }
    let delta = bed.stats().unwrap().since(&before);
    assert_eq!(delta.packets(), 100);
    assert_eq!(delta.action(lb_common::Action::Pass).packets, 100);
    assert_eq!(delta.reason(Reason::NotService).packets, 50);
    assert_eq!(delta.reason(Reason::NotIp).packets, 25);
    assert_eq!(delta.reason(Reason::Truncated).packets, 25);
    let bytes: u64 = frames.iter().map(|f| f.len() as u64).sum::<u64>() * 25;
    assert_eq!(delta.action(lb_common::Action::Pass).bytes, bytes);
}
