//! The asset index in the local store, against real RocksDB: persistence,
//! quota and LRU, dropping entries whose content leaves, lookup by hash.

use std::path::Path;
use std::sync::Arc;

use bazel_remote_apis::build::bazel::remote::execution::v2 as re;
use prost::Message;

use super::db::{Db, asset_key};
use super::files::FileArea;
use super::quota::{Entry, EntryKind};
use super::tests::{blob, open};
use super::*;
use crate::store::asset_index::AssetKind;
use crate::store::write_bytes;

fn record(uri: &str, root: &Digest) -> AssetRecord {
    AssetRecord {
        instance: "main".into(),
        uri: uri.into(),
        digest_function: DigestFunction::Sha256.to_proto(),
        digest: Some(root.to_proto()),
        stored_at: 1_700_000_000,
        ..Default::default()
    }
}

fn key(uri: &str) -> AssetKey {
    AssetKey::of("main", uri, &[])
}

async fn store_blobs(store: &LocalStore, blobs: &[&(Digest, Bytes)]) {
    let ctx = RequestContext::default();
    for (digest, data) in blobs {
        write_bytes(store, &ctx, digest, data.clone())
            .await
            .unwrap();
    }
}

/// Writes an `index` entry and record bytes straight into a closed store's
/// RocksDB, as a crash or an older version could have left them.
fn plant_asset(dir: &Path, key: &AssetKey, bytes: Option<&[u8]>) {
    let db = Db::open(&dir.join("db"), false).unwrap();
    let key = asset_key(key);
    let entry = Entry {
        kind: EntryKind::Asset,
        size: 10,
        persisted_atime: 0,
    };
    let mut batch = db.batch();
    if let Some(bytes) = bytes {
        batch.put_value(&key, EntryKind::Asset, bytes);
    }
    batch.put_entry(&key, &entry);
    batch.commit().unwrap();
}

#[tokio::test]
async fn an_entry_round_trips_and_survives_a_reopen_without_flush() {
    let dir = tempfile::tempdir().unwrap();
    let stats = Arc::new(Stats::default());
    let b = blob(10, 1);
    let mut r = record("https://x/a.tar.gz", &b.0);
    r.kind = AssetKind::Blob as i32;
    r.expire_at = 1_800_000_000;
    {
        let store = open(dir.path(), 1 << 20, &stats);
        store_blobs(&store, &[&b]).await;
        store
            .put_asset(&key("https://x/a.tar.gz"), &r)
            .await
            .unwrap();
        assert_eq!(
            store.get_asset(&key("https://x/a.tar.gz")).await.unwrap(),
            Some(r.clone())
        );
        let o = store.occupancy().0;
        assert_eq!((o.asset_count, o.asset_bytes), (1, r.encoded_len() as u64));
        // Dropped without a flush: only the WAL has it, as after kill -9.
    }
    let store = open(dir.path(), 1 << 20, &stats);
    assert_eq!(
        store.get_asset(&key("https://x/a.tar.gz")).await.unwrap(),
        Some(r.clone())
    );
    assert_eq!(store.occupancy().0.asset_count, 1);
    store
        .remove_asset(&key("https://x/a.tar.gz"))
        .await
        .unwrap();
    assert_eq!(
        store.get_asset(&key("https://x/a.tar.gz")).await.unwrap(),
        None
    );
    assert_eq!(store.occupancy().0.asset_count, 0);
    drop(store);
    let store = open(dir.path(), 1 << 20, &stats);
    assert_eq!(
        store.get_asset(&key("https://x/a.tar.gz")).await.unwrap(),
        None
    );
}

#[tokio::test]
async fn only_the_exact_instance_uri_and_qualifiers_find_an_entry() {
    let dir = tempfile::tempdir().unwrap();
    let stats = Arc::new(Stats::default());
    let store = open(dir.path(), 1 << 20, &stats);
    let b = blob(10, 1);
    store_blobs(&store, &[&b]).await;
    let q = |v: &str| vec![("checksum.sri".to_string(), v.to_string())];
    let stored = AssetKey::of("main", "https://x/a", &q("sha256-A"));
    store
        .put_asset(&stored, &record("https://x/a", &b.0))
        .await
        .unwrap();
    for other in [
        AssetKey::of("other", "https://x/a", &q("sha256-A")),
        AssetKey::of("main", "https://x/b", &q("sha256-A")),
        AssetKey::of("main", "https://x/a", &q("sha256-B")),
        AssetKey::of("main", "https://x/a", &[]),
    ] {
        assert_eq!(store.get_asset(&other).await.unwrap(), None);
    }
    assert!(store.get_asset(&stored).await.unwrap().is_some());
}

