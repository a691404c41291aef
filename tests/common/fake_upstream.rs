//! An in-process fake REAPI upstream for tests of Outpost's proxy mode.
//!
//! [`FakeUpstream::start`] serves Capabilities, ContentAddressableStorage,
//! ByteStream and ActionCache (tonic, the `bazel-remote-apis` server traits)
//! on `127.0.0.1:0`, with blobs and action results in memory. Uploads are
//! verified (SHA-256 and size) before they are stored. It also serves
//! Execution (Execute, WaitExecution) and google.longrunning Operations with
//! deterministic fake outputs: see `fake_execution.rs` (a child module).
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
//! - **Execution** (`fake_execution.rs`): Execute runs actions from the CAS
//!   with deterministic outputs and caches the results; missing inputs give
//!   FAILED_PRECONDITION with MISSING violations; delays, held jobs, broken
//!   streams (reattach with WaitExecution), injected failures, CancelOperation
//!   and counters of streams the client dropped; [`TestAction`] builds actions.
//! - **Seeding**: [`FakeUpstream::put_blob`], [`FakeUpstream::put_message`],
//!   [`FakeUpstream::put_blob_unchecked`] (e.g. corrupt data),
//!   [`FakeUpstream::put_action_result`], and the matching getters.
//!
//! Include it from a test crate with
//! `#[path = "common/fake_upstream.rs"] pub mod fake_upstream;` (in a file
//! directly under `tests/`) or `pub mod fake_upstream;` inside
//! `tests/common/mod.rs`. It uses only external crates, not `outpost`.
#![allow(dead_code)]

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet, VecDeque};
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU8, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

pub use bazel_remote_apis::build::bazel::remote::execution::v2 as re;
use bazel_remote_apis::build::bazel::semver::SemVer;
pub use bazel_remote_apis::google::bytestream as bs;
use bazel_remote_apis::google::rpc::Status as RpcStatus;
use bytes::Bytes;
use futures::task::AtomicWaker;
use prost::Message;
use sha2::{Digest as _, Sha256};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Notify, mpsc};
use tokio::task::JoinHandle;
use tokio_stream::wrappers::ReceiverStream;
use tonic::metadata::MetadataMap;
use tonic::transport::server::{Connected, TcpConnectInfo};
use tonic::transport::{Channel, Endpoint, Server};
use tonic::{Code, Request, Response, Status, Streaming};

use re::action_cache_server::{ActionCache, ActionCacheServer};
use re::capabilities_server::{Capabilities, CapabilitiesServer};
use re::content_addressable_storage_server::{
    ContentAddressableStorage, ContentAddressableStorageServer,
};
use re::digest_function::Value as DigestFunction;

#[path = "fake_execution.rs"]
mod fake_execution;
#[allow(unused_imports)]
pub use fake_execution::{
    EXECUTE_METADATA_TYPE, EXECUTE_RESPONSE_TYPE, ErrorDelivery, ExecuteRecord,
    PRECONDITION_FAILURE_TYPE, PreconditionFailure, StreamEnd, TestAction, Violation,
    missing_digests, missing_digests_of, missing_status, operation_metadata, operation_response,
    operation_stage, output_content, pack_any, rpc_to_status, status_details, stdio_content,
};

/// gRPC message limit of the fake, both ways: large enough that Batch* limits
/// are enforced by the fake's own check (with a clear message), not by tonic.
const MAX_MESSAGE: usize = 64 << 20;
/// Default size of a ByteStream ReadResponse.
const DEFAULT_READ_CHUNK: usize = 64 << 10;
/// The header carrying a serialized `RequestMetadata`.
pub const REQUEST_METADATA_HEADER: &str = "build.bazel.remote.execution.v2.requestmetadata-bin";

// ---------------------------------------------------------------- methods

/// Every RPC the fake serves.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Method {
    GetCapabilities,
    FindMissingBlobs,
    BatchUpdateBlobs,
    BatchReadBlobs,
    GetTree,
    SplitBlob,
    SpliceBlob,
    GetChunkMapping,
    RegisterChunkMapping,
    Read,
    Write,
    QueryWriteStatus,
    GetActionResult,
    UpdateActionResult,
    Execute,
    WaitExecution,
    GetOperation,
    ListOperations,
    DeleteOperation,
    CancelOperation,
    WaitOperation,
}

impl Method {
    pub const ALL: [Method; 21] = [
        Method::GetCapabilities,
        Method::FindMissingBlobs,
        Method::BatchUpdateBlobs,
        Method::BatchReadBlobs,
        Method::GetTree,
        Method::SplitBlob,
        Method::SpliceBlob,
        Method::GetChunkMapping,
        Method::RegisterChunkMapping,
        Method::Read,
        Method::Write,
        Method::QueryWriteStatus,
        Method::GetActionResult,
        Method::UpdateActionResult,
        Method::Execute,
        Method::WaitExecution,
        Method::GetOperation,
        Method::ListOperations,
        Method::DeleteOperation,
        Method::CancelOperation,
        Method::WaitOperation,
    ];

    /// The gRPC method name.
    pub fn name(self) -> &'static str {
        match self {
            Method::GetCapabilities => "GetCapabilities",
            Method::FindMissingBlobs => "FindMissingBlobs",
            Method::BatchUpdateBlobs => "BatchUpdateBlobs",
            Method::BatchReadBlobs => "BatchReadBlobs",
            Method::GetTree => "GetTree",
            Method::SplitBlob => "SplitBlob",
            Method::SpliceBlob => "SpliceBlob",
            Method::GetChunkMapping => "GetChunkMapping",
            Method::RegisterChunkMapping => "RegisterChunkMapping",
            Method::Read => "Read",
            Method::Write => "Write",
            Method::QueryWriteStatus => "QueryWriteStatus",
            Method::GetActionResult => "GetActionResult",
            Method::UpdateActionResult => "UpdateActionResult",
            Method::Execute => "Execute",
            Method::WaitExecution => "WaitExecution",
            Method::GetOperation => "GetOperation",
            Method::ListOperations => "ListOperations",
            Method::DeleteOperation => "DeleteOperation",
            Method::CancelOperation => "CancelOperation",
            Method::WaitOperation => "WaitOperation",
        }
    }

    /// Methods that move blob contents (the "transfers").
    pub fn is_transfer(self) -> bool {
        matches!(
            self,
            Method::BatchReadBlobs | Method::BatchUpdateBlobs | Method::Read | Method::Write
        )
    }
}

// ---------------------------------------------------------------- call log

/// One call as the fake saw it.
#[derive(Clone, Debug)]
pub struct Call {
    /// Increasing per fake (not reset by [`FakeUpstream::reset_stats`]).
    pub id: u64,
    pub method: Method,
    /// From the request field, or parsed from the ByteStream resource name
    /// (empty if it could not be parsed).
    pub instance_name: String,
    /// The request headers exactly as received (gRPC metadata).
    pub headers: MetadataMap,
    /// The digests the call named, in request order: FindMissingBlobs and
    /// Batch*: every entry; Read/Write/QueryWriteStatus: the blob; GetTree:
    /// the root; ActionCache and Execute: the action digest; WaitExecution
    /// and Operations calls: the operation's action digest (if it is known).
    pub digests: Vec<re::Digest>,
    /// Payload received: blob bytes (BatchUpdateBlobs, Write), encoded
    /// ActionResult (UpdateActionResult); 0 otherwise.
    pub bytes_received: u64,
    /// Payload sent: blob bytes (BatchReadBlobs, Read), encoded Directory
    /// messages (GetTree), encoded ActionResult (GetActionResult); 0 otherwise.
    pub bytes_sent: u64,
    /// Final code; `None` while the call is still running. A call whose
    /// client went away mid-stream ends as `Cancelled`.
    pub code: Option<Code>,
    /// True when `code` was injected by a fault.
    pub injected: bool,
    pub started: Instant,
    pub finished: Option<Instant>,
}

