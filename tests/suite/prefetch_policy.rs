//! Adaptive prefetch (issue 14) against the fake upstream: what reaches the
//! upstream for an invocation that reads its outputs, one that reads none,
//! outputs later actions take as inputs, and `mode = "always"`.
//!
//! Every Execute carries a RequestMetadata header (`tool_invocation_id`,
//! `action_mnemonic`) as Bazel sends it. Each test waits for prefetch's
//! decision counters before it looks at the fake, so what it asserts was
//! decided, not raced.

use std::time::{Duration, Instant};

use bazel_remote_apis::google::longrunning as lr;
use outpost::config::{Config, PrefetchConfig, PrefetchMode, PrefetchSection};
use prost::Message;
use tonic::metadata::MetadataValue;

use crate::common::fake_upstream::{
    FakeUpstream, Method, REQUEST_METADATA_HEADER, TestAction, digest_of, operation_response,
    output_content,
};
use crate::common::*;

const WAIT: Duration = Duration::from_secs(10);
/// Larger than the default `small_output_size` (16 KiB).
const LARGE: usize = (1 << 20) + 7;
/// Smaller than the default `small_output_size`.
const SMALL: usize = 1000;

/// One action with a large and a small output file.
struct Action {
    test: TestAction,
    large: re::Digest,
    small: re::Digest,
}

/// Action `n` of a test (`tag` keeps paths unique across tests: the fake
/// sizes outputs by path).
fn action(fake: &FakeUpstream, tag: &str, n: usize) -> Action {
    let (large_path, small_path) = (
        format!("{tag}/{n}/large.bin"),
        format!("{tag}/{n}/small.txt"),
    );
    let test = TestAction::new(
        &["gen", tag],
        &[&large_path, &small_path],
        &[("in.txt", b"input")],
    )
    .salted(format!("{tag}-{n}").as_bytes());
    fake.put_test_action(&test);
    fake.set_output_size(&large_path, LARGE);
    fake.set_output_size(&small_path, SMALL);
    let a = &test.digest;
    Action {
        large: digest_of(&output_content(a, &large_path, LARGE)),
        small: digest_of(&output_content(a, &small_path, SMALL)),
        test,
    }
}

/// A request carrying the RequestMetadata of `invocation`.
fn with_invocation<T>(message: T, invocation: &str) -> tonic::Request<T> {
    let metadata = re::RequestMetadata {
        tool_invocation_id: invocation.into(),
        action_mnemonic: "Genrule".into(),
        ..Default::default()
    };
    let mut request = tonic::Request::new(message);
    request.metadata_mut().insert_bin(
        REQUEST_METADATA_HEADER,
        MetadataValue::from_bytes(&metadata.encode_to_vec()),
    );
    request
}

/// Executes `action` for `invocation`; returns its ActionResult.
async fn execute(server: &TestServer, action: &Action, invocation: &str) -> re::ActionResult {
    let request = with_invocation(action.test.request(""), invocation);
    let mut exec = re::execution_client::ExecutionClient::new(server.channel())
        .max_decoding_message_size(64 << 20);
    let (ops, end): (Vec<lr::Operation>, _) =
        drain(exec.execute(request).await.expect("Execute").into_inner()).await;
    end.expect("the Operation stream");
    let response = operation_response(ops.last().expect("a done Operation")).expect("a response");
    let result = response.result.expect("an ActionResult");
    let files: Vec<_> = result
        .output_files
        .iter()
        .filter_map(|f| f.digest.clone())
        .collect();
    assert_eq!(files, vec![action.large.clone(), action.small.clone()]);
    result
}

/// The client reads both output files (the large one over ByteStream).
async fn read_outputs(server: &TestServer, action: &Action) {
    for d in [&action.large, &action.small] {
        let (data, _) = read_blob(&mut server.bytestream(), &read_name("", d), 0, 0)
            .await
            .expect("ByteStream Read");
        assert_eq!(digest_of(&data), *d);
    }
}

