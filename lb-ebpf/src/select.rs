//! Backend choice: which service a packet is for, whether its flow is already tracked, and
//! otherwise which backend the service's Maglev table gives its hash.

use lb_common::{
    FlowKey, Reason,
    conntrack::{
        FLOW_COOKIE_REOPEN, FLOW_NAT, FLOW_REPLY, FLOW_SEQ_ADJ, FLOW_SYN_PROXY, Flow, FlowState,
        carry, initial_tcp_state,
    },
    flow::{flow_hash, scale},
    maglev::NO_BACKEND,
    net::{IPPROTO_TCP, IPPROTO_UDP},
    service::{
        AddrKey, GLOBAL_ALL_PORTS_SERVICES, Globals, MAX_BACKENDS, MAX_SERVICES,
        SERVICE_HASH_SOURCE, Service, ServiceKey, addr_filter_bit, service_slot,
    },
};

use crate::{
    maps::{ADDR_FILTER, GLOBALS, MAGLEV, SERVICE_CACHE, SERVICES, VIPS},
    parse::Packet,
};

/// The service `packet` is addressed to (see [`service_at`]): from this CPU's service
/// cache when its slot holds the packet's key in `epoch` (the caches' epoch now), else from
/// `SERVICES`, which then fills the slot (the returned service is the slot's copy either
/// way).
#[inline(always)]
pub fn lookup_service(packet: &Packet, g: &Globals, epoch: u32) -> Option<&'static Service> {
    if !packet.has_l4 || (packet.proto != IPPROTO_TCP && packet.proto != IPPROTO_UDP) {
        return None;
    }
    let key = ServiceKey {
        addr: packet.dst,
        port: packet.dport,
        proto: packet.proto,
        family: packet.family as u8,
    };
    let w = key.words();
    let slot = SERVICE_CACHE.get_ptr_mut(service_slot(&w, g.hash_seed))?;
    // SAFETY: a per-CPU map value pointer from a successful lookup; only this CPU's programs
    // write it, one at a time, and nothing else writes it during this program run.
    let c = unsafe { &mut *slot };
    let held = c.key.words();
    let diff = (w[0] ^ held[0]) | (w[1] ^ held[1]) | (w[2] ^ held[2]) | (w[3] ^ held[3]);
    let holds = (diff | (w[4] ^ held[4])) == 0;
    if holds && epoch != 0 && c.epoch == epoch {
        return Some(&c.service);
    }
    let Some(service) = service_at(key) else {
        if holds {
            // No such service any more: an old copy is not left to come back should the
            // epoch ever wrap round to its own.
            c.epoch = 0;
        }
        return None;
    };
    // Field by field: a struct copy between map values compiles to a `memmove` call.
    for i in 0..4 {
        c.key.addr[i] = key.addr[i];
    }
    c.key.port = key.port;
    c.key.proto = key.proto;
    c.key.family = key.family;
    c.epoch = epoch;
    // SAFETY: a `SERVICES` value and the slot: valid and disjoint.
    unsafe { crate::mem::copy(&raw mut c.service, service) };
    Some(&c.service)
}

/// The service at `key` (address, protocol, port): an exact match first, then an all-ports
/// service of the address and protocol.
#[inline(always)]
pub fn service_at(mut key: ServiceKey) -> Option<&'static Service> {
    if let Some(service) = SERVICES.get_ptr(key) {
        // SAFETY: a map value pointer from a successful lookup, valid for this program run.
        return Some(unsafe { &*service });
    }
    // Most deployments have no all-ports service: skip the second lookup then.
    let all_ports = GLOBALS.get_ptr(0).is_some_and(|g| {
        // SAFETY: a map value pointer from a successful array lookup.
        let flags = unsafe { (*g).flags };
        flags & GLOBAL_ALL_PORTS_SERVICES != 0
    });
    if !all_ports {
        return None;
    }
    key.port = 0;
    // SAFETY: as above.
    SERVICES.get_ptr(key).map(|service| unsafe { &*service })
}

/// Whether `packet`'s destination address carries any service (for fragments, whose ports
/// are unknown).
#[inline(always)]
pub fn is_vip(packet: &Packet) -> bool {
    let key = AddrKey { addr: packet.dst, family: packet.family as u32 };
    VIPS.get_ptr(key).is_some()
}

/// Whether the packet's destination may be a service or NAT source address: a clear bit in
/// `ADDR_FILTER` (an inlined array lookup) proves it is neither.
#[inline(always)]
pub fn may_be_ours(packet: &Packet) -> bool {
    let bit = addr_filter_bit(&packet.dst);
    ADDR_FILTER.get(bit >> 6).is_none_or(|w| *w & (1u64 << (bit & 63)) != 0)
}

/// The daemon's settings (written when the data path is loaded).
#[inline(always)]
pub fn globals() -> Result<&'static Globals, Reason> {
    // SAFETY: a map value pointer from a successful array lookup, valid for this program run.
    GLOBALS.get_ptr(0).map(|g| unsafe { &*g }).ok_or(Reason::NoBackend)
}

