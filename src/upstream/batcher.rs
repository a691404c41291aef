//! Group commit: concurrent requests for the upstream are merged into as few
//! calls as possible, without a timer.
//!
//! When the upstream is idle, a request goes out at once. While calls are in
//! flight (up to `max_in_flight`), new requests queue, and the next call takes
//! everything queued (within `max_items` and `max_weight`). So under load
//! calls grow, and at rest nothing waits.
//!
//! A batcher that receives nothing for [`Limits::idle`] retires: it stops
//! taking requests, finishes the ones it has, and its task ends (see
//! [`Batcher::is_retired`]). Shutdown retires it the same way.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{Semaphore, mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use crate::context::RequestContext;
use crate::error::{Error, Result};
use crate::tasks::Background;

/// Size limits of one merged call, and how long a batcher lives unused.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// Most items in one call.
    pub max_items: usize,
    /// Most total weight (e.g. bytes) in one call.
    pub max_weight: u64,
    /// Calls in flight at once.
    pub max_in_flight: usize,
    /// How long the batcher waits for a request before it retires, so that
    /// batchers made per key do not pile up when keys stop being used.
    pub idle: Duration,
}

struct Job<T, R> {
    ctx: RequestContext,
    items: Vec<T>,
    weight: u64,
    reply: oneshot::Sender<Result<Vec<R>>>,
}

/// Merges submitted item lists into calls of `flush`, and splits the
/// results back, in order.
pub struct Batcher<T, R> {
    tx: mpsc::UnboundedSender<Job<T, R>>,
    weigh: fn(&T) -> u64,
}

impl<T: Send + 'static, R: Send + 'static> Batcher<T, R> {
    /// Starts the batcher's worker in `background`. `flush(ctx, items)`
    /// performs one call and returns one result per item; `ctx` is the first
    /// merged request's.
    pub fn new<F, Fut>(
        limits: Limits,
        weigh: fn(&T) -> u64,
        flush: F,
        background: &Background,
    ) -> Self
    where
        F: Fn(RequestContext, Vec<T>) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<Vec<R>>> + Send + 'static,
    {
        let (tx, rx) = mpsc::unbounded_channel();
        // Not cancelled outright: at shutdown the worker stops taking
        // requests but still answers the ones already queued.
        background.spawn_uncancelled(run(rx, limits, Arc::new(flush), background.clone()));
        Batcher { tx, weigh }
    }

    /// Submits items and waits for their results (the batcher's own tests;
    /// callers go through `KeyedBatchers::submit`, which replaces a retired
    /// batcher instead of failing).
    #[cfg(test)]
    pub async fn submit(&self, ctx: &RequestContext, items: Vec<T>) -> Result<Vec<R>> {
        if items.is_empty() {
            return Ok(Vec::new());
        }
        self.enqueue(ctx, items)
            .map_err(|_| Error::Internal("batcher stopped".into()))?
            .wait()
            .await
    }

    /// Queues items without waiting for them. A retired batcher hands the
    /// items back, so the caller can give them to a fresh one.
    pub fn enqueue(
        &self,
        ctx: &RequestContext,
        items: Vec<T>,
    ) -> std::result::Result<Pending<R>, Vec<T>> {
        let weight = items.iter().map(self.weigh).sum();
        let (reply, rx) = oneshot::channel();
        let job = Job {
            ctx: ctx.clone(),
            items,
            weight,
            reply,
        };
        self.tx.send(job).map_err(|refused| refused.0.items)?;
        Ok(Pending(rx))
    }

    /// Whether the worker has stopped taking requests (idle, or shutdown).
    pub fn is_retired(&self) -> bool {
        self.tx.is_closed()
    }
}

/// The results of queued items, once the call that carries them is done.
pub struct Pending<R>(oneshot::Receiver<Result<Vec<R>>>);

impl<R> Pending<R> {
    /// Waits for the results, one per queued item, in order.
    pub async fn wait(self) -> Result<Vec<R>> {
        self.0
            .await
            .map_err(|_| Error::Internal("batcher dropped a request".into()))?
    }
}

async fn run<T, R, F, Fut>(
    mut rx: mpsc::UnboundedReceiver<Job<T, R>>,
    limits: Limits,
    flush: Arc<F>,
    background: Background,
) where
    T: Send + 'static,
    R: Send + 'static,
    F: Fn(RequestContext, Vec<T>) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<Vec<R>>> + Send + 'static,
{
    let slots = Arc::new(Semaphore::new(limits.max_in_flight.max(1)));
    let shutdown = background.cancelled_token();
    let mut carry: Option<Job<T, R>> = None;
    loop {
        let first = match carry.take() {
            Some(job) => job,
            None => match next_job(&mut rx, limits.idle, &shutdown).await {
                Some(job) => job,
                None => return,
            },
        };
        // Waiting for a free slot is what lets requests pile up into one call.
        let Ok(slot) = slots.clone().acquire_owned().await else {
            return;
        };
        let (mut items, mut weight) = (first.items.len(), first.weight);
        let mut jobs = vec![first];
        while let Ok(job) = rx.try_recv() {
            if items + job.items.len() > limits.max_items || weight + job.weight > limits.max_weight
            {
                carry = Some(job);
                break;
            }
            items += job.items.len();
            weight += job.weight;
            jobs.push(job);
        }
        let flush = flush.clone();
        background.spawn_uncancelled(async move {
            let _slot = slot;
            flush_jobs(jobs, &*flush).await;
        });
    }
}

