//! A small packet builder for tests: Ethernet (with VLAN tags), IPv4 (with options and
//! fragments), IPv6 (with extension headers), TCP, UDP, ICMP and ICMPv6, with lengths and
//! checksums computed from scratch.
//!
//! The checksums here are deliberately independent of `lb-common`'s incremental checksum code:
//! expected frames in datapath tests come from this builder, never from the code under test.
//!
//! ```
//! use lb_tests::packet::{Packet, tcp_flags};
//! let frame = Packet::ipv4("198.18.0.2".parse().unwrap(), "198.18.100.1".parse().unwrap())
//!     .tcp(40000, 80)
//!     .flags(tcp_flags::SYN)
//!     .build();
//! assert_eq!(frame.len(), 14 + 20 + 20);
//! ```

use std::net::{Ipv4Addr, Ipv6Addr};

pub use lb_common::net::tcp_flags;

/// Default source MAC of built frames (locally administered).
pub const CLIENT_MAC: [u8; 6] = [0x02, 0x00, 0x00, 0x00, 0x00, 0x02];
/// Default destination MAC of built frames.
pub const LB_MAC: [u8; 6] = [0x02, 0x00, 0x00, 0x00, 0x00, 0x01];

/// An IPv6 extension header to insert between the fixed header and L4.
#[derive(Clone, Debug)]
pub enum ExtHeader {
    /// Hop-by-hop options padded to `8 * (len + 1)` bytes with PadN.
    HopByHop { len: u8 },
    /// Destination options, likewise.
    DestOpts { len: u8 },
    /// A type-4 routing header of `8 * (len + 1)` bytes with segments left 0.
    Routing { len: u8 },
    /// A fragment header.
    Fragment { offset: u16, more: bool, id: u32 },
}

#[derive(Clone, Debug)]
enum L3 {
    V4 {
        src: Ipv4Addr,
        dst: Ipv4Addr,
        ttl: u8,
        tos: u8,
        id: u16,
        dont_fragment: bool,
        more_fragments: bool,
        frag_offset: u16,
        options: Vec<u8>,
    },
    V6 {
        src: Ipv6Addr,
        dst: Ipv6Addr,
        hop_limit: u8,
        traffic_class: u8,
        ext: Vec<ExtHeader>,
    },
    /// Any other EtherType with raw bytes after the Ethernet header.
    Raw {
        ether_type: u16,
        bytes: Vec<u8>,
    },
}

#[derive(Clone, Debug)]
enum L4 {
    None { proto: u8 },
    Tcp { sport: u16, dport: u16, seq: u32, ack: u32, flags: u8, window: u16, options: Vec<u8> },
    Udp { sport: u16, dport: u16 },
    Icmp { kind: u8, code: u8, rest: [u8; 4] },
}

/// A packet under construction. Every setter returns the builder; [`Packet::build`] renders
/// the frame.
#[derive(Clone, Debug)]
pub struct Packet {
    src_mac: [u8; 6],
    dst_mac: [u8; 6],
    vlans: Vec<(u16, u16)>,
    l3: L3,
    l4: L4,
    payload: Vec<u8>,
}

impl Packet {
    fn with_l3(l3: L3) -> Self {
        Self {
            src_mac: CLIENT_MAC,
            dst_mac: LB_MAC,
            vlans: Vec::new(),
            l3,
            l4: L4::None { proto: 253 },
            payload: Vec::new(),
        }
    }

    /// An IPv4 packet (protocol 253, "for experimentation", until an L4 is chosen).
    #[must_use]
    pub fn ipv4(src: Ipv4Addr, dst: Ipv4Addr) -> Self {
        Self::with_l3(L3::V4 {
            src,
            dst,
            ttl: 64,
            tos: 0,
            id: 0x1234,
            dont_fragment: true,
            more_fragments: false,
            frag_offset: 0,
            options: Vec::new(),
        })
    }

    /// An IPv6 packet (next header 253 until an L4 is chosen).
    #[must_use]
    pub fn ipv6(src: Ipv6Addr, dst: Ipv6Addr) -> Self {
        Self::with_l3(L3::V6 { src, dst, hop_limit: 64, traffic_class: 0, ext: Vec::new() })
    }

