//! `outpost stats`: asks a running server for `GetStats` and prints it.
//!
//! Every number is read one way: from the response's `metrics` map, by its
//! Prometheus name (as at `/metrics`). Only the server's identity (version,
//! uptime, upstream) comes from typed fields, because it is not a metric.

use crate::admin_proto::admin_client::AdminClient;
use crate::admin_proto::{GetStatsRequest, GetStatsResponse};
use crate::metrics::sample_key;
use crate::stats::UpstreamMethod;

use super::human_bytes;

/// Connects to `server` (`grpc://HOST:PORT` or `unix:///PATH`) and prints
/// its stats, sending `authorization: Bearer <token>` when given a token.
pub async fn run(server: &str, token: Option<&str>) -> anyhow::Result<()> {
    let channel = crate::client::connect(server).await?;
    let mut request = tonic::Request::new(GetStatsRequest {});
    if let Some(token) = token {
        let mut value: tonic::metadata::AsciiMetadataValue = format!("Bearer {token}")
            .parse()
            .map_err(|_| anyhow::anyhow!("the token is not a valid header value"))?;
        value.set_sensitive(true);
        request.metadata_mut().insert("authorization", value);
    }
    let response = AdminClient::new(channel)
        .get_stats(request)
        .await?
        .into_inner();
    print!("{}", report(&response, server));
    Ok(())
}

