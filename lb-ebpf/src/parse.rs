//! Header access and the one packet parser every feature uses.
//!
//! Every read of packet bytes goes through [`ptr_at`], which checks the access against
//! `data_end` (the verifier insists, and a malformed frame must never be read past its end).
//! Header structs are made of byte arrays so they have alignment 1 and can sit at any offset.

use aya_ebpf::programs::XdpContext;

use crate::outcome::Outcome;
use lb_common::{
    FlowKey, Reason,
    net::{
        ETH_HLEN, ETH_P_8021AD, ETH_P_8021Q, ETH_P_IP, ETH_P_IPV6, ICMP_HLEN, IPPROTO_FRAGMENT,
        IPPROTO_ICMP, IPPROTO_ICMPV6, IPPROTO_TCP, IPPROTO_UDP, IPV4_MIN_HLEN, IPV6_HLEN,
        MAX_IPV6_EXT_HEADERS, MAX_L4_OFFSET, MAX_VLAN_TAGS, TCP_MIN_HLEN, UDP_HLEN, VLAN_HLEN,
        ipv6_ext_header_len, is_ipv6_ext_header,
    },
};

#[repr(C)]
pub struct EthHdr {
    pub dst: [u8; 6],
    pub src: [u8; 6],
    pub proto: [u8; 2],
}

#[repr(C)]
pub struct VlanHdr {
    pub tci: [u8; 2],
    pub proto: [u8; 2],
}

#[repr(C)]
pub struct Ipv4Hdr {
    pub version_ihl: u8,
    pub tos: u8,
    pub tot_len: [u8; 2],
    pub id: [u8; 2],
    pub frag_off: [u8; 2],
    pub ttl: u8,
    pub proto: u8,
    pub check: [u8; 2],
    pub src: [u8; 4],
    pub dst: [u8; 4],
}

#[repr(C)]
pub struct Ipv6Hdr {
    pub version_tc_flow: [u8; 4],
    pub payload_len: [u8; 2],
    pub next_header: u8,
    pub hop_limit: u8,
    pub src: [u8; 16],
    pub dst: [u8; 16],
}

/// The first two bytes of every IPv6 extension header.
#[repr(C)]
pub struct Ipv6ExtHdr {
    pub next_header: u8,
    pub len: u8,
    pub rest: [u8; 2],
}

#[repr(C)]
pub struct TcpHdr {
    pub sport: [u8; 2],
    pub dport: [u8; 2],
    pub seq: [u8; 4],
    pub ack_seq: [u8; 4],
    pub doff_res: u8,
    pub flags: u8,
    pub window: [u8; 2],
    pub check: [u8; 2],
    pub urg_ptr: [u8; 2],
}

#[repr(C)]
pub struct UdpHdr {
    pub sport: [u8; 2],
    pub dport: [u8; 2],
    pub len: [u8; 2],
    pub check: [u8; 2],
}

#[repr(C)]
pub struct IcmpHdr {
    pub kind: u8,
    pub code: u8,
    pub check: [u8; 2],
    pub rest: [u8; 4],
}

/// The context again, read so that LLVM cannot hand a non-inlined function the packet
/// pointers themselves: it would pass them as plain integers and zero-extend them with
/// shifts, which the verifier forbids on packet pointers. Every non-inlined function that
/// takes the context starts with this.
#[inline(always)]
pub fn reload(ctx: &XdpContext) -> XdpContext {
    // SAFETY: reads the context pointer the caller holds; volatile keeps the read in place.
    XdpContext::new(unsafe { core::ptr::read_volatile(&raw const ctx.ctx) })
}

