//! Outpost's own Admin service (`outpost stats`): store occupancy plus the
//! counter table, as typed fields (for older clients) and as the `metrics` map.

use std::sync::Arc;
use std::time::Instant;

use tonic::{Request, Response, Status};

use crate::admin_proto::admin_server::Admin;
use crate::admin_proto::{GetStatsRequest, GetStatsResponse};
use crate::stats::Stats;
use crate::store::local::LocalStore;

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
        let mut response = GetStatsResponse {
            blob_count: occupancy.blob_count,
            blob_bytes: occupancy.blob_bytes,
            action_result_count: occupancy.action_count,
            quota_bytes: quota,
            uptime_seconds: self.started.elapsed().as_secs(),
            version: env!("CARGO_PKG_VERSION").to_string(),
            upstream: self.upstream.clone().unwrap_or_default(),
            metrics: crate::metrics::values(&self.stats, &self.local)
                .into_iter()
                .collect(),
            ..Default::default()
        };
        self.stats.fill_admin_fields(&mut response);
        Ok(Response::new(response))
    }
}
