//! Writes to the connection table: opening flows, allocating NAT source ports, and keeping
//! both entries of a NAT flow together (each direction can rebuild the other; both go at once).
//!
//! Entries are built in an [`EntryBuf`] in per-CPU scratch memory: a key and a value are 112
//! bytes, too many to keep several of on the 512-byte BPF stack.

use aya_ebpf::{
    bindings::{BPF_ANY, BPF_NOEXIST},
    helpers::bpf_get_prandom_u32,
    programs::XdpContext,
};
use lb_common::{
    FlowKey, Reason,
    conntrack::{FLOW_NAT, FLOW_REPLY, Flow},
    flow::{flow_hash, scale},
    service::{Backend, Globals, MAX_BACKENDS, Service},
};

use crate::{
    maps::{BACKENDS, CONNTRACK},
    outcome::Outcome,
    parse::{EthHdr, ptr_at, reload},
    select::StaleNat,
};

/// NAT source ports tried for a new flow before giving up. The first probe is the tuple's
/// own (two CPUs opening one tuple at once meet on it), the others random at each attempt,
/// so with a fraction f of a backend's ports in use all of them collide with probability
/// about f^16 (below one in a million while a backend holds under 40% of the range), and a
/// retransmitted SYN draws again: a tuple whose probes all met taken ports is not refused
/// for as long as it tries, while free ports remain.
const NAT_PORT_ATTEMPTS: u32 = 16;
/// Seed tweak so the NAT port probe sequence is independent of the backend choice.
const NAT_PORT_SEED: u32 = 0x5bd1_e995;

/// A connection-table key and value under construction.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct EntryBuf {
    pub key: FlowKey,
    pub flow: Flow,
}

/// The backend's address and the port it receives on (raw network order).
#[inline(always)]
pub fn backend_at(backend_id: u32, vip_port: u16) -> Result<(&'static Backend, u16), Reason> {
    // verifier: ids are checked against the array size before every lookup.
    if backend_id >= MAX_BACKENDS {
        return Err(Reason::NoBackend);
    }
    // SAFETY: a map value pointer from a successful array lookup, valid for this program run.
    let backend = BACKENDS.get_ptr(backend_id).map(|b| unsafe { &*b }).ok_or(Reason::NoBackend)?;
    if backend.family == 0 {
        return Err(Reason::NoBackend);
    }
    Ok((backend, backend.port_for(vip_port)))
}

/// Writes the key of the reply direction of a NAT flow (backend to the NAT source) to `out`.
#[inline(always)]
fn set_reply_key(
    out: &mut FlowKey,
    key: &FlowKey,
    backend: &Backend,
    backend_port: u16,
    nat_addr: [u32; 4],
    nat_port: u16,
) {
    // SAFETY: a map value and per-CPU scratch memory: valid and disjoint (an assignment
    // between the two compiled to a `memmove` call, see `mem.rs`).
    unsafe { crate::mem::copy(&raw mut out.src, &raw const backend.addr) };
    out.dst = nat_addr;
    out.sport = backend_port;
    out.dport = nat_port;
    out.proto = key.proto;
    out.family = key.family;
    out._pad = 0;
}

/// Writes the reply entry of a NAT flow to `out`, from its forward key and the packet that
/// opens or refreshes it (whose MAC addresses and interface replies go back through).
#[inline(always)]
fn set_reply_entry(
    out: &mut Flow,
    ctx: &XdpContext,
    key: &FlowKey,
    live: &LiveNat,
) -> Result<(), Reason> {
    let eth: *const EthHdr = ptr_at(ctx, 0)?;
    // SAFETY: checked by ptr_at.
    let eth = unsafe { &*eth };
    out.last_seen = live.now;
    out.peer_addr = key.src;
    out.vip_addr = key.dst;
    out.backend_id = live.backend_id;
    out.peer_port = key.sport;
    out.vip_port = key.dport;
    out.nat_port = live.nat_port;
    out.state = live.state;
    out.flags = FLOW_NAT | FLOW_REPLY | live.cookie_flags;
    out.seq_delta = live.seq_delta;
    out.isn = live.isn;
    out.service_id = live.service_id;
    out.reply_ifindex = ctx.ingress_ifindex() as u32;
    // SAFETY: a checked packet range and a map value.
    unsafe {
        crate::mem::copy_mac(&raw mut out.reply_dmac, &raw const eth.src);
        crate::mem::copy_mac(&raw mut out.reply_smac, &raw const eth.dst);
    }
    Ok(())
}

