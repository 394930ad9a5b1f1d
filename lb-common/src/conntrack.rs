//! Connection tracking: the `CONNTRACK` entry, its TCP/UDP state machine and timeouts.
//!
//! A flow keeps its backend while its entry lives, whatever happens to the Maglev table. NAT
//! flows have two entries, one per direction, each holding what the other direction needs,
//! so either can rebuild its partner (an LRU map may evict one without the other).

use crate::net::tcp_flags;

/// Flow states. Stored as `u8` in [`Flow::state`].
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum FlowState {
    /// A SYN opened the flow; no ACK from the client yet.
    SynSeen = 1,
    /// The client acknowledged (or the flow was picked up mid-stream).
    Established = 2,
    /// A FIN was seen: the connection is closing.
    Closing = 3,
    /// A RST was seen: the next SYN on this tuple is a new connection.
    Closed = 4,
    /// A UDP (or other connectionless) flow.
    Datagram = 5,
}

impl FlowState {
    #[must_use]
    pub const fn from_u8(value: u8) -> Option<Self> {
        match value {
            1 => Some(Self::SynSeen),
            2 => Some(Self::Established),
            3 => Some(Self::Closing),
            4 => Some(Self::Closed),
            5 => Some(Self::Datagram),
            _ => None,
        }
    }

    #[must_use]
    pub const fn name(self) -> &'static str {
        match self {
            Self::SynSeen => "syn_seen",
            Self::Established => "established",
            Self::Closing => "closing",
            Self::Closed => "closed",
            Self::Datagram => "datagram",
        }
    }
}

/// `Flow::flags`: this entry is the reply direction of a NAT flow (backend to load balancer).
pub const FLOW_REPLY: u8 = 0x01;
/// `Flow::flags`: the flow is translated (full NAT); otherwise it is forwarded as is (DSR).
pub const FLOW_NAT: u8 = 0x02;
/// `Flow::flags`: opened by a SYN cookie; the load balancer's SYN to the backend is not
/// answered yet. `isn` holds the client's initial sequence number, `seq_delta` the cookie.
pub const FLOW_SYN_PROXY: u8 = 0x04;
/// `Flow::flags`: opened by a SYN cookie; sequence numbers differ by `seq_delta` (the
/// backend's initial sequence number minus the cookie) between client and backend.
pub const FLOW_SEQ_ADJ: u8 = 0x08;
/// `Flow::flags`, forward entries of closed or closing connections: a SYN reused the tuple
/// while cookies were on, and got a cookie SYN-ACK; the entries stay. An ACK with a valid
/// cookie starts the tuple over (a client's new connection); any other segment goes on as
/// this flow's (the reset that closed it may have been forged by someone who knew the
/// tuple, and the SYN with it: removing the entries would leave the connection's next
/// segments without a flow or a valid cookie, dropped).
pub const FLOW_COOKIE_REOPEN: u8 = 0x10;

/// Value of the `CONNTRACK` map.
///
/// Forward entries (client to service) need `backend_id`, `nat_port` and the service port;
/// reply entries (backend to the NAT address) carry the client's address and port and the
/// service's, to translate replies back.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Flow {
    /// Data-path clock (`bpf_jiffies64`) at the last packet, refreshed at most every
    /// `Globals::refresh` ticks.
    pub last_seen: u64,
    /// Reply entries: the client's address. Forward entries of NAT flows: the NAT source
    /// address. Network order.
    pub peer_addr: [u32; 4],
    /// The service (VIP) address, network order.
    pub vip_addr: [u32; 4],
    /// Index in `BACKENDS`.
    pub backend_id: u32,
    /// Reply entries: the client's port. Forward entries: unused. Network order.
    pub peer_port: u16,
    /// The service port the client connected to (network order).
    pub vip_port: u16,
    /// NAT source port towards the backend (network order); zero for DSR.
    pub nat_port: u16,
    /// A [`FlowState`].
    pub state: u8,
    /// `FLOW_*` bits.
    pub flags: u8,
    /// Index in the service counters, so replies count against their service.
    pub service_id: u32,
    /// Reply entries: the interface the client's packets arrived on, where replies leave.
    pub reply_ifindex: u32,
    /// Reply entries: destination MAC for replies (the client's packets' source MAC: the
    /// client or its router).
    pub reply_dmac: [u8; 6],
    /// Reply entries: source MAC for replies (the load balancer's MAC the client used).
    pub reply_smac: [u8; 6],
    /// Flows opened by a SYN cookie: see [`FLOW_SYN_PROXY`] and [`FLOW_SEQ_ADJ`].
    pub seq_delta: u32,
    pub isn: u32,
}
const _: () = assert!(core::mem::size_of::<Flow>() == 80);
#[cfg(feature = "user")]
// SAFETY: repr(C), no implicit padding, plain integers.
unsafe impl aya::Pod for Flow {}

