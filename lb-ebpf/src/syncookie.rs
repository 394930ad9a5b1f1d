//! SYN cookies for NAT services, answered from XDP so a spoofed SYN flood never reaches the
//! connection table.
//!
//! 1. A SYN gets a SYN-ACK whose sequence number is a cookie (`bpf_tcp_raw_gen_syncookie_*`,
//!    the kernel's own cookie with its secret and MSS table), sent back out with `XDP_TX`.
//!    Nothing is stored.
//! 2. The client's ACK carries the cookie back (`ack - 1`). If it checks out, the flow is
//!    opened like any NAT flow — but the ACK is turned into a SYN to the backend with the
//!    client's initial sequence number, and both entries are marked `FLOW_SYN_PROXY`.
//! 3. The backend's SYN-ACK is answered here with the ACK the client would have sent; both
//!    entries record `seq_delta` = backend ISN − cookie and become `FLOW_SEQ_ADJ`.
//! 4. From then on, acknowledgements from the client get `seq_delta` added and sequence
//!    numbers from the backend get it taken away; nothing else changes.
//!
//! The cookie carries only the MSS, so the client's window scaling, SACK and timestamps are
//! not negotiated (as with the kernel's own cookies); the SYN to the backend offers MSS 1460
//! (IPv4) or 1440 (IPv6) and nothing else.

use aya_ebpf::{
    bindings::{iphdr, ipv6hdr, tcphdr},
    helpers::{
        bpf_tcp_raw_check_syncookie_ipv4, bpf_tcp_raw_check_syncookie_ipv6,
        bpf_tcp_raw_gen_syncookie_ipv4, bpf_tcp_raw_gen_syncookie_ipv6, bpf_xdp_adjust_tail,
    },
    programs::XdpContext,
};
use lb_common::{
    Action, Reason,
    conntrack::{
        FLOW_NAT, FLOW_REPLY, FLOW_SEQ_ADJ, FLOW_SYN_PROXY, Flow, FlowState, opens_connection,
    },
    csum::{checksum, pseudo_header_sum, replace_u32},
    net::{IPPROTO_TCP, tcp_flags},
    service::{MAX_SERVICES, SERVICE_SYN_COOKIES, Service},
};

use crate::{
    conntrack::LiveNat,
    maps::{CONNTRACK, SYN_STATS},
    outcome::Outcome,
    parse::{EthHdr, Family, Ipv4Hdr, Ipv6Hdr, Packet, TcpHdr, ptr_at, ptr_at_mut, reload},
};

/// MSS offered to backends for the client (the cookie does not carry the client's exact
/// one), and to the client for the backend in the cookie SYN-ACK (the backend, not asked
/// yet, is taken to sit behind a 1500-byte MTU, as the client is taken to).
const BACKEND_MSS_V4: u16 = 1460;
const BACKEND_MSS_V6: u16 = 1440;
/// Receive window in the segments the load balancer writes (no window scaling).
const WINDOW: u16 = 0xffff;

/// Copies of the headers the cookie helpers read (they take no packet pointers of variable
/// length), in per-CPU scratch memory.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct CookieBuf {
    pub ip: [u8; 40],
    pub tcp: [u8; 60],
}

/// Which counter of `SYN_STATS` to bump.
#[derive(Clone, Copy)]
enum Count {
    Syn,
    Sent,
    Valid,
    Invalid,
}

#[inline(always)]
fn count(service_id: u32, which: Count) {
    if service_id >= MAX_SERVICES {
        return;
    }
    if let Some(c) = SYN_STATS.get_ptr_mut(service_id) {
        // SAFETY: per-CPU value.
        unsafe {
            match which {
                Count::Syn => (*c).syns += 1,
                Count::Sent => (*c).cookies_sent += 1,
                Count::Valid => (*c).cookies_valid += 1,
                Count::Invalid => (*c).cookies_invalid += 1,
            }
        }
    }
}

/// Where the SYN for a cookie-opened flow goes, and its sequence number.
pub struct Proxied {
    pub nat_addr: [u32; 4],
    pub backend_addr: [u32; 4],
    /// Network order.
    pub nat_port: u16,
    pub backend_port: u16,
    pub client_isn: u32,
}

