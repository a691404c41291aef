//! Prefetch's score: which prefetched blobs a client then read (hits, or
//! joins when the read came while the transfer was still running) and which
//! were evicted unread (waste).
//!
//! A blob is entered when a prefetch starts its transfer, and leaves on its
//! first client read (a hit if served locally, a join if it waited for the
//! transfer), on eviction (waste, in bytes) or when the transfer fails. The ledger hears of local reads through the read-through's
//! [`ReadHook`] and of evictions through the local store's eviction
//! listener, which it installs.

use std::num::NonZeroUsize;
use std::sync::{Arc, Mutex, MutexGuard};

use lru::LruCache;

use crate::digest::Digest;
use crate::stats::Stats;
use crate::store::local::LocalStore;
use crate::store::read_through::{ReadHook, ReadSource};

/// Prefetched blobs remembered until first read or eviction (bounds memory).
const PREFETCHED_MEMORY: usize = 1 << 20;

/// Prefetched blobs no client has read yet.
pub struct Ledger {
    /// Digest → size, for prefetched blobs not read yet.
    unread: Mutex<LruCache<Digest, u64>>,
    /// Where hits and waste are counted.
    stats: Arc<Stats>,
}

impl Ledger {
    /// An empty ledger, told of `local`'s evictions from now on.
    pub fn new(local: &LocalStore, stats: Arc<Stats>) -> Arc<Self> {
        let capacity = NonZeroUsize::new(PREFETCHED_MEMORY).expect("non-zero");
        let ledger = Arc::new(Ledger {
            unread: Mutex::new(LruCache::new(capacity)),
            stats,
        });
        let listener = ledger.clone();
        local.set_eviction_listener(Arc::new(move |digest, size| {
            listener.evicted(digest, size);
        }));
        ledger
    }

    /// A prefetch started bringing `digest` in.
    pub fn started(&self, digest: &Digest) {
        self.unread().put(*digest, digest.size);
    }

    /// The prefetch of `digest` failed: nothing to score.
    pub fn failed(&self, digest: &Digest) {
        self.unread().pop(digest);
    }

    /// The local store evicted `digest`: waste if it was never read.
    fn evicted(&self, digest: &Digest, size: u64) {
        if self.unread().pop(digest).is_some() {
            Stats::add(&self.stats.prefetch_wasted_bytes, size);
        }
    }

    fn unread(&self) -> MutexGuard<'_, LruCache<Digest, u64>> {
        self.unread.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl ReadHook for Ledger {
    /// A client's first read of a prefetched blob is a hit, or a join when
    /// it had to wait for the prefetch's transfer.
    fn client_read(&self, digest: &Digest, source: ReadSource) {
        if self.unread().pop(digest).is_none() {
            return;
        }
        match source {
            ReadSource::Local => Stats::add(&self.stats.prefetch_hits, 1),
            ReadSource::Upstream => Stats::add(&self.stats.prefetch_joins, 1),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::digest::DigestFunction;
    use crate::store::local::LocalStoreOptions;

    #[tokio::test]
    async fn a_prefetched_blob_scores_once() {
        let dir = tempfile::tempdir().unwrap();
        let options = LocalStoreOptions {
            dir: dir.path().to_path_buf(),
            quota_bytes: 1 << 30,
            inline_limit: 1 << 20,
            sync: false,
        };
        let stats = Arc::new(Stats::default());
        let local = LocalStore::open(options, stats.clone()).unwrap();
        let ledger = Ledger::new(&local, stats.clone());
        let (read, joined, evicted, failed) = (
            Digest::of(DigestFunction::Sha256, b"read"),
            Digest::of(DigestFunction::Sha256, b"joined"),
            Digest::of(DigestFunction::Sha256, b"evicted"),
            Digest::of(DigestFunction::Sha256, b"failed"),
        );
        for d in [&read, &joined, &evicted, &failed] {
            ledger.started(d);
        }
        ledger.failed(&failed);
        ledger.client_read(&read, ReadSource::Local);
        ledger.client_read(&read, ReadSource::Local);
        ledger.client_read(&joined, ReadSource::Upstream);
        ledger.client_read(&joined, ReadSource::Local);
        ledger.client_read(&failed, ReadSource::Local);
        ledger.evicted(&evicted, 7);
        ledger.evicted(&read, 4);
        assert_eq!(Stats::get(&stats.prefetch_hits), 1);
        assert_eq!(Stats::get(&stats.prefetch_joins), 1);
        assert_eq!(Stats::get(&stats.prefetch_wasted_bytes), 7);
    }
}
