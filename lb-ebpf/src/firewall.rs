//! The firewall stage, before any balancing: a packet it drops never reaches the services or
//! the connection table. Matching is described in `lb_common::firewall`; first match wins.

use aya_ebpf::{btf_maps::lpm_trie::Key, helpers::bpf_get_prandom_u32, programs::XdpContext};
use lb_common::{
    Reason,
    firewall::{
        ACTION_DENY, ACTION_RATE_LIMIT, ACTIVE_ENABLED, ACTIVE_GENERATION, AUDIT_SLOT, Bucket,
        CLASS_ICMP, CLASS_OTHER, COUNTER_SLOTS, DEFAULT_SLOT, EVENT_AUDITED, EVENT_DROPPED,
        EVENT_PASSED, FwEvent, FwMeta, FwRule, FwV4, FwV6, GENERATION_BITS, MAX_RULES, META_AUDIT,
        META_DEFAULT_DENY, META_HAS_DST, META_NO_SRC, META_SRC_FILTER, RULE_LOG, RateKey, RuleBits,
        class_of, counter_index, filter_chunk, filter_v4_16, filter_v4_24, filter_v6_32,
        lowest_bit, ports_index,
    },
    net::{IPPROTO_ICMPV6, IPPROTO_TCP},
};

use crate::{
    maps::{
        FW_ACTIVE, FW_COUNTERS, FW_DST_V4, FW_DST_V6, FW_EVENTS, FW_LOG_BUDGET, FW_META, FW_PORTS,
        FW_RATE, FW_RULES, FW_SRC_FILTER, FW_SRC_V4, FW_SRC_V6, Scratch,
    },
    outcome::Outcome,
    parse::{Family, Fragment, Packet},
    stats,
};

/// Filters one parsed packet: `Ok` lets it go on, an error drops it for its reason. The
/// check that the firewall is on stays inline: with it off, a packet pays one array read,
/// not a call (calls and returns are dear where the kernel hardens returns).
#[inline(always)]
pub fn filter(ctx: &XdpContext, scratch: &mut Scratch, now: u64) -> Result<(), Reason> {
    match FW_ACTIVE.get(0) {
        Some(active) if *active & ACTIVE_ENABLED != 0 => {
            let Scratch { packet, fw_key, .. } = scratch;
            filter_rules(ctx, packet, fw_key, now).into_status()
        }
        _ => Ok(()),
    }
}

/// Whether `packet` is IPv6's link control (see `lb_common::firewall::is_link_control`).
#[inline(always)]
fn is_link_control(ctx: &XdpContext, packet: &Packet) -> bool {
    if packet.family != Family::V6 || packet.proto != IPPROTO_ICMPV6 || !packet.has_l4 {
        return false;
    }
    let Ok(ip) = crate::parse::ptr_at::<crate::parse::Ipv6Hdr>(ctx, packet.l3_off) else {
        return false;
    };
    // SAFETY: checked by ptr_at.
    let hop_limit = unsafe { (*ip).hop_limit };
    lb_common::firewall::is_link_control(packet.icmp_type, hop_limit, &packet.src)
}

/// Out of line: inlined, its locals would grow the entry function's frame, which every call
/// chain carries, past the 512-byte stack.
#[inline(never)]
fn filter_rules(ctx: &XdpContext, packet: &Packet, key: &mut [u8; 28], now: u64) -> Outcome {
    let ctx = &crate::parse::reload(ctx);
    match try_filter(ctx, packet, key, now) {
        Ok(()) => Outcome::DONE,
        Err(reason) => Outcome::err(reason),
    }
}