impl Call {
    /// An ASCII header's value.
    pub fn header(&self, name: &str) -> Option<String> {
        self.headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string)
    }

    /// The decoded `build.bazel.remote.execution.v2.requestmetadata-bin`.
    pub fn request_metadata(&self) -> Option<re::RequestMetadata> {
        let value = self.headers.get_bin(REQUEST_METADATA_HEADER)?;
        re::RequestMetadata::decode(value.to_bytes().ok()?).ok()
    }

    /// Whether the call named `digest`.
    pub fn names(&self, digest: &re::Digest) -> bool {
        self.digests.iter().any(|d| same(d, digest))
    }
}

#[derive(Default)]
struct Log {
    next_id: u64,
    calls: Vec<Call>,
}

// ---------------------------------------------------------------- faults

/// What an injected fault does.
#[derive(Clone, Debug)]
pub enum FaultAction {
    /// The call fails with this code before doing anything (after latency).
    Fail(Code),
    /// A ByteStream Read sends `bytes` bytes then fails with `code`; a Write
    /// accepts `bytes` bytes (kept as a resumable partial upload) then fails.
    /// Applies to Read and Write only.
    AbortAfter { bytes: u64, code: Code },
}

/// A fault rule: the first matching rule with uses left applies.
#[derive(Clone, Debug)]
pub struct Fault {
    /// `None`: any method.
    pub method: Option<Method>,
    /// How many calls it applies to; `None`: until cleared.
    pub times: Option<u64>,
    pub action: FaultAction,
}

// ---------------------------------------------------------------- network

/// Whether the fake answers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NetMode {
    /// Listening and serving.
    Up,
    /// Listener closed (connections refused); open connections were reset.
    Refusing,
    /// Listening and accepting, but no byte is read or written on any
    /// connection (like a network partition): calls hang until the client
    /// gives up or [`FakeUpstream::come_up`].
    Blackhole,
}

const LINK_UP: u8 = 0;
const LINK_STALLED: u8 = 1;
const LINK_KILLED: u8 = 2;

/// Per-connection switch, flipped by the fake and checked on every I/O.
struct LinkCtl {
    state: AtomicU8,
    waker: AtomicWaker,
}

impl LinkCtl {
    fn set(&self, state: u8) {
        self.state.store(state, Ordering::Release);
        self.waker.wake();
    }

    /// `None`: go ahead with the I/O. Registers the task first, so a state
    /// change always wakes it.
    fn gate<T>(&self, cx: &mut Context<'_>) -> Option<Poll<io::Result<T>>> {
        self.waker.register(cx.waker());
        match self.state.load(Ordering::Acquire) {
            LINK_UP => None,
            LINK_STALLED => Some(Poll::Pending),
            _ => Some(Poll::Ready(Err(io::Error::new(
                io::ErrorKind::ConnectionReset,
                "fake upstream dropped the connection",
            )))),
        }
    }
}

#[derive(Default)]
struct NetCounters {
    tcp_in: AtomicU64,
    tcp_out: AtomicU64,
    connections: AtomicU64,
}

/// An accepted connection that the fake can stall or kill.
struct Conn {
    io: TcpStream,
    ctl: Arc<LinkCtl>,
    counters: Arc<NetCounters>,
}

impl Connected for Conn {
    type ConnectInfo = TcpConnectInfo;
    fn connect_info(&self) -> TcpConnectInfo {
        self.io.connect_info()
    }
}

impl AsyncRead for Conn {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if let Some(p) = self.ctl.gate(cx) {
            return p;
        }
        let before = buf.filled().len();
        let res = Pin::new(&mut self.io).poll_read(cx, buf);
        let n = (buf.filled().len() - before) as u64;
        self.counters.tcp_in.fetch_add(n, Ordering::Relaxed);
        res
    }
}

impl AsyncWrite for Conn {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        if let Some(p) = self.ctl.gate(cx) {
            return p;
        }
        let res = Pin::new(&mut self.io).poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = &res {
            self.counters
                .tcp_out
                .fetch_add(*n as u64, Ordering::Relaxed);
        }
        res
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if let Some(p) = self.ctl.gate(cx) {
            return p;
        }
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

struct Net {
    mode: NetMode,
    links: Vec<Weak<LinkCtl>>,
    accept: Option<JoinHandle<()>>,
}

impl Net {
    fn set_all(&mut self, from: &[u8], to: u8) {
        self.links.retain(|w| w.strong_count() > 0);
        for link in self.links.iter().filter_map(Weak::upgrade) {
            if from.contains(&link.state.load(Ordering::Acquire)) {
                link.set(to);
            }
        }
    }
}

// ---------------------------------------------------------------- state

#[derive(Default)]
struct Data {
    blobs: HashMap<(String, i64), Bytes>,
    /// (instance, action hash, action size) → result.
    actions: HashMap<(String, String, i64), re::ActionResult>,
    /// Partial uploads by resource name.
    uploads: HashMap<String, Vec<u8>>,
}

#[derive(Default)]
struct Latency {
    all: Duration,
    per_method: HashMap<Method, Duration>,
    read_chunk_delay: Duration,
}

#[derive(Default)]
struct PauseState {
    all: bool,
    methods: HashSet<Method>,
}

struct Shared {
    addr: SocketAddr,
    data: Mutex<Data>,
    log: Mutex<Log>,
    faults: Mutex<Vec<Fault>>,
    latency: Mutex<Latency>,
    capabilities: Mutex<re::ServerCapabilities>,
    read_chunk: AtomicUsize,
    in_flight: AtomicUsize,
    max_in_flight: AtomicUsize,
    pause: Mutex<PauseState>,
    resumed: Notify,
    parked: AtomicUsize,
    net: Mutex<Net>,
    counters: Arc<NetCounters>,
    conn_tx: mpsc::Sender<io::Result<Conn>>,
    exec: fake_execution::ExecState,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// A call in progress: updates its log entry; counts in-flight calls.
struct CallGuard {
    shared: Arc<Shared>,
    id: u64,
    finished: bool,
}

impl CallGuard {
    fn update(&self, f: impl FnOnce(&mut Call)) {
        let mut log = lock(&self.shared.log);
        if let Ok(i) = log.calls.binary_search_by_key(&self.id, |c| c.id) {
            f(&mut log.calls[i]);
        }
    }

    fn add_sent(&self, n: u64) {
        self.update(|c| c.bytes_sent += n);
    }

    fn add_received(&self, n: u64) {
        self.update(|c| c.bytes_received += n);
    }

    fn finish(mut self, code: Code, injected: bool) {
        self.finished = true;
        self.update(|c| {
            c.code = Some(code);
            c.injected |= injected;
            c.finished = Some(Instant::now());
        });
    }

    fn complete<T>(self, result: &Result<T, Status>) {
        let code = match result {
            Ok(_) => Code::Ok,
            Err(s) => s.code(),
        };
        self.finish(code, false);
    }
}

impl Drop for CallGuard {
    fn drop(&mut self) {
        if !self.finished {
            self.update(|c| {
                c.code = Some(Code::Cancelled);
                c.finished = Some(Instant::now());
            });
        }
        self.shared.in_flight.fetch_sub(1, Ordering::AcqRel);
    }
}

struct ParkedGuard<'a>(&'a AtomicUsize);
impl Drop for ParkedGuard<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Shared {
    /// Logs the call, then: waits while paused, sleeps the latency, applies a
    /// `Fail` fault.
    async fn begin(
        self: &Arc<Self>,
        method: Method,
        instance: &str,
        headers: &MetadataMap,
        digests: Vec<re::Digest>,
        bytes_received: u64,
    ) -> Result<CallGuard, Status> {
        let id = {
            let mut log = lock(&self.log);
            let id = log.next_id;
            log.next_id += 1;
            log.calls.push(Call {
                id,
                method,
                instance_name: instance.to_string(),
                headers: headers.clone(),
                digests,
                bytes_received,
                bytes_sent: 0,
                code: None,
                injected: false,
                started: Instant::now(),
                finished: None,
            });
            id
        };
        let now = self.in_flight.fetch_add(1, Ordering::AcqRel) + 1;
        self.max_in_flight.fetch_max(now, Ordering::AcqRel);
        let guard = CallGuard {
            shared: self.clone(),
            id,
            finished: false,
        };
        self.wait_while_paused(method).await;
        let latency = {
            let l = lock(&self.latency);
            l.per_method.get(&method).copied().unwrap_or(l.all)
        };
        if !latency.is_zero() {
            tokio::time::sleep(latency).await;
        }
        if let Some(code) = self.take_fault(method, |a| match a {
            FaultAction::Fail(code) => Some(*code),
            FaultAction::AbortAfter { .. } => None,
        }) {
            guard.finish(code, true);
            return Err(Status::new(
                code,
                format!("fake upstream: injected {code:?} for {}", method.name()),
            ));
        }
        Ok(guard)
    }

