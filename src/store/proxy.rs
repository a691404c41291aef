//! The caching proxy CAS: the local store in front of the upstream, as one
//! [`BlobStore`] composed of one decorator per job:
//!
//! - reads: [`ReadThrough`] (local first, a miss fetched once and kept);
//! - writes: [`WriteBack`] (done once stored locally; the [`UploadQueue`]
//!   uploads it) or, with `write_mode = "through"`, [`WriteThrough`] (a tee;
//!   done once both stores have the blob);
//! - FindMissingBlobs: answered here, for the upstream, where the work runs.
//!   A blob waiting in the upload queue is present (it will be uploaded and
//!   cannot be evicted meanwhile). Blobs the upstream lacks but the local
//!   store holds are queued (write-back) or copied over at once by the
//!   [`Replicator`], and reported present, so the client does not send them
//!   again.

use std::collections::HashSet;
use std::sync::Arc;

use async_trait::async_trait;
use bytes::Bytes;

use crate::compression::Compressor;
use crate::context::RequestContext;
use crate::digest::Digest;
use crate::error::Result;
use crate::stats::Stats;
use crate::store::local::LocalStore;
use crate::store::read_through::{ReadHook, ReadThrough};
use crate::store::replicator::Replicator;
use crate::store::write_back::{Enqueued, UploadQueue, WriteBack};
use crate::store::write_through::WriteThrough;
use crate::store::{BlobStore, BlobWriter, ChunkStream};
use crate::tasks::Background;
use crate::upstream::traffic::Traffic;

/// Local store + upstream, as one CAS.
pub struct ProxyStore {
    /// Consulted by FindMissingBlobs for what the upstream lacks.
    local: Arc<dyn BlobStore>,
    /// The upstream CAS (normally behind an existence cache).
    upstream: Arc<dyn BlobStore>,
    reads: Arc<ReadThrough>,
    writes: Writes,
    /// Local → upstream, for FindMissingBlobs backfill (and execution repair).
    backfill: Arc<Replicator>,
}

/// How writes reach the upstream (`[upstream] write_mode`).
enum Writes {
    /// Acknowledged once stored locally; the queue uploads them.
    Back(WriteBack, Arc<UploadQueue>),
    /// Acknowledged once the upstream has them too.
    Through(WriteThrough),
}

impl ProxyStore {
    /// Proxies `upstream` through `local`; fetches run on `background`,
    /// prefetch's yield to the client work counted in `traffic`, and `hook`
    /// (if any) is told of every client read. With an upload `queue`,
    /// writes are write-back; without, write-through.
    pub fn new(
        local: LocalStore,
        upstream: Arc<dyn BlobStore>,
        traffic: Arc<Traffic>,
        stats: Arc<Stats>,
        background: &Background,
        hook: Option<Arc<dyn ReadHook>>,
        queue: Option<Arc<UploadQueue>>,
    ) -> Self {
        let capacity = local.occupancy().1;
        let local: Arc<dyn BlobStore> = Arc::new(local);
        let mut reads = ReadThrough::new(
            local.clone(),
            capacity,
            upstream.clone(),
            traffic,
            stats.clone(),
            background,
        );
        if let Some(hook) = hook {
            reads = reads.with_hook(hook);
        }
        let writes = match queue {
            Some(queue) => Writes::Back(
                WriteBack::new(
                    local.clone(),
                    capacity,
                    upstream.clone(),
                    queue.clone(),
                    stats.clone(),
                ),
                queue,
            ),
            None => Writes::Through(WriteThrough::new(local.clone(), capacity, upstream.clone())),
        };
        ProxyStore {
            local: local.clone(),
            upstream: upstream.clone(),
            reads: Arc::new(reads),
            writes,
            backfill: Arc::new(Replicator::new(local, upstream, stats)),
        }
    }

    /// The upload queue, in write-back mode.
    pub fn upload_queue(&self) -> Option<&Arc<UploadQueue>> {
        match &self.writes {
            Writes::Back(_, queue) => Some(queue),
            Writes::Through(_) => None,
        }
    }

    /// Those of `digests` the upload queue does not hold for `ctx` (all of
    /// them in write-through mode).
    fn not_queued(&self, ctx: &RequestContext, digests: &[Digest]) -> Vec<Digest> {
        let Some(queue) = self.upload_queue().filter(|q| !q.is_empty()) else {
            return digests.to_vec();
        };
        let queued = queue.queued(ctx, digests);
        digests
            .iter()
            .zip(queued)
            .filter(|(_, queued)| !queued)
            .map(|(d, _)| *d)
            .collect()
    }