    /// A non-IP frame: `bytes` follow the Ethernet header (and VLAN tags).
    #[must_use]
    pub fn raw(ether_type: u16, bytes: &[u8]) -> Self {
        Self::with_l3(L3::Raw { ether_type, bytes: bytes.to_vec() })
    }

    /// An ARP request for `target` from `sender`.
    #[must_use]
    pub fn arp_request(sender: Ipv4Addr, target: Ipv4Addr) -> Self {
        let mut bytes = vec![0, 1, 8, 0, 6, 4, 0, 1];
        bytes.extend_from_slice(&CLIENT_MAC);
        bytes.extend_from_slice(&sender.octets());
        bytes.extend_from_slice(&[0; 6]);
        bytes.extend_from_slice(&target.octets());
        let mut packet = Self::raw(lb_common::net::ETH_P_ARP, &bytes);
        packet.dst_mac = [0xff; 6];
        packet
    }

    #[must_use]
    pub fn macs(mut self, src: [u8; 6], dst: [u8; 6]) -> Self {
        self.src_mac = src;
        self.dst_mac = dst;
        self
    }

    /// Adds an 802.1Q tag (outermost first).
    #[must_use]
    pub fn vlan(self, vid: u16) -> Self {
        self.vlan_tpid(lb_common::net::ETH_P_8021Q, vid)
    }

    /// Adds a tag with any TPID (0x88a8 for a QinQ service tag).
    #[must_use]
    pub fn vlan_tpid(mut self, tpid: u16, vid: u16) -> Self {
        self.vlans.push((tpid, vid));
        self
    }

    #[must_use]
    pub fn ttl(mut self, value: u8) -> Self {
        match &mut self.l3 {
            L3::V4 { ttl, .. } => *ttl = value,
            L3::V6 { hop_limit, .. } => *hop_limit = value,
            L3::Raw { .. } => panic!("ttl on a non-IP frame"),
        }
        self
    }

    /// The IPv4 type-of-service byte or the IPv6 traffic class (DSCP and ECN).
    #[must_use]
    pub fn tos(mut self, value: u8) -> Self {
        match &mut self.l3 {
            L3::V4 { tos, .. } => *tos = value,
            L3::V6 { traffic_class, .. } => *traffic_class = value,
            L3::Raw { .. } => panic!("tos on a non-IP frame"),
        }
        self
    }

    /// IPv4 options (padded with End-of-Options to a multiple of four bytes).
    #[must_use]
    pub fn ipv4_options(mut self, bytes: &[u8]) -> Self {
        let L3::V4 { options, .. } = &mut self.l3 else { panic!("IPv4 options on non-IPv4") };
        *options = bytes.to_vec();
        while options.len() % 4 != 0 {
            options.push(0);
        }
        assert!(options.len() <= 40, "IPv4 options are at most 40 bytes");
        self
    }

    /// Makes an IPv4 packet a fragment (offset in 8-byte units).
    #[must_use]
    pub fn ipv4_fragment(mut self, offset: u16, more: bool) -> Self {
        let L3::V4 { dont_fragment, more_fragments, frag_offset, .. } = &mut self.l3 else {
            panic!("IPv4 fragment on non-IPv4")
        };
        *dont_fragment = false;
        *more_fragments = more;
        *frag_offset = offset;
        self
    }

    /// Appends an IPv6 extension header.
    #[must_use]
    pub fn ext_header(mut self, header: ExtHeader) -> Self {
        let L3::V6 { ext, .. } = &mut self.l3 else { panic!("extension header on non-IPv6") };
        ext.push(header);
        self
    }

    /// Makes the packet TCP (flags ACK, sequence 1, acknowledgement 1, window 65535).
    #[must_use]
    pub fn tcp(mut self, sport: u16, dport: u16) -> Self {
        self.l4 = L4::Tcp {
            sport,
            dport,
            seq: 1,
            ack: 1,
            flags: tcp_flags::ACK,
            window: 0xffff,
            options: Vec::new(),
        };
        self
    }

