//! An in-process fake REAPI upstream for tests of Outpost's proxy mode.
//!
//! [`FakeUpstream::start`] serves Capabilities, ContentAddressableStorage,
//! ByteStream and ActionCache (tonic, the `bazel-remote-apis` server traits)
//! on `127.0.0.1:0`, with blobs and action results in memory. Uploads are
//! verified (SHA-256 and size) before they are stored. It also serves
//! Execution (Execute, WaitExecution) and google.longrunning Operations with
//! deterministic fake outputs: see [`execution`].
//!
//! What tests get from it:
//! - **Call log**: every call, per [`Method`], with its instance name, the
//!   request headers it arrived with, the digests it named, payload bytes in
//!   and out and its final code ([`FakeUpstream::calls`], [`FakeUpstream::count`],
//!   [`FakeUpstream::digests_per_call`], …; [`FakeUpstream::reset_stats`]).
//!   Raw TCP bytes and accepted connections are counted too.
//! - **Latency** per call, for all methods or one ([`FakeUpstream::set_latency`],
//!   [`FakeUpstream::set_method_latency`]), and a delay per ByteStream Read chunk.
//! - **Errors**: fail the next N calls (of any method or one), fail a method
//!   until cleared, or abort a Read/Write stream after N bytes
//!   ([`FakeUpstream::fail_next`], [`FakeUpstream::fail_method`],
//!   [`FakeUpstream::abort_next_stream`], [`FakeUpstream::add_fault`]).
//! - **Outages**: [`FakeUpstream::go_down`] closes the listener (connections are
//!   refused) and resets open connections; [`FakeUpstream::blackhole`] accepts
//!   but never answers (a partition); [`FakeUpstream::come_up`] serves again on
//!   the same port; [`FakeUpstream::drop_connections`] resets open connections.
//! - **Gate**: [`FakeUpstream::pause`] parks calls at entry until
//!   [`FakeUpstream::resume`]; [`FakeUpstream::wait_parked`] waits until N are
//!   parked, which makes single-flight and batching tests deterministic.
//! - **Capabilities** are configurable (batch limit, digest functions,
//!   action-cache updates) and enforced (Batch* over the limit are refused).
//! - **Compression** (`compression`): [`FakeUpstream::set_compression`]
//!   advertises and serves zstd (ByteStream `compressed-blobs` both ways,
//!   compressed batch entries); [`FakeUpstream::set_corrupt_compressed`]
//!   garbles what it sends compressed; [`Call::compressed_blobs`] and the
//!   calls' payload bytes (compressed as they crossed) count the wire.
//! - **Execution** ([`execution`]): Execute runs actions from the CAS
//!   with deterministic outputs and caches the results; missing inputs give
//!   FAILED_PRECONDITION with MISSING violations; delays, held jobs, broken
//!   streams (reattach with WaitExecution), injected failures, CancelOperation
//!   and counters of streams the client dropped; [`TestAction`] builds actions.
//! - **Remote Logstream** (`logstream`): CreateLogStream, and ByteStream
//!   Write / tailing Read / QueryWriteStatus of log names, with a count of
//!   readers in progress ([`FakeUpstream::active_log_readers`]).
//! - **Seeding**: [`FakeUpstream::put_blob`], [`FakeUpstream::put_message`],
//!   [`FakeUpstream::put_blob_unchecked`] (e.g. corrupt data),
//!   [`FakeUpstream::put_action_result`], and the matching getters.
//!
//! Every RPC goes through one prologue (`call`): the call is logged, waits
//! while paused, sleeps the latency and may fail with an injected fault
//! before its handler runs; no handler repeats any of that.
//!
//! # Layout
//! - `method`: [`Method`], the RPCs the fake serves.
//! - `call`: the shared prologue and what each request type logs.
//! - `control`: latency, faults and the pause gate that the prologue applies.
//! - `log`: the call log and its queries.
//! - `state`: blobs, action results, partial uploads; seeding.
//! - `net`: the listener and connections that outages stall or reset.
//! - `cas`, `bytestream`, `action_cache`: the cache services.
//! - `compression`: the zstd switches, encoder and bounded decoder.
//! - `logstream`: LogStreamService and the log side of ByteStream.
//! - [`execution`]: Execution and Operations.

