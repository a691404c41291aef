//! Interrupted uploads kept for a resumption: a ByteStream Write whose
//! stream ended before `finish_write` is parked here under its resource
//! name, so QueryWriteStatus can report how far it got and a new Write can
//! continue at that offset.
//!
//! A parked writer is first shrunk to the bytes it received
//! ([`BlobWriter::park`]): it holds no quota reserved ahead and no upstream
//! stream. Parked uploads are bounded by age ([`ParkedLimits::ttl`]), count
//! and bytes; beyond a bound the oldest go first. They are also the first
//! thing to go when the local store needs room ([`ParkedUploads::reclaim`],
//! installed as the store's reclaimer), before any cached entry is evicted.
//! Every upload dropped counts in `parked_uploads_dropped`.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use crate::stats::Stats;
use crate::store::BlobWriter;
use crate::store::local::Reclaimer;

/// How many parked uploads, how many bytes, and for how long.
#[derive(Clone, Copy, Debug)]
pub struct ParkedLimits {
    /// How long an interrupted upload waits to be resumed.
    pub ttl: Duration,
    /// Most uploads parked at once.
    pub max_uploads: usize,
    /// Most bytes (received by the parked uploads) parked at once.
    pub max_bytes: u64,
}

impl ParkedLimits {
    /// The defaults for a local store of `quota` bytes: 10 minutes, 1000
    /// uploads, a quarter of the quota (at most 1 GiB).
    pub fn for_quota(quota: u64) -> Self {
        ParkedLimits {
            ttl: Duration::from_secs(600),
            max_uploads: 1000,
            max_bytes: (quota / 4).min(1 << 30),
        }
    }
}

/// One parked upload.
struct Parked {
    /// The writer, shrunk to what it received.
    writer: Box<dyn BlobWriter>,
    /// Bytes received (counted against [`ParkedLimits::max_bytes`]).
    bytes: u64,
    /// When it was parked.
    since: Instant,
    /// Its place in the parking order.
    seq: u64,
}

/// The parked uploads and their order, behind one lock.
#[derive(Default)]
struct Lot {
    /// By resource name.
    by_name: HashMap<String, Parked>,
    /// Resource names, oldest parked first.
    order: BTreeMap<u64, String>,
    /// Sum of the parked uploads' bytes.
    bytes: u64,
    /// The next parking's sequence number.
    next_seq: u64,
}

impl Lot {
    fn remove(&mut self, name: &str) -> Option<Parked> {
        let parked = self.by_name.remove(name)?;
        self.order.remove(&parked.seq);
        self.bytes -= parked.bytes;
        Some(parked)
    }

    /// Removes the oldest upload.
    fn pop_oldest(&mut self) -> Option<Parked> {
        let (_, name) = self.order.pop_first()?;
        let parked = self
            .by_name
            .remove(&name)
            .expect("ordered names are parked");
        self.bytes -= parked.bytes;
        Some(parked)
    }

    /// Removes every upload parked longer than `ttl` ago.
    fn expire(&mut self, ttl: Duration, dropped: &mut Vec<Parked>) {
        while let Some((_, name)) = self.order.first_key_value() {
            if self.by_name[name].since.elapsed() < ttl {
                break;
            }
            dropped.extend(self.pop_oldest());
        }
    }
}

/// Interrupted uploads by resource name, bounded, oldest dropped first.
pub struct ParkedUploads {
    /// The bounds.
    limits: ParkedLimits,
    /// The uploads.
    lot: Mutex<Lot>,
    /// Counts dropped uploads.
    stats: Arc<Stats>,
}

impl ParkedUploads {
    /// An empty lot with these bounds.
    pub fn new(limits: ParkedLimits, stats: Arc<Stats>) -> Self {
        ParkedUploads {
            limits,
            lot: Mutex::new(Lot::default()),
            stats,
        }
    }