/// A NAT flow's identity: enough to build or find both of its entries.
#[derive(Clone, Copy)]
pub struct LiveNat {
    pub backend_id: u32,
    pub service_id: u32,
    pub nat_addr: [u32; 4],
    /// Raw network order; zero until allocated.
    pub nat_port: u16,
    pub state: u8,
    /// Set when this packet opened the flow.
    pub new_flow: bool,
    /// Set when the new forward entry replaces a dead entry on the tuple.
    pub replace: bool,
    pub now: u64,
    /// Cookie-opened flows: `FLOW_SYN_PROXY` or `FLOW_SEQ_ADJ`, and their numbers.
    pub cookie_flags: u8,
    pub seq_delta: u32,
    pub isn: u32,
}

impl LiveNat {
    /// Starts a packet's flow for `service_id` with `nat_addr`, every other field zero.
    /// Field by field: a struct literal with zeros and an address copied from a map value
    /// compiles to `memset` and `memmove` calls (byte loops, see `mem.rs`).
    #[inline(always)]
    pub fn start(&mut self, service_id: u32, nat_addr: &[u32; 4], now: u64) {
        self.service_id = service_id;
        // SAFETY: a map value and per-CPU scratch memory: valid and disjoint.
        unsafe { crate::mem::copy(&raw mut self.nat_addr, nat_addr) };
        self.now = now;
        // SAFETY: valid references; volatile so the zeroes stay single stores.
        unsafe {
            core::ptr::write_volatile(&raw mut self.backend_id, 0);
            core::ptr::write_volatile(&raw mut self.nat_port, 0);
            core::ptr::write_volatile(&raw mut self.state, 0);
            core::ptr::write_volatile(&raw mut self.new_flow, false);
            core::ptr::write_volatile(&raw mut self.replace, false);
            core::ptr::write_volatile(&raw mut self.cookie_flags, 0);
            core::ptr::write_volatile(&raw mut self.seq_delta, 0);
            core::ptr::write_volatile(&raw mut self.isn, 0);
        }
    }
}

/// Allocates a NAT source port for a new flow (`key` to `service`) and installs the flow's
/// reply entry under it; the port is written to `live.nat_port`. A port already in
/// `live.nat_port` is a dead flow's on the same tuple, backend and NAT address: its reply
/// entry is written over (see [`replace_entry`]) while it is still that flow's (another
/// flow may have taken the port over since the dead one expired; then a port is allocated
/// as for any new flow). Inlined into `balance`, as the rest of the new-flow path.
#[inline(always)]
pub fn open_nat(
    ctx: &XdpContext,
    key: &FlowKey,
    service: &Service,
    live: &mut LiveNat,
    buf: &mut EntryBuf,
    g: &Globals,
) -> Result<(), Reason> {
    // A kept port's reply entry translates as before, unless the new flow shifts sequence
    // numbers (opened by a SYN cookie): a copy of the dead flow's reply entry must not be
    // used for it.
    if try_open_nat(ctx, key, service, live, buf, g)? == Port::Taken || live.cookie_flags != 0 {
        crate::flowcache::port_taken(live.nat_port);
    }
    Ok(())
}

