//! What the local store holds, kept in step across the in-memory index,
//! RocksDB and the blob files. Every change goes through here, under the
//! index lock, which is what keeps the crash-safety and quota invariants:
//!
//! - A blob becomes visible only when its `index` entry is written, in the
//!   same RocksDB write batch as its inline bytes, or after its verified file
//!   was renamed into place. RocksDB's write-ahead log survives a killed
//!   process, so every committed blob is there after a restart; start-up
//!   deletes files that never got an index entry, and entries whose file is
//!   gone.
//! - Eviction deletes its victims' bytes under the index lock, so a
//!   concurrent commit of the same key cannot interleave (a file is only
//!   renamed into `tmp/` there; [`FileArea::remove`] unlinks it later).
//! - The last access is written back at most once per
//!   [`ATIME_GRANULARITY_SECS`], so reads do not turn into a write each.
//! - Whenever a blob entry leaves (eviction, removal, found broken), the
//!   asset entries that keep it alive ([`AssetLinks`]) leave with it, in the
//!   same locked operation and write batch. Lock order: index, then links.

use std::collections::HashSet;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{SystemTime, UNIX_EPOCH};

use bazel_remote_apis::build::bazel::remote::execution::v2::ActionResult;
use prost::Message;

use super::asset_links::{AssetLinks, RecordRead, kept_blob_keys};
use super::db::{Batch, Db, blob_key, parse_blob_key};
use super::files::{FileArea, Form, TempFile};
use super::quota::{Entry, EntryKind, Index, Occupancy, PinGuard, Reservation, SharedIndex};
use super::writer::InlineBytes;
use crate::digest::{Digest, DigestFunction};
use crate::error::{Error, Result};
use crate::stats::Stats;
use crate::store::asset_index::AssetRecord;

/// Persist a newer access time only when the stored one is older than this,
/// so reads do not turn into a write each.
const ATIME_GRANULARITY_SECS: u64 = 60;

/// Called with each blob evicted to stay under the quota.
pub type EvictionListener = Arc<dyn Fn(&Digest, u64) + Send + Sync>;

/// Asked to free at least this many bytes of quota held outside the index
/// (parked uploads), before any stored entry is evicted. Called without the
/// index lock, since what it drops gives its reservation back.
pub type Reclaimer = Arc<dyn Fn(u64) + Send + Sync>;

/// The local store's contents: index, RocksDB and files, changed together.
pub struct Catalog {
    /// CAS index, inline blobs and action results.
    db: Db,
    /// Large blobs.
    files: FileArea,
    /// LRU order, pins and quota; its lock also serialises commits against
    /// eviction.
    index: SharedIndex,
    /// Counters for `outpost stats`.
    stats: Arc<Stats>,
    /// Told about every blob evicted to make room (prefetch bookkeeping).
    eviction_listener: Mutex<Option<EvictionListener>>,
    /// Frees quota held by parked uploads before anything is evicted.
    reclaimer: Mutex<Option<Reclaimer>>,
    /// Which asset entries keep which blobs alive; locked only under the
    /// index lock.
    links: Mutex<AssetLinks>,
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn not_found(digest: &Digest) -> Error {
    Error::NotFound(format!("blob {digest} not found"))
}

fn damaged(digest: &Digest) -> Error {
    Error::NotFound(format!("blob {digest} is damaged in the local store"))
}

/// The entry kind of a blob file in `form`.
fn file_kind(form: Form) -> EntryKind {
    match form {
        Form::Plain => EntryKind::FileBlob,
        Form::Zstd => EntryKind::FileZstd,
    }
}

/// The form of the file of a file blob entry of `kind`.
pub fn file_form(kind: EntryKind) -> Form {
    if kind.is_zstd() {
        Form::Zstd
    } else {
        Form::Plain
    }
}

/// The entry kind of an inline blob stored as `inline`.
fn inline_kind(inline: &InlineBytes) -> EntryKind {
    if inline.zstd {
        EntryKind::InlineZstd
    } else {
        EntryKind::InlineBlob
    }
}

mod blob_commits;
mod blob_reads;

impl Catalog {
    /// Rebuilds the index from RocksDB, reconciles it with the blob files,
    /// and evicts down to `quota_bytes` (the quota may have shrunk).
    pub fn open(db: Db, files: FileArea, quota_bytes: u64, stats: Arc<Stats>) -> Result<Self> {
        let catalog = Catalog {
            db,
            files,
            index: SharedIndex::new(quota_bytes),
            stats,
            eviction_listener: Mutex::new(None),
            reclaimer: Mutex::new(None),
            links: Mutex::new(AssetLinks::default()),
        };
        catalog.load()?;
        Ok(catalog)
    }

