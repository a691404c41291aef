//! One [`Batcher`] per group key (instance + credentials): only requests that
//! may share an upstream call are merged. A batcher is made on first use and
//! forgotten once it has retired (idle for [`Limits::idle`]). At most
//! [`MAX_LIVE_BATCHERS`] live at once: clients that rotate credentials per
//! request could otherwise start thousands within the idle time. Beyond
//! that, a request for a new key is sent on its own (one direct call of the
//! flush, same results) and counted in `unbatched_upstream_requests`.

use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex};

use futures::FutureExt;
use futures::future::BoxFuture;

use crate::context::RequestContext;
use crate::error::{Error, Result};
use crate::stats::Stats;
use crate::tasks::Background;
use crate::upstream::batcher::{Batcher, Limits};

/// Most batchers live at once (each is a task and a queue).
pub const MAX_LIVE_BATCHERS: usize = 256;

/// One call of the flush, boxed: what a batcher does per merged call.
type Flush<T, R> =
    Arc<dyn Fn(RequestContext, Vec<T>) -> BoxFuture<'static, Result<Vec<R>>> + Send + Sync>;

/// Batchers of one kind of call, one per group key.
pub struct KeyedBatchers<T, R> {
    /// The live batchers by [`RequestContext::group_key`].
    batchers: Mutex<HashMap<String, Batcher<T, R>>>,
    /// Starts a batcher for a key seen for the first time (or again after
    /// its batcher retired).
    make: Box<dyn Fn() -> Batcher<T, R> + Send + Sync>,
    /// The flush itself, for requests sent unbatched.
    flush: Flush<T, R>,
    /// Most live batchers; a new key beyond it goes unbatched.
    max_live: usize,
    /// Counts unbatched requests.
    stats: Arc<Stats>,
    /// Where the workers run; once it shuts down, no new batcher starts.
    background: Background,
}

impl<T: Send + 'static, R: Send + 'static> KeyedBatchers<T, R> {
    /// Batchers that merge up to `limits` and call `flush` (see
    /// [`Batcher::new`]), their workers running in `background`; at most
    /// [`MAX_LIVE_BATCHERS`] live, unbatched requests counted in `stats`.
    pub fn new<F, Fut>(
        limits: Limits,
        weigh: fn(&T) -> u64,
        flush: F,
        background: &Background,
        stats: Arc<Stats>,
    ) -> Self
    where
        F: Fn(RequestContext, Vec<T>) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<Vec<R>>> + Send + 'static,
    {
        let flush: Flush<T, R> = Arc::new(move |ctx, items| flush(ctx, items).boxed());
        let for_batchers = flush.clone();
        let workers = background.clone();
        KeyedBatchers {
            batchers: Mutex::new(HashMap::new()),
            make: Box::new(move || {
                let flush = for_batchers.clone();
                Batcher::new(limits, weigh, move |ctx, items| flush(ctx, items), &workers)
            }),
            flush,
            max_live: MAX_LIVE_BATCHERS,
            stats,
            background: background.clone(),
        }
    }

    /// Submits items to the batcher for `ctx`'s group and waits for their
    /// results.
    pub async fn submit(&self, ctx: &RequestContext, items: Vec<T>) -> Result<Vec<R>> {
        if items.is_empty() {
            return Ok(Vec::new());
        }
        let pending = {
            // Queuing is synchronous, so it happens under the lock: a batcher
            // cannot retire between being looked up and being given the items.
            let mut batchers = self.batchers.lock().unwrap_or_else(|e| e.into_inner());
            let key = ctx.group_key();
            let refused = match batchers.get(&key) {
                Some(batcher) => batcher.enqueue(ctx, items),
                None => Err(items),
            };
            match refused {
                Ok(pending) => Ok(pending),
                Err(items) => {
                    if self.background.is_cancelled() {
                        return Err(Error::Unavailable("the server is shutting down".into()));
                    }
                    // A new key, or one whose batcher retired: forget every
                    // retired batcher, then start one for this key, if
                    // there is room for one more.
                    batchers.retain(|_, batcher| !batcher.is_retired());
                    if batchers.len() >= self.max_live {
                        Err(items)
                    } else {
                        let batcher = (self.make)();
                        let pending = batcher.enqueue(ctx, items);
                        batchers.insert(key, batcher);
                        Ok(pending
                            .map_err(|_| Error::Internal("a new batcher refused work".into()))?)
                    }
                }
            }
        };
        match pending {
            Ok(pending) => pending.wait().await,
            Err(items) => {
                Stats::add(&self.stats.unbatched_upstream_requests, 1);
                (self.flush)(ctx.clone(), items).await
            }
        }
    }

