//! The flow cache's operations (see `lb_common::flowcache` for when a slot may be used): a
//! packet's slot is found once ([`find`]); then either the slot carries the packet
//! ([`Slot::hit`]), or the connection table does and the slot follows what the table did:
//! filled from the entry that carried the packet ([`Slot::fill`]), emptied when the table
//! has no live entry for the packet's flow ([`Slot::forget`]).
//!
//! Keys are handled as five 64-bit words, read straight from the packet's key (the head of
//! `Packet`) and the slot: one load and one compare per word.

use lb_common::{
    conntrack::{FLOW_NAT, FLOW_REPLY, Flow},
    flowcache::{CachedFlow, carries, same_words, slot_of_words, usable},
    service::Globals,
};

use crate::{
    maps::{CACHE_EPOCH, FLOW_CACHE, NAT_PORT_GEN},
    parse::Packet,
};

// Both keys are read as 8-byte words: each must start 8-byte aligned.
const _: () = {
    assert!(align_of::<Packet>() >= 8 && align_of::<CachedFlow>() >= 8);
    assert!(core::mem::offset_of!(CachedFlow, key) == 0);
};

const FLOW_WORDS: usize = size_of::<Flow>() / 8;
const _: () = assert!(size_of::<Flow>().is_multiple_of(8) && align_of::<Flow>() == 8);

/// The packet's flow key as words.
#[inline(always)]
fn words(packet: &Packet) -> &[u64; 5] {
    // SAFETY: `Packet` starts with its flow key (see `Packet::flow_key`), 40 bytes of plain
    // integers, 8-byte aligned (asserted above).
    unsafe { &*core::ptr::from_ref(packet).cast::<[u64; 5]>() }
}

/// The caches' epoch now (zero, which no slot matches, if the map cannot be read).
#[inline(always)]
pub fn epoch() -> u32 {
    CACHE_EPOCH.get(0).copied().unwrap_or(0)
}

/// The generation of a NAT port (raw network order).
#[inline(always)]
pub fn port_gen(raw_port: u16) -> u32 {
    NAT_PORT_GEN.get(u32::from(u16::from_be(raw_port))).copied().unwrap_or(0)
}

/// Marks the NAT port `raw_port` (network order) as just taken by a flow: cached copies of
/// flows that had it are no longer used. The new generation is random rather than the old
/// one plus one: the BPF target has no atomic add here, and of two CPUs' racing
/// increments the later store could put back an older generation a slot recorded; a
/// random store leaves a generation no slot recorded (but with odds of 2^-32).
#[inline(always)]
pub fn port_taken(raw_port: u16) {
    if let Some(g) = NAT_PORT_GEN.get_ptr_mut(u32::from(u16::from_be(raw_port))) {
        // SAFETY: a helper without arguments; a map value pointer from a successful array
        // lookup.
        unsafe { *g = aya_ebpf::helpers::bpf_get_prandom_u32() };
    }
}

/// A packet's slot in this CPU's flow cache, and whether it holds the packet's flow.
pub struct Slot {
    slot: *mut CachedFlow,
    holds: bool,
}

/// Finds `packet`'s slot.
#[inline(always)]
pub fn find(packet: &Packet, g: &Globals) -> Slot {
    let w = words(packet);
    match FLOW_CACHE.get_ptr_mut(slot_of_words(w, g.hash_seed)) {
        // SAFETY: a per-CPU map value pointer from a successful lookup (only this CPU's
        // programs write it, one at a time); the key is its first 40 bytes, 8-byte aligned.
        Some(slot) => Slot { slot, holds: same_words(unsafe { &*slot.cast::<[u64; 5]>() }, w) },
        None => Slot { slot: core::ptr::null_mut(), holds: false },
    }
}

