//! Origin downloads (`asset::origin::OriginFetcher`) against a real HTTP
//! server on 127.0.0.1, into a real LocalStore: checksums, mirrors, size and
//! time bounds, the host policy (private addresses, allow/deny lists,
//! redirects) and where request headers go.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use base64::Engine as _;
use bytes::Bytes;
use outpost::asset::origin::{OriginFetcher, OriginOutcome, OriginRequest};
use outpost::asset::sri::Sri;
use outpost::config::AssetConfig;
use outpost::context::RequestContext;
use outpost::digest::{Digest, DigestFunction};
use outpost::stats::Stats;
use outpost::store::local::{LocalStore, LocalStoreOptions};
use outpost::store::{BlobStore, read_to_bytes};
use sha2::{Digest as _, Sha256, Sha512};
use tonic::Code;

use crate::common::*;

/// Size of the served blob: above the store's inline limit, so it becomes a file.
const BLOB_SIZE: usize = (1 << 20) + 12_345;

/// What the origin server was asked: (path, value of `x-token`).
type Seen = Arc<Mutex<Vec<(String, Option<String>)>>>;

/// The test's HTTP origin.
#[derive(Clone)]
struct Origin {
    port: u16,
    blob: Bytes,
    seen: Seen,
    /// Where `/redirect` points.
    redirect_to: Arc<Mutex<String>>,
}

impl Origin {
    async fn start() -> Origin {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let origin = Origin {
            port: listener.local_addr().unwrap().port(),
            blob: Bytes::from(blob(7, BLOB_SIZE)),
            seen: Seen::default(),
            redirect_to: Arc::default(),
        };
        let app = axum::Router::new()
            .fallback(serve)
            .with_state(origin.clone());
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        origin
    }

    /// `http://127.0.0.1:PORT{path}`.
    fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    /// `http://localhost:PORT{path}` (a name, resolved through DNS).
    fn named_url(&self, path: &str) -> String {
        format!("http://localhost:{}{path}", self.port)
    }

    fn seen(&self) -> Vec<(String, Option<String>)> {
        self.seen.lock().unwrap().clone()
    }

    fn paths_seen(&self) -> Vec<String> {
        self.seen().into_iter().map(|(p, _)| p).collect()
    }
}

/// The origin's one handler: records the request, then answers by path.
async fn serve(State(origin): State<Origin>, uri: Uri, headers: HeaderMap) -> Response {
    let token = headers
        .get("x-token")
        .map(|v| v.to_str().unwrap().to_string());
    origin
        .seen
        .lock()
        .unwrap()
        .push((uri.path().to_string(), token));
    match uri.path() {
        "/blob" => origin.blob.clone().into_response(),
        "/forbidden" => StatusCode::FORBIDDEN.into_response(),
        "/broken" => StatusCode::INTERNAL_SERVER_ERROR.into_response(),
        "/redirect" => {
            let to = origin.redirect_to.lock().unwrap().clone();
            (StatusCode::FOUND, [(header::LOCATION, to)]).into_response()
        }
        "/loop" => (StatusCode::FOUND, [(header::LOCATION, "/loop")]).into_response(),
        // No Content-Length: the size is known only by counting.
        "/chunked" => {
            let pieces: Vec<_> = origin
                .blob
                .chunks(64 << 10)
                .map(|c| Ok::<_, std::io::Error>(Bytes::copy_from_slice(c)))
                .collect();
            let stream = futures::stream::iter(pieces);
            Body::from_stream(stream).into_response()
        }
        "/slow" => {
            tokio::time::sleep(Duration::from_secs(30)).await;
            origin.blob.clone().into_response()
        }
        _ => StatusCode::NOT_FOUND.into_response(),
    }
}

/// A fetcher over a real LocalStore in a temporary directory.
struct Fixture {
    _dir: tempfile::TempDir,
    store: Arc<LocalStore>,
    stats: Arc<Stats>,
    fetcher: OriginFetcher,
    spool: PathBuf,
}

