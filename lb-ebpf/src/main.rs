//! XDP entry points of the load balancer. Only entry points and the top-level flow live here;
//! the work is in the modules, one per concern.
#![no_std]
#![no_main]
// Map helpers take `impl Borrow<K>`: passing keys and values by reference keeps them off the
// 512-byte stack, which is the point, whatever the lint prefers.
#![allow(clippy::needless_borrows_for_generic_args)]
// Header fields and the kernel's context have fixed widths; narrowing casts here are checked
// by the surrounding code (ports below 65536, ifindex below 2^32).
#![allow(clippy::cast_possible_truncation)]

mod bench;
mod conntrack;
mod firewall;
mod flowcache;
mod forward;
mod icmp;
mod maps;
mod mem;
mod nat;
mod outcome;
mod parse;
mod passthrough;
mod select;
mod stats;
mod syncookie;

use aya_ebpf::{
    bindings::xdp_action,
    helpers::bpf_jiffies64,
    macros::{sk_lookup, stream_verdict, xdp},
    programs::{SkBuffContext, SkLookupContext, XdpContext},
};
use lb_common::{
    Action, FlowKey, Reason,
    conntrack::{FLOW_COOKIE_REOPEN, FLOW_NAT, FLOW_REPLY, FLOW_SEQ_ADJ, FLOW_SYN_PROXY, Flow},
    net::{IPPROTO_TCP, IPPROTO_UDP, tcp_flags},
    service::{Globals, SERVICE_NAT, SERVICE_SYN_COOKIES, SERVICE_SYN_COOKIES_AUTO, Service},
};

use crate::{
    conntrack::{EntryBuf, LiveNat},
    maps::Scratch,
    nat::Rewrite,
    outcome::Outcome,
    parse::Fragment,
    select::StaleNat,
};

/// The data path: parse, filter, then balance packets to services and translate replies of NAT flows;
/// everything else goes to the kernel. Attached to every interface the daemon serves.
#[xdp]
#[allow(
    clippy::needless_pass_by_value,
    reason = "the #[xdp] macro hands over the context by value"
)]
pub fn lb_ingress(ctx: XdpContext) -> u32 {
    lb_ingress_inner(&ctx)
}

/// The body of `lb_ingress`, shared with the bench wrappers.
#[inline(always)]
fn lb_ingress_inner(ctx: &XdpContext) -> u32 {
    // Counted as received: SYN-cookie answers change the frame's length.
    let len = stats::frame_len(ctx);
    let action = match try_lb_ingress(ctx) {
        Ok(action) => action,
        Err(reason) => {
            stats::count_reason(reason, len);
            reason.action()
        }
    };
    stats::count_action(action, len);
    action.as_u32()
}

/// TLS passthrough: a TCP connection to a passthrough service goes to the daemon's listener
/// (attached to the daemon's network namespace).
#[sk_lookup]
#[allow(
    clippy::needless_pass_by_value,
    reason = "the #[sk_lookup] macro hands over the context by value"
)]
pub fn lb_passthrough_lookup(ctx: SkLookupContext) -> u32 {
    passthrough::steer(&ctx)
}

/// TLS passthrough: bytes arriving on a relayed socket leave through its partner (attached
/// to `RELAY_SOCKETS`, sending through `RELAY_PEERS`).
#[stream_verdict]
#[allow(
    clippy::needless_pass_by_value,
    reason = "the #[stream_verdict] macro hands over the context by value"
)]
pub fn lb_relay_verdict(ctx: SkBuffContext) -> u32 {
    passthrough::relay(&ctx)
}

