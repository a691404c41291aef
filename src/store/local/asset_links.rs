//! Which asset entries keep which blobs alive, so that a blob leaving the
//! store (evicted, removed, found broken) drops every asset entry naming it
//! at once, in the same locked operation and write batch.
//!
//! Only the digests an [`AssetRecord`] names directly are tracked
//! ([`AssetRecord::kept_alive`]: the blob or root Directory, the referenced
//! blobs, the referenced directories' roots). The inner nodes and files of a
//! referenced tree are not: the asset layer checks whole trees when it
//! serves a Fetch, and drops the entry if any part is gone.
//!
//! Plain data like [`Index`]; the catalog keeps it behind its own mutex,
//! locked only while the index lock is held (index first, then links), so
//! the two never disagree and never deadlock.

use std::collections::{HashMap, HashSet};

use super::db::blob_key;
use super::quota::{Entry, EntryKind, Index};
use crate::error::Result;
use crate::store::asset_index::AssetRecord;

/// The blob keys (`index` keys) an asset record keeps alive. The empty blob
/// is left out: every CAS holds it, so it is never evicted.
pub fn kept_blob_keys(record: &AssetRecord) -> Result<Vec<Vec<u8>>> {
    Ok(record
        .kept_alive()?
        .iter()
        .filter(|d| !d.is_empty_blob())
        .map(blob_key)
        .collect())
}

/// An asset record as read at start-up or on a lookup: `Err(why)` when it
/// is missing or does not decode (an `Err` around it is a RocksDB failure).
pub type RecordRead = std::result::Result<AssetRecord, String>;

/// What start-up makes of the stored asset entries.
pub struct Loaded {
    /// The links of the entries kept.
    pub links: AssetLinks,
    /// Entries to drop: the record is missing, does not decode, holds a bad
    /// digest or names a blob no longer stored.
    pub dropped: HashSet<Vec<u8>>,
    /// How many of those were dropped for naming a blob no longer stored.
    pub lost_content: u64,
}

/// Asset key ↔ blob keys, both ways (all `index` keys).
#[derive(Default)]
pub struct AssetLinks {
    /// Blob key → the asset entries that keep it alive.
    by_blob: HashMap<Vec<u8>, HashSet<Vec<u8>>>,
    /// Asset key → the blob keys it keeps alive.
    by_asset: HashMap<Vec<u8>, Vec<Vec<u8>>>,
}

impl AssetLinks {
    /// Links every asset entry among `entries` (all `index` entries, sorted
    /// by key) whose record `read` gives, keeps alive only stored blobs.
    pub fn load(
        entries: &[(Vec<u8>, Entry)],
        mut read: impl FnMut(&[u8]) -> Result<RecordRead>,
    ) -> Result<Loaded> {
        let is_stored = |key: &Vec<u8>| {
            entries
                .binary_search_by(|(k, _)| k.as_slice().cmp(key))
                .is_ok()
        };
        let mut loaded = Loaded {
            links: AssetLinks::default(),
            dropped: HashSet::new(),
            lost_content: 0,
        };
        for (key, _) in entries.iter().filter(|(_, e)| e.kind == EntryKind::Asset) {
            let kept = read(key)?.and_then(|r| kept_blob_keys(&r).map_err(|e| e.to_string()));
            match kept {
                Ok(kept) if kept.iter().all(is_stored) => loaded.links.link(key.clone(), kept),
                Ok(_) => {
                    loaded.lost_content += 1;
                    loaded.dropped.insert(key.clone());
                }
                Err(why) => {
                    tracing::warn!("dropping asset entry: {why}");
                    loaded.dropped.insert(key.clone());
                }
            }
        }
        Ok(loaded)
    }

    /// Records that `asset` keeps `blobs` alive, replacing what it kept before.
    pub fn link(&mut self, asset: Vec<u8>, blobs: Vec<Vec<u8>>) {
        self.unlink(&asset);
        for blob in &blobs {
            self.by_blob
                .entry(blob.clone())
                .or_default()
                .insert(asset.clone());
        }
        self.by_asset.insert(asset, blobs);
    }

    /// Forgets what `asset` kept alive (it is gone).
    pub fn unlink(&mut self, asset: &[u8]) {
        let Some(blobs) = self.by_asset.remove(asset) else {
            return;
        };
        for blob in blobs {
            if let Some(assets) = self.by_blob.get_mut(&blob) {
                assets.remove(asset);
                if assets.is_empty() {
                    self.by_blob.remove(&blob);
                }
            }
        }
    }

