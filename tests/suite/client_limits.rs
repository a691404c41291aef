//! Per-client limits (`[limits]`): a client with `max_calls_per_client`
//! calls open waits for a slot, then gets RESOURCE_EXHAUSTED with a
//! RetryInfo; other clients are not affected; a slot is held until the call's
//! response ends (or is dropped): a ByteStream Write, a Read, an Execute
//! against the test kit's fake upstream.
//!
//! Without authentication a client is its address: every TCP connection
//! from 127.0.0.1 is `local:127.0.0.1`, the unix socket is `local:unix`. The
//! tests watch the server over the unix socket, whose calls count against
//! that other client (and show in `client_calls_open` themselves).

use std::path::Path;
use std::time::{Duration, Instant};

use outpost::config::Config;

use tonic::Code;
use tonic::transport::{Channel, Endpoint};
use tonic_types::StatusExt as _;

use crate::common::fake_upstream::{FakeUpstream, TestAction, operation_stage};
use crate::common::*;

/// A server with the given limits and a unix socket; returns it, a channel
/// over the unix socket, and the directory holding the socket.
async fn start(
    max_calls: usize,
    queue_timeout: Duration,
) -> (TestServer, Channel, tempfile::TempDir) {
    let sockets = tempfile::tempdir().unwrap();
    let server = TestServer::start_with(limited(max_calls, queue_timeout, sockets.path())).await;
    let unix = connect_unix(sockets.path()).await;
    (server, unix, sockets)
}

/// Settings: the given limits, and a unix socket in `sockets`.
fn limited(max_calls: usize, queue_timeout: Duration, sockets: &Path) -> impl FnOnce(&mut Config) {
    let socket = sockets.join("outpost.sock");
    move |c| {
        c.unix_socket = Some(socket);
        c.limits.max_calls_per_client = max_calls;
        c.limits.queue_timeout = queue_timeout;
    }
}

/// A channel over the unix socket in `sockets`.
async fn connect_unix(sockets: &Path) -> Channel {
    let path = sockets.join("outpost.sock");
    outpost::client::connect(&format!("unix://{}", path.display()))
        .await
        .expect("connects over the unix socket")
}

/// Metric `name` read over `channel` (a client other than the one tested).
async fn metric_via(channel: &Channel, name: &str) -> u64 {
    *stats(channel)
        .await
        .metrics
        .get(name)
        .unwrap_or_else(|| panic!("no metric {name}"))
}

