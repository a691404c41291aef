//! The in-memory LRU index of everything the local store holds.
//!
//! It answers existence checks without touching disk, orders entries by last
//! use for eviction, counts bytes against the quota, and knows which entries
//! are pinned (being read) so that eviction skips them. Bytes of writes in
//! progress are *reserved* up front, so a write never has to evict while it
//! streams and concurrent writes can never overshoot the quota together.

use std::collections::HashMap;

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
}

impl EntryKind {
    /// Stable one-byte tag for the persisted index; never renumber.
    pub fn tag(self) -> u8 {
        match self {
            EntryKind::InlineBlob => 0,
            EntryKind::FileBlob => 1,
            EntryKind::ActionResult => 2,
        }
    }

    /// Inverse of [`EntryKind::tag`].
    pub fn from_tag(tag: u8) -> Option<Self> {
        match tag {
            0 => Some(EntryKind::InlineBlob),
            1 => Some(EntryKind::FileBlob),
            2 => Some(EntryKind::ActionResult),
            _ => None,
        }
    }

    fn is_blob(self) -> bool {
        self != EntryKind::ActionResult
    }
}

/// What the index knows about one stored entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Entry {
    /// Where the bytes are.
    pub kind: EntryKind,
    /// Bytes counted against the quota.
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
        self.occupancy.blob_bytes + self.occupancy.action_bytes + self.occupancy.reserved_bytes
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
        let (count, bytes) = if entry.kind.is_blob() {
            (&mut o.blob_count, &mut o.blob_bytes)
        } else {
            (&mut o.action_count, &mut o.action_bytes)
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

    /// Looks an entry up without changing the LRU order.
    pub fn peek(&self, key: &[u8]) -> Option<&Entry> {
        self.lru.peek(key)
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

#[cfg(test)]
mod tests {
    use super::*;

    fn blob(size: u64) -> Entry {
        Entry {
            kind: EntryKind::InlineBlob,
            size,
            persisted_atime: 0,
        }
    }

    #[test]
    fn evicts_least_recently_used_first() {
        let mut index = Index::new(100);
        index.insert(b"a".to_vec(), blob(40));
        index.insert(b"b".to_vec(), blob(40));
        index.touch(b"a");
        let victims = index.reserve(40).unwrap();
        assert_eq!(victims.len(), 1);
        assert_eq!(victims[0].0, b"b".to_vec());
        assert!(index.peek(b"a").is_some());
        assert_eq!(index.occupancy().reserved_bytes, 40);
    }

    #[test]
    fn pinned_entries_are_never_evicted() {
        let mut index = Index::new(100);
        index.insert(b"a".to_vec(), blob(50));
        index.insert(b"b".to_vec(), blob(40));
        index.pin(b"a");
        let victims = index.reserve(50).unwrap();
        assert_eq!(victims[0].0, b"b".to_vec());
        let err = index.reserve(50).unwrap_err();
        assert!(matches!(err, Error::ResourceExhausted(_)));
        assert!(index.peek(b"a").is_some(), "pinned entry survives");
        index.unpin(b"a");
        index.release(50);
        assert_eq!(index.reserve(60).unwrap()[0].0, b"a".to_vec());
    }

    #[test]
    fn failed_reservation_keeps_every_entry() {
        let mut index = Index::new(100);
        index.insert(b"a".to_vec(), blob(30));
        index.insert(b"b".to_vec(), blob(30));
        index.insert(b"c".to_vec(), blob(30));
        index.pin(b"c");
        assert!(index.reserve(80).is_err());
        assert_eq!(index.occupancy().blob_count, 3);
        assert_eq!(index.occupancy().blob_bytes, 90);
        // LRU order is unchanged: `a` is still the first victim.
        assert_eq!(index.reserve(20).unwrap()[0].0, b"a".to_vec());
    }

    #[test]
    fn oversized_reservation_is_refused() {
        let mut index = Index::new(10);
        assert!(matches!(
            index.reserve(11),
            Err(Error::ResourceExhausted(_))
        ));
    }

    #[test]
    fn replacing_an_entry_keeps_totals_right() {
        let mut index = Index::new(100);
        index.insert(b"a".to_vec(), blob(10));
        index.insert(b"a".to_vec(), blob(20));
        assert_eq!(index.occupancy().blob_count, 1);
        assert_eq!(index.occupancy().blob_bytes, 20);
        index.remove(b"a");
        assert_eq!(index.occupancy(), Occupancy::default());
    }
}