/// What the TCP header written by [`emit`] says.
struct Segment {
    src: [u32; 4],
    dst: [u32; 4],
    sport: u16,
    dport: u16,
    seq: u32,
    ack: u32,
    flags: u8,
    window: u16,
    /// Nonzero: an MSS option (the header is then 24 bytes, else 20).
    mss: u16,
}

/// A TCP packet without a flow to a service that may use cookies: a SYN is counted and,
/// while cookies are on, answered here (`Tx`); an ACK with a valid cookie marks `live` for
/// a cookie-opened flow (`FLOW_SYN_PROXY`); an ACK with an invalid one is dropped while
/// cookies are on, and so is anything else (a RST, a SYN-ACK, a segment without flags):
/// under a flood, only a cookie opens a flow. With cookies off, anything else goes on as an
/// ordinary new flow (`DONE`), counted with the SYNs: it takes two entries and a NAT port
/// like a SYN does, so a flood of spoofed ACKs turns `auto` cookies on as a SYN flood does.
#[inline(never)]
pub fn on_new_flow(
    ctx: &XdpContext,
    service: &Service,
    packet: &Packet,
    cookie: &mut CookieBuf,
    live: &mut LiveNat,
) -> Outcome {
    let ctx = &reload(ctx);
    let flags = packet.tcp_flags;
    let active = service.flags & SERVICE_SYN_COOKIES != 0;
    if flags & (tcp_flags::SYN | tcp_flags::ACK) == tcp_flags::SYN {
        // Counted for `auto` whatever else is set: a flood of SYN+FIN opens flows too while
        // cookies are off.
        count(service.id, Count::Syn);
        if !active {
            return Outcome::DONE;
        }
        if !opens_connection(flags) {
            return Outcome::err(Reason::SynCookieInvalid);
        }
        count(service.id, Count::Sent);
        return Outcome::from_result(answer(ctx, packet, cookie));
    }
    if flags & (tcp_flags::SYN | tcp_flags::RST | tcp_flags::ACK) != tcp_flags::ACK {
        if active {
            // Counted: `auto` watches SYNs and these drops together, or a flood of segments
            // that would open flows turned cookies on, and, dropped uncounted once they are
            // on, let them go off again while it goes on.
            count(service.id, Count::Invalid);
            return Outcome::err(Reason::SynCookieInvalid);
        }
        count(service.id, Count::Syn);
        return Outcome::DONE;
    }
    if check(ctx, packet, cookie) {
        count(service.id, Count::Valid);
        let (client_isn, cookie_isn) = isns(cookie);
        live.cookie_flags = FLOW_SYN_PROXY;
        live.isn = client_isn;
        live.seq_delta = cookie_isn;
        live.state = FlowState::SynSeen as u8;
        Outcome::DONE
    } else if active {
        count(service.id, Count::Invalid);
        Outcome::err(Reason::SynCookieInvalid)
    } else {
        // `auto` while SYNs get no cookies: an ordinary mid-stream pickup, counted for the
        // rate (see above).
        count(service.id, Count::Syn);
        Outcome::DONE
    }
}

/// Whether `packet`, on a closed connection's tuple marked `FLOW_COOKIE_REOPEN`, is a
/// client's ACK carrying a valid cookie (its new connection's third segment), not one of
/// the old connection's. `old_isn`: the old connection's initial sequence number when a
/// cookie opened it too, whose own segments carry a valid cookie until either side sends
/// data (sequence number ISN + 1, acknowledgement cookie + 1): one of those is the old
/// connection's (a challenge ACK its client sends back for a forged SYN). Out of line: the
/// established path only calls it for marked tuples.
#[inline(never)]
pub fn reopens(
    ctx: &XdpContext,
    packet: &Packet,
    cookie: &mut CookieBuf,
    old_isn: Option<u32>,
) -> bool {
    let ctx = &reload(ctx);
    if packet.proto != IPPROTO_TCP
        || packet.tcp_flags & (tcp_flags::SYN | tcp_flags::RST | tcp_flags::ACK) != tcp_flags::ACK
    {
        return false;
    }
    if let Some(isn) = old_isn
        && seq_and_ack(ctx, packet).is_ok_and(|(seq, _)| seq == isn.wrapping_add(1))
    {
        return false;
    }
    check(ctx, packet, cookie)
}

