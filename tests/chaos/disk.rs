//! Disk: blob files (blobs over 1 MiB live in `DATA/blobs/sha256/xx/`)
//! corrupted with their size kept, truncated and deleted behind Outpost's
//! back. Nothing wrong is ever served: every read (ByteStream whole and
//! ranged, BatchReadBlobs) returns the exact bytes or fails with NOT_FOUND
//! or DATA_LOSS; what FindMissingBlobs then calls present reads back
//! intact, also after a kill -9 and restart; uploading a blob again repairs it.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::common::*;

/// How a blob's file is damaged.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Damage {
    /// A few bytes flipped in the middle, size kept.
    FlipMiddle,
    /// Only the last byte flipped, size kept.
    FlipLast,
    /// The first byte flipped, size kept.
    FlipFirst,
    /// Cut to half its size.
    Truncate,
    /// Removed.
    Delete,
    /// Left alone.
    Intact,
}

const DAMAGES: [Damage; 6] = [
    Damage::FlipMiddle,
    Damage::FlipLast,
    Damage::FlipFirst,
    Damage::Truncate,
    Damage::Delete,
    Damage::Intact,
];

/// The file holding blob `d`, found by its `<hash>-<size>` name.
fn blob_file(data_dir: &Path, d: &re::Digest) -> Option<PathBuf> {
    let name = format!("{}-{}", d.hash, d.size_bytes);
    let mut stack = vec![data_dir.join("blobs")];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).ok()?.flatten() {
            let path = entry.path();
            if path.is_dir() {
                stack.push(path);
            } else if path.file_name().is_some_and(|n| n == name.as_str()) {
                return Some(path);
            }
        }
    }
    None
}

/// Damages the file at `path` in place (no rename: as bit rot would).
fn damage(path: &Path, how: Damage) {
    use std::io::{Seek, SeekFrom, Write};
    let len = std::fs::metadata(path).unwrap().len();
    let flip = |at: u64| {
        let mut f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .unwrap();
        let mut byte = [0u8];
        f.seek(SeekFrom::Start(at)).unwrap();
        std::io::Read::read_exact(&mut f, &mut byte).unwrap();
        f.seek(SeekFrom::Start(at)).unwrap();
        f.write_all(&[byte[0] ^ 0x5a]).unwrap();
    };
    match how {
        Damage::FlipMiddle => (0..4).for_each(|k| flip(len / 2 + k * 4099)),
        Damage::FlipLast => flip(len - 1),
        Damage::FlipFirst => flip(0),
        Damage::Truncate => std::fs::OpenOptions::new()
            .write(true)
            .open(path)
            .unwrap()
            .set_len(len / 2)
            .unwrap(),
        Damage::Delete => std::fs::remove_file(path).unwrap(),
        Damage::Intact => {}
    }
}

/// Checks one read's outcome: exact, or a refusal that delivered nothing wrong.
fn judge(failures: &Failures, what: &str, how: Damage, read: Read) -> bool {
    match read {
        Read::Exact => true,
        Read::Failed(Code::NotFound | Code::DataLoss) if how != Damage::Intact => false,
        other => {
            failures.add(format!("{what} of a blob {how:?}: {other:?}"));
            false
        }
    }
}

/// Reads every blob every way; returns how many reads returned the bytes.
async fn read_all(
    server: &ServerProcess,
    blobs: &[(Vec<u8>, Damage)],
    failures: &Failures,
    when: &str,
) -> usize {
    let (mut bs, mut cas) = (server.bytestream(), server.cas());
    let mut served = 0;
    for (data, how) in blobs {
        let d = digest(data);
        let len = data.len();
        for (offset, limit, kind) in [
            (len / 2 - 1000, 2000, "ranged read around the middle"),
            (len - 10, 0, "ranged read of the tail"),
            (0, 0, "whole read"),
            (0, 0, "second whole read"),
        ] {
            let read = read_verified(&mut bs, &d, data, offset, limit).await;
            served += usize::from(judge(failures, &format!("{when}: {kind}"), *how, read));
        }
        let request = re::BatchReadBlobsRequest {
            digests: vec![d.clone()],
            ..Default::default()
        };
        let read = match cas.batch_read_blobs(request).await {
            Err(e) => Read::Failed(e.code()),
            Ok(r) => match r.get_ref().responses.first() {
                Some(entry) if entry_code(&entry.status) != Code::Ok => {
                    Read::Failed(entry_code(&entry.status))
                }
                Some(entry) if entry.data == *data => Read::Exact,
                Some(_) => Read::Corrupt("BatchReadBlobs returned other bytes".into()),
                None => Read::Corrupt("no entry".into()),
            },
        };
        served += usize::from(judge(
            failures,
            &format!("{when}: BatchReadBlobs"),
            *how,
            read,
        ));
    }
    served
}