/// Polls metric `name` over `channel` until it equals `value`.
async fn wait_for(channel: &Channel, name: &str, value: u64) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let v = metric_via(channel, name).await;
        if v == value {
            return;
        }
        assert!(Instant::now() < deadline, "{name} stayed {v}, not {value}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Calls GetCapabilities; returns its status code and how long it took.
async fn capabilities(channel: &Channel) -> (Result<(), tonic::Status>, Duration) {
    let started = Instant::now();
    let result = channel
        .capabilities()
        .get_capabilities(re::GetCapabilitiesRequest::default())
        .await
        .map(drop);
    (result, started.elapsed())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_over_its_limit_waits_then_is_refused_and_others_are_not_affected() {
    let timeout = Duration::from_secs(1);
    let (server, unix, _dir) = start(2, timeout).await;
    // Two uploads over TCP, kept open: the client local:127.0.0.1 is full.
    let (a, b) = (blob(1, 2000), blob(2, 2000));
    let mut write_a = LogWriter::start(server.bytestream(), &write_name("", &digest(&a)));
    let mut write_b = LogWriter::start(server.bytestream(), &write_name("", &digest(&b)));
    write_a.send(&a[..1000]).await;
    write_b.send(&b[..1000]).await;
    // The two writes, and the GetStats asking (over the unix socket).
    wait_for(&unix, "outpost_client_calls_open", 3).await;

    // A third call from the same address waits, then is refused.
    let (result, took) = capabilities(&server.channel()).await;
    let status = result.expect_err("over the limit");
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    assert!(
        took >= timeout,
        "refused after {took:?}, before queue_timeout"
    );
    assert!(
        status
            .message()
            .contains("\"local:127.0.0.1\" has 2 calls open")
            && status.message().contains("max_calls_per_client"),
        "{status:?}"
    );
    let retry = status.get_details_retry_info().expect("a RetryInfo detail");
    assert_eq!(retry.retry_delay, Some(Duration::from_secs(1)));

    // Another client (the unix socket) is served at once.
    let (result, took) = capabilities(&unix).await;
    result.expect("another client has slots of its own");
    assert!(took < timeout, "took {took:?}");

    // A call waiting for a slot proceeds as soon as an upload ends.
    let waiting = tokio::spawn({
        let mut cas = server.cas();
        async move { find_missing(&mut cas, &[digest(&blob(3, 10))]).await }
    });
    wait_for(&unix, "outpost_client_limit_waiting", 1).await;
    assert_eq!(write_a.finish(&a[1000..]).await.unwrap(), 2000);
    let missing = tokio::time::timeout(timeout / 2, waiting)
        .await
        .expect("the waiting call proceeds when a slot frees")
        .unwrap();
    assert_eq!(missing.len(), 1);

    assert_eq!(write_b.finish(&b[1000..]).await.unwrap(), 2000);
    assert_eq!(
        metric_via(&unix, "outpost_client_limit_waits_total").await,
        2
    );
    assert_eq!(
        metric_via(&unix, "outpost_client_limit_refusals_total").await,
        1
    );
    wait_for(&unix, "outpost_client_calls_open", 1).await;
    server.assert_still_serves().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_streaming_response_holds_its_slot_until_it_ends_or_is_dropped() {
    let timeout = Duration::from_millis(500);
    let (server, unix, _dir) = start(1, timeout).await;
    let data = blob(4, 8 << 20);
    let name = read_name("", &digest(&data));
    upload(&mut unix.bytestream(), "", &data, 1 << 20)
        .await
        .unwrap();
    // A client with HTTP/2's default 64 KiB windows: a read it does not
    // consume cannot finish on the server side.
    let slow = Endpoint::from_shared(format!("http://{}", server.addr()))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut read = open_read(&mut slow.bytestream(), &name, 0).await.unwrap();
    let mut got = read_exactly(&mut read, 1, Duration::from_secs(10)).await;
    wait_for(&unix, "outpost_client_calls_open", 2).await;
    let (result, _) = capabilities(&server.channel()).await;
    assert_eq!(
        result.expect_err("the open read holds the one slot").code(),
        Code::ResourceExhausted
    );

    // Read to the end: the slot is freed.
    got.extend(
        collect(read)
            .await
            .unwrap()
            .into_iter()
            .flat_map(|r| r.data),
    );
    assert!(got == data, "the read returned other bytes");
    wait_for(&unix, "outpost_client_calls_open", 1).await;
    let (result, took) = capabilities(&server.channel()).await;
    result.expect("the slot is free once the read ended");
    assert!(took < timeout, "took {took:?}");

    // A read the client abandons halfway frees its slot too.
    let mut read = open_read(&mut slow.bytestream(), &name, 0).await.unwrap();
    read_exactly(&mut read, 1, Duration::from_secs(10)).await;
    wait_for(&unix, "outpost_client_calls_open", 2).await;
    drop(read);
    wait_for(&unix, "outpost_client_calls_open", 1).await;
    let (result, _) = capabilities(&server.channel()).await;
    result.expect("the slot is free once the read was dropped");
    assert_eq!(
        metric_via(&unix, "outpost_client_limit_refusals_total").await,
        1
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_execute_holds_its_slot_until_its_stream_ends() {
    let timeout = Duration::from_millis(500);
    let fake = FakeUpstream::start().await;
    let sockets = tempfile::tempdir().unwrap();
    let server = start_proxy(&fake, |_| {}, limited(1, timeout, sockets.path())).await;
    let unix = connect_unix(sockets.path()).await;
    let action = TestAction::new(&["sleep"], &["o"], &[]);
    fake.put_test_action(&action);
    fake.hold_executions();

    let mut stream = re::execution_client::ExecutionClient::new(server.channel())
        .execute(action.request(""))
        .await
        .expect("Execute")
        .into_inner();
    let first = stream.message().await.unwrap().expect("an Operation");
    assert!(operation_stage(&first).is_some(), "{first:?}");
    wait_for(&unix, "outpost_client_calls_open", 2).await;
    let (result, _) = capabilities(&server.channel()).await;
    assert_eq!(
        result
            .expect_err("the running Execute holds the one slot")
            .code(),
        Code::ResourceExhausted
    );

    fake.release_executions();
    let (ops, end) = drain(stream).await;
    end.expect("the Execute stream ends cleanly");
    assert!(ops.last().is_some_and(|op| op.done), "{ops:?}");
    wait_for(&unix, "outpost_client_calls_open", 1).await;
    let (result, took) = capabilities(&server.channel()).await;
    result.expect("the slot is free once the Execute ended");
    assert!(took < timeout, "took {took:?}");
}
