//! Process-wide counters behind `outpost stats`, `GetStats` and `/metrics`.
//!
//! Every counter is declared once, in the [`counters!`] table at the bottom:
//! its field (bumped with [`Stats::add`] by the layer that owns it), its
//! Prometheus help text and, for the older counters, the typed field of
//! `GetStatsResponse` that carries it too. The table generates the [`Stats`]
//! struct, [`Stats::COUNTERS`] / [`Stats::BY_METHOD`] (which `/metrics` and
//! the `GetStats` map are rendered from) and [`Stats::fill_admin_fields`].

use std::sync::atomic::{AtomicU64, Ordering};

use crate::admin_proto::GetStatsResponse;

pub use method::UpstreamMethod;

mod method;

/// One plain counter of the table, as exporters see it.
pub struct Counter {
    /// Prometheus name: `outpost_<field>_total`.
    pub metric: &'static str,
    /// Prometheus help text.
    pub help: &'static str,
    /// Reads the counter.
    pub read: fn(&Stats) -> u64,
}

/// One per-status-code counter family of the table (label `code`).
pub struct CodeCounter {
    /// Prometheus name: `outpost_<field>_total`.
    pub metric: &'static str,
    /// Prometheus help text.
    pub help: &'static str,
    /// Reads the counter of one code.
    pub read: fn(&Stats, tonic::Code) -> u64,
}

/// One per-method counter family of the table (label `method`).
pub struct MethodCounter {
    /// Prometheus name: `outpost_<field>_total`.
    pub metric: &'static str,
    /// Prometheus help text.
    pub help: &'static str,
    /// Reads the counter of one method.
    pub read: fn(&Stats, UpstreamMethod) -> u64,
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

    /// Sets a gauge.
    pub fn set(gauge: &AtomicU64, value: u64) {
        gauge.store(value, Ordering::Relaxed);
    }

    /// Counts one upstream call of `method`.
    pub fn upstream_call(&self, method: UpstreamMethod) {
        Stats::add(&self.upstream_calls[method.index()], 1);
    }

    /// Counts one completed client call that ended with `code` (the
    /// observer layer, `crate::status::observe`).
    pub fn rpc_completed(&self, error: Option<tonic::Code>) {
        Stats::add(&self.rpc_calls, 1);
        if let Some(code) = error {
            Stats::add(&self.rpc_errors[code as usize], 1);
        }
    }

    /// Client calls that ended with an error status, every code.
    pub fn rpc_errors_total(&self) -> u64 {
        self.rpc_errors.iter().map(Stats::get).sum()
    }
}

