//! `STATS`: per-CPU verdict and reason counters, summed over CPUs at read time.

use std::fmt::Write as _;

use aya::maps::{Map, MapData, PerCpuArray};
use lb_common::{
    Action, Counter, Reason, maps,
    stats::{action_slot, reason_slot},
};

use super::{MapError, typed};

/// Read access to the `STATS` map.
pub struct StatsMap {
    map: PerCpuArray<MapData, Counter>,
}

impl std::fmt::Debug for StatsMap {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StatsMap").finish_non_exhaustive()
    }
}

/// Counters summed over every CPU at one moment.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct StatsSnapshot {
    /// Indexed by `Action as usize`.
    pub actions: [Counter; Action::ALL.len()],
    /// Indexed by `Reason as usize`.
    pub reasons: [Counter; Reason::ALL.len()],
}

impl StatsMap {
    pub(crate) fn new(map: Map) -> Result<Self, MapError> {
        Ok(Self { map: typed(maps::STATS, map)? })
    }

    fn slot(&self, slot: u32) -> Result<Counter, MapError> {
        let values = self
            .map
            .get(&slot, 0)
            .map_err(|source| MapError::Access { name: maps::STATS, source })?;
        Ok(values.iter().fold(Counter::default(), |sum, c| sum.plus(*c)))
    }

    /// Reads every verdict and reason counter.
    pub fn read(&self) -> Result<StatsSnapshot, MapError> {
        let mut snapshot = StatsSnapshot::default();
        for action in Action::ALL {
            snapshot.actions[action as usize] = self.slot(action_slot(action))?;
        }
        for reason in Reason::ALL {
            snapshot.reasons[reason as usize] = self.slot(reason_slot(reason))?;
        }
        Ok(snapshot)
    }
}

impl StatsSnapshot {
    #[must_use]
    pub fn action(&self, action: Action) -> Counter {
        self.actions[action as usize]
    }

    #[must_use]
    pub fn reason(&self, reason: Reason) -> Counter {
        self.reasons[reason as usize]
    }

    /// Packets seen, counted once each by verdict.
    #[must_use]
    pub fn packets(&self) -> u64 {
        self.actions.iter().map(|c| c.packets).sum()
    }

    /// Counts accumulated since `earlier` (for tests and rate displays).
    #[must_use]
    pub fn since(&self, earlier: &Self) -> Self {
        let sub = |a: Counter, b: Counter| Counter {
            packets: a.packets.wrapping_sub(b.packets),
            bytes: a.bytes.wrapping_sub(b.bytes),
        };
        let mut delta = Self::default();
        for i in 0..delta.actions.len() {
            delta.actions[i] = sub(self.actions[i], earlier.actions[i]);
        }
        for i in 0..delta.reasons.len() {
            delta.reasons[i] = sub(self.reasons[i], earlier.reasons[i]);
        }
        delta
    }

    /// One line for logs: non-zero verdicts and reasons with their packet counts.
    #[must_use]
    pub fn summary(&self) -> String {
        let mut out = format!("packets={}", self.packets());
        for action in Action::ALL {
            let c = self.action(action);
            if c.packets > 0 {
                let _ = write!(out, " {}={}", action.name(), c.packets);
            }
        }
        for reason in Reason::ALL {
            let c = self.reason(reason);
            if c.packets > 0 {
                let _ = write!(out, " {}={}", reason.name(), c.packets);
            }
        }
        out
    }
}
