//! TLS passthrough in the kernel (see `lb_common::passthrough`): steering a service's
//! connections to the daemon's listener, and relaying bytes between a client's socket and its
//! backend's once the daemon has routed the connection.

use core::mem::MaybeUninit;

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
    let (family, addr) = if l.family == AF_INET {
        (4, [l.local_ip4, 0, 0, 0])
    } else if l.family == AF_INET6 {
        (6, words(&l.local_ip6))
    } else {
        return sk_action::SK_PASS;
    };
    let mut key = MaybeUninit::<ListenerKey>::uninit();
    let k = key.as_mut_ptr();
    // SAFETY: every field of a local value written once, by volatile stores.
    let key = unsafe {
        store_words(&raw mut (*k).addr, &addr);
        store(&raw mut (*k).port, l.local_port as u16);
        store(&raw mut (*k).family, family);
        store(&raw mut (*k)._pad, 0);
        key.assume_init_ref()
    };
    // A miss (not a passthrough service) or a failed assignment: the usual lookup decides.
    let _ = PASSTHROUGH_LISTENERS.redirect_sk_lookup(ctx, key, 0);
    sk_action::SK_PASS
}

/// Sends what arrived on a relayed socket out of its partner (egress redirect), counting the
/// bytes against the connection they came from.
#[inline(always)]
pub fn relay(ctx: &SkBuffContext) -> u32 {
    let skb = &ctx.skb;
    let family = skb.family();
    let (family, remote, local) = if family == AF_INET {
        (4, [skb.remote_ipv4(), 0, 0, 0], [skb.local_ipv4(), 0, 0, 0])
    } else if family == AF_INET6 {
        (6, words(skb.remote_ipv6()), words(skb.local_ipv6()))
    } else {
        return sk_action::SK_PASS;
    };
    let mut key = MaybeUninit::<RelayKey>::uninit();
    let k = key.as_mut_ptr();
    // SAFETY: every field of a local value written once, by volatile stores.
    let key = unsafe {
        store_words(&raw mut (*k).remote, &remote);
        store_words(&raw mut (*k).local, &local);
        store(&raw mut (*k).remote_port, skb_remote_port(skb.remote_port()));
        store(&raw mut (*k).local_port, skb.local_port() as u16);
        store(&raw mut (*k).family, family);
        // Byte by byte: a volatile `[u8; 3]` is one 3-byte store, split at an odd offset.
        let pad = (&raw mut (*k)._pad).cast::<u8>();
        for i in 0..3 {
            store(pad.add(i), 0);
        }
        key.assume_init_mut()
    };
    if let Some(bytes) = RELAY_BYTES.get_ptr_mut(&*key) {
        // SAFETY: this CPU's value of a per-CPU map entry; the daemon only reads it.
        unsafe { *bytes += u64::from(ctx.len()) };
    }
    // Redirected, or (no partner in the map: the other side has closed) kept on this socket,
    // where the daemon reads it when it sees the end and writes it on by hand. The daemon
    // puts both partners in `RELAY_PEERS` before either socket reaches this program.
    let _ = RELAY_PEERS.redirect_skb(ctx, key, 0);
    sk_action::SK_PASS
}

/// Stores one field of a key on the stack. Volatile, so that LLVM does not merge the stores:
/// built with misaligned access allowed (see lb-userspace's build script), it would merge
/// neighbouring fields into wider stores at misaligned stack offsets, which the verifier
/// refuses (and then the relay program does not load: relaying falls back to splice).
/// The keys are built in `MaybeUninit` so that no other (mergeable) store touches them.
///
/// # Safety
/// `dst` is a valid field of a local value.
#[inline(always)]
unsafe fn store<T>(dst: *mut T, value: T) {
    // SAFETY: the caller's contract.
    unsafe { core::ptr::write_volatile(dst, value) };
}

/// Stores an address word by word, as [`store`].
///
/// # Safety
/// As for [`store`].
#[inline(always)]
unsafe fn store_words(dst: *mut [u32; 4], words: &[u32; 4]) {
    let dst = dst.cast::<u32>();
    for (i, word) in words.iter().enumerate() {
        // SAFETY: the caller's contract; four words.
        unsafe { store(dst.add(i), *word) };
    }
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