#[inline(always)]
fn try_lb_ingress(ctx: &XdpContext) -> Result<Action, Reason> {
    // Parsed headers and flow keys live in per-CPU scratch memory, not on the stack.
    let scratch = maps::SCRATCH.get_ptr_mut(0).ok_or(Reason::Truncated)?;
    // SAFETY: a per-CPU map value, used by this program run alone.
    let scratch = unsafe { &mut *scratch };
    parse::parse_packet(ctx, &mut scratch.packet).into_status()?;
    // SAFETY: a helper without arguments.
    let now = unsafe { bpf_jiffies64() };
    // The firewall first: what it drops never reaches a service or the connection table.
    firewall::filter(ctx, scratch, now)?;
    let packet = &scratch.packet;
    if packet.l4_error != 0 || packet.fragment != Fragment::None {
        return Err(without_ports(packet));
    }
    // Most traffic on a host is not ours: prove it with a bit, not two hash lookups.
    if !select::may_be_ours(packet) {
        return Err(Reason::NotService);
    }
    // TCP and UDP packets of live flows, either direction, by one connection lookup.
    let l4 = packet.has_l4 && (packet.proto == IPPROTO_TCP || packet.proto == IPPROTO_UDP);
    // The dead entry `established` found on the tuple, when the daemon leaves it alone (see
    // `Timeouts::in_overwrite_window`): a new flow is written over it through this pointer,
    // without looking the key up again.
    let mut dead_entry: *mut Flow = core::ptr::null_mut();
    // Read once for the flow and the service lookups (and their caches).
    let g = select::globals()?;
    let epoch = flowcache::epoch();
    if l4 {
        let action = established(ctx, scratch, g, epoch, now, &mut dead_entry)?;
        if action != Action::Pass {
            return Ok(action);
        }
    }
    match select::lookup_service(&scratch.packet, g, epoch) {
        Some(service) => balance(ctx, scratch, service, now, dead_entry).into_result(),
        // No flow (the lookup above would have found a reply entry) and no service.
        None if l4 => Err(Reason::NotService),
        None => nat::try_icmp_error(ctx, scratch, now).into_result(),
    }
}

/// Why a packet without ports to balance by — a fragment, or one whose transport header
/// cannot be read — is not balanced. To a service address: a fragment is dropped (not every
/// fragment carries the ports), and so is an unreadable packet with IP options or extension
/// headers (the host might reassemble or follow it and answer for the service). Anything
/// else goes to the kernel: with the parser's reason when it could not read the header,
/// else as not a service's (fragments to a NAT source may be the host's own traffic, see
/// architecture.md). Out of line: rare.
#[inline(never)]
fn without_ports(packet: &parse::Packet) -> Reason {
    if select::may_be_ours(packet) && select::is_vip(packet) {
        if packet.fragment != Fragment::None {
            return Reason::Fragment;
        }
        if packet.has_ip_options {
            return Reason::IpOptions;
        }
    }
    if packet.l4_error == 0 {
        return Reason::NotService;
    }
    Reason::from_u32(u32::from(packet.l4_error)).unwrap_or(Reason::Truncated)
}

