//! The quota: the in-memory LRU index of everything the local store holds.
//!
//! It answers existence checks without touching disk, orders entries by last
//! use for eviction, counts bytes against the quota, and knows which entries
//! are pinned (being read) so that eviction skips them. Bytes of writes in
//! progress are *reserved* before they arrive (a bounded window ahead of
//! what was received, grown as the bytes come), so concurrent writes can
//! never overshoot the quota together, and a write that declares a large
//! size but sends little holds little.
//!
//! [`Index`] is plain data; [`SharedIndex`] puts it behind the lock that also
//! serialises commits against eviction, and hands out the guards
//! ([`Reservation`], [`PinGuard`]) that give back what they hold when dropped.
//! Nothing here touches disk: choosing victims is this module's job, deleting
//! their bytes is the caller's.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};

use lru::LruCache;

use crate::error::{Error, Result};

/// Where an entry's bytes live.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EntryKind {
    /// A small blob stored as a RocksDB value.
    InlineBlob,
    /// A large blob stored as a file beside RocksDB.
    FileBlob,
    /// An encoded ActionResult.
    ActionResult,
    /// An encoded Remote Asset entry ([`crate::store::asset_index::AssetRecord`]).
    Asset,
    /// A small blob stored zstd-compressed as a RocksDB value (its size
    /// counts the compressed bytes).
    InlineZstd,
    /// A large blob stored zstd-compressed as a file (`…-SIZE.zst`; its
    /// size counts the bytes on disk).
    FileZstd,
}

impl EntryKind {
    /// Whether the entry is a blob, in any form.
    pub fn is_blob(self) -> bool {
        !matches!(self, EntryKind::ActionResult | EntryKind::Asset)
    }

    /// Whether the blob's bytes are a file beside RocksDB.
    pub fn is_file(self) -> bool {
        matches!(self, EntryKind::FileBlob | EntryKind::FileZstd)
    }

    /// Whether the blob is stored zstd-compressed.
    pub fn is_zstd(self) -> bool {
        matches!(self, EntryKind::InlineZstd | EntryKind::FileZstd)
    }
}

/// What the index knows about one stored entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Entry {
    /// Where the bytes are.
    pub kind: EntryKind,
    /// Bytes counted against the quota: the bytes on disk (compressed
    /// ones for a compressed blob).
    pub size: u64,
    /// Last access time (unix seconds) as persisted in RocksDB; used to
    /// rebuild the LRU order at start-up and to rate-limit atime writes.
    pub persisted_atime: u64,
}

/// Occupancy figures for `outpost stats`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Occupancy {
    /// Blobs held.
    pub blob_count: u64,
    /// Bytes of blobs held.
    pub blob_bytes: u64,
    /// Action results held.
    pub action_count: u64,
    /// Bytes of action results held.
    pub action_bytes: u64,
    /// Remote Asset entries held.
    pub asset_count: u64,
    /// Bytes of Remote Asset entries held.
    pub asset_bytes: u64,
    /// Bytes reserved by writes in progress.
    pub reserved_bytes: u64,
}

/// LRU order, pins and quota accounting for the local store.
pub struct Index {
    /// Every committed entry, most recently used first.
    lru: LruCache<Vec<u8>, Entry>,
    /// Pin counts of entries that are being read and must not be evicted.
    pins: HashMap<Vec<u8>, usize>,
    /// Running totals, kept so stats and quota checks are O(1).
    occupancy: Occupancy,
    /// The byte budget for committed plus reserved bytes.
    quota: u64,
}

impl Index {
    /// An empty index with a byte quota.
    pub fn new(quota: u64) -> Self {
        Index {
            lru: LruCache::unbounded(),
            pins: HashMap::new(),
            occupancy: Occupancy::default(),
            quota,
        }
    }

    /// The configured quota.
    pub fn quota(&self) -> u64 {
        self.quota
    }

