//! Datapath tests of the firewall: the real XDP object with rule sets compiled and installed
//! by the daemon's own code, frames run through `BPF_PROG_TEST_RUN`. Every match kind and
//! action on IPv4 and IPv6, first-match precedence, the default policy, audit mode, rule
//! counters, atomic rule-set switches and in-place prefix updates, rate limits against the
//! clock, and a million prefixes per family.

#![allow(clippy::too_many_lines, reason = "case tables read best as one list")]
#![allow(clippy::cast_precision_loss, reason = "rates over a second")]
#![allow(clippy::cast_possible_truncation, reason = "random bits cut to addresses")]

use std::{
    fmt::Write as _,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    time::{Duration, Instant},
};

use lb_common::{
    Action, Reason,
    firewall::{
        AUDIT_SLOT, DEFAULT_SLOT, EVENT_AUDITED, EVENT_DROPPED, EVENT_PASSED, FILTER_CHUNK_BITS,
        FilterChunk, FwEvent, META_SRC_FILTER, SRC_FILTER_CHUNKS, filter_v4_16, filter_v4_24,
        filter_v6_32,
    },
    net::{IPPROTO_TCP, tcp_flags},
};
use lb_tests::{
    packet::{ExtHeader, Packet},
    privileged::require_privileges,
    testrun::{Case, TestBed},
};
use lb_userspace::{
    Config,
    firewall::{self, Firewall, InstallSummary},
    maps::firewall::Direction,
};

const INTERFACE: &str = "[[interface]]\nname = \"lo\"\n";

/// A test bed with a firewall installed from TOML.
struct Fw {
    bed: TestBed,
    firewall: Firewall,
    hz: u64,
}

impl Fw {
    fn new(name: &str, toml: &str) -> Option<Self> {
        if !require_privileges(name) {
            return None;
        }
        let mut bed = TestBed::load().unwrap();
        let hz = bed.datapath.ticks_per_second().unwrap();
        let mut fw = Self { bed, firewall: Firewall::fresh(), hz };
        fw.install(toml);
        Some(fw)
    }

    fn install(&mut self, toml: &str) -> InstallSummary {
        let compiled = compile(toml, self.hz);
        self.firewall.install(&mut self.bed.datapath.maps_mut().firewall, Some(&compiled)).unwrap()
    }

    /// Packets counted by a rule (or slot) of the active generation.
    fn hits(&self, slot: u32) -> u64 {
        let generation = self.firewall.active_generation().unwrap();
        self.bed.datapath.maps().firewall.counter(generation, slot).unwrap().packets
    }
}

/// Words of a `FW_SRC_FILTER` element.
fn chunk_words() -> usize {
    (FILTER_CHUNK_BITS / 64) as usize
}

fn compile(toml: &str, hz: u64) -> firewall::Compiled {
    let config = Config::parse(&format!("{INTERFACE}{toml}"), "fixture").unwrap();
    firewall::compile(config.firewall.as_ref().unwrap(), hz).unwrap()
}

/// The events waiting in the firewall's ring buffer, oldest first.
fn drain(events: &mut aya::maps::RingBuf<aya::maps::MapData>) -> Vec<FwEvent> {
    let mut out = Vec::new();
    while let Some(item) = events.next() {
        out.push(firewall::log::decode(&item).unwrap());
    }
    out
}

fn deny(description: &str, input: Vec<u8>, reason: Reason) -> Case {
    Case {
        description: description.into(),
        input,
        verdict: Action::Drop,
        reason: Some(reason),
        output: lb_tests::testrun::Output::Unchanged,
    }
}

fn allow(description: &str, input: Vec<u8>) -> Case {
    Case::pass(description, input, Reason::NotService)
}

fn tcp4(src: [u8; 4], dst: [u8; 4], dport: u16, flags: u8) -> Vec<u8> {
    Packet::ipv4(src.into(), dst.into()).tcp(40000, dport).flags(flags).build()
}

fn tcp6(src: &str, dst: &str, dport: u16, flags: u8) -> Vec<u8> {
    Packet::ipv6(src.parse().unwrap(), dst.parse().unwrap()).tcp(40000, dport).flags(flags).build()
}

const RULES: &str = r#"
[firewall]
[[firewall.rule]]
name = "admins"
action = "allow"
source = ["198.18.0.16/28", "fd00::10/124"]
[[firewall.rule]]
name = "block"
action = "deny"
source = ["198.18.0.0/24", "fd00::/64"]
[[firewall.rule]]
name = "no-telnet"
action = "deny"
protocol = "tcp"
ports = [23, "6000-6010"]
[[firewall.rule]]
name = "udp-to-lab"
action = "deny"
protocol = "udp"
destination = ["198.18.200.0/24", "fd00:200::/64"]
[[firewall.rule]]
name = "no-ping"
action = "deny"
protocol = "icmp"
icmp_types = [8, 128]
[[firewall.rule]]
name = "syn-fin"
action = "deny"
protocol = "tcp"
tcp_flags = "syn,fin"
"#;

