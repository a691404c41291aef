//! Compression at rest against real RocksDB: which blobs are kept
//! compressed, reads of every form (plain, ranged, compressed as stored),
//! native compressed writes (bombs, mismatches, resumption), reopening,
//! corruption and the scrub.

use std::path::Path;

use futures::StreamExt;

use super::files::Form;
use super::quota::EntryKind;
use super::*;
use crate::digest::DigestFunction;
use crate::store::{read_to_bytes, write_bytes};

/// Inline up to 4 KiB, so small blobs can be compressed.
const INLINE: u64 = 4096;

fn open(dir: &Path, compress: bool) -> LocalStore {
    let options = LocalStoreOptions {
        dir: dir.to_path_buf(),
        quota_bytes: 64 << 20,
        inline_limit: INLINE,
        sync: false,
    };
    LocalStore::open(options, Arc::new(Stats::default()))
        .unwrap()
        .with_compression(compress)
}

/// Text-like bytes that compress several times over.
fn text(len: usize, seed: u8) -> (Digest, Bytes) {
    let words: &[&[u8]] = &[b"object ", b"archive ", b"symbol ", b"linker ", b"debug "];
    let mut data = Vec::with_capacity(len);
    let mut i = seed as usize;
    while data.len() < len {
        data.extend_from_slice(words[i % words.len()]);
        i = i.wrapping_mul(7).wrapping_add(3);
    }
    data.truncate(len);
    let data = Bytes::from(data);
    (Digest::of(DigestFunction::Sha256, &data), data)
}

/// Bytes zstd cannot shrink.
fn noise(len: usize) -> (Digest, Bytes) {
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let data: Bytes = (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect();
    (Digest::of(DigestFunction::Sha256, &data), data)
}

fn kind(store: &LocalStore, digest: &Digest) -> Option<(EntryKind, u64)> {
    let entry = store.catalog.touch(&blob_key(digest)).unwrap()?;
    Some((entry.kind, entry.size))
}

async fn collect(stream: ChunkStream) -> Result<Vec<u8>> {
    let mut out = Vec::new();
    let mut stream = stream;
    while let Some(chunk) = stream.next().await {
        out.extend_from_slice(&chunk?);
    }
    Ok(out)
}

async fn read_range(store: &LocalStore, d: &Digest, offset: u64, limit: u64) -> Result<Vec<u8>> {
    collect(
        store
            .read(&RequestContext::default(), d, offset, limit)
            .await?,
    )
    .await
}

async fn read_zstd(store: &LocalStore, d: &Digest, offset: u64) -> Result<Vec<u8>> {
    let ctx = RequestContext::default();
    collect(
        store
            .read_compressed(&ctx, d, offset, Compressor::Zstd)
            .await?,
    )
    .await
}

/// Writes `packed` (zstd bytes of `digest`) through the native compressed
/// writer, in pieces of `piece` bytes.
async fn write_zstd(
    store: &LocalStore,
    digest: &Digest,
    packed: &[u8],
    piece: usize,
) -> Result<()> {
    let ctx = RequestContext::default();
    let mut writer = store
        .begin_write_compressed(&ctx, digest, Compressor::Zstd)
        .await?;
    for part in packed.chunks(piece) {
        writer.write(Bytes::copy_from_slice(part)).await?;
    }
    writer.commit().await
}

#[tokio::test]
async fn small_blobs_are_kept_compressed_when_it_pays_and_read_back_plain() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path(), true);
    let ctx = RequestContext::default();
    let (text_d, text_data) = text(3000, 1);
    let (noise_d, noise_data) = noise(3000);
    let (tiny_d, tiny_data) = text(300, 2);
    for (d, data) in [
        (text_d, &text_data),
        (noise_d, &noise_data),
        (tiny_d, &tiny_data),
    ] {
        write_bytes(&store, &ctx, &d, data.clone()).await.unwrap();
    }
    let (k, size) = kind(&store, &text_d).unwrap();
    assert_eq!(k, EntryKind::InlineZstd);
    assert!(size < 3000 / 2, "counted in bytes on disk: {size}");
    assert_eq!(kind(&store, &noise_d), Some((EntryKind::InlineBlob, 3000)));
    assert_eq!(kind(&store, &tiny_d), Some((EntryKind::InlineBlob, 300)));
    let (occupancy, _) = store.occupancy();
    assert_eq!(occupancy.blob_bytes, size + 3000 + 300);
    assert_eq!(Stats::get(&store.stats.store_compressed_blobs), 1);
    assert_eq!(Stats::get(&store.stats.store_compressed_disk_bytes), size);

    assert_eq!(
        read_to_bytes(&store, &ctx, &text_d).await.unwrap(),
        text_data
    );
    assert_eq!(
        read_range(&store, &text_d, 1000, 17).await.unwrap(),
        &text_data[1000..1017]
    );
    // A compressed read serves the stored bytes as they are.
    let stored = read_zstd(&store, &text_d, 0).await.unwrap();
    assert_eq!(stored.len() as u64, size);
    assert_eq!(compression::decompress(&stored, 3000).unwrap(), text_data);
    let tail = read_zstd(&store, &text_d, 2990).await.unwrap();
    assert_eq!(
        compression::decompress(&tail, 10).unwrap(),
        &text_data[2990..]
    );
    let noise_packed = read_zstd(&store, &noise_d, 0).await.unwrap();
    assert_eq!(
        compression::decompress(&noise_packed, 3000).unwrap(),
        noise_data
    );
}