mod action_cache;
mod bytestream;
mod call;
mod cas;
mod compression;
mod control;
pub mod execution;
mod log;
mod logstream;
mod method;
mod net;
mod state;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bazel_remote_apis::build::bazel::semver::SemVer;
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::{Channel, Endpoint, Server};

use crate::{bs, re};
use bazel_remote_apis::build::bazel::remote::logstream::v1::log_stream_service_server::LogStreamServiceServer;
use re::action_cache_server::ActionCacheServer;
use re::capabilities_server::CapabilitiesServer;
use re::content_addressable_storage_server::ContentAddressableStorageServer;
use re::digest_function::Value as DigestFunction;

pub use crate::workload::digest as digest_of;
pub use control::{Fault, FaultAction};
pub use execution::{
    EXECUTE_METADATA_TYPE, EXECUTE_RESPONSE_TYPE, ErrorDelivery, ExecuteRecord,
    PRECONDITION_FAILURE_TYPE, PreconditionFailure, StreamEnd, TestAction, Violation,
    missing_digests, missing_digests_of, missing_status, operation_metadata, operation_response,
    operation_stage, output_content, pack_any, rpc_to_status, status_details, stdio_content,
};
pub use log::Call;
pub use method::Method;
pub use net::NetMode;
use state::{Shared, lock};

/// gRPC message limit of the fake, both ways: large enough that Batch* limits
/// are enforced by the fake's own check (with a clear message), not by tonic.
const MAX_MESSAGE: usize = 64 << 20;
/// The header carrying a serialized `RequestMetadata`.
pub const REQUEST_METADATA_HEADER: &str = "build.bazel.remote.execution.v2.requestmetadata-bin";

/// The one service type behind every gRPC service of the fake.
#[derive(Clone)]
struct Svc {
    s: Arc<Shared>,
}

/// Polls `done` every 2 ms until it holds (true) or `timeout` passes (false):
/// the one way the fake's `wait_*` helpers wait.
async fn poll_until(timeout: Duration, mut done: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if done() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}
// ---------------------------------------------------------------- the fake

