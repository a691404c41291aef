//! Execution passthrough: Execute and WaitExecution are forwarded to the
//! upstream with every field and the client's headers, and the Operation
//! stream comes back as it arrives.
//!
//! Around the forwarding, Outpost:
//! - makes sure the upstream has the Action, Command and input tree first
//!   (a FindMissingBlobs, mostly answered by the existence cache; blobs only
//!   Outpost holds are uploaded);
//! - on FAILED_PRECONDITION with MISSING violations (as a call error or in
//!   the final ExecuteResponse), uploads the listed blobs from the local
//!   store and executes once more;
//! - reattaches with WaitExecution when the upstream stream breaks;
//! - cancels the upstream call when the client goes away;
//! - on success, stores the ActionResult locally and queues its outputs for
//!   prefetch, without holding back the final Operation.

use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use bazel_remote_apis::build::bazel::remote::execution::v2::{
    ExecuteRequest, WaitExecutionRequest, execution_server::Execution,
};
use bazel_remote_apis::google::longrunning::Operation;
use futures::Stream;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Code, Request, Response, Status, Streaming};

use crate::context::RequestContext;
use crate::digest::{Digest, DigestFunction};
use crate::error::Error;
use crate::execution::{
    action_inputs, execute_response, missing_blobs, missing_blobs_in_status, operation_action,
};
use crate::prefetch::Prefetcher;
use crate::stats::{Stats, UpstreamMethod};
use crate::store::existence_cache::ExistenceCache;
use crate::store::proxy_ac::strip_inlined;
use crate::store::replicator::Replicator;
use crate::store::{ActionKey, ActionResultStore, BlobStore, read_to_bytes};
use crate::upstream::Upstream;
use crate::upstream::client::is_transient;

/// Times a broken Operation stream is reattached before giving up.
const MAX_REATTACHES: u32 = 5;
/// Attempts to open an Execute/WaitExecution call on transient errors.
const OPEN_ATTEMPTS: u32 = 3;
/// MISSING-input repairs per execution: an upstream may report a lost
/// Directory first and the files below it only after it got the Directory.
const MAX_REPAIRS: u32 = 3;

type OperationStream = Pin<Box<dyn Stream<Item = Result<Operation, Status>> + Send>>;

/// Forwards execution to the upstream.
pub struct ExecutionService {
    shared: Arc<Shared>,
}

/// What every forwarded execution needs.
struct Shared {
    upstream: Arc<Upstream>,
    /// The proxy CAS: where inputs are read.
    proxy: Arc<dyn BlobStore>,
    /// Uploads inputs the upstream lacks from the local store.
    replicator: Arc<Replicator>,
    /// Where finished results are cached (the local store).
    local_results: Arc<dyn ActionResultStore>,
    prefetcher: Option<Arc<Prefetcher>>,
    /// What the upstream is known to hold (to skip redundant input checks).
    existence: Arc<ExistenceCache>,
    stats: Arc<Stats>,
}

impl ExecutionService {
    /// Forwards to `upstream`, repairing inputs from `proxy`, caching results
    /// in `local_results` and prefetching with `prefetcher`.
    pub fn new(
        upstream: Arc<Upstream>,
        proxy: Arc<dyn BlobStore>,
        replicator: Arc<Replicator>,
        local_results: Arc<dyn ActionResultStore>,
        prefetcher: Option<Arc<Prefetcher>>,
        existence: Arc<ExistenceCache>,
        stats: Arc<Stats>,
    ) -> Self {
        ExecutionService {
            shared: Arc::new(Shared {
                upstream,
                proxy,
                replicator,
                local_results,
                prefetcher,
                existence,
                stats,
            }),
        }
    }
}

/// One forwarded execution (or reattachment).
struct Forwarder {
    shared: Arc<Shared>,
    ctx: RequestContext,
    function: DigestFunction,
    /// The request as sent upstream; `None` for WaitExecution.
    request: Option<ExecuteRequest>,
    /// The action, when known up front.
    action: Option<Digest>,
    /// MISSING repairs done so far.
    repairs: u32,
    /// The Action and Command digests: what to upload when the upstream
    /// refuses with FAILED_PRECONDITION but names no blob (BuildGrid does so
    /// for a missing Action or Command).
    essentials: Vec<Digest>,
}

