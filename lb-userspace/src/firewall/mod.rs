//! The firewall's control side: checks a `[firewall]` section, compiles it into what the
//! data path's maps hold (`lb_common::firewall`), and installs it.
//!
//! A changed rule set is written into the inactive generation and switched in with one write
//! (then the old generation is cleared). When only prefix lists change (the same rules,
//! named alike in the same order, ports and policy), the active generation's tries are
//! updated in place, entry by entry, so a block list of a million prefixes takes only its
//! changes.

pub mod log;
pub mod prefix;

use std::{
    collections::{BTreeMap, HashSet},
    sync::Arc,
};

use lb_common::firewall::{
    ACTION_ALLOW, ACTION_DENY, ACTION_RATE_LIMIT, CLASS_ICMP, CLASS_OTHER, CLASS_TCP, CLASS_UDP,
    CLASSES, FilterChunk, FwMeta, FwRule, LOG_EVENTS_PER_SECOND, MAX_RULES, META_AUDIT,
    META_DEFAULT_DENY, META_HAS_DST, META_NO_SRC, META_SRC_FILTER, RULE_LOG, RuleBits, TOKEN,
};
use tracing::info;

use crate::{
    config::{FirewallConfig, Policy, PortSpec, RuleAction, RuleConfig, RuleProtocol},
    maps::{
        MapError,
        firewall::{Direction, FirewallMaps},
    },
};
pub use prefix::Prefix;

/// Ports per protocol class.
const PORTS: usize = 65_536;
/// The most packets per second (and burst) a rate limit may name.
const MAX_RATE: u64 = 1_000_000_000;

/// Problems of a `[firewall]` section that need no files: every one, each a sentence.
#[must_use]
pub fn check(config: &FirewallConfig) -> Vec<String> {
    let mut problems = Vec::new();
    if config.rules.len() > MAX_RULES {
        problems.push(format!(
            "firewall: {} rules; at most {MAX_RULES} are allowed (put addresses in a rule's `source` list or `source_file` rather than one rule each)",
            config.rules.len()
        ));
    }
    let mut names = HashSet::new();
    for rule in &config.rules {
        let name = &rule.name;
        let at = format!("firewall rule {name:?}");
        if name.is_empty()
            || name.len() > 64
            || !name.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
        {
            problems.push(format!("{at}: the name must be 1-64 letters, digits, '-', '_' or '.'"));
        }
        if !names.insert(name) {
            problems.push(format!("{at} is defined twice"));
        }
        for text in rule.source.iter().chain(&rule.destination) {
            if let Err(e) = Prefix::parse(text) {
                problems.push(format!("{at}: {e}"));
            }
        }
        if let Err(e) = port_ranges(&rule.ports) {
            problems.push(format!("{at}: {e}"));
        }
        if !rule.ports.is_empty() && rule.protocol == Some(RuleProtocol::Icmp) {
            problems.push(format!("{at}: ICMP has no ports; use `icmp_types`"));
        }
        if !rule.icmp_types.is_empty() && rule.protocol != Some(RuleProtocol::Icmp) {
            problems.push(format!("{at}: `icmp_types` needs `protocol = \"icmp\"`"));
        }
        if let Some(flags) = &rule.tcp_flags {
            if rule.protocol != Some(RuleProtocol::Tcp) {
                problems.push(format!("{at}: `tcp_flags` needs `protocol = \"tcp\"`"));
            }
            if let Err(e) = tcp_flags(flags) {
                problems.push(format!("{at}: {e}"));
            }
        }
        match rule.action {
            RuleAction::RateLimit => match rule.rate {
                None | Some(0) => problems.push(format!(
                    "{at}: a rate_limit rule needs `rate` (packets per second per source, above 0)"
                )),
                Some(rate) if rate > MAX_RATE || rule.burst.unwrap_or(rate) > MAX_RATE => {
                    problems.push(format!("{at}: rate and burst are at most {MAX_RATE}"));
                }
                Some(_) if rule.burst == Some(0) => {
                    problems.push(format!("{at}: burst must be at least 1"));
                }
                Some(_) => {}
            },
            _ if rule.rate.is_some() || rule.burst.is_some() => {
                problems.push(format!("{at}: `rate` and `burst` belong to rate_limit rules"));
            }
            _ => {}
        }
        if rule.log == Some(0) {
            problems.push(format!("{at}: `log` is one packet in N, N at least 1"));
        }
    }
    problems
}

