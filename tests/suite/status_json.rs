//! `/status` on the metrics listener: a real server (standalone, and a proxy
//! over the fake upstream) with real traffic over gRPC, and the JSON report
//! read over HTTP: hits and misses, errors by code and method, the busiest
//! clients by `RequestMetadata`, bytes served locally, the per-minute
//! history, and in proxy mode the upstream's health and measured link.

use std::net::SocketAddr;
use std::time::Duration;

use prost::Message;
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tonic::Code;
use tonic::metadata::MetadataValue;

use crate::common::fake_upstream::{FakeUpstream, Method, REQUEST_METADATA_HEADER};
use crate::common::*;

/// Upper bound for an HTTP answer (never reached when all is well).
const WAIT: Duration = Duration::from_secs(10);
const MIB: usize = 1 << 20;

/// `message` as a call from bazel 7.4.0, invocation `inv-status`.
fn from_bazel<T>(message: T) -> tonic::Request<T> {
    let metadata = re::RequestMetadata {
        tool_details: Some(re::ToolDetails {
            tool_name: "bazel".into(),
            tool_version: "7.4.0".into(),
        }),
        tool_invocation_id: "inv-status".into(),
        ..Default::default()
    };
    let mut request = tonic::Request::new(message);
    request.metadata_mut().insert_bin(
        REQUEST_METADATA_HEADER,
        MetadataValue::from_bytes(&metadata.encode_to_vec()),
    );
    request
}

/// Reads a whole blob through ByteStream as bazel; the bytes or the status.
async fn read_as_bazel(server: &TestServer, d: &re::Digest) -> Result<Vec<u8>, tonic::Status> {
    let request = from_bazel(bs::ReadRequest {
        resource_name: read_name("", d),
        read_offset: 0,
        read_limit: 0,
    });
    let mut stream = server.bytestream().read(request).await?.into_inner();
    let mut data = Vec::new();
    while let Some(chunk) = stream.message().await? {
        data.extend_from_slice(&chunk.data);
    }
    Ok(data)
}

/// A plain HTTP/1.1 GET of `path`; the status line and the body.
async fn http_get(addr: SocketAddr, path: &str) -> (String, String) {
    let mut stream = tokio::net::TcpStream::connect(addr)
        .await
        .expect("connect to the metrics port");
    let request = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await.expect("send");
    let mut response = Vec::new();
    tokio::time::timeout(WAIT, stream.read_to_end(&mut response))
        .await
        .expect("an answer in time")
        .expect("read the answer");
    let response = String::from_utf8(response).expect("UTF-8 answer");
    let (head, body) = response.split_once("\r\n\r\n").expect("head and body");
    (
        head.lines().next().unwrap_or("").to_string(),
        body.to_string(),
    )
}

/// The `/status` report of `server`.
async fn status(server: &TestServer) -> Value {
    let addr = server.metrics_addr().expect("metrics listener");
    let (status_line, body) = http_get(addr, "/status").await;
    assert!(status_line.contains(" 200 "), "{status_line}\n{body}");
    serde_json::from_str(&body).unwrap_or_else(|e| panic!("not JSON ({e}):\n{body}"))
}

/// The count of `code` errors on `method` in the report's error table.
fn error_count(report: &Value, code: &str, method: &str) -> u64 {
    report["errors"]
        .as_array()
        .expect("errors")
        .iter()
        .find(|e| e["code"] == code && e["method"] == method)
        .map_or(0, |e| e["count"].as_u64().unwrap())
}

