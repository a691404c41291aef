//! Readers of a large read-through miss stream it while the upstream
//! transfer runs (issue 11): the reader that starts the fetch and every
//! reader that joins it get bytes as they arrive, from one upstream
//! transfer written to the store once; a corrupt upstream blob fails every
//! reader and leaves nothing stored. The fake upstream sends slowly (a
//! delay per 64 KiB), and "before the fetch ends" is read off its call log:
//! the upstream Read is still running when a reader gets its bytes.

use std::time::Duration;

use tonic::Code;
use tonic::transport::Channel;

use crate::common::fake_upstream::{FakeUpstream, Method};
use crate::common::*;

/// Upper bound for anything the tests wait for (never reached when all is well).
const WAIT: Duration = Duration::from_secs(20);
const MIB: usize = 1 << 20;
/// The fake sends a blob in pieces of this size, one per [`CHUNK_DELAY`].
const CHUNK: usize = 64 << 10;
/// 4 MiB take 64 × 10 ms = 0.64 s to cross.
const CHUNK_DELAY: Duration = Duration::from_millis(10);

/// A fake upstream that sends blobs slowly, and a proxy in front of it.
async fn slow_upstream_and_proxy() -> (FakeUpstream, TestServer) {
    let fake = FakeUpstream::start().await;
    fake.set_read_chunk_size(CHUNK);
    fake.set_read_chunk_delay(CHUNK_DELAY);
    let server = start_proxy(&fake, |_| {}, |_| {}).await;
    fake.reset_stats();
    (fake, server)
}

/// Whether the upstream Read of `d` is still sending.
fn upstream_read_running(fake: &FakeUpstream, d: &re::Digest) -> bool {
    fake.calls_of(Method::Read)
        .iter()
        .any(|c| c.digests.first() == Some(d) && c.code.is_none())
}

/// Another client: its own HTTP/2 connection.
async fn connect(server: &TestServer) -> Channel {
    outpost::client::connect(&format!("grpc://{}", server.addr()))
        .await
        .expect("client connects")
}

/// Opens a ByteStream Read of `[offset, offset + limit)` of `d`.
async fn open(
    channel: &Channel,
    d: &re::Digest,
    offset: usize,
    limit: usize,
) -> tonic::Streaming<bs::ReadResponse> {
    channel
        .bytestream()
        .read(bs::ReadRequest {
            resource_name: read_name("", d),
            read_offset: offset as i64,
            read_limit: limit as i64,
        })
        .await
        .expect("the read opens")
        .into_inner()
}

/// The rest of a read stream's bytes, and how it ended.
async fn rest(stream: tonic::Streaming<bs::ReadResponse>) -> (Vec<u8>, Result<(), tonic::Status>) {
    let (messages, end) = tokio::time::timeout(WAIT, drain(stream))
        .await
        .expect("the read ends in time");
    (messages.into_iter().flat_map(|m| m.data).collect(), end)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn readers_stream_a_large_miss_while_it_is_fetched() {
    let (fake, server) = slow_upstream_and_proxy().await;
    let data = blob(11, 4 * MIB);
    let d = fake.put_blob(data.clone());

    // A starts the fetch and gets its first bytes while it runs.
    let mut a = open(&server.channel(), &d, 0, 0).await;
    let a_first = read_exactly(&mut a, CHUNK, WAIT).await;
    assert_eq!(a_first, data[..CHUNK]);
    assert!(upstream_read_running(&fake, &d), "A streams before the end");

    // B (another client) joins: its first bytes come at once, not at the end.
    let mut b = open(&connect(&server).await, &d, 0, 0).await;
    let b_first = read_exactly(&mut b, CHUNK, WAIT).await;
    assert_eq!(b_first, data[..CHUNK]);
    assert!(upstream_read_running(&fake, &d), "B streams before the end");

    // C joins for a range in the second half, which has not arrived yet.
    let (offset, limit) = (2 * MIB + 5, MIB + 3);
    let c = open(&connect(&server).await, &d, offset, limit).await;

    let (a_rest, a_end) = rest(a).await;
    let (b_rest, b_end) = rest(b).await;
    let (c_all, c_end) = rest(c).await;
    for (name, end) in [("A", a_end), ("B", b_end), ("C", c_end)] {
        end.unwrap_or_else(|e| panic!("{name}'s read failed: {e:?}"));
    }
    assert!([a_first, a_rest].concat() == data, "A got the blob");
    assert!([b_first, b_rest].concat() == data, "B got the blob");
    assert!(c_all == data[offset..offset + limit], "C got its range");

    assert_eq!(fake.fetches_of(&d), 1, "one upstream transfer");
    assert_eq!(
        fake.bytes_sent(),
        data.len() as u64,
        "the blob crossed once"
    );
    let s = stats(&server).await;
    assert_eq!((s.upstream_fetches, s.single_flight_joins), (1, 2));
    assert_eq!((s.blob_count, s.blob_bytes), (1, data.len() as u64));
    let again = read_blob(&mut server.channel().bytestream(), &read_name("", &d), 0, 0)
        .await
        .expect("a later read");
    assert!(again.0 == data, "a later read gets the blob");
    assert_eq!(fake.fetches_of(&d), 1, "later reads are local");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_corrupt_upstream_blob_fails_every_reader_and_is_not_stored() {
    let (fake, server) = slow_upstream_and_proxy().await;
    let good = blob(12, 3 * MIB);
    let d = digest(&good);
    let mut rotten = good.clone();
    rotten[2 * MIB] ^= 1;
    fake.put_blob_unchecked(&d, rotten);

    let mut a = open(&server.channel(), &d, 0, 0).await;
    read_exactly(&mut a, CHUNK, WAIT).await;
    let mut b = open(&connect(&server).await, &d, 0, 0).await;
    read_exactly(&mut b, CHUNK, WAIT).await;
    assert!(upstream_read_running(&fake, &d), "both joined the transfer");

    for (name, reader) in [("A", a), ("B", b)] {
        let (got, end) = rest(reader).await;
        let err = end.expect_err("a corrupt blob fails the read");
        assert_eq!(err.code(), Code::Unavailable, "{name}: {err:?}");
        assert!(
            CHUNK + got.len() < good.len(),
            "{name}: the end of the blob was held back"
        );
    }
    assert_eq!(fake.fetches_of(&d), 1, "one upstream transfer");
    server.assert_nothing_stored().await;
}
