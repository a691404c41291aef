//! Builds a [`StatusReport`] from the counters, the local store, the
//! observer layer's tables, the upstream's health and link, and the
//! per-minute history; and samples what needs sampling (the history, the
//! gauges of uptime and link) once a second.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crate::config::Config;
use crate::config::upstream::WriteMode;
use crate::stats::Stats;
use crate::store::local::LocalStore;
use crate::upstream::Upstream;

use super::history::{History, Totals};
use super::observe::Observer;
use super::{
    AuthStatus, CompressionStatus, HitRates, PrefetchStatus, Ratio, StatusReport, StoreStatus,
    UploadQueueStatus, UpstreamStatus, WanSavings,
};

/// Busiest clients in a report.
pub const TOP_CLIENTS: usize = 10;
/// (code, method) error rows in a report.
pub const TOP_ERRORS: usize = 20;
/// How often [`StatusSource::sample`] refreshes the gauges and the history.
const SAMPLE_EVERY: Duration = Duration::from_secs(1);

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
    /// The observer layer's client and error tables, once attached.
    observer: Option<Arc<Observer>>,
    /// The upstream connection (health, link), when proxying.
    link: Option<Arc<Upstream>>,
    /// Per-minute counter increases over the last hour.
    history: History,
}

impl StatusSource {
    /// A source for the server `config` describes, started now.
    pub fn new(config: &Config, stats: Arc<Stats>, local: LocalStore) -> Self {
        let upstream = config.upstream.as_ref();
        StatusSource {
            local,
            started: Instant::now(),
            data_dir: config.data_dir.clone(),
            upstream: upstream.map(|u| u.uri.clone()),
            prefetch: upstream.is_some() && config.prefetch.enabled,
            write_back: upstream.is_some_and(|u| u.write_mode == WriteMode::Back),
            observer: None,
            link: None,
            history: History::new(now_unix(), Totals::read(&stats)),
            stats,
        }
    }

    /// Reports the client and error tables of `observer`.
    pub fn with_observer(mut self, observer: Arc<Observer>) -> Self {
        self.observer = Some(observer);
        self
    }

    /// Reports the health and link of `upstream` (the main connection).
    pub fn with_upstream(mut self, upstream: Option<Arc<Upstream>>) -> Self {
        self.link = upstream;
        self
    }

    /// Until cancelled (run it on the server's `Background`): once a second,
    /// refreshes the gauges and rolls the history at each minute's end.
    pub async fn sample(self: Arc<Self>) {
        let mut tick = tokio::time::interval(SAMPLE_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            self.refresh_gauges();
            self.history.roll(now_unix(), Totals::read(&self.stats));
        }
    }

    /// Sets the gauges of uptime and of the upstream's health and link.
    pub fn refresh_gauges(&self) {
        let s = &*self.stats;
        Stats::set(&s.uptime_seconds, self.started.elapsed().as_secs());
        let link = self.link_figures();
        Stats::set(&s.upstream_healthy, u64::from(link.healthy));
        let rtt_us = link.rtt.map_or(0, |d| d.as_micros() as u64);
        Stats::set(&s.upstream_rtt_microseconds, rtt_us);
        let throughput = link.throughput.map_or(0, |t| t as u64);
        Stats::set(&s.upstream_throughput_bytes_per_second, throughput);
    }

    /// The upstream's health and link as measured now (all unknown and
    /// unhealthy without an upstream).
    fn link_figures(&self) -> LinkFigures {
        let Some(upstream) = &self.link else {
            return LinkFigures::default();
        };
        let (healthy, last_error) = upstream.health();
        LinkFigures {
            healthy,
            last_error,
            rtt: upstream.link().rtt(),
            throughput: upstream.link().throughput(),
        }
    }

    /// The report as of now.
    pub fn report(&self) -> StatusReport {
        let s = &*self.stats;
        let get = Stats::get;
        let (occupancy, quota) = self.local.occupancy();
        let now = Instant::now();
        let link = self.link_figures();
        let rtt_ms = link.rtt.map(|d| d.as_secs_f64() * 1e3);
        StatusReport {
            version: env!("CARGO_PKG_VERSION").to_string(),
            uptime_seconds: self.started.elapsed().as_secs(),
            generated_unix: now_unix(),
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
            wan: self.wan_savings(&link),
            upstream: self.upstream.as_ref().map(|endpoint| UpstreamStatus {
                endpoint: endpoint.clone(),
                healthy: link.healthy,
                last_error: link.last_error.clone(),
                rtt_ms,
                throughput_bytes_per_second: link.throughput,
                calls: s.upstream_calls.iter().map(get).sum(),
                errors: get(&s.upstream_errors),
                retries: get(&s.upstream_retries),
                bytes_sent: get(&s.upstream_bytes_sent),
                bytes_received: get(&s.upstream_bytes_received),
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
            clients: self
                .observer
                .as_ref()
                .map_or_else(Vec::new, |o| o.clients.busiest(TOP_CLIENTS, now)),
            errors: self
                .observer
                .as_ref()
                .map_or_else(Vec::new, |o| o.errors.most_frequent(TOP_ERRORS, now)),
            history: self.history.samples(|| Totals::read(s)),
        }
    }

    /// What serving locally saved: the link figures only in proxy mode and
    /// once measured; the time saved once the throughput is known, as the
    /// bytes at that throughput plus one round trip per read call served.
    fn wan_savings(&self, link: &LinkFigures) -> WanSavings {
        let s = &*self.stats;
        let served = Stats::get(&s.served_local_bytes);
        let reads = Stats::get(&s.served_local_reads);
        let rtt = link.rtt.map(|d| d.as_secs_f64());
        let seconds_saved = link
            .throughput
            .filter(|&t| t > 0.0)
            .map(|t| served as f64 / t + rtt.unwrap_or(0.0) * reads as f64);
        WanSavings {
            bytes_served_locally: served,
            bytes_from_upstream: Stats::get(&s.upstream_bytes_received),
            link_bytes_per_second: link.throughput,
            link_rtt_ms: rtt.map(|r| r * 1e3),
            seconds_saved,
        }
    }
}

/// The upstream's health and link at one instant.
#[derive(Default)]
struct LinkFigures {
    healthy: bool,
    last_error: Option<String>,
    rtt: Option<Duration>,
    throughput: Option<f64>,
}

/// Seconds since the Unix epoch (0 if the clock is before it).
fn now_unix() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}
