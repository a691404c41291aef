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
//! - [`files`]: large blobs as files (plain or `.zst`); `tmp/`, rename,
//!   unlink, read streams.
//! - [`verifying`]: reading a blob file whole, hashing (and decoding) it,
//!   handing out a range only once it checked.
//! - [`writer`]: the [`BlobWriter`]: memory buffer or temp file, hashed as
//!   the bytes arrive, verified at commit; small blobs compressed at rest
//!   when it pays.
//! - [`compactor`]: compresses committed raw blob files in the background.
//! - [`hash_pipe`]: hashing a compressed file's plain bytes beside its decoding.
//! - [`zstd_writer`]: the native compressed write: a client's zstd bytes
//!   kept as they are, decoded only to hash.
//! - [`running`]: the marker that tells a start after an unclean stop.
//! - [`scrub`]: verifying stored entries: recent files after an unclean
//!   stop, the whole store offline (`outpost verify`).

mod asset_links;
#[cfg(test)]
mod asset_tests;
mod catalog;
mod compactor;
mod db;
mod files;
mod hash_pipe;
mod quota;
mod running;
pub mod scrub;
#[cfg(test)]
mod tests;
mod verifying;
mod writer;
#[cfg(test)]
mod zstd_tests;
mod zstd_writer;

use std::path::PathBuf;
use std::sync::Arc;

use async_trait::async_trait;
use bazel_remote_apis::build::bazel::remote::execution::v2::ActionResult;
use bytes::Bytes;
use futures::stream;

use self::catalog::Catalog;
use self::compactor::Compactor;
use self::db::{Db, action_key, asset_key, blob_key};
use self::files::FileArea;
use self::files::Form;
use self::running::RunningMarker;
use self::writer::{Commit, InlineBytes, LocalWriter, Payload, Reserve, Room, Sink};
use self::zstd_writer::{CompressedWriter, compressed_bound};
use crate::compression::{self, Compressor, DecompressingWriter};
use crate::context::RequestContext;
use crate::digest::{Digest, DigestFunction};
use crate::error::{Error, Result};
use crate::stats::Stats;
use crate::store::asset_index::{AssetIndex, AssetKey, AssetRecord};
use crate::store::{ActionKey, ActionResultStore, BlobStore, BlobWriter, ChunkStream};

pub use self::catalog::{EvictionListener, Reclaimer};
pub use self::db::{digest_len, parse_digest, push_digest};
pub use self::quota::{Occupancy, PinGuard};
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
    /// Keep blobs zstd-compressed at rest when that saves at least 10%
    /// (`[store] compression`); compressed entries are read either way.
    compress: bool,
    /// Compresses committed raw blob files behind the writes.
    compactor: Arc<Compactor>,
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
        let catalog = Arc::new(catalog);
        let compactor = Arc::new(Compactor::start(Arc::downgrade(&catalog))?);
        Ok(LocalStore {
            compactor,
            catalog,
            stats,
            inline_limit: options.inline_limit,
            marker: Arc::new(marker),
            compress: true,
        })
    }

    /// Turns compression at rest on or off (on by default; `[store]
    /// compression`). Off, new blobs are stored plain; compressed entries
    /// already stored stay readable.
    pub fn with_compression(mut self, on: bool) -> Self {
        self.compress = on;
        self
    }

    /// Tells a later start that this store is still running (see
    /// [`running`]); call every [`RUNNING_MARKER_REFRESH`].
    pub fn refresh_running_marker(&self) -> Result<()> {
        self.marker.refresh()
    }

    /// Flushes and records a clean stop, so the next start trusts the files
    /// written last. Call once, after the last write.
    pub fn close_cleanly(&self) -> Result<()> {
        self.compactor.stop();
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

    /// Pins a stored blob against eviction until the guard is dropped;
    /// `None` when it is not stored (the upload queue keeps its blobs so).
    pub fn pin_blob(&self, digest: &Digest) -> Option<PinGuard> {
        self.catalog.pin_stored(digest)
    }

    /// Every record of the upload queue (column family `uploads`), in key
    /// order: what [`crate::store::write_back`] resumes from.
    pub fn queue_records(&self) -> Result<Vec<(Vec<u8>, Vec<u8>)>> {
        self.catalog.db().scan_uploads()
    }

    /// Writes upload-queue records in one batch, with the store's commit
    /// options (fsynced when the store syncs): a queued write is promised.
    pub fn put_queue_records(&self, records: &[(Vec<u8>, Vec<u8>)]) -> Result<()> {
        let mut batch = self.catalog.db().batch();
        for (key, value) in records {
            batch.put_upload(key, value);
        }
        batch.commit()
    }

    /// Deletes upload-queue records, unsynced: a deletion lost to a power
    /// cut only uploads the entry again.
    pub fn delete_queue_records(&self, keys: &[Vec<u8>]) -> Result<()> {
        let mut batch = self.catalog.db().batch();
        for key in keys {
            batch.delete_upload(key);
        }
        batch.write_unsynced()
    }

    /// The stored blob with this hash, whatever its size, marking it used
    /// (`checksum.sri` names content by hash alone); the empty blob is
    /// always there.
    pub fn find_by_hash(&self, function: DigestFunction, hash: &[u8]) -> Result<Option<Digest>> {
        self.catalog.find_by_hash(function, hash)
    }
}

