//! RocksDB for the local store: its column families, the byte layouts of
//! keys and index values (see docs/architecture.md), and typed write batches.
//!
//! Column families: `index` (every entry's kind, size and last access),
//! `inline` (small blobs), `actions` (encoded ActionResults), `assets`
//! (encoded Remote Asset records), `uploads` (the write-back upload queue's
//! records, laid out by [`crate::store::write_back`]; not counted in the
//! quota). Every key starts with a one-byte kind;
//! blob and action keys go on with the digest function, so that several
//! digest functions can share the store without collisions; asset keys with
//! the 32-byte [`AssetKey`] (which hashes everything the entry is keyed by).

use std::path::Path;

use rocksdb::{
    ColumnFamily, ColumnFamilyDescriptor, DB, DBPinnableSlice, Direction, IteratorMode, Options,
    WriteBatch, WriteOptions,
};

use super::quota::{Entry, EntryKind};
use crate::digest::{Digest, DigestFunction};
use crate::error::Result;
use crate::store::ActionKey;
use crate::store::asset_index::AssetKey;

const CF_INDEX: &str = "index";
const CF_INLINE: &str = "inline";
const CF_ACTIONS: &str = "actions";
const CF_ASSETS: &str = "assets";
const CF_UPLOADS: &str = "uploads";
const ALL_CFS: [&str; 5] = [CF_INDEX, CF_INLINE, CF_ACTIONS, CF_ASSETS, CF_UPLOADS];

/// The local store's RocksDB database.
pub struct Db {
    /// The database with its column families.
    db: DB,
    /// Options for commits: synced when the store was opened with `sync`.
    commit_opts: WriteOptions,
}

impl Db {
    /// Opens or creates the database at `path`; `sync` makes every commit
    /// fsync the write-ahead log.
    pub fn open(path: &Path, sync: bool) -> Result<Self> {
        let mut opts = Options::default();
        opts.create_if_missing(true);
        opts.create_missing_column_families(true);
        opts.increase_parallelism(2);
        let mut index_opts = Options::default();
        index_opts.set_compression_type(rocksdb::DBCompressionType::None);
        let mut inline_opts = Options::default();
        // Build outputs are mostly compressed or binary already.
        inline_opts.set_compression_type(rocksdb::DBCompressionType::None);
        let mut action_opts = Options::default();
        action_opts.set_compression_type(rocksdb::DBCompressionType::Lz4);
        let mut asset_opts = Options::default();
        asset_opts.set_compression_type(rocksdb::DBCompressionType::Lz4);
        let cfs = vec![
            ColumnFamilyDescriptor::new(CF_INDEX, index_opts),
            ColumnFamilyDescriptor::new(CF_INLINE, inline_opts),
            ColumnFamilyDescriptor::new(CF_ACTIONS, action_opts),
            ColumnFamilyDescriptor::new(CF_ASSETS, asset_opts),
            ColumnFamilyDescriptor::new(CF_UPLOADS, Options::default()),
        ];
        let db = DB::open_cf_descriptors(&opts, path, cfs)?;
        let mut commit_opts = WriteOptions::default();
        commit_opts.set_sync(sync);
        Ok(Db { db, commit_opts })
    }

    fn cf(&self, name: &str) -> &ColumnFamily {
        self.db
            .cf_handle(name)
            .expect("column family created at open")
    }

    /// Every `index` entry in key order; `None` for a value that does not
    /// parse (the caller deletes it).
    pub fn scan_index(&self) -> Result<Vec<(Vec<u8>, Option<Entry>)>> {
        let mut out = Vec::new();
        for item in self.db.iterator_cf(self.cf(CF_INDEX), IteratorMode::Start) {
            let (key, value) = item?;
            out.push((key.to_vec(), parse_index_value(&value)));
        }
        Ok(out)
    }

