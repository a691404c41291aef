//! The Execution and Operations services of the fake: each call goes
//! through the shared prologue, then [`super::job`] and [`super::stream`].

use std::sync::atomic::Ordering;
use std::time::Duration;

use bazel_remote_apis::google::longrunning::operations_server::{Operations, OperationsServer};
use bazel_remote_apis::google::longrunning::{self as lr, Operation};
use bazel_remote_apis::google::protobuf::Empty;
use tonic::metadata::MetadataMap;
use tonic::{Code, Request, Response, Status};

use super::job::Job;
use super::wire::{done_op, failure_result, meta, missing_status, response_result, rpc_to_status};
use super::{ErrorDelivery, ExecuteRecord};
use crate::fake::call::{CallGuard, Entry, Logged};
use crate::fake::cas::BoxStream;
use crate::fake::state::{Shared, check_digest, lock, rpc_status};
use crate::fake::{MAX_MESSAGE, Method, Svc};
use crate::re;
use re::execution_server::{Execution, ExecutionServer};
use re::execution_stage::Value as Stage;

impl Logged for re::ExecuteRequest {
    fn entry(&self, _: &Shared) -> Entry {
        Entry::new(
            &self.instance_name,
            self.action_digest.iter().cloned().collect(),
        )
    }
}

impl Logged for lr::ListOperationsRequest {
    fn entry(&self, _: &Shared) -> Entry {
        Entry::default()
    }
}

/// Requests that name an operation: logged with its instance and action.
macro_rules! logged_by_operation {
    ($($request:ty),* $(,)?) => {
        $(impl Logged for $request {
            fn entry(&self, s: &Shared) -> Entry {
                match s.op_info(&self.name) {
                    Some((instance, action)) => Entry::new(&instance, vec![action]),
                    None => Entry::default(),
                }
            }
        })*
    };
}

logged_by_operation!(
    re::WaitExecutionRequest,
    lr::GetOperationRequest,
    lr::DeleteOperationRequest,
    lr::CancelOperationRequest,
    lr::WaitOperationRequest,
);

type OpStream = BoxStream<Operation>;

impl Svc {
    /// Execute after the prologue: cache lookup, input check, injected
    /// failure, then a job; errors come back with the guard to log them.
    async fn execute_inner(
        &self,
        guard: CallGuard,
        headers: MetadataMap,
        req: re::ExecuteRequest,
    ) -> Result<OpStream, (CallGuard, Status, bool)> {
        let s = &self.s;
        let call_id = guard.id;
        let record_at = {
            let mut r = lock(&s.exec.records);
            r.push(ExecuteRecord {
                call_id,
                request: req.clone(),
                headers,
                operation: None,
            });
            r.len() - 1
        };
        let checked = (|| {
            s.check_function(req.digest_function)?;
            let d = req
                .action_digest
                .clone()
                .ok_or_else(|| Status::invalid_argument("fake upstream: no action_digest"))?;
            check_digest(&d, req.digest_function)?;
            Ok(d)
        })();
        let action_digest = match checked {
            Ok(d) => d,
            Err(e) => return Err((guard, e, false)),
        };
        let function = req.digest_function;
        let instance = req.instance_name.clone();
        let set_op = |name: &str| {
            lock(&s.exec.records)[record_at].operation = Some(name.to_string());
        };

        // 1. Action cache.
        if !req.skip_cache_lookup {
            let cached = lock(&s.data)
                .actions
                .get(&(
                    instance.clone(),
                    action_digest.hash.clone(),
                    action_digest.size_bytes,
                ))
                .cloned();
            if let Some(result) = cached {
                s.exec.counters.cache_hits.fetch_add(1, Ordering::Relaxed);
                let name = s.op_name();
                let resp = re::ExecuteResponse {
                    result: Some(s.inline_for(&req, result)),
                    cached_result: true,
                    status: Some(rpc_status(Code::Ok, "")),
                    ..Default::default()
                };
                let op = done_op(&name, &action_digest, function, response_result(&resp));
                s.new_op(&name, &instance, &action_digest, op);
                set_op(&name);
                return Ok(s.stream_op(Method::Execute, name, 0, guard));
            }
        }

        // 2. Inputs.
        let (parsed, missing) = match s.check_inputs(&action_digest) {
            Ok(x) => x,
            Err(e) => return Err((guard, e, false)),
        };
        if !missing.is_empty() {
            s.exec
                .counters
                .missing_inputs
                .fetch_add(1, Ordering::Relaxed);
            let rpc = missing_status(&missing);
            let delivery = s.exec.cfg().missing_delivery;
            if delivery == ErrorDelivery::GrpcError {
                return Err((guard, rpc_to_status(&rpc), false));
            }
            let name = s.op_name();
            let op = done_op(
                &name,
                &action_digest,
                function,
                failure_result(rpc, delivery),
            );
            s.new_op(&name, &instance, &action_digest, op);
            set_op(&name);
            return Ok(s.stream_op(Method::Execute, name, 0, guard));
        }
        let (action, command) = parsed.expect("inputs present");

        // 3. Injected failure delivered on the call.
        let failure = s.exec.cfg().failures.pop_front();
        if let Some(f) = &failure
            && f.delivery == ErrorDelivery::GrpcError
        {
            return Err((guard, Status::new(f.code, f.message.clone()), true));
        }

        // 4. A job.
        s.exec.counters.started.fetch_add(1, Ordering::Relaxed);
        let name = s.op_name();
        let queued = Operation {
            name: name.clone(),
            metadata: Some(meta(Stage::Queued, &name, &action_digest, function)),
            done: false,
            result: None,
        };
        s.new_op(&name, &instance, &action_digest, queued);
        set_op(&name);
        let job = Job {
            name: name.clone(),
            instance,
            action_digest,
            action,
            command,
            function,
            request: req,
            failure,
        };
        let handle = tokio::spawn(s.clone().run_job(job));
        if let Some(e) = lock(&s.exec.ops).get_mut(&name) {
            e.job = Some(handle);
        }
        Ok(s.stream_op(Method::Execute, name, 0, guard))
    }
}