/// A TCP or UDP packet of a live flow, found in the flow cache (in `epoch`) or by one
/// connection-table lookup: a forward entry sends it to the flow's backend (without looking
/// the service up: the entry holds all it needs), a reply entry translates it back to the
/// client. Without a live entry, or when the packet starts the flow over (a SYN on a closed connection's tuple), `Pass` sends the
/// packet on to the service lookup, and `scratch.dead` keeps what the lookup found for
/// [`balance`] (`dead_entry` the entry itself), which then needs no lookup of its own.
///
/// Inlined into the entry function: the path nearly every packet of a load balancer takes
/// pays no call and return (dear where the kernel hardens returns). The 512-byte stack
/// allows it because the new-flow path is one call, [`balance`], with its pieces inlined
/// into it, and the rarer paths (ICMP errors, SYN cookies) are calls of their own.
#[inline(always)]
fn established(
    ctx: &XdpContext,
    scratch: &mut Scratch,
    g: &Globals,
    epoch: u32,
    now: u64,
    dead_entry: &mut *mut Flow,
) -> Result<Action, Reason> {
    let Scratch { packet, buf, live, dead, cookie, .. } = scratch;
    dead.present = 0;
    dead.has_stale = 0;
    dead.retry = 0;
    dead.restart = 0;
    let key = packet.flow_key();
    // A busy flow's packets find its entry in the flow cache, without the table's lookup;
    // otherwise the table carries the packet and the slot follows it. A packet with SYN set
    // goes to the table: a new connection on a tuple the table lost (evicted) must open a
    // new flow, not be carried as a retransmission of the old one's SYN.
    let slot = flowcache::find(packet, g);
    let handshake = packet.proto == IPPROTO_TCP && packet.tcp_flags & tcp_flags::SYN != 0;
    let cached = if handshake { None } else { slot.hit(packet, g, epoch, now) };
    let (e, state, refresh) = if let Some(e) = cached {
        if e.flags & FLOW_REPLY != 0 {
            // Dropped as the table path drops them (see below).
            if packet.has_ip_options {
                return Err(Reason::IpOptions);
            }
            return nat::translate(ctx, packet, e);
        }
        (e, e.state, false)
    } else {
        // Should the table hold a reply entry under the key: its port's generation, read
        // before the lookup (see `Slot::fill`; the packet's destination port is the
        // NAT port).
        let generation = flowcache::port_gen(key.dport);
        let Some(entry) = maps::CONNTRACK.get_ptr_mut(key) else {
            slot.forget();
            return Ok(Action::Pass);
        };
        // SAFETY: a map value pointer from a successful lookup; concurrent writers only race
        // on the timestamp and state, which any of them may win.
        let e = unsafe { &mut *entry };
        if e.flags & FLOW_REPLY != 0 {
            // A NAT flow's packets with IP options or IPv6 extension headers are dropped
            // both ways (a routing header would also make the checksum's pseudo-header
            // another address than the one rewritten), before they move the flow's state.
            if packet.has_ip_options {
                return Err(Reason::IpOptions);
            }
            return nat::reply(ctx, packet, e, g, now, (&slot, epoch, generation));
        }
        if e.flags & FLOW_SYN_PROXY != 0 {
            slot.forget();
        }
        if e.flags & FLOW_SYN_PROXY != 0 {
            // The backend has not answered the SYN this flow sent it: the client's segments
            // wait (dropped; the client retransmits), and its state does not move. Once a
            // second has passed without an answer, the client's next segment starts the
            // flow over: if it still carries a valid cookie (a retransmission of its first
            // segment), the backend gets the SYN again. Counted as the same flow, not a new
            // one.
            if now.saturating_sub(e.last_seen) > g.refresh {
                // Not expired: `open_flow` looks it up again (see `in_overwrite_window`).
                select::note_dead(dead, e);
                dead.retry = 1;
                return Ok(Action::Pass);
            }
            return Err(Reason::SynProxyPending);
        }
        if packet.has_ip_options {
            // Dropped (see `carry_on`), so the flow's state must not move for it: a reset
            // with options would close the flow here, never reaching the backend.
            slot.forget();
            return Err(Reason::IpOptions);
        }
        // A closed connection whose tuple a SYN got a cookie for: an ACK with a valid cookie
        // starts the tuple over, as on an expired one (see `FLOW_COOKIE_REOPEN`).
        if e.flags & FLOW_COOKIE_REOPEN != 0
            && select::closed(e.state)
            && syncookie::reopens(
                ctx,
                packet,
                cookie,
                (e.flags & (FLOW_SEQ_ADJ | FLOW_SYN_PROXY) != 0).then_some(e.isn),
            )
        {
            slot.forget();
            select::note_dead(dead, e);
            if g.timeouts.in_overwrite_window(e.state, e.last_seen, now, g.refresh) {
                *dead_entry = entry;
            }
            return Ok(Action::Pass);
        }
        let Some((state, refresh)) = select::keep(packet, e, g, now) else {
            slot.forget();
            select::note_dead(dead, e);
            if e.flags & FLOW_REPLY == 0 && !g.timeouts.is_expired(e.state, e.last_seen, now) {
                dead.restart = 1;
            }
            if g.timeouts.in_overwrite_window(e.state, e.last_seen, now, g.refresh) {
                *dead_entry = entry;
            }
            return Ok(Action::Pass);
        };
        // A NAT flow whose cached copy's port was taken since: its port is checked as at a
        // refresh (the packet is dropped if another flow holds it now).
        let refresh = refresh || slot.port_moved(epoch);
        (&*e, state, refresh)
    };
    let cache = if cached.is_some() { None } else { Some((&slot, epoch)) };
    carry_on(ctx, packet, key, live, buf, e, state, refresh, now, cache)
}

