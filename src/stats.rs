//! Process-wide counters behind `outpost stats` and `/metrics`.
//!
//! Plain atomics: every layer bumps the counters it owns, and the admin
//! service and the metrics endpoint read snapshots.

use std::sync::atomic::{AtomicU64, Ordering};

/// Upstream RPC methods, for per-method counters.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum UpstreamMethod {
    /// ContentAddressableStorage.FindMissingBlobs
    FindMissingBlobs,
    /// ContentAddressableStorage.BatchReadBlobs
    BatchReadBlobs,
    /// ContentAddressableStorage.BatchUpdateBlobs
    BatchUpdateBlobs,
    /// ByteStream.Read
    ByteStreamRead,
    /// ByteStream.Write
    ByteStreamWrite,
    /// ActionCache.GetActionResult
    GetActionResult,
    /// ActionCache.UpdateActionResult
    UpdateActionResult,
    /// Capabilities.GetCapabilities
    GetCapabilities,
    /// Execution.Execute
    Execute,
    /// Execution.WaitExecution
    WaitExecution,
    /// google.longrunning.Operations (any method)
    Operations,
}

impl UpstreamMethod {
    /// Every method, in counter order.
    pub const ALL: [UpstreamMethod; 11] = [
        UpstreamMethod::FindMissingBlobs,
        UpstreamMethod::BatchReadBlobs,
        UpstreamMethod::BatchUpdateBlobs,
        UpstreamMethod::ByteStreamRead,
        UpstreamMethod::ByteStreamWrite,
        UpstreamMethod::GetActionResult,
        UpstreamMethod::UpdateActionResult,
        UpstreamMethod::GetCapabilities,
        UpstreamMethod::Execute,
        UpstreamMethod::WaitExecution,
        UpstreamMethod::Operations,
    ];

    /// The gRPC method name.
    pub fn name(self) -> &'static str {
        match self {
            UpstreamMethod::FindMissingBlobs => "FindMissingBlobs",
            UpstreamMethod::BatchReadBlobs => "BatchReadBlobs",
            UpstreamMethod::BatchUpdateBlobs => "BatchUpdateBlobs",
            UpstreamMethod::ByteStreamRead => "ByteStream.Read",
            UpstreamMethod::ByteStreamWrite => "ByteStream.Write",
            UpstreamMethod::GetActionResult => "GetActionResult",
            UpstreamMethod::UpdateActionResult => "UpdateActionResult",
            UpstreamMethod::GetCapabilities => "GetCapabilities",
            UpstreamMethod::Execute => "Execute",
            UpstreamMethod::WaitExecution => "WaitExecution",
            UpstreamMethod::Operations => "Operations",
        }
    }
}

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
    /// Upstream calls started, by [`UpstreamMethod`] (upstream client).
    pub upstream_calls: [AtomicU64; 11],
    /// Upstream calls that failed after retries (upstream client).
    pub upstream_errors: AtomicU64,
    /// Upstream call attempts that were retried (upstream client).
    pub upstream_retries: AtomicU64,
    /// Blob bytes sent to the upstream (upstream store).
    pub upstream_bytes_sent: AtomicU64,
    /// Blob bytes received from the upstream (upstream store).
    pub upstream_bytes_received: AtomicU64,
    /// Digests answered from the existence cache, without asking upstream.
    pub existence_cache_hits: AtomicU64,
    /// Digests the existence cache had to ask the upstream about.
    pub existence_cache_misses: AtomicU64,
    /// Reads that joined a fetch already in flight (single-flight).
    pub single_flight_joins: AtomicU64,
    /// Fetches from the upstream into the local store (read-through).
    pub upstream_fetches: AtomicU64,
    /// Blobs the proxy uploaded from its own store because the upstream lacked them.
    pub uploads_from_local: AtomicU64,
    /// FindMissingBlobs calls sent upstream by the batcher, and digests in them.
    pub fmb_batches: AtomicU64,
    /// Digests in those batched FindMissingBlobs calls.
    pub fmb_batched_digests: AtomicU64,
    /// BatchReadBlobs calls sent upstream by the batcher.
    pub read_batches: AtomicU64,
    /// Blobs in those batched BatchReadBlobs calls.
    pub read_batched_blobs: AtomicU64,
    /// BatchUpdateBlobs calls sent upstream by the batcher.
    pub write_batches: AtomicU64,
    /// Blobs in those batched BatchUpdateBlobs calls.
    pub write_batched_blobs: AtomicU64,
    /// Execute calls forwarded upstream (execution service).
    pub executions: AtomicU64,
    /// Times a broken Operation stream was reattached with WaitExecution.
    pub execution_reattaches: AtomicU64,
    /// Executions retried after uploading inputs the upstream reported missing.
    pub missing_input_repairs: AtomicU64,
    /// Blobs uploaded from the local store to repair missing inputs.
    pub repaired_blobs: AtomicU64,
    /// Action results whose outputs were queued for prefetch.
    pub prefetch_jobs: AtomicU64,
    /// Prefetch jobs dropped because the queue was full.
    pub prefetch_dropped: AtomicU64,
    /// Blobs fetched into the local store by prefetch.
    pub prefetched_blobs: AtomicU64,
    /// Bytes fetched into the local store by prefetch.
    pub prefetched_bytes: AtomicU64,
    /// Blobs skipped by prefetch (over the size limit).
    pub prefetch_skipped: AtomicU64,
    /// Client reads served from prefetched data (first read of each blob).
    pub prefetch_hits: AtomicU64,
    /// Prefetched bytes evicted before any client read them.
    pub prefetch_wasted_bytes: AtomicU64,
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

    /// Counts one upstream call of `method`.
    pub fn upstream_call(&self, method: UpstreamMethod) {
        let i = UpstreamMethod::ALL
            .iter()
            .position(|m| *m == method)
            .expect("every method is in ALL");
        Stats::add(&self.upstream_calls[i], 1);
    }

    /// Upstream calls of `method` so far.
    pub fn upstream_calls_of(&self, method: UpstreamMethod) -> u64 {
        let i = UpstreamMethod::ALL
            .iter()
            .position(|m| *m == method)
            .expect("every method is in ALL");
        Stats::get(&self.upstream_calls[i])
    }
}
