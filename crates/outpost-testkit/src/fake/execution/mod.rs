//! REAPI Execution (Execute, WaitExecution) and google.longrunning Operations
//! for the fake upstream. It shares the
//! fake's CAS, action cache, call log, faults, latency and pause gate (every
//! call is logged under its own [`Method`]), and adds control methods to
//! [`FakeUpstream`](super::FakeUpstream).
//!
//! # What Execute does
//! 1. `skip_cache_lookup == false` and the action cache holds a result for
//!    (instance, action digest): one done Operation, `cached_result = true`.
//! 2. The Action, its Command and every blob of the input root (directories
//!    and files) must be in the fake's CAS. Otherwise FAILED_PRECONDITION
//!    with a `google.rpc.PreconditionFailure` detail holding one violation per
//!    missing blob (`type` "MISSING", `subject` "blobs/{hash}/{size}"),
//!    delivered as configured ([`FakeUpstream::set_missing_input_delivery`](super::FakeUpstream::set_missing_input_delivery)):
//!    a gRPC error on the call (default) or in the final Operation.
//! 3. Otherwise a job "runs" in the background, independent of the client's
//!    stream: stage QUEUED, EXECUTING (after the queue delay), then done
//!    (after the execution delay). Outputs are deterministic
//!    ([`output_content`]): each output file's bytes depend only on the
//!    action digest and the path; output directories hold
//!    [`FakeUpstream::set_directory_layout`](super::FakeUpstream::set_directory_layout) files. The outputs, stdout and
//!    stderr, a Tree blob and every Directory of each output directory are
//!    stored in the CAS; the ActionResult is stored in the action cache
//!    (unless `do_not_cache` or a non-zero exit code) and returned in an
//!    `ExecuteResponse` (with stdout/stderr/output files inlined as the
//!    request asks).
//!
//! Operation names are `operations/N` (N counts from 1 per fake; the prefix
//! is configurable). Stream
//! messages: every state of the job in order from QUEUED (Execute), or from
//! the current state (WaitExecution), until done. Metadata is
//! `ExecuteOperationMetadata` (type URL [`EXECUTE_METADATA_TYPE`]), the
//! response `ExecuteResponse` ([`EXECUTE_RESPONSE_TYPE`]).
//!
//! Controls: delays, a gate that holds jobs before completion, streams that
//! break after N messages (so the client must WaitExecution to reattach),
//! failures delivered as gRPC error / ExecuteResponse.status /
//! Operation.error, and counters of streams the client dropped before done.
//! Execution is served whatever the capabilities say; they advertise
//! `exec_enabled = false` until [`FakeUpstream::set_execution_enabled`](super::FakeUpstream::set_execution_enabled).

//!
//! # Layout
//! - `wire`: Operation / Status helpers tests use to read what came back.
//! - `action`: [`TestAction`], an action with its inputs, built for tests.
//! - `job`: input checks, the job that "runs", its outputs.
//! - `stream`: streaming an operation's states; cancelling.
//! - `service`: the Execution and Operations services.
//! - `controls`: the [`FakeUpstream`](super::FakeUpstream) methods that steer execution.

mod action;
mod controls;
mod job;
mod service;
mod stream;
mod wire;

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use bazel_remote_apis::google::longrunning::Operation;
use tokio::sync::{Notify, watch};
use tokio::task::JoinHandle;
use tonic::Code;
use tonic::metadata::MetadataMap;

use super::Method;
use super::state::lock;
use crate::re;

pub use action::TestAction;
pub(super) use service::services;
pub use wire::{
    EXECUTE_METADATA_TYPE, EXECUTE_RESPONSE_TYPE, PRECONDITION_FAILURE_TYPE, PreconditionFailure,
    Violation, missing_digests, missing_digests_of, missing_status, operation_metadata,
    operation_response, operation_stage, output_content, pack_any, rpc_to_status, status_details,
    stdio_content,
};

/// How an error of an Execute reaches the client.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ErrorDelivery {
    /// The Execute call itself fails with the status (no Operation is made).
    GrpcError,
    /// The final (done) Operation carries `ExecuteResponse.status`.
    ResponseStatus,
    /// The final Operation carries `Operation.error` (REAPI says servers must
    /// not, but some do).
    OperationError,
}

/// How a broken Execute / WaitExecution stream ends.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StreamEnd {
    /// The stream ends with status OK although the Operation is not done.
    Eof,
    /// The stream ends with this error code.
    Error(Code),
}

