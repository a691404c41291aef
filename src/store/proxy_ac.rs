//! The caching proxy action cache: local first, then the upstream.
//!
//! An upstream hit is stored locally (inlined contents stripped) so the next
//! lookup costs no round trip; the completeness decorator above this layer
//! checks the outputs (locally or upstream) before anything is served. An
//! update goes to the upstream first, then locally. Removing (a result whose
//! outputs are gone) only forgets the local copy. An upstream hit also
//! queues its outputs for prefetch: the client is about to download them.

use std::sync::Arc;

use async_trait::async_trait;
use bazel_remote_apis::build::bazel::remote::execution::v2::ActionResult;

use crate::context::RequestContext;
use crate::error::Result;
use crate::prefetch::Prefetcher;
use crate::store::{ActionKey, ActionResultStore};

/// Local action cache in front of the upstream's.
pub struct ProxyActionCache {
    local: Arc<dyn ActionResultStore>,
    upstream: Arc<dyn ActionResultStore>,
    prefetcher: Option<Arc<Prefetcher>>,
}

impl ProxyActionCache {
    /// Caches `upstream`'s results in `local`, prefetching their outputs.
    pub fn new(
        local: Arc<dyn ActionResultStore>,
        upstream: Arc<dyn ActionResultStore>,
        prefetcher: Option<Arc<Prefetcher>>,
    ) -> Self {
        ProxyActionCache {
            local,
            upstream,
            prefetcher,
        }
    }
}

/// Drops inlined contents: they live in the CAS under their digests.
pub fn strip_inlined(result: &mut ActionResult) {
    result.stdout_raw.clear();
    result.stderr_raw.clear();
    for file in &mut result.output_files {
        file.contents.clear();
    }
}

#[async_trait]
impl ActionResultStore for ProxyActionCache {
    async fn get_action_result(
        &self,
        ctx: &RequestContext,
        key: &ActionKey,
    ) -> Result<Option<ActionResult>> {
        if let Some(result) = self.local.get_action_result(ctx, key).await? {
            return Ok(Some(result));
        }
        let Some(mut result) = self.upstream.get_action_result(ctx, key).await? else {
            return Ok(None);
        };
        strip_inlined(&mut result);
        if let Some(prefetcher) = &self.prefetcher {
            prefetcher.submit(ctx, key.action.function, &result);
        }
        self.local.put_action_result(ctx, key, &result).await?;
        Ok(Some(result))
    }

    async fn put_action_result(
        &self,
        ctx: &RequestContext,
        key: &ActionKey,
        result: &ActionResult,
    ) -> Result<()> {
        self.upstream.put_action_result(ctx, key, result).await?;
        self.local.put_action_result(ctx, key, result).await
    }

    async fn remove_action_result(&self, ctx: &RequestContext, key: &ActionKey) -> Result<()> {
        self.local.remove_action_result(ctx, key).await
    }
}