/// Answers a SYN with a cookie SYN-ACK, sent back where it came from.
#[inline(always)]
fn answer(ctx: &XdpContext, packet: &Packet, cookie: &mut CookieBuf) -> Result<Action, Reason> {
    let th_len = copy_headers(ctx, packet, cookie)?;
    let generated = if packet.family == Family::V4 {
        // SAFETY: pointers to scratch memory holding the headers; th_len is the TCP header's
        // length, within the buffer.
        unsafe {
            bpf_tcp_raw_gen_syncookie_ipv4(
                cookie.ip.as_mut_ptr().cast::<iphdr>(),
                cookie.tcp.as_mut_ptr().cast::<tcphdr>(),
                th_len,
            )
        }
    } else {
        // SAFETY: as above.
        unsafe {
            bpf_tcp_raw_gen_syncookie_ipv6(
                cookie.ip.as_mut_ptr().cast::<ipv6hdr>(),
                cookie.tcp.as_mut_ptr().cast::<tcphdr>(),
                th_len,
            )
        }
    };
    if generated < 0 {
        return Err(Reason::SynCookieFailed);
    }
    // The cookie in the low 32 bits, its MSS (the client's, rounded down to the kernel's
    // table) in the next 16: that is what the client receives, not what the backend does.
    // The SYN-ACK offers the backend's side instead: a client on a jumbo link (IPv6's table
    // goes up to 8940) told its own MSS would send segments the backend's link drops.
    let generated = generated.cast_unsigned();
    let client_seq =
        u32::from_be_bytes([cookie.tcp[4], cookie.tcp[5], cookie.tcp[6], cookie.tcp[7]]);
    let segment = Segment {
        src: packet.dst,
        dst: packet.src,
        sport: packet.dport,
        dport: packet.sport,
        seq: generated as u32,
        ack: client_seq.wrapping_add(1),
        flags: tcp_flags::SYN | tcp_flags::ACK,
        window: WINDOW,
        mss: if packet.family == Family::V4 { BACKEND_MSS_V4 } else { BACKEND_MSS_V6 },
    };
    swap_macs(ctx)?;
    emit(ctx, packet, &segment)?;
    Ok(Action::Tx)
}

/// Whether an ACK without a flow carries a valid cookie.
#[inline(always)]
fn check(ctx: &XdpContext, packet: &Packet, cookie: &mut CookieBuf) -> bool {
    if copy_headers(ctx, packet, cookie).is_err() {
        return false;
    }
    let result = if packet.family == Family::V4 {
        // SAFETY: pointers to scratch memory holding full headers.
        unsafe {
            bpf_tcp_raw_check_syncookie_ipv4(
                cookie.ip.as_mut_ptr().cast::<iphdr>(),
                cookie.tcp.as_mut_ptr().cast::<tcphdr>(),
            )
        }
    } else {
        // SAFETY: as above.
        unsafe {
            bpf_tcp_raw_check_syncookie_ipv6(
                cookie.ip.as_mut_ptr().cast::<ipv6hdr>(),
                cookie.tcp.as_mut_ptr().cast::<tcphdr>(),
            )
        }
    };
    result == 0
}

/// The client's initial sequence number and the cookie, from its validated ACK.
#[inline(always)]
fn isns(cookie: &CookieBuf) -> (u32, u32) {
    let t = &cookie.tcp;
    let seq = u32::from_be_bytes([t[4], t[5], t[6], t[7]]);
    let ack = u32::from_be_bytes([t[8], t[9], t[10], t[11]]);
    (seq.wrapping_sub(1), ack.wrapping_sub(1))
}

/// Turns the validated ACK into the SYN the backend gets: from the NAT address and port, with
/// the client's initial sequence number. The caller sends it.
#[inline(never)]
pub fn syn_to_backend(ctx: &XdpContext, packet: &Packet, to: &Proxied) -> Outcome {
    let ctx = &reload(ctx);
    let segment = Segment {
        src: to.nat_addr,
        dst: to.backend_addr,
        sport: to.nat_port,
        dport: to.backend_port,
        seq: to.client_isn,
        ack: 0,
        flags: tcp_flags::SYN,
        window: WINDOW,
        mss: if packet.family == Family::V4 { BACKEND_MSS_V4 } else { BACKEND_MSS_V6 },
    };
    match emit(ctx, packet, &segment) {
        Ok(()) => Outcome::DONE,
        Err(reason) => Outcome::err(reason),
    }
}