/// Pointer to a `T` at `offset` bytes into the frame, if the whole `T` lies inside it.
#[inline(always)]
pub fn ptr_at<T>(ctx: &XdpContext, offset: usize) -> Result<*const T, Reason> {
    let start = ctx.data();
    let end = ctx.data_end();
    // verifier: a packet pointer may only move by a bounded offset; callers' offsets are below
    // MAX_L4_OFFSET plus a header, and this check makes the bound explicit.
    if offset > MAX_L4_OFFSET + 64 {
        return Err(Reason::HeadersTooLong);
    }
    if start + offset + core::mem::size_of::<T>() > end {
        return Err(Reason::Truncated);
    }
    Ok((start + offset) as *const T)
}

/// Mutable variant of [`ptr_at`], for the rewrite modules.
#[inline(always)]
#[allow(dead_code, reason = "used by the rewrite paths")]
pub fn ptr_at_mut<T>(ctx: &XdpContext, offset: usize) -> Result<*mut T, Reason> {
    ptr_at::<T>(ctx, offset).map(<*const T>::cast_mut)
}

/// Address family of a parsed packet.
#[repr(u8)]
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Family {
    V4 = 4,
    V6 = 6,
}

/// Where a packet sits in a fragmented datagram.
#[repr(u8)]
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Fragment {
    /// Not a fragment.
    None = 0,
    /// The first fragment: it carries the L4 header.
    First = 1,
    /// A later fragment: no L4 header, so no ports.
    Later = 2,
}

/// What the parser learned about a frame; offsets are from the start of the frame.
///
/// The first 40 bytes are laid out as a [`FlowKey`] (addresses, ports, protocol, family,
/// zero padding), so the connection table is keyed by the packet itself ([`Packet::flow_key`])
/// rather than by a copy built for every lookup.
#[repr(C)]
#[derive(Clone, Copy)]
#[allow(dead_code, reason = "the filter and balancer stages read these fields")]
pub struct Packet {
    /// Source address in network byte order; IPv4 uses the first word, the rest is zero.
    pub src: [u32; 4],
    /// Destination address, laid out like `src`.
    pub dst: [u32; 4],
    /// Source port in network byte order (zero without ports).
    pub sport: u16,
    /// Destination port in network byte order (zero without ports).
    pub dport: u16,
    /// Final protocol after any IPv6 extension headers.
    pub proto: u8,
    pub family: Family,
    /// `FlowKey::_pad`: always zero.
    pub key_pad: u16,
    /// Start of the IP header.
    pub l3_off: usize,
    /// Start of the L4 header; only meaningful when `has_l4` is set.
    pub l4_off: usize,
    /// End of the IP datagram by its own length field (Ethernet padding excluded).
    pub l3_end: usize,
    pub vlan_tags: u8,
    pub fragment: Fragment,
    /// IPv4 options present (IHL > 5) or IPv6 extension headers present.
    pub has_ip_options: bool,
    /// The L4 header of `proto` (TCP, UDP, ICMP or ICMPv6) was found and is complete.
    pub has_l4: bool,
    pub tcp_flags: u8,
    pub icmp_type: u8,
    pub icmp_code: u8,
    /// Why the IP header parsed but the transport header behind it cannot be read (a
    /// `Reason`'s number: a broken or overlong IPv6 header chain, an L4 header cut short or
    /// a TCP data offset below 5), or 0. Such a packet has addresses but no ports: the
    /// firewall refuses it and the balancer does not serve it (see `main.rs`).
    pub l4_error: u8,
}

// `Packet::flow_key` reads the packet's head as a `FlowKey`: the layouts must agree.
const _: () = {
    use core::mem::offset_of;
    assert!(offset_of!(Packet, src) == offset_of!(FlowKey, src));
    assert!(offset_of!(Packet, dst) == offset_of!(FlowKey, dst));
    assert!(offset_of!(Packet, sport) == offset_of!(FlowKey, sport));
    assert!(offset_of!(Packet, dport) == offset_of!(FlowKey, dport));
    assert!(offset_of!(Packet, proto) == offset_of!(FlowKey, proto));
    assert!(offset_of!(Packet, family) == offset_of!(FlowKey, family));
    assert!(offset_of!(Packet, key_pad) == offset_of!(FlowKey, _pad));
    assert!(offset_of!(Packet, l3_off) >= core::mem::size_of::<FlowKey>());
    assert!(core::mem::align_of::<Packet>() >= core::mem::align_of::<FlowKey>());
};