    fn lot(&self) -> MutexGuard<'_, Lot> {
        self.lot.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Drops uploads (outside the lock: a writer gives its quota back to
    /// the store as it is dropped) and counts them.
    fn drop_all(&self, dropped: Vec<Parked>) {
        if !dropped.is_empty() {
            Stats::add(&self.stats.parked_uploads_dropped, dropped.len() as u64);
            tracing::debug!(uploads = dropped.len(), "dropped parked uploads");
        }
        drop(dropped);
    }

    /// Parks an interrupted upload under `resource`, shrunk to what it
    /// can resume from (a compressed upload: its last whole frame); one that
    /// cannot be resumed or exceeds the byte bound alone is dropped at once,
    /// and the oldest go when a bound is passed. Returns the bytes a
    /// resumption starts at: 0 when nothing was kept.
    pub fn park(&self, resource: String, mut writer: Box<dyn BlobWriter>) -> u64 {
        if !writer.park() {
            Stats::add(&self.stats.parked_uploads_dropped, 1);
            return 0;
        }
        let bytes = writer.committed_size();
        if bytes > self.limits.max_bytes || self.limits.max_uploads == 0 {
            Stats::add(&self.stats.parked_uploads_dropped, 1);
            return 0;
        }
        let mut dropped = Vec::new();
        {
            let mut lot = self.lot();
            lot.expire(self.limits.ttl, &mut dropped);
            dropped.extend(lot.remove(&resource));
            let seq = lot.next_seq;
            lot.next_seq += 1;
            lot.order.insert(seq, resource.clone());
            lot.bytes += bytes;
            let parked = Parked {
                writer,
                bytes,
                since: Instant::now(),
                seq,
            };
            lot.by_name.insert(resource.clone(), parked);
            while lot.by_name.len() > self.limits.max_uploads || lot.bytes > self.limits.max_bytes {
                dropped.extend(lot.pop_oldest());
            }
        }
        self.drop_all(dropped);
        if self.lot().by_name.contains_key(&resource) {
            bytes
        } else {
            0
        }
    }

    /// Takes the upload parked under `resource` to resume it.
    pub fn take(&self, resource: &str) -> Option<Box<dyn BlobWriter>> {
        let mut dropped = Vec::new();
        let taken = {
            let mut lot = self.lot();
            lot.expire(self.limits.ttl, &mut dropped);
            lot.remove(resource)
        };
        self.drop_all(dropped);
        taken.map(|p| p.writer)
    }

    /// How many bytes the upload parked under `resource` has received.
    pub fn committed_size(&self, resource: &str) -> Option<u64> {
        let lot = self.lot();
        lot.by_name
            .get(resource)
            .filter(|p| p.since.elapsed() < self.limits.ttl)
            .map(|p| p.writer.committed_size())
    }

    /// Drops the oldest uploads until at least `bytes` were freed (or none
    /// is left): the local store asks before it evicts anything.
    pub fn reclaim(&self, bytes: u64) {
        let mut dropped = Vec::new();
        {
            let mut lot = self.lot();
            let mut freed = 0;
            while freed < bytes
                && let Some(parked) = lot.pop_oldest()
            {
                freed += parked.bytes;
                dropped.push(parked);
            }
        }
        self.drop_all(dropped);
    }

    /// [`ParkedUploads::reclaim`] as the local store's reclaimer (holding
    /// the lot weakly: parked writers hold the store).
    pub fn reclaimer(self: &Arc<Self>) -> Reclaimer {
        let lot = Arc::downgrade(self);
        Arc::new(move |bytes| {
            if let Some(parked) = lot.upgrade() {
                parked.reclaim(bytes);
            }
        })
    }

    /// Uploads parked and the bytes they received (for metrics).
    pub fn occupancy(&self) -> (u64, u64) {
        let lot = self.lot();
        (lot.by_name.len() as u64, lot.bytes)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use async_trait::async_trait;
    use bytes::Bytes;

    use super::*;
    use crate::error::Result;

    /// A writer that has received `size` bytes and says when it is dropped.
    struct Fake {
        size: u64,
        resumable: bool,
        parked: Arc<AtomicUsize>,
        dropped: Arc<AtomicUsize>,
    }

    #[async_trait]
    impl BlobWriter for Fake {
        async fn write(&mut self, data: Bytes) -> Result<()> {
            self.size += data.len() as u64;
            Ok(())
        }
        fn committed_size(&self) -> u64 {
            self.size
        }
        fn park(&mut self) -> bool {
            self.parked.fetch_add(1, Ordering::SeqCst);
            self.resumable
        }
        async fn commit(self: Box<Self>) -> Result<()> {
            Ok(())
        }
    }

    impl Drop for Fake {
        fn drop(&mut self) {
            self.dropped.fetch_add(1, Ordering::SeqCst);
        }
    }

    struct Lab {
        parked: ParkedUploads,
        stats: Arc<Stats>,
        parks: Arc<AtomicUsize>,
        drops: Arc<AtomicUsize>,
    }

    impl Lab {
        fn new(max_uploads: usize, max_bytes: u64, ttl: Duration) -> Self {
            let stats = Arc::new(Stats::default());
            let limits = ParkedLimits {
                ttl,
                max_uploads,
                max_bytes,
            };
            Lab {
                parked: ParkedUploads::new(limits, stats.clone()),
                stats,
                parks: Arc::default(),
                drops: Arc::default(),
            }
        }

        fn park(&self, name: &str, size: u64, resumable: bool) {
            let writer = Fake {
                size,
                resumable,
                parked: self.parks.clone(),
                dropped: self.drops.clone(),
            };
            self.parked.park(name.to_string(), Box::new(writer));
        }

        fn dropped(&self) -> u64 {
            Stats::get(&self.stats.parked_uploads_dropped)
        }
    }

    const LONG: Duration = Duration::from_secs(600);

    #[test]
    fn a_parked_upload_is_shrunk_and_can_be_taken_back_once() {
        let lab = Lab::new(10, 1000, LONG);
        lab.park("a", 5, true);
        assert_eq!(lab.parks.load(Ordering::SeqCst), 1, "shrunk when parked");
        assert_eq!(lab.parked.committed_size("a"), Some(5));
        assert_eq!(lab.parked.occupancy(), (1, 5));
        assert_eq!(lab.parked.take("a").unwrap().committed_size(), 5);
        assert!(lab.parked.take("a").is_none());
        assert_eq!(lab.parked.occupancy(), (0, 0));
        assert_eq!(lab.dropped(), 0);
    }

    #[test]
    fn over_the_count_cap_the_oldest_go_first() {
        let lab = Lab::new(2, 1000, LONG);
        lab.park("a", 1, true);
        lab.park("b", 1, true);
        lab.park("c", 1, true);
        assert!(lab.parked.committed_size("a").is_none());
        assert!(lab.parked.committed_size("b").is_some());
        assert!(lab.parked.committed_size("c").is_some());
        assert_eq!((lab.dropped(), lab.drops.load(Ordering::SeqCst)), (1, 1));
    }

    #[test]
    fn over_the_byte_cap_the_oldest_go_first() {
        let lab = Lab::new(10, 100, LONG);
        lab.park("a", 40, true);
        lab.park("b", 40, true);
        lab.park("c", 40, true);
        assert!(lab.parked.committed_size("a").is_none());
        assert_eq!(lab.parked.occupancy(), (2, 80));
        lab.park("huge", 101, true);
        assert!(lab.parked.committed_size("huge").is_none());
        assert_eq!(lab.parked.occupancy(), (2, 80), "the others stay");
        assert_eq!(lab.dropped(), 2);
    }

    #[test]
    fn an_upload_that_cannot_be_resumed_is_dropped_not_parked() {
        let lab = Lab::new(10, 100, LONG);
        lab.park("a", 10, false);
        assert!(lab.parked.committed_size("a").is_none());
        assert_eq!((lab.dropped(), lab.drops.load(Ordering::SeqCst)), (1, 1));
    }

    #[test]
    fn expired_uploads_are_dropped() {
        let lab = Lab::new(10, 100, Duration::ZERO);
        lab.park("a", 10, true);
        assert!(lab.parked.committed_size("a").is_none());
        assert!(lab.parked.take("a").is_none());
        assert_eq!(lab.dropped(), 1);
    }

    #[test]
    fn reclaim_drops_the_oldest_until_enough_is_freed() {
        let lab = Lab::new(10, 1000, LONG);
        for name in ["a", "b", "c"] {
            lab.park(name, 30, true);
        }
        let parked = Arc::new(lab.parked);
        let reclaim = parked.reclaimer();
        reclaim(50);
        assert!(parked.committed_size("a").is_none());
        assert!(parked.committed_size("b").is_none());
        assert_eq!(parked.committed_size("c"), Some(30));
        assert_eq!(Stats::get(&lab.stats.parked_uploads_dropped), 2);
        reclaim(1000);
        assert_eq!(parked.occupancy(), (0, 0));
    }
}