    /// How many batchers are live (for tests).
    #[cfg(test)]
    fn len(&self) -> usize {
        self.batchers.lock().unwrap().len()
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Duration;

    use tonic::metadata::MetadataMap;

    use super::*;

    /// Short, so the tests can wait for it; they wait many times longer, to
    /// stay steady on a loaded machine.
    const IDLE: Duration = Duration::from_millis(20);
    const WELL_PAST_IDLE: Duration = Duration::from_millis(500);

    fn with_token(token: &str) -> RequestContext {
        let mut headers = MetadataMap::new();
        headers.insert("authorization", token.parse().unwrap());
        RequestContext::from_metadata("main", &headers)
    }

    fn doubling(background: &Background, calls: Arc<AtomicUsize>) -> KeyedBatchers<u32, u32> {
        doubling_with_stats(background, calls, Arc::new(Stats::default()))
    }

    fn doubling_with_stats(
        background: &Background,
        calls: Arc<AtomicUsize>,
        stats: Arc<Stats>,
    ) -> KeyedBatchers<u32, u32> {
        let limits = Limits {
            max_items: 100,
            max_weight: u64::MAX,
            max_in_flight: 1,
            idle: IDLE,
        };
        KeyedBatchers::new(
            limits,
            |_| 1,
            move |_ctx, items: Vec<u32>| {
                calls.fetch_add(1, Ordering::SeqCst);
                async move { Ok(items.into_iter().map(|i| i * 2).collect()) }
            },
            background,
            stats,
        )
    }

    #[tokio::test]
    async fn beyond_the_live_cap_requests_go_unbatched_with_the_same_results() {
        let background = Background::new();
        let calls = Arc::new(AtomicUsize::new(0));
        let stats = Arc::new(Stats::default());
        let mut batchers = doubling_with_stats(&background, calls.clone(), stats.clone());
        batchers.max_live = 2;
        for token in ["one", "two"] {
            let got = batchers.submit(&with_token(token), vec![1]).await;
            assert_eq!(got.unwrap(), vec![2]);
        }
        for token in ["three", "four", "five"] {
            let got = batchers.submit(&with_token(token), vec![3, 4]).await;
            assert_eq!(got.unwrap(), vec![6, 8]);
        }
        assert_eq!(batchers.len(), 2, "no batcher beyond the cap");
        assert_eq!(Stats::get(&stats.unbatched_upstream_requests), 3);
        assert_eq!(calls.load(Ordering::SeqCst), 5, "one call per request");
        // A key that has a batcher keeps using it.
        batchers.submit(&with_token("one"), vec![1]).await.unwrap();
        assert_eq!(Stats::get(&stats.unbatched_upstream_requests), 3);
    }

    #[tokio::test]
    async fn idle_batchers_retire_and_are_forgotten() {
        let background = Background::new();
        let calls = Arc::new(AtomicUsize::new(0));
        let batchers = doubling(&background, calls.clone());
        for token in ["one", "two"] {
            let got = batchers.submit(&with_token(token), vec![1, 2]).await;
            assert_eq!(got.unwrap(), vec![2, 4]);
        }
        assert_eq!(batchers.len(), 2, "one batcher per credentials");

        tokio::time::sleep(WELL_PAST_IDLE).await;
        // A new key makes room by forgetting the retired batchers.
        let got = batchers.submit(&with_token("three"), vec![3]).await;
        assert_eq!(got.unwrap(), vec![6]);
        assert_eq!(batchers.len(), 1);

        // A retired key gets a fresh batcher and is served as before.
        let got = batchers.submit(&with_token("one"), vec![5]).await;
        assert_eq!(got.unwrap(), vec![10]);
        assert_eq!(calls.load(Ordering::SeqCst), 4);
    }

    #[tokio::test]
    async fn retired_workers_end() {
        let background = Background::new();
        let batchers = doubling(&background, Arc::new(AtomicUsize::new(0)));
        batchers.submit(&with_token("one"), vec![1]).await.unwrap();
        tokio::time::sleep(WELL_PAST_IDLE).await;
        // Every task (the worker and its calls) has ended by itself.
        assert_eq!(background.shutdown(Duration::ZERO).await, 0);
    }

    #[tokio::test]
    async fn shutdown_refuses_new_requests() {
        let background = Background::new();
        let batchers = doubling(&background, Arc::new(AtomicUsize::new(0)));
        let ctx = with_token("one");
        batchers.submit(&ctx, vec![1]).await.unwrap();
        assert_eq!(background.shutdown(Duration::from_secs(5)).await, 0);
        let err = batchers.submit(&ctx, vec![1]).await.unwrap_err();
        assert!(matches!(err, Error::Unavailable(_)), "{err:?}");
    }
}