/// FindMissingBlobs must not call present what cannot be read; returns how
/// many damaged blobs it still calls present.
async fn present_means_readable(
    server: &ServerProcess,
    blobs: &[(Vec<u8>, Damage)],
    failures: &Failures,
    when: &str,
) -> usize {
    let (mut bs, mut cas) = (server.bytestream(), server.cas());
    let digests: Vec<_> = blobs.iter().map(|(b, _)| digest(b)).collect();
    let missing = find_missing(&mut cas, &digests).await;
    let mut damaged_present = 0;
    for ((data, how), d) in blobs.iter().zip(&digests) {
        if missing.contains(d) {
            if *how == Damage::Intact {
                failures.add(format!("{when}: an intact blob is reported missing"));
            }
            continue;
        }
        damaged_present += usize::from(*how != Damage::Intact);
        match read_verified(&mut bs, d, data, 0, 0).await {
            Read::Exact => {}
            other => failures.add(format!(
                "{when}: FindMissingBlobs calls a {how:?} blob present; reading it: {other:?}"
            )),
        }
    }
    damaged_present
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn damaged_blob_files_are_never_served() {
    let rounds = pick(1, 5);
    let per_kind = pick(3, 10);
    let dir = tempfile::tempdir().unwrap();
    let data_dir = dir.path().join("data");
    let failures = Failures::default();
    let mut server = start(dir.path(), &data_dir, &dir.path().join("log-0"), &[]);
    for round in 0..rounds {
        // File blobs of 1-3 MiB (small enough for BatchReadBlobs too).
        let mut rng = Rng::new(round);
        let blobs: Vec<(Vec<u8>, Damage)> = (0..per_kind * DAMAGES.len())
            .map(|i| {
                let len = rng.log_uniform((1 << 20) + 4096, 3 << 20) as usize;
                (
                    blob(0xd15c_0000 + (round << 16) + i as u64, len),
                    DAMAGES[i % DAMAGES.len()],
                )
            })
            .collect();
        let mut bs = server.bytestream();
        for (data, _) in &blobs {
            let n = upload_blob(&mut bs, Arc::new(data.clone()))
                .await
                .expect("upload");
            assert_eq!(n, data.len() as i64);
        }
        // Read each once so that caches, if any, are warm.
        for (data, _) in &blobs {
            assert_eq!(
                read_verified(&mut bs, &digest(data), data, 0, 0).await,
                Read::Exact
            );
        }
        for (data, how) in &blobs {
            let d = digest(data);
            let path =
                blob_file(&data_dir, &d).unwrap_or_else(|| panic!("no file for blob {}", d.hash));
            damage(&path, *how);
        }
        let when = format!("round {round}");
        let served = read_all(&server, &blobs, &failures, &when).await;
        let still = present_means_readable(&server, &blobs, &failures, &when).await;
        eprintln!(
            "chaos disk: {when}: {} blobs damaged {} ways: {served} reads served exact bytes, {} failed checks; {still} damaged blobs still reported present",
            blobs.len(),
            DAMAGES.len(),
            failures.count()
        );

        // An unclean restart changes nothing of that.
        server.kill();
        server = start(
            dir.path(),
            &data_dir,
            &dir.path().join(format!("log-{}", round + 1)),
            &[],
        );
        let when = format!("round {round} after kill -9");
        read_all(&server, &blobs, &failures, &when).await;
        present_means_readable(&server, &blobs, &failures, &when).await;

        // Uploading again repairs every blob.
        let mut bs = server.bytestream();
        for (data, how) in &blobs {
            let d = digest(data);
            match upload_blob(&mut bs, Arc::new(data.clone())).await {
                Ok(n) if n == d.size_bytes => {}
                other => failures.add(format!(
                    "round {round}: re-upload of a {how:?} blob: {other:?}"
                )),
            }
            match read_verified(&mut bs, &d, data, 0, 0).await {
                Read::Exact => {}
                other => failures.add(format!(
                    "round {round}: a {how:?} blob after its re-upload: {other:?}"
                )),
            }
        }
    }
    assert_healthy(&mut server, &failures, "disk").await;
    failures.assert_none("disk");
}
