//! Compression over the WAN, black-box: an in-process Outpost in front of
//! the fake upstream with zstd switched on or off. What crossed the wire is
//! read from the fake's call log (payload bytes as they crossed, and
//! [`Call::compressed_blobs`](fake_upstream::Call::compressed_blobs)).

use std::time::{Duration, Instant};

use outpost::config::UpstreamConfig;
use outpost::config::upstream::UpstreamCompression;
use tonic::Code;

use crate::common::fake_upstream::{FakeUpstream, Method};
use crate::common::*;

/// Upper bound for anything the tests wait for (never reached when all is well).
const WAIT: Duration = Duration::from_secs(10);
/// Larger than a batch: crosses over ByteStream.
const LARGE: usize = 5 << 20;
/// Small enough for a batch, above the default 1 KiB threshold.
const SMALL: usize = 64 << 10;

/// Compressible bytes like build outputs: words from a small vocabulary in
/// a random order (about 2–3× with zstd at level 1), distinct per seed.
fn compressible(seed: u64, len: usize) -> Vec<u8> {
    const WORDS: &[&[u8]] = &[
        b"static ",
        b"inline ",
        b"return ",
        b"struct ",
        b"0x7f3a ",
        b"call ",
        b"mov rax, ",
        b"\n",
        b"lea ",
        b"jmp .L",
        b"const ",
        b"void ",
        b"{ ",
        b"} ",
        b"int ",
        b"size_t ",
    ];
    let mut rng = Rng::new(seed);
    let mut out = Vec::with_capacity(len + 16);
    while out.len() < len {
        let pick = rng.bytes(1)[0] as usize % WORDS.len();
        out.extend_from_slice(WORDS[pick]);
    }
    out.truncate(len);
    out
}

/// An Outpost proxying `fake` with writes through (a write is done once
/// the upstream has it) and `compression` set.
async fn proxy(fake: &FakeUpstream, compression: UpstreamCompression) -> TestServer {
    proxy_with(fake, compression, WriteMode::Through).await
}

async fn proxy_with(
    fake: &FakeUpstream,
    compression: UpstreamCompression,
    mode: WriteMode,
) -> TestServer {
    let adjust = |u: &mut UpstreamConfig| {
        u.max_attempts = 3;
        u.write_mode = mode;
        u.compression = compression;
    };
    let server = start_proxy(fake, adjust, |_| {}).await;
    fake.reset_stats();
    server
}

/// Reads a blob whole through Outpost's ByteStream.
async fn read_all(server: &TestServer, d: &re::Digest) -> Result<Vec<u8>, tonic::Status> {
    read_blob(&mut server.bytestream(), &read_name("", d), 0, 0)
        .await
        .map(|(data, _)| data)
}

/// Reads blobs through Outpost's BatchReadBlobs (plain for the client).
async fn batch_read(server: &TestServer, digests: &[re::Digest]) -> Vec<(Code, Vec<u8>)> {
    let resp = server
        .cas()
        .batch_read_blobs(re::BatchReadBlobsRequest {
            instance_name: String::new(),
            digests: digests.to_vec(),
            acceptable_compressors: vec![],
            digest_function: 0,
        })
        .await
        .expect("BatchReadBlobs")
        .into_inner();
    resp.responses
        .into_iter()
        .map(|r| (entry_code(&r.status), r.data))
        .collect()
}

