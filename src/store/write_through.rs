//! Write-through: a client's write goes to the local store and the upstream
//! together (a tee), and succeeds only once both have the blob.
//!
//! The local store verifies the data; nothing goes upstream unverified. A
//! small blob is buffered and sent in a batched BatchUpdateBlobs on commit;
//! a large one streams to both as it arrives. A blob larger than the whole
//! local store goes to the upstream only (verified here when buffered, by
//! the upstream otherwise).
//!
//! A tee write that is parked (the client went away mid-way) lets go of
//! its upstream copy at once, cancelling a streamed upload: a parked upload
//! must not hold an upstream stream for the minutes it may wait. When it is
//! resumed and committed, the blob goes up from the local store once the
//! local commit has verified it (the [`Replicator`]'s copy). An
//! upstream-only write cannot be resumed without its upstream stream, so
//! it is not parked but dropped (the client starts again from 0).
//!
//! [`Replicator`]: crate::store::replicator::Replicator

use std::sync::Arc;

use async_trait::async_trait;
use bytes::{Bytes, BytesMut};

use crate::compression::{Compressor, DecompressingWriter};
use crate::context::RequestContext;
use crate::digest::Digest;
use crate::error::{Error, Result};
use crate::store::replicator::copy_blob;
use crate::store::{BlobStore, BlobWriter, SMALL_BLOB};

/// The local store and the upstream, for writes.
pub struct WriteThrough {
    /// Where the blob is verified and kept.
    local: Arc<dyn BlobStore>,
    /// The local store's quota: a larger blob goes to the upstream only.
    local_capacity: u64,
    /// Where the work runs: it needs every blob too.
    upstream: Arc<dyn BlobStore>,
}

impl WriteThrough {
    /// Writes to `local` (holding at most `local_capacity` bytes) and `upstream`.
    pub fn new(
        local: Arc<dyn BlobStore>,
        local_capacity: u64,
        upstream: Arc<dyn BlobStore>,
    ) -> Self {
        WriteThrough {
            local,
            local_capacity,
            upstream,
        }
    }

    /// Starts a tee write of one blob.
    pub async fn begin_write(
        &self,
        ctx: &RequestContext,
        digest: &Digest,
    ) -> Result<Box<dyn BlobWriter>> {
        let local = if digest.size <= self.local_capacity {
            Some(self.local.begin_write(ctx, digest).await?)
        } else {
            None
        };
        let upstream = if digest.size <= SMALL_BLOB {
            Sink::Buffer(BytesMut::with_capacity(digest.size as usize))
        } else {
            Sink::Stream(self.upstream.begin_write(ctx, digest).await?)
        };
        Ok(Box::new(TeeWriter {
            ctx: ctx.clone(),
            digest: *digest,
            local,
            upstream,
            local_store: self.local.clone(),
            upstream_store: self.upstream.clone(),
            written: 0,
            compressed: false,
        }))
    }

    /// Starts a tee write of `compressor`-compressed pieces. A large blob
    /// the local store can hold, going to an upstream that takes compressed
    /// bytes, is teed compressed as it is (the local store verifies it, the
    /// upstream gets the client's bytes); anything else is decoded here
    /// into a plain tee.
    pub async fn begin_write_compressed(
        &self,
        ctx: &RequestContext,
        digest: &Digest,
        compressor: Compressor,
    ) -> Result<Box<dyn BlobWriter>> {
        let native = digest.size > SMALL_BLOB
            && digest.size <= self.local_capacity
            && self.upstream.prefers_compressed(digest);
        if !native {
            let plain = self.begin_write(ctx, digest).await?;
            return Ok(Box::new(DecompressingWriter::new(plain, *digest)?));
        }
        let local = self
            .local
            .begin_write_compressed(ctx, digest, compressor)
            .await?;
        let upstream = self
            .upstream
            .begin_write_compressed(ctx, digest, compressor)
            .await?;
        Ok(Box::new(TeeWriter {
            ctx: ctx.clone(),
            digest: *digest,
            local: Some(local),
            upstream: Sink::Stream(upstream),
            local_store: self.local.clone(),
            upstream_store: self.upstream.clone(),
            written: 0,
            compressed: true,
        }))
    }

    /// Writes whole blobs: verified and stored locally, then the ones the
    /// local store accepted go upstream. One result per blob.
    pub async fn write_many(
        &self,
        ctx: &RequestContext,
        blobs: Vec<(Digest, Bytes)>,
    ) -> Vec<Result<()>> {
        let mut results = self.local.write_many(ctx, blobs.clone()).await;
        let (positions, verified): (Vec<usize>, Vec<(Digest, Bytes)>) = blobs
            .into_iter()
            .enumerate()
            .filter(|(i, _)| results[*i].is_ok())
            .unzip();
        let upstream_results = self.upstream.write_many(ctx, verified).await;
        for (i, r) in positions.into_iter().zip(upstream_results) {
            results[i] = r;
        }
        results
    }
}