/// The text `outpost stats` prints for `s`, fetched from `server`.
pub fn report(s: &GetStatsResponse, server: &str) -> String {
    let m = |name: &str| s.metrics.get(name).copied().unwrap_or(0);
    let pct = |a: u64, b: u64| {
        if b == 0 {
            0.0
        } else {
            100.0 * a as f64 / b as f64
        }
    };
    let avg = |n: u64, calls: u64| {
        if calls == 0 {
            0.0
        } else {
            n as f64 / calls as f64
        }
    };
    let mut out = String::new();
    let mut line = |text: String| {
        out.push_str(&text);
        out.push('\n');
    };
    line(format!(
        "outpost {} at {server}, up {}s",
        s.version, s.uptime_seconds
    ));
    let (blob_bytes, quota) = (
        m("outpost_store_blob_bytes"),
        m("outpost_store_quota_bytes"),
    );
    line(format!(
        "blobs:           {} ({} of {} quota, {:.1}%)",
        m("outpost_store_blobs"),
        human_bytes(blob_bytes),
        human_bytes(quota),
        pct(blob_bytes, quota)
    ));
    line(format!(
        "action results:  {}",
        m("outpost_store_action_results")
    ));
    line(format!(
        "asset entries:   {} ({}), {} dropped (content gone)",
        m("outpost_store_asset_entries"),
        human_bytes(m("outpost_store_asset_bytes")),
        m("outpost_asset_entries_dropped_total")
    ));
    let (hits, misses) = (m("outpost_cas_hits_total"), m("outpost_cas_misses_total"));
    line(format!(
        "cas reads:       {hits} hits, {misses} misses ({:.1}% hit rate)",
        pct(hits, hits + misses)
    ));
    line(format!(
        "action cache:    {} hits, {} misses, {} dropped (outputs gone)",
        m("outpost_action_cache_hits_total"),
        m("outpost_action_cache_misses_total"),
        m("outpost_stale_action_results_total")
    ));
    line(format!(
        "written:         {} blobs, {}; {} refused (digest mismatch)",
        m("outpost_blobs_written_total"),
        human_bytes(m("outpost_bytes_written_total")),
        m("outpost_digest_mismatches_total")
    ));
    line(format!(
        "evicted:         {} entries, {}",
        m("outpost_evicted_entries_total"),
        human_bytes(m("outpost_evicted_bytes_total"))
    ));
    let refused = [
        "outpost_auth_failures_missing_total",
        "outpost_auth_failures_unknown_token_total",
        "outpost_auth_failures_bad_password_total",
        "outpost_auth_failures_unknown_certificate_total",
    ]
    .map(m);
    line(format!(
        "auth:            {} accepted; {} refused ({} no credential, {} unknown token, {} bad \
         password, {} unknown certificate); {} denied by role; {} slowed down",
        m("outpost_auth_accepted_total"),
        refused.iter().sum::<u64>(),
        refused[0],
        refused[1],
        refused[2],
        refused[3],
        m("outpost_auth_denied_total"),
        m("outpost_auth_slowed_down_total")
    ));
    line(format!(
        "client limits:   {} calls open, {} waited for a slot, {} refused, {} waiting now",
        m("outpost_client_calls_open"),
        m("outpost_client_limit_waits_total"),
        m("outpost_client_limit_refusals_total"),
        m("outpost_client_limit_waiting")
    ));
    if s.upstream.is_empty() {
        line("upstream:        none (standalone cache)".to_string());
        return out;
    }
    line(format!("upstream:        {}", s.upstream));
    let calls: Vec<String> = UpstreamMethod::ALL
        .iter()
        .map(|method| {
            let key = sample_key(
                "outpost_upstream_calls_total",
                Some(("method", method.name())),
            );
            (method.name(), m(&key))
        })
        .filter(|(_, n)| *n > 0)
        .map(|(name, n)| format!("{name} {n}"))
        .collect();
    line(format!(
        "  calls:         {} ({} failed)",
        if calls.is_empty() {
            "none".to_string()
        } else {
            calls.join(", ")
        },
        m("outpost_upstream_errors_total")
    ));
    line(format!(
        "  bytes:         {} sent, {} received",
        human_bytes(m("outpost_upstream_bytes_sent_total")),
        human_bytes(m("outpost_upstream_bytes_received_total"))
    ));
    line(format!(
        "  existence:     {} digests answered from cache, {} asked upstream",
        m("outpost_existence_cache_hits_total"),
        m("outpost_existence_cache_misses_total")
    ));
    line(format!(
        "  fetches:       {} into the local store, {} reads joined one in flight",
        m("outpost_upstream_fetches_total"),
        m("outpost_single_flight_joins_total")
    ));
    line(format!(
        "  uploads:       {} blobs sent from the local store",
        m("outpost_uploads_from_local_total")
    ));
    line(format!(
        "  upload queue:  {} blobs ({}) and {} action results waiting, oldest {}s; \
         {} uploaded ({}), {} already upstream, {} results forwarded, {} retries, {} given up, \
         {} writes went through (queue full)",
        m("outpost_write_back_queued_blobs"),
        human_bytes(m("outpost_write_back_queued_bytes")),
        m("outpost_write_back_queued_results"),
        m("outpost_write_back_oldest_age_seconds"),
        m("outpost_write_back_uploaded_total"),
        human_bytes(m("outpost_write_back_uploaded_bytes_total")),
        m("outpost_write_back_skipped_total"),
        m("outpost_write_back_results_forwarded_total"),
        m("outpost_write_back_retries_total"),
        m("outpost_write_back_failed_total"),
        m("outpost_write_back_fallbacks_total")
    ));
    line(format!(
        "  execution:     {} forwarded, {} reattached, {} repaired ({} blobs)",
        m("outpost_executions_total"),
        m("outpost_execution_reattaches_total"),
        m("outpost_missing_input_repairs_total"),
        m("outpost_repaired_blobs_total")
    ));
    line(format!(
        "  prefetch:      {} actions, {} blobs ({}), {} read by clients ({} while in flight), {} wasted, {} dropped",
        m("outpost_prefetch_jobs_total"),
        m("outpost_prefetched_blobs_total"),
        human_bytes(m("outpost_prefetched_bytes_total")),
        m("outpost_prefetch_hits_total") + m("outpost_prefetch_joins_total"),
        m("outpost_prefetch_joins_total"),
        human_bytes(m("outpost_prefetch_wasted_bytes_total")),
        m("outpost_prefetch_dropped_total")
    ));
    let (offered, read) = (
        m("outpost_prefetch_outputs_offered_total"),
        m("outpost_prefetch_outputs_read_total"),
    );
    line(format!(
        "  adaptive:      {read} of {offered} outputs read ({:.1}%), {} taken as input; \
         skipped {} learning, {} not reading, {} input, {} too large; {} skipped then read",
        pct(read, offered),
        m("outpost_prefetch_outputs_consumed_total"),
        m("outpost_prefetch_skipped_learning_total"),
        m("outpost_prefetch_skipped_not_reading_total"),
        m("outpost_prefetch_skipped_input_total"),
        m("outpost_prefetch_skipped_total"),
        m("outpost_prefetch_missed_total")
    ));
    line(format!(
        "  invocations:   {} learning, {} reading, {} not reading",
        m("outpost_prefetch_invocations_learning"),
        m("outpost_prefetch_invocations_reading"),
        m("outpost_prefetch_invocations_not_reading")
    ));
    line(format!(
        "  yielding:      prefetch waited for clients {} times ({:.1} s), {} transfers promoted by a joining client",
        m("outpost_prefetch_waits_total"),
        m("outpost_prefetch_wait_milliseconds_total") as f64 / 1000.0,
        m("outpost_prefetch_promotions_total")
    ));
    let batches = |calls: &str, items: &str| {
        let (calls, items) = (m(calls), m(items));
        (calls, avg(items, calls))
    };
    let fmb = batches(
        "outpost_fmb_batches_total",
        "outpost_fmb_batched_digests_total",
    );
    let read = batches(
        "outpost_read_batches_total",
        "outpost_read_batched_blobs_total",
    );
    let write = batches(
        "outpost_write_batches_total",
        "outpost_write_batched_blobs_total",
    );
    line(format!(
        "  batching:      FindMissingBlobs {} calls (avg {:.1} digests), BatchRead {} (avg {:.1}), BatchUpdate {} (avg {:.1})",
        fmb.0, fmb.1, read.0, read.1, write.0, write.1
    ));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_every_number_from_the_metrics_map() {
        let mut s = GetStatsResponse {
            version: "1.2.3".into(),
            upstream: "https://up:443".into(),
            ..Default::default()
        };
        for (k, v) in [
            ("outpost_store_blobs", 3),
            ("outpost_store_asset_entries", 2),
            ("outpost_asset_entries_dropped_total", 1),
            ("outpost_cas_hits_total", 3),
            ("outpost_cas_misses_total", 1),
            ("outpost_upstream_calls_total{method=\"Execute\"}", 2),
            (
                "outpost_upstream_calls_total{method=\"FindMissingBlobs\"}",
                5,
            ),
            ("outpost_fmb_batches_total", 2),
            ("outpost_fmb_batched_digests_total", 9),
            ("outpost_prefetch_outputs_offered_total", 8),
            ("outpost_prefetch_outputs_read_total", 2),
            ("outpost_prefetch_skipped_not_reading_total", 5),
            ("outpost_prefetch_invocations_not_reading", 1),
            ("outpost_auth_accepted_total", 40),
            ("outpost_auth_failures_missing_total", 2),
            ("outpost_auth_failures_bad_password_total", 1),
            ("outpost_auth_denied_total", 3),
            ("outpost_client_limit_waits_total", 6),
            ("outpost_client_limit_refusals_total", 4),
            ("outpost_client_limit_waiting", 2),
            ("outpost_write_back_queued_blobs", 7),
            ("outpost_write_back_queued_results", 1),
            ("outpost_write_back_oldest_age_seconds", 12),
            ("outpost_write_back_uploaded_total", 30),
            ("outpost_write_back_fallbacks_total", 2),
        ] {
            s.metrics.insert(k.to_string(), v);
        }
        let text = report(&s, "grpc://127.0.0.1:8980");
        assert!(
            text.starts_with("outpost 1.2.3 at grpc://127.0.0.1:8980, up 0s\nblobs:           3 ")
        );
        assert!(text.contains("3 hits, 1 misses (75.0% hit rate)"), "{text}");
        assert!(text.contains("\nasset entries:   2 ("), "{text}");
        assert!(text.contains("1 dropped (content gone)"), "{text}");
        assert!(
            text.contains("calls:         FindMissingBlobs 5, Execute 2 (0 failed)"),
            "{text}"
        );
        assert!(
            text.contains("FindMissingBlobs 2 calls (avg 4.5 digests)"),
            "{text}"
        );
        assert!(
            text.contains("adaptive:      2 of 8 outputs read (25.0%)"),
            "{text}"
        );
        assert!(text.contains("skipped 0 learning, 5 not reading"), "{text}");
        assert!(
            text.contains(
                "\nauth:            40 accepted; 3 refused (2 no credential, 0 unknown token, \
                 1 bad password, 0 unknown certificate); 3 denied by role; 0 slowed down\n"
            ),
            "{text}"
        );
        assert!(
            text.contains(
                "\nclient limits:   0 calls open, 6 waited for a slot, 4 refused, 2 waiting now\n"
            ),
            "{text}"
        );
        assert!(
            text.contains("invocations:   0 learning, 0 reading, 1 not reading"),
            "{text}"
        );
        assert!(
            text.contains(
                "upload queue:  7 blobs (0 B) and 1 action results waiting, oldest 12s; 30 uploaded"
            ),
            "{text}"
        );
        assert!(
            text.contains("2 writes went through (queue full)"),
            "{text}"
        );
    }

    #[test]
    fn a_standalone_cache_stops_after_the_store() {
        let text = report(&GetStatsResponse::default(), "unix:///s");
        assert!(
            text.ends_with("upstream:        none (standalone cache)\n"),
            "{text}"
        );
    }
}