#[test]
fn every_match_and_action_in_both_families() {
    let Some(mut fw) = Fw::new("every_match_and_action_in_both_families", RULES) else { return };
    let (syn, synfin, ack) = (tcp_flags::SYN, tcp_flags::SYN | tcp_flags::FIN, tcp_flags::ACK);
    let other4 = [198, 18, 5, 5];
    let dst4 = [198, 18, 100, 1];
    let cases = vec![
        // Precedence: the admins' /28 sits inside the blocked /24; the first match wins.
        allow("v4 admin inside the blocked /24, telnet", tcp4([198, 18, 0, 20], dst4, 23, syn)),
        deny("v4 blocked source", tcp4([198, 18, 0, 5], dst4, 80, syn), Reason::FirewallDeny),
        deny(
            "v4 blocked source, UDP",
            Packet::ipv4([198, 18, 0, 255].into(), dst4.into()).udp(1, 53).build(),
            Reason::FirewallDeny,
        ),
        allow("v4 just outside the /24", tcp4([198, 18, 1, 0], dst4, 80, syn)),
        deny("v4 telnet", tcp4(other4, dst4, 23, syn), Reason::FirewallDeny),
        deny("v4 range start", tcp4(other4, dst4, 6000, ack), Reason::FirewallDeny),
        deny("v4 range end", tcp4(other4, dst4, 6010, ack), Reason::FirewallDeny),
        allow("v4 after the range", tcp4(other4, dst4, 6011, ack)),
        allow(
            "v4 telnet port over UDP",
            Packet::ipv4(other4.into(), dst4.into()).udp(1, 23).build(),
        ),
        deny(
            "v4 UDP to a blocked destination",
            Packet::ipv4(other4.into(), [198, 18, 200, 9].into()).udp(1, 53).build(),
            Reason::FirewallDeny,
        ),
        allow("v4 TCP to that destination", tcp4(other4, [198, 18, 200, 9], 53, syn)),
        deny(
            "v4 echo request",
            Packet::ipv4(other4.into(), dst4.into()).echo_request(1, 1).build(),
            Reason::FirewallDeny,
        ),
        allow(
            "v4 echo reply",
            Packet::ipv4(other4.into(), dst4.into()).icmp(0, 0, [0, 1, 0, 1]).build(),
        ),
        deny("v4 SYN+FIN", tcp4(other4, dst4, 80, synfin), Reason::FirewallDeny),
        allow("v4 SYN alone", tcp4(other4, dst4, 80, syn)),
        deny(
            "v4 later fragment from a blocked source",
            Packet::ipv4([198, 18, 0, 7].into(), dst4.into())
                .ipv4_fragment(185, false)
                .payload(&[0; 16])
                .build(),
            Reason::FirewallDeny,
        ),
        allow(
            "v4 later fragment elsewhere: no port, so the telnet rule cannot match",
            Packet::ipv4(other4.into(), dst4.into())
                .ipv4_fragment(185, false)
                .payload(&[0; 16])
                .build(),
        ),
        Case::pass(
            "ARP is not the firewall's",
            Packet::arp_request(Ipv4Addr::new(198, 18, 0, 5), Ipv4Addr::new(198, 18, 0, 1)).build(),
            Reason::NotIp,
        ),
        // IPv6.
        allow("v6 admin", tcp6("fd00::1f", "fd00:100::1", 23, syn)),
        deny("v6 blocked source", tcp6("fd00::ffff", "fd00:100::1", 80, syn), Reason::FirewallDeny),
        allow("v6 outside the /64", tcp6("fd00:0:0:1::5", "fd00:100::1", 80, syn)),
        deny("v6 telnet", tcp6("fd00:5::5", "fd00:100::1", 23, syn), Reason::FirewallDeny),
        deny(
            "v6 UDP to a blocked destination",
            Packet::ipv6("fd00:5::5".parse().unwrap(), "fd00:200::9".parse().unwrap())
                .udp(1, 53)
                .build(),
            Reason::FirewallDeny,
        ),
        deny(
            "v6 echo request (ICMPv6 128)",
            Packet::ipv6("fd00:5::5".parse().unwrap(), "fd00:100::1".parse().unwrap())
                .proto(58)
                .icmp(128, 0, [0, 1, 0, 1])
                .build(),
            Reason::FirewallDeny,
        ),
        deny("v6 SYN+FIN", tcp6("fd00:5::5", "fd00:100::1", 80, synfin), Reason::FirewallDeny),
        allow("v6 plain ACK", tcp6("fd00:5::5", "fd00:100::1", 80, ack)),
    ];
    fw.bed.check_all(&cases).unwrap();
    // Each rule counted what it matched; allowed packets that matched nothing went to the
    // default slot.
    let expected = [(0, 2), (1, 4), (2, 4), (3, 2), (4, 2), (5, 2), (DEFAULT_SLOT, 9)];
    let mut problems = String::new();
    for (slot, want) in expected {
        let got = fw.hits(slot);
        if got != want {
            let _ = write!(problems, " slot {slot}: {got} != {want};");
        }
    }
    assert!(problems.is_empty(), "counters:{problems}");
}

#[test]
fn default_deny_and_audit_mode() {
    let toml = r#"
[firewall]
default = "deny"
[[firewall.rule]]
name = "web"
action = "allow"
protocol = "tcp"
ports = [80]
[[firewall.rule]]
name = "bad"
action = "deny"
source = ["198.18.9.0/24"]
"#;
    let Some(mut fw) = Fw::new("default_deny_and_audit_mode", toml) else { return };
    let dst = [198, 18, 100, 1];
    fw.bed
        .check_all(&[
            allow("v4 web", tcp4([198, 18, 9, 1], dst, 80, tcp_flags::SYN)),
            deny(
                "v4 anything else",
                tcp4([198, 18, 1, 1], dst, 81, 0),
                Reason::FirewallDefaultDeny,
            ),
            deny("v4 the bad source", tcp4([198, 18, 9, 1], dst, 81, 0), Reason::FirewallDeny),
            deny(
                "v6 anything else",
                tcp6("fd00::1", "fd00::2", 22, tcp_flags::SYN),
                Reason::FirewallDefaultDeny,
            ),
        ])
        .unwrap();
    // Audit: the same rules, nothing dropped, every would-be drop counted.
    let summary =
        fw.install(&toml.replace("default = \"deny\"", "default = \"deny\"\naudit = true"));
    assert!(summary.switched, "the policy changed: a new generation");
    fw.bed
        .check_all(&[
            allow("audit: default deny lets it through", tcp4([198, 18, 1, 1], dst, 81, 0)),
            allow("audit: a deny rule lets it through", tcp4([198, 18, 9, 1], dst, 81, 0)),
            allow("audit: allowed anyway", tcp4([198, 18, 1, 1], dst, 80, 0)),
        ])
        .unwrap();
    assert_eq!(fw.hits(AUDIT_SLOT), 2);
    assert_eq!(fw.hits(1), 1);
    assert_eq!(fw.hits(DEFAULT_SLOT), 1);
    assert_eq!(fw.hits(0), 1);
}

#[test]
fn ipv6_link_control_passes_a_default_deny_and_rate_limits_but_not_a_rule_against_it() {
    // Neighbour discovery (hop limit 255) and multicast listener discovery (hop limit 1, a
    // link-local source) keep IPv6 working on the link: neither a default deny nor a rate
    // limit drops them. The same types with any other hop limit, an MLD message from a
    // global source (a router forwards hop limit 2 to 1), and other ICMPv6 meet the rules;
    // and a rule that denies a type by name (a router-advertisement guard) still drops it.
    let toml = "[firewall]\ndefault = \"deny\"\n[[firewall.rule]]\nname = \"ra-guard\"\naction = \"deny\"\nprotocol = \"icmp\"\nicmp_types = [134]\n[[firewall.rule]]\nname = \"web\"\naction = \"allow\"\nprotocol = \"tcp\"\nports = [80]\n";
    let Some(mut fw) = Fw::new("ipv6_link_control", toml) else { return };
    let icmp6 = |src: &str, dst: &str, kind: u8, hops: u8| {
        Packet::ipv6(src.parse().unwrap(), dst.parse().unwrap())
            .ttl(hops)
            .icmp(kind, 0, [0; 4])
            .payload(&[0; 16])
            .build()
    };
    let denied = Reason::FirewallDefaultDeny;
    fw.bed
        .check_all(&[
            allow("router solicitation", icmp6("fe80::1", "ff02::2", 133, 255)),
            deny(
                "a router advertisement, by rule",
                icmp6("fe80::2", "ff02::1", 134, 255),
                Reason::FirewallDeny,
            ),
            allow("neighbour solicitation", icmp6("fe80::1", "ff02::1:ff00:2", 135, 255)),
            allow("neighbour advertisement", icmp6("fd00::2", "fd00::1", 136, 255)),
            allow("redirect", icmp6("fe80::2", "fd00::1", 137, 255)),
            allow("MLDv2 report", icmp6("fe80::1", "ff02::16", 143, 1)),
            allow("MLDv2 report before an address", icmp6("::", "ff02::16", 143, 1)),
            allow("MLD query", icmp6("fe80::2", "ff02::1", 130, 1)),
            deny("a forwarded solicitation", icmp6("fd00:9::1", "fd00::1", 135, 64), denied),
            deny("a forwarded report", icmp6("fd00:9::1", "ff02::16", 143, 2), denied),
            deny(
                "a report from afar at hop limit 1",
                icmp6("fd00:9::1", "fd00::1", 143, 1),
                denied,
            ),
            deny("an echo request", icmp6("fe80::1", "fd00::1", 128, 255), denied),
        ])
        .unwrap();
    assert_eq!(fw.hits(0), 1, "the guard's one");
    // The default's counter says how often the policy applied: not to link control.
    assert_eq!(fw.hits(DEFAULT_SLOT), 4, "the four denied by default");
    // A rate limit over all ICMPv6 (one packet, then nothing): neighbour solicitations go
    // through it all the same, echo requests do not.
    let limited = "[firewall]\n[[firewall.rule]]\nname = \"icmp\"\naction = \"rate_limit\"\nprotocol = \"icmp\"\nrate = 1\nburst = 1\n";
    fw.install(limited);
    let mut cases = Vec::new();
    for i in 0..5 {
        cases.push(allow(
            &format!("solicitation {i}"),
            icmp6("fe80::1", "ff02::1:ff00:2", 135, 255),
        ));
    }
    cases.push(allow("the first echo request", icmp6("fd00::9", "fd00::1", 128, 64)));
    cases.push(deny("the second", icmp6("fd00::9", "fd00::1", 128, 64), Reason::RateLimited));
    fw.bed.check_all(&cases).unwrap();
}

