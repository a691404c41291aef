//! Hostile input at the wire: huge resource names, request bodies that do
//! not decode, data after `finish_write`, and unserved compressors. Each
//! gets a short client-error status (never INTERNAL, UNKNOWN or
//! UNAVAILABLE), nothing is stored, and the server keeps serving.

use bytes::Bytes;
use outpost_testkit::raw;
use prost::Message as _;
use tonic::{Code, Status};

use crate::common::*;

const WRITE: &str = "/google.bytestream.ByteStream/Write";
const READ: &str = "/google.bytestream.ByteStream/Read";
const FIND_MISSING: &str =
    "/build.bazel.remote.execution.v2.ContentAddressableStorage/FindMissingBlobs";
const GET_ACTION_RESULT: &str = "/build.bazel.remote.execution.v2.ActionCache/GetActionResult";

/// Longest message a client-error status may carry here (the server clips
/// echoed strings to 200 characters).
const SHORT: usize = 1024;

/// Bytes no protobuf message decodes from (a varint that never ends).
fn garbage() -> Bytes {
    Bytes::from(vec![0xff; 16])
}

fn assert_short(result: Result<impl std::fmt::Debug, Status>, code: Code, what: &str) {
    match result {
        Ok(v) => panic!("{what}: expected {code:?}, got Ok({v:?})"),
        Err(status) => {
            assert_eq!(status.code(), code, "{what}: {status:?}");
            assert!(
                status.message().len() < SHORT,
                "{what}: a {}-byte message",
                status.message().len()
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn huge_resource_names_get_a_short_invalid_argument() {
    let server = TestServer::start().await;
    let mut bs = server.bytestream();
    let data = blob(1, 100);
    let d = digest(&data);
    let huge = "a".repeat(10_000);
    let bad_read = format!("blobs/{huge}/1234");
    let bad_write = format!("uploads/u/blobs/{huge}/1234");
    for name in [&bad_read, &bad_write] {
        assert_short(
            read_blob(&mut bs, name, 0, 0).await,
            Code::InvalidArgument,
            "Read",
        );
        let upload = write_requests(name, &data, 0, 100, true);
        assert_short(write(&mut bs, upload).await, Code::InvalidArgument, "Write");
        let query = bs
            .query_write_status(bs::QueryWriteStatusRequest {
                resource_name: name.clone(),
            })
            .await;
        assert_short(query, Code::InvalidArgument, "QueryWriteStatus");
    }
    // A well-formed name may be long too (instance name, trailing metadata):
    // the messages that echo it stay short.
    let long_write = format!("{}/{huge}", write_name("", &d));
    let resumed = write_requests(&long_write, &data, 10, 100, true);
    assert_short(
        write(&mut bs, resumed).await,
        Code::InvalidArgument,
        "Write at a wrong offset",
    );
    let mut switched = write_requests(&long_write, &data, 0, 10, true);
    switched[3].resource_name = format!("{}/{huge}", write_name("", &d));
    assert_short(
        write(&mut bs, switched).await,
        Code::InvalidArgument,
        "Write whose name changes",
    );
    let query = bs
        .query_write_status(bs::QueryWriteStatusRequest {
            resource_name: long_write.clone(),
        })
        .await;
    assert_short(query, Code::NotFound, "QueryWriteStatus of no upload");
    let get = server
        .action_cache()
        .get_action_result(re::GetActionResultRequest {
            instance_name: huge.clone(),
            action_digest: Some(d.clone()),
            ..Default::default()
        })
        .await;
    assert_short(get, Code::NotFound, "GetActionResult in a huge instance");
    server.assert_nothing_stored().await;
    server.assert_still_serves().await;
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_bodies_that_do_not_decode_are_invalid_arguments() {
    let server = TestServer::start().await;
    let data = blob(2, 100);
    let d = digest(&data);
    let first = bs::WriteRequest {
        resource_name: write_name("", &d),
        write_offset: 0,
        finish_write: false,
        data: data[..50].to_vec(),
    };
    let first = Bytes::from(first.encode_to_vec());
    let find = re::FindMissingBlobsRequest {
        blob_digests: vec![d.clone()],
        ..Default::default()
    }
    .encode_to_vec();
    let truncated = Bytes::copy_from_slice(&find[..find.len() - 5]);
    let cases: Vec<(&str, &str, Vec<Bytes>)> = vec![
        ("unary garbage", FIND_MISSING, vec![garbage()]),
        ("unary truncated", FIND_MISSING, vec![truncated]),
        ("unary without a message", GET_ACTION_RESULT, vec![]),
        ("Read garbage", READ, vec![garbage()]),
        ("Write garbage first", WRITE, vec![garbage()]),
        ("Write garbage after data", WRITE, vec![first, garbage()]),
    ];
    for (what, path, messages) in cases {
        let result = raw::call(server.channel(), path, messages).await;
        assert_short(result, Code::InvalidArgument, what);
    }
    // The Write that broke on garbage left nothing to resume.
    let query = server
        .bytestream()
        .query_write_status(bs::QueryWriteStatusRequest {
            resource_name: write_name("", &d),
        })
        .await;
    assert_code(query, Code::NotFound);
    server.assert_nothing_stored().await;
    server.assert_still_serves().await;
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_after_finish_write_fail_and_store_nothing() {
    let server = TestServer::start().await;
    let mut bs = server.bytestream();
    for (i, size) in [(0u64, 100usize), (1, 2 << 20)] {
        let data = blob(10 + i, size);
        let d = digest(&data);
        let finished = || write_requests(&write_name("", &d), &data, 0, 64 << 10, true);
        // More data after finish_write.
        let mut shape = finished();
        shape.push(bs::WriteRequest {
            resource_name: String::new(),
            write_offset: size as i64,
            finish_write: false,
            data: b"more".to_vec(),
        });
        let result = write(&mut bs, shape).await;
        assert_short(result, Code::InvalidArgument, "data after finish_write");
        // A second finish_write.
        let mut shape = finished();
        shape.push(bs::WriteRequest {
            resource_name: String::new(),
            write_offset: size as i64,
            finish_write: true,
            data: Vec::new(),
        });
        let result = write(&mut bs, shape).await;
        assert_short(result, Code::InvalidArgument, "a second finish_write");
        assert_eq!(
            find_missing(&mut server.cas(), std::slice::from_ref(&d)).await,
            vec![d.clone()],
            "the failed Write committed nothing"
        );
    }
    server.assert_nothing_stored().await;
    server.assert_still_serves().await;
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unserved_compressor_gets_one_answer_from_read_write_and_query() {
    let server = TestServer::start().await;
    let mut bs = server.bytestream();
    let data = blob(3, 100);
    let d = digest(&data);
    // The blob exists: QueryWriteStatus must not call the upload complete.
    upload(&mut bs, "", &data, 100).await.unwrap();
    let (h, n) = (d.hash.as_str(), d.size_bytes);
    let read = format!("compressed-blobs/deflate/{h}/{n}");
    let upload_name = format!("uploads/u/compressed-blobs/brotli/{h}/{n}");
    assert_code(read_blob(&mut bs, &read, 0, 0).await, Code::Unimplemented);
    let writes = write_requests(&upload_name, &data, 0, 100, true);
    assert_code(write(&mut bs, writes).await, Code::Unimplemented);
    let query = bs
        .query_write_status(bs::QueryWriteStatusRequest {
            resource_name: upload_name,
        })
        .await;
    assert_code(query, Code::Unimplemented);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_log_write_that_does_not_decode_is_an_invalid_argument() {
    let fake = fake_upstream::FakeUpstream::start().await;
    let server = start_proxy(&fake, |_| {}, |_| {}).await;
    let log = create_log_stream(&mut server.logstreams(), "projects/p1/instances/a")
        .await
        .expect("CreateLogStream through Outpost");
    let first = bs::WriteRequest {
        resource_name: log.write_resource_name.clone(),
        write_offset: 0,
        finish_write: false,
        data: b"hello".to_vec(),
    };
    let messages = vec![Bytes::from(first.encode_to_vec()), garbage()];
    let result = raw::call(server.channel(), WRITE, messages).await;
    assert_short(result, Code::InvalidArgument, "log Write with garbage");
    server.stop().await;
}
