//! Verifying what is stored, beyond the check every read makes: the start-up
//! check of recent blob files after an unclean stop, and the offline scrub of
//! the whole store behind `outpost verify`.
//!
//! Both remove what they find corrupt through the catalog (entry, bytes and
//! the asset entries linked to it); action results that name a removed blob
//! are dropped by the completeness check at their next lookup.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use bazel_remote_apis::build::bazel::remote::execution::v2::ActionResult;
use prost::Message;

use super::catalog::{Catalog, file_form};
use super::db::{Db, blob_key, parse_blob_key};
use super::files::{BlobFile, FileArea};
use super::quota::{Entry, EntryKind};
use crate::compression;
use crate::digest::Digest;
use crate::error::{Error, Result};
use crate::stats::Stats;
use crate::store::asset_index::AssetRecord;

/// What the start-up check after an unclean stop found.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct RecentCheck {
    /// Blob files verified.
    pub checked: u64,
    /// Their bytes.
    pub bytes: u64,
    /// Those found corrupt and removed.
    pub corrupt: Vec<Digest>,
}

/// Verifies every committed blob file modified at or after `since` and
/// removes the corrupt ones (see [`Catalog::forget_corrupt`]). Bounded work:
/// only files written in the last moments before an unclean stop.
pub fn check_recent(catalog: &Catalog, since: SystemTime) -> Result<RecentCheck> {
    let mut found = RecentCheck::default();
    for (listed, path) in catalog.files().list()? {
        let Some((digest, form)) = listed else {
            continue;
        };
        let Ok(meta) = std::fs::metadata(&path) else {
            continue;
        };
        if meta.modified().is_ok_and(|m| m < since) {
            continue;
        }
        found.checked += 1;
        found.bytes += digest.size;
        // A compressed file's length is what is on disk: decoding it to
        // its digest is what checks it.
        let file = BlobFile {
            digest,
            form,
            len: meta.len(),
        };
        match catalog.files().verify(&file) {
            Ok(()) => {}
            Err(Error::DataLoss(why) | Error::NotFound(why)) => {
                catalog.forget_corrupt(&blob_key(&digest), &why);
                found.corrupt.push(digest);
            }
            Err(e) => return Err(e),
        }
    }
    Ok(found)
}

/// One corrupt entry the scrub found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CorruptEntry {
    /// What it is: `blob HASH/SIZE`, `action result HASH/SIZE`, `asset entry HEX`…
    pub entry: String,
    /// What is wrong with it.
    pub why: String,
}

/// What the scrub found (and, with repair, removed).
#[derive(Debug, Default)]
pub struct ScrubReport {
    /// Index entries in the store.
    pub entries: u64,
    /// Index entries checked so far.
    pub checked: u64,
    /// Inline blobs hashed.
    pub inline_blobs: u64,
    /// File blobs hashed.
    pub file_blobs: u64,
    /// Of the blobs hashed, those stored zstd-compressed (decoded to hash).
    pub compressed_blobs: u64,
    /// Blob bytes hashed (inline and files).
    pub blob_bytes: u64,
    /// Action results decoded.
    pub action_results: u64,
    /// Asset records decoded.
    pub asset_records: u64,
    /// Corrupt entries, in key order.
    pub corrupt: Vec<CorruptEntry>,
    /// Files under `blobs/` that no index entry names.
    pub stray_files: Vec<PathBuf>,
    /// Whether the corrupt entries and stray files were removed.
    pub repaired: bool,
    /// Asset entries removed with the blobs they kept alive (repair).
    pub asset_entries_dropped: u64,
    /// Time spent so far.
    pub elapsed: Duration,
}

impl ScrubReport {
    /// Blob bytes hashed per second.
    pub fn bytes_per_sec(&self) -> f64 {
        self.blob_bytes as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }

    /// Whether corrupt entries are still in the store.
    pub fn corruption_remains(&self) -> bool {
        !self.corrupt.is_empty() && !self.repaired
    }
}

/// How often the scrub reports progress.
const PROGRESS_EVERY: Duration = Duration::from_secs(2);