    /// Gets `held` (stored locally, missing upstream) to the upstream: queued
    /// in write-back mode, else copied now. Returns those that could not be.
    async fn backfill(&self, ctx: &RequestContext, held: Vec<Digest>) -> Vec<Digest> {
        let held = match self.upload_queue() {
            Some(queue) => match queue.enqueue_blobs(ctx, &held) {
                Ok(answers) => held
                    .into_iter()
                    .zip(answers)
                    .filter(|(_, answer)| *answer == Enqueued::Full)
                    .map(|(d, _)| d)
                    .collect(),
                Err(e) => {
                    tracing::warn!("cannot queue uploads: {e}; uploading at once");
                    held
                }
            },
            None => held,
        };
        if held.is_empty() {
            return held;
        }
        self.backfill.copy(ctx, held).await
    }

    /// The read-through, for prefetch (which brings blobs in through it).
    pub fn read_through(&self) -> Arc<ReadThrough> {
        self.reads.clone()
    }

    /// Copies blobs from the local store to the upstream (execution repair).
    pub fn replicator(&self) -> Arc<Replicator> {
        self.backfill.clone()
    }
}

#[async_trait]
impl BlobStore for ProxyStore {
    async fn find_missing(&self, ctx: &RequestContext, digests: &[Digest]) -> Result<Vec<Digest>> {
        // A queued blob is present: it will be uploaded, and it is pinned.
        let ask = self.not_queued(ctx, digests);
        if ask.is_empty() {
            return Ok(ask);
        }
        let missing_upstream = self.upstream.find_missing(ctx, &ask).await?;
        if missing_upstream.is_empty() {
            return Ok(missing_upstream);
        }
        let missing_locally: HashSet<Digest> = self
            .local
            .find_missing(ctx, &missing_upstream)
            .await?
            .into_iter()
            .collect();
        let held: Vec<Digest> = missing_upstream
            .iter()
            .filter(|d| !missing_locally.contains(d))
            .copied()
            .collect();
        let failed: HashSet<Digest> = self.backfill(ctx, held).await.into_iter().collect();
        Ok(missing_upstream
            .into_iter()
            .filter(|d| missing_locally.contains(d) || failed.contains(d))
            .collect())
    }

    /// Write-back: held locally and queued or known upstream, without a
    /// round trip (an upload that goes ahead instead is queued, or found
    /// known, at its commit). Write-through: FindMissingBlobs, as before.
    async fn holds(&self, ctx: &RequestContext, digest: &Digest) -> Result<bool> {
        let Some(queue) = self.upload_queue() else {
            return Ok(self
                .find_missing(ctx, std::slice::from_ref(digest))
                .await?
                .is_empty());
        };
        if !self.local.holds(ctx, digest).await? {
            return Ok(false);
        }
        Ok(queue.queued(ctx, std::slice::from_ref(digest))[0]
            || self.upstream.holds(ctx, digest).await?)
    }

    async fn read(
        &self,
        ctx: &RequestContext,
        digest: &Digest,
        offset: u64,
        limit: u64,
    ) -> Result<ChunkStream> {
        self.reads.read(ctx, digest, offset, limit).await
    }

    async fn begin_write(
        &self,
        ctx: &RequestContext,
        digest: &Digest,
    ) -> Result<Box<dyn BlobWriter>> {
        match &self.writes {
            Writes::Back(writes, _) => writes.begin_write(ctx, digest).await,
            Writes::Through(writes) => writes.begin_write(ctx, digest).await,
        }
    }

    async fn read_compressed(
        &self,
        ctx: &RequestContext,
        digest: &Digest,
        offset: u64,
        compressor: Compressor,
    ) -> Result<ChunkStream> {
        self.reads
            .read_compressed(ctx, digest, offset, compressor)
            .await
    }

    async fn begin_write_compressed(
        &self,
        ctx: &RequestContext,
        digest: &Digest,
        compressor: Compressor,
    ) -> Result<Box<dyn BlobWriter>> {
        match &self.writes {
            Writes::Back(writes, _) => writes.begin_write_compressed(ctx, digest, compressor).await,
            Writes::Through(writes) => writes.begin_write_compressed(ctx, digest, compressor).await,
        }
    }

    async fn read_many(&self, ctx: &RequestContext, digests: &[Digest]) -> Vec<Result<Bytes>> {
        self.reads.read_many(ctx, digests).await
    }

