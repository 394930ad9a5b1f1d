//! Typed wrappers around the data path's maps, one module per map family. Nothing outside
//! this module touches `aya::maps` directly.

pub mod stats;

pub use stats::{StatsMap, StatsSnapshot};

use thiserror::Error;

/// Failure to find or use one of the data path's maps.
#[derive(Debug, Error)]
pub enum MapError {
    #[error("map {name} is missing from the XDP object")]
    Missing { name: &'static str },
    #[error("map {name} has an unexpected type or layout: {source}")]
    Layout { name: &'static str, source: aya::maps::MapError },
    #[error("failed to access map {name}: {source}")]
    Access { name: &'static str, source: aya::maps::MapError },
}
