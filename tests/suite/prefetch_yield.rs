//! Prefetch yields to clients (issue 14): an in-process Outpost in front of
//! the test kit's fake upstream, a prefetch started by an upstream action
//! cache hit, and a client working meanwhile. What the fake served, and in
//! which order transfers completed, show whether prefetch got out of the
//! way; transfer times are printed, never asserted (see `benches/`).

use std::time::{Duration, Instant};

use outpost::config::PrefetchMode;
use outpost_testkit::relay::{Relay, WanConfig};

use crate::common::fake_upstream::{FakeUpstream, Method};
use crate::common::*;

/// Upper bound for anything the tests wait for (never reached when all is well).
const WAIT: Duration = Duration::from_secs(30);
const MIB: usize = 1 << 20;

/// Polls until `ready` holds (bounded by [`WAIT`]).
async fn wait_until(what: &str, mut ready: impl AsyncFnMut() -> bool) {
    let deadline = Instant::now() + WAIT;
    while !ready().await {
        assert!(Instant::now() < deadline, "timed out waiting until {what}");
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

/// A blob of `len` bytes stored upstream only.
fn upstream_blob(fake: &FakeUpstream, len: usize, seed: u64) -> re::Digest {
    fake.put_blob(blob(seed, len))
}

/// An action whose cached result (upstream only) has `outputs` as files.
fn cached_action(fake: &FakeUpstream, name: &str, outputs: &[&re::Digest]) -> re::Digest {
    let action = fake.put_blob(name.as_bytes().to_vec());
    let result = re::ActionResult {
        output_files: outputs
            .iter()
            .enumerate()
            .map(|(i, d)| re::OutputFile {
                path: format!("out/{i}.bin"),
                digest: Some((*d).clone()),
                ..Default::default()
            })
            .collect(),
        ..Default::default()
    };
    fake.put_action_result("", &action, result);
    action
}

/// The client asks for `action`'s result: Outpost finds it upstream, and
/// queues its outputs for prefetch.
async fn get_action_result(server: &TestServer, action: &re::Digest) {
    server
        .action_cache()
        .get_action_result(re::GetActionResultRequest {
            action_digest: Some(action.clone()),
            ..Default::default()
        })
        .await
        .expect("GetActionResult");
}

/// Reads `d` through Outpost over ByteStream, checks it, returns how long it took.
async fn timed_read(server: &TestServer, d: &re::Digest) -> Duration {
    let started = Instant::now();
    let got = read_digest(&mut server.bytestream(), d)
        .await
        .expect("ByteStream Read");
    assert_eq!(&got, d);
    started.elapsed()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_read_overtakes_a_prefetch_running_over_a_narrow_link() {
    let fake = FakeUpstream::start().await;
    // A narrow link: each transfer below takes the best part of a second.
    let wan = WanConfig::new(Duration::from_millis(20), 40.0);
    let relay = Relay::start(fake.addr(), wan).await.expect("relay starts");
    let server = start_proxy(
        &fake,
        |u| u.uri = relay.url(),
        |c| c.prefetch.mode = PrefetchMode::Always,
    )
    .await;
    let prefetched = upstream_blob(&fake, 4 * MIB, 1);
    let action = cached_action(&fake, "prefetch me", &[&prefetched]);
    let (alone, during) = (
        upstream_blob(&fake, 4 * MIB, 2),
        upstream_blob(&fake, 4 * MIB, 3),
    );

    // The client's transfer on a quiet link, for comparison.
    let quiet = timed_read(&server, &alone).await;

    get_action_result(&server, &action).await;
    // Let the prefetch get going: its transfer is a quarter through.
    wait_until("the prefetch transfer is under way", async || {
        fake.bytes_sent_by(Method::Read) >= (4 + 1) as u64 * MIB as u64
    })
    .await;
    let busy = timed_read(&server, &during).await;
    // Sharing the link fairly, the prefetch (with less left to send) would
    // finish first; yielding, it is still paused when the client is done.
    assert_eq!(
        metric(&server, "outpost_prefetched_blobs_total").await,
        0,
        "the prefetch finished before the client's read: it did not yield"
    );
    println!(
        "client read of 4 MiB over {wan}: {quiet:?} on a quiet link, {busy:?} during a \
         prefetch ({:.2}x)",
        busy.as_secs_f64() / quiet.as_secs_f64()
    );
    wait_until("the prefetch is done", async || {
        metric(&server, "outpost_prefetched_blobs_total").await >= 1
    })
    .await;
    assert!(metric(&server, "outpost_prefetch_waits_total").await >= 1);
    assert_eq!(fake.fetches_of(&prefetched), 1, "{}", fake.summary());
}

#[tokio::test]
async fn a_client_read_joins_a_waiting_prefetch_and_never_waits_for_the_gate() {
    let fake = FakeUpstream::start().await;
    let server = start_proxy(&fake, |_| {}, |c| c.prefetch.mode = PrefetchMode::Always).await;
    let prefetched = upstream_blob(&fake, 3 * MIB, 4);
    let action = cached_action(&fake, "join me", &[&prefetched]);

    // A client read that hangs upstream: client work in flight throughout.
    // (A download: uploads cross the link's other direction and do not
    // hold prefetch back.)
    let small = upstream_blob(&fake, 100, 5);
    fake.pause_method(Method::BatchReadBlobs);
    let held = {
        let mut cas = server.cas();
        tokio::spawn(async move {
            cas.batch_read_blobs(re::BatchReadBlobsRequest {
                digests: vec![small],
                ..Default::default()
            })
            .await
            .map(|r| r.into_inner().responses.len())
        })
    };
    assert!(fake.wait_parked(1, WAIT).await, "{}", fake.summary());

    get_action_result(&server, &action).await;
    // The prefetch's transfer exists (a client read would join it) but
    // waits for the client's read to end.
    wait_until("the prefetch transfer is set up", async || {
        metric(&server, "outpost_upstream_fetches_total").await >= 1
    })
    .await;
    assert_eq!(fake.fetches_of(&prefetched), 0, "prefetch did not wait");

    // The other read still hangs: a read that joins the prefetch must not wait.
    let read = tokio::time::timeout(WAIT, timed_read(&server, &prefetched)).await;
    read.expect("the client's read waited for the gate");
    assert_eq!(fake.fetches_of(&prefetched), 1, "one upstream read, shared");
    assert_eq!(
        metric(&server, "outpost_prefetch_promotions_total").await,
        1
    );
    assert_eq!(metric(&server, "outpost_prefetch_joins_total").await, 1);
    assert!(!held.is_finished());

    fake.resume();
    assert_eq!(held.await.unwrap().expect("BatchReadBlobs"), 1);
}
