//! Per-CPU packet and byte counters: one verdict path, counted once.

use aya_ebpf::programs::XdpContext;
use lb_common::{
    Action, Reason,
    stats::{STATS_SLOTS, action_slot, reason_slot},
};

use crate::maps::STATS;

#[inline(always)]
fn bump(slot: u32, bytes: u64) {
    // verifier: slots come from the const fns in lb_common::stats and stay below STATS_SLOTS.
    if slot >= STATS_SLOTS {
        return;
    }
    if let Some(counter) = STATS.get_ptr_mut(slot) {
        // SAFETY: per-CPU value, no other writer on this CPU while the program runs.
        unsafe {
            (*counter).packets += 1;
            (*counter).bytes += bytes;
        }
    }
}

#[inline(always)]
fn frame_len(ctx: &XdpContext) -> u64 {
    (ctx.data_end() - ctx.data()) as u64
}

/// Counts a packet under the verdict the program returns.
#[inline(always)]
pub fn count_action(ctx: &XdpContext, action: Action) {
    bump(action_slot(action), frame_len(ctx));
}

/// Counts a packet that is passed or dropped under its reason.
#[inline(always)]
pub fn count_reason(ctx: &XdpContext, reason: Reason) {
    bump(reason_slot(reason), frame_len(ctx));
}
