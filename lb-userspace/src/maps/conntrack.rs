//! `CONNTRACK`: read access for counting and inspecting flows, and the sweep that removes
//! expired entries, both directions of a NAT flow together. Every removal of flows that may
//! be live bumps `CACHE_EPOCH`, so no packet is sent on by a flow-cache slot of a removed
//! flow (see `lb_common::flowcache`).

use aya::maps::{HashMap, Map, MapData};
use lb_common::{
    FlowKey,
    conntrack::{FLOW_NAT, FLOW_REPLY, Flow, Timeouts},
    maps,
    service::{AddrKey, Backend},
};

use super::{CacheEpoch, MapError, typed};

pub struct ConntrackMap {
    map: HashMap<MapData, FlowKey, Flow>,
    epoch: CacheEpoch,
}

impl std::fmt::Debug for ConntrackMap {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConntrackMap").finish_non_exhaustive()
    }
}

/// What one sweep found and removed.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SweepResult {
    /// Live entries left.
    pub live: u64,
    /// Expired entries removed (each NAT flow counts its two entries).
    pub removed: u64,
    /// Live flows (forward entries) per backend id.
    pub live_by_backend: std::collections::HashMap<u32, u64>,
    /// Entries per backend id that the sweep kept, either direction: live flows, and dead
    /// ones inside the overwrite window (seconds old at most). A retired backend's id is not
    /// handed out again while one names it: not even a NAT flow's reply entry alone (its
    /// forward entry evicted, the backend still sending), whose replies would otherwise be
    /// counted as the next backend's.
    pub kept_by_backend: std::collections::HashMap<u32, u64>,
}

impl ConntrackMap {
    pub(crate) fn new(map: Map, epoch: CacheEpoch) -> Result<Self, MapError> {
        Ok(Self { map: typed(maps::CONNTRACK, map)?, epoch })
    }

    /// Bumps the caches' epoch: every slot filled before is ignored from now on.
    pub fn invalidate_cache(&mut self) -> Result<(), MapError> {
        self.epoch.bump()
    }

    /// Every entry (for tests and inspection: the whole table in memory; the sweep and the
    /// cuts [`walk`](Self::walk) it instead).
    pub fn entries(&self) -> Result<Vec<(FlowKey, Flow)>, MapError> {
        let mut out = Vec::new();
        self.walk(|key, flow| out.push((*key, *flow)))?;
        Ok(out)
    }

    /// Calls `visit` with every entry, read in batches of [`WALK_BATCH`] by
    /// `BPF_MAP_LOOKUP_BATCH`, whose cursor is a bucket of the table: one pass, whatever the
    /// data path inserts and evicts meanwhile (an entry inserted during the walk may be seen
    /// or not, as may one removed). A walk by `BPF_MAP_GET_NEXT_KEY` starts over from the
    /// first bucket whenever the key it stands on is gone, which a full table's evictions
    /// make likely under a flood: passes without end, each entry seen many times. Memory is
    /// one batch, not the table.
    pub fn walk(&self, visit: impl FnMut(&FlowKey, &Flow)) -> Result<(), MapError> {
        self.walk_in(WALK_BATCH, visit)
    }

    /// [`walk`](Self::walk) in batches of `batch` entries (tests cross many batches' edges
    /// with a small one).
    pub fn walk_in(
        &self,
        batch: usize,
        mut visit: impl FnMut(&FlowKey, &Flow),
    ) -> Result<(), MapError> {
        use std::os::fd::{AsFd as _, AsRawFd as _};

        use aya::maps::IterableMap as _;
        let fd = self.map.map().fd().as_fd().as_raw_fd();
        let mut keys = vec![FlowKey::default(); batch.max(1)];
        let mut values = vec![Flow::default(); batch.max(1)];
        let mut cursor: Option<u32> = None;
        loop {
            let mut next = 0u32;
            let (count, done) =
                lookup_batch(fd, cursor.as_ref(), &mut next, &mut keys, &mut values).map_err(
                    |e| MapError::Access {
                        name: maps::CONNTRACK,
                        source: aya::maps::MapError::SyscallError(aya::sys::SyscallError {
                            call: "bpf_map_lookup_batch",
                            io_error: e,
                        }),
                    },
                )?;
            for (key, flow) in keys.iter().zip(&values).take(count) {
                visit(key, flow);
            }
            if done {
                return Ok(());
            }
            cursor = Some(next);
        }
    }