#[tokio::test]
async fn batches_are_compressed_too_and_everything_survives_a_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let ctx = RequestContext::default();
    let blobs: Vec<(Digest, Bytes)> = (0..5).map(|i| text(2000 + i * 10, i as u8)).collect();
    {
        let store = open(dir.path(), true);
        let results = store.write_many(&ctx, blobs.clone()).await;
        assert!(results.iter().all(|r| r.is_ok()));
        for (d, _) in &blobs {
            assert_eq!(kind(&store, d).unwrap().0, EntryKind::InlineZstd);
        }
        store.flush().unwrap();
    }
    // Compression off: new blobs plain, compressed ones still readable.
    let store = open(dir.path(), false);
    for (d, data) in &blobs {
        assert_eq!(kind(&store, d).unwrap().0, EntryKind::InlineZstd);
        assert_eq!(read_to_bytes(&store, &ctx, d).await.unwrap(), data);
    }
    let (d, data) = text(2500, 9);
    write_bytes(&store, &ctx, &d, data).await.unwrap();
    assert_eq!(kind(&store, &d), Some((EntryKind::InlineBlob, 2500)));
}

#[tokio::test]
async fn a_compressed_upload_of_a_large_blob_is_kept_as_sent() {
    let dir = tempfile::tempdir().unwrap();
    let ctx = RequestContext::default();
    let (d, data) = text(3 << 20, 3);
    let packed = compression::compress(&data);
    {
        let store = open(dir.path(), true);
        write_zstd(&store, &d, &packed, 100_000).await.unwrap();
        assert_eq!(
            kind(&store, &d),
            Some((EntryKind::FileZstd, packed.len() as u64))
        );
        let path = store.catalog.files().path_of(&d, Form::Zstd);
        assert!(path.to_str().unwrap().ends_with(".zst"));
        assert_eq!(std::fs::read(&path).unwrap(), packed);
        assert!(!store.catalog.files().path_for(&d).exists());
        store.flush().unwrap();
    }
    let store = open(dir.path(), true);
    assert_eq!(read_to_bytes(&store, &ctx, &d).await.unwrap(), data);
    let (offset, limit) = ((1 << 20) + 5, (1 << 20) + 3);
    let range = read_range(&store, &d, offset, limit).await.unwrap();
    assert_eq!(range, &data[offset as usize..(offset + limit) as usize]);
    assert_eq!(read_zstd(&store, &d, 0).await.unwrap(), packed, "as stored");
    let tail = read_zstd(&store, &d, offset).await.unwrap();
    let rest = d.size - offset;
    assert_eq!(
        compression::decompress(&tail, rest).unwrap(),
        &data[offset as usize..]
    );
    drop(store);
    let report = scrub::scrub(dir.path(), false, &mut |_| {}).unwrap();
    assert_eq!((report.file_blobs, report.compressed_blobs), (1, 1));
    assert!(report.corrupt.is_empty() && report.stray_files.is_empty());
}