impl Forwarder {
    async fn open(&self, wait: Option<&str>) -> Result<Streaming<Operation>, Status> {
        let up = &self.shared.upstream;
        up.check_health().map_err(Status::from)?;
        let mut attempt = 1;
        loop {
            let result = match (wait, &self.request) {
                (Some(name), _) => {
                    up.stats().upstream_call(UpstreamMethod::WaitExecution);
                    let message = WaitExecutionRequest {
                        name: name.to_string(),
                    };
                    up.execution()
                        .wait_execution(up.request(&self.ctx, message))
                        .await
                }
                (None, Some(request)) => {
                    up.stats().upstream_call(UpstreamMethod::Execute);
                    up.execution()
                        .execute(up.request(&self.ctx, request.clone()))
                        .await
                }
                (None, None) => return Err(Status::internal("nothing to execute")),
            };
            match result {
                Ok(response) => return Ok(response.into_inner()),
                Err(status) if is_transient(&status) && attempt < OPEN_ATTEMPTS => {
                    tokio::time::sleep(Duration::from_millis(200 * u64::from(attempt))).await;
                    attempt += 1;
                }
                Err(status) => {
                    up.record_error(&status);
                    return Err(status);
                }
            }
        }
    }

    /// Uploads blobs the upstream reported missing; true if worth retrying.
    async fn repair(&mut self, missing: Vec<Digest>) -> bool {
        if self.repairs >= MAX_REPAIRS || self.request.is_none() || missing.is_empty() {
            return false;
        }
        self.repairs += 1;
        let wanted = missing.len();
        let failed = self.shared.replicator.copy(&self.ctx, missing).await;
        let uploaded = wanted - failed.len();
        Stats::add(&self.shared.stats.missing_input_repairs, 1);
        Stats::add(&self.shared.stats.repaired_blobs, uploaded as u64);
        tracing::info!(
            "upstream lacked {wanted} input blob(s); uploaded {uploaded} from the local store{}",
            if failed.is_empty() {
                ", executing again"
            } else {
                ""
            }
        );
        uploaded > 0
    }

    /// Opens Execute, repairing MISSING inputs (a few rounds at most) while
    /// the call fails so and each round has something to upload.
    async fn open_execute(&mut self) -> Result<Streaming<Operation>, Status> {
        loop {
            match self.open(None).await {
                Err(status) if status.code() == Code::FailedPrecondition => {
                    let mut missing = missing_blobs_in_status(&status, self.function);
                    if missing.is_empty() {
                        missing = self.essentials.clone();
                    }
                    if !self.repair(missing).await {
                        return Err(status);
                    }
                }
                other => return other,
            }
        }
    }

    /// Relays Operations to the client until the operation is done.
    async fn run(
        mut self,
        mut stream: Streaming<Operation>,
        tx: mpsc::Sender<Result<Operation, Status>>,
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
                    if let Some(retry) = self.retry_if_missing(&op).await {
                        match retry {
                            Ok(s) => {
                                stream = s;
                                continue;
                            }
                            Err(status) => {
                                let _ = tx.send(Err(status)).await;
                                return;
                            }
                        }
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
                let _ = tx.send(Err(broken)).await;
                return;
            };
            reattaches += 1;
            Stats::add(&self.shared.stats.execution_reattaches, 1);
            tracing::debug!(
                "operation stream broke ({}); reattaching to {name}",
                broken.message()
            );
            match self.open(Some(name)).await {
                Ok(s) => stream = s,
                Err(status) => {
                    let _ = tx.send(Err(status)).await;
                    return;
                }
            }
        }
    }

    /// For a final Operation that failed with MISSING inputs: repair and
    /// execute again (a few rounds at most). `None` when there is nothing to retry.
    async fn retry_if_missing(
        &mut self,
        op: &Operation,
    ) -> Option<Result<Streaming<Operation>, Status>> {
        let response = execute_response(op)?;
        let status = response
            .status
            .filter(|s| s.code == Code::FailedPrecondition as i32)?;
        let missing = missing_blobs(&status, self.function);
        if !self.repair(missing).await {
            return None;
        }
        Some(self.open_execute().await)
    }

    /// Caches a successful result locally and queues its outputs for prefetch.
    async fn finished(&self, op: &Operation) {
        let Some(response) = execute_response(op) else {
            return;
        };
        if response.status.as_ref().is_some_and(|s| s.code != 0) {
            return;
        }
        let Some(mut result) = response.result else {
            return;
        };
        if self.request.is_none() {
            // WaitExecution names no instance: the outputs' instance (and so
            // the cache key) is unknown here; the client pulls on demand.
            return;
        }
        if let Some(prefetcher) = &self.shared.prefetcher {
            prefetcher.submit(&self.ctx, self.function, &result);
        }
        let Some(action) = self.action.or_else(|| operation_action(op, self.function)) else {
            return;
        };
        if result.exit_code != 0 || !self.cacheable(&action).await {
            return;
        }
        strip_inlined(&mut result);
        let key = ActionKey {
            instance: self.ctx.instance.clone(),
            action,
        };
        if let Err(e) = self
            .shared
            .local_results
            .put_action_result(&self.ctx, &key, &result)
            .await
        {
            tracing::debug!("cannot cache the result of {action} locally: {e}");
        }
    }

    /// Whether the Action allows caching its result (`do_not_cache` unset).
    async fn cacheable(&self, action: &Digest) -> bool {
        use prost::Message;
        match read_to_bytes(&*self.shared.proxy as &dyn BlobStore, &self.ctx, action).await {
            Ok(bytes) => {
                bazel_remote_apis::build::bazel::remote::execution::v2::Action::decode(bytes)
                    .is_ok_and(|a| !a.do_not_cache)
            }
            Err(_) => false,
        }
    }
}

