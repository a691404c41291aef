//! Write-back uploads, black-box: writes through an Outpost in front of the
//! test kit's fake upstream are acknowledged once stored locally and reach
//! the upstream from the durable queue: through outages, `kill -9` and
//! restarts, with action results never ahead of their outputs, queued blobs
//! never evicted, and a full queue falling back to write-through.

use std::time::{Duration, Instant};

use outpost::config::UpstreamConfig;
use outpost_testkit::fake::{FakeUpstream, Method, TestAction, operation_response};
use tonic::Code;

use crate::common::*;

/// Upper bound for anything the tests wait for (never reached when all is
/// well; an upstream marked down is probed at most every 15 s).
const WAIT: Duration = Duration::from_secs(40);
const MIB: usize = 1 << 20;

async fn proxy(fake: &FakeUpstream, adjust: impl FnOnce(&mut UpstreamConfig)) -> TestServer {
    start_proxy(fake, adjust, |_| {}).await
}

/// Polls `done` until it holds; panics naming `what` after [`WAIT`].
async fn wait_until(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + WAIT;
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Polls the server's gauges until its upload queue holds nothing.
async fn wait_queue_empty(clients: &impl Clients) {
    let deadline = Instant::now() + WAIT;
    loop {
        let m = stats(clients).await.metrics;
        if m["outpost_write_back_queued_blobs"] == 0 && m["outpost_write_back_queued_results"] == 0
        {
            return;
        }
        assert!(Instant::now() < deadline, "the queue never emptied: {m:?}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

async fn update(
    clients: &impl Clients,
    action: &re::Digest,
    result: re::ActionResult,
) -> Result<(), tonic::Status> {
    clients
        .action_cache()
        .update_action_result(re::UpdateActionResultRequest {
            instance_name: String::new(),
            action_digest: Some(action.clone()),
            action_result: Some(result),
            results_cache_policy: None,
            digest_function: 0,
        })
        .await
        .map(|_| ())
}

/// A result naming `outputs` as output files.
fn result_of(outputs: &[&re::Digest]) -> re::ActionResult {
    re::ActionResult {
        output_files: outputs
            .iter()
            .enumerate()
            .map(|(i, d)| re::OutputFile {
                path: format!("out/{i}"),
                digest: Some((*d).clone()),
                ..Default::default()
            })
            .collect(),
        ..Default::default()
    }
}

/// Action results with the outputs they name.
type Results = Vec<(re::Digest, Vec<re::Digest>)>;

/// Waits until the fake upstream holds every result of `results` and its
/// outputs, looking every millisecond as a second client reading the
/// upstream directly would: a result there before all its outputs fails.
async fn wait_in_order(fake: &FakeUpstream, results: &Results) {
    let deadline = Instant::now() + WAIT;
    loop {
        let mut complete = true;
        for (action, outputs) in results {
            let have_outputs = outputs.iter().all(|d| fake.has_blob(d));
            if fake.action_result("", action).is_some() {
                assert!(
                    have_outputs,
                    "result of {action:?} upstream before its outputs"
                );
            } else {
                complete = false;
            }
        }
        if complete {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "timed out waiting for the results upstream"
        );
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_succeed_during_an_outage_and_the_queue_drains_on_recovery() {
    let fake = FakeUpstream::start().await;
    let server = proxy(&fake, |_| {}).await;
    for method in [
        Method::BatchUpdateBlobs,
        Method::Write,
        Method::UpdateActionResult,
    ] {
        fake.fail_method(method, Code::Unavailable);
    }
    let small = blob(1, 1000);
    let large = blob(2, 3 * MIB);
    let (ds, dl) = (digest(&small), digest(&large));
    assert_eq!(
        batch_update(&mut server.cas(), "", &[&small]).await,
        vec![Code::Ok]
    );
    assert_eq!(
        upload(&mut server.bytestream(), "", &large, 256 << 10)
            .await
            .unwrap(),
        dl.size_bytes
    );
    let action = digest(b"action during the outage");
    update(&server, &action, result_of(&[&ds, &dl]))
        .await
        .unwrap();
    // Acknowledged, kept locally, waiting.
    assert!(!fake.has_blob(&ds) && !fake.has_blob(&dl));
    assert!(fake.action_result("", &action).is_none());
    assert_eq!(metric(&server, "outpost_write_back_queued_blobs").await, 2);
    assert_eq!(
        metric(&server, "outpost_write_back_queued_results").await,
        1
    );
    // The client's own FindMissingBlobs sees them present (they will be).
    assert!(
        find_missing(&mut server.cas(), &[ds.clone(), dl.clone()])
            .await
            .is_empty()
    );
    let (read, _) = read_blob(&mut server.bytestream(), &read_name("", &dl), 0, 0)
        .await
        .unwrap();
    assert_eq!(read, large);

    fake.clear_faults();
    wait_until("the queue to drain", || {
        fake.has_blob(&ds) && fake.has_blob(&dl) && fake.action_result("", &action).is_some()
    })
    .await;
    assert!(metric(&server, "outpost_write_back_retries_total").await > 0);
    wait_metric(&server, "outpost_write_back_uploaded_total", 2).await;
    wait_metric(&server, "outpost_write_back_results_forwarded_total", 1).await;
    assert_eq!(metric(&server, "outpost_write_back_queued_blobs").await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_action_result_reaches_the_upstream_only_after_its_outputs() {
    let fake = FakeUpstream::start().await;
    let server = proxy(&fake, |_| {}).await;
    // The large output's upload hangs at the upstream for a while.
    fake.pause_method(Method::Write);
    let stdout = blob(3, 500);
    let large = blob(4, 2 * MIB + 3);
    let (dso, dl) = (digest(&stdout), digest(&large));
    assert_eq!(
        batch_update(&mut server.cas(), "", &[&stdout]).await,
        vec![Code::Ok]
    );
    upload(&mut server.bytestream(), "", &large, 256 << 10)
        .await
        .unwrap();
    let action = digest(b"ordered action");
    let mut result = result_of(&[&dl]);
    result.stdout_digest = Some(dso.clone());
    update(&server, &action, result).await.unwrap();
    // Served to clients of this Outpost at once...
    let got = server
        .action_cache()
        .get_action_result(re::GetActionResultRequest {
            action_digest: Some(action.clone()),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(got.output_files[0].digest, Some(dl.clone()));
    // ...but not to the upstream while an output is still on its way.
    wait_until("the stdout upload", || fake.has_blob(&dso)).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(fake.action_result("", &action).is_none());
    let results = vec![(action, vec![dso, dl])];
    let (_, ()) = tokio::join!(wait_in_order(&fake, &results), async {
        tokio::time::sleep(Duration::from_millis(50)).await;
        fake.resume();
    });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn find_missing_answers_for_queued_blobs_without_asking_the_upstream() {
    let fake = FakeUpstream::start().await;
    let server = proxy(&fake, |_| {}).await;
    fake.pause_method(Method::BatchUpdateBlobs);
    let data = blob(5, 2000);
    let d = digest(&data);
    assert_eq!(
        batch_update(&mut server.cas(), "", &[&data]).await,
        vec![Code::Ok]
    );
    fake.reset_stats();
    let absent = digest(b"nobody has this");
    assert_eq!(
        find_missing(&mut server.cas(), &[d.clone(), absent.clone()]).await,
        vec![absent.clone()]
    );
    assert_eq!(fake.count_naming(Method::FindMissingBlobs, &d), 0);
    assert_eq!(fake.count_naming(Method::FindMissingBlobs, &absent), 1);
    fake.resume();
    wait_until("the upload", || fake.has_blob(&d)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_queue_falls_back_to_write_through() {
    let fake = FakeUpstream::start().await;
    let server = proxy(&fake, |u| u.write_back_max_bytes = Some(4 * MIB as u64)).await;
    // The first blob fills most of the queue, its upload held at the upstream.
    fake.pause_method(Method::Write);
    let queued = blob(6, 3 * MIB + MIB / 2);
    let dq = digest(&queued);
    upload(&mut server.bytestream(), "", &queued, 256 << 10)
        .await
        .unwrap();
    assert!(!fake.has_blob(&dq));
    // The next one does not fit: written through, upstream before the answer.
    let through = blob(7, 800 << 10);
    let dt = digest(&through);
    assert_eq!(
        batch_update(&mut server.cas(), "", &[&through]).await,
        vec![Code::Ok]
    );
    assert!(
        fake.has_blob(&dt),
        "written through before the acknowledgement"
    );
    assert_eq!(
        metric(&server, "outpost_write_back_fallbacks_total").await,
        1
    );
    assert_eq!(metric(&server, "outpost_write_back_queued_blobs").await, 1);
    fake.resume();
    wait_until("the queued upload", || fake.has_blob(&dq)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queued_blobs_are_never_evicted() {
    let fake = FakeUpstream::start().await;
    let server = start_proxy(
        &fake,
        |u| u.write_back_max_bytes = Some(3 * MIB as u64),
        |c| c.quota_bytes = 6 * MIB as u64,
    )
    .await;
    fake.pause_method(Method::BatchUpdateBlobs);
    let queued: Vec<Vec<u8>> = (0..5).map(|i| blob(100 + i, 500 << 10)).collect();
    for data in &queued {
        assert_eq!(
            batch_update(&mut server.cas(), "", &[data]).await,
            vec![Code::Ok]
        );
    }
    // Reads through the proxy fill the store several times over.
    for i in 0..24 {
        let data = blob(200 + i, 600 << 10);
        let d = fake.put_blob(data.clone());
        let (read, _) = read_blob(&mut server.bytestream(), &read_name("", &d), 0, 0)
            .await
            .unwrap();
        assert_eq!(read, data);
    }
    assert!(metric(&server, "outpost_evicted_entries_total").await > 0);
    // Every queued blob is still here (the upstream has none of them yet).
    for data in &queued {
        let d = digest(data);
        assert!(!fake.has_blob(&d));
        let (read, _) = read_blob(&mut server.bytestream(), &read_name("", &d), 0, 0)
            .await
            .expect("a queued blob is never evicted");
        assert_eq!(&read, data);
    }
    fake.resume();
    wait_until("the uploads", || {
        queued.iter().all(|b| fake.has_blob(&digest(b)))
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn execute_waits_until_its_queued_inputs_are_uploaded() {
    let fake = FakeUpstream::start().await;
    let server = proxy(&fake, |_| {}).await;
    fake.pause_method(Method::BatchUpdateBlobs);
    let action = TestAction::new(&["cc"], &["o"], &[("a.c", b"int a;"), ("b.h", b"int b;")]);
    let blobs: Vec<&[u8]> = action.blobs.iter().map(|(_, b)| &b[..]).collect();
    assert!(
        batch_update(&mut server.cas(), "", &blobs)
            .await
            .iter()
            .all(|c| *c == Code::Ok)
    );
    let mut exec = re::execution_client::ExecutionClient::new(server.channel());
    let request = action.request("");
    let call = tokio::spawn(async move {
        let stream = exec.execute(request).await?.into_inner();
        collect(stream).await
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        fake.count(Method::Execute),
        0,
        "held until the inputs are up"
    );
    fake.resume();
    let ops = call.await.unwrap().expect("Execute succeeds");
    let response = operation_response(ops.last().unwrap()).unwrap();
    assert_eq!(response.status.map_or(0, |s| s.code), 0);
    assert_eq!(
        fake.missing_input_rejections(),
        0,
        "the upstream had every input"
    );
    for d in action.blob_digests() {
        assert!(fake.has_blob(&d));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_graceful_stop_uploads_the_queue() {
    let fake = FakeUpstream::start().await;
    let server = proxy(&fake, |_| {}).await;
    fake.set_method_latency(Method::BatchUpdateBlobs, Some(Duration::from_millis(300)));
    let blobs: Vec<Vec<u8>> = (0..4).map(|i| blob(300 + i, 10_000)).collect();
    for data in &blobs {
        assert_eq!(
            batch_update(&mut server.cas(), "", &[data]).await,
            vec![Code::Ok]
        );
    }
    server.stop().await;
    for data in &blobs {
        assert!(
            fake.has_blob(&digest(data)),
            "uploaded before the stop returned"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_with_a_full_queue_then_restart_uploads_everything_results_last() {
    let fake = FakeUpstream::start().await;
    for method in [
        Method::BatchUpdateBlobs,
        Method::Write,
        Method::UpdateActionResult,
    ] {
        fake.fail_method(method, Code::Unavailable);
    }
    let dir = tempfile::tempdir().unwrap();
    let data_dir = dir.path().join("data");
    let start = |log: &str| {
        ServerProcess::command(env!("CARGO_BIN_EXE_outpost"), &data_dir)
            .arg("--upstream")
            .arg(fake.url())
            .log_file(&dir.path().join(log))
            .start()
            .expect("outpost starts")
    };
    let server = start("log-1");
    let mut results = Vec::new();
    for a in 0..6u64 {
        let small = blob(400 + a, 3000);
        let large = blob(500 + a, MIB + 1000 * a as usize);
        let (ds, dl) = (digest(&small), digest(&large));
        assert_eq!(
            batch_update(&mut server.cas(), "", &[&small]).await,
            vec![Code::Ok]
        );
        upload(&mut server.bytestream(), "", &large, 128 << 10)
            .await
            .unwrap();
        let action = digest(format!("action {a}").as_bytes());
        update(&server, &action, result_of(&[&ds, &dl]))
            .await
            .unwrap();
        results.push((action, vec![ds, dl]));
    }
    assert!(fake.blob_count() == 0 && fake.action_result_count() == 0);
    server.kill();

    fake.clear_faults();
    let server = start("log-2");
    wait_in_order(&fake, &results).await;
    // The queue settles each entry once the upstream answered.
    wait_queue_empty(&server).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inputs_the_input_check_queues_are_uploaded_before_the_execute() {
    let fake = FakeUpstream::start().await;
    // The proxy soon forgets what the upstream confirmed.
    let server = proxy(&fake, |u| u.existence_ttl = Duration::from_millis(1)).await;
    let action = TestAction::new(&["cc"], &["o"], &[("a.c", b"int a;"), ("b.h", b"int b;")]);
    let blobs: Vec<&[u8]> = action.blobs.iter().map(|(_, b)| &b[..]).collect();
    assert!(
        batch_update(&mut server.cas(), "", &blobs)
            .await
            .iter()
            .all(|c| *c == Code::Ok)
    );
    wait_until("the inputs upstream", || {
        action.blob_digests().iter().all(|d| fake.has_blob(d))
    })
    .await;
    wait_queue_empty(&server).await;
    // The upstream loses an input; only Outpost holds it now. The queue is
    // empty when the Execute arrives: its input check queues the input, and
    // it must go up before the Execute does.
    let lost = action.input("a.c").unwrap();
    assert!(fake.remove_blob(&lost));
    tokio::time::sleep(Duration::from_millis(20)).await;
    let mut exec = re::execution_client::ExecutionClient::new(server.channel());
    let stream = exec.execute(action.request("")).await.unwrap().into_inner();
    let ops = collect(stream).await.expect("Execute succeeds");
    let response = operation_response(ops.last().unwrap()).unwrap();
    assert_eq!(response.status.map_or(0, |s| s.code), 0);
    assert_eq!(
        fake.missing_input_rejections(),
        0,
        "the lost input was uploaded before the Execute"
    );
    assert!(fake.has_blob(&lost));
}
