//! Authentication and roles on Outpost's own listener: every role against
//! every RPC, wrong, missing and revoked tokens, htpasswd, the brute-force
//! slow-down, and credentials kept away from the upstream (the CLI and the
//! log: `auth_cli.rs`).
//!
//! Plain TCP on loopback throughout: "another machine" is simulated with
//! `require_on_loopback = true`. Calls go through a raw gRPC client so one
//! helper reaches every method; an empty message decodes as any request.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use base64::Engine as _;
use outpost::admin_proto::{GetStatsRequest, GetStatsResponse};
use outpost::auth::Role;
use outpost::auth::throttle::{FIRST_DELAY, FREE_FAILURES};
use tonic::Code;
use tonic::codegen::http::uri::PathAndQuery;
use tonic::transport::Channel;

use crate::common::*;

/// One unary call of `path` (any method: streaming ones answer their first
/// message or their status), with `authorization` when given.
pub(crate) async fn unary<Req, Resp>(
    channel: &Channel,
    path: &str,
    authorization: Option<&str>,
    message: Req,
) -> Result<Resp, tonic::Status>
where
    Req: prost::Message + Send + Sync + 'static,
    Resp: prost::Message + Default + Send + Sync + 'static,
{
    let mut grpc = tonic::client::Grpc::new(channel.clone());
    grpc.ready().await.expect("channel ready");
    let mut request = tonic::Request::new(message);
    if let Some(value) = authorization {
        request
            .metadata_mut()
            .insert("authorization", value.parse().unwrap());
    }
    let path = PathAndQuery::try_from(path.to_string()).unwrap();
    let call = grpc.unary(
        request,
        path,
        tonic_prost::ProstCodec::<Req, Resp>::default(),
    );
    tokio::time::timeout(Duration::from_secs(20), call)
        .await
        .expect("the call is answered")
        .map(tonic::Response::into_inner)
}

/// The code an empty request to `path` gets.
pub(crate) async fn code(channel: &Channel, path: &str, authorization: Option<&str>) -> Code {
    match unary::<(), ()>(channel, path, authorization, ()).await {
        Ok(()) => Code::Ok,
        Err(status) => status.code(),
    }
}

/// `Bearer <token>`.
pub(crate) fn bearer(token: &str) -> String {
    format!("Bearer {token}")
}

/// `Basic base64(user:password)`.
pub(crate) fn basic(user: &str, password: &str) -> String {
    let encoded = base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"));
    format!("Basic {encoded}")
}

/// The server's counters, asked with `authorization`.
async fn stats_as(server: &TestServer, authorization: &str) -> GetStatsResponse {
    unary(
        &server.channel(),
        "/outpost.admin.v1.Admin/GetStats",
        Some(authorization),
        GetStatsRequest {},
    )
    .await
    .expect("GetStats")
}

fn counter(stats: &GetStatsResponse, name: &str) -> u64 {
    *stats
        .metrics
        .get(name)
        .unwrap_or_else(|| panic!("no {name}"))
}

/// A tokens file in `dir` with one token per (name, role, write_ac).
fn tokens_file(dir: &Path, specs: &[(&str, Role, bool)]) -> (PathBuf, Vec<String>) {
    let path = dir.join("tokens");
    let tokens = specs
        .iter()
        .map(|(name, role, write_ac)| {
            outpost::cli::token::add(&path, name, *role, *write_ac).unwrap()
        })
        .collect();
    (path, tokens)
}

/// How a call came out, as far as authentication is concerned.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Outcome {
    /// UNAUTHENTICATED.
    Unauthenticated,
    /// PERMISSION_DENIED.
    Denied,
    /// Anything else: the call got past authentication.
    Passed,
}

fn outcome(code: Code) -> Outcome {
    match code {
        Code::Unauthenticated => Outcome::Unauthenticated,
        Code::PermissionDenied => Outcome::Denied,
        _ => Outcome::Passed,
    }
}

/// What a method needs: the least role, and whether write-ac too.
type Needs = (Role, bool);
const R: Needs = (Role::Read, false);
const W: Needs = (Role::Write, false);
const WAC: Needs = (Role::Write, true);
const X: Needs = (Role::Execute, false);

