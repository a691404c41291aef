//! The call log: one [`Call`] per RPC the fake received, and the queries
//! tests make over it.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use prost::Message;
use tonic::Code;
use tonic::metadata::MetadataMap;

use super::state::{lock, same};
use super::{FakeUpstream, Method, REQUEST_METADATA_HEADER, poll_until};
use crate::re;

/// One call as the fake saw it.
#[derive(Clone, Debug)]
pub struct Call {
    /// Increasing per fake (not reset by [`FakeUpstream::reset_stats`]).
    pub id: u64,
    /// The RPC.
    pub method: Method,
    /// From the request field, or parsed from the ByteStream resource name
    /// (empty if it could not be parsed, e.g. a log stream name);
    /// CreateLogStream: the parent.
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
    /// Blobs this call carried zstd-compressed (either way); their bytes in
    /// `bytes_sent` / `bytes_received` are the compressed ones.
    pub compressed_blobs: u64,
    /// Final code; `None` while the call is still running. A call whose
    /// client went away mid-stream ends as `Cancelled`.
    pub code: Option<Code>,
    /// True when `code` was injected by a fault.
    pub injected: bool,
    /// When the call arrived (before the pause, latency and faults).
    pub started: Instant,
    /// When it ended; `None` while it runs.
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

/// Every call since the last reset, in arrival order.
#[derive(Default)]
pub(super) struct Log {
    pub(super) next_id: u64,
    pub(super) calls: Vec<Call>,
}

/// Queries over the call log and the counters.
impl FakeUpstream {
    /// Every call since the last reset, oldest first.
    pub fn calls(&self) -> Vec<Call> {
        lock(&self.s.log).calls.clone()
    }

    /// The calls of `method`, oldest first.
    pub fn calls_of(&self, method: Method) -> Vec<Call> {
        let log = lock(&self.s.log);
        log.calls
            .iter()
            .filter(|c| c.method == method)
            .cloned()
            .collect()
    }

    /// Sums `f` over the calls of `method` (every call for `None`) without
    /// copying the log.
    fn sum(&self, method: Option<Method>, f: impl Fn(&Call) -> u64) -> u64 {
        let log = lock(&self.s.log);
        log.calls
            .iter()
            .filter(|c| method.is_none_or(|m| c.method == m))
            .map(f)
            .sum()
    }

    /// The most recent call of `method`.
    pub fn last_call(&self, method: Method) -> Option<Call> {
        let log = lock(&self.s.log);
        log.calls.iter().rev().find(|c| c.method == method).cloned()
    }

    /// Calls of `method` (including failed ones).
    pub fn count(&self, method: Method) -> usize {
        self.sum(Some(method), |_| 1) as usize
    }

    /// Calls of any method.
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
        let log = lock(&self.s.log);
        log.calls
            .iter()
            .filter(|c| c.method == method)
            .map(|c| c.digests.len())
            .collect()
    }

    /// Calls of `method` that named `digest`.
    pub fn count_naming(&self, method: Method, digest: &re::Digest) -> usize {
        self.sum(Some(method), |c| u64::from(c.names(digest))) as usize
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
        self.sum(None, |c| c.bytes_sent)
    }

    /// Payload bytes received from clients (see [`Call::bytes_received`]).
    pub fn bytes_received(&self) -> u64 {
        self.sum(None, |c| c.bytes_received)
    }

    /// Payload bytes sent by calls of `method`.
    pub fn bytes_sent_by(&self, method: Method) -> u64 {
        self.sum(Some(method), |c| c.bytes_sent)
    }

    /// Payload bytes received by calls of `method`.
    pub fn bytes_received_by(&self, method: Method) -> u64 {
        self.sum(Some(method), |c| c.bytes_received)
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
        poll_until(timeout, || self.count(method) >= n).await
    }
}
