//! Unit tests of `files`.

use super::*;
use crate::store::local::verifying::FILE_READ_BLOCK;
use bytes::Bytes;

#[test]
fn publish_list_remove() {
    let dir = tempfile::tempdir().unwrap();
    let area = FileArea::open(dir.path(), false).unwrap();
    let data = b"some large blob";
    let digest = Digest::of(DigestFunction::Sha256, data);
    let mut tmp = area.create_temp().unwrap();
    tmp.write_all(data).unwrap();
    area.publish(tmp, &digest, Form::Plain).unwrap();
    assert_eq!(fs::read(area.path_for(&digest)).unwrap(), data);
    let listed = area.list().unwrap();
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].0, Some((digest, Form::Plain)));
    area.remove(&digest, Form::Plain).unwrap();
    assert!(area.list().unwrap().is_empty());
}

#[test]
fn reopening_clears_uncommitted_writes() {
    let dir = tempfile::tempdir().unwrap();
    let area = FileArea::open(dir.path(), false).unwrap();
    let tmp = area.create_temp().unwrap();
    let path = tmp.path.clone();
    std::mem::forget(tmp); // as if the process died mid-write
    assert!(path.exists());
    drop(area);
    let _area = FileArea::open(dir.path(), false).unwrap();
    assert!(!path.exists());
}

#[test]
fn dropped_temp_file_is_deleted() {
    let dir = tempfile::tempdir().unwrap();
    let area = FileArea::open(dir.path(), false).unwrap();
    let tmp = area.create_temp().unwrap();
    let path = tmp.path.clone();
    drop(tmp);
    assert!(!path.exists());
}

fn publish_blob(area: &FileArea, data: &[u8]) -> Digest {
    let digest = Digest::of(DigestFunction::Sha256, data);
    let mut tmp = area.create_temp().unwrap();
    tmp.write_all(data).unwrap();
    area.publish(tmp, &digest, Form::Plain).unwrap();
    digest
}

/// Every chunk the stream yields, and the reason `on_corrupt` was given.
async fn drain(
    area: &FileArea,
    digest: &Digest,
    offset: u64,
    end: u64,
) -> (Vec<Result<Bytes>>, Option<String>) {
    use futures::StreamExt;
    let told = std::sync::Arc::new(std::sync::Mutex::new(None));
    let sink = told.clone();
    let stream = area
        .stream(
            &BlobFile::plain(*digest),
            Serve::Plain,
            offset,
            end,
            (),
            move |why: &str| *sink.lock().unwrap() = Some(why.to_string()),
        )
        .unwrap();
    let items = stream.collect().await;
    let why = told.lock().unwrap().take();
    (items, why)
}

#[tokio::test]
async fn stream_reads_a_range_and_holds_the_guard() {
    use futures::StreamExt;
    let dir = tempfile::tempdir().unwrap();
    let area = FileArea::open(dir.path(), false).unwrap();
    let data: Vec<u8> = (0..3 * FILE_READ_BLOCK as u32).map(|i| i as u8).collect();
    let digest = publish_blob(&area, &data);
    let guard = std::sync::Arc::new(());
    let (offset, end) = (10, 2 * FILE_READ_BLOCK as u64 + 5);
    let stream = area
        .stream(
            &BlobFile::plain(digest),
            Serve::Plain,
            offset,
            end,
            guard.clone(),
            |_: &str| {},
        )
        .unwrap();
    assert_eq!(std::sync::Arc::strong_count(&guard), 2);
    let chunks: Vec<Bytes> = stream.map(|c| c.unwrap()).collect().await;
    assert_eq!(chunks.concat(), data[offset as usize..end as usize]);
    assert_eq!(
        std::sync::Arc::strong_count(&guard),
        1,
        "released at the end"
    );
    area.remove(&digest, Form::Plain).unwrap();
    let err = area
        .stream(
            &BlobFile::plain(digest),
            Serve::Plain,
            0,
            1,
            (),
            |_: &str| {},
        )
        .err()
        .unwrap();
    assert!(matches!(err, Error::NotFound(_)));
}

#[tokio::test]
async fn every_range_of_an_intact_file_reads_back() {
    let dir = tempfile::tempdir().unwrap();
    let area = FileArea::open(dir.path(), false).unwrap();
    let size = 2 * FILE_READ_BLOCK + 7;
    let data: Vec<u8> = (0..size as u32).map(|i| (i * 7) as u8).collect();
    let digest = publish_blob(&area, &data);
    let block = FILE_READ_BLOCK as u64;
    let size = size as u64;
    for (offset, end) in [
        (0, size),
        (0, 0),
        (size, size),
        (block, block),
        (block - 1, block + 1),
        (block, 2 * block),
        (5, 6),
        (size - 1, size),
    ] {
        let (items, why) = drain(&area, &digest, offset, end).await;
        let bytes: Vec<Bytes> = items.into_iter().map(|c| c.unwrap()).collect();
        assert!(bytes.iter().all(|b| !b.is_empty()), "no empty chunks");
        assert_eq!(bytes.concat(), data[offset as usize..end as usize]);
        assert_eq!(why, None);
    }
    area.verify(&BlobFile::plain(digest)).unwrap();
}

#[tokio::test]
async fn a_corrupt_file_ends_the_stream_with_data_loss_before_its_last_chunk() {
    let dir = tempfile::tempdir().unwrap();
    let area = FileArea::open(dir.path(), false).unwrap();
    let data = vec![3u8; 3 * FILE_READ_BLOCK];
    let digest = publish_blob(&area, &data);
    let mut rotten = data.clone();
    rotten[2 * FILE_READ_BLOCK + 100] ^= 1; // in the last block
    fs::write(area.path_for(&digest), &rotten).unwrap();

    let (items, why) = drain(&area, &digest, 0, digest.size).await;
    assert_eq!(items.len(), 3, "two blocks, then the error");
    assert!(items[..2].iter().all(|c| c.is_ok()));
    assert!(matches!(items[2], Err(Error::DataLoss(_))));
    assert!(why.unwrap().contains("does not hash"));

    // A range that does not cover the damage fails all the same.
    let (items, why) = drain(&area, &digest, 0, 10).await;
    assert_eq!(items.len(), 1);
    assert!(matches!(items[0], Err(Error::DataLoss(_))));
    assert!(why.is_some());
    assert!(matches!(
        area.verify(&BlobFile::plain(digest)),
        Err(Error::DataLoss(_))
    ));
}