/// One Execute request as the fake received it.
#[derive(Clone, Debug)]
pub struct ExecuteRecord {
    /// The [`Call::id`](super::Call::id) of the Execute call in the call log.
    pub call_id: u64,
    /// The request as received.
    pub request: re::ExecuteRequest,
    /// Its gRPC headers.
    pub headers: MetadataMap,
    /// The Operation made for it (`None`: failed before one was made).
    pub operation: Option<String>,
}

struct StreamBreak {
    method: Method,
    streams: usize,
    after: usize,
    end: StreamEnd,
}

struct InjectedFailure {
    code: Code,
    message: String,
    delivery: ErrorDelivery,
}

struct ExecConfig {
    queue_delay: Duration,
    exec_delay: Duration,
    default_output_size: usize,
    output_sizes: HashMap<String, usize>,
    directory_paths: HashSet<String>,
    directory_layout: Vec<(String, usize)>,
    root_directory_digests: bool,
    stdout_size: usize,
    stderr_size: usize,
    exit_code: i32,
    missing_delivery: ErrorDelivery,
    name_prefix: String,
    breaks: Vec<StreamBreak>,
    failures: VecDeque<InjectedFailure>,
}

impl Default for ExecConfig {
    fn default() -> Self {
        ExecConfig {
            queue_delay: Duration::ZERO,
            exec_delay: Duration::ZERO,
            default_output_size: 1000,
            output_sizes: HashMap::new(),
            directory_paths: HashSet::new(),
            directory_layout: vec![
                ("file.bin".to_string(), 1000),
                ("sub/nested.bin".to_string(), 500),
            ],
            root_directory_digests: true,
            stdout_size: 100,
            stderr_size: 20,
            exit_code: 0,
            missing_delivery: ErrorDelivery::GrpcError,
            name_prefix: "operations/".to_string(),
            breaks: Vec::new(),
            failures: VecDeque::new(),
        }
    }
}

struct OpEntry {
    seq: u64,
    instance: String,
    action: re::Digest,
    /// Every state, oldest first; the last one is current.
    history: Vec<Operation>,
    /// Number of states, for subscribers.
    version: watch::Sender<usize>,
    job: Option<JoinHandle<()>>,
}

impl OpEntry {
    fn current(&self) -> Operation {
        self.history.last().cloned().unwrap_or_default()
    }
    fn done(&self) -> bool {
        self.history.last().is_some_and(|o| o.done)
    }
}

#[derive(Default)]
struct ExecCounters {
    started: AtomicUsize,
    completed: AtomicUsize,
    cache_hits: AtomicUsize,
    missing_inputs: AtomicUsize,
    cancelled_ops: AtomicUsize,
    execute_dropped: AtomicUsize,
    wait_dropped: AtomicUsize,
}

/// The execution part of the fake's state (a field of `Shared`).
#[derive(Default)]
pub(super) struct ExecState {
    cfg: Mutex<ExecConfig>,
    ops: Mutex<HashMap<String, OpEntry>>,
    next_op: AtomicU64,
    records: Mutex<Vec<ExecuteRecord>>,
    counters: ExecCounters,
    held: Mutex<bool>,
    released: Notify,
}
impl ExecState {
    /// Clears the Execute records and counters (with `reset_stats`).
    pub(super) fn reset_stats(&self) {
        lock(&self.records).clear();
        let c = &self.counters;
        for n in [
            &c.started,
            &c.completed,
            &c.cache_hits,
            &c.missing_inputs,
            &c.cancelled_ops,
            &c.execute_dropped,
            &c.wait_dropped,
        ] {
            n.store(0, Ordering::Relaxed);
        }
    }

    /// The execution settings, locked.
    fn cfg(&self) -> MutexGuard<'_, ExecConfig> {
        lock(&self.cfg)
    }

    fn take_break(&self, method: Method) -> Option<(usize, StreamEnd)> {
        let mut cfg = self.cfg();
        let i = cfg
            .breaks
            .iter()
            .position(|b| b.method == method && b.streams > 0)?;
        let b = &mut cfg.breaks[i];
        b.streams -= 1;
        let out = (b.after, b.end);
        if b.streams == 0 {
            cfg.breaks.remove(i);
        }
        Some(out)
    }

    /// Appends a state to operation `name` (ignored if it was deleted or is done).
    fn push(&self, name: &str, op: Operation) {
        let mut ops = lock(&self.ops);
        if let Some(e) = ops.get_mut(name)
            && !e.done()
        {
            e.history.push(op);
            e.version.send_replace(e.history.len());
        }
    }

    fn is_held(&self) -> bool {
        *lock(&self.held)
    }

    async fn wait_released(&self) {
        loop {
            let notified = self.released.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if !self.is_held() {
                return;
            }
            notified.await;
        }
    }
}