#[inline(always)]
fn try_open_nat(
    ctx: &XdpContext,
    key: &FlowKey,
    service: &Service,
    live: &mut LiveNat,
    buf: &mut EntryBuf,
    g: &Globals,
) -> Result<Port, Reason> {
    let min = u32::from(service.nat_port_min);
    let max = u32::from(service.nat_port_max);
    if min == 0 || max < min {
        return Err(Reason::NatPortsExhausted);
    }
    let (backend, backend_port) = backend_at(live.backend_id, key.dport)?;
    set_reply_entry(&mut buf.flow, ctx, key, live)?;
    set_reply_key(&mut buf.key, key, backend, backend_port, service.nat_addr, live.nat_port);
    if live.nat_port != 0 {
        match CONNTRACK.get_ptr_mut(&buf.key) {
            Some(entry) => {
                // SAFETY: a map value pointer from a successful lookup.
                let e = unsafe { &mut *entry };
                if e.flags & FLOW_REPLY != 0 && translates_to(e, key) {
                    return replace_entry(e, buf, g);
                }
            }
            None => {
                if CONNTRACK.insert(&buf.key, &buf.flow, u64::from(BPF_NOEXIST)).is_ok() {
                    return Ok(Port::Taken);
                }
            }
        }
        live.nat_port = 0;
    }
    let range = max - min + 1;
    let start = flow_hash(key, g.hash_seed ^ NAT_PORT_SEED, false);
    let mut salt = 0;
    for attempt in 0..NAT_PORT_ATTEMPTS {
        if attempt == 1 {
            // SAFETY: a helper without arguments.
            salt = unsafe { bpf_get_prandom_u32() };
        }
        // Probes spread over the range with a large odd stride, from the second on drawn
        // afresh for each packet (two CPUs racing past the first port may take two ports:
        // the forward entry's insert makes the loser follow the winner, its reply entry
        // left to expire).
        let port = min + scale(start.wrapping_add(attempt.wrapping_mul(0x9e37_79b9)) ^ salt, range);
        let raw_port = (port as u16).to_be();
        buf.key.dport = raw_port;
        buf.flow.nat_port = raw_port;
        if CONNTRACK.insert(&buf.key, &buf.flow, u64::from(BPF_NOEXIST)).is_ok() {
            live.nat_port = raw_port;
            return Ok(Port::Taken);
        }
        // Taken: reuse it if the flow that held it is over, or if it is this tuple's own
        // (another CPU opening the same flow got there first: both end on one port).
        if let Some(old) = CONNTRACK.get_ptr_mut(&buf.key) {
            // SAFETY: a map value pointer from a successful lookup.
            let old = unsafe { &mut *old };
            if (g.timeouts.is_expired(old.state, old.last_seen, live.now)
                || (old.flags & FLOW_REPLY != 0 && translates_to(old, key)))
                && replace_entry(old, buf, g).is_ok()
            {
                live.nat_port = raw_port;
                return Ok(Port::Taken);
            }
        }
    }
    Err(Reason::NatPortsExhausted)
}

/// What [`try_open_nat`] did with the port it installed the reply entry under.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Port {
    /// Taken: a free port, a dead flow's (overwritten or re-inserted), this tuple's own as
    /// another CPU opening the same flow installed it, or re-inserted over a dead entry of
    /// this tuple's (see `Kept`). Cached copies of flows that held the port before must not
    /// be used any more (see `flowcache::port_taken`).
    Taken,
    /// Kept by the tuple that held it: the dead flow's own reply entry, overwritten in place
    /// for the new flow on the same tuple, backend and NAT address. No other flow's copy can
    /// be current on this reply key (whoever installed its entry last, after any other flow's
    /// copy was recorded, is this tuple, and that install moved the generation on), save in
    /// the instant between the lookup and the write, in which the element may be freed and
    /// reused (see [`overwrite`]); a copy of the dead flow's reply entry translates the new
    /// flow's replies as the new entry does (same client, service, backend and port), unless
    /// the new flow is a SYN cookie's ([`open_nat`] then moves the generation on). Copies
    /// of flows on the same port number to other backends or NAT addresses stay current,
    /// as they should. A re-insert (see
    /// [`replace_entry`]) counts as taken: the sweep may have removed the entry and another
    /// flow taken the port in between.
    Kept,
}

/// Who owns a forward entry after [`insert_forward`]: `lost` is set when another CPU
/// installed the flow first (two copies of a SYN racing), and then its choice is given.
pub struct Winner {
    pub backend_id: u32,
    pub nat_port: u16,
    pub lost: bool,
}