/// Parses `"syn,!ack"` into (mask, value).
pub fn tcp_flags(text: &str) -> Result<(u8, u8), String> {
    let (mut mask, mut value) = (0u8, 0u8);
    for part in text.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let (clear, name) = match part.strip_prefix('!') {
            Some(n) => (true, n),
            None => (false, part),
        };
        let bit = match name.to_ascii_lowercase().as_str() {
            "fin" => 0x01,
            "syn" => 0x02,
            "rst" => 0x04,
            "psh" => 0x08,
            "ack" => 0x10,
            "urg" => 0x20,
            "ece" => 0x40,
            "cwr" => 0x80,
            other => {
                return Err(format!(
                    "unknown TCP flag {other:?} (fin, syn, rst, psh, ack, urg, ece, cwr; `!` for clear)"
                ));
            }
        };
        mask |= bit;
        if !clear {
            value |= bit;
        }
    }
    if mask == 0 {
        return Err("`tcp_flags` names no flag".to_owned());
    }
    Ok((mask, value))
}

fn port_ranges(ports: &[PortSpec]) -> Result<Vec<(u16, u16)>, String> {
    ports
        .iter()
        .map(|p| match p {
            PortSpec::Port(0) => Err("port 0 is not a port".to_owned()),
            PortSpec::Port(n) => Ok((*n, *n)),
            PortSpec::Range(text) => {
                let parse = |s: &str| s.trim().parse::<u16>().ok().filter(|n| *n > 0);
                let range = match text.split_once('-') {
                    Some((a, b)) => parse(a).zip(parse(b)),
                    None => parse(text).map(|n| (n, n)),
                };
                range.filter(|(a, b)| a <= b).ok_or_else(|| {
                    format!("{text:?} is not a port or a range such as \"8000-8080\"")
                })
            }
        })
        .collect()
}

/// A rule set as the maps hold it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Compiled {
    pub rules: Vec<FwRule>,
    pub meta: FwMeta,
    /// Rule bits by class and port (`CLASSES` × 65,536).
    pub ports: Vec<RuleBits>,
    pub sources: BTreeMap<Prefix, RuleBits>,
    pub destinations: BTreeMap<Prefix, RuleBits>,
}

impl Compiled {
    /// Whether `other` differs only in its prefixes (so it can be updated in place): the
    /// same rules with the same names at the same positions (the meta's `rule_names`), for
    /// counters are kept by position and shown by name, and the same ports and policy.
    fn same_rules(&self, other: &Self) -> bool {
        self.rules == other.rules && self.meta == other.meta && self.ports == other.ports
    }

    fn tries(&self, direction: Direction) -> &BTreeMap<Prefix, RuleBits> {
        match direction {
            Direction::Source => &self.sources,
            Direction::Destination => &self.destinations,
        }
    }

    fn empty() -> Self {
        Self {
            rules: Vec::new(),
            meta: FwMeta::default(),
            ports: vec![0; CLASSES as usize * PORTS],
            sources: BTreeMap::new(),
            destinations: BTreeMap::new(),
        }
    }
}

