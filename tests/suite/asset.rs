//! Remote Asset Fetch and Push on a standalone Outpost: validation, the
//! index (qualifier sets, instances, expiry, age), content presence and
//! eviction, credentials, persistence across restarts and kill -9, and the
//! checksum lookup. The helpers here are shared with `asset_proxy.rs`.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bazel_remote_apis::build::bazel::remote::asset::v1::{
    FetchBlobRequest, FetchBlobResponse, FetchDirectoryRequest, FetchDirectoryResponse,
    PushBlobRequest, PushDirectoryRequest, Qualifier, fetch_client::FetchClient,
    push_client::PushClient,
};
use bazel_remote_apis::google::protobuf::Timestamp;
use prost::Message;
use tonic::Code;
use tonic::transport::Channel;

use crate::common::*;

/// A Remote Asset Fetch client.
pub type Fetch = FetchClient<Channel>;
/// A Remote Asset Push client.
pub type Push = PushClient<Channel>;

/// The digest an inline FetchBlob error must carry (non-empty, held nowhere).
pub fn dummy_digest() -> re::Digest {
    re::Digest {
        hash: "1".repeat(64),
        size_bytes: 1,
    }
}

/// Fetch and Push clients on one channel.
pub fn asset_clients(c: &impl Clients) -> (Fetch, Push) {
    (FetchClient::new(c.channel()), PushClient::new(c.channel()))
}

/// A qualifier.
pub fn q(name: &str, value: &str) -> Qualifier {
    Qualifier {
        name: name.into(),
        value: value.into(),
    }
}

/// Owned URIs.
pub fn uris(list: &[&str]) -> Vec<String> {
    list.iter().map(|s| s.to_string()).collect()
}

/// Unix seconds now.
pub fn now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

/// A timestamp `secs` from now (negative: in the past).
pub fn from_now(secs: i64) -> Timestamp {
    Timestamp {
        seconds: now() + secs,
        nanos: 0,
    }
}

/// PushBlob of `d` under `uris` with `qualifiers`.
pub async fn push_blob(
    push: &mut Push,
    instance: &str,
    uris: &[&str],
    qualifiers: Vec<Qualifier>,
    d: &re::Digest,
) -> Result<(), tonic::Status> {
    push.push_blob(PushBlobRequest {
        instance_name: instance.into(),
        uris: self::uris(uris),
        qualifiers,
        blob_digest: Some(d.clone()),
        ..Default::default()
    })
    .await
    .map(|_| ())
}

/// FetchBlob of `uris` with `qualifiers`; the call itself must succeed.
pub async fn fetch_blob(
    fetch: &mut Fetch,
    instance: &str,
    uris: &[&str],
    qualifiers: Vec<Qualifier>,
) -> FetchBlobResponse {
    fetch
        .fetch_blob(FetchBlobRequest {
            instance_name: instance.into(),
            uris: self::uris(uris),
            qualifiers,
            ..Default::default()
        })
        .await
        .expect("FetchBlob answers")
        .into_inner()
}

/// FetchDirectory of `uris`; the call itself must succeed.
pub async fn fetch_directory(
    fetch: &mut Fetch,
    instance: &str,
    uris: &[&str],
) -> FetchDirectoryResponse {
    fetch
        .fetch_directory(FetchDirectoryRequest {
            instance_name: instance.into(),
            uris: self::uris(uris),
            ..Default::default()
        })
        .await
        .expect("FetchDirectory answers")
        .into_inner()
}

/// The inline status code of a Fetch answer.
pub fn inline(status: &Option<bazel_remote_apis::google::rpc::Status>) -> Code {
    Code::from(status.as_ref().expect("an inline status").code)
}

/// Asserts a FetchBlob answer is a miss that no Bazel can mistake for a file.
pub fn assert_blob_miss(response: &FetchBlobResponse) {
    assert_eq!(inline(&response.status), Code::NotFound, "{response:?}");
    assert_eq!(response.blob_digest, Some(dummy_digest()));
}

