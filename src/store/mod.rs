//! Blob and action-result storage, as small composable layers.
//!
//! [`BlobStore`] is the one interface every CAS layer speaks: the local
//! RocksDB store, the upstream, and decorators that each do one job. Each
//! layer lives in its own file and is tested alone (against
//! `memory::MemoryStore` fakes). [`ActionResultStore`] is the same idea for
//! the action cache. Nothing here imports the services, prefetch or
//! execution: they plug in through small traits (`read_through::ReadHook`,
//! `proxy_ac::ResultObserver`).
//!
//! - [`local`]: the RocksDB-backed store (CAS, action cache, LRU quota; large
//!   blobs as files beside RocksDB).
//! - [`complete`]: the action-cache decorator that hides results whose outputs are gone.
//! - [`upstream`]: the upstream server as a store, with request batching.
//! - [`existence_cache`]: remembers digests the upstream is known to hold.
//! - [`proxy`]: local store in front of the upstream, as one CAS: composes
//!   the three below and answers FindMissingBlobs for the upstream.
//! - [`read_through`]: local first; a miss fetched once, verified, kept.
//! - [`write_through`]: a tee writer to the local store and the upstream.
//! - [`write_back`]: the durable upload queue: writes acknowledged locally, uploaded behind.
//! - [`replicator`]: copies blobs from one store to another (backfill, repair).
//! - [`single_flight`]: concurrent callers of one key share one spawned flight.
//! - [`proxy_ac`]: the proxy for the action cache.
//! - [`served`]: counts the bytes client reads get from the local store.

pub mod asset_index;
pub mod complete;
pub mod existence_cache;
pub mod local;
#[cfg(test)]
pub mod memory;
pub mod proxy;
pub mod proxy_ac;
pub mod read_through;
pub mod replicator;
pub mod served;
pub mod single_flight;
pub mod upstream;
pub mod write_back;
pub mod write_through;

use std::sync::Arc;

use async_trait::async_trait;
use bazel_remote_apis::build::bazel::remote::execution::v2::ActionResult;
use bytes::{Bytes, BytesMut};
use futures::StreamExt;
use futures::stream::BoxStream;
use tokio::sync::watch;

use crate::compression::{self, Compressor, DecompressingWriter};
use crate::context::RequestContext;
use crate::digest::Digest;
use crate::error::{Error, Result};

/// Blobs up to this size travel in Batch* calls; larger ones over ByteStream.
pub const SMALL_BLOB: u64 = 1 << 20;

/// A blob (or a slice of one) as a stream of chunks.
pub type ChunkStream = BoxStream<'static, Result<Bytes>>;

/// Content-addressable storage: what every CAS layer implements.
#[async_trait]
pub trait BlobStore: Send + Sync + 'static {
    /// Returns the digests in `digests` that this store cannot serve, in order.
    async fn find_missing(&self, ctx: &RequestContext, digests: &[Digest]) -> Result<Vec<Digest>>;

    /// Streams bytes `[offset, offset + limit)` of a blob (`limit` 0 = to the end).
    /// NOT_FOUND if the blob is absent, OUT_OF_RANGE if `offset > size`.
    async fn read(
        &self,
        ctx: &RequestContext,
        digest: &Digest,
        offset: u64,
        limit: u64,
    ) -> Result<ChunkStream>;

    /// Starts a write of one blob; nothing is visible until the writer's
    /// `commit` has verified the data against `digest`.
    async fn begin_write(
        &self,
        ctx: &RequestContext,
        digest: &Digest,
    ) -> Result<Box<dyn BlobWriter>>;

    /// Streams the blob from plain byte `offset` to its end, compressed
    /// with `compressor` (REAPI `compressed-blobs` reads: the offset is
    /// uncompressed, there is no limit). The default compresses
    /// [`BlobStore::read`] as it streams; a store that holds or fetches
    /// compressed bytes serves them as they are.
    async fn read_compressed(
        &self,
        ctx: &RequestContext,
        digest: &Digest,
        offset: u64,
        compressor: Compressor,
    ) -> Result<ChunkStream> {
        let Compressor::Zstd = compressor;
        let plain = self.read(ctx, digest, offset, 0).await?;
        Ok(compression::compress_stream(plain))
    }

    /// Starts a write whose pieces are `compressor`-compressed bytes of the
    /// blob; the writer verifies the *uncompressed* digest at commit and
    /// never expands past its declared size. Its `committed_size` counts
    /// plain bytes. The default decodes into [`BlobStore::begin_write`]; a
    /// store that keeps or forwards compressed bytes takes them as they are.
    async fn begin_write_compressed(
        &self,
        ctx: &RequestContext,
        digest: &Digest,
        compressor: Compressor,
    ) -> Result<Box<dyn BlobWriter>> {
        let Compressor::Zstd = compressor;
        let plain = self.begin_write(ctx, digest).await?;
        Ok(Box::new(DecompressingWriter::new(plain, *digest)?))
    }

    /// Whether `digest` is best written here with
    /// [`BlobStore::begin_write_compressed`] (this store keeps or forwards
    /// compressed bytes as they are), so a copy into it reads the source
    /// with [`BlobStore::read_compressed`] instead of decompressing and
    /// recompressing (`replicator::copy_blob`). Default: plain.
    fn prefers_compressed(&self, _digest: &Digest) -> bool {
        false
    }

    /// Whether the blob is here as far as this store can tell cheaply
    /// (ByteStream's early completion asks before every upload). Stores in
    /// front of a remote answer without calling it when they can.
    async fn holds(&self, ctx: &RequestContext, digest: &Digest) -> Result<bool> {
        Ok(self
            .find_missing(ctx, std::slice::from_ref(digest))
            .await?
            .is_empty())
    }

    /// Reads several whole blobs (meant for small ones), one result per digest.
    async fn read_many(&self, ctx: &RequestContext, digests: &[Digest]) -> Vec<Result<Bytes>> {
        let mut out = Vec::with_capacity(digests.len());
        for digest in digests {
            out.push(read_to_bytes(self, ctx, digest).await);
        }
        out
    }

    /// Writes several whole blobs, one result per blob. Each is verified.
    async fn write_many(
        &self,
        ctx: &RequestContext,
        blobs: Vec<(Digest, Bytes)>,
    ) -> Vec<Result<()>> {
        let mut out = Vec::with_capacity(blobs.len());
        for (digest, data) in blobs {
            out.push(write_bytes(self, ctx, &digest, data).await);
        }
        out
    }
}