/// Compiles a checked `[firewall]` section, reading its prefix files. `ticks_per_second` is
/// the data path's clock rate (for rate limits).
pub fn compile(config: &FirewallConfig, ticks_per_second: u64) -> Result<Compiled, Vec<String>> {
    let problems = check(config);
    if !problems.is_empty() {
        return Err(problems);
    }
    let mut out = Compiled::empty();
    let mut errors = Vec::new();
    let mut src_entries = Vec::new();
    let mut dst_entries = Vec::new();
    let (mut any_src, mut any_dst) = (0, 0);
    for (i, rule) in config.rules.iter().enumerate() {
        let bit: RuleBits = 1 << i;
        for (list, file, entries, any) in [
            (&rule.source, &rule.source_file, &mut src_entries, &mut any_src),
            (&rule.destination, &rule.destination_file, &mut dst_entries, &mut any_dst),
        ] {
            if list.is_empty() && file.is_none() {
                *any |= bit;
                continue;
            }
            entries.extend(list.iter().filter_map(|t| Prefix::parse(t).ok()).map(|p| (p, bit)));
            if let Some(path) = file {
                match prefix::read_file(path) {
                    Ok(prefixes) => entries.extend(prefixes.into_iter().map(|p| (p, bit))),
                    Err(e) => errors.push(format!("firewall rule {:?}: {e}", rule.name)),
                }
            }
        }
        // Every rule matches some (class, port): `Firewall::read_back` counts on it.
        set_ports(&mut out.ports, rule, bit);
        out.rules.push(fw_rule(rule, ticks_per_second));
        if rule.tcp_flags.is_some() {
            out.meta.flag_rules |= bit;
        }
    }
    if !errors.is_empty() {
        return Err(errors);
    }
    out.meta.rule_names = names_digest(&config.rules);
    out.meta.any_src = any_src;
    out.meta.any_dst = any_dst;
    if !dst_entries.is_empty() {
        out.meta.flags |= META_HAS_DST;
    }
    if src_entries.is_empty() {
        out.meta.flags |= META_NO_SRC;
    }
    // Installing writes the source prefilter with the tries (`write_tries`).
    out.meta.flags |= META_SRC_FILTER;
    if config.default == Policy::Deny {
        out.meta.flags |= META_DEFAULT_DENY;
    }
    if config.audit {
        out.meta.flags |= META_AUDIT;
    }
    out.meta.log_micro_tokens_per_tick = LOG_EVENTS_PER_SECOND * TOKEN / ticks_per_second.max(1);
    out.meta.log_burst_micro_tokens = LOG_EVENTS_PER_SECOND * TOKEN;
    out.sources = prefix::propagate(&src_entries, any_src);
    out.destinations = prefix::propagate(&dst_entries, any_dst);
    // Each trie holds two generations during a change: a rule set past half of it would
    // fail halfway through installing, so it is refused here, where nothing has changed.
    let limit = (lb_common::firewall::MAX_PREFIXES / 2) as usize;
    for (direction, tries) in [("source", &out.sources), ("destination", &out.destinations)] {
        for (family, v6) in [("IPv4", false), ("IPv6", true)] {
            let n = tries.keys().filter(|p| matches!(p, Prefix::V6 { .. }) == v6).count();
            if n > limit {
                errors.push(format!("firewall: {n} {family} {direction} prefixes (after overlapping prefixes are expanded); at most {limit} fit"));
            }
        }
    }
    if !errors.is_empty() {
        return Err(errors);
    }
    Ok(out)
}

/// FNV-1a (32 bits) of the rules' names in order, each ended by a zero byte (which no name
/// holds), for `FwMeta::rule_names`. Written out because a pinned generation outlives the lbd
/// that wrote it, and std's hashers promise no stable output. Two lists of names share a
/// digest by a chance in four billion (the rule set is then updated in place).
fn names_digest(rules: &[RuleConfig]) -> u32 {
    rules
        .iter()
        .flat_map(|rule| rule.name.bytes().chain([0]))
        .fold(0x811c_9dc5, |hash, byte| (hash ^ u32::from(byte)).wrapping_mul(0x0100_0193))
}

/// Rules in use by their bits (`used`: the union of every rule's bits): up to the highest.
fn rule_count(used: RuleBits) -> usize {
    usize::try_from(RuleBits::BITS - used.leading_zeros()).unwrap_or(MAX_RULES)
}

fn fw_rule(rule: &RuleConfig, ticks_per_second: u64) -> FwRule {
    let (mask, value) = rule.tcp_flags.as_deref().and_then(|f| tcp_flags(f).ok()).unwrap_or((0, 0));
    let rate = rule.rate.unwrap_or(0);
    let per_tick = (rate * TOKEN / ticks_per_second.max(1)).max(u64::from(rate > 0));
    // Tokens come in once a kernel tick and the bucket holds `burst`: a burst below one
    // tick's worth would cap the rate at `burst` per tick (rate 100,000 with burst 100 at
    // 250 ticks a second admits 25,000), so the bucket holds at least one tick's worth.
    let burst = (rule.burst.unwrap_or(rate) * TOKEN).max(per_tick);
    FwRule {
        action: match rule.action {
            RuleAction::Allow => ACTION_ALLOW,
            RuleAction::Deny => ACTION_DENY,
            RuleAction::RateLimit => ACTION_RATE_LIMIT,
        },
        flags: if rule.log.is_some() { RULE_LOG } else { 0 },
        tcp_flags_mask: mask,
        tcp_flags_value: value,
        log_one_in: rule.log.unwrap_or(0),
        micro_tokens_per_tick: per_tick,
        burst_micro_tokens: burst,
    }
}

