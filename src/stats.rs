//! Process-wide counters behind `outpost stats`.
//!
//! Plain atomics: every layer bumps the counters it owns, and the admin
//! service reads a snapshot. Later a Prometheus endpoint can read the same.

use std::sync::atomic::{AtomicU64, Ordering};

/// Counters since start-up. Each field says which layer bumps it.
#[derive(Debug, Default)]
pub struct Stats {
    /// Local CAS reads that found the blob (local store).
    pub cas_hits: AtomicU64,
    /// Local CAS reads that did not find the blob (local store).
    pub cas_misses: AtomicU64,
    /// GetActionResult calls answered with a result (ActionCache service).
    pub action_cache_hits: AtomicU64,
    /// GetActionResult calls answered NOT_FOUND (ActionCache service).
    pub action_cache_misses: AtomicU64,
    /// Entries evicted to stay under the quota (local store).
    pub evicted_entries: AtomicU64,
    /// Bytes evicted to stay under the quota (local store).
    pub evicted_bytes: AtomicU64,
    /// Blobs verified and committed (local store).
    pub blobs_written: AtomicU64,
    /// Bytes verified and committed (local store).
    pub bytes_written: AtomicU64,
    /// Writes refused because data and digest disagreed (local store).
    pub digest_mismatches: AtomicU64,
    /// Action results dropped because an output was gone (completeness check).
    pub stale_action_results: AtomicU64,
}

impl Stats {
    /// Adds `n` to a counter.
    pub fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }

    /// Reads a counter.
    pub fn get(counter: &AtomicU64) -> u64 {
        counter.load(Ordering::Relaxed)
    }
}
