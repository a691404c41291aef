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
//!
//! - [`records`]: the byte layout of the durable records.
//! - [`state`]: the queue in memory (entries, pins, order, waiters).
//! - [`uploader`]: the background loop that sends and settles.
//! - [`writes`]: the proxy's write path in write-back mode ([`WriteBack`]).
//! - this file: the facade, which writes records before it answers.

mod records;
mod state;
#[cfg(test)]
mod tests;
mod uploader;
mod writes;

pub use self::writes::WriteBack;

use std::collections::HashSet;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bazel_remote_apis::build::bazel::remote::execution::v2::ActionResult;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use self::records::Record;
use self::state::State;
use crate::context::RequestContext;
use crate::digest::Digest;
use crate::error::{Error, Result};
use crate::stats::Stats;
use crate::store::existence_cache::ExistenceCache;
use crate::store::local::LocalStore;
use crate::store::{ActionKey, ActionResultStore, BlobStore};
use crate::tasks::Background;

/// How often the oldest-entry gauge is refreshed.
const AGE_TICK: Duration = Duration::from_secs(1);

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
    /// The existence cache knows the upstream holds it (or it is the empty
    /// blob): nothing to do.
    KnownUpstream,
    /// The queue is at its byte cap (or the blob is no longer in the local
    /// store to be pinned): the caller sends it up itself.
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
    /// Shared with the uploader and the age ticker.
    inner: Arc<Inner>,
}

/// The queue's dependencies and state, shared with its background tasks.
struct Inner {
    local: LocalStore,
    upstream: Arc<dyn BlobStore>,
    upstream_results: Arc<dyn ActionResultStore>,
    existence: Arc<ExistenceCache>,
    max_bytes: u64,
    stats: Arc<Stats>,
    /// Entries, order, pins and waiters.
    state: Mutex<State>,
    /// Held around every write or deletion of a result's record together
    /// with the state change it goes with (lock order: this, then
    /// `state`), so a replaced result's record is never deleted by the
    /// settling of the one it replaced.
    results_io: Mutex<()>,
    /// Wakes the uploader: new work, a flush.
    wake: Notify,
    /// Tells drains that an attempt was settled.
    progress: Notify,
    /// Cancelled at shutdown: flushes stop waiting.
    stopping: CancellationToken,
}

/// Now, as unix milliseconds (what records keep, so ages survive a restart).
fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

impl Inner {
    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn results_io(&self) -> MutexGuard<'_, ()> {
        self.results_io.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Sets the gauges from `state`.
    fn publish(&self, state: &State) {
        let (blobs, bytes, results) = state.totals();
        let age = state
            .oldest()
            .map_or(0, |since| now_ms().saturating_sub(since) / 1000);
        let stats = &self.stats;
        for (gauge, value) in [
            (&stats.write_back_queued_blobs, blobs),
            (&stats.write_back_queued_bytes, bytes),
            (&stats.write_back_queued_results, results),
            (&stats.write_back_oldest_age_seconds, age),
        ] {
            gauge.store(value, Ordering::Relaxed);
        }
    }

    /// Deletes records of entries that left; a failure only means they
    /// are sent again after a restart.
    fn delete_records(&self, keys: &[Vec<u8>]) {
        if keys.is_empty() {
            return;
        }
        if let Err(e) = self.local.delete_queue_records(keys) {
            tracing::warn!("cannot delete {} upload queue records: {e}", keys.len());
        }
    }