/// Stores `data` compressed as a file, then flips a byte in its middle.
async fn store_rotten(dir: &Path, d: &Digest, data: &[u8]) -> std::path::PathBuf {
    let store = open(dir, true);
    write_zstd(&store, d, &compression::compress(data), 1 << 20)
        .await
        .unwrap();
    store.close_cleanly().unwrap();
    let path = store.catalog.files().path_of(d, Form::Zstd);
    let mut rotten = std::fs::read(&path).unwrap();
    let at = rotten.len() / 2;
    rotten[at] ^= 0x55;
    std::fs::write(&path, &rotten).unwrap();
    path
}

#[tokio::test]
async fn a_corrupt_compressed_file_is_never_served_and_is_removed() {
    let (d, data) = text(2 << 20, 4);
    let dir = tempfile::tempdir().unwrap();
    store_rotten(dir.path(), &d, &data).await;
    let report = scrub::scrub(dir.path(), false, &mut |_| {}).unwrap();
    assert_eq!(report.corrupt.len(), 1, "{:?}", report.corrupt);
    assert!(report.corrupt[0].entry.starts_with("compressed file blob"));

    for stored in [false, true] {
        let dir = tempfile::tempdir().unwrap();
        let path = store_rotten(dir.path(), &d, &data).await;
        let store = open(dir.path(), true);
        let read = if stored {
            read_zstd(&store, &d, 0).await
        } else {
            read_range(&store, &d, 0, 10).await
        };
        let err = read.unwrap_err();
        assert!(matches!(err, Error::DataLoss(_)), "{err:?}");
        assert_eq!(kind(&store, &d), None, "forgotten");
        assert!(!path.exists());
    }
    // After an unclean stop, the start-up check decodes and hashes it.
    let dir = tempfile::tempdir().unwrap();
    let path = store_rotten(dir.path(), &d, &data).await;
    std::fs::write(dir.path().join(running::MARKER), "").unwrap();
    let store = open(dir.path(), true);
    assert_eq!(kind(&store, &d), None);
    assert!(!path.exists());
}

#[tokio::test]
async fn a_bomb_or_a_mismatch_stores_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path(), true);
    let (d, data) = text(2 << 20, 5);
    let packed = compression::compress(&data);
    // Declared smaller than what the frame expands to: cut off.
    let small = Digest { size: 1 << 20, ..d };
    let err = write_zstd(&store, &small, &packed, 1 << 20)
        .await
        .unwrap_err();
    assert!(matches!(err, Error::InvalidArgument(_)), "{err:?}");
    assert!(err.to_string().contains("expands past"), "{err}");
    // Right size, wrong hash.
    let mut wrong = d;
    wrong.hash[0] ^= 1;
    let err = write_zstd(&store, &wrong, &packed, 1 << 20)
        .await
        .unwrap_err();
    assert!(matches!(err, Error::InvalidArgument(_)), "{err:?}");
    // Not zstd at all.
    let err = write_zstd(&store, &d, &data[..5000], 1000)
        .await
        .unwrap_err();
    assert!(matches!(err, Error::InvalidArgument(_)), "{err:?}");
    // A frame cut short.
    let err = write_zstd(&store, &d, &packed[..packed.len() - 10], 1 << 20)
        .await
        .unwrap_err();
    assert!(matches!(err, Error::InvalidArgument(_)), "{err:?}");
    for digest in [small, wrong, d] {
        assert_eq!(kind(&store, &digest), None);
    }
    let (occupancy, _) = store.occupancy();
    assert_eq!((occupancy.blob_count, occupancy.reserved_bytes), (0, 0));
    assert!(store.catalog.files().list().unwrap().is_empty());
}

