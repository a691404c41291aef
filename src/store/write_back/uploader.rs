//! The uploader: one background loop that takes work from the queue within
//! the in-flight limits, sends it, and settles each attempt (success: the
//! entry leaves; failure: back to the front, or given up). While attempts
//! fail it backs off (100 ms doubling to 10 s) and sends only flushed
//! blobs, one attempt per flush, so a flush never waits out an outage.

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use futures::stream::FuturesUnordered;
use tokio::time::Instant;
use tonic::Code;

use super::Inner;
use super::state::{Budget, Failure, Work};
use crate::context::RequestContext;
use crate::digest::Digest;
use crate::error::{Error, Result};
use crate::stats::Stats;
use crate::store::replicator::{copy_batch, copy_blob};

/// First pause after a failed attempt; doubles per failure.
const FIRST_BACKOFF: Duration = Duration::from_millis(100);
/// Longest pause between attempts while the upstream fails.
const MAX_BACKOFF: Duration = Duration::from_secs(10);

/// How an attempt ended: per blob, `Ok(true)` sent, `Ok(false)` the
/// upstream had it; or the result's forwarding.
enum Outcome {
    Blobs(Vec<(Digest, Result<bool>)>),
    Result(Result<()>),
}

/// Runs until the queue's background is cancelled.
pub(super) async fn run(inner: Arc<Inner>) {
    let mut running = FuturesUnordered::new();
    let mut budget = Budget::default();
    let mut backoff = FIRST_BACKOFF;
    let mut paused_until: Option<Instant> = None;
    loop {
        let now = Instant::now();
        let paused = paused_until.is_some_and(|until| now < until);
        let taken = inner.state().take_work(&mut budget, paused);
        for work in taken {
            let inner = inner.clone();
            running.push(async move {
                let outcome = attempt(&inner, &work).await;
                (work, outcome)
            });
        }
        tokio::select! {
            Some((work, outcome)) = running.next(), if !running.is_empty() => {
                budget.release(&work);
                let (succeeded, failed) = inner.settle(work, outcome);
                let now = Instant::now();
                // Several units failing together (one outage) double once.
                let pausing = paused_until.is_some_and(|until| now < until);
                if failed && !pausing {
                    paused_until = Some(now + backoff);
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                } else if succeeded && !failed {
                    backoff = FIRST_BACKOFF;
                }
            }
            _ = inner.wake.notified() => {}
            _ = tokio::time::sleep_until(paused_until.unwrap_or(now)), if paused => {}
        }
    }
}

/// Sends one unit of work.
async fn attempt(inner: &Inner, work: &Work) -> Outcome {
    match work {
        Work::Small {
            instance, digests, ..
        } => {
            let ctx = RequestContext::for_instance(instance.clone());
            let (known, send): (Vec<Digest>, Vec<Digest>) =
                digests.iter().partition(|d| inner.existence.knows(&ctx, d));
            let sent = if send.is_empty() {
                Vec::new()
            } else {
                copy_batch(&inner.local, &*inner.upstream, &ctx, &send).await
            };
            let mut out: Vec<(Digest, Result<bool>)> =
                known.into_iter().map(|d| (d, Ok(false))).collect();
            out.extend(
                send.into_iter()
                    .zip(sent.into_iter().map(|r| r.map(|()| true))),
            );
            Outcome::Blobs(out)
        }
        Work::Large { instance, digest } => {
            let ctx = RequestContext::for_instance(instance.clone());
            Outcome::Blobs(vec![(*digest, send_large(inner, &ctx, digest).await)])
        }
        Work::Result { key, result, .. } => {
            let ctx = RequestContext::for_instance(key.instance.clone());
            Outcome::Result(
                inner
                    .upstream_results
                    .put_action_result(&ctx, key, result)
                    .await,
            )
        }
    }
}

/// Streams a large blob up, unless the upstream is known to hold it or
/// says so when asked (one small call saves a large transfer).
async fn send_large(inner: &Inner, ctx: &RequestContext, digest: &Digest) -> Result<bool> {
    if inner.existence.knows(ctx, digest) {
        return Ok(false);
    }
    if inner
        .upstream
        .find_missing(ctx, &[*digest])
        .await?
        .is_empty()
    {
        return Ok(false);
    }
    copy_blob(&inner.local, &*inner.upstream, ctx, digest).await?;
    Ok(true)
}