/// Where a tee write sends the upstream's copy.
enum Sink {
    /// Small blob: buffered, sent in a batched BatchUpdateBlobs on commit.
    Buffer(BytesMut),
    /// Large blob: streamed to the upstream alongside the local write.
    Stream(Box<dyn BlobWriter>),
    /// The write was parked: the blob is copied up from the local store
    /// after the local commit.
    FromLocal,
}

/// Writes one blob to the local store and the upstream together.
struct TeeWriter {
    ctx: RequestContext,
    digest: Digest,
    /// `None` when the blob is too large for the local store.
    local: Option<Box<dyn BlobWriter>>,
    upstream: Sink,
    /// Where a parked write's blob is copied from on commit.
    local_store: Arc<dyn BlobStore>,
    /// Where a buffered (or parked) blob is sent on commit.
    upstream_store: Arc<dyn BlobStore>,
    /// Bytes received (compressed ones for a compressed tee).
    written: u64,
    /// The pieces are compressed: both writers take them as they are, and
    /// the local writer counts the plain bytes committed.
    compressed: bool,
}

#[async_trait]
impl BlobWriter for TeeWriter {
    async fn write(&mut self, data: Bytes) -> Result<()> {
        if let Some(local) = &mut self.local {
            local.write(data.clone()).await?;
        } else if self.written + data.len() as u64 > self.digest.size {
            return Err(Error::InvalidArgument(format!(
                "size mismatch for {}: received more than {} bytes",
                self.digest, self.digest.size
            )));
        }
        match &mut self.upstream {
            Sink::Buffer(buf) => buf.extend_from_slice(&data),
            Sink::Stream(upstream) => upstream.write(data.clone()).await?,
            Sink::FromLocal => {}
        }
        self.written += data.len() as u64;
        Ok(())
    }

    fn committed_size(&self) -> u64 {
        match &self.local {
            Some(local) if self.compressed => local.committed_size(),
            _ => self.written,
        }
    }

    fn park(&mut self) -> bool {
        let Some(local) = &mut self.local else {
            return false; // upstream-only: nothing to resume from
        };
        // Dropping a streamed upload cancels its upstream call.
        self.upstream = Sink::FromLocal;
        local.park()
    }

