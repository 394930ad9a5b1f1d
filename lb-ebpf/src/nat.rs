//! Full NAT: rewriting addresses and ports with incremental checksum updates, and translating
//! replies from backends back to clients.

use aya_ebpf::programs::XdpContext;
use lb_common::{
    Action, Reason,
    conntrack::{FLOW_NAT, FLOW_REPLY, FLOW_SEQ_ADJ, FLOW_SYN_PROXY, Flow, FlowState},
    csum::{Delta, udp_nonzero},
    net::{IPPROTO_TCP, IPPROTO_UDP, tcp_flags},
    service::{AddrKey, Globals},
};

use crate::{
    flowcache::Slot,
    forward,
    maps::{CONNTRACK, NAT_SOURCES, Scratch},
    mem::put_addr,
    outcome::Outcome,
    parse::{Family, Fragment, Ipv4Hdr, Ipv6Hdr, Packet, TcpHdr, UdpHdr, ptr_at_mut},
    stats,
};

/// New addresses and ports for a packet, raw network order.
#[derive(Clone, Copy)]
pub struct Rewrite<'a> {
    pub src: &'a [u32; 4],
    pub dst: &'a [u32; 4],
    pub sport: u16,
    pub dport: u16,
}

/// Rewrites the packet's addresses and ports and fixes the IPv4 header checksum and the
/// TCP/UDP checksum (whose pseudo-header covers the addresses): the addresses' change is
/// summed once for both, and each checksum folded once.
#[inline(always)]
pub fn rewrite(ctx: &XdpContext, packet: &Packet, to: &Rewrite<'_>) -> Result<(), Reason> {
    let addrs = if packet.family == Family::V4 {
        Delta::NONE.u32(packet.src[0], to.src[0]).u32(packet.dst[0], to.dst[0])
    } else {
        Delta::NONE.u128(&packet.src, to.src).u128(&packet.dst, to.dst)
    };
    let l4 = addrs.u16(packet.sport, to.sport).u16(packet.dport, to.dport);
    match packet.proto {
        IPPROTO_TCP => {
            let tcp: *mut TcpHdr = ptr_at_mut(ctx, packet.l4_off)?;
            // SAFETY: checked by ptr_at_mut.
            let tcp = unsafe { &mut *tcp };
            tcp.check = l4.apply(u16::from_ne_bytes(tcp.check)).to_ne_bytes();
            tcp.sport = to.sport.to_ne_bytes();
            tcp.dport = to.dport.to_ne_bytes();
        }
        IPPROTO_UDP => {
            let udp: *mut UdpHdr = ptr_at_mut(ctx, packet.l4_off)?;
            // SAFETY: checked by ptr_at_mut.
            let udp = unsafe { &mut *udp };
            let old = u16::from_ne_bytes(udp.check);
            // IPv4 UDP may carry no checksum (zero); leave it so. So does IPv6 UDP (valid
            // only for tunnels that allow it, RFC 6935): the receiver judges it as it would
            // have without the balancer, as Linux's NAT does. A computed zero is sent as
            // 0xffff.
            if old != 0 {
                udp.check = udp_nonzero(l4.apply(old)).to_ne_bytes();
            }
            udp.sport = to.sport.to_ne_bytes();
            udp.dport = to.dport.to_ne_bytes();
        }
        _ => return Err(Reason::NotService),
    }
    if packet.family == Family::V4 {
        let ip: *mut Ipv4Hdr = ptr_at_mut(ctx, packet.l3_off)?;
        // SAFETY: checked by ptr_at_mut.
        let ip = unsafe { &mut *ip };
        ip.check = addrs.apply(u16::from_ne_bytes(ip.check)).to_ne_bytes();
        ip.src = to.src[0].to_ne_bytes();
        ip.dst = to.dst[0].to_ne_bytes();
    } else {
        let ip: *mut Ipv6Hdr = ptr_at_mut(ctx, packet.l3_off)?;
        // SAFETY: checked by ptr_at_mut.
        let ip = unsafe { &mut *ip };
        // SAFETY: packet memory.
        unsafe {
            put_addr(&mut ip.src, to.src);
            put_addr(&mut ip.dst, to.dst);
        }
    }
    Ok(())
}

/// Whether `packet` is addressed to one of the NAT source addresses.
#[inline(always)]
fn is_nat_source(packet: &Packet) -> bool {
    let key = AddrKey { addr: packet.dst, family: packet.family as u32 };
    NAT_SOURCES.get_ptr(key).is_some()
}

