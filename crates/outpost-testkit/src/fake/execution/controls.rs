//! The [`FakeUpstream`] methods that steer and inspect execution.

use std::sync::atomic::Ordering;
use std::time::Duration;

use bazel_remote_apis::google::longrunning::Operation;
use tonic::Code;

use super::{
    ErrorDelivery, ExecuteRecord, InjectedFailure, OpEntry, StreamBreak, StreamEnd, TestAction,
};
use crate::fake::state::lock;
use crate::fake::{FakeUpstream, Method, poll_until};

/// Execution controls and records.
impl FakeUpstream {
    /// Advertises `exec_enabled` in Capabilities (the services are served
    /// either way).
    pub fn set_execution_enabled(&self, enabled: bool) {
        let mut caps = lock(&self.s.capabilities);
        caps.execution_capabilities
            .get_or_insert_with(Default::default)
            .exec_enabled = enabled;
    }

    /// Time a job stays QUEUED before EXECUTING.
    pub fn set_queue_delay(&self, delay: Duration) {
        self.s.exec.cfg().queue_delay = delay;
    }

    /// Time a job stays EXECUTING before it completes.
    pub fn set_execution_delay(&self, delay: Duration) {
        self.s.exec.cfg().exec_delay = delay;
    }

    /// Jobs stay EXECUTING (after their delay) until [`Self::release_executions`].
    pub fn hold_executions(&self) {
        *lock(&self.s.exec.held) = true;
    }

    /// Lets held jobs complete; new jobs are not held.
    pub fn release_executions(&self) {
        *lock(&self.s.exec.held) = false;
        self.s.exec.released.notify_waiters();
    }

    /// Size of every output file not named in [`Self::set_output_size`] (default 1000).
    pub fn set_default_output_size(&self, bytes: usize) {
        self.s.exec.cfg().default_output_size = bytes;
    }

    /// Size of output file `path` (as named in the Command).
    pub fn set_output_size(&self, path: &str, bytes: usize) {
        self.s
            .exec
            .cfg()
            .output_sizes
            .insert(path.to_string(), bytes);
    }

    /// Entries of `output_paths` that the "action" makes directories
    /// (`output_directories` of REAPI 2.0 Commands always are).
    pub fn set_directory_outputs(&self, paths: &[&str]) {
        self.s.exec.cfg().directory_paths = paths.iter().map(|s| s.to_string()).collect();
    }

    /// Files (relative path, size) in every output directory. Default:
    /// `file.bin` (1000 B) and `sub/nested.bin` (500 B).
    pub fn set_directory_layout(&self, files: &[(&str, usize)]) {
        self.s.exec.cfg().directory_layout =
            files.iter().map(|(p, n)| (p.to_string(), *n)).collect();
    }

    /// Whether OutputDirectory carries `root_directory_digest` (default true;
    /// the Directory blobs are stored either way).
    pub fn set_root_directory_digests(&self, on: bool) {
        self.s.exec.cfg().root_directory_digests = on;
    }

    /// Sizes of stdout and stderr (defaults 100 and 20; always stored as blobs).
    pub fn set_stdio_sizes(&self, stdout: usize, stderr: usize) {
        let mut c = self.s.exec.cfg();
        c.stdout_size = stdout;
        c.stderr_size = stderr;
    }

    /// Exit code of every execution (non-zero results are not cached).
    pub fn set_exit_code(&self, code: i32) {
        self.s.exec.cfg().exit_code = code;
    }

    /// Operation names are `{prefix}N` (default prefix `operations/`;
    /// BuildGrid's look like `{instance}/{uuid}`, e.g. `/3f2a…` for "").
    pub fn set_operation_name_prefix(&self, prefix: &str) {
        self.s.exec.cfg().name_prefix = prefix.to_string();
    }

    /// How missing inputs are reported (default [`ErrorDelivery::GrpcError`]).
    pub fn set_missing_input_delivery(&self, delivery: ErrorDelivery) {
        self.s.exec.cfg().missing_delivery = delivery;
    }

    /// The next `n` Executes that get past the cache lookup and input check
    /// fail with `code`/`message`, delivered as `delivery` (the others run
    /// the job's stages first). For a plain failure at call entry see
    /// [`Self::fail_next_of`] with [`Method::Execute`].
    pub fn fail_next_executions(
        &self,
        n: usize,
        code: Code,
        message: &str,
        delivery: ErrorDelivery,
    ) {
        let mut c = self.s.exec.cfg();
        for _ in 0..n {
            c.failures.push_back(InjectedFailure {
                code,
                message: message.to_string(),
                delivery,
            });
        }
    }

