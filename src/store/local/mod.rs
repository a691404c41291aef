//! The local store: CAS blobs, action results and Remote Asset entries in
//! RocksDB (large blobs as files beside it), under a byte quota with LRU
//! eviction.
//!
//! This file is the [`BlobStore`], [`ActionResultStore`] and [`AssetIndex`]
//! glue; the pieces below never import it:
//!
//! - [`catalog`]: index, RocksDB and files changed together under the index
//!   lock (commit, eviction, start-up recovery): the crash-safety rules.
//! - [`asset_links`]: which asset entries keep which blobs alive, so a blob
//!   that leaves drops them.
//! - [`db`]: RocksDB column families, key layouts, typed write batches.
//! - [`quota`]: the in-memory LRU index with pins and reservations.
//! - [`files`]: large blobs as files; `tmp/`, rename, unlink, read streams.
//! - [`writer`]: the [`BlobWriter`]: memory buffer or temp file, hashed as
//!   the bytes arrive, verified at commit.
//! - [`running`]: the marker that tells a start after an unclean stop.
//! - [`scrub`]: verifying stored entries: recent files after an unclean
//!   stop, the whole store offline (`outpost verify`).

mod asset_links;
#[cfg(test)]
mod asset_tests;
mod catalog;
mod db;
mod files;
mod quota;
mod running;
pub mod scrub;
mod writer;

use std::path::PathBuf;
use std::sync::Arc;

use async_trait::async_trait;
use bazel_remote_apis::build::bazel::remote::execution::v2::ActionResult;
use bytes::Bytes;
use futures::stream;

use self::catalog::Catalog;
use self::db::{Db, action_key, asset_key, blob_key};
use self::files::FileArea;
use self::running::RunningMarker;
use self::writer::{Commit, LocalWriter, Reserve, Room, Sink};
use crate::context::RequestContext;
use crate::digest::{Digest, DigestFunction};
use crate::error::{Error, Result};
use crate::stats::Stats;
use crate::store::asset_index::{AssetIndex, AssetKey, AssetRecord};
use crate::store::{ActionKey, ActionResultStore, BlobStore, BlobWriter, ChunkStream};

pub use self::catalog::{EvictionListener, Reclaimer};
pub use self::quota::Occupancy;
pub use self::running::REFRESH_INTERVAL as RUNNING_MARKER_REFRESH;

/// How far ahead of the bytes received a write of a file blob reserves
/// quota: what a client that declares a large size and goes away can hold.
pub const WRITE_WINDOW: u64 = 4 << 20;

/// How to open a [`LocalStore`].
#[derive(Clone, Debug)]
pub struct LocalStoreOptions {
    /// Directory for RocksDB (`db/`) and blob files (`blobs/`, `tmp/`).
    pub dir: PathBuf,
    /// Byte budget for blobs, action results and asset entries.
    pub quota_bytes: u64,
    /// Blobs up to this size are RocksDB values; larger ones are files.
    pub inline_limit: u64,
    /// fsync every commit (survive power loss, not just a killed process).
    pub sync: bool,
}

/// The RocksDB-backed store. Cheap to clone; clones share everything.
#[derive(Clone)]
pub struct LocalStore {
    /// Everything stored, shared with the writers this store hands out.
    catalog: Arc<Catalog>,
    /// Counters for `outpost stats`.
    stats: Arc<Stats>,
    /// Blobs up to this size go inline.
    inline_limit: u64,
    /// Present while the store is open; removed by a clean stop.
    marker: Arc<RunningMarker>,
}

impl LocalStore {
    /// Opens or creates the store, rebuilds the index and removes debris a
    /// crash may have left behind. After an unclean stop, blob files written
    /// in its last moments are verified first and the corrupt ones removed
    /// ([`scrub::check_recent`]).
    pub fn open(options: LocalStoreOptions, stats: Arc<Stats>) -> Result<Self> {
        std::fs::create_dir_all(&options.dir)?;
        let db = Db::open(&options.dir.join("db"), options.sync)?;
        let suspect_since = RunningMarker::unclean_stop(&options.dir)?;
        let files = FileArea::open(&options.dir, options.sync)?;
        let catalog = Catalog::open(db, files, options.quota_bytes, stats.clone())?;
        if let Some(since) = suspect_since {
            let started = std::time::Instant::now();
            let found = scrub::check_recent(&catalog, since)?;
            tracing::warn!(
                checked = found.checked,
                bytes = found.bytes,
                corrupt = found.corrupt.len(),
                seconds = started.elapsed().as_secs_f64(),
                "the last run did not stop cleanly: verified the blob files it wrote last"
            );
            for digest in &found.corrupt {
                tracing::warn!("removed corrupt blob {digest} after the unclean stop");
            }
        }
        let marker = RunningMarker::create(&options.dir)?;
        Ok(LocalStore {
            catalog: Arc::new(catalog),
            stats,
            inline_limit: options.inline_limit,
            marker: Arc::new(marker),
        })
    }