/// The defaults, with private addresses allowed (the origin is on 127.0.0.1).
fn local_origin_config() -> AssetConfig {
    AssetConfig {
        origin_fetch_private: true,
        ..AssetConfig::for_tests()
    }
}

fn fixture(config: AssetConfig) -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let stats = Arc::new(Stats::default());
    let options = LocalStoreOptions {
        dir: dir.path().join("store"),
        quota_bytes: 1 << 30,
        inline_limit: 1 << 20,
        sync: false,
    };
    let store = Arc::new(LocalStore::open(options, stats.clone()).unwrap());
    let spool = dir.path().join("spool");
    let fetcher = OriginFetcher::new(config, store.clone(), stats.clone(), spool.clone()).unwrap();
    Fixture {
        _dir: dir,
        store,
        stats,
        fetcher,
        spool,
    }
}

fn sri(algorithm: &str, data: &[u8]) -> String {
    let hash = match algorithm {
        "sha256" => Sha256::digest(data).to_vec(),
        _ => Sha512::digest(data).to_vec(),
    };
    let b64 = base64::engine::general_purpose::STANDARD.encode(hash);
    format!("{algorithm}-{b64}")
}

fn request(uris: &[String], checksum: Option<&str>) -> OriginRequest {
    OriginRequest {
        uris: uris.to_vec(),
        headers: vec![],
        checksums: checksum.map_or(vec![], |c| Sri::parse_list(c).unwrap()),
        timeout: Duration::from_secs(20),
        digest_function: DigestFunction::Sha256,
    }
}

fn ctx() -> RequestContext {
    RequestContext::for_instance("")
}

fn digest_of(data: &[u8]) -> Digest {
    Digest::of(DigestFunction::Sha256, data)
}

impl Fixture {
    async fn fetch(&self, request: &OriginRequest) -> OriginOutcome {
        self.fetcher.fetch(&ctx(), request).await.unwrap()
    }

    async fn holds(&self, digest: &Digest) -> bool {
        self.store
            .find_missing(&ctx(), &[*digest])
            .await
            .unwrap()
            .is_empty()
    }
}

/// The files left in the spool directory.
fn spool_files(dir: &Path) -> usize {
    std::fs::read_dir(dir).unwrap().count()
}

/// The code and message of a failure; panics on success.
fn failure(outcome: OriginOutcome) -> (String, Code, String) {
    match outcome {
        OriginOutcome::Failed { uri, code, message } => (uri, code, message),
        other => panic!("expected a failure, got {other:?}"),
    }
}

fn fetched(outcome: OriginOutcome) -> (String, Digest) {
    match outcome {
        OriginOutcome::Fetched { uri, digest } => (uri, digest),
        other => panic!("expected a download, got {other:?}"),
    }
}

/// Checksums that send a download through each path: one sha256 value and
/// a Content-Length stream straight into the store; anything else (another
/// algorithm, several values, no Content-Length) goes through a spool file.
fn both_paths(origin: &Origin, data: &[u8]) -> [(String, String); 3] {
    [
        (origin.url("/blob"), sri("sha256", data)),
        (
            origin.url("/blob"),
            format!("sha1-AAAA {}", sri("sha512", data)),
        ),
        (origin.url("/chunked"), sri("sha256", data)),
    ]
}

#[tokio::test]
async fn a_blob_matching_its_checksum_is_stored_and_readable() {
    let origin = Origin::start().await;
    for (url, checksum) in both_paths(&origin, &origin.blob) {
        let f = fixture(local_origin_config());
        let (uri, digest) = fetched(
            f.fetch(&request(std::slice::from_ref(&url), Some(&checksum)))
                .await,
        );
        assert_eq!(uri, url);
        assert_eq!(digest, digest_of(&origin.blob));
        let stored = read_to_bytes(f.store.as_ref(), &ctx(), &digest)
            .await
            .unwrap();
        assert_eq!(stored, origin.blob);
        assert_eq!(spool_files(&f.spool), 0);
        assert_eq!(Stats::get(&f.stats.origin_fetches), 1);
        assert_eq!(Stats::get(&f.stats.origin_fetch_failures), 0);
        assert_eq!(Stats::get(&f.stats.origin_bytes), BLOB_SIZE as u64);
    }
}

