//! Copies blobs from one store to another: "the upstream lacks these, the
//! local store holds them, send them over".
//!
//! Used by FindMissingBlobs backfill (the proxy reports a blob present once
//! it has uploaded it) and by execution's MISSING repair. Small blobs travel
//! in one batched write; large ones are streamed, a few at a time. The
//! receiving store verifies each blob.

use std::sync::Arc;

use futures::{StreamExt, TryStreamExt};

use crate::compression::Compressor;
use crate::context::RequestContext;
use crate::digest::Digest;
use crate::error::{Error, Result};
use crate::stats::Stats;
use crate::store::{BlobStore, SMALL_BLOB};

/// Large blobs streamed at once.
const PARALLEL_UPLOADS: usize = 4;

/// Copies blobs from `from` to `to`.
pub struct Replicator {
    /// Where the blobs are read (the local store).
    from: Arc<dyn BlobStore>,
    /// Where they are written (the upstream).
    to: Arc<dyn BlobStore>,
    /// Counts each copied blob (`uploads_from_local`).
    stats: Arc<Stats>,
}

impl Replicator {
    /// Copies from `from` into `to`.
    pub fn new(from: Arc<dyn BlobStore>, to: Arc<dyn BlobStore>, stats: Arc<Stats>) -> Self {
        Replicator { from, to, stats }
    }

    /// Copies `digests`; returns the ones that could not be copied.
    pub async fn copy(&self, ctx: &RequestContext, digests: Vec<Digest>) -> Vec<Digest> {
        let (small, large): (Vec<Digest>, Vec<Digest>) =
            digests.into_iter().partition(|d| d.size <= SMALL_BLOB);
        let mut failed = Vec::new();
        if !small.is_empty() {
            let results = copy_batch(&*self.from, &*self.to, ctx, &small).await;
            for (d, r) in small.into_iter().zip(results) {
                self.count(&d, r, &mut failed);
            }
        }
        let outcomes: Vec<(Digest, Result<()>)> = futures::stream::iter(large)
            .map(|d| async move { (d, copy_blob(&*self.from, &*self.to, ctx, &d).await) })
            .buffer_unordered(PARALLEL_UPLOADS)
            .collect()
            .await;
        for (d, r) in outcomes {
            self.count(&d, r, &mut failed);
        }
        failed
    }

    fn count(&self, digest: &Digest, result: Result<()>, failed: &mut Vec<Digest>) {
        match result {
            Ok(()) => Stats::add(&self.stats.uploads_from_local, 1),
            Err(e) => {
                tracing::debug!("uploading {digest} from the local store failed: {e}");
                failed.push(*digest);
            }
        }
    }
}

/// Copies small blobs in one batched read and one batched write, one
/// result per digest (a failed read is that digest's error); also how the
/// upload queue sends its small blobs ([`crate::store::write_back`]).
pub async fn copy_batch(
    from: &dyn BlobStore,
    to: &dyn BlobStore,
    ctx: &RequestContext,
    digests: &[Digest],
) -> Vec<Result<()>> {
    let mut results: Vec<Result<()>> = Vec::with_capacity(digests.len());
    let mut blobs = Vec::new();
    let mut sent = Vec::new();
    for (i, read) in from.read_many(ctx, digests).await.into_iter().enumerate() {
        match read {
            Ok(data) => {
                blobs.push((digests[i], data));
                sent.push(i);
                results.push(Err(Error::Internal(format!(
                    "the batched write gave no answer for blob {}",
                    digests[i]
                ))));
            }
            Err(e) => results.push(Err(e)),
        }
    }
    for (i, written) in sent.into_iter().zip(to.write_many(ctx, blobs).await) {
        results[i] = written;
    }
    results
}

/// Streams one blob from `from` into `to` (which verifies it); also how a
/// resumed tee write sends its blob up ([`crate::store::write_through`]).
/// When `to` takes compressed bytes natively, the copy is compressed end
/// to end: `from` serves what it holds compressed as it is (never
/// decompressed and recompressed here).
pub async fn copy_blob(
    from: &dyn BlobStore,
    to: &dyn BlobStore,
    ctx: &RequestContext,
    digest: &Digest,
) -> Result<()> {
    let (mut stream, mut writer) = if to.prefers_compressed(digest) {
        let c = Compressor::Zstd;
        let stream = from.read_compressed(ctx, digest, 0, c).await?;
        (stream, to.begin_write_compressed(ctx, digest, c).await?)
    } else {
        let stream = from.read(ctx, digest, 0, 0).await?;
        (stream, to.begin_write(ctx, digest).await?)
    };
    while let Some(chunk) = stream.try_next().await? {
        writer.write(chunk).await?;
    }
    writer.commit().await
}

