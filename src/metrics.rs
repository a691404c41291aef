//! Prometheus text metrics at `GET /metrics` on an optional HTTP port
//! (HTTPS when the listener has TLS, see [`crate::tls`]).
//!
//! The local store's occupancy and the [`Stats`] gauges, then every counter of the
//! [`Stats`] table (per-code families with one series per non-OK gRPC code,
//! per-method ones with one per upstream method), rendered in the Prometheus text exposition format
//! (version 0.0.4). The same samples fill `GetStats`'s `metrics` map.

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
use crate::status::StatusSource;
use crate::status::codes::{ERROR_CODES, code_name};
use crate::store::local::LocalStore;
use crate::tls::{Protocol, ReloadingTls, TlsListener};

/// One sample: metric name, help text, kind, label, value.
struct Sample {
    name: &'static str,
    help: &'static str,
    kind: &'static str,
    label: Option<(&'static str, &'static str)>,
    value: u64,
}

impl Sample {
    /// The sample's name with its label, as written in the exposition format.
    fn key(&self) -> String {
        sample_key(self.name, self.label)
    }
}

/// `name` or `name{label="value"}`: how a sample is named at `/metrics` and
/// in the `GetStats` map.
pub fn sample_key(name: &str, label: Option<(&str, &str)>) -> String {
    match label {
        Some((k, v)) => format!("{name}{{{k}=\"{v}\"}}"),
        None => name.to_string(),
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

/// Every metric as (name with labels, value), for the `GetStats` map.
pub fn values(stats: &Stats, local: &LocalStore) -> Vec<(String, u64)> {
    samples(stats, local)
        .into_iter()
        .map(|s| (s.key(), s.value))
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
        let _ = writeln!(out, "{} {}", s.key(), s.value);
    }
    out
}

/// Occupancy gauges, then the counter table in its order.
fn samples(stats: &Stats, local: &LocalStore) -> Vec<Sample> {
    let (occupancy, quota) = local.occupancy();
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
            "outpost_store_asset_entries",
            "Remote Asset entries in the local store.",
            occupancy.asset_count,
        ),
        gauge(
            "outpost_store_asset_bytes",
            "Bytes of Remote Asset entries in the local store.",
            occupancy.asset_bytes,
        ),
        gauge(
            "outpost_store_quota_bytes",
            "Byte quota of the local store.",
            quota,
        ),
        gauge(
            "outpost_store_reserved_bytes",
            "Bytes of the quota held by writes in progress and parked uploads.",
            occupancy.reserved_bytes,
        ),
    ];
    samples.extend(Stats::GAUGES.iter().map(|g| Sample {
        name: g.metric,
        help: g.help,
        kind: "gauge",
        label: None,
        value: (g.read)(stats),
    }));
    samples.extend(Stats::COUNTERS.iter().map(|c| Sample {
        name: c.metric,
        help: c.help,
        kind: "counter",
        label: None,
        value: (c.read)(stats),
    }));
    for family in Stats::BY_CODE {
        samples.extend(ERROR_CODES.iter().map(|&code| Sample {
            name: family.metric,
            help: family.help,
            kind: "counter",
            label: Some(("code", code_name(code))),
            value: (family.read)(stats, code),
        }));
    }
    for family in Stats::BY_METHOD {
        samples.extend(UpstreamMethod::ALL.iter().map(|&method| Sample {
            name: family.metric,
            help: family.help,
            kind: "counter",
            label: Some(("method", method.name())),
            value: (family.read)(stats, method),
        }));
    }
    samples
}

/// Binds the metrics port (so a bad address fails at start-up).
pub async fn bind(addr: SocketAddr) -> anyhow::Result<tokio::net::TcpListener> {
    tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("cannot serve metrics on {addr}"))
}