/// A Directory holding `files` (name, digest) and `dirs` (name, digest).
pub fn directory(files: &[(&str, &re::Digest)], dirs: &[(&str, &re::Digest)]) -> Vec<u8> {
    re::Directory {
        files: files
            .iter()
            .map(|(name, d)| re::FileNode {
                name: name.to_string(),
                digest: Some((*d).clone()),
                ..Default::default()
            })
            .collect(),
        directories: dirs
            .iter()
            .map(|(name, d)| re::DirectoryNode {
                name: name.to_string(),
                digest: Some((*d).clone()),
            })
            .collect(),
        ..Default::default()
    }
    .encode_to_vec()
}

/// A two-level tree: root → sub/ → file, root → top. Returns the blobs
/// (root last) and the root digest.
pub fn small_tree(seed: u64) -> (Vec<Vec<u8>>, re::Digest) {
    let file = blob(seed, 1000);
    let top = blob(seed + 1, 10);
    let sub = directory(&[("file", &digest(&file))], &[]);
    let root = directory(&[("top", &digest(&top))], &[("sub", &digest(&sub))]);
    let root_digest = digest(&root);
    (vec![file, top, sub, root], root_digest)
}

/// Uploads `blobs` to `instance`.
pub async fn upload_all(c: &impl Clients, instance: &str, blobs: &[Vec<u8>]) {
    let refs: Vec<&[u8]> = blobs.iter().map(Vec::as_slice).collect();
    let codes = batch_update(&mut c.cas(), instance, &refs).await;
    assert!(codes.iter().all(|c| *c == Code::Ok), "{codes:?}");
}

/// A counter from the server's metrics map.
pub async fn counter(c: &impl Clients, name: &str) -> u64 {
    stats(c)
        .await
        .metrics
        .get(&format!("outpost_{name}_total"))
        .copied()
        .unwrap_or_else(|| panic!("no counter {name}"))
}

