//! Background work that shutdown can see: every task Outpost spawns outside a
//! request (prefetch workers, batchers, relays, probes) goes through one
//! [`Background`], so stopping the server is cancel → bounded drain → flush,
//! and nothing commits to the store after it has been flushed.

use std::future::Future;
use std::time::Duration;

use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// A handle to the server's background tasks. Cheap to clone; all clones
/// share one tracker and one cancellation token.
#[derive(Clone, Debug, Default)]
pub struct Background {
    /// Every task spawned through this handle, so shutdown can wait for them.
    tracker: TaskTracker,
    /// Cancelled when the server stops; tasks end at their next await.
    token: CancellationToken,
    /// Cancelled when the server stops accepting calls, before the calls in
    /// flight are drained: the listeners stop on it, and tasks that feed a
    /// client's stream (execution relays) end that stream on it, so the
    /// drain is not kept waiting by them.
    closing: CancellationToken,
}

impl Background {
    /// A fresh set of background tasks (one per server).
    pub fn new() -> Self {
        Self::default()
    }

    /// Spawns `task`, tracked for shutdown; it is dropped at its next await
    /// point once shutdown begins. Returns `None` from the handle if cancelled.
    pub fn spawn<F>(&self, task: F) -> JoinHandle<Option<F::Output>>
    where
        F: Future + Send + 'static,
        F::Output: Send + 'static,
    {
        let token = self.token.clone();
        self.tracker
            .spawn(async move { token.run_until_cancelled(task).await })
    }

    /// Spawns `task` tracked for shutdown but not cancelled by it: for work
    /// that must run to its end once started (it still delays shutdown only
    /// up to the drain bound). The task can watch [`Background::cancelled`].
    pub fn spawn_uncancelled<F>(&self, task: F) -> JoinHandle<F::Output>
    where
        F: Future + Send + 'static,
        F::Output: Send + 'static,
    {
        self.tracker.spawn(task)
    }

    /// A token that is cancelled when shutdown begins.
    pub fn cancelled_token(&self) -> CancellationToken {
        self.token.clone()
    }

    /// A token that is cancelled when the server stops accepting calls (the
    /// first step of stopping, before calls in flight are drained).
    pub fn closing_token(&self) -> CancellationToken {
        self.closing.clone()
    }

    /// Whether shutdown has begun.
    pub fn is_cancelled(&self) -> bool {
        self.token.is_cancelled()
    }

    /// Cancels every task and waits up to `bound` for them to end. Returns
    /// the number still running when the bound passed (0 = all drained).
    pub async fn shutdown(&self, bound: Duration) -> usize {
        self.closing.cancel();
        self.token.cancel();
        self.tracker.close();
        match tokio::time::timeout(bound, self.tracker.wait()).await {
            Ok(()) => 0,
            Err(_) => self.tracker.len(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn shutdown_cancels_and_waits_for_tasks() {
        let background = Background::new();
        let endless = background.spawn(std::future::pending::<()>());
        let finished = background.spawn(async { 7 });
        assert_eq!(finished.await.unwrap(), Some(7));
        assert_eq!(background.shutdown(Duration::from_secs(5)).await, 0);
        assert_eq!(endless.await.unwrap(), None);
    }

    #[tokio::test]
    async fn shutdown_reports_tasks_that_outlive_the_bound() {
        let background = Background::new();
        let _stubborn = background.spawn_uncancelled(std::future::pending::<()>());
        assert_eq!(background.shutdown(Duration::from_millis(20)).await, 1);
    }
}
