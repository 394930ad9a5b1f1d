//! The flow cache: per CPU, a direct-mapped copy of the connection-table entries of live
//! flows, so that a packet of a busy flow costs an array read and a 40-byte compare instead
//! of the kernel's hash lookup (a jhash of the key, a bucket walk, a `memcmp`, and the calls
//! and hardened returns between them). Both directions: a client's packets find their
//! forward entry's copy, a NAT backend's replies their reply entry's.
//!
//! The connection table stays the truth; a slot is a copy the data path may use only while
//! the table's entry would carry the packet the same way without being rewritten:
//! - the slot holds the packet's key and the current [`CACHE_EPOCH`](crate::maps::CACHE_EPOCH)
//!   (the daemon bumps it after removing entries of flows that may be live, after writing
//!   services, before releasing a backend id, at every load);
//! - a forward copy: [`carry`](crate::conntrack::carry) on the slot's state and `last_seen`
//!   (the entry's, as cached) keeps the state and asks for no refresh; a reply copy
//!   ([`carries_reply`]): neither expired nor due for a refresh, and the packet neither a
//!   reset nor a SYN. So a cached flow goes back to the table at least once every refresh
//!   interval in each direction: the entries are refreshed on the same schedule as without
//!   the cache (a reply's refresh keeps the forward entry alive too), and the slots with
//!   them; a packet that changes the state (FIN, RST) or carries a SYN always goes to the
//!   table;
//! - a NAT copy's port has not been taken by another flow since (`NAT_PORT_GEN`). For a
//!   reply copy that is the whole of the port's story: the table's entry under a reply key
//!   is whichever flow holds the port to that backend, and a flow that takes it over (the
//!   old entry evicted, expired or released) moves the generation on.
//!
//! Only plain DSR and NAT entries in the established or datagram state are used (no
//! SYN-cookie flows); whatever the table does with a flow, the data path refills or empties
//! its slot on that CPU. The sweep never removes an entry a slot could still be used for (it
//! removes entries expired for longer than the overwrite window, and a slot is used only
//! within a refresh interval of a `last_seen` no later than the entry's). A slot holds
//! whichever flow last filled it: a collision costs a table lookup, never a wrong backend
//! or client.
//!
//! What a copy may lag behind in: the state the other direction moved the table's entries
//! to (a reply copy still says established for up to a refresh interval after the client's
//! FIN or reset closed the flow, and translates the backend's packets to the same client as
//! before until then, or until another flow takes the port), and the MAC addresses of a NAT
//! tuple reopened over its dead flow's own entries (the client's, as the dead flow's
//! packets had them; a reopened flow with SYN-cookie numbers moves the port's generation
//! on, its translation being another).

use crate::{
    FlowKey,
    conntrack::{FLOW_NAT, FLOW_REPLY, Flow, FlowState, Timeouts, carry},
    flow::{pair, top_bits},
};

/// Slots per CPU (a power of two): 16,384 slots of 128 bytes, 2 MiB per possible CPU.
pub const FLOW_CACHE_SLOTS: u32 = 1 << FLOW_CACHE_BITS;
const FLOW_CACHE_BITS: u32 = 14;

/// A slot of `FLOW_CACHE` (per-CPU array): a connection-table entry and its key.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CachedFlow {
    pub key: FlowKey,
    /// `CACHE_EPOCH` when the slot was filled; zero never matches.
    pub epoch: u32,
    /// NAT flows: `NAT_PORT_GEN` of the flow's NAT port when the slot was filled (a port
    /// taken by another flow since does not carry this one's packets).
    pub port_gen: u32,
    /// The entry as it was after the packet that filled the slot.
    pub flow: Flow,
}
const _: () = assert!(core::mem::size_of::<CachedFlow>() == 128);
#[cfg(feature = "user")]
// SAFETY: repr(C), no implicit padding (asserted size), plain integers.
unsafe impl aya::Pod for CachedFlow {}

/// The slot of `key` (below [`FLOW_CACHE_SLOTS`]). Seeded, so that which flows share a slot
/// differs from node to node, and every word of the key counts; XOR-linear in the words,
/// so keys crafted to collide do so under every seed (which costs them table lookups,
/// never a wrong backend).
#[inline(always)]
#[must_use]
pub const fn cache_slot(key: &FlowKey, seed: u32) -> u32 {
    slot_of_words(&key_words(key), seed)
}