impl Flow {
    /// The key of the forward entry (client to service) of the NAT flow whose reply entry
    /// this is; `proto` and `family` are the reply key's.
    #[inline(always)]
    #[must_use]
    pub const fn forward_key(&self, proto: u8, family: u8) -> crate::FlowKey {
        crate::FlowKey {
            src: self.peer_addr,
            dst: self.vip_addr,
            sport: self.peer_port,
            dport: self.vip_port,
            proto,
            family,
            _pad: 0,
        }
    }

    /// The key of the reply entry (backend to NAT source) of the NAT flow whose forward
    /// entry this is, `backend` being the entry's backend; `proto` and `family` are the
    /// forward key's.
    #[inline(always)]
    #[must_use]
    pub const fn reply_key(
        &self,
        backend: &crate::service::Backend,
        proto: u8,
        family: u8,
    ) -> crate::FlowKey {
        crate::FlowKey {
            src: backend.addr,
            dst: self.peer_addr,
            sport: backend.port_for(self.vip_port),
            dport: self.nat_port,
            proto,
            family,
            _pad: 0,
        }
    }

    /// The NAT source address of this entry (under `key`, its own) if it is a NAT flow's: a
    /// forward entry holds it, a reply entry's key is addressed to it.
    #[must_use]
    pub const fn nat_source(&self, key: &crate::FlowKey) -> Option<[u32; 4]> {
        if self.flags & FLOW_NAT == 0 {
            None
        } else if self.flags & FLOW_REPLY != 0 {
            Some(key.dst)
        } else {
            Some(self.peer_addr)
        }
    }
}

/// How often a live flow's `last_seen` is rewritten, in seconds: often enough for
/// second-granularity timeouts, rarely enough to keep the entry's cache line mostly read-only.
pub const REFRESH_SECS: u64 = 1;

/// Refresh intervals past its timeout during which a dead entry may still be overwritten in
/// place by a new flow on its tuple (`lb-ebpf`'s `conntrack::overwrite`). The daemon's sweep
/// removes only entries dead for longer, so the two never act on one element at once: an
/// element the sweep frees may at once hold another key, and a write through a pointer
/// found before the removal would land in it.
pub const OVERWRITE_WINDOW_REFRESHES: u64 = 2;

/// Idle timeouts per state in seconds, as configured.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TimeoutSecs {
    pub syn: u64,
    pub established: u64,
    pub closing: u64,
    pub closed: u64,
    pub datagram: u64,
}

impl Default for TimeoutSecs {
    /// Defaults close to Linux conntrack's, shortened where a load balancer holds many idle
    /// flows: SYN 60 s, established 2 h, FIN 60 s, RST 10 s, UDP 60 s.
    fn default() -> Self {
        Self { syn: 60, established: 7200, closing: 60, closed: 10, datagram: 60 }
    }
}

/// Idle timeouts per state in ticks of the data path's clock (`bpf_jiffies64`, `hz` ticks a
/// second); part of `GLOBALS`. The jiffies clock costs a load where a nanosecond clock costs
/// a helper call per packet, and seconds are all timeouts need.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Timeouts {
    pub syn: u64,
    pub established: u64,
    pub closing: u64,
    pub closed: u64,
    pub datagram: u64,
}