async fn wait_until(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + WAIT;
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Reads of a large and a small compressible blob cross compressed, the
/// client sees them plain, and the next reads are local.
#[tokio::test]
async fn reads_cross_the_wan_compressed() {
    let fake = FakeUpstream::start().await;
    fake.set_compression(true);
    let (large, small) = (compressible(1, LARGE), compressible(2, SMALL));
    let (dl, ds) = (fake.put_blob(large.clone()), fake.put_blob(small.clone()));
    let server = proxy(&fake, UpstreamCompression::Auto).await;

    assert!(read_all(&server, &dl).await.unwrap() == large, "large blob");
    assert_eq!(
        batch_read(&server, std::slice::from_ref(&ds)).await,
        vec![(Code::Ok, small.clone())]
    );

    let read = fake.last_call(Method::Read).expect("a ByteStream read");
    assert_eq!(read.compressed_blobs, 1);
    assert!(
        read.bytes_sent < LARGE as u64 / 2,
        "{} bytes for {LARGE}",
        read.bytes_sent
    );
    let batch = fake
        .last_call(Method::BatchReadBlobs)
        .expect("a batch read");
    assert_eq!(batch.compressed_blobs, 1);
    assert!(
        batch.bytes_sent < SMALL as u64 / 2,
        "{} bytes for {SMALL}",
        batch.bytes_sent
    );
    let wire = metric(&server, "outpost_upstream_compressed_wire_bytes_total").await;
    let plain = metric(&server, "outpost_upstream_compressed_plain_bytes_total").await;
    assert_eq!(plain, (LARGE + SMALL) as u64);
    assert_eq!(wire, fake.bytes_sent());

    // Kept locally, verified: no second fetch.
    assert!(read_all(&server, &dl).await.unwrap() == large);
    assert!(read_all(&server, &ds).await.unwrap() == small);
    assert_eq!(fake.fetches_of(&dl) + fake.fetches_of(&ds), 2);
}

/// Writes through Outpost (ByteStream and batch) cross compressed and the
/// upstream holds the plain bytes.
#[tokio::test]
async fn writes_cross_the_wan_compressed() {
    let fake = FakeUpstream::start().await;
    fake.set_compression(true);
    let server = proxy(&fake, UpstreamCompression::Auto).await;
    let (large, small) = (compressible(3, LARGE), compressible(4, SMALL));

    assert_eq!(
        upload(&mut server.bytestream(), "", &large, 256 << 10)
            .await
            .unwrap(),
        LARGE as i64
    );
    assert_eq!(
        batch_update(&mut server.cas(), "", &[&small]).await,
        vec![Code::Ok]
    );

    assert!(fake.blob(&digest(&large)).unwrap() == large);
    assert!(fake.blob(&digest(&small)).unwrap() == small);
    let write = fake.last_call(Method::Write).expect("a ByteStream write");
    assert_eq!(write.compressed_blobs, 1);
    assert!(write.bytes_received < LARGE as u64 / 2);
    let batch = fake
        .last_call(Method::BatchUpdateBlobs)
        .expect("a batch write");
    assert_eq!(batch.compressed_blobs, 1);
    assert!(batch.bytes_received < SMALL as u64 / 2);
    assert_eq!(
        metric(&server, "outpost_upstream_compressed_plain_bytes_total").await,
        (LARGE + SMALL) as u64
    );
}

/// Blobs under `compression_min_bytes`, incompressible batch entries, and
/// every blob with compression off or not advertised cross plain.
#[tokio::test]
async fn tiny_blobs_cross_plain() {
    let fake = FakeUpstream::start().await;
    fake.set_compression(true);
    let server = proxy(&fake, UpstreamCompression::Auto).await;
    let tiny = compressible(5, 600);
    let random = blob(6, SMALL);
    assert_eq!(
        batch_update(&mut server.cas(), "", &[&tiny, &random]).await,
        vec![Code::Ok, Code::Ok]
    );
    let d = fake.put_blob(compressible(7, 900));
    assert_eq!(batch_read(&server, &[d]).await[0].0, Code::Ok);
    assert_eq!(fake.compressed_blobs(), 0, "{}", fake.summary());
    let read = fake.last_call(Method::BatchReadBlobs).unwrap();
    assert_eq!(read.bytes_sent, 900);
}

/// The same workload as above with `compression = "off"` (the upstream
/// advertising zstd), then against an upstream that does not advertise it:
/// exactly plain calls, no compressed name.
#[tokio::test]
async fn off_or_not_advertised_is_plain() {
    for (advertised, setting) in [
        (true, UpstreamCompression::Off),
        (false, UpstreamCompression::Auto),
    ] {
        let fake = FakeUpstream::start().await;
        fake.set_compression(advertised);
        let (large, small) = (compressible(8, LARGE), compressible(9, SMALL));
        let (dl, ds) = (fake.put_blob(large.clone()), fake.put_blob(small.clone()));
        let server = proxy(&fake, setting).await;
        assert!(read_all(&server, &dl).await.unwrap() == large);
        assert_eq!(batch_read(&server, &[ds]).await[0].0, Code::Ok);
        let up = compressible(10, LARGE);
        upload(&mut server.bytestream(), "", &up, 1 << 20)
            .await
            .unwrap();
        assert_eq!(
            batch_update(&mut server.cas(), "", &[&compressible(11, SMALL)]).await,
            vec![Code::Ok]
        );

        let what = format!("advertised {advertised}, {setting:?}");
        assert_eq!(fake.compressed_blobs(), 0, "{what}");
        assert_eq!(fake.bytes_sent(), (LARGE + SMALL) as u64, "{what}");
        assert_eq!(fake.bytes_received(), (LARGE + SMALL) as u64, "{what}");
        assert_eq!(
            metric(&server, "outpost_upstream_compressed_wire_bytes_total").await,
            0
        );
        server.stop().await;
    }
}

/// Compressed data from the upstream that does not decode is never stored:
/// the read answers UNAVAILABLE (as for a hash mismatch), and once the
/// upstream has lost the blob Outpost has nothing either.
#[tokio::test]
async fn corrupt_compressed_data_is_never_stored() {
    let fake = FakeUpstream::start().await;
    fake.set_compression(true);
    fake.set_corrupt_compressed(true);
    let (large, small) = (compressible(12, LARGE), compressible(13, SMALL));
    let (dl, ds) = (fake.put_blob(large), fake.put_blob(small));
    let server = proxy(&fake, UpstreamCompression::Auto).await;

    assert_code(read_all(&server, &dl).await, Code::Unavailable);
    assert_eq!(
        batch_read(&server, std::slice::from_ref(&ds)).await[0].0,
        Code::Unavailable
    );

    fake.remove_blob(&dl);
    fake.remove_blob(&ds);
    fake.set_corrupt_compressed(false);
    assert_code(read_all(&server, &dl).await, Code::NotFound);
    assert_eq!(batch_read(&server, &[ds]).await[0].0, Code::NotFound);
}

/// A compressed read that breaks mid-stream resumes at the plain byte it
/// reached, in a new compressed read, and the blob arrives whole.
#[tokio::test]
async fn a_broken_compressed_read_resumes() {
    let fake = FakeUpstream::start().await;
    fake.set_compression(true);
    fake.set_read_chunk_size(16 << 10);
    let large = compressible(14, LARGE);
    let dl = fake.put_blob(large.clone());
    let server = proxy(&fake, UpstreamCompression::Auto).await;
    fake.abort_next_stream(Method::Read, 300 << 10, Code::Unavailable);

    assert!(read_all(&server, &dl).await.unwrap() == large);
    let reads = fake.calls_of(Method::Read);
    assert_eq!(reads.len(), 2, "{}", fake.summary());
    assert!(reads.iter().all(|c| c.compressed_blobs == 1));
    assert!(reads[1].bytes_sent < reads[0].bytes_sent + LARGE as u64 / 2);
}

/// The write-back uploader sends what it holds compressed over the WAN.
#[tokio::test]
async fn write_back_uploads_cross_compressed() {
    let fake = FakeUpstream::start().await;
    fake.set_compression(true);
    let server = proxy_with(&fake, UpstreamCompression::Auto, WriteMode::Back).await;
    let (large, small) = (compressible(15, LARGE), compressible(16, SMALL));
    upload(&mut server.bytestream(), "", &large, 1 << 20)
        .await
        .unwrap();
    assert_eq!(
        batch_update(&mut server.cas(), "", &[&small]).await,
        vec![Code::Ok]
    );
    let (dl, ds) = (digest(&large), digest(&small));
    wait_until("the uploads", || fake.has_blob(&dl) && fake.has_blob(&ds)).await;

    assert!(fake.blob(&dl).unwrap() == large);
    assert_eq!(fake.compressed_blobs(), 2, "{}", fake.summary());
    assert!(fake.bytes_received() < (LARGE + SMALL) as u64 / 2);
}
