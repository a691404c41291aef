//! The caching proxy, black-box: an in-process Outpost in front of the fake
//! upstream (`outpost_testkit::fake`), driven over real gRPC.
//! Deduplication, batching, write-through, header forwarding and outage
//! handling are asserted by the fake's call counts; the fake's pause gate
//! makes the concurrency tests deterministic.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use outpost::admin_proto::GetStatsResponse;
use outpost::config::Config;
use outpost::config::UpstreamConfig;
use prost::Message;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tonic::metadata::MetadataValue;
use tonic::transport::Channel;
use tonic::{Code, Status};

use crate::common::fake_upstream::{FakeUpstream, Method, REQUEST_METADATA_HEADER};
use crate::common::*;

/// Upper bound for anything the tests wait for (never reached when all is well).
const WAIT: Duration = Duration::from_secs(10);
const MIB: usize = 1 << 20;

// ---------------------------------------------------------------- fixture

/// An Outpost proxying `fake`, with `adjust` applied to its upstream
/// settings (three attempts per call unless changed).
async fn proxy_for(fake: &FakeUpstream, adjust: impl FnOnce(&mut UpstreamConfig)) -> TestServer {
    proxy_with(fake, adjust, |_| {}).await
}

/// Like [`proxy_for`], with the server configuration adjusted too. Returns
/// once the start-up capabilities probe has been answered, so it never lands
/// in a test's counts after `reset_stats`.
async fn proxy_with(
    fake: &FakeUpstream,
    adjust: impl FnOnce(&mut UpstreamConfig),
    adjust_config: impl FnOnce(&mut Config),
) -> TestServer {
    // These tests pin down the write-through proxy (a write is done once
    // the upstream has it); write-back is tests/suite/write_back.rs.
    let adjust = |upstream: &mut UpstreamConfig| {
        upstream.max_attempts = 3;
        upstream.write_mode = WriteMode::Through;
        adjust(upstream);
    };
    start_proxy(fake, adjust, adjust_config).await
}

