//! Protocol numbers, header sizes and parser bounds, shared by the parser and the tests.

/// EtherType of IPv4.
pub const ETH_P_IP: u16 = 0x0800;
/// EtherType of IPv6.
pub const ETH_P_IPV6: u16 = 0x86dd;
/// EtherType of ARP.
pub const ETH_P_ARP: u16 = 0x0806;
/// EtherType of an IEEE 802.1Q VLAN tag.
pub const ETH_P_8021Q: u16 = 0x8100;
/// EtherType of an IEEE 802.1ad (QinQ) service tag.
pub const ETH_P_8021AD: u16 = 0x88a8;

pub const IPPROTO_HOPOPTS: u8 = 0;
pub const IPPROTO_ICMP: u8 = 1;
pub const IPPROTO_TCP: u8 = 6;
pub const IPPROTO_UDP: u8 = 17;
pub const IPPROTO_ROUTING: u8 = 43;
pub const IPPROTO_FRAGMENT: u8 = 44;
pub const IPPROTO_GRE: u8 = 47;
pub const IPPROTO_ESP: u8 = 50;
pub const IPPROTO_AH: u8 = 51;
pub const IPPROTO_ICMPV6: u8 = 58;
pub const IPPROTO_NONE: u8 = 59;
pub const IPPROTO_DSTOPTS: u8 = 60;
pub const IPPROTO_MH: u8 = 135;

pub const ETH_HLEN: usize = 14;
pub const VLAN_HLEN: usize = 4;
pub const IPV4_MIN_HLEN: usize = 20;
pub const IPV4_MAX_HLEN: usize = 60;
pub const IPV6_HLEN: usize = 40;
pub const TCP_MIN_HLEN: usize = 20;
pub const UDP_HLEN: usize = 8;
/// ICMP and ICMPv6 headers: type, code, checksum and four bytes of message-specific data
/// (identifier and sequence for echo, MTU for "too big"); every defined message has them.
pub const ICMP_HLEN: usize = 8;

/// Stacked VLAN tags the parser walks (802.1ad outer plus 802.1Q inner). A deeper stack is
/// passed to the kernel and counted as `too_many_vlan_tags`.
pub const MAX_VLAN_TAGS: usize = 2;
/// IPv6 extension headers the parser walks before giving up. Real traffic carries zero to
/// three; a longer chain is passed to the kernel and counted as `too_many_ext_headers`.
pub const MAX_IPV6_EXT_HEADERS: usize = 6;

/// Furthest offset from the frame's start at which the parser accepts an L4 header. Bounding
/// every offset keeps the verifier's range tracking exact; Ethernet, two VLAN tags, IPv6 and a
/// generous extension-header chain fit well inside.
pub const MAX_L4_OFFSET: usize = 1024;

/// Flag bits of the TCP header's 13th byte.
pub mod tcp_flags {
    pub const FIN: u8 = 0x01;
    pub const SYN: u8 = 0x02;
    pub const RST: u8 = 0x04;
    pub const PSH: u8 = 0x08;
    pub const ACK: u8 = 0x10;
    pub const URG: u8 = 0x20;
}

/// Whether `next_header` is an IPv6 extension header the parser steps over.
#[inline(always)]
#[must_use]
pub const fn is_ipv6_ext_header(next_header: u8) -> bool {
    matches!(
        next_header,
        IPPROTO_HOPOPTS
            | IPPROTO_ROUTING
            | IPPROTO_FRAGMENT
            | IPPROTO_AH
            | IPPROTO_DSTOPTS
            | IPPROTO_MH
    )
}

/// Length in bytes of an IPv6 extension header from its type and its second byte
/// (RFC 8200 §4: units of 8 octets not counting the first; AH, RFC 4302: 4-octet units minus 2).
#[inline(always)]
#[must_use]
pub const fn ipv6_ext_header_len(next_header: u8, len_byte: u8) -> usize {
    match next_header {
        IPPROTO_FRAGMENT => 8,
        IPPROTO_AH => (len_byte as usize + 2) * 4,
        _ => (len_byte as usize + 1) * 8,
    }
}

#[cfg(test)]
#[allow(
    clippy::cast_possible_truncation,
    clippy::cast_precision_loss,
    reason = "test arithmetic on small, known values"
)]
mod tests {
    use super::*;

    #[test]
    fn ext_header_lengths() {
        assert_eq!(ipv6_ext_header_len(IPPROTO_HOPOPTS, 0), 8);
        assert_eq!(ipv6_ext_header_len(IPPROTO_DSTOPTS, 2), 24);
        assert_eq!(ipv6_ext_header_len(IPPROTO_FRAGMENT, 99), 8);
        assert_eq!(ipv6_ext_header_len(IPPROTO_AH, 4), 24);
        assert!(is_ipv6_ext_header(IPPROTO_ROUTING));
        assert!(!is_ipv6_ext_header(IPPROTO_TCP));
        assert!(!is_ipv6_ext_header(IPPROTO_ESP));
    }
}