impl Packet {
    /// The packet's flow as the connection table keys it: its own first 40 bytes.
    #[inline(always)]
    pub const fn flow_key(&self) -> &FlowKey {
        // SAFETY: `Packet` is `repr(C)` and starts with `FlowKey`'s fields at the same
        // offsets (asserted above), all plain integers (`Family` is a `u8` of 4 or 6) and
        // the padding an explicit zero field; the alignment is at least `FlowKey`'s.
        unsafe { &*core::ptr::from_ref(self).cast::<FlowKey>() }
    }
}

#[inline(always)]
fn be16(bytes: [u8; 2]) -> u16 {
    u16::from_be_bytes(bytes)
}

#[inline(always)]
fn words4(bytes: [u8; 4]) -> [u32; 4] {
    [u32::from_ne_bytes(bytes), 0, 0, 0]
}

#[inline(always)]
fn words16(b: [u8; 16]) -> [u32; 4] {
    [
        u32::from_ne_bytes([b[0], b[1], b[2], b[3]]),
        u32::from_ne_bytes([b[4], b[5], b[6], b[7]]),
        u32::from_ne_bytes([b[8], b[9], b[10], b[11]]),
        u32::from_ne_bytes([b[12], b[13], b[14], b[15]]),
    ]
}

/// Parses Ethernet, up to [`MAX_VLAN_TAGS`] VLAN tags, IPv4 or IPv6 (with extension headers)
/// and the TCP, UDP or ICMP header behind them.
///
/// Errors name why the frame has no IP header to read; the caller passes such frames to the
/// kernel. A readable IP header with an unreadable header chain or L4 header behind it is
/// no error: `Packet::l4_error` says so, and the firewall still sees the packet.
///
/// The result goes to `out` (a per-CPU scratch value), written field by field, never the
/// stack: inlined, parsing takes the entry function from 56 to 128 bytes of stack, which the
/// 512-byte limit on a call chain allows (a call and return are dear where the kernel
/// hardens returns); what follows reads the packet from map memory, so the verifier carries
/// one state past parsing rather than one per header layout.
#[inline(always)]
pub fn parse_packet(ctx: &XdpContext, out: &mut Packet) -> Outcome {
    match try_parse_packet(ctx, out) {
        Ok(()) => Outcome::DONE,
        Err(reason) => Outcome::err(reason),
    }
}

/// Fields are written to `out` one by one as they are learned: a `Packet` built on the stack
/// and copied would cost its size in stack (which every call chain carries) and a copy.
/// After an error `out` is partly written and must not be read.
#[inline(always)]
fn try_parse_packet(ctx: &XdpContext, out: &mut Packet) -> Result<(), Reason> {
    let eth: *const EthHdr = ptr_at(ctx, 0)?;
    // SAFETY: ptr_at checked that the header lies inside the frame.
    let mut ether_type = be16(unsafe { (*eth).proto });
    let mut off = ETH_HLEN;
    let mut vlan_tags = 0u8;
    for _ in 0..MAX_VLAN_TAGS {
        if ether_type != ETH_P_8021Q && ether_type != ETH_P_8021AD {
            break;
        }
        let vlan: *const VlanHdr = ptr_at(ctx, off)?;
        // SAFETY: checked by ptr_at.
        ether_type = be16(unsafe { (*vlan).proto });
        off += VLAN_HLEN;
        vlan_tags += 1;
    }
    if ether_type == ETH_P_8021Q || ether_type == ETH_P_8021AD {
        return Err(Reason::TooManyVlanTags);
    }
    match ether_type {
        ETH_P_IP => parse_ipv4(ctx, off, out)?,
        ETH_P_IPV6 => parse_ipv6(ctx, off, out)?,
        _ => return Err(Reason::NotIp),
    }
    out.vlan_tags = vlan_tags;
    out.sport = 0;
    out.dport = 0;
    out.tcp_flags = 0;
    out.icmp_type = 0;
    out.icmp_code = 0;
    out.has_l4 = false;
    if out.l4_error == 0
        && out.fragment != Fragment::Later
        && let Err(reason) = parse_l4(ctx, out)
    {
        out.l4_error = reason as u8;
    }
    Ok(())
}

