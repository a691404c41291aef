//! Remote Asset through the proxy: Outpost → Outpost round trips (a
//! standalone Outpost as the upstream), content the upstream CAS lacks
//! uploaded before a forwarded Push, content only upstream brought in, an
//! upstream without the asset API (asked once), and a failed upstream Push.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use bazel_remote_apis::build::bazel::remote::asset::v1::{
    FetchBlobRequest, FetchBlobResponse, FetchDirectoryRequest, FetchDirectoryResponse,
    PushBlobRequest, PushBlobResponse, PushDirectoryRequest, PushDirectoryResponse,
    fetch_server::{Fetch as FetchService, FetchServer},
    push_server::{Push as PushService, PushServer},
};
use outpost::config::{Config, UpstreamConfig, UpstreamSection};
use outpost::server::RunningServer;
use tonic::transport::Channel;
use tonic::{Code, Request, Response, Status};

use super::asset::*;
use crate::common::fake_upstream::FakeUpstream;
use crate::common::*;

/// The upstream settings for an Outpost at `url`.
fn upstream_at(url: &str) -> UpstreamConfig {
    UpstreamConfig::resolve(UpstreamSection::default(), Some(url.to_string()))
        .expect("valid upstream")
        .expect("an upstream")
}

/// A standalone Outpost and a proxy in front of it.
async fn proxy_of(upstream: &TestServer) -> TestServer {
    let config = upstream_at(&format!("grpc://{}", upstream.addr()));
    TestServer::start_with(|c| c.upstream = Some(config)).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn push_through_one_outpost_and_fetch_through_another() {
    let upstream = TestServer::start().await;
    let pusher = proxy_of(&upstream).await;
    let fetcher = proxy_of(&upstream).await;
    let data = blob(60, 300 << 10);
    let (tree, root) = small_tree(61);
    upload_all(&pusher, "", std::slice::from_ref(&data)).await;
    upload_all(&pusher, "", &tree).await;
    let (_, mut push) = asset_clients(&pusher);
    push_blob(
        &mut push,
        "",
        &["urn:artifact:a"],
        vec![q("k", "v")],
        &digest(&data),
    )
    .await
    .unwrap();
    push.push_directory(PushDirectoryRequest {
        uris: uris(&["urn:source:a"]),
        root_directory_digest: Some(root.clone()),
        ..Default::default()
    })
    .await
    .unwrap();

    // The upstream really got both pushes.
    assert_eq!(counter(&upstream, "asset_pushes").await, 2);
    let (mut at_upstream, _) = asset_clients(&upstream);
    let direct = fetch_blob(&mut at_upstream, "", &["urn:artifact:a"], vec![q("k", "v")]).await;
    assert_eq!(inline(&direct.status), Code::Ok);

    // A second Outpost with an empty store is served through the upstream.
    let (mut fetch, _) = asset_clients(&fetcher);
    let blob_hit = fetch_blob(&mut fetch, "", &["urn:artifact:a"], vec![q("k", "v")]).await;
    assert_eq!(inline(&blob_hit.status), Code::Ok, "{blob_hit:?}");
    assert_eq!(blob_hit.blob_digest, Some(digest(&data)));
    assert_eq!(blob_hit.uri, "urn:artifact:a");
    let dir_hit = fetch_directory(&mut fetch, "", &["urn:source:a"]).await;
    assert_eq!(inline(&dir_hit.status), Code::Ok, "{dir_hit:?}");
    assert_eq!(dir_hit.root_directory_digest, Some(root));
    assert_eq!(counter(&fetcher, "asset_fetch_upstream_hits").await, 2);

    // Both were pulled in before the answer: with the upstream gone, the
    // entries and every blob are served locally.
    upstream.stop().await;
    let again = fetch_blob(&mut fetch, "", &["urn:artifact:a"], vec![q("k", "v")]).await;
    assert_eq!(inline(&again.status), Code::Ok);
    let dir_again = fetch_directory(&mut fetch, "", &["urn:source:a"]).await;
    assert_eq!(inline(&dir_again.status), Code::Ok);
    assert_eq!(counter(&fetcher, "asset_fetch_hits").await, 2);
    let mut bs = fetcher.bytestream();
    for content in tree.iter().chain(std::iter::once(&data)) {
        let (read, _) = read_blob(&mut bs, &read_name("", &digest(content)), 0, 0)
            .await
            .expect("served locally");
        assert!(read == *content);
    }
}

/// A client for a [`RunningServer`] started by the test itself.
struct Running(Channel);

impl Clients for Running {
    fn channel(&self) -> Channel {
        self.0.clone()
    }
}

async fn connect(server: &RunningServer) -> Running {
    Running(
        outpost::client::connect(&format!("grpc://{}", server.addr))
            .await
            .expect("connects"),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forwarded_push_first_uploads_what_the_upstream_cas_lacks() {
    let upstream = TestServer::start().await;
    let dir = tempfile::tempdir().unwrap();
    let data_dir = dir.path().join("data");
    // Content stored while the front Outpost ran alone.
    let data = blob(70, 2 << 20);
    let (tree, root) = small_tree(71);
    let alone = RunningServer::start(&Config::for_tests(&data_dir))
        .await
        .unwrap();
    let client = connect(&alone).await;
    upload(&mut client.bytestream(), "", &data, 256 << 10)
        .await
        .unwrap();
    upload_all(&client, "", &tree).await;
    drop(client);
    alone.stop().await.unwrap();

    let mut config = Config::for_tests(&data_dir);
    config.upstream = Some(upstream_at(&format!("grpc://{}", upstream.addr())));
    let front = RunningServer::start(&config).await.unwrap();
    let client = connect(&front).await;
    let all: Vec<re::Digest> = tree
        .iter()
        .chain(std::iter::once(&data))
        .map(|b| digest(b))
        .collect();
    assert_eq!(
        find_missing(&mut upstream.cas(), &all).await.len(),
        all.len()
    );
    let (_, mut push) = asset_clients(&client);
    push.push_blob(PushBlobRequest {
        uris: uris(&["urn:artifact:b"]),
        blob_digest: Some(digest(&data)),
        references_directories: vec![root],
        ..Default::default()
    })
    .await
    .unwrap();
    assert!(
        find_missing(&mut upstream.cas(), &all).await.is_empty(),
        "the upstream CAS got every blob before the push"
    );
    let (mut at_upstream, _) = asset_clients(&upstream);
    let hit = fetch_blob(&mut at_upstream, "", &["urn:artifact:b"], vec![]).await;
    assert_eq!(inline(&hit.status), Code::Ok);
    drop(client);
    front.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_push_of_content_held_only_upstream_brings_it_in() {
    let upstream = TestServer::start().await;
    let front = proxy_of(&upstream).await;
    let (tree, root) = small_tree(80);
    upload_all(&upstream, "", &tree).await;
    let (mut fetch, mut push) = asset_clients(&front);
    push.push_directory(PushDirectoryRequest {
        uris: uris(&["urn:source:c"]),
        root_directory_digest: Some(root.clone()),
        ..Default::default()
    })
    .await
    .unwrap();
    upstream.stop().await;
    let hit = fetch_directory(&mut fetch, "", &["urn:source:c"]).await;
    assert_eq!(
        inline(&hit.status),
        Code::Ok,
        "served from the front's own store"
    );
    let missing = find_missing(
        &mut front.cas(),
        &tree.iter().map(|b| digest(b)).collect::<Vec<_>>(),
    )
    .await;
    assert!(missing.is_empty());
}

/// A Remote Asset server that counts its calls and answers each with `code`.
#[derive(Clone)]
struct FakeAsset {
    fetches: Arc<AtomicUsize>,
    pushes: Arc<AtomicUsize>,
    code: Code,
}

impl FakeAsset {
    /// Serves on 127.0.0.1:0; returns its `http://` address.
    async fn start(code: Code) -> (Self, String) {
        let fake = FakeAsset {
            fetches: Arc::default(),
            pushes: Arc::default(),
            code,
        };
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let router = tonic::transport::Server::builder()
            .add_service(FetchServer::new(fake.clone()))
            .add_service(PushServer::new(fake.clone()));
        tokio::spawn(
            router.serve_with_incoming(tonic::transport::server::TcpIncoming::from(listener)),
        );
        (fake, format!("http://{addr}"))
    }

    fn answer<T>(&self, calls: &AtomicUsize) -> Result<Response<T>, Status> {
        calls.fetch_add(1, Ordering::SeqCst);
        Err(Status::new(self.code, "injected by the test"))
    }
}

#[tonic::async_trait]
impl FetchService for FakeAsset {
    async fn fetch_blob(
        &self,
        _: Request<FetchBlobRequest>,
    ) -> Result<Response<FetchBlobResponse>, Status> {
        self.answer(&self.fetches)
    }
    async fn fetch_directory(
        &self,
        _: Request<FetchDirectoryRequest>,
    ) -> Result<Response<FetchDirectoryResponse>, Status> {
        self.answer(&self.fetches)
    }
}

#[tonic::async_trait]
impl PushService for FakeAsset {
    async fn push_blob(
        &self,
        _: Request<PushBlobRequest>,
    ) -> Result<Response<PushBlobResponse>, Status> {
        self.answer(&self.pushes)
    }
    async fn push_directory(
        &self,
        _: Request<PushDirectoryRequest>,
    ) -> Result<Response<PushDirectoryResponse>, Status> {
        self.answer(&self.pushes)
    }
}

/// A proxy whose CAS upstream is `cas` and whose asset endpoint is `asset`.
async fn proxy_with_asset(cas: &FakeUpstream, asset: &str) -> TestServer {
    let asset = asset.to_string();
    start_proxy(cas, |u| u.asset_uri = asset, |_| {}).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_without_the_asset_api_is_asked_once_and_pushes_stay_local() {
    let cas = FakeUpstream::start().await;
    let (fake, url) = FakeAsset::start(Code::Unimplemented).await;
    let proxy = proxy_with_asset(&cas, &url).await;
    let data = blob(90, 100);
    let d = digest(&data);
    upload_all(&proxy, "", std::slice::from_ref(&data)).await;
    let (mut fetch, mut push) = asset_clients(&proxy);
    for uri in ["urn:one", "urn:two"] {
        push_blob(&mut push, "", &[uri], vec![], &d).await.unwrap();
    }
    let hit = fetch_blob(&mut fetch, "", &["urn:two"], vec![]).await;
    assert_eq!(inline(&hit.status), Code::Ok);
    assert_blob_miss(&fetch_blob(&mut fetch, "", &["urn:unknown"], vec![]).await);
    assert_eq!(fake.pushes.load(Ordering::SeqCst), 1, "asked once");
    assert_eq!(fake.fetches.load(Ordering::SeqCst), 0, "remembered");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reapi_only_upstream_answers_unimplemented_and_outpost_carries_on() {
    // The fake REAPI upstream serves no Remote Asset at all (like BuildGrid).
    let cas = FakeUpstream::start().await;
    let proxy = start_proxy(&cas, |_| {}, |_| {}).await;
    let data = blob(91, 100);
    let d = digest(&data);
    upload_all(&proxy, "", std::slice::from_ref(&data)).await;
    let (mut fetch, mut push) = asset_clients(&proxy);
    assert_blob_miss(&fetch_blob(&mut fetch, "", &["urn:x"], vec![]).await);
    push_blob(&mut push, "", &["urn:x"], vec![], &d)
        .await
        .unwrap();
    let hit = fetch_blob(&mut fetch, "", &["urn:x"], vec![]).await;
    assert_eq!(inline(&hit.status), Code::Ok);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_upstream_push_fails_the_push_and_records_nothing() {
    let cas = FakeUpstream::start().await;
    let (fake, url) = FakeAsset::start(Code::PermissionDenied).await;
    let proxy = proxy_with_asset(&cas, &url).await;
    let data = blob(92, 100);
    let d = digest(&data);
    upload_all(&proxy, "", std::slice::from_ref(&data)).await;
    let (mut fetch, mut push) = asset_clients(&proxy);
    let status = push_blob(&mut push, "", &["urn:denied"], vec![], &d)
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied, "{status:?}");
    assert_eq!(fake.pushes.load(Ordering::SeqCst), 1);
    // Nothing recorded: the fetch asks the upstream (which fails too) and
    // answers a miss.
    assert_blob_miss(&fetch_blob(&mut fetch, "", &["urn:denied"], vec![]).await);
    assert_eq!(fake.fetches.load(Ordering::SeqCst), 1);
    assert_eq!(counter(&proxy, "asset_pushes").await, 0);
}
