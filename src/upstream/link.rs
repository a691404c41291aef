//! The WAN link to the upstream as measured from real traffic (no probe
//! traffic of its own): round-trip time and download throughput, for the
//! status report and `/metrics`, and for the time local hits saved.
//!
//! - RTT: the minimum latency of the last [`RTT_WINDOW`] small unary calls
//!   (FindMissingBlobs, GetActionResult, GetCapabilities). Server work and
//!   queueing only ever add to a call's latency, so the fastest recent call
//!   is the best estimate of the wire's round trip; an average would count
//!   a slow FindMissingBlobs of ten thousand digests as link delay. A window
//!   rather than the minimum since start follows route changes.
//! - Throughput: an exponentially weighted moving average (weight
//!   [`THROUGHPUT_WEIGHT`] for the newest) of client ByteStream reads of at
//!   least [`MIN_TRANSFER`]: bytes over the time from the call to the last
//!   byte. Smaller reads mostly measure the round trip. Prefetch transfers
//!   are left out: they pause to let clients go first.

use std::collections::VecDeque;
use std::sync::Mutex;
use std::time::Duration;

use crate::stats::UpstreamMethod;

/// Latencies the RTT is the minimum of.
pub const RTT_WINDOW: usize = 20;
/// Smallest read that measures throughput.
pub const MIN_TRANSFER: u64 = 1 << 20;
/// Weight of the newest transfer in the throughput average.
pub const THROUGHPUT_WEIGHT: f64 = 0.3;

/// Whether a successful call of `method` is small enough that its latency
/// is mostly the link's round trip.
pub fn measures_round_trip(method: UpstreamMethod) -> bool {
    matches!(
        method,
        UpstreamMethod::FindMissingBlobs
            | UpstreamMethod::GetActionResult
            | UpstreamMethod::GetCapabilities
    )
}

/// Measurements of the link to one upstream.
#[derive(Default)]
pub struct Link {
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    /// The latest small calls' latencies, oldest first.
    latencies: VecDeque<Duration>,
    /// Bytes per second, once a large read finished.
    throughput: Option<f64>,
}

impl Link {
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A small unary call answered after `elapsed`.
    pub fn round_trip(&self, elapsed: Duration) {
        let mut state = self.lock();
        if state.latencies.len() == RTT_WINDOW {
            state.latencies.pop_front();
        }
        state.latencies.push_back(elapsed);
    }

    /// A client read received `bytes` in `elapsed` (from the call to its
    /// last byte); reads under [`MIN_TRANSFER`] are ignored.
    pub fn download(&self, bytes: u64, elapsed: Duration) {
        if bytes < MIN_TRANSFER || elapsed.is_zero() {
            return;
        }
        let rate = bytes as f64 / elapsed.as_secs_f64();
        let mut state = self.lock();
        state.throughput = Some(match state.throughput {
            None => rate,
            Some(old) => old + THROUGHPUT_WEIGHT * (rate - old),
        });
    }

    /// The measured round-trip time, once a small call was answered.
    pub fn rtt(&self) -> Option<Duration> {
        self.lock().latencies.iter().min().copied()
    }

    /// The measured download throughput in bytes per second, once a large
    /// read finished.
    pub fn throughput(&self) -> Option<f64> {
        self.lock().throughput
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_rtt_is_the_fastest_recent_call() {
        let link = Link::default();
        assert_eq!(link.rtt(), None);
        link.round_trip(Duration::from_millis(40));
        link.round_trip(Duration::from_millis(25));
        link.round_trip(Duration::from_millis(300));
        assert_eq!(link.rtt(), Some(Duration::from_millis(25)));
        for _ in 0..RTT_WINDOW {
            link.round_trip(Duration::from_millis(60));
        }
        assert_eq!(
            link.rtt(),
            Some(Duration::from_millis(60)),
            "25 ms left the window"
        );
    }

    #[test]
    fn throughput_averages_large_reads_only() {
        let link = Link::default();
        link.download(1000, Duration::from_millis(1));
        assert_eq!(link.throughput(), None, "a small read measures nothing");
        link.download(10 << 20, Duration::from_secs(1));
        assert_eq!(link.throughput(), Some((10 << 20) as f64));
        link.download(20 << 20, Duration::from_secs(1));
        let expected = (10 << 20) as f64 + THROUGHPUT_WEIGHT * (10 << 20) as f64;
        assert!((link.throughput().unwrap() - expected).abs() < 1.0);
    }
}