/// Sets `bit` on every (class, port) the rule matches: its protocol's class (TCP and UDP for
/// ports without a protocol, every class for neither), its ports or ICMP types, or all.
fn set_ports(ports: &mut [RuleBits], rule: &RuleConfig, bit: RuleBits) {
    let classes: &[u32] = match rule.protocol {
        Some(RuleProtocol::Tcp) => &[CLASS_TCP],
        Some(RuleProtocol::Udp) => &[CLASS_UDP],
        Some(RuleProtocol::Icmp) => &[CLASS_ICMP],
        None if !rule.ports.is_empty() => &[CLASS_TCP, CLASS_UDP],
        None => &[CLASS_TCP, CLASS_UDP, CLASS_ICMP, CLASS_OTHER],
    };
    let ranges: Vec<(u16, u16)> = if !rule.ports.is_empty() {
        port_ranges(&rule.ports).unwrap_or_default()
    } else if !rule.icmp_types.is_empty() {
        rule.icmp_types.iter().map(|t| (u16::from(*t), u16::from(*t))).collect()
    } else {
        vec![(0, u16::MAX)]
    };
    for class in classes {
        let base = *class as usize * PORTS;
        for (lo, hi) in &ranges {
            for port in *lo..=*hi {
                ports[base + usize::from(port)] |= bit;
            }
        }
    }
}

/// What one install did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct InstallSummary {
    /// A new rule set was switched in (else prefixes were updated in place, or nothing).
    pub switched: bool,
    pub prefixes_written: usize,
    pub prefixes_removed: usize,
}

/// What the firewall filters by at one moment (see [`Firewall::installed`]).
#[derive(Clone, Debug)]
pub enum Installed {
    Off,
    Rules(Arc<Compiled>),
    /// The active generation's contents are not known (read back only when next needed).
    Unknown,
}

/// The firewall as installed: which generation is active and what each holds.
#[derive(Debug, Default)]
pub struct Firewall {
    active: u32,
    enabled: bool,
    /// Contents of each generation (`None`: unknown, as after a restart); shared, so that
    /// what is installed can be kept to install again (see [`Firewall::installed`]).
    held: [Option<Arc<Compiled>>; 2],
    /// Rule sets switched in since lbd started (see [`Firewall::switches`]).
    switches: u64,
}

impl Firewall {
    /// Takes over the pinned maps of an earlier run: the active generation stays as it is
    /// (packets keep being filtered) and the inactive one is cleared, so it can be written.
    pub fn adopt(maps: &mut FirewallMaps) -> Result<Self, MapError> {
        let (active, enabled) = maps.active()?;
        let mut fw = Self { active, enabled, held: [None, None], switches: 0 };
        let inactive = 1 - active;
        let empty = Compiled::empty();
        let found = Self::read_back(maps, inactive)?;
        write_generation(maps, inactive, &empty, &found)?;
        fw.held[inactive as usize] = Some(Arc::new(empty));
        if enabled {
            let current = Self::read_back(maps, active)?;
            // The prefilter is rewritten from the trie as read (the tries are not changing),
            // exact again after a crash mid-update (a superset then) or a lost pin.
            let mut held = maps.src_filter(active)?;
            let wanted = prefix::src_filter(current.sources.keys());
            write_src_filter(maps, active, &mut held, &wanted, Filter::Exact)?;
            fw.held[active as usize] = Some(Arc::new(current));
        } else {
            write_generation(maps, active, &Compiled::empty(), &Self::read_back(maps, active)?)?;
            fw.held[active as usize] = Some(Arc::new(Compiled::empty()));
        }
        Ok(fw)
    }

    /// A firewall over maps known to be empty (freshly created).
    #[must_use]
    pub fn fresh() -> Self {
        let empty = Arc::new(Compiled::empty());
        Self { active: 0, enabled: false, held: [Some(empty.clone()), Some(empty)], switches: 0 }
    }

    /// What the data path filters by now, to install again should a change fail after
    /// this one's install.
    #[must_use]
    pub fn installed(&self) -> Installed {
        if !self.enabled {
            return Installed::Off;
        }
        self.held[self.active as usize].clone().map_or(Installed::Unknown, Installed::Rules)
    }