/// Installs `buf` (a new forward entry); if another CPU got there first, that entry wins.
/// With `replace`, `buf` replaces the dead entry under `buf.key` (see [`replace_entry`]):
/// `entry` when not null (the live-flow lookup's pointer, see
/// `Timeouts::in_overwrite_window`), else found by a lookup here.
#[inline(always)]
pub fn insert_forward(
    buf: &EntryBuf,
    winner: &mut Winner,
    replace: bool,
    entry: *mut Flow,
    g: &Globals,
) -> Result<(), Reason> {
    if replace
        && let Some(entry) =
            if entry.is_null() { CONNTRACK.get_ptr_mut(&buf.key) } else { Some(entry) }
    {
        // SAFETY: a map value pointer from a successful lookup, here or this program run's
        // live-flow lookup (see `overwrite` for what may happen to the entry since).
        let e = unsafe { &mut *entry };
        if e.flags & FLOW_REPLY != 0 {
            return Err(Reason::ConntrackInsertFailed);
        }
        return replace_entry(e, buf, g).map(|_| ());
    }
    if CONNTRACK.insert(&buf.key, &buf.flow, u64::from(BPF_NOEXIST)).is_ok() {
        return Ok(());
    }
    if let Some(existing) = CONNTRACK.get_ptr(&buf.key) {
        // SAFETY: a map value pointer from a successful lookup.
        let e = unsafe { &*existing };
        if e.flags & FLOW_REPLY != 0 {
            return Err(Reason::ConntrackInsertFailed);
        }
        *winner = Winner { backend_id: e.backend_id, nat_port: e.nat_port, lost: true };
        return Ok(());
    }
    // Present a moment ago, evicted since: take the slot.
    CONNTRACK
        .insert(&buf.key, &buf.flow, u64::from(BPF_ANY))
        .map_err(|_| Reason::ConntrackInsertFailed)
}

/// Writes the entry `new` over the entry `old` of the same key, in place: a map update would
/// take a fresh element from the LRU's free lists and put the old one back, several times
/// the cost of the whole lookup. Word by word, the timestamp last, so that on x86 (stores
/// become visible in order) the entry does not look alive before the rest is written. A
/// reader on another CPU in that instant (a copy of a packet on the same tuple; the daemon's
/// sweep, which copies the value front to back) may still see a mix of old and new fields,
/// as with every write through a lookup's pointer (`select::keep` refreshes the state and
/// timestamp so): one packet going where the dead flow went. The daemon's removals free
/// elements that may at once hold other keys: its sweep waits out the overwrite window (see
/// [`replace_entry`]) and its cuts of a drained backend's or removed service's flows leave
/// expired entries to the sweep; a closed connection not yet timed out (which a SYN
/// reopens) may be cut, in the few instructions between its lookup and this write.
///
/// `old` is often the pointer the packet's live-flow lookup returned, held while the
/// backend is chosen (no second lookup of the key: ~35 ns of a new flow's cost here); only
/// for entries neither sweep nor cuts remove (`Timeouts::in_overwrite_window`). Besides the
/// daemon, two things can free the element in that time and let another key take it,
/// making this a write into that key's entry (or, if it became a reply entry, a refused
/// insert): the LRU's eviction when the table is full (it takes entries without the
/// reference bit first, and the lookup has just set this one's, but takes any when it finds
/// none), which may be this packet's own reply-entry insert; and the data path on another
/// CPU removing this dead NAT flow for a copy of the same packet that took another port (a
/// reload changed the backend or NAT address between the two, or its port probe found
/// another port first).
#[inline(always)]
fn overwrite(old: &mut Flow, new: &Flow) {
    const WORDS: usize = core::mem::size_of::<Flow>() / 8;
    let dst = (&raw mut *old).cast::<u64>();
    let src = (&raw const *new).cast::<u64>();
    // SAFETY: two valid `Flow`s (a map value and per-CPU scratch memory), 8-byte aligned
    // (`last_seen` is a u64), `WORDS` words long; volatile so the order stays as written.
    unsafe {
        for i in 1..WORDS {
            core::ptr::write_volatile(dst.add(i), core::ptr::read_volatile(src.add(i)));
        }
        core::ptr::write_volatile(dst, core::ptr::read_volatile(src));
    }
}
const _: () = assert!(core::mem::offset_of!(Flow, last_seen) == 0);