#[inline(always)]
fn parse_ipv4(ctx: &XdpContext, l3_off: usize, out: &mut Packet) -> Result<(), Reason> {
    let ip: *const Ipv4Hdr = ptr_at(ctx, l3_off)?;
    // SAFETY: checked by ptr_at.
    let ip = unsafe { &*ip };
    if ip.version_ihl >> 4 != 4 {
        return Err(Reason::BadIpv4Header);
    }
    let hlen = usize::from(ip.version_ihl & 0x0f) * 4;
    if hlen < IPV4_MIN_HLEN {
        return Err(Reason::BadIpv4Header);
    }
    let tot_len = usize::from(be16(ip.tot_len));
    if tot_len < hlen {
        return Err(Reason::BadIpv4Header);
    }
    let l3_end = l3_off + tot_len;
    if ctx.data() + l3_end > ctx.data_end() {
        return Err(Reason::BadIpv4Header);
    }
    let frag = be16(ip.frag_off);
    let fragment = if frag & 0x1fff != 0 {
        Fragment::Later
    } else if frag & 0x2000 != 0 {
        Fragment::First
    } else {
        Fragment::None
    };
    out.src = words4(ip.src);
    out.dst = words4(ip.dst);
    out.proto = ip.proto;
    out.family = Family::V4;
    out.key_pad = 0;
    out.l3_off = l3_off;
    out.l4_off = l3_off + hlen;
    out.l3_end = l3_end;
    out.fragment = fragment;
    out.has_ip_options = hlen > IPV4_MIN_HLEN;
    out.l4_error = 0;
    Ok(())
}

#[inline(always)]
fn parse_ipv6(ctx: &XdpContext, l3_off: usize, out: &mut Packet) -> Result<(), Reason> {
    let ip: *const Ipv6Hdr = ptr_at(ctx, l3_off)?;
    // SAFETY: checked by ptr_at.
    let ip = unsafe { &*ip };
    if ip.version_tc_flow[0] >> 4 != 6 {
        return Err(Reason::BadIpv6Header);
    }
    let l3_end = l3_off + IPV6_HLEN + usize::from(be16(ip.payload_len));
    if ctx.data() + l3_end > ctx.data_end() {
        return Err(Reason::BadIpv6Header);
    }
    out.src = words16(ip.src);
    out.dst = words16(ip.dst);
    out.family = Family::V6;
    out.key_pad = 0;
    out.l3_off = l3_off;
    out.l3_end = l3_end;
    let mut chain = Chain { next: ip.next_header, off: l3_off + IPV6_HLEN, ..Chain::default() };
    let walked = walk_ipv6_chain(ctx, l3_end, &mut chain);
    out.proto = chain.next;
    out.l4_off = chain.off;
    out.fragment = chain.fragment;
    // Counted from the first header on, even one that could not be read.
    out.has_ip_options = chain.headers > 0 || is_ipv6_ext_header(ip.next_header);
    out.l4_error = match walked {
        Ok(()) => 0,
        Err(reason) => reason as u8,
    };
    Ok(())
}

/// Where a walk along an IPv6 header chain has got to.
#[derive(Clone, Copy)]
struct Chain {
    /// The next header's type, and where it starts.
    next: u8,
    off: usize,
    fragment: Fragment,
    /// Extension headers passed.
    headers: u8,
}