    /// Kernel memory charged to the table (`memlock` in its fdinfo), in bytes.
    pub fn memory_bytes(&self) -> Option<u64> {
        use std::os::fd::{AsFd as _, AsRawFd as _};

        use aya::maps::IterableMap as _;
        let fd = self.map.map().fd().as_fd().as_raw_fd();
        let info = std::fs::read_to_string(format!("/proc/self/fdinfo/{fd}")).ok()?;
        info.lines().find_map(|l| l.strip_prefix("memlock:")).and_then(|v| v.trim().parse().ok())
    }

    /// Removes every entry (benchmarks start each new-flow run from an empty table).
    pub fn clear(&mut self) -> Result<usize, MapError> {
        let mut keys = Vec::new();
        self.walk(|key, _| keys.push(*key))?;
        for key in &keys {
            let _ = self.map.remove(key);
        }
        self.invalidate_cache()?;
        Ok(keys.len())
    }

    /// The table walked key by key (`BPF_MAP_GET_NEXT_KEY`), as walks were made before
    /// [`walk`](Self::walk): the benchmark's baseline for it. Stopped after `max_steps` keys
    /// or at `deadline` (under a flood it may not end): the keys it read, how many distinct,
    /// and whether it reached the end.
    pub fn walk_key_by_key_bounded(
        &self,
        max_steps: usize,
        deadline: std::time::Instant,
    ) -> (usize, usize, bool) {
        let mut seen = std::collections::HashSet::new();
        let mut steps = 0;
        for key in self.map.keys().flatten() {
            seen.insert(key);
            steps += 1;
            if steps >= max_steps || (steps % 4096 == 0 && std::time::Instant::now() >= deadline) {
                return (steps, seen.len(), false);
            }
        }
        (steps, seen.len(), true)
    }

    /// Entries in the table (a full walk; 0 if it cannot be read).
    pub fn len(&self) -> usize {
        let mut n = 0;
        let _ = self.walk(|_, _| n += 1);
        n
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn get(&self, key: &FlowKey) -> Option<Flow> {
        self.map.get(key, 0).ok()
    }

    /// Removes the entries `clock` finds sweepable (see [`FlowClock::sweepable`]). A
    /// NAT flow's two entries go together, once both are expired (either half alive carries
    /// the flow: the data path keeps them in step, each direction refreshing both). Each
    /// candidate is read again just before it goes, since the walk's snapshot ages while the
    /// data path runs: a tuple reopened meanwhile has a fresh entry, and the key a dead
    /// flow's partner had may belong to another flow by now (a NAT port taken over), which
    /// is not removed. `backend` gives a backend id's current entry, to find a forward
    /// entry's partner.
    pub fn sweep(
        &mut self,
        clock: &FlowClock,
        backend: impl Fn(u32) -> Option<Backend>,
    ) -> Result<SweepResult, MapError> {
        let expired = |flow: &Flow| clock.sweepable(flow);
        let mut result = SweepResult::default();
        let mut candidates = Vec::new();
        self.walk(|key, flow| {
            if expired(flow) {
                candidates.push(*key);
                return;
            }
            let live = clock.live(flow);
            if live {
                result.live += 1;
            }
            if live && flow.flags & FLOW_REPLY == 0 {
                *result.live_by_backend.entry(flow.backend_id).or_default() += 1;
            }
            *result.kept_by_backend.entry(flow.backend_id).or_default() += 1;
        })?;
        for key in candidates {
            // Removed right after it is read again: the gap a reopened tuple could fall
            // into is one system call wide.
            let Some(flow) = self.get(&key).filter(|f| expired(f)) else { continue };
            match self.partner(&key, &flow, &backend) {
                Some((_, partner)) if !expired(&partner) => {
                    // Kept with its live half, and counted as the live flow it is.
                    if flow.flags & FLOW_REPLY == 0 {
                        *result.live_by_backend.entry(flow.backend_id).or_default() += 1;
                    }
                    *result.kept_by_backend.entry(flow.backend_id).or_default() += 1;
                }
                Some((partner_key, _)) => result.removed += self.evict(vec![key, partner_key]),
                None => result.removed += self.evict(vec![key]),
            }
        }
        Ok(result)
    }

    /// The other entry of the NAT flow `flow` (under `key`) and its value, if there is one
    /// and it is still this flow's: its own partner key is `key`.
    fn partner(
        &self,
        key: &FlowKey,
        flow: &Flow,
        backend: &impl Fn(u32) -> Option<Backend>,
    ) -> Option<(FlowKey, Flow)> {
        let other = partner_key(key, flow, backend)?;
        let partner = self.get(&other)?;
        let back = partner_key(&other, &partner, backend)?;
        (back == *key && partner.flags & FLOW_REPLY != flow.flags & FLOW_REPLY)
            .then_some((other, partner))
    }
}

/// The data path's clock and its timeouts (`GLOBALS`) as the daemon read them, to judge
/// entries as the data path does (see `Datapath::flow_clock`). A packet's clock may have
/// been read a little before or after `now`: the daemon's removals allow a refresh interval
/// either way, as the data path may write a flow that reopens the tuple over a dead entry
/// in place until it has been expired for the overwrite window
/// (`lb_common::conntrack::OVERWRITE_WINDOW_REFRESHES`), and a removal in the same instant
/// would turn that write into one to a freed element.
#[derive(Clone, Copy, Debug)]
pub struct FlowClock {
    pub timeouts: Timeouts,
    /// Ticks between refreshes of a live flow's `last_seen`.
    pub refresh: u64,
    pub now: u64,
    /// The clock's ticks per second, and when (host time) `now` was read.
    pub hz: u64,
    pub read_at: std::time::Instant,
}

impl FlowClock {
    /// The clock as it is now: `now` moved on by the host time elapsed since it was read.
    #[must_use]
    pub fn advanced(&self) -> Self {
        let elapsed = self.read_at.elapsed();
        let ticks = elapsed.as_nanos().saturating_mul(u128::from(self.hz)) / 1_000_000_000;
        Self {
            now: self.now.saturating_add(u64::try_from(ticks).unwrap_or(u64::MAX)),
            read_at: self.read_at + elapsed,
            ..*self
        }
    }