/// Writes the entry `buf` over `old`, the entry its key has: in place (see [`overwrite`])
/// while `old` is inside the overwrite window, which the daemon's sweep leaves alone; by a
/// map update once the sweep may be removing it (see
/// `lb_common::conntrack::OVERWRITE_WINDOW_REFRESHES`). A live `old` is never swept.
/// Says which (for a reply entry, whether its port counts as kept or taken: see [`Port`]).
#[inline(always)]
fn replace_entry(old: &mut Flow, buf: &EntryBuf, g: &Globals) -> Result<Port, Reason> {
    if g.timeouts.is_long_expired(old.state, old.last_seen, buf.flow.last_seen, g.refresh) {
        return CONNTRACK
            .insert(&buf.key, &buf.flow, u64::from(BPF_ANY))
            .map(|()| Port::Taken)
            .map_err(|_| Reason::ConntrackInsertFailed);
    }
    overwrite(old, &buf.flow);
    Ok(Port::Kept)
}

/// Writes a new forward entry for `key` to `buf`.
#[inline(always)]
pub fn set_forward_entry(
    buf: &mut EntryBuf,
    key: &FlowKey,
    service: &Service,
    live: &LiveNat,
    nat: bool,
) {
    buf.key = *key;
    let f = &mut buf.flow;
    f.last_seen = live.now;
    if nat {
        // SAFETY: map values.
        unsafe { crate::mem::copy(&raw mut f.peer_addr, &raw const service.nat_addr) };
    } else {
        crate::mem::zero_addr(&mut f.peer_addr);
    }
    f.vip_addr = key.dst;
    f.backend_id = live.backend_id;
    f.peer_port = 0;
    f.vip_port = key.dport;
    f.nat_port = live.nat_port;
    f.state = live.state;
    f.flags = if nat { FLOW_NAT } else { 0 } | live.cookie_flags;
    f.seq_delta = live.seq_delta;
    f.isn = live.isn;
    f.service_id = service.id;
    f.reply_ifindex = 0;
    crate::mem::zero_mac(&mut f.reply_dmac);
    crate::mem::zero_mac(&mut f.reply_smac);
}

/// Keeps a live NAT flow's reply entry in step with its forward entry: refreshes its state
/// and timestamp, or rebuilds it if the LRU evicted it; fails if another flow holds the port
/// by now.
#[inline(never)]
pub fn refresh_reply(
    ctx: &XdpContext,
    key: &FlowKey,
    live: &LiveNat,
    buf: &mut EntryBuf,
) -> Outcome {
    let ctx = &reload(ctx);
    match try_refresh_reply(ctx, key, live, buf) {
        Ok(()) => Outcome::DONE,
        Err(reason) => Outcome::err(reason),
    }
}

#[inline(always)]
fn try_refresh_reply(
    ctx: &XdpContext,
    key: &FlowKey,
    live: &LiveNat,
    buf: &mut EntryBuf,
) -> Result<(), Reason> {
    let (backend, backend_port) = backend_at(live.backend_id, key.dport)?;
    set_reply_key(&mut buf.key, key, backend, backend_port, live.nat_addr, live.nat_port);
    if let Some(entry) = CONNTRACK.get_ptr_mut(&buf.key) {
        // SAFETY: a map value pointer from a successful lookup.
        let e = unsafe { &mut *entry };
        if !translates_to(e, key) {
            // The LRU evicted this flow's reply entry and another flow to the backend took
            // the port since: this flow has lost its port, and its packets must not reach
            // the backend on the other flow's connection.
            return Err(Reason::NatPortsExhausted);
        }
        e.last_seen = live.now;
        e.state = live.state;
        return Ok(());
    }
    set_reply_entry(&mut buf.flow, ctx, key, live)?;
    if CONNTRACK.insert(&buf.key, &buf.flow, u64::from(BPF_NOEXIST)).is_err() {
        // Another CPU wrote the key since the lookup: this flow's refresh, or another flow
        // that took the port (never overwritten).
        // SAFETY: a map value pointer from a successful lookup.
        return match CONNTRACK.get_ptr(&buf.key).map(|r| translates_to(unsafe { &*r }, key)) {
            Some(true) => Ok(()),
            Some(false) => Err(Reason::NatPortsExhausted),
            None => Err(Reason::ConntrackInsertFailed),
        };
    }
    // The port taken again: copies of another flow that had it since are no longer used.
    crate::flowcache::port_taken(live.nat_port);
    Ok(())
}