/// A packet whose transport header cannot be read is refused while the firewall is on: no
/// rule by port or flags could be matched, and the host may accept it whole (it reassembles
/// a first fragment cut inside its TCP header, RFC 1858, and follows longer IPv6 header
/// chains than the parser does). The same shapes with readable headers meet the rules; in
/// audit mode the unreadable ones go on to the kernel, counted as would-be drops.
#[test]
fn unreadable_transport_headers_are_refused() {
    let Some(mut fw) = Fw::new("unreadable_transport_headers_are_refused", RULES) else { return };
    let syn = tcp_flags::SYN;
    let (other4, admin4, dst4) = ([198, 18, 5, 5], [198, 18, 0, 20], [198, 18, 100, 1]);
    // The first 8 bytes of a TCP header to port 23: ports and sequence number, no flags.
    let head8 = [0x9c, 0x40, 0, 23, 0, 0, 0, 1];
    let tiny4 = |src: [u8; 4]| {
        Packet::ipv4(src.into(), dst4.into())
            .ipv4_fragment(0, true)
            .proto(IPPROTO_TCP)
            .payload(&head8)
            .build()
    };
    let v6 = || Packet::ipv6("fd00:5::5".parse().unwrap(), "fd00:100::1".parse().unwrap());
    let dest_opts =
        |n: usize| (0..n).fold(v6(), |p, _| p.ext_header(ExtHeader::DestOpts { len: 0 }));
    let mut doff4 = tcp4(other4, dst4, 23, syn);
    doff4[14 + 20 + 12] = 0x40;
    let unreadable = [
        ("v4 first fragment holding 8 bytes of a TCP header to port 23", tiny4(other4)),
        ("the same from the admins' /28: refused before any rule", tiny4(admin4)),
        ("v4 TCP data offset 4", doff4),
        (
            "v6 first fragment holding 8 bytes of a TCP header",
            v6().ext_header(ExtHeader::Fragment { offset: 0, more: true, id: 7 })
                .proto(IPPROTO_TCP)
                .payload(&head8)
                .build(),
        ),
        (
            "v6 SYN to port 23 behind seven destination options",
            dest_opts(7).tcp(1, 23).flags(syn).build(),
        ),
        (
            "v6 SYN to port 23 behind 1,128 bytes of hop-by-hop options",
            v6().ext_header(ExtHeader::HopByHop { len: 140 }).tcp(1, 23).flags(syn).build(),
        ),
    ];
    let mut cases: Vec<Case> = unreadable
        .iter()
        .map(|(what, frame)| deny(what, frame.clone(), Reason::FirewallUnreadable))
        .collect();
    cases.extend([
        deny(
            "v4 first fragment with its whole TCP header to port 23",
            Packet::ipv4(other4.into(), dst4.into())
                .ipv4_fragment(0, true)
                .tcp(1, 23)
                .flags(syn)
                .build(),
            Reason::FirewallDeny,
        ),
        allow(
            "v4 first fragment with its whole TCP header to port 80",
            Packet::ipv4(other4.into(), dst4.into())
                .ipv4_fragment(0, true)
                .tcp(1, 80)
                .flags(syn)
                .build(),
        ),
        deny(
            "v6 SYN to port 23 behind six destination options",
            dest_opts(6).tcp(1, 23).flags(syn).build(),
            Reason::FirewallDeny,
        ),
        allow(
            "v6 SYN to port 80 behind six destination options",
            dest_opts(6).tcp(1, 80).flags(syn).build(),
        ),
    ]);
    fw.bed.check_all(&cases).unwrap();

    fw.install(&RULES.replace("[firewall]", "[firewall]\naudit = true"));
    let before = fw.hits(AUDIT_SLOT);
    let parser_reasons = [
        Reason::Truncated,
        Reason::Truncated,
        Reason::BadTcpHeader,
        Reason::Truncated,
        Reason::TooManyExtHeaders,
        Reason::HeadersTooLong,
    ];
    let audited: Vec<Case> = unreadable
        .iter()
        .zip(parser_reasons)
        .map(|((what, frame), reason)| Case::pass(format!("audit: {what}"), frame.clone(), reason))
        .collect();
    assert_eq!(audited.len(), unreadable.len());
    fw.bed.check_all(&audited).unwrap();
    assert_eq!(fw.hits(AUDIT_SLOT) - before, audited.len() as u64);
}