    /// Whether `flow` is live (not expired) now.
    #[must_use]
    pub const fn live(&self, flow: &Flow) -> bool {
        !self.timeouts.is_expired(flow.state, flow.last_seen, self.now)
    }

    /// Whether the sweep removes `flow`: expired for longer than the overwrite window,
    /// judged a refresh interval early.
    #[must_use]
    pub const fn sweepable(&self, flow: &Flow) -> bool {
        let judged = self.now.saturating_sub(self.refresh);
        self.timeouts.is_long_expired(flow.state, flow.last_seen, judged, self.refresh)
    }

    /// Whether a cut of flows (a removed service, a drain deadline) leaves `flow` to the
    /// sweep: dead, judged a refresh interval late.
    #[must_use]
    pub const fn spared_by_cuts(&self, flow: &Flow) -> bool {
        let judged = self.now.saturating_add(self.refresh);
        self.timeouts.is_expired(flow.state, flow.last_seen, judged)
    }
}

impl ConntrackMap {
    /// Removes every live flow of the backend ids in `ids` (a NAT flow's two entries
    /// together), so their next packets are balanced afresh; dead entries stay for the sweep
    /// (with a `clock`; without one, everything goes). Returns how many entries went.
    pub fn remove_flows_of(
        &mut self,
        ids: &std::collections::HashSet<u32>,
        backend: impl Fn(u32) -> Option<Backend>,
        clock: Option<&FlowClock>,
    ) -> Result<u64, MapError> {
        let mut found = Vec::new();
        self.walk(|key, flow| {
            if ids.contains(&flow.backend_id) {
                found.push((*key, *flow));
            }
        })?;
        let spared = |flow: &Flow| clock.is_some_and(|c| c.spared_by_cuts(flow));
        let mut doomed = Vec::new();
        for (key, flow) in found.into_iter().filter(|(_, f)| !spared(f)) {
            doomed.push(key);
            if let Some((partner, p)) = self.partner(&key, &flow, &backend)
                && !spared(&p)
            {
                doomed.push(partner);
            }
        }
        self.cut(doomed, clock, |_, flow| ids.contains(&flow.backend_id))
    }

    /// Removes every entry (forward and reply) of the service ids in `ids` but dead ones
    /// (left for the sweep, with a `clock`): a removed service's flows stop at once instead
    /// of running on until they idle out. Returns how many entries went.
    pub fn remove_flows_of_services(
        &mut self,
        ids: &[u32],
        clock: Option<&FlowClock>,
    ) -> Result<u64, MapError> {
        if ids.is_empty() {
            return Ok(0);
        }
        self.cut_where(clock, |_, flow| ids.contains(&flow.service_id))
    }

