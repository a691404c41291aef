//! The local store against real RocksDB: reopen, start-up recovery, broken
//! and corrupt blobs, eviction, quota windows and the reclaimer.

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