    /// Rebuilds the state from the records: blobs re-pinned (one no longer
    /// stored is given up, with the results that waited for it), results
    /// behind their blobs still queued.
    fn load(&self) -> Result<()> {
        let mut state = self.state();
        let mut delete = Vec::new();
        let mut lost = HashSet::new();
        let mut results = Vec::new();
        for (key, value) in self.local.queue_records()? {
            match records::parse(&key, &value) {
                Err(why) => {
                    tracing::warn!("dropping an unreadable upload queue record: {why}");
                    delete.push(key);
                }
                Ok(Record::Blob {
                    instance,
                    digest,
                    since,
                }) => match self.local.pin_blob(&digest) {
                    Some(pin) => {
                        state.add_pending(&instance, digest, since, pin);
                        state.activate(&instance, &digest);
                    }
                    None => {
                        tracing::warn!(
                            "gave up uploading blob {digest} (instance {instance:?}): it is no longer in the local store"
                        );
                        Stats::add(&self.stats.write_back_failed, 1);
                        lost.insert((instance, digest));
                        delete.push(key);
                    }
                },
                Ok(Record::Result {
                    key: action,
                    since,
                    after,
                    result,
                }) => results.push((key, action, since, after, result)),
            }
        }
        for (record, key, since, after, result) in results {
            if let Some(gone) = after
                .iter()
                .find(|d| lost.contains(&(key.instance.clone(), **d)))
            {
                tracing::warn!(
                    "gave up forwarding action result {} (instance {:?}): its output {gone} is lost",
                    key.action,
                    key.instance
                );
                Stats::add(&self.stats.write_back_failed, 1);
                delete.push(record);
                continue;
            }
            state.add_result(key, *result, &after, since);
        }
        let (blobs, bytes, results) = state.totals();
        if blobs + results > 0 {
            tracing::info!(
                blobs,
                bytes,
                results,
                "resuming the write-back upload queue"
            );
        }
        self.publish(&state);
        drop(state);
        self.delete_records(&delete);
        Ok(())
    }
}

impl UploadQueue {
    /// Opens the queue from the local store (pinning every queued blob; an
    /// entry whose blob is gone is dropped, logged and counted) and starts
    /// the uploader on `deps.background`.
    pub fn start(deps: UploadQueueDeps) -> Result<Arc<Self>> {
        let inner = Arc::new(Inner {
            local: deps.local,
            upstream: deps.upstream,
            upstream_results: deps.upstream_results,
            existence: deps.existence,
            max_bytes: deps.max_bytes,
            stats: deps.stats,
            state: Mutex::new(State::default()),
            results_io: Mutex::new(()),
            wake: Notify::new(),
            progress: Notify::new(),
            stopping: deps.background.cancelled_token(),
        });
        inner.load()?;
        deps.background.spawn(uploader::run(inner.clone()));
        let ticker = inner.clone();
        deps.background.spawn(async move {
            let mut tick = tokio::time::interval(AGE_TICK);
            loop {
                tick.tick().await;
                ticker.publish(&ticker.state());
            }
        });
        Ok(Arc::new(UploadQueue { inner }))
    }

    /// Whether a blob of `bytes` would fit under the byte cap now (checked
    /// before a write starts; [`UploadQueue::enqueue_blobs`] decides).
    pub fn has_room(&self, bytes: u64) -> bool {
        self.inner.state().totals().1 + bytes <= self.inner.max_bytes
    }