/// Answers the backend's SYN-ACK with the ACK the client would have sent (the client's
/// `isn + 1`, the backend's ISN + 1), back out where it came from.
#[inline(always)]
fn ack_backend(ctx: &XdpContext, packet: &Packet, client_isn: u32, backend_isn: u32) -> Outcome {
    let ctx = &reload(ctx);
    let segment = Segment {
        src: packet.dst,
        dst: packet.src,
        sport: packet.dport,
        dport: packet.sport,
        seq: client_isn.wrapping_add(1),
        ack: backend_isn.wrapping_add(1),
        flags: tcp_flags::ACK,
        window: WINDOW,
        mss: 0,
    };
    let result = swap_macs(ctx).and_then(|()| emit(ctx, packet, &segment));
    match result {
        Ok(()) => Outcome::ok(Action::Tx),
        Err(reason) => Outcome::err(reason),
    }
}

/// The backend answered the SYN of a cookie-opened flow (`e`, its reply entry): a SYN-ACK
/// completes the handshake (both entries learn the sequence offset, the backend gets its
/// ACK); anything else but a reset (handled by the caller) is dropped.
#[inline(never)]
pub fn on_backend_answer(ctx: &XdpContext, packet: &Packet, e: &mut Flow, now: u64) -> Outcome {
    let ctx = &reload(ctx);
    if packet.tcp_flags & (tcp_flags::SYN | tcp_flags::ACK) != tcp_flags::SYN | tcp_flags::ACK {
        return Outcome::err(Reason::SynProxyPending);
    }
    // The ACK is built from the headers' known lengths (see `emit`).
    if packet.has_ip_options {
        return Outcome::err(Reason::IpOptions);
    }
    let Ok((backend_isn, acked)) = seq_and_ack(ctx, packet) else {
        return Outcome::err(Reason::Truncated);
    };
    let client_isn = e.isn;
    // An answer to another SYN (an older connection's on this port, or forged) would set
    // the flow's sequence offset wrong for its whole life.
    if acked != client_isn.wrapping_add(1) {
        return Outcome::err(Reason::SynProxyPending);
    }
    // Until now `seq_delta` held the cookie; from now on the offset between the two.
    let delta = backend_isn.wrapping_sub(e.seq_delta);
    let forward = e.forward_key(IPPROTO_TCP, packet.family as u8);
    let established = FlowState::Established as u8;
    // Only while the client's side is still this flow's (its entry may have been evicted,
    // and the tuple taken by another flow): the same backend and NAT port, waiting for this
    // answer. Else the handshake is not completed for a connection no client packet reaches.
    let Some(f) = CONNTRACK.get_ptr_mut(&forward) else {
        return Outcome::err(Reason::SynProxyPending);
    };
    // SAFETY: a map value pointer from a successful lookup.
    let f = unsafe { &mut *f };
    if f.flags & (FLOW_NAT | FLOW_REPLY | FLOW_SYN_PROXY) != FLOW_NAT | FLOW_SYN_PROXY
        || f.backend_id != e.backend_id
        || f.nat_port != e.nat_port
    {
        return Outcome::err(Reason::SynProxyPending);
    }
    // The offset before the flag that says to apply it (volatile: in this order; x86 makes
    // stores visible in order): a packet on another CPU in between must not shift by the
    // cookie's number instead of the offset.
    // SAFETY: map value pointers from successful lookups.
    unsafe {
        core::ptr::write_volatile(&raw mut f.seq_delta, delta);
        core::ptr::write_volatile(&raw mut f.state, established);
        core::ptr::write_volatile(&raw mut f.flags, (f.flags & !FLOW_SYN_PROXY) | FLOW_SEQ_ADJ);
    }
    f.last_seen = now;
    // SAFETY: as above.
    unsafe {
        core::ptr::write_volatile(&raw mut e.seq_delta, delta);
        core::ptr::write_volatile(&raw mut e.state, established);
        core::ptr::write_volatile(&raw mut e.flags, (e.flags & !FLOW_SYN_PROXY) | FLOW_SEQ_ADJ);
    }
    e.last_seen = now;
    ack_backend(ctx, packet, client_isn, backend_isn)
}