    async fn write_many(
        &self,
        ctx: &RequestContext,
        blobs: Vec<(Digest, Bytes)>,
    ) -> Vec<Result<()>> {
        match &self.writes {
            Writes::Back(writes, _) => writes.write_many(ctx, blobs).await,
            Writes::Through(writes) => writes.write_many(ctx, blobs).await,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::digest::DigestFunction;
    use crate::error::Error;
    use crate::store::local::LocalStoreOptions;
    use crate::store::memory::blob;
    use crate::store::memory::{MemoryStore, count};
    use std::time::Duration;

    fn local(dir: &std::path::Path) -> LocalStore {
        let options = LocalStoreOptions {
            dir: dir.to_path_buf(),
            quota_bytes: 1 << 30,
            inline_limit: 1 << 20,
            sync: false,
        };
        LocalStore::open(options, Arc::new(Stats::default())).unwrap()
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_reads_of_a_missing_blob_share_one_fetch() {
        let dir = tempfile::tempdir().unwrap();
        let upstream = Arc::new(MemoryStore::default());
        *upstream.read_delay.lock().unwrap() = Duration::from_millis(100);
        let data = blob(3 << 20, 1);
        let d = upstream.insert(&data);
        let stats = Arc::new(Stats::default());
        let proxy = Arc::new(ProxyStore::new(
            local(dir.path()),
            upstream.clone(),
            Traffic::new(stats.clone()),
            stats.clone(),
            &Background::new(),
            None,
            None,
        ));
        let readers: Vec<_> = (0..50)
            .map(|_| {
                let proxy = proxy.clone();
                tokio::spawn(async move {
                    let ctx = RequestContext::default();
                    crate::store::read_to_bytes(&*proxy, &ctx, &d)
                        .await
                        .unwrap()
                })
            })
            .collect();
        for r in readers {
            assert_eq!(r.await.unwrap(), data);
        }
        assert_eq!(count(&upstream.reads), 1, "one upstream transfer");
        assert_eq!(Stats::get(&stats.upstream_fetches), 1);
        assert_eq!(Stats::get(&stats.single_flight_joins), 49);
        // Now local: no further upstream reads.
        let ctx = RequestContext::default();
        crate::store::read_to_bytes(&*proxy, &ctx, &d)
            .await
            .unwrap();
        assert_eq!(count(&upstream.reads), 1);
    }

    #[tokio::test]
    async fn find_missing_uploads_what_only_the_proxy_holds() {
        let dir = tempfile::tempdir().unwrap();
        let upstream = Arc::new(MemoryStore::default());
        let local = local(dir.path());
        let ctx = RequestContext::default();
        let small = blob(100, 2);
        let large = blob(2 << 20, 3);
        let ds = Digest::of(DigestFunction::Sha256, &small);
        let dl = Digest::of(DigestFunction::Sha256, &large);
        let nowhere = Digest::of(DigestFunction::Sha256, b"nowhere");
        local.write_many(&ctx, vec![(ds, small), (dl, large)]).await;
        let stats = Arc::new(Stats::default());
        let proxy = ProxyStore::new(
            local,
            upstream.clone(),
            Traffic::new(stats.clone()),
            stats.clone(),
            &Background::new(),
            None,
            None,
        );
        let missing = proxy.find_missing(&ctx, &[ds, dl, nowhere]).await.unwrap();
        assert_eq!(missing, vec![nowhere]);
        assert!(upstream.has(&ds) && upstream.has(&dl));
        assert_eq!(Stats::get(&stats.uploads_from_local), 2);
    }

    #[tokio::test]
    async fn writes_go_to_both_and_bad_data_to_neither() {
        let dir = tempfile::tempdir().unwrap();
        let upstream = Arc::new(MemoryStore::default());
        let proxy = ProxyStore::new(
            local(dir.path()),
            upstream.clone(),
            Traffic::new(Arc::default()),
            Arc::new(Stats::default()),
            &Background::new(),
            None,
            None,
        );
        let ctx = RequestContext::default();
        for len in [10, 3 << 20] {
            let data = blob(len, 4);
            let d = Digest::of(DigestFunction::Sha256, &data);
            crate::store::write_bytes(&proxy, &ctx, &d, data.clone())
                .await
                .unwrap();
            assert!(upstream.has(&d));
            assert!(
                proxy
                    .local
                    .find_missing(&ctx, &[d])
                    .await
                    .unwrap()
                    .is_empty()
            );
            let mut wrong = data.to_vec();
            wrong[0] ^= 1;
            let dw = Digest::of(DigestFunction::Sha256, &blob(len, 5));
            let err = crate::store::write_bytes(&proxy, &ctx, &dw, Bytes::from(wrong)).await;
            assert!(matches!(err, Err(Error::InvalidArgument(_))), "{err:?}");
            assert!(!upstream.has(&dw));
        }
    }

    #[tokio::test]
    async fn local_hits_are_served_while_the_upstream_is_down() {
        let dir = tempfile::tempdir().unwrap();
        let upstream = Arc::new(MemoryStore::default());
        let proxy = ProxyStore::new(
            local(dir.path()),
            upstream.clone(),
            Traffic::new(Arc::default()),
            Arc::new(Stats::default()),
            &Background::new(),
            None,
            None,
        );
        let ctx = RequestContext::default();
        let data = blob(1000, 6);
        let d = Digest::of(DigestFunction::Sha256, &data);
        crate::store::write_bytes(&proxy, &ctx, &d, data.clone())
            .await
            .unwrap();
        upstream
            .down
            .store(true, std::sync::atomic::Ordering::SeqCst);
        assert_eq!(
            crate::store::read_to_bytes(&proxy, &ctx, &d).await.unwrap(),
            data
        );
        let other = Digest::of(DigestFunction::Sha256, b"elsewhere");
        let err = crate::store::read_to_bytes(&proxy, &ctx, &other).await;
        assert!(matches!(err, Err(Error::Unavailable(_))), "{err:?}");
    }
}