/// Sends a packet of the live forward flow `e` (its table entry, or the flow cache's copy)
/// on to its backend, the flow now in `state`; with `refresh`, a NAT flow's reply entry is
/// refreshed too (the forward entry has been). With `cache` (the table carried the packet),
/// the flow's slot follows: a DSR flow's is filled from `e`; a NAT flow's once a refresh has
/// shown its port is still its own (with the port's generation read before), or while no
/// flow has taken the port since the slot's last check (`Slot::follow_nat`), and emptied
/// otherwise. A NAT flow found to have lost its port loses its forward entry.
#[allow(clippy::too_many_arguments, reason = "inlined: the arguments cost nothing")]
#[inline(always)]
fn carry_on(
    ctx: &XdpContext,
    packet: &parse::Packet,
    key: &FlowKey,
    live: &mut LiveNat,
    buf: &mut EntryBuf,
    e: &Flow,
    state: u8,
    refresh: bool,
    now: u64,
    cache: Option<(&flowcache::Slot, u32)>,
) -> Result<Action, Reason> {
    if packet.has_ip_options {
        if let Some((slot, _)) = cache {
            slot.forget();
        }
        return Err(Reason::IpOptions);
    }
    if e.flags & FLOW_NAT == 0 {
        if let Some((slot, epoch)) = cache {
            slot.fill(packet, e, epoch, 0);
        }
        // DSR: the entry says it all; nothing to copy out.
        return forward::send_dsr(ctx, e.service_id, e.backend_id, false);
    }
    // A NAT flow's forward entry holds its NAT source address.
    live.start(e.service_id, &e.peer_addr, now);
    live.backend_id = e.backend_id;
    live.nat_port = e.nat_port;
    live.state = state;
    live.cookie_flags = e.flags & (FLOW_SYN_PROXY | FLOW_SEQ_ADJ);
    live.seq_delta = e.seq_delta;
    live.isn = e.isn;
    if refresh {
        // Read before the check, so that a port taken after it shows as a new generation.
        let generation = cache.map(|_| flowcache::port_gen(e.nat_port));
        if let Err(reason) = conntrack::refresh_reply(ctx, key, live, buf).into_status() {
            if let Some((slot, _)) = cache {
                slot.forget();
            }
            if reason == Reason::NatPortsExhausted {
                // Another flow holds the port now: this flow's forward entry goes, so its
                // next packet is balanced afresh (another port) rather than sent from this
                // one into the other flow's connection until the next refresh.
                conntrack::forget(key);
            }
            return Err(reason);
        }
        if let (Some((slot, epoch)), Some(generation)) = (cache, generation) {
            slot.fill(packet, e, epoch, generation);
        }
    } else if let Some((slot, epoch)) = cache {
        slot.follow_nat(packet, e, epoch);
    }
    send(ctx, packet, key, live, true, false, false)
}

/// Sends a packet for `service` to its flow's backend. Not inlined, so its stack frame and
/// the reply path's are never live together.
#[inline(never)]
fn balance(
    ctx: &XdpContext,
    scratch: &mut Scratch,
    service: &Service,
    now: u64,
    dead_entry: *mut Flow,
) -> Outcome {
    let ctx = &parse::reload(ctx);
    Outcome::from_result(try_balance(ctx, scratch, service, now, dead_entry))
}

