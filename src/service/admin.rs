//! Outpost's own Admin service (`outpost stats`).

use std::time::Instant;

use tonic::{Request, Response, Status};

use crate::admin_proto::admin_server::Admin;
use crate::admin_proto::{GetStatsRequest, GetStatsResponse};
use crate::stats::{Stats, UpstreamMethod};
use crate::store::local::LocalStore;
use std::sync::Arc;

/// Answers GetStats from the counters and the local store's occupancy.
pub struct AdminService {
    local: LocalStore,
    /// The upstream endpoint, if proxying.
    upstream: Option<String>,
    stats: Arc<Stats>,
    started: Instant,
}

impl AdminService {
    /// Reports on `local` and `stats` (and names the upstream, if any).
    pub fn new(local: LocalStore, stats: Arc<Stats>, upstream: Option<String>) -> Self {
        AdminService {
            local,
            upstream,
            stats,
            started: Instant::now(),
        }
    }
}

#[tonic::async_trait]
impl Admin for AdminService {
    async fn get_stats(
        &self,
        _request: Request<GetStatsRequest>,
    ) -> Result<Response<GetStatsResponse>, Status> {
        let (occupancy, quota) = self.local.occupancy();
        let s = &self.stats;
        Ok(Response::new(GetStatsResponse {
            blob_count: occupancy.blob_count,
            blob_bytes: occupancy.blob_bytes,
            action_result_count: occupancy.action_count,
            quota_bytes: quota,
            cas_hits: Stats::get(&s.cas_hits),
            cas_misses: Stats::get(&s.cas_misses),
            action_cache_hits: Stats::get(&s.action_cache_hits),
            action_cache_misses: Stats::get(&s.action_cache_misses),
            evicted_blobs: Stats::get(&s.evicted_entries),
            evicted_bytes: Stats::get(&s.evicted_bytes),
            blobs_written: Stats::get(&s.blobs_written),
            bytes_written: Stats::get(&s.bytes_written),
            digest_mismatches: Stats::get(&s.digest_mismatches),
            stale_action_results: Stats::get(&s.stale_action_results),
            uptime_seconds: self.started.elapsed().as_secs(),
            version: env!("CARGO_PKG_VERSION").to_string(),
            upstream: self.upstream.clone().unwrap_or_default(),
            upstream_calls: UpstreamMethod::ALL
                .iter()
                .map(|m| (m.name().to_string(), s.upstream_calls_of(*m)))
                .collect(),
            upstream_errors: Stats::get(&s.upstream_errors),
            upstream_bytes_sent: Stats::get(&s.upstream_bytes_sent),
            upstream_bytes_received: Stats::get(&s.upstream_bytes_received),
            existence_cache_hits: Stats::get(&s.existence_cache_hits),
            existence_cache_misses: Stats::get(&s.existence_cache_misses),
            single_flight_joins: Stats::get(&s.single_flight_joins),
            upstream_fetches: Stats::get(&s.upstream_fetches),
            uploads_from_local: Stats::get(&s.uploads_from_local),
            fmb_batches: Stats::get(&s.fmb_batches),
            fmb_batched_digests: Stats::get(&s.fmb_batched_digests),
            read_batches: Stats::get(&s.read_batches),
            read_batched_blobs: Stats::get(&s.read_batched_blobs),
            write_batches: Stats::get(&s.write_batches),
            write_batched_blobs: Stats::get(&s.write_batched_blobs),
            metrics: crate::metrics::values(s, &self.local).into_iter().collect(),
        }))
    }
}