/// The next queued job. After `idle` without one, or once shutdown begins,
/// the queue closes: what is already queued still comes out, then `None`.
async fn next_job<J>(
    rx: &mut mpsc::UnboundedReceiver<J>,
    idle: Duration,
    shutdown: &CancellationToken,
) -> Option<J> {
    if !rx.is_closed() {
        tokio::select! {
            biased;
            job = rx.recv() => return job,
            () = shutdown.cancelled() => {}
            () = tokio::time::sleep(idle) => {}
        }
        rx.close();
    }
    rx.recv().await
}

async fn flush_jobs<T, R, F, Fut>(jobs: Vec<Job<T, R>>, flush: &F)
where
    F: Fn(RequestContext, Vec<T>) -> Fut,
    Fut: Future<Output = Result<Vec<R>>>,
{
    let ctx = jobs[0].ctx.clone();
    let mut counts = Vec::with_capacity(jobs.len());
    let mut replies = Vec::with_capacity(jobs.len());
    let mut all = Vec::new();
    for job in jobs {
        counts.push(job.items.len());
        replies.push(job.reply);
        all.extend(job.items);
    }
    let expected = all.len();
    match flush(ctx, all).await {
        Ok(results) if results.len() == expected => {
            let mut results = results.into_iter();
            for (count, reply) in counts.into_iter().zip(replies) {
                let _ = reply.send(Ok(results.by_ref().take(count).collect()));
            }
        }
        Ok(results) => {
            let e = Error::Internal(format!(
                "batched call returned {} results for {expected} items",
                results.len()
            ));
            for reply in replies {
                let _ = reply.send(Err(e.duplicate()));
            }
        }
        Err(e) => {
            for reply in replies {
                let _ = reply.send(Err(e.duplicate()));
            }
        }
    }
}

/// Splits items into runs whose total weight fits `limit` (an item heavier
/// than `limit` goes alone), keeping order.
pub fn split_by_weight<T>(items: Vec<T>, limit: u64, weight: impl Fn(&T) -> u64) -> Vec<Vec<T>> {
    let mut runs: Vec<Vec<T>> = Vec::new();
    let mut current = Vec::new();
    let mut total = 0;
    for item in items {
        let w = weight(&item);
        if !current.is_empty() && total + w > limit {
            runs.push(std::mem::take(&mut current));
            total = 0;
        }
        total += w;
        current.push(item);
    }
    if !current.is_empty() {
        runs.push(current);
    }
    runs
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Duration;

    #[tokio::test]
    async fn merges_concurrent_requests_and_splits_results_in_order() {
        let calls = Arc::new(AtomicUsize::new(0));
        let counter = calls.clone();
        let batcher = Arc::new(Batcher::new(
            Limits {
                max_items: 1000,
                max_weight: u64::MAX,
                max_in_flight: 1,
                idle: Duration::from_secs(60),
            },
            |_: &u32| 1,
            move |_ctx, items: Vec<u32>| {
                let counter = counter.clone();
                async move {
                    counter.fetch_add(1, Ordering::SeqCst);
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    Ok(items.into_iter().map(|i| i * 2).collect())
                }
            },
            &Background::new(),
        ));
        let ctx = RequestContext::default();
        let mut tasks = Vec::new();
        for i in 0..50u32 {
            let batcher = batcher.clone();
            let ctx = ctx.clone();
            tasks.push(tokio::spawn(async move {
                batcher.submit(&ctx, vec![i, i + 100]).await.unwrap()
            }));
        }
        for (i, task) in tasks.into_iter().enumerate() {
            let i = i as u32;
            assert_eq!(task.await.unwrap(), vec![i * 2, (i + 100) * 2]);
        }
        // Requests that arrive while a call is in flight share the next one.
        let n = calls.load(Ordering::SeqCst);
        assert!((1..=3).contains(&n), "{n} calls for 50 requests");
    }

    #[tokio::test]
    async fn respects_item_limits() {
        let sizes = Arc::new(std::sync::Mutex::new(Vec::new()));
        let seen = sizes.clone();
        let batcher = Arc::new(Batcher::new(
            Limits {
                max_items: 10,
                max_weight: u64::MAX,
                max_in_flight: 1,
                idle: Duration::from_secs(60),
            },
            |_: &u32| 1,
            move |_ctx, items: Vec<u32>| {
                let seen = seen.clone();
                async move {
                    seen.lock().unwrap().push(items.len());
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    Ok(items)
                }
            },
            &Background::new(),
        ));
        let ctx = RequestContext::default();
        let tasks: Vec<_> = (0..20u32)
            .map(|i| {
                let (b, ctx) = (batcher.clone(), ctx.clone());
                tokio::spawn(async move { b.submit(&ctx, vec![i; 3]).await.unwrap() })
            })
            .collect();
        for t in tasks {
            t.await.unwrap();
        }
        assert!(sizes.lock().unwrap().iter().all(|&n| n <= 10));
    }
}
