//! The flow cache's operations (see `lb_common::flowcache` for when a slot may be used):
//! finding a packet's live flow in its slot, filling the slot from the connection table's
//! entry after the table carried a packet, and forgetting a flow the table let go.
//!
//! Keys are handled as five 64-bit words, read straight from the packet's key (the head of
//! `Packet`) and the slot: one load and one compare per word.

use lb_common::{
    conntrack::Flow,
    flowcache::{CachedFlow, carries, same_words, slot_of_words},
    service::Globals,
};

use crate::{
    maps::{FLOW_CACHE, FLOW_EPOCH},
    parse::Packet,
};

// Both keys are read as 8-byte words: each must start 8-byte aligned.
const _: () = {
    assert!(align_of::<Packet>() >= 8 && align_of::<CachedFlow>() >= 8);
    assert!(core::mem::offset_of!(CachedFlow, key) == 0);
};

/// The packet's flow key as words.
#[inline(always)]
fn words(packet: &Packet) -> &[u64; 5] {
    // SAFETY: `Packet` starts with its flow key (see `Packet::flow_key`), 40 bytes of plain
    // integers, 8-byte aligned (asserted above).
    unsafe { &*core::ptr::from_ref(packet).cast::<[u64; 5]>() }
}

/// The slot for the key `w` (this CPU's).
#[inline(always)]
fn slot(w: &[u64; 5], g: &Globals) -> Option<*mut CachedFlow> {
    FLOW_CACHE.get_ptr_mut(slot_of_words(w, g.hash_seed))
}

/// The slot's key as words.
///
/// # Safety
/// `slot` is a valid slot pointer.
#[inline(always)]
unsafe fn slot_words<'a>(slot: *const CachedFlow) -> &'a [u64; 5] {
    // SAFETY: the caller's contract; the key is the slot's first 40 bytes, 8-byte aligned.
    unsafe { &*slot.cast::<[u64; 5]>() }
}

/// The flow cache's epoch now (zero, which no slot matches, if the map cannot be read).
#[inline(always)]
pub fn epoch() -> u32 {
    FLOW_EPOCH.get(0).copied().unwrap_or(0)
}

/// The cached forward entry of `packet`'s flow, if its slot holds it in `epoch` and the
/// table's entry would carry this packet without being rewritten.
#[inline(always)]
pub fn hit(packet: &Packet, g: &Globals, epoch: u32, now: u64) -> Option<&'static Flow> {
    let w = words(packet);
    let slot = slot(w, g)?;
    // SAFETY: a per-CPU map value pointer from a successful lookup; only this CPU's programs
    // write it, one at a time.
    let c = unsafe { &*slot };
    // SAFETY: as above.
    if epoch == 0 || c.epoch != epoch || !same_words(unsafe { slot_words(slot) }, w) {
        return None;
    }
    let (proto, flags) = (packet.proto, packet.tcp_flags);
    carries(&c.flow, proto, flags, &g.timeouts, g.refresh, now).then_some(&c.flow)
}

/// Copies the forward entry `e` of `packet`'s flow into its slot as the table left it after
/// carrying the packet, whether or not it may be used (so a slot never keeps an older state
/// of a flow the table has moved on). Word by word: copying the key or the entry whole from
/// one map value to another compiles to a `memmove` call (see `mem.rs`).
#[inline(always)]
pub fn fill(packet: &Packet, e: &Flow, g: &Globals, epoch: u32) {
    let w = words(packet);
    let Some(slot) = slot(w, g) else { return };
    // SAFETY: as in `hit`; the packet's key is per-CPU scratch memory and `e` a
    // connection-table value: neither overlaps the slot. `Flow` is 8-byte aligned in both
    // maps and a whole number of words.
    unsafe {
        copy_words(slot.cast::<u64>(), w.as_ptr(), 5);
        (*slot).epoch = epoch;
        copy_words((&raw mut (*slot).flow).cast(), core::ptr::from_ref(e).cast(), FLOW_WORDS);
    }
}

const FLOW_WORDS: usize = size_of::<Flow>() / 8;
const _: () = assert!(size_of::<Flow>().is_multiple_of(8) && align_of::<Flow>() == 8);

/// Empties the slot of `packet`'s flow if it holds that flow (which the table no longer
/// carries).
#[inline(always)]
pub fn forget(packet: &Packet, g: &Globals) {
    let w = words(packet);
    if let Some(slot) = slot(w, g) {
        // SAFETY: as in `hit`.
        unsafe {
            if same_words(slot_words(slot), w) {
                (*slot).epoch = 0;
            }
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
