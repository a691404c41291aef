//! Black-box tests: each starts a real Outpost (in process on 127.0.0.1:0, or
//! the `outpost` binary where a separate process is needed) and talks REAPI to
//! it over gRPC. One file per topic in `tests/suite/`; the shared fixture is
//! in `tests/common/`, the fake upstream and the process harness in
//! `crates/outpost-testkit`.

mod common;

mod suite {
    mod abandoned_uploads;
    mod action_cache;
    mod asset;
    mod asset_origin;
    mod asset_proxy;
    mod auth;
    mod auth_cli;
    mod bad_input;
    mod bitrot;
    mod bytestream;
    mod capabilities;
    mod cas;
    mod client_docs;
    mod client_limits;
    mod compressed_blobs;
    mod compression_at_rest;
    mod crash;
    mod digest_functions;
    mod doctor;
    mod eviction;
    mod execution;
    mod grafana_dashboard;
    mod large_blob;
    mod listener_tls;
    mod logging;
    mod logstream;
    mod persistence;
    mod prefetch_policy;
    mod prefetch_yield;
    mod proxy;
    mod ready_file;
    mod sighup;
    mod status_json;
    mod status_page;
    mod streaming_reads;
    mod tls;
    mod unix_socket;
    mod upstream_compression;
    mod wire_input;
    mod write_back;
}
