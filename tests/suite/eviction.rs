//! LRU eviction under the byte quota.

use tonic::Code;

use crate::common::*;

const QUOTA: u64 = 1 << 20;
const INLINE_LIMIT: u64 = 100 << 10;

/// Blob `i`: even ones are exactly the inline limit (RocksDB values), odd
/// ones one byte more (files).
fn nth(i: u64) -> Vec<u8> {
    blob(100 + i, (INLINE_LIMIT + i % 2) as usize)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn least_recently_used_blobs_are_evicted_first() {
    let server = TestServer::start_with(|c| {
        c.quota_bytes = QUOTA;
        c.inline_limit = INLINE_LIMIT;
    })
    .await;
    let (mut cas, mut bs) = (server.cas(), server.bytestream());
    // Ten blobs (1_024_005 bytes) fit in the 1_048_576-byte quota.
    for i in 0..10 {
        assert_eq!(batch_update(&mut cas, "", &[&nth(i)]).await, vec![Code::Ok]);
    }
    let s = stats(&server).await;
    assert_eq!(
        (s.blob_count, s.blob_bytes, s.evicted_blobs),
        (10, 1_024_005, 0)
    );
    assert_eq!(list_files(&server.data_dir().join("blobs")).len(), 5);

    // Reading blob 0 makes it the most recently used.
    let (got, _) = read_blob(&mut bs, &read_name("", &digest(&nth(0))), 0, 0)
        .await
        .unwrap();
    assert!(got == nth(0));

    // Each further blob evicts exactly one: 1, 2, 3 in LRU order, not 0.
    for i in 10..13 {
        if i % 2 == 0 {
            assert_eq!(batch_update(&mut cas, "", &[&nth(i)]).await, vec![Code::Ok]);
        } else {
            upload(&mut bs, "", &nth(i), 64 << 10).await.unwrap();
        }
    }
    let all: Vec<re::Digest> = (0..13).map(|i| digest(&nth(i))).collect();
    assert_eq!(find_missing(&mut cas, &all).await, all[1..4].to_vec());
    for evicted in &all[1..4] {
        assert_code(
            read_blob(&mut bs, &read_name("", evicted), 0, 0).await,
            Code::NotFound,
        );
    }
    for i in [0, 4, 5, 9, 12] {
        assert_eq!(read_digest(&mut bs, &all[i]).await.unwrap(), all[i]);
    }

    let s = stats(&server).await;
    assert_eq!(
        (s.evicted_blobs, s.evicted_bytes),
        (3, 102_401 + 102_400 + 102_401)
    );
    assert_eq!((s.blob_count, s.blob_bytes), (10, 1_024_004));
    assert!(s.blob_bytes <= s.quota_bytes);
    assert_eq!(s.quota_bytes, QUOTA);
    // Evicted files are deleted: 5, 7, 9 and 11 remain.
    assert_eq!(list_files(&server.data_dir().join("blobs")).len(), 4);

    // The same state after a restart.
    let server = server.restart().await;
    let mut cas = server.cas();
    assert_eq!(find_missing(&mut cas, &all).await, all[1..4].to_vec());
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn uploading_blobs_that_are_already_stored_evicts_nothing() {
    let server = TestServer::start_with(|c| {
        c.quota_bytes = QUOTA;
        c.inline_limit = INLINE_LIMIT;
    })
    .await;
    let (mut cas, mut ac) = (server.cas(), server.action_cache());
    for i in 0..10 {
        assert_eq!(batch_update(&mut cas, "", &[&nth(i)]).await, vec![Code::Ok]);
    }
    // The store is full. Uploading present blobs again, inline or
    // file-backed, alone or together, must not push anything else out.
    for again in [vec![nth(4)], vec![nth(5)], (3..9).map(nth).collect()] {
        let blobs: Vec<&[u8]> = again.iter().map(|b| b.as_slice()).collect();
        assert_eq!(
            batch_update(&mut cas, "", &blobs).await,
            vec![Code::Ok; again.len()]
        );
    }
    upload(&mut server.bytestream(), "", &nth(7), 64 << 10)
        .await
        .unwrap();
    // Nor does an action result whose inlined output is already stored.
    let result = re::ActionResult {
        stdout_raw: nth(2),
        ..Default::default()
    };
    ac.update_action_result(re::UpdateActionResultRequest {
        action_digest: Some(digest(b"repeated output")),
        action_result: Some(result),
        ..Default::default()
    })
    .await
    .unwrap();

    let all: Vec<re::Digest> = (0..10).map(|i| digest(&nth(i))).collect();
    assert_eq!(find_missing(&mut cas, &all).await, vec![]);
    let s = stats(&server).await;
    assert_eq!(
        (s.evicted_blobs, s.blob_count, s.blobs_written),
        (0, 10, 10)
    );
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn action_results_whose_outputs_were_evicted_are_not_found() {
    let server = TestServer::start_with(|c| c.quota_bytes = QUOTA).await;
    let (mut cas, mut ac) = (server.cas(), server.action_cache());
    let output = blob(1, 100 << 10);
    assert_eq!(batch_update(&mut cas, "", &[&output]).await, vec![Code::Ok]);
    for i in 0..8 {
        assert_eq!(
            batch_update(&mut cas, "", &[&blob(10 + i, 100 << 10)]).await,
            vec![Code::Ok]
        );
    }
    let action = digest(b"action with an evictable output");
    let result = re::ActionResult {
        output_files: vec![re::OutputFile {
            path: "out/o".into(),
            digest: Some(digest(&output)),
            ..Default::default()
        }],
        ..Default::default()
    };
    ac.update_action_result(re::UpdateActionResultRequest {
        action_digest: Some(action.clone()),
        action_result: Some(result),
        ..Default::default()
    })
    .await
    .unwrap();
    assert_eq!(stats(&server).await.action_result_count, 1);

    // Two more blobs: the output, least recently used, is the one evicted.
    for i in 8..10 {
        assert_eq!(
            batch_update(&mut cas, "", &[&blob(10 + i, 100 << 10)]).await,
            vec![Code::Ok]
        );
    }
    let s = stats(&server).await;
    assert_eq!((s.evicted_blobs, s.action_result_count), (1, 1));
    assert_eq!(
        find_missing(&mut cas, &[digest(&output)]).await,
        vec![digest(&output)]
    );

    let get = re::GetActionResultRequest {
        action_digest: Some(action),
        ..Default::default()
    };
    assert_code(ac.get_action_result(get.clone()).await, Code::NotFound);
    let s = stats(&server).await;
    assert_eq!((s.stale_action_results, s.action_result_count), (1, 0));
    assert_code(ac.get_action_result(get).await, Code::NotFound);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_blob_larger_than_the_quota_is_refused_without_evicting() {
    let server = TestServer::start_with(|c| c.quota_bytes = QUOTA).await;
    let (mut cas, mut bs) = (server.cas(), server.bytestream());
    let kept = blob(1, 1000);
    assert_eq!(batch_update(&mut cas, "", &[&kept]).await, vec![Code::Ok]);
    let too_big = blob(2, QUOTA as usize + 1);
    assert_code(
        upload(&mut bs, "", &too_big, 256 << 10).await,
        Code::ResourceExhausted,
    );
    let s = stats(&server).await;
    assert_eq!((s.blob_count, s.evicted_blobs), (1, 0));
    assert_eq!(list_files(&server.data_dir().join("tmp")).len(), 0);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_blob_being_read_is_not_evicted() {
    // Larger than the client's HTTP/2 window, so that the server cannot
    // finish sending it before the client reads.
    const SIZE: usize = 48 << 20;
    let server = TestServer::start_with(|c| c.quota_bytes = 64 << 20).await;
    let mut bs = server.bytestream();
    let (first, second) = (blob(1, SIZE), blob(2, SIZE));
    upload(&mut bs, "", &first, 1 << 20).await.unwrap();

    let mut reading = bs
        .read(bs::ReadRequest {
            resource_name: read_name("", &digest(&first)),
            read_offset: 0,
            read_limit: 0,
        })
        .await
        .unwrap()
        .into_inner();
    let mut got = reading.message().await.unwrap().expect("first chunk").data;

    // Making room would mean evicting the blob being read: refused.
    assert_code(
        upload(&mut bs, "", &second, 1 << 20).await,
        Code::ResourceExhausted,
    );
    while let Some(resp) = reading.message().await.unwrap() {
        got.extend_from_slice(&resp.data);
    }
    assert!(
        got == first,
        "the blob read during the eviction attempt is intact"
    );
    drop(reading);

    // Once the read is over, the blob can go. (The server drops its end of
    // the stream a moment after the client saw the last message.)
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        match upload(&mut bs, "", &second, 1 << 20).await {
            Ok(n) => {
                assert_eq!(n, SIZE as i64);
                break;
            }
            Err(status) if status.code() == Code::ResourceExhausted => {
                assert!(
                    std::time::Instant::now() < deadline,
                    "still refused: {status}"
                );
                tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            }
            Err(status) => panic!("unexpected: {status}"),
        }
    }
    let all = [digest(&first), digest(&second)];
    assert_eq!(
        find_missing(&mut server.cas(), &all).await,
        vec![all[0].clone()]
    );
    assert_eq!(stats(&server).await.evicted_blobs, 1);
    server.stop().await;
}