#[inline(always)]
fn try_filter(
    ctx: &XdpContext,
    packet: &Packet,
    key: &mut [u8; 28],
    now: u64,
) -> Result<(), Reason> {
    let Some(active) = FW_ACTIVE.get(0) else { return Ok(()) };
    let active = *active;
    if active & ACTIVE_ENABLED == 0 {
        return Ok(());
    }
    let generation = active & ACTIVE_GENERATION;
    let Some(meta) = FW_META.get(generation) else { return Ok(()) };
    let bytes = stats::frame_len(ctx);
    // No ports or flags to match: a rule by port would miss what the host may still accept
    // (a first fragment cut inside its TCP header reassembles into a full one).
    if packet.l4_error != 0 {
        return refuse(generation, meta.flags, Reason::FirewallUnreadable, bytes);
    }
    // Rules by port or protocol alone (no source prefixes anywhere), or a source no prefix
    // covers by the prefilter: no trie lookup, the dearest step here (30 to 150 ns with
    // the trie's depth at the address).
    let src = if meta.flags & META_NO_SRC != 0 || !may_have_source(packet, generation, meta.flags) {
        meta.any_src
    } else {
        trie_bits(packet, key, generation, true).unwrap_or(meta.any_src)
    };
    let mut candidates = src;
    if candidates != 0 && meta.flags & META_HAS_DST != 0 {
        candidates &= trie_bits(packet, key, generation, false).unwrap_or(meta.any_dst);
    }
    if candidates != 0 {
        let index = ports_index(generation, class_of(packet.proto), port_of(packet));
        candidates &= FW_PORTS.get(index).copied().unwrap_or(0);
    }
    if candidates & meta.flag_rules != 0 {
        candidates = first_with_flags(packet, generation, candidates);
    }
    if candidates == 0 {
        if meta.flags & META_DEFAULT_DENY == 0 {
            count(generation, DEFAULT_SLOT, bytes);
            return Ok(());
        }
        // Link control passes a deny default uncounted, as ARP does: the default's counter
        // says how often the policy applied.
        if is_link_control(ctx, packet) {
            return Ok(());
        }
        count(generation, DEFAULT_SLOT, bytes);
        return refuse(generation, meta.flags, Reason::FirewallDefaultDeny, bytes);
    }
    let index = lowest_bit(candidates);
    count(generation, index, bytes);
    let Some(rule) = rule_at(generation, index) else { return Ok(()) };
    // Why the rule would drop the packet, if it would: kept apart from what `refuse` makes
    // of it, for audit mode lets a refused packet through as it lets an admitted one.
    let refused = match rule.action {
        ACTION_DENY => Some(Reason::FirewallDeny),
        ACTION_RATE_LIMIT
            if !is_link_control(ctx, packet) && admit(packet, index, rule, now) == 0 =>
        {
            Some(Reason::RateLimited)
        }
        _ => None,
    };
    let result = match refused {
        Some(reason) => refuse(generation, meta.flags, reason, bytes),
        None => Ok(()),
    };
    if rule.flags & RULE_LOG != 0 {
        let outcome = match (refused, &result) {
            // Allowed, admitted by its bucket, or link control a rate limit lets through.
            (None, _) => EVENT_PASSED,
            (Some(_), Err(_)) => EVENT_DROPPED,
            (Some(_), Ok(())) => EVENT_AUDITED,
        };
        let what = Logged { index, generation, outcome, bytes, now };
        log_sampled(packet, rule, meta, &what);
    }
    result
}

/// What a logged event says besides the packet's headers.
struct Logged {
    index: u32,
    generation: u32,
    outcome: u8,
    bytes: u64,
    now: u64,
}

/// Logs one matching packet in `rule.log_one_in`, within the CPU's event budget. Out of
/// line: rare, and its event would crowd the main path's stack.
#[inline(never)]
fn log_sampled(packet: &Packet, rule: &FwRule, meta: &FwMeta, what: &Logged) {
    // SAFETY: a helper without pointer arguments.
    let draw = unsafe { bpf_get_prandom_u32() };
    if rule.log_one_in > 1 && draw % rule.log_one_in != 0 {
        return;
    }
    let Some(budget) = FW_LOG_BUDGET.get_ptr_mut(0) else { return };
    let limit = FwRule {
        micro_tokens_per_tick: meta.log_micro_tokens_per_tick,
        burst_micro_tokens: meta.log_burst_micro_tokens,
        ..FwRule::default()
    };
    // SAFETY: per-CPU value.
    if !unsafe { (*budget).take(&limit, what.now) } {
        return;
    }
    let event = FwEvent {
        src: packet.src,
        dst: packet.dst,
        sport: packet.sport,
        dport: packet.dport,
        len: what.bytes.min(u64::from(u16::MAX)) as u16,
        rule: what.index as u8,
        outcome: what.outcome,
        family: packet.family as u8,
        proto: packet.proto,
        tcp_flags: packet.tcp_flags,
        generation: what.generation as u8,
    };
    let _ = FW_EVENTS.output(&event, 0);
}

/// Drops for `reason`, or in audit mode counts the would-be drop and lets the packet go.
#[inline(always)]
fn refuse(generation: u32, flags: u32, reason: Reason, bytes: u64) -> Result<(), Reason> {
    if flags & META_AUDIT != 0 {
        count(generation, AUDIT_SLOT, bytes);
        Ok(())
    } else {
        Err(reason)
    }
}

#[inline(always)]
fn rule_at(generation: u32, index: u32) -> Option<&'static FwRule> {
    if index >= MAX_RULES as u32 {
        return None;
    }
    FW_RULES.get((generation & 1) * MAX_RULES as u32 + index)
}

/// The candidates from the first whose TCP-flag condition holds (0 if none does).
#[inline(always)]
fn first_with_flags(packet: &Packet, generation: u32, mut candidates: RuleBits) -> RuleBits {
    for _ in 0..MAX_RULES {
        if candidates == 0 {
            break;
        }
        let Some(rule) = rule_at(generation, lowest_bit(candidates)) else { return 0 };
        let holds = rule.tcp_flags_mask == 0
            || (packet.proto == IPPROTO_TCP
                && packet.has_l4
                && packet.tcp_flags & rule.tcp_flags_mask == rule.tcp_flags_value);
        if holds {
            return candidates;
        }
        candidates &= candidates - 1;
    }
    candidates
}

