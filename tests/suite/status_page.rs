//! The status page in a real browser: a real `outpost serve` with
//! `--metrics-listen`, some traffic (CAS writes and reads, an action-cache
//! miss and hit, a bad request), then Debian's headless Chromium renders
//! `/`; the DOM must hold the same figures as `/status` of the same server,
//! and a screenshot lands in the target directory (`status-page.png`, and
//! `status-page-proxy.png` for a proxy over the test kit's fake upstream).
//!
//! Without `/usr/bin/chromium` the test is skipped, unless
//! `OUTPOST_REQUIRE_BROWSER=1` (set by `scripts/test.sh`, which installs it).

mod browser;

use std::net::SocketAddr;
use std::path::Path;

use prost::Message;
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tonic::Code;
use tonic::metadata::MetadataValue;

use crate::common::fake_upstream::{FakeUpstream, REQUEST_METADATA_HEADER};
use crate::common::*;
use browser::{Dom, browser, run_browser, target_dir};

/// The tool and invocation the traffic carries; the invocation holds markup
/// that must come out as text.
const TOOL: &str = "page-test";
const INVOCATION: &str = "<b>inv&1</b>";

#[tokio::test]
async fn the_status_page_shows_the_servers_figures_in_a_browser() {
    let Some(chromium) = browser() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let server = ServerProcess::command(env!("CARGO_BIN_EXE_outpost"), dir.path().join("data"))
        .args(["--metrics-listen", "127.0.0.1:0"])
        .log_file(&dir.path().join("log"))
        .start()
        .expect("outpost starts");
    let metrics = server.metrics_addr().expect("a metrics address");
    traffic(&server).await;

    let (before, page, after) = load(&chromium, dir.path(), metrics).await;

    // The traffic shows in /status...
    assert_eq!(after["mode"], "standalone");
    let cas = &after["hit_rates"]["cas"];
    assert!(cas["hits"].as_u64() >= Some(2), "{cas}");
    assert!(cas["misses"].as_u64() >= Some(1), "{cas}");
    let ac = &after["hit_rates"]["action_cache"];
    assert_eq!(
        (ac["hits"].as_u64(), ac["misses"].as_u64()),
        (Some(1), Some(1))
    );
    // ...and the page the browser rendered shows the same figures.
    for (id, key) in [("cas-hit-rate", "cas"), ("ac-hit-rate", "action_cache")] {
        let json = &after["hit_rates"][key];
        let figure = page.element(id);
        assert_eq!(figure.attr("data-hits"), json["hits"].to_string(), "{id}");
        assert_eq!(
            figure.attr("data-misses"),
            json["misses"].to_string(),
            "{id}"
        );
        let rate = json["rate"].as_f64().expect("a rate after lookups");
        assert_eq!(figure.text, format!("{:.1}%", rate * 100.0), "{id}");
    }
    assert_eq!(page.element("ac-hit-rate").text, "50.0%");
    for (id, json) in [
        ("store-used", &after["store"]["used_bytes"]),
        ("store-quota", &after["store"]["quota_bytes"]),
        ("store-blobs", &after["store"]["blobs"]),
        ("store-actions", &after["store"]["action_results"]),
        ("wan-served", &after["wan"]["bytes_served_locally"]),
        ("version", &after["version"]),
        ("mode", &after["mode"]),
    ] {
        let want = json
            .as_str()
            .map_or_else(|| json.to_string(), str::to_string);
        assert_eq!(page.element(id).attr("data-value"), want, "{id}");
    }
    assert!(after["store"]["blobs"].as_u64() >= Some(3));
    assert!(page.element("upstream-none").text.contains("standalone"));
    assert_eq!(
        page.element("store-bar").attr("data-used"),
        after["store"]["used_bytes"].to_string()
    );

    // Tables: one row per client and per error of the report, or the empty state.
    let rows = page.rows("client");
    assert_eq!(
        rows.len(),
        after["clients"].as_array().unwrap().len(),
        "{rows:?}"
    );
    for (row, json) in rows.iter().zip(after["clients"].as_array().unwrap()) {
        assert_eq!(row["data-tool"], json["tool"].as_str().unwrap());
        assert_eq!(row["data-invocation"], json["invocation"].as_str().unwrap());
        assert_eq!(row["data-calls"], json["calls"].to_string());
    }
    if rows.is_empty() {
        page.element("clients-empty");
    }
    let errors = page.rows("error-row");
    assert_eq!(errors.len(), after["errors"].as_array().unwrap().len());
    for (row, json) in errors.iter().zip(after["errors"].as_array().unwrap()) {
        assert_eq!(row["data-code"], json["code"].as_str().unwrap());
        assert_eq!(row["data-count"], json["count"].to_string());
    }
    if errors.is_empty() {
        page.element("errors-empty");
    }
    // The invocation's markup stayed text: no <b> element came of it.
    assert!(
        !page.0.contains("<b>inv"),
        "client markup was rendered as HTML"
    );

    // Charts: as many samples as the history had around the page load.
    let samples: usize = page
        .element("chart-hit-rate")
        .attr("data-samples")
        .parse()
        .unwrap();
    let (low, high) = (history_len(&before), history_len(&after));
    assert!(
        (low..=high).contains(&samples),
        "{samples} not in {low}..={high}"
    );
    page.element("chart-bytes");

    screenshot(&chromium, dir.path(), metrics, "status-page.png").await;
}