impl Timeouts {
    /// The timeouts `secs` at `hz` ticks a second.
    #[must_use]
    pub const fn from_secs(secs: &TimeoutSecs, hz: u64) -> Self {
        Self {
            syn: secs.syn.saturating_mul(hz),
            established: secs.established.saturating_mul(hz),
            closing: secs.closing.saturating_mul(hz),
            closed: secs.closed.saturating_mul(hz),
            datagram: secs.datagram.saturating_mul(hz),
        }
    }

    /// Idle timeout of a flow in `state` (a raw `FlowState`; unknown states expire at once).
    #[inline(always)]
    #[must_use]
    pub const fn for_state(&self, state: u8) -> u64 {
        match FlowState::from_u8(state) {
            Some(FlowState::SynSeen) => self.syn,
            Some(FlowState::Established) => self.established,
            Some(FlowState::Closing) => self.closing,
            Some(FlowState::Closed) => self.closed,
            Some(FlowState::Datagram) => self.datagram,
            None => 0,
        }
    }

    /// Whether a flow last seen at `last_seen` in `state` has expired at `now` (ticks).
    #[inline(always)]
    #[must_use]
    pub const fn is_expired(&self, state: u8, last_seen: u64, now: u64) -> bool {
        now.saturating_sub(last_seen) > self.for_state(state)
    }

    /// Whether a flow has been expired at `now` for longer than the overwrite window
    /// ([`OVERWRITE_WINDOW_REFRESHES`] intervals of `refresh` ticks): the daemon's sweep
    /// removes it, and the data path no longer writes over it in place.
    #[inline(always)]
    #[must_use]
    pub const fn is_long_expired(&self, state: u8, last_seen: u64, now: u64, refresh: u64) -> bool {
        let window = refresh.saturating_mul(OVERWRITE_WINDOW_REFRESHES);
        self.is_expired(state, last_seen, now.saturating_sub(window))
    }

    /// Whether a flow is expired at `now` but not for longer than the overwrite window: the
    /// dead entries the daemon neither sweeps nor cuts (its clock read within `refresh` of
    /// `now`, see lb-userspace's `FlowClock`), which the data path therefore writes over
    /// through the pointer its live-flow lookup returned, held while a new flow's backend
    /// is chosen. Other dead entries (a closed connection's tuple reopened before its
    /// timeout, which a cut may remove; a cookie flow started over; an entry expired long
    /// ago, which the sweep may remove) are looked up again just before the write.
    #[inline(always)]
    #[must_use]
    pub const fn in_overwrite_window(
        &self,
        state: u8,
        last_seen: u64,
        now: u64,
        refresh: u64,
    ) -> bool {
        self.is_expired(state, last_seen, now)
            && !self.is_long_expired(state, last_seen, now, refresh)
    }
}

/// What a packet does to a tracked flow.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Transition {
    /// Keep the flow (possibly in a new state).
    Keep(FlowState),
    /// The packet opens a new connection on a tuple whose old one is over: choose the backend
    /// afresh.
    Restart,
}

/// Whether TCP `flags` are a connection's first SYN: SYN without ACK, RST or FIN. Linux
/// discards SYN+RST and SYN+FIN on a listening socket; here they neither start a flow over
/// nor get a SYN cookie (they are resets and FINs).
#[inline(always)]
#[must_use]
pub const fn opens_connection(flags: u8) -> bool {
    flags & (tcp_flags::SYN | tcp_flags::ACK | tcp_flags::RST | tcp_flags::FIN) == tcp_flags::SYN
}

