//! Assembles the store layers and services for the configured mode:
//! standalone (the local store alone) or caching proxy (local store in front
//! of an upstream, with execution passthrough and prefetch).

use std::sync::Arc;

use crate::asset::upstream::AssetUpstream;
use crate::config::Config;
use crate::config::upstream::WriteMode;
use crate::context::RequestContext;
use crate::execution::{ExecutionDeps, Executor};
use crate::prefetch::{ClientInputs, Prefetcher, Scores};
use crate::service::execution::ExecutionService;
use crate::service::operations::OperationsService;
use crate::stats::Stats;
use crate::store::existence_cache::ExistenceCache;
use crate::store::local::LocalStore;
use crate::store::proxy::ProxyStore;
use crate::store::proxy_ac::{ProxyActionCache, ResultObserver};
use crate::store::read_through::ReadHook;
use crate::store::served::ServedLocally;
use crate::store::upstream::UpstreamStore;
use crate::store::write_back::{UploadQueue, UploadQueueDeps};
use crate::store::{ActionResultStore, BlobStore};
use crate::tasks::Background;
use crate::upstream::Upstream;
use crate::upstream::passthrough::Passthrough;

/// Digests the existence cache remembers at most (~100 bytes each).
const EXISTENCE_CACHE_CAPACITY: usize = 1 << 20;

/// The layers the services are built on.
pub struct Stack {
    /// The CAS the services use.
    pub blobs: Arc<dyn BlobStore>,
    /// The action cache (before the completeness check is added).
    pub results: Arc<dyn ActionResultStore>,
    /// The upstream connection, when proxying.
    pub upstream: Option<Arc<Upstream>>,
    /// Execution passthrough, when proxying.
    pub execution: Option<Arc<ExecutionService>>,
    /// Operations passthrough, when proxying.
    pub operations: Option<Arc<OperationsService>>,
    /// The upstream's asset endpoint and CAS for the asset service, when
    /// proxying.
    pub asset_upstream: Option<Arc<AssetUpstream>>,
    /// Remote Logstream passthrough (logstream endpoint), when proxying.
    pub passthrough: Option<Arc<Passthrough>>,
    /// Told of clients' FindMissingBlobs (adaptive prefetch), when prefetching.
    pub inputs: Option<Arc<dyn ClientInputs>>,
    /// The upload queue, in write-back mode (drained at a graceful stop).
    pub uploads: Option<Arc<UploadQueue>>,
}

impl Stack {
    /// The local store alone (its client reads counted as served locally).
    pub fn standalone(local: &LocalStore, stats: &Arc<Stats>) -> Self {
        Stack {
            blobs: Arc::new(ServedLocally::new(Arc::new(local.clone()), stats.clone())),
            results: Arc::new(local.clone()),
            upstream: None,
            execution: None,
            operations: None,
            asset_upstream: None,
            passthrough: None,
            inputs: None,
            uploads: None,
        }
    }

    /// The caching proxy: local store → existence cache → upstream, with
    /// prefetch (and its ledger) when enabled. Flights, prefetch workers and
    /// the capabilities probe run on `background`.
    pub fn proxy(
        config: &Config,
        local: &LocalStore,
        stats: &Arc<Stats>,
        background: &Background,
    ) -> anyhow::Result<Self> {
        let upstream_config = config
            .upstream
            .as_ref()
            .expect("proxy mode has an upstream");
        let upstream = Arc::new(Upstream::new(upstream_config.clone(), stats.clone())?);
        let upstream_store = Arc::new(UpstreamStore::new(upstream.clone(), background));
        let existence = Arc::new(ExistenceCache::new(
            upstream_store.clone(),
            upstream_config.existence_ttl,
            EXISTENCE_CACHE_CAPACITY,
            stats.clone(),
            background,
        ));
        let cached: Arc<dyn BlobStore> = existence.clone();
        // Write-back: acknowledged writes wait here for their upload.
        let uploads = match upstream_config.write_mode {
            WriteMode::Through => None,
            WriteMode::Back => Some(UploadQueue::start(UploadQueueDeps {
                local: local.clone(),
                upstream: cached.clone(),
                upstream_results: upstream_store.clone(),
                existence: existence.clone(),
                max_bytes: upstream_config.write_back_cap(config.quota_bytes),
                stats: stats.clone(),
                background: background.clone(),
            })?),
        };
        // Prefetch keeps score of client reads and evictions (its ledger)
        // and learns who reads outputs (its learner).
        let scores = config
            .prefetch
            .enabled
            .then(|| Scores::new(local, &config.prefetch, stats.clone()));
        let hook = scores.clone().map(|s| s as Arc<dyn ReadHook>);
        // Prefetch transfers yield to client work on the upstream link.
        let proxy = Arc::new(ProxyStore::new(
            local.clone(),
            cached,
            upstream.traffic().clone(),
            stats.clone(),
            background,
            hook,
            uploads.clone(),
        ));
        let blobs: Arc<dyn BlobStore> = proxy.clone();
        let prefetcher = scores.as_ref().map(|scores| {
            Arc::new(Prefetcher::start(
                blobs.clone(),
                proxy.read_through(),
                scores,
                config.prefetch.clone(),
                stats.clone(),
                background,
            ))
        });
        let local_results: Arc<dyn ActionResultStore> = Arc::new(local.clone());
        let mut results = ProxyActionCache::new(
            local_results.clone(),
            upstream_store,
            prefetcher.clone().map(|p| p as Arc<dyn ResultObserver>),
            background,
        );
        if let Some(queue) = &uploads {
            results =
                results.writing_back(queue.clone(), Arc::new(local.clone()), upstream.clone());
        }
        let results = Arc::new(results);
        let executor = Executor::new(ExecutionDeps {
            upstream: upstream.clone(),
            blobs: proxy.clone(),
            uploader: proxy.replicator(),
            local_results,
            prefetcher,
            existence,
            uploads: uploads.clone(),
            stats: stats.clone(),
            background: background.clone(),
        });
        let execution = Arc::new(ExecutionService::new(Arc::new(executor)));
        let operations = Arc::new(OperationsService::new(upstream.clone()));
        // Remote Asset calls get their own connection (`asset_endpoint` may
        // be another server); content moves through the proxy CAS.
        // Its client calls are client traffic too: prefetch yields to them.
        let asset_client = Upstream::new(
            upstream_config.with_endpoint(&upstream_config.asset_uri),
            stats.clone(),
        )?
        .sharing_traffic(upstream.traffic().clone());
        let asset_upstream = Arc::new(
            AssetUpstream::new(
                asset_client,
                proxy.clone(),
                proxy.read_through(),
                Arc::new(local.clone()),
            )
            .with_upload_queue(uploads.clone()),
        );
        let passthrough = Arc::new(Passthrough::new(upstream_config, stats.clone())?);
        let probe = upstream.clone();
        background.spawn(async move {
            match probe.capabilities(&RequestContext::default()).await {
                Ok(_) => tracing::info!("upstream {} answered GetCapabilities", probe.config().uri),
                Err(e) => tracing::warn!("upstream {}: {e}", probe.config().uri),
            }
        });
        tracing::info!("proxying upstream {}", upstream_config.uri);
        Ok(Stack {
            blobs,
            results,
            upstream: Some(upstream),
            execution: Some(execution),
            operations: Some(operations),
            asset_upstream: Some(asset_upstream),
            passthrough: Some(passthrough),
            inputs: scores.map(|s| s.learner.clone() as Arc<dyn ClientInputs>),
            uploads,
        })
    }
}
