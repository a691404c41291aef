//! Client traffic to the upstream, so that prefetch only uses the link
//! capacity clients leave idle.
//!
//! - Every upstream call made for a client ([`Priority::Client`]) holds a
//!   [`ClientWork`] guard while it is in flight: unary calls, ByteStream
//!   read bodies while they stream, the open of Execute / WaitExecution (not
//!   the long wait for their Operations). Uploads do not count: their bytes
//!   cross the link's other direction. [`Upstream`](super::Upstream) takes
//!   the guard in its call policy, so no call site has to.
//! - A prefetch transfer asks for its [`Traffic::turn`] before it calls the
//!   upstream: one of [`PREFETCH_LANES`] lanes, once no client work has been
//!   in flight for [`QUIET`]. A streaming transfer then calls
//!   [`Traffic::pause`] between chunks: while it waits it stops reading, and
//!   HTTP/2 flow control stops the upstream after one (small) window.
//! - A client read that joins a prefetch transfer [promotes](Yielding::promote)
//!   it: the transfer stops yielding at once and counts as client work from
//!   then on, so other prefetch yields to it. The client never waits for the
//!   gate.
//!
//! [`Priority::Client`]: crate::context::Priority::Client

use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{OwnedSemaphorePermit, Semaphore, watch};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::stats::Stats;

/// How long the upstream link must have carried no client work before
/// prefetch (re)starts. A client's calls for one action (GetActionResult,
/// FindMissingBlobs, uploads, Execute) follow each other within a few
/// milliseconds; restarting prefetch in such a gap would put a prefetch
/// window on the link just ahead of the next call. Longer than those gaps,
/// short next to a 40 ms round trip. Chosen, not measured: the relay runs
/// in `docs/architecture.md` ("Priority") varied the windows only.
pub const QUIET: Duration = Duration::from_millis(20);

/// Prefetch transfers that may be on the link at once. A batched prefetch
/// read cannot be paused once sent, so this bounds what is still arriving
/// when a client call starts (lanes × a batch, see
/// `read_through::PREFETCH_BATCH`); two keep the link busy across a round
/// trip while one is between calls.
pub const PREFETCH_LANES: usize = 2;

/// Client work in flight now, and since when there has been none.
#[derive(Clone, Copy, Debug)]
struct State {
    /// Client calls and streams in flight.
    busy: usize,
    /// When `busy` last dropped to zero.
    idle_since: Instant,
}

/// The upstream link's client traffic, and the gate prefetch waits at.
pub struct Traffic {
    /// Client work in flight; prefetch watches it change.
    state: watch::Sender<State>,
    /// Prefetch transfers on the link at once ([`PREFETCH_LANES`]).
    lanes: Arc<Semaphore>,
    /// Where prefetch waits and promotions are counted.
    stats: Arc<Stats>,
}

impl Traffic {
    /// No client work yet (and none for a long time: prefetch may start).
    pub fn new(stats: Arc<Stats>) -> Arc<Self> {
        let long_ago = Instant::now()
            .checked_sub(QUIET)
            .unwrap_or_else(Instant::now);
        let (state, _) = watch::channel(State {
            busy: 0,
            idle_since: long_ago,
        });
        Arc::new(Traffic {
            state,
            lanes: Arc::new(Semaphore::new(PREFETCH_LANES)),
            stats,
        })
    }

    /// Marks one client call or stream in flight until the guard drops.
    pub fn client_work(self: &Arc<Self>) -> ClientWork {
        self.state.send_modify(|s| s.busy += 1);
        ClientWork {
            traffic: self.clone(),
        }
    }

    /// Client calls and streams in flight now.
    pub fn client_work_in_flight(&self) -> usize {
        self.state.borrow().busy
    }

    /// Whether prefetch may use the link now: no client work in flight, and
    /// none for [`QUIET`].
    pub fn is_idle(&self) -> bool {
        let s = *self.state.borrow();
        s.busy == 0 && s.idle_since.elapsed() >= QUIET
    }

    /// Returns once the link has been free of client work for [`QUIET`].
    pub async fn idle(&self) {
        let mut rx = self.state.subscribe();
        loop {
            let s = *rx.borrow_and_update();
            if s.busy > 0 {
                // The sender lives in `self`: `changed` cannot fail here.
                let _ = rx.changed().await;
                continue;
            }
            let until = s.idle_since + QUIET;
            if Instant::now() >= until {
                return;
            }
            tokio::select! {
                () = tokio::time::sleep_until(until) => {}
                _ = rx.changed() => {}
            }
        }
    }