    /// The next `streams` streams of `method` (Execute or WaitExecution)
    /// end after `after` Operations unless the Operation was done by then:
    /// cleanly ([`StreamEnd::Eof`]) or with an error. The job runs on, so a
    /// client can reattach with WaitExecution.
    pub fn break_streams(&self, method: Method, streams: usize, after: usize, end: StreamEnd) {
        assert!(
            matches!(method, Method::Execute | Method::WaitExecution),
            "only Execute and WaitExecution streams can be broken"
        );
        self.s.exec.cfg().breaks.push(StreamBreak {
            method,
            streams,
            after,
            end,
        });
    }

    /// Forgets stream breaks and injected execution failures.
    pub fn clear_execution_faults(&self) {
        let mut c = self.s.exec.cfg();
        c.breaks.clear();
        c.failures.clear();
    }

    /// Every Execute request received, oldest first.
    pub fn execute_requests(&self) -> Vec<ExecuteRecord> {
        lock(&self.s.exec.records).clone()
    }

    /// The most recent Execute request.
    pub fn last_execute_request(&self) -> Option<ExecuteRecord> {
        lock(&self.s.exec.records).last().cloned()
    }

    /// Every operation's name, oldest first.
    pub fn operation_names(&self) -> Vec<String> {
        let ops = lock(&self.s.exec.ops);
        let mut v: Vec<(u64, String)> = ops.iter().map(|(n, e)| (e.seq, n.clone())).collect();
        v.sort();
        v.into_iter().map(|(_, n)| n).collect()
    }

    /// The current state of an operation.
    pub fn operation(&self, name: &str) -> Option<Operation> {
        lock(&self.s.exec.ops).get(name).map(OpEntry::current)
    }

    /// Every state an operation went through, oldest first.
    pub fn operation_history(&self, name: &str) -> Vec<Operation> {
        lock(&self.s.exec.ops)
            .get(name)
            .map(|e| e.history.clone())
            .unwrap_or_default()
    }

    /// Cancels an operation as CancelOperation would (false if unknown).
    pub fn cancel_operation(&self, name: &str) -> bool {
        self.s.cancel_op(name).is_ok()
    }

    /// Waits until operation `name` is done; false on timeout or if unknown.
    pub async fn wait_operation_done(&self, name: &str, timeout: Duration) -> bool {
        let mut known = true;
        let done = poll_until(timeout, || match lock(&self.s.exec.ops).get(name) {
            Some(e) => e.done(),
            None => {
                known = false;
                true
            }
        })
        .await;
        done && known
    }

    /// Jobs started (Executes that passed the cache lookup and input check).
    pub fn executions_started(&self) -> usize {
        self.s.exec.counters.started.load(Ordering::Relaxed)
    }

    /// Jobs that reached done on their own (not cancelled).
    pub fn executions_completed(&self) -> usize {
        self.s.exec.counters.completed.load(Ordering::Relaxed)
    }

    /// Executes answered from the action cache.
    pub fn execution_cache_hits(&self) -> usize {
        self.s.exec.counters.cache_hits.load(Ordering::Relaxed)
    }

    /// Executes refused for missing inputs.
    pub fn missing_input_rejections(&self) -> usize {
        self.s.exec.counters.missing_inputs.load(Ordering::Relaxed)
    }

    /// Operations cancelled before they were done.
    pub fn operations_cancelled(&self) -> usize {
        self.s.exec.counters.cancelled_ops.load(Ordering::Relaxed)
    }

    /// Execute streams the client dropped before the Operation was done.
    pub fn execute_streams_dropped(&self) -> usize {
        self.s.exec.counters.execute_dropped.load(Ordering::Relaxed)
    }

    /// WaitExecution streams the client dropped before the Operation was done.
    pub fn wait_streams_dropped(&self) -> usize {
        self.s.exec.counters.wait_dropped.load(Ordering::Relaxed)
    }

    /// Waits until at least `n` Execute streams were dropped by the client.
    pub async fn wait_execute_dropped(&self, n: usize, timeout: Duration) -> bool {
        poll_until(timeout, || self.execute_streams_dropped() >= n).await
    }

    /// Stores every blob of a [`TestAction`] (Action, Command, inputs).
    pub fn put_test_action(&self, action: &TestAction) {
        for (d, data) in &action.blobs {
            self.s.store(d, data.clone());
        }
    }
}