/// A TCP packet's sequence and acknowledgement numbers.
#[inline(always)]
pub fn seq_and_ack(ctx: &XdpContext, packet: &Packet) -> Result<(u32, u32), Reason> {
    let tcp: *const TcpHdr = ptr_at(ctx, packet.l4_off)?;
    // SAFETY: checked by ptr_at.
    let tcp = unsafe { &*tcp };
    Ok((u32::from_be_bytes(tcp.seq), u32::from_be_bytes(tcp.ack_seq)))
}

/// Adds `delta` to the sequence number (`ack` false) or acknowledgement number (`ack` true)
/// of a TCP packet, updating its checksum.
#[inline(always)]
pub fn shift(ctx: &XdpContext, packet: &Packet, ack: bool, delta: u32) -> Result<(), Reason> {
    if packet.proto != IPPROTO_TCP || delta == 0 {
        return Ok(());
    }
    let tcp: *mut TcpHdr = ptr_at_mut(ctx, packet.l4_off)?;
    // SAFETY: checked by ptr_at_mut.
    let tcp = unsafe { &mut *tcp };
    let field = if ack { &mut tcp.ack_seq } else { &mut tcp.seq };
    let old = *field;
    let new = u32::from_be_bytes(old).wrapping_add(delta).to_be_bytes();
    *field = new;
    let check = replace_u32(
        u16::from_ne_bytes(tcp.check),
        u32::from_ne_bytes(old),
        u32::from_ne_bytes(new),
    );
    tcp.check = check.to_ne_bytes();
    Ok(())
}

/// Copies the IP header and the TCP header (with options) into `buf`; returns the TCP
/// header's length.
#[inline(always)]
fn copy_headers(ctx: &XdpContext, packet: &Packet, buf: &mut CookieBuf) -> Result<u32, Reason> {
    let tcp: *const TcpHdr = ptr_at(ctx, packet.l4_off)?;
    // SAFETY: checked by ptr_at.
    let th_len = usize::from(unsafe { (*tcp).doff_res } >> 4) * 4;
    if !(20..=60).contains(&th_len) {
        return Err(Reason::BadTcpHeader);
    }
    for i in 0..15 {
        if i * 4 >= th_len {
            break;
        }
        let word: *const [u8; 4] = ptr_at(ctx, packet.l4_off + i * 4)?;
        // SAFETY: checked by ptr_at; i < 15 keeps the index in the 60-byte buffer.
        let word = unsafe { *word };
        buf.tcp[i * 4] = word[0];
        buf.tcp[i * 4 + 1] = word[1];
        buf.tcp[i * 4 + 2] = word[2];
        buf.tcp[i * 4 + 3] = word[3];
    }
    if packet.family == Family::V4 {
        let ip: *const [u8; 20] = ptr_at(ctx, packet.l3_off)?;
        // SAFETY: checked by ptr_at; a map value.
        unsafe { crate::mem::copy(buf.ip.as_mut_ptr().cast::<[u8; 20]>(), ip) };
    } else {
        let ip: *const [u8; 40] = ptr_at(ctx, packet.l3_off)?;
        // SAFETY: checked by ptr_at; a map value.
        unsafe { crate::mem::copy(&raw mut buf.ip, ip) };
    }
    Ok(th_len as u32)
}

#[inline(always)]
#[allow(clippy::manual_swap, reason = "core::mem::swap on packet bytes may become a memcpy call")]
fn swap_macs(ctx: &XdpContext) -> Result<(), Reason> {
    let eth: *mut EthHdr = ptr_at_mut(ctx, 0)?;
    // SAFETY: checked by ptr_at_mut.
    let eth = unsafe { &mut *eth };
    let src = eth.src;
    eth.src = eth.dst;
    eth.dst = src;
    Ok(())
}