    /// Tells a later start that this store is still running (see
    /// [`running`]); call every [`RUNNING_MARKER_REFRESH`].
    pub fn refresh_running_marker(&self) -> Result<()> {
        self.marker.refresh()
    }

    /// Flushes and records a clean stop, so the next start trusts the files
    /// written last. Call once, after the last write.
    pub fn close_cleanly(&self) -> Result<()> {
        self.catalog.flush()?;
        self.marker.remove()
    }

    /// Occupancy and quota, for stats.
    pub fn occupancy(&self) -> (Occupancy, u64) {
        self.catalog.occupancy()
    }

    /// Registers the function told about evicted blobs (one at a time).
    pub fn set_eviction_listener(&self, listener: EvictionListener) {
        self.catalog.set_eviction_listener(listener);
    }

    /// Registers the function asked to free quota held outside the index
    /// (parked uploads) before any stored entry is evicted.
    pub fn set_reclaimer(&self, reclaimer: Reclaimer) {
        self.catalog.set_reclaimer(reclaimer);
    }

    /// Flushes memtables so a clean shutdown leaves a short WAL to replay.
    pub fn flush(&self) -> Result<()> {
        self.catalog.flush()
    }

    /// The stored blob with this hash, whatever its size, marking it used
    /// (`checksum.sri` names content by hash alone); the empty blob is
    /// always there.
    pub fn find_by_hash(
        &self,
        function: DigestFunction,
        hash: &[u8; 32],
    ) -> Result<Option<Digest>> {
        self.catalog.find_by_hash(function, hash)
    }
}

#[async_trait]
impl BlobStore for LocalStore {
    async fn find_missing(&self, _ctx: &RequestContext, digests: &[Digest]) -> Result<Vec<Digest>> {
        let keys: Vec<Vec<u8>> = digests.iter().map(blob_key).collect();
        let found = self.catalog.touch_many(&keys)?;
        Ok(digests
            .iter()
            .zip(found)
            .filter(|(d, f)| f.is_none() && !d.is_empty_blob())
            .map(|(d, _)| *d)
            .collect())
    }

    async fn read(
        &self,
        _ctx: &RequestContext,
        digest: &Digest,
        offset: u64,
        limit: u64,
    ) -> Result<ChunkStream> {
        if offset > digest.size {
            return Err(Error::OutOfRange(format!(
                "read offset {offset} is beyond the end of blob {digest}"
            )));
        }
        let end = digest.read_end(offset, limit);
        if digest.is_empty_blob() {
            return Ok(Box::pin(stream::empty()));
        }
        let key = blob_key(digest);
        let Some(entry) = self.catalog.touch(&key)? else {
            Stats::add(&self.stats.cas_misses, 1);
            return Err(Error::NotFound(format!("blob {digest} not found")));
        };
        let result = self
            .catalog
            .read_blob(digest, &key, entry.kind, offset, end);
        match &result {
            Ok(_) => Stats::add(&self.stats.cas_hits, 1),
            Err(Error::NotFound(why)) => {
                Stats::add(&self.stats.cas_misses, 1);
                self.catalog.forget_broken(&key, why);
            }
            Err(_) => {}
        }
        result
    }