#[tokio::test]
async fn empty_and_malformed_requests_are_invalid_arguments() {
    let server = TestServer::start().await;
    let (mut fetch, mut push) = asset_clients(&server);
    // BuildStream probes both services this way and expects exactly this.
    assert_code(
        fetch.fetch_blob(FetchBlobRequest::default()).await,
        Code::InvalidArgument,
    );
    assert_code(
        push.push_blob(PushBlobRequest::default()).await,
        Code::InvalidArgument,
    );
    assert_code(
        fetch
            .fetch_directory(FetchDirectoryRequest::default())
            .await,
        Code::InvalidArgument,
    );
    assert_code(
        push.push_directory(PushDirectoryRequest::default()).await,
        Code::InvalidArgument,
    );
    let d = digest(b"x");
    let cases: Vec<PushBlobRequest> = vec![
        // No blob_digest.
        PushBlobRequest {
            uris: uris(&["u"]),
            ..Default::default()
        },
        // A malformed digest.
        PushBlobRequest {
            uris: uris(&["u"]),
            blob_digest: Some(raw_digest("abc", 1)),
            ..Default::default()
        },
        // A malformed reference.
        PushBlobRequest {
            uris: uris(&["u"]),
            blob_digest: Some(d.clone()),
            references_blobs: vec![raw_digest(&"A".repeat(64), 1)],
            ..Default::default()
        },
        // An unsupported digest function (VSO).
        PushBlobRequest {
            uris: uris(&["u"]),
            blob_digest: Some(d.clone()),
            digest_function: 4,
            ..Default::default()
        },
    ];
    for request in cases {
        assert_code(push.push_blob(request).await, Code::InvalidArgument);
    }
    let unsupported = fetch
        .fetch_blob(FetchBlobRequest {
            uris: uris(&["u"]),
            digest_function: 4,
            ..Default::default()
        })
        .await;
    assert_code(unsupported, Code::InvalidArgument);
    let long_uri = "u".repeat(100_000);
    let status = fetch
        .fetch_blob(FetchBlobRequest {
            uris: vec![long_uri.clone()],
            qualifiers: vec![q(&long_uri, "1"), q(&long_uri, "2")],
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert!(status.message().len() < 1000, "client strings are clipped");
    server.assert_still_serves().await;
}

#[tokio::test]
async fn duplicate_qualifier_names_carry_a_bad_request_detail() {
    #[derive(Clone, PartialEq, prost::Message)]
    struct BadRequest {
        #[prost(message, repeated, tag = "1")]
        field_violations: Vec<FieldViolation>,
    }
    #[derive(Clone, PartialEq, prost::Message)]
    struct FieldViolation {
        #[prost(string, tag = "1")]
        field: String,
        #[prost(string, tag = "2")]
        description: String,
    }
    let server = TestServer::start().await;
    let (mut fetch, mut push) = asset_clients(&server);
    let qualifiers = vec![q("a", "1"), q("b", "2"), q("a", "3")];
    let fetched = fetch
        .fetch_blob(FetchBlobRequest {
            uris: uris(&["u"]),
            qualifiers: qualifiers.clone(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    let pushed = push
        .push_blob(PushBlobRequest {
            uris: uris(&["u"]),
            qualifiers,
            blob_digest: Some(digest(b"x")),
            ..Default::default()
        })
        .await
        .unwrap_err();
    for status in [fetched, pushed] {
        assert_eq!(status.code(), Code::InvalidArgument);
        let body = bazel_remote_apis::google::rpc::Status::decode(status.details()).unwrap();
        assert_eq!(body.details.len(), 1);
        assert_eq!(
            body.details[0].type_url,
            "type.googleapis.com/google.rpc.BadRequest"
        );
        let detail = BadRequest::decode(body.details[0].value.as_slice()).unwrap();
        assert_eq!(
            detail.field_violations,
            vec![FieldViolation {
                field: "qualifiers.name".into(),
                description: "\"a\" is given more than once".into(),
            }]
        );
    }
}

#[tokio::test]
async fn a_pushed_blob_is_fetched_by_any_uri_and_the_same_qualifier_set() {
    let server = TestServer::start().await;
    let (mut fetch, mut push) = asset_clients(&server);
    let data = blob(1, 5000);
    let d = digest(&data);
    upload_all(&server, "", std::slice::from_ref(&data)).await;
    let qualifiers = vec![
        q("resource_type", "application/x-tar"),
        q("vcs.commit", "c0ffee"),
    ];
    push_blob(&mut push, "", &["https://a/x.tar", "urn:x"], qualifiers, &d)
        .await
        .unwrap();

    // Any URI, qualifiers in any order.
    let reversed = vec![
        q("vcs.commit", "c0ffee"),
        q("resource_type", "application/x-tar"),
    ];
    let hit = fetch_blob(&mut fetch, "", &["urn:other", "urn:x"], reversed).await;
    assert_eq!(inline(&hit.status), Code::Ok);
    assert_eq!(hit.blob_digest, Some(d.clone()));
    assert_eq!(hit.uri, "urn:x");
    assert_eq!(
        hit.qualifiers,
        vec![
            q("resource_type", "application/x-tar"),
            q("vcs.commit", "c0ffee")
        ]
    );
    assert_eq!(hit.expires_at, None);
    assert_eq!(
        hit.digest_function,
        re::digest_function::Value::Sha256 as i32
    );

    // A different qualifier set, a subset, none: misses.
    for other in [
        vec![
            q("resource_type", "application/x-tar"),
            q("vcs.commit", "bad"),
        ],
        vec![q("resource_type", "application/x-tar")],
        vec![],
    ] {
        assert_blob_miss(&fetch_blob(&mut fetch, "", &["urn:x"], other).await);
    }
    // A directory fetch of a blob entry misses.
    let as_dir = fetch
        .fetch_directory(FetchDirectoryRequest {
            uris: uris(&["urn:x"]),
            qualifiers: vec![
                q("resource_type", "application/x-tar"),
                q("vcs.commit", "c0ffee"),
            ],
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(inline(&as_dir.status), Code::NotFound);
    assert_eq!(counter(&server, "asset_pushes").await, 1);
    assert_eq!(counter(&server, "asset_fetch_hits").await, 1);
    assert_eq!(counter(&server, "asset_fetch_misses").await, 4);
}

#[tokio::test]
async fn a_pushed_directory_is_fetched_whole() {
    let server = TestServer::start().await;
    let (mut fetch, mut push) = asset_clients(&server);
    let (blobs, root) = small_tree(10);
    upload_all(&server, "", &blobs).await;
    push.push_directory(PushDirectoryRequest {
        uris: uris(&["urn:fdc:buildstream.build:2020:source:abc"]),
        root_directory_digest: Some(root.clone()),
        ..Default::default()
    })
    .await
    .unwrap();
    let hit = fetch_directory(
        &mut fetch,
        "",
        &["urn:fdc:buildstream.build:2020:source:abc"],
    )
    .await;
    assert_eq!(inline(&hit.status), Code::Ok);
    assert_eq!(hit.root_directory_digest, Some(root));
    // A blob fetch of a directory entry misses.
    assert_blob_miss(
        &fetch_blob(
            &mut fetch,
            "",
            &["urn:fdc:buildstream.build:2020:source:abc"],
            vec![],
        )
        .await,
    );
}

#[tokio::test]
async fn a_push_of_content_not_in_the_cas_fails_naming_what_is_missing() {
    let server = TestServer::start().await;
    let (_, mut push) = asset_clients(&server);
    let (blobs, root) = small_tree(20);
    // Everything but the inner file.
    upload_all(&server, "", &blobs[1..]).await;
    let absent = digest(b"referenced but never uploaded");
    let status = push
        .push_directory(PushDirectoryRequest {
            uris: uris(&["urn:d"]),
            root_directory_digest: Some(root),
            references_blobs: vec![absent.clone()],
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::FailedPrecondition, "{status:?}");
    let body = bazel_remote_apis::google::rpc::Status::decode(status.details()).unwrap();
    let mut missing = fake_upstream::missing_digests(&body);
    missing.sort_by(|a, b| a.hash.cmp(&b.hash));
    let mut expected = vec![absent, digest(&blobs[0])];
    expected.sort_by(|a, b| a.hash.cmp(&b.hash));
    assert_eq!(missing, expected);
    assert_eq!(counter(&server, "asset_pushes").await, 0);
}

#[tokio::test]
async fn entries_are_per_instance() {
    let server = TestServer::start().await;
    let (mut fetch, mut push) = asset_clients(&server);
    let data = blob(2, 100);
    let d = digest(&data);
    upload_all(&server, "a", std::slice::from_ref(&data)).await;
    upload_all(&server, "b", std::slice::from_ref(&data)).await;
    push_blob(&mut push, "a", &["urn:i"], vec![], &d)
        .await
        .unwrap();
    assert_eq!(
        inline(&fetch_blob(&mut fetch, "a", &["urn:i"], vec![]).await.status),
        Code::Ok
    );
    assert_blob_miss(&fetch_blob(&mut fetch, "b", &["urn:i"], vec![]).await);
    assert_blob_miss(&fetch_blob(&mut fetch, "", &["urn:i"], vec![]).await);
}

#[tokio::test]
async fn expired_entries_and_content_older_than_accepted_are_not_served() {
    let server = TestServer::start().await;
    let (mut fetch, mut push) = asset_clients(&server);
    let data = blob(3, 100);
    let d = digest(&data);
    upload_all(&server, "", std::slice::from_ref(&data)).await;
    for (uri, expire_at) in [("urn:past", from_now(-10)), ("urn:future", from_now(3600))] {
        push.push_blob(PushBlobRequest {
            uris: uris(&[uri]),
            blob_digest: Some(d.clone()),
            expire_at: Some(expire_at),
            ..Default::default()
        })
        .await
        .unwrap();
    }
    assert_blob_miss(&fetch_blob(&mut fetch, "", &["urn:past"], vec![]).await);
    let future = fetch_blob(&mut fetch, "", &["urn:future"], vec![]).await;
    assert_eq!(inline(&future.status), Code::Ok);
    assert!(future.expires_at.unwrap().seconds > now() + 3000);

    let with_oldest = |secs: i64| FetchBlobRequest {
        uris: uris(&["urn:future"]),
        oldest_content_accepted: Some(from_now(secs)),
        ..Default::default()
    };
    // Bazel sends now + 1 h when it has no checksum: never accept the cache.
    let newer = fetch
        .fetch_blob(with_oldest(3600))
        .await
        .unwrap()
        .into_inner();
    assert_blob_miss(&newer);
    let older = fetch
        .fetch_blob(with_oldest(-3600))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(inline(&older.status), Code::Ok);
}

#[tokio::test]
async fn credentials_are_neither_keyed_nor_stored_nor_echoed() {
    let server = TestServer::start().await;
    let (mut fetch, mut push) = asset_clients(&server);
    let data = blob(4, 100);
    let d = digest(&data);
    upload_all(&server, "", std::slice::from_ref(&data)).await;
    let secret = format!("secret-{}", sha256_hex(b"never stored"));
    let credentials = || {
        vec![
            q("http_header:Authorization", &format!("Bearer {secret}")),
            q("http_header_url:0:X-Token", &secret),
            q(
                "bazel.auth_headers",
                &format!(r#"{{"https://h/f": {{"Authorization": "{secret}"}}}}"#),
            ),
            q(CANONICAL_ID, "id"),
        ]
    };
    push_blob(&mut push, "", &["https://h/f"], credentials(), &d)
        .await
        .unwrap();
    // Without the credentials, or with others: the same entry.
    for qualifiers in [
        vec![q(CANONICAL_ID, "id")],
        vec![
            q("http_header:Authorization", "other"),
            q(CANONICAL_ID, "id"),
        ],
        credentials(),
    ] {
        let hit = fetch_blob(&mut fetch, "", &["https://h/f"], qualifiers).await;
        assert_eq!(inline(&hit.status), Code::Ok);
        assert_eq!(hit.qualifiers, vec![q(CANONICAL_ID, "id")]);
        assert!(!format!("{hit:?}").contains(&secret));
    }
    let dir = server.data_dir().to_path_buf();
    server.stop().await;
    for file in list_files(&dir) {
        let bytes = std::fs::read(&file).unwrap();
        assert!(
            !bytes.windows(secret.len()).any(|w| w == secret.as_bytes()),
            "{} holds a credential",
            file.display()
        );
    }
}

const CANONICAL_ID: &str = "bazel.canonical_id";

#[tokio::test]
async fn entries_survive_a_restart() {
    let server = TestServer::start().await;
    let (_, mut push) = asset_clients(&server);
    let data = blob(5, 100);
    let d = digest(&data);
    upload_all(&server, "", std::slice::from_ref(&data)).await;
    push_blob(&mut push, "", &["urn:kept"], vec![q("a", "1")], &d)
        .await
        .unwrap();
    let server = server.restart().await;
    let (mut fetch, _) = asset_clients(&server);
    let hit = fetch_blob(&mut fetch, "", &["urn:kept"], vec![q("a", "1")]).await;
    assert_eq!(inline(&hit.status), Code::Ok);
    assert_eq!(hit.blob_digest, Some(d));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn entries_survive_kill_9() {
    let dir = tempfile::tempdir().unwrap();
    let data_dir = dir.path().join("data");
    let server = spawn_server(&data_dir, &dir.path().join("log-1"));
    let (mut fetch, mut push) = asset_clients(&server);
    let (blobs, root) = small_tree(30);
    upload_all(&server, "", &blobs).await;
    push.push_directory(PushDirectoryRequest {
        uris: uris(&["urn:crash"]),
        root_directory_digest: Some(root.clone()),
        ..Default::default()
    })
    .await
    .unwrap();
    assert_eq!(
        inline(&fetch_directory(&mut fetch, "", &["urn:crash"]).await.status),
        Code::Ok
    );
    server.kill();
    let server = spawn_server(&data_dir, &dir.path().join("log-2"));
    let (mut fetch, _) = asset_clients(&server);
    let hit = fetch_directory(&mut fetch, "", &["urn:crash"]).await;
    assert_eq!(inline(&hit.status), Code::Ok, "{}", server.log());
    assert_eq!(hit.root_directory_digest, Some(root));
}

/// Quota and inline limit of the eviction tests: a 600 KiB blob, then a
/// 500 KiB one, do not fit together.
const QUOTA: u64 = 1 << 20;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn evicting_a_referenced_blob_drops_the_entry() {
    let server = TestServer::start_with(|c| {
        c.quota_bytes = QUOTA;
        c.inline_limit = 100 << 10;
    })
    .await;
    let (mut fetch, mut push) = asset_clients(&server);
    let referenced = blob(40, 600 << 10);
    let root = blob(41, 100);
    let (r, d) = (digest(&referenced), digest(&root));
    upload(&mut server.bytestream(), "", &referenced, 64 << 10)
        .await
        .unwrap();
    upload_all(&server, "", std::slice::from_ref(&root)).await;
    push.push_blob(PushBlobRequest {
        uris: uris(&["urn:artifact"]),
        blob_digest: Some(d.clone()),
        references_blobs: vec![r.clone()],
        ..Default::default()
    })
    .await
    .unwrap();
    assert_eq!(
        inline(
            &fetch_blob(&mut fetch, "", &["urn:artifact"], vec![])
                .await
                .status
        ),
        Code::Ok
    );
    // Use the root and the entry (a directory fetch of the same URI reads
    // the entry and nothing else), not the referenced blob; then make room.
    assert!(
        find_missing(&mut server.cas(), std::slice::from_ref(&d))
            .await
            .is_empty()
    );
    let as_dir = fetch_directory(&mut fetch, "", &["urn:artifact"]).await;
    assert_eq!(inline(&as_dir.status), Code::NotFound);
    let filler = blob(42, 500 << 10);
    upload(&mut server.bytestream(), "", &filler, 64 << 10)
        .await
        .unwrap();
    assert_eq!(
        find_missing(&mut server.cas(), &[r.clone(), d.clone()]).await,
        vec![r],
        "the referenced blob was evicted, the root was not"
    );
    assert_blob_miss(&fetch_blob(&mut fetch, "", &["urn:artifact"], vec![]).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_directory_whose_file_was_evicted_is_not_served() {
    let server = TestServer::start_with(|c| {
        c.quota_bytes = QUOTA;
        c.inline_limit = 100 << 10;
    })
    .await;
    let (mut fetch, mut push) = asset_clients(&server);
    let file = blob(50, 600 << 10);
    let f = digest(&file);
    let root = directory(&[("big", &f)], &[]);
    let d = digest(&root);
    upload(&mut server.bytestream(), "", &file, 64 << 10)
        .await
        .unwrap();
    upload_all(&server, "", std::slice::from_ref(&root)).await;
    push.push_directory(PushDirectoryRequest {
        uris: uris(&["urn:tree"]),
        root_directory_digest: Some(d.clone()),
        ..Default::default()
    })
    .await
    .unwrap();
    // Use the root Directory and the entry (a blob fetch of the same URI
    // reads the entry and nothing else), not the file; then make room.
    assert!(
        find_missing(&mut server.cas(), std::slice::from_ref(&d))
            .await
            .is_empty()
    );
    assert_blob_miss(&fetch_blob(&mut fetch, "", &["urn:tree"], vec![]).await);
    let filler = blob(51, 500 << 10);
    upload(&mut server.bytestream(), "", &filler, 64 << 10)
        .await
        .unwrap();
    assert_eq!(
        find_missing(&mut server.cas(), &[f.clone(), d.clone()]).await,
        vec![f],
        "the file was evicted, the root Directory was not"
    );
    let miss = fetch_directory(&mut fetch, "", &["urn:tree"]).await;
    assert_eq!(inline(&miss.status), Code::NotFound);
}

#[tokio::test]
async fn a_checksum_of_a_blob_in_the_cas_answers_without_an_entry() {
    let server = TestServer::start_with(|c| c.asset.origin_fetch = false).await;
    let (mut fetch, _) = asset_clients(&server);
    let data = blob(6, 3000);
    upload_all(&server, "", std::slice::from_ref(&data)).await;
    // One value of several suffices.
    let value = format!("{} {}", sri(b"something else"), sri(&data));
    let hit = fetch_blob(
        &mut fetch,
        "",
        &["https://nowhere.invalid/f"],
        vec![q("checksum.sri", &value)],
    )
    .await;
    assert_eq!(inline(&hit.status), Code::Ok, "{hit:?}");
    assert_eq!(hit.blob_digest, Some(digest(&data)));
    assert_eq!(hit.uri, "https://nowhere.invalid/f");
    let miss = fetch_blob(
        &mut fetch,
        "",
        &["https://nowhere.invalid/f"],
        vec![q("checksum.sri", &sri(b"not stored"))],
    )
    .await;
    assert_blob_miss(&miss);
    assert_code(
        fetch
            .fetch_blob(FetchBlobRequest {
                uris: uris(&["https://nowhere.invalid/f"]),
                qualifiers: vec![q("checksum.sri", "sha256-not*base64")],
                ..Default::default()
            })
            .await,
        Code::InvalidArgument,
    );
}

/// Long enough for a flight to be joined by every concurrent fetch.
pub const ORIGIN_DELAY: Duration = Duration::from_millis(300);

/// `sha256-<base64>` of `bytes`.
pub fn sri(bytes: &[u8]) -> String {
    use base64::Engine as _;
    use sha2::Digest as _;
    format!(
        "sha256-{}",
        base64::engine::general_purpose::STANDARD.encode(sha2::Sha256::digest(bytes))
    )
}

/// An HTTP origin on 127.0.0.1 serving one body at every path after
/// [`ORIGIN_DELAY`], counting requests; dropping it takes it down.
pub struct TestOrigin {
    addr: std::net::SocketAddr,
    requests: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl TestOrigin {
    /// Serves `body` until stopped.
    pub async fn start(body: Vec<u8>) -> Self {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let requests = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let counted = requests.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((mut socket, _)) = listener.accept().await else {
                    return;
                };
                let (body, counted) = (body.clone(), counted.clone());
                tokio::spawn(async move {
                    let mut head = Vec::new();
                    let mut byte = [0u8; 1];
                    while !head.ends_with(b"\r\n\r\n") {
                        if socket.read(&mut byte).await.unwrap_or(0) == 0 {
                            return;
                        }
                        head.push(byte[0]);
                    }
                    counted.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                    tokio::time::sleep(ORIGIN_DELAY).await;
                    let header = format!(
                        "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                        body.len()
                    );
                    let _ = socket.write_all(header.as_bytes()).await;
                    let _ = socket.write_all(&body).await;
                });
            }
        });
        TestOrigin {
            addr,
            requests,
            task,
        }
    }

    /// The URL of `path` on this origin.
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// Requests received so far.
    pub fn requests(&self) -> usize {
        self.requests.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Stops listening: later requests are refused.
    pub fn stop(&self) {
        self.task.abort();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_origin_fetches_share_one_download_that_outlives_the_client() {
    let body = blob(8, 300_000);
    let origin = TestOrigin::start(body.clone()).await;
    let server = TestServer::start_with(|c| {
        c.asset.origin_fetch = true;
        c.asset.origin_fetch_private = true;
    })
    .await;
    let url = origin.url("/archive.tar.gz");
    let qualifiers = vec![q("checksum.sri", &sri(&body)), q(CANONICAL_ID, "archive")];

    // A client that gives up before the download ends does not stop it.
    let (mut fetch, _) = asset_clients(&server);
    let mut impatient = tonic::Request::new(FetchBlobRequest {
        uris: vec![url.clone()],
        qualifiers: qualifiers.clone(),
        ..Default::default()
    });
    impatient.set_timeout(ORIGIN_DELAY / 3);
    let gave_up = fetch.fetch_blob(impatient).await.unwrap_err();
    // tonic reports its own deadline as CANCELLED "Timeout expired".
    assert!(
        gave_up.code() == Code::DeadlineExceeded || gave_up.message().contains("Timeout expired"),
        "{gave_up:?}"
    );

    // Its retries, arriving together, join the download in progress.
    let retries: Vec<_> = (0..8)
        .map(|_| {
            let (mut fetch, url, qualifiers) = (fetch.clone(), url.clone(), qualifiers.clone());
            tokio::spawn(async move { fetch_blob(&mut fetch, "", &[&url], qualifiers).await })
        })
        .collect();
    for retry in retries {
        let answer = retry.await.unwrap();
        assert_eq!(inline(&answer.status), Code::Ok, "{answer:?}");
        assert_eq!(answer.blob_digest, Some(digest(&body)));
        assert_eq!(answer.uri, url);
    }
    assert_eq!(origin.requests(), 1, "one download for every fetch");

    // The origin is gone: the entry is served from the store.
    origin.stop();
    let later = fetch_blob(&mut fetch, "", &[&url], qualifiers).await;
    assert_eq!(inline(&later.status), Code::Ok);
    assert_eq!(origin.requests(), 1);
    let (read, _) = read_blob(
        &mut server.bytestream(),
        &read_name("", &digest(&body)),
        0,
        0,
    )
    .await
    .unwrap();
    assert!(read == body);
}
