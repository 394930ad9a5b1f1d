//! Bench-only wrappers (never attached; `cargo xtask bench` runs them through
//! `BPF_PROG_TEST_RUN`).
//!
//! `BPF_PROG_TEST_RUN` with `repeat` does not restore the frame between runs, so a program
//! that rewrites it would time its own output from the second run on. These wrappers save the
//! frame's first [`BENCH_BYTES`] bytes before calling the real data path and put them back
//! after it; the same wrapper around a trivial program is the floor the figures are compared
//! with. The new-flow variant also writes a fresh source port on each run, so every run
//! opens a new flow; the reused-tuple variant instead ages the frame's own flow before each
//! run, so every run replaces an expired entry, in cache (how Katran's new-flow figure is
//! measured: the same SYN repeated); the uncached variant moves the flow cache to a new
//! epoch before each run, so an established flow's packets take the connection table.

use aya_ebpf::{helpers::bpf_jiffies64, programs::XdpContext};
use lb_common::net::{ETH_P_IP, ETH_P_IPV6};

use crate::{
    maps::{BENCH_REOPEN, BENCH_SAVE, CACHE_EPOCH, CONNTRACK, GLOBALS},
    parse::ptr_at_mut,
};

/// Bytes saved and restored: Ethernet, IPv6 and TCP headers fit, with room to spare.
pub const BENCH_BYTES: usize = 96;

/// The saved frame head and the source-port counter.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct BenchSave {
    pub bytes: [u64; BENCH_BYTES / 8],
    pub counter: u32,
    pub _pad: u32,
}

/// Runs `inner` on the frame and restores the frame's head afterwards. With `vary_port`, the
/// TCP/UDP source port of an untagged frame is set from a per-CPU counter first.
#[inline(always)]
pub fn around(ctx: &XdpContext, vary_port: bool, inner: impl FnOnce(&XdpContext) -> u32) -> u32 {
    let Some(save) = BENCH_SAVE.get_ptr_mut(0) else { return 0 };
    let Ok(head) = ptr_at_mut::<[u64; BENCH_BYTES / 8]>(ctx, 0) else { return 0 };
    // SAFETY: a per-CPU map value and a packet range checked by ptr_at_mut.
    unsafe { copy_words(head.cast(), (&raw mut (*save).bytes).cast()) };
    if vary_port {
        // SAFETY: as above.
        let save = unsafe { &mut *save };
        save.counter = save.counter.wrapping_add(1);
        let ether_type =
            u16::from_be_bytes([(save.bytes[1] >> 32) as u8, (save.bytes[1] >> 40) as u8]);
        // The source port and the last two bytes of the source address: 2^32 flows before
        // one repeats.
        let (port_at, addr_at) = match ether_type {
            ETH_P_IP => (14 + 20, 14 + 12 + 2),
            ETH_P_IPV6 => (14 + 40, 14 + 8 + 14),
            _ => (0, 0),
        };
        if port_at != 0
            && let (Ok(port), Ok(addr)) =
                (ptr_at_mut::<[u8; 2]>(ctx, port_at), ptr_at_mut::<[u8; 2]>(ctx, addr_at))
        {
            // SAFETY: checked by ptr_at_mut.
            unsafe {
                *port = (save.counter as u16).to_be_bytes();
                *addr = ((save.counter >> 16) as u16).to_be_bytes();
            }
        }
    }
    let action = inner(ctx);
    if let Ok(head) = ptr_at_mut::<[u64; BENCH_BYTES / 8]>(ctx, 0) {
        // SAFETY: as above; the frame is not resized by the data path.
        unsafe { copy_words((&raw const (*save).bytes).cast(), head.cast()) };
    }
    action
}

/// Marks the connection-table entry of the tuple in `BENCH_REOPEN` (the bench writes the
/// frame's own) as just expired (a tick past its state's timeout, as a tuple reopened soon
/// after its flow ended; the daemon's sweep would not have removed it yet), so the data
/// path's next packet on it opens the flow afresh over the dead entry. The floor wrapper
/// does the same lookups and store.
#[inline(always)]
pub fn age_reopened() {
    if let Some(key) = BENCH_REOPEN.get(0)
        && let Some(entry) = CONNTRACK.get_ptr_mut(key)
        && let Some(g) = GLOBALS.get(0)
    {
        // SAFETY: a helper without arguments; a map value pointer from a successful lookup.
        unsafe {
            let timeout = g.timeouts.for_state((*entry).state);
            (*entry).last_seen = bpf_jiffies64().saturating_sub(timeout + 1);
        }
    }
}

/// Moves the flow cache to a new epoch (as the daemon does after removing flows): no slot
/// filled before is used.
#[inline(always)]
pub fn bump_epoch() {
    if let Some(epoch) = CACHE_EPOCH.get_ptr_mut(0) {
        // SAFETY: a map value pointer from a successful array lookup (a bench-only race with
        // another CPU costs nothing but a cache hit).
        unsafe { *epoch = lb_common::flowcache::next_epoch(*epoch) };
    }
}

/// Copies the saved head word by word with volatile accesses: LLVM would otherwise merge
/// the save and the restore into a `memmove` call (a byte loop) and time that instead.
///
/// # Safety
/// Both pointers are valid for `BENCH_BYTES` bytes.
#[inline(always)]
unsafe fn copy_words(src: *const u64, dst: *mut u64) {
    for i in 0..BENCH_BYTES / 8 {
        // SAFETY: the caller's contract; x86 and the verifier allow unaligned packet access.
        unsafe { core::ptr::write_volatile(dst.add(i), core::ptr::read_volatile(src.add(i))) };
    }
}
