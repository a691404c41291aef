//! Well-formed protobuf carrying invalid requests, continued: batch
//! limits, digest functions, compressors, page tokens, action results and
//! Remote Asset requests.

use std::sync::Arc;

use bazel_remote_apis::build::bazel::remote::asset::v1::{
    FetchBlobRequest, PushBlobRequest, Qualifier, fetch_client::FetchClient,
    push_client::PushClient,
};
use prost::Message;

use super::{Fuzz, entry};
use crate::common::*;

const INVALID: &[Code] = &[Code::InvalidArgument];

/// Batches over the advertised limit and messages over the size limit.
pub async fn batches(f: &mut Fuzz) {
    let mut cas = f.channel.cas();
    let entries: Vec<_> = (0..5)
        .map(|i| blob(0xba7c_0000 + i, 900 << 10))
        .map(|b| (digest(&b), b))
        .collect();
    let over = batch_update_raw(&mut cas, "", entries).await;
    f.expect(
        "batch: over the batch limit",
        "BatchUpdateBlobs 4.5 MiB",
        async { over },
        INVALID,
    )
    .await;
    let mut bs = f.channel.bytestream();
    let mut digests = Vec::new();
    for i in 0..3 {
        let data = Arc::new(blob(0xba7d_0000 + i, 1536 << 10));
        upload_blob(&mut bs, data.clone()).await.expect("upload");
        digests.push(digest(&data));
    }
    let request = re::BatchReadBlobsRequest {
        digests,
        ..Default::default()
    };
    f.expect(
        "batch: over the batch limit",
        "BatchReadBlobs 4.5 MiB",
        cas.batch_read_blobs(request),
        INVALID,
    )
    .await;
    let huge: Vec<_> = (0..8)
        .map(|i| blob(0xba7e_0000 + i, 1 << 20))
        .map(|b| (digest(&b), b))
        .collect();
    let too_big = batch_update_raw(&mut cas, "", huge).await;
    let limits = &[
        Code::InvalidArgument,
        Code::OutOfRange,
        Code::ResourceExhausted,
    ];
    f.expect(
        "batch: message over the size limit",
        "BatchUpdateBlobs 8 MiB",
        async { too_big },
        limits,
    )
    .await;
    let many: Vec<_> = (0..120_000u64).map(|i| digest(&i.to_le_bytes())).collect();
    let find = re::FindMissingBlobsRequest {
        blob_digests: many,
        ..Default::default()
    };
    f.expect(
        "batch: message over the size limit",
        "FindMissingBlobs 120k digests",
        cas.find_missing_blobs(find),
        limits,
    )
    .await;
}