#[inline(always)]
fn try_balance(
    ctx: &XdpContext,
    scratch: &mut Scratch,
    service: &Service,
    now: u64,
    dead_entry: *mut Flow,
) -> Result<Action, Reason> {
    // Only TCP and UDP packets have services, and `established` has looked their flow up
    // already: no live entry, and `dead` says whether a dead one is in the way.
    let Scratch { packet, buf, live, cookie, dead, .. } = scratch;
    if packet.has_ip_options {
        return Err(Reason::IpOptions);
    }
    let key = packet.flow_key();
    let is_nat = service.flags & SERVICE_NAT != 0;
    live.start(service.id, &service.nat_addr, now);
    live.state = select::initial_state(packet, is_nat) as u8;
    let cookies = is_nat
        && packet.proto == IPPROTO_TCP
        && service.flags & (SERVICE_SYN_COOKIES | SERVICE_SYN_COOKIES_AUTO) != 0;
    // Set when this packet is a client's ACK with a valid cookie: it becomes the SYN the
    // backend gets (see `syncookie.rs`).
    let mut proxied = false;
    if cookies {
        // A SYN answered with a cookie ends here; a valid cookie marks `live`.
        let outcome = syncookie::on_new_flow(ctx, service, packet, cookie, live);
        if outcome.into_result()? == Action::Tx {
            // A client starting over on a dead flow's tuple: its cookie ACK must not go on as
            // that flow's (to its backend and port, which reset). An expired flow's entries
            // go; a closed connection's not yet timed out stay, marked, for its reset may
            // have been forged (see `FLOW_COOKIE_REOPEN`): the ACK is told by its cookie.
            if dead.restart == 0 || !mark_reopen(key, dead_entry) {
                forget_dead_nat(key, dead, buf);
            }
            return Ok(Action::Tx);
        }
        proxied = live.cookie_flags & FLOW_SYN_PROXY != 0;
    }
    // The backend, then (NAT) a source port and the reply entry, then the forward entry,
    // one after the other (all inlined here: this frame holds them).
    // Read once for the pieces below (inlined here: a second read would be a second lookup).
    let g = select::globals()?;
    live.backend_id = select::choose_backend(service, key, g)?;
    // A dead entry in the way. A DSR flow's new entry is written over it in place (no
    // delete, no insert). So is a NAT flow's when the dead flow had the same backend and NAT
    // address: the new flow keeps the dead one's port and overwrites both entries (the reply
    // entry only while it is still the dead flow's; `open_nat` allocates another port if
    // not). Otherwise the dead entries are removed first (a reply entry another flow took
    // over stays) and the inserts must find the keys free. Two CPUs opening one tuple at
    // once (copies of a SYN): on the overwrite paths both write the same entries, unless a
    // reload swaps the Maglev table between them (the last write wins); on the other path
    // the loser of the forward insert follows the winner, unless its delete of the dead
    // entry lands after the winner's insert (then the last write wins and the other's reply
    // entry is left to expire).
    let reuse = is_nat && dead.has_stale != 0 && reusable(&dead.stale, live, service);
    if reuse {
        live.nat_port = dead.stale.nat_port;
    } else if is_nat {
        forget_dead_nat(key, dead, buf);
    }
    if is_nat {
        conntrack::open_nat(ctx, key, service, live, buf, g)?;
    }
    // `open_nat` gave the dead flow's port up (another flow holds it by now): the dead
    // forward entry goes and the new one is inserted as on the other path, so that a second
    // CPU opening the tuple follows this one instead of overwriting it with another port.
    let reused = reuse && live.nat_port == dead.stale.nat_port;
    if reuse && !reused {
        conntrack::forget(key);
    }
    live.replace = dead.present != 0 && (!is_nat || reused);
    let entry = if live.replace { dead_entry } else { core::ptr::null_mut() };
    open_flow(key, service, live, buf, entry, g)?;
    let new_flow = live.new_flow && dead.retry == 0;
    send(ctx, packet, key, live, is_nat, new_flow, proxied)
}

/// Marks the closed connection's forward entry on `key`'s tuple (`entry` when not null, the
/// live-flow lookup's, else looked up again) `FLOW_COOKIE_REOPEN`; says whether the entries
/// stay (not when the tuple's entry is gone, or is a reply entry).
#[inline(never)]
fn mark_reopen(key: &FlowKey, entry: *mut Flow) -> bool {
    let entry = if entry.is_null() { maps::CONNTRACK.get_ptr_mut(key) } else { Some(entry) };
    let Some(entry) = entry else { return false };
    // SAFETY: a map value pointer from a successful lookup, here or this run's live-flow
    // lookup (an element the LRU reused meanwhile is another tuple's: see `overwrite`).
    let e = unsafe { &mut *entry };
    if e.flags & FLOW_REPLY != 0 {
        return false;
    }
    // Open again by now (another CPU started the tuple over): left as it is.
    if select::closed(e.state) {
        e.flags |= FLOW_COOKIE_REOPEN;
    }
    true
}