impl Slot {
    /// The cached entry of the packet's flow (forward, or a NAT flow's reply entry), if the
    /// slot holds it in `epoch`, a NAT flow's port has not been taken since, and the
    /// table's entry would carry this packet without being rewritten.
    #[inline(always)]
    pub fn hit(&self, packet: &Packet, g: &Globals, epoch: u32, now: u64) -> Option<&'static Flow> {
        if !self.holds || epoch == 0 {
            return None;
        }
        // SAFETY: `holds` is only set for a valid slot pointer (see `find`).
        let c = unsafe { &*self.slot };
        let (proto, flags) = (packet.proto, packet.tcp_flags);
        let carried = c.epoch == epoch
            && carries(&c.flow, proto, flags, &g.timeouts, g.refresh, now)
            && (c.flow.flags & FLOW_NAT == 0 || port_gen(c.flow.nat_port) == c.port_gen);
        carried.then_some(&c.flow)
    }

    /// Whether the slot holds the packet's NAT flow in `epoch` but its port has been taken
    /// since it was cached: the table path must then check the port is still the flow's
    /// (as at a refresh), not just send from it.
    #[inline(always)]
    pub fn port_moved(&self, epoch: u32) -> bool {
        if !self.holds {
            return false;
        }
        // SAFETY: `holds` is only set for a valid slot pointer (see `find`).
        let c = unsafe { &*self.slot };
        c.epoch == epoch && c.flow.flags & FLOW_NAT != 0 && port_gen(c.flow.nat_port) != c.port_gen
    }

    /// Copies the entry `e` of the packet's flow into the slot as the table left it after
    /// carrying the packet, with `port_gen`: for a NAT forward entry, its port's generation
    /// read before the table showed the port is still the flow's; for a reply entry, read
    /// before the table lookup that found it (the entry under a reply key is whichever flow
    /// holds the port to that backend, so no port check is needed: a flow that takes the
    /// port over after the read writes its entry first and moves the generation on after,
    /// so the copy is never used). An entry the slot may not carry empties the slot
    /// instead, if it held the flow (a slot never keeps an older state of a flow the table
    /// has moved on). Word by word: copying the key or the entry whole from one map value
    /// to another compiles to a `memmove` call (see `mem.rs`).
    #[inline(always)]
    pub fn fill(&self, packet: &Packet, e: &Flow, epoch: u32, port_gen: u32) {
        if self.slot.is_null() {
            return;
        }
        if !usable(e) {
            self.forget();
            return;
        }
        // SAFETY: a valid slot (see `find`); the packet's key is per-CPU scratch memory and
        // `e` a connection-table value: neither overlaps the slot. `Flow` is 8-byte aligned
        // in both maps and a whole number of words.
        unsafe {
            copy_words(self.slot.cast::<u64>(), words(packet).as_ptr(), 5);
            (*self.slot).epoch = epoch;
            (*self.slot).port_gen = port_gen;
            let flow = (&raw mut (*self.slot).flow).cast::<u64>();
            copy_words(flow, core::ptr::from_ref(e).cast(), FLOW_WORDS);
            // The copy must name the packet's key as far as an entry tells: a forward
            // entry its service address and port, a reply entry its NAT port. One that
            // does not is of an element the LRU freed and gave to another key between the
            // lookup and the copy (which moves no generation unless it takes the port),
            // and is not kept.
            let (c, key) = (&(*self.slot).flow, packet.flow_key());
            let v = &c.vip_addr;
            let names_key = if c.flags & FLOW_REPLY != 0 {
                c.nat_port == key.dport
            } else {
                c.vip_port == key.dport
                    && v[0] == key.dst[0]
                    && v[1] == key.dst[1]
                    && v[2] == key.dst[2]
                    && v[3] == key.dst[3]
            };
            if !names_key {
                (*self.slot).epoch = 0;
            }
        }
    }

    /// Follows the table's forward entry `e` of a NAT flow the table carried without a
    /// refresh (no port check): the slot is refilled from `e` only if it holds the flow in
    /// `epoch` on the same port and no flow has taken the port since the slot's last check
    /// (the port's generation is still the one recorded, read after the table's entry, so a
    /// take in between shows), and emptied otherwise. A flow whose reply packets refresh its
    /// entries first stays cached this way.
    #[inline(always)]
    pub fn follow_nat(&self, packet: &Packet, e: &Flow, epoch: u32) {
        if !self.holds {
            return;
        }
        // SAFETY: `holds` is only set for a valid slot pointer (see `find`).
        let (recorded, same) = unsafe {
            let c = &*self.slot;
            (c.port_gen, c.epoch == epoch && c.flow.nat_port == e.nat_port)
        };
        if same && port_gen(e.nat_port) == recorded {
            self.fill(packet, e, epoch, recorded);
        } else {
            self.forget();
        }
    }

    /// Empties the slot if it holds the packet's flow: the table has no live forward entry
    /// for it (evicted, expired, started over, or a reply or SYN-cookie entry on its key).
    #[inline(always)]
    pub fn forget(&self) {
        if self.holds {
            // SAFETY: `holds` is only set for a valid slot pointer (see `find`).
            unsafe { (*self.slot).epoch = 0 };
        }
    }
}

/// Copies `n` words from `src` to `dst`, one load and one store each (the stores volatile,
/// or LLVM turns the loop back into a `memmove` call).
///
/// # Safety
/// Both pointers are valid and aligned for `n` words and do not overlap.
#[inline(always)]
unsafe fn copy_words(dst: *mut u64, src: *const u64, n: usize) {
    for i in 0..n {
        // SAFETY: the caller's contract.
        unsafe { dst.add(i).write_volatile(src.add(i).read()) };
    }
}
