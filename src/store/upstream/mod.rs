//! The upstream REAPI server as a [`BlobStore`] and [`ActionResultStore`].
//!
//! Small requests from concurrent clients are merged by group-commit
//! batchers, one per (instance, credentials): FindMissingBlobs digests,
//! small-blob reads (BatchReadBlobs) and small-blob writes
//! (BatchUpdateBlobs), each within the upstream's limits. Large blobs go over
//! ByteStream. Data read from the upstream is verified before it is handed on.
//! Prefetch's reads (`Priority::Prefetch`) are not merged, and travel on the
//! upstream's prefetch connection.
//!
//! With `[upstream] compression = "auto"` and zstd in the upstream's
//! capabilities, blobs of at least `compression_min_bytes` cross the WAN
//! zstd-compressed both ways, ByteStream and batches: plain calls are
//! encoded and decoded here (bounded, the uncompressed digest verified by
//! whoever keeps the bytes, as for plain ones); `read_compressed` and
//! `begin_write_compressed` pass compressed bytes through as they are.
//!
//! - this file: [`UpstreamStore`], routing each blob to a batch or ByteStream.
//! - [`batch`]: the batched calls the batchers flush into.
//! - [`bytestream`]: the resuming read and the chunked upload.
//! - [`action_cache`]: GetActionResult / UpdateActionResult.
//!
//! [`ActionResultStore`]: crate::store::ActionResultStore

mod action_cache;
mod batch;
mod bytestream;
#[cfg(test)]
mod tests;

use bytestream::Wire;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;

use crate::compression::{Compressor, DecompressingWriter};
use crate::context::{Priority, RequestContext};
use crate::digest::Digest;
use crate::error::{Result, each_fails};
use crate::store::{BlobStore, BlobWriter, ChunkStream};
use crate::tasks::Background;
use crate::upstream::Upstream;
use crate::upstream::batcher::Limits;
use crate::upstream::compressors::CompressedCall;
use crate::upstream::keyed_batchers::KeyedBatchers;

/// Batched calls of one kind in flight per (instance, credentials).
const BATCH_CALLS_IN_FLIGHT: usize = 4;
/// A batcher unused this long retires (clients that rotate credentials
/// would otherwise leave one behind per token).
const BATCHER_IDLE: Duration = Duration::from_secs(60);

/// The upstream CAS and action cache.
pub struct UpstreamStore {
    /// The connection every call goes through.
    upstream: Arc<Upstream>,
    /// FindMissingBlobs: digest → missing?
    find_missing: KeyedBatchers<Digest, bool>,
    /// Small reads: digest → bytes.
    reads: KeyedBatchers<Digest, Result<Bytes>>,
    /// Small writes: (digest, bytes) → stored?
    writes: KeyedBatchers<(Digest, Bytes), Result<()>>,
}

impl UpstreamStore {
    /// The upstream's CAS and action cache, with batching; the batchers'
    /// workers run in `background`.
    pub fn new(upstream: Arc<Upstream>, background: &Background) -> Self {
        let batch_bytes = upstream.batch_limit();
        UpstreamStore {
            find_missing: batchers(
                &upstream,
                background,
                (batch::FMB_MAX_DIGESTS, u64::MAX),
                |_| 0,
                batch::find_missing,
            ),
            reads: batchers(
                &upstream,
                background,
                (usize::MAX, batch_bytes),
                |d| d.size,
                batch::read,
            ),
            writes: batchers(
                &upstream,
                background,
                (usize::MAX, batch_bytes),
                |(d, _)| d.size,
                batch::write,
            ),
            upstream,
        }
    }

    /// The connection this store uses.
    pub fn upstream(&self) -> &Arc<Upstream> {
        &self.upstream
    }

    /// The compressor `digest` crosses ByteStream with (`None`: plain).
    fn compressor(&self, digest: &Digest) -> Option<Compressor> {
        self.upstream
            .compressor(digest.size, CompressedCall::Stream)
    }
}

/// Batchers for one kind of batched call: at most `(items, weight)` per
/// call, `weigh` giving an item's weight, `flush` making the call.
fn batchers<T, R, F, Fut>(
    upstream: &Arc<Upstream>,
    background: &Background,
    (max_items, max_weight): (usize, u64),
    weigh: fn(&T) -> u64,
    flush: F,
) -> KeyedBatchers<T, R>
where
    T: Send + 'static,
    R: Send + 'static,
    F: Fn(Arc<Upstream>, RequestContext, Vec<T>) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<Vec<R>>> + Send + 'static,
{
    let limits = Limits {
        max_items,
        max_weight,
        max_in_flight: BATCH_CALLS_IN_FLIGHT,
        idle: BATCHER_IDLE,
    };
    let stats = upstream.stats().clone();
    let upstream = upstream.clone();
    KeyedBatchers::new(
        limits,
        weigh,
        move |ctx, items| flush(upstream.clone(), ctx, items),
        background,
        stats,
    )
}