#[tokio::test]
async fn replacing_an_entry_adjusts_occupancy() {
    let dir = tempfile::tempdir().unwrap();
    let stats = Arc::new(Stats::default());
    let store = open(dir.path(), 1 << 20, &stats);
    let (a, b) = (blob(10, 1), blob(10, 2));
    store_blobs(&store, &[&a, &b]).await;
    let small = record("u", &a.0);
    let mut large = record("u", &a.0);
    large.references_blobs = vec![b.0.to_proto()];
    store.put_asset(&key("u"), &small).await.unwrap();
    store.put_asset(&key("u"), &large).await.unwrap();
    let (o, _) = store.occupancy();
    assert_eq!(
        (o.asset_count, o.asset_bytes),
        (1, large.encoded_len() as u64)
    );
    assert_eq!(o.reserved_bytes, 0);
    assert_eq!(store.get_asset(&key("u")).await.unwrap(), Some(large));
    store.put_asset(&key("u"), &small).await.unwrap();
    assert_eq!(store.occupancy().0.asset_bytes, small.encoded_len() as u64);
}

#[tokio::test]
async fn entries_count_toward_the_quota_and_are_evicted_like_others() {
    let dir = tempfile::tempdir().unwrap();
    let stats = Arc::new(Stats::default());
    let ctx = RequestContext::default();
    // The root is not stored here, so only the LRU can take the entry.
    let absent = blob(50, 9).0;
    let r = record("u", &absent);
    let len = r.encoded_len() as u64;
    let store = open(dir.path(), len + 60, &stats);
    store.put_asset(&key("u"), &r).await.unwrap();
    let a = blob(50, 1);
    store_blobs(&store, &[&a]).await;
    assert_eq!(Stats::get(&stats.evicted_entries), 0, "both fit");
    let b = blob(50, 2);
    store_blobs(&store, &[&b]).await;
    assert_eq!(Stats::get(&stats.evicted_entries), 1);
    assert_eq!(
        store.get_asset(&key("u")).await.unwrap(),
        None,
        "oldest went"
    );
    assert_eq!(store.find_missing(&ctx, &[a.0, b.0]).await.unwrap(), vec![]);
    assert_eq!(Stats::get(&stats.asset_entries_dropped), 0);
    // Reading an entry makes it young: now the oldest blob goes first.
    let store = {
        drop(store);
        open(dir.path(), len + 110, &stats)
    };
    store.put_asset(&key("u"), &r).await.unwrap();
    store.find_missing(&ctx, &[a.0, b.0]).await.unwrap();
    assert!(store.get_asset(&key("u")).await.unwrap().is_some());
    store_blobs(&store, &[&blob(50, 3)]).await;
    assert!(store.get_asset(&key("u")).await.unwrap().is_some());
    assert_eq!(
        store.find_missing(&ctx, &[a.0, b.0]).await.unwrap(),
        vec![a.0]
    );
}

#[tokio::test]
async fn evicting_content_an_entry_keeps_alive_drops_the_entry() {
    let dir = tempfile::tempdir().unwrap();
    let stats = Arc::new(Stats::default());
    let ctx = RequestContext::default();
    let (root, referenced, dir_root, unrelated) =
        (blob(100, 1), blob(100, 2), blob(100, 3), blob(100, 4));
    let mut by_root = record("root", &root.0);
    by_root.kind = AssetKind::Directory as i32;
    let mut by_blob = record("blob", &unrelated.0);
    by_blob.references_blobs = vec![referenced.0.to_proto()];
    let mut by_dir = record("dir", &unrelated.0);
    by_dir.references_directories = vec![dir_root.0.to_proto()];
    let kept = record("kept", &unrelated.0);
    let records = [&by_root, &by_blob, &by_dir, &kept];
    let asset_bytes: u64 = records.iter().map(|r| r.encoded_len() as u64).sum();
    let store = open(dir.path(), 400 + asset_bytes + 10, &stats);
    store_blobs(&store, &[&root, &referenced, &dir_root, &unrelated]).await;
    for r in records {
        store.put_asset(&key(&r.uri), r).await.unwrap();
    }
    // LRU order, oldest first: root, referenced, dir_root, the four
    // entries, unrelated.
    for r in records {
        assert!(store.get_asset(&key(&r.uri)).await.unwrap().is_some());
    }
    store.find_missing(&ctx, &[unrelated.0]).await.unwrap();

    store_blobs(&store, &[&blob(300, 5)]).await;
    assert_eq!(Stats::get(&stats.evicted_entries), 3, "the three blobs");
    assert_eq!(Stats::get(&stats.asset_entries_dropped), 3);
    for r in [&by_root, &by_blob, &by_dir] {
        assert_eq!(
            store.get_asset(&key(&r.uri)).await.unwrap(),
            None,
            "{}",
            r.uri
        );
    }
    assert_eq!(
        store.get_asset(&key("kept")).await.unwrap().as_ref(),
        Some(&kept)
    );
    let o = store.occupancy().0;
    assert_eq!(
        (o.asset_count, o.asset_bytes),
        (1, kept.encoded_len() as u64)
    );
    drop(store);
    let store = open(dir.path(), 1 << 20, &stats);
    assert_eq!(
        store.occupancy().0.asset_count,
        1,
        "the drops were persisted"
    );
}

