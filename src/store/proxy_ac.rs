//! The caching proxy action cache: local first, then the upstream.
//!
//! An upstream hit is stored locally (inlined contents stripped) so the next
//! lookup costs no round trip; the completeness decorator above this layer
//! checks the outputs (locally or upstream) before anything is served. An
//! update goes to the upstream first, then locally; in write-back mode it is
//! stored locally and queued instead, to be forwarded by the
//! [`UploadQueue`] once the outputs it names are uploaded. Removing (a result whose
//! outputs are gone) only forgets the local copy. An upstream hit is also
//! told to a [`ResultObserver`] (prefetch queues its outputs: the client is
//! about to download them). Concurrent lookups of the same action share one
//! upstream call ([`SingleFlight`]).

use std::sync::Arc;

use async_trait::async_trait;
use bazel_remote_apis::build::bazel::remote::execution::v2::ActionResult;

use crate::context::RequestContext;
use crate::digest::DigestFunction;
use crate::error::Result;
use crate::reapi::action::{named_blobs, referenced_blobs, strip_inlined};
use crate::store::single_flight::SingleFlight;
use crate::store::write_back::UploadQueue;
use crate::store::{ActionKey, ActionResultStore, BlobStore};
use crate::tasks::Background;
use crate::upstream::Upstream;

/// Told of action results fetched from the upstream, so a higher layer
/// (prefetch) can act on them without `store/` depending on it.
pub trait ResultObserver: Send + Sync {
    /// `result`, of an action hashed with `function`, came from the upstream.
    fn fetched(&self, ctx: &RequestContext, function: DigestFunction, result: &ActionResult);
}

/// Local action cache in front of the upstream's.
pub struct ProxyActionCache {
    local: Arc<dyn ActionResultStore>,
    upstream: Arc<dyn ActionResultStore>,
    /// Told of upstream hits (the prefetcher), if any.
    observer: Option<Arc<dyn ResultObserver>>,
    /// Upstream lookups in flight, by action.
    lookups: SingleFlight<ActionKey, Option<ActionResult>>,
    /// In write-back mode: the upload queue, and the local CAS where the
    /// Trees a result names are read to list its outputs.
    write_back: Option<(Arc<UploadQueue>, Arc<dyn BlobStore>)>,
    /// The upstream connection, whose capabilities say whether it accepts
    /// action-cache updates at all (write-back mode).
    connection: Option<Arc<Upstream>>,
}

impl ProxyActionCache {
    /// Caches `upstream`'s results in `local`, telling `observer` of each
    /// upstream hit; lookups run on `background`.
    pub fn new(
        local: Arc<dyn ActionResultStore>,
        upstream: Arc<dyn ActionResultStore>,
        observer: Option<Arc<dyn ResultObserver>>,
        background: &Background,
    ) -> Self {
        ProxyActionCache {
            local,
            upstream,
            observer,
            lookups: SingleFlight::new(background.clone()),
            write_back: None,
            connection: None,
        }
    }

    /// Updates are queued behind their outputs in `queue` (write-back mode);
    /// `local_blobs` holds the Trees they name. While `connection`'s
    /// capabilities say the upstream refuses updates, they are forwarded at
    /// once instead, so the client gets the upstream's refusal.
    pub fn writing_back(
        mut self,
        queue: Arc<UploadQueue>,
        local_blobs: Arc<dyn BlobStore>,
        connection: Arc<Upstream>,
    ) -> Self {
        self.write_back = Some((queue, local_blobs));
        self.connection = Some(connection);
        self
    }

    /// Whether the upstream's last known capabilities refuse action-cache
    /// updates (unknown: no).
    fn upstream_refuses_updates(&self) -> bool {
        let caps = self
            .connection
            .as_ref()
            .and_then(|c| c.cached_capabilities());
        caps.and_then(|c| c.cache_capabilities)
            .and_then(|c| c.action_cache_update_capabilities)
            .is_some_and(|u| !u.update_enabled)
    }
}