#[test]
fn rules_without_sources_match_without_the_source_lookup() {
    // No rule names sources: the data path skips the source trie (META_NO_SRC) and every
    // rule still matches by port and protocol, in both families; a set with sources switched
    // in looks them up again, and one without switched back skips them again.
    let ports = r#"
[firewall]
default = "deny"
[[firewall.rule]]
name = "telnet"
action = "deny"
protocol = "tcp"
ports = [23]
[[firewall.rule]]
name = "web"
action = "allow"
protocol = "tcp"
ports = [80]
"#;
    let Some(mut fw) = Fw::new("rules_without_sources_match_without_the_source_lookup", ports)
    else {
        return;
    };
    let dst = [198, 18, 100, 1];
    let port_cases = || {
        vec![
            deny("v4 telnet", tcp4([198, 18, 9, 1], dst, 23, 0), Reason::FirewallDeny),
            allow("v4 web", tcp4([198, 18, 9, 1], dst, 80, tcp_flags::SYN)),
            deny("v4 else", tcp4([198, 18, 9, 1], dst, 81, 0), Reason::FirewallDefaultDeny),
            deny("v6 telnet", tcp6("fd00::9", "fd00::2", 23, 0), Reason::FirewallDeny),
            allow("v6 web", tcp6("fd00::9", "fd00::2", 80, 0)),
            deny("v6 else", tcp6("fd00::9", "fd00::2", 81, 0), Reason::FirewallDefaultDeny),
        ]
    };
    fw.bed.check_all(&port_cases()).unwrap();
    let with_source = format!(
        "{ports}[[firewall.rule]]\nname = \"trusted\"\naction = \"allow\"\nsource = [\"198.18.9.0/24\", \"fd00::9/128\"]\n"
    );
    assert!(fw.install(&with_source).switched);
    fw.bed
        .check_all(&[
            deny("v4 telnet first", tcp4([198, 18, 9, 1], dst, 23, 0), Reason::FirewallDeny),
            allow("v4 trusted source", tcp4([198, 18, 9, 1], dst, 81, 0)),
            deny("v4 untrusted", tcp4([198, 18, 8, 1], dst, 81, 0), Reason::FirewallDefaultDeny),
            allow("v6 trusted source", tcp6("fd00::9", "fd00::2", 81, 0)),
            deny("v6 untrusted", tcp6("fd00::8", "fd00::2", 81, 0), Reason::FirewallDefaultDeny),
        ])
        .unwrap();
    assert!(fw.install(ports).switched);
    fw.bed.check_all(&port_cases()).unwrap();
    // A rule whose source file is empty matches nothing (as a trie miss did); filling the
    // file switches a generation in, with the source lookup back.
    let file = lb_tests::daemon::TempFile::named("nosrc.txt");
    let file = &file.0;
    std::fs::write(file, "").unwrap();
    let from_file = format!(
        "{ports}[[firewall.rule]]\nname = \"listed\"\naction = \"allow\"\nsource_file = \"{}\"\n",
        file.display()
    );
    assert!(fw.install(&from_file).switched);
    fw.bed.check_all(&port_cases()).unwrap();
    std::fs::write(file, "198.18.9.0/24\nfd00::9/128\n").unwrap();
    assert!(fw.install(&from_file).switched, "the source lookup is needed again");
    let listed = fw.bed.check_all(&[
        allow("v4 listed source", tcp4([198, 18, 9, 1], dst, 81, 0)),
        allow("v6 listed source", tcp6("fd00::9", "fd00::2", 81, 0)),
        deny("v4 unlisted", tcp4([198, 18, 8, 1], dst, 81, 0), Reason::FirewallDefaultDeny),
    ]);
    listed.unwrap();
}

