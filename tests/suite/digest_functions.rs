//! Every digest function through every RPC (REAPI 2.3 `digest_function`
//! fields and the BLAKE3 resource-name segment), with digests computed by
//! the test kit's own hash crates: selection by field or by hash length,
//! no collision between functions, length mismatches refused, persistence,
//! and the function passed unchanged to the upstream.

use outpost_testkit::digests::{FUNCTIONS, digest_in, read_name_in, write_name_in};
use prost::Message as _;
use re::digest_function::Value as Function;
use tonic::Code;

use crate::common::fake_upstream::FakeUpstream;
use crate::common::*;

mod assets;

/// The `digest_function` field a request carries for `f`: explicit for
/// BLAKE3 (its length names SHA-256), left UNKNOWN for the others
/// (inferred from the hash length, as the spec allows) unless `explicit`.
fn field(f: Function, explicit: bool) -> i32 {
    if explicit || f == Function::Blake3 {
        f as i32
    } else {
        0
    }
}

async fn find_missing_in(
    cas: &mut Cas,
    f: Function,
    explicit: bool,
    digests: &[re::Digest],
) -> Result<Vec<re::Digest>, tonic::Status> {
    Ok(cas
        .find_missing_blobs(re::FindMissingBlobsRequest {
            instance_name: "i".into(),
            blob_digests: digests.to_vec(),
            digest_function: field(f, explicit),
        })
        .await?
        .into_inner()
        .missing_blob_digests)
}

async fn batch_read_in(
    cas: &mut Cas,
    f: Function,
    digests: &[re::Digest],
) -> Result<Vec<re::batch_read_blobs_response::Response>, tonic::Status> {
    Ok(cas
        .batch_read_blobs(re::BatchReadBlobsRequest {
            instance_name: "i".into(),
            digests: digests.to_vec(),
            acceptable_compressors: vec![],
            digest_function: field(f, false),
        })
        .await?
        .into_inner()
        .responses)
}

async fn batch_update_in(
    cas: &mut Cas,
    f: Function,
    explicit: bool,
    blobs: &[&[u8]],
) -> Result<Vec<Code>, tonic::Status> {
    let requests = blobs
        .iter()
        .map(|data| re::batch_update_blobs_request::Request {
            digest: Some(digest_in(f, data)),
            data: data.to_vec(),
            compressor: 0,
        })
        .collect();
    let responses = cas
        .batch_update_blobs(re::BatchUpdateBlobsRequest {
            instance_name: "i".into(),
            requests,
            digest_function: field(f, explicit),
        })
        .await?
        .into_inner()
        .responses;
    Ok(responses.iter().map(|r| entry_code(&r.status)).collect())
}

async fn write_in(
    bs: &mut ByteStream,
    f: Function,
    uuid: &str,
    data: &[u8],
) -> Result<i64, tonic::Status> {
    let name = write_name_in("i", uuid, f, &digest_in(f, data));
    write(bs, write_requests(&name, data, 0, 64 << 10, true)).await
}

async fn read_in(
    bs: &mut ByteStream,
    f: Function,
    d: &re::Digest,
) -> Result<Vec<u8>, tonic::Status> {
    Ok(read_blob(bs, &read_name_in("i", f, d), 0, 0).await?.0)
}

