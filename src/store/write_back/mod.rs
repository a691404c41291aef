//! Write-back: a client's verified write is acknowledged once it is stored
//! locally, and a durable queue uploads it to the upstream in the
//! background, so the client never waits for the WAN on an upload.
//!
//! The queue lives in the local store's RocksDB (column family `uploads`),
//! so it survives `kill -9` and a restart resumes it. Its promises, which
//! the proxy layers above build on:
//!
//! - **Nothing queued is lost.** A queued blob is pinned in the local store
//!   (eviction skips it) until the upstream has it; the pins are rebuilt at
//!   start-up from the queue.
//! - **Results after their outputs.** A queued action result is forwarded
//!   upstream only after every blob it names that was still queued is up,
//!   so no other client ever sees a result whose outputs are missing.
//! - **Flush on demand.** [`UploadQueue::flush`] moves blobs to the front
//!   and waits for them (an Execute's inputs, a Remote Asset Push's content).
//! - **Bounded.** At most `max_bytes` of blobs wait; when full, writes go
//!   through to the upstream as before ([`Enqueued::Full`]). Uploads are
//!   batched, bounded in bytes and calls in flight, skip blobs the
//!   existence cache knows the upstream holds, and retry with backoff while
//!   the upstream is down.
//!
//! Queued uploads are sent with Outpost's own upstream credentials (the
//! configured headers) and the client's instance name, never with the
//! client's forwarded headers: those are never written to disk.

mod writes;

pub use self::writes::WriteBack;

use std::sync::Arc;
use std::time::Duration;

use bazel_remote_apis::build::bazel::remote::execution::v2::ActionResult;

use crate::context::RequestContext;
use crate::digest::Digest;
use crate::error::Result;
use crate::stats::Stats;
use crate::store::existence_cache::ExistenceCache;
use crate::store::local::LocalStore;
use crate::store::{ActionKey, ActionResultStore, BlobStore};
use crate::tasks::Background;

/// What the queue needs: where blobs are read, where they go, what the
/// upstream is known to hold.
pub struct UploadQueueDeps {
    /// Where queued blobs are stored (and pinned), and where the queue's
    /// records live (its RocksDB).
    pub local: LocalStore,
    /// The upstream CAS, behind the existence cache (which learns each
    /// upload).
    pub upstream: Arc<dyn BlobStore>,
    /// The upstream action cache, for queued action results.
    pub upstream_results: Arc<dyn ActionResultStore>,
    /// What the upstream is known to hold: such blobs are not sent.
    pub existence: Arc<ExistenceCache>,
    /// Most bytes of blobs waiting; beyond it, [`Enqueued::Full`].
    pub max_bytes: u64,
    /// Counters and gauges (`write_back_*`).
    pub stats: Arc<Stats>,
    /// Where the uploader runs (cancelled at shutdown, after
    /// [`UploadQueue::drain`]).
    pub background: Background,
}

/// What became of a blob offered to the queue.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Enqueued {
    /// Queued (and pinned): it will be uploaded.
    Queued,
    /// Already waiting in the queue for this instance name.
    AlreadyQueued,
    /// The existence cache knows the upstream holds it: nothing to do.
    KnownUpstream,
    /// The queue is at its byte cap: the caller sends it up itself.
    Full,
}

/// How much is waiting, for stats and the shutdown report.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct QueueState {
    /// Blobs waiting.
    pub blobs: u64,
    /// Their bytes.
    pub bytes: u64,
    /// Action results waiting for their blobs.
    pub results: u64,
    /// Age of the oldest entry.
    pub oldest: Duration,
}

impl QueueState {
    /// Nothing is waiting.
    pub fn is_empty(&self) -> bool {
        self.blobs == 0 && self.results == 0
    }
}

/// The durable upload queue and its uploader.
pub struct UploadQueue {
    _private: (),
}

impl UploadQueue {
    /// Opens the queue from the local store (pinning every queued blob; an
    /// entry whose blob is gone is dropped, logged and counted) and starts
    /// the uploader on `deps.background`.
    pub fn start(deps: UploadQueueDeps) -> Result<Arc<Self>> {
        let _ = deps;
        todo!("r11/queue")
    }

    /// Whether a blob of `bytes` would fit under the byte cap now (checked
    /// before a write starts; [`UploadQueue::enqueue_blobs`] decides).
    pub fn has_room(&self, bytes: u64) -> bool {
        let _ = bytes;
        todo!("r11/queue")
    }

    /// Offers blobs already committed to the local store, for the
    /// instance name of `ctx`. One answer per digest, in order. Fails only
    /// when the queue cannot be written (RocksDB).
    pub fn enqueue_blobs(&self, ctx: &RequestContext, digests: &[Digest]) -> Result<Vec<Enqueued>> {
        let _ = (ctx, digests);
        todo!("r11/queue")
    }

    /// Queues an action result (already stripped and stored locally) to be
    /// forwarded upstream once every digest of `after` still queued for
    /// this instance name is uploaded (at once if none is). A later result
    /// for the same key replaces a waiting one.
    pub fn enqueue_action_result(
        &self,
        ctx: &RequestContext,
        key: &ActionKey,
        result: &ActionResult,
        after: &[Digest],
    ) -> Result<()> {
        let _ = (ctx, key, result, after);
        todo!("r11/queue")
    }

    /// Which of `digests` wait in the queue for the instance name of `ctx`.
    pub fn queued(&self, ctx: &RequestContext, digests: &[Digest]) -> Vec<bool> {
        let _ = (ctx, digests);
        todo!("r11/queue")
    }

    /// Nothing is waiting (lets callers skip work on the common path).
    pub fn is_empty(&self) -> bool {
        todo!("r11/queue")
    }

    /// Uploads those of `digests` still queued for `ctx`'s instance name
    /// ahead of everything else and waits until they are up. Fails with
    /// the upload's error when an attempt at one of them fails (it stays
    /// queued and is retried), so a caller never waits out an outage.
    pub async fn flush(&self, ctx: &RequestContext, digests: &[Digest]) -> Result<()> {
        let _ = (ctx, digests);
        todo!("r11/queue")
    }

    /// For a graceful stop: keeps uploading until the queue is empty or
    /// `within` has passed, and returns what is left (resumed at the next
    /// start).
    pub async fn drain(&self, within: Duration) -> QueueState {
        let _ = within;
        todo!("r11/queue")
    }

    /// What is waiting now.
    pub fn state(&self) -> QueueState {
        todo!("r11/queue")
    }
}
