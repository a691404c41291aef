//! ByteStream: Read, Write, QueryWriteStatus.

use std::time::Duration;

use tonic::Code;

use crate::common::*;

/// The largest ReadResponse the server sends (it documents 64 KiB).
const MAX_READ_CHUNK: usize = 64 << 10;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn read_honours_offset_and_limit_in_bounded_chunks() {
    let server = TestServer::start().await;
    let mut bs = server.bytestream();
    let large = blob(1, (3 << 20) + 17); // file-backed
    let small = blob(2, 1000); // inline
    assert_eq!(
        upload(&mut bs, "", &large, 1 << 20).await.unwrap(),
        large.len() as i64
    );
    assert_eq!(
        batch_update(&mut server.cas(), "", &[&small]).await,
        vec![Code::Ok]
    );

    for data in [&large, &small] {
        let name = read_name("", &digest(data));
        let size = data.len() as i64;
        let (whole, chunks) = read_blob(&mut bs, &name, 0, 0).await.unwrap();
        assert!(whole == *data, "whole read of {size} bytes differs");
        assert!(
            chunks.iter().all(|&c| c > 0 && c <= MAX_READ_CHUNK),
            "{chunks:?}"
        );
        if size > MAX_READ_CHUNK as i64 {
            assert!(chunks.len() >= (size as usize).div_ceil(MAX_READ_CHUNK));
        }
        // (offset, limit) -> expected slice.
        let cases = [
            (0, 1, 0..1),
            (7, 100, 7..107),
            (size / 2, 0, size / 2..size),
            (size - 10, 1000, size - 10..size), // limit past the end
            (size - 1, 0, size - 1..size),
            (size, 0, size..size), // offset == size: empty, not an error
        ];
        for (offset, limit, range) in cases {
            let (got, _) = read_blob(&mut bs, &name, offset, limit).await.unwrap();
            let want = &data[range.start as usize..range.end as usize];
            assert!(
                got == want,
                "size {size}, offset {offset}, limit {limit}: wrong bytes"
            );
        }
        assert_code(
            read_blob(&mut bs, &name, size + 1, 0).await,
            Code::OutOfRange,
        );
        assert_code(read_blob(&mut bs, &name, -1, 0).await, Code::OutOfRange);
        assert_code(
            read_blob(&mut bs, &name, 0, -1).await,
            Code::InvalidArgument,
        );
    }
    // A 1 MiB+ range crossing the server's read blocks.
    let (got, _) = read_blob(
        &mut bs,
        &read_name("", &digest(&large)),
        (1 << 20) - 3,
        (1 << 20) + 6,
    )
    .await
    .unwrap();
    assert!(got == large[(1 << 20) - 3..(2 << 20) + 3]);

    let absent = digest(&blob(3, 10));
    assert_code(
        read_blob(&mut bs, &read_name("", &absent), 0, 0).await,
        Code::NotFound,
    );
    let absent_large = digest(&blob(4, 2 << 20));
    assert_code(
        read_blob(&mut bs, &read_name("", &absent_large), 0, 0).await,
        Code::NotFound,
    );
    // The empty blob is always readable.
    assert_eq!(
        read_blob(&mut bs, &read_name("", &digest(b"")), 0, 0)
            .await
            .unwrap()
            .0,
        b""
    );
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn write_stores_small_and_large_blobs_sent_in_chunks() {
    let server = TestServer::start().await;
    let mut bs = server.bytestream();
    let small = blob(1, 5000);
    let large = blob(2, 8 << 20);
    assert_eq!(upload(&mut bs, "", &small, 1024).await.unwrap(), 5000);
    assert_eq!(upload(&mut bs, "", &large, 1 << 20).await.unwrap(), 8 << 20);
    // The empty blob can be written too (and needs no data message).
    assert_eq!(upload(&mut bs, "", b"", 1).await.unwrap(), 0);

    assert_eq!(
        find_missing(&mut server.cas(), &[digest(&small), digest(&large)]).await,
        vec![]
    );
    for data in [&small, &large] {
        assert_eq!(
            read_digest(&mut bs, &digest(data)).await.unwrap(),
            digest(data)
        );
    }
    let s = stats(&server).await;
    assert_eq!((s.blob_count, s.blob_bytes), (2, 5000 + (8 << 20)));
    // The large blob is a file; nothing is left in tmp/.
    assert_eq!(list_files(&server.data_dir().join("blobs")).len(), 1);
    assert_eq!(list_files(&server.data_dir().join("tmp")).len(), 0);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn write_of_an_existing_blob_completes_before_all_data_is_sent() {
    let server = TestServer::start().await;
    let mut bs = server.bytestream();
    for data in [blob(1, 4 << 20), blob(2, 100)] {
        let size = data.len() as i64;
        assert_eq!(upload(&mut bs, "", &data, 1 << 20).await.unwrap(), size);

        // Send only the first piece and keep the stream open: the server must
        // answer at once rather than wait for the rest.
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        let name = write_name("", &digest(&data));
        let first = write_requests(&name, &data, 0, data.len() / 2, false).remove(0);
        tx.send(first).await.unwrap();
        let call = bs.write(tokio_stream::wrappers::ReceiverStream::new(rx));
        let resp = tokio::time::timeout(Duration::from_secs(10), call)
            .await
            .expect("the server answers before the stream ends")
            .unwrap()
            .into_inner();
        assert_eq!(resp.committed_size, size);
        drop(tx);
    }
    assert_eq!(stats(&server).await.blobs_written, 2);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn interrupted_write_can_be_queried_and_resumed() {
    let server = TestServer::start().await;
    let mut bs = server.bytestream();
    for data in [blob(1, 3 << 20), blob(2, 10_000)] {
        let d = digest(&data);
        let half = data.len() / 2;
        let name = write_name("inst", &d);

        // Send the first half and close the stream without finish_write.
        let first = write_requests(&name, &data[..half], 0, 64 << 10, false);
        assert_eq!(write(&mut bs, first).await.unwrap(), half as i64);
        assert_eq!(
            write_status(&mut bs, &name).await.unwrap(),
            (half as i64, false)
        );
        assert_eq!(
            find_missing(&mut server.cas(), std::slice::from_ref(&d)).await,
            vec![d.clone()]
        );

        // Resuming at the wrong offset is refused and keeps the upload.
        let wrong = write_requests(&name, &data, half + 1, 64 << 10, true);
        assert_code(write(&mut bs, wrong).await, Code::InvalidArgument);
        assert_eq!(
            write_status(&mut bs, &name).await.unwrap(),
            (half as i64, false)
        );

        // Resume from the committed size and finish.
        let rest = write_requests(&name, &data, half, 64 << 10, true);
        assert_eq!(write(&mut bs, rest).await.unwrap(), data.len() as i64);
        assert_eq!(
            write_status(&mut bs, &name).await.unwrap(),
            (data.len() as i64, true)
        );
        assert_eq!(read_digest(&mut bs, &d).await.unwrap(), d);
    }

    // Nobody ever started this upload.
    let unknown = write_name("inst", &digest(&blob(3, 10)));
    assert_code(
        bs.query_write_status(bs::QueryWriteStatusRequest {
            resource_name: unknown,
        })
        .await,
        Code::NotFound,
    );
    // Any upload name for a blob that is present reports it complete.
    let present = write_name("", &digest(&blob(2, 10_000)));
    let status = bs
        .query_write_status(bs::QueryWriteStatusRequest {
            resource_name: present,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!((status.committed_size, status.complete), (10_000, true));
    assert_eq!(list_files(&server.data_dir().join("tmp")).len(), 0);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn write_with_a_wrong_write_offset_is_refused() {
    let server = TestServer::start().await;
    let mut bs = server.bytestream();
    for data in [blob(1, 2 << 20), blob(2, 1000)] {
        let d = digest(&data);
        // A fresh upload must start at 0.
        let name = write_name("", &d);
        let late_start = write_requests(&name, &data, 10, 1 << 20, true);
        assert_code(write(&mut bs, late_start).await, Code::InvalidArgument);
        // A gap mid-stream.
        let mut gap = write_requests(&write_name("", &d), &data, 0, 300, true);
        gap[1].write_offset += 1;
        assert_code(write(&mut bs, gap).await, Code::InvalidArgument);
        // A repeat of an earlier piece.
        let mut repeat = write_requests(&write_name("", &d), &data, 0, 300, true);
        repeat[2].write_offset = 0;
        assert_code(write(&mut bs, repeat).await, Code::InvalidArgument);
        // A negative offset.
        let mut negative = write_requests(&write_name("", &d), &data, 0, 1 << 20, true);
        negative[0].write_offset = -1;
        assert_code(write(&mut bs, negative).await, Code::InvalidArgument);
    }
    server.assert_nothing_stored().await;
    server.assert_still_serves().await;
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resource_names_may_carry_multi_segment_instances_and_metadata() {
    let server = TestServer::start().await;
    let mut bs = server.bytestream();
    let data = blob(1, 2 << 20);
    let d = digest(&data);
    let name = format!("{}/some/metadata", write_name("a/b/c", &d));
    assert_eq!(
        write(&mut bs, write_requests(&name, &data, 0, 1 << 20, true))
            .await
            .unwrap(),
        d.size_bytes
    );
    let (got, _) = read_blob(&mut bs, &read_name("a/b/c", &d), 0, 0)
        .await
        .unwrap();
    assert!(got == data);
    // The explicit digest-function segment is accepted for SHA-256.
    let explicit = format!("a/b/c/blobs/sha256/{}/{}", d.hash, d.size_bytes);
    let (got, _) = read_blob(&mut bs, &explicit, 5, 10).await.unwrap();
    assert_eq!(got, data[5..15]);

    let small = blob(2, 300);
    let sd = digest(&small);
    let name = write_name("x/y-z", &sd);
    assert_eq!(
        write(&mut bs, write_requests(&name, &small, 0, 100, true))
            .await
            .unwrap(),
        300
    );
    let (got, _) = read_blob(&mut bs, &read_name("x/y-z", &sd), 0, 0)
        .await
        .unwrap();
    assert_eq!(got, small);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_uploads_of_the_same_blob_store_it_once() {
    let server = TestServer::start().await;
    for data in [blob(1, 3 << 20), blob(2, 50_000)] {
        let mut calls = tokio::task::JoinSet::new();
        for _ in 0..8 {
            let (mut bs, data) = (server.bytestream(), data.clone());
            calls.spawn(async move { upload(&mut bs, "", &data, 128 << 10).await });
        }
        while let Some(result) = calls.join_next().await {
            assert_eq!(result.unwrap().unwrap(), data.len() as i64);
        }
        assert_eq!(
            read_digest(&mut server.bytestream(), &digest(&data))
                .await
                .unwrap(),
            digest(&data)
        );
    }
    let s = stats(&server).await;
    assert_eq!((s.blob_count, s.blobs_written), (2, 2));
    assert_eq!(s.blob_bytes, (3 << 20) + 50_000);
    assert_eq!(list_files(&server.data_dir().join("blobs")).len(), 1);
    assert_eq!(list_files(&server.data_dir().join("tmp")).len(), 0);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancelled_write_can_be_resumed() {
    let server = TestServer::start().await;
    let mut bs = server.bytestream();
    let data = blob(1, 3 << 20);
    let d = digest(&data);
    let name = write_name("", &d);
    let half = data.len() / 2;
    let query = || bs::QueryWriteStatusRequest {
        resource_name: name.clone(),
    };

    // Send half, then drop the call as a client whose connection broke would.
    let (tx, rx) = tokio::sync::mpsc::channel(1);
    let mut first = write_requests(&name, &data[..half], 0, half, false);
    tx.send(first.remove(0)).await.unwrap();
    let mut call_bs = server.bytestream();
    let call = tokio::spawn(async move {
        call_bs
            .write(tokio_stream::wrappers::ReceiverStream::new(rx))
            .await
    });
    // The server has the first half once its temp file does.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !list_files(&server.data_dir().join("tmp"))
        .iter()
        .any(|f| std::fs::metadata(f).is_ok_and(|m| m.len() == half as u64))
    {
        assert!(
            std::time::Instant::now() < deadline,
            "the first half never arrived"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    call.abort();
    assert!(call.await.unwrap_err().is_cancelled());
    drop(tx);

    // The server keeps what it received for a resume.
    let status = loop {
        match bs.query_write_status(query()).await {
            Ok(status) => break status.into_inner(),
            Err(status) if status.code() == Code::NotFound => {
                assert!(
                    std::time::Instant::now() < deadline,
                    "upload not kept: {status}"
                );
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            Err(status) => panic!("unexpected: {status}"),
        }
    };
    assert_eq!(
        (status.committed_size, status.complete),
        (half as i64, false)
    );
    let rest = write_requests(&name, &data, half, 256 << 10, true);
    assert_eq!(write(&mut bs, rest).await.unwrap(), data.len() as i64);
    assert_eq!(read_digest(&mut bs, &d).await.unwrap(), d);
    server.stop().await;
}