/// Digest functions Outpost does not support, and compressors it does not offer.
pub async fn functions_and_compressors(f: &mut Fuzz) {
    let (mut cas, mut ac) = (f.channel.cas(), f.channel.action_cache());
    let good = f.good_digest();
    let vso = re::digest_function::Value::Vso as i32;
    let murmur3 = re::digest_function::Value::Murmur3 as i32;
    for function in [vso, murmur3, 99, -1] {
        let what = format!("digest_function {function}");
        let class = "unknown digest function";
        let find = re::FindMissingBlobsRequest {
            blob_digests: vec![good.clone()],
            digest_function: function,
            ..Default::default()
        };
        f.expect(class, &what, cas.find_missing_blobs(find), INVALID)
            .await;
        let read = re::BatchReadBlobsRequest {
            digests: vec![good.clone()],
            digest_function: function,
            ..Default::default()
        };
        f.expect(class, &what, cas.batch_read_blobs(read), INVALID)
            .await;
        let update = re::BatchUpdateBlobsRequest {
            requests: vec![re::batch_update_blobs_request::Request {
                digest: Some(good.clone()),
                data: f.good.clone(),
                compressor: 0,
            }],
            digest_function: function,
            ..Default::default()
        };
        f.expect(class, &what, cas.batch_update_blobs(update), INVALID)
            .await;
        let tree = re::GetTreeRequest {
            root_digest: Some(good.clone()),
            digest_function: function,
            ..Default::default()
        };
        f.expect(class, &what, cas.get_tree(tree), INVALID).await;
        let get = re::GetActionResultRequest {
            action_digest: Some(good.clone()),
            digest_function: function,
            ..Default::default()
        };
        f.expect(class, &what, ac.get_action_result(get), INVALID)
            .await;
        let push = PushBlobRequest {
            uris: vec!["https://x.example/f".into()],
            blob_digest: Some(good.clone()),
            digest_function: function,
            ..Default::default()
        };
        f.expect(
            class,
            &what,
            PushClient::new(f.channel.clone()).push_blob(push),
            INVALID,
        )
        .await;
    }
    // (ZSTD is served, but these bytes are no zstd frame.)
    let deflate = re::compressor::Value::Deflate as i32;
    for compressor in [re::compressor::Value::Zstd as i32, deflate, 99, -3] {
        let update = re::BatchUpdateBlobsRequest {
            requests: vec![re::batch_update_blobs_request::Request {
                digest: Some(good.clone()),
                data: f.good.clone(),
                compressor,
            }],
            ..Default::default()
        };
        let answer = cas
            .batch_update_blobs(update)
            .await
            .map(|r| r.into_inner().responses);
        let first = answer.map(|r| entry(r.first().and_then(|e| e.status.as_ref())));
        let allowed = &[Code::InvalidArgument, Code::Unimplemented];
        f.expect(
            "compressor: BatchUpdateBlobs entry",
            &format!("compressor {compressor}"),
            async { first? },
            allowed,
        )
        .await;
    }
}

/// GetTree with bad page tokens and sizes, no root, or a root that is no Directory.
pub async fn trees(f: &mut Fuzz) {
    let mut cas = f.channel.cas();
    let root = re::Directory {
        files: vec![re::FileNode {
            name: "a".into(),
            digest: Some(f.good_digest()),
            ..Default::default()
        }],
        ..Default::default()
    };
    let root_bytes = root.encode_to_vec();
    assert_eq!(batch_update(&mut cas, "", &[&root_bytes]).await, [Code::Ok]);
    let long = "7".repeat(10_000);
    for token in [
        "abc",
        "-1",
        "1.5",
        "99999999999999999999999",
        long.as_str(),
        "\u{0}",
    ] {
        let tree = re::GetTreeRequest {
            root_digest: Some(digest(&root_bytes)),
            page_token: token.into(),
            ..Default::default()
        };
        f.expect(
            "GetTree: bad page token",
            token,
            cas.get_tree(tree),
            INVALID,
        )
        .await;
    }
    let tree = re::GetTreeRequest {
        root_digest: Some(digest(&root_bytes)),
        page_size: -1,
        ..Default::default()
    };
    f.expect(
        "GetTree: negative page size",
        "-1",
        cas.get_tree(tree),
        INVALID,
    )
    .await;
    let tree = re::GetTreeRequest::default();
    f.expect(
        "missing required field",
        "GetTree without a root",
        cas.get_tree(tree),
        INVALID,
    )
    .await;
}

/// Action-cache requests missing parts or naming bad digests.
pub async fn actions(f: &mut Fuzz) {
    let mut ac = f.channel.action_cache();
    let bad = raw_digest("zz", 1);
    let action = Some(digest(b"fuzz action"));
    let get = re::GetActionResultRequest::default();
    f.expect(
        "missing required field",
        "GetActionResult without a digest",
        ac.get_action_result(get),
        INVALID,
    )
    .await;
    let update = re::UpdateActionResultRequest {
        action_digest: action.clone(),
        ..Default::default()
    };
    f.expect(
        "missing required field",
        "UpdateActionResult without a result",
        ac.update_action_result(update),
        INVALID,
    )
    .await;
    let results = [
        re::ActionResult {
            output_files: vec![re::OutputFile {
                path: "o".into(),
                digest: Some(bad.clone()),
                ..Default::default()
            }],
            ..Default::default()
        },
        re::ActionResult {
            output_files: vec![re::OutputFile {
                path: "o".into(),
                digest: None,
                ..Default::default()
            }],
            ..Default::default()
        },
        re::ActionResult {
            output_directories: vec![re::OutputDirectory {
                path: "d".into(),
                tree_digest: Some(bad.clone()),
                ..Default::default()
            }],
            ..Default::default()
        },
        re::ActionResult {
            stdout_digest: Some(bad.clone()),
            ..Default::default()
        },
        re::ActionResult {
            stderr_digest: Some(raw_digest(&f.good_digest().hash, -5)),
            ..Default::default()
        },
    ];
    for (i, result) in results.into_iter().enumerate() {
        let update = re::UpdateActionResultRequest {
            action_digest: action.clone(),
            action_result: Some(result),
            ..Default::default()
        };
        f.expect(
            "action result: bad digest inside",
            &format!("result {i}"),
            ac.update_action_result(update),
            INVALID,
        )
        .await;
    }
}

