//! google.longrunning Operations, forwarded to the upstream unchanged, so a
//! client can poll or cancel the operations it started through Outpost.

use std::sync::Arc;

use bazel_remote_apis::google::longrunning::{
    CancelOperationRequest, DeleteOperationRequest, GetOperationRequest, ListOperationsRequest,
    ListOperationsResponse, Operation, WaitOperationRequest, operations_server::Operations,
};
use bazel_remote_apis::google::protobuf::Empty;
use tonic::{Request, Response, Status};

use crate::context::RequestContext;
use crate::stats::UpstreamMethod;
use crate::upstream::Upstream;

/// Forwards every Operations call to the upstream.
pub struct OperationsService {
    upstream: Arc<Upstream>,
}

impl OperationsService {
    /// Forwards to `upstream`.
    pub fn new(upstream: Arc<Upstream>) -> Self {
        OperationsService { upstream }
    }
}

/// Forwards one unary Operations call: same message, the client's headers.
macro_rules! forward {
    ($self:ident, $request:ident, $method:ident) => {{
        let (metadata, _, message) = $request.into_parts();
        let ctx = RequestContext::from_metadata(String::new(), &metadata);
        let up = &$self.upstream;
        let response = up
            .unary(&ctx, UpstreamMethod::Operations, || {
                let mut client = up.operations();
                let request = up.unary_request(&ctx, message.clone());
                async move { client.$method(request).await }
            })
            .await?;
        Ok(Response::new(response))
    }};
}

#[tonic::async_trait]
impl Operations for OperationsService {
    async fn list_operations(
        &self,
        request: Request<ListOperationsRequest>,
    ) -> Result<Response<ListOperationsResponse>, Status> {
        forward!(self, request, list_operations)
    }

    async fn get_operation(
        &self,
        request: Request<GetOperationRequest>,
    ) -> Result<Response<Operation>, Status> {
        forward!(self, request, get_operation)
    }

    async fn delete_operation(
        &self,
        request: Request<DeleteOperationRequest>,
    ) -> Result<Response<Empty>, Status> {
        forward!(self, request, delete_operation)
    }

    async fn cancel_operation(
        &self,
        request: Request<CancelOperationRequest>,
    ) -> Result<Response<Empty>, Status> {
        forward!(self, request, cancel_operation)
    }

    async fn wait_operation(
        &self,
        request: Request<WaitOperationRequest>,
    ) -> Result<Response<Operation>, Status> {
        forward!(self, request, wait_operation)
    }
}