    /// How many rule sets were switched in since lbd started: the firewall log tells by it
    /// whether an event it reads may be of a rule set since replaced.
    #[must_use]
    pub const fn switches(&self) -> u64 {
        self.switches
    }

    /// The active generation, if the firewall is on.
    #[must_use]
    pub fn active_generation(&self) -> Option<u32> {
        self.enabled.then_some(self.active)
    }

    /// Source and destination prefixes in the active generation.
    #[must_use]
    pub fn prefix_counts(&self) -> (usize, usize) {
        match self.held[self.active as usize].as_ref().filter(|_| self.enabled) {
            Some(c) => (c.sources.len(), c.destinations.len()),
            None => (0, 0),
        }
    }

    /// Makes the data path filter by `compiled` (or not at all).
    pub fn install(
        &mut self,
        maps: &mut FirewallMaps,
        compiled: Option<&Compiled>,
    ) -> Result<InstallSummary, MapError> {
        let mut summary = InstallSummary::default();
        let Some(new) = compiled else {
            if self.enabled {
                maps.set_active(self.active, false)?;
                self.enabled = false;
                info!("firewall off");
                // Read by no packet once the runs that began before the switch have ended:
                // cleared then to free its memory, as a generation switched out is. The
                // firewall is off either way: a failure here is logged, and the generation
                // read back when next written.
                crate::maps::wait_for_program_runs();
                let generation = self.active;
                let held = self.held[generation as usize].take();
                let cleared = held
                    .map_or_else(|| Self::read_back(maps, generation).map(Arc::new), Ok)
                    .and_then(|old| write_generation(maps, generation, &Compiled::empty(), &old));
                match cleared {
                    Ok((w, r)) => {
                        (summary.prefixes_written, summary.prefixes_removed) = (w, r);
                        self.held[generation as usize] = Some(Arc::new(Compiled::empty()));
                    }
                    Err(error) => {
                        tracing::warn!(%error, "the firewall's rules could not be cleared");
                    }
                }
            }
            return Ok(summary);
        };
        let active = self.active as usize;
        if self.enabled
            && let Some(current) = self.held[active].as_ref().filter(|c| c.same_rules(new))
        {
            // Only prefixes changed: in place, in the active generation. A failure part-way
            // leaves some of the changes in: what the trie holds is read back (or, if that
            // fails too, read again when next needed).
            let (w, r) = match write_tries(maps, self.active, new, current) {
                Ok(counts) => counts,
                Err(error) => {
                    self.held[active] = Self::read_back(maps, self.active).ok().map(Arc::new);
                    return Err(error);
                }
            };
            (summary.prefixes_written, summary.prefixes_removed) = (w, r);
            self.held[active] = Some(Arc::new(new.clone()));
            return Ok(summary);
        }
        let target = if self.enabled { 1 - self.active } else { self.active };
        let old = match self.held[target as usize].take() {
            Some(old) => old,
            None => Arc::new(Self::read_back(maps, target)?),
        };
        maps.reset_counters(target)?;
        let (w, r) = write_generation(maps, target, new, &old)?;
        (summary.prefixes_written, summary.prefixes_removed) = (w, r);
        self.held[target as usize] = Some(Arc::new(new.clone()));
        maps.set_active(target, true)?;
        self.switches += 1;
        summary.switched = true;
        let previous = self.active;
        let was_enabled = self.enabled;
        self.active = target;
        self.enabled = true;
        // The old generation is no longer read by new packets, nor, once the runs that
        // began before the switch have ended, by any: cleared then, to free its memory (a
        // packet still filtering by it must not find it half-emptied: a rule gone, its
        // prefixes still naming it).
        if was_enabled && previous != target {
            crate::maps::wait_for_program_runs();
            let empty = Compiled::empty();
            let old = match self.held[previous as usize].take() {
                Some(old) => old,
                None => Arc::new(Self::read_back(maps, previous)?),
            };
            write_generation(maps, previous, &empty, &old)?;
            self.held[previous as usize] = Some(Arc::new(empty));
        }
        info!(
            rules = new.rules.len(),
            sources = new.sources.len(),
            destinations = new.destinations.len(),
            generation = target,
            "firewall rule set switched in"
        );
        Ok(summary)
    }

