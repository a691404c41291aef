//! The upstream's action cache as an [`ActionResultStore`].

use async_trait::async_trait;
use bazel_remote_apis::build::bazel::remote::execution::v2::{
    ActionResult, GetActionResultRequest, UpdateActionResultRequest,
};

use crate::context::RequestContext;
use crate::error::{Error, Result};
use crate::stats::UpstreamMethod;
use crate::store::upstream::UpstreamStore;
use crate::store::{ActionKey, ActionResultStore};

#[async_trait]
impl ActionResultStore for UpstreamStore {
    async fn get_action_result(
        &self,
        ctx: &RequestContext,
        key: &ActionKey,
    ) -> Result<Option<ActionResult>> {
        let up = &self.upstream;
        let message = GetActionResultRequest {
            instance_name: up.instance(ctx),
            action_digest: Some(key.action.to_proto()),
            inline_stdout: false,
            inline_stderr: false,
            inline_output_files: vec![],
            digest_function: key.action.function.to_proto(),
        };
        let result = up
            .unary(ctx, UpstreamMethod::GetActionResult, || {
                let mut ac = up.action_cache();
                let request = up.unary_request(ctx, message.clone());
                async move { ac.get_action_result(request).await }
            })
            .await;
        match result {
            Ok(result) => Ok(Some(result)),
            Err(Error::NotFound(_)) => Ok(None),
            Err(e) => Err(e),
        }
    }

    async fn put_action_result(
        &self,
        ctx: &RequestContext,
        key: &ActionKey,
        result: &ActionResult,
    ) -> Result<()> {
        let up = &self.upstream;
        let message = UpdateActionResultRequest {
            instance_name: up.instance(ctx),
            action_digest: Some(key.action.to_proto()),
            action_result: Some(result.clone()),
            results_cache_policy: None,
            digest_function: key.action.function.to_proto(),
        };
        up.unary(ctx, UpstreamMethod::UpdateActionResult, || {
            let mut ac = up.action_cache();
            let request = up.unary_request(ctx, message.clone());
            async move { ac.update_action_result(request).await }
        })
        .await?;
        Ok(())
    }

    /// The upstream's action cache is not ours to prune: a no-op.
    async fn remove_action_result(&self, _ctx: &RequestContext, _key: &ActionKey) -> Result<()> {
        Ok(())
    }
}
