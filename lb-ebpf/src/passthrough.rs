//! TLS passthrough in the kernel (see `lb_common::passthrough`): steering a service's
//! connections to the daemon's listener, and relaying bytes between a client's socket and its
//! backend's once the daemon has routed the connection.

use aya_ebpf::{
    bindings::{bpf_sk_lookup, sk_action},
    programs::{SkBuffContext, SkLookupContext},
};
use lb_common::{
    net::IPPROTO_TCP,
    passthrough::{AF_INET, AF_INET6, ListenerKey, RelayKey, skb_remote_port},
};

use crate::maps::{PASSTHROUGH_LISTENERS, RELAY_BYTES, RELAY_PEERS};

/// Hands a TCP connection to a passthrough service's address and port to the daemon's
/// listening socket for it. Anything else takes the kernel's usual socket lookup.
#[inline(always)]
pub fn steer(ctx: &SkLookupContext) -> u32 {
    // SAFETY: the context the kernel passed to this program run.
    let l: &bpf_sk_lookup = unsafe { &*ctx.lookup };
    if l.protocol != u32::from(IPPROTO_TCP) {
        return sk_action::SK_PASS;
    }
    let mut key = ListenerKey { port: l.local_port as u16, ..ListenerKey::default() };
    if l.family == AF_INET {
        key.family = 4;
        key.addr[0] = l.local_ip4;
    } else if l.family == AF_INET6 {
        key.family = 6;
        key.addr = words(&l.local_ip6);
    } else {
        return sk_action::SK_PASS;
    }
    // A miss (not a passthrough service) or a failed assignment: the usual lookup decides.
    let _ = PASSTHROUGH_LISTENERS.redirect_sk_lookup(ctx, &key, 0);
    sk_action::SK_PASS
}

/// Sends what arrived on a relayed socket out of its partner (egress redirect), counting the
/// bytes against the connection they came from.
#[inline(always)]
pub fn relay(ctx: &SkBuffContext) -> u32 {
    let skb = &ctx.skb;
    let mut key = RelayKey {
        remote_port: skb_remote_port(skb.remote_port()),
        local_port: skb.local_port() as u16,
        ..RelayKey::default()
    };
    let family = skb.family();
    if family == AF_INET {
        key.family = 4;
        key.remote[0] = skb.remote_ipv4();
        key.local[0] = skb.local_ipv4();
    } else if family == AF_INET6 {
        key.family = 6;
        key.remote = words(skb.remote_ipv6());
        key.local = words(skb.local_ipv6());
    } else {
        return sk_action::SK_PASS;
    }
    if let Some(bytes) = RELAY_BYTES.get_ptr_mut(&key) {
        // SAFETY: this CPU's value of a per-CPU map entry; the daemon only reads it.
        unsafe { *bytes += u64::from(ctx.len()) };
    }
    // Redirected, or (no partner in the map: the other side has closed) kept on this socket,
    // where the daemon reads it when it sees the end and writes it on by hand. The daemon
    // puts both partners in `RELAY_PEERS` before either socket reaches this program.
    let _ = RELAY_PEERS.redirect_skb(ctx, &mut key, 0);
    sk_action::SK_PASS
}

/// Copies an IPv6 address out of a program context word by word: the verifier allows only
/// 4-byte loads there, which a plain array copy might merge.
#[inline(always)]
fn words(addr: &[u32; 4]) -> [u32; 4] {
    // SAFETY: reads of a context field the kernel laid out as four words.
    unsafe {
        [
            core::ptr::read_volatile(&raw const addr[0]),
            core::ptr::read_volatile(&raw const addr[1]),
            core::ptr::read_volatile(&raw const addr[2]),
            core::ptr::read_volatile(&raw const addr[3]),
        ]
    }
}