#[tokio::test]
async fn a_parked_compressed_upload_resumes_after_its_last_whole_frame() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path(), true);
    let ctx = RequestContext::default();
    let (d, data) = text(3 << 20, 6);
    let first = compression::compress(&data[..1 << 20]);
    let second = compression::compress(&data[1 << 20..]);
    let mut writer = store
        .begin_write_compressed(&ctx, &d, Compressor::Zstd)
        .await
        .unwrap();
    writer.write(first.slice(..first.len() / 2)).await.unwrap();
    assert!(writer.park());
    assert_eq!(writer.committed_size(), 0, "no whole frame yet");
    writer.write(first.clone()).await.unwrap();
    writer.write(second.slice(..100)).await.unwrap();
    assert!(writer.park());
    assert_eq!(writer.committed_size(), 1 << 20, "after the first frame");
    let resumed = compression::compress(&data[1 << 20..]);
    writer.write(resumed.clone()).await.unwrap();
    assert_eq!(writer.committed_size(), d.size);
    writer.commit().await.unwrap();
    let (k, size) = kind(&store, &d).unwrap();
    assert_eq!(k, EntryKind::FileZstd);
    assert_eq!(size, (first.len() + resumed.len()) as u64);
    assert_eq!(read_to_bytes(&store, &ctx, &d).await.unwrap(), data);
    let stored = read_zstd(&store, &d, 0).await.unwrap();
    assert_eq!(compression::decompress(&stored, d.size).unwrap(), data);
}

#[tokio::test]
async fn a_small_compressed_upload_that_does_not_pay_is_stored_plain() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path(), true);
    let ctx = RequestContext::default();
    let (d, data) = noise(3000);
    write_zstd(&store, &d, &compression::compress(&data), 700)
        .await
        .unwrap();
    assert_eq!(kind(&store, &d), Some((EntryKind::InlineBlob, 3000)));
    let (t, text_data) = text(3000, 7);
    let packed = compression::compress(&text_data);
    write_zstd(&store, &t, &packed, 700).await.unwrap();
    assert_eq!(
        kind(&store, &t),
        Some((EntryKind::InlineZstd, packed.len() as u64))
    );
    assert_eq!(read_to_bytes(&store, &ctx, &t).await.unwrap(), text_data);
    assert_eq!(read_zstd(&store, &t, 0).await.unwrap(), packed);
}

#[tokio::test]
async fn a_file_in_the_form_its_entry_does_not_name_is_removed_at_start() {
    let dir = tempfile::tempdir().unwrap();
    let ctx = RequestContext::default();
    let (d, data) = text(1 << 20, 8);
    let plain_path = {
        let store = open(dir.path(), false); // no background pass
        write_bytes(&store, &ctx, &d, data.clone()).await.unwrap();
        assert_eq!(kind(&store, &d).unwrap().0, EntryKind::FileBlob);
        store.flush().unwrap();
        let zst = store.catalog.files().path_of(&d, Form::Zstd);
        std::fs::write(&zst, compression::compress(&data)).unwrap();
        store.catalog.files().path_for(&d)
    };
    let store = open(dir.path(), true);
    assert!(plain_path.exists());
    assert!(!store.catalog.files().path_of(&d, Form::Zstd).exists());
    assert_eq!(read_to_bytes(&store, &ctx, &d).await.unwrap(), data);
}

#[tokio::test]
async fn committed_raw_files_are_compressed_behind_the_writes() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path(), true);
    let ctx = RequestContext::default();
    let (d, data) = text(3 << 20, 10);
    write_bytes(&store, &ctx, &d, data.clone()).await.unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while kind(&store, &d).unwrap().0 != EntryKind::FileZstd {
        assert!(std::time::Instant::now() < deadline, "never compressed");
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    let (_, size) = kind(&store, &d).unwrap();
    assert_eq!(
        store.occupancy().0.blob_bytes,
        size,
        "the quota counts the .zst"
    );
    assert!(!store.catalog.files().path_for(&d).exists());
    assert_eq!(read_to_bytes(&store, &ctx, &d).await.unwrap(), data);
    // An incompressible file stays raw.
    let (n, noise_data) = noise(1 << 20);
    write_bytes(&store, &ctx, &n, noise_data).await.unwrap();
    compactor::compact(&Arc::downgrade(&store.catalog), &n).unwrap();
    assert_eq!(kind(&store, &n), Some((EntryKind::FileBlob, 1 << 20)));
}