    fn is_paused(&self, method: Method) -> bool {
        let p = lock(&self.pause);
        p.all || p.methods.contains(&method)
    }

    async fn wait_while_paused(&self, method: Method) {
        if !self.is_paused(method) {
            return;
        }
        self.parked.fetch_add(1, Ordering::AcqRel);
        let _parked = ParkedGuard(&self.parked);
        loop {
            let notified = self.resumed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if !self.is_paused(method) {
                return;
            }
            notified.await;
        }
    }

    /// Consumes one use of the first rule for `method` that `pick` accepts.
    fn take_fault<T>(&self, method: Method, pick: impl Fn(&FaultAction) -> Option<T>) -> Option<T> {
        let mut faults = lock(&self.faults);
        let i = faults.iter().position(|f| {
            f.method.is_none_or(|m| m == method)
                && f.times.is_none_or(|n| n > 0)
                && pick(&f.action).is_some()
        })?;
        let out = pick(&faults[i].action);
        if let Some(n) = faults[i].times.as_mut() {
            *n -= 1;
            if *n == 0 {
                faults.remove(i);
            }
        }
        out
    }

    fn take_abort(&self, method: Method) -> Option<(u64, Code)> {
        self.take_fault(method, |a| match a {
            FaultAction::AbortAfter { bytes, code } => Some((*bytes, *code)),
            FaultAction::Fail(_) => None,
        })
    }

    fn caps(&self) -> re::ServerCapabilities {
        lock(&self.capabilities).clone()
    }

    fn max_batch(&self) -> i64 {
        self.caps()
            .cache_capabilities
            .map(|c| c.max_batch_total_size_bytes)
            .unwrap_or(0)
    }

    /// INVALID_ARGUMENT unless `function` is 0 or advertised.
    fn check_function(&self, function: i32) -> Result<(), Status> {
        if function == 0 {
            return Ok(());
        }
        let advertised = self
            .caps()
            .cache_capabilities
            .map(|c| c.digest_functions)
            .unwrap_or_default();
        if advertised.contains(&function) {
            Ok(())
        } else {
            Err(Status::invalid_argument(format!(
                "fake upstream: digest function {} is not supported",
                DigestFunction::try_from(function)
                    .map(|f| f.as_str_name().to_string())
                    .unwrap_or_else(|_| function.to_string())
            )))
        }
    }

    fn blob(&self, d: &re::Digest) -> Option<Bytes> {
        if d.size_bytes == 0 {
            return Some(Bytes::new());
        }
        lock(&self.data)
            .blobs
            .get(&(d.hash.clone(), d.size_bytes))
            .cloned()
    }

    fn has(&self, d: &re::Digest) -> bool {
        d.size_bytes == 0
            || lock(&self.data)
                .blobs
                .contains_key(&(d.hash.clone(), d.size_bytes))
    }

    fn store(&self, d: &re::Digest, data: Bytes) {
        lock(&self.data)
            .blobs
            .insert((d.hash.clone(), d.size_bytes), data);
    }

    // ------------------------------------------------------------ handlers

    fn find_missing(
        &self,
        req: &re::FindMissingBlobsRequest,
    ) -> Result<re::FindMissingBlobsResponse, Status> {
        self.check_function(req.digest_function)?;
        for d in &req.blob_digests {
            check_digest(d, req.digest_function)?;
        }
        Ok(re::FindMissingBlobsResponse {
            missing_blob_digests: req
                .blob_digests
                .iter()
                .filter(|d| !self.has(d))
                .cloned()
                .collect(),
        })
    }

    fn batch_update(
        &self,
        req: re::BatchUpdateBlobsRequest,
    ) -> Result<re::BatchUpdateBlobsResponse, Status> {
        self.check_function(req.digest_function)?;
        let total: u64 = req.requests.iter().map(|r| r.data.len() as u64).sum();
        let max = self.max_batch();
        if max > 0 && total > max as u64 {
            return Err(Status::invalid_argument(format!(
                "fake upstream: BatchUpdateBlobs of {total} bytes exceeds max_batch_total_size_bytes {max}"
            )));
        }
        let mut responses = Vec::with_capacity(req.requests.len());
        for r in req.requests {
            let digest = r.digest.unwrap_or_default();
            let status = if r.compressor != 0 {
                rpc_status(
                    Code::InvalidArgument,
                    "fake upstream: compressors are not supported",
                )
            } else {
                match check_digest(&digest, req.digest_function)
                    .and_then(|()| verify(&digest, req.digest_function, &r.data))
                {
                    Ok(()) => {
                        self.store(&digest, Bytes::from(r.data));
                        rpc_status(Code::Ok, "")
                    }
                    Err(e) => rpc_status(e.code(), e.message()),
                }
            };
            responses.push(re::batch_update_blobs_response::Response {
                digest: Some(digest),
                status: Some(status),
            });
        }
        Ok(re::BatchUpdateBlobsResponse { responses })
    }

    fn batch_read(
        &self,
        req: &re::BatchReadBlobsRequest,
    ) -> Result<re::BatchReadBlobsResponse, Status> {
        self.check_function(req.digest_function)?;
        let total: u64 = req.digests.iter().map(|d| d.size_bytes.max(0) as u64).sum();
        let max = self.max_batch();
        if max > 0 && total > max as u64 {
            return Err(Status::invalid_argument(format!(
                "fake upstream: BatchReadBlobs of {total} bytes exceeds max_batch_total_size_bytes {max}"
            )));
        }
        let mut responses = Vec::with_capacity(req.digests.len());
        for d in &req.digests {
            let (data, status) = match check_digest(d, req.digest_function) {
                Err(e) => (Vec::new(), rpc_status(e.code(), e.message())),
                Ok(()) => match self.blob(d) {
                    Some(data) => (data.to_vec(), rpc_status(Code::Ok, "")),
                    None => (
                        Vec::new(),
                        rpc_status(Code::NotFound, "fake upstream: blob not found"),
                    ),
                },
            };
            responses.push(re::batch_read_blobs_response::Response {
                digest: Some(d.clone()),
                data,
                compressor: 0,
                status: Some(status),
            });
        }
        Ok(re::BatchReadBlobsResponse { responses })
    }

    /// Every Directory reachable from `root`, breadth-first, deduplicated;
    /// missing subtrees are skipped. `None` if the root is missing.
    fn tree(&self, root: &re::Digest) -> Option<Vec<re::Directory>> {
        let root_data = self.blob(root)?;
        let mut out = Vec::new();
        let mut seen = HashSet::new();
        let mut queue = VecDeque::new();
        seen.insert((root.hash.clone(), root.size_bytes));
        queue.push_back(root_data);
        while let Some(data) = queue.pop_front() {
            let Ok(dir) = re::Directory::decode(data) else {
                continue;
            };
            for child in dir.directories.iter().filter_map(|n| n.digest.as_ref()) {
                if seen.insert((child.hash.clone(), child.size_bytes))
                    && let Some(data) = self.blob(child)
                {
                    queue.push_back(data);
                }
            }
            out.push(dir);
        }
        Some(out)
    }

