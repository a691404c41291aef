//! Bit rot (issue 9, defect 6): blob files whose bytes changed on disk are
//! never served nor uploaded; they answer DATA_LOSS and leave the store.

use std::path::{Path, PathBuf};
use std::time::Duration;

use tonic::Code;

use crate::common::fake_upstream::{FakeUpstream, Method};
use crate::common::*;

const MIB: usize = 1 << 20;

/// Where the local store keeps the file of `d` (`blobs/sha256/xx/hash-size`).
fn blob_path(data_dir: &Path, d: &re::Digest) -> PathBuf {
    data_dir
        .join("blobs/sha256")
        .join(&d.hash[..2])
        .join(format!("{}-{}", d.hash, d.size_bytes))
}

/// Flips one bit of the file at `at` bytes from its start, keeping its size.
fn flip_bit(path: &Path, at: usize) {
    let mut bytes = std::fs::read(path).expect("blob file exists");
    bytes[at] ^= 0x10;
    std::fs::write(path, bytes).expect("rewrite blob file");
}

#[tokio::test]
async fn a_corrupt_blob_file_answers_data_loss_and_is_then_missing() {
    let server = TestServer::start().await;
    let data = blob(61, 3 * MIB + 5);
    let d = digest(&data);
    upload(&mut server.bytestream(), "", &data, 256 << 10)
        .await
        .expect("upload");
    flip_bit(&blob_path(server.data_dir(), &d), 3 * MIB);

    // A read of the first 10 bytes hashes the whole file too.
    let err = read_blob(&mut server.bytestream(), &read_name("", &d), 0, 10)
        .await
        .expect_err("corrupt bytes are not served");
    assert_eq!(err.code(), Code::DataLoss, "{err:?}");
    assert_eq!(find_missing(&mut server.cas(), &[d.clone()]).await, vec![d]);
    let s = stats(&server).await;
    assert_eq!(
        (s.metrics["outpost_corrupt_blobs_total"], s.blob_count),
        (1, 0)
    );
    server.assert_still_serves().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_corrupt_local_blob_is_never_uploaded_and_leaves_the_store() {
    let fake = FakeUpstream::start().await;
    let ttl = Duration::from_millis(300);
    let server = start_proxy(
        &fake,
        |u| {
            u.max_attempts = 1;
            u.existence_ttl = ttl;
        },
        |_| {},
    )
    .await;
    let data = blob(62, 2 * MIB + 3);
    let d = digest(&data);
    upload(&mut server.bytestream(), "", &data, 256 << 10)
        .await
        .expect("upload through the proxy");
    // The upstream loses it, the proxy's memory of it expires, and its
    // local copy rots in the first block (so all but the last chunk would
    // reach the upstream unverified).
    assert!(fake.remove_blob(&d));
    flip_bit(&blob_path(server.data_dir(), &d), 7);
    tokio::time::sleep(ttl + Duration::from_millis(100)).await;
    fake.reset_stats();

    assert_eq!(
        find_missing(&mut server.cas(), &[d.clone()]).await,
        vec![d.clone()],
        "a blob that could not be uploaded is missing"
    );
    // The upload was started and given up before its last chunk (the fake
    // may not even have seen the call): no Write carried the whole blob.
    assert!(!fake.has_blob(&d));
    for call in &fake.calls_of(Method::Write) {
        assert!(
            call.bytes_received < d.size_bytes as u64,
            "the upstream never received the whole blob: {call:?}"
        );
    }
    let s = stats(&server).await;
    assert_eq!(
        (
            s.metrics["outpost_corrupt_blobs_total"],
            s.blob_count,
            s.uploads_from_local
        ),
        (1, 0, 0)
    );
}