#[test]
fn sources_no_prefix_covers_skip_the_trie_by_the_prefilter() {
    // One /24 and one /48 blocked: the generation's prefilter has three bits (the /16 and the
    // /24 of the IPv4 prefix, the /32 of the IPv6 one). Sources in another /16 or /24 (IPv4)
    // or another /32 (IPv6) have a clear bit and skip the trie: the rules that match any
    // source still apply to them.
    let block = r#"
[firewall]
[[firewall.rule]]
name = "block"
action = "deny"
source = ["198.18.7.0/24", "fd00:7::/48"]
[[firewall.rule]]
name = "no-ssh"
action = "deny"
protocol = "tcp"
ports = [22]
"#;
    let Some(mut fw) = Fw::new("sources_no_prefix_covers_skip_the_trie_by_the_prefilter", block)
    else {
        return;
    };
    let (v6_listed, v6_other) = (0xfd00_0007, 0xfd00_0008);
    assert_ne!(filter_v6_32(v6_listed), filter_v6_32(v6_other));
    let dst = [198, 18, 100, 1];
    let cases = || {
        vec![
            deny("v4 listed", tcp4([198, 18, 7, 1], dst, 80, 0), Reason::FirewallDeny),
            allow("v4 another /16", tcp4([198, 19, 7, 1], dst, 80, 0)),
            deny("v4 another /16, ssh", tcp4([198, 19, 7, 1], dst, 22, 0), Reason::FirewallDeny),
            allow("v4 another /24", tcp4([198, 18, 8, 1], dst, 80, 0)),
            deny("v4 another /24, ssh", tcp4([198, 18, 8, 1], dst, 22, 0), Reason::FirewallDeny),
            deny("v6 listed", tcp6("fd00:7::1", "fd00::2", 80, 0), Reason::FirewallDeny),
            allow("v6 another /32", tcp6("fd00:8::1", "fd00::2", 80, 0)),
            deny("v6 another /32, ssh", tcp6("fd00:8::1", "fd00::2", 22, 0), Reason::FirewallDeny),
        ]
    };
    fw.bed.check_all(&cases()).unwrap();
    let generation = fw.firewall.active_generation().unwrap();
    let filter = |fw: &Fw| fw.bed.datapath.maps().firewall.src_filter(generation).unwrap();
    let has = |fw: &Fw, bit: u32| filter(fw)[(bit / 64) as usize] & (1 << (bit % 64)) != 0;
    let ones = |fw: &Fw| filter(fw).iter().map(|w| w.count_ones()).sum::<u32>();
    // Clears one bit of the generation's prefilter by hand.
    let clear = |fw: &mut Fw, bit: u32| {
        let words = filter(fw);
        let index = (bit / FILTER_CHUNK_BITS) as usize;
        let per_chunk = chunk_words();
        let mut chunk = FilterChunk::default();
        chunk.words.copy_from_slice(&words[index * per_chunk..(index + 1) * per_chunk]);
        chunk.words[(bit / 64) as usize % per_chunk] &= !(1 << (bit % 64));
        let maps = &mut fw.bed.datapath.maps_mut().firewall;
        maps.set_src_filter_chunk(generation, index, &chunk).unwrap();
    };
    let (v4_16, v4_24) = (filter_v4_16(0xc612_0700), filter_v4_24(0xc612_0700));
    assert!(has(&fw, v4_16) && has(&fw, v4_24) && has(&fw, filter_v6_32(v6_listed)));
    assert_eq!(ones(&fw), 3);

    // The data path reads both IPv4 parts: with either bit cleared by hand, the listed source
    // is no longer looked up (and passes). An adopting daemon rewrites the prefilter from the
    // trie.
    for bit in [v4_16, v4_24] {
        clear(&mut fw, bit);
        fw.bed.check_all(&[allow("bit cleared", tcp4([198, 18, 7, 1], dst, 80, 0))]).unwrap();
        fw.firewall = Firewall::adopt(&mut fw.bed.datapath.maps_mut().firewall).unwrap();
        fw.bed.check_all(&cases()).unwrap();
    }

    // In place: a prefix in a new /16 sets its bits with the trie entry; removed, they go.
    let grown = block.replace("\"fd00:7::/48\"", "\"fd00:7::/48\", \"198.19.5.0/24\"");
    assert!(!fw.install(&grown).switched);
    assert!(has(&fw, filter_v4_16(0xc613_0500)) && has(&fw, filter_v4_24(0xc613_0500)));
    fw.bed
        .check_all(&[
            deny("v4 added", tcp4([198, 19, 5, 1], dst, 80, 0), Reason::FirewallDeny),
            allow("v4 beside it", tcp4([198, 19, 6, 1], dst, 80, 0)),
        ])
        .unwrap();
    assert!(!fw.install(block).switched);
    assert!(!has(&fw, filter_v4_16(0xc613_0500)));
    assert_eq!(ones(&fw), 3);
    fw.bed.check_all(&cases()).unwrap();

    // An update failing half-way (the kernel refuses a prefix longer than the family's,
    // written after a good one, before a removal) leaves the good one and the one to remove
    // in the trie: the bits of both lists were set before it began.
    let mut broken = compile(&grown.replace("\"198.18.7.0/24\", ", ""), fw.hz);
    let bad = firewall::Prefix::V4 { addr: 0xc613_0600, len: 40 };
    broken.sources.insert(bad, 1);
    let maps = &mut fw.bed.datapath.maps_mut().firewall;
    assert!(fw.firewall.install(maps, Some(&broken)).is_err());
    assert!(has(&fw, filter_v4_16(0xc613_0500)) && has(&fw, filter_v4_24(0xc613_0500)));
    assert!(has(&fw, v4_16) && has(&fw, v4_24), "the bits of a prefix not yet removed");
    fw.bed
        .check_all(&[
            deny(
                "v4 written before the failure",
                tcp4([198, 19, 5, 1], dst, 80, 0),
                Reason::FirewallDeny,
            ),
            deny("v4 not yet removed", tcp4([198, 18, 7, 1], dst, 80, 0), Reason::FirewallDeny),
        ])
        .unwrap();
    assert!(!fw.install(block).switched, "the trie as read back after the failure");
    let trie = fw.bed.datapath.maps().firewall.prefixes(Direction::Source, generation).unwrap();
    assert_eq!(trie.len(), 2, "what the failed update wrote is removed: {trie:?}");
    assert_eq!(ones(&fw), 3);
    fw.bed.check_all(&cases()).unwrap();

    // An IPv6 prefix shorter than a /16 sets every IPv6 bit.
    let wide = block.replace("\"fd00:7::/48\"", "\"fd00::/15\"");
    assert!(!fw.install(&wide).switched);
    assert_eq!(ones(&fw), 2 + 65_536);
    fw.bed
        .check_all(&[deny(
            "v6 in the /15",
            tcp6("fd00:8::1", "fd00::2", 80, 0),
            Reason::FirewallDeny,
        )])
        .unwrap();
    assert!(!fw.install(block).switched);

    // A generation pinned by a daemon without the prefilter (flag clear, words zero) is
    // looked up as before; the next install switches a generation with the prefilter in.
    let maps = &mut fw.bed.datapath.maps_mut().firewall;
    let mut meta = maps.meta(generation).unwrap();
    meta.flags &= !META_SRC_FILTER;
    maps.set_meta(generation, &meta).unwrap();
    for i in 0..SRC_FILTER_CHUNKS as usize {
        maps.set_src_filter_chunk(generation, i, &FilterChunk::default()).unwrap();
    }
    fw.bed.check_all(&cases()).unwrap();
    fw.firewall = Firewall::adopt(&mut fw.bed.datapath.maps_mut().firewall).unwrap();
    assert!(fw.install(block).switched, "the adopted generation has no prefilter");
    let now = fw.firewall.active_generation().unwrap();
    assert_ne!(now, generation);
    let meta = fw.bed.datapath.maps().firewall.meta(now).unwrap();
    assert_ne!(meta.flags & META_SRC_FILTER, 0);
    assert_eq!(ones(&fw), 0, "the old generation's prefilter is cleared with it");
    fw.bed.check_all(&cases()).unwrap();
}

#[test]
fn rule_sets_switch_whole_and_prefix_lists_change_in_place() {
    let one = "[firewall]\n[[firewall.rule]]\nname = \"block\"\naction = \"deny\"\nsource = [\"198.18.0.0/24\", \"198.18.1.0/24\"]\n";
    let Some(mut fw) = Fw::new("rule_sets_switch_whole_and_prefix_lists_change_in_place", one)
    else {
        return;
    };
    let first = fw.firewall.active_generation().unwrap();
    let from = |a: [u8; 4]| tcp4(a, [198, 18, 100, 1], 80, 0);
    fw.bed.check_all(&[deny("listed", from([198, 18, 1, 1]), Reason::FirewallDeny)]).unwrap();

    // Only the list changes: updated in place, no switch; counters keep counting.
    let summary = fw.install(&one.replace("198.18.1.0/24", "198.18.2.0/24"));
    assert_eq!(
        summary,
        InstallSummary { switched: false, prefixes_written: 1, prefixes_removed: 1 }
    );
    assert_eq!(fw.firewall.active_generation(), Some(first));
    fw.bed
        .check_all(&[
            allow("removed from the list", from([198, 18, 1, 1])),
            deny("added to the list", from([198, 18, 2, 1]), Reason::FirewallDeny),
        ])
        .unwrap();
    assert_eq!(fw.hits(0), 2);

    // A new rule: a new generation, switched whole; the old one is emptied.
    let two = format!(
        "{one}[[firewall.rule]]\nname = \"no-ssh\"\naction = \"deny\"\nprotocol = \"tcp\"\nports = [22]\n"
    );
    let summary = fw.install(&two);
    assert!(summary.switched);
    let second = fw.firewall.active_generation().unwrap();
    assert_ne!(first, second);
    let maps = &fw.bed.datapath.maps().firewall;
    assert!(maps.prefixes(Direction::Source, first).unwrap().is_empty(), "old generation cleared");
    assert_eq!(maps.prefixes(Direction::Source, second).unwrap().len(), 2);
    assert_eq!(fw.hits(0), 0, "a new generation counts from zero");
    fw.bed
        .check_all(&[
            deny("ssh now", tcp4([198, 18, 5, 5], [198, 18, 100, 1], 22, 0), Reason::FirewallDeny),
            deny("listed again", from([198, 18, 0, 1]), Reason::FirewallDeny),
        ])
        .unwrap();

    // Off: everything passes.
    fw.firewall.install(&mut fw.bed.datapath.maps_mut().firewall, None).unwrap();
    fw.bed.check_all(&[allow("firewall off", from([198, 18, 0, 1]))]).unwrap();
}

