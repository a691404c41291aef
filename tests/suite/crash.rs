//! SIGKILL in the middle of many uploads loses nothing that was acknowledged
//! and never serves a damaged blob.

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tonic::Code;

use crate::common::*;

const WORKERS: u64 = 8;
/// Acknowledged uploads to wait for before the kill.
const ACKED_BEFORE_KILL: usize = 60;
/// Bytes sent of the upload that stalls (larger than any other upload).
const STALLED_AT: usize = (4 << 20) + 7;

/// Upload `i` of worker `w`: every third one a file-backed blob (> 1 MiB),
/// the others inline, alternately through ByteStream and BatchUpdateBlobs.
fn upload_data(w: u64, i: u64) -> Vec<u8> {
    let seed = w * 1_000_000 + i;
    let len = match i % 3 {
        0 => (3 << 19) + (seed * 7919 % (1 << 20)) as usize,
        _ => 1 + (seed * 104_729 % 200_000) as usize,
    };
    blob(seed, len)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_during_uploads_keeps_every_acknowledged_blob_intact() {
    let dir = tempfile::tempdir().unwrap();
    let data_dir = dir.path().join("data");
    let server = spawn_server(&data_dir, &dir.path().join("log-1"));

    let attempted = Arc::new(Mutex::new(Vec::new()));
    let acked = Arc::new(Mutex::new(Vec::new()));
    // Failures before the kill are bugs, not the expected aftermath.
    let killed = Arc::new(AtomicBool::new(false));
    let early_failures = Arc::new(Mutex::new(Vec::new()));
    let mut workers = tokio::task::JoinSet::new();
    for w in 0..WORKERS {
        let channel = server.channel();
        let (attempted, acked) = (attempted.clone(), acked.clone());
        let (killed, early_failures) = (killed.clone(), early_failures.clone());
        workers.spawn(async move {
            let (mut cas, mut bs) = (channel.cas(), channel.bytestream());
            for i in 0.. {
                let data = upload_data(w, i);
                let d = digest(&data);
                attempted.lock().unwrap().push(d.clone());
                let outcome = if i % 3 == 1 {
                    match batch_update_raw(&mut cas, "", vec![(d.clone(), data)]).await {
                        Ok(codes) if codes == [Code::Ok] => Ok(()),
                        Ok(codes) => Err(format!("BatchUpdateBlobs: {codes:?}")),
                        Err(status) => Err(format!("BatchUpdateBlobs: {status}")),
                    }
                } else {
                    match upload(&mut bs, "", &data, 128 << 10).await {
                        Ok(n) if n == d.size_bytes => Ok(()),
                        Ok(n) => Err(format!("Write: committed_size {n} of {}", d.size_bytes)),
                        Err(status) => Err(format!("Write: {status}")),
                    }
                };
                if let Err(why) = outcome {
                    if !killed.load(Ordering::SeqCst) {
                        early_failures.lock().unwrap().push(why);
                    }
                    return; // the server is gone
                }
                acked.lock().unwrap().push(d);
            }
        });
    }

    // One file-backed upload that stalls half way, so that the kill
    // certainly leaves a partial file in tmp/.
    let stalled = blob(7, 8 << 20);
    let stalled_digest = digest(&stalled);
    let (tx, rx) = tokio::sync::mpsc::channel(1);
    let name = write_name("", &stalled_digest);
    let first_half = write_requests(&name, &stalled[..STALLED_AT], 0, STALLED_AT, false);
    tx.send(first_half.into_iter().next().unwrap())
        .await
        .unwrap();
    let mut stalled_bs = server.bytestream();
    let stalled_call = tokio::spawn(async move {
        stalled_bs
            .write(tokio_stream::wrappers::ReceiverStream::new(rx))
            .await
    });

    let deadline = Instant::now() + Duration::from_secs(60);
    while acked.lock().unwrap().len() < ACKED_BEFORE_KILL || !has_partial_file(&data_dir) {
        let failures = early_failures.lock().unwrap().clone();
        assert_eq!(
            failures,
            Vec::<String>::new(),
            "uploads failed before the kill"
        );
        assert!(
            Instant::now() < deadline,
            "uploads too slow: {} acknowledged, tmp/ holds {:?}; server log: {}",
            acked.lock().unwrap().len(),
            list_files(&data_dir.join("tmp")),
            server.log()
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    killed.store(true, Ordering::SeqCst);
    server.kill();
    let stalled_result = stalled_call.await.unwrap();
    assert!(stalled_result.is_err(), "the stalled upload cannot succeed");
    drop(tx);
    tokio::time::timeout(Duration::from_secs(30), async {
        while let Some(joined) = workers.join_next().await {
            joined.expect("worker panicked");
        }
    })
    .await
    .expect("workers notice the kill");
    assert_eq!(*early_failures.lock().unwrap(), Vec::<String>::new());

    let attempted = attempted.lock().unwrap().clone();
    let acked = acked.lock().unwrap().clone();
    let unacked: Vec<re::Digest> = {
        let acked: HashSet<_> = acked.iter().map(|d| d.hash.clone()).collect();
        attempted
            .iter()
            .filter(|d| !acked.contains(&d.hash))
            .cloned()
            .collect()
    };
    assert!(
        !unacked.is_empty(),
        "the kill must interrupt uploads in flight"
    );

    assert!(has_partial_file(&data_dir));

    let server = spawn_server(&data_dir, &dir.path().join("log-2"));
    assert_eq!(
        list_files(&data_dir.join("tmp")),
        Vec::<std::path::PathBuf>::new()
    );
    let mut cas = server.cas();
    let mut bs = server.bytestream();
    assert_eq!(
        find_missing(&mut cas, std::slice::from_ref(&stalled_digest)).await,
        vec![stalled_digest]
    );
    assert_eq!(
        find_missing(&mut cas, &acked).await,
        vec![],
        "acknowledged blobs lost"
    );
    for d in &acked {
        assert_eq!(
            &read_digest(&mut bs, d).await.unwrap(),
            d,
            "acknowledged blob damaged"
        );
    }
    // Interrupted uploads are either absent or complete, never partial.
    let missing: HashSet<String> = find_missing(&mut cas, &unacked)
        .await
        .into_iter()
        .map(|d| d.hash)
        .collect();
    let mut served = 0;
    for d in unacked.iter().filter(|d| !missing.contains(&d.hash)) {
        assert_eq!(
            &read_digest(&mut bs, d).await.unwrap(),
            d,
            "unacknowledged blob damaged"
        );
        served += 1;
    }
    // Every blob file on disk is a committed, served blob: no debris.
    let attempted_hashes: HashSet<&str> = attempted.iter().map(|d| d.hash.as_str()).collect();
    for file in list_files(&data_dir.join("blobs")) {
        let name = file.file_name().unwrap().to_str().unwrap();
        let (hash, size) = name.split_once('-').expect("{hash}-{size}");
        assert!(
            attempted_hashes.contains(hash),
            "stray file {}",
            file.display()
        );
        let d = raw_digest(hash, size.parse().unwrap());
        assert_eq!(
            find_missing(&mut cas, std::slice::from_ref(&d)).await,
            vec![],
            "{name}"
        );
    }
    let s = stats(&server).await;
    assert_eq!(s.blob_count as usize, acked.len() + served);
    eprintln!(
        "kill -9: {} acknowledged, {} interrupted ({served} of them had committed)",
        acked.len(),
        unacked.len()
    );
}

/// True once tmp/ holds the stalled upload's first part.
fn has_partial_file(data_dir: &std::path::Path) -> bool {
    list_files(&data_dir.join("tmp"))
        .iter()
        .any(|f| std::fs::metadata(f).is_ok_and(|m| m.len() == STALLED_AT as u64))
}