    #[must_use]
    pub fn flags(mut self, value: u8) -> Self {
        let L4::Tcp { flags, .. } = &mut self.l4 else { panic!("flags on non-TCP") };
        *flags = value;
        self
    }

    #[must_use]
    pub fn seq_ack(mut self, seq_value: u32, ack_value: u32) -> Self {
        let L4::Tcp { seq, ack, .. } = &mut self.l4 else { panic!("seq on non-TCP") };
        *seq = seq_value;
        *ack = ack_value;
        self
    }

    /// TCP options (padded with End-of-Options to a multiple of four bytes).
    #[must_use]
    pub fn tcp_options(mut self, bytes: &[u8]) -> Self {
        let L4::Tcp { options, .. } = &mut self.l4 else { panic!("TCP options on non-TCP") };
        *options = bytes.to_vec();
        while options.len() % 4 != 0 {
            options.push(0);
        }
        self
    }

    #[must_use]
    pub fn udp(mut self, sport: u16, dport: u16) -> Self {
        self.l4 = L4::Udp { sport, dport };
        self
    }

    /// ICMP (on IPv4) or ICMPv6 (on IPv6) with the four message-specific bytes `rest`.
    #[must_use]
    pub fn icmp(mut self, kind: u8, code: u8, rest: [u8; 4]) -> Self {
        self.l4 = L4::Icmp { kind, code, rest };
        self
    }

    /// An echo request (ICMP type 8 or ICMPv6 type 128).
    #[must_use]
    pub fn echo_request(self, id: u16, seq: u16) -> Self {
        let kind = if matches!(self.l3, L3::V6 { .. }) { 128 } else { 8 };
        let [a, b] = id.to_be_bytes();
        let [c, d] = seq.to_be_bytes();
        self.icmp(kind, 0, [a, b, c, d])
    }

    /// No L4 header: the IP payload is `payload` under protocol number `proto`.
    #[must_use]
    pub fn proto(mut self, proto: u8) -> Self {
        self.l4 = L4::None { proto };
        self
    }

    #[must_use]
    pub fn payload(mut self, bytes: &[u8]) -> Self {
        self.payload = bytes.to_vec();
        self
    }

    /// Renders the frame.
    #[must_use]
    pub fn build(&self) -> Vec<u8> {
        self.build_layout().bytes
    }

    /// Renders the frame and reports where its headers start.
    #[must_use]
    pub fn build_layout(&self) -> Layout {
        let mut frame = Vec::with_capacity(128);
        frame.extend_from_slice(&self.dst_mac);
        frame.extend_from_slice(&self.src_mac);
        let ether_type = match &self.l3 {
            L3::V4 { .. } => lb_common::net::ETH_P_IP,
            L3::V6 { .. } => lb_common::net::ETH_P_IPV6,
            L3::Raw { ether_type, .. } => *ether_type,
        };
        for (tpid, vid) in &self.vlans {
            frame.extend_from_slice(&tpid.to_be_bytes());
            frame.extend_from_slice(&(vid & 0x0fff).to_be_bytes());
        }
        frame.extend_from_slice(&ether_type.to_be_bytes());
        let l3_off = frame.len();
        let (l4_proto, l4_bytes) = self.render_l4();
        let l4_off = match &self.l3 {
            L3::Raw { bytes, .. } => {
                frame.extend_from_slice(bytes);
                return Layout { bytes: frame, l3_off, l4_off: l3_off };
            }
            L3::V4 { .. } => {
                let header = self.render_ipv4(l4_proto, l4_bytes.len());
                frame.extend_from_slice(&header);
                frame.len()
            }
            L3::V6 { .. } => {
                let header = self.render_ipv6(l4_proto, l4_bytes.len());
                frame.extend_from_slice(&header);
                frame.len()
            }
        };
        let mut l4_bytes = l4_bytes;
        self.fill_l4_checksum(&mut l4_bytes);
        frame.extend_from_slice(&l4_bytes);
        Layout { bytes: frame, l3_off, l4_off }
    }