    async fn commit(self: Box<Self>) -> Result<()> {
        let TeeWriter {
            ctx,
            digest,
            local,
            upstream,
            local_store,
            upstream_store,
            ..
        } = *self;
        // The local commit verifies the data; nothing goes upstream unverified
        // (an unfinished upstream stream is cancelled when dropped).
        match local {
            Some(local) => local.commit().await?,
            None => {
                if let Sink::Buffer(buf) = &upstream {
                    crate::digest::verify(&digest, &Digest::of(digest.function, buf))?;
                }
            }
        }
        match upstream {
            Sink::Buffer(buf) => upstream_store
                .write_many(&ctx, vec![(digest, buf.freeze())])
                .await
                .pop()
                .expect("one result per blob"),
            Sink::Stream(upstream) => upstream.commit().await,
            Sink::FromLocal => copy_blob(&*local_store, &*upstream_store, &ctx, &digest).await,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::digest::DigestFunction;
    use crate::store::memory::MemoryStore;
    use crate::store::memory::blob;

    fn tee(local: &Arc<MemoryStore>, capacity: u64, upstream: &Arc<MemoryStore>) -> WriteThrough {
        WriteThrough::new(local.clone(), capacity, upstream.clone())
    }

    async fn write(tee: &WriteThrough, d: &Digest, data: Bytes) -> Result<()> {
        let ctx = RequestContext::default();
        let mut writer = tee.begin_write(&ctx, d).await?;
        writer.write(data).await?;
        writer.commit().await
    }

    #[tokio::test]
    async fn writes_go_to_both_and_bad_data_to_neither() {
        let (local, upstream) = (
            Arc::new(MemoryStore::default()),
            Arc::new(MemoryStore::default()),
        );
        let tee = tee(&local, 1 << 30, &upstream);
        for len in [10, 3 << 20] {
            let data = blob(len, 4);
            let d = Digest::of(DigestFunction::Sha256, &data);
            write(&tee, &d, data.clone()).await.unwrap();
            assert!(upstream.has(&d) && local.has(&d));
            let mut wrong = data.to_vec();
            wrong[0] ^= 1;
            let dw = Digest::of(DigestFunction::Sha256, &blob(len, 5));
            let err = write(&tee, &dw, Bytes::from(wrong)).await;
            assert!(matches!(err, Err(Error::InvalidArgument(_))), "{err:?}");
            assert!(!upstream.has(&dw) && !local.has(&dw));
        }
    }

    #[tokio::test]
    async fn a_blob_too_large_for_the_local_store_goes_upstream_only() {
        let (local, upstream) = (
            Arc::new(MemoryStore::default()),
            Arc::new(MemoryStore::default()),
        );
        let tee = tee(&local, 5, &upstream);
        let data = blob(100, 1);
        let d = Digest::of(DigestFunction::Sha256, &data);
        write(&tee, &d, data.clone()).await.unwrap();
        assert!(upstream.has(&d) && !local.has(&d));
        let err = write(&tee, &d, blob(101, 1)).await;
        assert!(matches!(err, Err(Error::InvalidArgument(_))), "{err:?}");
    }

    #[tokio::test]
    async fn a_parked_tee_write_resumes_and_sends_the_blob_up_from_the_local_store() {
        let (local, upstream) = (
            Arc::new(MemoryStore::default()),
            Arc::new(MemoryStore::default()),
        );
        let tee = tee(&local, 1 << 30, &upstream);
        let ctx = RequestContext::default();
        for len in [10, 3 << 20] {
            let data = blob(len, 6);
            let d = Digest::of(DigestFunction::Sha256, &data);
            let mut writer = tee.begin_write(&ctx, &d).await.unwrap();
            writer.write(data.slice(..len / 2)).await.unwrap();
            assert!(writer.park(), "a tee write with a local copy can resume");
            writer.write(data.slice(len / 2..)).await.unwrap();
            writer.commit().await.unwrap();
            assert!(local.has(&d) && upstream.has(&d));
        }
    }

    #[tokio::test]
    async fn a_compressed_tee_hands_the_compressed_bytes_on() {
        use crate::store::replicator::takes_compressed::TakesCompressed;
        use std::sync::atomic::Ordering;
        let local = Arc::new(MemoryStore::default());
        let upstream = Arc::new(TakesCompressed::default());
        let tee = WriteThrough::new(local.clone(), 1 << 30, upstream.clone());
        let ctx = RequestContext::default();
        let data: Vec<u8> = (0..(3 << 20)).map(|i| b"tee tea "[i % 8]).collect();
        let packed = crate::compression::compress(&data);
        let d = Digest::of(DigestFunction::Sha256, &data);
        let mut writer = tee
            .begin_write_compressed(&ctx, &d, Compressor::Zstd)
            .await
            .unwrap();
        let half = packed.len() / 2;
        writer.write(packed.slice(..half)).await.unwrap();
        assert!(writer.committed_size() > half as u64, "plain bytes");
        writer.write(packed.slice(half..)).await.unwrap();
        writer.commit().await.unwrap();
        assert!(local.has(&d) && upstream.inner.has(&d));
        assert_eq!(upstream.compressed_writes.load(Ordering::SeqCst), 1);

        // Compressed bytes of other data: refused, stored nowhere.
        let other: Vec<u8> = (0..(3 << 20)).map(|i| b"tee toe "[i % 8]).collect();
        let dw = Digest::of(DigestFunction::Sha256, &data[..data.len() - 1]);
        let dw = Digest { size: d.size, ..dw };
        let mut writer = tee
            .begin_write_compressed(&ctx, &dw, Compressor::Zstd)
            .await
            .unwrap();
        writer
            .write(crate::compression::compress(&other))
            .await
            .unwrap();
        let err = writer.commit().await;
        assert!(matches!(err, Err(Error::InvalidArgument(_))), "{err:?}");
        assert!(!local.has(&dw) && !upstream.inner.has(&dw));
        // Small blobs are teed plain (batched upstream).
        let small = Bytes::from_static(b"small small small small");
        let ds = Digest::of(DigestFunction::Sha256, &small);
        let mut writer = tee
            .begin_write_compressed(&ctx, &ds, Compressor::Zstd)
            .await
            .unwrap();
        writer
            .write(crate::compression::compress(&small))
            .await
            .unwrap();
        writer.commit().await.unwrap();
        assert!(local.has(&ds) && upstream.inner.has(&ds));
        // Still the two large ones (the refused one included).
        assert_eq!(upstream.compressed_writes.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn an_upstream_only_write_cannot_be_parked() {
        let (local, upstream) = (
            Arc::new(MemoryStore::default()),
            Arc::new(MemoryStore::default()),
        );
        let tee = tee(&local, 5, &upstream);
        let d = Digest::of(DigestFunction::Sha256, &blob(100, 1));
        let mut writer = tee
            .begin_write(&RequestContext::default(), &d)
            .await
            .unwrap();
        writer.write(blob(50, 1)).await.unwrap();
        assert!(!writer.park());
    }

    #[tokio::test]
    async fn the_write_fails_when_the_upstream_refuses() {
        let (local, upstream) = (
            Arc::new(MemoryStore::default()),
            Arc::new(MemoryStore::default()),
        );
        upstream
            .down
            .store(true, std::sync::atomic::Ordering::SeqCst);
        let data = blob(10, 1);
        let d = Digest::of(DigestFunction::Sha256, &data);
        let ctx = RequestContext::default();
        let err = tee(&local, 1 << 30, &upstream)
            .write_many(&ctx, vec![(d, data)])
            .await
            .pop()
            .unwrap();
        assert!(matches!(err, Err(Error::Unavailable(_))), "{err:?}");
    }
}