    /// The bytes of an inline blob.
    pub fn inline(&self, key: &[u8]) -> Result<Option<DBPinnableSlice<'_>>> {
        Ok(self.db.get_pinned_cf(self.cf(CF_INLINE), key)?)
    }

    /// The encoded ActionResult stored under an action key.
    pub fn action(&self, key: &[u8]) -> Result<Option<DBPinnableSlice<'_>>> {
        Ok(self.db.get_pinned_cf(self.cf(CF_ACTIONS), key)?)
    }

    /// The encoded AssetRecord stored under an asset key.
    pub fn asset(&self, key: &[u8]) -> Result<Option<DBPinnableSlice<'_>>> {
        Ok(self.db.get_pinned_cf(self.cf(CF_ASSETS), key)?)
    }

    /// Every blob the `index` names with this hash, whatever its size (a
    /// seek to `b` · function · hash, then the keys sharing that prefix):
    /// what a lookup by checksum alone needs. The caller checks the
    /// in-memory index, which is what says a blob is stored.
    pub fn blobs_with_hash(&self, function: DigestFunction, hash: &[u8]) -> Result<Vec<Digest>> {
        let mut prefix = Vec::with_capacity(2 + hash.len());
        prefix.extend_from_slice(&[BLOB, function.tag()]);
        prefix.extend_from_slice(hash);
        let mode = IteratorMode::From(&prefix, Direction::Forward);
        let mut out = Vec::new();
        for item in self.db.iterator_cf(self.cf(CF_INDEX), mode) {
            let (key, _) = item?;
            if !key.starts_with(&prefix) {
                break;
            }
            out.extend(parse_blob_key(&key));
        }
        Ok(out)
    }

    /// Every record of the upload queue, in key order.
    pub fn scan_uploads(&self) -> Result<Vec<(Vec<u8>, Vec<u8>)>> {
        let mut out = Vec::new();
        for item in self
            .db
            .iterator_cf(self.cf(CF_UPLOADS), IteratorMode::Start)
        {
            let (key, value) = item?;
            out.push((key.to_vec(), value.to_vec()));
        }
        Ok(out)
    }

    /// Starts an atomic write.
    pub fn batch(&self) -> Batch<'_> {
        Batch {
            db: self,
            batch: WriteBatch::default(),
        }
    }

    /// Flushes memtables so a clean shutdown leaves a short WAL to replay.
    pub fn flush(&self) -> Result<()> {
        for cf in ALL_CFS {
            self.db.flush_cf(self.cf(cf))?;
        }
        Ok(())
    }
}

/// One atomic RocksDB write, built from typed operations.
pub struct Batch<'a> {
    /// The database it is written to (and whose column families it names).
    db: &'a Db,
    /// The operations so far.
    batch: WriteBatch,
}

impl Batch<'_> {
    /// Records `entry` in the `index` column family: this is what makes an
    /// entry exist, so it goes in the same batch as (or after) its bytes.
    pub fn put_entry(&mut self, key: &[u8], entry: &Entry) {
        self.batch
            .put_cf(self.db.cf(CF_INDEX), key, index_value(entry));
    }

    /// Stores the bytes of a small blob.
    pub fn put_inline(&mut self, key: &[u8], data: &[u8]) {
        self.batch.put_cf(self.db.cf(CF_INLINE), key, data);
    }

    /// Stores the bytes of an entry of `kind`: an encoded ActionResult in
    /// `actions`, an encoded AssetRecord in `assets`, a small blob in `inline`
    /// (a file blob has none).
    pub fn put_value(&mut self, key: &[u8], kind: EntryKind, bytes: &[u8]) {
        match kind {
            EntryKind::InlineBlob | EntryKind::InlineZstd => self.put_inline(key, bytes),
            EntryKind::ActionResult => self.batch.put_cf(self.db.cf(CF_ACTIONS), key, bytes),
            EntryKind::Asset => self.batch.put_cf(self.db.cf(CF_ASSETS), key, bytes),
            EntryKind::FileBlob | EntryKind::FileZstd => {}
        }
    }

    /// Deletes an entry and its RocksDB bytes (a file blob's file is the
    /// caller's to remove).
    pub fn delete(&mut self, key: &[u8], kind: EntryKind) {
        self.delete_entry(key);
        match kind {
            EntryKind::InlineBlob | EntryKind::InlineZstd => {
                self.batch.delete_cf(self.db.cf(CF_INLINE), key)
            }
            EntryKind::ActionResult => self.batch.delete_cf(self.db.cf(CF_ACTIONS), key),
            EntryKind::Asset => self.batch.delete_cf(self.db.cf(CF_ASSETS), key),
            EntryKind::FileBlob | EntryKind::FileZstd => {}
        }
    }

    /// Writes (or replaces) a record of the upload queue.
    pub fn put_upload(&mut self, key: &[u8], value: &[u8]) {
        self.batch.put_cf(self.db.cf(CF_UPLOADS), key, value);
    }

    /// Deletes a record of the upload queue.
    pub fn delete_upload(&mut self, key: &[u8]) {
        self.batch.delete_cf(self.db.cf(CF_UPLOADS), key);
    }

    /// Deletes only the `index` entry (one that does not parse, or whose
    /// file is gone).
    pub fn delete_entry(&mut self, key: &[u8]) {
        self.batch.delete_cf(self.db.cf(CF_INDEX), key);
    }

    /// Writes the batch with the store's commit options (fsynced when the
    /// store was opened with `sync`): for what a client was promised.
    pub fn commit(self) -> Result<()> {
        Ok(self.db.db.write_opt(self.batch, &self.db.commit_opts)?)
    }

    /// Writes the batch never fsynced: for what a power loss may lose
    /// harmlessly (a refreshed access time, start-up cleanup redone).
    pub fn write_unsynced(self) -> Result<()> {
        Ok(self.db.db.write(self.batch)?)
    }
}