    /// Waits until a prefetch transfer may start: a free lane and an idle
    /// link, or a client joining it (then at once, without a lane).
    pub async fn turn(&self, transfer: &Yielding) -> Turn {
        if transfer.is_promoted() {
            return Turn(None);
        }
        let ready = self.is_idle() && self.lanes.available_permits() > 0;
        let started = Instant::now();
        let lane = async {
            let lane = self.lanes.clone().acquire_owned().await.ok();
            self.idle().await;
            lane
        };
        let turn = tokio::select! {
            biased;
            () = transfer.promoted.cancelled() => Turn(None),
            lane = lane => Turn(lane),
        };
        if !ready {
            self.count_wait(started);
        }
        turn
    }

    /// Between two chunks of a prefetch transfer: returns at once while the
    /// link is idle or a client has joined the transfer, else waits for
    /// either (not reading meanwhile is what stops the upstream).
    pub async fn pause(&self, transfer: &Yielding) {
        if transfer.is_promoted() || self.is_idle() {
            return;
        }
        let started = Instant::now();
        tokio::select! {
            biased;
            () = transfer.promoted.cancelled() => {}
            () = self.idle() => {}
        }
        self.count_wait(started);
    }

    fn count_wait(&self, started: Instant) {
        Stats::add(&self.stats.prefetch_waits, 1);
        let waited = started.elapsed().as_millis() as u64;
        Stats::add(&self.stats.prefetch_wait_milliseconds, waited);
    }
}

/// One client call or stream in flight (see [`Traffic::client_work`]).
pub struct ClientWork {
    traffic: Arc<Traffic>,
}

impl Drop for ClientWork {
    fn drop(&mut self) {
        self.traffic.state.send_modify(|s| {
            s.busy -= 1;
            if s.busy == 0 {
                s.idle_since = Instant::now();
            }
        });
    }
}