/// Counters are kept by rule position and named by the rule now there (as log events are):
/// rules that keep their actions but trade places (two block lists swapped; allow, deny,
/// allow with the allows swapped) or names make a new rule set, switched in with counters
/// from zero, also when the old one was adopted from an earlier lbd. Only other prefixes for
/// the same rules at the same positions are written in place, the counters counting on.
#[test]
fn rules_reordered_or_renamed_switch_in_with_counters_from_zero() {
    // Rules of one source prefix each: (name, action, prefix).
    let rule_set = |rules: &[(&str, &str, &str)]| {
        rules.iter().fold("[firewall]\n".to_owned(), |mut toml, (name, action, source)| {
            let _ = write!(
                toml,
                "[[firewall.rule]]\nname = \"{name}\"\naction = \"{action}\"\nsource = [\"{source}\"]\n"
            );
            toml
        })
    };
    let (bl_a, bl_b) = (("bl-a", "deny", "198.18.1.0/24"), ("bl-b", "deny", "198.18.2.0/24"));
    let Some(mut fw) = Fw::new(
        "rules_reordered_or_renamed_switch_in_with_counters_from_zero",
        &rule_set(&[bl_a, bl_b]),
    ) else {
        return;
    };
    let from = |net: u8| tcp4([198, 18, net, 1], [198, 18, 100, 1], 80, 0);
    let listed = |net: u8| deny("listed", from(net), Reason::FirewallDeny);
    fw.bed.check_all(&[listed(1), listed(1), listed(2)]).unwrap();
    assert_eq!((fw.hits(0), fw.hits(1)), (2, 1));

    let switches = fw.firewall.switches();
    let summary = fw.install(&rule_set(&[bl_b, bl_a]));
    assert!(summary.switched, "block lists swapped: {summary:?}");
    assert_eq!(fw.firewall.switches(), switches + 1, "the log reads events across a switch");
    assert_eq!((fw.hits(0), fw.hits(1)), (0, 0), "bl-b does not inherit bl-a's count");
    fw.bed.check_all(&[listed(1), listed(2), listed(2)]).unwrap();
    assert_eq!((fw.hits(0), fw.hits(1)), (2, 1), "bl-b's two, then bl-a's one");
    let renamed = rule_set(&[("bl-c", "deny", bl_b.2), bl_a]);
    assert!(fw.install(&renamed).switched, "a rule renamed");
    assert_eq!(fw.hits(0), 0);

    let (first, middle, last) = (
        ("x", "allow", "198.18.3.0/24"),
        ("y", "deny", "198.18.4.0/24"),
        ("z", "allow", "198.18.5.0/24"),
    );
    assert!(fw.install(&rule_set(&[first, middle, last])).switched);
    fw.bed.check_all(&[allow("x", from(3)), allow("x", from(3)), allow("z", from(5))]).unwrap();
    assert!(fw.install(&rule_set(&[last, middle, first])).switched, "the allows swapped");
    assert_eq!((fw.hits(0), fw.hits(2)), (0, 0));
    fw.bed.check_all(&[allow("z", from(5)), listed(4)]).unwrap();

    // The same rules, z with another prefix: in place, counting on.
    let moved = [("z", "allow", "198.18.6.0/24"), middle, first];
    let summary = fw.install(&rule_set(&moved));
    assert_eq!(
        summary,
        InstallSummary { switched: false, prefixes_written: 1, prefixes_removed: 1 }
    );
    assert_eq!((fw.hits(0), fw.hits(1)), (1, 1));

    // Adopted by a restarted lbd: the same rule set stays, a reordered one switches.
    fw.firewall = Firewall::adopt(&mut fw.bed.datapath.maps_mut().firewall).unwrap();
    assert!(!fw.install(&rule_set(&moved)).switched, "the rule set as before the restart");
    assert_eq!((fw.hits(0), fw.hits(1)), (1, 1));
    let summary = fw.install(&rule_set(&[first, middle, moved[0]]));
    assert!(summary.switched, "the allows swapped across a restart: {summary:?}");
    assert_eq!((fw.hits(0), fw.hits(1)), (0, 0));
}

/// A restarted lbd adopts the pinned rule set, and given the same rules keeps it, counters
/// and all: also when the last rule is a plain `allow` (no flags, no log), which the maps
/// hold as all zeros, as they hold an unused slot.
#[test]
fn a_restarted_lbd_keeps_a_rule_set_ending_in_a_plain_allow_and_its_counters() {
    let toml = r#"
[firewall]
default = "deny"
[[firewall.rule]]
name = "no-telnet"
action = "deny"
protocol = "tcp"
ports = [23]
[[firewall.rule]]
name = "admins"
action = "allow"
source = ["198.18.0.16/28"]
"#;
    let Some(mut fw) =
        Fw::new("a_restarted_lbd_keeps_a_rule_set_ending_in_a_plain_allow_and_its_counters", toml)
    else {
        return;
    };
    let admin = tcp4([198, 18, 0, 20], [198, 18, 100, 1], 80, 0);
    fw.bed.check_all(&[allow("admin", admin.clone())]).unwrap();
    assert_eq!(fw.hits(1), 1);
    let generation = fw.firewall.active_generation();
    fw.firewall = Firewall::adopt(&mut fw.bed.datapath.maps_mut().firewall).unwrap();
    let summary = fw.install(toml);
    assert_eq!(summary, InstallSummary::default(), "nothing to change");
    assert_eq!(fw.firewall.active_generation(), generation);
    assert_eq!(fw.firewall.switches(), 0);
    fw.bed.check_all(&[allow("admin after the restart", admin)]).unwrap();
    assert_eq!(fw.hits(1), 2, "the count goes on");
}