#[async_trait]
impl BlobStore for UpstreamStore {
    async fn find_missing(&self, ctx: &RequestContext, digests: &[Digest]) -> Result<Vec<Digest>> {
        let wanted: Vec<Digest> = digests
            .iter()
            .filter(|d| !d.is_empty_blob())
            .copied()
            .collect();
        let missing = self.find_missing.submit(ctx, wanted.clone()).await?;
        Ok(wanted
            .into_iter()
            .zip(missing)
            .filter(|(_, m)| *m)
            .map(|(d, _)| d)
            .collect())
    }

    async fn read(
        &self,
        ctx: &RequestContext,
        digest: &Digest,
        offset: u64,
        limit: u64,
    ) -> Result<ChunkStream> {
        // Compressed on the wire when it pays and the read goes to the end
        // (REAPI has no compressed ranged reads).
        let to_end = digest.read_end(offset, limit) == digest.size;
        let wire = match self.compressor(digest) {
            Some(c) if to_end => Wire::Coded(c),
            _ => Wire::Plain,
        };
        bytestream::read(&self.upstream, ctx, digest, offset, limit, wire).await
    }

    async fn begin_write(
        &self,
        ctx: &RequestContext,
        digest: &Digest,
    ) -> Result<Box<dyn BlobWriter>> {
        let wire = self.compressor(digest).map_or(Wire::Plain, Wire::Coded);
        Ok(Box::new(
            bytestream::UpstreamWriter::start(&self.upstream, ctx, digest, wire).await?,
        ))
    }

    async fn read_compressed(
        &self,
        ctx: &RequestContext,
        digest: &Digest,
        offset: u64,
        compressor: Compressor,
    ) -> Result<ChunkStream> {
        // The upstream's compressed bytes as they come, when it speaks
        // this compressor; else encoded here from a plain read.
        if self.compressor(digest) == Some(compressor) {
            let wire = Wire::Compressed(compressor);
            return bytestream::read(&self.upstream, ctx, digest, offset, 0, wire).await;
        }
        let plain = self.read(ctx, digest, offset, 0).await?;
        Ok(crate::compression::compress_stream(plain))
    }

    async fn begin_write_compressed(
        &self,
        ctx: &RequestContext,
        digest: &Digest,
        compressor: Compressor,
    ) -> Result<Box<dyn BlobWriter>> {
        // The caller's compressed bytes go up as they are when the
        // upstream speaks this compressor; else decoded here.
        if self.compressor(digest) == Some(compressor) {
            let wire = Wire::Compressed(compressor);
            return Ok(Box::new(
                bytestream::UpstreamWriter::start(&self.upstream, ctx, digest, wire).await?,
            ));
        }
        let plain = self.begin_write(ctx, digest).await?;
        Ok(Box::new(DecompressingWriter::new(plain, *digest)?))
    }

    fn prefers_compressed(&self, digest: &Digest) -> bool {
        self.compressor(digest).is_some()
    }

    async fn read_many(&self, ctx: &RequestContext, digests: &[Digest]) -> Vec<Result<Bytes>> {
        // Blobs too big for one BatchReadBlobs come over ByteStream.
        let limit = self.upstream.batch_limit();
        let small: Vec<Digest> = digests
            .iter()
            .filter(|d| d.size <= limit)
            .copied()
            .collect();
        // Prefetch's batches are already sized to yield (see
        // `read_through::PREFETCH_BATCH`): merged with others they would
        // grow into a call too long to stay out of a client's way.
        let batched = match ctx.priority {
            Priority::Client => self.reads.submit(ctx, small.clone()).await,
            Priority::Prefetch => {
                batch::read(self.upstream.clone(), ctx.clone(), small.clone()).await
            }
        };
        let mut batched = match batched {
            Ok(results) => results.into_iter(),
            Err(e) => each_fails(&e, small.len()).into_iter(),
        };
        let mut out = Vec::with_capacity(digests.len());
        for d in digests {
            if d.size <= limit {
                out.push(batched.next().expect("one result per small digest"));
            } else {
                out.push(crate::store::read_to_bytes(self, ctx, d).await);
            }
        }
        out
    }

    async fn write_many(
        &self,
        ctx: &RequestContext,
        blobs: Vec<(Digest, Bytes)>,
    ) -> Vec<Result<()>> {
        // Blobs too big for one BatchUpdateBlobs go over ByteStream.
        let limit = self.upstream.batch_limit();
        let (small, large): (Vec<_>, Vec<_>) = blobs
            .into_iter()
            .enumerate()
            .partition(|(_, (d, _))| d.size <= limit);
        let mut out: Vec<Result<()>> = Vec::new();
        out.resize_with(small.len() + large.len(), || Ok(()));
        let (positions, small): (Vec<usize>, Vec<(Digest, Bytes)>) = small.into_iter().unzip();
        let results = match self.writes.submit(ctx, small).await {
            Ok(results) => results,
            Err(e) => each_fails(&e, positions.len()),
        };
        for (i, r) in positions.into_iter().zip(results) {
            out[i] = r;
        }
        for (i, (d, data)) in large {
            out[i] = crate::store::write_bytes(self, ctx, &d, data).await;
        }
        out
    }
}