/// A store that takes compressed writes natively, for the tests of the
/// layers that hand compressed bytes on as they are.
#[cfg(test)]
pub(crate) mod takes_compressed {
    use std::sync::atomic::{AtomicU64, Ordering};

    use async_trait::async_trait;

    use crate::compression::{Compressor, DecompressingWriter};
    use crate::context::RequestContext;
    use crate::digest::Digest;
    use crate::error::Result;
    use crate::store::memory::MemoryStore;
    use crate::store::{BlobStore, BlobWriter, ChunkStream};

    /// A [`MemoryStore`] that prefers compressed writes and counts them
    /// (decoded into the memory store, which verifies at commit).
    #[derive(Default)]
    pub(crate) struct TakesCompressed {
        pub(crate) inner: MemoryStore,
        pub(crate) compressed_writes: AtomicU64,
    }

    #[async_trait]
    impl BlobStore for TakesCompressed {
        async fn find_missing(
            &self,
            ctx: &RequestContext,
            digests: &[Digest],
        ) -> Result<Vec<Digest>> {
            self.inner.find_missing(ctx, digests).await
        }

        async fn read(
            &self,
            ctx: &RequestContext,
            digest: &Digest,
            offset: u64,
            limit: u64,
        ) -> Result<ChunkStream> {
            self.inner.read(ctx, digest, offset, limit).await
        }

        async fn begin_write(
            &self,
            ctx: &RequestContext,
            digest: &Digest,
        ) -> Result<Box<dyn BlobWriter>> {
            self.inner.begin_write(ctx, digest).await
        }

        async fn begin_write_compressed(
            &self,
            ctx: &RequestContext,
            digest: &Digest,
            _compressor: Compressor,
        ) -> Result<Box<dyn BlobWriter>> {
            self.compressed_writes.fetch_add(1, Ordering::SeqCst);
            let plain = self.inner.begin_write(ctx, digest).await?;
            Ok(Box::new(DecompressingWriter::new(plain, *digest)?))
        }

        fn prefers_compressed(&self, _digest: &Digest) -> bool {
            true
        }
    }
}

#[cfg(test)]
mod tests {
    use super::takes_compressed::TakesCompressed;
    use super::*;
    use crate::digest::DigestFunction;
    use crate::store::memory::MemoryStore;
    use crate::store::memory::count;

    #[tokio::test]
    async fn a_destination_that_takes_compressed_bytes_gets_them() {
        let from = Arc::new(MemoryStore::default());
        let to = Arc::new(TakesCompressed::default());
        let text: Vec<u8> = (0..(3 << 20)).map(|i| b"abcabd"[i % 6]).collect();
        let large = from.insert(&text);
        let ctx = RequestContext::default();
        copy_blob(&*from, &*to, &ctx, &large).await.unwrap();
        assert_eq!(count(&to.compressed_writes), 1);
        let copied = crate::store::read_to_bytes(&*to, &ctx, &large)
            .await
            .unwrap();
        assert!(copied[..] == text[..]);
        // A plain destination gets plain bytes.
        let plain = Arc::new(MemoryStore::default());
        copy_blob(&*from, &*plain, &ctx, &large).await.unwrap();
        assert!(plain.has(&large));
    }

    #[tokio::test]
    async fn copies_small_and_large_blobs_and_reports_the_rest() {
        let (from, to) = (
            Arc::new(MemoryStore::default()),
            Arc::new(MemoryStore::default()),
        );
        let small = from.insert(b"small");
        let large = from.insert(&vec![7u8; 2 << 20]);
        let absent = Digest::of(DigestFunction::Sha256, b"absent");
        let absent_large = Digest {
            size: 3 << 20,
            ..absent
        };
        let stats = Arc::new(Stats::default());
        let replicator = Replicator::new(from.clone(), to.clone(), stats.clone());
        let ctx = RequestContext::default();
        let mut failed = replicator
            .copy(&ctx, vec![small, large, absent, absent_large])
            .await;
        failed.sort();
        let mut expected = vec![absent, absent_large];
        expected.sort();
        assert_eq!(failed, expected);
        assert!(to.has(&small) && to.has(&large));
        assert_eq!(Stats::get(&stats.uploads_from_local), 2);
        let copied = crate::store::read_to_bytes(&*to, &ctx, &large)
            .await
            .unwrap();
        assert_eq!(copied.len(), 2 << 20);
    }
}