    /// What a generation holds, read back from the maps (after a restart).
    fn read_back(maps: &FirewallMaps, generation: u32) -> Result<Compiled, MapError> {
        let mut c = Compiled::empty();
        c.meta = maps.meta(generation)?;
        for i in 0..MAX_RULES {
            c.rules.push(maps.rule(generation, i)?);
        }
        for (i, bits) in c.ports.iter_mut().enumerate() {
            let index = port_index(generation, i);
            *bits = maps.port_bits(index)?;
        }
        // A plain `allow` (no flags, no log) is all zeros, as an unused slot is: the rules in
        // use are told by the ports array, where every rule has a bit (a rule set read back
        // one rule short is not the same rules, and would be switched in anew, its counters
        // reset).
        let used = c.ports.iter().fold(0, |all, bits| all | bits);
        let set = c.rules.iter().rposition(|r| *r != FwRule::default()).map_or(0, |i| i + 1);
        c.rules.truncate(rule_count(used).max(set));
        c.sources = maps.prefixes(Direction::Source, generation)?;
        c.destinations = maps.prefixes(Direction::Destination, generation)?;
        Ok(c)
    }
}

/// Index in `FW_PORTS` of entry `i` (class × 65,536 + port) of a generation.
fn port_index(generation: u32, i: usize) -> u32 {
    (generation & 1) * lb_common::firewall::PORTS_ENTRIES / 2 + u32::try_from(i).unwrap_or(0)
}

/// Writes `new` into a generation that holds `old`, entry by entry where they differ.
fn write_generation(
    maps: &mut FirewallMaps,
    generation: u32,
    new: &Compiled,
    old: &Compiled,
) -> Result<(usize, usize), MapError> {
    maps.set_meta(generation, &new.meta)?;
    for i in 0..MAX_RULES {
        let rule = new.rules.get(i).copied().unwrap_or_default();
        if old.rules.get(i).copied().unwrap_or_default() != rule {
            maps.set_rule(generation, i, &rule)?;
        }
    }
    for (i, (n, o)) in new.ports.iter().zip(&old.ports).enumerate() {
        if n != o {
            let index = port_index(generation, i);
            maps.set_port_bits(index, *n)?;
        }
    }
    write_tries(maps, generation, new, old)
}

/// Updates a generation's tries from `old` to `new`: removals of prefixes gone, writes of
/// prefixes new or changed. The source prefilter covers every prefix the trie holds at every
/// moment (the data path may be reading it): it covers both lists before the trie changes,
/// and only the new one after (also when a write fails half-way: it still covers both).
fn write_tries(
    maps: &mut FirewallMaps,
    generation: u32,
    new: &Compiled,
    old: &Compiled,
) -> Result<(usize, usize), MapError> {
    let wanted = prefix::src_filter(new.sources.keys());
    let mut held = maps.src_filter(generation)?;
    write_src_filter(maps, generation, &mut held, &wanted, Filter::WithHeld)?;
    let (mut written, mut removed) = (0, 0);
    for direction in [Direction::Source, Direction::Destination] {
        let (n, o) = (new.tries(direction), old.tries(direction));
        for (prefix, bits) in n {
            if o.get(prefix) != Some(bits) {
                maps.set_prefix(direction, generation, *prefix, *bits)?;
                written += 1;
            }
        }
        for prefix in o.keys().filter(|p| !n.contains_key(*p)) {
            maps.remove_prefix(direction, generation, *prefix)?;
            removed += 1;
        }
    }
    write_src_filter(maps, generation, &mut held, &wanted, Filter::Exact)?;
    Ok((written, removed))
}

/// What [`write_src_filter`] writes: `wanted` alone, or with the bits held too (the union
/// that covers both prefix lists while the trie moves from one to the other).
#[derive(Clone, Copy, PartialEq, Eq)]
enum Filter {
    Exact,
    WithHeld,
}

