//! The operator's view of a running Outpost: one [`StatusReport`] of what
//! it holds, what it saves, and what is wrong, served on the metrics
//! listener as JSON at `/status` and as an HTML page at `/` ([`page`]).
//!
//! The report is built from the [`crate::stats::Stats`] counters, the local
//! store's occupancy and the trackers of this module; `/metrics` carries the
//! same figures for Prometheus and Grafana (`deploy/grafana/outpost.json`).
//!
//! - [`collect`]: [`StatusSource`], the report and the once-a-second sampler.
//! - [`observe`]: the tower layer that records every client call's outcome.
//! - [`clients`], [`errors`]: its bounded tables ([`recent`]); [`codes`]:
//!   gRPC code names.
//! - [`history`]: the per-minute ring of the last hour.
//! - [`page`]: the HTML page.

pub mod clients;
pub mod codes;
pub mod collect;
pub mod errors;
pub mod history;
pub mod observe;
pub mod page;
pub mod recent;

pub use collect::StatusSource;

use serde::Serialize;

/// Everything the status page and `/status` show, sampled at one instant.
/// Field names are the JSON keys: keep them stable, scripts read them.
#[derive(Debug, Clone, Default, Serialize)]
pub struct StatusReport {
    /// Outpost's version (`CARGO_PKG_VERSION`).
    pub version: String,
    /// Seconds since the server started.
    pub uptime_seconds: u64,
    /// When the report was taken, in seconds since the Unix epoch.
    pub generated_unix: u64,
    /// `"standalone"` or `"proxy"`.
    pub mode: String,
    /// The local store against its quota.
    pub store: StoreStatus,
    /// Hit rates since start.
    pub hit_rates: HitRates,
    /// What serving locally saved on the WAN link.
    pub wan: WanSavings,
    /// The upstream, when proxying.
    pub upstream: Option<UpstreamStatus>,
    /// How well prefetch works.
    pub prefetch: PrefetchStatus,
    /// The write-back upload queue, in write-back mode.
    pub uploads: Option<UploadQueueStatus>,
    /// zstd at rest and on the wire.
    pub compression: CompressionStatus,
    /// Credentials and per-client limits on Outpost's own listener.
    pub auth: AuthStatus,
    /// The busiest clients recently, by calls, busiest first.
    pub clients: Vec<ClientActivity>,
    /// Calls that ended with an error status recently, most frequent first.
    pub errors: Vec<ErrorCount>,
    /// One sample per minute over the last hour, oldest first.
    pub history: Vec<MinuteSample>,
}

/// Hits against lookups, with the rate precomputed for the page and scripts.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct Ratio {
    /// Lookups answered.
    pub hits: u64,
    /// Lookups not answered.
    pub misses: u64,
    /// `hits / (hits + misses)`, `None` before the first lookup.
    pub rate: Option<f64>,
}

impl Ratio {
    /// The ratio of `hits` to `hits + misses`.
    pub fn new(hits: u64, misses: u64) -> Self {
        let total = hits + misses;
        let rate = (total > 0).then(|| hits as f64 / total as f64);
        Ratio { hits, misses, rate }
    }
}

/// The local store: occupancy against the quota, and what left it.
#[derive(Debug, Clone, Default, Serialize)]
pub struct StoreStatus {
    /// The data directory.
    pub data_dir: String,
    /// Bytes in use (blobs and assets, as counted against the quota).
    pub used_bytes: u64,
    /// The quota.
    pub quota_bytes: u64,
    /// Bytes held by writes in progress and parked uploads.
    pub reserved_bytes: u64,
    /// CAS blobs stored.
    pub blobs: u64,
    /// Action results stored.
    pub action_results: u64,
    /// Remote Asset entries stored.
    pub asset_entries: u64,
    /// Entries evicted to stay under the quota, since start.
    pub evicted_entries: u64,
    /// Bytes evicted, since start.
    pub evicted_bytes: u64,
    /// Blobs found corrupt on disk and removed, since start.
    pub corrupt_blobs: u64,
}

/// Hit rates of the three caches.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct HitRates {
    /// CAS reads served from the local store.
    pub cas: Ratio,
    /// GetActionResult calls answered with a result.
    pub action_cache: Ratio,
    /// Remote Asset fetches answered locally.
    pub assets: Ratio,
}

/// Bytes served from the local store that would otherwise have crossed the
/// WAN, and the time that saved at the measured link speed.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct WanSavings {
    /// Blob bytes clients read from the local store, since start.
    pub bytes_served_locally: u64,
    /// Blob bytes fetched from the upstream, since start.
    pub bytes_from_upstream: u64,
    /// The link's measured throughput, bytes per second (proxy mode, once
    /// measured).
    pub link_bytes_per_second: Option<f64>,
    /// The link's measured round-trip time, milliseconds.
    pub link_rtt_ms: Option<f64>,
    /// Seconds those local reads would have taken over the link, at its
    /// measured throughput and RTT; `None` until the link is measured.
    pub seconds_saved: Option<f64>,
}

