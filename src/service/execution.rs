//! Execution: a thin adapter from the gRPC service to the
//! [`Executor`](crate::execution::Executor), which forwards to the upstream.

use std::pin::Pin;
use std::sync::Arc;

use bazel_remote_apis::build::bazel::remote::execution::v2::{
    ExecuteRequest, WaitExecutionRequest, execution_server::Execution,
};
use bazel_remote_apis::google::longrunning::Operation;
use futures::{Stream, StreamExt};
use tonic::{Request, Response, Status};

use crate::context::RequestContext;
use crate::execution::{Executor, OperationStream};

/// Operations as tonic streams them.
type StatusStream = Pin<Box<dyn Stream<Item = Result<Operation, Status>> + Send>>;

/// Serves Execute and WaitExecution through the [`Executor`].
pub struct ExecutionService {
    executor: Arc<Executor>,
}

impl ExecutionService {
    /// Serves executions with `executor`.
    pub fn new(executor: Arc<Executor>) -> Self {
        ExecutionService { executor }
    }
}

/// The crate's errors become statuses at the edge, one per stream item.
fn statuses(ops: OperationStream) -> StatusStream {
    Box::pin(ops.map(|op| op.map_err(Status::from)))
}

#[tonic::async_trait]
impl Execution for ExecutionService {
    type ExecuteStream = StatusStream;

    async fn execute(
        &self,
        request: Request<ExecuteRequest>,
    ) -> Result<Response<Self::ExecuteStream>, Status> {
        let (metadata, _, req) = request.into_parts();
        let ctx = RequestContext::from_metadata(req.instance_name.clone(), &metadata);
        let ops = self.executor.execute(ctx, req).await?;
        Ok(Response::new(statuses(ops)))
    }

    type WaitExecutionStream = StatusStream;

    async fn wait_execution(
        &self,
        request: Request<WaitExecutionRequest>,
    ) -> Result<Response<Self::WaitExecutionStream>, Status> {
        let (metadata, _, req) = request.into_parts();
        let ctx = RequestContext::from_metadata(String::new(), &metadata);
        let ops = self.executor.wait_execution(ctx, req.name).await?;
        Ok(Response::new(statuses(ops)))
    }
}