impl LocalStore {
    /// Reads `[offset, end)` of a blob whose `entry` was just looked up. A
    /// raw file swapped for a compressed one since (the compactor) is gone
    /// when opened: the lookup is retried once before the blob counts as
    /// broken.
    fn read_found(
        &self,
        digest: &Digest,
        key: &[u8],
        entry: quota::Entry,
        offset: u64,
        end: u64,
    ) -> Result<ChunkStream> {
        let mut result = self.catalog.read_blob(digest, key, entry, offset, end);
        if matches!(result, Err(Error::NotFound(_)))
            && let Some(now) = self.catalog.touch(key)?
            && now.kind != entry.kind
        {
            result = self.catalog.read_blob(digest, key, now, offset, end);
        }
        self.counted(key, result)
    }

    /// Counts a read of a stored blob as a hit, or, when its bytes turned
    /// out missing or damaged, as a miss, and forgets it.
    fn counted(&self, key: &[u8], result: Result<ChunkStream>) -> Result<ChunkStream> {
        match &result {
            Ok(_) => Stats::add(&self.stats.cas_hits, 1),
            Err(Error::NotFound(why)) => {
                Stats::add(&self.stats.cas_misses, 1);
                self.catalog.forget_broken(key, why);
            }
            Err(_) => {}
        }
        result
    }

    /// The room a storing write starts with (`first` bytes, evicting if
    /// needed) and grows a window at a time, and the commit that makes its
    /// payload visible (compressing a small plain blob first when
    /// compression at rest is on and it pays).
    fn storing(&self, digest: Digest, size: u64, first: u64) -> Result<(Room, Commit)> {
        let quota = self.catalog.occupancy().1;
        if size > quota {
            return Err(Error::ResourceExhausted(format!(
                "a {size}-byte blob does not fit in the {quota}-byte store quota"
            )));
        }
        let held = self.catalog.reserve(first)?;
        let catalog = self.catalog.clone();
        let reserve: Reserve = Arc::new(move |bytes| catalog.reserve(bytes));
        let room = Room {
            held,
            reserve,
            window: WRITE_WINDOW,
        };
        let catalog = self.catalog.clone();
        let compress = self.compress;
        let compactor = self.compactor.clone();
        let commit: Commit = Box::new(move |payload, reservation| {
            let raw_file = matches!(
                payload,
                Payload::File {
                    form: Form::Plain,
                    ..
                }
            );
            let payload = match payload {
                Payload::Inline(inline) if !inline.zstd => {
                    Payload::Inline(InlineBytes::pack(inline.bytes, compress))
                }
                other => other,
            };
            catalog.commit_blob(&digest, payload, reservation)?;
            if compress && raw_file {
                compactor.offer(digest);
            }
            Ok(())
        });
        Ok((room, commit))
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
        self.read_found(digest, &key, entry, offset, end)
    }

    /// A compressed entry read from offset 0 is served as stored (no
    /// recompression; a file is still verified beside the sending); any
    /// other read compresses the plain bytes as they stream.
    async fn read_compressed(
        &self,
        ctx: &RequestContext,
        digest: &Digest,
        offset: u64,
        compressor: Compressor,
    ) -> Result<ChunkStream> {
        let Compressor::Zstd = compressor;
        if offset == 0 && !digest.is_empty_blob() {
            let key = blob_key(digest);
            if let Some(entry) = self.catalog.touch(&key)?
                && let Some(result) = self.catalog.read_stored(digest, &key, entry)
            {
                return self.counted(&key, result);
            }
        }
        let plain = self.read(ctx, digest, offset, 0).await?;
        Ok(compression::compress_stream(plain))
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
        let (first, sink) = if digest.size <= self.inline_limit {
            (digest.size, Sink::memory(digest.size))
        } else {
            let first = digest.size.min(WRITE_WINDOW);
            (first, Sink::File(self.catalog.create_temp()?))
        };
        let (room, commit) = self.storing(digest, digest.size, first)?;
        Ok(Box::new(LocalWriter::storing(
            digest, stats, sink, room, commit,
        )))
    }

    /// Keeps the compressed bytes as they are when compression at rest is
    /// on ([`CompressedWriter`]: a small blob that saves less than 10% is
    /// stored plain); otherwise, or when the blob is already stored, decodes
    /// into a plain write.
    async fn begin_write_compressed(
        &self,
        ctx: &RequestContext,
        digest: &Digest,
        compressor: Compressor,
    ) -> Result<Box<dyn BlobWriter>> {
        let Compressor::Zstd = compressor;
        let digest = *digest;
        if !self.compress || digest.size == 0 || self.catalog.mark_used(&blob_key(&digest)) {
            let plain = self.begin_write(ctx, &digest).await?;
            return Ok(Box::new(DecompressingWriter::new(plain, digest)?));
        }
        let bound = compressed_bound(digest.size);
        let (first, sink) = if digest.size <= self.inline_limit {
            (bound.min(digest.size), Sink::memory(digest.size))
        } else {
            (
                bound.min(WRITE_WINDOW),
                Sink::File(self.catalog.create_temp()?),
            )
        };
        let (room, commit) = self.storing(digest, digest.size, first)?;
        let writer = CompressedWriter::new(digest, self.stats.clone(), sink, room, commit)?;
        Ok(Box::new(writer))
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
        let batch: Vec<(Digest, InlineBytes)> = small
            .iter()
            .map(|&i| {
                (
                    blobs[i].0,
                    InlineBytes::pack(blobs[i].1.clone(), self.compress),
                )
            })
            .collect();
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
