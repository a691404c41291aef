//! Self-tests of the fake upstream's Remote Logstream: CreateLogStream names,
//! a Read that tails a log while it is written, the statuses the spec
//! requires, QueryWriteStatus, and the count of readers in progress (which
//! Outpost's cancellation tests rely on). Talks to the fake over gRPC.

use std::time::Duration;

use outpost_testkit::client::{
    Clients, LogWriter, assert_code, create_log_stream, open_read, read_blob, read_exactly,
    read_name,
};
use outpost_testkit::fake::{FakeUpstream, Method};
use outpost_testkit::{blob, bs};
use tonic::Code;

const WAIT: Duration = Duration::from_secs(5);

#[tokio::test]
async fn create_names_the_stream_under_its_parent_with_a_separate_write_name() {
    let up = FakeUpstream::start().await;
    let ch = up.channel().await;
    let a = create_log_stream(&mut ch.logstreams(), "projects/1")
        .await
        .unwrap();
    let b = create_log_stream(&mut ch.logstreams(), "projects/1")
        .await
        .unwrap();
    assert!(a.name.starts_with("projects/1/logstreams/"), "{}", a.name);
    assert_ne!(a.name, b.name);
    let secret = a
        .write_resource_name
        .strip_prefix(&format!("{}/", a.name))
        .expect("the write name extends the name");
    assert!(!secret.is_empty() && !secret.contains('/'));
    let root = create_log_stream(&mut ch.logstreams(), "").await.unwrap();
    assert!(root.name.starts_with("logstreams/"), "{}", root.name);
    assert_eq!(up.log_stream_count(), 3);
    assert_eq!(up.count(Method::CreateLogStream), 3);
    assert_eq!(
        up.calls_of(Method::CreateLogStream)[0].instance_name,
        "projects/1",
        "the call log records the parent"
    );
    assert_eq!(up.log_stream(&a.name), Some((Vec::new(), false)));
}

#[tokio::test]
async fn a_read_tails_the_log_until_the_write_finishes() {
    let up = FakeUpstream::start().await;
    let ch = up.channel().await;
    let log = create_log_stream(&mut ch.logstreams(), "p").await.unwrap();
    let mut writer = LogWriter::start(ch.bytestream(), &log.write_resource_name);
    writer.send(b"early ").await;
    // A reader that starts late still gets the committed bytes first.
    let mut reader = open_read(&mut ch.bytestream(), &log.name, 0).await.unwrap();
    assert_eq!(read_exactly(&mut reader, 6, WAIT).await, b"early ");
    assert!(up.wait_active_log_readers(1, WAIT).await);
    writer.send(b"middle ").await;
    assert_eq!(read_exactly(&mut reader, 7, WAIT).await, b"middle ");
    let status = ch
        .bytestream()
        .query_write_status(bs::QueryWriteStatusRequest {
            resource_name: log.write_resource_name.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!((status.committed_size, status.complete), (13, false));
    // Nothing more yet: the read stays open.
    assert!(
        tokio::time::timeout(Duration::from_millis(100), reader.message())
            .await
            .is_err(),
        "the read must wait for more bytes"
    );
    assert_eq!(writer.finish(b"end").await.unwrap(), 16);
    assert_eq!(read_exactly(&mut reader, 3, WAIT).await, b"end");
    assert!(
        reader.message().await.unwrap().is_none(),
        "ends after finish"
    );
    assert!(up.wait_active_log_readers(0, WAIT).await);
    assert_eq!(
        up.log_stream(&log.name),
        Some((b"early middle end".to_vec(), true))
    );

    // A finished log reads whole, from an offset, and within a limit.
    let mut bs = ch.bytestream();
    let (all, _) = read_blob(&mut bs, &log.name, 0, 0).await.unwrap();
    assert_eq!(all, b"early middle end");
    assert_eq!(
        read_blob(&mut bs, &log.name, 6, 6).await.unwrap().0,
        b"middle"
    );
    let status = bs
        .query_write_status(bs::QueryWriteStatusRequest {
            resource_name: log.write_resource_name.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!((status.committed_size, status.complete), (16, true));
}

#[tokio::test]
async fn log_names_get_the_statuses_the_spec_requires() {
    let up = FakeUpstream::start().await;
    let ch = up.channel().await;
    let mut bs = ch.bytestream();
    let log = create_log_stream(&mut ch.logstreams(), "p").await.unwrap();
    assert_code(
        read_blob(&mut bs, &log.write_resource_name, 0, 0).await,
        Code::InvalidArgument,
    );
    assert_code(
        read_blob(&mut bs, "p/logstreams/nobody", 0, 0).await,
        Code::NotFound,
    );
    assert_code(
        LogWriter::start(ch.bytestream(), &log.name)
            .finish(b"x")
            .await,
        Code::InvalidArgument,
    );
    let mut writer = LogWriter::start(ch.bytestream(), &log.write_resource_name);
    writer.send(b"abc").await;
    assert_eq!(writer.finish(b"").await.unwrap(), 3);
    assert_code(
        LogWriter::start(ch.bytestream(), &log.write_resource_name)
            .finish(b"more")
            .await,
        Code::FailedPrecondition, // a finalised log cannot be appended to
    );
    assert_code(
        bs.query_write_status(bs::QueryWriteStatusRequest {
            resource_name: "p/logstreams/nobody/secret".into(),
        })
        .await,
        Code::NotFound,
    );
    // CAS names are still the CAS's.
    let data = blob(1, 1000);
    let d = up.put_blob(data.clone());
    assert_eq!(
        read_blob(&mut bs, &read_name("", &d), 0, 0)
            .await
            .unwrap()
            .0,
        data
    );
}

#[tokio::test]
async fn a_reader_that_goes_away_is_no_longer_counted() {
    let up = FakeUpstream::start().await;
    let ch = up.channel().await;
    let log = create_log_stream(&mut ch.logstreams(), "p").await.unwrap();
    let mut writer = LogWriter::start(ch.bytestream(), &log.write_resource_name);
    writer.send(b"hello").await;
    let mut first = open_read(&mut ch.bytestream(), &log.name, 0).await.unwrap();
    let mut second = open_read(&mut ch.bytestream(), &log.name, 2).await.unwrap();
    assert_eq!(read_exactly(&mut first, 5, WAIT).await, b"hello");
    assert_eq!(read_exactly(&mut second, 3, WAIT).await, b"llo");
    assert!(up.wait_active_log_readers(2, WAIT).await);
    drop(first);
    assert!(up.wait_active_log_readers(1, WAIT).await);
    drop(second);
    assert!(up.wait_active_log_readers(0, WAIT).await);
    assert_eq!(writer.finish(b"").await.unwrap(), 5);
}