#[tokio::test]
async fn the_proxy_page_shows_the_upstream_and_what_crossed_the_wan() {
    let Some(chromium) = browser() else {
        return;
    };
    let fake = FakeUpstream::start().await;
    let data = blob(700, 50_000);
    let d = fake.put_blob(data.clone());
    let dir = tempfile::tempdir().unwrap();
    let server = ServerProcess::command(env!("CARGO_BIN_EXE_outpost"), dir.path().join("data"))
        .args(["--metrics-listen", "127.0.0.1:0", "--upstream", &fake.url()])
        .log_file(&dir.path().join("log"))
        .start()
        .expect("outpost starts");
    let metrics = server.metrics_addr().expect("a metrics address");
    // The first read crosses the WAN, the second is served locally.
    let mut bs = server.bytestream();
    for _ in 0..2 {
        let read = read_request(&d);
        let mut stream = bs
            .read(with_metadata(read))
            .await
            .expect("Read")
            .into_inner();
        let mut got = Vec::new();
        while let Some(m) = stream.message().await.expect("Read stream") {
            got.extend_from_slice(&m.data);
        }
        assert_eq!(got, data);
    }

    let (before, page, after) = load(&chromium, dir.path(), metrics).await;
    assert_eq!(page.element("mode").attr("data-value"), "proxy");
    let upstream = &after["upstream"];
    assert_eq!(
        page.element("upstream-endpoint").text,
        upstream["endpoint"].as_str().unwrap()
    );
    assert_eq!(
        page.element("upstream-health").attr("data-value"),
        upstream["healthy"].to_string()
    );
    let calls: u64 = page
        .element("upstream-calls")
        .attr("data-value")
        .parse()
        .unwrap();
    let (low, high) = (
        before["upstream"]["calls"].as_u64().unwrap(),
        upstream["calls"].as_u64().unwrap(),
    );
    assert!(
        (low..=high).contains(&calls),
        "{calls} not in {low}..={high}"
    );
    let fetched = &after["wan"]["bytes_from_upstream"];
    assert!(fetched.as_u64() >= Some(data.len() as u64), "{fetched}");
    assert_eq!(
        page.element("wan-from-upstream").attr("data-value"),
        fetched.to_string()
    );
    assert_eq!(
        page.element("wan-served").attr("data-value"),
        after["wan"]["bytes_served_locally"].to_string()
    );
    let cas = &after["hit_rates"]["cas"];
    assert_eq!(
        page.element("cas-hit-rate").attr("data-hits"),
        cas["hits"].to_string()
    );
    assert!(cas["hits"].as_u64() >= Some(1), "{cas}");
    if after["prefetch"]["enabled"] == true {
        let blobs = page.element("prefetch-blobs").attr("data-value");
        assert_eq!(blobs, after["prefetch"]["blobs"].to_string());
    } else {
        page.element("prefetch-off");
    }
    screenshot(&chromium, dir.path(), metrics, "status-page-proxy.png").await;
}

/// `/status`, the page as the browser rendered it, `/status` again: figures
/// that may move on their own (calls, history) lie between the two reports.
async fn load(chromium: &Path, dir: &Path, metrics: SocketAddr) -> (Value, Dom, Value) {
    let before = status(metrics).await;
    let url = format!("http://{metrics}/");
    let dom = run_browser(chromium, dir, vec!["--dump-dom".into(), url], "dom").await;
    let after = status(metrics).await;
    (before, Dom(dom), after)
}

