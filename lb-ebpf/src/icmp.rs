//! ICMP errors about balanced flows, in both directions, so path-MTU discovery and error
//! reporting work through the balancer:
//!
//! - A "port unreachable", "fragmentation needed" or "packet too big" sent to the NAT address
//!   about a packet the balancer sent to a backend is translated back to the client. The
//!   error quotes the translated packet (NAT address and port to backend); its reply entry
//!   gives the client's view.
//! - One sent to a service address about a packet the service sent a client (a router on
//!   the client's path too small for a backend's answer) goes to the flow's backend: as it
//!   is for a DSR flow (the backend answers from the service address itself), translated for
//!   a NAT flow (the quoted packet becomes the backend's own, backend to NAT address and
//!   port, sequence number in the backend's numbering for a cookie-opened flow). A DSR
//!   service's error without a flow here (expired, or another balancer node carried the
//!   flow) goes where the service's Maglev table sends the flow.
//!
//! Translations rewrite the outer destination, the quoted addresses, ports and checksums and
//! the ICMP checksum incrementally. Both directions build the same key from the quoted packet
//! (its ports and addresses swapped: the reply entry's key at a NAT address, the forward
//! entry's at a service address) and describe the translation the same way, in
//! [`EntryBuf::flow`]: the quoted packet's new source and destination in `peer_addr` and
//! `vip_addr`, its new ports in `peer_port` and `vip_port` (a reply entry's own layout).

use aya_ebpf::programs::XdpContext;
use lb_common::{
    Action, FlowKey, Reason,
    conntrack::{FLOW_NAT, FLOW_REPLY, FLOW_SEQ_ADJ, FLOW_SYN_PROXY},
    csum::{replace_u16, replace_u32, replace_u128},
    net::{IPPROTO_FRAGMENT, IPPROTO_ICMP, IPPROTO_ICMPV6, IPPROTO_TCP, IPPROTO_UDP, IPV6_HLEN},
    service::{SERVICE_NAT, ServiceKey},
};

use crate::{
    conntrack::{self, EntryBuf, backend_at},
    forward,
    maps::CONNTRACK,
    mem::put_addr,
    outcome::Outcome,
    parse::{Family, IcmpHdr, Ipv4Hdr, Ipv6Hdr, Packet, ptr_at_mut, reload},
    select::{self, globals},
    stats,
};

/// Whether an ICMP (v4) or ICMPv6 message is an error that quotes the packet it is about.
#[inline(always)]
pub const fn is_error(packet: &Packet) -> bool {
    match (packet.proto, packet.family) {
        // Destination unreachable, time exceeded, parameter problem.
        (IPPROTO_ICMP, Family::V4) => matches!(packet.icmp_type, 3 | 11 | 12),
        // Destination unreachable, packet too big, time exceeded, parameter problem.
        (IPPROTO_ICMPV6, Family::V6) => matches!(packet.icmp_type, 1..=4),
        _ => false,
    }
}

/// Translates an ICMP error about a NAT flow back to the flow's client. The flow's key and
/// entry are copied to `buf` (per-CPU scratch), which keeps this frame small.
#[inline(never)]
pub fn translate_error(ctx: &XdpContext, packet: &Packet, buf: &mut EntryBuf, now: u64) -> Outcome {
    let ctx = &reload(ctx);
    Outcome::from_result(try_translate_error(ctx, packet, buf, now))
}

/// The first eight bytes of the quoted L4 header: the ports and, for UDP, the checksum (for
/// TCP, the sequence number).
#[repr(C)]
struct QuotedL4 {
    sport: [u8; 2],
    dport: [u8; 2],
    rest: [u8; 4],
}