/// A bucket of rate 500/s and burst 50, hit as fast as `BPF_PROG_TEST_RUN` goes for about a
/// second: it admits burst + rate × the time between its first and last packet. That time is
/// bracketed on the data path's own clock (jiffies, as the bucket's): read just before the
/// first packet and just after the last (at least as long), and just after the first and
/// just before the last (at most as long), so a stall of this process between the reads
/// only widens the bracket. The tolerance is one tick of rate plus one packet each way.
#[test]
fn a_rate_limit_admits_rate_times_time_plus_burst() {
    let toml = "[firewall]\n[[firewall.rule]]\nname = \"limit\"\naction = \"rate_limit\"\nrate = 500\nburst = 50\n";
    let Some(mut fw) = Fw::new("a_rate_limit_admits_rate_times_time_plus_burst", toml) else {
        return;
    };
    let frame = tcp4([198, 18, 0, 9], [198, 18, 100, 1], 80, 0);
    let (mut admitted, mut dropped) = (0u64, 0u64);
    let mut count = |verdict: Option<Action>| match verdict {
        Some(Action::Pass) => admitted += 1,
        Some(Action::Drop) => dropped += 1,
        other => panic!("verdict {other:?}"),
    };
    let outer_start = fw.bed.datapath.now_ticks().unwrap();
    count(fw.bed.run(&frame).unwrap().verdict);
    let inner_start = fw.bed.datapath.now_ticks().unwrap();
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(1) {
        count(fw.bed.run(&frame).unwrap().verdict);
    }
    let inner_end = fw.bed.datapath.now_ticks().unwrap();
    count(fw.bed.run(&frame).unwrap().verdict);
    let outer_end = fw.bed.datapath.now_ticks().unwrap();
    let at = |ticks: u64| 50.0 + 500.0 * ticks as f64 / fw.hz as f64;
    let tick = 500.0 / fw.hz as f64 + 1.0;
    let (low, high) = (at(inner_end - inner_start) - tick, at(outer_end - outer_start) + tick);
    eprintln!("admitted {admitted} of {}; expected {low:.1} to {high:.1}", admitted + dropped);
    assert!(
        dropped > admitted,
        "the loop must outrun the rate: {admitted} admitted, {dropped} dropped"
    );
    assert!(
        (low..=high).contains(&(admitted as f64)),
        "admitted {admitted}, expected {low:.1} to {high:.1}"
    );
    let tolerance = tick;
    // Another source has a bucket of its own.
    let other = tcp4([198, 18, 0, 10], [198, 18, 100, 1], 80, 0);
    let started = Instant::now();
    let burst =
        (0..100).filter(|_| fw.bed.run(&other).unwrap().verdict == Some(Action::Pass)).count();
    // The burst, plus what the bucket refilled while the 100 packets ran (a loaded machine
    // takes milliseconds), within the same clock tolerance.
    let refill = 500.0 * started.elapsed().as_secs_f64() + tolerance;
    assert!(
        burst >= 50 && burst as f64 <= 50.0 + refill,
        "a fresh source gets its burst: {burst} (refill allowance {refill:.1})"
    );
    // Every packet dropped was counted as rate-limited, from both sources, and no other.
    let stats = fw.bed.stats().unwrap();
    assert_eq!(stats.reason(Reason::RateLimited).packets, dropped + (100 - burst as u64));
}

/// IPv6 sources share a bucket per /64: a host that rotates its address within its /64
/// gets no fresh burst per address; another /64 has a bucket of its own. A rate of 1 per
/// second and a burst of 3, so no refill lands within the test's few packets (unless the
/// machine stalls a second: then one more is admitted, which the bounds allow).
#[test]
fn ipv6_sources_share_a_rate_limit_per_64() {
    let toml = "[firewall]\n[[firewall.rule]]\nname = \"limit\"\naction = \"rate_limit\"\nrate = 1\nburst = 3\n";
    let Some(mut fw) = Fw::new("ipv6_sources_share_a_rate_limit_per_64", toml) else { return };
    let mut admitted =
        |src: &str| fw.bed.run(&tcp6(src, "fd00::1", 80, 0)).unwrap().verdict == Some(Action::Pass);
    // Eight addresses of one /64, each once: the /64's burst of 3 (4 if a second passed).
    let one_64 = (1..=8).filter(|i| admitted(&format!("fd00:0:0:7::{i:x}"))).count();
    assert!((3..=4).contains(&one_64), "{one_64} of 8 admitted from one /64");
    // Another /64 (the next one up) starts with its own full bucket.
    let other_64 = (1..=3).filter(|i| admitted(&format!("fd00:0:0:8::{i:x}"))).count();
    assert_eq!(other_64, 3, "another /64 has a bucket of its own");
}

/// Prefixes per family in the big test.
const N: usize = 1_000_000;

/// Deterministic pseudo-random numbers for the big prefix lists.
struct XorShift(u64);