/// Removes the reply entry of a NAT flow that is over (forward key `key`), so its port is
/// free at once and no half of the pair outlives the other. Only if the entry is still that
/// flow's: once the flow expired, a new flow to the same backend may have taken its port
/// over (see [`try_open_nat`]), and that flow's reply entry stays.
#[inline(never)]
pub fn release(key: &FlowKey, stale: &StaleNat, buf: &mut EntryBuf) {
    if reply_of(key, stale, buf) == ReplyEntry::Ours {
        let _ = CONNTRACK.remove(&buf.key);
    }
}

/// Whose the entry under the reply key of the dead NAT flow `stale` (forward key `key`) is.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum ReplyEntry {
    Absent,
    /// The dead flow's own (it translates back to `key`'s client and service).
    Ours,
    /// Another flow's, which took the port over after the dead flow expired.
    Other,
}

/// Looks up the reply entry of the dead NAT flow `stale`; its key is left in `buf.key`.
#[inline(always)]
fn reply_of(key: &FlowKey, stale: &StaleNat, buf: &mut EntryBuf) -> ReplyEntry {
    let Ok((backend, backend_port)) = backend_at(stale.backend_id, stale.vip_port) else {
        return ReplyEntry::Absent;
    };
    set_reply_key(&mut buf.key, key, backend, backend_port, stale.nat_addr, stale.nat_port);
    let Some(entry) = CONNTRACK.get_ptr(&buf.key) else { return ReplyEntry::Absent };
    // SAFETY: a map value pointer from a successful lookup.
    if translates_to(unsafe { &*entry }, key) { ReplyEntry::Ours } else { ReplyEntry::Other }
}

/// Whether the live NAT flow whose forward entry is `e` (key `key`, backend `backend`) still
/// holds its port: its reply entry translates back to it, or is gone (evicted) with no other
/// flow on the port. Not inlined: the reply key is built on a stack frame of its own.
#[inline(never)]
pub fn holds_port(key: &FlowKey, e: &Flow, backend: &Backend) -> bool {
    let reply = e.reply_key(backend, key.proto, key.family);
    // SAFETY: a map value pointer from a successful lookup.
    CONNTRACK.get_ptr(&reply).is_none_or(|r| translates_to(unsafe { &*r }, key))
}

/// Whether the reply entry `e` translates back to the client and service of the forward key
/// `key`, i.e. belongs to that flow. Word by word: comparing the arrays whole compiles to a
/// `bcmp` call.
#[inline(always)]
fn translates_to(e: &Flow, key: &FlowKey) -> bool {
    let (p, v) = (&e.peer_addr, &e.vip_addr);
    e.peer_port == key.sport
        && e.vip_port == key.dport
        && p[0] == key.src[0]
        && p[1] == key.src[1]
        && p[2] == key.src[2]
        && p[3] == key.src[3]
        && v[0] == key.dst[0]
        && v[1] == key.dst[1]
        && v[2] == key.dst[2]
        && v[3] == key.dst[3]
}

/// Removes a dead forward entry so a new connection on its tuple can take its place.
#[inline(always)]
pub fn forget(key: &FlowKey) {
    let _ = CONNTRACK.remove(key);
}