/// The capabilities the fake starts with: SHA-256, 4 MiB batches, action
/// cache updates allowed, no compressors, execution disabled, API 2.0–2.3.
pub fn default_capabilities() -> re::ServerCapabilities {
    let sha256 = DigestFunction::Sha256 as i32;
    re::ServerCapabilities {
        cache_capabilities: Some(re::CacheCapabilities {
            digest_functions: vec![sha256],
            action_cache_update_capabilities: Some(re::ActionCacheUpdateCapabilities {
                update_enabled: true,
            }),
            max_batch_total_size_bytes: 4 << 20,
            symlink_absolute_path_strategy: re::symlink_absolute_path_strategy::Value::Disallowed
                as i32,
            ..Default::default()
        }),
        execution_capabilities: Some(re::ExecutionCapabilities {
            digest_function: sha256,
            exec_enabled: false,
            digest_functions: vec![sha256],
            ..Default::default()
        }),
        low_api_version: Some(SemVer {
            major: 2,
            minor: 0,
            ..Default::default()
        }),
        high_api_version: Some(SemVer {
            major: 2,
            minor: 3,
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// A running fake upstream. Dropping it stops it (listener closed,
/// connections reset).
pub struct FakeUpstream {
    s: Arc<Shared>,
    server: JoinHandle<()>,
}

impl FakeUpstream {
    /// Starts serving on a fresh `127.0.0.1` port.
    pub async fn start() -> FakeUpstream {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("fake upstream binds 127.0.0.1:0");
        let addr = listener.local_addr().expect("local addr");
        let (conn_tx, conn_rx) = mpsc::channel(64);
        let s = Arc::new(Shared::new(addr, conn_tx, default_capabilities()));
        let svc = Svc { s: s.clone() };
        let (execution, operations) = execution::services(svc.clone());
        let router = Server::builder()
            .initial_stream_window_size(16 << 20)
            .initial_connection_window_size(32 << 20)
            .max_frame_size(1 << 20)
            .add_service(CapabilitiesServer::new(svc.clone()))
            .add_service(
                ContentAddressableStorageServer::new(svc.clone())
                    .max_decoding_message_size(MAX_MESSAGE)
                    .max_encoding_message_size(MAX_MESSAGE),
            )
            .add_service(
                bs::byte_stream_server::ByteStreamServer::new(svc.clone())
                    .max_decoding_message_size(MAX_MESSAGE)
                    .max_encoding_message_size(MAX_MESSAGE),
            )
            .add_service(
                ActionCacheServer::new(svc.clone())
                    .max_decoding_message_size(MAX_MESSAGE)
                    .max_encoding_message_size(MAX_MESSAGE),
            )
            .add_service(LogStreamServiceServer::new(svc))
            .add_service(execution)
            .add_service(operations);
        let server = tokio::spawn(async move {
            let _ = router
                .serve_with_incoming(ReceiverStream::new(conn_rx))
                .await;
        });
        net::listen(&s, listener);
        FakeUpstream { s, server }
    }

    /// The address it serves on (the same across outages).
    pub fn addr(&self) -> SocketAddr {
        self.s.addr
    }

    /// `grpc://127.0.0.1:PORT`, for Outpost's `--upstream`.
    pub fn url(&self) -> String {
        format!("grpc://{}", self.s.addr)
    }

    /// A client channel to the fake (connected now).
    pub async fn channel(&self) -> Channel {
        self.endpoint()
            .connect()
            .await
            .expect("connect to fake upstream")
    }

    /// A client channel that connects on first use.
    pub fn lazy_channel(&self) -> Channel {
        self.endpoint().connect_lazy()
    }

    fn endpoint(&self) -> Endpoint {
        Endpoint::from_shared(format!("http://{}", self.s.addr))
            .expect("endpoint")
            .connect_timeout(Duration::from_secs(5))
            .tcp_nodelay(true)
            .initial_stream_window_size(16 << 20)
            .initial_connection_window_size(32 << 20)
    }

    // ------------------------------------------------------------ capabilities

    /// The capabilities advertised now.
    pub fn capabilities(&self) -> re::ServerCapabilities {
        self.s.caps()
    }

    /// Replaces the advertised (and enforced) capabilities.
    pub fn set_capabilities(&self, caps: re::ServerCapabilities) {
        *lock(&self.s.capabilities) = caps;
    }

    /// Advertised and enforced on Batch* (0 = no limit).
    pub fn set_max_batch_total_size_bytes(&self, max: i64) {
        let mut caps = lock(&self.s.capabilities);
        caps.cache_capabilities
            .get_or_insert_with(Default::default)
            .max_batch_total_size_bytes = max;
    }

    /// Digest functions advertised (cache and execution) and accepted.
    pub fn set_digest_functions(&self, functions: &[DigestFunction]) {
        let list: Vec<i32> = functions.iter().map(|f| *f as i32).collect();
        let mut caps = lock(&self.s.capabilities);
        caps.cache_capabilities
            .get_or_insert_with(Default::default)
            .digest_functions = list.clone();
        let exec = caps
            .execution_capabilities
            .get_or_insert_with(Default::default);
        exec.digest_function = list.first().copied().unwrap_or(0);
        exec.digest_functions = list;
    }

    /// Whether UpdateActionResult is accepted (else PERMISSION_DENIED).
    pub fn set_action_cache_updates(&self, enabled: bool) {
        let mut caps = lock(&self.s.capabilities);
        caps.cache_capabilities
            .get_or_insert_with(Default::default)
            .action_cache_update_capabilities = Some(re::ActionCacheUpdateCapabilities {
            update_enabled: enabled,
        });
    }
}

impl Drop for FakeUpstream {
    fn drop(&mut self) {
        net::shut(&self.s);
        self.server.abort();
    }
}