async fn get_action_result_in(
    server: &TestServer,
    f: Function,
    action: &re::Digest,
) -> Result<re::ActionResult, tonic::Status> {
    Ok(server
        .action_cache()
        .get_action_result(re::GetActionResultRequest {
            instance_name: "i".into(),
            action_digest: Some(action.clone()),
            digest_function: field(f, false),
            ..Default::default()
        })
        .await?
        .into_inner())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_function_round_trips_through_every_rpc() {
    let server = TestServer::start().await;
    let (mut cas, mut bs) = (server.cas(), server.bytestream());
    for (n, f) in FUNCTIONS.into_iter().enumerate() {
        let name = f.as_str_name();
        let seed = 100 * n as u64;
        let (small, streamed, file) = (
            blob(seed, 300),
            blob(seed + 1, 70_000),
            blob(seed + 2, 3 << 20),
        );
        let digests: Vec<re::Digest> = [&small, &streamed, &file]
            .iter()
            .map(|d| digest_in(f, d))
            .collect();
        assert_eq!(
            find_missing_in(&mut cas, f, true, &digests).await.unwrap(),
            digests,
            "{name}"
        );

        assert_eq!(
            batch_update_in(&mut cas, f, true, &[&small]).await.unwrap(),
            vec![Code::Ok],
            "{name}"
        );
        assert_eq!(
            write_in(&mut bs, f, &format!("u-{n}-a"), &streamed)
                .await
                .unwrap(),
            streamed.len() as i64
        );
        assert_eq!(
            write_in(&mut bs, f, &format!("u-{n}-b"), &file)
                .await
                .unwrap(),
            file.len() as i64
        );
        // The field left UNKNOWN: inferred from the hash length (BLAKE3 named).
        assert!(
            find_missing_in(&mut cas, f, false, &digests)
                .await
                .unwrap()
                .is_empty(),
            "{name}"
        );

        let read = batch_read_in(&mut cas, f, &digests[..2]).await.unwrap();
        assert_eq!(read.len(), 2);
        for (r, data) in read.iter().zip([&small, &streamed]) {
            assert_eq!(entry_code(&r.status), Code::Ok, "{name}");
            assert!(r.data == *data, "{name}: BatchRead data differs");
        }
        for (d, data) in digests.iter().zip([&small, &streamed, &file]) {
            assert!(
                read_in(&mut bs, f, d).await.unwrap() == *data,
                "{name}: Read differs"
            );
        }

        // GetTree: a Directory naming a file in this function.
        let leaf = re::Directory {
            files: vec![re::FileNode {
                name: "small".into(),
                digest: Some(digests[0].clone()),
                ..Default::default()
            }],
            ..Default::default()
        };
        let leaf_d = digest_in(f, &leaf.encode_to_vec());
        let root = re::Directory {
            directories: vec![re::DirectoryNode {
                name: "leaf".into(),
                digest: Some(leaf_d.clone()),
            }],
            ..Default::default()
        };
        let root_d = digest_in(f, &root.encode_to_vec());
        assert_eq!(
            batch_update_in(
                &mut cas,
                f,
                false,
                &[&leaf.encode_to_vec(), &root.encode_to_vec()]
            )
            .await
            .unwrap(),
            vec![Code::Ok, Code::Ok]
        );
        let pages = collect(
            cas.get_tree(re::GetTreeRequest {
                instance_name: "i".into(),
                root_digest: Some(root_d.clone()),
                digest_function: field(f, false),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner(),
        )
        .await
        .unwrap();
        let dirs: Vec<re::Directory> = pages.into_iter().flat_map(|p| p.directories).collect();
        assert_eq!(dirs, vec![root, leaf], "{name}");

        // The action cache: a result whose outputs are in this function
        // (their presence is checked in it).
        let action = digest_in(f, format!("action {name}").as_bytes());
        let result = re::ActionResult {
            output_files: vec![re::OutputFile {
                path: "out/file".into(),
                digest: Some(digests[2].clone()),
                ..Default::default()
            }],
            stdout_digest: Some(digests[1].clone()),
            exit_code: 7,
            ..Default::default()
        };
        assert_code(
            get_action_result_in(&server, f, &action).await,
            Code::NotFound,
        );
        server
            .action_cache()
            .update_action_result(re::UpdateActionResultRequest {
                instance_name: "i".into(),
                action_digest: Some(action.clone()),
                action_result: Some(result.clone()),
                digest_function: field(f, true),
                ..Default::default()
            })
            .await
            .unwrap();
        let got = get_action_result_in(&server, f, &action).await.unwrap();
        assert_eq!(
            (got.exit_code, got.output_files[0].digest.clone()),
            (7, Some(digests[2].clone())),
            "{name}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_blake3_and_a_sha256_blob_with_the_same_hex_never_collide() {
    let server = TestServer::start().await;
    let (mut cas, mut bs) = (server.cas(), server.bytestream());
    for (i, data) in [blob(7, 200), blob(8, 2 << 20)].into_iter().enumerate() {
        let b3 = digest_in(Function::Blake3, &data);
        write_in(&mut bs, Function::Blake3, &format!("u-{i}"), &data)
            .await
            .unwrap();
        // The same hex and size read as SHA-256: another blob, not stored.
        assert_eq!(
            find_missing_in(&mut cas, Function::Sha256, true, std::slice::from_ref(&b3))
                .await
                .unwrap(),
            vec![b3.clone()]
        );
        assert_code(
            read_in(&mut bs, Function::Sha256, &b3).await,
            Code::NotFound,
        );
        let read = batch_read_in(&mut cas, Function::Sha256, std::slice::from_ref(&b3))
            .await
            .unwrap();
        assert_eq!(entry_code(&read[0].status), Code::NotFound);
        // And the bytes do not hash to it in SHA-256: refused as such.
        let name = write_name_in("i", &format!("v-{i}"), Function::Sha256, &b3);
        assert_code(
            write(&mut bs, write_requests(&name, &data, 0, 64 << 10, true)).await,
            Code::InvalidArgument,
        );
        // BLAKE3 still serves it.
        assert!(read_in(&mut bs, Function::Blake3, &b3).await.unwrap() == data);
    }
    server.assert_still_serves().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hash_that_does_not_fit_its_function_is_invalid_argument() {
    let server = TestServer::start().await;
    let (mut cas, mut bs) = (server.cas(), server.bytestream());
    let data = blob(9, 100);
    let sha256 = digest_in(Function::Sha256, &data);
    batch_update_in(&mut cas, Function::Sha256, false, &[&data])
        .await
        .unwrap();
    for named in [
        Function::Sha512,
        Function::Sha1,
        Function::Md5,
        Function::Sha384,
    ] {
        let name = named.as_str_name();
        assert_code(
            find_missing_in(&mut cas, named, true, std::slice::from_ref(&sha256)).await,
            Code::InvalidArgument,
        );
        let read = cas
            .batch_read_blobs(re::BatchReadBlobsRequest {
                instance_name: "i".into(),
                digests: vec![sha256.clone()],
                acceptable_compressors: vec![],
                digest_function: named as i32,
            })
            .await;
        // Per entry or for the call: never served as another function.
        match read {
            Ok(r) => assert_eq!(
                entry_code(&r.into_inner().responses[0].status),
                Code::InvalidArgument,
                "{name}"
            ),
            Err(e) => assert_eq!(e.code(), Code::InvalidArgument, "{name}"),
        }
        let get = server
            .action_cache()
            .get_action_result(re::GetActionResultRequest {
                instance_name: "i".into(),
                action_digest: Some(sha256.clone()),
                digest_function: named as i32,
                ..Default::default()
            })
            .await;
        assert_code(get, Code::InvalidArgument);
        // A resource name whose segment the hash does not fit.
        let segment = format!(
            "i/blobs/{}/{}/{}",
            name.to_lowercase(),
            sha256.hash,
            sha256.size_bytes
        );
        assert_code(
            read_blob(&mut bs, &segment, 0, 0).await,
            Code::InvalidArgument,
        );
    }
    // A function Outpost does not serve (VSO), by field or by segment.
    assert_code(
        cas.find_missing_blobs(re::FindMissingBlobsRequest {
            instance_name: "i".into(),
            blob_digests: vec![sha256.clone()],
            digest_function: Function::Vso as i32,
        })
        .await,
        Code::InvalidArgument,
    );
    let vso = format!("i/blobs/vso/{}/{}", sha256.hash, sha256.size_bytes);
    assert_code(read_blob(&mut bs, &vso, 0, 0).await, Code::InvalidArgument);
    // A hash length no function has: INVALID_ARGUMENT, not NOT_FOUND.
    let odd = raw_digest(&sha256.hash[..50], 100);
    assert_code(
        find_missing_in(&mut cas, Function::Sha256, false, &[odd]).await,
        Code::InvalidArgument,
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sha512_blobs_and_results_survive_a_restart() {
    let server = TestServer::start().await;
    let f = Function::Sha512;
    let (inline, file) = (blob(11, 5_000), blob(12, (2 << 20) + 5));
    let mut bs = server.bytestream();
    write_in(&mut bs, f, "u-1", &inline).await.unwrap();
    write_in(&mut bs, f, "u-2", &file).await.unwrap();
    let action = digest_in(f, b"a sha512 action");
    server
        .action_cache()
        .update_action_result(re::UpdateActionResultRequest {
            instance_name: "i".into(),
            action_digest: Some(action.clone()),
            action_result: Some(re::ActionResult {
                output_files: vec![re::OutputFile {
                    path: "o".into(),
                    digest: Some(digest_in(f, &file)),
                    ..Default::default()
                }],
                exit_code: 3,
                ..Default::default()
            }),
            digest_function: f as i32,
            ..Default::default()
        })
        .await
        .unwrap();

    let server = server.restart().await;

    let (mut cas, mut bs) = (server.cas(), server.bytestream());
    let digests = [digest_in(f, &inline), digest_in(f, &file)];
    assert!(
        find_missing_in(&mut cas, f, false, &digests)
            .await
            .unwrap()
            .is_empty()
    );
    for (d, data) in digests.iter().zip([&inline, &file]) {
        assert!(read_in(&mut bs, f, d).await.unwrap() == *data);
    }
    assert_eq!(
        get_action_result_in(&server, f, &action)
            .await
            .unwrap()
            .exit_code,
        3
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_function_passes_to_the_upstream_unchanged() {
    let fake = FakeUpstream::start().await;
    fake.set_digest_functions(&[Function::Sha256, Function::Blake3, Function::Sha512]);
    let server = start_proxy(&fake, |u| u.write_mode = WriteMode::Through, |_| {}).await;
    // Capabilities: ours narrowed to the upstream's.
    let caps = server
        .capabilities()
        .get_capabilities(re::GetCapabilitiesRequest::default())
        .await
        .unwrap()
        .into_inner();
    let want = vec![
        Function::Sha256 as i32,
        Function::Sha512 as i32,
        Function::Blake3 as i32,
    ];
    assert_eq!(caps.cache_capabilities.unwrap().digest_functions, want);

    let (mut cas, mut bs) = (server.cas(), server.bytestream());
    for (i, f) in [Function::Blake3, Function::Sha512].into_iter().enumerate() {
        let (small, large) = (blob(20 + i as u64, 500), blob(30 + i as u64, 3 << 20));
        // The fake verifies every hash in the function it is told: a blob
        // labelled with another function would be refused there.
        assert_eq!(
            batch_update_in(&mut cas, f, true, &[&small]).await.unwrap(),
            vec![Code::Ok]
        );
        write_in(&mut bs, f, &format!("u-{i}"), &large)
            .await
            .unwrap();
        for data in [&small, &large] {
            let d = digest_in(f, data);
            assert!(
                fake.has_blob(&d),
                "{}: the upstream has the blob",
                f.as_str_name()
            );
        }
        // What only the upstream holds is read through in that function.
        let remote = blob(40 + i as u64, 800);
        let d = digest_in(f, &remote);
        fake.put_blob_unchecked(&d, remote.clone());
        assert!(read_in(&mut bs, f, &d).await.unwrap() == remote);
    }

    // A function the upstream does not take: the call goes up anyway and
    // its refusal comes back to the client.
    let md5 = digest_in(Function::Md5, b"not advertised upstream");
    let answer = find_missing_in(&mut cas, Function::Md5, true, &[md5]).await;
    assert_code(answer, Code::InvalidArgument);
}