/// The state a new TCP flow (`nat`: of a NAT service) starts in for a packet with `flags`.
/// A flow picked up without its SYN (after a restart, or a failover from another node) is
/// taken as established when DSR: a live connection, pinned to its backend however rarely it
/// sends. A NAT one starts unconfirmed, as a SYN's does (the SYN timeout), and is
/// established by its next packet: a picked-up NAT connection cannot go on anyway (its
/// source port is new to the backend, which resets it), and a spoofed ACK flood's entries
/// would otherwise hold their ports for the established timeout, two hours by default.
#[inline(always)]
#[must_use]
pub const fn initial_tcp_state(flags: u8, nat: bool) -> FlowState {
    if flags & tcp_flags::RST != 0 {
        FlowState::Closed
    } else if flags & tcp_flags::FIN != 0 {
        FlowState::Closing
    } else if nat || opens_connection(flags) {
        FlowState::SynSeen
    } else {
        FlowState::Established
    }
}

/// The next state of a tracked TCP flow in `state` on a packet with `flags`, from the
/// client's side (the only side a DSR balancer sees).
///
/// A retransmitted SYN keeps the flow (and so its backend and NAT port): no second entry.
/// A SYN on a closed or closing tuple starts a new connection. A segment after a reset,
/// neither a SYN nor a reset, shows the reset did not end the connection (forged by someone
/// who knew the tuple, or out of the receiver's window, which it then ignores, RFC 5961):
/// the flow goes on as if picked up, unconfirmed until its next segment, instead of being
/// left to the closed state's short timeout.
#[inline(always)]
#[must_use]
pub const fn next_tcp_state(state: u8, flags: u8) -> Transition {
    let syn_only = opens_connection(flags);
    match FlowState::from_u8(state) {
        Some(FlowState::Closed | FlowState::Closing) if syn_only => Transition::Restart,
        _ if flags & tcp_flags::RST != 0 => Transition::Keep(FlowState::Closed),
        Some(FlowState::Closed) if flags & tcp_flags::FIN != 0 => {
            Transition::Keep(FlowState::Closing)
        }
        Some(FlowState::Closed) => Transition::Keep(FlowState::SynSeen),
        _ if flags & tcp_flags::FIN != 0 => Transition::Keep(FlowState::Closing),
        Some(FlowState::Closing) => Transition::Keep(FlowState::Closing),
        Some(FlowState::SynSeen) if syn_only => Transition::Keep(FlowState::SynSeen),
        Some(FlowState::Established) if syn_only => Transition::Keep(FlowState::Established),
        Some(FlowState::SynSeen | FlowState::Established) => {
            Transition::Keep(FlowState::Established)
        }
        _ => Transition::Restart,
    }
}

/// Whether a live forward entry in `state`, last refreshed at `last_seen`, carries a packet
/// of `proto` with `flags` (TCP flags) at `now`: the state after the packet, and whether the
/// entry must be rewritten (the state changes, or more than `refresh` ticks have passed since
/// `last_seen`). `None` when the entry has expired or the packet starts the tuple over. The
/// one rule both the connection table's entries and the flow cache's copies of them follow.
#[inline(always)]
#[must_use]
pub const fn carry(
    state: u8,
    last_seen: u64,
    proto: u8,
    flags: u8,
    timeouts: &Timeouts,
    refresh: u64,
    now: u64,
) -> Option<(u8, bool)> {
    if timeouts.is_expired(state, last_seen, now) {
        return None;
    }
    let transition = if proto == crate::net::IPPROTO_TCP {
        next_tcp_state(state, flags)
    } else {
        Transition::Keep(FlowState::Datagram)
    };
    let Transition::Keep(next) = transition else { return None };
    let next = next as u8;
    Some((next, next != state || now.saturating_sub(last_seen) > refresh))
}

#[cfg(test)]
#[allow(
    clippy::cast_possible_truncation,
    clippy::cast_precision_loss,
    reason = "test arithmetic on small, known values"
)]
mod tests {
    #[test]
    fn a_nat_flows_source_address_is_read_from_either_entry() {
        use crate::FlowKey;
        let nat = [0x0a00_0002_u32.to_be(), 0, 0, 0];
        let key = FlowKey { dst: [0x0a00_0001_u32.to_be(), 0, 0, 0], ..FlowKey::default() };
        let forward = Flow { flags: FLOW_NAT, peer_addr: nat, ..Flow::default() };
        assert_eq!(forward.nat_source(&key), Some(nat));
        let reply = Flow { flags: FLOW_NAT | FLOW_REPLY, ..Flow::default() };
        assert_eq!(reply.nat_source(&FlowKey { dst: nat, ..key }), Some(nat));
        assert_eq!(Flow::default().nat_source(&key), None, "DSR");
    }

