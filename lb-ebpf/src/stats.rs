//! Per-CPU packet and byte counters: one verdict path, counted once; and traffic per service
//! and per backend.

use aya_ebpf::programs::XdpContext;
use lb_common::{
    Action, Reason,
    service::{MAX_BACKENDS, MAX_SERVICES},
    stats::{STATS_SLOTS, action_slot, reason_slot},
};

use crate::maps::{BACKEND_STATS, SERVICE_STATS, STATS};

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
pub fn frame_len(ctx: &XdpContext) -> u64 {
    (ctx.data_end() - ctx.data()) as u64
}

/// Counts a packet of `len` bytes (as received) under the verdict the program returns.
#[inline(always)]
pub fn count_action(action: Action, len: u64) {
    bump(action_slot(action), len);
}

/// Counts a packet that is passed or dropped under its reason.
#[inline(always)]
pub fn count_reason(reason: Reason, len: u64) {
    bump(reason_slot(reason), len);
}

/// Counts a packet forwarded to a backend (or, with `reply`, translated back to a client).
#[inline(always)]
pub fn count_traffic(service_id: u32, backend_id: u32, bytes: u64, new_flow: bool, reply: bool) {
    // verifier: ids come from maps the daemon fills; the arrays are this large.
    if service_id < MAX_SERVICES
        && let Some(c) = SERVICE_STATS.get_ptr_mut(service_id)
    {
        // SAFETY: per-CPU value.
        unsafe { add(c, bytes, new_flow, reply) };
    }
    if backend_id < MAX_BACKENDS
        && let Some(c) = BACKEND_STATS.get_ptr_mut(backend_id)
    {
        // SAFETY: per-CPU value.
        unsafe { add(c, bytes, new_flow, reply) };
    }
}

#[inline(always)]
unsafe fn add(c: *mut lb_common::service::TrafficCounter, bytes: u64, new_flow: bool, reply: bool) {
    // SAFETY: the caller passes a valid per-CPU map value.
    unsafe {
        if reply {
            (*c).reply_packets += 1;
        } else {
            (*c).packets += 1;
            (*c).bytes += bytes;
            if new_flow {
                (*c).new_flows += 1;
            }
        }
    }
}