#[tokio::test]
async fn a_checksum_mismatch_is_aborted_and_stores_nothing() {
    let origin = Origin::start().await;
    for (i, (url, wrong)) in both_paths(&origin, b"something else")
        .into_iter()
        .enumerate()
    {
        let f = fixture(local_origin_config());
        let (uri, code, message) = failure(
            f.fetch(&request(std::slice::from_ref(&url), Some(&wrong)))
                .await,
        );
        assert_eq!((uri, code), (url, Code::Aborted), "{message}");
        assert!(message.contains("does not match checksum.sri"), "{message}");
        assert!(!f.holds(&digest_of(&origin.blob)).await);
        assert_eq!(spool_files(&f.spool), 0);
        assert_eq!(Stats::get(&f.stats.origin_fetch_failures), 1);
        // Only the direct path hands the content to the store's verification.
        let refused_by_store = Stats::get(&f.stats.digest_mismatches);
        assert_eq!(refused_by_store, u64::from(i == 0), "case {i}");
    }
}

#[tokio::test]
async fn content_without_a_checksum_is_still_fetched() {
    let origin = Origin::start().await;
    let f = fixture(local_origin_config());
    let (_, digest) = fetched(f.fetch(&request(&[origin.url("/chunked")], None)).await);
    assert_eq!(digest, digest_of(&origin.blob));
    assert!(f.holds(&digest).await);
}

#[tokio::test]
async fn a_missing_first_mirror_falls_back_to_the_second() {
    let origin = Origin::start().await;
    let f = fixture(local_origin_config());
    let uris = [origin.url("/missing"), origin.url("/blob")];
    let checksum = sri("sha256", &origin.blob);
    let (uri, digest) = fetched(f.fetch(&request(&uris, Some(&checksum))).await);
    assert_eq!(uri, uris[1]);
    assert!(f.holds(&digest).await);
    assert_eq!(origin.paths_seen(), ["/missing", "/blob"]);
}

#[tokio::test]
async fn when_every_mirror_fails_the_last_failure_is_reported() {
    let origin = Origin::start().await;
    let f = fixture(local_origin_config());
    let cases = [
        ("/missing", Code::NotFound),
        ("/forbidden", Code::PermissionDenied),
        ("/broken", Code::NotFound),
        ("/loop", Code::NotFound),
    ];
    for (path, expected) in cases {
        let uris = [
            "ftp://example.com/x".to_string(),
            origin.url("/missing"),
            origin.url(path),
        ];
        let (uri, code, message) = failure(f.fetch(&request(&uris, None)).await);
        assert_eq!(
            (uri.as_str(), code),
            (uris[2].as_str(), expected),
            "{message}"
        );
    }
    // Nothing listens on a port just released: connection refused.
    let closed = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let uri = format!("http://127.0.0.1:{closed}/x");
    let (_, code, message) = failure(f.fetch(&request(&[uri], None)).await);
    assert_eq!(code, Code::NotFound, "{message}");
    // Only schemes Outpost cannot download.
    let (_, code, _) = failure(
        f.fetch(&request(&["file:///etc/passwd".into()], None))
            .await,
    );
    assert_eq!(code, Code::NotFound);
}

#[tokio::test]
async fn over_max_size_is_resource_exhausted_and_leaves_nothing_behind() {
    let origin = Origin::start().await;
    let f = fixture(AssetConfig {
        max_size: 100_000,
        ..local_origin_config()
    });
    // Announced by Content-Length, and found by counting.
    for path in ["/blob", "/chunked"] {
        let (_, code, message) = failure(f.fetch(&request(&[origin.url(path)], None)).await);
        assert_eq!(code, Code::ResourceExhausted, "{path}: {message}");
        assert!(!f.holds(&digest_of(&origin.blob)).await);
        assert_eq!(spool_files(&f.spool), 0);
    }
}

