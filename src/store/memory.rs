//! An in-memory [`BlobStore`] that counts its calls, for unit tests of the
//! decorators (existence cache, proxy) without a network.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use bytes::{Bytes, BytesMut};
use futures::stream;

use crate::context::RequestContext;
use crate::digest::{Digest, verify};
use crate::error::{Error, Result};
use crate::store::{BlobStore, BlobWriter, ChunkStream};

/// Blobs in a HashMap, with call counters and an optional delay per call.
#[derive(Default)]
pub struct MemoryStore {
    /// The blobs.
    pub blobs: Arc<Mutex<HashMap<Digest, Bytes>>>,
    /// `find_missing` calls and digests asked about.
    pub find_missing_calls: AtomicU64,
    /// Digests asked about in `find_missing`.
    pub find_missing_digests: AtomicU64,
    /// `read` calls.
    pub reads: AtomicU64,
    /// `read_many` calls.
    pub read_many_calls: AtomicU64,
    /// When set, every call fails UNAVAILABLE.
    pub down: std::sync::atomic::AtomicBool,
    /// Delay added to reads and existence checks.
    pub read_delay: Mutex<Duration>,
}

impl MemoryStore {
    /// Adds a blob directly.
    pub fn insert(&self, data: &[u8]) -> Digest {
        let d = Digest::of(crate::digest::DigestFunction::Sha256, data);
        self.blobs
            .lock()
            .unwrap()
            .insert(d, Bytes::copy_from_slice(data));
        d
    }

    /// Whether the store holds `d`.
    pub fn has(&self, d: &Digest) -> bool {
        self.blobs.lock().unwrap().contains_key(d)
    }

    fn check_up(&self) -> Result<()> {
        if self.down.load(Ordering::SeqCst) {
            return Err(Error::Unavailable("memory store is down".into()));
        }
        Ok(())
    }

    async fn delay(&self) {
        let d = *self.read_delay.lock().unwrap();
        if !d.is_zero() {
            tokio::time::sleep(d).await;
        }
    }
}

/// Counter value helper for tests.
pub fn count(c: &AtomicU64) -> u64 {
    c.load(Ordering::SeqCst)
}

#[async_trait]
impl BlobStore for MemoryStore {
    async fn find_missing(&self, _ctx: &RequestContext, digests: &[Digest]) -> Result<Vec<Digest>> {
        self.check_up()?;
        self.find_missing_calls.fetch_add(1, Ordering::SeqCst);
        self.find_missing_digests
            .fetch_add(digests.len() as u64, Ordering::SeqCst);
        self.delay().await;
        let blobs = self.blobs.lock().unwrap();
        Ok(digests
            .iter()
            .filter(|d| !d.is_empty_blob() && !blobs.contains_key(d))
            .copied()
            .collect())
    }

    async fn read(
        &self,
        _ctx: &RequestContext,
        digest: &Digest,
        offset: u64,
        limit: u64,
    ) -> Result<ChunkStream> {
        self.check_up()?;
        self.reads.fetch_add(1, Ordering::SeqCst);
        self.delay().await;
        let data = self
            .blobs
            .lock()
            .unwrap()
            .get(digest)
            .cloned()
            .ok_or_else(|| Error::NotFound(format!("{digest}")))?;
        let end = if limit == 0 {
            data.len()
        } else {
            (offset + limit).min(data.len() as u64) as usize
        };
        let slice = data.slice(offset as usize..end);
        Ok(Box::pin(stream::iter([Ok(slice)])))
    }

    async fn begin_write(
        &self,
        _ctx: &RequestContext,
        digest: &Digest,
    ) -> Result<Box<dyn BlobWriter>> {
        self.check_up()?;
        Ok(Box::new(MemoryWriter {
            blobs: self.blobs.clone(),
            digest: *digest,
            buf: BytesMut::new(),
        }))
    }

    async fn read_many(&self, ctx: &RequestContext, digests: &[Digest]) -> Vec<Result<Bytes>> {
        self.read_many_calls.fetch_add(1, Ordering::SeqCst);
        let mut out = Vec::new();
        for d in digests {
            out.push(crate::store::read_to_bytes(self, ctx, d).await);
        }
        out
    }
}

struct MemoryWriter {
    blobs: Arc<Mutex<HashMap<Digest, Bytes>>>,
    digest: Digest,
    buf: BytesMut,
}

#[async_trait]
impl BlobWriter for MemoryWriter {
    async fn write(&mut self, data: Bytes) -> Result<()> {
        self.buf.extend_from_slice(&data);
        Ok(())
    }

    fn committed_size(&self) -> u64 {
        self.buf.len() as u64
    }

    async fn commit(self: Box<Self>) -> Result<()> {
        verify(&self.digest, &Digest::of(self.digest.function, &self.buf))?;
        self.blobs
            .lock()
            .unwrap()
            .insert(self.digest, self.buf.freeze());
        Ok(())
    }
}

/// Deterministic test content: `len` bytes that depend on `seed`, so
/// decorator tests over this store can tell blobs apart.
pub fn blob(len: usize, seed: u8) -> Bytes {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}