/// Scrubs the store in `dir` offline: hashes every blob (inline and file),
/// decodes every action result and asset record, and lists files no entry
/// names. With `repair`, removes the corrupt entries (with their asset
/// links) and the stray files. `progress` is called every few seconds.
/// FAILED_PRECONDITION if there is no store in `dir` or a server holds it.
pub fn scrub(
    dir: &Path,
    repair: bool,
    progress: &mut dyn FnMut(&ScrubReport),
) -> Result<ScrubReport> {
    let started = Instant::now();
    let db = open_db(dir)?;
    let files = FileArea::open(dir, false)?;
    let mut report = ScrubReport::default();
    let index = db.scan_index()?;
    report.entries = index.len() as u64;
    let mut file_keys = std::collections::HashSet::new();
    let mut corrupt_keys = Vec::new();
    let mut last_progress = Instant::now();
    for (key, entry) in index {
        report.checked += 1;
        let verdict = match entry {
            None => Err("index entry does not parse".to_string()),
            Some(entry) => {
                if entry.kind.is_file() {
                    file_keys.insert((key.clone(), file_form(entry.kind)));
                }
                check_entry(&db, &files, &key, entry, &mut report)
            }
        };
        if let Err(why) = verdict {
            let entry = describe(&key, entry.map(|e| e.kind));
            tracing::warn!("corrupt: {entry}: {why}");
            report.corrupt.push(CorruptEntry { entry, why });
            corrupt_keys.push(key);
        }
        if last_progress.elapsed() >= PROGRESS_EVERY {
            last_progress = Instant::now();
            report.elapsed = started.elapsed();
            progress(&report);
        }
    }
    for (listed, path) in files.list()? {
        if !listed.is_some_and(|(d, form)| file_keys.contains(&(blob_key(&d), form))) {
            report.stray_files.push(path);
        }
    }
    drop(db);
    if repair {
        report.asset_entries_dropped = remove(dir, files, corrupt_keys)?;
        report.repaired = true;
    }
    report.elapsed = started.elapsed();
    Ok(report)
}

/// Opens the RocksDB of an existing store, refusing one a server holds.
fn open_db(dir: &Path) -> Result<Db> {
    let path = dir.join("db");
    if !path.join("CURRENT").exists() {
        return Err(Error::FailedPrecondition(format!(
            "no Outpost store in {}",
            dir.display()
        )));
    }
    Db::open(&path, false).map_err(|e| {
        let text = e.to_string();
        if text.contains("LOCK") || text.contains("lock") {
            Error::FailedPrecondition(format!(
                "Outpost is running on {} (RocksDB's LOCK is held): stop it first ({text})",
                dir.display()
            ))
        } else {
            e
        }
    })
}

/// Hashes or decodes one entry's bytes; the reason it is corrupt, if it is.
fn check_entry(
    db: &Db,
    files: &FileArea,
    key: &[u8],
    entry: Entry,
    report: &mut ScrubReport,
) -> std::result::Result<(), String> {
    let map_err = |e: Error| e.to_string();
    if entry.kind.is_zstd() {
        report.compressed_blobs += 1;
    }
    match entry.kind {
        EntryKind::InlineBlob | EntryKind::InlineZstd => {
            let digest = parse_blob_key(key).ok_or("blob key does not parse")?;
            let stored = db
                .inline(key)
                .map_err(map_err)?
                .ok_or("inline bytes missing")?;
            report.inline_blobs += 1;
            report.blob_bytes += digest.size;
            let plain = if entry.kind == EntryKind::InlineZstd {
                compression::decompress(&stored, digest.size)
                    .map_err(|e| format!("inline bytes do not decompress: {e}"))?
            } else {
                bytes::Bytes::copy_from_slice(&stored)
            };
            if Digest::of(digest.function, &plain) != digest {
                return Err("inline bytes do not hash to the digest".into());
            }
        }
        EntryKind::FileBlob | EntryKind::FileZstd => {
            let digest = parse_blob_key(key).ok_or("blob key does not parse")?;
            report.file_blobs += 1;
            report.blob_bytes += digest.size;
            let file = BlobFile {
                digest,
                form: file_form(entry.kind),
                len: entry.size,
            };
            files.verify(&file).map_err(map_err)?;
        }
        EntryKind::ActionResult => {
            let bytes = db
                .action(key)
                .map_err(map_err)?
                .ok_or("result bytes missing")?;
            report.action_results += 1;
            ActionResult::decode(&*bytes).map_err(|e| format!("undecodable: {e}"))?;
        }
        EntryKind::Asset => {
            let bytes = db
                .asset(key)
                .map_err(map_err)?
                .ok_or("record bytes missing")?;
            report.asset_records += 1;
            AssetRecord::decode(&*bytes).map_err(|e| format!("undecodable: {e}"))?;
        }
    }
    Ok(())
}

/// A corrupt entry's name for the report.
fn describe(key: &[u8], kind: Option<EntryKind>) -> String {
    match (kind, parse_blob_key(key)) {
        (Some(EntryKind::InlineBlob), Some(d)) => format!("inline blob {d}"),
        (Some(EntryKind::FileBlob), Some(d)) => format!("file blob {d}"),
        (Some(EntryKind::InlineZstd), Some(d)) => format!("compressed inline blob {d}"),
        (Some(EntryKind::FileZstd), Some(d)) => format!("compressed file blob {d}"),
        (Some(EntryKind::ActionResult), _) => format!("action result {}", hex::encode(key)),
        (Some(EntryKind::Asset), _) => format!("asset entry {}", hex::encode(key)),
        _ => format!("index entry {}", hex::encode(key)),
    }
}

