//! Counts the blob bytes client reads get from the local store
//! (`outpost_served_local_bytes_total`): in proxy mode, bytes that did not
//! cross the WAN. The read-through layer counts its local hits with
//! [`served_locally`]; in standalone mode every client read is local, and
//! [`ServedLocally`] counts them in front of the local store. Work done
//! ahead of clients (prefetch) is no client read and is not counted.

use std::sync::Arc;

use async_trait::async_trait;
use bytes::Bytes;

use crate::compression::Compressor;
use crate::context::{Priority, RequestContext};
use crate::digest::Digest;
use crate::error::Result;
use crate::stats::Stats;
use crate::store::{BlobStore, BlobWriter, ChunkStream};

/// Counts one client read call that got `bytes` blob bytes from the local
/// store (the range asked for: a reader that leaves early still counts it).
pub fn served_locally(stats: &Stats, ctx: &RequestContext, bytes: u64) {
    if ctx.priority == Priority::Client {
        Stats::add(&stats.served_local_bytes, bytes);
        Stats::add(&stats.served_local_reads, 1);
    }
}

/// The bytes of `digest` a read from `offset` with `limit` (0: to the end)
/// asks for.
pub fn range_len(digest: &Digest, offset: u64, limit: u64) -> u64 {
    digest.read_end(offset, limit).saturating_sub(offset)
}

/// The local store with its reads counted as served locally (standalone
/// mode: the store the services read).
pub struct ServedLocally {
    inner: Arc<dyn BlobStore>,
    stats: Arc<Stats>,
}

impl ServedLocally {
    /// Counts reads of `inner` into `stats`.
    pub fn new(inner: Arc<dyn BlobStore>, stats: Arc<Stats>) -> Self {
        ServedLocally { inner, stats }
    }
}

#[async_trait]
impl BlobStore for ServedLocally {
    async fn find_missing(&self, ctx: &RequestContext, digests: &[Digest]) -> Result<Vec<Digest>> {
        self.inner.find_missing(ctx, digests).await
    }

    async fn read(
        &self,
        ctx: &RequestContext,
        digest: &Digest,
        offset: u64,
        limit: u64,
    ) -> Result<ChunkStream> {
        let stream = self.inner.read(ctx, digest, offset, limit).await?;
        served_locally(&self.stats, ctx, range_len(digest, offset, limit));
        Ok(stream)
    }

    async fn begin_write(
        &self,
        ctx: &RequestContext,
        digest: &Digest,
    ) -> Result<Box<dyn BlobWriter>> {
        self.inner.begin_write(ctx, digest).await
    }

    async fn read_compressed(
        &self,
        ctx: &RequestContext,
        digest: &Digest,
        offset: u64,
        compressor: Compressor,
    ) -> Result<ChunkStream> {
        let stream = self
            .inner
            .read_compressed(ctx, digest, offset, compressor)
            .await?;
        served_locally(&self.stats, ctx, range_len(digest, offset, 0));
        Ok(stream)
    }

    async fn begin_write_compressed(
        &self,
        ctx: &RequestContext,
        digest: &Digest,
        compressor: Compressor,
    ) -> Result<Box<dyn BlobWriter>> {
        self.inner
            .begin_write_compressed(ctx, digest, compressor)
            .await
    }

    fn prefers_compressed(&self, digest: &Digest) -> bool {
        self.inner.prefers_compressed(digest)
    }

    async fn holds(&self, ctx: &RequestContext, digest: &Digest) -> Result<bool> {
        self.inner.holds(ctx, digest).await
    }

    async fn read_many(&self, ctx: &RequestContext, digests: &[Digest]) -> Vec<Result<Bytes>> {
        let results = self.inner.read_many(ctx, digests).await;
        count_many(&self.stats, ctx, &results);
        results
    }

    async fn write_many(
        &self,
        ctx: &RequestContext,
        blobs: Vec<(Digest, Bytes)>,
    ) -> Vec<Result<()>> {
        self.inner.write_many(ctx, blobs).await
    }
}

/// Counts the blobs a batch read found locally, as one read call.
pub fn count_many(stats: &Stats, ctx: &RequestContext, results: &[Result<Bytes>]) {
    let found = results.iter().flatten().map(|b| b.len() as u64);
    let (blobs, bytes) = found.fold((0, 0), |(n, sum), len| (n + 1, sum + len));
    if blobs > 0 {
        served_locally(stats, ctx, bytes);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::memory::MemoryStore;
    use crate::store::read_to_bytes;

    #[tokio::test]
    async fn client_reads_are_counted_prefetch_is_not() {
        let memory = Arc::new(MemoryStore::default());
        let data = b"hello, world";
        let digest = memory.insert(data);
        let ctx = RequestContext::for_instance("");
        let stats = Arc::new(Stats::default());
        let store = ServedLocally::new(memory, stats.clone());
        read_to_bytes(&store, &ctx, &digest).await.unwrap();
        let missing = Digest::of(crate::digest::DigestFunction::Sha256, b"nope");
        assert!(read_to_bytes(&store, &ctx, &missing).await.is_err());
        store.read_many(&ctx, &[digest, missing]).await;
        let prefetch = ctx.clone().with_priority(Priority::Prefetch);
        read_to_bytes(&store, &prefetch, &digest).await.unwrap();
        assert_eq!(Stats::get(&stats.served_local_bytes), 2 * data.len() as u64);
        assert_eq!(Stats::get(&stats.served_local_reads), 2);
    }
}