impl ExecutionService {
    fn forward(&self, forwarder: Forwarder, stream: Streaming<Operation>) -> OperationStream {
        let (tx, rx) = mpsc::channel(16);
        tokio::spawn(forwarder.run(stream, tx));
        Box::pin(ReceiverStream::new(rx))
    }
}

#[tonic::async_trait]
impl Execution for ExecutionService {
    type ExecuteStream = OperationStream;

    async fn execute(
        &self,
        request: Request<ExecuteRequest>,
    ) -> Result<Response<Self::ExecuteStream>, Status> {
        let (metadata, _, mut req) = request.into_parts();
        let function = DigestFunction::from_proto(req.digest_function)?;
        let action = Digest::from_proto(function, req.action_digest.as_ref())?;
        let ctx = RequestContext::from_metadata(req.instance_name.clone(), &metadata);
        let shared = &self.shared;
        Stats::add(&shared.stats.executions, 1);
        // Make sure the upstream has every input; what is still missing
        // afterwards is reported by the upstream itself. If the upstream
        // confirmed the Action within the existence TTL, the client has just
        // checked its whole input set through us (as Bazel does before every
        // Execute): walking the tree again would only cost round trips.
        let mut essentials = vec![action];
        if !shared.existence.knows(&ctx, &action) {
            match action_inputs(&*shared.proxy, &ctx, &action).await {
                Ok((_, inputs)) => {
                    // action_inputs lists the Action, then the Command, first.
                    essentials.extend(inputs.get(1).copied());
                    if let Err(e) = shared.proxy.find_missing(&ctx, &inputs).await {
                        tracing::debug!("input check for {action} failed: {e}");
                    }
                }
                Err(Error::Unavailable(why)) => return Err(Status::unavailable(why)),
                Err(e) => tracing::debug!("cannot list the inputs of {action}: {e}"),
            }
        }
        req.instance_name = shared.upstream.instance(&ctx);
        let mut forwarder = Forwarder {
            shared: shared.clone(),
            ctx,
            function,
            request: Some(req),
            action: Some(action),
            repairs: 0,
            essentials,
        };
        let stream = forwarder.open_execute().await?;
        Ok(Response::new(self.forward(forwarder, stream)))
    }

    type WaitExecutionStream = OperationStream;

    async fn wait_execution(
        &self,
        request: Request<WaitExecutionRequest>,
    ) -> Result<Response<Self::WaitExecutionStream>, Status> {
        let (metadata, _, req) = request.into_parts();
        let forwarder = Forwarder {
            shared: self.shared.clone(),
            ctx: RequestContext::from_metadata(String::new(), &metadata),
            function: DigestFunction::Sha256,
            request: None,
            action: None,
            repairs: 0,
            essentials: Vec::new(),
        };
        let stream = forwarder.open(Some(&req.name)).await?;
        Ok(Response::new(self.forward(forwarder, stream)))
    }
}