    /// The L4 protocol number and the L4 header plus payload, checksum field zero.
    fn render_l4(&self) -> (u8, Vec<u8>) {
        let v6 = matches!(self.l3, L3::V6 { .. });
        let mut out = Vec::new();
        let proto = match &self.l4 {
            L4::None { proto } => *proto,
            L4::Tcp { sport, dport, seq, ack, flags, window, options } => {
                out.extend_from_slice(&sport.to_be_bytes());
                out.extend_from_slice(&dport.to_be_bytes());
                out.extend_from_slice(&seq.to_be_bytes());
                out.extend_from_slice(&ack.to_be_bytes());
                let words = u8::try_from((20 + options.len()) / 4).expect("TCP options too long");
                out.push(words << 4);
                out.push(*flags);
                out.extend_from_slice(&window.to_be_bytes());
                out.extend_from_slice(&[0, 0, 0, 0]);
                out.extend_from_slice(options);
                lb_common::net::IPPROTO_TCP
            }
            L4::Udp { sport, dport } => {
                out.extend_from_slice(&sport.to_be_bytes());
                out.extend_from_slice(&dport.to_be_bytes());
                let len = u16::try_from(8 + self.payload.len()).expect("UDP payload too long");
                out.extend_from_slice(&len.to_be_bytes());
                out.extend_from_slice(&[0, 0]);
                lb_common::net::IPPROTO_UDP
            }
            L4::Icmp { kind, code, rest } => {
                out.push(*kind);
                out.push(*code);
                out.extend_from_slice(&[0, 0]);
                out.extend_from_slice(rest);
                if v6 { lb_common::net::IPPROTO_ICMPV6 } else { lb_common::net::IPPROTO_ICMP }
            }
        };
        out.extend_from_slice(&self.payload);
        (proto, out)
    }

    fn render_ipv4(&self, proto: u8, l4_len: usize) -> Vec<u8> {
        let L3::V4 { src, dst, ttl, tos, id, dont_fragment, more_fragments, frag_offset, options } =
            &self.l3
        else {
            unreachable!()
        };
        let hlen = 20 + options.len();
        let total = u16::try_from(hlen + l4_len).expect("IPv4 packet too long");
        let mut h = Vec::with_capacity(hlen);
        h.push(0x40 | u8::try_from(hlen / 4).expect("IHL"));
        h.push(*tos);
        h.extend_from_slice(&total.to_be_bytes());
        h.extend_from_slice(&id.to_be_bytes());
        let flags = (u16::from(*dont_fragment) << 14) | (u16::from(*more_fragments) << 13);
        h.extend_from_slice(&(flags | (frag_offset & 0x1fff)).to_be_bytes());
        h.push(*ttl);
        h.push(proto);
        h.extend_from_slice(&[0, 0]);
        h.extend_from_slice(&src.octets());
        h.extend_from_slice(&dst.octets());
        h.extend_from_slice(options);
        let sum = internet_checksum(&h);
        h[10..12].copy_from_slice(&sum.to_be_bytes());
        h
    }

    fn render_ipv6(&self, proto: u8, l4_len: usize) -> Vec<u8> {
        let L3::V6 { src, dst, hop_limit, traffic_class, ext } = &self.l3 else { unreachable!() };
        let mut ext_bytes = Vec::new();
        let mut kinds: Vec<u8> = ext.iter().map(ExtHeader::number).collect();
        kinds.push(proto);
        for (i, header) in ext.iter().enumerate() {
            ext_bytes.extend_from_slice(&header.render(kinds[i + 1]));
        }
        let first = kinds[0];
        let payload_len = u16::try_from(ext_bytes.len() + l4_len).expect("IPv6 payload too long");
        let mut h = Vec::with_capacity(40 + ext_bytes.len());
        h.extend_from_slice(&[0x60 | traffic_class >> 4, traffic_class << 4, 0, 0]);
        h.extend_from_slice(&payload_len.to_be_bytes());
        h.push(first);
        h.push(*hop_limit);
        h.extend_from_slice(&src.octets());
        h.extend_from_slice(&dst.octets());
        h.extend_from_slice(&ext_bytes);
        h
    }

