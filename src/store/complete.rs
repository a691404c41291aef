//! An action-cache decorator that never serves a result whose outputs are gone.
//!
//! A cached ActionResult is only useful if every blob it references can still
//! be fetched: output files, stdout/stderr, each output directory's Tree (and
//! every file in it) and, when set, its `root_directory_digest` hierarchy.
//! On a lookup this layer checks all of them against the CAS; a result with a
//! missing piece is removed and reported as absent. The check also refreshes
//! the outputs in the LRU, so a result and its outputs age together.

use std::sync::Arc;

use async_trait::async_trait;
use bazel_remote_apis::build::bazel::remote::execution::v2::ActionResult;

use crate::context::RequestContext;
use crate::digest::Digest;
use crate::error::{Error, Result};
use crate::reapi::action::referenced_blobs;
use crate::stats::Stats;
use crate::store::{ActionKey, ActionResultStore, BlobStore};

/// Wraps an action cache so that lookups are checked against a CAS.
pub struct CompleteActionResults {
    /// Where results are stored.
    results: Arc<dyn ActionResultStore>,
    /// Where their outputs must be present.
    blobs: Arc<dyn BlobStore>,
    /// Checked instead when `blobs` is unavailable (the upstream is down):
    /// the local store, so local hits keep being served.
    fallback: Option<Arc<dyn BlobStore>>,
    /// Counts results dropped as stale.
    stats: Arc<Stats>,
}

impl CompleteActionResults {
    /// Checks results from `results` against `blobs`.
    pub fn new(
        results: Arc<dyn ActionResultStore>,
        blobs: Arc<dyn BlobStore>,
        stats: Arc<Stats>,
    ) -> Self {
        CompleteActionResults {
            results,
            blobs,
            fallback: None,
            stats,
        }
    }

    /// Also accepts results whose outputs `fallback` holds when the main
    /// blob store is unavailable.
    pub fn with_fallback(mut self, fallback: Arc<dyn BlobStore>) -> Self {
        self.fallback = Some(fallback);
        self
    }
}

/// The blobs `result` references that `blobs` lacks (the action digest
/// stands for a missing Tree or Directory).
async fn missing_outputs(
    blobs: &dyn BlobStore,
    ctx: &RequestContext,
    key: &ActionKey,
    result: &ActionResult,
) -> Result<Vec<Digest>> {
    match referenced_blobs(blobs, ctx, key.action.function, result).await {
        Ok(digests) => blobs.find_missing(ctx, &digests).await,
        Err(Error::NotFound(why)) => {
            tracing::debug!("action result {} is incomplete: {why}", key.action);
            Ok(vec![key.action])
        }
        Err(e) => Err(e),
    }
}

#[async_trait]
impl ActionResultStore for CompleteActionResults {
    async fn get_action_result(
        &self,
        ctx: &RequestContext,
        key: &ActionKey,
    ) -> Result<Option<ActionResult>> {
        let Some(result) = self.results.get_action_result(ctx, key).await? else {
            return Ok(None);
        };
        let missing = match missing_outputs(&*self.blobs, ctx, key, &result).await {
            Err(Error::Unavailable(why)) if self.fallback.is_some() => {
                tracing::debug!(
                    "checking {} against the local store only: {why}",
                    key.action
                );
                let local = self.fallback.as_deref().expect("checked");
                missing_outputs(local, ctx, key, &result).await?
            }
            other => other?,
        };
        if missing.is_empty() {
            return Ok(Some(result));
        }
        tracing::debug!(
            "dropping action result {}: {} referenced blob(s) missing, e.g. {}",
            key.action,
            missing.len(),
            missing[0]
        );
        Stats::add(&self.stats.stale_action_results, 1);
        self.results.remove_action_result(ctx, key).await?;
        Ok(None)
    }

    async fn put_action_result(
        &self,
        ctx: &RequestContext,
        key: &ActionKey,
        result: &ActionResult,
    ) -> Result<()> {
        self.results.put_action_result(ctx, key, result).await
    }

    async fn remove_action_result(&self, ctx: &RequestContext, key: &ActionKey) -> Result<()> {
        self.results.remove_action_result(ctx, key).await
    }
}