/// Cuts or grows the packet to its IP and TCP headers and writes them from `s`: addresses,
/// lengths, the TCP header (with an MSS option if `s.mss` is set) and both checksums. IPv4
/// headers have no options here (services refuse them). The segment starts out afresh: a
/// hop limit of 64 (the packet it is made from arrived with what its hops left of the
/// sender's: sent back with that, it may expire on the way) and no ECN codepoint (a SYN-ACK
/// must not carry one, RFC 3168; DSCP is kept).
#[inline(always)]
fn emit(ctx: &XdpContext, packet: &Packet, s: &Segment) -> Result<(), Reason> {
    const HOP_LIMIT: u8 = 64;
    let tcp_len: u16 = if s.mss != 0 { 24 } else { 20 };
    let end = packet.l4_off + usize::from(tcp_len);
    let len = ctx.data_end() - ctx.data();
    let delta = i32::try_from(end).unwrap_or(0) - i32::try_from(len).unwrap_or(0);
    if delta != 0 {
        // SAFETY: the context pointer of this program run.
        // A refused resize passes the packet on as it came (`truncated`): a drop reason
        // here grew the bench wrappers' deepest call chain past the 512-byte stack.
        if unsafe { bpf_xdp_adjust_tail(ctx.ctx, delta) } != 0 {
            return Err(Reason::Truncated);
        }
    }
    let ctx = &reload(ctx);
    let v6 = packet.family == Family::V6;
    if v6 {
        let ip: *mut Ipv6Hdr = ptr_at_mut(ctx, packet.l3_off)?;
        // SAFETY: checked by ptr_at_mut.
        let ip = unsafe { &mut *ip };
        ip.payload_len = tcp_len.to_be_bytes();
        ip.hop_limit = HOP_LIMIT;
        // The traffic class's low two bits (ECN) are bits 4-5 of the header's second byte.
        ip.version_tc_flow[1] &= !0x30;
        // SAFETY: packet memory.
        unsafe {
            crate::mem::put_addr(&mut ip.src, &s.src);
            crate::mem::put_addr(&mut ip.dst, &s.dst);
        }
    } else {
        let ip: *mut Ipv4Hdr = ptr_at_mut(ctx, packet.l3_off)?;
        // SAFETY: checked by ptr_at_mut.
        let ip = unsafe { &mut *ip };
        ip.tot_len = (20 + tcp_len).to_be_bytes();
        ip.ttl = HOP_LIMIT;
        ip.tos &= !0x03;
        ip.src = s.src[0].to_ne_bytes();
        ip.dst = s.dst[0].to_ne_bytes();
        ip.check = [0, 0];
        let raw: *const [u16; 10] = ptr_at(ctx, packet.l3_off)?;
        // SAFETY: checked by ptr_at (the same 20 bytes).
        let words = unsafe { raw.read_unaligned() };
        ip.check = checksum(0, &words).to_ne_bytes();
    }
    // The TCP header as raw words (network byte order in memory), summed, then written.
    let (seq, ack) = (s.seq.to_be_bytes(), s.ack.to_be_bytes());
    let mut w = [0u16; 12];
    w[0] = s.sport;
    w[1] = s.dport;
    w[2] = u16::from_ne_bytes([seq[0], seq[1]]);
    w[3] = u16::from_ne_bytes([seq[2], seq[3]]);
    w[4] = u16::from_ne_bytes([ack[0], ack[1]]);
    w[5] = u16::from_ne_bytes([ack[2], ack[3]]);
    w[6] = u16::from_ne_bytes([((tcp_len / 4) as u8) << 4, s.flags]);
    w[7] = u16::from_ne_bytes(s.window.to_be_bytes());
    let pseudo = pseudo_header_sum(&s.src, &s.dst, v6, IPPROTO_TCP, tcp_len);
    if s.mss != 0 {
        w[10] = u16::from_ne_bytes([2, 4]);
        w[11] = u16::from_ne_bytes(s.mss.to_be_bytes());
        w[8] = checksum(pseudo, &w);
        let tcp: *mut [u16; 12] = ptr_at_mut(ctx, packet.l4_off)?;
        // SAFETY: checked by ptr_at_mut (24 bytes).
        unsafe { tcp.write_unaligned(w) };
    } else {
        let mut h = [0u16; 10];
        let mut i = 0;
        while i < 10 {
            h[i] = w[i];
            i += 1;
        }
        h[8] = checksum(pseudo, &h);
        let tcp: *mut [u16; 10] = ptr_at_mut(ctx, packet.l4_off)?;
        // SAFETY: checked by ptr_at_mut (20 bytes).
        unsafe { tcp.write_unaligned(h) };
    }
    Ok(())
}
