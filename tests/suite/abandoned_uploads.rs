//! Abandoned uploads: a Write that declares a large size, sends a little and
//! goes away holds only what it sent, is dropped before any cached blob is
//! evicted, and (in proxy mode) holds no upstream stream while it waits.

use std::time::{Duration, Instant};

use tonic::Code;

use crate::common::fake_upstream::{FakeUpstream, Method};
use crate::common::*;

const MIB: usize = 1 << 20;
/// Upper bound for anything the tests wait for (never reached when all is well).
const WAIT: Duration = Duration::from_secs(10);

/// Sends `data[..sent]` of an upload named `name` and closes the stream
/// without `finish_write`, as a client that gave up would.
async fn abandon(bs: &mut ByteStream, name: &str, data: &[u8], sent: usize) {
    let requests = write_requests(name, &data[..sent], 0, 64 << 10, false);
    assert_eq!(
        write(bs, requests).await.expect("partial write"),
        sent as i64
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn abandoned_uploads_do_not_hold_the_quota_hostage() {
    let server = TestServer::start_with(|c| c.quota_bytes = 32 << 20).await;
    let mut bs = server.bytestream();
    // Four uploads that declare 8 MiB each (the whole quota together) and
    // send 1 KiB. Three name blobs nobody will ever send; one is resumed.
    let resumed = blob(1, 8 * MIB);
    let resumed_name = write_name("", &digest(&resumed));
    abandon(&mut bs, &resumed_name, &resumed, 1024).await;
    for seed in 2..5 {
        let fake = raw_digest(&sha256_hex(&blob(seed, 10)), 8 * MIB as i64);
        abandon(&mut bs, &write_name("", &fake), &blob(seed, 1024), 1024).await;
    }

    // Later writes still fit: a small batch, and a large stream.
    let small = blob(5, 5000);
    assert_eq!(
        batch_update(&mut server.cas(), "", &[&small]).await,
        vec![Code::Ok]
    );
    let large = blob(6, 12 * MIB);
    assert_eq!(
        upload(&mut bs, "", &large, 256 << 10)
            .await
            .expect("upload"),
        large.len() as i64
    );

    // The parked upload is still there and can be finished.
    assert_eq!(
        write_status(&mut bs, &resumed_name)
            .await
            .expect("the upload is parked"),
        (1024, false)
    );
    let rest = write_requests(&resumed_name, &resumed, 1024, 256 << 10, true);
    assert_eq!(
        write(&mut bs, rest).await.expect("resumed"),
        resumed.len() as i64
    );
    assert_eq!(
        read_digest(&mut bs, &digest(&resumed)).await.unwrap(),
        digest(&resumed)
    );
    let s = stats(&server).await;
    assert_eq!(s.blob_bytes, (5000 + 20 * MIB) as u64);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn parked_uploads_go_before_cached_blobs_are_evicted() {
    let server = TestServer::start_with(|c| c.quota_bytes = 32 << 20).await;
    let mut bs = server.bytestream();
    let cached = blob(1, 12 * MIB);
    upload(&mut bs, "", &cached, 256 << 10)
        .await
        .expect("cached");
    // 7 MiB received of a 16 MiB upload, parked (within the 8 MiB cap).
    let parked = blob(2, 16 * MIB);
    let parked_name = write_name("", &digest(&parked));
    abandon(&mut bs, &parked_name, &parked, 7 * MIB).await;

    // 12 + 7 + 16 > 32 MiB: room is needed, and the parked upload gives it.
    let next = blob(3, 16 * MIB);
    upload(&mut bs, "", &next, 256 << 10).await.expect("next");
    assert_eq!(
        find_missing(&mut server.cas(), &[digest(&cached), digest(&next)]).await,
        vec![],
        "nothing cached was evicted"
    );
    assert_code(write_status(&mut bs, &parked_name).await, Code::NotFound);
    server.stop().await;
}

/// Waits until the fake has seen a Write and every Write it saw has ended.
async fn wait_upstream_writes_ended(fake: &FakeUpstream) {
    let deadline = Instant::now() + WAIT;
    loop {
        let writes = fake.calls_of(Method::Write);
        if !writes.is_empty() && writes.iter().all(|c| c.finished.is_some()) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "an upstream Write is still open: {}",
            fake.summary()
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_parked_proxy_upload_holds_no_upstream_stream_and_resumes() {
    let fake = FakeUpstream::start().await;
    let server = start_proxy(&fake, |u| u.write_mode = WriteMode::Through, |_| {}).await;
    fake.reset_stats();
    let mut bs = server.bytestream();
    let data = blob(1, 3 * MIB);
    let d = digest(&data);
    let name = write_name("", &d);
    abandon(&mut bs, &name, &data, MIB).await;
    wait_upstream_writes_ended(&fake).await;
    assert!(!fake.has_blob(&d));

    assert_eq!(
        write_status(&mut bs, &name).await.unwrap(),
        (MIB as i64, false)
    );
    let rest = write_requests(&name, &data, MIB, 256 << 10, true);
    assert_eq!(write(&mut bs, rest).await.unwrap(), data.len() as i64);
    assert_eq!(
        fake.blob(&d)
            .expect("upstream has it when the write returns"),
        data.as_slice()
    );
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_parked_write_back_upload_resumes_then_goes_up_from_the_queue() {
    let fake = FakeUpstream::start().await;
    let server = start_proxy(&fake, |_| {}, |_| {}).await;
    let mut bs = server.bytestream();
    let data = blob(4, 3 * MIB);
    let d = digest(&data);
    let name = write_name("", &d);
    abandon(&mut bs, &name, &data, MIB).await;
    assert_eq!(
        write_status(&mut bs, &name).await.unwrap(),
        (MIB as i64, false)
    );
    assert_eq!(fake.count(Method::Write), 0, "nothing streams upstream");
    let rest = write_requests(&name, &data, MIB, 256 << 10, true);
    assert_eq!(write(&mut bs, rest).await.unwrap(), data.len() as i64);
    let deadline = Instant::now() + WAIT;
    while fake.blob(&d).as_deref() != Some(data.as_slice()) {
        assert!(Instant::now() < deadline, "the queue never uploaded it");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_only_upload_is_dropped_not_parked() {
    let fake = FakeUpstream::start().await;
    let server = start_proxy(&fake, |_| {}, |c| c.quota_bytes = 8 << 20).await;
    fake.reset_stats();
    let mut bs = server.bytestream();
    // Larger than the local store: it can only stream to the upstream. (The
    // 1 MiB sent is within the 2 MiB cap of parked bytes.)
    let data = blob(1, 10 * MIB);
    let d = digest(&data);
    let name = write_name("", &d);
    // Nothing is kept, so the answer says a resumption starts at 0.
    let requests = write_requests(&name, &data[..MIB], 0, 64 << 10, false);
    assert_eq!(write(&mut bs, requests).await.expect("partial write"), 0);
    wait_upstream_writes_ended(&fake).await;
    assert_code(write_status(&mut bs, &name).await, Code::NotFound);

    // The client starts again from 0.
    let again = write_requests(&name, &data, 0, 256 << 10, true);
    assert_eq!(write(&mut bs, again).await.unwrap(), data.len() as i64);
    assert_eq!(fake.blob(&d).expect("upstream has it"), data.as_slice());
    server.stop().await;
}
