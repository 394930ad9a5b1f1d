//! PROXY protocol version 2 header encoder (haproxy's `proxy-protocol.txt`, section 2.2): the
//! bytes a passthrough proxy writes to a backend before the client's stream so the backend
//! learns the client's address.
//!
//! Only the `PROXY` command over TCP is encoded, with no TLVs. IPv4-mapped IPv6 addresses
//! (`::ffff:a.b.c.d`, what a dual-stack `[::]` listener reports for IPv4 clients) are first
//! reduced to IPv4, so an IPv4 connection is announced as `TCP4`; when the two ends are still
//! of different families, both are sent as IPv6, the IPv4 one mapped. IPv6 flow labels and
//! scope ids are not part of the format and are dropped.

use std::net::{IpAddr, Ipv6Addr, SocketAddr};

/// The 12 bytes every version 2 header starts with.
pub const PROXY_V2_SIGNATURE: [u8; 12] =
    [0x0d, 0x0a, 0x0d, 0x0a, 0x00, 0x0d, 0x0a, 0x51, 0x55, 0x49, 0x54, 0x0a];

/// Version 2 (high nibble) with the `PROXY` command (low nibble).
const VERSION_2_PROXY: u8 = 0x21;

/// Address family `AF_INET` (high nibble) with protocol `STREAM` (low nibble).
const TCP_OVER_IPV4: u8 = 0x11;

/// Address family `AF_INET6` (high nibble) with protocol `STREAM` (low nibble).
const TCP_OVER_IPV6: u8 = 0x21;

/// Address block length for IPv4: two 4-byte addresses and two ports.
const IPV4_ADDRESS_LEN: u16 = 12;

/// Address block length for IPv6: two 16-byte addresses and two ports.
const IPV6_ADDRESS_LEN: u16 = 36;

/// Encodes the PROXY v2 header announcing a TCP connection from `client` to `local` (the
/// address the client connected to).
pub fn proxy_v2_header(client: SocketAddr, local: SocketAddr) -> Vec<u8> {
    let src = client.ip().to_canonical();
    let dst = local.ip().to_canonical();
    let mut header = Vec::with_capacity(16 + usize::from(IPV6_ADDRESS_LEN));
    header.extend_from_slice(&PROXY_V2_SIGNATURE);
    header.push(VERSION_2_PROXY);
    match (src, dst) {
        (IpAddr::V4(src), IpAddr::V4(dst)) => {
            header.push(TCP_OVER_IPV4);
            header.extend_from_slice(&IPV4_ADDRESS_LEN.to_be_bytes());
            header.extend_from_slice(&src.octets());
            header.extend_from_slice(&dst.octets());
        }
        (src, dst) => {
            header.push(TCP_OVER_IPV6);
            header.extend_from_slice(&IPV6_ADDRESS_LEN.to_be_bytes());
            header.extend_from_slice(&to_ipv6(src).octets());
            header.extend_from_slice(&to_ipv6(dst).octets());
        }
    }
    header.extend_from_slice(&client.port().to_be_bytes());
    header.extend_from_slice(&local.port().to_be_bytes());
    header
}

/// An address as IPv6, mapping IPv4 into `::ffff:0:0/96`.
fn to_ipv6(ip: IpAddr) -> Ipv6Addr {
    match ip {
        IpAddr::V4(ip) => ip.to_ipv6_mapped(),
        IpAddr::V6(ip) => ip,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SIG: [u8; 12] = [0x0d, 0x0a, 0x0d, 0x0a, 0x00, 0x0d, 0x0a, b'Q', b'U', b'I', b'T', 0x0a];

    fn expected(rest: &[u8]) -> Vec<u8> {
        [&SIG[..], rest].concat()
    }

    #[test]
    fn ipv4() {
        let header = proxy_v2_header(
            "192.0.2.10:51000".parse().unwrap(),
            "198.51.100.1:443".parse().unwrap(),
        );
        #[rustfmt::skip]
        let rest = [
            0x21, 0x11, 0x00, 0x0c,
            192, 0, 2, 10,
            198, 51, 100, 1,
            0xc7, 0x38,
            0x01, 0xbb,
        ];
        assert_eq!(header, expected(&rest));
        assert_eq!(header.len(), 16 + 12);
    }

    #[test]
    fn ipv6() {
        let header = proxy_v2_header(
            "[2001:db8::1]:40000".parse().unwrap(),
            "[2001:db8:ffff::2]:443".parse().unwrap(),
        );
        #[rustfmt::skip]
        let rest = [
            0x21, 0x21, 0x00, 0x24,
            0x20, 0x01, 0x0d, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x01,
            0x20, 0x01, 0x0d, 0xb8, 0xff, 0xff, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x02,
            0x9c, 0x40,
            0x01, 0xbb,
        ];
        assert_eq!(header, expected(&rest));
        assert_eq!(header.len(), 16 + 36);
    }

    #[test]
    fn mixed_families_are_sent_as_ipv6() {
        let header = proxy_v2_header(
            "203.0.113.7:1234".parse().unwrap(),
            "[2001:db8::80]:8443".parse().unwrap(),
        );
        #[rustfmt::skip]
        let rest = [
            0x21, 0x21, 0x00, 0x24,
            0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, 203, 0, 113, 7,
            0x20, 0x01, 0x0d, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x80,
            0x04, 0xd2,
            0x20, 0xfb,
        ];
        assert_eq!(header, expected(&rest));
        // The other way round maps the destination.
        let header = proxy_v2_header(
            "[2001:db8::80]:8443".parse().unwrap(),
            "203.0.113.7:1234".parse().unwrap(),
        );
        assert_eq!(&header[12..16], &[0x21, 0x21, 0x00, 0x24]);
        assert_eq!(&header[32..48], &[0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, 203, 0, 113, 7]);
    }

    #[test]
    fn ipv4_mapped_pair_is_sent_as_ipv4() {
        let header = proxy_v2_header(
            "[::ffff:192.0.2.10]:51000".parse().unwrap(),
            "[::ffff:198.51.100.1]:443".parse().unwrap(),
        );
        let plain = proxy_v2_header(
            "192.0.2.10:51000".parse().unwrap(),
            "198.51.100.1:443".parse().unwrap(),
        );
        assert_eq!(header, plain);
        // One mapped end and one plain IPv4 end are the same family once reduced.
        let header = proxy_v2_header(
            "[::ffff:192.0.2.10]:51000".parse().unwrap(),
            "198.51.100.1:443".parse().unwrap(),
        );
        assert_eq!(header, plain);
    }

    #[test]
    fn signature_constant_matches_the_spec() {
        assert_eq!(PROXY_V2_SIGNATURE, SIG);
        assert_eq!(&PROXY_V2_SIGNATURE[7..11], b"QUIT");
    }
}
