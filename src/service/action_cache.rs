//! ActionCache: GetActionResult and UpdateActionResult, keyed by
//! (instance name, action digest).
//!
//! Results are stored without inlined contents: inlined stdout, stderr and
//! file contents are moved into the CAS on update and re-inlined on request.

use bazel_remote_apis::build::bazel::remote::execution::v2::{
    ActionResult, GetActionResultRequest, UpdateActionResultRequest,
    action_cache_server::ActionCache,
};
use bytes::Bytes;
use tonic::metadata::MetadataMap;
use tonic::{Request, Response, Status};

use crate::context::RequestContext;
use crate::digest::{Digest, DigestFunction};
use crate::error::{Error, Result, clip};
use crate::service::Backend;
use crate::stats::Stats;
use crate::store::{ActionKey, read_to_bytes, write_bytes};

/// Inlined bytes per GetActionResult answer stay under this, so the response
/// fits gRPC's default 4 MiB message limit with room for the rest.
const INLINE_BUDGET: u64 = 3 << 20;

/// Serves the action cache.
pub struct ActionCacheService {
    backend: Backend,
}

impl ActionCacheService {
    /// An ActionCache service over `backend`.
    pub fn new(backend: Backend) -> Self {
        ActionCacheService { backend }
    }

    async fn get(
        &self,
        metadata: &MetadataMap,
        req: GetActionResultRequest,
    ) -> Result<ActionResult> {
        let first = req.action_digest.as_ref().map(|d| d.hash.as_str());
        let function = DigestFunction::for_request(req.digest_function, first)?;
        let key = ActionKey {
            instance: req.instance_name.clone(),
            action: Digest::from_proto(function, req.action_digest.as_ref())?,
        };
        let ctx = RequestContext::from_metadata(key.instance.clone(), metadata);
        let stats = &self.backend.stats;
        let Some(mut result) = self.backend.actions.get_action_result(&ctx, &key).await? else {
            Stats::add(&stats.action_cache_misses, 1);
            return Err(Error::NotFound(format!(
                "no action result for {} in instance {:?}",
                key.action,
                clip(&key.instance)
            )));
        };
        Stats::add(&stats.action_cache_hits, 1);
        self.inline(&ctx, function, &req, &mut result).await?;
        Ok(result)
    }

    /// Fills in the contents the client asked to have inlined, within budget.
    async fn inline(
        &self,
        ctx: &RequestContext,
        function: DigestFunction,
        req: &GetActionResultRequest,
        result: &mut ActionResult,
    ) -> Result<()> {
        let mut budget = INLINE_BUDGET;
        let blobs = &*self.backend.blobs;
        let mut take = |digest: &Option<_>| -> Result<Option<Digest>> {
            let Some(d) = digest else { return Ok(None) };
            let d = Digest::from_proto(function, Some(d))?;
            if d.size > budget {
                return Ok(None);
            }
            budget -= d.size;
            Ok(Some(d))
        };
        if req.inline_stdout
            && let Some(d) = take(&result.stdout_digest)?
        {
            result.stdout_raw = read_to_bytes(blobs, ctx, &d).await?.to_vec();
        }
        if req.inline_stderr
            && let Some(d) = take(&result.stderr_digest)?
        {
            result.stderr_raw = read_to_bytes(blobs, ctx, &d).await?.to_vec();
        }
        for file in &mut result.output_files {
            if req.inline_output_files.contains(&file.path)
                && let Some(d) = take(&file.digest)?
            {
                file.contents = read_to_bytes(blobs, ctx, &d).await?.to_vec();
            }
        }
        Ok(())
    }

    async fn update(
        &self,
        metadata: &MetadataMap,
        req: UpdateActionResultRequest,
    ) -> Result<ActionResult> {
        let first = req.action_digest.as_ref().map(|d| d.hash.as_str());
        let function = DigestFunction::for_request(req.digest_function, first)?;
        let key = ActionKey {
            instance: req.instance_name,
            action: Digest::from_proto(function, req.action_digest.as_ref())?,
        };
        let ctx = RequestContext::from_metadata(key.instance.clone(), metadata);
        let mut result = req
            .action_result
            .ok_or_else(|| Error::InvalidArgument("action_result is missing".into()))?;
        self.move_inlined_into_cas(&ctx, function, &mut result)
            .await?;
        // Every digest must parse, so a stored result is always usable.
        crate::reapi::action::check_digests(function, &result)?;
        self.backend
            .actions
            .put_action_result(&ctx, &key, &result)
            .await?;
        Ok(result)
    }

    /// Stores inlined contents in the CAS and clears them from `result`.
    async fn move_inlined_into_cas(
        &self,
        ctx: &RequestContext,
        function: DigestFunction,
        result: &mut ActionResult,
    ) -> Result<()> {
        let blobs = &*self.backend.blobs;
        let mut fields = vec![
            (&mut result.stdout_raw, &mut result.stdout_digest),
            (&mut result.stderr_raw, &mut result.stderr_digest),
        ];
        for file in &mut result.output_files {
            fields.push((&mut file.contents, &mut file.digest));
        }
        for (raw, digest) in fields {
            if raw.is_empty() {
                continue;
            }
            let data = Bytes::from(std::mem::take(raw));
            let actual = Digest::of(function, &data);
            if let Some(claimed) = digest.as_ref() {
                crate::digest::verify(&Digest::from_proto(function, Some(claimed))?, &actual)?;
            }
            write_bytes(blobs, ctx, &actual, data).await?;
            *digest = Some(actual.to_proto());
        }
        Ok(())
    }
}

#[tonic::async_trait]
impl ActionCache for ActionCacheService {
    async fn get_action_result(
        &self,
        request: Request<GetActionResultRequest>,
    ) -> std::result::Result<Response<ActionResult>, Status> {
        let (metadata, _, req) = request.into_parts();
        Ok(Response::new(self.get(&metadata, req).await?))
    }

    async fn update_action_result(
        &self,
        request: Request<UpdateActionResultRequest>,
    ) -> std::result::Result<Response<ActionResult>, Status> {
        let (metadata, _, req) = request.into_parts();
        Ok(Response::new(self.update(&metadata, req).await?))
    }
}
