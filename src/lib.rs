//! Outpost: a REAPI v2 caching sidecar that makes remote builds fast on slow links.
//!
//! # Layout
//! - [`asset`]: the Remote Asset API (Fetch, Push): asset index, origin downloads.
//! - [`auth`]: credentials, roles, and the per-RPC check on Outpost's own listener.
//! - [`cli`]: client commands of the binary (`outpost stats`) and their formatting.
//! - [`client`]: connecting to a server (stats, tests, benches).
//! - [`config`]: defaults, TOML file and flags merged into one [`config::Config`]
//!   (`defaults`, `units`, `file`, `upstream`, `prefetch` inside).
//! - [`server`]: builds the store stack and services; TCP + unix socket; shutdown.
//! - [`stack`]: which store layers and services each mode (standalone, proxy) uses.
//! - [`service`]: one thin gRPC adapter per REAPI service (and Outpost's Admin).
//! - [`store`]: the [`store::BlobStore`] / [`store::ActionResultStore`] layers:
//!   local RocksDB store, LRU index, blob files, action-result completeness.
//! - [`compression`]: zstd, bounded and streaming: wire, at rest, over the WAN.
//! - [`context`]: per-request instance name and forwardable headers.
//! - [`decode_status`]: a request that does not decode answers INVALID_ARGUMENT.
//! - [`digest`]: validated digests and incremental hashing.
//! - [`limits`]: per-client call slots (a runaway client waits, then RESOURCE_EXHAUSTED).
//! - [`listen`]: binding the gRPC listeners (TCP, TLS, unix socket).
//! - [`logging`]: the binary's log output (text or JSON lines) and fatal-error line.
//! - [`metrics`]: Prometheus text at `/metrics`.
//! - [`peer`]: who is on the other end of a connection (address, transport,
//!   client certificate), carried into every request.
//! - [`reload`]: re-reading certificates and credential files on change or SIGHUP.
//! - [`prefetch`]: pulling finished actions' outputs into the local store, adaptively
//!   (per invocation: does the client read them?).
//! - [`execution`]: execution passthrough: input check, MISSING repair, relay, caching.
//! - [`reapi`]: REAPI domain helpers: resource names, the Directory-tree walker,
//!   Actions, ActionResults and Operations.
//! - [`error`]: the crate's error type and its one mapping to gRPC status.
//! - [`stats`]: the one `counters!` table behind `Stats`, `/metrics` and `GetStats`.
//! - [`status`]: the status report behind `/status` (JSON) and `/` (HTML page).
//! - [`tasks`]: background tasks that shutdown cancels and drains.
//! - [`tls`]: TLS and mutual TLS on Outpost's own listeners, reloaded on change.
//! - [`upstream`]: the upstream connection, health, and request batching.

pub mod asset;
pub mod auth;
pub mod cli;
pub mod client;
pub mod compression;
pub mod config;
pub mod context;
pub mod decode_status;
pub mod digest;
pub mod error;
pub mod execution;
pub mod limits;
pub mod listen;
pub mod logging;
pub mod metrics;
pub mod peer;
pub mod prefetch;
pub mod reapi;
pub mod reload;
pub mod server;
pub mod service;
pub mod stack;
pub mod stats;
pub mod status;
pub mod store;
pub mod tasks;
pub mod tls;
pub mod upstream;

/// Generated code for Outpost's own Admin service (proto/outpost/admin/v1).
pub mod admin_proto {
    #![allow(missing_docs, clippy::all)]
    tonic::include_proto!("outpost.admin.v1");
}