#[tonic::async_trait]
impl Execution for Svc {
    type ExecuteStream = OpStream;

    async fn execute(
        &self,
        request: Request<re::ExecuteRequest>,
    ) -> Result<Response<Self::ExecuteStream>, Status> {
        let headers = request.metadata().clone();
        let (guard, req) = self.s.enter(Method::Execute, request).await?;
        match self.execute_inner(guard, headers, req).await {
            Ok(stream) => Ok(Response::new(stream)),
            Err((guard, e, injected)) => {
                guard.finish(e.code(), injected);
                Err(e)
            }
        }
    }

    type WaitExecutionStream = OpStream;

    async fn wait_execution(
        &self,
        request: Request<re::WaitExecutionRequest>,
    ) -> Result<Response<Self::WaitExecutionStream>, Status> {
        let (guard, req) = self.s.enter(Method::WaitExecution, request).await?;
        let from = lock(&self.s.exec.ops)
            .get(&req.name)
            .map(|e| e.history.len().saturating_sub(1));
        match from {
            Some(from) => Ok(Response::new(self.s.stream_op(
                Method::WaitExecution,
                req.name,
                from,
                guard,
            ))),
            None => {
                let e = Status::not_found(format!("fake upstream: no operation {:?}", req.name));
                guard.finish(e.code(), false);
                Err(e)
            }
        }
    }
}

#[tonic::async_trait]
impl Operations for Svc {
    async fn list_operations(
        &self,
        request: Request<lr::ListOperationsRequest>,
    ) -> Result<Response<lr::ListOperationsResponse>, Status> {
        self.unary(Method::ListOperations, request, |_, req| {
            let mut all: Vec<(u64, Operation)> = lock(&self.s.exec.ops)
                .values()
                .map(|e| (e.seq, e.current()))
                .collect();
            all.sort_by_key(|(seq, _)| *seq);
            let start: usize = req.page_token.parse().unwrap_or(0);
            let page = if req.page_size > 0 {
                req.page_size as usize
            } else {
                usize::MAX
            };
            let operations: Vec<Operation> = all
                .iter()
                .skip(start)
                .take(page)
                .map(|(_, o)| o.clone())
                .collect();
            let next = start + operations.len();
            Ok(lr::ListOperationsResponse {
                operations,
                next_page_token: if next < all.len() {
                    next.to_string()
                } else {
                    String::new()
                },
                unreachable: Vec::new(),
            })
        })
        .await
    }

    async fn get_operation(
        &self,
        request: Request<lr::GetOperationRequest>,
    ) -> Result<Response<Operation>, Status> {
        self.unary(Method::GetOperation, request, |_, req| {
            self.s.current_op(&req.name)
        })
        .await
    }

    async fn delete_operation(
        &self,
        request: Request<lr::DeleteOperationRequest>,
    ) -> Result<Response<Empty>, Status> {
        self.unary(Method::DeleteOperation, request, |_, req| {
            match lock(&self.s.exec.ops).remove(&req.name) {
                Some(_) => Ok(Empty {}),
                None => Err(Status::not_found(format!(
                    "fake upstream: no operation {:?}",
                    req.name
                ))),
            }
        })
        .await
    }

    async fn cancel_operation(
        &self,
        request: Request<lr::CancelOperationRequest>,
    ) -> Result<Response<Empty>, Status> {
        self.unary(Method::CancelOperation, request, |_, req| {
            self.s.cancel_op(&req.name).map(|_| Empty {})
        })
        .await
    }

    async fn wait_operation(
        &self,
        request: Request<lr::WaitOperationRequest>,
    ) -> Result<Response<Operation>, Status> {
        let (guard, req) = self.s.enter(Method::WaitOperation, request).await?;
        let timeout = req
            .timeout
            .map(|t| Duration::new(t.seconds.max(0) as u64, t.nanos.max(0) as u32))
            .unwrap_or(Duration::from_secs(60));
        let deadline = tokio::time::Instant::now() + timeout;
        let result = loop {
            let sub = lock(&self.s.exec.ops)
                .get(&req.name)
                .map(|e| (e.done(), e.version.subscribe()));
            match sub {
                None => {
                    break Err(Status::not_found(format!(
                        "fake upstream: no operation {:?}",
                        req.name
                    )));
                }
                Some((true, _)) => break self.s.current_op(&req.name),
                Some((false, mut rx)) => {
                    match tokio::time::timeout_at(deadline, rx.changed()).await {
                        Ok(Ok(())) => continue,
                        Ok(Err(_)) | Err(_) => break self.s.current_op(&req.name),
                    }
                }
            }
        };
        guard.complete(&result);
        result.map(Response::new)
    }
}

/// The Execution and Operations services of the fake, for its router.
pub(in crate::fake) fn services(svc: Svc) -> (ExecutionServer<Svc>, OperationsServer<Svc>) {
    (
        ExecutionServer::new(svc.clone())
            .max_decoding_message_size(MAX_MESSAGE)
            .max_encoding_message_size(MAX_MESSAGE),
        OperationsServer::new(svc)
            .max_decoding_message_size(MAX_MESSAGE)
            .max_encoding_message_size(MAX_MESSAGE),
    )
}
