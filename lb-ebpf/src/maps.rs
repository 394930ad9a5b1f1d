//! Every map of the data path. Names and capacities come from `lb_common::maps`.

use aya_ebpf::{macros::map, maps::PerCpuArray};
use lb_common::{Counter, stats::STATS_SLOTS};

/// Verdict and reason counters; layout in `lb_common::stats`. Written only here.
#[map(name = "STATS")]
pub static STATS: PerCpuArray<Counter> = PerCpuArray::with_max_entries(STATS_SLOTS, 0);