/// An upstream lookup: on a hit, stripped, told to the observer, cached locally.
async fn fetch_result(
    local: &dyn ActionResultStore,
    upstream: &dyn ActionResultStore,
    observer: Option<&dyn ResultObserver>,
    ctx: &RequestContext,
    key: &ActionKey,
) -> Result<Option<ActionResult>> {
    let Some(mut result) = upstream.get_action_result(ctx, key).await? else {
        return Ok(None);
    };
    strip_inlined(&mut result);
    if let Some(observer) = observer {
        observer.fetched(ctx, key.action.function, &result);
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
        let (local, upstream, observer) = (
            self.local.clone(),
            self.upstream.clone(),
            self.observer.clone(),
        );
        let (ctx, owned_key) = (ctx.clone(), key.clone());
        self.lookups
            .run(key.clone(), move || async move {
                fetch_result(&*local, &*upstream, observer.as_deref(), &ctx, &owned_key).await
            })
            .await
    }

    async fn put_action_result(
        &self,
        ctx: &RequestContext,
        key: &ActionKey,
        result: &ActionResult,
    ) -> Result<()> {
        if let Some((queue, local_blobs)) = &self.write_back
            && !self.upstream_refuses_updates()
        {
            // The outputs it names: the queue forwards it after those of
            // them it still holds. When a Tree is not here to be read, the
            // blobs the result names itself (files, stdio, Trees) still
            // order it; a result that names a malformed digest goes up now.
            let function = key.action.function;
            let outputs = match referenced_blobs(&**local_blobs, ctx, function, result).await {
                Ok(outputs) => Some(outputs),
                Err(e) => {
                    tracing::debug!(
                        "result of {}: cannot list its trees' outputs locally ({e})",
                        key.action
                    );
                    named_blobs(function, result).ok()
                }
            };
            if let Some(outputs) = outputs {
                self.local.put_action_result(ctx, key, result).await?;
                return queue.enqueue_action_result(ctx, key, result, &outputs);
            }
        }
        self.upstream.put_action_result(ctx, key, result).await?;
        self.local.put_action_result(ctx, key, result).await
    }

    async fn remove_action_result(&self, ctx: &RequestContext, key: &ActionKey) -> Result<()> {
        self.local.remove_action_result(ctx, key).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;
    use std::sync::Mutex;
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::time::Duration;

    /// Action results in a map, counting lookups.
    #[derive(Default)]
    struct Results {
        map: Mutex<HashMap<ActionKey, ActionResult>>,
        gets: AtomicU64,
    }

    #[async_trait]
    impl ActionResultStore for Results {
        async fn get_action_result(
            &self,
            _ctx: &RequestContext,
            key: &ActionKey,
        ) -> Result<Option<ActionResult>> {
            self.gets.fetch_add(1, Ordering::SeqCst);
            tokio::time::sleep(Duration::from_millis(50)).await;
            Ok(self.map.lock().unwrap().get(key).cloned())
        }

        async fn put_action_result(
            &self,
            _ctx: &RequestContext,
            key: &ActionKey,
            result: &ActionResult,
        ) -> Result<()> {
            self.map.lock().unwrap().insert(key.clone(), result.clone());
            Ok(())
        }

        async fn remove_action_result(&self, _ctx: &RequestContext, key: &ActionKey) -> Result<()> {
            self.map.lock().unwrap().remove(key);
            Ok(())
        }
    }

    /// Counts the upstream hits it is told of.
    #[derive(Default)]
    struct Told(AtomicU64);

    impl ResultObserver for Told {
        fn fetched(&self, _ctx: &RequestContext, _f: DigestFunction, _r: &ActionResult) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    #[tokio::test]
    async fn concurrent_lookups_share_one_upstream_call_and_the_hit_is_kept() {
        let (local, upstream) = (Arc::new(Results::default()), Arc::new(Results::default()));
        let key = ActionKey {
            instance: String::new(),
            action: crate::digest::Digest::of(DigestFunction::Sha256, b"action"),
        };
        let result = ActionResult {
            exit_code: 3,
            stdout_raw: b"inlined".to_vec(),
            ..Default::default()
        };
        upstream.map.lock().unwrap().insert(key.clone(), result);
        let told = Arc::new(Told::default());
        let cache = Arc::new(ProxyActionCache::new(
            local.clone(),
            upstream.clone(),
            Some(told.clone()),
            &Background::new(),
        ));
        let lookups: Vec<_> = (0..10)
            .map(|_| {
                let (cache, key) = (cache.clone(), key.clone());
                tokio::spawn(async move {
                    let ctx = RequestContext::default();
                    cache.get_action_result(&ctx, &key).await.unwrap().unwrap()
                })
            })
            .collect();
        for lookup in lookups {
            let found = lookup.await.unwrap();
            assert_eq!(found.exit_code, 3);
            assert!(found.stdout_raw.is_empty(), "inlined contents stripped");
        }
        assert_eq!(upstream.gets.load(Ordering::SeqCst), 1);
        assert_eq!(told.0.load(Ordering::SeqCst), 1);
        assert!(local.map.lock().unwrap().contains_key(&key), "kept locally");
    }
}
