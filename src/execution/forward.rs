//! Forwarding one execution: opening Execute or WaitExecution upstream and
//! relaying its Operations to the client until the operation is done. A
//! broken upstream stream is reattached with WaitExecution; a client that
//! goes away cancels the upstream call.

use std::sync::Arc;

use bazel_remote_apis::build::bazel::remote::execution::v2::{
    ExecuteRequest, WaitExecutionRequest,
};
use bazel_remote_apis::google::longrunning::Operation;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::{Code, Status, Streaming};
use tracing::Instrument;

use crate::context::RequestContext;
use crate::digest::{Digest, DigestFunction};
use crate::error::{Error, Result};
use crate::execution::repair::Repairs;
use crate::execution::{ExecutionDeps, OperationStream};
use crate::stats::{Stats, UpstreamMethod};
use crate::upstream::client::is_transient;

/// Times a broken Operation stream is reattached before giving up.
const MAX_REATTACHES: u32 = 5;
/// Operations buffered between the upstream stream and the client.
const RELAY_BUFFER: usize = 16;

/// Where relayed Operations (or the error that ends the stream) go.
type Sink = mpsc::Sender<Result<Operation>>;

/// One forwarded execution (or reattachment).
pub(super) struct Forwarder {
    /// What every execution needs.
    pub(super) deps: Arc<ExecutionDeps>,
    /// The client's request (instance, headers to forward).
    pub(super) ctx: RequestContext,
    /// The digest function of the action's blobs.
    pub(super) function: DigestFunction,
    /// The request as sent upstream; `None` for WaitExecution.
    pub(super) request: Option<ExecuteRequest>,
    /// The action, when known up front.
    pub(super) action: Option<Digest>,
    /// MISSING repairs: how many were done, what to upload by default.
    pub(super) repairs: Repairs,
}

impl Forwarder {
    /// Opens Execute, repairing MISSING inputs while the call fails so and
    /// each round has something to upload.
    pub(super) async fn open_execute(&mut self) -> Result<Streaming<Operation>> {
        loop {
            match self.open(None).await {
                Err(Error::Upstream(status)) => {
                    let missing = self.repairs.named_by_call(&status.0, self.function);
                    if !self.repair(missing).await {
                        return Err(Error::Upstream(status));
                    }
                }
                other => return other,
            }
        }
    }

    /// For a final Operation that failed with MISSING inputs: repair and
    /// execute again. `None` when there is nothing to retry.
    async fn retry_if_missing(&mut self, op: &Operation) -> Option<Result<Streaming<Operation>>> {
        let missing = Repairs::named_by_result(op, self.function)?;
        if !self.repair(missing).await {
            return None;
        }
        Some(self.open_execute().await)
    }

    /// One repair round, for an Execute (a WaitExecution cannot be redone).
    async fn repair(&mut self, missing: Vec<Digest>) -> bool {
        self.request.is_some()
            && self
                .repairs
                .upload(&self.ctx, &self.deps.uploader, &self.deps.stats, missing)
                .await
    }

    /// Opens Execute (`wait` unset) or WaitExecution on operation `wait`,
    /// with the upstream's retry and health policy.
    pub(super) async fn open(&self, wait: Option<&str>) -> Result<Streaming<Operation>> {
        let up = &self.deps.upstream;
        match (wait, &self.request) {
            (Some(name), _) => {
                up.open_stream(&self.ctx, UpstreamMethod::WaitExecution, || {
                    let mut client = up.execution();
                    let request = up.request(
                        &self.ctx,
                        WaitExecutionRequest {
                            name: name.to_string(),
                        },
                    );
                    async move { client.wait_execution(request).await }
                })
                .await
            }
            (None, Some(request)) => {
                up.open_stream(&self.ctx, UpstreamMethod::Execute, || {
                    let mut client = up.execution();
                    let request = up.request(&self.ctx, request.clone());
                    async move { client.execute(request).await }
                })
                .await
            }
            (None, None) => Err(Error::Internal("nothing to execute".into())),
        }
    }

    /// Relays `stream` to the returned stream from a background task; the
    /// task ends when the operation is done, the client goes away, or the
    /// server shuts down.
    pub(super) fn relay(self, stream: Streaming<Operation>) -> OperationStream {
        let (tx, rx) = mpsc::channel(RELAY_BUFFER);
        let background = self.deps.background.clone();
        // Ends the client's stream as soon as the server stops accepting
        // calls, so the drain of calls in flight does not wait for it.
        let closing = background.closing_token();
        // Not cancelled by dropping: a relay that is caching a result
        // finishes it; otherwise it ends at its next wait on `closing`.
        background.spawn_uncancelled(self.run(stream, tx, closing).in_current_span());
        Box::pin(ReceiverStream::new(rx))
    }

    /// Relays Operations to the client until the operation is done.
    async fn run(
        mut self,
        mut stream: Streaming<Operation>,
        tx: Sink,
        shutdown: CancellationToken,
    ) {
        let mut last_name: Option<String> = None;
        let mut reattaches = 0;
        loop {
            let next = tokio::select! {
                next = stream.message() => next,
                _ = tx.closed() => {
                    tracing::debug!("client left; cancelling the upstream operation stream");
                    return;
                }
                _ = shutdown.cancelled() => {
                    let why = "Outpost is shutting down; reattach with WaitExecution";
                    let _ = tx.send(Err(Error::Unavailable(why.into()))).await;
                    return;
                }
            };
            let broken = match next {
                Ok(Some(op)) => {
                    last_name = Some(op.name.clone());
                    if !op.done {
                        if tx.send(Ok(op)).await.is_err() {
                            return;
                        }
                        continue;
                    }
                    match self.retry_if_missing(&op).await {
                        Some(Ok(s)) => {
                            stream = s;
                            continue;
                        }
                        Some(Err(e)) => {
                            let _ = tx.send(Err(e)).await;
                            return;
                        }
                        None => {}
                    }
                    self.finished(&op).await;
                    let _ = tx.send(Ok(op)).await;
                    return;
                }
                Ok(None) => {
                    Status::unavailable("upstream ended the stream before the operation finished")
                }
                Err(status) => status,
            };
            let Some(name) = last_name.as_deref().filter(|_| {
                reattaches < MAX_REATTACHES
                    && (is_transient(&broken) || broken.code() == Code::Unavailable)
            }) else {
                let _ = tx.send(Err(Error::relayed(broken))).await;
                return;
            };
            reattaches += 1;
            Stats::add(&self.deps.stats.execution_reattaches, 1);
            tracing::debug!(
                "operation stream broke ({}); reattaching to {name}",
                broken.message()
            );
            match self.open(Some(name)).await {
                Ok(s) => stream = s,
                Err(e) => {
                    let _ = tx.send(Err(e)).await;
                    return;
                }
            }
        }
    }
}