    /// Removes the flows that can no longer go on because an address they use stopped
    /// being the data path's: a service address no longer in `vips` (the address filter
    /// hands its packets to the host before the connection lookup), or a NAT source no
    /// longer in `nat_sources` (the backend's replies reach the host, which resets them).
    /// Their clients would otherwise hang until the flow idled out, instead of hearing a
    /// reset at their next segment (a fresh flow's, to the backend, or the host's); the
    /// entries would count as live flows of their backends meanwhile. Flows of a service
    /// that changed otherwise (its port, its mode) go on by their entries. Dead ones are
    /// left to the sweep, with a `clock`. Returns how many entries went.
    pub fn remove_orphans(
        &mut self,
        vips: &std::collections::HashSet<AddrKey>,
        nat_sources: &std::collections::HashSet<AddrKey>,
        clock: Option<&FlowClock>,
    ) -> Result<u64, MapError> {
        let orphan = |key: &FlowKey, flow: &Flow| {
            let family = u32::from(key.family);
            !vips.contains(&AddrKey { addr: flow.vip_addr, family })
                || flow
                    .nat_source(key)
                    .is_some_and(|addr| !nat_sources.contains(&AddrKey { addr, family }))
        };
        self.cut_where(clock, orphan)
    }

    /// Removes every entry that is `ours` but dead ones (left for the sweep, with a
    /// `clock`): a walk, then [`cut`](Self::cut).
    fn cut_where(
        &mut self,
        clock: Option<&FlowClock>,
        ours: impl Fn(&FlowKey, &Flow) -> bool,
    ) -> Result<u64, MapError> {
        let mut doomed = Vec::new();
        self.walk(|key, flow| {
            if ours(key, flow) && !clock.is_some_and(|c| c.spared_by_cuts(flow)) {
                doomed.push(*key);
            }
        })?;
        self.cut(doomed, clock, ours)
    }

    /// Removes the entries under `keys` a cut found, each read again just before it goes
    /// and removed only if it still is what the cut is after (`ours`: a tuple reopened to
    /// another backend since the walk is not) and, with a `clock`, still not dead by the
    /// data path's clock as it is now: the walk of a large table takes a while, in which an
    /// entry may have died and so become one the data path may write over in place (see
    /// [`FlowClock::spared_by_cuts`]). Then the flow cache's copies. Returns how many went.
    fn cut(
        &mut self,
        mut keys: Vec<FlowKey>,
        clock: Option<&FlowClock>,
        ours: impl Fn(&FlowKey, &Flow) -> bool,
    ) -> Result<u64, MapError> {
        keys.sort_unstable_by_key(|k| (k.src, k.dst, k.sport, k.dport, k.proto));
        keys.dedup();
        let mut removed = 0;
        for key in keys {
            let now = clock.map(FlowClock::advanced);
            let Some(flow) = self.get(&key) else { continue };
            if ours(&key, &flow)
                && !now.is_some_and(|c| c.spared_by_cuts(&flow))
                && self.map.remove(&key).is_ok()
            {
                removed += 1;
            }
        }
        self.invalidate_cache()?;
        Ok(removed)
    }

    /// Removes `keys` (duplicates allowed) and nothing else, not a NAT flow's other entry;
    /// then the flow cache's copies of them (see [`Self::evict`] for a removal that leaves
    /// them). Returns how many were there.
    pub fn remove_all(&mut self, keys: Vec<FlowKey>) -> Result<u64, MapError> {
        let removed = self.evict(keys);
        self.invalidate_cache()?;
        Ok(removed)
    }

