//! Malformed and out-of-bounds requests: each gets the exact gRPC code,
//! nothing is stored, and the server keeps serving.

use tonic::Code;

use crate::common::*;

/// A digest function Outpost does not serve.
const VSO: i32 = re::digest_function::Value::Vso as i32;

/// Ways a digest can be malformed, for a blob `data`.
fn malformed_digests(data: &[u8]) -> Vec<(&'static str, re::Digest)> {
    let good = digest(data);
    let size = good.size_bytes;
    vec![
        (
            "non-hex",
            raw_digest(&format!("{}zz", &good.hash[..62]), size),
        ),
        ("too short", raw_digest(&good.hash[..63], size)),
        ("too long", raw_digest(&format!("{}0", good.hash), size)),
        ("empty hash", raw_digest("", size)),
        ("upper-case", raw_digest(&good.hash.to_uppercase(), size)),
        ("negative size", raw_digest(&good.hash, -1)),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_digests_are_invalid_arguments_everywhere() {
    let server = TestServer::start().await;
    let (mut cas, mut bs, mut ac) = (server.cas(), server.bytestream(), server.action_cache());
    let data = blob(1, 100);
    for (what, bad) in malformed_digests(&data) {
        let find = cas
            .find_missing_blobs(re::FindMissingBlobsRequest {
                blob_digests: vec![digest(&data), bad.clone()],
                ..Default::default()
            })
            .await;
        assert_eq!(
            find.map_err(|s| s.code()).err(),
            Some(Code::InvalidArgument),
            "{what}"
        );

        // Batch calls fail only the bad entry.
        let entries = vec![(bad.clone(), data.clone())];
        assert_eq!(
            batch_update_raw(&mut cas, "", entries).await.unwrap(),
            vec![Code::InvalidArgument],
            "{what}"
        );
        let read = cas
            .batch_read_blobs(re::BatchReadBlobsRequest {
                digests: vec![bad.clone()],
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(read.responses.len(), 1);
        assert_eq!(
            entry_code(&read.responses[0].status),
            Code::InvalidArgument,
            "{what}"
        );
        assert_eq!(read.responses[0].data, b"");

        // ByteStream (when the hash fits in a resource name at all).
        if !bad.hash.is_empty() {
            let name = read_name("", &bad);
            assert_code(read_blob(&mut bs, &name, 0, 0).await, Code::InvalidArgument);
            let upload = write_requests(&write_name("", &bad), &data, 0, 1000, true);
            assert_code(write(&mut bs, upload).await, Code::InvalidArgument);
        }

        // GetTree and the action cache.
        let tree = cas
            .get_tree(re::GetTreeRequest {
                root_digest: Some(bad.clone()),
                ..Default::default()
            })
            .await;
        assert_eq!(
            tree.map_err(|s| s.code()).err(),
            Some(Code::InvalidArgument),
            "{what}"
        );
        let get = ac
            .get_action_result(re::GetActionResultRequest {
                action_digest: Some(bad.clone()),
                ..Default::default()
            })
            .await;
        assert_code(get, Code::InvalidArgument);
        let result = re::ActionResult {
            output_files: vec![re::OutputFile {
                path: "out".into(),
                digest: Some(bad.clone()),
                ..Default::default()
            }],
            ..Default::default()
        };
        for (action, result) in [
            (Some(bad.clone()), re::ActionResult::default()),
            (Some(digest(b"action")), result),
            (None, re::ActionResult::default()),
        ] {
            let update = ac
                .update_action_result(re::UpdateActionResultRequest {
                    action_digest: action,
                    action_result: Some(result),
                    ..Default::default()
                })
                .await;
            assert_code(update, Code::InvalidArgument);
        }
    }
    // A digest-less entry and a result-less update are refused too.
    let update = ac
        .update_action_result(re::UpdateActionResultRequest {
            action_digest: Some(digest(b"action")),
            ..Default::default()
        })
        .await;
    assert_code(update, Code::InvalidArgument);
    server.assert_nothing_stored().await;
    server.assert_still_serves().await;
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batch_update_with_wrong_size_or_hash_stores_nothing() {
    let server = TestServer::start().await;
    let mut cas = server.cas();
    for len in [100, 200_000] {
        let data = blob(len as u64, len);
        let d = digest(&data);
        let entries = vec![
            (raw_digest(&d.hash, d.size_bytes + 1), data.clone()),
            (raw_digest(&d.hash, d.size_bytes - 1), data.clone()),
            (digest(&blob(7, len)), data.clone()),
            (d.clone(), data[..len - 1].to_vec()),
        ];
        assert_eq!(
            batch_update_raw(&mut cas, "", entries).await.unwrap(),
            vec![Code::InvalidArgument; 4]
        );
    }
    assert_eq!(stats(&server).await.digest_mismatches, 8);
    server.assert_nothing_stored().await;
    server.assert_still_serves().await;
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bytestream_write_with_wrong_size_or_hash_stores_nothing() {
    let server = TestServer::start().await;
    let mut bs = server.bytestream();
    for len in [1000, 3 << 20] {
        let data = blob(len as u64, len);
        let d = digest(&data);
        let cases = [
            (
                "more data than the size",
                raw_digest(&d.hash, d.size_bytes - 1),
                data.clone(),
            ),
            (
                "less data than the size",
                raw_digest(&d.hash, d.size_bytes + 1),
                data.clone(),
            ),
            ("hash of other data", digest(&blob(9, len)), data.clone()),
            ("truncated data", d.clone(), data[..len / 2].to_vec()),
        ];
        for (what, claimed, sent) in cases {
            let name = write_name("", &claimed);
            let result = write(&mut bs, write_requests(&name, &sent, 0, 256 << 10, true)).await;
            assert_code(result, Code::InvalidArgument);
            // A refused upload is not kept for resumption either.
            let query = bs
                .query_write_status(bs::QueryWriteStatusRequest {
                    resource_name: name,
                })
                .await;
            assert_eq!(
                query.map_err(|s| s.code()).err(),
                Some(Code::NotFound),
                "{what}"
            );
        }
    }
    assert_eq!(stats(&server).await.digest_mismatches, 8);
    server.assert_nothing_stored().await;
    server.assert_still_serves().await;
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn read_offsets_and_limits_out_of_range_are_refused() {
    let server = TestServer::start().await;
    let mut bs = server.bytestream();
    let data = blob(1, 5000);
    upload(&mut bs, "", &data, 1000).await.unwrap();
    let name = read_name("", &digest(&data));
    assert_code(read_blob(&mut bs, &name, 5001, 0).await, Code::OutOfRange);
    assert_code(
        read_blob(&mut bs, &name, i64::MAX, 0).await,
        Code::OutOfRange,
    );
    assert_code(read_blob(&mut bs, &name, -1, 0).await, Code::OutOfRange);
    assert_code(
        read_blob(&mut bs, &name, i64::MIN, 10).await,
        Code::OutOfRange,
    );
    assert_code(
        read_blob(&mut bs, &name, 0, -5).await,
        Code::InvalidArgument,
    );
    // The server still serves the blob.
    assert_eq!(
        read_blob(&mut bs, &name, 4990, i64::MAX).await.unwrap().0,
        data[4990..]
    );
    assert_eq!(stats(&server).await.blob_count, 1);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batches_over_max_batch_total_size_bytes_are_refused() {
    const LIMIT: usize = 64 << 10;
    let server = TestServer::start_with(|c| c.max_batch_total_size_bytes = LIMIT as u64).await;
    let mut cas = server.cas();
    let halves = [blob(1, LIMIT / 2), blob(2, LIMIT / 2)];
    let over = [blob(3, LIMIT / 2), blob(4, LIMIT / 2 + 1)];

    let refused = cas
        .batch_update_blobs(re::BatchUpdateBlobsRequest {
            requests: over
                .iter()
                .map(|b| re::batch_update_blobs_request::Request {
                    digest: Some(digest(b)),
                    data: b.clone(),
                    compressor: 0,
                })
                .collect(),
            ..Default::default()
        })
        .await;
    assert_code(refused, Code::InvalidArgument);
    server.assert_nothing_stored().await;

    // Exactly at the limit is fine.
    assert_eq!(
        batch_update(&mut cas, "", &[&halves[0], &halves[1]]).await,
        vec![Code::Ok, Code::Ok]
    );
    let read = |digests: Vec<re::Digest>| re::BatchReadBlobsRequest {
        digests,
        ..Default::default()
    };
    let both = vec![digest(&halves[0]), digest(&halves[1])];
    let ok = cas
        .batch_read_blobs(read(both.clone()))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(ok.responses.len(), 2);
    assert!(
        ok.responses
            .iter()
            .all(|r| entry_code(&r.status) == Code::Ok)
    );
    // Requesting more than the limit is refused, even for blobs not present.
    let mut too_much = both;
    too_much.push(raw_digest(EMPTY_HASH.replace('e', "f").as_str(), 1));
    assert_code(
        cas.batch_read_blobs(read(too_much)).await,
        Code::InvalidArgument,
    );
    let absent_big = vec![digest(&blob(5, LIMIT + 1))];
    assert_code(
        cas.batch_read_blobs(read(absent_big)).await,
        Code::InvalidArgument,
    );

    let s = stats(&server).await;
    assert_eq!((s.blob_count, s.blobs_written), (2, 2));
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unsupported_digest_functions_are_refused() {
    let server = TestServer::start().await;
    let (mut cas, mut ac) = (server.cas(), server.action_cache());
    let data = blob(1, 100);
    let d = digest(&data);
    // Hashes that do not fit a served function: digest_functions.rs.
    for function in [VSO, 999, -1] {
        let find = cas
            .find_missing_blobs(re::FindMissingBlobsRequest {
                blob_digests: vec![d.clone()],
                digest_function: function,
                ..Default::default()
            })
            .await;
        assert_code(find, Code::InvalidArgument);
        let update = cas
            .batch_update_blobs(re::BatchUpdateBlobsRequest {
                requests: vec![re::batch_update_blobs_request::Request {
                    digest: Some(d.clone()),
                    data: data.clone(),
                    compressor: 0,
                }],
                digest_function: function,
                ..Default::default()
            })
            .await;
        assert_code(update, Code::InvalidArgument);
        let read = cas
            .batch_read_blobs(re::BatchReadBlobsRequest {
                digests: vec![d.clone()],
                digest_function: function,
                ..Default::default()
            })
            .await;
        assert_code(read, Code::InvalidArgument);
        let tree = cas
            .get_tree(re::GetTreeRequest {
                root_digest: Some(d.clone()),
                digest_function: function,
                ..Default::default()
            })
            .await;
        assert_eq!(
            tree.map_err(|s| s.code()).err(),
            Some(Code::InvalidArgument)
        );
        let get = ac
            .get_action_result(re::GetActionResultRequest {
                action_digest: Some(d.clone()),
                digest_function: function,
                ..Default::default()
            })
            .await;
        assert_code(get, Code::InvalidArgument);
        let put = ac
            .update_action_result(re::UpdateActionResultRequest {
                action_digest: Some(d.clone()),
                action_result: Some(re::ActionResult::default()),
                digest_function: function,
                ..Default::default()
            })
            .await;
        assert_code(put, Code::InvalidArgument);
    }
    server.assert_nothing_stored().await;
    // SHA256 spelled out, and UNKNOWN (pre-2.1 clients), both work.
    for function in [re::digest_function::Value::Sha256 as i32, 0] {
        let find = cas
            .find_missing_blobs(re::FindMissingBlobsRequest {
                blob_digests: vec![d.clone()],
                digest_function: function,
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(find.missing_blob_digests, vec![d.clone()]);
    }
    server.assert_still_serves().await;
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_resource_names_are_invalid_arguments() {
    let server = TestServer::start().await;
    let mut bs = server.bytestream();
    let data = blob(1, 100);
    let d = digest(&data);
    let (h, n) = (d.hash.as_str(), d.size_bytes);
    let reads = [
        format!("{h}/{n}"),
        format!("instance/{h}/{n}"),
        format!("blobs/{h}"),
        format!("blobs/{h}/{n}/extra"),
        format!("actions/blobs/{h}/{n}"),
        format!("a/operations/blobs/{h}/{n}"),
        format!("capabilities/blobs/{h}/{n}"),
        format!("a//blobs/{h}/{n}"),
        format!("blobs/{h}/ten"),
        format!("blobs/{h}/-{n}"),
        format!("blobs/{h}/{n}0000000000000000000000"),
        format!("blobs/vso/{h}/{n}"),
        format!("blobs/sha1/{h}/{n}"),
        format!("blobs/blake3/{}/{n}", &h[..40]),
        format!("uploads/u/blobs/{h}/{n}"),
        String::new(),
    ];
    for name in &reads {
        let result = read_blob(&mut bs, name, 0, 0).await;
        assert_eq!(
            result.map_err(|s| s.code()).err(),
            Some(Code::InvalidArgument),
            "{name}"
        );
    }
    let writes = [
        format!("blobs/{h}/{n}"),
        format!("uploads/blobs/{h}/{n}"),
        format!("uploads//blobs/{h}/{n}"),
        format!("actions/uploads/u/blobs/{h}/{n}"),
        format!("uploads/u/{h}/{n}"),
        format!("uploads/u/blobs/{h}/ten"),
        format!("uploads/u/blobs/{h}/-1"),
        format!("uploads/u/blobs/vso/{h}/{n}"),
        format!("uploads/u/blobs/{}/{n}", h.to_uppercase()),
        String::new(),
    ];
    for name in &writes {
        let result = write(&mut bs, write_requests(name, &data, 0, 100, true)).await;
        assert_eq!(
            result.map_err(|s| s.code()).err(),
            Some(Code::InvalidArgument),
            "{name}"
        );
        let query = bs
            .query_write_status(bs::QueryWriteStatusRequest {
                resource_name: name.clone(),
            })
            .await;
        assert_eq!(
            query.map_err(|s| s.code()).err(),
            Some(Code::InvalidArgument),
            "{name}"
        );
    }
    // The resource name must not change in the middle of a stream.
    let mut switched = write_requests(&write_name("", &d), &data, 0, 10, true);
    switched[3].resource_name = write_name("", &d);
    assert_code(write(&mut bs, switched).await, Code::InvalidArgument);
    server.assert_nothing_stored().await;
    server.assert_still_serves().await;
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unserved_compressors_are_unimplemented() {
    let server = TestServer::start().await;
    let (mut cas, mut bs) = (server.cas(), server.bytestream());
    let data = blob(1, 100);
    let d = digest(&data);
    upload(&mut bs, "", &data, 100).await.unwrap();
    let (h, n) = (d.hash.as_str(), d.size_bytes);
    for name in [
        format!("compressed-blobs/brotli/{h}/{n}"),
        format!("a/b/compressed-blobs/deflate/{h}/{n}"),
    ] {
        assert_code(read_blob(&mut bs, &name, 0, 0).await, Code::Unimplemented);
    }
    let other = blob(2, 100);
    let od = digest(&other);
    let name = format!(
        "uploads/u/compressed-blobs/deflate/{}/{}",
        od.hash, od.size_bytes
    );
    assert_code(
        write(&mut bs, write_requests(&name, &other, 0, 100, true)).await,
        Code::Unimplemented,
    );
    // An entry with an unserved compressor fails that entry only.
    let resp = cas
        .batch_update_blobs(re::BatchUpdateBlobsRequest {
            requests: vec![
                re::batch_update_blobs_request::Request {
                    digest: Some(od.clone()),
                    data: other.clone(),
                    compressor: re::compressor::Value::Deflate as i32,
                },
                re::batch_update_blobs_request::Request {
                    digest: Some(d.clone()),
                    data: data.clone(),
                    compressor: 0,
                },
            ],
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let codes: Vec<Code> = resp
        .responses
        .iter()
        .map(|r| entry_code(&r.status))
        .collect();
    assert_eq!(codes, vec![Code::InvalidArgument, Code::Ok]);
    assert_eq!(
        find_missing(&mut cas, std::slice::from_ref(&od)).await,
        vec![od]
    );
    assert_eq!(stats(&server).await.blob_count, 1);
    server.stop().await;
}