#[tokio::test]
async fn a_swap_keeps_open_reads_going_and_survives_a_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let ctx = RequestContext::default();
    let (d, data) = text(5 << 20, 11);
    {
        let store = open(dir.path(), false); // no background pass: swap by hand
        write_bytes(&store, &ctx, &d, data.clone()).await.unwrap();
        let reading = store.read(&ctx, &d, 0, 0).await.unwrap();
        compactor::compact(&Arc::downgrade(&store.catalog), &d).unwrap();
        let (k, size) = kind(&store, &d).unwrap();
        assert_eq!(k, EntryKind::FileZstd);
        assert!(size < d.size / 2);
        assert_eq!(
            collect(reading).await.unwrap(),
            data,
            "the open read goes on"
        );
        let range = read_range(&store, &d, 3 << 20, 1000).await.unwrap();
        assert_eq!(range, &data[3 << 20..(3 << 20) + 1000]);
        let stored = read_zstd(&store, &d, 0).await.unwrap();
        assert_eq!(stored.len() as u64, size, "served as stored");
        store.close_cleanly().unwrap();
    }
    // A crash after the entry was rewritten, before the raw file left.
    let store = open(dir.path(), true);
    std::fs::write(store.catalog.files().path_for(&d), &data).unwrap();
    store.close_cleanly().unwrap();
    drop(store);
    let store = open(dir.path(), true);
    assert!(!store.catalog.files().path_for(&d).exists());
    assert_eq!(kind(&store, &d).unwrap().0, EntryKind::FileZstd);
    assert_eq!(read_to_bytes(&store, &ctx, &d).await.unwrap(), data);
    store.close_cleanly().unwrap();
    drop(store);
    let report = scrub::scrub(dir.path(), false, &mut |_| {}).unwrap();
    assert!(report.corrupt.is_empty() && report.stray_files.is_empty());
    assert_eq!(report.compressed_blobs, 1);
}

#[tokio::test]
async fn a_read_that_looked_up_the_raw_file_before_the_swap_retries_once() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path(), false);
    let ctx = RequestContext::default();
    let (d, data) = text(2 << 20, 12);
    write_bytes(&store, &ctx, &d, data.clone()).await.unwrap();
    let key = blob_key(&d);
    let stale = store.catalog.touch(&key).unwrap().unwrap();
    assert_eq!(stale.kind, EntryKind::FileBlob);
    compactor::compact(&Arc::downgrade(&store.catalog), &d).unwrap();
    let stream = store.read_found(&d, &key, stale, 0, d.size).unwrap();
    assert_eq!(collect(stream).await.unwrap(), data);
    assert_eq!(
        kind(&store, &d).unwrap().0,
        EntryKind::FileZstd,
        "not dropped"
    );
}

#[tokio::test]
async fn a_file_that_expands_a_thousandfold_reads_back_in_every_range() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path(), true);
    let data = Bytes::from(vec![7u8; 24 << 20]);
    let d = Digest::of(DigestFunction::Sha256, &data);
    let packed = compression::compress(&data);
    assert!(packed.len() < 24 << 10, "one read block decodes to many");
    write_zstd(&store, &d, &packed, 1000).await.unwrap();
    assert_eq!(
        kind(&store, &d),
        Some((EntryKind::FileZstd, packed.len() as u64))
    );
    let size = d.size;
    for (offset, limit) in [(0, 0), ((5 << 20) + 3, 4 << 20), (size - 1, 0), (size, 0)] {
        let got = read_range(&store, &d, offset, limit).await.unwrap();
        let end = if limit == 0 { size } else { offset + limit };
        assert!(
            got == data[offset as usize..end as usize],
            "{offset}+{limit}"
        );
    }
    assert_eq!(read_zstd(&store, &d, 0).await.unwrap(), packed);
}