impl XorShift {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

#[test]
fn a_million_prefixes_per_family_load_and_match() {
    let Some(mut fw) = Fw::new("a_million_prefixes_per_family_load_and_match", "[firewall]\n")
    else {
        return;
    };
    let mut rng = XorShift(0x5eed_1234_abcd_ef01);
    let mut text = String::with_capacity(N * 40);
    // A million distinct prefixes per family. IPv4: /24 to /32 with first octets 1 to 126
    // (so 172.16.0.0/12 and 198.18.0.0/15 stay clear for the misses); IPv6: /48 to /128
    // inside 2001:db8::/32.
    let mut seen = std::collections::HashSet::new();
    while seen.len() < N {
        let r = rng.next();
        let len = 24 + (r >> 40) % 9;
        let addr = ((1 + (r >> 32) % 126) << 24) as u32 | (r as u32 & 0x00ff_ffff);
        let prefix =
            firewall::Prefix::parse(&format!("{}/{len}", Ipv4Addr::from_bits(addr))).unwrap();
        if seen.insert(prefix) {
            let _ = writeln!(text, "{prefix}");
        }
    }
    while seen.len() < 2 * N {
        let (a, b) = (rng.next(), rng.next());
        let len = 48 + (a >> 50) % 81;
        let addr = (0x2001_0db8_u128 << 96) | (u128::from(a & 0xffff_ffff) << 64) | u128::from(b);
        let prefix =
            firewall::Prefix::parse(&format!("{}/{len}", Ipv6Addr::from_bits(addr))).unwrap();
        if seen.insert(prefix) {
            let _ = writeln!(text, "{prefix}");
        }
    }
    let path = lb_tests::daemon::TempFile::named("million.txt");
    let path = &path.0;
    std::fs::write(path, &text).unwrap();
    let toml = format!(
        "[firewall]\n[[firewall.rule]]\nname = \"blocklist\"\naction = \"deny\"\nsource_file = \"{}\"\n",
        path.display()
    );
    let config = Config::parse(&format!("{INTERFACE}{toml}"), "fixture").unwrap();
    let start = Instant::now();
    let compiled = firewall::compile(config.firewall.as_ref().unwrap(), fw.hz).unwrap();
    let compile_time = start.elapsed();
    let start = Instant::now();
    let summary =
        fw.firewall.install(&mut fw.bed.datapath.maps_mut().firewall, Some(&compiled)).unwrap();
    let install_time = start.elapsed();
    eprintln!(
        "{} prefixes (after merging duplicates): read and compiled in {compile_time:?}, loaded in {install_time:?}",
        summary.prefixes_written
    );
    assert_eq!(summary.prefixes_written, 2 * N, "{summary:?}");
    let generation = fw.firewall.active_generation().unwrap();
    let maps = &fw.bed.datapath.maps().firewall;

    // Hits: the first listed prefix of each family, at its last address.
    let mut lines = text.lines();
    let first4 = firewall::Prefix::parse(lines.next().unwrap()).unwrap();
    let first6 = firewall::Prefix::parse(text.lines().nth(N).unwrap()).unwrap();
    let (hit4, hit6) = match (first4, first6) {
        (firewall::Prefix::V4 { addr, len }, firewall::Prefix::V6 { addr: a6, len: l6 }) => (
            Ipv4Addr::from_bits(addr | (u32::MAX >> len)),
            Ipv6Addr::from_bits(a6 | (u128::MAX.checked_shr(u32::from(l6)).unwrap_or(0))),
        ),
        other => panic!("{other:?}"),
    };
    assert!(maps.lookup(Direction::Source, generation, IpAddr::V4(hit4)).unwrap().is_some());
    fw.bed
        .check_all(&[
            deny("v4 listed", tcp4(hit4.octets(), [198, 18, 100, 1], 80, 0), Reason::FirewallDeny),
            allow("v4 not listed", tcp4([198, 18, 0, 1], [198, 18, 100, 1], 80, 0)),
            deny(
                "v6 listed",
                Packet::ipv6(hit6, "fd00::1".parse().unwrap()).tcp(1, 80).build(),
                Reason::FirewallDeny,
            ),
            allow("v6 not listed", tcp6("fd00::7", "fd00::1", 80, 0)),
        ])
        .unwrap();

    // An update of the file: a thousand prefixes out, a thousand in, in place.
    let mut updated: Vec<&str> = text.lines().skip(1000).collect();
    let extra: Vec<String> =
        (0..1000).map(|i| format!("172.16.{}.{}/32", i / 256, i % 256)).collect();
    updated.extend(extra.iter().map(String::as_str));
    std::fs::write(path, updated.join("\n")).unwrap();
    let compiled = firewall::compile(config.firewall.as_ref().unwrap(), fw.hz).unwrap();
    let start = Instant::now();
    let summary =
        fw.firewall.install(&mut fw.bed.datapath.maps_mut().firewall, Some(&compiled)).unwrap();
    eprintln!("incremental update {summary:?} in {:?}", start.elapsed());
    assert!(!summary.switched);
    assert!(summary.prefixes_written >= 1000 && summary.prefixes_written < 1100, "{summary:?}");
    // The first thousand lines are distinct IPv4 prefixes (none merged: 2N written above).
    assert_eq!(summary.prefixes_removed, 1000, "{summary:?}");
    // The first listed prefix went: its address no longer matches (no other prefix of the
    // fixed-seed list covers it) and is let through.
    let maps = &fw.bed.datapath.maps().firewall;
    assert!(maps.lookup(Direction::Source, generation, IpAddr::V4(hit4)).unwrap().is_none());
    fw.bed
        .check_all(&[
            deny(
                "newly listed",
                tcp4([172, 16, 3, 231], [198, 18, 100, 1], 80, 0),
                Reason::FirewallDeny,
            ),
            allow("delisted", tcp4(hit4.octets(), [198, 18, 100, 1], 80, 0)),
        ])
        .unwrap();
}

/// Logging is sampled and capped: with `log = 1` every match is a candidate, but a CPU logs
/// at most 100 events per second (a bucket of 100); with `log = 50` about one in 50 is.
#[test]
fn logging_is_sampled_and_capped() {
    let toml = "[firewall]\n[[firewall.rule]]\nname = \"all\"\naction = \"deny\"\nsource = [\"198.18.0.0/24\"]\nlog = 1\n[[firewall.rule]]\nname = \"some\"\naction = \"allow\"\nlog = 50\n";
    let Some(mut fw) = Fw::new("logging_is_sampled_and_capped", toml) else { return };
    let mut events = fw.bed.datapath.maps_mut().firewall_events.take().unwrap().0;
    let blocked = tcp4([198, 18, 0, 9], [198, 18, 100, 1], 80, tcp_flags::SYN);
    let start = Instant::now();
    for _ in 0..2000 {
        fw.bed.run(&blocked).unwrap();
    }
    let elapsed = start.elapsed().as_secs_f64();
    let logged = drain(&mut events);
    let cap = 100.0 + 100.0 * elapsed + 2.0;
    eprintln!("{} of 2000 logged in {elapsed:.3} s (cap {cap:.0})", logged.len());
    assert!(logged.len() >= 100 && (logged.len() as f64) <= cap, "{} logged", logged.len());
    let first = logged[0];
    assert_eq!((first.rule, first.outcome, first.proto), (0, EVENT_DROPPED, 6));
    assert_eq!(first.src[0], u32::from_ne_bytes([198, 18, 0, 9]));
    // Sampling: wait for the budget to refill, then 1,000 matches of the 1-in-50 rule.
    std::thread::sleep(Duration::from_millis(1100));
    drain(&mut events);
    let allowed = tcp4([198, 18, 5, 9], [198, 18, 100, 1], 80, tcp_flags::SYN);
    for _ in 0..1000 {
        fw.bed.run(&allowed).unwrap();
    }
    let sampled = drain(&mut events);
    eprintln!("{} of 1000 sampled at one in 50", sampled.len());
    // Expected 20; the binomial's standard deviation is 4.4: 5 to 40 is over three of them.
    assert!((5..=40).contains(&sampled.len()), "{}", sampled.len());
    assert!(sampled.iter().all(|e| e.rule == 1 && e.outcome == EVENT_PASSED));
}

/// Audit mode logs a packet as "would drop" only when a rule would have dropped it: a packet
/// a rate limit admits, and IPv6 link control, which rate limits let through, are logged as
/// passed, as without audit mode (where the refused one is dropped). The audit counter
/// counts the would-be drop alone.
#[test]
fn audit_mode_logs_what_a_rate_limit_admits_as_passed() {
    let limit = "[firewall]\n[[firewall.rule]]\nname = \"limit\"\naction = \"rate_limit\"\nrate = 1\nburst = 1\nlog = 1\n";
    let audit = limit.replace("[firewall]\n", "[firewall]\naudit = true\n");
    let Some(mut fw) = Fw::new("audit_mode_logs_what_a_rate_limit_admits_as_passed", &audit) else {
        return;
    };
    let mut events = fw.bed.datapath.maps_mut().firewall_events.take().unwrap().0;
    let solicitation = Packet::ipv6("fe80::1".parse().unwrap(), "ff02::1:ff00:2".parse().unwrap())
        .ttl(255)
        .icmp(135, 0, [0; 4])
        .payload(&[0; 16])
        .build();
    // Rate 1 with a burst of 1: a source's first packet is admitted, its second refused
    // (unless the machine stalls a second between them).
    let from = |net: u8| tcp4([198, 18, net, 1], [198, 18, 100, 1], 80, 0);
    fw.bed
        .check_all(&[
            allow("admitted", from(1)),
            allow("audit: refused, let through", from(1)),
            allow("link control", solicitation.clone()),
        ])
        .unwrap();
    let outcomes = |events: &mut _| drain(events).iter().map(|e| e.outcome).collect::<Vec<_>>();
    assert_eq!(outcomes(&mut events), [EVENT_PASSED, EVENT_AUDITED, EVENT_PASSED]);
    assert_eq!((fw.hits(0), fw.hits(AUDIT_SLOT)), (3, 1));

    // Without audit mode (buckets are kept across the switch: another source).
    assert!(fw.install(limit).switched);
    fw.bed
        .check_all(&[
            allow("admitted", from(2)),
            deny("refused", from(2), Reason::RateLimited),
            allow("link control", solicitation),
        ])
        .unwrap();
    assert_eq!(outcomes(&mut events), [EVENT_PASSED, EVENT_DROPPED, EVENT_PASSED]);
}