/// [`cache_slot`] of the key whose memory holds `words` (see [`key_words`]): the data path
/// reads them straight from the packet's key.
#[inline(always)]
#[must_use]
pub const fn slot_of_words(w: &[u64; 5], seed: u32) -> u32 {
    let h = (seed as u64) ^ w[0] ^ w[1] ^ (w[2] ^ w[3]).rotate_left(21) ^ w[4].rotate_left(42);
    top_bits(h, FLOW_CACHE_BITS)
}

/// The epoch after `epoch` (zero, which no slot matches, skipped): what the daemon and the
/// bench-only wrapper write to move the caches on.
#[inline(always)]
#[must_use]
pub const fn next_epoch(epoch: u32) -> u32 {
    let next = epoch.wrapping_add(1);
    if next == 0 { 1 } else { next }
}

/// Whether two keys, as [`key_words`], are the same flow: one word-wide compare per word,
/// without branches.
#[inline(always)]
#[must_use]
pub const fn same_words(a: &[u64; 5], b: &[u64; 5]) -> bool {
    ((a[0] ^ b[0]) | (a[1] ^ b[1]) | (a[2] ^ b[2]) | (a[3] ^ b[3]) | (a[4] ^ b[4])) == 0
}

/// A key's 40 bytes as five little-endian 64-bit words, as they lie in memory (BPF is
/// little-endian; a test checks the layout).
#[inline(always)]
#[must_use]
#[allow(clippy::used_underscore_binding, reason = "the padding is part of the key's memory")]
pub const fn key_words(key: &FlowKey) -> [u64; 5] {
    let ports = key.sport as u32 | (key.dport as u32) << 16;
    let kind = key.proto as u32 | (key.family as u32) << 8 | (key._pad as u32) << 16;
    [
        pair(key.src[0], key.src[1]),
        pair(key.src[2], key.src[3]),
        pair(key.dst[0], key.dst[1]),
        pair(key.dst[2], key.dst[3]),
        pair(ports, kind),
    ]
}

/// Whether a slot holding the entry `e` may be used: a plain DSR or NAT forward entry, or a
/// NAT reply entry (no SYN-cookie flags), in the established or datagram state (states only
/// the table leaves).
#[inline(always)]
#[must_use]
pub const fn usable(e: &Flow) -> bool {
    (e.flags == 0 || e.flags == FLOW_NAT || e.flags == FLOW_NAT | FLOW_REPLY)
        && (e.state == FlowState::Established as u8 || e.state == FlowState::Datagram as u8)
}

/// Whether the cached entry `e` carries a packet of `proto` with `flags` (TCP flags) at
/// `now` as its table entry would, without the entry being rewritten: it is [`usable`], and
/// as a forward entry [`carry`] keeps its state and asks for no refresh, as a reply entry
/// [`carries_reply`].
#[inline(always)]
#[must_use]
pub const fn carries(
    e: &Flow,
    proto: u8,
    flags: u8,
    timeouts: &Timeouts,
    refresh: u64,
    now: u64,
) -> bool {
    if !usable(e) {
        return false;
    }
    if e.flags & FLOW_REPLY != 0 {
        return carries_reply(e, proto, flags, timeouts, refresh, now);
    }
    matches!(carry(e.state, e.last_seen, proto, flags, timeouts, refresh, now), Some((_, false)))
}