    /// Reserves quota (evicting if needed) and opens the sink: a small blob
    /// reserves its whole size, a file blob a [`WRITE_WINDOW`] at a time as
    /// its bytes arrive. A blob that is already stored needs no room, so
    /// writing it again evicts nothing.
    async fn begin_write(
        &self,
        _ctx: &RequestContext,
        digest: &Digest,
    ) -> Result<Box<dyn BlobWriter>> {
        let digest = *digest;
        let stats = self.stats.clone();
        if digest.size == 0 || self.catalog.mark_used(&blob_key(&digest)) {
            return Ok(Box::new(LocalWriter::verifying_only(digest, stats)));
        }
        let quota = self.catalog.occupancy().1;
        if digest.size > quota {
            return Err(Error::ResourceExhausted(format!(
                "a {}-byte blob does not fit in the {quota}-byte store quota",
                digest.size
            )));
        }
        let (first, sink) = if digest.size <= self.inline_limit {
            (digest.size, Sink::memory(digest.size))
        } else {
            let first = digest.size.min(WRITE_WINDOW);
            (first, Sink::File(self.catalog.create_temp()?))
        };
        let held = self.catalog.reserve(first)?;
        let catalog = self.catalog.clone();
        let reserve: Reserve = Arc::new(move |bytes| catalog.reserve(bytes));
        let room = Room {
            held,
            reserve,
            window: WRITE_WINDOW,
        };
        let catalog = self.catalog.clone();
        let commit: Commit = Box::new(move |payload, reservation| {
            catalog.commit_blob(&digest, payload, reservation)
        });
        Ok(Box::new(LocalWriter::storing(
            digest, stats, sink, room, commit,
        )))
    }

    async fn write_many(
        &self,
        ctx: &RequestContext,
        blobs: Vec<(Digest, Bytes)>,
    ) -> Vec<Result<()>> {
        let mut results: Vec<Result<()>> = Vec::with_capacity(blobs.len());
        let mut small = Vec::new();
        for (i, (expected, data)) in blobs.iter().enumerate() {
            let actual = Digest::of(expected.function, data);
            let verdict = crate::digest::verify(expected, &actual);
            if verdict.is_err() {
                Stats::add(&self.stats.digest_mismatches, 1);
            } else if expected.size <= self.inline_limit && !expected.is_empty_blob() {
                small.push(i);
            }
            results.push(verdict);
        }
        let batch: Vec<(Digest, Bytes)> = small.iter().map(|&i| blobs[i].clone()).collect();
        if let Err(e) = self.catalog.commit_inline_batch(&batch) {
            for &i in &small {
                results[i] = Err(e.duplicate());
            }
        }
        for (i, (digest, data)) in blobs.into_iter().enumerate() {
            if results[i].is_ok() && digest.size > self.inline_limit {
                results[i] = crate::store::write_bytes(self, ctx, &digest, data).await;
            }
        }
        results
    }
}

#[async_trait]
impl ActionResultStore for LocalStore {
    async fn get_action_result(
        &self,
        _ctx: &RequestContext,
        key: &ActionKey,
    ) -> Result<Option<ActionResult>> {
        self.catalog.action(&action_key(key))
    }

    async fn put_action_result(
        &self,
        _ctx: &RequestContext,
        key: &ActionKey,
        result: &ActionResult,
    ) -> Result<()> {
        self.catalog.put_action(action_key(key), result)
    }

    async fn remove_action_result(&self, _ctx: &RequestContext, key: &ActionKey) -> Result<()> {
        self.catalog.remove(action_key(key))
    }
}

#[async_trait]
impl AssetIndex for LocalStore {
    async fn get_asset(&self, key: &AssetKey) -> Result<Option<AssetRecord>> {
        self.catalog.asset(&asset_key(key))
    }

    async fn put_asset(&self, key: &AssetKey, record: &AssetRecord) -> Result<()> {
        self.catalog.put_asset(asset_key(key), record)
    }

    async fn remove_asset(&self, key: &AssetKey) -> Result<()> {
        self.catalog.remove(asset_key(key))
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;
    use std::sync::Mutex;

    use super::*;
    use crate::digest::DigestFunction;
    use crate::store::{read_to_bytes, write_bytes};

    pub(super) fn open(dir: &Path, quota_bytes: u64, stats: &Arc<Stats>) -> LocalStore {
        let options = LocalStoreOptions {
            dir: dir.to_path_buf(),
            quota_bytes,
            inline_limit: 100,
            sync: false,
        };
        LocalStore::open(options, stats.clone()).unwrap()
    }

    pub(super) fn blob(len: usize, seed: u8) -> (Digest, Bytes) {
        let data: Bytes = (0..len).map(|i| (i as u8).wrapping_add(seed)).collect();
        (Digest::of(DigestFunction::Sha256, &data), data)
    }

    #[tokio::test]
    async fn inline_and_file_blobs_survive_a_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let stats = Arc::new(Stats::default());
        let ctx = RequestContext::default();
        let (small, small_data) = blob(10, 1);
        let (large, large_data) = blob(1000, 2);
        {
            let store = open(dir.path(), 1 << 20, &stats);
            write_bytes(&store, &ctx, &small, small_data.clone())
                .await
                .unwrap();
            write_bytes(&store, &ctx, &large, large_data.clone())
                .await
                .unwrap();
            store.flush().unwrap();
        }
        let store = open(dir.path(), 1 << 20, &stats);
        assert_eq!(
            read_to_bytes(&store, &ctx, &small).await.unwrap(),
            small_data
        );
        assert_eq!(
            read_to_bytes(&store, &ctx, &large).await.unwrap(),
            large_data
        );
        let (occupancy, quota) = store.occupancy();
        assert_eq!((occupancy.blob_count, occupancy.blob_bytes), (2, 1010));
        assert_eq!(quota, 1 << 20);
    }

