//! zstd-compressed blobs at the client edge: ByteStream `compressed-blobs`
//! reads and writes (offsets, resumption, early completion), compressed
//! batch entries both ways, mixed compressed and plain access to one blob,
//! and corrupt, mismatched, oversized and bomb uploads refused with nothing
//! stored. The tests compress and decompress with the `zstd` crate directly.

use tonic::{Code, Status};

use crate::common::*;

/// The largest ReadResponse the server sends (it documents 64 KiB).
const MAX_READ_CHUNK: usize = 64 << 10;
const COUNTER: &str = "outpost_client_compressed_blobs_total";

/// `len` bytes of build-log-like text: compresses several times over.
fn text(seed: u64, len: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(len + 64);
    let mut i = 0u64;
    while out.len() < len {
        let line = format!("[{seed}] compiling src/module_{}.rs: ok ({i} ms)\n", i % 97);
        out.extend_from_slice(line.as_bytes());
        i += 1;
    }
    out.truncate(len);
    out
}

fn zstd(data: &[u8]) -> Vec<u8> {
    zstd::bulk::compress(data, 3).expect("zstd compresses")
}

fn unzstd(data: &[u8]) -> Vec<u8> {
    zstd::decode_all(data).expect("the server sent valid zstd")
}

/// Uploads `data` compressed through ByteStream in `chunk`-byte pieces.
async fn upload_compressed(bs: &mut ByteStream, data: &[u8], chunk: usize) -> Result<i64, Status> {
    let name = compressed_write_name("", &digest(data));
    write(
        bs,
        compressed_write_requests(&name, &zstd(data), 0, chunk, true),
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bytestream_compressed_round_trips_honour_uncompressed_offsets() {
    let server = TestServer::start().await;
    let mut bs = server.bytestream();
    let large = text(1, (3 << 20) + 5); // file-backed
    let small = text(2, 3000); // inline
    for data in [&large, &small] {
        let packed = zstd(data);
        let name = compressed_write_name("", &digest(data));
        let requests = compressed_write_requests(&name, &packed, 0, 10_000, true);
        // A finished compressed write answers the offset after its last
        // message: the compressed bytes sent.
        assert_eq!(write(&mut bs, requests).await.unwrap(), packed.len() as i64);

        let (plain, _) = read_blob(&mut bs, &read_name("", &digest(data)), 0, 0)
            .await
            .unwrap();
        assert!(plain == *data, "plain read of a compressed upload differs");
        let zname = compressed_read_name("", &digest(data));
        let (wire, chunks) = read_blob(&mut bs, &zname, 0, 0).await.unwrap();
        assert!(wire.len() < data.len() / 2, "{} bytes sent", wire.len());
        assert!(chunks.iter().all(|&c| c <= MAX_READ_CHUNK), "{chunks:?}");
        assert!(unzstd(&wire) == *data, "compressed read differs");

        let size = data.len() as i64;
        for offset in [1, size / 2, size - 1, size] {
            let (wire, _) = read_blob(&mut bs, &zname, offset, 0).await.unwrap();
            assert!(
                unzstd(&wire) == data[offset as usize..],
                "compressed read from {offset} of {size}"
            );
        }
        assert_code(
            read_blob(&mut bs, &zname, size + 1, 0).await,
            Code::OutOfRange,
        );
        assert_code(read_blob(&mut bs, &zname, -1, 0).await, Code::OutOfRange);
        assert_code(
            read_blob(&mut bs, &zname, 0, 1).await,
            Code::InvalidArgument,
        );
        assert_code(
            read_blob(&mut bs, &zname, 0, -1).await,
            Code::InvalidArgument,
        );
    }
    let absent = digest(&text(3, 100));
    assert_code(
        read_blob(&mut bs, &compressed_read_name("", &absent), 0, 0).await,
        Code::NotFound,
    );
    // Two uploads and the twelve successful reads above.
    assert_eq!(metric(&server, COUNTER).await, 2 + 2 * 5);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_blob_serves_both_forms_and_either_upload_completes_early() {
    let server = TestServer::start().await;
    let (mut cas, mut bs) = (server.cas(), server.bytestream());
    let plain_in = text(4, 200_000);
    let zstd_in = text(5, 200_000);
    upload(&mut bs, "", &plain_in, 64 << 10).await.unwrap();
    upload_compressed(&mut bs, &zstd_in, 64 << 10)
        .await
        .unwrap();
    // Plain upload, compressed read; compressed upload, plain reads.
    let (wire, _) = read_blob(&mut bs, &compressed_read_name("", &digest(&plain_in)), 0, 0)
        .await
        .unwrap();
    assert!(unzstd(&wire) == plain_in);
    assert_eq!(
        read_digest(&mut bs, &digest(&zstd_in)).await.unwrap(),
        digest(&zstd_in)
    );
    // Under a multi-segment instance name too.
    let name = compressed_write_name("ci/linux", &digest(&zstd_in));
    let requests = compressed_write_requests(&name, &zstd(&zstd_in), 0, 4096, true);
    write(&mut bs, requests).await.unwrap();
    let zname = compressed_read_name("ci/linux", &digest(&zstd_in));
    assert!(
        zname.starts_with("ci/linux/compressed-blobs/zstd/"),
        "{zname}"
    );
    let (wire, _) = read_blob(&mut bs, &zname, 0, 0).await.unwrap();
    assert!(unzstd(&wire) == zstd_in);
    let got = batch_read_compressed(&mut cas, &[digest(&zstd_in)], &[])
        .await
        .unwrap();
    assert!(got[0] == (Code::Ok, 0, zstd_in.clone()));

    // Early completion: -1 for a compressed upload, the size for a plain one.
    for data in [&plain_in, &zstd_in] {
        let name = compressed_write_name("", &digest(data));
        let first = compressed_write_requests(&name, &zstd(data), 0, 1000, true);
        assert_eq!(write(&mut bs, first[..1].to_vec()).await.unwrap(), -1);
        assert_eq!(
            upload(&mut bs, "", data, 1000).await.unwrap(),
            data.len() as i64
        );
        assert_eq!(
            write_status(&mut bs, &name).await.unwrap(),
            (data.len() as i64, true)
        );
    }
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_interrupted_compressed_upload_resumes_at_its_uncompressed_size() {
    let server = TestServer::start().await;
    let mut bs = server.bytestream();
    let data = text(6, 2 << 20);
    // Two frames, as a client that compresses in pieces sends them; the
    // client goes away in the middle of the second. The store may resume
    // at the end of the first frame (it keeps the compressed bytes) or at
    // the last byte it decoded: anywhere from there to the end.
    let first_frame = zstd(&data[..1 << 20]);
    let mut packed = first_frame.clone();
    packed.extend_from_slice(&zstd(&data[1 << 20..]));
    let cut = first_frame.len() + (packed.len() - first_frame.len()) / 2;
    let name = compressed_write_name("", &digest(&data));
    let half = compressed_write_requests(&name, &packed[..cut], 0, 8192, false);
    let committed = write(&mut bs, half).await.unwrap();
    assert!(
        committed >= 1 << 20 && committed < data.len() as i64,
        "committed {committed}"
    );
    assert_eq!(
        write_status(&mut bs, &name).await.unwrap(),
        (committed, false)
    );

    // Resuming at any other offset fails and leaves the upload parked.
    let rest = zstd(&data[committed as usize..]);
    for wrong in [committed - 1, committed + 1, cut as i64] {
        let requests = compressed_write_requests(&name, &rest, wrong, 8192, true);
        assert_code(write(&mut bs, requests).await, Code::InvalidArgument);
    }
    assert_eq!(
        write_status(&mut bs, &name).await.unwrap(),
        (committed, false)
    );

    // The rest as a new frame from the uncompressed offset.
    let requests = compressed_write_requests(&name, &rest, committed, 8192, true);
    assert_eq!(
        write(&mut bs, requests).await.unwrap(),
        committed + rest.len() as i64
    );
    assert_eq!(
        read_digest(&mut bs, &digest(&data)).await.unwrap(),
        digest(&data)
    );
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_compressed_uploads_are_refused_and_nothing_is_stored() {
    let server = TestServer::start().await;
    let mut bs = server.bytestream();
    let data = text(7, 300_000);
    let d = digest(&data);
    let packed = zstd(&data);
    let other = zstd(&text(8, 300_000));
    let mut flipped = packed.clone();
    let mid = flipped.len() / 2;
    flipped[mid] ^= 0x55;
    let bomb = zstd(&vec![0u8; 64 << 20]);
    let bomb_digest = digest(&vec![0u8; 1 << 20]);
    let cases: Vec<(&str, re::Digest, Vec<u8>)> = vec![
        ("not zstd", d.clone(), data.clone()),
        ("corrupt", d.clone(), flipped),
        ("another blob", d.clone(), other),
        ("truncated", d.clone(), packed[..packed.len() - 10].to_vec()),
        ("empty", d.clone(), Vec::new()),
        ("a bomb", bomb_digest.clone(), bomb.clone()),
    ];
    for (what, d, body) in &cases {
        let name = compressed_write_name("", d);
        let requests = compressed_write_requests(&name, body, 0, 16 << 10, true);
        let result = write(&mut bs, requests).await;
        assert_eq!(
            result.map_err(|s| s.code()),
            Err(Code::InvalidArgument),
            "{what}"
        );
        let entry =
            batch_update_compressed(&mut server.cas(), vec![(d.clone(), body.clone(), ZSTD)])
                .await
                .unwrap();
        assert_eq!(entry, vec![Code::InvalidArgument], "batch: {what}");
    }
    // A whole-stream write of plain offsets is refused too.
    let name = compressed_write_name("", &d);
    let mut requests = compressed_write_requests(&name, &packed, 0, 1000, true);
    for (i, r) in requests.iter_mut().enumerate() {
        r.write_offset = (i * 4000) as i64;
    }
    assert_code(write(&mut bs, requests).await, Code::InvalidArgument);
    server.assert_nothing_stored().await;
    server.assert_still_serves().await;
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compressed_batch_entries_round_trip() {
    let server = TestServer::start_with(|c| c.max_batch_total_size_bytes = 1 << 20).await;
    let mut cas = server.cas();
    let texty = text(9, 100_000);
    let random = blob(10, 50_000); // does not compress
    let tiny = text(11, 40);
    let entries = vec![
        (digest(&texty), zstd(&texty), ZSTD),
        (digest(&random), random.clone(), 0),
        (digest(&tiny), zstd(&tiny), ZSTD),
    ];
    let codes = batch_update_compressed(&mut cas, entries).await.unwrap();
    assert_eq!(codes, vec![Code::Ok; 3]);
    assert_eq!(metric(&server, COUNTER).await, 2);
    let all = [digest(&texty), digest(&random), digest(&tiny)];
    assert_eq!(find_missing(&mut cas, &all).await, vec![]);

    // Accepting zstd: only what it shrinks comes compressed.
    let got = batch_read_compressed(&mut cas, &all, &[ZSTD])
        .await
        .unwrap();
    assert_eq!(got[0].0, Code::Ok);
    assert_eq!(got[0].1, ZSTD);
    assert!(got[0].2.len() < texty.len() / 2);
    assert!(unzstd(&got[0].2) == texty);
    assert!(got[1] == (Code::Ok, 0, random.clone()));
    assert!(got[2] == (Code::Ok, 0, tiny.clone()));
    // Not accepting it (or only unknown ones): plain.
    for acceptable in [vec![], vec![0], vec![2, 99]] {
        let got = batch_read_compressed(&mut cas, &all[..1], &acceptable)
            .await
            .unwrap();
        assert!(got[0] == (Code::Ok, 0, texty.clone()), "{acceptable:?}");
    }

    // The batch limit counts blobs' uncompressed sizes.
    let big = text(12, (1 << 20) + 1);
    let packed = zstd(&big);
    assert!(packed.len() < 100_000);
    let over = batch_update_compressed(&mut cas, vec![(digest(&big), packed, ZSTD)]).await;
    assert_code(over, Code::InvalidArgument);
    // An unserved compressor fails its entry only.
    let codes = batch_update_compressed(
        &mut cas,
        vec![
            (digest(&big[..100]), big[..100].to_vec(), 2),
            (digest(&tiny), zstd(&tiny), ZSTD),
        ],
    )
    .await
    .unwrap();
    assert_eq!(codes, vec![Code::InvalidArgument, Code::Ok]);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn through_the_proxy_compressed_clients_reach_a_plain_upstream() {
    let fake = fake_upstream::FakeUpstream::start().await;
    let server = start_proxy(&fake, |u| u.write_mode = WriteMode::Through, |_| {}).await;
    let caps = server
        .capabilities()
        .get_capabilities(re::GetCapabilitiesRequest::default())
        .await
        .unwrap()
        .into_inner()
        .cache_capabilities
        .unwrap();
    assert_eq!(caps.supported_compressors, vec![ZSTD]);
    assert_eq!(caps.supported_batch_update_compressors, vec![ZSTD]);

    let mut bs = server.bytestream();
    // A compressed upload reaches the upstream whole and verified.
    let up = text(13, 500_000);
    let packed = zstd(&up);
    assert_eq!(
        upload_compressed(&mut bs, &up, 32 << 10).await.unwrap(),
        packed.len() as i64
    );
    assert_eq!(fake.blob(&digest(&up)).as_deref(), Some(&up[..]));
    // A blob only the upstream holds is read compressed, from an offset.
    let down = text(14, 700_000);
    let d = fake.put_blob(down.clone());
    let (wire, _) = read_blob(&mut bs, &compressed_read_name("", &d), 1000, 0)
        .await
        .unwrap();
    assert!(unzstd(&wire) == down[1000..]);
    let got = batch_read_compressed(&mut server.cas(), &[d], &[ZSTD])
        .await
        .unwrap();
    assert_eq!((got[0].0, got[0].1), (Code::Ok, ZSTD));
    assert!(unzstd(&got[0].2) == down);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_write_back_mode_compressed_uploads_are_queued_and_bad_ones_never_leave() {
    let fake = fake_upstream::FakeUpstream::start().await;
    let server = start_proxy(&fake, |u| u.write_mode = WriteMode::Back, |_| {}).await;
    let (mut cas, mut bs) = (server.cas(), server.bytestream());
    let streamed = text(15, 400_000);
    let batched = text(16, 20_000);
    upload_compressed(&mut bs, &streamed, 16 << 10)
        .await
        .unwrap();
    let entry = vec![(digest(&batched), zstd(&batched), ZSTD)];
    let codes = batch_update_compressed(&mut cas, entry).await.unwrap();
    assert_eq!(codes, vec![Code::Ok]);
    // Bad ones: refused at the edge, so nothing is queued for them.
    let mismatch = text(17, 400_000);
    let name = compressed_write_name("", &digest(&mismatch));
    let requests = compressed_write_requests(&name, &zstd(&streamed), 0, 16 << 10, true);
    assert_code(write(&mut bs, requests).await, Code::InvalidArgument);
    let bomb = vec![(digest(&vec![0u8; 1000]), zstd(&vec![0u8; 1 << 20]), ZSTD)];
    let codes = batch_update_compressed(&mut cas, bomb).await.unwrap();
    assert_eq!(codes, vec![Code::InvalidArgument]);

    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    for data in [&streamed, &batched] {
        while !fake.has_blob(&digest(data)) {
            assert!(std::time::Instant::now() < deadline, "never uploaded");
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        assert_eq!(fake.blob(&digest(data)).as_deref(), Some(&data[..]));
    }
    assert!(!fake.has_blob(&digest(&mismatch)));
    assert!(!fake.has_blob(&digest(&vec![0u8; 1000])));
    server.stop().await;
}