/// Removes the dead NAT flow on `key`'s tuple that `dead` found: its forward entry, and its
/// reply entry unless another flow took that port over.
#[inline(always)]
fn forget_dead_nat(key: &FlowKey, dead: &select::DeadFlow, buf: &mut EntryBuf) {
    if dead.present != 0 {
        conntrack::forget(key);
    }
    if dead.has_stale != 0 {
        conntrack::release(key, &dead.stale, buf);
    }
}

/// Whether the dead NAT flow `stale` went to the backend `live` now has, from the same NAT
/// address, with a port still in `service`'s range: its reply entry's key is then the new
/// flow's. Addresses word by word: comparing the arrays whole compiles to a `bcmp` call.
#[inline(always)]
fn reusable(stale: &StaleNat, live: &LiveNat, service: &Service) -> bool {
    let (a, b) = (&stale.nat_addr, &live.nat_addr);
    let port = u16::from_be(stale.nat_port);
    stale.backend_id == live.backend_id
        && port >= service.nat_port_min
        && port <= service.nat_port_max
        && a[0] == b[0]
        && a[1] == b[1]
        && a[2] == b[2]
        && a[3] == b[3]
}

/// Sends a packet of a tracked flow (`live`) to its backend: NAT rewrite (or, for a flow a
/// cookie just opened, the backend's SYN), sequence shift, counters, transmission.
#[inline(always)]
fn send(
    ctx: &XdpContext,
    packet: &parse::Packet,
    key: &FlowKey,
    live: &LiveNat,
    is_nat: bool,
    new_flow: bool,
    proxied: bool,
) -> Result<Action, Reason> {
    if !is_nat {
        return forward::send_dsr(ctx, live.service_id, live.backend_id, new_flow);
    }
    let hop = forward::next_hop(live.backend_id)?;
    let (backend, backend_port) = conntrack::backend_at(live.backend_id, key.dport)?;
    if proxied {
        let to = syncookie::Proxied {
            nat_addr: live.nat_addr,
            backend_addr: backend.addr,
            nat_port: live.nat_port,
            backend_port,
            client_isn: live.isn,
        };
        syncookie::syn_to_backend(ctx, packet, &to).into_status()?;
        let ctx = &parse::reload(ctx);
        let action = forward::transmit(ctx, hop.ifindex, &hop.dmac, &hop.smac)?;
        stats::count_traffic(
            live.service_id,
            live.backend_id,
            stats::frame_len(ctx),
            new_flow,
            false,
        );
        return Ok(action);
    }
    let to = Rewrite {
        src: &live.nat_addr,
        dst: &backend.addr,
        sport: live.nat_port,
        dport: backend_port,
    };
    nat::rewrite(ctx, packet, &to)?;
    if live.cookie_flags & FLOW_SEQ_ADJ != 0 && packet.tcp_flags & tcp_flags::ACK != 0 {
        // The client acknowledges the cookie's numbering; the backend numbers its own.
        syncookie::shift(ctx, packet, true, live.seq_delta)?;
    }
    let action = forward::transmit(ctx, hop.ifindex, &hop.dmac, &hop.smac)?;
    stats::count_traffic(live.service_id, live.backend_id, stats::frame_len(ctx), new_flow, false);
    Ok(action)
}

