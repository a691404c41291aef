//! An operation's states as a stream (Execute, WaitExecution), with the
//! injected breaks and the counters of streams the client dropped; lookups
//! and cancellation of operations.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use bazel_remote_apis::google::longrunning::Operation;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Code, Status};

use super::wire::{done_op, failure_result, operation_metadata};
use super::{ErrorDelivery, OpEntry, StreamEnd};
use crate::fake::Method;
use crate::fake::call::CallGuard;
use crate::fake::cas::BoxStream;
use crate::fake::state::{Shared, lock, rpc_status};
use crate::re;

impl Shared {
    /// Streams the states of operation `name` from index `from` until done,
    /// on its own task; the guard's call ends with the stream.
    pub(super) fn stream_op(
        self: &Arc<Self>,
        method: Method,
        name: String,
        from: usize,
        guard: CallGuard,
    ) -> BoxStream<Operation> {
        let brk = self.exec.take_break(method);
        let (tx, rx) = mpsc::channel(16);
        let s = self.clone();
        tokio::spawn(async move {
            let dropped = |s: &Shared| {
                let c = &s.exec.counters;
                match method {
                    Method::Execute => c.execute_dropped.fetch_add(1, Ordering::Relaxed),
                    _ => c.wait_dropped.fetch_add(1, Ordering::Relaxed),
                };
            };
            let Some(mut version) = lock(&s.exec.ops).get(&name).map(|e| e.version.subscribe())
            else {
                let _ = tx
                    .send(Err(Status::not_found("fake upstream: operation deleted")))
                    .await;
                guard.finish(Code::NotFound, false);
                return;
            };
            let mut idx = from;
            let mut sent = 0usize;
            loop {
                let batch: Option<Vec<Operation>> = lock(&s.exec.ops)
                    .get(&name)
                    .map(|e| e.history.get(idx..).map(<[_]>::to_vec).unwrap_or_default());
                let Some(batch) = batch else {
                    let _ = tx
                        .send(Err(Status::not_found("fake upstream: operation deleted")))
                        .await;
                    guard.finish(Code::NotFound, false);
                    return;
                };
                let mut pending = batch.into_iter();
                loop {
                    // An injected break ends the stream once `after` were sent.
                    if let Some((after, end)) = brk.filter(|(after, _)| sent >= *after) {
                        if let StreamEnd::Error(code) = end {
                            let msg = format!(
                                "fake upstream: injected break of {} after {after} operation(s)",
                                method.name()
                            );
                            let _ = tx.send(Err(Status::new(code, msg))).await;
                            guard.finish(code, true);
                        } else {
                            guard.finish(Code::Ok, true);
                        }
                        return;
                    }
                    let Some(op) = pending.next() else { break };
                    let done = op.done;
                    if tx.send(Ok(op)).await.is_err() {
                        dropped(&s);
                        return; // the guard records Cancelled
                    }
                    sent += 1;
                    idx += 1;
                    if done {
                        guard.finish(Code::Ok, false);
                        return;
                    }
                }
                tokio::select! {
                    _ = tx.closed() => {
                        dropped(&s);
                        return;
                    }
                    r = version.changed() => {
                        if r.is_err() {
                            let _ = tx.send(Err(Status::not_found("fake upstream: operation deleted"))).await;
                            guard.finish(Code::NotFound, false);
                            return;
                        }
                    }
                }
            }
        });
        Box::pin(ReceiverStream::new(rx))
    }

    /// Instance and action of a known operation (for the call log).
    pub(super) fn op_info(&self, name: &str) -> Option<(String, re::Digest)> {
        lock(&self.exec.ops)
            .get(name)
            .map(|e| (e.instance.clone(), e.action.clone()))
    }

    pub(super) fn current_op(&self, name: &str) -> Result<Operation, Status> {
        lock(&self.exec.ops)
            .get(name)
            .map(OpEntry::current)
            .ok_or_else(|| Status::not_found(format!("fake upstream: no operation {name:?}")))
    }
}

// ---------------------------------------------------------------- services
impl Shared {
    /// Cancels a running job: its Operation ends done with
    /// `ExecuteResponse.status` CANCELLED. A done one is left as it is.
    pub(super) fn cancel_op(&self, name: &str) -> Result<(), Status> {
        let mut ops = lock(&self.exec.ops);
        let e = ops
            .get_mut(name)
            .ok_or_else(|| Status::not_found(format!("fake upstream: no operation {name:?}")))?;
        if e.done() {
            return Ok(());
        }
        if let Some(job) = e.job.take() {
            job.abort();
        }
        let result = failure_result(
            rpc_status(Code::Cancelled, "fake upstream: operation cancelled"),
            ErrorDelivery::ResponseStatus,
        );
        let function = operation_metadata(&e.current()).map_or(0, |m| m.digest_function);
        e.history.push(done_op(name, &e.action, function, result));
        e.version.send_replace(e.history.len());
        self.exec
            .counters
            .cancelled_ops
            .fetch_add(1, Ordering::Relaxed);
        Ok(())
    }
}
