//! XDP entry points of the load balancer. Only entry points live here; the work is in the
//! modules, one per concern.
#![no_std]
#![no_main]

mod maps;
mod parse;
mod stats;

use aya_ebpf::{bindings::xdp_action, macros::xdp, programs::XdpContext};
use lb_common::{Action, Reason};

/// The data path: parse, then (as features land) filter and balance. Attached to every
/// interface the daemon serves.
#[xdp]
#[allow(
    clippy::needless_pass_by_value,
    reason = "the #[xdp] macro hands over the context by value"
)]
pub fn lb_ingress(ctx: XdpContext) -> u32 {
    let action = match try_lb_ingress(&ctx) {
        Ok(action) => action,
        Err(reason) => {
            stats::count_reason(&ctx, reason);
            reason.action()
        }
    };
    stats::count_action(&ctx, action);
    action.as_u32()
}

#[inline(always)]
fn try_lb_ingress(ctx: &XdpContext) -> Result<Action, Reason> {
    let _packet = parse::parse_packet(ctx)?;
    Err(Reason::NotService)
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
