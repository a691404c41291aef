//! The proxy's write path in write-back mode: a write is verified and
//! committed locally, offered to the [`UploadQueue`], and acknowledged; the
//! queue uploads it behind the client's back.
//!
//! Whatever the queue cannot take goes the write-through way, so a write
//! never fails for want of queue room: a blob larger than the local store
//! (upstream only), a blob that does not fit under the queue's byte cap
//! when the write starts (a tee, [`WriteThrough`]), or one the queue turns
//! down at commit because others filled it meanwhile (copied up from the
//! local store before the write is acknowledged). Each counts in
//! `write_back_fallbacks`.

use std::sync::Arc;

use async_trait::async_trait;
use bytes::Bytes;

use super::{Enqueued, UploadQueue};
use crate::compression::Compressor;
use crate::context::RequestContext;
use crate::digest::Digest;
use crate::error::Result;
use crate::stats::Stats;
use crate::store::replicator::copy_blob;
use crate::store::write_through::WriteThrough;
use crate::store::{BlobStore, BlobWriter};

/// Writes acknowledged once stored locally, uploaded by the queue.
pub struct WriteBack {
    /// Where the blob is verified and kept until uploaded.
    local: Arc<dyn BlobStore>,
    /// The local store's quota: a larger blob goes to the upstream only.
    local_capacity: u64,
    /// Where a blob the queue cannot take is sent at once.
    upstream: Arc<dyn BlobStore>,
    /// The tee, for writes that start while the queue is full.
    through: WriteThrough,
    /// Uploads what was acknowledged.
    queue: Arc<UploadQueue>,
    /// Counts `write_back_fallbacks`.
    stats: Arc<Stats>,
}

impl WriteBack {
    /// Writes to `local` (holding at most `local_capacity` bytes), queued
    /// for `upstream` through `queue`.
    pub fn new(
        local: Arc<dyn BlobStore>,
        local_capacity: u64,
        upstream: Arc<dyn BlobStore>,
        queue: Arc<UploadQueue>,
        stats: Arc<Stats>,
    ) -> Self {
        WriteBack {
            through: WriteThrough::new(local.clone(), local_capacity, upstream.clone()),
            local,
            local_capacity,
            upstream,
            queue,
            stats,
        }
    }

    /// Starts a write: local and queued when it fits, else a tee.
    pub async fn begin_write(
        &self,
        ctx: &RequestContext,
        digest: &Digest,
    ) -> Result<Box<dyn BlobWriter>> {
        self.begin(ctx, digest, None).await
    }

    /// Starts a write of `compressor`-compressed pieces: the local store
    /// takes them as they are (it decodes only to verify, or keeps them
    /// compressed), and the upload queue later sends what it holds.
    pub async fn begin_write_compressed(
        &self,
        ctx: &RequestContext,
        digest: &Digest,
        compressor: Compressor,
    ) -> Result<Box<dyn BlobWriter>> {
        self.begin(ctx, digest, Some(compressor)).await
    }

    async fn begin(
        &self,
        ctx: &RequestContext,
        digest: &Digest,
        compressor: Option<Compressor>,
    ) -> Result<Box<dyn BlobWriter>> {
        if digest.size > self.local_capacity || !self.queue.has_room(digest.size) {
            Stats::add(&self.stats.write_back_fallbacks, 1);
            return match compressor {
                None => self.through.begin_write(ctx, digest).await,
                Some(c) => self.through.begin_write_compressed(ctx, digest, c).await,
            };
        }
        let local = match compressor {
            None => self.local.begin_write(ctx, digest).await?,
            Some(c) => self.local.begin_write_compressed(ctx, digest, c).await?,
        };
        Ok(Box::new(QueuedWriter {
            ctx: ctx.clone(),
            digest: *digest,
            local,
            local_store: self.local.clone(),
            upstream: self.upstream.clone(),
            queue: self.queue.clone(),
            stats: self.stats.clone(),
        }))
    }

    /// Writes whole blobs: verified and stored locally, the accepted ones
    /// queued; those the queue cannot take go up before the answer.
    pub async fn write_many(
        &self,
        ctx: &RequestContext,
        blobs: Vec<(Digest, Bytes)>,
    ) -> Vec<Result<()>> {
        let mut results = self.local.write_many(ctx, blobs.clone()).await;
        let stored: Vec<usize> = (0..blobs.len()).filter(|&i| results[i].is_ok()).collect();
        let digests: Vec<Digest> = stored.iter().map(|&i| blobs[i].0).collect();
        let answers = match self.queue.enqueue_blobs(ctx, &digests) {
            Ok(answers) => answers,
            Err(e) => {
                tracing::warn!("cannot queue uploads: {e}; writing through");
                vec![Enqueued::Full; digests.len()]
            }
        };
        let mut direct = Vec::new();
        let mut positions = Vec::new();
        for (&i, answer) in stored.iter().zip(answers) {
            if answer == Enqueued::Full {
                positions.push(i);
                direct.push(blobs[i].clone());
            }
        }
        if !direct.is_empty() {
            Stats::add(&self.stats.write_back_fallbacks, direct.len() as u64);
            let uploaded = self.upstream.write_many(ctx, direct).await;
            for (i, r) in positions.into_iter().zip(uploaded) {
                results[i] = r;
            }
        }
        results
    }
}

/// A local write whose commit offers the blob to the queue.
struct QueuedWriter {
    ctx: RequestContext,
    digest: Digest,
    local: Box<dyn BlobWriter>,
    /// Where a blob the queue turns down is copied up from.
    local_store: Arc<dyn BlobStore>,
    upstream: Arc<dyn BlobStore>,
    queue: Arc<UploadQueue>,
    stats: Arc<Stats>,
}

#[async_trait]
impl BlobWriter for QueuedWriter {
    async fn write(&mut self, data: Bytes) -> Result<()> {
        self.local.write(data).await
    }

    fn committed_size(&self) -> u64 {
        self.local.committed_size()
    }

    fn park(&mut self) -> bool {
        self.local.park()
    }

    async fn commit(self: Box<Self>) -> Result<()> {
        let QueuedWriter {
            ctx,
            digest,
            local,
            local_store,
            upstream,
            queue,
            stats,
        } = *self;
        local.commit().await?;
        let answer = match queue.enqueue_blobs(&ctx, std::slice::from_ref(&digest)) {
            Ok(mut answers) => answers.pop().unwrap_or(Enqueued::Full),
            Err(e) => {
                tracing::warn!("cannot queue the upload of {digest}: {e}; writing through");
                Enqueued::Full
            }
        };
        if answer != Enqueued::Full {
            return Ok(());
        }
        Stats::add(&stats.write_back_fallbacks, 1);
        copy_blob(&*local_store, &*upstream, &ctx, &digest).await
    }
}