    /// Current occupancy.
    pub fn occupancy(&self) -> Occupancy {
        self.occupancy
    }

    fn used(&self) -> u64 {
        let o = &self.occupancy;
        o.blob_bytes + o.action_bytes + o.asset_bytes + o.reserved_bytes
    }

    /// Adds (or replaces) an entry as most recently used.
    pub fn insert(&mut self, key: Vec<u8>, entry: Entry) {
        if let Some(old) = self.lru.put(key, entry) {
            self.account(old, false);
        }
        self.account(entry, true);
    }

    fn account(&mut self, entry: Entry, add: bool) {
        let o = &mut self.occupancy;
        let (count, bytes) = match entry.kind {
            EntryKind::InlineBlob
            | EntryKind::FileBlob
            | EntryKind::InlineZstd
            | EntryKind::FileZstd => (&mut o.blob_count, &mut o.blob_bytes),
            EntryKind::ActionResult => (&mut o.action_count, &mut o.action_bytes),
            EntryKind::Asset => (&mut o.asset_count, &mut o.asset_bytes),
        };
        if add {
            *count += 1;
            *bytes += entry.size;
        } else {
            *count -= 1;
            *bytes -= entry.size;
        }
    }

    /// Looks an entry up and marks it most recently used.
    pub fn touch(&mut self, key: &[u8]) -> Option<&mut Entry> {
        self.lru.get_mut(key)
    }

    /// Looks an entry up without changing the LRU order (what eviction
    /// left; whether a blob is still stored raw, for the compactor).
    pub fn peek(&self, key: &[u8]) -> Option<&Entry> {
        self.lru.peek(key)
    }

    /// Replaces a present entry's value where it stands in the LRU order
    /// (a blob compressed at rest is no more recently used for it).
    pub fn replace_in_place(&mut self, key: &[u8], entry: Entry) {
        let Some(slot) = self.lru.peek_mut(key) else {
            return;
        };
        let old = std::mem::replace(slot, entry);
        self.account(old, false);
        self.account(entry, true);
    }

    /// Forgets an entry (the caller deletes its bytes).
    pub fn remove(&mut self, key: &[u8]) -> Option<Entry> {
        let entry = self.lru.pop(key)?;
        self.account(entry, false);
        Some(entry)
    }

    /// Protects an entry from eviction until [`Index::unpin`].
    pub fn pin(&mut self, key: &[u8]) {
        *self.pins.entry(key.to_vec()).or_default() += 1;
    }

    /// Releases one pin.
    pub fn unpin(&mut self, key: &[u8]) {
        if let Some(count) = self.pins.get_mut(key) {
            *count -= 1;
            if *count == 0 {
                self.pins.remove(key);
            }
        }
    }

    /// Reserves `bytes` for a write, choosing least recently used, unpinned
    /// entries to evict until the reservation fits. The victims are already
    /// removed from the index; the caller must delete their bytes.
    /// RESOURCE_EXHAUSTED when even evicting everything evictable is not enough.
    pub fn reserve(&mut self, bytes: u64) -> Result<Vec<(Vec<u8>, Entry)>> {
        if bytes > self.quota {
            return Err(Error::ResourceExhausted(format!(
                "a {bytes}-byte blob does not fit in the {}-byte store quota",
                self.quota
            )));
        }
        let victims = self.evict_until(self.quota - bytes)?;
        self.occupancy.reserved_bytes += bytes;
        Ok(victims)
    }

    /// How many bytes are missing for a reservation of `bytes` to fit
    /// without evicting (0 when it fits).
    pub fn shortfall(&self, bytes: u64) -> u64 {
        (self.used() + bytes).saturating_sub(self.quota)
    }

    /// Returns an unused reservation.
    pub fn release(&mut self, bytes: u64) {
        self.occupancy.reserved_bytes -= bytes;
    }