    /// Unlinks and returns the asset entries that keep `blob` alive.
    fn take_dependents(&mut self, blob: &[u8]) -> Vec<Vec<u8>> {
        let assets: Vec<Vec<u8>> = self
            .by_blob
            .get(blob)
            .map(|set| set.iter().cloned().collect())
            .unwrap_or_default();
        for asset in &assets {
            self.unlink(asset);
        }
        assets
    }

    /// For entries just removed from `index` (`gone`): forgets the links of
    /// the asset entries among them, and removes from `index` and returns
    /// every asset entry that kept one of the blobs among them alive (the
    /// caller deletes their bytes with the rest).
    pub fn cascade(
        &mut self,
        index: &mut Index,
        gone: &[(Vec<u8>, Entry)],
    ) -> Vec<(Vec<u8>, Entry)> {
        let mut dropped = Vec::new();
        for (key, entry) in gone {
            if entry.kind == EntryKind::Asset {
                self.unlink(key);
                continue;
            }
            for asset in self.take_dependents(key) {
                if let Some(asset_entry) = index.remove(&asset) {
                    dropped.push((asset, asset_entry));
                }
            }
        }
        dropped
    }

    /// How many asset entries have links (tests check the map is rebuilt).
    #[cfg(test)]
    pub fn assets(&self) -> usize {
        self.by_asset.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(kind: EntryKind) -> Entry {
        Entry {
            kind,
            size: 10,
            persisted_atime: 0,
        }
    }

    fn keys(entries: &[(Vec<u8>, Entry)]) -> Vec<Vec<u8>> {
        let mut keys: Vec<Vec<u8>> = entries.iter().map(|(k, _)| k.clone()).collect();
        keys.sort();
        keys
    }

    #[test]
    fn a_gone_blob_drops_exactly_the_assets_that_name_it() {
        let mut index = Index::new(1000);
        let mut links = AssetLinks::default();
        for asset in [b"s1", b"s2", b"s3"] {
            index.insert(asset.to_vec(), entry(EntryKind::Asset));
        }
        links.link(b"s1".to_vec(), vec![b"b1".to_vec(), b"b2".to_vec()]);
        links.link(b"s2".to_vec(), vec![b"b2".to_vec()]);
        links.link(b"s3".to_vec(), vec![b"b3".to_vec()]);
        let gone = vec![(b"b2".to_vec(), entry(EntryKind::InlineBlob))];
        let dropped = links.cascade(&mut index, &gone);
        assert_eq!(keys(&dropped), vec![b"s1".to_vec(), b"s2".to_vec()]);
        assert_eq!(index.occupancy().asset_count, 1);
        assert_eq!(links.assets(), 1);
        // s1's other link went with it: b1 leaving now drops nothing.
        let gone = vec![(b"b1".to_vec(), entry(EntryKind::FileBlob))];
        assert!(links.cascade(&mut index, &gone).is_empty());
        assert!(links.by_blob.keys().all(|k| k == b"b3"));
    }

    #[test]
    fn an_asset_gone_with_its_blob_is_not_dropped_twice() {
        let mut index = Index::new(1000);
        let mut links = AssetLinks::default();
        links.link(b"s1".to_vec(), vec![b"b1".to_vec()]);
        let gone = vec![
            (b"b1".to_vec(), entry(EntryKind::InlineBlob)),
            (b"s1".to_vec(), entry(EntryKind::Asset)),
        ];
        assert!(links.cascade(&mut index, &gone).is_empty());
        assert_eq!(links.assets(), 0);
        assert!(links.by_blob.is_empty());
    }

    #[test]
    fn relinking_replaces_the_old_links() {
        let mut index = Index::new(1000);
        let mut links = AssetLinks::default();
        index.insert(b"s1".to_vec(), entry(EntryKind::Asset));
        links.link(b"s1".to_vec(), vec![b"old".to_vec()]);
        links.link(b"s1".to_vec(), vec![b"new".to_vec()]);
        let old = vec![(b"old".to_vec(), entry(EntryKind::InlineBlob))];
        assert!(links.cascade(&mut index, &old).is_empty());
        let new = vec![(b"new".to_vec(), entry(EntryKind::InlineBlob))];
        assert_eq!(keys(&links.cascade(&mut index, &new)), vec![b"s1".to_vec()]);
    }
}