/// An in-progress write of one blob.
#[async_trait]
pub trait BlobWriter: Send {
    /// Appends the next piece of the blob.
    async fn write(&mut self, data: Bytes) -> Result<()>;

    /// Bytes accepted so far (what QueryWriteStatus reports).
    fn committed_size(&self) -> u64;

    /// The client went away mid-write and the writer is put aside for a
    /// resumption: give back what is held beyond the bytes received (quota
    /// reserved ahead, an upstream stream). `false` when the write cannot be
    /// resumed, so it is dropped instead of parked.
    fn park(&mut self) -> bool {
        true
    }

    /// Verifies the data against the digest and makes the blob visible.
    /// On a mismatch nothing is stored and INVALID_ARGUMENT is returned.
    async fn commit(self: Box<Self>) -> Result<()>;

    /// A view of the bytes written so far, for readers that stream a blob
    /// while it is still being written (a read-through fetch); `None` when
    /// this writer cannot offer one (they wait for the commit instead).
    /// The bytes it shows are unverified until `commit` succeeds.
    fn follow(&self) -> Option<WriteFollower> {
        None
    }
}

/// What a [`BlobWriter`] shows of its write in progress: the bytes written
/// so far and how many there are, so readers stream them as they arrive
/// instead of waiting for the commit. Reads stay valid after the writer is
/// committed or dropped.
#[derive(Clone)]
pub struct WriteFollower {
    /// Positional reads of the bytes written.
    bytes: Arc<dyn WrittenBytes>,
    /// Bytes written so far; closed once the writer is gone.
    written: watch::Receiver<u64>,
}

impl WriteFollower {
    /// A follower reading `bytes`, told of their count by `written`.
    pub fn new(bytes: Arc<dyn WrittenBytes>, written: watch::Receiver<u64>) -> Self {
        WriteFollower { bytes, written }
    }

    /// Bytes `[offset, offset + len)`, which must all be written already.
    pub async fn read_at(&self, offset: u64, len: usize) -> Result<Bytes> {
        self.bytes.read_at(offset, len).await
    }

    /// A watch of the count of bytes written (closed once the writer is
    /// gone, committed or not).
    pub fn written(&self) -> watch::Receiver<u64> {
        self.written.clone()
    }
}

/// Where a [`WriteFollower`] reads a write's bytes (its temporary file, a
/// buffer).
#[async_trait]
pub trait WrittenBytes: Send + Sync {
    /// Bytes `[offset, offset + len)`, all written already.
    async fn read_at(&self, offset: u64, len: usize) -> Result<Bytes>;
}

/// Reads a whole blob into memory. Use only where the size is known to be small
/// (Directory and Tree messages, batch reads).
pub async fn read_to_bytes<S: BlobStore + ?Sized>(
    store: &S,
    ctx: &RequestContext,
    digest: &Digest,
) -> Result<Bytes> {
    let mut stream = store.read(ctx, digest, 0, 0).await?;
    let mut buf = BytesMut::with_capacity(digest.size as usize);
    while let Some(chunk) = stream.next().await {
        buf.extend_from_slice(&chunk?);
    }
    if buf.len() as u64 != digest.size {
        return Err(Error::Internal(format!(
            "blob {digest}: read {} bytes, expected {}",
            buf.len(),
            digest.size
        )));
    }
    Ok(buf.freeze())
}

/// Writes a whole in-memory blob through a [`BlobWriter`].
pub async fn write_bytes<S: BlobStore + ?Sized>(
    store: &S,
    ctx: &RequestContext,
    digest: &Digest,
    data: Bytes,
) -> Result<()> {
    let mut writer = store.begin_write(ctx, digest).await?;
    writer.write(data).await?;
    writer.commit().await
}

/// Key of an action-cache entry: results are per instance name.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct ActionKey {
    /// The REAPI instance name the result was stored under.
    pub instance: String,
    /// The digest of the Action message.
    pub action: Digest,
}

/// The action cache: what every action-cache layer implements.
#[async_trait]
pub trait ActionResultStore: Send + Sync + 'static {
    /// The stored result, or `None`.
    async fn get_action_result(
        &self,
        ctx: &RequestContext,
        key: &ActionKey,
    ) -> Result<Option<ActionResult>>;

    /// Stores `result` (callers strip inlined contents first).
    async fn put_action_result(
        &self,
        ctx: &RequestContext,
        key: &ActionKey,
        result: &ActionResult,
    ) -> Result<()>;

    /// Forgets a result (e.g. because its outputs are gone).
    async fn remove_action_result(&self, ctx: &RequestContext, key: &ActionKey) -> Result<()>;
}