    /// Removes `keys` (duplicates allowed) as the LRU's eviction does: not a NAT flow's
    /// other entry, and not the flow cache's copies, which carry a live flow's packets on
    /// for up to a refresh interval. The sweep removes with it (a slot is never used for an
    /// entry that long expired, see `lb_common::flowcache`); the fixtures play eviction with
    /// it. Returns how many were there.
    pub fn evict(&mut self, mut keys: Vec<FlowKey>) -> u64 {
        keys.sort_unstable_by_key(|k| (k.src, k.dst, k.sport, k.dport, k.proto));
        keys.dedup();
        let mut removed = 0;
        for key in keys {
            if self.map.remove(&key).is_ok() {
                removed += 1;
            }
        }
        removed
    }
}

/// Entries per `BPF_MAP_LOOKUP_BATCH` of a walk: 4,096 keys and values, 480 KiB. A batch
/// holds whole buckets; one longer than this (impossible at the table's load) fails the
/// walk with `ENOSPC`.
const WALK_BATCH: usize = 4096;

/// `BPF_MAP_LOOKUP_BATCH` (aya has no call for it): fills `keys` and `values` from the
/// bucket after `cursor` on (the first, without one), writes the cursor to go on from to
/// `next`, and returns how many entries it filled and whether the walk is over.
fn lookup_batch(
    fd: std::os::fd::RawFd,
    cursor: Option<&u32>,
    next: &mut u32,
    keys: &mut [FlowKey],
    values: &mut [Flow],
) -> std::io::Result<(usize, bool)> {
    const BPF_MAP_LOOKUP_BATCH: libc::c_long = 24;
    /// `union bpf_attr`'s `batch` member.
    #[repr(C)]
    struct BatchAttr {
        in_batch: u64,
        out_batch: u64,
        keys: u64,
        values: u64,
        count: u32,
        map_fd: u32,
        elem_flags: u64,
        flags: u64,
    }
    let mut attr = BatchAttr {
        in_batch: cursor.map_or(0, |c| std::ptr::from_ref(c) as u64),
        out_batch: std::ptr::from_mut(next) as u64,
        keys: keys.as_mut_ptr() as u64,
        values: values.as_mut_ptr() as u64,
        count: u32::try_from(keys.len().min(values.len())).unwrap_or(u32::MAX),
        map_fd: u32::try_from(fd).unwrap_or(u32::MAX),
        elem_flags: 0,
        flags: 0,
    };
    // SAFETY: `attr` points at live buffers of `count` keys and values of the map's sizes
    // (`ConntrackMap::new` checked them) and at two 4-byte cursors (a hash map's batch
    // cursor is a bucket index); the kernel writes only within them and to `attr.count`.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_MAP_LOOKUP_BATCH,
            &raw mut attr,
            std::mem::size_of::<BatchAttr>(),
        )
    };
    let count = usize::try_from(attr.count).unwrap_or(0);
    if ret == 0 {
        return Ok((count, false));
    }
    let error = std::io::Error::last_os_error();
    if error.raw_os_error() == Some(libc::ENOENT) {
        // The last batch (possibly empty).
        return Ok((count, true));
    }
    Err(error)
}

/// The key of the other direction of a NAT flow, if `flow` is one.
fn partner_key(
    key: &FlowKey,
    flow: &Flow,
    backend: &impl Fn(u32) -> Option<Backend>,
) -> Option<FlowKey> {
    if flow.flags & FLOW_NAT == 0 {
        return None;
    }
    if flow.flags & FLOW_REPLY != 0 {
        // Reply entry: the forward key is client -> VIP.
        return Some(flow.forward_key(key.proto, key.family));
    }
    // Forward entry: the reply key is backend -> NAT source.
    Some(flow.reply_key(&backend(flow.backend_id)?, key.proto, key.family))
}

#[cfg(test)]
mod tests {
    use lb_common::conntrack::{Flow, REFRESH_SECS, TimeoutSecs, Timeouts};

    use super::FlowClock;

    #[test]
    fn entries_written_through_the_lookups_pointer_are_neither_swept_nor_cut() {
        // The data path holds a dead entry's pointer through a new flow's backend choice
        // only inside the overwrite window; a removal by the daemon in that time would turn
        // the write into one to a freed element, perhaps another key's. The daemon's clock
        // is read up to a refresh interval before or after the packet's.
        let hz = 100;
        let timeouts = Timeouts::from_secs(&TimeoutSecs::default(), hz);
        let refresh = REFRESH_SECS * hz;
        let last_seen = 1_000_000;
        let mut held = 0;
        for state in 1..=5u8 {
            let timeout = timeouts.for_state(state);
            for age in (timeout.saturating_sub(2)..=timeout + 3 * refresh).step_by(7) {
                let packet_now = last_seen + age;
                if !timeouts.in_overwrite_window(state, last_seen, packet_now, refresh) {
                    continue;
                }
                held += 1;
                let flow = Flow { state, last_seen, ..Flow::default() };
                for now in [packet_now - refresh, packet_now, packet_now + refresh] {
                    let read_at = std::time::Instant::now();
                    let clock = FlowClock { timeouts, refresh, now, hz, read_at };
                    assert!(!clock.sweepable(&flow), "state {state}, age {age}, daemon at {now}");
                    assert!(clock.spared_by_cuts(&flow), "state {state}, age {age}, at {now}");
                }
            }
        }
        assert!(held > 100, "the window was exercised ({held} ages)");
    }
}