    #[tokio::test]
    async fn start_up_drops_files_and_entries_without_their_other_half() {
        let dir = tempfile::tempdir().unwrap();
        let stats = Arc::new(Stats::default());
        let ctx = RequestContext::default();
        let (kept, kept_data) = blob(1000, 1);
        let (gone, gone_data) = blob(1000, 2);
        let (stray, stray_data) = blob(1000, 3);
        {
            let store = open(dir.path(), 1 << 20, &stats);
            write_bytes(&store, &ctx, &kept, kept_data).await.unwrap();
            write_bytes(&store, &ctx, &gone, gone_data).await.unwrap();
        }
        let files = FileArea::open(dir.path(), false).unwrap();
        std::fs::remove_file(files.path_for(&gone)).unwrap();
        let stray_path = files.path_for(&stray);
        std::fs::create_dir_all(stray_path.parent().unwrap()).unwrap();
        std::fs::write(&stray_path, &stray_data).unwrap();
        drop(files);

        let store = open(dir.path(), 1 << 20, &stats);
        let missing = store.find_missing(&ctx, &[kept, gone, stray]).await;
        assert_eq!(missing.unwrap(), vec![gone, stray]);
        assert!(!stray_path.exists(), "an uncommitted file is removed");
    }

    #[tokio::test]
    async fn a_blob_whose_file_vanished_is_forgotten_on_read() {
        let dir = tempfile::tempdir().unwrap();
        let stats = Arc::new(Stats::default());
        let ctx = RequestContext::default();
        let store = open(dir.path(), 1 << 20, &stats);
        let (d, data) = blob(1000, 1);
        write_bytes(&store, &ctx, &d, data).await.unwrap();
        let path = FileArea::open(dir.path(), false).unwrap().path_for(&d);
        std::fs::remove_file(path).unwrap();
        let err = store.read(&ctx, &d, 0, 0).await.err().unwrap();
        assert!(matches!(err, Error::NotFound(_)));
        assert_eq!(store.find_missing(&ctx, &[d]).await.unwrap(), vec![d]);
        assert_eq!(store.occupancy().0.blob_count, 0);
    }

    #[tokio::test]
    async fn a_corrupt_file_blob_fails_its_read_with_data_loss_and_is_removed() {
        use futures::StreamExt;
        let dir = tempfile::tempdir().unwrap();
        let stats = Arc::new(Stats::default());
        let ctx = RequestContext::default();
        let store = open(dir.path(), 1 << 20, &stats);
        let (d, data) = blob(1000, 1);
        write_bytes(&store, &ctx, &d, data.clone()).await.unwrap();
        let asset = AssetKey::of("", "https://x/rotten.tar.gz", &[]);
        let record = AssetRecord {
            uri: "https://x/rotten.tar.gz".into(),
            digest_function: DigestFunction::Sha256.to_proto(),
            digest: Some(d.to_proto()),
            ..Default::default()
        };
        store.put_asset(&asset, &record).await.unwrap();
        let path = FileArea::open(dir.path(), false).unwrap().path_for(&d);
        let mut rotten = data.to_vec();
        rotten[999] ^= 0x40;
        std::fs::write(&path, rotten).unwrap();

        // Even a read of an untouched range fails: nothing is sent.
        let items: Vec<Result<Bytes>> = store.read(&ctx, &d, 0, 10).await.unwrap().collect().await;
        assert_eq!(items.len(), 1);
        let Err(Error::DataLoss(why)) = &items[0] else {
            panic!("expected DATA_LOSS, got {items:?}");
        };
        assert!(why.contains(&d.to_string()), "{why}");
        assert_eq!(Stats::get(&stats.corrupt_blobs), 1);
        assert_eq!(store.find_missing(&ctx, &[d]).await.unwrap(), vec![d]);
        assert!(!path.exists(), "the file is deleted");
        assert_eq!(store.occupancy().0.blob_count, 0);
        assert_eq!(
            store.get_asset(&asset).await.unwrap(),
            None,
            "its asset entry too"
        );
        // It can be uploaded again.
        write_bytes(&store, &ctx, &d, data.clone()).await.unwrap();
        assert_eq!(read_to_bytes(&store, &ctx, &d).await.unwrap(), data);
    }