/// Waits until the fake served `d` at least once.
async fn wait_fetched(fake: &FakeUpstream, d: &re::Digest) {
    let deadline = Instant::now() + WAIT;
    while fake.fetches_of(d) == 0 {
        assert!(
            Instant::now() < deadline,
            "{d:?} never fetched: {}",
            fake.summary()
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Every prefetch decision counter summed (each output blob gets one).
async fn decisions(server: &TestServer) -> u64 {
    let s = stats(server).await.metrics;
    [
        "outpost_prefetch_skipped_total",
        "outpost_prefetch_skipped_learning_total",
        "outpost_prefetch_skipped_not_reading_total",
        "outpost_prefetch_skipped_input_total",
        "outpost_prefetched_blobs_total",
    ]
    .iter()
    .map(|k| s[*k])
    .sum()
}

/// Waits until prefetch decided on (and fetched) `n` output blobs in all.
async fn wait_decisions(server: &TestServer, n: u64) {
    let deadline = Instant::now() + WAIT;
    while decisions(server).await < n {
        assert!(
            Instant::now() < deadline,
            "prefetch never decided on {n} blobs"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

async fn adaptive(fake: &FakeUpstream, adjust: impl FnOnce(&mut Config)) -> TestServer {
    start_proxy(fake, |_| {}, adjust).await
}

#[tokio::test]
async fn an_invocation_that_reads_everything_keeps_full_prefetch() {
    let fake = FakeUpstream::start().await;
    let server = adaptive(&fake, |_| {}).await;
    // Learning: the first action's large output is left for the client...
    let first = action(&fake, "reader", 0);
    execute(&server, &first, "reader").await;
    wait_metric(&server, "outpost_prefetch_skipped_learning_total", 1).await;
    wait_decisions(&server, 4).await; // large, small, stdout, stderr
    assert_eq!(fake.fetches_of(&first.large), 0, "{}", fake.summary());
    // ...which reads it: the invocation reads what it is given.
    read_outputs(&server, &first).await;
    assert_eq!(fake.fetches_of(&first.large), 1, "read on demand");
    assert_eq!(
        metric(&server, "outpost_prefetch_outputs_read_total").await,
        2
    );
    assert_eq!(metric(&server, "outpost_prefetch_missed_total").await, 1);
    assert_eq!(
        metric(&server, "outpost_prefetch_invocations_reading").await,
        1
    );

    // From now on everything is prefetched before the client asks.
    for n in 1..4 {
        let next = action(&fake, "reader", n);
        execute(&server, &next, "reader").await;
        wait_fetched(&fake, &next.large).await;
        wait_fetched(&fake, &next.small).await;
        let reads = fake.count(Method::Read);
        read_outputs(&server, &next).await;
        assert_eq!(fake.count(Method::Read), reads, "action {n} read locally");
        assert_eq!(fake.fetches_of(&next.large), 1);
    }
    assert_eq!(
        metric(&server, "outpost_prefetch_skipped_learning_total").await,
        1
    );
    assert_eq!(
        metric(&server, "outpost_prefetch_skipped_not_reading_total").await,
        0
    );
    assert_eq!(
        metric(&server, "outpost_prefetch_invocations_reading").await,
        1
    );
}

#[tokio::test]
async fn an_invocation_that_reads_nothing_stops_pulling_outputs() {
    let fake = FakeUpstream::start().await;
    let server = adaptive(&fake, |c| c.prefetch.learning_actions = 3).await;
    let actions: Vec<Action> = (0..6).map(|n| action(&fake, "quiet", n)).collect();
    for (n, a) in actions.iter().enumerate() {
        execute(&server, a, "quiet").await;
        // Decide action by action, so each decision sees the counts so far.
        wait_decisions(&server, 4 * (n as u64 + 1)).await;
    }
    for (n, a) in actions.iter().enumerate() {
        assert_eq!(
            fake.fetches_of(&a.large),
            0,
            "action {n}: large never pulled"
        );
        // Learning for the first two (fewer than 3 finished), then not.
        let want = usize::from(n < 2);
        assert_eq!(fake.fetches_of(&a.small), want, "action {n}: small");
    }
    assert_eq!(
        metric(&server, "outpost_prefetch_skipped_learning_total").await,
        2
    );
    assert_eq!(
        metric(&server, "outpost_prefetch_skipped_not_reading_total").await,
        8
    );
    assert_eq!(
        metric(&server, "outpost_prefetch_invocations_not_reading").await,
        1
    );
    assert_eq!(
        metric(&server, "outpost_prefetch_outputs_offered_total").await,
        12
    );
    // What prefetch moved: stdout and stderr of each action, two small files.
    assert_eq!(
        metric(&server, "outpost_prefetched_blobs_total").await,
        6 * 2 + 2
    );

    // Another invocation (a client that reads) is judged on its own.
    let other = action(&fake, "quiet", 6);
    execute(&server, &other, "someone else").await;
    wait_decisions(&server, 4 * 7).await;
    assert_eq!(fake.fetches_of(&other.small), 1, "learning again");
}

#[tokio::test]
async fn outputs_taken_as_inputs_are_left_to_the_upstream() {
    let fake = FakeUpstream::start().await;
    let server = adaptive(&fake, |_| {}).await;
    let outputs = ["inputs/0/large.bin", "inputs/0/small.txt", "inputs/0/dir"];
    let test = TestAction::new(&["gen", "inputs"], &outputs, &[("in.txt", b"input")]).salted(b"in");
    fake.put_test_action(&test);
    fake.set_output_size(outputs[0], LARGE);
    fake.set_output_size(outputs[1], SMALL);
    fake.set_directory_outputs(&[outputs[2]]);
    let small = digest_of(&output_content(&test.digest, outputs[1], SMALL));
    // The client uploads the action (as Bazel does), so Outpost reads none
    // of it upstream; then the job's first upstream read is the directory's
    // Tree: hold it there.
    let blobs: Vec<&[u8]> = test.blobs.iter().map(|(_, b)| &b[..]).collect();
    let codes = batch_update(&mut server.cas(), "", &blobs).await;
    assert!(codes.iter().all(|c| *c == tonic::Code::Ok), "{codes:?}");
    fake.pause_method(Method::BatchReadBlobs);
    fake.pause_method(Method::Read);
    let request = with_invocation(test.request(""), "build");
    let mut exec = re::execution_client::ExecutionClient::new(server.channel())
        .max_decoding_message_size(64 << 20);
    let (_, end) = drain(exec.execute(request).await.unwrap().into_inner()).await;
    end.unwrap();
    assert!(fake.wait_parked(1, WAIT).await, "{}", fake.summary());

    // The next action of the build takes the small output as input
    // (Bazel asks FindMissingBlobs for every input first).
    let find = re::FindMissingBlobsRequest {
        instance_name: String::new(),
        blob_digests: vec![small.clone()],
        ..Default::default()
    };
    server
        .cas()
        .find_missing_blobs(with_invocation(find, "build"))
        .await
        .expect("FindMissingBlobs");
    assert_eq!(
        metric(&server, "outpost_prefetch_outputs_consumed_total").await,
        1
    );
    fake.resume();
    wait_metric(&server, "outpost_prefetch_skipped_input_total", 1).await;
    // Fetched: stdout, stderr, the 2 directory files; skipped: large
    // (learning), small (input).
    wait_decisions(&server, 6).await;
    assert_eq!(fake.fetches_of(&small), 0, "left to the upstream");
    assert_eq!(
        metric(&server, "outpost_prefetch_skipped_learning_total").await,
        1
    );
}

#[tokio::test]
async fn always_keeps_prefetching_what_nobody_reads() {
    let fake = FakeUpstream::start().await;
    let server = adaptive(&fake, |c| {
        c.prefetch.mode = PrefetchMode::Always;
        c.prefetch.learning_actions = 1;
    })
    .await;
    for n in 0..4 {
        let a = action(&fake, "always", n);
        execute(&server, &a, "always").await;
        wait_fetched(&fake, &a.large).await;
        wait_fetched(&fake, &a.small).await;
    }
    wait_metric(&server, "outpost_prefetched_blobs_total", 4 * 4).await;
    // The learner still judges (for the metrics), but decides nothing.
    assert_eq!(
        metric(&server, "outpost_prefetch_invocations_not_reading").await,
        1
    );
    assert_eq!(
        metric(&server, "outpost_prefetch_skipped_not_reading_total").await,
        0
    );
}

#[tokio::test]
async fn off_prefetches_nothing() {
    let fake = FakeUpstream::start().await;
    let off = PrefetchSection {
        mode: Some(PrefetchMode::Off),
        ..Default::default()
    };
    let server = adaptive(&fake, |c| c.prefetch = PrefetchConfig::resolve(off)).await;
    let a = action(&fake, "off", 0);
    execute(&server, &a, "off").await;
    read_outputs(&server, &a).await;
    assert_eq!(metric(&server, "outpost_prefetch_jobs_total").await, 0);
    assert_eq!(fake.fetches_of(&a.small), 1, "read on demand only");
}

#[tokio::test]
async fn outputs_read_in_an_earlier_invocation_are_prefetched_again() {
    let fake = FakeUpstream::start().await;
    let server = adaptive(&fake, |c| c.prefetch.learning_actions = 1).await;
    // A first build reads its top-level output (large: fetched on demand).
    let first = action(&fake, "history", 0);
    execute(&server, &first, "build 1").await;
    wait_decisions(&server, 4).await;
    read_outputs(&server, &first).await;
    // A second build that reads nothing at all...
    let (mut ours, mut decided) = (Vec::new(), 4);
    for n in 1..3 {
        let other = action(&fake, "history-other", n);
        execute(&server, &other, "build 2").await;
        decided += 4;
        wait_decisions(&server, decided).await;
        ours.push(other);
    }
    assert_eq!(
        metric(&server, "outpost_prefetch_invocations_not_reading").await,
        1
    );
    // ...still gets the same target's outputs (same paths, new bytes).
    let again = TestAction::new(
        &["gen", "history"],
        &["history/0/large.bin", "history/0/small.txt"],
        &[("in.txt", b"changed input")],
    );
    fake.put_test_action(&again);
    let again = Action {
        large: digest_of(&output_content(&again.digest, "history/0/large.bin", LARGE)),
        small: digest_of(&output_content(&again.digest, "history/0/small.txt", SMALL)),
        test: again,
    };
    assert_ne!(again.large, first.large);
    execute(&server, &again, "build 2").await;
    wait_fetched(&fake, &again.large).await;
    wait_fetched(&fake, &again.small).await;
    for other in &ours {
        assert_eq!(fake.fetches_of(&other.large), 0, "never read: skipped");
    }
}