/// What a failed attempt means: a blob gone from the local store cannot
/// be sent; a refusal that says the request itself is wrong will not
/// change by retrying; anything else (UNAVAILABLE, timeouts, the upstream
/// overloaded or failing inside) is retried for as long as it takes.
pub(super) fn failure(error: &Error, lost: bool) -> Failure {
    if lost {
        return Failure::Lost;
    }
    match error.code() {
        Code::InvalidArgument
        | Code::FailedPrecondition
        | Code::PermissionDenied
        | Code::OutOfRange
        | Code::Unimplemented
        | Code::NotFound
        | Code::DataLoss => Failure::Refused,
        _ => Failure::Transient,
    }
}

impl Inner {
    /// Applies an attempt's outcome; returns (any success, any failure).
    fn settle(&self, work: Work, outcome: Outcome) -> (bool, bool) {
        match (work, outcome) {
            (
                Work::Result {
                    key, generation, ..
                },
                Outcome::Result(result),
            ) => {
                let failed = result.as_ref().err().map(|e| failure(e, false));
                let refused = failed.map(|f| f != Failure::Transient);
                let gave_up = {
                    let _io = self.results_io();
                    let mut state = self.state();
                    let (record, gave_up) = state.result_settled(&key, generation, refused);
                    self.publish(&state);
                    drop(state);
                    self.delete_records(record.as_slice());
                    gave_up
                };
                match &result {
                    Ok(()) => Stats::add(&self.stats.write_back_results_forwarded, 1),
                    Err(e) if gave_up => {
                        Stats::add(&self.stats.write_back_failed, 1);
                        tracing::warn!(
                            "gave up forwarding the action result {} (instance {:?}): {e}",
                            key.action,
                            key.instance
                        );
                    }
                    Err(e) => {
                        Stats::add(&self.stats.write_back_retries, 1);
                        tracing::debug!("forwarding action result {}: {e}; will retry", key.action);
                    }
                }
                self.progress.notify_waiters();
                (result.is_ok(), result.is_err())
            }
            (
                Work::Small { instance, .. } | Work::Large { instance, .. },
                Outcome::Blobs(blobs),
            ) => self.settle_blobs(&instance, blobs),
            (work, _) => {
                tracing::error!("upload outcome does not match its work: {work:?}");
                (false, true)
            }
        }
    }

    fn settle_blobs(&self, instance: &str, blobs: Vec<(Digest, Result<bool>)>) -> (bool, bool) {
        // Whether each failed blob is still stored, asked before any lock.
        let failures: Vec<Option<Failure>> = blobs
            .iter()
            .map(|(d, r)| {
                let e = r.as_ref().err()?;
                Some(failure(e, self.local.pin_blob(d).is_none()))
            })
            .collect();
        let may_give_up = failures
            .iter()
            .any(|f| f.is_some_and(|f| f != Failure::Transient));
        let _io = may_give_up.then(|| self.results_io());
        let mut state = self.state();
        let mut delete = Vec::new();
        let (mut succeeded, mut failed) = (false, false);
        for ((digest, result), failure) in blobs.into_iter().zip(failures) {
            match (result, failure) {
                (Ok(sent), _) => {
                    succeeded = true;
                    delete.extend(state.blob_done(instance, &digest));
                    if sent {
                        Stats::add(&self.stats.write_back_uploaded, 1);
                        Stats::add(&self.stats.write_back_uploaded_bytes, digest.size);
                    } else {
                        Stats::add(&self.stats.write_back_skipped, 1);
                    }
                }
                (Err(e), failure) => {
                    failed = true;
                    let failure = failure.unwrap_or(Failure::Transient);
                    let settled = state.blob_failed(instance, &digest, &e, failure);
                    if settled.given_up.is_empty() {
                        Stats::add(&self.stats.write_back_retries, 1);
                        tracing::debug!(
                            "uploading {digest} (instance {instance:?}): {e}; will retry"
                        );
                    }
                    Stats::add(&self.stats.write_back_failed, settled.given_up.len() as u64);
                    for what in &settled.given_up {
                        tracing::warn!("gave up uploading {what}: {e}");
                    }
                    delete.extend(settled.delete);
                }
            }
        }
        self.publish(&state);
        drop(state);
        self.delete_records(&delete);
        self.progress.notify_waiters();
        (succeeded, failed)
    }
}