#[inline(always)]
fn try_translate_error(
    ctx: &XdpContext,
    packet: &Packet,
    buf: &mut EntryBuf,
    now: u64,
) -> Result<Action, Reason> {
    // The quoted packet went from the NAT source to the backend: its reply entry is keyed the
    // other way round.
    // Every `not_service` below comes before the packet changes (see `nat::try_icmp_error`).
    let inner_l4 = quoted_key(ctx, packet, &mut buf.key, false)?;
    // It must have come from the NAT source address the error went to.
    let (from, to) = (&buf.key.dst, &packet.dst);
    if from[0] != to[0] || from[1] != to[1] || from[2] != to[2] || from[3] != to[3] {
        return Err(Reason::NotService);
    }
    let entry = CONNTRACK.get_ptr(&buf.key).ok_or(Reason::NotService)?;
    // SAFETY: a map value pointer from a successful lookup; copied to scratch memory.
    unsafe { crate::mem::copy(&raw mut buf.flow, entry) };
    let g = globals()?;
    let flow = &buf.flow;
    if flow.flags & FLOW_REPLY == 0 || g.timeouts.is_expired(flow.state, flow.last_seen, now) {
        return Err(Reason::NotService);
    }

    rewrite_outer(ctx, packet, buf).into_status()?;
    rewrite_quoted(ctx, packet, buf, inner_l4 as u32).into_status()?;
    let flow = &buf.flow;
    let action = forward::transmit(ctx, flow.reply_ifindex, &flow.reply_dmac, &flow.reply_smac)?;
    stats::count_traffic(flow.service_id, flow.backend_id, stats::frame_len(ctx), false, true);
    Ok(action)
}

/// Sends an ICMP error to a service address about a packet the service sent a client on to
/// that flow's backend (see the module's description); with `by_table`, an untracked flow's
/// to the backend a DSR service's table gives it. The flow's key and the translation are
/// built in `buf` (per-CPU scratch).
#[inline(never)]
pub fn error_to_backend(
    ctx: &XdpContext,
    packet: &Packet,
    buf: &mut EntryBuf,
    now: u64,
    by_table: bool,
) -> Outcome {
    let ctx = &reload(ctx);
    Outcome::from_result(try_error_to_backend(ctx, packet, buf, now, by_table))
}

#[inline(always)]
fn try_error_to_backend(
    ctx: &XdpContext,
    packet: &Packet,
    buf: &mut EntryBuf,
    now: u64,
    by_table: bool,
) -> Result<Action, Reason> {
    // The quoted packet went from the service to the client: the flow's forward entry is
    // keyed the other way round. It must have come from the address the error went to.
    // A fragment quoted: only a DSR flow's (passed on whole); a NAT flow's packets carry no
    // extension headers (dropped both ways), and its quoted headers are rewritten.
    let inner_l4 = quoted_key(ctx, packet, &mut buf.key, true)?;
    let fragment = inner_l4 != packet.l4_off + 8 + IPV6_HLEN && packet.family == Family::V6;
    let key = &buf.key;
    let (from, to) = (&key.dst, &packet.dst);
    if from[0] != to[0] || from[1] != to[1] || from[2] != to[2] || from[3] != to[3] {
        return Err(Reason::NotService);
    }
    let g = globals()?;
    // SAFETY: a map value pointer from a successful lookup, valid for this program run.
    let live = CONNTRACK.get_ptr(key).map(|e| unsafe { &*e }).filter(|e| {
        e.flags & (FLOW_REPLY | FLOW_SYN_PROXY) == 0
            && !g.timeouts.is_expired(e.state, e.last_seen, now)
    });
    let Some(e) = live else {
        if !by_table {
            return Err(Reason::NotService);
        }
        return to_table_backend(ctx, key).into_result();
    };
    if e.flags & FLOW_NAT == 0 {
        return forward::send_dsr(ctx, e.service_id, e.backend_id, false);
    }
    if fragment {
        return Err(Reason::NotService);
    }
    let (backend, backend_port) = backend_at(e.backend_id, key.dport)?;
    // Only while the flow still holds its NAT port: once another flow has taken it over (the
    // LRU evicted this one's reply entry), the error would be about that flow's connection.
    if !conntrack::holds_port(key, e, backend) {
        return Err(Reason::NotService);
    }
    // The quoted packet becomes the backend's: backend to NAT address and port.
    let to_backend = &mut buf.flow;
    // SAFETY: map values and per-CPU scratch memory: valid and disjoint.
    unsafe {
        crate::mem::copy(&raw mut to_backend.peer_addr, &raw const backend.addr);
        crate::mem::copy(&raw mut to_backend.vip_addr, &raw const e.peer_addr);
    }
    to_backend.peer_port = backend_port;
    to_backend.vip_port = e.nat_port;
    to_backend.flags = e.flags;
    to_backend.seq_delta = e.seq_delta;
    to_backend.service_id = e.service_id;
    to_backend.backend_id = e.backend_id;
    rewrite_outer(ctx, packet, buf).into_status()?;
    rewrite_quoted(ctx, packet, buf, inner_l4 as u32).into_status()?;
    let backend_id = buf.flow.backend_id;
    let hop = forward::next_hop(backend_id)?;
    let action = forward::transmit(ctx, hop.ifindex, &hop.dmac, &hop.smac)?;
    stats::count_traffic(buf.flow.service_id, backend_id, stats::frame_len(ctx), false, false);
    Ok(action)
}

