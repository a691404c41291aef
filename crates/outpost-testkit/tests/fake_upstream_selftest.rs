//! Self-tests of the test kit's fake REAPI upstream (`outpost_testkit::fake`):
//! it must store and verify like a real server, count what it sees, and
//! inject latency, errors and outages on demand; its Execution and
//! Operations services (`outpost_testkit::fake::execution`) must run actions
//! deterministically, report missing inputs, and break, fail and cancel
//! streams on demand. Talks to it over gRPC with the plain
//! `bazel-remote-apis` clients.

use std::time::{Duration, Instant};

use std::collections::BTreeSet;

use bazel_remote_apis::google::longrunning as lr;
use outpost_testkit::client::{
    ActionCache, ByteStream, Capabilities as Caps, Cas, Clients, drain, read_name,
    write_requests as write_reqs,
};
use outpost_testkit::fake::{
    EXECUTE_METADATA_TYPE, EXECUTE_RESPONSE_TYPE, ErrorDelivery, FakeUpstream, Method, NetMode,
    PRECONDITION_FAILURE_TYPE, PreconditionFailure, REQUEST_METADATA_HEADER, StreamEnd, TestAction,
    digest_of, missing_digests, missing_digests_of, operation_metadata, operation_response,
    operation_stage, output_content, status_details, stdio_content,
};
use outpost_testkit::{blob, bs, re};
use prost::Message;
use re::execution_stage::Value as Stage;
use tonic::Code;
use tonic::metadata::MetadataValue;
use tonic::transport::Channel;

fn read_req(instance: &str, d: &re::Digest, offset: i64) -> bs::ReadRequest {
    bs::ReadRequest {
        resource_name: read_name(instance, d),
        read_offset: offset,
        read_limit: 0,
    }
}

async fn read_all(bs: &mut ByteStream, req: bs::ReadRequest) -> Result<Vec<u8>, tonic::Status> {
    let mut stream = bs.read(req).await?.into_inner();
    let mut out = Vec::new();
    while let Some(msg) = stream.message().await? {
        out.extend_from_slice(&msg.data);
    }
    Ok(out)
}

async fn find_missing(
    cas: &mut Cas,
    instance: &str,
    digests: &[re::Digest],
) -> Result<Vec<re::Digest>, tonic::Status> {
    Ok(cas
        .find_missing_blobs(re::FindMissingBlobsRequest {
            instance_name: instance.to_string(),
            blob_digests: digests.to_vec(),
            digest_function: 0,
        })
        .await?
        .into_inner()
        .missing_blob_digests)
}