/// Installs the forward entry of a new flow whose backend (and NAT source port) `live`
/// holds, over the dead entry on its tuple with `live.replace` (through `entry` when not
/// null); `live` then also tells whether this packet opened the flow (another CPU may have
/// won a race for it, and then its choice is taken). Inlined into [`balance`], as are
/// `open_nat` and `insert_forward`: each call and return cost the new-flow path ~10 ns
/// where the kernel hardens returns, and `balance`'s frame has room for them.
#[inline(always)]
fn open_flow(
    key: &FlowKey,
    service: &Service,
    live: &mut LiveNat,
    buf: &mut EntryBuf,
    entry: *mut Flow,
    g: &Globals,
) -> Result<(), Reason> {
    let is_nat = service.flags & SERVICE_NAT != 0;
    conntrack::set_forward_entry(buf, key, service, live, is_nat);
    let mut winner = conntrack::Winner { backend_id: 0, nat_port: 0, lost: false };
    conntrack::insert_forward(buf, &mut winner, live.replace, entry, g)?;
    if winner.lost {
        // Another CPU opened this flow first: follow it, and free the port taken here.
        if is_nat && winner.nat_port != live.nat_port {
            let ours = StaleNat {
                backend_id: live.backend_id,
                nat_addr: service.nat_addr,
                nat_port: live.nat_port,
                vip_port: key.dport,
            };
            conntrack::release(key, &ours, buf);
        }
        live.backend_id = winner.backend_id;
        live.nat_port = winner.nat_port;
        live.new_flow = false;
    } else {
        live.new_flow = true;
    }
    Ok(())
}

/// Bench only: the data path inside the frame-restoring wrapper (see `bench.rs`). A closure,
/// not the function itself: LLVM then inlines the data path into the wrapper as it does into
/// `lb_ingress`, where a function item passed as `FnOnce` became a call (a call and return
/// the attached program does not pay, timed as the data path's).
#[xdp]
#[allow(
    clippy::needless_pass_by_value,
    reason = "the #[xdp] macro hands over the context by value"
)]
#[allow(clippy::redundant_closure, reason = "the closure is what gets inlined; see above")]
pub fn bench_ingress(ctx: XdpContext) -> u32 {
    bench::around(&ctx, false, |ctx| lb_ingress_inner(ctx))
}

/// Bench only: the wrapper around a program that does nothing (the floor).
#[xdp]
#[allow(
    clippy::needless_pass_by_value,
    reason = "the #[xdp] macro hands over the context by value"
)]
pub fn bench_floor(ctx: XdpContext) -> u32 {
    bench::around(&ctx, false, |_| xdp_action::XDP_PASS)
}

/// Bench only: the data path with a new source port on every run (every run a new flow);
/// inlined, as in `bench_ingress`.
#[xdp]
#[allow(
    clippy::needless_pass_by_value,
    reason = "the #[xdp] macro hands over the context by value"
)]
#[allow(clippy::redundant_closure, reason = "the closure is what gets inlined")]
pub fn bench_new_flow(ctx: XdpContext) -> u32 {
    bench::around(&ctx, true, |ctx| lb_ingress_inner(ctx))
}

/// Bench only: the new-flow wrapper around a program that does nothing (its floor).
#[xdp]
#[allow(
    clippy::needless_pass_by_value,
    reason = "the #[xdp] macro hands over the context by value"
)]
pub fn bench_new_flow_floor(ctx: XdpContext) -> u32 {
    bench::around(&ctx, true, |_| xdp_action::XDP_PASS)
}

/// Bench only: the data path on a tuple whose entry has just expired (every run reopens the
/// same flow, with the table in cache).
#[xdp]
#[allow(
    clippy::needless_pass_by_value,
    reason = "the #[xdp] macro hands over the context by value"
)]
pub fn bench_reopen(ctx: XdpContext) -> u32 {
    bench::around(&ctx, false, |ctx| {
        bench::age_reopened();
        lb_ingress_inner(ctx)
    })
}

/// Bench only: the reused-tuple wrapper around a program that does nothing (its floor).
#[xdp]
#[allow(
    clippy::needless_pass_by_value,
    reason = "the #[xdp] macro hands over the context by value"
)]
pub fn bench_reopen_floor(ctx: XdpContext) -> u32 {
    bench::around(&ctx, false, |_| {
        bench::age_reopened();
        xdp_action::XDP_PASS
    })
}

/// Bench only: the data path with the flow cache's epoch bumped before each run, so every
/// packet of an established flow goes to the connection table (what a packet whose slot
/// another flow took pays); inlined, as in `bench_ingress`.
#[xdp]
#[allow(
    clippy::needless_pass_by_value,
    reason = "the #[xdp] macro hands over the context by value"
)]
pub fn bench_uncached(ctx: XdpContext) -> u32 {
    bench::around(&ctx, false, |ctx| {
        bench::bump_epoch();
        lb_ingress_inner(ctx)
    })
}