/// Saves a screenshot of the page as `name` in the target directory.
async fn screenshot(chromium: &Path, dir: &Path, metrics: SocketAddr, name: &str) {
    let shot = target_dir().join(name);
    let _ = std::fs::remove_file(&shot);
    let args = vec![
        format!("--screenshot={}", shot.display()),
        "--window-size=1280,2000".into(),
        "--hide-scrollbars".into(),
        format!("http://{metrics}/"),
    ];
    run_browser(chromium, dir, args, name).await;
    let png = std::fs::read(&shot).expect("the screenshot was written");
    assert!(png.starts_with(b"\x89PNG"), "not a PNG");
    eprintln!("status page screenshot: {}", shot.display());
}

/// CAS writes and reads, an action-cache miss then hit, a missing blob and
/// a malformed digest; every call carries the same RequestMetadata.
async fn traffic(server: &ServerProcess) {
    let blobs: Vec<Vec<u8>> = (0..3).map(|i| blob(400 + i, 3000 + i as usize)).collect();
    let mut cas = server.cas();
    let update = re::BatchUpdateBlobsRequest {
        requests: blobs
            .iter()
            .map(|b| re::batch_update_blobs_request::Request {
                digest: Some(digest(b)),
                data: b.clone(),
                ..Default::default()
            })
            .collect(),
        ..Default::default()
    };
    cas.batch_update_blobs(with_metadata(update))
        .await
        .expect("BatchUpdateBlobs");
    let mut bs = server.bytestream();
    for b in &blobs[..2] {
        let read = read_request(&digest(b));
        let mut stream = bs
            .read(with_metadata(read))
            .await
            .expect("Read")
            .into_inner();
        while stream.message().await.expect("Read stream").is_some() {}
    }
    let absent = read_request(&digest(b"not stored"));
    let missing = match bs.read(with_metadata(absent)).await {
        Err(status) => Err(status),
        Ok(response) => response.into_inner().message().await,
    };
    assert_code(missing, Code::NotFound);

    let mut ac = server.action_cache();
    let action = digest(b"an action");
    let get = || re::GetActionResultRequest {
        action_digest: Some(action.clone()),
        ..Default::default()
    };
    assert_code(
        ac.get_action_result(with_metadata(get())).await,
        Code::NotFound,
    );
    let update = re::UpdateActionResultRequest {
        action_digest: Some(action.clone()),
        action_result: Some(re::ActionResult {
            exit_code: 0,
            ..Default::default()
        }),
        ..Default::default()
    };
    ac.update_action_result(with_metadata(update))
        .await
        .expect("UpdateActionResult");
    ac.get_action_result(with_metadata(get()))
        .await
        .expect("the action cache hit");

    let bad = re::FindMissingBlobsRequest {
        blob_digests: vec![raw_digest("not-a-hash", 5)],
        ..Default::default()
    };
    assert_code(
        cas.find_missing_blobs(with_metadata(bad)).await,
        Code::InvalidArgument,
    );
}

fn read_request(d: &re::Digest) -> bs::ReadRequest {
    bs::ReadRequest {
        resource_name: read_name("", d),
        read_offset: 0,
        read_limit: 0,
    }
}

/// `message` with the test's RequestMetadata header.
fn with_metadata<T>(message: T) -> tonic::Request<T> {
    let metadata = re::RequestMetadata {
        tool_details: Some(re::ToolDetails {
            tool_name: TOOL.into(),
            tool_version: "1.0".into(),
        }),
        tool_invocation_id: INVOCATION.into(),
        ..Default::default()
    };
    let mut request = tonic::Request::new(message);
    request.metadata_mut().insert_bin(
        REQUEST_METADATA_HEADER,
        MetadataValue::from_bytes(&metadata.encode_to_vec()),
    );
    request
}

/// The `/status` JSON.
async fn status(addr: SocketAddr) -> Value {
    let body = http_get(addr, "/status").await;
    serde_json::from_str(&body).unwrap_or_else(|e| panic!("/status is not JSON ({e}): {body}"))
}

fn history_len(status: &Value) -> usize {
    status["history"].as_array().map_or(0, Vec::len)
}

/// The body of `GET path` over HTTP/1.0.
async fn http_get(addr: SocketAddr, path: &str) -> String {
    let mut stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let request = format!("GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n");
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).await.unwrap();
    let (head, body) = response.split_once("\r\n\r\n").expect("an HTTP response");
    assert!(
        head.starts_with("HTTP/1.0 200") || head.starts_with("HTTP/1.1 200"),
        "{head}"
    );
    body.to_string()
}