#[tokio::test]
async fn stores_serves_and_counts() {
    let up = FakeUpstream::start().await;
    let ch = up.channel().await;
    let big = blob(1, 300_000);
    let d_big = up.put_blob(big.clone());
    let small: Vec<Vec<u8>> = (0..5).map(|i| blob(10 + i, 100)).collect();
    let absent = digest_of(b"nobody stored this");

    // FindMissingBlobs: only the absent one; the empty blob is never missing.
    let mut c = ch.cas();
    let asked = vec![d_big.clone(), absent.clone(), digest_of(b"")];
    assert_eq!(
        find_missing(&mut c, "", &asked).await.unwrap(),
        vec![absent.clone()]
    );

    // BatchUpdateBlobs verifies each entry: one good, one with a wrong hash.
    let mut wrong = digest_of(&small[1]);
    wrong.hash = digest_of(b"x").hash;
    let resp = c
        .batch_update_blobs(re::BatchUpdateBlobsRequest {
            instance_name: String::new(),
            requests: vec![
                re::batch_update_blobs_request::Request {
                    digest: Some(digest_of(&small[0])),
                    data: small[0].clone(),
                    compressor: 0,
                },
                re::batch_update_blobs_request::Request {
                    digest: Some(wrong.clone()),
                    data: small[1].clone(),
                    compressor: 0,
                },
            ],
            digest_function: 0,
        })
        .await
        .unwrap()
        .into_inner();
    let codes: Vec<i32> = resp
        .responses
        .iter()
        .map(|r| r.status.as_ref().unwrap().code)
        .collect();
    assert_eq!(codes, vec![Code::Ok as i32, Code::InvalidArgument as i32]);
    assert!(up.has_blob(&digest_of(&small[0])));
    assert!(!up.has_blob(&wrong));

    // BatchReadBlobs: per-entry NOT_FOUND.
    let resp = c
        .batch_read_blobs(re::BatchReadBlobsRequest {
            instance_name: String::new(),
            digests: vec![digest_of(&small[0]), absent.clone()],
            acceptable_compressors: vec![],
            digest_function: 0,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(resp.responses[0].data, small[0]);
    assert_eq!(
        resp.responses[1].status.as_ref().unwrap().code,
        Code::NotFound as i32
    );

    // ByteStream Read, whole and from an offset.
    let mut b = ch.bytestream();
    assert_eq!(
        read_all(&mut b, read_req("", &d_big, 0)).await.unwrap(),
        big
    );
    assert_eq!(
        read_all(&mut b, read_req("", &d_big, 1000)).await.unwrap(),
        big[1000..]
    );
    let err = read_all(&mut b, read_req("", &absent, 0))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);

    // Counts, digests per call, payload bytes.
    assert_eq!(up.count(Method::FindMissingBlobs), 1);
    assert_eq!(up.digests_per_call(Method::FindMissingBlobs), vec![3]);
    assert_eq!(up.digests_per_call(Method::BatchUpdateBlobs), vec![2]);
    assert_eq!(up.digests_per_call(Method::BatchReadBlobs), vec![2]);
    assert_eq!(up.count(Method::Read), 3);
    assert_eq!(up.fetches_of(&d_big), 2);
    assert_eq!(up.bytes_received_by(Method::BatchUpdateBlobs), 200);
    assert_eq!(up.bytes_sent_by(Method::BatchReadBlobs), 100);
    assert_eq!(up.bytes_sent_by(Method::Read), 300_000 + 299_000);
    assert!(up.tcp_bytes_sent() > 599_000, "{}", up.summary());
    assert_eq!(up.total_calls(), 6);
    let codes: Vec<Option<Code>> = up.calls_of(Method::Read).iter().map(|c| c.code).collect();
    assert_eq!(
        codes,
        vec![Some(Code::Ok), Some(Code::Ok), Some(Code::NotFound)]
    );

    up.reset_stats();
    assert_eq!(up.total_calls(), 0);
    assert_eq!(up.bytes_sent(), 0);
    assert_eq!(up.tcp_bytes_sent(), 0);
    assert!(up.has_blob(&d_big), "reset_stats keeps the store");
}

#[tokio::test]
async fn bytestream_write_verifies_and_resumes() {
    let up = FakeUpstream::start().await;
    let ch = up.channel().await;
    let mut b = ch.bytestream();
    let data = blob(2, 200_000);
    let d = digest_of(&data);
    let name = format!(
        "team/linux/uploads/0000-1111/blobs/{}/{}",
        d.hash, d.size_bytes
    );

    // A wrong size in the resource name: refused, nothing stored.
    let bad = format!("uploads/x/blobs/{}/{}", d.hash, d.size_bytes + 1);
    let err = b
        .write(futures::stream::iter(write_reqs(
            &bad, &data, 0, 65536, true,
        )))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(!up.has_blob(&d));

    // The stream breaks after 100 000 bytes; QueryWriteStatus tells where to go on.
    up.abort_next_stream(Method::Write, 100_000, Code::Unavailable);
    let err = b
        .write(futures::stream::iter(write_reqs(
            &name, &data, 0, 30_000, true,
        )))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unavailable);
    assert_eq!(up.partial_upload(&name), Some(100_000));
    let status = b
        .query_write_status(bs::QueryWriteStatusRequest {
            resource_name: name.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!((status.committed_size, status.complete), (100_000, false));
    let committed = b
        .write(futures::stream::iter(write_reqs(
            &name, &data, 100_000, 30_000, true,
        )))
        .await
        .unwrap()
        .into_inner()
        .committed_size;
    assert_eq!(committed, data.len() as i64);
    assert_eq!(up.blob(&d).unwrap(), data);
    let writes = up.calls_of(Method::Write);
    assert_eq!(writes.len(), 3);
    assert_eq!(writes[1].instance_name, "team/linux");
    assert!(writes[1].injected);
    assert_eq!(writes[1].bytes_received + writes[2].bytes_received, 200_000);

    // Writing a blob that exists completes at once.
    let committed = b
        .write(futures::stream::iter(write_reqs(
            &name, &data, 0, 30_000, true,
        )))
        .await
        .unwrap()
        .into_inner()
        .committed_size;
    assert_eq!(committed, data.len() as i64);
}

#[tokio::test]
async fn records_headers_and_instance_names() {
    let up = FakeUpstream::start().await;
    let ch = up.channel().await;
    let meta = re::RequestMetadata {
        tool_details: Some(re::ToolDetails {
            tool_name: "bazel".into(),
            tool_version: "4.2.3".into(),
        }),
        action_id: "a1".into(),
        tool_invocation_id: "inv-7".into(),
        ..Default::default()
    };
    let mut req = tonic::Request::new(re::FindMissingBlobsRequest {
        instance_name: "team/linux".into(),
        blob_digests: vec![digest_of(b"a")],
        digest_function: 0,
    });
    req.metadata_mut()
        .insert("authorization", "Bearer s3cret".parse().unwrap());
    req.metadata_mut().insert_bin(
        REQUEST_METADATA_HEADER,
        MetadataValue::from_bytes(&meta.encode_to_vec()),
    );
    ch.cas().find_missing_blobs(req).await.unwrap();

    let call = up.last_call(Method::FindMissingBlobs).unwrap();
    assert_eq!(call.instance_name, "team/linux");
    assert_eq!(
        call.header("authorization").as_deref(),
        Some("Bearer s3cret")
    );
    assert_eq!(call.request_metadata(), Some(meta));
    let mut r = ch.bytestream();
    let _ = read_all(&mut r, read_req("other/inst", &digest_of(b"a"), 0)).await;
    assert_eq!(
        up.instance_names().into_iter().collect::<Vec<_>>(),
        vec!["other/inst".to_string(), "team/linux".to_string()]
    );
}

#[tokio::test]
async fn injects_errors_and_latency() {
    let up = FakeUpstream::start().await;
    let ch = up.channel().await;
    let mut c = ch.cas();
    let d = [digest_of(b"q")];

    up.fail_next(2, Code::Unavailable);
    for _ in 0..2 {
        assert_eq!(
            find_missing(&mut c, "", &d).await.unwrap_err().code(),
            Code::Unavailable
        );
    }
    assert!(find_missing(&mut c, "", &d).await.is_ok());

    up.fail_method(Method::GetActionResult, Code::Internal);
    let mut ac = ActionCache::new(ch.clone());
    for _ in 0..3 {
        let err = ac
            .get_action_result(re::GetActionResultRequest {
                action_digest: Some(d[0].clone()),
                ..Default::default()
            })
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::Internal);
    }
    assert!(
        find_missing(&mut c, "", &d).await.is_ok(),
        "other methods unaffected"
    );
    up.clear_faults();
    let err = ac
        .get_action_result(re::GetActionResultRequest {
            action_digest: Some(d[0].clone()),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    let injected = up.calls().iter().filter(|c| c.injected).count();
    assert_eq!(injected, 5);

    up.set_latency(Duration::from_millis(150));
    let t = Instant::now();
    find_missing(&mut c, "", &d).await.unwrap();
    let slow = t.elapsed();
    up.set_method_latency(Method::FindMissingBlobs, Some(Duration::ZERO));
    let t = Instant::now();
    find_missing(&mut c, "", &d).await.unwrap();
    let fast = t.elapsed();
    assert!(slow >= Duration::from_millis(150), "{slow:?}");
    assert!(fast < Duration::from_millis(100), "{fast:?}");

    // A Read that breaks mid-stream after exactly 100 000 bytes.
    up.set_latency(Duration::ZERO);
    let data = blob(3, 300_000);
    let dd = up.put_blob(data.clone());
    up.abort_next_stream(Method::Read, 100_000, Code::Unavailable);
    let mut stream = ch
        .bytestream()
        .read(read_req("", &dd, 0))
        .await
        .unwrap()
        .into_inner();
    let mut got = 0;
    let err = loop {
        match stream.message().await {
            Ok(Some(m)) => got += m.data.len(),
            Ok(None) => panic!("stream should break"),
            Err(e) => break e,
        }
    };
    assert_eq!((got, err.code()), (100_000, Code::Unavailable));
    assert_eq!(up.last_call(Method::Read).unwrap().bytes_sent, 100_000);
}

#[tokio::test]
async fn goes_down_and_comes_back_on_the_same_port() {
    let up = FakeUpstream::start().await;
    let ch = up.channel().await;
    let mut c = ch.cas();
    let d = [digest_of(b"z")];
    find_missing(&mut c, "", &d).await.unwrap();
    let addr = up.addr();

    // Down: a call in flight fails, new connections are refused.
    up.set_latency(Duration::from_millis(300));
    let in_flight = tokio::spawn({
        let mut c = c.clone();
        let d = d.clone();
        async move { find_missing(&mut c, "", &d).await }
    });
    assert!(
        up.wait_for_calls(Method::FindMissingBlobs, 2, Duration::from_secs(5))
            .await
    );
    up.go_down().await;
    assert_eq!(up.net_mode(), NetMode::Refusing);
    // tonic reports a connection that breaks mid-call as UNKNOWN ("transport
    // error"), not UNAVAILABLE: a proxy's retry logic has to allow for both.
    let err = in_flight.await.unwrap().unwrap_err();
    assert!(
        matches!(err.code(), Code::Unavailable | Code::Unknown),
        "{err:?}"
    );
    let refused = tokio::net::TcpStream::connect(addr).await.unwrap_err();
    assert_eq!(refused.kind(), std::io::ErrorKind::ConnectionRefused);
    assert_eq!(
        find_missing(&mut c, "", &d).await.unwrap_err().code(),
        Code::Unavailable
    );

    // Up again on the same port: the same channel recovers.
    up.set_latency(Duration::ZERO);
    up.come_up().await;
    assert_eq!(up.addr(), addr);
    let mut ok = false;
    for _ in 0..50 {
        if find_missing(&mut c, "", &d).await.is_ok() {
            ok = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(ok, "the channel did not recover after come_up");

    // Dropped connections: the next calls reconnect.
    let before = up.connections_accepted();
    up.drop_connections();
    let mut ok = false;
    for _ in 0..50 {
        if find_missing(&mut c, "", &d).await.is_ok() {
            ok = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(ok);
    assert!(up.connections_accepted() > before);
}

#[tokio::test]
async fn blackhole_hangs_calls_until_it_comes_up() {
    let up = FakeUpstream::start().await;
    let ch = up.channel().await;
    let mut c = ch.cas();
    let d = [digest_of(b"h")];
    find_missing(&mut c, "", &d).await.unwrap();
    up.blackhole().await;
    assert!(
        tokio::net::TcpStream::connect(up.addr()).await.is_ok(),
        "still accepts"
    );
    let hung = tokio::time::timeout(Duration::from_millis(300), find_missing(&mut c, "", &d)).await;
    assert!(hung.is_err(), "the call must hang while blackholed");
    let pending = tokio::spawn({
        let mut c = c.clone();
        let d = d.clone();
        async move { find_missing(&mut c, "", &d).await }
    });
    tokio::time::sleep(Duration::from_millis(100)).await;
    up.come_up().await;
    let resumed = tokio::time::timeout(Duration::from_secs(5), pending).await;
    assert!(resumed.expect("resumes after come_up").unwrap().is_ok());
}

#[tokio::test]
async fn pause_parks_calls_until_resumed() {
    let up = FakeUpstream::start().await;
    let ch = up.channel().await;
    let d = up.put_blob(blob(4, 1000));
    up.pause_method(Method::Read);
    let tasks: Vec<_> = (0..5)
        .map(|_| {
            let mut b = ch.bytestream();
            let d = d.clone();
            tokio::spawn(async move { read_all(&mut b, read_req("", &d, 0)).await })
        })
        .collect();
    assert!(up.wait_parked(5, Duration::from_secs(5)).await);
    // Other methods are not paused.
    find_missing(&mut ch.cas(), "", std::slice::from_ref(&d))
        .await
        .unwrap();
    assert_eq!(up.in_flight(), 5);
    up.resume();
    for t in tasks {
        assert_eq!(t.await.unwrap().unwrap().len(), 1000);
    }
    assert_eq!(up.parked(), 0);
    assert!(up.max_in_flight() >= 5);
    assert_eq!(up.fetches_of(&d), 5);
}

#[tokio::test]
async fn capabilities_are_configurable_and_enforced() {
    let up = FakeUpstream::start().await;
    let ch = up.channel().await;
    up.set_max_batch_total_size_bytes(1000);
    up.set_digest_functions(&[
        re::digest_function::Value::Sha256,
        re::digest_function::Value::Blake3,
    ]);
    let caps = Caps::new(ch.clone())
        .get_capabilities(re::GetCapabilitiesRequest {
            instance_name: "x".into(),
        })
        .await
        .unwrap()
        .into_inner();
    let cache = caps.cache_capabilities.unwrap();
    assert_eq!(cache.max_batch_total_size_bytes, 1000);
    assert_eq!(cache.digest_functions.len(), 2);
    assert_eq!(caps.low_api_version.unwrap().minor, 0);

    let big = up.put_blob(blob(5, 1500));
    let err = ch
        .cas()
        .batch_read_blobs(re::BatchReadBlobsRequest {
            digests: vec![big],
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    let err = find_missing(&mut ch.cas(), "", &[]).await;
    assert!(err.is_ok());
    let err = ch
        .cas()
        .find_missing_blobs(re::FindMissingBlobsRequest {
            digest_function: re::digest_function::Value::Sha1 as i32,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "SHA-1 is not advertised");

    up.set_action_cache_updates(false);
    let err = ActionCache::new(ch.clone())
        .update_action_result(re::UpdateActionResultRequest {
            action_digest: Some(digest_of(b"act")),
            action_result: Some(re::ActionResult::default()),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);
}

#[tokio::test]
async fn tree_and_action_cache() {
    let up = FakeUpstream::start().await;
    let ch = up.channel().await;
    let file = up.put_blob(b"hello".to_vec());
    let leaf = re::Directory {
        files: vec![re::FileNode {
            name: "f".into(),
            digest: Some(file.clone()),
            ..Default::default()
        }],
        ..Default::default()
    };
    let leaf_d = up.put_message(&leaf);
    let root = re::Directory {
        directories: vec![
            re::DirectoryNode {
                name: "a".into(),
                digest: Some(leaf_d.clone()),
            },
            re::DirectoryNode {
                name: "b".into(),
                digest: Some(leaf_d.clone()),
            },
        ],
        ..Default::default()
    };
    let root_d = up.put_message(&root);
    let mut stream = ch
        .cas()
        .get_tree(re::GetTreeRequest {
            root_digest: Some(root_d.clone()),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let mut dirs = Vec::new();
    while let Some(page) = stream.message().await.unwrap() {
        dirs.extend(page.directories);
    }
    assert_eq!(dirs, vec![root, leaf], "breadth-first, deduplicated");
    assert_eq!(up.last_call(Method::GetTree).unwrap().digests, vec![root_d]);

    let action = digest_of(b"action");
    let result = re::ActionResult {
        output_files: vec![re::OutputFile {
            path: "out/f".into(),
            digest: Some(file.clone()),
            ..Default::default()
        }],
        stdout_digest: Some(file.clone()),
        ..Default::default()
    };
    let mut ac = ActionCache::new(ch.clone());
    ac.update_action_result(re::UpdateActionResultRequest {
        instance_name: "i".into(),
        action_digest: Some(action.clone()),
        action_result: Some(result.clone()),
        ..Default::default()
    })
    .await
    .unwrap();
    assert_eq!(up.action_result("i", &action), Some(result.clone()));
    let got = ac
        .get_action_result(re::GetActionResultRequest {
            instance_name: "i".into(),
            action_digest: Some(action.clone()),
            inline_stdout: true,
            inline_output_files: vec!["out/f".into()],
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(got.stdout_raw, b"hello");
    assert_eq!(got.output_files[0].contents, b"hello");
    let other = ac
        .get_action_result(re::GetActionResultRequest {
            instance_name: "j".into(),
            action_digest: Some(action.clone()),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(other.code(), Code::NotFound, "results are per instance");

    // The chunking RPCs are counted and UNIMPLEMENTED.
    let err = ch
        .cas()
        .split_blob(re::SplitBlobRequest::default())
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unimplemented);
    assert_eq!(up.count(Method::SplitBlob), 1);
}

// ---------------------------------------------------------------- execution

type Exec = re::execution_client::ExecutionClient<Channel>;
type Ops = lr::operations_client::OperationsClient<Channel>;

fn exec(ch: &Channel) -> Exec {
    Exec::new(ch.clone()).max_decoding_message_size(64 << 20)
}

async fn execute_all(
    ch: &Channel,
    req: re::ExecuteRequest,
) -> Result<Vec<lr::Operation>, tonic::Status> {
    let stream = exec(ch).execute(req).await?.into_inner();
    let (ops, end) = drain(stream).await;
    end?;
    Ok(ops)
}

fn stages(ops: &[lr::Operation]) -> Vec<Stage> {
    ops.iter()
        .map(|o| operation_stage(o).expect("ExecuteOperationMetadata"))
        .collect()
}

fn set_of(digests: &[re::Digest]) -> BTreeSet<(String, i64)> {
    digests
        .iter()
        .map(|d| (d.hash.clone(), d.size_bytes))
        .collect()
}

#[tokio::test]
async fn execute_runs_actions_and_caches_results() {
    let up = FakeUpstream::start().await;
    assert!(
        !up.capabilities()
            .execution_capabilities
            .unwrap()
            .exec_enabled
    );
    up.set_execution_enabled(true);
    let ch = up.channel().await;
    let caps = Caps::new(ch.clone())
        .get_capabilities(re::GetCapabilitiesRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert!(caps.execution_capabilities.unwrap().exec_enabled);

    let action = TestAction::new(
        &["gen", "x"],
        &["out/a.bin", "out/dir"],
        &[("src/in.txt", b"input"), ("top.txt", b"top")],
    );
    up.put_test_action(&action);
    up.set_directory_outputs(&["out/dir"]);
    up.set_output_size("out/a.bin", 300_000);
    up.set_stdio_sizes(64, 0);

    let meta = re::RequestMetadata {
        action_id: "act-1".into(),
        tool_invocation_id: "inv-1".into(),
        ..Default::default()
    };
    let mut req = tonic::Request::new(re::ExecuteRequest {
        inline_stdout: true,
        ..action.request("main")
    });
    req.metadata_mut()
        .insert("authorization", "Bearer tok".parse().unwrap());
    req.metadata_mut().insert_bin(
        REQUEST_METADATA_HEADER,
        MetadataValue::from_bytes(&meta.encode_to_vec()),
    );
    let (ops, end) = drain(exec(&ch).execute(req).await.unwrap().into_inner()).await;
    end.unwrap();
    assert_eq!(
        stages(&ops),
        vec![Stage::Queued, Stage::Executing, Stage::Completed]
    );
    assert!(ops.iter().all(|o| o.name == "operations/1"));
    assert_eq!(
        ops.iter().map(|o| o.done).collect::<Vec<_>>(),
        vec![false, false, true]
    );
    let m = operation_metadata(&ops[1]).unwrap();
    assert_eq!(m.action_digest.as_ref(), Some(&action.digest));
    assert_eq!(m.stdout_stream_name, "operations/1/streams/stdout");
    assert_eq!(
        ops[2].metadata.as_ref().unwrap().type_url,
        EXECUTE_METADATA_TYPE
    );
    match &ops[2].result {
        Some(lr::operation::Result::Response(any)) => {
            assert_eq!(any.type_url, EXECUTE_RESPONSE_TYPE)
        }
        other => panic!("expected a response, got {other:?}"),
    }
    let resp = operation_response(&ops[2]).unwrap();
    assert!(!resp.cached_result);
    assert_eq!(resp.status.as_ref().unwrap().code, 0);
    let result = resp.result.unwrap();
    assert_eq!(result.exit_code, 0);

    // Output file: deterministic bytes, stored in the CAS.
    assert_eq!(result.output_files.len(), 1);
    let f = &result.output_files[0];
    assert_eq!(f.path, "out/a.bin");
    let want = output_content(&action.digest, "out/a.bin", 300_000);
    assert_eq!(f.digest.as_ref(), Some(&digest_of(&want)));
    assert_eq!(up.blob(f.digest.as_ref().unwrap()).unwrap(), want);
    assert!(f.contents.is_empty(), "not asked to inline");

    // Output directory: Tree blob, every Directory and file stored.
    assert_eq!(result.output_directories.len(), 1);
    let od = &result.output_directories[0];
    assert_eq!(od.path, "out/dir");
    let tree = re::Tree::decode(up.blob(od.tree_digest.as_ref().unwrap()).unwrap()).unwrap();
    let root = tree.root.unwrap();
    assert_eq!(
        od.root_directory_digest.as_ref(),
        Some(&digest_of(&root.encode_to_vec()))
    );
    assert!(up.has_blob(od.root_directory_digest.as_ref().unwrap()));
    assert_eq!(root.files[0].name, "file.bin");
    assert_eq!(
        up.blob(root.files[0].digest.as_ref().unwrap()).unwrap(),
        output_content(&action.digest, "out/dir/file.bin", 1000)
    );
    assert_eq!(root.directories[0].name, "sub");
    assert_eq!(tree.children.len(), 1);
    assert!(up.has_blob(root.directories[0].digest.as_ref().unwrap()));
    let nested = &tree.children[0].files[0];
    assert_eq!(nested.name, "nested.bin");
    assert_eq!(
        up.blob(nested.digest.as_ref().unwrap()).unwrap(),
        output_content(&action.digest, "out/dir/sub/nested.bin", 500)
    );

    // stdout inlined as asked and stored; stderr empty.
    let stdout = stdio_content(&action.digest, "stdout", 64);
    assert_eq!(result.stdout_raw, stdout);
    assert_eq!(result.stdout_digest, Some(digest_of(&stdout)));
    assert_eq!(result.stderr_digest, Some(digest_of(b"")));

    // Cached in the AC (without inlined data), under the instance name.
    let stored = up.action_result("main", &action.digest).unwrap();
    assert!(stored.stdout_raw.is_empty());
    assert_eq!(stored.output_files, result.output_files);
    assert!(up.action_result("", &action.digest).is_none());

    // Recorded: the request, its headers, its operation.
    let rec = up.last_execute_request().unwrap();
    assert_eq!(rec.request.action_digest.as_ref(), Some(&action.digest));
    assert!(rec.request.inline_stdout);
    assert_eq!(rec.operation.as_deref(), Some("operations/1"));
    assert_eq!(
        rec.headers.get("authorization").unwrap().to_str().unwrap(),
        "Bearer tok"
    );
    let call = up.last_call(Method::Execute).unwrap();
    assert_eq!(call.id, rec.call_id);
    assert_eq!(call.request_metadata(), Some(meta));
    assert_eq!(call.instance_name, "main");
    assert_eq!(call.code, Some(Code::Ok));
    assert_eq!(up.executions_started(), 1);
    assert_eq!(up.executions_completed(), 1);

    // Again: one done Operation from the cache.
    let ops = execute_all(&ch, action.request("main")).await.unwrap();
    assert_eq!(ops.len(), 1);
    assert!(ops[0].done);
    assert_eq!(ops[0].name, "operations/2");
    let resp = operation_response(&ops[0]).unwrap();
    assert!(resp.cached_result);
    assert_eq!(resp.result.unwrap().output_files, result.output_files);
    assert_eq!(up.execution_cache_hits(), 1);
    assert_eq!(up.executions_started(), 1);

    // skip_cache_lookup runs it again, with the same outputs.
    let ops = execute_all(
        &ch,
        re::ExecuteRequest {
            skip_cache_lookup: true,
            ..action.request("main")
        },
    )
    .await
    .unwrap();
    assert_eq!(ops.len(), 3);
    let again = operation_response(&ops[2]).unwrap().result.unwrap();
    assert_eq!(again.output_files, result.output_files);
    assert_eq!(again.output_directories, result.output_directories);
    assert_eq!(up.executions_started(), 2);
    assert_eq!(up.count(Method::Execute), 3);
    assert_eq!(
        up.operation_names(),
        vec!["operations/1", "operations/2", "operations/3"]
    );

    // do_not_cache: executed, not cached; a non-zero exit is not cached either.
    let nocache = action.clone().do_not_cache();
    up.put_test_action(&nocache);
    execute_all(&ch, nocache.request("main")).await.unwrap();
    assert!(up.action_result("main", &nocache.digest).is_none());
    let failing = action.clone().salted(b"fail");
    up.put_test_action(&failing);
    up.set_exit_code(3);
    let ops = execute_all(&ch, failing.request("main")).await.unwrap();
    let r = operation_response(ops.last().unwrap()).unwrap();
    assert_eq!(r.result.unwrap().exit_code, 3);
    assert!(up.action_result("main", &failing.digest).is_none());

    // reset_stats clears records and counters, not the operations.
    up.reset_stats();
    assert!(up.execute_requests().is_empty());
    assert_eq!(up.executions_started(), 0);
    assert_eq!(up.operation_names().len(), 5);
}

#[tokio::test]
async fn legacy_outputs_and_inlining() {
    let up = FakeUpstream::start().await;
    let ch = up.channel().await;
    let action = TestAction::new(&["cc"], &[], &[("a.c", b"int x;")])
        .with_legacy_outputs(&["a.o", "b.o"], &["gen"]);
    up.put_test_action(&action);
    up.set_default_output_size(10);
    up.set_directory_layout(&[("only.txt", 7)]);
    up.set_root_directory_digests(false);
    let ops = execute_all(
        &ch,
        re::ExecuteRequest {
            inline_output_files: vec!["b.o".into()],
            inline_stderr: true,
            ..action.request("")
        },
    )
    .await
    .unwrap();
    let result = operation_response(ops.last().unwrap())
        .unwrap()
        .result
        .unwrap();
    let paths: Vec<_> = result
        .output_files
        .iter()
        .map(|f| f.path.as_str())
        .collect();
    assert_eq!(paths, vec!["a.o", "b.o"]);
    assert!(result.output_files[0].contents.is_empty());
    assert_eq!(
        result.output_files[1].contents,
        output_content(&action.digest, "b.o", 10)
    );
    assert_eq!(
        result.stderr_raw,
        stdio_content(&action.digest, "stderr", 20)
    );
    let od = &result.output_directories[0];
    assert_eq!(od.path, "gen");
    assert!(od.root_directory_digest.is_none());
    let tree = re::Tree::decode(up.blob(od.tree_digest.as_ref().unwrap()).unwrap()).unwrap();
    let root = tree.root.unwrap();
    assert_eq!(root.files.len(), 1);
    assert_eq!(root.files[0].digest.as_ref().unwrap().size_bytes, 7);
    assert!(tree.children.is_empty());
    assert!(up.has_blob(&digest_of(&root.encode_to_vec())));
}

#[tokio::test]
async fn missing_inputs_are_reported_as_precondition_failures() {
    let up = FakeUpstream::start().await;
    let ch = up.channel().await;
    let action = TestAction::new(
        &["link"],
        &["out"],
        &[
            ("lib/a.a", b"aaaa"),
            ("lib/deep/b.a", b"bb"),
            ("main.o", b"main"),
        ],
    );
    let lib_dir = {
        // the Directory of lib/: its digest is what a server reports missing
        let deep = re::Directory {
            files: vec![re::FileNode {
                name: "b.a".into(),
                digest: Some(digest_of(b"bb")),
                ..Default::default()
            }],
            ..Default::default()
        };
        let lib = re::Directory {
            files: vec![re::FileNode {
                name: "a.a".into(),
                digest: Some(digest_of(b"aaaa")),
                ..Default::default()
            }],
            directories: vec![re::DirectoryNode {
                name: "deep".into(),
                digest: Some(digest_of(&deep.encode_to_vec())),
            }],
            ..Default::default()
        };
        digest_of(&lib.encode_to_vec())
    };
    assert!(action.blob_digests().contains(&lib_dir));

    // Nothing uploaded: only the Action is reported (nothing else is known).
    let err = execute_all(&ch, action.request("")).await.unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
    assert_eq!(missing_digests_of(&err), vec![action.digest.clone()]);
    let details = status_details(&err).unwrap();
    assert_eq!(details.code, Code::FailedPrecondition as i32);
    assert_eq!(details.details[0].type_url, PRECONDITION_FAILURE_TYPE);
    let pf = PreconditionFailure::decode(details.details[0].value.as_slice()).unwrap();
    assert_eq!(pf.violations[0].r#type, "MISSING");
    assert_eq!(
        pf.violations[0].subject,
        format!("blobs/{}/{}", action.digest.hash, action.digest.size_bytes)
    );
    assert_eq!(
        up.last_call(Method::Execute).unwrap().code,
        Some(Code::FailedPrecondition)
    );

    // Everything but the Command, lib/ (so nothing below it is seen) and main.o.
    for (d, data) in &action.blobs {
        if *d != action.command_digest && *d != lib_dir && *d != digest_of(b"main") {
            up.put_blob_unchecked(d, data.clone());
        }
    }
    let err = execute_all(&ch, action.request("")).await.unwrap_err();
    let want = set_of(&[
        action.command_digest.clone(),
        lib_dir.clone(),
        digest_of(b"main"),
    ]);
    assert_eq!(set_of(&missing_digests_of(&err)), want);
    assert_eq!(missing_digests_of(&err).len(), 3);

    // The same, delivered in the done Operation.
    up.set_missing_input_delivery(ErrorDelivery::ResponseStatus);
    let ops = execute_all(&ch, action.request("")).await.unwrap();
    assert_eq!(ops.len(), 1);
    assert!(ops[0].done);
    let status = operation_response(&ops[0]).unwrap().status.unwrap();
    assert_eq!(status.code, Code::FailedPrecondition as i32);
    assert_eq!(set_of(&missing_digests(&status)), want);
    up.set_missing_input_delivery(ErrorDelivery::OperationError);
    let ops = execute_all(&ch, action.request("")).await.unwrap();
    match &ops[0].result {
        Some(lr::operation::Result::Error(status)) => {
            assert_eq!(set_of(&missing_digests(status)), want)
        }
        other => panic!("expected Operation.error, got {other:?}"),
    }
    assert_eq!(up.missing_input_rejections(), 4);
    assert_eq!(up.executions_started(), 0);

    // Upload lib/ only: now its subtree is walked and deep/ is found present.
    up.put_test_action(&action);
    assert!(up.remove_blob(&digest_of(b"bb")));
    up.set_missing_input_delivery(ErrorDelivery::GrpcError);
    let err = execute_all(&ch, action.request("")).await.unwrap_err();
    assert_eq!(missing_digests_of(&err), vec![digest_of(b"bb")]);
    up.put_blob(&b"bb"[..]);
    execute_all(&ch, action.request("")).await.unwrap();
    assert_eq!(up.executions_started(), 1);
}

#[tokio::test]
async fn broken_streams_reattach_with_wait_execution() {
    let up = FakeUpstream::start().await;
    let ch = up.channel().await;
    let action = TestAction::new(&["slow"], &["o"], &[]);
    up.put_test_action(&action);
    up.set_execution_delay(Duration::from_millis(200));

    // Execute ends cleanly after QUEUED, without done.
    up.break_streams(Method::Execute, 1, 1, StreamEnd::Eof);
    let (ops, end) = drain(
        exec(&ch)
            .execute(action.request(""))
            .await
            .unwrap()
            .into_inner(),
    )
    .await;
    end.unwrap();
    assert_eq!(stages(&ops), vec![Stage::Queued]);
    let name = ops[0].name.clone();
    let call = up.last_call(Method::Execute).unwrap();
    assert!(call.injected);
    // WaitExecution: the current state, then the rest.
    let (ops, end) = drain(
        exec(&ch)
            .wait_execution(re::WaitExecutionRequest { name: name.clone() })
            .await
            .unwrap()
            .into_inner(),
    )
    .await;
    end.unwrap();
    assert_eq!(stages(&ops), vec![Stage::Executing, Stage::Completed]);
    assert!(ops.iter().all(|o| o.name == name));
    assert!(operation_response(&ops[1]).unwrap().result.is_some());
    assert_eq!(up.count(Method::WaitExecution), 1);
    assert_eq!(
        up.last_call(Method::WaitExecution).unwrap().instance_name,
        ""
    );
    // WaitExecution of a done operation: just the final state.
    let ops = drain(
        exec(&ch)
            .wait_execution(re::WaitExecutionRequest { name: name.clone() })
            .await
            .unwrap()
            .into_inner(),
    )
    .await
    .0;
    assert_eq!(ops.len(), 1);
    assert!(ops[0].done);

    // Execute breaks with UNAVAILABLE before anything; WaitExecution breaks
    // too after one message; a second WaitExecution completes.
    let again = action.clone().salted(b"2");
    up.put_test_action(&again);
    up.break_streams(Method::Execute, 1, 0, StreamEnd::Error(Code::Unavailable));
    up.break_streams(
        Method::WaitExecution,
        1,
        1,
        StreamEnd::Error(Code::Unavailable),
    );
    let (ops, end) = drain(
        exec(&ch)
            .execute(again.request(""))
            .await
            .unwrap()
            .into_inner(),
    )
    .await;
    assert!(ops.is_empty());
    assert_eq!(end.unwrap_err().code(), Code::Unavailable);
    let name = up.last_execute_request().unwrap().operation.unwrap();
    let (ops, end) = drain(
        exec(&ch)
            .wait_execution(re::WaitExecutionRequest { name: name.clone() })
            .await
            .unwrap()
            .into_inner(),
    )
    .await;
    assert_eq!(ops.len(), 1);
    assert!(!ops[0].done);
    assert_eq!(end.unwrap_err().code(), Code::Unavailable);
    let ops = drain(
        exec(&ch)
            .wait_execution(re::WaitExecutionRequest { name })
            .await
            .unwrap()
            .into_inner(),
    )
    .await
    .0;
    assert!(ops.last().unwrap().done);
    assert_eq!(up.executions_completed(), 2);

    // Names as configured.
    up.set_operation_name_prefix("main/");
    let ops = execute_all(&ch, action.request("")).await.unwrap();
    assert_eq!(ops[0].name, "main/3");

    // Unknown operation.
    let err = exec(&ch)
        .wait_execution(re::WaitExecutionRequest {
            name: "operations/nope".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
}

#[tokio::test]
async fn client_cancel_and_cancel_operation() {
    let up = FakeUpstream::start().await;
    let ch = up.channel().await;
    let action = TestAction::new(&["forever"], &["o"], &[]);
    up.put_test_action(&action);
    up.hold_executions();

    // The client reads QUEUED and EXECUTING, then goes away.
    let mut stream = exec(&ch)
        .execute(action.request(""))
        .await
        .unwrap()
        .into_inner();
    let first = stream.message().await.unwrap().unwrap();
    stream.message().await.unwrap().unwrap();
    assert_eq!(up.execute_streams_dropped(), 0);
    drop(stream);
    assert!(up.wait_execute_dropped(1, Duration::from_secs(5)).await);
    let deadline = Instant::now() + Duration::from_secs(5);
    while up.last_call(Method::Execute).unwrap().code.is_none() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert_eq!(
        up.last_call(Method::Execute).unwrap().code,
        Some(Code::Cancelled)
    );
    // The job itself runs on (as on a real server) until cancelled.
    assert!(!up.operation(&first.name).unwrap().done);

    // A WaitExecution stream dropped early is counted too.
    let mut w = exec(&ch)
        .wait_execution(re::WaitExecutionRequest {
            name: first.name.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        operation_stage(&w.message().await.unwrap().unwrap()),
        Some(Stage::Executing)
    );
    drop(w);
    let deadline = Instant::now() + Duration::from_secs(5);
    while up.wait_streams_dropped() == 0 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert_eq!(up.wait_streams_dropped(), 1);

    // CancelOperation ends it with CANCELLED; a watcher sees that.
    let watcher = tokio::spawn({
        let ch = ch.clone();
        let name = first.name.clone();
        async move {
            drain(
                exec(&ch)
                    .wait_execution(re::WaitExecutionRequest { name })
                    .await
                    .unwrap()
                    .into_inner(),
            )
            .await
        }
    });
    assert!(
        up.wait_for_calls(Method::WaitExecution, 2, Duration::from_secs(5))
            .await
    );
    let mut ops = Ops::new(ch.clone());
    ops.cancel_operation(lr::CancelOperationRequest {
        name: first.name.clone(),
    })
    .await
    .unwrap();
    let (seen, end) = watcher.await.unwrap();
    end.unwrap();
    let last = seen.last().unwrap();
    assert!(last.done);
    let status = operation_response(last).unwrap().status.unwrap();
    assert_eq!(status.code, Code::Cancelled as i32);
    assert_eq!(up.count(Method::CancelOperation), 1);
    assert_eq!(up.operations_cancelled(), 1);
    assert_eq!(up.executions_completed(), 0);
    up.release_executions();
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert!(
        up.action_result("", &action.digest).is_none(),
        "cancelled: no result"
    );
    let err = ops
        .cancel_operation(lr::CancelOperationRequest {
            name: "operations/999".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
}

#[tokio::test]
async fn operations_service() {
    let up = FakeUpstream::start().await;
    let ch = up.channel().await;
    let mut ops = Ops::new(ch.clone());
    let a = TestAction::new(&["a"], &["o"], &[]);
    let b = a.clone().salted(b"b");
    up.put_test_action(&a);
    up.put_test_action(&b);
    execute_all(&ch, a.request("x")).await.unwrap();

    up.hold_executions();
    let mut stream = exec(&ch)
        .execute(b.request("x"))
        .await
        .unwrap()
        .into_inner();
    let name_b = stream.message().await.unwrap().unwrap().name;

    let got = ops
        .get_operation(lr::GetOperationRequest {
            name: "operations/1".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(got.done);
    assert!(operation_response(&got).unwrap().result.is_some());
    let call = up.last_call(Method::GetOperation).unwrap();
    assert_eq!(call.instance_name, "x");
    assert_eq!(call.digests, vec![a.digest.clone()]);

    let list = ops
        .list_operations(lr::ListOperationsRequest {
            page_size: 1,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(list.operations.len(), 1);
    assert_eq!(list.operations[0].name, "operations/1");
    let rest = ops
        .list_operations(lr::ListOperationsRequest {
            page_token: list.next_page_token,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(rest.operations.len(), 1);
    assert_eq!(rest.operations[0].name, name_b);
    assert!(rest.next_page_token.is_empty());

    // WaitOperation: returns at its timeout while running, at once when done.
    let t0 = Instant::now();
    let running = ops
        .wait_operation(lr::WaitOperationRequest {
            name: name_b.clone(),
            timeout: Some(bazel_remote_apis::google::protobuf::Duration {
                seconds: 0,
                nanos: 100_000_000,
            }),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(!running.done);
    assert!(t0.elapsed() >= Duration::from_millis(90));
    let waiter = tokio::spawn({
        let mut ops = ops.clone();
        let name = name_b.clone();
        async move {
            ops.wait_operation(lr::WaitOperationRequest {
                name,
                timeout: None,
            })
            .await
            .unwrap()
            .into_inner()
        }
    });
    tokio::time::sleep(Duration::from_millis(50)).await;
    up.release_executions();
    assert!(waiter.await.unwrap().done);
    let (rest, end) = drain(stream).await;
    end.unwrap();
    assert!(rest.last().unwrap().done);
    assert_eq!(up.operation_history(&name_b).len(), 3);

    ops.delete_operation(lr::DeleteOperationRequest {
        name: "operations/1".into(),
    })
    .await
    .unwrap();
    assert_eq!(up.operation_names(), vec![name_b.clone()]);
    let err = ops
        .get_operation(lr::GetOperationRequest {
            name: "operations/1".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    assert_eq!(up.count(Method::GetOperation), 2);
    assert_eq!(up.count(Method::ListOperations), 2);
    assert_eq!(up.count(Method::WaitOperation), 2);
    assert_eq!(up.count(Method::DeleteOperation), 1);
}

#[tokio::test]
async fn execution_failures_delays_and_faults() {
    let up = FakeUpstream::start().await;
    let ch = up.channel().await;
    let action = TestAction::new(&["x"], &["o"], &[]);
    up.put_test_action(&action);
    let req = || re::ExecuteRequest {
        skip_cache_lookup: true,
        ..action.request("")
    };

    // In ExecuteResponse.status, after the stages.
    up.fail_next_executions(
        1,
        Code::DeadlineExceeded,
        "too slow",
        ErrorDelivery::ResponseStatus,
    );
    let ops = execute_all(&ch, req()).await.unwrap();
    assert_eq!(
        stages(&ops),
        vec![Stage::Queued, Stage::Executing, Stage::Completed]
    );
    let resp = operation_response(&ops[2]).unwrap();
    assert_eq!(
        resp.status.as_ref().unwrap().code,
        Code::DeadlineExceeded as i32
    );
    assert_eq!(resp.status.unwrap().message, "too slow");
    assert!(resp.result.is_none());
    assert!(up.action_result("", &action.digest).is_none());

    // As Operation.error.
    up.fail_next_executions(1, Code::Internal, "boom", ErrorDelivery::OperationError);
    let ops = execute_all(&ch, req()).await.unwrap();
    assert!(matches!(
        &ops.last().unwrap().result,
        Some(lr::operation::Result::Error(s)) if s.code == Code::Internal as i32
    ));

    // As a gRPC error on the call.
    up.fail_next_executions(
        1,
        Code::ResourceExhausted,
        "no workers",
        ErrorDelivery::GrpcError,
    );
    let err = execute_all(&ch, req()).await.unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted);
    assert_eq!(err.message(), "no workers");
    let call = up.last_call(Method::Execute).unwrap();
    assert_eq!(call.code, Some(Code::ResourceExhausted));
    assert!(call.injected);

    // The generic faults apply to the new methods as well.
    up.fail_next_of(Method::Execute, 1, Code::Unavailable);
    assert_eq!(
        execute_all(&ch, req()).await.unwrap_err().code(),
        Code::Unavailable
    );
    up.fail_next_of(Method::GetOperation, 1, Code::Unavailable);
    let err = Ops::new(ch.clone())
        .get_operation(lr::GetOperationRequest {
            name: "operations/1".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unavailable);

    // Delays: QUEUED and EXECUTING last as long as configured.
    up.set_queue_delay(Duration::from_millis(100));
    up.set_execution_delay(Duration::from_millis(150));
    let t0 = Instant::now();
    let ops = execute_all(&ch, req()).await.unwrap();
    assert!(t0.elapsed() >= Duration::from_millis(250));
    assert!(ops.last().unwrap().done);
    assert_eq!(up.count(Method::Execute), 5);
    assert_eq!(
        up.executions_started(),
        3,
        "two failed before a job was made"
    );
    assert!(up.action_result("", &action.digest).is_some());
}