/// Serves `/metrics`, the status page at `/` and its JSON at `/status` on
/// `listener` until `shutdown` is cancelled: over
/// HTTPS with the listener's TLS settings (and client certificates, with
/// `client_ca`) when `tls` is set.
pub async fn serve(
    listener: tokio::net::TcpListener,
    tls: Option<ReloadingTls>,
    stats: Arc<Stats>,
    local: LocalStore,
    status: Arc<StatusSource>,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let addr = listener.local_addr()?;
    let metrics_stats = stats.clone();
    let page_status = status.clone();
    let metrics_status = status.clone();
    let app = Router::new()
        .route(
            "/metrics",
            get(move || {
                metrics_status.refresh_gauges();
                let body = render(&metrics_stats, &local);
                async move {
                    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], body).into_response()
                }
            }),
        )
        .route(
            "/",
            get(move || {
                let body = crate::status::page::render(&page_status.report());
                async move { axum::response::Html(body).into_response() }
            }),
        )
        .route(
            "/status",
            get(move || {
                let body = serde_json::to_string(&status.report()).unwrap_or_default();
                async move { ([(header::CONTENT_TYPE, "application/json")], body).into_response() }
            }),
        );
    let done = shutdown.clone().cancelled_owned();
    let served = match tls {
        None => {
            tracing::info!("serving metrics on http://{addr}/metrics");
            axum::serve(listener, app)
                .with_graceful_shutdown(done)
                .await
        }
        Some(tls) => {
            let mode = if tls.mutual() { " (mutual TLS)" } else { "" };
            let listener = TlsListener::spawn(listener, tls, Protocol::Http1, stats, shutdown)?;
            tracing::info!("serving metrics on https://{addr}/metrics{mode}");
            axum::serve(listener, app)
                .with_graceful_shutdown(done)
                .await
        }
    };
    served.context("metrics server failed")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::local::LocalStoreOptions;

    #[test]
    fn every_counter_of_the_table_is_exported_once() {
        let dir = tempfile::tempdir().unwrap();
        let stats = Arc::new(Stats::default());
        Stats::add(&stats.prefetch_wasted_bytes, 42);
        stats.upstream_call(UpstreamMethod::ByteStreamRead);
        stats.rpc_completed(Some(tonic::Code::NotFound));
        stats.rpc_completed(None);
        Stats::add(&stats.served_local_bytes, 1234);
        Stats::set(&stats.upstream_rtt_microseconds, 20_000);
        let options = LocalStoreOptions {
            dir: dir.path().to_path_buf(),
            quota_bytes: 1 << 20,
            inline_limit: 1024,
            sync: false,
        };
        let local = LocalStore::open(options, stats.clone()).unwrap();
        let text = render(&stats, &local);
        for c in Stats::COUNTERS {
            assert_eq!(
                text.matches(&format!("# TYPE {} counter\n", c.metric))
                    .count(),
                1
            );
        }
        for g in Stats::GAUGES {
            assert_eq!(
                text.matches(&format!("# TYPE {} gauge\n", g.metric))
                    .count(),
                1
            );
        }
        assert!(
            text.contains("\noutpost_prefetch_wasted_bytes_total 42\n"),
            "{text}"
        );
        assert!(
            text.contains("\noutpost_store_quota_bytes 1048576\n"),
            "{text}"
        );
        assert!(
            text.contains("\noutpost_upstream_calls_total{method=\"ByteStream.Read\"} 1\n"),
            "{text}"
        );
        for family in Stats::BY_CODE {
            assert_eq!(
                text.matches(&format!("# TYPE {} counter\n", family.metric))
                    .count(),
                1
            );
        }
        // The names the Grafana dashboard and the status page agree on.
        for line in [
            "outpost_rpc_calls_total 2",
            "outpost_rpc_errors_total{code=\"NOT_FOUND\"} 1",
            "outpost_rpc_errors_total{code=\"UNAVAILABLE\"} 0",
            "outpost_served_local_bytes_total 1234",
            "outpost_upstream_healthy 0",
            "outpost_upstream_rtt_microseconds 20000",
            "outpost_upstream_throughput_bytes_per_second 0",
            "outpost_uptime_seconds 0",
        ] {
            assert!(text.contains(&format!("\n{line}\n")), "{line} in {text}");
        }
        assert!(!text.contains("code=\"OK\""), "{text}");
        let samples = text.lines().filter(|l| !l.starts_with('#')).count();
        assert_eq!(
            samples,
            7 + Stats::GAUGES.len()
                + Stats::COUNTERS.len()
                + Stats::BY_CODE.len() * ERROR_CODES.len()
                + UpstreamMethod::ALL.len()
        );
        let map = values(&stats, &local);
        assert_eq!(map.len(), samples);
    }
}
