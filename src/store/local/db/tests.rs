//! Unit tests of `db`.

use super::*;

#[test]
fn keys_round_trip() {
    let d = Digest::of(DigestFunction::Sha256, b"x");
    assert_eq!(parse_blob_key(&blob_key(&d)), Some(d));
    let a = action_key(&ActionKey {
        instance: "a/b".into(),
        action: d,
    });
    assert_eq!(parse_blob_key(&a), None);
    assert!(a.ends_with(b"a/b"));
    let e = Entry {
        kind: EntryKind::FileBlob,
        size: 7,
        persisted_atime: 99,
    };
    assert_eq!(parse_index_value(&index_value(&e)), Some(e));
}

#[test]
fn layouts_are_stable() {
    let d = Digest::of(DigestFunction::Sha256, b"x");
    let key = blob_key(&d);
    assert_eq!(key.len(), 42);
    assert_eq!(key[0], b'b');
    assert_eq!(&key[2..34], d.hash_bytes());
    assert_eq!(&key[34..], &d.size.to_be_bytes());
    for (kind, tag) in [
        (EntryKind::InlineBlob, 0),
        (EntryKind::FileBlob, 1),
        (EntryKind::ActionResult, 2),
        (EntryKind::Asset, 3),
        (EntryKind::InlineZstd, 4),
        (EntryKind::FileZstd, 5),
    ] {
        assert_eq!(kind_tag(kind), tag);
        assert_eq!(kind_from_tag(tag), Some(kind));
    }
    assert_eq!(kind_from_tag(6), None);
    let asset = asset_key(&AssetKey([7; 32]));
    assert_eq!(asset.len(), 33);
    assert_eq!(asset[0], b's');
    assert_eq!(&asset[1..], &[7; 32]);
    assert_eq!(parse_index_value(&[0; 16]), None);
}

#[test]
fn batches_put_read_and_delete() {
    let dir = tempfile::tempdir().unwrap();
    let db = Db::open(dir.path(), false).unwrap();
    let d = Digest::of(DigestFunction::Sha256, b"small");
    let key = blob_key(&d);
    let entry = Entry {
        kind: EntryKind::InlineBlob,
        size: d.size,
        persisted_atime: 5,
    };
    let mut batch = db.batch();
    batch.put_inline(&key, b"small");
    batch.put_entry(&key, &entry);
    batch.put_entry(b"junk", &entry);
    batch.commit().unwrap();
    assert_eq!(&*db.inline(&key).unwrap().unwrap(), b"small");
    let scanned = db.scan_index().unwrap();
    assert_eq!(scanned.len(), 2);
    assert!(scanned.contains(&(key.clone(), Some(entry))));

    let mut batch = db.batch();
    batch.delete(&key, EntryKind::InlineBlob);
    batch.delete_entry(b"junk");
    batch.write_unsynced().unwrap();
    assert!(db.inline(&key).unwrap().is_none());
    assert!(db.scan_index().unwrap().is_empty());
}

#[test]
fn assets_put_read_and_delete() {
    let dir = tempfile::tempdir().unwrap();
    let db = Db::open(dir.path(), false).unwrap();
    let key = asset_key(&AssetKey([1; 32]));
    let mut batch = db.batch();
    batch.put_value(&key, EntryKind::Asset, b"record");
    batch.commit().unwrap();
    assert_eq!(&*db.asset(&key).unwrap().unwrap(), b"record");
    let mut batch = db.batch();
    batch.delete(&key, EntryKind::Asset);
    batch.commit().unwrap();
    assert!(db.asset(&key).unwrap().is_none());
}

#[test]
fn upload_records_put_scan_and_delete() {
    let dir = tempfile::tempdir().unwrap();
    let db = Db::open(dir.path(), false).unwrap();
    let mut batch = db.batch();
    batch.put_upload(b"k2", b"v2");
    batch.put_upload(b"k1", b"v1");
    batch.commit().unwrap();
    let scanned = db.scan_uploads().unwrap();
    assert_eq!(
        scanned,
        vec![
            (b"k1".to_vec(), b"v1".to_vec()),
            (b"k2".to_vec(), b"v2".to_vec())
        ]
    );
    assert!(db.scan_index().unwrap().is_empty());
    let mut batch = db.batch();
    batch.delete_upload(b"k1");
    batch.write_unsynced().unwrap();
    assert_eq!(
        db.scan_uploads().unwrap(),
        vec![(b"k2".to_vec(), b"v2".to_vec())]
    );
}

#[test]
fn blobs_with_hash_finds_every_size_and_nothing_else() {
    let dir = tempfile::tempdir().unwrap();
    let db = Db::open(dir.path(), false).unwrap();
    let d = Digest::of(DigestFunction::Sha256, b"x");
    let other_size = Digest { size: 9, ..d };
    let mut next_hash = d;
    next_hash.hash[31] = next_hash.hash[31].wrapping_add(1);
    let entry = Entry {
        kind: EntryKind::InlineBlob,
        size: 1,
        persisted_atime: 0,
    };
    let mut batch = db.batch();
    for digest in [d, other_size, next_hash] {
        batch.put_entry(&blob_key(&digest), &entry);
    }
    batch.commit().unwrap();
    let found = db
        .blobs_with_hash(DigestFunction::Sha256, d.hash_bytes())
        .unwrap();
    assert_eq!(found, vec![d, other_size]);
    let unknown = db
        .blobs_with_hash(DigestFunction::Sha256, &[0; 32])
        .unwrap();
    assert!(unknown.is_empty());
}

#[test]
fn sha256_keys_keep_their_layout_and_every_function_round_trips() {
    let d = Digest::of(DigestFunction::Sha256, b"abc");
    // The layout data directories were written with: b · 1 · 32 bytes · size.
    let mut expected = vec![b'b', 1];
    expected.extend_from_slice(d.hash_bytes());
    expected.extend_from_slice(&3u64.to_be_bytes());
    assert_eq!(blob_key(&d), expected);
    for f in DigestFunction::ALL {
        let d = Digest::of(f, b"abc");
        let key = blob_key(&d);
        assert_eq!(key.len(), 1 + digest_len(&d));
        assert_eq!(parse_blob_key(&key), Some(d), "{f:?}");
        let mut longer = key.clone();
        longer.push(0);
        assert_eq!(parse_blob_key(&longer), None);
        assert_eq!(parse_blob_key(&key[..key.len() - 1]), None);
    }
}

#[test]
fn a_blake3_and_a_sha256_blob_with_the_same_hash_have_distinct_keys() {
    let b = Digest::of(DigestFunction::Blake3, b"x");
    let s = Digest {
        function: DigestFunction::Sha256,
        ..b
    };
    assert_ne!(blob_key(&b), blob_key(&s));
    assert_eq!(parse_blob_key(&blob_key(&s)), Some(s));
}