    fn get_action_result(
        &self,
        req: &re::GetActionResultRequest,
    ) -> Result<re::ActionResult, Status> {
        self.check_function(req.digest_function)?;
        let d = req
            .action_digest
            .as_ref()
            .ok_or_else(|| Status::invalid_argument("fake upstream: no action_digest"))?;
        check_digest(d, req.digest_function)?;
        let mut result = lock(&self.data)
            .actions
            .get(&(req.instance_name.clone(), d.hash.clone(), d.size_bytes))
            .cloned()
            .ok_or_else(|| Status::not_found("fake upstream: no action result"))?;
        // Inline what was asked for, as real servers do.
        if req.inline_stdout
            && result.stdout_raw.is_empty()
            && let Some(data) = result.stdout_digest.as_ref().and_then(|d| self.blob(d))
        {
            result.stdout_raw = data.to_vec();
        }
        if req.inline_stderr
            && result.stderr_raw.is_empty()
            && let Some(data) = result.stderr_digest.as_ref().and_then(|d| self.blob(d))
        {
            result.stderr_raw = data.to_vec();
        }
        for file in &mut result.output_files {
            if req.inline_output_files.contains(&file.path)
                && file.contents.is_empty()
                && let Some(data) = file.digest.as_ref().and_then(|d| self.blob(d))
            {
                file.contents = data.to_vec();
            }
        }
        Ok(result)
    }

    fn update_action_result(
        &self,
        req: re::UpdateActionResultRequest,
    ) -> Result<re::ActionResult, Status> {
        self.check_function(req.digest_function)?;
        let enabled = self
            .caps()
            .cache_capabilities
            .and_then(|c| c.action_cache_update_capabilities)
            .is_some_and(|u| u.update_enabled);
        if !enabled {
            return Err(Status::permission_denied(
                "fake upstream: action cache updates are disabled",
            ));
        }
        let d = req
            .action_digest
            .ok_or_else(|| Status::invalid_argument("fake upstream: no action_digest"))?;
        check_digest(&d, req.digest_function)?;
        let result = req
            .action_result
            .ok_or_else(|| Status::invalid_argument("fake upstream: no action_result"))?;
        lock(&self.data)
            .actions
            .insert((req.instance_name, d.hash, d.size_bytes), result.clone());
        Ok(result)
    }
}

// ---------------------------------------------------------------- helpers

/// The SHA-256 digest of `data`.
pub fn digest_of(data: &[u8]) -> re::Digest {
    re::Digest {
        hash: hex::encode(Sha256::digest(data)),
        size_bytes: data.len() as i64,
    }
}

fn same(a: &re::Digest, b: &re::Digest) -> bool {
    a.hash == b.hash && a.size_bytes == b.size_bytes
}

fn rpc_status(code: Code, message: &str) -> RpcStatus {
    RpcStatus {
        code: code as i32,
        message: message.to_string(),
        details: Vec::new(),
    }
}

fn is_sha256(function: i32) -> bool {
    function == 0 || function == DigestFunction::Sha256 as i32
}

fn check_digest(d: &re::Digest, function: i32) -> Result<(), Status> {
    let hex_ok = !d.hash.is_empty()
        && d.hash
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
    if d.size_bytes < 0 || !hex_ok || (is_sha256(function) && d.hash.len() != 64) {
        return Err(Status::invalid_argument(format!(
            "fake upstream: invalid digest {}/{}",
            d.hash, d.size_bytes
        )));
    }
    Ok(())
}

/// SHA-256 blobs are verified; other functions are taken on trust.
fn verify(d: &re::Digest, function: i32, data: &[u8]) -> Result<(), Status> {
    if data.len() as i64 != d.size_bytes {
        return Err(Status::invalid_argument(format!(
            "fake upstream: size mismatch: got {} bytes for {}/{}",
            data.len(),
            d.hash,
            d.size_bytes
        )));
    }
    if is_sha256(function) && hex::encode(Sha256::digest(data)) != d.hash {
        return Err(Status::invalid_argument(format!(
            "fake upstream: hash mismatch for {}/{}",
            d.hash, d.size_bytes
        )));
    }
    Ok(())
}

/// A parsed ByteStream resource name.
struct Resource {
    instance: String,
    digest: re::Digest,
    function: i32,
    compressed: bool,
}

/// `[opt digest function] hash size [rest…]` after `blobs` / `compressed-blobs/C`.
fn parse_blob_tail(segs: &[&str], allow_rest: bool) -> Option<(re::Digest, i32, usize)> {
    let (function, segs) = match segs.first() {
        Some(s) if segs.len() >= 3 => match DigestFunction::from_str_name(&s.to_uppercase()) {
            Some(f) => (f as i32, &segs[1..]),
            None => (0, segs),
        },
        _ => (0, segs),
    };
    if segs.len() < 2 || (!allow_rest && segs.len() != 2) {
        return None;
    }
    let size = segs[1].parse::<i64>().ok()?;
    Some((
        re::Digest {
            hash: segs[0].to_string(),
            size_bytes: size,
        },
        function,
        segs.len() - 2,
    ))
}

fn parse_resource(name: &str, write: bool) -> Result<Resource, Status> {
    let bad = || {
        Status::invalid_argument(format!(
            "fake upstream: bad ByteStream resource name {name:?}"
        ))
    };
    let segs: Vec<&str> = name.split('/').collect();
    let (instance_end, blobs_at) = if write {
        let u = segs.iter().position(|s| *s == "uploads").ok_or_else(bad)?;
        (u, u + 2)
    } else {
        let b = segs
            .iter()
            .position(|s| *s == "blobs" || *s == "compressed-blobs")
            .ok_or_else(bad)?;
        (b, b)
    };
    let instance = segs[..instance_end].join("/");
    let compressed = match segs.get(blobs_at) {
        Some(&"blobs") => false,
        Some(&"compressed-blobs") => true,
        _ => return Err(bad()),
    };
    let tail_at = blobs_at + 1 + usize::from(compressed);
    let tail = segs.get(tail_at..).ok_or_else(bad)?;
    let (digest, function, _) = parse_blob_tail(tail, write).ok_or_else(bad)?;
    Ok(Resource {
        instance,
        digest,
        function,
        compressed,
    })
}

type BoxStream<T> = Pin<Box<dyn futures::Stream<Item = Result<T, Status>> + Send>>;

// ---------------------------------------------------------------- services

#[derive(Clone)]
struct Svc {
    s: Arc<Shared>,
}

#[tonic::async_trait]
impl Capabilities for Svc {
    async fn get_capabilities(
        &self,
        request: Request<re::GetCapabilitiesRequest>,
    ) -> Result<Response<re::ServerCapabilities>, Status> {
        let (headers, req) = (request.metadata().clone(), request.into_inner());
        let guard = self
            .s
            .begin(
                Method::GetCapabilities,
                &req.instance_name,
                &headers,
                Vec::new(),
                0,
            )
            .await?;
        let result = Ok(self.s.caps());
        guard.complete(&result);
        result.map(Response::new)
    }
}

#[tonic::async_trait]
impl ContentAddressableStorage for Svc {
    async fn find_missing_blobs(
        &self,
        request: Request<re::FindMissingBlobsRequest>,
    ) -> Result<Response<re::FindMissingBlobsResponse>, Status> {
        let (headers, req) = (request.metadata().clone(), request.into_inner());
        let guard = self
            .s
            .begin(
                Method::FindMissingBlobs,
                &req.instance_name,
                &headers,
                req.blob_digests.clone(),
                0,
            )
            .await?;
        let result = self.s.find_missing(&req);
        guard.complete(&result);
        result.map(Response::new)
    }

