//! The operations load clients pick from, one function per kind of call:
//! each makes its calls, checks every byte it reads and records how each
//! call ended.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Instant;

use bazel_remote_apis::build::bazel::remote::asset::v1::{
    FetchBlobRequest, PushBlobRequest, fetch_client::FetchClient, push_client::PushClient,
};
use prost::Message;

use super::{Client, Fail, Shared, read_outcome, status};
use crate::common::*;

pub(super) async fn write_op(c: &mut Client, s: &Shared) {
    let id = c.rng.below(s.universe.sizes.len());
    let _slot = if s.universe.large(id) {
        Some(s.large.acquire().await.unwrap())
    } else {
        None
    };
    if !s.universe.large(id) && c.rng.below(2) == 0 {
        // A batch of small blobs, at most ~1 MiB together.
        let mut ids = vec![s.universe.small(&mut c.rng, 128 << 10)];
        while ids.len() < 8 && c.rng.below(4) > 0 {
            ids.push(s.universe.small(&mut c.rng, 64 << 10));
        }
        let entries: Vec<_> = ids
            .iter()
            .map(|&i| (s.universe.digest(i), s.universe.data(i)))
            .collect();
        let bytes: usize = entries.iter().map(|(_, d)| d.len()).sum();
        let started = Instant::now();
        let outcome = match batch_update_raw(&mut c.cas, "", entries).await {
            Ok(codes) if codes.iter().all(|c| *c == Code::Ok) => Ok(()),
            Ok(codes) => Err(Fail::Error(format!("entry codes {codes:?}"))),
            Err(e) => Err(Fail::Error(format!("{:?} {}", e.code(), e.message()))),
        };
        if outcome.is_ok() {
            s.bytes_written.fetch_add(bytes as u64, Ordering::Relaxed);
            s.written.lock().unwrap().extend(ids);
        }
        return s.record("BatchUpdateBlobs", started, outcome);
    }
    let data = Arc::new(s.universe.data(id));
    let d = s.universe.digest(id);
    let name = write_name("", &d);
    let started = Instant::now();
    let result =
        c.bs.write(write_stream(name.clone(), data, 256 << 10))
            .await;
    let outcome = match result {
        Ok(r) if r.get_ref().committed_size == d.size_bytes => Ok(()),
        Ok(r) => Err(Fail::Error(format!(
            "committed_size {}",
            r.get_ref().committed_size
        ))),
        Err(e) => Err(Fail::Error(format!("{:?} {}", e.code(), e.message()))),
    };
    let ok = outcome.is_ok();
    s.record("ByteStream.Write", started, outcome);
    if !ok {
        return;
    }
    s.bytes_written
        .fetch_add(d.size_bytes as u64, Ordering::Relaxed);
    s.written.lock().unwrap().push(id);
    if c.rng.below(4) == 0 {
        let started = Instant::now();
        let query = bs::QueryWriteStatusRequest {
            resource_name: name,
        };
        let outcome = match c.bs.query_write_status(query).await {
            Ok(r) if r.get_ref().complete && r.get_ref().committed_size == d.size_bytes => Ok(()),
            Ok(r) => Err(Fail::Error(format!(
                "after a finished write: {:?}",
                r.get_ref()
            ))),
            Err(e) => Err(status("QueryWriteStatus", &e)),
        };
        s.record("QueryWriteStatus", started, outcome);
    }
}

pub(super) async fn read_op(c: &mut Client, s: &Shared) {
    let Some(id) = s.written_id(&mut c.rng) else {
        return;
    };
    let _slot = if s.universe.large(id) {
        Some(s.large.acquire().await.unwrap())
    } else {
        None
    };
    let data = s.universe.data(id);
    let d = s.universe.digest(id);
    let (offset, limit, kind) = if c.rng.below(3) == 0 && !data.is_empty() {
        let offset = c.rng.below(data.len());
        (
            offset,
            c.rng.below(data.len() - offset + 1),
            "ByteStream.Read ranged",
        )
    } else {
        (0, 0, "ByteStream.Read")
    };
    let started = Instant::now();
    let outcome = read_outcome(read_verified(&mut c.bs, &d, &data, offset, limit).await);
    if outcome.is_ok() {
        let n = if limit == 0 {
            data.len() - offset
        } else {
            limit
        };
        s.bytes_read.fetch_add(n as u64, Ordering::Relaxed);
    }
    s.record(kind, started, outcome);
}