    fn fill_l4_checksum(&self, l4: &mut [u8]) {
        let (offset, proto) = match &self.l4 {
            L4::Tcp { .. } => (16, lb_common::net::IPPROTO_TCP),
            L4::Udp { .. } => (6, lb_common::net::IPPROTO_UDP),
            L4::Icmp { .. } => (2, lb_common::net::IPPROTO_ICMPV6),
            L4::None { .. } => return,
        };
        if l4.len() < offset + 2 {
            return;
        }
        let pseudo = match (&self.l3, &self.l4) {
            // ICMPv4 has no pseudo-header.
            (L3::V4 { .. }, L4::Icmp { .. }) => Vec::new(),
            (L3::V4 { src, dst, .. }, _) => pseudo_header_v4(*src, *dst, proto, l4.len()),
            (L3::V6 { src, dst, .. }, _) => pseudo_header_v6(*src, *dst, proto, l4.len()),
            (L3::Raw { .. }, _) => return,
        };
        let mut data = pseudo;
        data.extend_from_slice(l4);
        let mut sum = internet_checksum(&data);
        // RFC 768: a UDP checksum that computes to zero is sent as all ones.
        if matches!(self.l4, L4::Udp { .. }) && sum == 0 {
            sum = 0xffff;
        }
        l4[offset..offset + 2].copy_from_slice(&sum.to_be_bytes());
    }
}

impl ExtHeader {
    fn number(&self) -> u8 {
        match self {
            Self::HopByHop { .. } => lb_common::net::IPPROTO_HOPOPTS,
            Self::DestOpts { .. } => lb_common::net::IPPROTO_DSTOPTS,
            Self::Routing { .. } => lb_common::net::IPPROTO_ROUTING,
            Self::Fragment { .. } => lb_common::net::IPPROTO_FRAGMENT,
        }
    }

    fn render(&self, next: u8) -> Vec<u8> {
        match self {
            Self::HopByHop { len } | Self::DestOpts { len } => {
                let size = 8 * (usize::from(*len) + 1);
                let mut h = vec![next, *len];
                // PadN options (at most 255 data bytes each) fill the header.
                while h.len() < size {
                    let data = (size - h.len() - 2).min(255);
                    h.push(1);
                    h.push(u8::try_from(data).expect("PadN length"));
                    h.resize(h.len() + data, 0);
                }
                h
            }
            Self::Routing { len } => {
                let mut h = vec![next, *len, 4, 0];
                h.resize(8 * (usize::from(*len) + 1), 0);
                h
            }
            Self::Fragment { offset, more, id } => {
                let mut h = vec![next, 0];
                h.extend_from_slice(&((offset << 3) | u16::from(*more)).to_be_bytes());
                h.extend_from_slice(&id.to_be_bytes());
                h
            }
        }
    }
}

/// A built frame and the offsets of its IP and L4 headers.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Layout {
    pub bytes: Vec<u8>,
    pub l3_off: usize,
    pub l4_off: usize,
}