/// Bench only: the epoch-bumping wrapper around a program that does nothing (its floor).
#[xdp]
#[allow(
    clippy::needless_pass_by_value,
    reason = "the #[xdp] macro hands over the context by value"
)]
pub fn bench_uncached_floor(ctx: XdpContext) -> u32 {
    bench::around(&ctx, false, |_| {
        bench::bump_epoch();
        xdp_action::XDP_PASS
    })
}

/// Bench only: one connection-table insert of a fresh key per run and nothing else, to show
/// what the kernel's LRU insert alone costs next to the new-flow paths.
#[xdp]
#[allow(
    clippy::needless_pass_by_value,
    reason = "the #[xdp] macro hands over the context by value"
)]
pub fn bench_conntrack_insert(ctx: XdpContext) -> u32 {
    bench::around(&ctx, true, |_| {
        let (Some(scratch), Some(save)) =
            (maps::SCRATCH.get_ptr_mut(0), maps::BENCH_SAVE.get_ptr(0))
        else {
            return xdp_action::XDP_ABORTED;
        };
        // SAFETY: per-CPU map values.
        let scratch = unsafe { &mut *scratch };
        // SAFETY: as above.
        scratch.buf.key.src[0] = unsafe { (*save).counter };
        match maps::CONNTRACK.insert(&scratch.buf.key, &scratch.buf.flow, 0) {
            Ok(()) => xdp_action::XDP_PASS,
            Err(_) => xdp_action::XDP_ABORTED,
        }
    })
}

/// Bench only: parsing and the connection-table lookup of the packet's flow, nothing else
/// (no firewall, decision, rewrite, counter or transmission): the least an established
/// packet can cost with this parser and table, to read the established rows against.
#[xdp]
#[allow(
    clippy::needless_pass_by_value,
    reason = "the #[xdp] macro hands over the context by value"
)]
pub fn bench_conntrack_lookup(ctx: XdpContext) -> u32 {
    bench::around(&ctx, false, |ctx| {
        let Some(scratch) = maps::SCRATCH.get_ptr_mut(0) else {
            return xdp_action::XDP_ABORTED;
        };
        // SAFETY: a per-CPU map value, used by this program run alone.
        let packet = unsafe { &mut (*scratch).packet };
        if parse::parse_packet(ctx, packet).into_status().is_err() {
            return xdp_action::XDP_ABORTED;
        }
        match maps::CONNTRACK.get_ptr(packet.flow_key()) {
            Some(_) => xdp_action::XDP_PASS,
            None => xdp_action::XDP_ABORTED,
        }
    })
}

/// The data path's clock for the daemon: writes `bpf_jiffies64` to the frame's first eight
/// bytes and `bpf_ktime_get_ns` of the same moment to the next eight (run through
/// `BPF_PROG_TEST_RUN`; never attached).
#[xdp]
#[allow(
    clippy::needless_pass_by_value,
    reason = "the #[xdp] macro hands over the context by value"
)]
pub fn lb_clock(ctx: XdpContext) -> u32 {
    if let Ok(out) = parse::ptr_at_mut::<[[u8; 8]; 2]>(&ctx, 0) {
        // SAFETY: helpers without arguments; `out` is a checked packet range.
        unsafe {
            (*out)[0] = bpf_jiffies64().to_ne_bytes();
            (*out)[1] = aya_ebpf::helpers::bpf_ktime_get_ns().to_ne_bytes();
        }
    }
    xdp_action::XDP_PASS
}

/// Passes every frame. The lab attaches it to veth peers that receive `XDP_TX` and
/// `XDP_REDIRECT` frames: veth drops such frames unless its peer runs an XDP program.
#[xdp]
pub fn lab_peer_pass(_ctx: XdpContext) -> u32 {
    xdp_action::XDP_PASS
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    // SAFETY: the BPF target has no unwinding; the verifier rejects any path that could panic,
    // so this is never reached at run time.
    unsafe { core::hint::unreachable_unchecked() }
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
