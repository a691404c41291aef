//! The caching proxy action cache: local first, then the upstream.
//!
//! An upstream hit is stored locally (inlined contents stripped) so the next
//! lookup costs no round trip; the completeness decorator above this layer
//! checks the outputs (locally or upstream) before anything is served. An
//! update goes to the upstream first, then locally. Removing (a result whose
//! outputs are gone) only forgets the local copy. An upstream hit also
//! queues its outputs for prefetch: the client is about to download them.
//! Concurrent lookups of the same action share one upstream call.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use bazel_remote_apis::build::bazel::remote::execution::v2::ActionResult;
use futures::future::{BoxFuture, FutureExt, Shared};

use crate::context::RequestContext;
use crate::error::Result;
use crate::prefetch::Prefetcher;
use crate::reapi::action::strip_inlined;
use crate::store::{ActionKey, ActionResultStore};

/// Local action cache in front of the upstream's.
pub struct ProxyActionCache {
    local: Arc<dyn ActionResultStore>,
    upstream: Arc<dyn ActionResultStore>,
    prefetcher: Option<Arc<Prefetcher>>,
    /// Upstream lookups in flight, by action.
    lookups: Arc<Mutex<HashMap<ActionKey, Lookup>>>,
}

/// One upstream lookup, shared by concurrent callers.
type Lookup = Shared<BoxFuture<'static, Result<Option<ActionResult>>>>;

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
            lookups: Arc::new(Mutex::new(HashMap::new())),
        }
    }

    /// Asks the upstream (once for concurrent callers) and caches a hit.
    fn lookup(&self, ctx: &RequestContext, key: &ActionKey) -> Lookup {
        let mut lookups = self.lookups.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(lookup) = lookups.get(key) {
            return lookup.clone();
        }
        let (local, upstream, prefetcher, all) = (
            self.local.clone(),
            self.upstream.clone(),
            self.prefetcher.clone(),
            self.lookups.clone(),
        );
        let (ctx, owned_key) = (ctx.clone(), key.clone());
        let lookup = async move {
            let result =
                fetch_result(&*local, &*upstream, prefetcher.as_deref(), &ctx, &owned_key).await;
            all.lock()
                .unwrap_or_else(|e| e.into_inner())
                .remove(&owned_key);
            result
        }
        .boxed()
        .shared();
        lookups.insert(key.clone(), lookup.clone());
        lookup
    }
}

/// An upstream lookup: on a hit, stripped, queued for prefetch, cached locally.
async fn fetch_result(
    local: &dyn ActionResultStore,
    upstream: &dyn ActionResultStore,
    prefetcher: Option<&Prefetcher>,
    ctx: &RequestContext,
    key: &ActionKey,
) -> Result<Option<ActionResult>> {
    let Some(mut result) = upstream.get_action_result(ctx, key).await? else {
        return Ok(None);
    };
    strip_inlined(&mut result);
    if let Some(prefetcher) = prefetcher {
        prefetcher.submit(ctx, key.action.function, &result);
    }
    local.put_action_result(ctx, key, &result).await?;
    Ok(Some(result))
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
        self.lookup(ctx, key).await
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