/// What identifies the reply entry of a NAT flow that is over.
#[derive(Clone, Copy)]
pub struct StaleNat {
    pub backend_id: u32,
    pub nat_addr: [u32; 4],
    pub nat_port: u16,
    pub vip_port: u16,
}

/// Whether the live forward entry `e` carries this packet on: its state after the packet and
/// whether the entry was rewritten (new state, or a refresh interval passed), updated in
/// place. `None` when the entry is a reply entry, expired, or the packet starts over (a SYN
/// on a closed connection's tuple).
#[inline(always)]
pub fn keep(packet: &Packet, e: &mut Flow, g: &Globals, now: u64) -> Option<(u8, bool)> {
    if e.flags & FLOW_REPLY != 0 {
        return None;
    }
    let (proto, flags) = (packet.proto, packet.tcp_flags);
    let (mut state, mut refresh) =
        carry(e.state, e.last_seen, proto, flags, &g.timeouts, g.refresh, now)?;
    // A cookie-opened connection is not brought back from a reset (see `next_tcp_state`):
    // its next SYN on the tuple, taken for a retransmission, would be shifted into the old
    // connection's numbering. Its packets go on while they come within the closed timeout,
    // the entry refreshed as any other's, not at every packet.
    if e.state == FlowState::Closed as u8
        && state == FlowState::SynSeen as u8
        && e.flags & (FLOW_SEQ_ADJ | FLOW_SYN_PROXY) != 0
    {
        state = FlowState::Closed as u8;
        refresh = now.saturating_sub(e.last_seen) > g.refresh;
    }
    if refresh {
        // Back from a reset: no longer a tuple a SYN got a cookie for.
        if !closed(state) {
            e.flags &= !FLOW_COOKIE_REOPEN;
        }
        e.state = state;
        e.last_seen = now;
    }
    Some((state, refresh))
}

/// A connection-table entry on a packet's tuple that no longer carries it (expired, or a
/// closed connection whose tuple a SYN reuses), as the live-flow lookup found it: a new flow
/// must take its place, and a NAT flow's reply entry must go with it.
#[derive(Clone, Copy)]
pub struct DeadFlow {
    /// 1 when there is such an entry.
    pub present: u8,
    /// 1 when it is a NAT flow's forward entry; `stale` then names its reply entry.
    pub has_stale: u8,
    /// 1 when it is a cookie-opened flow whose backend never answered, started over: the
    /// same connection, not a new flow to count.
    pub retry: u8,
    /// 1 when it is a closed or closing connection, not yet timed out, whose tuple a SYN
    /// reuses: kept when the SYN gets a cookie (see `FLOW_COOKIE_REOPEN`).
    pub restart: u8,
    pub stale: StaleNat,
}

/// Notes the dead forward entry `e` in `dead`. Field by field: a struct literal copying the
/// address out of a map value compiles to a `memmove` call (see `mem.rs`).
#[inline(always)]
pub fn note_dead(dead: &mut DeadFlow, e: &Flow) {
    dead.present = 1;
    if e.flags & FLOW_NAT != 0 && e.flags & FLOW_REPLY == 0 {
        dead.has_stale = 1;
        dead.stale.backend_id = e.backend_id;
        // SAFETY: a map value and per-CPU scratch memory: valid and disjoint.
        unsafe { crate::mem::copy(&raw mut dead.stale.nat_addr, &raw const e.peer_addr) };
        dead.stale.nat_port = e.nat_port;
        dead.stale.vip_port = e.vip_port;
    }
}

/// Whether a TCP flow in `state` is closed or closing.
#[inline(always)]
pub fn closed(state: u8) -> bool {
    state == FlowState::Closed as u8 || state == FlowState::Closing as u8
}

/// The state a new flow (`nat`: of a NAT service) starts in.
#[inline(always)]
pub fn initial_state(packet: &Packet, nat: bool) -> FlowState {
    if packet.proto == IPPROTO_TCP {
        initial_tcp_state(packet.tcp_flags, nat)
    } else {
        FlowState::Datagram
    }
}

/// The backend the service's Maglev table assigns to `key`.
#[inline(always)]
pub fn choose_backend(service: &Service, key: &FlowKey, g: &Globals) -> Result<u32, Reason> {
    let hash = flow_hash(key, g.hash_seed, service.flags & SERVICE_HASH_SOURCE != 0);
    if service.table_size == 0 || service.id >= MAX_SERVICES {
        return Err(Reason::NoBackend);
    }
    let slot = scale(hash, service.table_size);
    let backend_id = MAGLEV.get_value(service.id, &slot).copied().unwrap_or(NO_BACKEND);
    // verifier: ids index BACKENDS and the counters; anything else (NO_BACKEND) is no backend.
    if backend_id >= MAX_BACKENDS {
        return Err(Reason::NoBackend);
    }
    Ok(backend_id)
}