const BLOB: u8 = b'b';
const ACTION: u8 = b'a';
const ASSET: u8 = b's';

/// Bytes of `digest` in keys: function tag · hash · size (big-endian). The
/// tag says how long the hash is, so SHA-256 keys are exactly what they
/// were before other functions existed.
pub fn digest_len(digest: &Digest) -> usize {
    1 + digest.function.hash_len() + 8
}

/// Appends a digest's [`digest_len`] bytes.
pub fn push_digest(key: &mut Vec<u8>, digest: &Digest) {
    key.push(digest.function.tag());
    key.extend_from_slice(digest.hash_bytes());
    key.extend_from_slice(&digest.size.to_be_bytes());
}

/// Reads a digest from the start of `bytes`; returns it and the bytes after it.
pub fn parse_digest(bytes: &[u8]) -> Option<(Digest, &[u8])> {
    let (&tag, rest) = bytes.split_first()?;
    let function = DigestFunction::from_tag(tag)?;
    let (hash, rest) = rest.split_at_checked(function.hash_len())?;
    let (size, rest) = rest.split_at_checked(8)?;
    let size = u64::from_be_bytes(size.try_into().ok()?);
    Some((Digest::from_raw(function, hash, size)?, rest))
}

/// `b` · function · hash · size (big-endian).
pub fn blob_key(digest: &Digest) -> Vec<u8> {
    let mut key = Vec::with_capacity(1 + digest_len(digest));
    key.push(BLOB);
    push_digest(&mut key, digest);
    key
}

/// The digest a blob key was made from.
pub fn parse_blob_key(key: &[u8]) -> Option<Digest> {
    match key.split_first()? {
        (&BLOB, rest) => match parse_digest(rest)? {
            (digest, []) => Some(digest),
            _ => None,
        },
        _ => None,
    }
}

/// `a` · function · hash · size · instance name (UTF-8, last so it can be any length).
pub fn action_key(key: &ActionKey) -> Vec<u8> {
    let mut out = Vec::with_capacity(1 + digest_len(&key.action) + key.instance.len());
    out.push(ACTION);
    push_digest(&mut out, &key.action);
    out.extend_from_slice(key.instance.as_bytes());
    out
}

/// `s` · [`AssetKey`] (32 bytes).
pub fn asset_key(key: &AssetKey) -> Vec<u8> {
    let mut out = Vec::with_capacity(1 + key.0.len());
    out.push(ASSET);
    out.extend_from_slice(&key.0);
    out
}

/// Stable one-byte tag of an entry's kind in the persisted index; never renumber.
fn kind_tag(kind: EntryKind) -> u8 {
    match kind {
        EntryKind::InlineBlob => 0,
        EntryKind::FileBlob => 1,
        EntryKind::ActionResult => 2,
        EntryKind::Asset => 3,
        EntryKind::InlineZstd => 4,
        EntryKind::FileZstd => 5,
    }
}

/// Inverse of [`kind_tag`].
fn kind_from_tag(tag: u8) -> Option<EntryKind> {
    match tag {
        0 => Some(EntryKind::InlineBlob),
        1 => Some(EntryKind::FileBlob),
        2 => Some(EntryKind::ActionResult),
        3 => Some(EntryKind::Asset),
        4 => Some(EntryKind::InlineZstd),
        5 => Some(EntryKind::FileZstd),
        _ => None,
    }
}

/// Index value: kind · size on disk (u64 BE) · last access (unix seconds, u64 BE).
fn index_value(entry: &Entry) -> [u8; 17] {
    let mut out = [0u8; 17];
    out[0] = kind_tag(entry.kind);
    out[1..9].copy_from_slice(&entry.size.to_be_bytes());
    out[9..17].copy_from_slice(&entry.persisted_atime.to_be_bytes());
    out
}

/// Inverse of [`index_value`].
fn parse_index_value(value: &[u8]) -> Option<Entry> {
    if value.len() != 17 {
        return None;
    }
    Some(Entry {
        kind: kind_from_tag(value[0])?,
        size: u64::from_be_bytes(value[1..9].try_into().ok()?),
        persisted_atime: u64::from_be_bytes(value[9..17].try_into().ok()?),
    })
}

#[cfg(test)]
mod tests;