/// Polls the Admin stats until `cond` holds.
async fn wait_stats(server: &TestServer, what: &str, cond: impl Fn(&GetStatsResponse) -> bool) {
    let deadline = Instant::now() + WAIT;
    loop {
        let s = stats(server).await;
        if cond(&s) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {what}: {s:?}"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// A fresh client connection (its own HTTP/2 connection: another client).
async fn connect(server: &TestServer) -> Channel {
    outpost::client::connect(&format!("grpc://{}", server.addr()))
        .await
        .expect("client connects")
}

// ---------------------------------------------------------------- client helpers

/// BatchReadBlobs (instance `""`): each entry's code, message and data.
async fn batch_read(
    cas: &mut Cas,
    digests: &[re::Digest],
) -> Result<Vec<(Code, String, Vec<u8>)>, Status> {
    let resp = cas
        .batch_read_blobs(re::BatchReadBlobsRequest {
            instance_name: String::new(),
            digests: digests.to_vec(),
            acceptable_compressors: vec![],
            digest_function: 0,
        })
        .await?
        .into_inner();
    assert_eq!(resp.responses.len(), digests.len(), "one entry per digest");
    Ok(resp
        .responses
        .into_iter()
        .map(|r| {
            let status = r.status.clone().expect("entry has a status");
            (Code::from(status.code), status.message, r.data)
        })
        .collect())
}

/// How a client reads a blob.
#[derive(Clone, Copy, Debug)]
enum Via {
    ByteStream,
    Batch,
}

/// Reads one blob whole, through ByteStream or BatchReadBlobs; a failed
/// Batch entry comes back as an error with the entry's code.
async fn read_via(channel: &Channel, via: Via, d: &re::Digest) -> Result<Vec<u8>, Status> {
    match via {
        Via::ByteStream => read_blob(&mut channel.bytestream(), &read_name("", d), 0, 0)
            .await
            .map(|(data, _)| data),
        Via::Batch => {
            let (code, message, data) = batch_read(&mut channel.cas(), std::slice::from_ref(d))
                .await?
                .pop()
                .expect("one entry");
            if code == Code::Ok {
                Ok(data)
            } else {
                Err(Status::new(code, message))
            }
        }
    }
}

/// FindMissingBlobs (instance `""`) without unwrapping.
async fn try_find_missing(
    cas: &mut Cas,
    digests: &[re::Digest],
) -> Result<Vec<re::Digest>, Status> {
    Ok(cas
        .find_missing_blobs(re::FindMissingBlobsRequest {
            instance_name: String::new(),
            blob_digests: digests.to_vec(),
            digest_function: 0,
        })
        .await?
        .into_inner()
        .missing_blob_digests)
}

fn get_request(instance: &str, action: &re::Digest) -> re::GetActionResultRequest {
    re::GetActionResultRequest {
        instance_name: instance.to_string(),
        action_digest: Some(action.clone()),
        ..Default::default()
    }
}

fn update_request(
    instance: &str,
    action: &re::Digest,
    result: &re::ActionResult,
) -> re::UpdateActionResultRequest {
    re::UpdateActionResultRequest {
        instance_name: instance.to_string(),
        action_digest: Some(action.clone()),
        action_result: Some(result.clone()),
        results_cache_policy: None,
        digest_function: 0,
    }
}

/// An ActionResult with one output file.
fn result_with_output(path: &str, d: &re::Digest) -> re::ActionResult {
    re::ActionResult {
        output_files: vec![re::OutputFile {
            path: path.to_string(),
            digest: Some(d.clone()),
            is_executable: false,
            contents: Vec::new(),
            node_properties: None,
        }],
        exit_code: 0,
        ..Default::default()
    }
}

/// Asserts equality of large byte vectors without printing them.
#[track_caller]
fn assert_bytes(got: &[u8], want: &[u8], what: &str) {
    assert!(
        got == want,
        "{what}: got {} bytes (sha256 {}), want {} bytes (sha256 {})",
        got.len(),
        sha256_hex(got),
        want.len(),
        sha256_hex(want)
    );
}

/// The same size as `data`, one bit different.
fn corrupted(data: &[u8]) -> Vec<u8> {
    let mut bad = data.to_vec();
    let mid = bad.len() / 2;
    bad[mid] ^= 1;
    bad
}

// ---------------------------------------------------------------- single-flight

/// 50 concurrent reads of one blob that only the upstream holds: exactly
/// one upstream transfer (the fake parks it until all 50 have joined), all
/// readers get the bytes, and later reads cost no upstream call at all.
async fn fifty_readers_share_one_transfer(size: usize, via: Via) {
    let fake = FakeUpstream::start().await;
    let data = blob(size as u64 + 7, size);
    let d = fake.put_blob(data.clone());
    let server = proxy_for(&fake, |_| {}).await;
    fake.reset_stats();
    // Up to 1 MiB the proxy fetches through BatchReadBlobs, above over ByteStream.
    let (transfer, other) = if size <= MIB {
        (Method::BatchReadBlobs, Method::Read)
    } else {
        (Method::Read, Method::BatchReadBlobs)
    };
    fake.pause_method(transfer);
    let readers: Vec<_> = (0..50)
        .map(|_| {
            let (channel, d) = (server.channel(), d.clone());
            tokio::spawn(async move { read_via(&channel, via, &d).await })
        })
        .collect();
    assert!(
        fake.wait_parked(1, WAIT).await,
        "the fetch reaches the upstream"
    );
    wait_stats(&server, "the other 49 readers joining the fetch", |s| {
        s.single_flight_joins == 49
    })
    .await;
    fake.resume();
    for reader in readers {
        let got = reader.await.expect("reader task").expect("read succeeds");
        assert_bytes(&got, &data, "a concurrent reader");
    }
    assert_eq!(fake.fetches_of(&d), 1, "one upstream transfer");
    assert_eq!(fake.count(transfer), 1);
    assert_eq!(fake.count(other), 0);
    assert_eq!(fake.bytes_sent(), size as u64, "the blob crossed once");
    let s = stats(&server).await;
    assert_eq!((s.upstream_fetches, s.single_flight_joins), (1, 49));
    assert_eq!(s.blob_count, 1, "stored locally");

    let calls = fake.total_calls();
    for via in [Via::ByteStream, Via::Batch] {
        let got = read_via(&server.channel(), via, &d).await.expect("read");
        assert_bytes(&got, &data, "a later read");
    }
    assert_eq!(
        fake.total_calls(),
        calls,
        "later reads are local: {}",
        fake.summary()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn fifty_bytestream_reads_of_a_small_blob_share_one_batch_read() {
    fifty_readers_share_one_transfer(100_000, Via::ByteStream).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn fifty_batch_reads_of_a_small_blob_share_one_batch_read() {
    fifty_readers_share_one_transfer(100_000, Via::Batch).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn fifty_bytestream_reads_of_a_large_blob_share_one_upstream_stream() {
    fifty_readers_share_one_transfer(3 * MIB, Via::ByteStream).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn fifty_batch_reads_of_a_large_blob_share_one_upstream_stream() {
    fifty_readers_share_one_transfer(3 * MIB, Via::Batch).await;
}

// ---------------------------------------------------------------- FindMissingBlobs

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_find_missing_calls_share_one_upstream_call_and_the_ttl_holds() {
    let fake = FakeUpstream::start().await;
    // 1,000 digests, the even ones present upstream.
    let digests: Vec<re::Digest> = (0..1000u64)
        .map(|i| {
            let data = blob(1_000_000 + i, 64);
            if i % 2 == 0 {
                fake.put_blob(data)
            } else {
                digest(&data)
            }
        })
        .collect();
    let present: Vec<re::Digest> = digests.iter().step_by(2).cloned().collect();
    let absent: Vec<re::Digest> = digests.iter().skip(1).step_by(2).cloned().collect();
    // Wide enough that 100 callers on a loaded 2-core machine finish well
    // inside it (1 s flaked under load average 8).
    let ttl = Duration::from_secs(3);
    let server = proxy_for(&fake, |u| u.existence_ttl = ttl).await;
    fake.reset_stats();

    fake.pause_method(Method::FindMissingBlobs);
    let callers: Vec<_> = (0..100)
        .map(|_| {
            let (channel, digests) = (server.channel(), digests.clone());
            tokio::spawn(async move { find_missing(&mut channel.cas(), &digests).await })
        })
        .collect();
    assert!(
        fake.wait_parked(1, WAIT).await,
        "the first call goes upstream"
    );
    wait_stats(
        &server,
        "all 100 calls waiting on the existence cache",
        |s| s.existence_cache_hits + s.existence_cache_misses == 100 * 1000,
    )
    .await;
    fake.resume();
    for caller in callers {
        assert_eq!(
            caller.await.expect("caller task"),
            absent,
            "each caller gets exactly the absent half, in request order"
        );
    }
    assert_eq!(
        fake.digests_per_call(Method::FindMissingBlobs),
        vec![1000],
        "one upstream call for 100 client calls"
    );
    let s = stats(&server).await;
    assert_eq!((s.existence_cache_misses, s.fmb_batches), (1000, 1));

    // Within the TTL: confirmed digests cost no round trip...
    fake.reset_stats();
    let mut cas = server.cas();
    assert_eq!(find_missing(&mut cas, &present).await, vec![]);
    assert_eq!(
        fake.count(Method::FindMissingBlobs),
        0,
        "{}",
        fake.summary()
    );
    // ...while missing ones are asked again (someone may have uploaded them).
    assert_eq!(find_missing(&mut cas, &digests).await, absent);
    assert_eq!(fake.digests_per_call(Method::FindMissingBlobs), vec![500]);

    // After the TTL the upstream is asked again.
    tokio::time::sleep(ttl + Duration::from_millis(200)).await;
    fake.reset_stats();
    assert_eq!(find_missing(&mut cas, &present).await, vec![]);
    assert_eq!(fake.digests_per_call(Method::FindMissingBlobs), vec![500]);

    // Group commit has no timer: sequential calls on an idle proxy do not wait
    // for a batch window (10 calls well under a second).
    let started = Instant::now();
    for d in absent.iter().take(10) {
        assert_eq!(
            find_missing(&mut cas, std::slice::from_ref(d)).await,
            vec![d.clone()]
        );
    }
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "10 idle FindMissingBlobs took {:?}",
        started.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn find_missing_uploads_blobs_only_the_proxy_holds_and_reports_them_present() {
    let fake = FakeUpstream::start().await;
    // Long enough that the re-uploads below are still remembered at the last
    // check on a loaded machine (300 ms was flaky), short enough to wait out.
    let ttl = Duration::from_millis(1500);
    let server = proxy_for(&fake, |u| u.existence_ttl = ttl).await;
    let small = blob(41, 10_000);
    let large = blob(42, 2 * MIB);
    let (ds, dl) = (digest(&small), digest(&large));
    for data in [&small, &large] {
        upload(&mut server.bytestream(), "", data, 256 << 10)
            .await
            .expect("upload through the proxy");
    }
    // The upstream loses both (evicted), and the proxy's memory of them expires.
    assert!(fake.remove_blob(&ds) && fake.remove_blob(&dl));
    tokio::time::sleep(ttl + Duration::from_millis(100)).await;
    fake.reset_stats();

    let nowhere = digest(b"held by nobody");
    let mut cas = server.cas();
    assert_eq!(
        find_missing(&mut cas, &[ds.clone(), dl.clone(), nowhere.clone()]).await,
        vec![nowhere.clone()],
        "blobs the proxy holds are reported present"
    );
    assert_bytes(&fake.blob(&ds).expect("small re-uploaded"), &small, "small");
    assert_bytes(&fake.blob(&dl).expect("large re-uploaded"), &large, "large");
    assert_eq!(fake.uploads_of(&ds), 1);
    assert_eq!(fake.uploads_of(&dl), 1);
    assert_eq!(
        fake.count(Method::BatchUpdateBlobs),
        1,
        "small ones batched"
    );
    assert_eq!(fake.count(Method::Write), 1, "large ones streamed");
    assert_eq!(fake.uploads_of(&nowhere), 0);
    assert_eq!(stats(&server).await.uploads_from_local, 2);

    // Uploaded blobs are now known present: asking again costs nothing.
    fake.reset_stats();
    assert_eq!(find_missing(&mut cas, &[ds, dl]).await, vec![]);
    assert_eq!(fake.total_calls(), 0, "{}", fake.summary());
}

// ---------------------------------------------------------------- batching

/// Pauses `method`, then makes four one-blob calls of it that park at the
/// fake, so that the proxy's batcher has every call slot (4) taken.
async fn occupy_batch_slots(fake: &FakeUpstream, method: Method, mut start: impl FnMut(usize)) {
    fake.pause_method(method);
    for i in 0..4 {
        start(i);
        assert!(
            fake.wait_parked(i + 1, WAIT).await,
            "plug call {i} reaches the upstream"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn small_misses_from_different_clients_go_upstream_as_one_batch_read() {
    let fake = FakeUpstream::start().await;
    let plugs: Vec<Vec<u8>> = (0..4).map(|i| blob(500 + i, 1000)).collect();
    let blobs: Vec<Vec<u8>> = (0..20).map(|i| blob(600 + i, 20_000)).collect();
    let plug_digests: Vec<re::Digest> = plugs.iter().map(|b| fake.put_blob(b.clone())).collect();
    let digests: Vec<re::Digest> = blobs.iter().map(|b| fake.put_blob(b.clone())).collect();
    let server = proxy_for(&fake, |_| {}).await;
    fake.reset_stats();

    let mut tasks = Vec::new();
    let mut plug_tasks = Vec::new();
    occupy_batch_slots(&fake, Method::BatchReadBlobs, |i| {
        let (channel, d) = (server.channel(), plug_digests[i].clone());
        plug_tasks.push(tokio::spawn(async move {
            read_via(&channel, Via::Batch, &d).await
        }));
    })
    .await;
    // 20 clients, each on its own connection, miss one small blob each.
    for (i, d) in digests.iter().enumerate() {
        let channel = connect(&server).await;
        let (d, via) = (
            d.clone(),
            if i % 2 == 0 {
                Via::ByteStream
            } else {
                Via::Batch
            },
        );
        tasks.push(tokio::spawn(
            async move { read_via(&channel, via, &d).await },
        ));
    }
    wait_stats(&server, "24 fetches started", |s| s.upstream_fetches == 24).await;
    // Let the 20 requests reach the batcher's queue (they are in flight
    // inside the proxy; no upstream call can start while the slots are taken).
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(fake.count(Method::BatchReadBlobs), 4);
    fake.resume();
    for (task, data) in plug_tasks.into_iter().zip(&plugs) {
        assert_bytes(&task.await.unwrap().expect("plug read"), data, "plug");
    }
    for (task, data) in tasks.into_iter().zip(&blobs) {
        assert_bytes(&task.await.unwrap().expect("read"), data, "small blob");
    }
    let mut sizes = fake.digests_per_call(Method::BatchReadBlobs);
    sizes.sort();
    assert_eq!(
        sizes,
        vec![1, 1, 1, 1, 20],
        "the 20 misses went up as one BatchReadBlobs"
    );
    assert_eq!(fake.count(Method::Read), 0);
    let s = stats(&server).await;
    assert_eq!((s.read_batches, s.read_batched_blobs), (5, 24));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn merged_batch_reads_respect_the_upstream_batch_limit() {
    let fake = FakeUpstream::start().await;
    fake.set_max_batch_total_size_bytes(MIB as i64);
    let plugs: Vec<Vec<u8>> = (0..4).map(|i| blob(700 + i, 1000)).collect();
    // 12 × 200 KiB = 2.4 MiB: more than one upstream batch.
    let blobs: Vec<Vec<u8>> = (0..12).map(|i| blob(800 + i, 200 << 10)).collect();
    let plug_digests: Vec<re::Digest> = plugs.iter().map(|b| fake.put_blob(b.clone())).collect();
    let digests: Vec<re::Digest> = blobs.iter().map(|b| fake.put_blob(b.clone())).collect();
    let server = proxy_for(&fake, |_| {}).await;
    fake.reset_stats();

    let mut plug_tasks = Vec::new();
    occupy_batch_slots(&fake, Method::BatchReadBlobs, |i| {
        let (channel, d) = (server.channel(), plug_digests[i].clone());
        plug_tasks.push(tokio::spawn(async move {
            read_via(&channel, Via::Batch, &d).await
        }));
    })
    .await;
    let tasks: Vec<_> = digests
        .iter()
        .map(|d| {
            let (channel, d) = (server.channel(), d.clone());
            tokio::spawn(async move { read_via(&channel, Via::ByteStream, &d).await })
        })
        .collect();
    wait_stats(&server, "16 fetches started", |s| s.upstream_fetches == 16).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    fake.resume();
    for task in plug_tasks {
        task.await.unwrap().expect("plug read");
    }
    for (task, data) in tasks.into_iter().zip(&blobs) {
        assert_bytes(
            &task
                .await
                .unwrap()
                .expect("read within the upstream's limit"),
            data,
            "blob",
        );
    }
    for call in fake.calls_of(Method::BatchReadBlobs) {
        let bytes: i64 = call.digests.iter().map(|d| d.size_bytes).sum();
        assert!(
            bytes <= MIB as i64,
            "a {bytes}-byte BatchReadBlobs upstream"
        );
        assert_eq!(call.code, Some(Code::Ok));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn merged_batch_writes_respect_the_upstream_batch_limit() {
    let fake = FakeUpstream::start().await;
    fake.set_max_batch_total_size_bytes(MIB as i64);
    let server = proxy_for(&fake, |_| {}).await;
    let plugs: Vec<Vec<u8>> = (0..4).map(|i| blob(900 + i, 1000)).collect();
    let blobs: Vec<Vec<u8>> = (0..12).map(|i| blob(950 + i, 200 << 10)).collect();
    fake.reset_stats();

    let mut plug_tasks = Vec::new();
    occupy_batch_slots(&fake, Method::BatchUpdateBlobs, |i| {
        let (channel, data) = (server.channel(), plugs[i].clone());
        plug_tasks.push(tokio::spawn(async move {
            batch_update(&mut channel.cas(), "", &[&data]).await
        }));
    })
    .await;
    let tasks: Vec<_> = blobs
        .iter()
        .map(|data| {
            let (channel, data) = (server.channel(), data.clone());
            tokio::spawn(async move { batch_update(&mut channel.cas(), "", &[&data]).await })
        })
        .collect();
    wait_stats(&server, "16 blobs stored locally", |s| {
        s.blobs_written == 16
    })
    .await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    fake.resume();
    for task in plug_tasks {
        assert_eq!(task.await.unwrap(), vec![Code::Ok]);
    }
    for task in tasks {
        assert_eq!(
            task.await.unwrap(),
            vec![Code::Ok],
            "write within the limit"
        );
    }
    for data in &blobs {
        assert!(fake.has_blob(&digest(data)));
    }
    for call in fake.calls_of(Method::BatchUpdateBlobs) {
        assert!(
            call.bytes_received <= MIB as u64,
            "a {}-byte BatchUpdateBlobs upstream",
            call.bytes_received
        );
        assert_eq!(call.code, Some(Code::Ok));
    }
}

// ---------------------------------------------------------------- writes

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_reach_the_upstream_before_the_client_call_succeeds() {
    let fake = FakeUpstream::start().await;
    let server = proxy_for(&fake, |_| {}).await;
    fake.reset_stats();
    let mut bs = server.bytestream();
    for (seed, len) in [(1u64, 1000usize), (2, 3 * MIB)] {
        let data = blob(seed, len);
        let d = digest(&data);
        assert_eq!(
            upload(&mut bs, "", &data, 256 << 10).await.expect("upload"),
            len as i64
        );
        // Checked right after the client's call returned: no waiting.
        assert_bytes(
            &fake
                .blob(&d)
                .expect("upstream has it when the write returns"),
            &data,
            "upstream copy",
        );
    }
    assert_eq!(fake.count(Method::BatchUpdateBlobs), 1, "small: batched");
    assert_eq!(fake.count(Method::Write), 1, "large: streamed");

    let batch: Vec<Vec<u8>> = (0..3).map(|i| blob(10 + i, 5000)).collect();
    let refs: Vec<&[u8]> = batch.iter().map(Vec::as_slice).collect();
    assert_eq!(
        batch_update(&mut server.cas(), "", &refs).await,
        vec![Code::Ok; 3]
    );
    for data in &batch {
        assert!(fake.has_blob(&digest(data)));
    }
    assert_eq!(fake.digests_per_call(Method::BatchUpdateBlobs), vec![1, 3]);
    assert_eq!(stats(&server).await.blob_count, 5, "and stored locally");

    // Reading them back is local.
    fake.reset_stats();
    for data in &batch {
        let got = read_via(&server.channel(), Via::ByteStream, &digest(data))
            .await
            .expect("read");
        assert_bytes(&got, data, "read back");
    }
    assert_eq!(fake.total_calls(), 0, "{}", fake.summary());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_the_upstream_refuses_fails_the_client_write() {
    let fake = FakeUpstream::start().await;
    let server = proxy_for(&fake, |_| {}).await;
    let mut bs = server.bytestream();

    // Small blob over ByteStream: the upstream BatchUpdateBlobs fails.
    let small = blob(21, 1000);
    fake.fail_next_of(Method::BatchUpdateBlobs, 1, Code::Internal);
    let err = upload(&mut bs, "", &small, 1 << 20)
        .await
        .expect_err("no silent loss");
    assert_eq!(err.code(), Code::Internal, "{err:?}");
    assert!(!fake.has_blob(&digest(&small)));
    // The client retries; now it lands upstream.
    assert_eq!(
        upload(&mut bs, "", &small, 1 << 20).await.expect("retry"),
        1000
    );
    assert!(fake.has_blob(&digest(&small)));

    // Large blob over ByteStream: the upstream Write fails.
    let large = blob(22, 2 * MIB);
    fake.fail_next_of(Method::Write, 1, Code::Internal);
    let err = upload(&mut bs, "", &large, 256 << 10)
        .await
        .expect_err("no silent loss");
    assert_eq!(err.code(), Code::Internal, "{err:?}");
    assert!(!fake.has_blob(&digest(&large)));
    assert_eq!(
        upload(&mut bs, "", &large, 256 << 10).await.expect("retry"),
        2 * MIB as i64
    );
    assert_bytes(
        &fake.blob(&digest(&large)).expect("upstream has it"),
        &large,
        "large",
    );

    // BatchUpdateBlobs: every entry of the failed upstream batch fails.
    let batch = [blob(23, 100), blob(24, 200)];
    fake.fail_next_of(Method::BatchUpdateBlobs, 1, Code::Internal);
    assert_eq!(
        batch_update(&mut server.cas(), "", &[&batch[0], &batch[1]]).await,
        vec![Code::Internal; 2]
    );
    assert!(!fake.has_blob(&digest(&batch[0])) && !fake.has_blob(&digest(&batch[1])));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hash_mismatch_stores_nothing_anywhere() {
    let fake = FakeUpstream::start().await;
    let server = proxy_for(&fake, |_| {}).await;
    fake.reset_stats();
    let mut claimed = Vec::new();
    for (seed, len) in [(31u64, 1000usize), (32, 3 * MIB)] {
        let data = blob(seed, len);
        let d = digest(&data);
        claimed.push(d.clone());
        let wrong = corrupted(&data);
        let name = write_name("", &d);
        let err = write(
            &mut server.bytestream(),
            write_requests(&name, &wrong, 0, 256 << 10, true),
        )
        .await
        .expect_err("a mismatch is refused");
        assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
        if len <= MIB {
            assert_eq!(
                batch_update_raw(&mut server.cas(), "", vec![(d.clone(), wrong)])
                    .await
                    .expect("BatchUpdateBlobs"),
                vec![Code::InvalidArgument]
            );
        }
    }
    server.assert_nothing_stored().await;
    for d in &claimed {
        assert!(!fake.has_blob(d), "the upstream never gets a bad blob");
    }
    assert_eq!(
        fake.count(Method::BatchUpdateBlobs),
        0,
        "{}",
        fake.summary()
    );
    // The large upload streamed alongside must never have been completed.
    for call in fake.calls_of(Method::Write) {
        assert_ne!(call.code, Some(Code::Ok), "{call:?}");
    }
}

// ---------------------------------------------------------------- action cache

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn action_results_are_read_through_checked_and_cached() {
    let fake = FakeUpstream::start().await;
    let out = blob(51, 4000);
    let stdout = b"compiled 1 file\n".to_vec();
    let (d_out, d_stdout) = (fake.put_blob(out.clone()), fake.put_blob(stdout.clone()));
    let action = digest(b"action: compile a.c");
    let mut upstream_result = result_with_output("bazel-out/a.o", &d_out);
    upstream_result.stdout_digest = Some(d_stdout.clone());
    let mut inlined = upstream_result.clone();
    inlined.stdout_raw = stdout.clone();
    fake.put_action_result("", &action, inlined);
    let server = proxy_for(&fake, |_| {}).await;
    fake.reset_stats();

    // Local miss → upstream hit → returned (inline data stripped).
    let mut ac = server.action_cache();
    let got = ac
        .get_action_result(get_request("", &action))
        .await
        .expect("upstream hit")
        .into_inner();
    assert_eq!(got, upstream_result);
    assert_eq!(fake.count(Method::GetActionResult), 1);
    assert_eq!(
        stats(&server).await.action_result_count,
        1,
        "cached locally"
    );

    // Second lookup: local, outputs known present: no upstream call at all.
    fake.reset_stats();
    let got = ac
        .get_action_result(get_request("", &action))
        .await
        .expect("local hit")
        .into_inner();
    assert_eq!(got, upstream_result);
    assert_eq!(fake.total_calls(), 0, "{}", fake.summary());
    // Asking for stdout inline reads it through the proxy CAS.
    let mut with_stdout = get_request("", &action);
    with_stdout.inline_stdout = true;
    let got = ac
        .get_action_result(with_stdout)
        .await
        .expect("hit")
        .into_inner();
    assert_eq!(got.stdout_raw, stdout);

    // A result whose output exists nowhere is NOT_FOUND (and not kept).
    let gone = digest(b"an output nobody has");
    let stale_action = digest(b"action: stale");
    fake.put_action_result("", &stale_action, result_with_output("x", &gone));
    assert_code(
        ac.get_action_result(get_request("", &stale_action)).await,
        Code::NotFound,
    );
    let s = stats(&server).await;
    assert_eq!((s.action_result_count, s.stale_action_results), (1, 1));

    // UpdateActionResult goes upstream and locally.
    let out3 = blob(53, 3000);
    assert_eq!(
        batch_update(&mut server.cas(), "", &[&out3]).await,
        vec![Code::Ok]
    );
    let action3 = digest(b"action: link");
    let result3 = result_with_output("bazel-out/bin/app", &digest(&out3));
    ac.update_action_result(update_request("", &action3, &result3))
        .await
        .expect("update");
    assert_eq!(fake.action_result("", &action3), Some(result3.clone()));
    assert!(fake.remove_action_result("", &action3));
    fake.reset_stats();
    let got = ac
        .get_action_result(get_request("", &action3))
        .await
        .expect("served from the local copy")
        .into_inner();
    assert_eq!(got, result3);
    assert_eq!(fake.count(Method::GetActionResult), 0);
}

// ---------------------------------------------------------------- headers

/// The client's credentials and request metadata.
fn request_metadata() -> re::RequestMetadata {
    re::RequestMetadata {
        tool_details: Some(re::ToolDetails {
            tool_name: "bazel".into(),
            tool_version: "7.4.0".into(),
        }),
        action_id: "action-123".into(),
        tool_invocation_id: "invocation-9".into(),
        correlated_invocations_id: "build-1".into(),
        ..Default::default()
    }
}

fn with_client_headers<T>(message: T) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    let md = request.metadata_mut();
    md.insert("authorization", "Bearer client-token".parse().unwrap());
    md.insert("x-client-key", "client-key".parse().unwrap());
    md.insert_bin(
        REQUEST_METADATA_HEADER,
        MetadataValue::from_bytes(&request_metadata().encode_to_vec()),
    );
    request
}

/// Makes one call of each kind that must reach the upstream, all with the
/// client's headers; returns the methods the upstream saw.
async fn calls_needing_the_upstream(fake: &FakeUpstream, server: &TestServer) -> BTreeSet<Method> {
    let small = fake.put_blob(blob(61, 1000));
    let large = fake.put_blob(blob(62, 2 * MIB));
    let action = digest(b"action: headers");
    fake.put_action_result(
        &fake_instance(fake),
        &action,
        result_with_output("o", &small),
    );
    fake.reset_stats();
    let mut cas = server.cas();
    cas.find_missing_blobs(with_client_headers(re::FindMissingBlobsRequest {
        instance_name: String::new(),
        blob_digests: vec![digest(b"absent")],
        digest_function: 0,
    }))
    .await
    .expect("FindMissingBlobs");
    cas.batch_read_blobs(with_client_headers(re::BatchReadBlobsRequest {
        instance_name: String::new(),
        digests: vec![small.clone()],
        acceptable_compressors: vec![],
        digest_function: 0,
    }))
    .await
    .expect("BatchReadBlobs");
    let mut stream = server
        .bytestream()
        .read(with_client_headers(bs::ReadRequest {
            resource_name: read_name("", &large),
            read_offset: 0,
            read_limit: 0,
        }))
        .await
        .expect("Read")
        .into_inner();
    while stream.message().await.expect("Read stream").is_some() {}
    let upload = blob(63, 2 * MIB);
    let name = write_name("", &digest(&upload));
    server
        .bytestream()
        .write(with_client_headers(futures::stream::iter(write_requests(
            &name,
            &upload,
            0,
            256 << 10,
            true,
        ))))
        .await
        .expect("Write");
    let mut ac = server.action_cache();
    ac.get_action_result(with_client_headers(get_request("", &action)))
        .await
        .expect("GetActionResult");
    ac.update_action_result(with_client_headers(update_request(
        "",
        &digest(b"action: headers 2"),
        &result_with_output("o", &small),
    )))
    .await
    .expect("UpdateActionResult");
    fake.calls().iter().map(|c| c.method).collect()
}

/// The instance name the fake sees for the client's `""` (mapped or not).
fn fake_instance(fake: &FakeUpstream) -> String {
    fake.calls_of(Method::GetCapabilities)
        .first()
        .map(|c| c.instance_name.clone())
        .unwrap_or_default()
}

const UPSTREAM_METHODS: [Method; 6] = [
    Method::FindMissingBlobs,
    Method::BatchReadBlobs,
    Method::Read,
    Method::Write,
    Method::GetActionResult,
    Method::UpdateActionResult,
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_credentials_and_request_metadata_reach_the_upstream() {
    let fake = FakeUpstream::start().await;
    let server = proxy_for(&fake, |_| {}).await;
    let seen = calls_needing_the_upstream(&fake, &server).await;
    for method in UPSTREAM_METHODS {
        assert!(seen.contains(&method), "no {method:?} call: {seen:?}");
    }
    for call in fake.calls() {
        assert_eq!(
            call.header("authorization").as_deref(),
            Some("Bearer client-token"),
            "{:?}",
            call.method
        );
        assert_eq!(
            call.header("x-client-key").as_deref(),
            Some("client-key"),
            "{:?}",
            call.method
        );
        assert_eq!(
            call.request_metadata(),
            Some(request_metadata()),
            "{:?}",
            call.method
        );
        assert_eq!(call.instance_name, "", "{:?}", call.method);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn configured_headers_override_and_instance_names_are_mapped() {
    let fake = FakeUpstream::start().await;
    let server = proxy_for(&fake, |u| {
        u.headers = vec![
            ("authorization".into(), "Bearer proxy-token".into()),
            ("x-api-key".into(), "k-123".into()),
        ];
        u.instance_names.insert(String::new(), "main".into());
    })
    .await;
    assert_eq!(fake_instance(&fake), "main");
    let seen = calls_needing_the_upstream(&fake, &server).await;
    for method in UPSTREAM_METHODS {
        assert!(seen.contains(&method), "no {method:?} call: {seen:?}");
    }
    for call in fake.calls() {
        let auth: Vec<_> = call.headers.get_all("authorization").iter().collect();
        assert_eq!(auth.len(), 1, "{:?}: {auth:?}", call.method);
        assert_eq!(
            call.header("authorization").as_deref(),
            Some("Bearer proxy-token"),
            "{:?}",
            call.method
        );
        assert_eq!(call.header("x-api-key").as_deref(), Some("k-123"));
        assert_eq!(call.header("x-client-key").as_deref(), Some("client-key"));
        assert_eq!(call.request_metadata(), Some(request_metadata()));
    }
    assert_eq!(
        fake.instance_names(),
        BTreeSet::from(["main".to_string()]),
        "client instance \"\" is \"main\" upstream"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_headers_are_not_forwarded_when_disabled() {
    let fake = FakeUpstream::start().await;
    let server = proxy_for(&fake, |u| {
        u.forward_client_headers = false;
        u.headers = vec![("x-api-key".into(), "k-456".into())];
    })
    .await;
    let seen = calls_needing_the_upstream(&fake, &server).await;
    for method in UPSTREAM_METHODS {
        assert!(seen.contains(&method), "no {method:?} call: {seen:?}");
    }
    for call in fake.calls() {
        assert_eq!(call.header("authorization"), None, "{:?}", call.method);
        assert_eq!(call.header("x-client-key"), None, "{:?}", call.method);
        assert_eq!(call.request_metadata(), None, "{:?}", call.method);
        assert_eq!(call.header("x-api-key").as_deref(), Some("k-456"));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_with_different_credentials_are_not_merged() {
    let fake = FakeUpstream::start().await;
    let server = proxy_for(&fake, |_| {}).await;
    fake.reset_stats();
    fake.pause_method(Method::FindMissingBlobs);
    let tasks: Vec<_> = ["Bearer alice", "Bearer bob"]
        .into_iter()
        .enumerate()
        .map(|(i, token)| {
            let channel = server.channel();
            tokio::spawn(async move {
                let mut request = tonic::Request::new(re::FindMissingBlobsRequest {
                    instance_name: String::new(),
                    blob_digests: vec![digest(format!("absent {i}").as_bytes())],
                    digest_function: 0,
                });
                request
                    .metadata_mut()
                    .insert("authorization", token.parse().unwrap());
                channel.cas().find_missing_blobs(request).await
            })
        })
        .collect();
    assert!(
        fake.wait_parked(2, WAIT).await,
        "two separate upstream calls"
    );
    fake.resume();
    for task in tasks {
        assert_eq!(
            task.await
                .unwrap()
                .unwrap()
                .into_inner()
                .missing_blob_digests
                .len(),
            1
        );
    }
    let mut tokens: Vec<String> = fake
        .calls_of(Method::FindMissingBlobs)
        .iter()
        .map(|c| c.header("authorization").unwrap_or_default())
        .collect();
    tokens.sort();
    assert_eq!(tokens, ["Bearer alice", "Bearer bob"]);
}

// ---------------------------------------------------------------- capabilities

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn capabilities_are_merged_with_the_upstream() {
    let fake = FakeUpstream::start().await;
    fake.set_max_batch_total_size_bytes(MIB as i64);
    fake.set_action_cache_updates(false);
    let server = proxy_for(&fake, |_| {}).await;
    let caps = server
        .capabilities()
        .get_capabilities(re::GetCapabilitiesRequest {
            instance_name: String::new(),
        })
        .await
        .expect("GetCapabilities")
        .into_inner();
    let cache = caps.cache_capabilities.expect("cache capabilities");
    assert_eq!(cache.max_batch_total_size_bytes, MIB as i64);
    assert_eq!(
        cache.action_cache_update_capabilities,
        Some(re::ActionCacheUpdateCapabilities {
            update_enabled: false
        })
    );
    assert_eq!(
        cache.digest_functions,
        vec![re::digest_function::Value::Sha256 as i32]
    );
    // zstd is Outpost's own (it decodes and encodes), whatever the upstream says.
    assert_eq!(cache.supported_compressors, vec![ZSTD]);
    assert!(!caps.execution_capabilities.is_some_and(|e| e.exec_enabled));
    // The upstream refuses updates; so does the proxy, keeping nothing.
    let out = blob(71, 100);
    assert_eq!(
        batch_update(&mut server.cas(), "", &[&out]).await,
        vec![Code::Ok]
    );
    assert_code(
        server
            .action_cache()
            .update_action_result(update_request(
                "",
                &digest(b"action: refused"),
                &result_with_output("o", &digest(&out)),
            ))
            .await,
        Code::PermissionDenied,
    );
    assert_eq!(stats(&server).await.action_result_count, 0);

    // An upstream with a larger limit: the proxy's own 4 MiB stays.
    let big = FakeUpstream::start().await;
    big.set_max_batch_total_size_bytes(64 * MIB as i64);
    let server = proxy_for(&big, |_| {}).await;
    let caps = server
        .capabilities()
        .get_capabilities(re::GetCapabilitiesRequest {
            instance_name: String::new(),
        })
        .await
        .expect("GetCapabilities")
        .into_inner();
    let cache = caps.cache_capabilities.expect("cache capabilities");
    assert_eq!(cache.max_batch_total_size_bytes, 4 * MIB as i64);
    assert!(
        cache
            .action_cache_update_capabilities
            .is_some_and(|u| u.update_enabled)
    );
}

// ---------------------------------------------------------------- upstream trouble

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn upstream_outage_local_hits_served_rest_fails_fast_then_recovers() {
    let fake = FakeUpstream::start().await;
    let remote = blob(81, 50_000);
    let d_remote = fake.put_blob(remote.clone());
    let ttl = Duration::from_millis(200);
    let server = proxy_for(&fake, |u| u.existence_ttl = ttl).await;
    let endpoint = fake.addr().to_string();

    // Held locally (and upstream): a blob and an action result over it.
    let local = blob(82, 10_000);
    let d_local = digest(&local);
    assert_eq!(
        batch_update(&mut server.cas(), "", &[&local]).await,
        vec![Code::Ok]
    );
    let action = digest(b"action: outage");
    let result = result_with_output("out", &d_local);
    let mut ac = server.action_cache();
    ac.update_action_result(update_request("", &action, &result))
        .await
        .expect("update");

    fake.go_down().await;
    // Let the existence cache forget, so the completeness check must ask.
    tokio::time::sleep(ttl + Duration::from_millis(100)).await;

    // Local hits are served.
    let started = Instant::now();
    for via in [Via::ByteStream, Via::Batch] {
        let got = read_via(&server.channel(), via, &d_local)
            .await
            .expect("local hit while the upstream is down");
        assert_bytes(&got, &local, "local hit");
    }
    let got = ac
        .get_action_result(get_request("", &action))
        .await
        .expect("local action result while the upstream is down")
        .into_inner();
    assert_eq!(got, result);
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "local hits took {:?}",
        started.elapsed()
    );

    // Everything needing the upstream fails fast with UNAVAILABLE and says
    // so. (The completeness check above marked the upstream down; a call
    // that happens to be the recovery probe, 0.5 s later, reports the
    // transport error itself, so only the first call here is certain to be
    // answered by the fail-fast path, which names the endpoint.)
    let check = |what: &str, started: Instant, status: Status| {
        let elapsed = started.elapsed();
        assert_eq!(status.code(), Code::Unavailable, "{what}: {status:?}");
        assert!(
            status.message().contains("upstream"),
            "{what}: the message should say the upstream failed: {:?}",
            status.message()
        );
        assert!(elapsed < Duration::from_secs(2), "{what} took {elapsed:?}");
    };
    let t = Instant::now();
    let err = read_via(&server.channel(), Via::ByteStream, &d_remote)
        .await
        .expect_err("remote blob while down");
    assert!(
        err.message().contains(&endpoint) && err.message().contains("unreachable"),
        "the fail-fast message should name the upstream {endpoint}: {:?}",
        err.message()
    );
    check("ByteStream Read", t, err);
    let t = Instant::now();
    let err = read_via(&server.channel(), Via::Batch, &d_remote)
        .await
        .expect_err("remote blob while down");
    check("BatchReadBlobs", t, err);
    let t = Instant::now();
    let err = try_find_missing(&mut server.cas(), std::slice::from_ref(&d_remote))
        .await
        .expect_err("FindMissingBlobs while down");
    check("FindMissingBlobs", t, err);
    let t = Instant::now();
    let err = upload(&mut server.bytestream(), "", &blob(83, 1000), 1 << 20)
        .await
        .expect_err("Write while down");
    check("ByteStream Write", t, err);
    let t = Instant::now();
    let err = ac
        .get_action_result(get_request("", &digest(b"action: unknown")))
        .await
        .expect_err("GetActionResult miss while down");
    check("GetActionResult", t, err);
    // Local hits still work between failures.
    let got = read_via(&server.channel(), Via::ByteStream, &d_local)
        .await
        .expect("local hit");
    assert_bytes(&got, &local, "local hit");

    // Back up: the proxy notices by itself, without a restart.
    fake.come_up().await;
    let up_at = Instant::now();
    loop {
        if try_find_missing(&mut server.cas(), std::slice::from_ref(&d_remote))
            .await
            .is_ok_and(|missing| missing.is_empty())
        {
            break;
        }
        assert!(
            up_at.elapsed() < WAIT,
            "the proxy did not recover: {}",
            fake.summary()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let recovered = up_at.elapsed();
    assert!(
        recovered < Duration::from_secs(6),
        "recovery took {recovered:?}"
    );
    let got = read_via(&server.channel(), Via::ByteStream, &d_remote)
        .await
        .expect("remote blob after recovery");
    assert_bytes(&got, &remote, "after recovery");
    let late = blob(84, 1000);
    assert_eq!(
        upload(&mut server.bytestream(), "", &late, 1 << 20)
            .await
            .expect("write after recovery"),
        1000
    );
    assert!(fake.has_blob(&digest(&late)));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_first_failure_of_an_outage_names_the_upstream() {
    let fake = FakeUpstream::start().await;
    let server = proxy_for(&fake, |_| {}).await;
    let endpoint = fake.addr().to_string();
    fake.go_down().await;
    let err = try_find_missing(&mut server.cas(), &[digest(b"absent: first failure")])
        .await
        .expect_err("FindMissingBlobs while down");
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");
    assert!(
        err.message().contains(&endpoint),
        "the message should name the upstream {endpoint}: {:?}",
        err.message()
    );
}

/// An Outpost in front of `fake` with a short unary deadline, after one
/// successful call (so the connection is up when the partition starts).
async fn proxy_before_partition(fake: &FakeUpstream) -> TestServer {
    let server = proxy_for(fake, |u| {
        u.rpc_timeout = Duration::from_millis(500);
        u.max_attempts = 2;
    })
    .await;
    let d = digest(b"absent: before the partition");
    assert_eq!(
        find_missing(&mut server.cas(), std::slice::from_ref(&d)).await,
        vec![d]
    );
    server
}

/// Runs `call` with a hard bound (so a hanging call fails the test instead
/// of hanging it); returns the error and how long it took.
async fn bounded<T: std::fmt::Debug>(
    what: &str,
    call: impl std::future::Future<Output = Result<T, Status>>,
) -> (Status, Duration) {
    let t = Instant::now();
    let result = tokio::time::timeout(Duration::from_secs(15), call)
        .await
        .unwrap_or_else(|_| panic!("{what} still hanging after 15 s"));
    (result.expect_err(what), t.elapsed())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partitioned_upstream_fails_unary_calls_within_the_rpc_timeout() {
    let fake = FakeUpstream::start().await;
    let small = fake.put_blob(blob(131, 1000));
    let server = proxy_before_partition(&fake).await;

    // Packets vanish: unary calls end with their deadline, not hang.
    fake.blackhole().await;
    let (err, took) = bounded(
        "BatchReadBlobs fetch",
        read_via(&server.channel(), Via::Batch, &small),
    )
    .await;
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");
    assert!(took < Duration::from_secs(5), "took {took:?}");
    let (err, took) = bounded(
        "FindMissingBlobs",
        try_find_missing(&mut server.cas(), std::slice::from_ref(&small)),
    )
    .await;
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");
    assert!(took < Duration::from_secs(5), "took {took:?}");

    fake.come_up().await;
    let t = Instant::now();
    while read_via(&server.channel(), Via::Batch, &small)
        .await
        .is_err()
    {
        assert!(t.elapsed() < WAIT, "no recovery: {}", fake.summary());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partition_is_detected_and_later_calls_fail_fast() {
    let fake = FakeUpstream::start().await;
    let server = proxy_before_partition(&fake).await;
    fake.blackhole().await;
    let mut cas = server.cas();
    let (err, _) = bounded(
        "first FindMissingBlobs",
        try_find_missing(&mut cas, &[digest(b"absent: partition 1")]),
    )
    .await;
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");
    // (The fake sees nothing during a partition; the proxy counts attempts.)
    assert_eq!(
        stats(&server).await.upstream_calls.get("FindMissingBlobs"),
        Some(&(1 + 1)),
        "one call before the partition; the timed-out call already waited its deadline, so it \
         is not retried (max_attempts 2), but it marks the upstream down"
    );
    let (err, took) = bounded(
        "second FindMissingBlobs",
        try_find_missing(&mut cas, &[digest(b"absent: partition 2")]),
    )
    .await;
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");
    assert!(
        took < Duration::from_millis(200),
        "the upstream is known down: fail fast, not after {took:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partitioned_upstream_fails_stream_reads_in_bounded_time() {
    let fake = FakeUpstream::start().await;
    let large = fake.put_blob(blob(132, 2 * MIB));
    let server = proxy_before_partition(&fake).await;
    fake.blackhole().await;
    let (err, took) = bounded(
        "ByteStream fetch",
        read_via(&server.channel(), Via::ByteStream, &large),
    )
    .await;
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");
    assert!(took < Duration::from_secs(5), "took {took:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transient_upstream_errors_are_retried() {
    let fake = FakeUpstream::start().await;
    let present = fake.put_blob(blob(91, 100));
    let absent = digest(b"absent: retries");
    let server = proxy_for(&fake, |u| u.max_attempts = 3).await;
    fake.reset_stats();
    let mut cas = server.cas();

    fake.fail_next_of(Method::FindMissingBlobs, 2, Code::Unavailable);
    assert_eq!(
        find_missing(&mut cas, &[present.clone(), absent.clone()]).await,
        vec![absent.clone()]
    );
    assert_eq!(fake.count(Method::FindMissingBlobs), 3);
    assert_eq!(
        stats(&server).await.upstream_calls.get("FindMissingBlobs"),
        Some(&3),
        "each attempt counts"
    );

    let data = blob(92, 1000);
    fake.fail_next_of(Method::BatchUpdateBlobs, 1, Code::Unavailable);
    assert_eq!(batch_update(&mut cas, "", &[&data]).await, vec![Code::Ok]);
    assert_eq!(fake.count(Method::BatchUpdateBlobs), 2);
    assert!(fake.has_blob(&digest(&data)));

    // Out of attempts: the client sees UNAVAILABLE, and the proxy recovers
    // on its own once the upstream answers again.
    fake.fail_next_of(Method::FindMissingBlobs, 3, Code::Unavailable);
    let err = try_find_missing(&mut cas, std::slice::from_ref(&absent))
        .await
        .expect_err("three failures");
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");
    let t = Instant::now();
    while try_find_missing(&mut cas, std::slice::from_ref(&absent))
        .await
        .ok()
        != Some(vec![absent.clone()])
    {
        assert!(t.elapsed() < WAIT, "no recovery: {}", fake.summary());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(t.elapsed() < Duration::from_secs(3), "{:?}", t.elapsed());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broken_upstream_read_is_resumed_at_its_offset() {
    let fake = FakeUpstream::start().await;
    let data = blob(101, 3 * MIB);
    let d = fake.put_blob(data.clone());
    let server = proxy_for(&fake, |_| {}).await;
    fake.reset_stats();
    fake.abort_next_stream(Method::Read, MIB as u64, Code::Unavailable);
    let got = read_via(&server.channel(), Via::ByteStream, &d)
        .await
        .expect("read survives the break");
    assert_bytes(&got, &data, "resumed read");
    let reads = fake.calls_of(Method::Read);
    assert_eq!(reads.len(), 2, "{}", fake.summary());
    assert_eq!(reads[0].code, Some(Code::Unavailable));
    assert_eq!(reads[1].code, Some(Code::Ok));
    assert_eq!(
        (reads[0].bytes_sent, reads[1].bytes_sent),
        (MIB as u64, 2 * MIB as u64),
        "the second read starts where the first broke"
    );
    // Stored: the next read is local.
    fake.reset_stats();
    let got = read_via(&server.channel(), Via::Batch, &d)
        .await
        .expect("local read");
    assert_bytes(&got, &data, "local read");
    assert_eq!(fake.total_calls(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn corrupt_upstream_data_is_never_served_or_stored() {
    let fake = FakeUpstream::start().await;
    let mut digests = Vec::new();
    for (seed, len) in [(111u64, 5000usize), (112, 3 * MIB)] {
        let good = blob(seed, len);
        let d = digest(&good);
        fake.put_blob_unchecked(&d, corrupted(&good));
        digests.push(d);
    }
    let server = proxy_for(&fake, |_| {}).await;
    fake.reset_stats();
    for d in &digests {
        for via in [Via::ByteStream, Via::Batch] {
            let err = read_via(&server.channel(), via, d)
                .await
                .expect_err("corrupt data is refused");
            assert_eq!(
                err.code(),
                Code::Unavailable,
                "{} bytes via {via:?}: {err:?}",
                d.size_bytes
            );
        }
        assert_eq!(fake.fetches_of(d), 2, "nothing kept: each read fetched");
    }
    server.assert_nothing_stored().await;
}

// ---------------------------------------------------------------- metrics

/// A loopback port that was free a moment ago.
fn free_port() -> SocketAddr {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port")
}

/// A plain HTTP/1.1 GET; returns the whole response (head and body).
async fn http_get(addr: SocketAddr, path: &str) -> String {
    let mut stream = tokio::net::TcpStream::connect(addr)
        .await
        .expect("connect to the metrics port");
    let request = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await.expect("send");
    let mut response = Vec::new();
    tokio::time::timeout(WAIT, stream.read_to_end(&mut response))
        .await
        .expect("metrics answer in time")
        .expect("read the answer");
    String::from_utf8(response).expect("UTF-8 response")
}

/// The value of the sample `series` (name with labels) in Prometheus text.
#[track_caller]
fn sample(text: &str, series: &str) -> u64 {
    text.lines()
        .find_map(|line| {
            line.strip_prefix(series)
                .and_then(|rest| rest.strip_prefix(' '))
        })
        .unwrap_or_else(|| panic!("no sample {series} in:\n{text}"))
        .trim()
        .parse()
        .expect("integer sample")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn metrics_and_stats_count_upstream_work() {
    let fake = FakeUpstream::start().await;
    let small = blob(121, 30_000);
    let d_small = fake.put_blob(small.clone());
    let present = fake.put_blob(blob(122, 100));
    let metrics = free_port();
    let server = proxy_with(&fake, |_| {}, |c| c.metrics_listen = Some(metrics)).await;

    // Ten readers share one fetch (9 joins).
    fake.pause_method(Method::BatchReadBlobs);
    let readers: Vec<_> = (0..10)
        .map(|_| {
            let (channel, d) = (server.channel(), d_small.clone());
            tokio::spawn(async move { read_via(&channel, Via::ByteStream, &d).await })
        })
        .collect();
    assert!(fake.wait_parked(1, WAIT).await);
    wait_stats(&server, "9 joins", |s| s.single_flight_joins == 9).await;
    fake.resume();
    for reader in readers {
        assert_bytes(&reader.await.unwrap().expect("read"), &small, "reader");
    }
    // One FindMissingBlobs (two digests), one write through.
    let absent = digest(b"absent: metrics");
    assert_eq!(
        find_missing(&mut server.cas(), &[present, absent.clone()]).await,
        vec![absent]
    );
    let written = blob(123, 2000);
    assert_eq!(
        batch_update(&mut server.cas(), "", &[&written]).await,
        vec![Code::Ok]
    );

    let response = http_get(metrics, "/metrics").await;
    assert!(
        response.starts_with("HTTP/1.1 200"),
        "bad answer:\n{response}"
    );
    let calls = |method: &str| {
        sample(
            &response,
            &format!("outpost_upstream_calls_total{{method=\"{method}\"}}"),
        )
    };
    assert_eq!(
        calls("FindMissingBlobs"),
        fake.count(Method::FindMissingBlobs) as u64
    );
    assert_eq!(calls("FindMissingBlobs"), 1);
    assert_eq!(calls("BatchReadBlobs"), 1);
    assert_eq!(calls("BatchUpdateBlobs"), 1);
    assert_eq!(calls("ByteStream.Read"), 0);
    assert_eq!(
        calls("GetCapabilities"),
        fake.count(Method::GetCapabilities) as u64
    );
    assert_eq!(sample(&response, "outpost_single_flight_joins_total"), 9);
    assert_eq!(sample(&response, "outpost_upstream_fetches_total"), 1);
    assert_eq!(
        sample(&response, "outpost_upstream_bytes_received_total"),
        small.len() as u64
    );
    assert_eq!(
        sample(&response, "outpost_upstream_bytes_sent_total"),
        written.len() as u64
    );
    assert_eq!(sample(&response, "outpost_existence_cache_misses_total"), 2);
    assert_eq!(sample(&response, "outpost_fmb_batches_total"), 1);
    assert_eq!(sample(&response, "outpost_fmb_batched_digests_total"), 2);
    assert_eq!(sample(&response, "outpost_read_batches_total"), 1);
    assert_eq!(sample(&response, "outpost_write_batches_total"), 1);
    assert_eq!(sample(&response, "outpost_upstream_errors_total"), 0);

    let s = stats(&server).await;
    assert_eq!(s.upstream, format!("http://{}", fake.addr()));
    assert_eq!(s.upstream_calls.get("FindMissingBlobs"), Some(&1));
    assert_eq!(s.upstream_calls.get("BatchReadBlobs"), Some(&1));
    assert_eq!(s.upstream_calls.get("ByteStream.Read"), Some(&0));
    assert_eq!(s.upstream_bytes_received, small.len() as u64);
    assert_eq!(s.upstream_bytes_sent, written.len() as u64);
    assert_eq!((s.upstream_fetches, s.single_flight_joins), (1, 9));
    assert_eq!((s.existence_cache_misses, s.fmb_batched_digests), (2, 2));
    assert_eq!((s.read_batches, s.write_batches), (1, 1));
    assert_eq!(s.upstream_errors, 0);
}
