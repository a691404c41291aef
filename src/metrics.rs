//! Prometheus text metrics at `GET /metrics` on an optional HTTP port.
//!
//! Every counter of [`Stats`] plus the local store's occupancy, rendered in
//! the Prometheus text exposition format (version 0.0.4).

use std::fmt::Write;
use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::Context;
use axum::Router;
use axum::http::header;
use axum::response::IntoResponse;
use axum::routing::get;
use tokio_util::sync::CancellationToken;

use crate::stats::{Stats, UpstreamMethod};
use crate::store::local::LocalStore;

/// One sample: metric name, help text, kind, label, value.
struct Sample {
    name: &'static str,
    help: &'static str,
    kind: &'static str,
    label: Option<(&'static str, &'static str)>,
    value: u64,
}

fn counter(name: &'static str, help: &'static str, value: u64) -> Sample {
    Sample {
        name,
        help,
        kind: "counter",
        label: None,
        value,
    }
}

fn gauge(name: &'static str, help: &'static str, value: u64) -> Sample {
    Sample {
        name,
        help,
        kind: "gauge",
        label: None,
        value,
    }
}

/// Every metric as (name with labels, value), for `outpost stats`.
pub fn values(stats: &Stats, local: &LocalStore) -> Vec<(String, u64)> {
    samples(stats, local)
        .into_iter()
        .map(|s| match s.label {
            Some((k, v)) => (format!("{}{{{k}=\"{v}\"}}", s.name), s.value),
            None => (s.name.to_string(), s.value),
        })
        .collect()
}

/// Renders all metrics as Prometheus text.
pub fn render(stats: &Stats, local: &LocalStore) -> String {
    let mut out = String::new();
    let mut last = "";
    for s in samples(stats, local) {
        if s.name != last {
            let _ = writeln!(
                out,
                "# HELP {} {}\n# TYPE {} {}",
                s.name, s.help, s.name, s.kind
            );
            last = s.name;
        }
        match s.label {
            Some((k, v)) => {
                let _ = writeln!(out, "{}{{{k}=\"{v}\"}} {}", s.name, s.value);
            }
            None => {
                let _ = writeln!(out, "{} {}", s.name, s.value);
            }
        }
    }
    out
}

