//! Layout of the `STATS` per-CPU counter array.
//!
//! Slots `0..ACTION_SLOTS` count packets by XDP verdict; slots
//! `ACTION_SLOTS..ACTION_SLOTS + REASON_SLOTS` count them by [`Reason`]. Both ranges leave room
//! to grow, so adding a reason does not change the map's size (and a pinned map stays valid).

use crate::{Action, Reason};

/// Packet and byte counts. Each CPU has its own copy; userspace sums them.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counter {
    pub packets: u64,
    /// Bytes of the frame as received (Ethernet header included, FCS excluded).
    pub bytes: u64,
}
const _: () = assert!(core::mem::size_of::<Counter>() == 16);
#[cfg(feature = "user")]
// SAFETY: plain old data, two u64 without padding.
unsafe impl aya::Pod for Counter {}

impl Counter {
    /// Adds another CPU's (or another slot's) counts.
    #[must_use]
    pub const fn plus(self, other: Self) -> Self {
        Self {
            packets: self.packets.wrapping_add(other.packets),
            bytes: self.bytes.wrapping_add(other.bytes),
        }
    }
}

/// Verdict slots: the kernel defines five verdicts; eight leaves room without resizing.
pub const ACTION_SLOTS: u32 = 8;
/// Reason slots: far more than the reasons defined today, so new ones fit a pinned map.
pub const REASON_SLOTS: u32 = 120;
/// Entries of the `STATS` map.
pub const STATS_SLOTS: u32 = ACTION_SLOTS + REASON_SLOTS;

/// The `STATS` slot counting `action`.
#[inline(always)]
#[must_use]
pub const fn action_slot(action: Action) -> u32 {
    action as u32
}

/// The `STATS` slot counting `reason`.
#[inline(always)]
#[must_use]
pub const fn reason_slot(reason: Reason) -> u32 {
    ACTION_SLOTS + reason as u32
}

#[cfg(test)]
#[allow(
    clippy::cast_possible_truncation,
    clippy::cast_precision_loss,
    reason = "test arithmetic on small, known values"
)]
mod tests {
    use super::*;

    #[test]
    fn slots_do_not_overlap() {
        let mut seen = std::collections::BTreeSet::new();
        for action in Action::ALL {
            assert!(action_slot(action) < ACTION_SLOTS);
            assert!(seen.insert(action_slot(action)), "{action:?} shares a slot");
        }
        for reason in Reason::ALL {
            let slot = reason_slot(reason);
            assert!((ACTION_SLOTS..STATS_SLOTS).contains(&slot));
            assert!(seen.insert(slot), "{reason:?} shares a slot");
        }
    }
}