/// RFC 1071 one's-complement sum over `data`, complemented: the value that goes in a
/// checksum field.
#[must_use]
pub fn internet_checksum(data: &[u8]) -> u16 {
    let mut sum: u64 = 0;
    let mut chunks = data.chunks_exact(2);
    for chunk in &mut chunks {
        sum += u64::from(u16::from_be_bytes([chunk[0], chunk[1]]));
    }
    if let [last] = chunks.remainder() {
        sum += u64::from(*last) << 8;
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !u16::try_from(sum).expect("folded")
}

fn pseudo_header_v4(src: Ipv4Addr, dst: Ipv4Addr, proto: u8, len: usize) -> Vec<u8> {
    let mut p = Vec::with_capacity(12);
    p.extend_from_slice(&src.octets());
    p.extend_from_slice(&dst.octets());
    p.push(0);
    p.push(proto);
    p.extend_from_slice(&u16::try_from(len).expect("L4 too long").to_be_bytes());
    p
}

fn pseudo_header_v6(src: Ipv6Addr, dst: Ipv6Addr, proto: u8, len: usize) -> Vec<u8> {
    let mut p = Vec::with_capacity(40);
    p.extend_from_slice(&src.octets());
    p.extend_from_slice(&dst.octets());
    p.extend_from_slice(&u32::try_from(len).expect("L4 too long").to_be_bytes());
    p.extend_from_slice(&[0, 0, 0, proto]);
    p
}

#[cfg(test)]
mod tests {
    use etherparse::{
        Icmpv4Header, Icmpv6Header, Ipv4Header, NetSlice, SlicedPacket, TcpHeader, TransportSlice,
        UdpHeader,
    };

    use super::*;

    fn v4() -> (Ipv4Addr, Ipv4Addr) {
        ("198.18.0.2".parse().unwrap(), "198.18.100.1".parse().unwrap())
    }

    fn v6() -> (Ipv6Addr, Ipv6Addr) {
        ("fd00::2".parse().unwrap(), "fd00:100::1".parse().unwrap())
    }

    /// Checks every checksum of `frame` with etherparse's own implementation.
    fn assert_checksums_match_etherparse(frame: &[u8]) {
        let sliced = SlicedPacket::from_ethernet(frame).expect("etherparse parses the frame");
        let payload_of_transport;
        match &sliced.net {
            Some(NetSlice::Ipv4(ip)) => {
                let header = ip.header().to_header();
                assert_eq!(header.header_checksum, header.calc_header_checksum(), "IPv4 header");
                let (src, dst) = (ip.header().source(), ip.header().destination());
                payload_of_transport = ip.payload().payload;
                match &sliced.transport {
                    Some(TransportSlice::Tcp(tcp)) => {
                        let h: TcpHeader = tcp.to_header();
                        let data = &payload_of_transport[h.header_len()..];
                        assert_eq!(h.checksum, h.calc_checksum_ipv4_raw(src, dst, data).unwrap());
                    }
                    Some(TransportSlice::Udp(udp)) => {
                        let h: UdpHeader = udp.to_header();
                        let data = &payload_of_transport[8..];
                        assert_eq!(h.checksum, h.calc_checksum_ipv4_raw(src, dst, data).unwrap());
                    }
                    Some(TransportSlice::Icmpv4(icmp)) => {
                        let h: Icmpv4Header = icmp.header();
                        let expected = Icmpv4Header::with_checksum(h.icmp_type, icmp.payload());
                        assert_eq!(h.checksum, expected.checksum);
                    }
                    other => panic!("unexpected transport {other:?}"),
                }
            }
            Some(NetSlice::Ipv6(ip)) => {
                let (src, dst) = (ip.header().source(), ip.header().destination());
                payload_of_transport = ip.payload().payload;
                match &sliced.transport {
                    Some(TransportSlice::Tcp(tcp)) => {
                        let h: TcpHeader = tcp.to_header();
                        let data = &payload_of_transport[h.header_len()..];
                        assert_eq!(h.checksum, h.calc_checksum_ipv6_raw(src, dst, data).unwrap());
                    }
                    Some(TransportSlice::Udp(udp)) => {
                        let h: UdpHeader = udp.to_header();
                        let data = &payload_of_transport[8..];
                        assert_eq!(h.checksum, h.calc_checksum_ipv6_raw(src, dst, data).unwrap());
                    }
                    Some(TransportSlice::Icmpv6(icmp)) => {
                        let h: Icmpv6Header = icmp.header();
                        let expected =
                            Icmpv6Header::with_checksum(h.icmp_type, src, dst, icmp.payload())
                                .unwrap();
                        assert_eq!(h.checksum, expected.checksum);
                    }
                    other => panic!("unexpected transport {other:?}"),
                }
            }
            other => panic!("unexpected network layer {other:?}"),
        }
    }

    #[test]
    fn tcp_udp_icmp_checksums_match_an_independent_implementation() {
        let (s4, d4) = v4();
        let (s6, d6) = v6();
        let payloads: [&[u8]; 3] = [b"", b"odd", b"GET / HTTP/1.1\r\n\r\n"];
        for payload in payloads {
            let frames = [
                Packet::ipv4(s4, d4).tcp(40000, 80).flags(tcp_flags::SYN).payload(payload).build(),
                Packet::ipv4(s4, d4)
                    .tcp(1, 65535)
                    .tcp_options(&[2, 4, 5, 0xb4])
                    .payload(payload)
                    .build(),
                Packet::ipv4(s4, d4).udp(5353, 53).payload(payload).build(),
                Packet::ipv4(s4, d4).echo_request(7, 1).payload(payload).build(),
                Packet::ipv4(s4, d4)
                    .ipv4_options(&[7, 7, 4, 0, 0, 0, 0])
                    .udp(1, 2)
                    .payload(payload)
                    .build(),
                Packet::ipv6(s6, d6).tcp(40000, 443).payload(payload).build(),
                Packet::ipv6(s6, d6).udp(40000, 53).payload(payload).build(),
                Packet::ipv6(s6, d6).echo_request(9, 3).payload(payload).build(),
                Packet::ipv6(s6, d6)
                    .ext_header(ExtHeader::HopByHop { len: 0 })
                    .ext_header(ExtHeader::DestOpts { len: 1 })
                    .udp(1, 2)
                    .payload(payload)
                    .build(),
                Packet::ipv4(s4, d4).vlan(100).udp(1, 2).payload(payload).build(),
            ];
            for frame in frames {
                assert_checksums_match_etherparse(&frame);
            }
        }
    }

    #[test]
    fn ipv4_header_fields() {
        let (s, d) = v4();
        let layout = Packet::ipv4(s, d).ipv4_options(&[1, 1, 1, 1, 1]).udp(1, 2).build_layout();
        let ip = Ipv4Header::from_slice(&layout.bytes[layout.l3_off..]).unwrap().0;
        assert_eq!(ip.ihl(), 7, "options padded to 8 bytes");
        assert_eq!(usize::from(ip.total_len), layout.bytes.len() - 14);
        assert_eq!(layout.l4_off, 14 + 28);
        assert!(ip.dont_fragment);
    }

    #[test]
    fn vlan_tags_are_stacked_outermost_first() {
        let (s, d) = v4();
        let frame = Packet::ipv4(s, d)
            .vlan_tpid(lb_common::net::ETH_P_8021AD, 10)
            .vlan(20)
            .udp(1, 2)
            .build();
        assert_eq!(&frame[12..14], &[0x88, 0xa8]);
        assert_eq!(&frame[14..16], &[0, 10]);
        assert_eq!(&frame[16..18], &[0x81, 0x00]);
        assert_eq!(&frame[18..20], &[0, 20]);
        assert_eq!(&frame[20..22], &[0x08, 0x00]);
    }

    #[test]
    fn ipv6_extension_chain_links_next_headers() {
        let (s, d) = v6();
        let layout = Packet::ipv6(s, d)
            .ext_header(ExtHeader::HopByHop { len: 0 })
            .ext_header(ExtHeader::Routing { len: 2 })
            .ext_header(ExtHeader::Fragment { offset: 0, more: true, id: 1 })
            .tcp(1, 2)
            .build_layout();
        let b = &layout.bytes;
        assert_eq!(b[14 + 6], 0, "fixed header points at hop-by-hop");
        assert_eq!(b[54], 43, "hop-by-hop points at routing");
        assert_eq!(b[62], 44, "routing points at fragment");
        assert_eq!(b[62 + 24], 6, "fragment points at TCP");
        assert_eq!(layout.l4_off, 54 + 8 + 24 + 8);
        let sliced = SlicedPacket::from_ethernet(b).unwrap();
        assert!(matches!(sliced.net, Some(NetSlice::Ipv6(_))));
    }

    #[test]
    fn checksum_of_known_vector() {
        // RFC 1071 §3 example bytes.
        let data = [0x00, 0x01, 0xf2, 0x03, 0xf4, 0xf5, 0xf6, 0xf7];
        assert_eq!(internet_checksum(&data), !0xddf2);
    }
}
