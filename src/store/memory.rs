//! An in-memory [`BlobStore`] that counts its calls, for unit tests of the
//! decorators (existence cache, proxy) without a network. Its reads can
//! come in chunks held back by a gate (a transfer in progress), and its
//! writers can be followed ([`BlobWriter::follow`]).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use futures::{StreamExt, stream};
use tokio::sync::{Semaphore, watch};

use crate::context::RequestContext;
use crate::digest::{Digest, verify};
use crate::error::{Error, Result};
use crate::store::{BlobStore, BlobWriter, ChunkStream, WriteFollower, WrittenBytes};

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
    /// Bytes per chunk of a `read` stream (0: the whole range in one).
    pub read_chunk: AtomicUsize,
    /// When set, each chunk of a `read` stream after the first waits for a
    /// permit of this semaphore: a test lets a transfer go on step by step
    /// (or, closing it, breaks the transfer).
    pub read_gate: Mutex<Option<Arc<Semaphore>>>,
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
        let chunk = match self.read_chunk.load(Ordering::SeqCst) {
            0 => slice.len().max(1),
            n => n,
        };
        let gate = self.read_gate.lock().unwrap().clone();
        let chunks: Vec<Bytes> = (0..slice.len().max(1))
            .step_by(chunk)
            .map(|at| slice.slice(at..(at + chunk).min(slice.len())))
            .collect();
        let gated = chunks.into_iter().enumerate().map(move |(i, c)| {
            let gate = gate.clone().filter(|_| i > 0);
            async move {
                if let Some(gate) = gate {
                    // A closed gate breaks the transfer.
                    let permit = gate
                        .acquire()
                        .await
                        .map_err(|_| Error::Unavailable("memory store: the read broke".into()))?;
                    permit.forget();
                }
                Ok(c)
            }
        });
        Ok(Box::pin(stream::iter(gated).then(|c| c)))
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
            buf: Arc::default(),
            written: watch::Sender::new(0),
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
    /// The bytes so far, shared with followers.
    buf: Arc<Mutex<Vec<u8>>>,
    /// Their count, for followers.
    written: watch::Sender<u64>,
}

#[async_trait]
impl BlobWriter for MemoryWriter {
    async fn write(&mut self, data: Bytes) -> Result<()> {
        let len = {
            let mut buf = self.buf.lock().unwrap();
            buf.extend_from_slice(&data);
            buf.len()
        };
        self.written.send_replace(len as u64);
        Ok(())
    }

    fn committed_size(&self) -> u64 {
        self.buf.lock().unwrap().len() as u64
    }

    async fn commit(self: Box<Self>) -> Result<()> {
        let data = Bytes::copy_from_slice(&self.buf.lock().unwrap());
        verify(&self.digest, &Digest::of(self.digest.function, &data))?;
        self.blobs.lock().unwrap().insert(self.digest, data);
        Ok(())
    }

    fn follow(&self) -> Option<WriteFollower> {
        let bytes = Arc::new(MemoryBytes(self.buf.clone()));
        Some(WriteFollower::new(bytes, self.written.subscribe()))
    }
}

/// A memory writer's buffer, read by its followers.
struct MemoryBytes(Arc<Mutex<Vec<u8>>>);

#[async_trait]
impl WrittenBytes for MemoryBytes {
    async fn read_at(&self, offset: u64, len: usize) -> Result<Bytes> {
        let buf = self.0.lock().unwrap();
        let at = offset as usize;
        match buf.get(at..at + len) {
            Some(bytes) => Ok(Bytes::copy_from_slice(bytes)),
            None => Err(Error::Internal(format!(
                "read of {len} bytes at {offset}: only {} written",
                buf.len()
            ))),
        }
    }
}

/// Deterministic test content: `len` bytes that depend on `seed`, so
/// decorator tests over this store can tell blobs apart.
pub fn blob(len: usize, seed: u8) -> Bytes {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}
