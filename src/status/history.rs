//! The per-minute history: a ring of the last hour's counter increases,
//! one [`MinuteSample`] per minute, for the status page's charts. The
//! status sampler (`StatusSource::sample`) rolls it at each minute's end.

use std::collections::VecDeque;
use std::sync::Mutex;

use crate::stats::Stats;

use super::MinuteSample;

/// Minutes kept.
pub const MINUTES: usize = 60;

/// The counters a sample is the increase of, read at one instant.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Totals {
    cas_hits: u64,
    cas_misses: u64,
    action_cache_hits: u64,
    action_cache_misses: u64,
    asset_hits: u64,
    asset_misses: u64,
    bytes_served_locally: u64,
    upstream_bytes_received: u64,
    upstream_bytes_sent: u64,
    errors: u64,
}

impl Totals {
    /// The counters now.
    pub fn read(stats: &Stats) -> Self {
        let get = Stats::get;
        let asset_fetches = get(&stats.asset_fetches);
        let asset_hits = get(&stats.asset_fetch_hits);
        Totals {
            cas_hits: get(&stats.cas_hits),
            cas_misses: get(&stats.cas_misses),
            action_cache_hits: get(&stats.action_cache_hits),
            action_cache_misses: get(&stats.action_cache_misses),
            asset_hits,
            asset_misses: asset_fetches.saturating_sub(asset_hits),
            bytes_served_locally: get(&stats.served_local_bytes),
            upstream_bytes_received: get(&stats.upstream_bytes_received),
            upstream_bytes_sent: get(&stats.upstream_bytes_sent),
            errors: stats.rpc_errors_total(),
        }
    }

    /// The increase from `earlier` to `self`, as the sample of the minute
    /// starting at `minute_unix`.
    fn since(&self, earlier: &Totals, minute_unix: u64) -> MinuteSample {
        MinuteSample {
            minute_unix,
            cas_hits: self.cas_hits.saturating_sub(earlier.cas_hits),
            cas_misses: self.cas_misses.saturating_sub(earlier.cas_misses),
            action_cache_hits: self
                .action_cache_hits
                .saturating_sub(earlier.action_cache_hits),
            action_cache_misses: self
                .action_cache_misses
                .saturating_sub(earlier.action_cache_misses),
            asset_hits: self.asset_hits.saturating_sub(earlier.asset_hits),
            asset_misses: self.asset_misses.saturating_sub(earlier.asset_misses),
            bytes_served_locally: self
                .bytes_served_locally
                .saturating_sub(earlier.bytes_served_locally),
            upstream_bytes_received: self
                .upstream_bytes_received
                .saturating_sub(earlier.upstream_bytes_received),
            upstream_bytes_sent: self
                .upstream_bytes_sent
                .saturating_sub(earlier.upstream_bytes_sent),
            errors: self.errors.saturating_sub(earlier.errors),
        }
    }
}

/// The ring of finished minutes, and where the current one started.
pub struct History {
    state: Mutex<State>,
}

struct State {
    /// Finished minutes, oldest first, at most [`MINUTES`].
    ring: VecDeque<MinuteSample>,
    /// The current minute's start (seconds since the epoch, a multiple of 60).
    minute_unix: u64,
    /// The counters when it started.
    at_start: Totals,
}

impl History {
    /// An empty history whose first minute is the one holding `now_unix`,
    /// counted from `totals` (the counters now).
    pub fn new(now_unix: u64, totals: Totals) -> Self {
        History {
            state: Mutex::new(State {
                ring: VecDeque::with_capacity(MINUTES),
                minute_unix: now_unix - now_unix % 60,
                at_start: totals,
            }),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// At `now_unix` with the counters at `totals`: once the current minute
    /// is over, its sample joins the ring (the oldest leaves after an hour)
    /// and a new minute starts. Minutes the sampler missed entirely (the
    /// process was stopped) are not invented: the increase goes to the
    /// minute that was current.
    pub fn roll(&self, now_unix: u64, totals: Totals) {
        let mut state = self.lock();
        let minute = now_unix - now_unix % 60;
        if minute <= state.minute_unix {
            return;
        }
        let sample = totals.since(&state.at_start, state.minute_unix);
        if state.ring.len() == MINUTES {
            state.ring.pop_front();
        }
        state.ring.push_back(sample);
        state.minute_unix = minute;
        state.at_start = totals;
    }

    /// The finished minutes, oldest first, then the current minute so far
    /// (counted up to `totals`): at most [`MINUTES`] + 1 samples.
    /// `totals` is read under the history's lock, so a roll cannot slip in
    /// between the read and the subtraction.
    pub fn samples(&self, totals: impl FnOnce() -> Totals) -> Vec<MinuteSample> {
        let state = self.lock();
        let totals = totals();
        let mut samples: Vec<MinuteSample> = state.ring.iter().copied().collect();
        samples.push(totals.since(&state.at_start, state.minute_unix));
        samples
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn totals(cas_hits: u64) -> Totals {
        Totals {
            cas_hits,
            ..Totals::default()
        }
    }

    #[test]
    fn each_minute_holds_its_own_increase() {
        let history = History::new(600 + 30, totals(5));
        history.roll(600 + 59, totals(7));
        assert_eq!(
            history.samples(|| totals(8)).len(),
            1,
            "minute not over yet"
        );
        history.roll(660, totals(9));
        history.roll(725, totals(10));
        let samples = history.samples(|| totals(12));
        let got: Vec<(u64, u64)> = samples
            .iter()
            .map(|s| (s.minute_unix, s.cas_hits))
            .collect();
        assert_eq!(got, [(600, 4), (660, 1), (720, 2)]);
    }

    #[test]
    fn the_ring_keeps_the_last_hour() {
        let history = History::new(0, totals(0));
        for minute in 1..=100 {
            history.roll(minute * 60, totals(minute));
        }
        let samples = history.samples(|| totals(100));
        assert_eq!(samples.len(), MINUTES + 1);
        assert_eq!(samples[0].minute_unix, 40 * 60);
        assert!(
            samples
                .iter()
                .all(|s| s.cas_hits == 1 || s.minute_unix == 100 * 60)
        );
    }

    #[test]
    fn totals_read_the_counters_the_samples_show() {
        let stats = Stats::default();
        Stats::add(&stats.served_local_bytes, 100);
        Stats::add(&stats.asset_fetches, 3);
        Stats::add(&stats.asset_fetch_hits, 1);
        stats.rpc_completed(Some(tonic::Code::NotFound));
        let sample = Totals::read(&stats).since(&Totals::default(), 0);
        assert_eq!(sample.bytes_served_locally, 100);
        assert_eq!((sample.asset_hits, sample.asset_misses), (1, 2));
        assert_eq!(sample.errors, 1);
    }
}