pub(super) async fn batch_read_op(c: &mut Client, s: &Shared) {
    let mut ids = Vec::new();
    let mut total = 0;
    for _ in 0..8 {
        match s.written_id(&mut c.rng) {
            Some(id) if !s.universe.large(id) && total + s.universe.sizes[id] < 1 << 20 => {
                total += s.universe.sizes[id];
                ids.push(id);
            }
            _ => {}
        }
    }
    if ids.is_empty() {
        return;
    }
    let digests: Vec<_> = ids.iter().map(|&i| s.universe.digest(i)).collect();
    let started = Instant::now();
    let request = re::BatchReadBlobsRequest {
        digests: digests.clone(),
        ..Default::default()
    };
    let outcome = match c.cas.batch_read_blobs(request).await {
        Err(e) => Err(Fail::Error(format!("{:?} {}", e.code(), e.message()))),
        Ok(r) => {
            let mut outcome = Ok(());
            let responses = &r.get_ref().responses;
            if responses.len() != ids.len() {
                outcome = Err(Fail::Error(format!(
                    "{} answers to {}",
                    responses.len(),
                    ids.len()
                )));
            }
            for (entry, &id) in responses.iter().zip(&ids) {
                let code = Code::from(entry.status.as_ref().map_or(-1, |s| s.code));
                match code {
                    Code::Ok if entry.data == s.universe.data(id) => {
                        s.bytes_read
                            .fetch_add(entry.data.len() as u64, Ordering::Relaxed);
                    }
                    Code::Ok => outcome = Err(Fail::Corrupt(format!("blob {id} in a batch"))),
                    Code::NotFound => {
                        if outcome.is_ok() {
                            outcome = Err(Fail::Miss);
                        }
                    }
                    other => outcome = Err(Fail::Error(format!("entry {other:?}"))),
                }
            }
            outcome
        }
    };
    s.record("BatchReadBlobs", started, outcome);
}

pub(super) async fn find_missing_op(c: &mut Client, s: &Shared) {
    let n = s.universe.sizes.len();
    let digests: Vec<_> = (0..50).map(|_| s.universe.digest(c.rng.below(n))).collect();
    let started = Instant::now();
    let request = re::FindMissingBlobsRequest {
        blob_digests: digests.clone(),
        ..Default::default()
    };
    let outcome = match c.cas.find_missing_blobs(request).await {
        Ok(r)
            if r.get_ref()
                .missing_blob_digests
                .iter()
                .all(|m| digests.contains(m)) =>
        {
            Ok(())
        }
        Ok(_) => Err(Fail::Error(
            "reported a digest it was not asked about".into(),
        )),
        Err(e) => Err(Fail::Error(format!("{:?} {}", e.code(), e.message()))),
    };
    s.record("FindMissingBlobs", started, outcome);
}

/// Uploads small blobs and messages in one batch; false if it failed.
async fn put_small(c: &mut Client, s: &Shared, kind: &'static str, blobs: Vec<Vec<u8>>) -> bool {
    let entries = blobs.into_iter().map(|b| (digest(&b), b)).collect();
    let started = Instant::now();
    let outcome = match batch_update_raw(&mut c.cas, "", entries).await {
        Ok(codes) if codes.iter().all(|c| *c == Code::Ok) => Ok(()),
        Ok(codes) => Err(Fail::Error(format!("entry codes {codes:?}"))),
        Err(e) => Err(Fail::Error(format!("{:?} {}", e.code(), e.message()))),
    };
    let ok = outcome.is_ok();
    s.record(kind, started, outcome);
    ok
}

pub(super) async fn action_op(c: &mut Client, s: &Shared) {
    let action = c.rng.below(5000);
    let mut rng = Rng::new(0xac7_0000 + action as u64);
    let outputs: Vec<usize> = (0..1 + rng.below(3))
        .map(|_| s.universe.small(&mut rng, 16 << 10))
        .collect();
    let blobs = outputs.iter().map(|&i| s.universe.data(i)).collect();
    if !put_small(c, s, "BatchUpdateBlobs", blobs).await {
        return;
    }
    let action_digest = digest(format!("chaos action {action}").as_bytes());
    let result = re::ActionResult {
        output_files: outputs
            .iter()
            .enumerate()
            .map(|(n, &i)| re::OutputFile {
                path: format!("out/{n}"),
                digest: Some(s.universe.digest(i)),
                ..Default::default()
            })
            .collect(),
        ..Default::default()
    };
    let started = Instant::now();
    let update = re::UpdateActionResultRequest {
        action_digest: Some(action_digest.clone()),
        action_result: Some(result.clone()),
        ..Default::default()
    };
    let outcome = c.ac.update_action_result(update).await.map(|_| ());
    let outcome = outcome.map_err(|e| Fail::Error(format!("{:?} {}", e.code(), e.message())));
    s.record("UpdateActionResult", started, outcome);
    let started = Instant::now();
    let get = re::GetActionResultRequest {
        action_digest: Some(action_digest),
        ..Default::default()
    };
    let outcome = match c.ac.get_action_result(get).await {
        Ok(r) => {
            let got: Vec<_> = r
                .get_ref()
                .output_files
                .iter()
                .map(|f| (&f.path, &f.digest))
                .collect();
            let want: Vec<_> = result
                .output_files
                .iter()
                .map(|f| (&f.path, &f.digest))
                .collect();
            if got == want {
                Ok(())
            } else {
                Err(Fail::Corrupt(format!("action {action}: {got:?}")))
            }
        }
        Err(e) => Err(status("GetActionResult", &e)),
    };
    s.record("GetActionResult", started, outcome);
}

