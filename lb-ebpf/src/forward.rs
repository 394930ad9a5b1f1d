//! Sending a rewritten frame on: next-hop MAC addresses, then `XDP_TX` back out of the
//! interface it came in on or `XDP_REDIRECT` to another through the `TX_PORTS` device map.

use aya_ebpf::programs::XdpContext;
use lb_common::{
    Action, Reason,
    service::{MAX_BACKENDS, NEXTHOP_ON_LINK, NextHop},
};

use crate::{
    maps::{NEXTHOPS, TX_PORTS},
    parse::{EthHdr, ptr_at_mut},
    stats,
};

/// Where a backend's packets go, as the daemon resolved it.
#[inline(always)]
pub fn next_hop(backend_id: u32) -> Result<&'static NextHop, Reason> {
    // verifier: ids are checked against the array size before every lookup.
    if backend_id >= MAX_BACKENDS {
        return Err(Reason::NoNextHop);
    }
    // SAFETY: a map value pointer from a successful array lookup, valid for this program run.
    let hop = NEXTHOPS.get_ptr(backend_id).map(|h| unsafe { &*h }).ok_or(Reason::NoNextHop)?;
    if hop.ifindex == 0 {
        return Err(Reason::NoNextHop);
    }
    Ok(hop)
}

/// Sets the frame's MAC addresses and sends it out of `ifindex`.
#[inline(always)]
pub fn transmit(
    ctx: &XdpContext,
    ifindex: u32,
    dmac: &[u8; 6],
    smac: &[u8; 6],
) -> Result<Action, Reason> {
    let eth: *mut EthHdr = ptr_at_mut(ctx, 0)?;
    // SAFETY: checked by ptr_at_mut.
    unsafe {
        crate::mem::copy_mac(&raw mut (*eth).dst, dmac);
        crate::mem::copy_mac(&raw mut (*eth).src, smac);
    }
    if ifindex == ctx.ingress_ifindex() as u32 {
        return Ok(Action::Tx);
    }
    match TX_PORTS.redirect(ifindex, 0) {
        Ok(_) => Ok(Action::Redirect),
        Err(_) => Err(Reason::TxPortMissing),
    }
}

/// Sends a packet of a DSR flow to its backend on the same link: the backend's MAC address
/// and out, then counters (a packet the transmission refuses is counted as dropped only).
#[inline(always)]
pub fn send_dsr(
    ctx: &XdpContext,
    service_id: u32,
    backend_id: u32,
    new_flow: bool,
) -> Result<Action, Reason> {
    let hop = next_hop(backend_id)?;
    if hop.flags & NEXTHOP_ON_LINK == 0 {
        return Err(Reason::DsrBackendNotOnLink);
    }
    let action = transmit(ctx, hop.ifindex, &hop.dmac, &hop.smac)?;
    stats::count_traffic(service_id, backend_id, stats::frame_len(ctx), new_flow, false);
    Ok(action)
}
