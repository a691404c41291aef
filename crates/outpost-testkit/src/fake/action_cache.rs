//! ActionCache of the fake: results by (instance, action digest), inlined
//! on request; updates only while the capabilities allow them.

use prost::Message;
use tonic::{Request, Response, Status};

use super::call::{Entry, Logged};
use super::state::{Shared, check_digest, lock};
use super::{Method, Svc};
use crate::re;
use re::action_cache_server::ActionCache;

impl Logged for re::GetActionResultRequest {
    fn entry(&self, _: &Shared) -> Entry {
        Entry::new(
            &self.instance_name,
            self.action_digest.iter().cloned().collect(),
        )
    }
}

impl Logged for re::UpdateActionResultRequest {
    fn entry(&self, _: &Shared) -> Entry {
        let digests = self.action_digest.iter().cloned().collect();
        let result = self.action_result.as_ref();
        Entry {
            bytes_received: result.map_or(0, |r| r.encoded_len() as u64),
            ..Entry::new(&self.instance_name, digests)
        }
    }
}

impl Shared {
    /// GetActionResult, inlining what the request asks for.
    fn get_action_result(
        &self,
        req: &re::GetActionResultRequest,
    ) -> Result<re::ActionResult, Status> {
        self.check_function(req.digest_function)?;
        let d = req
            .action_digest
            .as_ref()
            .ok_or_else(|| Status::invalid_argument("fake upstream: no action_digest"))?;
        check_digest(d, req.digest_function)?;
        let mut result = lock(&self.data)
            .actions
            .get(&(req.instance_name.clone(), d.hash.clone(), d.size_bytes))
            .cloned()
            .ok_or_else(|| Status::not_found("fake upstream: no action result"))?;
        // Inline what was asked for, as real servers do.
        if req.inline_stdout
            && result.stdout_raw.is_empty()
            && let Some(data) = result.stdout_digest.as_ref().and_then(|d| self.blob(d))
        {
            result.stdout_raw = data.to_vec();
        }
        if req.inline_stderr
            && result.stderr_raw.is_empty()
            && let Some(data) = result.stderr_digest.as_ref().and_then(|d| self.blob(d))
        {
            result.stderr_raw = data.to_vec();
        }
        for file in &mut result.output_files {
            if req.inline_output_files.contains(&file.path)
                && file.contents.is_empty()
                && let Some(data) = file.digest.as_ref().and_then(|d| self.blob(d))
            {
                file.contents = data.to_vec();
            }
        }
        Ok(result)
    }

    /// UpdateActionResult, if the capabilities allow it.
    fn update_action_result(
        &self,
        req: re::UpdateActionResultRequest,
    ) -> Result<re::ActionResult, Status> {
        self.check_function(req.digest_function)?;
        let enabled = self
            .caps()
            .cache_capabilities
            .and_then(|c| c.action_cache_update_capabilities)
            .is_some_and(|u| u.update_enabled);
        if !enabled {
            return Err(Status::permission_denied(
                "fake upstream: action cache updates are disabled",
            ));
        }
        let d = req
            .action_digest
            .ok_or_else(|| Status::invalid_argument("fake upstream: no action_digest"))?;
        check_digest(&d, req.digest_function)?;
        let result = req
            .action_result
            .ok_or_else(|| Status::invalid_argument("fake upstream: no action_result"))?;
        lock(&self.data)
            .actions
            .insert((req.instance_name, d.hash, d.size_bytes), result.clone());
        Ok(result)
    }
}

#[tonic::async_trait]
impl ActionCache for Svc {
    async fn get_action_result(
        &self,
        request: Request<re::GetActionResultRequest>,
    ) -> Result<Response<re::ActionResult>, Status> {
        self.unary(Method::GetActionResult, request, |guard, req| {
            let result = self.s.get_action_result(&req)?;
            guard.add_sent(result.encoded_len() as u64);
            Ok(result)
        })
        .await
    }

    async fn update_action_result(
        &self,
        request: Request<re::UpdateActionResultRequest>,
    ) -> Result<Response<re::ActionResult>, Status> {
        self.unary(Method::UpdateActionResult, request, |_, req| {
            self.s.update_action_result(req)
        })
        .await
    }
}