#[tokio::test]
async fn a_referenced_blob_found_broken_drops_the_entry() {
    let dir = tempfile::tempdir().unwrap();
    let stats = Arc::new(Stats::default());
    let ctx = RequestContext::default();
    let store = open(dir.path(), 1 << 20, &stats);
    let (root, file) = (blob(10, 1), blob(1000, 2));
    store_blobs(&store, &[&root, &file]).await;
    let mut r = record("u", &root.0);
    r.references_blobs = vec![file.0.to_proto()];
    store.put_asset(&key("u"), &r).await.unwrap();
    store
        .put_asset(&key("other"), &record("other", &root.0))
        .await
        .unwrap();
    let path = FileArea::open(dir.path(), false).unwrap().path_for(&file.0);
    std::fs::remove_file(path).unwrap();
    assert!(store.read(&ctx, &file.0, 0, 0).await.is_err());
    assert_eq!(store.get_asset(&key("u")).await.unwrap(), None);
    assert!(store.get_asset(&key("other")).await.unwrap().is_some());
    assert_eq!(Stats::get(&stats.asset_entries_dropped), 1);
}

#[tokio::test]
async fn links_are_rebuilt_at_open() {
    let dir = tempfile::tempdir().unwrap();
    let stats = Arc::new(Stats::default());
    let b = blob(100, 1);
    let r = record("u", &b.0);
    {
        let store = open(dir.path(), 1 << 20, &stats);
        store_blobs(&store, &[&b]).await;
        store.put_asset(&key("u"), &r).await.unwrap();
    }
    // Same access second: the blob key sorts first, so it is the oldest.
    let store = open(dir.path(), 100 + r.encoded_len() as u64 + 10, &stats);
    store_blobs(&store, &[&blob(100, 2)]).await;
    assert_eq!(Stats::get(&stats.evicted_entries), 1);
    assert_eq!(Stats::get(&stats.asset_entries_dropped), 1);
    assert_eq!(store.get_asset(&key("u")).await.unwrap(), None);
    assert_eq!(store.occupancy().0.asset_count, 0);
}

#[tokio::test]
async fn broken_or_dangling_records_are_dropped_at_open() {
    let dir = tempfile::tempdir().unwrap();
    let stats = Arc::new(Stats::default());
    let b = blob(10, 1);
    {
        let store = open(dir.path(), 1 << 20, &stats);
        store_blobs(&store, &[&b]).await;
        store
            .put_asset(&key("good"), &record("good", &b.0))
            .await
            .unwrap();
    }
    let absent = blob(10, 2).0;
    plant_asset(dir.path(), &key("garbage"), Some(b"\xff\xff\xff"));
    plant_asset(dir.path(), &key("no record"), None);
    let dangling = record("dangling", &absent).encode_to_vec();
    plant_asset(dir.path(), &key("dangling"), Some(&dangling));
    let mut bad_digest = record("bad digest", &b.0);
    bad_digest.references_blobs = vec![re::Digest {
        hash: "not hex".into(),
        size_bytes: 1,
    }];
    plant_asset(
        dir.path(),
        &key("bad digest"),
        Some(&bad_digest.encode_to_vec()),
    );

    let store = open(dir.path(), 1 << 20, &stats);
    assert_eq!(store.occupancy().0.asset_count, 1);
    assert_eq!(
        Stats::get(&stats.asset_entries_dropped),
        1,
        "the dangling one"
    );
    for uri in ["garbage", "no record", "dangling", "bad digest"] {
        assert_eq!(store.get_asset(&key(uri)).await.unwrap(), None, "{uri}");
    }
    assert!(store.get_asset(&key("good")).await.unwrap().is_some());
    drop(store);
    let db = Db::open(&dir.path().join("db"), false).unwrap();
    let kinds: Vec<EntryKind> = db
        .scan_index()
        .unwrap()
        .into_iter()
        .filter_map(|(_, e)| e.map(|e| e.kind))
        .collect();
    assert_eq!(kinds, vec![EntryKind::InlineBlob, EntryKind::Asset]);
    assert!(db.asset(&asset_key(&key("garbage"))).unwrap().is_none());
}

#[tokio::test]
async fn find_by_hash_finds_stored_blobs_of_any_size() {
    let dir = tempfile::tempdir().unwrap();
    let stats = Arc::new(Stats::default());
    let store = open(dir.path(), 1 << 20, &stats);
    let (inline, file) = (blob(10, 1), blob(1000, 2));
    store_blobs(&store, &[&inline, &file]).await;
    let f = DigestFunction::Sha256;
    for d in [inline.0, file.0] {
        assert_eq!(store.find_by_hash(f, d.hash_bytes()).unwrap(), Some(d));
    }
    assert_eq!(
        store.find_by_hash(f, blob(10, 3).0.hash_bytes()).unwrap(),
        None
    );
    let empty = Digest::of(f, &[]);
    assert_eq!(
        store.find_by_hash(f, empty.hash_bytes()).unwrap(),
        Some(empty)
    );
}
