//! Execution passthrough: Execute and WaitExecution are forwarded to the
//! upstream with every field and the client's headers, and the Operation
//! stream comes back as it arrives.
//!
//! Around the forwarding, Outpost:
//! - [`inputs`]: makes sure the upstream has the Action, Command and input
//!   tree first (a FindMissingBlobs, mostly answered by the existence cache;
//!   blobs only Outpost holds are uploaded);
//! - [`repair`]: on FAILED_PRECONDITION with MISSING violations (as a call
//!   error or in the final ExecuteResponse), uploads the listed blobs from
//!   the local store and executes again (a few rounds at most);
//! - [`forward`]: relays Operations, reattaches with WaitExecution when the
//!   upstream stream breaks, cancels the upstream call when the client goes;
//! - [`finish`]: on success, stores the ActionResult locally and queues its
//!   outputs for prefetch, without holding back the final Operation.

mod finish;
mod forward;
mod inputs;
mod repair;

use std::sync::Arc;

use bazel_remote_apis::build::bazel::remote::execution::v2::ExecuteRequest;
use bazel_remote_apis::google::longrunning::Operation;
use futures::stream::BoxStream;

use crate::context::RequestContext;
use crate::digest::{Digest, DigestFunction};
use crate::error::Result;
use crate::prefetch::Prefetcher;
use crate::stats::Stats;
use crate::store::existence_cache::ExistenceCache;
use crate::store::replicator::Replicator;
use crate::store::write_back::UploadQueue;
use crate::store::{ActionResultStore, BlobStore};
use crate::tasks::Background;
use crate::upstream::Upstream;

/// The Operations of one execution, as the upstream sends them.
pub type OperationStream = BoxStream<'static, Result<Operation>>;

/// What forwarded executions are built from (assembled by `Stack::proxy`).
pub struct ExecutionDeps {
    /// Where Execute and WaitExecution go.
    pub upstream: Arc<Upstream>,
    /// The proxy's CAS: reads Actions and input trees (local first), and
    /// its FindMissing uploads blobs only Outpost holds.
    pub blobs: Arc<dyn BlobStore>,
    /// Copies blobs the upstream reports MISSING from the local store.
    pub uploader: Arc<Replicator>,
    /// Where finished results are cached (the local store).
    pub local_results: Arc<dyn ActionResultStore>,
    /// Pulls finished outputs into the local store, when enabled.
    pub prefetcher: Option<Arc<Prefetcher>>,
    /// What the upstream is known to hold (to skip redundant input checks).
    pub existence: Arc<ExistenceCache>,
    /// The upload queue (write-back mode): queued inputs go up before an
    /// Execute is forwarded.
    pub uploads: Option<Arc<UploadQueue>>,
    /// Counters.
    pub stats: Arc<Stats>,
    /// Where the Operation relays run, so shutdown can drain them.
    pub background: Background,
}

/// Forwards executions to the upstream (the logic behind the Execution
/// service, which only converts protos and statuses).
pub struct Executor {
    deps: Arc<ExecutionDeps>,
}

impl Executor {
    /// An executor over `deps`.
    pub fn new(deps: ExecutionDeps) -> Self {
        Executor {
            deps: Arc::new(deps),
        }
    }

    /// Checks the inputs, opens Execute upstream (repairing MISSING inputs)
    /// and relays its Operations.
    pub async fn execute(
        &self,
        ctx: RequestContext,
        mut request: ExecuteRequest,
    ) -> Result<OperationStream> {
        let first = request.action_digest.as_ref().map(|d| d.hash.as_str());
        let function = DigestFunction::for_request(request.digest_function, first)?;
        let action = Digest::from_proto(function, request.action_digest.as_ref())?;
        Stats::add(&self.deps.stats.executions, 1);
        let essentials = inputs::ensure_inputs(&self.deps, &ctx, action).await?;
        request.instance_name = self.deps.upstream.instance(&ctx);
        let mut forwarder = forward::Forwarder {
            deps: self.deps.clone(),
            ctx,
            function,
            request: Some(request),
            action: Some(action),
            repairs: repair::Repairs::new(essentials),
        };
        let stream = forwarder.open_execute().await?;
        Ok(forwarder.relay(stream))
    }

    /// Opens WaitExecution upstream and relays its Operations.
    pub async fn wait_execution(
        &self,
        ctx: RequestContext,
        name: String,
    ) -> Result<OperationStream> {
        let forwarder = forward::Forwarder {
            deps: self.deps.clone(),
            ctx,
            function: DigestFunction::Sha256,
            request: None,
            action: None,
            repairs: repair::Repairs::new(Vec::new()),
        };
        let stream = forwarder.open(Some(&name)).await?;
        Ok(forwarder.relay(stream))
    }
}