    /// Flips one bit of a blob's file, keeping its size (and, with `age`,
    /// dates its modification back that far).
    fn rot(dir: &Path, d: &Digest, age: Option<std::time::Duration>) {
        let path = FileArea::open(dir, false).unwrap().path_for(d);
        let mut bytes = std::fs::read(&path).unwrap();
        bytes[0] ^= 1;
        std::fs::write(&path, bytes).unwrap();
        if let Some(age) = age {
            let file = std::fs::File::options().write(true).open(&path).unwrap();
            file.set_modified(std::time::SystemTime::now() - age)
                .unwrap();
        }
    }

    #[tokio::test]
    async fn after_an_unclean_stop_recent_corrupt_files_are_removed_at_start() {
        let dir = tempfile::tempdir().unwrap();
        let stats = Arc::new(Stats::default());
        let ctx = RequestContext::default();
        let (fresh, fresh_data) = blob(1000, 1);
        let (intact, intact_data) = blob(1000, 2);
        let (old, old_data) = blob(1000, 3);
        {
            let store = open(dir.path(), 1 << 20, &stats);
            for (d, data) in [(fresh, fresh_data), (intact, intact_data), (old, old_data)] {
                write_bytes(&store, &ctx, &d, data).await.unwrap();
            }
            // Dropped without close_cleanly: the marker stays, as after kill -9.
        }
        rot(dir.path(), &fresh, None);
        rot(dir.path(), &old, Some(std::time::Duration::from_secs(3600)));

        let store = open(dir.path(), 1 << 20, &stats);
        assert_eq!(Stats::get(&stats.corrupt_blobs), 1);
        assert_eq!(
            store
                .find_missing(&ctx, &[fresh, intact, old])
                .await
                .unwrap(),
            vec![fresh],
            "only files written in the last moments are checked"
        );
        assert!(
            !FileArea::open(dir.path(), false)
                .unwrap()
                .path_for(&fresh)
                .exists()
        );
    }

    #[tokio::test]
    async fn after_a_clean_stop_nothing_is_checked_at_start() {
        let dir = tempfile::tempdir().unwrap();
        let stats = Arc::new(Stats::default());
        let ctx = RequestContext::default();
        let (d, data) = blob(1000, 1);
        {
            let store = open(dir.path(), 1 << 20, &stats);
            write_bytes(&store, &ctx, &d, data).await.unwrap();
            store.close_cleanly().unwrap();
        }
        assert!(!dir.path().join(running::MARKER).exists());
        rot(dir.path(), &d, None);
        let store = open(dir.path(), 1 << 20, &stats);
        assert!(dir.path().join(running::MARKER).exists());
        assert_eq!(store.find_missing(&ctx, &[d]).await.unwrap(), vec![]);
        assert_eq!(
            Stats::get(&stats.corrupt_blobs),
            0,
            "found at its first read"
        );
    }

    #[tokio::test]
    async fn the_eviction_listener_hears_of_evicted_blobs_only() {
        let dir = tempfile::tempdir().unwrap();
        let stats = Arc::new(Stats::default());
        let ctx = RequestContext::default();
        let store = open(dir.path(), 100, &stats);
        let heard = Arc::new(Mutex::new(Vec::new()));
        let sink = heard.clone();
        store.set_eviction_listener(Arc::new(move |d, size| {
            sink.lock().unwrap().push((*d, size));
        }));
        let (a, a_data) = blob(40, 1);
        write_bytes(&store, &ctx, &a, a_data).await.unwrap();
        let key = ActionKey {
            instance: String::new(),
            action: a,
        };
        let result = ActionResult {
            exit_code: 1,
            ..Default::default()
        };
        store.put_action_result(&ctx, &key, &result).await.unwrap();
        let (b, b_data) = blob(99, 2);
        write_bytes(&store, &ctx, &b, b_data).await.unwrap();
        assert_eq!(*heard.lock().unwrap(), vec![(a, 40)]);
        assert_eq!(
            Stats::get(&stats.evicted_entries),
            2,
            "the blob and the result"
        );
        assert!(store.get_action_result(&ctx, &key).await.unwrap().is_none());
    }

