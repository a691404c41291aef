//! Remote Logstream passthrough, black-box: an in-process Outpost in proxy
//! mode in front of the fake upstream, over real sockets. CreateLogStream
//! and ByteStream calls on log names go through unchanged and streamed (a
//! reader tails a log while a writer writes it, both through Outpost);
//! CAS names stay local; without an upstream, log names are refused as
//! before.

use std::time::Duration;

use outpost::config::UpstreamConfig;
use tonic::Code;

use crate::common::fake_upstream::{FakeUpstream, Method};
use crate::common::*;

/// Upper bound for anything the tests wait for (never reached when all is well).
const WAIT: Duration = Duration::from_secs(10);

async fn proxy(fake: &FakeUpstream, adjust: impl FnOnce(&mut UpstreamConfig)) -> TestServer {
    start_proxy(fake, adjust, |_| {}).await
}

fn query(resource: &str) -> bs::QueryWriteStatusRequest {
    bs::QueryWriteStatusRequest {
        resource_name: resource.to_string(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reader_tails_a_log_while_a_writer_writes_it_through_outpost() {
    let fake = FakeUpstream::start().await;
    let server = proxy(&fake, |_| {}).await;

    let log = create_log_stream(&mut server.logstreams(), "projects/p1/instances/a")
        .await
        .expect("CreateLogStream through Outpost");
    assert!(
        log.name.starts_with("projects/p1/instances/a/logstreams/"),
        "{}",
        log.name
    );
    assert_eq!(
        fake.calls_of(Method::CreateLogStream)[0].instance_name,
        "projects/p1/instances/a",
        "the parent reaches the upstream unchanged"
    );

    // The reader starts first (nothing written yet) and asks for a deadline.
    let mut read = tonic::Request::new(bs::ReadRequest {
        resource_name: log.name.clone(),
        read_offset: 0,
        read_limit: 0,
    });
    read.set_timeout(Duration::from_secs(3600));
    let mut reader = server.bytestream().read(read).await.unwrap().into_inner();
    assert!(fake.wait_active_log_readers(1, WAIT).await);

    // The writer sends pieces one at a time; the reader must see each one
    // before the next is even sent: tailing, not buffering.
    let pieces: Vec<Vec<u8>> = (0..4)
        .map(|i| blob(100 + i, 1000 + 333 * i as usize))
        .collect();
    let mut writer = LogWriter::start(server.bytestream(), &log.write_resource_name);
    let mut sent = 0;
    let mut seen = Vec::new();
    for piece in &pieces[..3] {
        writer.send(piece).await;
        sent += piece.len();
        seen.extend(read_exactly(&mut reader, piece.len(), WAIT).await);
        assert!(seen == pieces.concat()[..sent], "bytes out of order");
        let status = server
            .bytestream()
            .query_write_status(query(&log.write_resource_name))
            .await
            .expect("QueryWriteStatus through Outpost")
            .into_inner();
        assert_eq!(
            (status.committed_size, status.complete),
            (sent as i64, false)
        );
        tokio::time::sleep(Duration::from_millis(30)).await;
    }
    let total = pieces.concat();
    assert_eq!(writer.finish(&pieces[3]).await.unwrap(), total.len() as i64);
    seen.extend(read_exactly(&mut reader, pieces[3].len(), WAIT).await);
    assert!(seen == total, "every byte, in order");
    assert!(
        tokio::time::timeout(WAIT, reader.message())
            .await
            .expect("the read ends after finish_write")
            .unwrap()
            .is_none()
    );
    assert_eq!(fake.log_stream(&log.name), Some((total.clone(), true)));
    let status = server
        .bytestream()
        .query_write_status(query(&log.write_resource_name))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (status.committed_size, status.complete),
        (total.len() as i64, true)
    );

    // The client's deadline went upstream with the read; no shorter one
    // was added to the calls that had none.
    let timeout_of = |method| {
        fake.calls_of(method)
            .iter()
            .map(|c| c.header("grpc-timeout"))
            .collect::<Vec<_>>()
    };
    assert_eq!(
        timeout_of(Method::Read),
        vec![Some("3600000m".to_string())],
        "the client's 1 h deadline (as tonic writes it)"
    );
    assert!(
        timeout_of(Method::QueryWriteStatus)
            .iter()
            .all(Option::is_none)
    );
    assert!(timeout_of(Method::Write).iter().all(Option::is_none));

    // Counted, and nothing cached or stored.
    let s = stats(&server).await;
    assert_eq!(s.upstream_calls.get("CreateLogStream"), Some(&1));
    assert_eq!(
        s.upstream_calls.get("ByteStream.passthrough"),
        Some(&(1 + 1 + 4))
    );
    server.assert_nothing_stored().await;
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_statuses_for_log_names_reach_the_client() {
    let fake = FakeUpstream::start().await;
    let server = proxy(&fake, |_| {}).await;
    let mut bs = server.bytestream();
    let log = create_log_stream(&mut server.logstreams(), "p")
        .await
        .unwrap();
    // The spec: reading a write name is INVALID_ARGUMENT.
    let err = read_blob(&mut bs, &log.write_resource_name, 0, 0)
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    assert!(err.message().contains("fake upstream"), "relayed: {err:?}");
    assert_code(
        read_blob(&mut bs, "p/logstreams/none", 0, 0).await,
        Code::NotFound,
    );
    assert_code(
        bs.query_write_status(query("p/logstreams/none/s")).await,
        Code::NotFound,
    );
    assert_code(
        LogWriter::start(server.bytestream(), &log.name)
            .finish(b"x")
            .await,
        Code::InvalidArgument,
    );
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_dropping_its_read_cancels_the_upstream_read() {
    let fake = FakeUpstream::start().await;
    let server = proxy(&fake, |_| {}).await;
    let log = create_log_stream(&mut server.logstreams(), "p")
        .await
        .unwrap();
    let mut writer = LogWriter::start(server.bytestream(), &log.write_resource_name);
    writer.send(b"first line\n").await;
    let mut reader = open_read(&mut server.bytestream(), &log.name, 0)
        .await
        .unwrap();
    assert_eq!(read_exactly(&mut reader, 11, WAIT).await, b"first line\n");
    assert_eq!(fake.active_log_readers(), 1);
    drop(reader);
    assert!(
        fake.wait_active_log_readers(0, WAIT).await,
        "the upstream read must end when the client leaves"
    );
    // The log goes on for the writer.
    assert_eq!(writer.finish(b"last\n").await.unwrap(), 16);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cas_names_are_still_served_locally() {
    let fake = FakeUpstream::start().await;
    let server = proxy(&fake, |_| {}).await;
    let mut bs = server.bytestream();
    let data = blob(7, 5000);
    assert_eq!(upload(&mut bs, "", &data, 1000).await.unwrap(), 5000);
    assert_eq!(
        read_blob(&mut bs, &read_name("", &digest(&data)), 0, 0)
            .await
            .unwrap()
            .0,
        data
    );
    fake.reset_stats();
    // Malformed CAS names are refused here, not passed through.
    assert_code(
        read_blob(&mut bs, "blobs/zzz/1", 0, 0).await,
        Code::InvalidArgument,
    );
    assert_code(
        read_blob(&mut bs, "i/compressed-blobs/zstd/zzz/1", 0, 0).await,
        Code::InvalidArgument,
    );
    assert_code(
        write(
            &mut bs,
            write_requests("uploads/u-1/blobs/zzz/1", b"x", 0, 1, true),
        )
        .await,
        Code::InvalidArgument,
    );
    assert_code(
        bs.query_write_status(query("uploads/u-1/blobs/zzz/1"))
            .await,
        Code::InvalidArgument,
    );
    for method in [Method::Read, Method::Write, Method::QueryWriteStatus] {
        assert_eq!(fake.count(method), 0, "{}", fake.summary());
    }
    let s = stats(&server).await;
    assert_eq!(
        s.upstream_calls
            .get("ByteStream.passthrough")
            .copied()
            .unwrap_or(0),
        0
    );
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_an_upstream_log_names_are_refused_as_before() {
    let server = TestServer::start().await;
    let mut bs = server.bytestream();
    let name = "projects/p/logstreams/1";
    let err = read_blob(&mut bs, name, 0, 0).await.unwrap_err();
    assert!(
        matches!(err.code(), Code::InvalidArgument | Code::NotFound),
        "{err:?}"
    );
    assert_code(
        write(
            &mut bs,
            write_requests(&format!("{name}/secret"), b"x", 0, 1, true),
        )
        .await,
        Code::InvalidArgument,
    );
    assert_code(
        bs.query_write_status(query(&format!("{name}/secret")))
            .await,
        Code::InvalidArgument,
    );
    let err = create_log_stream(&mut server.logstreams(), "p")
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unimplemented);
    assert!(err.message().contains("no upstream"), "{err:?}");
    server.assert_still_serves().await;
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_logstream_endpoint_is_used_instead_of_the_main_upstream() {
    let main = FakeUpstream::start().await;
    let logs = FakeUpstream::start().await;
    let logs_uri = format!("http://{}", logs.addr());
    let server = proxy(&main, |u| u.logstream_uri = logs_uri).await;
    main.reset_stats();
    let log = create_log_stream(&mut server.logstreams(), "p")
        .await
        .unwrap();
    let mut reader = open_read(&mut server.bytestream(), &log.name, 0)
        .await
        .unwrap();
    let mut writer = LogWriter::start(server.bytestream(), &log.write_resource_name);
    writer.send(b"on the log server").await;
    assert_eq!(
        read_exactly(&mut reader, 17, WAIT).await,
        b"on the log server"
    );
    assert_eq!(writer.finish(b"").await.unwrap(), 17);
    assert!(reader.message().await.unwrap().is_none());
    assert_eq!(
        (
            logs.count(Method::CreateLogStream),
            logs.count(Method::Read),
            logs.count(Method::Write)
        ),
        (1, 1, 1)
    );
    assert_eq!(main.total_calls(), 0, "{}", main.summary());
    server.stop().await;
}