/// The sum of one field over the history's samples.
fn history_sum(report: &Value, field: &str) -> u64 {
    let samples = report["history"].as_array().expect("history");
    assert!(!samples.is_empty(), "the current minute is always there");
    samples.iter().map(|s| s[field].as_u64().unwrap()).sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_reports_hits_errors_clients_and_history() {
    let server =
        TestServer::start_with(|c| c.metrics_listen = Some("127.0.0.1:0".parse().unwrap())).await;
    let stored = blob(131, 5000);
    assert_eq!(
        batch_update(&mut server.cas(), "", &[&stored]).await,
        vec![Code::Ok]
    );
    let d = digest(&stored);
    // As bazel: a hit, a miss, an action cache miss.
    assert_eq!(read_as_bazel(&server, &d).await.expect("hit"), stored);
    let absent = digest(b"status: never stored");
    assert_code(read_as_bazel(&server, &absent).await, Code::NotFound);
    let lookup = re::GetActionResultRequest {
        action_digest: Some(digest(b"status: no such action")),
        ..Default::default()
    };
    assert_code(
        server
            .action_cache()
            .get_action_result(from_bazel(lookup))
            .await,
        Code::NotFound,
    );
    // Without request metadata: a malformed resource name.
    let bad = bs::ReadRequest {
        resource_name: "blobs/not-a-digest/12".into(),
        read_offset: 0,
        read_limit: 0,
    };
    let bad = match server.bytestream().read(bad).await {
        Ok(response) => collect(response.into_inner()).await.map(|_| ()),
        Err(status) => Err(status),
    };
    assert_code(bad, Code::InvalidArgument);

    let report = status(&server).await;
    assert_eq!(report["mode"], "standalone");
    assert!(report["upstream"].is_null());
    assert_eq!(report["hit_rates"]["cas"]["hits"], 1);
    assert_eq!(report["hit_rates"]["cas"]["misses"], 1);
    assert_eq!(report["hit_rates"]["action_cache"]["misses"], 1);
    assert_eq!(report["wan"]["bytes_served_locally"], stored.len());
    assert!(report["wan"]["seconds_saved"].is_null(), "no link measured");
    assert_eq!(error_count(&report, "NOT_FOUND", "ByteStream/Read"), 1);
    // An action-cache miss is a miss (counted above), not an error.
    assert_eq!(
        error_count(&report, "NOT_FOUND", "ActionCache/GetActionResult"),
        0
    );
    assert_eq!(
        error_count(&report, "INVALID_ARGUMENT", "ByteStream/Read"),
        1
    );
    let busiest = &report["clients"][0];
    assert_eq!(busiest["tool"], "bazel 7.4.0", "{report:#}");
    assert_eq!(busiest["invocation"], "inv-status");
    assert_eq!(busiest["client"], "local:127.0.0.1");
    assert_eq!(busiest["calls"], 3);
    assert_eq!(busiest["errors"], 1);
    assert!(
        report["clients"]
            .as_array()
            .unwrap()
            .iter()
            .any(|c| c["tool"] == "unknown" && c["errors"] == 1),
        "{report:#}"
    );
    assert_eq!(history_sum(&report, "cas_hits"), 1);
    assert_eq!(
        history_sum(&report, "bytes_served_locally"),
        stored.len() as u64
    );
    assert_eq!(history_sum(&report, "errors"), 2);

    // /metrics carries the same counts under the names the dashboard uses.
    let (_, metrics) = http_get(server.metrics_addr().unwrap(), "/metrics").await;
    for line in [
        "outpost_rpc_errors_total{code=\"NOT_FOUND\"} 1",
        "outpost_rpc_errors_total{code=\"INVALID_ARGUMENT\"} 1",
        &format!("outpost_served_local_bytes_total {}", stored.len()),
        "outpost_upstream_healthy 0",
    ] {
        assert!(
            metrics.contains(&format!("\n{line}\n")),
            "{line} in:\n{metrics}"
        );
    }
    let calls = metrics
        .lines()
        .find_map(|l| l.strip_prefix("outpost_rpc_calls_total "))
        .expect("outpost_rpc_calls_total");
    // The upload, the three calls as bazel, the bad read (and the
    // report's own GetStats calls, none here).
    assert_eq!(calls, "5");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_proxy_reports_its_link_and_the_bytes_it_did_not_fetch() {
    let fake = FakeUpstream::start().await;
    let large = blob(132, 2 * MIB);
    let d = fake.put_blob(large.clone());
    let server = start_proxy(
        &fake,
        |_| {},
        |c| c.metrics_listen = Some("127.0.0.1:0".parse().unwrap()),
    )
    .await;
    // A miss fetched over the WAN, then a local hit.
    assert_eq!(read_as_bazel(&server, &d).await.expect("fetched"), large);
    assert_eq!(read_as_bazel(&server, &d).await.expect("local"), large);

    let report = status(&server).await;
    assert_eq!(report["mode"], "proxy");
    let upstream = &report["upstream"];
    assert_eq!(upstream["healthy"], true, "{report:#}");
    assert!(upstream["last_error"].is_null());
    assert!(upstream["rtt_ms"].as_f64().expect("rtt measured") > 0.0);
    let throughput = upstream["throughput_bytes_per_second"]
        .as_f64()
        .expect("throughput measured by the 2 MiB fetch");
    assert!(throughput > 0.0);
    let wan = &report["wan"];
    assert_eq!(wan["bytes_served_locally"], 2 * MIB, "{report:#}");
    assert!(wan["bytes_from_upstream"].as_u64().unwrap() >= 2 * MIB as u64);
    assert_eq!(wan["link_bytes_per_second"].as_f64(), Some(throughput));
    let saved = wan["seconds_saved"].as_f64().expect("time saved");
    assert!(saved >= (2 * MIB) as f64 / throughput, "{saved}");

    // The upstream stops answering: the report says so, and why.
    fake.fail_method(Method::FindMissingBlobs, Code::Unavailable);
    let absent = digest(b"status: asked while the upstream is down");
    let _ = server
        .cas()
        .find_missing_blobs(re::FindMissingBlobsRequest {
            blob_digests: vec![absent],
            ..Default::default()
        })
        .await;
    let report = status(&server).await;
    assert_eq!(report["upstream"]["healthy"], false, "{report:#}");
    assert!(
        report["upstream"]["last_error"].as_str().is_some(),
        "{report:#}"
    );
    fake.clear_faults();
    server.stop().await;
}

/// `message` with `authorization: Bearer <token>`.
fn with_token<T>(message: T, token: &str) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    request
        .metadata_mut()
        .insert("authorization", format!("Bearer {token}").parse().unwrap());
    request
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_calls_are_counted_and_callers_named_by_credential() {
    let dir = tempfile::tempdir().unwrap();
    let tokens_path = dir.path().join("tokens");
    let token =
        outpost::cli::token::add(&tokens_path, "reader", outpost::auth::Role::Read, false).unwrap();
    let server = TestServer::start_with(|c| {
        c.auth.tokens_file = Some(tokens_path);
        c.auth.require_on_loopback = true;
        c.metrics_listen = Some("127.0.0.1:0".parse().unwrap());
    })
    .await;
    let find = || re::FindMissingBlobsRequest {
        blob_digests: vec![digest(b"status: auth")],
        ..Default::default()
    };
    // Admitted, refused PERMISSION_DENIED (a reader may not write), and
    // refused UNAUTHENTICATED (no token).
    server
        .cas()
        .find_missing_blobs(with_token(find(), &token))
        .await
        .expect("a reader may ask");
    let update = re::UpdateActionResultRequest {
        action_digest: Some(digest(b"status: action")),
        action_result: Some(re::ActionResult::default()),
        ..Default::default()
    };
    assert_code(
        server
            .action_cache()
            .update_action_result(with_token(update, &token))
            .await,
        Code::PermissionDenied,
    );
    assert_code(
        server.cas().find_missing_blobs(find()).await,
        Code::Unauthenticated,
    );

    let report = status(&server).await;
    assert_eq!(
        error_count(
            &report,
            "PERMISSION_DENIED",
            "ActionCache/UpdateActionResult"
        ),
        1,
        "{report:#}"
    );
    assert_eq!(
        error_count(
            &report,
            "UNAUTHENTICATED",
            "ContentAddressableStorage/FindMissingBlobs"
        ),
        1
    );
    let clients = report["clients"].as_array().unwrap();
    let reader = clients
        .iter()
        .find(|c| c["client"] == "reader")
        .unwrap_or_else(|| panic!("no reader in {report:#}"));
    assert_eq!(
        (reader["calls"].as_u64(), reader["errors"].as_u64()),
        (Some(2), Some(1))
    );
    assert!(
        clients
            .iter()
            .any(|c| c["client"] == "" && c["errors"] == 1),
        "the refused caller has no name: {report:#}"
    );
    assert!(
        !report.to_string().contains(&token),
        "no token in the report"
    );
    server.stop().await;
}