    async fn batch_update_blobs(
        &self,
        request: Request<re::BatchUpdateBlobsRequest>,
    ) -> Result<Response<re::BatchUpdateBlobsResponse>, Status> {
        let (headers, req) = (request.metadata().clone(), request.into_inner());
        let digests = req
            .requests
            .iter()
            .map(|r| r.digest.clone().unwrap_or_default())
            .collect();
        let bytes = req.requests.iter().map(|r| r.data.len() as u64).sum();
        let guard = self
            .s
            .begin(
                Method::BatchUpdateBlobs,
                &req.instance_name,
                &headers,
                digests,
                bytes,
            )
            .await?;
        let result = self.s.batch_update(req);
        guard.complete(&result);
        result.map(Response::new)
    }

    async fn batch_read_blobs(
        &self,
        request: Request<re::BatchReadBlobsRequest>,
    ) -> Result<Response<re::BatchReadBlobsResponse>, Status> {
        let (headers, req) = (request.metadata().clone(), request.into_inner());
        let guard = self
            .s
            .begin(
                Method::BatchReadBlobs,
                &req.instance_name,
                &headers,
                req.digests.clone(),
                0,
            )
            .await?;
        let result = self.s.batch_read(&req);
        if let Ok(resp) = &result {
            guard.add_sent(resp.responses.iter().map(|r| r.data.len() as u64).sum());
        }
        guard.complete(&result);
        result.map(Response::new)
    }

    type GetTreeStream = BoxStream<re::GetTreeResponse>;

    async fn get_tree(
        &self,
        request: Request<re::GetTreeRequest>,
    ) -> Result<Response<Self::GetTreeStream>, Status> {
        let (headers, req) = (request.metadata().clone(), request.into_inner());
        let root = req.root_digest.clone().unwrap_or_default();
        let guard = self
            .s
            .begin(
                Method::GetTree,
                &req.instance_name,
                &headers,
                vec![root.clone()],
                0,
            )
            .await?;
        let result = (|| {
            self.s.check_function(req.digest_function)?;
            check_digest(&root, req.digest_function)?;
            let dirs = self
                .s
                .tree(&root)
                .ok_or_else(|| Status::not_found("fake upstream: GetTree root not found"))?;
            let start: usize = if req.page_token.is_empty() {
                0
            } else {
                req.page_token
                    .parse()
                    .map_err(|_| Status::invalid_argument("fake upstream: bad page_token"))?
            };
            let page = if req.page_size > 0 {
                req.page_size as usize
            } else {
                1000
            };
            let dirs: Vec<re::Directory> = dirs.into_iter().skip(start).collect();
            let mut pages = Vec::new();
            let mut next = start;
            for chunk in dirs.chunks(page) {
                next += chunk.len();
                pages.push(re::GetTreeResponse {
                    directories: chunk.to_vec(),
                    next_page_token: next.to_string(),
                });
            }
            if let Some(last) = pages.last_mut() {
                last.next_page_token.clear();
            }
            Ok(pages)
        })();
        if let Ok(pages) = &result {
            guard.add_sent(
                pages
                    .iter()
                    .flat_map(|p| &p.directories)
                    .map(|d| d.encoded_len() as u64)
                    .sum(),
            );
        }
        guard.complete(&result);
        let pages = result?;
        Ok(Response::new(Box::pin(futures::stream::iter(
            pages.into_iter().map(Ok),
        ))))
    }

    async fn split_blob(
        &self,
        request: Request<re::SplitBlobRequest>,
    ) -> Result<Response<re::SplitBlobResponse>, Status> {
        let (headers, req) = (request.metadata().clone(), request.into_inner());
        self.unimplemented(Method::SplitBlob, &req.instance_name, &headers)
            .await
    }

    type GetChunkMappingStream = BoxStream<re::GetChunkMappingResponse>;

    async fn get_chunk_mapping(
        &self,
        request: Request<re::GetChunkMappingRequest>,
    ) -> Result<Response<Self::GetChunkMappingStream>, Status> {
        let (headers, req) = (request.metadata().clone(), request.into_inner());
        self.unimplemented(Method::GetChunkMapping, &req.instance_name, &headers)
            .await
    }

    async fn splice_blob(
        &self,
        request: Request<re::SpliceBlobRequest>,
    ) -> Result<Response<re::SpliceBlobResponse>, Status> {
        let (headers, req) = (request.metadata().clone(), request.into_inner());
        self.unimplemented(Method::SpliceBlob, &req.instance_name, &headers)
            .await
    }

    async fn register_chunk_mapping(
        &self,
        request: Request<Streaming<re::RegisterChunkMappingRequest>>,
    ) -> Result<Response<re::RegisterChunkMappingResponse>, Status> {
        let headers = request.metadata().clone();
        self.unimplemented(Method::RegisterChunkMapping, "", &headers)
            .await
    }
}

impl Svc {
    async fn unimplemented<T>(
        &self,
        method: Method,
        instance: &str,
        headers: &MetadataMap,
    ) -> Result<T, Status> {
        let guard = self
            .s
            .begin(method, instance, headers, Vec::new(), 0)
            .await?;
        let result = Err(Status::unimplemented(format!(
            "fake upstream: {} is not implemented",
            method.name()
        )));
        guard.complete(&result);
        result
    }

    async fn write_inner(
        &self,
        guard: &CallGuard,
        name: &str,
        first: bs::WriteRequest,
        stream: &mut Streaming<bs::WriteRequest>,
    ) -> Result<bs::WriteResponse, Status> {
        let res = parse_resource(name, true)?;
        if res.compressed {
            return Err(Status::unimplemented(
                "fake upstream: compressed-blobs are not supported",
            ));
        }
        self.s.check_function(res.function)?;
        check_digest(&res.digest, res.function)?;
        let size = res.digest.size_bytes;
        if self.s.has(&res.digest) {
            lock(&self.s.data).uploads.remove(name);
            return Ok(bs::WriteResponse {
                committed_size: size,
            });
        }
        let mut buf = {
            let mut data = lock(&self.s.data);
            let partial = data.uploads.remove(name).unwrap_or_default();
            match first.write_offset {
                0 => Vec::new(),
                o if o == partial.len() as i64 => partial,
                o => {
                    if !partial.is_empty() {
                        data.uploads.insert(name.to_string(), partial.clone());
                    }
                    return Err(Status::invalid_argument(format!(
                        "fake upstream: write_offset {o} but {} bytes committed",
                        partial.len()
                    )));
                }
            }
        };
        let abort = self.s.take_abort(Method::Write);
        let park = |buf: Vec<u8>| {
            lock(&self.s.data).uploads.insert(name.to_string(), buf);
        };
        let mut msg = first;
        loop {
            if msg.write_offset != buf.len() as i64 {
                let got = msg.write_offset;
                let have = buf.len();
                park(buf);
                return Err(Status::invalid_argument(format!(
                    "fake upstream: write_offset {got}, expected {have}"
                )));
            }
            if !msg.resource_name.is_empty() && msg.resource_name != name {
                park(buf);
                return Err(Status::invalid_argument(
                    "fake upstream: resource_name changed mid-stream",
                ));
            }
            let mut data = msg.data;
            if let Some((after, code)) = abort
                && (buf.len() + data.len()) as u64 >= after
                && !(msg.finish_write && (buf.len() + data.len()) as u64 == after)
            {
                data.truncate(after.saturating_sub(buf.len() as u64) as usize);
                guard.update(|c| {
                    c.bytes_received += data.len() as u64;
                    c.injected = true;
                });
                buf.extend_from_slice(&data);
                park(buf);
                return Err(Status::new(
                    code,
                    format!("fake upstream: injected abort of Write after {after} bytes"),
                ));
            }
            guard.add_received(data.len() as u64);
            buf.extend_from_slice(&data);
            if buf.len() as i64 > size {
                return Err(Status::invalid_argument(format!(
                    "fake upstream: more than {size} bytes written"
                )));
            }
            if msg.finish_write {
                verify(&res.digest, res.function, &buf)?;
                self.s.store(&res.digest, Bytes::from(buf));
                return Ok(bs::WriteResponse {
                    committed_size: size,
                });
            }
            match stream.message().await {
                Ok(Some(next)) => msg = next,
                Ok(None) => {
                    let n = buf.len();
                    park(buf);
                    return Err(Status::invalid_argument(format!(
                        "fake upstream: stream ended before finish_write ({n} bytes kept)"
                    )));
                }
                Err(e) => {
                    park(buf);
                    return Err(e);
                }
            }
        }
    }
}

#[tonic::async_trait]
impl bs::byte_stream_server::ByteStream for Svc {
    type ReadStream = BoxStream<bs::ReadResponse>;