impl Default for Chain {
    fn default() -> Self {
        Self { next: 0, off: 0, fragment: Fragment::None, headers: 0 }
    }
}

/// Follows the extension headers from `chain` to the transport header (or a later
/// fragment's payload). An error says why it cannot be reached within the datagram, in
/// [`MAX_IPV6_EXT_HEADERS`] headers and [`MAX_L4_OFFSET`] bytes.
#[inline(always)]
fn walk_ipv6_chain(ctx: &XdpContext, l3_end: usize, chain: &mut Chain) -> Result<(), Reason> {
    for _ in 0..MAX_IPV6_EXT_HEADERS {
        if !is_ipv6_ext_header(chain.next) {
            break;
        }
        let ext: *const Ipv6ExtHdr = ptr_at(ctx, chain.off)?;
        // SAFETY: checked by ptr_at.
        let ext = unsafe { &*ext };
        if chain.next == IPPROTO_FRAGMENT {
            // Fragment offset is the top 13 bits of bytes 2-3; bit 0 is "more fragments".
            let frag = be16(ext.rest);
            if frag & 0xfff8 != 0 {
                chain.fragment = Fragment::Later;
            } else if frag & 1 != 0 {
                chain.fragment = Fragment::First;
            }
        }
        chain.off += ipv6_ext_header_len(chain.next, ext.len);
        chain.next = ext.next_header;
        chain.headers += 1;
        if chain.off > l3_end {
            return Err(Reason::Truncated);
        }
        if chain.off > MAX_L4_OFFSET {
            return Err(Reason::HeadersTooLong);
        }
        if chain.fragment == Fragment::Later {
            break;
        }
    }
    if chain.fragment != Fragment::Later && is_ipv6_ext_header(chain.next) {
        return Err(Reason::TooManyExtHeaders);
    }
    Ok(())
}

/// Reads the L4 header of `packet.proto`, if it is one the balancer understands.
#[inline(always)]
fn parse_l4(ctx: &XdpContext, packet: &mut Packet) -> Result<(), Reason> {
    let off = packet.l4_off;
    if off > MAX_L4_OFFSET {
        return Err(Reason::HeadersTooLong);
    }
    match packet.proto {
        IPPROTO_TCP => {
            let tcp: *const TcpHdr = ptr_at(ctx, off)?;
            // SAFETY: checked by ptr_at.
            let tcp = unsafe { &*tcp };
            let hlen = usize::from(tcp.doff_res >> 4) * 4;
            if hlen < TCP_MIN_HLEN {
                return Err(Reason::BadTcpHeader);
            }
            if off + hlen > packet.l3_end {
                return Err(Reason::Truncated);
            }
            packet.sport = u16::from_ne_bytes(tcp.sport);
            packet.dport = u16::from_ne_bytes(tcp.dport);
            packet.tcp_flags = tcp.flags;
        }
        IPPROTO_UDP => {
            let udp: *const UdpHdr = ptr_at(ctx, off)?;
            if off + UDP_HLEN > packet.l3_end {
                return Err(Reason::Truncated);
            }
            // SAFETY: checked by ptr_at.
            let udp = unsafe { &*udp };
            packet.sport = u16::from_ne_bytes(udp.sport);
            packet.dport = u16::from_ne_bytes(udp.dport);
        }
        IPPROTO_ICMP | IPPROTO_ICMPV6 => {
            let icmp: *const IcmpHdr = ptr_at(ctx, off)?;
            if off + ICMP_HLEN > packet.l3_end {
                return Err(Reason::Truncated);
            }
            // SAFETY: checked by ptr_at.
            let icmp = unsafe { &*icmp };
            packet.icmp_type = icmp.kind;
            packet.icmp_code = icmp.code;
        }
        _ => return Ok(()),
    }
    packet.has_l4 = true;
    Ok(())
}