/// Sends an error about a flow not tracked here (expired, or carried by another balancer
/// node) to the backend a DSR service's Maglev table gives the flow (`key`): the one every
/// node agrees on. A NAT service's has nothing to translate it with. Not inlined: the
/// service lookup's frame stays off the translation's call chain.
#[inline(never)]
fn to_table_backend(ctx: &XdpContext, key: &FlowKey) -> Outcome {
    let ctx = &reload(ctx);
    let service_key =
        ServiceKey { addr: key.dst, port: key.dport, proto: key.proto, family: key.family };
    let Some(service) = select::service_at(service_key) else {
        return Outcome::err(Reason::NotService);
    };
    if service.flags & SERVICE_NAT != 0 {
        return Outcome::err(Reason::NotService);
    }
    let backend_id = match globals().and_then(|g| select::choose_backend(service, key, g)) {
        Ok(id) => id,
        Err(reason) => return Outcome::err(reason),
    };
    Outcome::from_result(forward::send_dsr(ctx, service.id, backend_id, false))
}

/// Writes the key of the quoted packet's flow, its addresses and ports swapped, to `key`:
/// `key.dst` is the quoted source and `key.src` the quoted destination. Returns the offset
/// of the quoted L4 header; only TCP and UDP are quoted flows. With `fragment_ok`, a quoted
/// IPv6 first fragment (a fragment header with offset 0: a DSR backend's UDP answer larger
/// than the path, fragmented at its source) is read through its fragment header.
#[inline(always)]
fn quoted_key(
    ctx: &XdpContext,
    packet: &Packet,
    key: &mut FlowKey,
    fragment_ok: bool,
) -> Result<usize, Reason> {
    let inner_off = packet.l4_off + 8;
    key.family = packet.family as u8;
    key._pad = 0;
    let inner_l4 = if packet.family == Family::V4 {
        let ip: *mut Ipv4Hdr = ptr_at_mut(ctx, inner_off)?;
        // SAFETY: checked by ptr_at_mut.
        let ip = unsafe { &*ip };
        let hlen = usize::from(ip.version_ihl & 0x0f) * 4;
        // A later fragment quoted has no ports where they would be.
        if hlen < 20 || u16::from_be_bytes(ip.frag_off) & 0x1fff != 0 {
            return Err(Reason::NotService);
        }
        key.dst = [u32::from_ne_bytes(ip.src), 0, 0, 0];
        key.src = [u32::from_ne_bytes(ip.dst), 0, 0, 0];
        key.proto = ip.proto;
        inner_off + hlen
    } else {
        let ip: *mut Ipv6Hdr = ptr_at_mut(ctx, inner_off)?;
        // SAFETY: checked by ptr_at_mut.
        let ip = unsafe { &*ip };
        key.dst = words(&ip.src);
        key.src = words(&ip.dst);
        key.proto = ip.next_header;
        if fragment_ok && key.proto == IPPROTO_FRAGMENT {
            // Next header, reserved, offset (13 bits) and flags, identification.
            let frag: *mut [u8; 8] = ptr_at_mut(ctx, inner_off + IPV6_HLEN)?;
            // SAFETY: checked by ptr_at_mut.
            let frag = unsafe { &*frag };
            if u16::from_be_bytes([frag[2], frag[3]]) >> 3 != 0 {
                return Err(Reason::NotService);
            }
            key.proto = frag[0];
            inner_off + IPV6_HLEN + 8
        } else {
            inner_off + IPV6_HLEN
        }
    };
    if key.proto != IPPROTO_TCP && key.proto != IPPROTO_UDP {
        return Err(Reason::NotService);
    }
    // Within the ICMP message, not in the frame's padding behind it.
    if inner_l4 + core::mem::size_of::<QuotedL4>() > packet.l3_end {
        return Err(Reason::NotService);
    }
    let l4: *const QuotedL4 = ptr_at_mut(ctx, inner_l4)?;
    // SAFETY: checked by ptr_at_mut.
    let l4 = unsafe { &*l4 };
    key.dport = u16::from_ne_bytes(l4.sport);
    key.sport = u16::from_ne_bytes(l4.dport);
    Ok(inner_l4)
}

