//! The resolved `[prefetch]` settings: how hard Outpost pulls finished
//! actions' outputs into the local store ahead of the client.

use super::defaults;
use super::file::PrefetchSection;

/// The resolved prefetch settings.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PrefetchConfig {
    /// Prefetch at all.
    pub enabled: bool,
    /// Size limit per blob.
    pub max_blob_size: u64,
    /// Bytes in flight across all prefetches.
    pub max_bytes_in_flight: u64,
    /// Fetches at once per action.
    pub parallel_fetches: usize,
    /// Queue length in actions.
    pub queue_depth: usize,
}

impl PrefetchConfig {
    /// Applies the defaults (see [`defaults`]); limits are at least 1.
    pub fn resolve(section: PrefetchSection) -> Self {
        PrefetchConfig {
            enabled: section.enabled.unwrap_or(defaults::PREFETCH_ENABLED),
            max_blob_size: section
                .max_blob_size
                .map_or(defaults::PREFETCH_MAX_BLOB_SIZE, |b| b.0),
            max_bytes_in_flight: section
                .max_bytes_in_flight
                .map_or(defaults::PREFETCH_MAX_BYTES_IN_FLIGHT, |b| b.0.max(1)),
            parallel_fetches: section
                .parallel_fetches
                .unwrap_or(defaults::PREFETCH_PARALLEL_FETCHES)
                .max(1),
            queue_depth: section
                .queue_depth
                .unwrap_or(defaults::PREFETCH_QUEUE_DEPTH)
                .max(1),
        }
    }
}

impl Default for PrefetchConfig {
    fn default() -> Self {
        PrefetchConfig::resolve(PrefetchSection::default())
    }
}