pub(super) async fn tree_op(c: &mut Client, s: &Shared) {
    let tree = c.rng.below(500);
    let mut rng = Rng::new(0x7ee_0000 + tree as u64);
    let (f1, f2) = (
        s.universe.small(&mut rng, 8 << 10),
        s.universe.small(&mut rng, 8 << 10),
    );
    let file = |name: &str, id: usize| re::FileNode {
        name: name.into(),
        digest: Some(s.universe.digest(id)),
        ..Default::default()
    };
    let sub = re::Directory {
        files: vec![file("b", f2)],
        ..Default::default()
    };
    let root = re::Directory {
        files: vec![file("a", f1)],
        directories: vec![re::DirectoryNode {
            name: format!("sub{tree}"),
            digest: Some(digest(&sub.encode_to_vec())),
        }],
        ..Default::default()
    };
    let blobs = vec![
        s.universe.data(f1),
        s.universe.data(f2),
        sub.encode_to_vec(),
        root.encode_to_vec(),
    ];
    if !put_small(c, s, "BatchUpdateBlobs", blobs).await {
        return;
    }
    let started = Instant::now();
    let mut got = Vec::new();
    let mut token = String::new();
    let outcome = loop {
        let request = re::GetTreeRequest {
            root_digest: Some(digest(&root.encode_to_vec())),
            page_size: c.rng.below(3) as i32,
            page_token: token.clone(),
            ..Default::default()
        };
        let pages = match c.cas.get_tree(request).await {
            Ok(stream) => collect(stream.into_inner()).await,
            Err(e) => Err(e),
        };
        match pages {
            Err(e) => break Err(status("GetTree", &e)),
            Ok(pages) => {
                for page in &pages {
                    got.extend(page.directories.iter().cloned());
                }
                token = pages
                    .last()
                    .map(|p| p.next_page_token.clone())
                    .unwrap_or_default();
                if token.is_empty() {
                    break Ok(());
                }
            }
        }
    };
    let outcome = outcome.and_then(|()| match got.iter().all(|d| *d == root || *d == sub) {
        true if got.first() == Some(&root) => Ok(()),
        _ => Err(Fail::Corrupt(format!("tree {tree}: {got:?}"))),
    });
    s.record("GetTree", started, outcome);
}

pub(super) async fn asset_op(c: &mut Client, s: &Shared) {
    let Some(id) = s.written_id(&mut c.rng) else {
        return;
    };
    let d = s.universe.digest(id);
    let uri = format!("https://chaos.example/blob/{id}");
    let started = Instant::now();
    let push = PushBlobRequest {
        uris: vec![uri.clone()],
        blob_digest: Some(d.clone()),
        ..Default::default()
    };
    let outcome = match PushClient::new(c.channel.clone()).push_blob(push).await {
        Ok(_) => Ok(()),
        // The blob was evicted since it was written.
        Err(e) if e.code() == Code::FailedPrecondition => Err(Fail::Miss),
        Err(e) => Err(status("PushBlob", &e)),
    };
    s.record("Push.PushBlob", started, outcome);
    let started = Instant::now();
    let fetch = FetchBlobRequest {
        uris: vec![uri],
        ..Default::default()
    };
    let outcome = match FetchClient::new(c.channel.clone()).fetch_blob(fetch).await {
        Ok(r) => match Code::from(r.get_ref().status.as_ref().map_or(0, |s| s.code)) {
            Code::Ok if r.get_ref().blob_digest.as_ref() == Some(&d) => Ok(()),
            Code::Ok => Err(Fail::Corrupt(format!(
                "FetchBlob {id}: {:?}",
                r.get_ref().blob_digest
            ))),
            Code::NotFound => Err(Fail::Miss),
            other => Err(Fail::Error(format!("inline status {other:?}"))),
        },
        Err(e) => Err(status("FetchBlob", &e)),
    };
    s.record("Fetch.FetchBlob", started, outcome);
}

/// A client that gives up: a Write that declares a large blob, sends
/// 64 KiB and ends its stream without `finish_write`. Whatever the server
/// keeps of it may not crowd out other clients' writes.
pub(super) async fn abandon_op(c: &mut Client, s: &Shared) {
    let id = loop {
        let id = c.rng.below(s.universe.sizes.len());
        if s.universe.large(id) {
            break id;
        }
    };
    let data = s.universe.data(id);
    let name = write_name("", &s.universe.digest(id));
    let first = write_requests(&name, &data[..64 << 10], 0, 64 << 10, false);
    let started = Instant::now();
    // Any answer will do; what matters is that later writes still succeed.
    let _ = c.bs.write(futures::stream::iter(first)).await;
    s.figures
        .record("abandoned Write", started.elapsed(), false, false);
}

pub(super) async fn capabilities_op(c: &mut Client, s: &Shared) {
    let started = Instant::now();
    let outcome = Capabilities::new(c.channel.clone())
        .get_capabilities(re::GetCapabilitiesRequest::default())
        .await
        .map(|_| ())
        .map_err(|e| Fail::Error(format!("{:?} {}", e.code(), e.message())));
    s.record("GetCapabilities", started, outcome);
}