/// ICMP errors to a NAT source address about a NAT flow go back to its client, errors to a
/// service address about a flow's replies go to its backend (see `icmp.rs`); anything else
/// that reaches here is not ours (`not_service`: the host's own traffic). TCP and UDP
/// replies are found by the connection lookup before (see `main.rs`).
#[inline(always)]
pub fn try_icmp_error(ctx: &XdpContext, scratch: &mut Scratch, now: u64) -> Outcome {
    let Scratch { packet, buf, .. } = scratch;
    // Cheap tests first: the address lookups are the expensive ones. An error with IP
    // options or IPv6 extension headers is not translated, as a NAT flow's packets with
    // them are not (a routing header would put another address in the ICMPv6 checksum's
    // pseudo-header than the one rewritten): it goes to the host.
    if packet.has_l4
        && packet.fragment == Fragment::None
        && !packet.has_ip_options
        && crate::icmp::is_error(packet)
    {
        let nat_source = is_nat_source(packet);
        if nat_source {
            // Fails with `not_service` before it changes the packet.
            let outcome = crate::icmp::translate_error(ctx, packet, buf, now);
            // An address may be a NAT source and a service address at once: an error that
            // quotes no NAT flow's packet to a backend may quote a reply to a client. Not
            // one about an untracked flow, though: that may be a NAT flow's whose entries
            // are gone, which no DSR service's table may claim.
            if outcome.into_result() != Err(Reason::NotService) {
                return outcome;
            }
        }
        if crate::select::is_vip(packet) {
            return crate::icmp::error_to_backend(ctx, packet, buf, now, !nat_source);
        }
    }
    Outcome::err(Reason::NotService)
}

/// Keeps the forward entry of the NAT flow whose reply entry is `e` alive with it (a flow
/// whose client went quiet, a one-way UDP stream from the backend, must not expire from the
/// client's side while its replies flow), or closes it with the backend's reset. Only if
/// it is still this flow's: the same backend and NAT port. Out of line: once a second per
/// flow, not per packet.
#[inline(never)]
fn touch_forward(e: &Flow, proto: u8, family: u8, reset: bool, now: u64) {
    if let Some(f) = CONNTRACK.get_ptr_mut(&e.forward_key(proto, family)) {
        // SAFETY: a map value pointer from a successful lookup.
        let f = unsafe { &mut *f };
        if f.flags & (FLOW_NAT | FLOW_REPLY) != FLOW_NAT
            || f.backend_id != e.backend_id
            || f.nat_port != e.nat_port
        {
            return;
        }
        if reset {
            f.state = FlowState::Closed as u8;
        }
        f.last_seen = now;
    }
}

/// Translates a backend's reply back to the client, by its reply entry `e` (the table's),
/// and has the packet's flow-cache slot (`slot`, in `epoch`) follow the entry: filled from
/// it as this packet leaves it (with `generation`, the port's read before the lookup that
/// found `e`: see `Slot::fill`), or emptied.
#[inline(always)]
pub fn reply(
    ctx: &XdpContext,
    packet: &Packet,
    e: &mut Flow,
    g: &Globals,
    now: u64,
    (slot, epoch, generation): (&Slot, u32, u32),
) -> Result<Action, Reason> {
    if g.timeouts.is_expired(e.state, e.last_seen, now) {
        slot.forget();
        return Err(Reason::NotService);
    }
    if packet.proto == IPPROTO_TCP && e.flags & (FLOW_SYN_PROXY | FLOW_SEQ_ADJ) != 0 {
        // Never cached, and neither may an older copy of the key be used.
        slot.forget();
        if e.flags & FLOW_SYN_PROXY != 0 {
            if packet.tcp_flags & tcp_flags::RST == 0 {
                // The backend's SYN-ACK to the load balancer's SYN: answered here.
                return crate::syncookie::on_backend_answer(ctx, packet, e, now).into_result();
            }
            // Refused: the client hears it at the sequence number it expects (cookie + 1).
            // Only a reset that acknowledges the load balancer's SYN (the client's ISN + 1),
            // as a kernel in SYN-SENT takes it: a blind one (forged, or another
            // connection's on the port) would end a handshake it does not belong to.
            let (seq, ack) = crate::syncookie::seq_and_ack(ctx, packet)?;
            if packet.tcp_flags & tcp_flags::ACK == 0 || ack != e.isn.wrapping_add(1) {
                return Err(Reason::SynProxyPending);
            }
            crate::syncookie::shift(
                ctx,
                packet,
                false,
                e.seq_delta.wrapping_add(1).wrapping_sub(seq),
            )?;
        } else {
            crate::syncookie::shift(ctx, packet, false, e.seq_delta.wrapping_neg())?;
        }
    }
    // A reset from the backend ends the flow for both directions; the client's next SYN on
    // the tuple then starts afresh.
    let reset = packet.proto == IPPROTO_TCP && packet.tcp_flags & tcp_flags::RST != 0;
    if reset || now.saturating_sub(e.last_seen) > g.refresh {
        e.last_seen = now;
        if reset {
            e.state = FlowState::Closed as u8;
        }
        touch_forward(e, packet.proto, packet.family as u8, reset, now);
    }
    slot.fill(packet, e, epoch, generation);
    translate(ctx, packet, e)
}

/// Translates a backend's reply back to the client by the reply entry `e`, the table's or
/// a flow-cache copy: addresses and ports, counters, transmission.
#[inline(always)]
pub fn translate(ctx: &XdpContext, packet: &Packet, e: &Flow) -> Result<Action, Reason> {
    let to = Rewrite { src: &e.vip_addr, dst: &e.peer_addr, sport: e.vip_port, dport: e.peer_port };
    rewrite(ctx, packet, &to)?;
    let (service_id, backend_id) = (e.service_id, e.backend_id);
    let action = forward::transmit(ctx, e.reply_ifindex, &e.reply_dmac, &e.reply_smac)?;
    stats::count_traffic(service_id, backend_id, stats::frame_len(ctx), false, true);
    Ok(action)
}