    fn load(&self) -> Result<()> {
        let mut entries = Vec::new();
        let mut batch = self.db.batch();
        for (key, entry) in self.db.scan_index()? {
            match entry {
                Some(entry) => entries.push((key, entry)),
                None => batch.delete_entry(&key),
            }
        }
        // Files without an index entry were renamed in but never committed.
        let mut with_file = HashSet::new();
        // A file must be in the form its entry names (a plain file and a
        // `.zst` one of the same blob are never both committed).
        for (found, path) in self.files.list()? {
            let key = found.map(|(d, _)| blob_key(&d));
            let kind = found.map(|(_, form)| file_kind(form));
            let indexed = key.as_ref().is_some_and(|k| {
                entries
                    .binary_search_by(|(ek, _)| ek.as_slice().cmp(k))
                    .is_ok_and(|i| Some(entries[i].1.kind) == kind)
            });
            if indexed {
                with_file.insert(key.expect("indexed implies a key"));
            } else {
                tracing::info!("removing uncommitted blob file {}", path.display());
                std::fs::remove_file(&path)?;
            }
        }
        // Index entries whose file vanished (e.g. deleted by hand) are dropped.
        entries.retain(|(key, entry)| {
            let keep = !entry.kind.is_file() || with_file.contains(key);
            if !keep {
                batch.delete_entry(key);
            }
            keep
        });
        self.load_links(&mut entries, &mut batch)?;
        batch.write_unsynced()?;
        entries.sort_by_key(|(_, entry)| entry.persisted_atime);
        let mut index = self.index.lock();
        for (key, entry) in entries {
            index.insert(key, entry);
        }
        let quota = index.quota();
        let victims = index.evict_until(quota)?;
        self.delete_victims(&mut index, victims)?;
        let o = index.occupancy();
        tracing::info!(
            blobs = o.blob_count,
            blob_bytes = o.blob_bytes,
            action_results = o.action_count,
            asset_entries = o.asset_count,
            quota,
            "local store loaded"
        );
        Ok(())
    }

    /// Links every asset entry among `entries` (sorted by key) to the blobs
    /// it keeps alive, dropping those [`AssetLinks::load`] refuses.
    fn load_links(&self, entries: &mut Vec<(Vec<u8>, Entry)>, batch: &mut Batch<'_>) -> Result<()> {
        let loaded = AssetLinks::load(entries, |key| self.asset_record(key))?;
        entries.retain(|(key, _)| {
            let keep = !loaded.dropped.contains(key);
            if !keep {
                batch.delete(key, EntryKind::Asset);
            }
            keep
        });
        *self.links() = loaded.links;
        Stats::add(&self.stats.asset_entries_dropped, loaded.lost_content);
        Ok(())
    }

    /// The links, locked; call with the index lock held (or while opening).
    fn links(&self) -> MutexGuard<'_, AssetLinks> {
        self.links.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Occupancy and quota, for stats.
    pub fn occupancy(&self) -> (Occupancy, u64) {
        let index = self.index.lock();
        (index.occupancy(), index.quota())
    }

    /// Registers the function told about evicted blobs (one at a time).
    pub fn set_eviction_listener(&self, listener: EvictionListener) {
        *self
            .eviction_listener
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = Some(listener);
    }

    /// Registers the function asked to free quota before eviction.
    pub fn set_reclaimer(&self, reclaimer: Reclaimer) {
        *self.reclaimer.lock().unwrap_or_else(|e| e.into_inner()) = Some(reclaimer);
    }

    /// Pins a stored blob against eviction; `None` when it is not stored.
    pub fn pin_stored(&self, digest: &Digest) -> Option<PinGuard> {
        self.index.pin_if_present(&blob_key(digest))
    }

    /// The database, for records kept beside the entries (the upload queue).
    pub fn db(&self) -> &Db {
        &self.db
    }

    /// The blob files (for verification: [`super::scrub`]).
    pub fn files(&self) -> &FileArea {
        &self.files
    }

    /// Flushes RocksDB's memtables.
    pub fn flush(&self) -> Result<()> {
        self.db.flush()
    }

    /// A new temporary file for a large blob's write.
    pub fn create_temp(&self) -> Result<TempFile> {
        self.files.create_temp()
    }

