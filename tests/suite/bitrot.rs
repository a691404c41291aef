//! Bit rot (issue 9, defect 6): blob files whose bytes changed on disk are
//! never served nor uploaded; they answer DATA_LOSS and leave the store.

use std::path::{Path, PathBuf};
use std::time::Duration;

use tonic::Code;

use crate::common::fake_upstream::{FakeUpstream, Method};
use crate::common::*;

const MIB: usize = 1 << 20;

/// Runs `outpost verify --data-dir DIR [extra]`: exit success, stdout, stderr.
fn verify(data_dir: &Path, extra: &[&str]) -> (bool, String, String) {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_outpost"))
        .arg("verify")
        .arg("--data-dir")
        .arg(data_dir)
        .args(extra)
        .env_remove("OUTPOST_CONFIG")
        .output()
        .expect("outpost verify runs");
    let text = |b: Vec<u8>| String::from_utf8(b).expect("utf-8 output");
    (out.status.success(), text(out.stdout), text(out.stderr))
}

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
    assert_eq!(
        find_missing(&mut server.cas(), std::slice::from_ref(&d)).await,
        vec![d]
    );
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
            // Uploaded before the answer, so the upstream can lose it.
            u.write_mode = WriteMode::Through;
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
        find_missing(&mut server.cas(), std::slice::from_ref(&d)).await,
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_kill_9_rotten_recent_files_are_removed_at_start_and_verify_reports_them() {
    let dir = tempfile::tempdir().unwrap();
    let data_dir = dir.path().join("data");
    let server = spawn_server(&data_dir, &dir.path().join("log-1"));
    let (rotten, intact) = (blob(71, 2 * MIB), blob(72, 2 * MIB));
    let (dr, di) = (digest(&rotten), digest(&intact));
    for data in [&rotten, &intact] {
        upload(&mut server.bytestream(), "", data, 256 << 10)
            .await
            .expect("upload");
    }
    let (ok, _, err) = verify(&data_dir, &[]);
    assert!(!ok && err.contains("Outpost is running on"), "{err}");

    server.kill(); // the running marker stays behind
    flip_bit(&blob_path(&data_dir, &dr), 100);
    let (ok, out, _) = verify(&data_dir, &[]);
    assert!(!ok, "corruption remains: {out}");
    assert!(
        out.contains(&format!("corrupt: file blob {}/", dr.hash)),
        "{out}"
    );
    assert!(out.contains("2 files"), "{out}");

    // The restart verifies the files written last before it serves.
    let server = spawn_server(&data_dir, &dir.path().join("log-2"));
    assert_eq!(
        find_missing(&mut server.cas(), &[dr.clone(), di.clone()]).await,
        vec![dr.clone()]
    );
    assert!(
        server.log().contains("did not stop cleanly"),
        "{}",
        server.log()
    );
    let (data, _) = read_blob(&mut server.bytestream(), &read_name("", &di), 0, 0)
        .await
        .expect("the intact blob is served");
    assert_eq!(data, intact);
    drop(server); // a clean stop

    let (ok, out, _) = verify(&data_dir, &["--repair"]);
    assert!(ok && out.contains("OK: no corrupt entries"), "{out}");
}
