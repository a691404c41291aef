//! Builds a [`StatusReport`] from the counters and the local store.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use crate::config::Config;
use crate::config::upstream::WriteMode;
use crate::stats::Stats;
use crate::store::local::LocalStore;

use super::{
    AuthStatus, CompressionStatus, HitRates, PrefetchStatus, Ratio, StatusReport, StoreStatus,
    UploadQueueStatus, UpstreamStatus, WanSavings,
};

/// What a report is built from: shared with the metrics listener.
pub struct StatusSource {
    stats: Arc<Stats>,
    local: LocalStore,
    started: Instant,
    data_dir: PathBuf,
    /// The upstream endpoint, when proxying.
    upstream: Option<String>,
    prefetch: bool,
    write_back: bool,
}

impl StatusSource {
    /// A source for the server `config` describes, started now.
    pub fn new(config: &Config, stats: Arc<Stats>, local: LocalStore) -> Self {
        let upstream = config.upstream.as_ref();
        StatusSource {
            stats,
            local,
            started: Instant::now(),
            data_dir: config.data_dir.clone(),
            upstream: upstream.map(|u| u.uri.clone()),
            prefetch: upstream.is_some() && config.prefetch.enabled,
            write_back: upstream.is_some_and(|u| u.write_mode == WriteMode::Back),
        }
    }

    /// The report as of now.
    pub fn report(&self) -> StatusReport {
        let s = &*self.stats;
        let get = Stats::get;
        let (occupancy, quota) = self.local.occupancy();
        StatusReport {
            version: env!("CARGO_PKG_VERSION").to_string(),
            uptime_seconds: self.started.elapsed().as_secs(),
            generated_unix: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_secs()),
            mode: if self.upstream.is_some() {
                "proxy"
            } else {
                "standalone"
            }
            .to_string(),
            store: StoreStatus {
                data_dir: self.data_dir.display().to_string(),
                used_bytes: occupancy.blob_bytes + occupancy.asset_bytes + occupancy.action_bytes,
                quota_bytes: quota,
                reserved_bytes: occupancy.reserved_bytes,
                blobs: occupancy.blob_count,
                action_results: occupancy.action_count,
                asset_entries: occupancy.asset_count,
                evicted_entries: get(&s.evicted_entries),
                evicted_bytes: get(&s.evicted_bytes),
                corrupt_blobs: get(&s.corrupt_blobs),
            },
            hit_rates: HitRates {
                cas: Ratio::new(get(&s.cas_hits), get(&s.cas_misses)),
                action_cache: Ratio::new(get(&s.action_cache_hits), get(&s.action_cache_misses)),
                assets: Ratio::new(
                    get(&s.asset_fetch_hits),
                    get(&s.asset_fetches).saturating_sub(get(&s.asset_fetch_hits)),
                ),
            },
            wan: WanSavings {
                bytes_from_upstream: get(&s.upstream_bytes_received),
                ..WanSavings::default()
            },
            upstream: self.upstream.as_ref().map(|endpoint| UpstreamStatus {
                endpoint: endpoint.clone(),
                healthy: true,
                calls: s.upstream_calls.iter().map(get).sum(),
                errors: get(&s.upstream_errors),
                retries: get(&s.upstream_retries),
                bytes_sent: get(&s.upstream_bytes_sent),
                bytes_received: get(&s.upstream_bytes_received),
                ..UpstreamStatus::default()
            }),
            prefetch: PrefetchStatus {
                enabled: self.prefetch,
                blobs: get(&s.prefetched_blobs),
                bytes: get(&s.prefetched_bytes),
                hits: get(&s.prefetch_hits),
                joins: get(&s.prefetch_joins),
                missed: get(&s.prefetch_missed),
                wasted_bytes: get(&s.prefetch_wasted_bytes),
                invocations_reading: get(&s.prefetch_invocations_reading),
                invocations_not_reading: get(&s.prefetch_invocations_not_reading),
                invocations_learning: get(&s.prefetch_invocations_learning),
            },
            uploads: self.write_back.then(|| UploadQueueStatus {
                queued_blobs: get(&s.write_back_queued_blobs),
                queued_bytes: get(&s.write_back_queued_bytes),
                queued_results: get(&s.write_back_queued_results),
                oldest_age_seconds: get(&s.write_back_oldest_age_seconds),
                uploaded: get(&s.write_back_uploaded),
                uploaded_bytes: get(&s.write_back_uploaded_bytes),
                failed: get(&s.write_back_failed),
            }),
            compression: CompressionStatus {
                stored_blobs: get(&s.store_compressed_blobs),
                stored_plain_bytes: get(&s.store_compressed_plain_bytes),
                stored_disk_bytes: get(&s.store_compressed_disk_bytes),
                client_blobs: get(&s.client_compressed_blobs),
                upstream_wire_bytes: get(&s.upstream_compressed_wire_bytes),
                upstream_plain_bytes: get(&s.upstream_compressed_plain_bytes),
            },
            auth: AuthStatus {
                accepted: get(&s.auth_accepted),
                failures: get(&s.auth_failures_missing)
                    + get(&s.auth_failures_unknown_token)
                    + get(&s.auth_failures_bad_password)
                    + get(&s.auth_failures_unknown_certificate),
                denied: get(&s.auth_denied),
                limit_refusals: get(&s.client_limit_refusals),
            },
            clients: Vec::new(),
            errors: Vec::new(),
            history: Vec::new(),
        }
    }
}
