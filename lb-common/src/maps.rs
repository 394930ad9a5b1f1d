//! Names and capacities of every BPF map, defined once for both sides.
//!
//! Userspace finds maps by these names (never by string literals of its own). A map whose
//! layout changes while it may be pinned gets a new versioned name, so a daemon never misreads
//! a map left behind by an older build.

/// Per-CPU array of [`crate::Counter`]: verdict and reason counters (see [`crate::stats`]).
pub const STATS: &str = "STATS";