/// The table, written out here, not taken from the code under test.
const METHODS: &[(&str, Needs)] = &[
    (
        "/build.bazel.remote.execution.v2.Capabilities/GetCapabilities",
        R,
    ),
    (
        "/build.bazel.remote.execution.v2.ContentAddressableStorage/FindMissingBlobs",
        R,
    ),
    (
        "/build.bazel.remote.execution.v2.ContentAddressableStorage/BatchReadBlobs",
        R,
    ),
    (
        "/build.bazel.remote.execution.v2.ContentAddressableStorage/GetTree",
        R,
    ),
    (
        "/build.bazel.remote.execution.v2.ContentAddressableStorage/BatchUpdateBlobs",
        W,
    ),
    (
        "/build.bazel.remote.execution.v2.ActionCache/GetActionResult",
        R,
    ),
    (
        "/build.bazel.remote.execution.v2.ActionCache/UpdateActionResult",
        WAC,
    ),
    ("/build.bazel.remote.execution.v2.Execution/Execute", X),
    (
        "/build.bazel.remote.execution.v2.Execution/WaitExecution",
        X,
    ),
    ("/google.bytestream.ByteStream/Read", R),
    ("/google.bytestream.ByteStream/Write", W),
    ("/google.bytestream.ByteStream/QueryWriteStatus", W),
    ("/google.longrunning.Operations/GetOperation", X),
    ("/google.longrunning.Operations/ListOperations", X),
    ("/google.longrunning.Operations/CancelOperation", X),
    ("/google.longrunning.Operations/DeleteOperation", X),
    ("/google.longrunning.Operations/WaitOperation", X),
    ("/build.bazel.remote.asset.v1.Fetch/FetchBlob", R),
    ("/build.bazel.remote.asset.v1.Fetch/FetchDirectory", R),
    ("/build.bazel.remote.asset.v1.Push/PushBlob", W),
    ("/build.bazel.remote.asset.v1.Push/PushDirectory", W),
    (
        "/build.bazel.remote.logstream.v1.LogStreamService/CreateLogStream",
        W,
    ),
    ("/outpost.admin.v1.Admin/GetStats", R),
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_role_against_every_rpc() {
    let dir = tempfile::tempdir().unwrap();
    let creds: &[(&str, Role, bool)] = &[
        ("reader", Role::Read, false),
        ("writer", Role::Write, false),
        ("developer", Role::Execute, false),
        ("publisher", Role::Write, true),
        ("ci", Role::Execute, true),
    ];
    let (path, tokens) = tokens_file(dir.path(), creds);
    let fake = fake_upstream::FakeUpstream::start().await;
    // With an upstream, so Execution and Operations are served too.
    let server = start_proxy(
        &fake,
        |_| {},
        |c| {
            c.auth.tokens_file = Some(path);
            c.auth.require_on_loopback = true;
        },
    )
    .await;
    let channel = server.channel();
    let mut seen = std::collections::BTreeSet::new();
    for &(method, (needs, needs_ac)) in METHODS {
        assert_eq!(
            outcome(code(&channel, method, None).await),
            Outcome::Unauthenticated,
            "{method} without credentials"
        );
        assert_eq!(
            outcome(code(&channel, method, Some("Bearer opt_guessed")).await),
            Outcome::Unauthenticated,
            "{method} with an unknown token"
        );
        for (&(name, role, write_ac), token) in creds.iter().zip(&tokens) {
            let wanted = if role >= needs && (write_ac || !needs_ac) {
                Outcome::Passed
            } else {
                Outcome::Denied
            };
            let got = code(&channel, method, Some(&bearer(token))).await;
            assert_eq!(outcome(got), wanted, "{method} as {name}: {got:?}");
            seen.insert((wanted, got == Code::Ok));
        }
    }
    // Some calls went all the way through, and some were turned away.
    assert!(seen.contains(&(Outcome::Passed, true)), "{seen:?}");
    assert!(seen.contains(&(Outcome::Denied, false)), "{seen:?}");
    let s = stats_as(&server, &bearer(&tokens[0])).await;
    assert!(counter(&s, "outpost_auth_denied_total") > 0);
    assert!(counter(&s, "outpost_auth_failures_missing_total") >= METHODS.len() as u64);
    assert!(counter(&s, "outpost_auth_failures_unknown_token_total") >= METHODS.len() as u64);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_name_what_is_missing_and_a_revoked_token_stops_working() {
    let dir = tempfile::tempdir().unwrap();
    let (path, tokens) = tokens_file(
        dir.path(),
        &[("reader", Role::Read, false), ("ci", Role::Execute, true)],
    );
    let tokens_path = path.clone();
    let server = TestServer::start_with(|c| {
        c.auth.tokens_file = Some(tokens_path);
        c.auth.require_on_loopback = true;
    })
    .await;
    let channel = server.channel();
    let (reader, ci) = (bearer(&tokens[0]), bearer(&tokens[1]));
    let fmb = "/build.bazel.remote.execution.v2.ContentAddressableStorage/FindMissingBlobs";
    let uar = "/build.bazel.remote.execution.v2.ActionCache/UpdateActionResult";

    let missing = unary::<(), ()>(&channel, fmb, None, ()).await.unwrap_err();
    assert_eq!(missing.code(), Code::Unauthenticated);
    assert!(
        missing
            .message()
            .contains("this server requires credentials: send authorization: Bearer <token>"),
        "{}",
        missing.message()
    );
    let unknown = unary::<(), ()>(&channel, fmb, Some("Bearer opt_nope"), ())
        .await
        .unwrap_err();
    assert_eq!(
        unknown.message(),
        "the bearer token is not known (revoked?)"
    );
    let no_scheme = unary::<(), ()>(&channel, fmb, Some(&tokens[0]), ())
        .await
        .unwrap_err();
    assert_eq!(no_scheme.code(), Code::Unauthenticated);
    assert!(
        !no_scheme.message().contains(&tokens[0]),
        "never echo what may be a secret: {}",
        no_scheme.message()
    );
    let denied = unary::<(), ()>(&channel, uar, Some(&reader), ())
        .await
        .unwrap_err();
    assert_eq!(denied.code(), Code::PermissionDenied);
    assert_eq!(
        denied.message(),
        "credential 'reader' has role read; UpdateActionResult needs role write and write-ac"
    );

    // Revoked through the CLI's code path: the same connection is refused
    // within seconds (the file is polled every 2 s), the other token is not.
    assert_eq!(code(&channel, fmb, Some(&reader)).await, Code::Ok);
    outpost::cli::token::revoke(&path, "reader").unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match code(&channel, fmb, Some(&reader)).await {
            Code::Unauthenticated => break,
            Code::Ok => assert!(Instant::now() < deadline, "still accepted after 10 s"),
            other => panic!("unexpected {other:?}"),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(code(&channel, fmb, Some(&ci)).await, Code::Ok);
    let s = stats_as(&server, &ci).await;
    assert!(counter(&s, "outpost_auth_reloads_total") >= 1);

    // A bad new file is refused and the old one kept.
    std::fs::write(&path, "this is not a tokens file\n").unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while counter(
        &stats_as(&server, &ci).await,
        "outpost_auth_reload_failures_total",
    ) == 0
    {
        assert!(Instant::now() < deadline, "the bad file was never read");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(code(&channel, fmb, Some(&ci)).await, Code::Ok);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn local_callers_need_no_credentials_unless_required_but_one_sent_is_checked() {
    let dir = tempfile::tempdir().unwrap();
    let (path, tokens) = tokens_file(dir.path(), &[("reader", Role::Read, false)]);
    let socket = dir.path().join("outpost.sock");
    let unix_path = socket.clone();
    let server = TestServer::start_with(|c| {
        c.auth.tokens_file = Some(path);
        c.unix_socket = Some(unix_path);
    })
    .await;
    let uar = "/build.bazel.remote.execution.v2.ActionCache/UpdateActionResult";
    let tcp = server.channel();
    // Full rights without a credential: the call reaches the service
    // (which finds the empty request invalid).
    assert_eq!(code(&tcp, uar, None).await, Code::InvalidArgument);
    let unix = outpost::client::connect(&format!("unix://{}", socket.display()))
        .await
        .unwrap();
    assert_eq!(code(&unix, uar, None).await, Code::InvalidArgument);
    // A credential that is sent is checked, on loopback too.
    assert_eq!(
        code(&tcp, uar, Some("Bearer opt_wrong")).await,
        Code::Unauthenticated
    );
    assert_eq!(
        code(&tcp, uar, Some(&bearer(&tokens[0]))).await,
        Code::PermissionDenied
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn htpasswd_users_get_the_configured_role() {
    let dir = tempfile::tempdir().unwrap();
    let htpasswd = dir.path().join("htpasswd");
    std::fs::write(
        &htpasswd,
        format!(
            "alice:{}\nci:{}\n",
            bcrypt::hash("wonderland", 4).unwrap(),
            bcrypt::hash("pipeline", 4).unwrap()
        ),
    )
    .unwrap();
    let file = htpasswd.clone();
    let server = TestServer::start_with(|c| {
        c.auth.htpasswd_file = Some(file);
        c.auth.htpasswd_roles.role = Role::Write;
        c.auth.htpasswd_roles.write_ac = vec!["ci".into()];
        c.auth.require_on_loopback = true;
    })
    .await;
    let channel = server.channel();
    let upload = "/build.bazel.remote.execution.v2.ContentAddressableStorage/BatchUpdateBlobs";
    let uar = "/build.bazel.remote.execution.v2.ActionCache/UpdateActionResult";
    let alice = basic("alice", "wonderland");
    // Twice: the second answer comes from the cache of verified headers.
    for _ in 0..2 {
        assert_eq!(code(&channel, upload, Some(&alice)).await, Code::Ok);
    }
    assert_eq!(
        code(&channel, uar, Some(&alice)).await,
        Code::PermissionDenied
    );
    assert_eq!(
        outcome(code(&channel, uar, Some(&basic("ci", "pipeline"))).await),
        Outcome::Passed
    );
    for wrong in [
        basic("alice", "Wonderland"),
        basic("mallory", "wonderland"),
        "Basic !!!".to_string(),
        "Bearer opt_x".to_string(),
    ] {
        let status = unary::<(), ()>(&channel, upload, Some(&wrong), ())
            .await
            .unwrap_err();
        assert_eq!(status.code(), Code::Unauthenticated, "{wrong}");
    }
    let s = stats_as(&server, &alice).await;
    assert_eq!(counter(&s, "outpost_auth_failures_bad_password_total"), 3);
    assert_eq!(counter(&s, "outpost_auth_failures_unknown_token_total"), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn repeated_failures_slow_the_address_down_until_a_success() {
    let dir = tempfile::tempdir().unwrap();
    let (path, tokens) = tokens_file(dir.path(), &[("ci", Role::Execute, true)]);
    let server = TestServer::start_with(|c| {
        c.auth.tokens_file = Some(path);
        c.auth.require_on_loopback = true;
    })
    .await;
    let channel = server.channel();
    let ci = bearer(&tokens[0]);
    let fmb = "/build.bazel.remote.execution.v2.ContentAddressableStorage/FindMissingBlobs";
    let slowed = async || {
        counter(
            &stats_as(&server, &ci).await,
            "outpost_auth_slowed_down_total",
        )
    };
    for _ in 0..FREE_FAILURES {
        assert_eq!(
            code(&channel, fmb, Some("Bearer opt_guess")).await,
            Code::Unauthenticated
        );
    }
    // The stats call is a success: it would reset the count, so look after.
    let started = Instant::now();
    assert_eq!(
        code(&channel, fmb, Some("Bearer opt_guess")).await,
        Code::Unauthenticated
    );
    assert!(
        started.elapsed() >= FIRST_DELAY,
        "attempt {} answered after {:?}",
        FREE_FAILURES + 1,
        started.elapsed()
    );
    let started = Instant::now();
    assert_eq!(code(&channel, fmb, None).await, Code::Unauthenticated);
    assert!(
        started.elapsed() >= FIRST_DELAY * 2,
        "{:?}",
        started.elapsed()
    );
    // The right token is slowed once too, then the address starts afresh.
    assert_eq!(code(&channel, fmb, Some(&ci)).await, Code::Ok);
    assert_eq!(slowed().await, 3);
    assert_eq!(
        code(&channel, fmb, Some("Bearer opt_guess")).await,
        Code::Unauthenticated
    );
    assert_eq!(slowed().await, 3, "a success clears the address");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outposts_own_credentials_are_never_forwarded_upstream() {
    let dir = tempfile::tempdir().unwrap();
    let (path, tokens) = tokens_file(dir.path(), &[("ci", Role::Execute, true)]);
    let fake = fake_upstream::FakeUpstream::start().await;
    let server = start_proxy(
        &fake,
        |u| u.forward_client_headers = true,
        |c| c.auth.tokens_file = Some(path),
    )
    .await;
    fake.reset_stats();
    let missing = re::FindMissingBlobsRequest {
        instance_name: String::new(),
        blob_digests: vec![digest(b"not here")],
        digest_function: 0,
    };
    let mut request = tonic::Request::new(missing);
    request
        .metadata_mut()
        .insert("authorization", bearer(&tokens[0]).parse().unwrap());
    request
        .metadata_mut()
        .insert("x-client-key", "forwarded".parse().unwrap());
    server.cas().find_missing_blobs(request).await.unwrap();
    let calls = fake.calls_of(fake_upstream::Method::FindMissingBlobs);
    assert!(!calls.is_empty(), "the upstream was asked");
    for call in calls {
        assert_eq!(call.header("x-client-key").as_deref(), Some("forwarded"));
        assert_eq!(call.header("authorization"), None);
    }
}