    async fn read(
        &self,
        request: Request<bs::ReadRequest>,
    ) -> Result<Response<Self::ReadStream>, Status> {
        let (headers, req) = (request.metadata().clone(), request.into_inner());
        let parsed = parse_resource(&req.resource_name, false);
        let (instance, digests) = match &parsed {
            Ok(r) => (r.instance.clone(), vec![r.digest.clone()]),
            Err(_) => (String::new(), Vec::new()),
        };
        let guard = self
            .s
            .begin(Method::Read, &instance, &headers, digests, 0)
            .await?;
        let checked = (|| {
            let res = parsed?;
            if res.compressed {
                return Err(Status::unimplemented(
                    "fake upstream: compressed-blobs are not supported",
                ));
            }
            self.s.check_function(res.function)?;
            check_digest(&res.digest, res.function)?;
            let size = res.digest.size_bytes;
            if req.read_offset < 0 || req.read_offset > size {
                return Err(Status::out_of_range(format!(
                    "fake upstream: read_offset {} outside 0..={size}",
                    req.read_offset
                )));
            }
            if req.read_limit < 0 {
                return Err(Status::invalid_argument(
                    "fake upstream: negative read_limit",
                ));
            }
            let data = self
                .s
                .blob(&res.digest)
                .ok_or_else(|| Status::not_found("fake upstream: blob not found"))?;
            let start = req.read_offset as usize;
            let end = if req.read_limit == 0 {
                data.len()
            } else {
                (start + req.read_limit as usize).min(data.len())
            };
            Ok(data.slice(start..end))
        })();
        let data = match checked {
            Ok(data) => data,
            Err(e) => {
                guard.finish(e.code(), false);
                return Err(e);
            }
        };
        let abort = self.s.take_abort(Method::Read);
        let chunk = self.s.read_chunk.load(Ordering::Relaxed).max(1);
        let delay = lock(&self.s.latency).read_chunk_delay;
        let (tx, rx) = mpsc::channel(4);
        tokio::spawn(async move {
            let mut pos = 0usize;
            loop {
                if let Some((after, code)) = abort
                    && pos as u64 >= after
                    && pos < data.len()
                {
                    guard.finish(code, true);
                    let _ = tx
                        .send(Err(Status::new(
                            code,
                            format!("fake upstream: injected abort of Read after {after} bytes"),
                        )))
                        .await;
                    return;
                }
                if pos >= data.len() {
                    break;
                }
                let mut n = chunk.min(data.len() - pos);
                if let Some((after, _)) = abort {
                    n = n.min((after as usize).saturating_sub(pos).max(1));
                }
                if !delay.is_zero() {
                    tokio::time::sleep(delay).await;
                }
                let msg = bs::ReadResponse {
                    data: data.slice(pos..pos + n).to_vec(),
                };
                if tx.send(Ok(msg)).await.is_err() {
                    return; // the client went away: the guard records Cancelled
                }
                guard.add_sent(n as u64);
                pos += n;
            }
            guard.finish(Code::Ok, false);
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn write(
        &self,
        request: Request<Streaming<bs::WriteRequest>>,
    ) -> Result<Response<bs::WriteResponse>, Status> {
        let headers = request.metadata().clone();
        let mut stream = request.into_inner();
        let first = stream
            .message()
            .await?
            .ok_or_else(|| Status::invalid_argument("fake upstream: empty Write stream"))?;
        let name = first.resource_name.clone();
        let (instance, digests) = match parse_resource(&name, true) {
            Ok(r) => (r.instance, vec![r.digest]),
            Err(_) => (String::new(), Vec::new()),
        };
        let guard = self
            .s
            .begin(Method::Write, &instance, &headers, digests, 0)
            .await?;
        let result = self.write_inner(&guard, &name, first, &mut stream).await;
        guard.complete(&result);
        result.map(Response::new)
    }

    async fn query_write_status(
        &self,
        request: Request<bs::QueryWriteStatusRequest>,
    ) -> Result<Response<bs::QueryWriteStatusResponse>, Status> {
        let (headers, req) = (request.metadata().clone(), request.into_inner());
        let parsed = parse_resource(&req.resource_name, true);
        let (instance, digests) = match &parsed {
            Ok(r) => (r.instance.clone(), vec![r.digest.clone()]),
            Err(_) => (String::new(), Vec::new()),
        };
        let guard = self
            .s
            .begin(Method::QueryWriteStatus, &instance, &headers, digests, 0)
            .await?;
        let result = parsed.and_then(|res| {
            if self.s.has(&res.digest) {
                return Ok(bs::QueryWriteStatusResponse {
                    committed_size: res.digest.size_bytes,
                    complete: true,
                });
            }
            match lock(&self.s.data).uploads.get(&req.resource_name) {
                Some(partial) => Ok(bs::QueryWriteStatusResponse {
                    committed_size: partial.len() as i64,
                    complete: false,
                }),
                None => Err(Status::not_found("fake upstream: unknown upload")),
            }
        });
        guard.complete(&result);
        result.map(Response::new)
    }
}

#[tonic::async_trait]
impl ActionCache for Svc {
    async fn get_action_result(
        &self,
        request: Request<re::GetActionResultRequest>,
    ) -> Result<Response<re::ActionResult>, Status> {
        let (headers, req) = (request.metadata().clone(), request.into_inner());
        let digests = req.action_digest.iter().cloned().collect();
        let guard = self
            .s
            .begin(
                Method::GetActionResult,
                &req.instance_name,
                &headers,
                digests,
                0,
            )
            .await?;
        let result = self.s.get_action_result(&req);
        if let Ok(r) = &result {
            guard.add_sent(r.encoded_len() as u64);
        }
        guard.complete(&result);
        result.map(Response::new)
    }

    async fn update_action_result(
        &self,
        request: Request<re::UpdateActionResultRequest>,
    ) -> Result<Response<re::ActionResult>, Status> {
        let (headers, req) = (request.metadata().clone(), request.into_inner());
        let digests = req.action_digest.iter().cloned().collect();
        let bytes = req
            .action_result
            .as_ref()
            .map_or(0, |r| r.encoded_len() as u64);
        let guard = self
            .s
            .begin(
                Method::UpdateActionResult,
                &req.instance_name,
                &headers,
                digests,
                bytes,
            )
            .await?;
        let result = self.s.update_action_result(req);
        guard.complete(&result);
        result.map(Response::new)
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
        let s = Arc::new(Shared {
            addr,
            data: Mutex::default(),
            log: Mutex::default(),
            faults: Mutex::default(),
            latency: Mutex::default(),
            capabilities: Mutex::new(default_capabilities()),
            read_chunk: AtomicUsize::new(DEFAULT_READ_CHUNK),
            in_flight: AtomicUsize::new(0),
            max_in_flight: AtomicUsize::new(0),
            pause: Mutex::default(),
            resumed: Notify::new(),
            parked: AtomicUsize::new(0),
            net: Mutex::new(Net {
                mode: NetMode::Up,
                links: Vec::new(),
                accept: None,
            }),
            counters: Arc::default(),
            conn_tx,
            exec: Default::default(),
        });
        let svc = Svc { s: s.clone() };
        let (execution, operations) = fake_execution::services(svc.clone());
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
                ActionCacheServer::new(svc)
                    .max_decoding_message_size(MAX_MESSAGE)
                    .max_encoding_message_size(MAX_MESSAGE),
            )
            .add_service(execution)
            .add_service(operations);
        let server = tokio::spawn(async move {
            let _ = router
                .serve_with_incoming(ReceiverStream::new(conn_rx))
                .await;
        });
        let accept = tokio::spawn(accept_loop(listener, s.clone()));
        lock(&s.net).accept = Some(accept);
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

    // ------------------------------------------------------------ seeding

    /// Stores `data` (as if uploaded) and returns its SHA-256 digest.
    pub fn put_blob(&self, data: impl Into<Bytes>) -> re::Digest {
        let data = data.into();
        let d = digest_of(&data);
        self.s.store(&d, data);
        d
    }

    /// Stores `data` under `digest` without checking (corrupt blobs).
    pub fn put_blob_unchecked(&self, digest: &re::Digest, data: impl Into<Bytes>) {
        self.s.store(digest, data.into());
    }

    /// Stores an encoded message (Directory, Tree, Action, Command…).
    pub fn put_message(&self, msg: &impl Message) -> re::Digest {
        self.put_blob(msg.encode_to_vec())
    }

    /// The stored bytes of a blob (the empty blob is always there).
    pub fn blob(&self, d: &re::Digest) -> Option<Bytes> {
        self.s.blob(d)
    }

    pub fn has_blob(&self, d: &re::Digest) -> bool {
        self.s.has(d)
    }

    /// Deletes a blob (as if the upstream evicted it); true if it was there.
    pub fn remove_blob(&self, d: &re::Digest) -> bool {
        lock(&self.s.data)
            .blobs
            .remove(&(d.hash.clone(), d.size_bytes))
            .is_some()
    }

    pub fn blob_count(&self) -> usize {
        lock(&self.s.data).blobs.len()
    }

    /// Every stored blob's digest.
    pub fn blob_digests(&self) -> Vec<re::Digest> {
        lock(&self.s.data)
            .blobs
            .keys()
            .map(|(hash, size)| re::Digest {
                hash: hash.clone(),
                size_bytes: *size,
            })
            .collect()
    }

    pub fn put_action_result(&self, instance: &str, action: &re::Digest, result: re::ActionResult) {
        lock(&self.s.data).actions.insert(
            (instance.to_string(), action.hash.clone(), action.size_bytes),
            result,
        );
    }

    /// The stored result, exactly as stored (nothing inlined).
    pub fn action_result(&self, instance: &str, action: &re::Digest) -> Option<re::ActionResult> {
        lock(&self.s.data)
            .actions
            .get(&(instance.to_string(), action.hash.clone(), action.size_bytes))
            .cloned()
    }

    pub fn remove_action_result(&self, instance: &str, action: &re::Digest) -> bool {
        lock(&self.s.data)
            .actions
            .remove(&(instance.to_string(), action.hash.clone(), action.size_bytes))
            .is_some()
    }

    pub fn action_result_count(&self) -> usize {
        lock(&self.s.data).actions.len()
    }

    /// Bytes committed so far of a partial ByteStream upload.
    pub fn partial_upload(&self, resource_name: &str) -> Option<usize> {
        lock(&self.s.data).uploads.get(resource_name).map(Vec::len)
    }

    /// Forgets every blob, action result and partial upload.
    pub fn clear_store(&self) {
        *lock(&self.s.data) = Data::default();
    }

    // ------------------------------------------------------------ statistics

    /// Every call since the last reset, oldest first.
    pub fn calls(&self) -> Vec<Call> {
        lock(&self.s.log).calls.clone()
    }

    pub fn calls_of(&self, method: Method) -> Vec<Call> {
        lock(&self.s.log)
            .calls
            .iter()
            .filter(|c| c.method == method)
            .cloned()
            .collect()
    }

    /// The most recent call of `method`.
    pub fn last_call(&self, method: Method) -> Option<Call> {
        lock(&self.s.log)
            .calls
            .iter()
            .rev()
            .find(|c| c.method == method)
            .cloned()
    }

    /// Calls of `method` (including failed ones).
    pub fn count(&self, method: Method) -> usize {
        lock(&self.s.log)
            .calls
            .iter()
            .filter(|c| c.method == method)
            .count()
    }

    pub fn total_calls(&self) -> usize {
        lock(&self.s.log).calls.len()
    }

    /// Calls per method (methods never called are left out).
    pub fn counts(&self) -> BTreeMap<Method, usize> {
        let mut out = BTreeMap::new();
        for c in lock(&self.s.log).calls.iter() {
            *out.entry(c.method).or_default() += 1;
        }
        out
    }

    /// Number of digests named by each call of `method`, in call order
    /// (FindMissingBlobs: digests asked; Batch*: blobs in the batch).
    pub fn digests_per_call(&self, method: Method) -> Vec<usize> {
        lock(&self.s.log)
            .calls
            .iter()
            .filter(|c| c.method == method)
            .map(|c| c.digests.len())
            .collect()
    }

    /// Calls of `method` that named `digest`.
    pub fn count_naming(&self, method: Method, digest: &re::Digest) -> usize {
        lock(&self.s.log)
            .calls
            .iter()
            .filter(|c| c.method == method && c.names(digest))
            .count()
    }

    /// Read and BatchReadBlobs calls that asked for `digest`: how many
    /// times the blob was fetched.
    pub fn fetches_of(&self, digest: &re::Digest) -> usize {
        self.count_naming(Method::Read, digest) + self.count_naming(Method::BatchReadBlobs, digest)
    }

    /// Write and BatchUpdateBlobs calls that carried `digest`.
    pub fn uploads_of(&self, digest: &re::Digest) -> usize {
        self.count_naming(Method::Write, digest)
            + self.count_naming(Method::BatchUpdateBlobs, digest)
    }

    /// Payload bytes sent to clients (see [`Call::bytes_sent`]).
    pub fn bytes_sent(&self) -> u64 {
        lock(&self.s.log).calls.iter().map(|c| c.bytes_sent).sum()
    }

    /// Payload bytes received from clients (see [`Call::bytes_received`]).
    pub fn bytes_received(&self) -> u64 {
        lock(&self.s.log)
            .calls
            .iter()
            .map(|c| c.bytes_received)
            .sum()
    }

    pub fn bytes_sent_by(&self, method: Method) -> u64 {
        lock(&self.s.log)
            .calls
            .iter()
            .filter(|c| c.method == method)
            .map(|c| c.bytes_sent)
            .sum()
    }

    pub fn bytes_received_by(&self, method: Method) -> u64 {
        lock(&self.s.log)
            .calls
            .iter()
            .filter(|c| c.method == method)
            .map(|c| c.bytes_received)
            .sum()
    }

    /// Raw TCP bytes written to clients (HTTP/2 framing included).
    pub fn tcp_bytes_sent(&self) -> u64 {
        self.s.counters.tcp_out.load(Ordering::Relaxed)
    }

    /// Raw TCP bytes read from clients.
    pub fn tcp_bytes_received(&self) -> u64 {
        self.s.counters.tcp_in.load(Ordering::Relaxed)
    }

    /// TCP connections accepted.
    pub fn connections_accepted(&self) -> u64 {
        self.s.counters.connections.load(Ordering::Relaxed)
    }

    /// Every instance name seen.
    pub fn instance_names(&self) -> BTreeSet<String> {
        lock(&self.s.log)
            .calls
            .iter()
            .map(|c| c.instance_name.clone())
            .collect()
    }

    /// Calls running now (parked ones included).
    pub fn in_flight(&self) -> usize {
        self.s.in_flight.load(Ordering::Acquire)
    }

    /// Most calls running at once since the last reset.
    pub fn max_in_flight(&self) -> usize {
        self.s.max_in_flight.load(Ordering::Acquire)
    }

    /// Clears the call log, the Execute records and every counter (not the
    /// store, operations or faults).
    pub fn reset_stats(&self) {
        lock(&self.s.log).calls.clear();
        self.s
            .max_in_flight
            .store(self.s.in_flight.load(Ordering::Acquire), Ordering::Release);
        let c = &self.s.counters;
        c.tcp_in.store(0, Ordering::Relaxed);
        c.tcp_out.store(0, Ordering::Relaxed);
        c.connections.store(0, Ordering::Relaxed);
        self.s.exec.reset_stats();
    }

    /// One line per method: calls, payload bytes in/out (for test output).
    pub fn summary(&self) -> String {
        let calls = self.calls();
        let mut by: BTreeMap<Method, (usize, u64, u64)> = BTreeMap::new();
        for c in &calls {
            let e = by.entry(c.method).or_default();
            e.0 += 1;
            e.1 += c.bytes_received;
            e.2 += c.bytes_sent;
        }
        let mut out = format!(
            "fake upstream {}: {} calls, tcp in {} B / out {} B, {} connections\n",
            self.s.addr,
            calls.len(),
            self.tcp_bytes_received(),
            self.tcp_bytes_sent(),
            self.connections_accepted()
        );
        for (m, (n, rx, tx)) in by {
            out += &format!(
                "  {:<20} {n:>6} calls  in {rx:>10} B  out {tx:>10} B\n",
                m.name()
            );
        }
        out
    }

    /// Waits until at least `n` calls of `method` were logged; false on timeout.
    pub async fn wait_for_calls(&self, method: Method, n: usize, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            if self.count(method) >= n {
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }

    // ------------------------------------------------------------ latency

    /// Delay added to the start of every call (unless a method has its own).
    pub fn set_latency(&self, latency: Duration) {
        lock(&self.s.latency).all = latency;
    }

    /// Delay for one method; `None` falls back to [`Self::set_latency`].
    pub fn set_method_latency(&self, method: Method, latency: Option<Duration>) {
        let mut l = lock(&self.s.latency);
        match latency {
            Some(d) => l.per_method.insert(method, d),
            None => l.per_method.remove(&method),
        };
    }

    /// Delay before each ByteStream ReadResponse (makes transfers slow, so a
    /// second reader can join one in progress).
    pub fn set_read_chunk_delay(&self, delay: Duration) {
        lock(&self.s.latency).read_chunk_delay = delay;
    }

    /// Bytes per ByteStream ReadResponse (default 64 KiB).
    pub fn set_read_chunk_size(&self, bytes: usize) {
        self.s.read_chunk.store(bytes.max(1), Ordering::Relaxed);
    }

    // ------------------------------------------------------------ faults

    pub fn add_fault(&self, fault: Fault) {
        lock(&self.s.faults).push(fault);
    }

    /// The next `n` calls, of any method, fail with `code`.
    pub fn fail_next(&self, n: u64, code: Code) {
        self.add_fault(Fault {
            method: None,
            times: Some(n),
            action: FaultAction::Fail(code),
        });
    }

    /// The next `n` calls of `method` fail with `code`.
    pub fn fail_next_of(&self, method: Method, n: u64, code: Code) {
        self.add_fault(Fault {
            method: Some(method),
            times: Some(n),
            action: FaultAction::Fail(code),
        });
    }

    /// Every call of `method` fails with `code` until [`Self::clear_faults`].
    pub fn fail_method(&self, method: Method, code: Code) {
        self.add_fault(Fault {
            method: Some(method),
            times: None,
            action: FaultAction::Fail(code),
        });
    }

    /// The next Read (or Write) stream breaks with `code` after `bytes` bytes.
    pub fn abort_next_stream(&self, method: Method, bytes: u64, code: Code) {
        assert!(
            matches!(method, Method::Read | Method::Write),
            "only Read and Write streams can be aborted"
        );
        self.add_fault(Fault {
            method: Some(method),
            times: Some(1),
            action: FaultAction::AbortAfter { bytes, code },
        });
    }

    pub fn clear_faults(&self) {
        lock(&self.s.faults).clear();
    }

    // ------------------------------------------------------------ gate

    /// Parks every new call at entry until [`Self::resume`].
    pub fn pause(&self) {
        lock(&self.s.pause).all = true;
    }

    /// Parks new calls of `method` only.
    pub fn pause_method(&self, method: Method) {
        lock(&self.s.pause).methods.insert(method);
    }

    /// Lets every parked call continue; nothing is paused afterwards.
    pub fn resume(&self) {
        *lock(&self.s.pause) = PauseState::default();
        self.s.resumed.notify_waiters();
    }

    /// Calls parked now.
    pub fn parked(&self) -> usize {
        self.s.parked.load(Ordering::Acquire)
    }

    /// Waits until at least `n` calls are parked; false on timeout.
    pub async fn wait_parked(&self, n: usize, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            if self.parked() >= n {
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }

    // ------------------------------------------------------------ capabilities

    pub fn capabilities(&self) -> re::ServerCapabilities {
        self.s.caps()
    }

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

    // ------------------------------------------------------------ outages

    pub fn net_mode(&self) -> NetMode {
        lock(&self.s.net).mode
    }

    /// Stops listening (new connections are refused) and resets every open
    /// connection, so in-flight calls fail with UNAVAILABLE-like errors.
    pub async fn go_down(&self) {
        let accept = {
            let mut net = lock(&self.s.net);
            net.mode = NetMode::Refusing;
            net.set_all(&[LINK_UP, LINK_STALLED], LINK_KILLED);
            net.accept.take()
        };
        if let Some(task) = accept {
            task.abort();
            let _ = task.await; // the listener is closed once this returns
        }
    }

    /// Keeps accepting connections but stops moving bytes on all of them
    /// (existing and new) until [`Self::come_up`]: calls hang.
    pub async fn blackhole(&self) {
        {
            let mut net = lock(&self.s.net);
            net.mode = NetMode::Blackhole;
            net.set_all(&[LINK_UP], LINK_STALLED);
        }
        self.ensure_listening().await;
    }

    /// Serves again on the same port; stalled connections resume.
    pub async fn come_up(&self) {
        self.ensure_listening().await;
        let mut net = lock(&self.s.net);
        net.mode = NetMode::Up;
        net.set_all(&[LINK_STALLED], LINK_UP);
    }

    /// Resets every open connection; keeps listening.
    pub fn drop_connections(&self) {
        lock(&self.s.net).set_all(&[LINK_UP, LINK_STALLED], LINK_KILLED);
    }

    async fn ensure_listening(&self) {
        if lock(&self.s.net).accept.is_some() {
            return;
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        let listener = loop {
            match TcpListener::bind(self.s.addr).await {
                Ok(l) => break l,
                Err(e) if Instant::now() < deadline => {
                    let _ = e;
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                Err(e) => panic!("fake upstream cannot listen on {} again: {e}", self.s.addr),
            }
        };
        let task = tokio::spawn(accept_loop(listener, self.s.clone()));
        let mut net = lock(&self.s.net);
        if let Some(old) = net.accept.replace(task) {
            old.abort();
        }
    }
}

impl Drop for FakeUpstream {
    fn drop(&mut self) {
        let mut net = lock(&self.s.net);
        net.set_all(&[LINK_UP, LINK_STALLED], LINK_KILLED);
        if let Some(task) = net.accept.take() {
            task.abort();
        }
        self.server.abort();
    }
}

async fn accept_loop(listener: TcpListener, s: Arc<Shared>) {
    loop {
        let io = match listener.accept().await {
            Ok((io, _)) => io,
            Err(_) => {
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        let _ = io.set_nodelay(true);
        let ctl = {
            let mut net = lock(&s.net);
            let state = match net.mode {
                NetMode::Blackhole => LINK_STALLED,
                _ => LINK_UP,
            };
            let ctl = Arc::new(LinkCtl {
                state: AtomicU8::new(state),
                waker: AtomicWaker::new(),
            });
            net.links.retain(|w| w.strong_count() > 0);
            net.links.push(Arc::downgrade(&ctl));
            ctl
        };
        s.counters.connections.fetch_add(1, Ordering::Relaxed);
        let conn = Conn {
            io,
            ctl,
            counters: s.counters.clone(),
        };
        if s.conn_tx.send(Ok(conn)).await.is_err() {
            return;
        }
    }
}