/// Rewrites the outer header for whoever sent the quoted packet (the new quoted source); the
/// running ICMP checksum is left in the packet. An error the quoted packet's destination
/// sent itself comes from the new quoted destination (the service to a client, the NAT
/// address to a backend). Not inlined, like [`rewrite_quoted`]: each gets a stack frame of
/// its own.
#[inline(never)]
fn rewrite_outer(ctx: &XdpContext, packet: &Packet, buf: &EntryBuf) -> Outcome {
    let ctx = &reload(ctx);
    match try_rewrite_outer(ctx, packet, buf) {
        Ok(()) => Outcome::DONE,
        Err(reason) => Outcome::err(reason),
    }
}

#[inline(always)]
fn try_rewrite_outer(ctx: &XdpContext, packet: &Packet, buf: &EntryBuf) -> Result<(), Reason> {
    let (key, flow) = (&buf.key, &buf.flow);
    let icmp: *mut IcmpHdr = ptr_at_mut(ctx, packet.l4_off)?;
    // SAFETY: checked by ptr_at_mut.
    let icmp = unsafe { &mut *icmp };
    let mut icmp_check = u16::from_ne_bytes(icmp.check);
    let from_peer = packet.src == key.src;
    let new_src = if from_peer { &flow.vip_addr } else { &packet.src };
    if packet.family == Family::V4 {
        let ip: *mut Ipv4Hdr = ptr_at_mut(ctx, packet.l3_off)?;
        // SAFETY: checked by ptr_at_mut.
        let ip = unsafe { &mut *ip };
        let mut check = u16::from_ne_bytes(ip.check);
        check = replace_u32(check, packet.dst[0], flow.peer_addr[0]);
        check = replace_u32(check, packet.src[0], new_src[0]);
        ip.check = check.to_ne_bytes();
        ip.dst = flow.peer_addr[0].to_ne_bytes();
        ip.src = new_src[0].to_ne_bytes();
    } else {
        let ip: *mut Ipv6Hdr = ptr_at_mut(ctx, packet.l3_off)?;
        // SAFETY: checked by ptr_at_mut.
        let ip = unsafe { &mut *ip };
        // ICMPv6's checksum covers a pseudo-header with the outer addresses.
        icmp_check = replace_u128(icmp_check, &packet.dst, &flow.peer_addr);
        icmp_check = replace_u128(icmp_check, &packet.src, new_src);
        // SAFETY: packet memory.
        unsafe {
            put_addr(&mut ip.dst, &flow.peer_addr);
            put_addr(&mut ip.src, new_src);
        }
    }

    icmp.check = icmp_check.to_ne_bytes();
    Ok(())
}

/// Rewrites the quoted packet (at `inner_l4` its L4 header) as `buf.flow` describes and
/// finishes the ICMP checksum. A forward entry's translation (towards a backend) of a
/// cookie-opened flow also takes the quoted TCP sequence number back to the backend's
/// numbering.
#[inline(never)]
fn rewrite_quoted(ctx: &XdpContext, packet: &Packet, buf: &EntryBuf, inner_l4: u32) -> Outcome {
    let ctx = &reload(ctx);
    match try_rewrite_quoted(ctx, packet, buf, inner_l4 as usize) {
        Ok(()) => Outcome::DONE,
        Err(reason) => Outcome::err(reason),
    }
}

