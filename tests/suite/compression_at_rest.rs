//! Compression at rest (issue 12): compressible blobs are kept
//! zstd-compressed in the local store, the quota counts their bytes on
//! disk, and every client still reads them plain, after a restart and after
//! kill -9; `outpost verify` decodes and hashes them.

use std::path::Path;

use tonic::Code;

use crate::common::*;

/// Text-like bytes (build logs, sources) that zstd shrinks several times.
fn text(seed: u64, len: usize) -> Vec<u8> {
    let words: [&[u8]; 6] = [
        b"warning: unused ",
        b"variable ",
        b"src/main.rs:",
        b"error[E0308] ",
        b"note: ",
        b"\n",
    ];
    let mut out = Vec::with_capacity(len);
    let mut x = seed;
    while out.len() < len {
        x = x
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        let r = x >> 33;
        out.extend_from_slice(words[(r % 6) as usize]);
        out.extend_from_slice((r % 1000).to_string().as_bytes());
    }
    out.truncate(len);
    out
}

/// Runs `outpost verify --data-dir DIR`: exit success and stdout.
fn verify(data_dir: &Path) -> (bool, String) {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_outpost"))
        .arg("verify")
        .arg("--data-dir")
        .arg(data_dir)
        .env_remove("OUTPOST_CONFIG")
        .output()
        .expect("outpost verify runs");
    let stdout = String::from_utf8(out.stdout).expect("utf-8 output");
    (out.status.success(), stdout)
}

/// Reads `data`'s blob whole, a range of it, and (when it fits a batch)
/// through BatchReadBlobs.
async fn assert_reads_back(clients: &impl Clients, data: &[u8]) {
    let d = digest(data);
    let name = read_name("", &d);
    let (whole, _) = read_blob(&mut clients.bytestream(), &name, 0, 0)
        .await
        .expect("read");
    assert!(whole == data, "whole read of {}", d.hash);
    let (part, _) = read_blob(&mut clients.bytestream(), &name, 1000, 777)
        .await
        .expect("ranged read");
    assert!(part == data[1000..1777], "ranged read of {}", d.hash);
    if data.len() > 4 << 20 {
        return;
    }
    let batch = clients
        .cas()
        .batch_read_blobs(re::BatchReadBlobsRequest {
            digests: vec![d.clone()],
            ..Default::default()
        })
        .await
        .expect("BatchReadBlobs")
        .into_inner();
    assert_eq!(entry_code(&batch.responses[0].status), Code::Ok);
    assert!(batch.responses[0].data == data, "batch read of {}", d.hash);
}

/// Two compressible blobs (ByteStream, BatchUpdateBlobs) and an
/// incompressible one; returns them and the sum of their sizes.
async fn upload_mix(clients: &impl Clients) -> (Vec<Vec<u8>>, u64) {
    let streamed = text(1, 300_000);
    let batched = text(2, 100_000);
    let noise = blob(3, 100_000);
    upload(&mut clients.bytestream(), "", &streamed, 64 << 10)
        .await
        .expect("upload");
    assert_eq!(
        batch_update(&mut clients.cas(), "", &[&batched, &noise]).await,
        vec![Code::Ok, Code::Ok]
    );
    let plain = (streamed.len() + batched.len() + noise.len()) as u64;
    (vec![streamed, batched, noise], plain)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compressible_blobs_take_less_quota_and_read_back_plain_after_a_restart() {
    let server = TestServer::start().await;
    let (blobs, plain) = upload_mix(&server).await;
    let before = stats(&server).await;
    assert_eq!(before.blob_count, 3);
    assert!(
        before.blob_bytes < 100_000 + (plain - 100_000) / 2,
        "the quota counts bytes on disk: {} of {plain}",
        before.blob_bytes
    );
    assert!(before.blob_bytes > 100_000, "the noise stays raw");
    for data in &blobs {
        assert_reads_back(&server, data).await;
    }
    let server = server.restart().await;
    let after = stats(&server).await;
    assert_eq!(
        (after.blob_count, after.blob_bytes),
        (before.blob_count, before.blob_bytes)
    );
    for data in &blobs {
        assert_reads_back(&server, data).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_compression_off_blobs_are_stored_plain() {
    let server = TestServer::start_with(|c| c.store_compression = false).await;
    let (blobs, plain) = upload_mix(&server).await;
    assert_eq!(stats(&server).await.blob_bytes, plain);
    for data in &blobs {
        assert_reads_back(&server, data).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_keeps_compressed_entries_readable_and_verify_hashes_them() {
    let dir = tempfile::tempdir().unwrap();
    let data_dir = dir.path().join("data");
    let server = spawn_server(&data_dir, &dir.path().join("log-1"));
    let blobs: Vec<Vec<u8>> = (10..30)
        .map(|seed| text(seed, 5_000 + seed as usize * 997))
        .collect();
    for (i, data) in blobs.iter().enumerate() {
        if i % 2 == 0 {
            upload(&mut server.bytestream(), "", data, 4096)
                .await
                .expect("upload");
        } else {
            assert_eq!(
                batch_update(&mut server.cas(), "", &[data]).await,
                vec![Code::Ok]
            );
        }
    }
    // A large one, killed while (or after) it is compressed behind its write.
    let large = text(99, 6 << 20);
    upload(&mut server.bytestream(), "", &large, 1 << 20)
        .await
        .expect("upload");
    server.kill();

    let (ok, out) = verify(&data_dir);
    assert!(ok, "{out}");
    assert!(
        out.contains("(20 compressed)") || out.contains("(21 compressed)"),
        "{out}"
    );
    assert!(out.contains("OK: no corrupt entries"), "{out}");

    let server = spawn_server(&data_dir, &dir.path().join("log-2"));
    let mut digests: Vec<re::Digest> = blobs.iter().map(|b| digest(b)).collect();
    digests.push(digest(&large));
    assert!(find_missing(&mut server.cas(), &digests).await.is_empty());
    assert_reads_back(&server, &large).await;
    for data in &blobs {
        assert_reads_back(&server, data).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_large_compressible_blob_is_compressed_behind_its_write() {
    let server = TestServer::start().await;
    let large = text(7, (3 << 20) + 5);
    upload(&mut server.bytestream(), "", &large, 256 << 10)
        .await
        .expect("upload");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        let s = stats(&server).await;
        if s.blob_bytes < large.len() as u64 / 2 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "never compressed: {s:?}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert_reads_back(&server, &large).await;
    let server = server.restart().await;
    assert!(stats(&server).await.blob_bytes < large.len() as u64 / 2);
    assert_reads_back(&server, &large).await;
}
