//! An action-cache decorator that never serves a result whose outputs are gone.
//!
//! A cached ActionResult is only useful if every blob it references can still
//! be fetched: output files, stdout/stderr, each output directory's Tree (and
//! every file in it) and, when set, its `root_directory_digest` hierarchy.
//! On a lookup this layer checks all of them against the CAS; a result with a
//! missing piece is removed and reported as absent. The check also refreshes
//! the outputs in the LRU, so a result and its outputs age together.

use std::collections::HashSet;
use std::sync::Arc;

use async_trait::async_trait;
use bazel_remote_apis::build::bazel::remote::execution::v2::{ActionResult, Directory, Tree};
use prost::Message;

use crate::context::RequestContext;
use crate::digest::{Digest, DigestFunction};
use crate::error::{Error, Result};
use crate::stats::Stats;
use crate::store::{ActionKey, ActionResultStore, BlobStore, read_to_bytes};

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

/// Every blob an ActionResult references, walking Trees and Directory
/// hierarchies. Err(NotFound) if a Tree or Directory itself is missing.
pub async fn referenced_blobs<B: BlobStore + ?Sized>(
    blobs: &B,
    ctx: &RequestContext,
    function: DigestFunction,
    result: &ActionResult,
) -> Result<Vec<Digest>> {
    let mut out = Vec::new();
    let parse = |d| Digest::from_proto(function, Some(d));
    for file in &result.output_files {
        out.push(Digest::from_proto(function, file.digest.as_ref())?);
    }
    for digest in [&result.stdout_digest, &result.stderr_digest]
        .into_iter()
        .flatten()
    {
        out.push(parse(digest)?);
    }
    for dir in &result.output_directories {
        if let Some(tree_digest) = &dir.tree_digest {
            let tree_digest = parse(tree_digest)?;
            let tree = Tree::decode(read_to_bytes(blobs, ctx, &tree_digest).await?)?;
            out.push(tree_digest);
            for directory in tree.root.iter().chain(tree.children.iter()) {
                push_files(function, directory, &mut out)?;
            }
        }
        if let Some(root) = &dir.root_directory_digest {
            walk_directories(blobs, ctx, parse(root)?, &mut out).await?;
        }
    }
    Ok(out)
}

fn push_files(function: DigestFunction, dir: &Directory, out: &mut Vec<Digest>) -> Result<()> {
    for file in &dir.files {
        out.push(Digest::from_proto(function, file.digest.as_ref())?);
    }
    Ok(())
}

/// Adds a Directory hierarchy (the Directory blobs and their files) to `out`.
async fn walk_directories<B: BlobStore + ?Sized>(
    blobs: &B,
    ctx: &RequestContext,
    root: Digest,
    out: &mut Vec<Digest>,
) -> Result<()> {
    let mut seen = HashSet::new();
    let mut pending = vec![root];
    while let Some(digest) = pending.pop() {
        if !seen.insert(digest) {
            continue;
        }
        let dir = Directory::decode(read_to_bytes(blobs, ctx, &digest).await?)?;
        out.push(digest);
        push_files(digest.function, &dir, out)?;
        for child in &dir.directories {
            pending.push(Digest::from_proto(digest.function, child.digest.as_ref())?);
        }
    }
    Ok(())
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

/// Checks that every digest an ActionResult carries is well formed, so that
/// a stored result can always be checked and served.
pub fn check_digests(function: DigestFunction, result: &ActionResult) -> Result<()> {
    for file in &result.output_files {
        Digest::from_proto(function, file.digest.as_ref())
            .map_err(|e| Error::InvalidArgument(format!("output file {:?}: {e}", file.path)))?;
    }
    for digest in [&result.stdout_digest, &result.stderr_digest]
        .into_iter()
        .flatten()
    {
        Digest::from_proto(function, Some(digest))?;
    }
    for dir in &result.output_directories {
        if dir.tree_digest.is_none() && dir.root_directory_digest.is_none() {
            return Err(Error::InvalidArgument(format!(
                "output directory {:?} has neither tree_digest nor root_directory_digest",
                dir.path
            )));
        }
        for digest in [&dir.tree_digest, &dir.root_directory_digest]
            .into_iter()
            .flatten()
        {
            Digest::from_proto(function, Some(digest))?;
        }
    }
    Ok(())
}