/// Whether the usable reply entry `e` carries a backend's packet as the table's reply path
/// would without writing the entry: not expired, no refresh due (the table path refreshes
/// both entries once a refresh interval), and not a TCP reset (which closes the flow) or
/// SYN (a SYN-ACK: the table's, as a client's SYN is).
#[inline(always)]
#[must_use]
pub const fn carries_reply(
    e: &Flow,
    proto: u8,
    flags: u8,
    timeouts: &Timeouts,
    refresh: u64,
    now: u64,
) -> bool {
    let control = crate::net::tcp_flags::RST | crate::net::tcp_flags::SYN;
    !timeouts.is_expired(e.state, e.last_seen, now)
        && now.saturating_sub(e.last_seen) <= refresh
        && (proto != crate::net::IPPROTO_TCP || flags & control == 0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::{vec, vec::Vec};

    use crate::{
        conntrack::{FLOW_REPLY, FLOW_SEQ_ADJ, FLOW_SYN_PROXY, TimeoutSecs},
        net::{
            IPPROTO_TCP,
            tcp_flags::{ACK, FIN, PSH, RST, SYN},
        },
    };

    fn key(src: u32, sport: u16) -> FlowKey {
        FlowKey {
            src: [src, 0, 0, 0],
            dst: [0x0a00_0001, 0, 0, 0],
            sport,
            dport: 80,
            proto: 6,
            family: 4,
            _pad: 0,
        }
    }

    #[test]
    fn slots_stay_in_range_and_spread_ports_and_sources() {
        // 65,536 flows from one client (every source port) and 65,536 clients on one port:
        // each set fills the slots about evenly (Poisson: 4 a slot on average, the fullest
        // slot far below 20).
        for flows in [
            (0..=u16::MAX).map(|p| key(0xc612_0001, p)).collect::<Vec<_>>(),
            (0..=u32::from(u16::MAX)).map(|s| key(0xc612_0000 | s, 40_000)).collect(),
        ] {
            let mut counts = vec![0u32; FLOW_CACHE_SLOTS as usize];
            for k in &flows {
                let slot = cache_slot(k, 0x5eed);
                assert!(slot < FLOW_CACHE_SLOTS);
                counts[slot as usize] += 1;
            }
            let used = counts.iter().filter(|c| **c > 0).count();
            let fullest = counts.iter().max().copied().unwrap_or(0);
            assert!(used > (FLOW_CACHE_SLOTS as usize) * 95 / 100, "{used} slots used");
            assert!(fullest < 20, "a slot holds {fullest} flows");
        }
    }

    #[test]
    fn the_next_epoch_is_never_zero() {
        assert_eq!(next_epoch(5), 6);
        assert_eq!(next_epoch(0), 1);
        assert_eq!(next_epoch(u32::MAX), 1);
    }

    #[test]
    fn key_words_are_the_keys_memory() {
        let k = FlowKey {
            src: [0x0102_0304, 0x0506_0708, 0x090a_0b0c, 0x0d0e_0f10],
            dst: [0x1112_1314, 0x1516_1718, 0x191a_1b1c, 0x1d1e_1f20],
            sport: 0x2122,
            dport: 0x2324,
            proto: 0x25,
            family: 0x26,
            _pad: 0x2728,
        };
        // SAFETY: `FlowKey` is 40 bytes of plain integers without implicit padding.
        let bytes: [u8; 40] = unsafe { core::mem::transmute(k) };
        let mut words = Vec::new();
        for w in key_words(&k) {
            words.extend_from_slice(&w.to_le_bytes());
        }
        assert_eq!(words, bytes);
    }

    #[test]
    fn the_seed_moves_flows_between_slots() {
        let moved = (0..1000u16)
            .filter(|p| {
                cache_slot(&key(0xc612_0001, *p), 1) != cache_slot(&key(0xc612_0001, *p), 2)
            })
            .count();
        assert!(moved > 990, "{moved} of 1000 flows moved");
    }

    #[test]
    fn every_key_word_counts() {
        let base = key(0xc612_0001, 40_000);
        let mut variants = Vec::new();
        for i in 0..4 {
            let mut k = base;
            k.src[i] ^= 1 << 9;
            variants.push(k);
            let mut k = base;
            k.dst[i] ^= 1 << 17;
            variants.push(k);
        }
        let mut k = base;
        k.sport ^= 1;
        variants.push(k);
        let mut k = base;
        k.dport ^= 0x100;
        variants.push(k);
        let mut k = base;
        k.proto = 17;
        variants.push(k);
        let mut k = base;
        k.family = 6;
        variants.push(k);
        variants.push(FlowKey { _pad: 1, ..base });
        let b = key_words(&base);
        assert!(same_words(&b, &b));
        for k in variants {
            assert!(!same_words(&key_words(&k), &b), "{k:?}");
            assert_ne!(cache_slot(&k, 7), cache_slot(&base, 7), "{k:?}");
        }
    }

    #[test]
    fn only_plain_established_entries_are_used() {
        let flow = |flags, state: FlowState| Flow { flags, state: state as u8, ..Flow::default() };
        let reply = FLOW_NAT | FLOW_REPLY;
        for state in [FlowState::Established, FlowState::Datagram] {
            assert!(usable(&flow(0, state)));
            assert!(usable(&flow(FLOW_NAT, state)));
            assert!(usable(&flow(reply, state)));
            for cookie in [FLOW_SEQ_ADJ, FLOW_SYN_PROXY] {
                assert!(!usable(&flow(FLOW_NAT | cookie, state)));
                assert!(!usable(&flow(reply | cookie, state)));
            }
            assert!(!usable(&flow(FLOW_REPLY, state)), "a reply entry is a NAT flow's");
        }
        for state in [FlowState::SynSeen, FlowState::Closing, FlowState::Closed] {
            assert!(!usable(&flow(0, state)));
            assert!(!usable(&flow(FLOW_NAT, state)));
            assert!(!usable(&flow(reply, state)));
        }
    }

    #[test]
    fn a_cached_entry_leaves_state_changes_refreshes_and_expiry_to_the_table() {
        const S: u64 = 1000;
        let t = Timeouts::from_secs(&TimeoutSecs::default(), S);
        let e = Flow {
            flags: FLOW_NAT,
            state: FlowState::Established as u8,
            last_seen: 10 * S,
            ..Flow::default()
        };
        let tcp = IPPROTO_TCP;
        assert!(carries(&e, tcp, ACK, &t, S, 11 * S));
        assert!(carries(&e, tcp, ACK | PSH, &t, S, 10 * S));
        assert!(!carries(&e, tcp, ACK, &t, S, 11 * S + 1), "refresh due");
        assert!(!carries(&e, tcp, FIN | ACK, &t, S, 11 * S), "state change");
        assert!(!carries(&e, tcp, RST, &t, S, 11 * S), "state change");
        let short = Timeouts { established: S / 2, ..t };
        assert!(!carries(&e, tcp, ACK, &short, S, 10 * S + S / 2 + 1), "expired");
        let udp = Flow { state: FlowState::Datagram as u8, flags: 0, ..e };
        assert!(carries(&udp, 17, 0, &t, S, 11 * S));
        assert!(!carries(&udp, 17, 0, &t, S, 11 * S + 1));
    }

    #[test]
    fn a_cached_reply_entry_leaves_resets_handshakes_refreshes_and_expiry_to_the_table() {
        const S: u64 = 1000;
        let t = Timeouts::from_secs(&TimeoutSecs::default(), S);
        let e = Flow {
            flags: FLOW_NAT | FLOW_REPLY,
            state: FlowState::Established as u8,
            last_seen: 10 * S,
            ..Flow::default()
        };
        let tcp = IPPROTO_TCP;
        assert!(carries(&e, tcp, ACK, &t, S, 11 * S));
        assert!(carries(&e, tcp, ACK | PSH, &t, S, 10 * S));
        // The reply path moves no state on a backend's FIN (the client's FIN does).
        assert!(carries(&e, tcp, FIN | ACK, &t, S, 10 * S));
        assert!(!carries(&e, tcp, ACK, &t, S, 11 * S + 1), "refresh due");
        assert!(!carries(&e, tcp, RST, &t, S, 10 * S), "a reset closes the flow");
        assert!(!carries(&e, tcp, RST | ACK, &t, S, 10 * S), "a reset closes the flow");
        assert!(!carries(&e, tcp, SYN | ACK, &t, S, 10 * S), "the handshake's");
        let short = Timeouts { established: S / 2, ..t };
        assert!(!carries(&e, tcp, ACK, &short, S, 10 * S + S / 2 + 1), "expired");
        // Not by the forward rules: a SYN-seen forward entry is not usable either, and an
        // established reply entry carries the backend's packets whatever their flags but
        // those two.
        let udp = Flow { state: FlowState::Datagram as u8, ..e };
        assert!(carries(&udp, 17, 0, &t, S, 11 * S));
        assert!(carries(&udp, 17, RST | SYN, &t, S, 11 * S), "no TCP flags on UDP");
        assert!(!carries(&udp, 17, 0, &t, S, 11 * S + 1));
        let cookie = Flow { flags: e.flags | FLOW_SEQ_ADJ, ..e };
        assert!(!carries(&cookie, tcp, ACK, &t, S, 10 * S), "sequence numbers to shift");
        let closing = Flow { state: FlowState::Closing as u8, ..e };
        assert!(!carries(&closing, tcp, ACK, &t, S, 10 * S));
    }
}