/// Remote Asset requests without URIs or digests, with bad qualifiers.
pub async fn assets(f: &mut Fuzz) {
    let (mut fetch, mut push) = (
        FetchClient::new(f.channel.clone()),
        PushClient::new(f.channel.clone()),
    );
    let q = |name: &str, value: &str| Qualifier {
        name: name.into(),
        value: value.into(),
    };
    let uri = vec!["https://fuzz.example/a".to_string()];
    let good = Some(f.good_digest());
    let pushes = [
        (
            "no URIs",
            PushBlobRequest {
                blob_digest: good.clone(),
                ..Default::default()
            },
        ),
        (
            "an empty URI",
            PushBlobRequest {
                uris: vec![String::new()],
                blob_digest: good.clone(),
                ..Default::default()
            },
        ),
        (
            "no blob digest",
            PushBlobRequest {
                uris: uri.clone(),
                ..Default::default()
            },
        ),
        (
            "a bad blob digest",
            PushBlobRequest {
                uris: uri.clone(),
                blob_digest: Some(raw_digest("nothex", 4)),
                ..Default::default()
            },
        ),
        (
            "duplicate qualifiers",
            PushBlobRequest {
                uris: uri.clone(),
                blob_digest: good.clone(),
                qualifiers: vec![q("a", "1"), q("a", "2")],
                ..Default::default()
            },
        ),
    ];
    for (what, request) in pushes {
        f.expect(
            "asset: bad PushBlob",
            what,
            push.push_blob(request),
            INVALID,
        )
        .await;
    }
    let fetches = [
        ("no URIs", FetchBlobRequest::default()),
        (
            "an empty URI",
            FetchBlobRequest {
                uris: vec![String::new()],
                ..Default::default()
            },
        ),
        (
            "duplicate qualifiers",
            FetchBlobRequest {
                uris: uri.clone(),
                qualifiers: vec![q("a", "1"), q("a", "1")],
                ..Default::default()
            },
        ),
        (
            "checksum.sri not base64",
            FetchBlobRequest {
                uris: uri.clone(),
                qualifiers: vec![q("checksum.sri", "sha256-!!!not base64!!!")],
                ..Default::default()
            },
        ),
        (
            "checksum.sri without algorithm",
            FetchBlobRequest {
                uris: uri.clone(),
                qualifiers: vec![q("checksum.sri", "abcdef")],
                ..Default::default()
            },
        ),
        (
            "negative timeout",
            FetchBlobRequest {
                uris: uri.clone(),
                timeout: Some(bazel_remote_apis::google::protobuf::Duration {
                    seconds: -5,
                    nanos: 0,
                }),
                ..Default::default()
            },
        ),
    ];
    for (what, request) in fetches {
        // A refusal may come as the call's status or inline.
        let answer = fetch.fetch_blob(request).await.and_then(|r| {
            let r = r.into_inner();
            match r.status.as_ref().filter(|s| s.code != 0) {
                Some(s) => Err(Status::new(Code::from(s.code), s.message.clone())),
                None => Ok(r),
            }
        });
        f.expect("asset: bad FetchBlob", what, async { answer }, INVALID)
            .await;
    }
}
