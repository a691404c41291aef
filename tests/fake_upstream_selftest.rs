//! Self-tests of the fake REAPI upstream in `tests/common/fake_upstream.rs`:
//! it must store and verify like a real server, count what it sees, and
//! inject latency, errors and outages on demand. Talks to it over gRPC with
//! the plain `bazel-remote-apis` clients.

#[path = "common/fake_upstream.rs"]
mod fake_upstream;

use std::time::{Duration, Instant};

use fake_upstream::{FakeUpstream, Method, NetMode, REQUEST_METADATA_HEADER, bs, digest_of, re};
use prost::Message;
use tonic::Code;
use tonic::metadata::MetadataValue;
use tonic::transport::Channel;

type Cas = re::content_addressable_storage_client::ContentAddressableStorageClient<Channel>;
type ByteStream = bs::byte_stream_client::ByteStreamClient<Channel>;
type ActionCache = re::action_cache_client::ActionCacheClient<Channel>;
type Caps = re::capabilities_client::CapabilitiesClient<Channel>;

fn cas(ch: &Channel) -> Cas {
    Cas::new(ch.clone()).max_decoding_message_size(64 << 20)
}
fn bytestream(ch: &Channel) -> ByteStream {
    ByteStream::new(ch.clone()).max_decoding_message_size(64 << 20)
}

fn blob(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

fn read_req(instance: &str, d: &re::Digest, offset: i64) -> bs::ReadRequest {
    let name = format!("blobs/{}/{}", d.hash, d.size_bytes);
    bs::ReadRequest {
        resource_name: if instance.is_empty() {
            name
        } else {
            format!("{instance}/{name}")
        },
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

fn write_reqs(
    name: &str,
    data: &[u8],
    offset: usize,
    chunk: usize,
    finish: bool,
) -> Vec<bs::WriteRequest> {
    let mut out: Vec<bs::WriteRequest> = data[offset..]
        .chunks(chunk)
        .enumerate()
        .map(|(i, piece)| bs::WriteRequest {
            resource_name: if i == 0 {
                name.to_string()
            } else {
                String::new()
            },
            write_offset: (offset + i * chunk) as i64,
            finish_write: false,
            data: piece.to_vec(),
        })
        .collect();
    out.last_mut().unwrap().finish_write = finish;
    out
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
    let mut c = cas(&ch);
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
    let mut b = bytestream(&ch);
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
    let mut b = bytestream(&ch);
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
    cas(&ch).find_missing_blobs(req).await.unwrap();

    let call = up.last_call(Method::FindMissingBlobs).unwrap();
    assert_eq!(call.instance_name, "team/linux");
    assert_eq!(
        call.header("authorization").as_deref(),
        Some("Bearer s3cret")
    );
    assert_eq!(call.request_metadata(), Some(meta));
    let mut r = bytestream(&ch);
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
    let mut c = cas(&ch);
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
    let mut stream = bytestream(&ch)
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
    let mut c = cas(&ch);
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
    let mut c = cas(&ch);
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
            let mut b = bytestream(&ch);
            let d = d.clone();
            tokio::spawn(async move { read_all(&mut b, read_req("", &d, 0)).await })
        })
        .collect();
    assert!(up.wait_parked(5, Duration::from_secs(5)).await);
    // Other methods are not paused.
    find_missing(&mut cas(&ch), "", std::slice::from_ref(&d))
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
    let err = cas(&ch)
        .batch_read_blobs(re::BatchReadBlobsRequest {
            digests: vec![big],
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    let err = find_missing(&mut cas(&ch), "", &[]).await;
    assert!(err.is_ok());
    let err = cas(&ch)
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
    let mut stream = cas(&ch)
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
    let err = cas(&ch)
        .split_blob(re::SplitBlobRequest::default())
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unimplemented);
    assert_eq!(up.count(Method::SplitBlob), 1);
}