    /// Evicts until committed plus reserved bytes are at most `target`.
    pub fn evict_until(&mut self, target: u64) -> Result<Vec<(Vec<u8>, Entry)>> {
        let mut victims: Vec<(Vec<u8>, Entry)> = Vec::new();
        while self.used() > target {
            let Some(key) = self
                .lru
                .iter()
                .rev()
                .find(|(key, _)| !self.pins.contains_key(*key))
                .map(|(key, _)| key.clone())
            else {
                // Put the victims back: nothing was deleted yet.
                for (key, entry) in victims.into_iter().rev() {
                    self.insert(key.clone(), entry);
                    self.lru.demote(&key);
                }
                return Err(Error::ResourceExhausted(format!(
                    "store quota of {} bytes is taken by entries in use; retry later",
                    self.quota
                )));
            };
            let entry = self.remove(&key).expect("key was just found");
            victims.push((key, entry));
        }
        Ok(victims)
    }
}

/// The index behind its lock, shared by the store and the guards it hands out.
#[derive(Clone)]
pub struct SharedIndex(Arc<Mutex<Index>>);

impl SharedIndex {
    /// An empty index with a byte quota.
    pub fn new(quota: u64) -> Self {
        SharedIndex(Arc::new(Mutex::new(Index::new(quota))))
    }

    /// Locks the index. Holding the guard also keeps commits and evictions
    /// of the store from interleaving.
    pub fn lock(&self) -> MutexGuard<'_, Index> {
        // A panic while holding the lock leaves the index consistent (every
        // mutation is a single call), so a poisoned lock is still usable.
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Protects `key` from eviction until the guard is dropped.
    pub fn pin(&self, key: &[u8]) -> PinGuard {
        self.lock().pin(key);
        PinGuard {
            index: self.clone(),
            key: key.to_vec(),
        }
    }

    /// Pins `key` only if it is stored (checked under the same lock, so
    /// eviction cannot slip in between): what keeps a queued upload's blob.
    pub fn pin_if_present(&self, key: &[u8]) -> Option<PinGuard> {
        let mut index = self.lock();
        index.lru.peek(key)?;
        index.pin(key);
        Some(PinGuard {
            index: self.clone(),
            key: key.to_vec(),
        })
    }

    /// Takes charge of `bytes` already reserved with [`Index::reserve`], so
    /// they are given back if the write never commits.
    pub fn reservation(&self, bytes: u64) -> Reservation {
        Reservation {
            index: Some(self.clone()),
            bytes,
        }
    }
}

/// Quota held by a write in progress; given back on drop unless consumed by
/// the commit that turns it into stored bytes.
pub struct Reservation {
    /// Where to give the bytes back; `None` once consumed.
    index: Option<SharedIndex>,
    /// The reserved bytes.
    bytes: u64,
}

impl Reservation {
    /// The reserved bytes.
    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    /// Adds a further reservation (of the same index) to this one.
    pub fn absorb(&mut self, mut more: Reservation) {
        self.bytes += more.bytes;
        more.index = None;
    }

    /// Gives back everything above `bytes`.
    pub fn shrink_to(&mut self, bytes: u64) {
        if bytes < self.bytes
            && let Some(index) = &self.index
        {
            index.lock().release(self.bytes - bytes);
            self.bytes = bytes;
        }
    }

    /// Releases the reservation under a lock the caller already holds (the
    /// commit that turns it into stored bytes).
    pub fn consume(mut self, index: &mut Index) {
        index.release(self.bytes);
        self.index = None;
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        if let Some(index) = self.index.take() {
            index.lock().release(self.bytes);
        }
    }
}

/// Keeps an entry from being evicted while a reader uses it.
pub struct PinGuard {
    /// Where the pin is held.
    index: SharedIndex,
    /// The pinned entry.
    key: Vec<u8>,
}

impl Drop for PinGuard {
    fn drop(&mut self) {
        self.index.lock().unpin(&self.key);
    }
}

#[cfg(test)]
mod tests;