/// Brings a generation's source prefilter from what the map holds (`held`, kept up to date)
/// to `wanted` (with `held`'s bits too for [`Filter::WithHeld`]), writing the elements (64
/// words) that change.
fn write_src_filter(
    maps: &mut FirewallMaps,
    generation: u32,
    held: &mut [u64],
    wanted: &[u64],
    what: Filter,
) -> Result<(), MapError> {
    debug_assert_eq!(held.len(), wanted.len());
    for (i, (h, w)) in held.chunks_mut(64).zip(wanted.chunks(64)).enumerate() {
        let mut chunk = FilterChunk::default();
        for ((c, h), w) in chunk.words.iter_mut().zip(h.iter()).zip(w) {
            *c = if what == Filter::WithHeld { h | w } else { *w };
        }
        if chunk.words[..] != h[..] {
            maps.set_src_filter_chunk(generation, i, &chunk)?;
            h.copy_from_slice(&chunk.words);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(text: &str) -> FirewallConfig {
        #[derive(serde::Deserialize)]
        struct Wrap {
            firewall: FirewallConfig,
        }
        toml::from_str::<Wrap>(text).unwrap().firewall
    }

    #[test]
    fn compiles_rules_into_bits() {
        let c = config(
            r#"
[firewall]
default = "deny"
[[firewall.rule]]
name = "block"
action = "deny"
source = ["198.18.0.0/24", "fd00:1::/32"]
[[firewall.rule]]
name = "web"
action = "allow"
protocol = "tcp"
ports = [80, "8000-8002"]
[[firewall.rule]]
name = "syn-limit"
action = "rate_limit"
protocol = "tcp"
tcp_flags = "syn,!ack"
rate = 100
destination = ["198.18.100.0/24"]
log = 10
[[firewall.rule]]
name = "ping"
action = "allow"
protocol = "icmp"
icmp_types = [8, 128]
"#,
        );
        let out = compile(&c, 1000).unwrap();
        assert_eq!(out.meta.any_src, 0b1110);
        assert_eq!(out.meta.any_dst, 0b1011);
        assert_eq!(out.meta.flag_rules, 0b0100);
        assert_eq!(out.meta.flags, META_DEFAULT_DENY | META_HAS_DST | META_SRC_FILTER);
        // Without sources anywhere the data path skips the source lookup.
        let ports_only =
            "[firewall]\n[[firewall.rule]]\nname = \"a\"\naction = \"deny\"\nports = [23]\n";
        let by_port = compile(&config(ports_only), 250).unwrap();
        assert_eq!(by_port.meta.flags, META_NO_SRC | META_SRC_FILTER);
        assert!(by_port.sources.is_empty());
        assert_eq!(out.sources[&Prefix::parse("198.18.0.0/24").unwrap()], 0b1111);
        assert_eq!(out.destinations[&Prefix::parse("198.18.100.0/24").unwrap()], 0b1111);
        let port = |class: u32, p: usize| out.ports[class as usize * PORTS + p];
        assert_eq!(port(CLASS_TCP, 80), 0b0111);
        assert_eq!(port(CLASS_TCP, 8002), 0b0111);
        assert_eq!(port(CLASS_TCP, 8003), 0b0101);
        assert_eq!(port(CLASS_UDP, 80), 0b0001);
        assert_eq!(port(CLASS_ICMP, 8), 0b1001);
        assert_eq!(port(CLASS_ICMP, 0), 0b0001);
        assert_eq!(port(CLASS_OTHER, 0), 0b0001);
        let limit = out.rules[2];
        assert_eq!(
            (limit.action, limit.tcp_flags_mask, limit.tcp_flags_value),
            (ACTION_RATE_LIMIT, 0x12, 0x02)
        );
        assert_eq!((limit.micro_tokens_per_tick, limit.burst_micro_tokens), (100_000, 100 * TOKEN));
        assert_eq!((limit.flags, limit.log_one_in), (RULE_LOG, 10));
    }

    #[test]
    fn only_other_prefixes_for_the_same_named_rules_are_the_same_rules() {
        // Rules of one source prefix each: (name, action, prefix).
        let compiled = |rules: &[(&str, &str, &str)]| {
            let toml = rules.iter().fold("[firewall]\n".to_owned(), |toml, (name, action, src)| {
                toml + &format!(
                    "[[firewall.rule]]\nname = \"{name}\"\naction = \"{action}\"\nsource = [\"{src}\"]\n"
                )
            });
            compile(&config(&toml), 250).unwrap()
        };
        let (bl_a, bl_b) = (("bl-a", "deny", "198.18.1.0/24"), ("bl-b", "deny", "198.18.2.0/24"));
        let before = compiled(&[bl_a, bl_b]);
        assert!(before.same_rules(&compiled(&[bl_a, ("bl-b", "deny", "198.18.3.0/24")])));
        let lists_swapped = [("bl-a", "deny", bl_b.2), ("bl-b", "deny", bl_a.2)];
        assert!(before.same_rules(&compiled(&lists_swapped)), "lists swapped");
        assert!(!before.same_rules(&compiled(&[bl_b, bl_a])), "rules swapped");
        assert!(!before.same_rules(&compiled(&[("bl-c", "deny", bl_a.2), bl_b])), "a rule renamed");
        let (first, middle) = (("x", "allow", "10.0.0.0/8"), ("y", "deny", "10.1.0.0/16"));
        let last = ("z", "allow", "10.2.0.0/16");
        assert!(
            !compiled(&[first, middle, last]).same_rules(&compiled(&[last, middle, first])),
            "allows swapped"
        );
    }

    #[test]
    fn the_names_digest_is_fnv_1a_of_the_names_each_ended_by_a_zero() {
        // Pinned generations hold it: another function would switch every rule set in after
        // an upgrade.
        let c = config(
            "[firewall]\n[[firewall.rule]]\nname = \"admins\"\naction = \"allow\"\n[[firewall.rule]]\nname = \"block\"\naction = \"deny\"\n",
        );
        assert_eq!(compile(&c, 250).unwrap().meta.rule_names, 0xd146_3210);
    }

    #[test]
    fn the_rule_count_is_up_to_the_highest_bit_in_use() {
        assert_eq!(rule_count(0), 0);
        assert_eq!(rule_count(0b101), 3);
        assert_eq!(rule_count(RuleBits::MAX), MAX_RULES);
    }

    #[test]
    fn a_burst_below_a_tick_s_worth_is_raised_to_it() {
        // Rate 100,000 at 250 ticks a second: 400 a tick. A burst of 100 would cap the rate
        // at 25,000 a second; the bucket holds a tick's worth. A larger burst stays.
        let rule = |burst: u32| {
            let toml = format!(
                "[firewall]\n[[firewall.rule]]\nname = \"r\"\naction = \"rate_limit\"\nrate = 100000\nburst = {burst}\n"
            );
            compile(&config(&toml), 250).unwrap().rules[0]
        };
        let small = rule(100);
        assert_eq!(small.micro_tokens_per_tick, 400 * TOKEN);
        assert_eq!(small.burst_micro_tokens, 400 * TOKEN);
        assert_eq!(rule(5000).burst_micro_tokens, 5000 * TOKEN);
    }

    #[test]
    fn rejects_what_cannot_work() {
        let bad = |rule: &str, expected: &str| {
            let c = config(&format!("[firewall]\n[[firewall.rule]]\nname = \"r\"\n{rule}"));
            let problems = check(&c).join("\n");
            assert!(problems.contains(expected), "{rule}: {problems}");
        };
        bad("action = \"deny\"\nsource = [\"198.18.0.0/33\"]", "prefix length");
        bad("action = \"deny\"\nports = [\"90-80\"]", "not a port or a range");
        bad("action = \"deny\"\nports = [0]", "port 0");
        bad("action = \"deny\"\nprotocol = \"icmp\"\nports = [1]", "ICMP has no ports");
        bad("action = \"deny\"\nicmp_types = [8]", "needs `protocol = \"icmp\"`");
        bad("action = \"deny\"\ntcp_flags = \"syn\"", "needs `protocol = \"tcp\"`");
        bad("action = \"deny\"\nprotocol = \"tcp\"\ntcp_flags = \"syn,bogus\"", "unknown TCP flag");
        bad("action = \"rate_limit\"", "needs `rate`");
        bad("action = \"deny\"\nrate = 5", "belong to rate_limit rules");
        bad("action = \"deny\"\nlog = 0", "at least 1");
        let many = "[[firewall.rule]]\nname = \"r\"\naction = \"deny\"\n".repeat(65);
        assert!(check(&config(&format!("[firewall]\n{many}"))).join("").contains("at most 64"));
        let missing = config(
            "[firewall]\n[[firewall.rule]]\nname = \"r\"\naction = \"deny\"\nsource_file = \"/nonexistent/list\"\n",
        );
        assert!(compile(&missing, 1000).unwrap_err().join("").contains("/nonexistent/list"));
    }
}