    #[test]
    fn the_sweep_and_the_in_place_overwrite_never_share_an_entry() {
        // The sweep judges with its clock read before it removes; the data path's clock
        // only moves on. An entry the sweep removes is long expired for the data path too,
        // which then replaces it by a map update, never through a pointer.
        let t = Timeouts::from_secs(&TimeoutSecs::default(), 100);
        let refresh = REFRESH_SECS * 100;
        for state in 1..=5u8 {
            let timeout = t.for_state(state);
            for age in [0, timeout, timeout + 1, timeout + 2 * refresh, timeout + 2 * refresh + 1] {
                let last_seen = 1_000_000;
                let sweep_now = last_seen + age;
                for later in [0, 1, refresh, 100 * refresh] {
                    if t.is_long_expired(state, last_seen, sweep_now, refresh) {
                        assert!(t.is_long_expired(state, last_seen, sweep_now + later, refresh));
                    }
                }
                // Long expired exactly past the window.
                let long = t.is_long_expired(state, last_seen, sweep_now, refresh);
                assert_eq!(long, age > timeout + 2 * refresh, "state {state}, age {age}");
            }
        }
    }

    use super::*;
    use crate::net::tcp_flags::{ACK, FIN, PSH, RST, SYN};

    const S: u64 = 1000;

    #[test]
    fn handshake_data_and_close() {
        let syn = initial_tcp_state(SYN, false);
        assert_eq!(syn, FlowState::SynSeen);
        let Transition::Keep(est) = next_tcp_state(syn as u8, ACK) else { panic!() };
        assert_eq!(est, FlowState::Established);
        assert_eq!(next_tcp_state(est as u8, ACK | PSH), Transition::Keep(FlowState::Established));
        assert_eq!(next_tcp_state(est as u8, FIN | ACK), Transition::Keep(FlowState::Closing));
        assert_eq!(
            next_tcp_state(FlowState::Closing as u8, ACK),
            Transition::Keep(FlowState::Closing)
        );
        assert_eq!(next_tcp_state(est as u8, RST), Transition::Keep(FlowState::Closed));
        assert_eq!(
            next_tcp_state(FlowState::Closing as u8, RST | ACK),
            Transition::Keep(FlowState::Closed)
        );
    }

    #[test]
    fn retransmitted_syn_keeps_the_flow() {
        assert_eq!(
            next_tcp_state(FlowState::SynSeen as u8, SYN),
            Transition::Keep(FlowState::SynSeen)
        );
        assert_eq!(
            next_tcp_state(FlowState::Established as u8, SYN),
            Transition::Keep(FlowState::Established)
        );
    }

    #[test]
    fn syn_after_close_restarts() {
        assert_eq!(next_tcp_state(FlowState::Closed as u8, SYN), Transition::Restart);
        assert_eq!(next_tcp_state(FlowState::Closing as u8, SYN), Transition::Restart);
        assert_eq!(next_tcp_state(0, ACK), Transition::Restart, "unknown state");
    }

    #[test]
    fn a_segment_after_a_reset_shows_the_connection_goes_on() {
        // A forged reset (or one out of the receiver's window) followed by the connection's
        // own segments: back to unconfirmed, then established, not left to the closed
        // state's ten seconds.
        let closed = FlowState::Closed as u8;
        assert_eq!(next_tcp_state(closed, ACK), Transition::Keep(FlowState::SynSeen));
        assert_eq!(
            next_tcp_state(FlowState::SynSeen as u8, ACK),
            Transition::Keep(FlowState::Established)
        );
        assert_eq!(next_tcp_state(closed, FIN | ACK), Transition::Keep(FlowState::Closing));
        assert_eq!(next_tcp_state(closed, RST | ACK), Transition::Keep(FlowState::Closed));
    }