/// The destination port (host order) that indexes the ports array: the port for TCP and
/// UDP, the message type for ICMP, 0 otherwise and for fragments without an L4 header.
#[inline(always)]
fn port_of(packet: &Packet) -> u16 {
    if !packet.has_l4 || matches!(packet.fragment, Fragment::Later) {
        return 0;
    }
    match class_of(packet.proto) {
        CLASS_ICMP => u16::from(packet.icmp_type),
        CLASS_OTHER => 0,
        _ => u16::from_be(packet.dport),
    }
}

/// Whether a source prefix of the generation may cover the packet's source: false when its
/// prefilter is written and a bit of the address there is clear (IPv4: the /16's, then the
/// /24's; IPv6: the /32's), each an inlined array lookup.
#[inline(always)]
fn may_have_source(packet: &Packet, generation: u32, flags: u32) -> bool {
    if flags & META_SRC_FILTER == 0 {
        return true;
    }
    let top = u32::from_be(packet.src[0]);
    match packet.family {
        Family::V4 => {
            filter_has(generation, filter_v4_16(top)) && filter_has(generation, filter_v4_24(top))
        }
        Family::V6 => filter_has(generation, filter_v6_32(top)),
    }
}

/// Whether prefilter bit `bit` of a generation is set (or cannot be read).
#[inline(always)]
fn filter_has(generation: u32, bit: u32) -> bool {
    FW_SRC_FILTER
        .get(filter_chunk(generation, bit))
        .is_none_or(|c| c.words[((bit >> 6) & 63) as usize] & (1u64 << (bit & 63)) != 0)
}

/// The rule bits of the packet's source (`source`) or destination in its family's trie,
/// with the key built in scratch memory as 4-byte words (prefix length, generation, the
/// address's raw words): byte by byte, LLVM stores each byte with its own shift.
#[inline(always)]
fn trie_bits(
    packet: &Packet,
    key: &mut [u8; 28],
    generation: u32,
    source: bool,
) -> Option<RuleBits> {
    let addr = if source { &packet.src } else { &packet.dst };
    let head = key.as_mut_ptr();
    // Straight-line stores per family (a loop over 1 or 4 words became a `memcpy` call).
    // SAFETY: per-CPU scratch (map memory, where the verifier allows unaligned access), 28
    // bytes: words 0 to 6 at most.
    let put = |offset: usize, word: u32| unsafe {
        head.add(offset).cast::<u32>().write_unaligned(word);
    };
    put(4, generation);
    put(8, addr[0]);
    match packet.family {
        Family::V4 => {
            put(0, GENERATION_BITS + 32);
            // SAFETY: `Key<FwV4>` is packed (alignment 1) and 12 bytes, within the buffer.
            let key = unsafe { &*key.as_ptr().cast::<Key<FwV4>>() };
            if source { FW_SRC_V4.get(key) } else { FW_DST_V4.get(key) }.copied()
        }
        Family::V6 => {
            put(0, GENERATION_BITS + 128);
            put(12, addr[1]);
            put(16, addr[2]);
            put(20, addr[3]);
            // SAFETY: `Key<FwV6>` is packed (alignment 1) and 28 bytes, the buffer's size.
            let key = unsafe { &*key.as_ptr().cast::<Key<FwV6>>() };
            if source { FW_SRC_V6.get(key) } else { FW_DST_V6.get(key) }.copied()
        }
    }
}

/// Takes a token from the bucket of `rule` for the packet's source (1: admitted): an IPv4
/// address, or an IPv6 /64 (a host holds a whole /64 and may send from any address in it:
/// a bucket per address would give it a full bucket per packet). Out of line, like logging.
#[inline(never)]
fn admit(packet: &Packet, rule_index: u32, rule: &FwRule, now: u64) -> u32 {
    let mut key = RateKey {
        addr: packet.src,
        rule: rule_index as u8,
        family: packet.family as u8,
        _pad: [0; 2],
    };
    if packet.family == Family::V6 {
        // SAFETY: valid stack references; volatile so LLVM keeps 4-byte stores (it merged
        // the key's words into a misaligned 8-byte one, which the verifier refuses).
        unsafe {
            core::ptr::write_volatile(&raw mut key.addr[2], 0);
            core::ptr::write_volatile(&raw mut key.addr[3], 0);
        }
    }
    if let Some(bucket) = FW_RATE.get_ptr_mut(&key) {
        // SAFETY: a map value pointer from a successful lookup. CPUs may race on one
        // bucket: a lost update admits or refuses one packet more, never corrupts it.
        return u32::from(unsafe { (*bucket).take(rule, now) });
    }
    let mut bucket = Bucket::full(rule, now);
    let admitted = bucket.take(rule, now);
    let _ = FW_RATE.insert(&key, &bucket, 0);
    u32::from(admitted)
}

#[inline(always)]
fn count(generation: u32, slot: u32, bytes: u64) {
    if slot >= COUNTER_SLOTS {
        return;
    }
    if let Some(c) = FW_COUNTERS.get_ptr_mut(counter_index(generation, slot)) {
        // SAFETY: per-CPU value.
        unsafe {
            (*c).packets += 1;
            (*c).bytes += bytes;
        }
    }
}