    /// Whether `key` is stored, marking it used (its access time is not
    /// persisted: the write that asks is about to use it anyway).
    pub fn mark_used(&self, key: &[u8]) -> bool {
        self.index.lock().touch(key).is_some()
    }

    /// Reserves quota for a write, evicting as needed (see
    /// [`super::quota::Index::reserve`]); when the quota is short, the
    /// reclaimer (parked uploads) is asked first, outside the lock.
    pub fn reserve(&self, bytes: u64) -> Result<Reservation> {
        let short = self.index.lock().shortfall(bytes);
        if short > 0 {
            let reclaimer = self
                .reclaimer
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .clone();
            if let Some(reclaim) = reclaimer {
                reclaim(short);
            }
        }
        let mut index = self.index.lock();
        let victims = index.reserve(bytes)?;
        if let Err(e) = self.delete_victims(&mut index, victims) {
            index.release(bytes);
            return Err(e);
        }
        Ok(self.index.reservation(bytes))
    }

    /// Deletes evicted entries' bytes (and the asset entries they drop) and
    /// counts them as evictions.
    fn delete_victims(&self, index: &mut Index, victims: Vec<(Vec<u8>, Entry)>) -> Result<()> {
        self.delete_entries(index, &victims)?;
        let listener = self
            .eviction_listener
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        if let Some(listener) = listener {
            for (key, entry) in &victims {
                if let Some(digest) = parse_blob_key(key) {
                    listener(&digest, entry.size);
                }
            }
        }
        let bytes: u64 = victims.iter().map(|(_, e)| e.size).sum();
        Stats::add(&self.stats.evicted_entries, victims.len() as u64);
        Stats::add(&self.stats.evicted_bytes, bytes);
        if !victims.is_empty() {
            tracing::debug!(
                entries = victims.len(),
                bytes,
                "evicted to stay under quota"
            );
        }
        Ok(())
    }

    /// Deletes the bytes of entries already removed from the index, and
    /// drops (from the index too, in the same batch) every asset entry that
    /// keeps one of them alive. Called with the index lock held, so a
    /// concurrent commit of the same key cannot interleave.
    fn delete_entries(&self, index: &mut Index, victims: &[(Vec<u8>, Entry)]) -> Result<()> {
        if victims.is_empty() {
            return Ok(());
        }
        let dropped = self.links().cascade(index, victims);
        let mut batch = self.db.batch();
        for (key, entry) in victims.iter().chain(&dropped) {
            batch.delete(key, entry.kind);
        }
        batch.commit()?;
        if !dropped.is_empty() {
            Stats::add(&self.stats.asset_entries_dropped, dropped.len() as u64);
            tracing::debug!(
                entries = dropped.len(),
                "dropped asset entries whose content left the store"
            );
        }
        for (key, entry) in victims {
            if entry.kind.is_file()
                && let Some(digest) = parse_blob_key(key)
            {
                self.files.remove(&digest, file_form(entry.kind))?;
            }
        }
        Ok(())
    }

    /// Stores an ActionResult; it counts against the quota like a blob.
    pub fn put_action(&self, key: Vec<u8>, result: &ActionResult) -> Result<()> {
        let bytes = result.encode_to_vec();
        self.put_value(key, EntryKind::ActionResult, &bytes, None)
    }

    /// Stores (or replaces) an asset record; it counts against the quota
    /// like a blob. The blobs it keeps alive are marked used first, so the
    /// room made for it is not taken from them; whether they are all
    /// present is the asset layer's to check when it serves the entry.
    pub fn put_asset(&self, key: Vec<u8>, record: &AssetRecord) -> Result<()> {
        let kept = kept_blob_keys(record)?;
        self.touch_many(&kept)?;
        let bytes = record.encode_to_vec();
        self.put_value(key, EntryKind::Asset, &bytes, Some(kept))
    }

    /// Reserves room for an encoded value and writes it with its `index`
    /// entry in one batch, replacing the entry under the same key; an asset
    /// record is linked to the blob keys it keeps alive.
    fn put_value(
        &self,
        key: Vec<u8>,
        kind: EntryKind,
        bytes: &[u8],
        kept: Option<Vec<Vec<u8>>>,
    ) -> Result<()> {
        let reservation = self.reserve(bytes.len() as u64)?;
        let entry = Entry {
            kind,
            size: bytes.len() as u64,
            persisted_atime: now_secs(),
        };
        let mut index = self.index.lock();
        let mut batch = self.db.batch();
        batch.put_value(&key, kind, bytes);
        batch.put_entry(&key, &entry);
        batch.commit()?;
        reservation.consume(&mut index);
        if let Some(kept) = kept {
            self.links().link(key.clone(), kept);
        }
        index.insert(key, entry);
        Ok(())
    }