    #[test]
    fn a_syn_with_rst_or_fin_opens_nothing() {
        assert!(opens_connection(SYN));
        for flags in [SYN | RST, SYN | FIN, SYN | ACK, SYN | RST | FIN] {
            assert!(!opens_connection(flags), "{flags:#x}");
        }
        // On a closed tuple, a reset stays a reset: no new flow for every copy.
        assert_eq!(
            next_tcp_state(FlowState::Closed as u8, SYN | RST),
            Transition::Keep(FlowState::Closed)
        );
        assert_eq!(
            next_tcp_state(FlowState::Closing as u8, SYN | FIN),
            Transition::Keep(FlowState::Closing)
        );
    }

    #[test]
    fn a_mid_stream_pickup_is_established_by_its_next_packet() {
        // NAT: unconfirmed until its next packet.
        assert_eq!(initial_tcp_state(ACK, true), FlowState::SynSeen);
        assert_eq!(initial_tcp_state(SYN | ACK, true), FlowState::SynSeen);
        assert_eq!(
            next_tcp_state(initial_tcp_state(ACK, true) as u8, ACK),
            Transition::Keep(FlowState::Established)
        );
        // DSR: a live connection taken over, established at once.
        assert_eq!(initial_tcp_state(ACK, false), FlowState::Established);
        assert_eq!(initial_tcp_state(SYN, false), FlowState::SynSeen);
        for nat in [false, true] {
            assert_eq!(initial_tcp_state(FIN | ACK, nat), FlowState::Closing);
            assert_eq!(initial_tcp_state(RST, nat), FlowState::Closed);
        }
    }

    #[test]
    fn carry_keeps_refreshes_and_lets_go() {
        let t = Timeouts::from_secs(&TimeoutSecs::default(), S);
        let est = FlowState::Established as u8;
        let tcp = crate::net::IPPROTO_TCP;
        let carry_at = |state, flags, now| carry(state, 10 * S, tcp, flags, &t, S, now);
        // Within a refresh interval nothing is written; past it, the entry is.
        assert_eq!(carry_at(est, ACK, 11 * S), Some((est, false)));
        assert_eq!(carry_at(est, ACK | PSH, 11 * S + 1), Some((est, true)));
        // A state change is always written.
        assert_eq!(carry_at(est, FIN | ACK, 10 * S), Some((FlowState::Closing as u8, true)));
        assert_eq!(carry_at(est, RST, 10 * S), Some((FlowState::Closed as u8, true)));
        // Expired, or started over: not carried.
        assert_eq!(carry_at(est, ACK, 7210 * S + 1), None);
        assert_eq!(carry_at(FlowState::Closed as u8, SYN, 10 * S), None);
        // Other protocols are datagrams.
        let dgram = FlowState::Datagram as u8;
        assert_eq!(carry(dgram, 10 * S, 17, 0, &t, S, 10 * S), Some((dgram, false)));
        assert_eq!(carry(dgram, 10 * S, 17, 0, &t, S, 71 * S), None);
    }

    #[test]
    fn timeouts_by_state() {
        let t = Timeouts::from_secs(&TimeoutSecs::default(), S);
        assert!(!t.is_expired(FlowState::Established as u8, 0, 7200 * S));
        assert!(t.is_expired(FlowState::Established as u8, 0, 7200 * S + 1));
        assert!(t.is_expired(FlowState::Closed as u8, 100 * S, 111 * S));
        assert!(!t.is_expired(FlowState::Datagram as u8, 100 * S, 159 * S));
        assert!(t.is_expired(0, 5, 6), "unknown state expires at once");
        assert!(!t.is_expired(FlowState::SynSeen as u8, 10 * S, 5 * S), "clock behind last_seen");
    }
}