fn samples(stats: &Stats, local: &LocalStore) -> Vec<Sample> {
    let (occupancy, quota) = local.occupancy();
    let g = Stats::get;
    let mut samples = vec![
        gauge(
            "outpost_store_blobs",
            "CAS blobs in the local store.",
            occupancy.blob_count,
        ),
        gauge(
            "outpost_store_blob_bytes",
            "Bytes of CAS blobs in the local store.",
            occupancy.blob_bytes,
        ),
        gauge(
            "outpost_store_action_results",
            "Action results in the local store.",
            occupancy.action_count,
        ),
        gauge(
            "outpost_store_quota_bytes",
            "Byte quota of the local store.",
            quota,
        ),
        counter(
            "outpost_cas_hits_total",
            "CAS reads served from the local store.",
            g(&stats.cas_hits),
        ),
        counter(
            "outpost_cas_misses_total",
            "CAS reads the local store could not serve.",
            g(&stats.cas_misses),
        ),
        counter(
            "outpost_action_cache_hits_total",
            "GetActionResult calls answered with a result.",
            g(&stats.action_cache_hits),
        ),
        counter(
            "outpost_action_cache_misses_total",
            "GetActionResult calls answered NOT_FOUND.",
            g(&stats.action_cache_misses),
        ),
        counter(
            "outpost_evicted_entries_total",
            "Entries evicted to stay under the quota.",
            g(&stats.evicted_entries),
        ),
        counter(
            "outpost_evicted_bytes_total",
            "Bytes evicted to stay under the quota.",
            g(&stats.evicted_bytes),
        ),
        counter(
            "outpost_blobs_written_total",
            "Blobs verified and stored locally.",
            g(&stats.blobs_written),
        ),
        counter(
            "outpost_bytes_written_total",
            "Bytes verified and stored locally.",
            g(&stats.bytes_written),
        ),
        counter(
            "outpost_digest_mismatches_total",
            "Writes refused because data and digest disagreed.",
            g(&stats.digest_mismatches),
        ),
        counter(
            "outpost_stale_action_results_total",
            "Action results dropped because an output was gone.",
            g(&stats.stale_action_results),
        ),
        counter(
            "outpost_upstream_errors_total",
            "Upstream calls that failed after retries.",
            g(&stats.upstream_errors),
        ),
        counter(
            "outpost_upstream_retries_total",
            "Upstream call attempts that were retried.",
            g(&stats.upstream_retries),
        ),
        counter(
            "outpost_upstream_bytes_sent_total",
            "Blob bytes sent to the upstream.",
            g(&stats.upstream_bytes_sent),
        ),
        counter(
            "outpost_upstream_bytes_received_total",
            "Blob bytes received from the upstream.",
            g(&stats.upstream_bytes_received),
        ),
        counter(
            "outpost_existence_cache_hits_total",
            "Digests answered by the existence cache.",
            g(&stats.existence_cache_hits),
        ),
        counter(
            "outpost_existence_cache_misses_total",
            "Digests the existence cache asked the upstream about.",
            g(&stats.existence_cache_misses),
        ),
        counter(
            "outpost_single_flight_joins_total",
            "Reads that joined an upstream fetch in flight.",
            g(&stats.single_flight_joins),
        ),
        counter(
            "outpost_upstream_fetches_total",
            "Blobs fetched from the upstream into the local store.",
            g(&stats.upstream_fetches),
        ),
        counter(
            "outpost_uploads_from_local_total",
            "Blobs uploaded from the local store because the upstream lacked them.",
            g(&stats.uploads_from_local),
        ),
        counter(
            "outpost_fmb_batches_total",
            "Batched FindMissingBlobs calls sent upstream.",
            g(&stats.fmb_batches),
        ),
        counter(
            "outpost_fmb_batched_digests_total",
            "Digests in batched FindMissingBlobs calls.",
            g(&stats.fmb_batched_digests),
        ),
        counter(
            "outpost_read_batches_total",
            "Batched BatchReadBlobs calls sent upstream.",
            g(&stats.read_batches),
        ),
        counter(
            "outpost_read_batched_blobs_total",
            "Blobs in batched BatchReadBlobs calls.",
            g(&stats.read_batched_blobs),
        ),
        counter(
            "outpost_write_batches_total",
            "Batched BatchUpdateBlobs calls sent upstream.",
            g(&stats.write_batches),
        ),
        counter(
            "outpost_write_batched_blobs_total",
            "Blobs in batched BatchUpdateBlobs calls.",
            g(&stats.write_batched_blobs),
        ),
        counter(
            "outpost_executions_total",
            "Execute calls forwarded upstream.",
            g(&stats.executions),
        ),
        counter(
            "outpost_execution_reattaches_total",
            "Broken Operation streams reattached with WaitExecution.",
            g(&stats.execution_reattaches),
        ),
        counter(
            "outpost_missing_input_repairs_total",
            "Executions retried after uploading inputs the upstream lacked.",
            g(&stats.missing_input_repairs),
        ),
        counter(
            "outpost_repaired_blobs_total",
            "Blobs uploaded from the local store to repair missing inputs.",
            g(&stats.repaired_blobs),
        ),
        counter(
            "outpost_prefetch_jobs_total",
            "Finished actions whose outputs were queued for prefetch.",
            g(&stats.prefetch_jobs),
        ),
        counter(
            "outpost_prefetch_dropped_total",
            "Prefetch jobs dropped because the queue was full.",
            g(&stats.prefetch_dropped),
        ),
        counter(
            "outpost_prefetched_blobs_total",
            "Blobs fetched into the local store by prefetch.",
            g(&stats.prefetched_blobs),
        ),
        counter(
            "outpost_prefetched_bytes_total",
            "Bytes fetched into the local store by prefetch.",
            g(&stats.prefetched_bytes),
        ),
        counter(
            "outpost_prefetch_skipped_total",
            "Output blobs not prefetched (over max_blob_size).",
            g(&stats.prefetch_skipped),
        ),
        counter(
            "outpost_prefetch_hits_total",
            "Client reads served from prefetched blobs (first read each).",
            g(&stats.prefetch_hits),
        ),
        counter(
            "outpost_prefetch_wasted_bytes_total",
            "Prefetched bytes evicted before any client read them.",
            g(&stats.prefetch_wasted_bytes),
        ),
    ];
    for method in UpstreamMethod::ALL {
        samples.push(Sample {
            name: "outpost_upstream_calls_total",
            help: "Upstream calls, by method (each retry counts).",
            kind: "counter",
            label: Some(("method", method.name())),
            value: stats.upstream_calls_of(method),
        });
    }
    samples
}

/// Binds the metrics port (so a bad address fails at start-up).
pub async fn bind(addr: SocketAddr) -> anyhow::Result<tokio::net::TcpListener> {
    tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("cannot serve metrics on {addr}"))
}

/// Serves `/metrics` on `listener` until `shutdown` is cancelled.
pub async fn serve(
    listener: tokio::net::TcpListener,
    stats: Arc<Stats>,
    local: LocalStore,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let app =
        Router::new().route(
            "/metrics",
            get(move || {
                let body = render(&stats, &local);
                async move {
                    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], body).into_response()
                }
            }),
        );
    tracing::info!(
        "serving metrics on http://{}/metrics",
        listener.local_addr()?
    );
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown.cancelled_owned())
        .await
        .context("metrics server failed")
}