    /// Marks `keys` used; returns which were present. Persists access times
    /// that have gone stale, outside the lock.
    pub fn touch_many<K: AsRef<[u8]>>(&self, keys: &[K]) -> Result<Vec<Option<Entry>>> {
        let now = now_secs();
        let mut stale_atimes = Vec::new();
        let found = {
            let mut index = self.index.lock();
            keys.iter()
                .map(|key| {
                    let entry = index.touch(key.as_ref())?;
                    if entry.persisted_atime + ATIME_GRANULARITY_SECS <= now {
                        entry.persisted_atime = now;
                        stale_atimes.push((key.as_ref().to_vec(), *entry));
                    }
                    Some(*entry)
                })
                .collect()
        };
        if !stale_atimes.is_empty() {
            let mut batch = self.db.batch();
            for (key, entry) in &stale_atimes {
                batch.put_entry(key, entry);
            }
            batch.write_unsynced()?;
        }
        Ok(found)
    }

    /// Marks `key` used; its entry if present.
    pub fn touch(&self, key: &[u8]) -> Result<Option<Entry>> {
        Ok(self.touch_many(&[key])?[0])
    }

    /// The ActionResult under `key`, if present. A result the index knows
    /// but whose bytes are gone is forgotten.
    pub fn action(&self, key: &[u8]) -> Result<Option<ActionResult>> {
        if self.touch(key)?.is_none() {
            return Ok(None);
        }
        let Some(bytes) = self.db.action(key)? else {
            self.forget_broken(key, "action result without bytes");
            return Ok(None);
        };
        Ok(Some(ActionResult::decode(&*bytes)?))
    }

    /// The asset record under `key`, marking it used. One the index knows
    /// but whose bytes are gone or do not decode is forgotten.
    pub fn asset(&self, key: &[u8]) -> Result<Option<AssetRecord>> {
        if self.touch(key)?.is_none() {
            return Ok(None);
        }
        match self.asset_record(key)? {
            Ok(record) => Ok(Some(record)),
            Err(why) => {
                self.forget_broken(key, &why);
                Ok(None)
            }
        }
    }

    /// Reads and decodes an asset record.
    fn asset_record(&self, key: &[u8]) -> Result<RecordRead> {
        let Some(bytes) = self.db.asset(key)? else {
            return Ok(Err("asset entry without a record".into()));
        };
        Ok(AssetRecord::decode(&*bytes).map_err(|e| format!("undecodable asset record: {e}")))
    }

    /// The stored blob with this hash, whatever its size, marking it used;
    /// the empty blob is always there.
    pub fn find_by_hash(&self, function: DigestFunction, hash: &[u8]) -> Result<Option<Digest>> {
        let empty = Digest::of(function, &[]);
        if empty.hash_bytes() == hash {
            return Ok(Some(empty));
        }
        for digest in self.db.blobs_with_hash(function, hash)? {
            if self.touch(&blob_key(&digest))?.is_some() {
                return Ok(Some(digest));
            }
        }
        Ok(None)
    }

    /// Forgets an entry and deletes its bytes (and the asset entries that
    /// keep it alive).
    pub fn remove(&self, key: Vec<u8>) -> Result<()> {
        let mut index = self.index.lock();
        match index.remove(&key) {
            Some(entry) => self.delete_entries(&mut index, &[(key, entry)]),
            None => Ok(()),
        }
    }

    /// Drops a blob whose bytes no longer hash to its digest (and the asset
    /// entries that keep it alive), counting it in `corrupt_blobs`. Action
    /// results that name it as an output are dropped by the completeness
    /// check ([`crate::store::complete`]) at their next lookup.
    pub fn forget_corrupt(&self, key: &[u8], why: &str) {
        Stats::add(&self.stats.corrupt_blobs, 1);
        tracing::error!("corrupt blob in the local store: {why}");
        self.forget_broken(key, why);
    }

    /// Drops an entry whose bytes turned out to be missing or damaged (and
    /// the asset entries that keep it alive).
    pub fn forget_broken(&self, key: &[u8], why: &str) {
        tracing::warn!("dropping damaged store entry: {why}");
        let mut index = self.index.lock();
        if let Some(entry) = index.remove(key)
            && let Err(e) = self.delete_entries(&mut index, &[(key.to_vec(), entry)])
        {
            tracing::warn!("cannot delete damaged entry: {e}");
        }
    }
}