#[tokio::test]
async fn private_addresses_need_the_switch_or_a_listing() {
    let origin = Origin::start().await;
    // Refused: a literal loopback IP, and a name that resolves to one.
    let refused = fixture(AssetConfig::for_tests());
    for uri in [origin.url("/blob"), origin.named_url("/blob")] {
        let (_, code, message) = failure(refused.fetch(&request(&[uri], None)).await);
        assert_eq!(code, Code::PermissionDenied, "{message}");
        assert!(message.contains("origin_fetch_private"), "{message}");
    }
    assert!(origin.seen().is_empty(), "no request reached the origin");
    // Allowed: the switch, or the host listed.
    let listed = |hosts: &[&str]| AssetConfig {
        allow_hosts: hosts.iter().map(|h| h.to_string()).collect(),
        ..AssetConfig::for_tests()
    };
    let cases = [
        (local_origin_config(), origin.url("/blob")),
        (listed(&["127.0.0.1"]), origin.url("/blob")),
        (listed(&["localhost"]), origin.named_url("/blob")),
    ];
    for (config, uri) in cases {
        let f = fixture(config);
        fetched(f.fetch(&request(&[uri], None)).await);
    }
}

#[tokio::test]
async fn deny_hosts_wins_over_everything() {
    let origin = Origin::start().await;
    let f = fixture(AssetConfig {
        allow_hosts: vec!["127.0.0.1".into()],
        deny_hosts: vec!["127.0.0.1".into()],
        ..local_origin_config()
    });
    let (_, code, message) = failure(f.fetch(&request(&[origin.url("/blob")], None)).await);
    assert_eq!(code, Code::PermissionDenied);
    assert!(message.contains("deny_hosts"), "{message}");
    assert!(origin.seen().is_empty());
}

#[tokio::test]
async fn a_redirect_to_a_refused_host_is_refused() {
    let origin = Origin::start().await;
    *origin.redirect_to.lock().unwrap() = origin.named_url("/blob");
    let f = fixture(AssetConfig {
        allow_hosts: vec!["127.0.0.1".into()],
        ..AssetConfig::for_tests()
    });
    let (_, code, message) = failure(f.fetch(&request(&[origin.url("/redirect")], None)).await);
    assert_eq!(code, Code::PermissionDenied, "{message}");
    assert_eq!(origin.paths_seen(), ["/redirect"]);
}

#[tokio::test]
async fn headers_go_only_to_their_uri_and_its_origin() {
    let origin = Origin::start().await;
    let f = fixture(local_origin_config());
    let token = |v: &str| vec![("x-token".to_string(), v.to_string())];
    let mut req = request(&[origin.url("/missing"), origin.url("/redirect")], None);
    req.headers = vec![token("one"), token("two")];
    // A redirect on the same origin keeps the headers.
    *origin.redirect_to.lock().unwrap() = "/blob".into();
    fetched(f.fetch(&req).await);
    let some = |s: &str| Some(s.to_string());
    let expected = [
        ("/missing".to_string(), some("one")),
        ("/redirect".to_string(), some("two")),
        ("/blob".to_string(), some("two")),
    ];
    assert_eq!(origin.seen(), expected);
    // One to another origin (localhost is another host) drops them.
    origin.seen.lock().unwrap().clear();
    *origin.redirect_to.lock().unwrap() = origin.named_url("/blob");
    fetched(f.fetch(&req).await);
    assert_eq!(origin.seen()[2], ("/blob".to_string(), None));
}