    /// Offers blobs already committed to the local store, for the
    /// instance name of `ctx`. One answer per digest, in order. Fails only
    /// when the queue cannot be written (RocksDB).
    pub fn enqueue_blobs(&self, ctx: &RequestContext, digests: &[Digest]) -> Result<Vec<Enqueued>> {
        let inner = &self.inner;
        let instance = ctx.instance.as_str();
        let since = now_ms();
        // Pinned before the lock (the index has its own); unused pins drop.
        let pins: Vec<_> = digests
            .iter()
            .map(|d| {
                (!d.is_empty_blob())
                    .then(|| inner.local.pin_blob(d))
                    .flatten()
            })
            .collect();
        let mut answers = Vec::with_capacity(digests.len());
        let mut fresh = Vec::new();
        {
            let mut state = inner.state();
            for (digest, pin) in digests.iter().zip(pins) {
                let answer = if digest.is_empty_blob() {
                    Enqueued::KnownUpstream
                } else if state.contains(instance, digest) {
                    Enqueued::AlreadyQueued
                } else if inner.existence.knows(ctx, digest) {
                    Enqueued::KnownUpstream
                } else if state.totals().1 + digest.size > inner.max_bytes {
                    Enqueued::Full
                } else if let Some(pin) = pin {
                    state.add_pending(instance, *digest, since, pin);
                    fresh.push(*digest);
                    Enqueued::Queued
                } else {
                    tracing::debug!("blob {digest} left the local store before it was queued");
                    Enqueued::Full
                };
                answers.push(answer);
            }
        }
        if fresh.is_empty() {
            return Ok(answers);
        }
        let records: Vec<(Vec<u8>, Vec<u8>)> = fresh
            .iter()
            .map(|d| (records::blob_key(instance, d), records::blob_value(since)))
            .collect();
        let written = inner.local.put_queue_records(&records);
        let mut state = inner.state();
        for digest in &fresh {
            match &written {
                Ok(()) => state.activate(instance, digest),
                Err(e) => state.abandon(instance, digest, e),
            }
        }
        inner.publish(&state);
        drop(state);
        written?;
        Stats::add(&inner.stats.write_back_queued, fresh.len() as u64);
        inner.wake.notify_one();
        Ok(answers)
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
        let inner = &self.inner;
        let key = ActionKey {
            instance: ctx.instance.clone(),
            action: key.action,
        };
        let since = now_ms();
        let _io = inner.results_io();
        let queued: Vec<Digest> = {
            let state = inner.state();
            let mut seen = HashSet::new();
            after
                .iter()
                .filter(|d| state.contains(&key.instance, d) && seen.insert(**d))
                .copied()
                .collect()
        };
        let record = (
            records::result_key(&key),
            records::result_value(since, &queued, result),
        );
        inner.local.put_queue_records(&[record])?;
        let mut state = inner.state();
        state.add_result(key, result.clone(), &queued, since);
        inner.publish(&state);
        drop(state);
        inner.wake.notify_one();
        Ok(())
    }

    /// Which of `digests` wait in the queue for the instance name of `ctx`.
    pub fn queued(&self, ctx: &RequestContext, digests: &[Digest]) -> Vec<bool> {
        let state = self.inner.state();
        digests
            .iter()
            .map(|d| state.contains(&ctx.instance, d))
            .collect()
    }

    /// Nothing is waiting (lets callers skip work on the common path).
    pub fn is_empty(&self) -> bool {
        let (blobs, _, results) = self.inner.state().totals();
        blobs + results == 0
    }

    /// Uploads those of `digests` still queued for `ctx`'s instance name
    /// ahead of everything else and waits until they are up. Fails with
    /// the upload's error when an attempt at one of them fails (it stays
    /// queued and is retried), so a caller never waits out an outage.
    pub async fn flush(&self, ctx: &RequestContext, digests: &[Digest]) -> Result<()> {
        let waits: Vec<_> = {
            let mut state = self.inner.state();
            digests
                .iter()
                .filter_map(|d| state.flush(&ctx.instance, d))
                .collect()
        };
        if waits.is_empty() {
            return Ok(());
        }
        self.inner.wake.notify_one();
        for wait in waits {
            tokio::select! {
                answer = wait => match answer {
                    Ok(result) => result?,
                    Err(_) => return Err(stopped()),
                },
                _ = self.inner.stopping.cancelled() => return Err(stopped()),
            }
        }
        Ok(())
    }

    /// For a graceful stop: keeps uploading until the queue is empty or
    /// `within` has passed, and returns what is left (resumed at the next
    /// start).
    pub async fn drain(&self, within: Duration) -> QueueState {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            let settled = self.inner.progress.notified();
            tokio::pin!(settled);
            settled.as_mut().enable();
            if self.is_empty() {
                break;
            }
            if tokio::time::timeout_at(deadline, settled).await.is_err() {
                break;
            }
        }
        self.state()
    }

    /// What is waiting now.
    pub fn state(&self) -> QueueState {
        let state = self.inner.state();
        let (blobs, bytes, results) = state.totals();
        let oldest = state.oldest().map_or(Duration::ZERO, |since| {
            Duration::from_millis(now_ms().saturating_sub(since))
        });
        QueueState {
            blobs,
            bytes,
            results,
            oldest,
        }
    }
}

/// A flush cut short by shutdown (or a queue that went away).
fn stopped() -> Error {
    Error::Unavailable("the upload queue is stopping; the blobs stay queued".into())
}