/// Declares the counters. Each row is
/// `/// doc` `field: "Prometheus help"` and, for counters that
/// `GetStatsResponse` also carries as a typed field (kept for wire
/// compatibility), `, admin proto_field`. Rows in `by_method` are arrays with
/// one counter per [`UpstreamMethod`]; rows in `by_code` one per gRPC status
/// code (label `code`, see `crate::status::codes`); rows in `gauges` are current values
/// (`outpost_<field>`, no `_total`). Row order is `/metrics` order.
macro_rules! counters {
    (
        plain {
            $(
                $(#[doc = $doc:literal])*
                $field:ident: $help:literal $(, admin $admin:ident)?;
            )*
        }
        by_method {
            $(
                $(#[doc = $mdoc:literal])*
                $mfield:ident: $mhelp:literal $(, admin $madmin:ident)?;
            )*
        }
        by_code {
            $(
                $(#[doc = $cdoc:literal])*
                $cfield:ident: $chelp:literal;
            )*
        }
        gauges {
            $(
                $(#[doc = $gdoc:literal])*
                $gfield:ident: $ghelp:literal;
            )*
        }
    ) => {
        /// Counters since start-up, and a few gauges. Each field says which
        /// layer bumps it.
        #[derive(Debug, Default)]
        pub struct Stats {
            $( $(#[doc = $doc])* pub $field: AtomicU64, )*
            $( $(#[doc = $mdoc])* pub $mfield: [AtomicU64; UpstreamMethod::ALL.len()], )*
            $( $(#[doc = $cdoc])* pub $cfield: [AtomicU64; 17], )*
            $( $(#[doc = $gdoc])* pub $gfield: AtomicU64, )*
        }

        impl Stats {
            /// Every gauge (a current value, not a total), in table order;
            /// Prometheus name `outpost_<field>`.
            pub const GAUGES: &'static [Counter] = &[
                $( Counter {
                    metric: concat!("outpost_", stringify!($gfield)),
                    help: $ghelp,
                    read: |s| Stats::get(&s.$gfield),
                }, )*
            ];

            /// Every plain counter, in table order.
            pub const COUNTERS: &'static [Counter] = &[
                $( Counter {
                    metric: concat!("outpost_", stringify!($field), "_total"),
                    help: $help,
                    read: |s| Stats::get(&s.$field),
                }, )*
            ];

            /// Every per-method counter family, in table order.
            pub const BY_METHOD: &'static [MethodCounter] = &[
                $( MethodCounter {
                    metric: concat!("outpost_", stringify!($mfield), "_total"),
                    help: $mhelp,
                    read: |s, m| Stats::get(&s.$mfield[m.index()]),
                }, )*
            ];

            /// Every per-code counter family, in table order (indexed by
            /// `tonic::Code as usize`; OK is never counted).
            pub const BY_CODE: &'static [CodeCounter] = &[
                $( CodeCounter {
                    metric: concat!("outpost_", stringify!($cfield), "_total"),
                    help: $chelp,
                    read: |s, c| Stats::get(&s.$cfield[c as usize]),
                }, )*
            ];

            /// Copies the counters that `GetStatsResponse` has typed fields
            /// for (older clients and the tests read those fields).
            pub fn fill_admin_fields(&self, response: &mut GetStatsResponse) {
                $( $( response.$admin = Stats::get(&self.$field); )? )*
                $( $(
                    response.$madmin = UpstreamMethod::ALL
                        .iter()
                        .map(|m| (m.name().to_string(), Stats::get(&self.$mfield[m.index()])))
                        .collect();
                )? )*
            }
        }
    };
}

counters! {
    plain {
        /// Local CAS reads that found the blob (local store).
        cas_hits: "CAS reads served from the local store.", admin cas_hits;
        /// Local CAS reads that did not find the blob (local store).
        cas_misses: "CAS reads the local store could not serve.", admin cas_misses;
        /// GetActionResult calls answered with a result (ActionCache service).
        action_cache_hits: "GetActionResult calls answered with a result.",
            admin action_cache_hits;
        /// GetActionResult calls answered NOT_FOUND (ActionCache service).
        action_cache_misses: "GetActionResult calls answered NOT_FOUND.",
            admin action_cache_misses;
        /// Entries evicted to stay under the quota (local store).
        evicted_entries: "Entries evicted to stay under the quota.", admin evicted_blobs;
        /// Bytes evicted to stay under the quota (local store).
        evicted_bytes: "Bytes evicted to stay under the quota.", admin evicted_bytes;
        /// Blobs verified and committed (local store).
        blobs_written: "Blobs verified and stored locally.", admin blobs_written;
        /// Bytes verified and committed (local store).
        bytes_written: "Bytes verified and stored locally.", admin bytes_written;
        /// Writes refused because data and digest disagreed (local store).
        digest_mismatches: "Writes refused because data and digest disagreed.",
            admin digest_mismatches;
        /// Action results dropped because an output was gone (completeness check).
        stale_action_results: "Action results dropped because an output was gone.",
            admin stale_action_results;
        /// Upstream calls that failed after retries (upstream client).
        upstream_errors: "Upstream calls that failed after retries.", admin upstream_errors;
        /// Upstream call attempts that were retried (upstream client).
        upstream_retries: "Upstream call attempts that were retried.";
        /// Blob bytes sent to the upstream (upstream store).
        upstream_bytes_sent: "Blob bytes sent to the upstream.", admin upstream_bytes_sent;
        /// Blob bytes received from the upstream (upstream store).
        upstream_bytes_received: "Blob bytes received from the upstream.",
            admin upstream_bytes_received;
        /// Digests answered from the existence cache, without asking upstream.
        existence_cache_hits: "Digests answered by the existence cache.",
            admin existence_cache_hits;
        /// Digests the existence cache had to ask the upstream about.
        existence_cache_misses: "Digests the existence cache asked the upstream about.",
            admin existence_cache_misses;
        /// Reads that joined a fetch already in flight (single-flight).
        single_flight_joins: "Reads that joined an upstream fetch in flight.",
            admin single_flight_joins;
        /// Fetches from the upstream into the local store (read-through).
        upstream_fetches: "Blobs fetched from the upstream into the local store.",
            admin upstream_fetches;
        /// Blobs the proxy uploaded from its own store because the upstream lacked them.
        uploads_from_local:
            "Blobs uploaded from the local store because the upstream lacked them.",
            admin uploads_from_local;
        /// FindMissingBlobs calls sent upstream by the batcher.
        fmb_batches: "Batched FindMissingBlobs calls sent upstream.", admin fmb_batches;
        /// Digests in those batched FindMissingBlobs calls.
        fmb_batched_digests: "Digests in batched FindMissingBlobs calls.",
            admin fmb_batched_digests;
        /// BatchReadBlobs calls sent upstream by the batcher.
        read_batches: "Batched BatchReadBlobs calls sent upstream.", admin read_batches;
        /// Blobs in those batched BatchReadBlobs calls.
        read_batched_blobs: "Blobs in batched BatchReadBlobs calls.", admin read_batched_blobs;
        /// BatchUpdateBlobs calls sent upstream by the batcher.
        write_batches: "Batched BatchUpdateBlobs calls sent upstream.", admin write_batches;
        /// Blobs in those batched BatchUpdateBlobs calls.
        write_batched_blobs: "Blobs in batched BatchUpdateBlobs calls.",
            admin write_batched_blobs;
        /// Execute calls forwarded upstream (execution service).
        executions: "Execute calls forwarded upstream.";
        /// Times a broken Operation stream was reattached with WaitExecution.
        execution_reattaches: "Broken Operation streams reattached with WaitExecution.";
        /// Executions retried after uploading inputs the upstream reported missing.
        missing_input_repairs: "Executions retried after uploading inputs the upstream lacked.";
        /// Blobs uploaded from the local store to repair missing inputs.
        repaired_blobs: "Blobs uploaded from the local store to repair missing inputs.";
        /// Action results whose outputs were queued for prefetch.
        prefetch_jobs: "Finished actions whose outputs were queued for prefetch.";
        /// Prefetch jobs dropped because the queue was full.
        prefetch_dropped: "Prefetch jobs dropped because the queue was full.";
        /// Blobs fetched into the local store by prefetch.
        prefetched_blobs: "Blobs fetched into the local store by prefetch.";
        /// Bytes fetched into the local store by prefetch.
        prefetched_bytes: "Bytes fetched into the local store by prefetch.";
        /// Blobs skipped by prefetch (over the size limit).
        prefetch_skipped: "Output blobs not prefetched (over max_blob_size).";
        /// Blobs skipped by adaptive prefetch while learning (over small_output_size).
        prefetch_skipped_learning:
            "Output blobs not prefetched: over small_output_size while the invocation was learning.";
        /// Blobs skipped by adaptive prefetch: the invocation does not read outputs.
        prefetch_skipped_not_reading:
            "Output blobs not prefetched: the invocation does not read outputs.";
        /// Blobs skipped by adaptive prefetch: a later action took them as input.
        prefetch_skipped_input:
            "Output blobs not prefetched: a later action of the invocation took them as input.";
        /// Outputs (files, directories) of finished actions offered to prefetch.
        prefetch_outputs_offered:
            "Outputs (files and directories) of finished actions offered to prefetch.";
        /// Offered outputs a client read (first read each; prefetch learner).
        prefetch_outputs_read: "Offered outputs a client read (each once).";
        /// Offered outputs a later action of the same invocation took as input.
        prefetch_outputs_consumed:
            "Offered outputs named as inputs in a FindMissingBlobs of the same invocation.";
        /// Output blobs a client read that prefetch had skipped.
        prefetch_missed: "Output blobs a client read after prefetch had skipped them.";
        /// Client reads served from prefetched data (first read of each blob).
        prefetch_hits: "Client reads served from prefetched blobs (first read each).";
        /// Client reads that waited for a prefetch transfer still in flight.
        prefetch_joins: "Client reads that joined a prefetch transfer still in flight (first read each).";
        /// Prefetched bytes evicted before any client read them.
        prefetch_wasted_bytes: "Prefetched bytes evicted before any client read them.";
        /// Times a prefetch transfer waited for client traffic to the
        /// upstream to end (upstream traffic gate).
        prefetch_waits: "Times a prefetch transfer waited for client upstream traffic to end.";
        /// Milliseconds prefetch transfers spent waiting for client traffic.
        prefetch_wait_milliseconds:
            "Milliseconds prefetch transfers spent waiting for client upstream traffic.";
        /// Prefetch transfers a client read joined, which then stopped yielding.
        prefetch_promotions: "Prefetch transfers promoted to client priority by a joining read.";
        /// FetchBlob and FetchDirectory calls (asset service).
        asset_fetches: "Remote Asset FetchBlob and FetchDirectory calls.";
        /// Fetches answered from the local asset index or CAS (asset service).
        asset_fetch_hits: "Remote Asset fetches answered locally.";
        /// Fetches answered by the upstream's asset service (asset service).
        asset_fetch_upstream_hits: "Remote Asset fetches answered by the upstream.";
        /// Fetches answered by downloading from the origin (asset service).
        asset_fetch_origin: "Remote Asset fetches downloaded from the origin.";
        /// Fetches answered with an inline error such as NOT_FOUND (asset service).
        asset_fetch_misses: "Remote Asset fetches answered with an inline error.";
        /// PushBlob and PushDirectory calls recorded (asset service).
        asset_pushes: "Remote Asset pushes recorded.";
        /// Asset entries dropped because a blob they keep alive left (local store).
        asset_entries_dropped:
            "Remote Asset entries dropped because content they name was evicted or lost.";
        /// Remote Asset downloads from origin URLs started (origin fetcher).
        origin_fetches: "Remote Asset downloads from origin URLs started.";
        /// Origin downloads where every mirror failed (origin fetcher).
        origin_fetch_failures: "Remote Asset origin downloads where every mirror failed.";
        /// Bytes received from origin URLs, stored or not (origin fetcher).
        origin_bytes: "Bytes received from Remote Asset origin URLs.";
        /// Blobs found corrupt on disk (hash mismatch) and removed (local store).
        corrupt_blobs: "Blobs found corrupt on disk and removed.";
        /// Interrupted uploads dropped: expired, over the cap, or to make room
        /// (ByteStream service).
        parked_uploads_dropped:
            "Interrupted uploads dropped (expired, over the cap, or to make room).";
        /// Upstream batch requests sent on their own because too many batchers
        /// were live (upstream batchers).
        unbatched_upstream_requests:
            "Upstream batch requests sent unbatched because too many batchers were live.";
        // Authentication on Outpost's own listener (auth layer, src/auth/).
        /// Calls admitted with a credential (token, password or certificate).
        auth_accepted: "Calls admitted with a credential (token, password or client certificate).";
        /// Calls refused: no credential where one is required (auth layer).
        auth_failures_missing: "Calls refused UNAUTHENTICATED: no (supported) credential.";
        /// Calls refused: a bearer token the tokens file does not list (auth layer).
        auth_failures_unknown_token: "Calls refused UNAUTHENTICATED: unknown or revoked bearer token.";
        /// Calls refused: wrong htpasswd user or password (auth layer).
        auth_failures_bad_password: "Calls refused UNAUTHENTICATED: wrong user or password (HTTP basic).";
        /// Calls refused: a client certificate no rule names (auth layer).
        auth_failures_unknown_certificate:
            "Calls refused UNAUTHENTICATED: client certificate matching no rule.";
        /// Calls refused PERMISSION_DENIED: the role does not allow the RPC (auth layer).
        auth_denied: "Calls refused PERMISSION_DENIED: the credential's role does not allow them.";
        /// Attempts delayed after repeated failures from one address (auth layer).
        auth_slowed_down: "Authentication attempts delayed after repeated failures from the address.";
        /// Tokens/htpasswd files re-read and swapped in (auth layer).
        auth_reloads: "Credential files re-read and swapped in.";
        /// Tokens/htpasswd files that failed to re-read; the old ones stay (auth layer).
        auth_reload_failures: "Credential files that failed to re-read (the previous ones stay).";
        /// Calls that waited for one of their client's call slots (limits layer).
        client_limit_waits:
            "Calls that waited for a slot: their client had max_calls_per_client calls open.";
        /// Calls refused RESOURCE_EXHAUSTED after queue_timeout (limits layer).
        client_limit_refusals:
            "Calls refused (RESOURCE_EXHAUSTED) after waiting queue_timeout for a slot.";
        /// TLS handshakes completed on Outpost's listeners (TLS listener).
        tls_handshakes: "TLS handshakes completed on Outpost's listeners.";
        /// TLS handshakes that failed or timed out: plaintext clients,
        /// untrusted or missing client certificates (TLS listener).
        tls_handshake_failures:
            "TLS handshakes that failed or timed out (e.g. a missing or untrusted client certificate).";
        /// Certificate/key/client CA re-reads that took effect (TLS acceptor).
        tls_reloads: "TLS certificate reloads that took effect.";
        /// Re-reads refused because a file was bad; the old settings stayed.
        tls_reload_failures: "TLS certificate reloads refused (bad file; the previous certificate stays).";
        /// Blobs put in the upload queue (write-back queue).
        write_back_queued: "Blobs put in the write-back upload queue.";
        /// Queued blobs uploaded to the upstream (write-back uploader).
        write_back_uploaded: "Queued blobs uploaded to the upstream.";
        /// Bytes of queued blobs uploaded (write-back uploader).
        write_back_uploaded_bytes: "Bytes of queued blobs uploaded to the upstream.";
        /// Queued blobs not sent: the upstream was known to hold them (write-back uploader).
        write_back_skipped: "Queued blobs not sent because the upstream already held them.";
        /// Queued action results forwarded upstream after their blobs (write-back uploader).
        write_back_results_forwarded: "Queued action results forwarded upstream after their outputs.";
        /// Upload attempts that failed and will be retried (write-back uploader).
        write_back_retries: "Write-back upload attempts that failed and were retried.";
        /// Queue entries given up: the blob was lost locally or the upstream
        /// refused it for good; action results depending on them (write-back uploader).
        write_back_failed: "Write-back queue entries given up (blob lost locally, or refused by the upstream).";
        /// Writes acknowledged only after the upstream had them because the
        /// queue was full (write-back store layer).
        write_back_fallbacks: "Writes that went through to the upstream because the upload queue was full.";
        /// Blobs committed zstd-compressed at rest (local store).
        store_compressed_blobs: "Blobs stored zstd-compressed at rest.";
        /// Plain bytes of the blobs committed compressed (local store).
        store_compressed_plain_bytes: "Uncompressed bytes of the blobs stored compressed at rest.";
        /// Bytes on disk of the blobs committed compressed (local store).
        store_compressed_disk_bytes: "Bytes on disk of the blobs stored compressed at rest.";
        /// Client reads and writes of `compressed-blobs` and compressed batch
        /// entries (ByteStream and CAS services).
        client_compressed_blobs: "Blobs clients read or wrote zstd-compressed (ByteStream compressed-blobs and batch entries).";
        /// Bytes crossing the WAN compressed, as sent or received (upstream store).
        upstream_compressed_wire_bytes: "Bytes of blobs that crossed the WAN zstd-compressed, as sent or received.";
        /// The same blobs' uncompressed bytes (upstream store).
        upstream_compressed_plain_bytes: "Uncompressed bytes of the blobs that crossed the WAN compressed.";
        /// Blob bytes client reads got from the local store: in proxy mode,
        /// bytes that did not cross the WAN (read-through layer; standalone:
        /// `store::served`).
        served_local_bytes: "Blob bytes client reads got from the local store (in proxy mode they did not cross the WAN).";
        /// Client read calls (ByteStream reads, batch reads) served from the
        /// local store: each would have cost at least one round trip upstream.
        served_local_reads: "Client read calls served from the local store.";
        /// Client calls completed, every service (observer layer).
        rpc_calls: "Client calls completed (every service).";
    }
    by_method {
        /// Upstream calls started, by [`UpstreamMethod`] (upstream client).
        upstream_calls: "Upstream calls, by method (each retry counts).", admin upstream_calls;
    }
    by_code {
        /// Client calls that ended with an error status, by code (observer layer).
        rpc_errors: "Client calls that ended with an error status, by gRPC code (an action-cache miss, GetActionResult NOT_FOUND, is not one).";
    }
    gauges {
        /// Invocations the prefetch learner remembers, learning (prefetch learner).
        prefetch_invocations_learning:
            "Build invocations whose output reads adaptive prefetch is still learning.";
        /// Invocations that read their outputs: full prefetch (prefetch learner).
        prefetch_invocations_reading:
            "Build invocations that read their outputs (full prefetch).";
        /// Invocations that do not read their outputs (prefetch learner).
        prefetch_invocations_not_reading:
            "Build invocations that do not read their outputs (history-based prefetch only).";
        /// Calls waiting for one of their client's call slots now (limits layer).
        client_limit_waiting: "Calls waiting now for a slot under max_calls_per_client.";
        /// Calls holding one of their client's call slots now (limits layer).
        client_calls_open: "Calls in progress (each holds one of its client's call slots).";
        /// Blobs waiting in the upload queue (write-back queue).
        write_back_queued_blobs: "Blobs waiting in the write-back upload queue.";
        /// Bytes of the blobs waiting in the upload queue (write-back queue).
        write_back_queued_bytes: "Bytes of the blobs waiting in the write-back upload queue.";
        /// Action results waiting for their blobs' upload (write-back queue).
        write_back_queued_results: "Action results waiting in the write-back queue for their outputs' upload.";
        /// Age of the oldest queue entry, updated every second (write-back queue).
        write_back_oldest_age_seconds: "Age in seconds of the oldest entry in the write-back upload queue.";
        /// 1 while the upstream answers, 0 while it is down or in standalone
        /// mode (status sampler, from the upstream's health).
        upstream_healthy: "1 while the upstream answers its calls, else 0 (also 0 without an upstream).";
        /// Measured round-trip time to the upstream (status sampler, from
        /// `upstream::link`).
        upstream_rtt_microseconds: "Measured round-trip time to the upstream, microseconds (0 until measured).";
        /// Measured download throughput from the upstream (status sampler,
        /// from `upstream::link`).
        upstream_throughput_bytes_per_second: "Measured download throughput from the upstream, bytes per second (0 until measured).";
        /// Seconds since start (status sampler).
        uptime_seconds: "Seconds since the server started.";
    }
}

#[cfg(test)]
mod tests;