#[tokio::test]
async fn messages_never_show_credentials_in_the_uri() {
    let origin = Origin::start().await;
    let f = fixture(local_origin_config());
    let uri = format!(
        "http://user:pa55word@127.0.0.1:{}/missing?token=s3cret",
        origin.port
    );
    let (returned, code, message) =
        failure(f.fetch(&request(std::slice::from_ref(&uri), None)).await);
    assert_eq!(code, Code::NotFound);
    assert_eq!(returned, uri, "the response names the client's own URI");
    assert!(
        !message.contains("pa55word") && !message.contains("s3cret"),
        "{message}"
    );
    assert!(message.contains("/missing"), "{message}");
}

#[tokio::test]
async fn the_request_timeout_bounds_the_download() {
    let origin = Origin::start().await;
    let f = fixture(local_origin_config());
    let mut req = request(&[origin.url("/slow"), origin.url("/blob")], None);
    req.timeout = Duration::from_millis(300);
    let started = Instant::now();
    let (uri, code, message) = failure(f.fetch(&req).await);
    assert_eq!(
        (uri.as_str(), code),
        (req.uris[0].as_str(), Code::DeadlineExceeded)
    );
    assert!(message.contains("timeout"), "{message}");
    assert!(started.elapsed() < Duration::from_secs(5));
    assert_eq!(spool_files(&f.spool), 0);
}

#[tokio::test]
async fn origin_fetch_off_downloads_nothing() {
    let origin = Origin::start().await;
    let f = fixture(AssetConfig {
        origin_fetch: false,
        ..local_origin_config()
    });
    let (_, code, _) = failure(f.fetch(&request(&[origin.url("/blob")], None)).await);
    assert_eq!(code, Code::PermissionDenied);
    assert!(origin.seen().is_empty());
}

#[tokio::test]
async fn the_spool_directory_is_emptied_at_start() {
    let dir = tempfile::tempdir().unwrap();
    let spool = dir.path().join("spool");
    std::fs::create_dir_all(&spool).unwrap();
    std::fs::write(spool.join("download-3"), b"left by a crash").unwrap();
    let stats = Arc::new(Stats::default());
    let options = LocalStoreOptions {
        dir: dir.path().join("store"),
        quota_bytes: 1 << 30,
        inline_limit: 1 << 20,
        sync: false,
    };
    let store = Arc::new(LocalStore::open(options, stats.clone()).unwrap());
    let _fetcher = OriginFetcher::new(AssetConfig::for_tests(), store, stats, spool.clone());
    assert_eq!(spool_files(&spool), 0);
}

#[tokio::test]
async fn downloads_are_hashed_and_stored_in_the_request_digest_function() {
    let origin = Origin::start().await;
    let cases = [
        // A checksum in the request's function: straight into the store,
        // whose verification refuses a mismatch.
        (DigestFunction::Sha512, sri("sha512", &origin.blob), true),
        // Another algorithm: through the spool, stored in the function asked.
        (DigestFunction::Blake3, sri("sha256", &origin.blob), false),
    ];
    for (function, checksum, direct) in cases {
        let f = fixture(local_origin_config());
        let mut req = request(&[origin.url("/blob")], Some(&checksum));
        req.digest_function = function;
        let (_, digest) = fetched(f.fetch(&req).await);
        assert_eq!(digest, Digest::of(function, &origin.blob), "{function:?}");
        assert!(f.holds(&digest).await);
        assert_eq!(spool_files(&f.spool), 0);

        let f = fixture(local_origin_config());
        let wrong = if direct {
            sri("sha512", b"something else")
        } else {
            sri("sha256", b"something else")
        };
        let mut req = request(&[origin.url("/blob")], Some(&wrong));
        req.digest_function = function;
        let (_, code, message) = failure(f.fetch(&req).await);
        assert_eq!(code, Code::Aborted, "{message}");
        assert!(!f.holds(&Digest::of(function, &origin.blob)).await);
        let refused_by_store = Stats::get(&f.stats.digest_mismatches);
        assert_eq!(refused_by_store, u64::from(direct), "{function:?}");
    }
}