/// The upstream's health and link.
#[derive(Debug, Clone, Default, Serialize)]
pub struct UpstreamStatus {
    /// The endpoint (never with credentials).
    pub endpoint: String,
    /// Whether the last call reached it.
    pub healthy: bool,
    /// The last failure, while unhealthy.
    pub last_error: Option<String>,
    /// Measured round-trip time, milliseconds.
    pub rtt_ms: Option<f64>,
    /// Measured download throughput, bytes per second.
    pub throughput_bytes_per_second: Option<f64>,
    /// Calls sent, every method and retry.
    pub calls: u64,
    /// Calls that failed after retries.
    pub errors: u64,
    /// Attempts retried.
    pub retries: u64,
    /// Blob bytes sent.
    pub bytes_sent: u64,
    /// Blob bytes received.
    pub bytes_received: u64,
}

/// How well prefetch works.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct PrefetchStatus {
    /// Whether prefetch runs (proxy mode with prefetch on).
    pub enabled: bool,
    /// Blobs fetched by prefetch.
    pub blobs: u64,
    /// Bytes fetched by prefetch.
    pub bytes: u64,
    /// Client reads served from prefetched blobs (first read each).
    pub hits: u64,
    /// Client reads that joined a prefetch transfer in flight.
    pub joins: u64,
    /// Output blobs a client read after prefetch had skipped them.
    pub missed: u64,
    /// Prefetched bytes evicted before any client read them.
    pub wasted_bytes: u64,
    /// Invocations that read their outputs / do not / still learning.
    pub invocations_reading: u64,
    /// Invocations that do not read their outputs.
    pub invocations_not_reading: u64,
    /// Invocations prefetch is still learning.
    pub invocations_learning: u64,
}

/// The write-back upload queue.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct UploadQueueStatus {
    /// Blobs waiting.
    pub queued_blobs: u64,
    /// Bytes waiting.
    pub queued_bytes: u64,
    /// Action results waiting for their outputs.
    pub queued_results: u64,
    /// Age of the oldest entry, seconds.
    pub oldest_age_seconds: u64,
    /// Blobs uploaded since start.
    pub uploaded: u64,
    /// Bytes uploaded since start.
    pub uploaded_bytes: u64,
    /// Entries given up.
    pub failed: u64,
}

/// zstd at rest and on the wire.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct CompressionStatus {
    /// Blobs stored compressed.
    pub stored_blobs: u64,
    /// Their uncompressed bytes.
    pub stored_plain_bytes: u64,
    /// Their bytes on disk.
    pub stored_disk_bytes: u64,
    /// Blobs clients read or wrote compressed.
    pub client_blobs: u64,
    /// Bytes that crossed the WAN compressed, as sent or received.
    pub upstream_wire_bytes: u64,
    /// Their uncompressed bytes.
    pub upstream_plain_bytes: u64,
}

/// Credentials and limits on Outpost's own listener.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct AuthStatus {
    /// Calls admitted with a credential.
    pub accepted: u64,
    /// Calls refused UNAUTHENTICATED (every reason).
    pub failures: u64,
    /// Calls refused PERMISSION_DENIED.
    pub denied: u64,
    /// Calls refused RESOURCE_EXHAUSTED by the per-client limit.
    pub limit_refusals: u64,
}

/// One client's recent activity, keyed by `RequestMetadata`'s tool and
/// invocation (and the credential name, when authenticated).
#[derive(Debug, Clone, Default, Serialize)]
pub struct ClientActivity {
    /// `tool_details.tool_name` and `tool_version`, e.g. `bazel 4.2.3`;
    /// `"unknown"` without request metadata.
    pub tool: String,
    /// `tool_invocation_id`, empty without one.
    pub invocation: String,
    /// The credential's name, or empty when unauthenticated.
    pub client: String,
    /// Calls made.
    pub calls: u64,
    /// Calls that ended with an error status.
    pub errors: u64,
    /// Seconds since its last call.
    pub last_seen_seconds_ago: u64,
}

/// Calls that ended with one status code on one method.
#[derive(Debug, Clone, Default, Serialize)]
pub struct ErrorCount {
    /// The gRPC code's name, e.g. `NOT_FOUND`.
    pub code: String,
    /// The method, e.g. `ByteStream/Read`.
    pub method: String,
    /// How many, since start.
    pub count: u64,
    /// Seconds since the last one.
    pub last_seen_seconds_ago: u64,
}

/// Counter increases over one minute (for the page's charts).
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct MinuteSample {
    /// The minute's start, seconds since the Unix epoch.
    pub minute_unix: u64,
    /// CAS hits and misses in that minute.
    pub cas_hits: u64,
    /// CAS misses in that minute.
    pub cas_misses: u64,
    /// Action cache hits in that minute.
    pub action_cache_hits: u64,
    /// Action cache misses in that minute.
    pub action_cache_misses: u64,
    /// Asset fetches answered locally in that minute.
    pub asset_hits: u64,
    /// Asset fetches not answered locally in that minute.
    pub asset_misses: u64,
    /// Blob bytes served locally in that minute.
    pub bytes_served_locally: u64,
    /// Blob bytes received from the upstream in that minute.
    pub upstream_bytes_received: u64,
    /// Blob bytes sent to the upstream in that minute.
    pub upstream_bytes_sent: u64,
    /// Calls that ended with an error status in that minute.
    pub errors: u64,
}
