//! A blob far larger than the server's memory budget streams through.

use std::time::Instant;

use futures::StreamExt as _;
use sha2::{Digest as _, Sha256};

use crate::common::*;

const CHUNK: usize = 1 << 20;
const CHUNKS: usize = 512;
const SIZE: usize = CHUNK * CHUNKS;
/// The server may use this much memory at most while moving SIZE bytes.
const RSS_LIMIT: u64 = 200 << 20;

/// Chunk `i` of the large blob, generated on demand.
fn chunk(i: usize) -> Vec<u8> {
    Rng::new(0x51ab_0000 + i as u64).bytes(CHUNK)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_512_mib_blob_streams_through_with_bounded_server_memory() {
    let dir = tempfile::tempdir().unwrap();
    let server = spawn_server(&dir.path().join("data"), &dir.path().join("log"));
    let started = Instant::now();

    let mut hasher = Sha256::new();
    for i in 0..CHUNKS {
        hasher.update(chunk(i));
    }
    let d = raw_digest(&hex::encode(hasher.finalize()), SIZE as i64);

    let name = write_name("", &d);
    let requests = futures::stream::iter(0..CHUNKS).map(move |i| bs::WriteRequest {
        resource_name: if i == 0 { name.clone() } else { String::new() },
        write_offset: (i * CHUNK) as i64,
        finish_write: i == CHUNKS - 1,
        data: chunk(i),
    });
    let mut bs = server.bytestream();
    let committed = bs
        .write(requests)
        .await
        .unwrap()
        .into_inner()
        .committed_size;
    assert_eq!(committed, SIZE as i64);
    let written = started.elapsed();

    assert_eq!(read_digest(&mut bs, &d).await.unwrap(), d);
    let (tail, _) = read_blob(&mut bs, &read_name("", &d), (SIZE - 10) as i64, 0)
        .await
        .unwrap();
    assert_eq!(tail, chunk(CHUNKS - 1)[CHUNK - 10..]);

    let s = stats(&server).await;
    assert_eq!((s.blob_count, s.blob_bytes), (1, SIZE as u64));
    let rss = server.peak_rss_bytes();
    eprintln!(
        "512 MiB: written in {written:?}, read back by {:?}; server peak RSS {} MiB",
        started.elapsed(),
        rss >> 20
    );
    assert!(rss < RSS_LIMIT, "server peak RSS {} MiB", rss >> 20);
    assert!(!server.log().contains("ERROR"), "{}", server.log());
}