    #[tokio::test]
    async fn a_large_write_reserves_a_window_not_its_declared_size() {
        let dir = tempfile::tempdir().unwrap();
        let stats = Arc::new(Stats::default());
        let ctx = RequestContext::default();
        let store = open(dir.path(), 1 << 30, &stats);
        let declared = Digest {
            size: 512 << 20,
            ..blob(10, 1).0
        };
        let mut writer = store.begin_write(&ctx, &declared).await.unwrap();
        assert_eq!(store.occupancy().0.reserved_bytes, WRITE_WINDOW);
        writer.write(Bytes::from(vec![1u8; 1024])).await.unwrap();
        assert!(writer.park());
        assert_eq!(store.occupancy().0.reserved_bytes, 1024);
        drop(writer);
        assert_eq!(store.occupancy().0.reserved_bytes, 0);
        let too_large = Digest {
            size: (1 << 30) + 1,
            ..declared
        };
        let err = store.begin_write(&ctx, &too_large).await.err().unwrap();
        assert!(matches!(err, Error::ResourceExhausted(_)), "{err:?}");
    }

    #[tokio::test]
    async fn the_reclaimer_is_asked_before_anything_is_evicted() {
        let dir = tempfile::tempdir().unwrap();
        let stats = Arc::new(Stats::default());
        let ctx = RequestContext::default();
        let store = open(dir.path(), 1000, &stats);
        let (kept, kept_data) = blob(500, 1);
        write_bytes(&store, &ctx, &kept, kept_data).await.unwrap();
        // A write put aside with 300 bytes received.
        let (parked, parked_data) = blob(400, 2);
        let mut writer = store.begin_write(&ctx, &parked).await.unwrap();
        writer.write(parked_data.slice(..300)).await.unwrap();
        assert!(writer.park());
        let held = Arc::new(Mutex::new(Some(writer)));
        let asked = Arc::new(Mutex::new(Vec::new()));
        let (lot, log) = (held.clone(), asked.clone());
        store.set_reclaimer(Arc::new(move |bytes| {
            log.lock().unwrap().push(bytes);
            drop(lot.lock().unwrap().take());
        }));
        // 500 + 300 + 400 > 1000: the parked write goes, nothing is evicted.
        let (next, next_data) = blob(400, 3);
        write_bytes(&store, &ctx, &next, next_data).await.unwrap();
        assert_eq!(*asked.lock().unwrap(), vec![200]);
        assert!(held.lock().unwrap().is_none());
        assert_eq!(
            store.find_missing(&ctx, &[kept, next]).await.unwrap(),
            vec![]
        );
        assert_eq!(Stats::get(&stats.evicted_entries), 0);
    }

    #[tokio::test]
    async fn write_many_fails_only_the_bad_blob_and_stores_duplicates_once() {
        let dir = tempfile::tempdir().unwrap();
        let stats = Arc::new(Stats::default());
        let ctx = RequestContext::default();
        let store = open(dir.path(), 1 << 20, &stats);
        let (a, a_data) = blob(10, 1);
        let (b, _) = blob(20, 2);
        let (large, large_data) = blob(1000, 3);
        let results = store
            .write_many(
                &ctx,
                vec![
                    (a, a_data.clone()),
                    (b, a_data.clone()),
                    (a, a_data),
                    (large, large_data),
                ],
            )
            .await;
        assert!(results[0].is_ok() && results[2].is_ok() && results[3].is_ok());
        assert!(matches!(results[1], Err(Error::InvalidArgument(_))));
        assert_eq!(Stats::get(&stats.digest_mismatches), 1);
        assert_eq!(Stats::get(&stats.blobs_written), 2);
        assert_eq!(
            store.find_missing(&ctx, &[a, b, large]).await.unwrap(),
            vec![b]
        );
    }
}