/// Removes `keys` (and the asset entries linked to them) through the catalog,
/// whose opening also removes stray files and entries without bytes. Returns
/// how many asset entries left with them.
fn remove(dir: &Path, files: FileArea, keys: Vec<Vec<u8>>) -> Result<u64> {
    let stats = Arc::new(Stats::default());
    let catalog = Catalog::open(open_db(dir)?, files, u64::MAX, stats.clone())?;
    for key in keys {
        catalog.remove(key)?;
    }
    catalog.flush()?;
    Ok(Stats::get(&stats.asset_entries_dropped))
}

#[cfg(test)]
mod tests {
    use super::super::tests::{blob, open};
    use super::*;
    use crate::context::RequestContext;
    use crate::store::asset_index::{AssetIndex, AssetKey};
    use crate::store::{ActionKey, ActionResultStore, BlobStore, write_bytes};

    #[tokio::test]
    async fn the_scrub_finds_and_repairs_every_kind_of_damage() {
        let dir = tempfile::tempdir().unwrap();
        let stats = Arc::new(Stats::default());
        let ctx = RequestContext::default();
        let (inline, inline_data) = blob(10, 1);
        let (rotten_inline, rotten_inline_data) = blob(20, 2);
        let (file, file_data) = blob(1000, 3);
        let (rotten_file, rotten_file_data) = blob(1000, 4);
        let asset = AssetKey::of("", "https://x/a.tar.gz", &[]);
        {
            let store = open(dir.path(), 1 << 20, &stats);
            for (d, data) in [
                (inline, inline_data),
                (rotten_inline, rotten_inline_data),
                (file, file_data),
                (rotten_file, rotten_file_data.clone()),
            ] {
                write_bytes(&store, &ctx, &d, data).await.unwrap();
            }
            let key = ActionKey {
                instance: String::new(),
                action: inline,
            };
            let result = ActionResult::default();
            store.put_action_result(&ctx, &key, &result).await.unwrap();
            let record = AssetRecord {
                digest_function: inline.function.to_proto(),
                digest: Some(rotten_file.to_proto()),
                ..Default::default()
            };
            store.put_asset(&asset, &record).await.unwrap();
            store.close_cleanly().unwrap();
        }
        let db = Db::open(&dir.path().join("db"), false).unwrap();
        let mut batch = db.batch();
        batch.put_inline(&blob_key(&rotten_inline), &[0u8; 20]);
        batch.commit().unwrap();
        drop(db);
        let files = FileArea::open(dir.path(), false).unwrap();
        let mut bytes = rotten_file_data.to_vec();
        bytes[500] ^= 1;
        std::fs::write(files.path_for(&rotten_file), bytes).unwrap();
        let (stray, stray_data) = blob(1000, 5);
        let stray_path = files.path_for(&stray);
        std::fs::create_dir_all(stray_path.parent().unwrap()).unwrap();
        std::fs::write(&stray_path, &stray_data).unwrap();

        let report = scrub(dir.path(), false, &mut |_| {}).unwrap();
        assert_eq!(
            (report.inline_blobs, report.file_blobs, report.blob_bytes),
            (2, 2, 2030)
        );
        assert_eq!((report.action_results, report.asset_records), (1, 1));
        let names: Vec<&str> = report.corrupt.iter().map(|c| c.entry.as_str()).collect();
        assert_eq!(
            names,
            vec![
                format!("inline blob {rotten_inline}"),
                format!("file blob {rotten_file}")
            ]
        );
        assert_eq!(report.stray_files, vec![stray_path.clone()]);
        assert!(report.corruption_remains());

        let report = scrub(dir.path(), true, &mut |_| {}).unwrap();
        assert_eq!(report.corrupt.len(), 2);
        assert!(!report.corruption_remains());
        assert_eq!(
            report.asset_entries_dropped, 1,
            "the asset entry of the rotten file"
        );
        assert!(!stray_path.exists());

        let report = scrub(dir.path(), false, &mut |_| {}).unwrap();
        assert!(report.corrupt.is_empty() && report.stray_files.is_empty());
        assert_eq!((report.inline_blobs, report.file_blobs), (1, 1));
        let store = open(dir.path(), 1 << 20, &stats);
        let missing = store
            .find_missing(&ctx, &[inline, rotten_inline, file, rotten_file])
            .await
            .unwrap();
        assert_eq!(missing, vec![rotten_inline, rotten_file]);
        assert_eq!(store.get_asset(&asset).await.unwrap(), None);
    }

    #[tokio::test]
    async fn the_scrub_refuses_a_store_in_use_or_absent() {
        let dir = tempfile::tempdir().unwrap();
        let err = scrub(dir.path(), false, &mut |_| {}).unwrap_err();
        assert!(matches!(err, Error::FailedPrecondition(_)), "{err}");
        let _store = open(dir.path(), 1 << 20, &Arc::new(Stats::default()));
        let err = scrub(dir.path(), true, &mut |_| {}).unwrap_err();
        assert!(err.to_string().contains("running"), "{err}");
    }
}