/// A prefetch transfer's permission to use the link (see [`Traffic::turn`]):
/// a lane, or none once a client joined it. Held until the transfer ends.
pub struct Turn(#[allow(dead_code)] Option<OwnedSemaphorePermit>);

/// A prefetch transfer that yields to clients until a client joins it.
pub struct Yielding {
    /// Cancelled when a client joins: the transfer stops yielding.
    promoted: CancellationToken,
    /// From the promotion until the transfer ends, the joined client's work
    /// in flight (other prefetch yields to it); `None` before, and for good
    /// once the transfer has ended.
    work: Mutex<Option<ClientWork>>,
    /// Set when the transfer ends: a late promotion takes no guard.
    ended: CancellationToken,
}

impl Default for Yielding {
    fn default() -> Self {
        Yielding {
            promoted: CancellationToken::new(),
            work: Mutex::new(None),
            ended: CancellationToken::new(),
        }
    }
}

impl Yielding {
    /// Whether a client has joined the transfer.
    pub fn is_promoted(&self) -> bool {
        self.promoted.is_cancelled()
    }

    /// A client joined the transfer: it stops yielding and counts as that
    /// client's work in flight until it ends. Returns whether this call
    /// promoted it (the first join of a transfer still running).
    pub fn promote(&self, traffic: &Arc<Traffic>) -> bool {
        let mut work = self.work.lock().unwrap_or_else(|e| e.into_inner());
        if self.is_promoted() || self.ended.is_cancelled() {
            return false;
        }
        *work = Some(traffic.client_work());
        self.promoted.cancel();
        Stats::add(&traffic.stats.prefetch_promotions, 1);
        true
    }

    /// The transfer ended: the promoted client's work is over.
    pub fn end(&self) {
        let mut work = self.work.lock().unwrap_or_else(|e| e.into_inner());
        self.ended.cancel();
        *work = None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::FutureExt;

    fn traffic() -> (Arc<Traffic>, Arc<Stats>) {
        let stats = Arc::new(Stats::default());
        (Traffic::new(stats.clone()), stats)
    }

    #[tokio::test(start_paused = true)]
    async fn prefetch_waits_for_a_quiet_period_after_the_last_client_call() {
        let (traffic, stats) = traffic();
        assert!(traffic.is_idle(), "nothing has happened yet");
        let first = traffic.client_work();
        let second = traffic.client_work();
        assert_eq!(traffic.client_work_in_flight(), 2);
        let transfer = Yielding::default();
        let mut turn = Box::pin(traffic.turn(&transfer));
        assert!(turn.as_mut().now_or_never().is_none(), "clients are busy");
        drop(first);
        tokio::time::sleep(QUIET * 5).await;
        assert!(
            turn.as_mut().now_or_never().is_none(),
            "one client call is still in flight"
        );
        drop(second);
        assert!(!traffic.is_idle(), "the quiet period has not passed");
        assert!(turn.as_mut().now_or_never().is_none());
        tokio::time::sleep(QUIET / 2).await;
        assert!(turn.as_mut().now_or_never().is_none(), "still too early");
        tokio::time::sleep(QUIET / 2).await;
        assert!(turn.await.0.is_some(), "granted with a lane");
        assert_eq!(Stats::get(&stats.prefetch_waits), 1);
        assert_eq!(
            Stats::get(&stats.prefetch_wait_milliseconds),
            (QUIET * 6).as_millis() as u64,
            "paused clock: exactly the time waited"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_busy_client_restarts_the_quiet_period() {
        let (traffic, _) = traffic();
        drop(traffic.client_work());
        let idle = traffic.idle();
        tokio::pin!(idle);
        tokio::time::sleep(QUIET / 2).await;
        assert!(idle.as_mut().now_or_never().is_none());
        drop(traffic.client_work());
        tokio::time::sleep(QUIET * 3 / 4).await;
        assert!(
            idle.as_mut().now_or_never().is_none(),
            "quiet from the last call"
        );
        tokio::time::sleep(QUIET / 4).await;
        assert!(idle.now_or_never().is_some());
    }

    #[tokio::test(start_paused = true)]
    async fn lanes_bound_the_prefetch_transfers_on_the_link() {
        let (traffic, _) = traffic();
        let transfers: Vec<Yielding> = (0..=PREFETCH_LANES).map(|_| Yielding::default()).collect();
        let mut turns = Vec::new();
        for t in &transfers[..PREFETCH_LANES] {
            turns.push(traffic.turn(t).now_or_never().expect("a free lane"));
        }
        let mut last = Box::pin(traffic.turn(&transfers[PREFETCH_LANES]));
        assert!(
            last.as_mut().now_or_never().is_none(),
            "every lane is taken"
        );
        turns.pop();
        assert!(last.now_or_never().is_some(), "a lane came free");
    }

    #[tokio::test(start_paused = true)]
    async fn a_joining_client_promotes_the_transfer_past_the_gate() {
        let (traffic, stats) = traffic();
        let client = traffic.client_work();
        let transfer = Yielding::default();
        let mut turn = Box::pin(traffic.turn(&transfer));
        assert!(turn.as_mut().now_or_never().is_none());
        let mut pause = Box::pin(traffic.pause(&transfer));
        assert!(pause.as_mut().now_or_never().is_none());
        assert!(transfer.promote(&traffic));
        assert!(!transfer.promote(&traffic), "promoted once");
        assert!(turn.now_or_never().is_some(), "no wait for the gate");
        assert!(pause.now_or_never().is_some());
        assert!(traffic.pause(&transfer).now_or_never().is_some());
        drop(client);
        assert_eq!(
            traffic.client_work_in_flight(),
            1,
            "the promoted transfer is client work now"
        );
        transfer.end();
        assert_eq!(traffic.client_work_in_flight(), 0);
        assert!(
            !transfer.promote(&traffic),
            "an ended transfer takes no guard"
        );
        assert_eq!(traffic.client_work_in_flight(), 0);
        assert_eq!(Stats::get(&stats.prefetch_promotions), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn pause_returns_at_once_while_the_link_is_idle() {
        let (traffic, stats) = traffic();
        let transfer = Yielding::default();
        assert!(traffic.pause(&transfer).now_or_never().is_some());
        assert_eq!(Stats::get(&stats.prefetch_waits), 0);
        let client = traffic.client_work();
        let mut pause = Box::pin(traffic.pause(&transfer));
        assert!(pause.as_mut().now_or_never().is_none(), "a client is busy");
        drop(client);
        tokio::time::sleep(QUIET).await;
        assert!(pause.now_or_never().is_some());
        assert_eq!(Stats::get(&stats.prefetch_waits), 1);
    }
}