#[inline(always)]
fn try_rewrite_quoted(
    ctx: &XdpContext,
    packet: &Packet,
    buf: &EntryBuf,
    inner_l4: usize,
) -> Result<(), Reason> {
    let (key, flow) = (&buf.key, &buf.flow);
    let inner_off = packet.l4_off + 8;
    if inner_l4 > lb_common::net::MAX_L4_OFFSET {
        return Err(Reason::HeadersTooLong);
    }
    let icmp: *mut IcmpHdr = ptr_at_mut(ctx, packet.l4_off)?;
    // SAFETY: checked by ptr_at_mut.
    let icmp = unsafe { &mut *icmp };
    let mut icmp_check = u16::from_ne_bytes(icmp.check);
    let l4: *mut QuotedL4 = ptr_at_mut(ctx, inner_l4)?;
    // SAFETY: checked by ptr_at_mut.
    let l4 = unsafe { &mut *l4 };
    // The quoted L4 header: its ports, sequence number, and checksum (UDP's is in the quoted
    // eight bytes; TCP's only when more of the header is quoted).
    let v4 = packet.family == Family::V4;
    let shift_seq =
        key.proto == IPPROTO_TCP && flow.flags & (FLOW_REPLY | FLOW_SEQ_ADJ) == FLOW_SEQ_ADJ;
    let old_seq = u32::from_ne_bytes(l4.rest);
    let new_seq =
        u32::from_ne_bytes(u32::from_be_bytes(l4.rest).wrapping_add(flow.seq_delta).to_be_bytes());
    if shift_seq {
        icmp_check = replace_u32(icmp_check, old_seq, new_seq);
        l4.rest = new_seq.to_ne_bytes();
    }
    let l4_update = |c: u16| -> u16 {
        let mut c = c;
        if shift_seq {
            c = replace_u32(c, old_seq, new_seq);
        }
        if v4 {
            c = replace_u32(c, key.dst[0], flow.peer_addr[0]);
            c = replace_u32(c, key.src[0], flow.vip_addr[0]);
        } else {
            c = replace_u128(c, &key.dst, &flow.peer_addr);
            c = replace_u128(c, &key.src, &flow.vip_addr);
        }
        c = replace_u16(c, key.dport, flow.peer_port);
        replace_u16(c, key.sport, flow.vip_port)
    };
    if key.proto == IPPROTO_UDP {
        let old = u16::from_ne_bytes([l4.rest[2], l4.rest[3]]);
        if old != 0 {
            // Zero would say "no checksum": its other form, as a sender writes it.
            let new = match l4_update(old) {
                0 => 0xffff,
                new => new,
            };
            icmp_check = replace_u16(icmp_check, old, new);
            let [a, b] = new.to_ne_bytes();
            l4.rest[2] = a;
            l4.rest[3] = b;
        }
    } else if let Ok(check) = ptr_at_mut::<[u8; 2]>(ctx, inner_l4 + 16)
        && inner_l4 + 18 <= packet.l3_end
    {
        // SAFETY: checked by ptr_at_mut.
        let check = unsafe { &mut *check };
        let old = u16::from_ne_bytes(*check);
        let new = l4_update(old);
        icmp_check = replace_u16(icmp_check, old, new);
        *check = new.to_ne_bytes();
    }
    icmp_check = replace_u16(icmp_check, key.dport, flow.peer_port);
    icmp_check = replace_u16(icmp_check, key.sport, flow.vip_port);
    l4.sport = flow.peer_port.to_ne_bytes();
    l4.dport = flow.vip_port.to_ne_bytes();

    // The quoted IP header: addresses (and, for IPv4, its own checksum).
    if v4 {
        let ip: *mut Ipv4Hdr = ptr_at_mut(ctx, inner_off)?;
        // SAFETY: checked by ptr_at_mut.
        let ip = unsafe { &mut *ip };
        let old_check = u16::from_ne_bytes(ip.check);
        let mut check = replace_u32(old_check, key.dst[0], flow.peer_addr[0]);
        check = replace_u32(check, key.src[0], flow.vip_addr[0]);
        icmp_check = replace_u16(icmp_check, old_check, check);
        icmp_check = replace_u32(icmp_check, key.dst[0], flow.peer_addr[0]);
        icmp_check = replace_u32(icmp_check, key.src[0], flow.vip_addr[0]);
        ip.check = check.to_ne_bytes();
        ip.src = flow.peer_addr[0].to_ne_bytes();
        ip.dst = flow.vip_addr[0].to_ne_bytes();
    } else {
        let ip: *mut Ipv6Hdr = ptr_at_mut(ctx, inner_off)?;
        // SAFETY: checked by ptr_at_mut.
        let ip = unsafe { &mut *ip };
        icmp_check = replace_u128(icmp_check, &key.dst, &flow.peer_addr);
        icmp_check = replace_u128(icmp_check, &key.src, &flow.vip_addr);
        // SAFETY: packet memory.
        unsafe {
            put_addr(&mut ip.src, &flow.peer_addr);
            put_addr(&mut ip.dst, &flow.vip_addr);
        }
    }
    icmp.check = icmp_check.to_ne_bytes();
    Ok(())
}

#[inline(always)]
fn words(b: &[u8; 16]) -> [u32; 4] {
    [
        u32::from_ne_bytes([b[0], b[1], b[2], b[3]]),
        u32::from_ne_bytes([b[4], b[5], b[6], b[7]]),
        u32::from_ne_bytes([b[8], b[9], b[10], b[11]]),
        u32::from_ne_bytes([b[12], b[13], b[14], b[15]]),
    ]
}
