//! Execution passthrough, black-box: an in-process Outpost in front of the
//! test kit's fake upstream (`outpost_testkit::fake` with its Execution
//! service), driven over real gRPC with the plain
//! REAPI Execution client. The fake's records and call counts show what
//! reached the upstream; Outpost's Admin stats show what it did on its own
//! (repairs, reattaches, prefetch, single-flight joins).

use std::time::{Duration, Instant};

use bazel_remote_apis::google::longrunning as lr;
use outpost::config::PrefetchMode;
use prost::Message;
use re::execution_stage::Value as Stage;
use tonic::metadata::MetadataValue;
use tonic::transport::Channel;
use tonic::{Code, Status};

use crate::common::fake_upstream::{
    ErrorDelivery, FakeUpstream, Method, REQUEST_METADATA_HEADER, StreamEnd, TestAction, digest_of,
    missing_digests, missing_digests_of, operation_response, operation_stage, output_content,
    stdio_content,
};
use crate::common::*;

/// Upper bound for anything the tests wait for (never reached when all is well).
const WAIT: Duration = Duration::from_secs(10);
const MIB: usize = 1 << 20;

type Exec = re::execution_client::ExecutionClient<Channel>;
type Ops = lr::operations_client::OperationsClient<Channel>;

// ---------------------------------------------------------------- fixture

/// An Outpost with default settings in front of `fake`.
async fn proxy(fake: &FakeUpstream) -> TestServer {
    start_proxy(fake, |_| {}, |_| {}).await
}

fn exec(server: &TestServer) -> Exec {
    Exec::new(server.channel()).max_decoding_message_size(64 << 20)
}

/// Execute through `server`: every Operation, or the error of the call or
/// of the stream.
async fn execute(
    server: &TestServer,
    req: impl tonic::IntoRequest<re::ExecuteRequest>,
) -> Result<Vec<lr::Operation>, Status> {
    let stream = exec(server).execute(req).await?.into_inner();
    let (ops, end) = drain(stream).await;
    end?;
    Ok(ops)
}

/// Execute that must succeed; returns the Operations and the ActionResult.
#[track_caller]
fn expect_success(
    result: Result<Vec<lr::Operation>, Status>,
) -> (Vec<lr::Operation>, re::ActionResult) {
    let ops = result.expect("Execute succeeds");
    let last = ops.last().expect("at least one Operation");
    assert!(last.done, "the stream ends with a done Operation: {ops:?}");
    let resp = operation_response(last).expect("an ExecuteResponse");
    let code = resp.status.as_ref().map_or(0, |s| s.code);
    assert_eq!(code, 0, "ExecuteResponse.status: {:?}", resp.status);
    (ops, resp.result.expect("an ActionResult"))
}

fn stages(ops: &[lr::Operation]) -> Vec<Stage> {
    ops.iter()
        .map(|o| operation_stage(o).expect("ExecuteOperationMetadata"))
        .collect()
}

/// Stages with consecutive repeats removed (a reattach may repeat one).
fn distinct_stages(ops: &[lr::Operation]) -> Vec<Stage> {
    let mut s = stages(ops);
    s.dedup();
    s
}

/// BatchReadBlobs through Outpost (instance `""`): each entry's data; every
/// entry must succeed.
async fn batch_read_ok(server: &TestServer, digests: &[re::Digest]) -> Vec<Vec<u8>> {
    let resp = server
        .cas()
        .batch_read_blobs(re::BatchReadBlobsRequest {
            instance_name: String::new(),
            digests: digests.to_vec(),
            acceptable_compressors: vec![],
            digest_function: 0,
        })
        .await
        .expect("BatchReadBlobs")
        .into_inner();
    assert_eq!(resp.responses.len(), digests.len());
    resp.responses
        .into_iter()
        .map(|r| {
            assert_eq!(entry_code(&r.status), Code::Ok, "{:?}", r.status);
            r.data
        })
        .collect()
}

/// Reads a blob whole through Outpost's ByteStream.
async fn bs_read(server: &TestServer, d: &re::Digest) -> Vec<u8> {
    read_blob(&mut server.bytestream(), &read_name("", d), 0, 0)
        .await
        .expect("ByteStream Read")
        .0
}

/// The Directory of a directory holding just these files (as TestAction encodes it).
fn directory_of(files: &[(&str, &[u8])]) -> re::Digest {
    let dir = re::Directory {
        files: files
            .iter()
            .map(|(name, data)| re::FileNode {
                name: name.to_string(),
                digest: Some(digest_of(data)),
                ..Default::default()
            })
            .collect(),
        ..Default::default()
    };
    digest_of(&dir.encode_to_vec())
}

/// The distinct (hash, size) pairs of a digest list.
fn keys(digests: &[re::Digest]) -> std::collections::BTreeSet<(String, i64)> {
    digests
        .iter()
        .map(|d| (d.hash.clone(), d.size_bytes))
        .collect()
}

// ---------------------------------------------------------------- passthrough

#[tokio::test]
async fn execute_streams_operations_and_forwards_every_field_and_header() {
    let fake = FakeUpstream::start().await;
    fake.set_execution_enabled(true);
    let server = start_proxy(
        &fake,
        |u| {
            u.instance_names.insert(String::new(), "main".into());
        },
        |_| {},
    )
    .await;
    let caps = server
        .capabilities()
        .get_capabilities(re::GetCapabilitiesRequest::default())
        .await
        .expect("GetCapabilities")
        .into_inner();
    assert!(
        caps.execution_capabilities
            .expect("execution capabilities")
            .exec_enabled,
        "the upstream executes, so Outpost offers execution"
    );

    let action = TestAction::new(
        &["gen", "--fast"],
        &["out/a.bin", "out/b.bin"],
        &[("src/in.txt", b"input"), ("top.txt", b"top")],
    );
    fake.put_test_action(&action);
    fake.reset_stats();

    let sent = re::ExecuteRequest {
        instance_name: String::new(),
        skip_cache_lookup: true,
        action_digest: Some(action.digest.clone()),
        execution_policy: Some(re::ExecutionPolicy { priority: 7 }),
        results_cache_policy: Some(re::ResultsCachePolicy { priority: -3 }),
        digest_function: re::digest_function::Value::Sha256 as i32,
        inline_stdout: true,
        inline_stderr: true,
        inline_output_files: vec!["out/b.bin".into()],
    };
    let meta = re::RequestMetadata {
        action_id: "act-42".into(),
        tool_invocation_id: "inv-7".into(),
        correlated_invocations_id: "build-1".into(),
        action_mnemonic: "Gen".into(),
        ..Default::default()
    };
    let mut req = tonic::Request::new(sent.clone());
    req.metadata_mut()
        .insert("authorization", "Bearer client-token".parse().unwrap());
    req.metadata_mut()
        .insert("x-tenant", "team-a".parse().unwrap());
    req.metadata_mut().insert_bin(
        REQUEST_METADATA_HEADER,
        MetadataValue::from_bytes(&meta.encode_to_vec()),
    );
    let (ops, result) = expect_success(execute(&server, req).await);

    // The stream: exactly the upstream's Operations, in order.
    assert_eq!(
        stages(&ops),
        vec![Stage::Queued, Stage::Executing, Stage::Completed]
    );
    let names = fake.operation_names();
    assert_eq!(names.len(), 1, "one upstream operation");
    assert_eq!(
        ops,
        fake.operation_history(&names[0]),
        "names, metadata and the ExecuteResponse pass through unchanged"
    );
    // Inlining as asked (so the flags reached the upstream).
    assert_eq!(
        result.stdout_raw,
        stdio_content(&action.digest, "stdout", 100)
    );
    assert_eq!(
        result.stderr_raw,
        stdio_content(&action.digest, "stderr", 20)
    );
    assert!(result.output_files[0].contents.is_empty());
    assert_eq!(
        result.output_files[1].contents,
        output_content(&action.digest, "out/b.bin", 1000)
    );

    // The upstream got the request unchanged but for the instance name, and
    // the client's headers.
    let records = fake.execute_requests();
    assert_eq!(records.len(), 1, "one Execute upstream");
    let rec = &records[0];
    assert_eq!(
        rec.request,
        re::ExecuteRequest {
            instance_name: "main".into(),
            ..sent
        }
    );
    let call = fake
        .calls_of(Method::Execute)
        .into_iter()
        .find(|c| c.id == rec.call_id)
        .expect("the Execute call is logged");
    assert_eq!(call.instance_name, "main");
    assert_eq!(
        call.header("authorization").as_deref(),
        Some("Bearer client-token")
    );
    assert_eq!(call.header("x-tenant").as_deref(), Some("team-a"));
    assert_eq!(call.request_metadata(), Some(meta));
    assert_eq!(fake.count(Method::WaitExecution), 0);

    // The input check and the prefetch of the outputs ask for the mapped
    // instance as well, with the client's credentials.
    wait_metric(&server, "outpost_prefetched_blobs_total", 4).await;
    let cas_calls: Vec<_> = fake
        .calls()
        .into_iter()
        .filter(|c| {
            matches!(
                c.method,
                Method::FindMissingBlobs | Method::BatchReadBlobs | Method::Read
            )
        })
        .collect();
    assert!(
        cas_calls.iter().any(|c| c.method == Method::BatchReadBlobs),
        "{}",
        fake.summary()
    );
    for c in &cas_calls {
        assert_eq!(c.instance_name, "main", "{:?}", c.method);
        assert_eq!(
            c.header("authorization").as_deref(),
            Some("Bearer client-token")
        );
    }

    // google.longrunning GetOperation is forwarded too.
    let got = Ops::new(server.channel())
        .get_operation(lr::GetOperationRequest {
            name: names[0].clone(),
        })
        .await
        .expect("GetOperation through Outpost")
        .into_inner();
    assert_eq!(got, *ops.last().unwrap());
    assert_eq!(fake.count(Method::GetOperation), 1);
}

#[tokio::test]
async fn capabilities_report_execution_as_the_upstream_does() {
    let fake = FakeUpstream::start().await;
    // Not enabled: the fake advertises exec_enabled = false.
    let server = proxy(&fake).await;
    let caps = server
        .capabilities()
        .get_capabilities(re::GetCapabilitiesRequest::default())
        .await
        .expect("GetCapabilities")
        .into_inner();
    assert!(
        !caps
            .execution_capabilities
            .map(|e| e.exec_enabled)
            .unwrap_or(false),
        "the upstream does not execute, so neither does Outpost"
    );
    // Standalone: execution disabled, Execute unimplemented.
    let standalone = TestServer::start().await;
    let caps = standalone
        .capabilities()
        .get_capabilities(re::GetCapabilitiesRequest::default())
        .await
        .expect("GetCapabilities")
        .into_inner();
    assert!(!caps.execution_capabilities.unwrap().exec_enabled);
    let action = TestAction::new(&["x"], &["o"], &[]);
    let err = exec(&standalone)
        .execute(action.request(""))
        .await
        .expect_err("standalone Outpost does not execute");
    assert_eq!(err.code(), Code::Unimplemented);
}

// ---------------------------------------------------------------- errors

#[tokio::test]
async fn upstream_errors_reach_the_client_as_they_came() {
    let fake = FakeUpstream::start().await;
    let server = proxy(&fake).await;
    let action = TestAction::new(&["x"], &["o"], &[("in", b"in")]);
    fake.put_test_action(&action);
    let req = || re::ExecuteRequest {
        skip_cache_lookup: true,
        ..action.request("")
    };

    // A gRPC error of the Execute call: same code and message, no retry.
    fake.reset_stats();
    fake.fail_next_executions(
        1,
        Code::ResourceExhausted,
        "no workers",
        ErrorDelivery::GrpcError,
    );
    let err = execute(&server, req()).await.expect_err("call error");
    assert_eq!(err.code(), Code::ResourceExhausted);
    assert_eq!(err.message(), "no workers");
    assert_eq!(fake.count(Method::Execute), 1);

    fake.fail_next_of(Method::Execute, 1, Code::PermissionDenied);
    let err = execute(&server, req()).await.expect_err("call error");
    assert_eq!(err.code(), Code::PermissionDenied);
    assert_eq!(fake.count(Method::Execute), 2);

    // ExecuteResponse.status: inside the done Operation, not a gRPC error.
    fake.fail_next_executions(
        1,
        Code::DeadlineExceeded,
        "too slow",
        ErrorDelivery::ResponseStatus,
    );
    let ops = execute(&server, req())
        .await
        .expect("the stream itself succeeds");
    assert_eq!(
        stages(&ops),
        vec![Stage::Queued, Stage::Executing, Stage::Completed]
    );
    let name = fake.last_execute_request().unwrap().operation.unwrap();
    assert_eq!(ops, fake.operation_history(&name));
    let resp = operation_response(ops.last().unwrap()).unwrap();
    let status = resp.status.expect("a status");
    assert_eq!(status.code, Code::DeadlineExceeded as i32);
    assert_eq!(status.message, "too slow");
    assert!(resp.result.is_none());

    // Operation.error passes through too.
    fake.fail_next_executions(1, Code::Internal, "boom", ErrorDelivery::OperationError);
    let ops = execute(&server, req()).await.expect("stream succeeds");
    match &ops.last().unwrap().result {
        Some(lr::operation::Result::Error(s)) => {
            assert_eq!(
                (s.code, s.message.as_str()),
                (Code::Internal as i32, "boom")
            )
        }
        other => panic!("expected Operation.error, got {other:?}"),
    }
    assert_eq!(fake.count(Method::Execute), 4);

    // Nothing failed was cached or prefetched.
    let s = stats(&server).await;
    assert_eq!(s.action_result_count, 0);
    assert_eq!(s.metrics["outpost_prefetch_jobs_total"], 0);
}

// ---------------------------------------------------------------- streams

#[tokio::test]
async fn client_going_away_cancels_the_upstream_stream() {
    let fake = FakeUpstream::start().await;
    let server = proxy(&fake).await;
    let action = TestAction::new(&["forever"], &["o"], &[]);
    fake.put_test_action(&action);
    fake.hold_executions();

    let mut stream = exec(&server)
        .execute(action.request(""))
        .await
        .expect("Execute")
        .into_inner();
    let first = stream.message().await.unwrap().expect("QUEUED");
    assert_eq!(operation_stage(&first), Some(Stage::Queued));
    let second = stream.message().await.unwrap().expect("EXECUTING");
    assert_eq!(operation_stage(&second), Some(Stage::Executing));
    assert_eq!(fake.execute_streams_dropped(), 0);
    drop(stream);

    assert!(
        fake.wait_execute_dropped(1, WAIT).await,
        "the upstream Execute stream was not cancelled"
    );
    let deadline = Instant::now() + WAIT;
    while fake.last_call(Method::Execute).unwrap().code.is_none() {
        assert!(Instant::now() < deadline, "the upstream call never ended");
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    assert_eq!(
        fake.last_call(Method::Execute).unwrap().code,
        Some(Code::Cancelled)
    );
    // Not mistaken for a broken stream: no reattach.
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert_eq!(fake.count(Method::WaitExecution), 0);
    assert_eq!(
        metric(&server, "outpost_execution_reattaches_total").await,
        0
    );
    fake.release_executions();
}

#[tokio::test]
async fn stopping_the_server_ends_running_executions_with_a_reattach_hint() {
    let fake = FakeUpstream::start().await;
    let server = proxy(&fake).await;
    let action = TestAction::new(&["forever"], &["o"], &[]);
    fake.put_test_action(&action);
    fake.hold_executions();

    let mut client = exec(&server);
    let mut stream = client
        .execute(action.request(""))
        .await
        .expect("Execute")
        .into_inner();
    stream.message().await.unwrap().expect("QUEUED");
    stream.message().await.unwrap().expect("EXECUTING");
    let stopping = tokio::spawn(server.stop());

    // The stream ends as soon as Outpost stops accepting calls, not when
    // the drain of calls in flight gives up on it (10 s).
    let end = tokio::time::timeout(Duration::from_secs(5), stream.message())
        .await
        .expect("the Execute stream was kept open through the drain");
    let status = end.expect_err("a stream that ends early ends with an error");
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    assert!(
        status.message().contains("reattach with WaitExecution"),
        "{status:?}"
    );
    drop((stream, client));
    stopping.await.expect("stop task");
    fake.release_executions();
}

#[tokio::test]
async fn a_broken_upstream_stream_is_reattached_with_wait_execution() {
    let fake = FakeUpstream::start().await;
    let server = proxy(&fake).await;
    let action = TestAction::new(&["slow"], &["out"], &[("in", b"x")]);
    fake.put_test_action(&action);
    let want = digest_of(&output_content(&action.digest, "out", 1000));

    // 1. Execute ends cleanly after QUEUED, without done.
    fake.hold_executions();
    fake.break_streams(Method::Execute, 1, 1, StreamEnd::Eof);
    let mut req = tonic::Request::new(action.request(""));
    req.metadata_mut()
        .insert("authorization", "Bearer t1".parse().unwrap());
    let client = tokio::spawn({
        let stream = exec(&server)
            .execute(req)
            .await
            .expect("Execute")
            .into_inner();
        drain(stream)
    });
    assert!(fake.wait_for_calls(Method::WaitExecution, 1, WAIT).await);
    fake.release_executions();
    let (ops, end) = client.await.unwrap();
    end.expect("the client's stream ends cleanly");
    let name = fake.operation_names()[0].clone();
    assert!(ops.iter().all(|o| o.name == name), "{ops:?}");
    assert_eq!(
        distinct_stages(&ops),
        vec![Stage::Queued, Stage::Executing, Stage::Completed]
    );
    let result = operation_response(ops.last().unwrap())
        .and_then(|r| r.result)
        .expect("a result");
    assert_eq!(result.output_files[0].digest.as_ref(), Some(&want));
    assert_eq!(fake.count(Method::Execute), 1, "not executed again");
    assert_eq!(fake.count(Method::WaitExecution), 1);
    let wait = fake.last_call(Method::WaitExecution).unwrap();
    assert_eq!(wait.header("authorization").as_deref(), Some("Bearer t1"));
    assert_eq!(
        metric(&server, "outpost_execution_reattaches_total").await,
        1
    );

    // 2. Execute breaks with UNAVAILABLE, the first WaitExecution too: two
    // reattaches, one complete stream.
    let again = action.clone().salted(b"2");
    fake.put_test_action(&again);
    fake.reset_stats();
    fake.hold_executions();
    fake.break_streams(Method::Execute, 1, 1, StreamEnd::Error(Code::Unavailable));
    fake.break_streams(
        Method::WaitExecution,
        1,
        1,
        StreamEnd::Error(Code::Unavailable),
    );
    let client = tokio::spawn({
        let stream = exec(&server)
            .execute(again.request(""))
            .await
            .expect("Execute")
            .into_inner();
        drain(stream)
    });
    assert!(fake.wait_for_calls(Method::WaitExecution, 2, WAIT).await);
    fake.release_executions();
    let (ops, end) = client.await.unwrap();
    end.expect("the client's stream ends cleanly");
    let name = fake.last_execute_request().unwrap().operation.unwrap();
    assert!(ops.iter().all(|o| o.name == name));
    assert_eq!(stages(&ops)[0], Stage::Queued);
    assert!(ops.last().unwrap().done);
    assert!(
        ops[..ops.len() - 1].iter().all(|o| !o.done),
        "exactly one done Operation"
    );
    assert!(
        operation_response(ops.last().unwrap())
            .unwrap()
            .result
            .is_some()
    );
    assert_eq!(fake.count(Method::Execute), 1);
    assert_eq!(fake.count(Method::WaitExecution), 2);
    assert!(
        fake.calls_of(Method::WaitExecution)
            .iter()
            .all(|c| c.digests == vec![again.digest.clone()]),
        "reattached to the right operation"
    );
    assert_eq!(
        metric(&server, "outpost_execution_reattaches_total").await,
        3
    );

    // A client's own WaitExecution is forwarded.
    let stream = exec(&server)
        .wait_execution(re::WaitExecutionRequest { name: name.clone() })
        .await
        .expect("WaitExecution")
        .into_inner();
    let (waited, end) = drain(stream).await;
    end.unwrap();
    assert_eq!(waited, vec![fake.operation(&name).unwrap()]);
}

// ---------------------------------------------------------------- MISSING repair

#[tokio::test]
async fn missing_inputs_are_repaired_from_the_local_store() {
    let fake = FakeUpstream::start().await;
    let server = proxy(&fake).await;
    let inputs: &[(&str, &[u8])] = &[
        ("lib/a.a", b"archive a"),
        ("lib/deep/b.a", b"archive b"),
        ("main.o", b"main object"),
        ("top.txt", b"top level file"),
    ];
    let base = TestAction::new(&["link"], &["out"], inputs);
    let lib_deep = directory_of(&[("b.a", b"archive b")]);
    assert!(base.blob_digests().contains(&lib_deep));
    let top = base.input("top.txt").unwrap();

    for (round, delivery) in [ErrorDelivery::GrpcError, ErrorDelivery::ResponseStatus]
        .into_iter()
        .enumerate()
    {
        let action = base.clone().salted(format!("{round}").as_bytes());
        // The client uploads everything through Outpost (written through).
        let blobs: Vec<&[u8]> = action.blobs.iter().map(|(_, b)| &b[..]).collect();
        assert!(
            batch_update(&mut server.cas(), "", &blobs)
                .await
                .iter()
                .all(|c| *c == Code::Ok)
        );
        for d in action.blob_digests() {
            assert!(fake.has_blob(&d));
        }
        // The upstream loses the Command, a file and a Directory (whose
        // contents it keeps); Outpost still believes it has them.
        let lost = vec![action.command_digest.clone(), top.clone(), lib_deep.clone()];
        for d in &lost {
            assert!(fake.remove_blob(d));
        }
        fake.set_missing_input_delivery(delivery);
        fake.reset_stats();

        let (ops, result) = expect_success(execute(&server, action.request("")).await);
        assert_eq!(
            fake.missing_input_rejections(),
            1,
            "{delivery:?}: the upstream reported the inputs missing once"
        );
        assert_eq!(fake.count(Method::Execute), 2, "{delivery:?}: retried once");
        for d in &lost {
            assert!(fake.has_blob(d), "{delivery:?}: {d:?} uploaded again");
            assert_eq!(fake.uploads_of(d), 1, "{delivery:?}: {d:?} uploaded once");
        }
        // The client sees only the successful execution.
        let ok_name = fake.last_execute_request().unwrap().operation.unwrap();
        assert!(ops.iter().all(|o| o.name == ok_name), "{ops:?}");
        assert_eq!(
            stages(&ops),
            vec![Stage::Queued, Stage::Executing, Stage::Completed]
        );
        assert_eq!(
            result.output_files[0].digest,
            Some(digest_of(&output_content(&action.digest, "out", 1000)))
        );
        assert_eq!(fake.executions_completed(), 1);
    }
    assert_eq!(
        metric(&server, "outpost_missing_input_repairs_total").await,
        2
    );
    assert_eq!(metric(&server, "outpost_repaired_blobs_total").await, 6);
}

#[tokio::test]
async fn a_lost_subtree_is_repaired_too() {
    let fake = FakeUpstream::start().await;
    let server = proxy(&fake).await;
    let action = TestAction::new(
        &["link"],
        &["out"],
        &[("lib/a.a", b"archive a"), ("main.o", b"main object")],
    );
    let blobs: Vec<&[u8]> = action.blobs.iter().map(|(_, b)| &b[..]).collect();
    assert!(
        batch_update(&mut server.cas(), "", &blobs)
            .await
            .iter()
            .all(|c| *c == Code::Ok)
    );
    // The upstream evicted lib/ and the file in it: it can only name the
    // file once it has the Directory again.
    let lib = directory_of(&[("a.a", b"archive a")]);
    let file = action.input("lib/a.a").unwrap();
    assert!(fake.remove_blob(&lib) && fake.remove_blob(&file));
    fake.reset_stats();

    let result = execute(&server, action.request("")).await;
    let (_, result) = expect_success(result);
    assert_eq!(
        result.output_files[0].digest,
        Some(digest_of(&output_content(&action.digest, "out", 1000)))
    );
    assert!(fake.has_blob(&lib) && fake.has_blob(&file));
}

#[tokio::test]
async fn missing_inputs_outpost_lacks_too_fail_with_the_precondition() {
    let fake = FakeUpstream::start().await;
    let server = proxy(&fake).await;
    for (round, delivery) in [ErrorDelivery::GrpcError, ErrorDelivery::ResponseStatus]
        .into_iter()
        .enumerate()
    {
        // Only the upstream ever had the inputs, and it lost one.
        let action = TestAction::new(
            &["cc"],
            &["a.o"],
            &[("a.c", format!("int a{round};").as_bytes())],
        );
        fake.put_test_action(&action);
        let gone = action.input("a.c").unwrap();
        assert!(fake.remove_blob(&gone));
        fake.set_missing_input_delivery(delivery);
        fake.reset_stats();

        match delivery {
            ErrorDelivery::GrpcError => {
                let err = execute(&server, action.request(""))
                    .await
                    .expect_err("FAILED_PRECONDITION");
                assert_eq!(err.code(), Code::FailedPrecondition);
                assert_eq!(
                    missing_digests_of(&err),
                    vec![gone.clone()],
                    "the violations reach the client"
                );
            }
            _ => {
                let ops = execute(&server, action.request(""))
                    .await
                    .expect("the stream succeeds");
                assert_eq!(ops.len(), 1, "{ops:?}");
                assert!(ops[0].done);
                let status = operation_response(&ops[0]).unwrap().status.unwrap();
                assert_eq!(status.code, Code::FailedPrecondition as i32);
                assert_eq!(missing_digests(&status), vec![gone.clone()]);
            }
        }
        assert_eq!(fake.count(Method::Execute), 1, "{delivery:?}: no retry");
        assert_eq!(fake.uploads_of(&gone), 0);
        assert_eq!(fake.executions_started(), 0);
    }
}

// ---------------------------------------------------------------- prefetch

/// A proxy that prefetches every output (`mode = "always"`): these tests
/// pin prefetch's mechanics; `prefetch_policy.rs` tests the adaptive mode.
async fn always_prefetching(fake: &FakeUpstream) -> TestServer {
    start_proxy(fake, |_| {}, |c| c.prefetch.mode = PrefetchMode::Always).await
}

/// An action whose outputs cover every kind: a large file (ByteStream), a
/// small one, stdout/stderr, and a directory output (Tree + files).
struct Outputs {
    action: TestAction,
    large: re::Digest,
    small: re::Digest,
    stdout: re::Digest,
    stderr: re::Digest,
    /// The output directory's files (file.bin, sub/nested.bin).
    dir_files: Vec<re::Digest>,
    /// Tree blob, root Directory and sub Directory.
    dir_meta: Vec<re::Digest>,
}

const LARGE: usize = 2 * MIB + 123;

fn prepare_outputs(fake: &FakeUpstream, salt: &[u8]) -> Outputs {
    let action = TestAction::new(
        &["gen"],
        &["out/large.bin", "out/small.txt", "out/dir"],
        &[("in.txt", b"input")],
    )
    .salted(salt);
    fake.put_test_action(&action);
    fake.set_output_size("out/large.bin", LARGE);
    fake.set_directory_outputs(&["out/dir"]);
    let a = &action.digest;
    let large = digest_of(&output_content(a, "out/large.bin", LARGE));
    let small = digest_of(&output_content(a, "out/small.txt", 1000));
    let stdout = digest_of(&stdio_content(a, "stdout", 100));
    let stderr = digest_of(&stdio_content(a, "stderr", 20));
    let dir_files = vec![
        digest_of(&output_content(a, "out/dir/file.bin", 1000)),
        digest_of(&output_content(a, "out/dir/sub/nested.bin", 500)),
    ];
    Outputs {
        large,
        small,
        stdout,
        stderr,
        dir_files,
        dir_meta: Vec::new(),
        action,
    }
}

impl Outputs {
    /// Checks the result against the expected outputs; fills `dir_meta`.
    fn check(&mut self, fake: &FakeUpstream, result: &re::ActionResult) {
        let files: Vec<_> = result
            .output_files
            .iter()
            .map(|f| (f.path.as_str(), f.digest.clone().unwrap()))
            .collect();
        assert_eq!(
            files,
            vec![
                ("out/large.bin", self.large.clone()),
                ("out/small.txt", self.small.clone())
            ]
        );
        assert_eq!(result.stdout_digest.as_ref(), Some(&self.stdout));
        assert_eq!(result.stderr_digest.as_ref(), Some(&self.stderr));
        assert_eq!(result.output_directories.len(), 1);
        let od = &result.output_directories[0];
        let tree_digest = od.tree_digest.clone().unwrap();
        let tree = re::Tree::decode(fake.blob(&tree_digest).unwrap()).unwrap();
        let root = digest_of(&tree.root.unwrap().encode_to_vec());
        assert_eq!(od.root_directory_digest.as_ref(), Some(&root));
        assert_eq!(tree.children.len(), 1);
        let sub = digest_of(&tree.children[0].encode_to_vec());
        self.dir_meta = vec![tree_digest, root, sub];
    }

    /// The blobs prefetch fetches itself (every file).
    fn files(&self) -> Vec<re::Digest> {
        let mut v = vec![
            self.large.clone(),
            self.small.clone(),
            self.stdout.clone(),
            self.stderr.clone(),
        ];
        v.extend(self.dir_files.iter().cloned());
        v
    }

    fn file_bytes(&self) -> u64 {
        self.files().iter().map(|d| d.size_bytes as u64).sum()
    }

    /// Reads every output through Outpost (the large one over ByteStream,
    /// the rest batched) and checks the bytes.
    async fn read_all(&self, server: &TestServer, fake: &FakeUpstream) {
        let a = &self.action.digest;
        assert_eq!(
            bs_read(server, &self.large).await,
            output_content(a, "out/large.bin", LARGE)
        );
        let mut small = vec![self.small.clone(), self.stdout.clone(), self.stderr.clone()];
        small.extend(self.dir_files.iter().cloned());
        small.extend(self.dir_meta.iter().cloned());
        let data = batch_read_ok(server, &small).await;
        assert_eq!(data[0], output_content(a, "out/small.txt", 1000));
        assert_eq!(data[1], stdio_content(a, "stdout", 100));
        assert_eq!(data[2], stdio_content(a, "stderr", 20));
        assert_eq!(data[3], output_content(a, "out/dir/file.bin", 1000));
        assert_eq!(data[4], output_content(a, "out/dir/sub/nested.bin", 500));
        for (d, bytes) in small[5..].iter().zip(&data[5..]) {
            assert_eq!(bytes[..], fake.blob(d).unwrap()[..]);
        }
    }

    fn all(&self) -> Vec<re::Digest> {
        let mut v = self.files();
        v.extend(self.dir_meta.iter().cloned());
        v
    }
}

#[tokio::test]
async fn outputs_are_prefetched_and_then_read_locally() {
    let fake = FakeUpstream::start().await;
    let server = always_prefetching(&fake).await;
    let mut out = prepare_outputs(&fake, b"prefetch");
    let (_, result) = expect_success(execute(&server, out.action.request("")).await);
    out.check(&fake, &result);

    // The outputs arrive without the client asking.
    wait_metric(&server, "outpost_prefetched_blobs_total", 6).await;
    let s = stats(&server).await;
    assert_eq!(s.metrics["outpost_prefetch_jobs_total"], 1);
    for d in out.all() {
        assert_eq!(fake.fetches_of(&d), 1, "{d:?} fetched from upstream once");
    }

    // Reading them costs no upstream read.
    fake.reset_stats();
    out.read_all(&server, &fake).await;
    assert_eq!(fake.count(Method::Read), 0, "{}", fake.summary());
    assert_eq!(fake.count(Method::BatchReadBlobs), 0, "{}", fake.summary());
    assert_eq!(
        metric(&server, "outpost_prefetch_hits_total").await,
        6,
        "each prefetched file's first read is a hit"
    );
}

#[tokio::test]
async fn prefetch_counts_each_blob_once() {
    let fake = FakeUpstream::start().await;
    let server = always_prefetching(&fake).await;
    let mut out = prepare_outputs(&fake, b"counts");
    let (_, result) = expect_success(execute(&server, out.action.request("")).await);
    out.check(&fake, &result);
    wait_metric(&server, "outpost_prefetched_blobs_total", 6).await;
    // Give a duplicate fetch the chance to show up in the counters.
    tokio::time::sleep(Duration::from_millis(50)).await;
    let s = stats(&server).await;
    assert_eq!(
        (
            s.metrics["outpost_prefetched_blobs_total"],
            s.metrics["outpost_prefetched_bytes_total"],
            s.single_flight_joins,
        ),
        (6, out.file_bytes(), 0),
        "every output file, stdout and stderr, counted once; no client read joined"
    );
}

#[tokio::test]
async fn without_prefetch_the_outputs_are_read_from_upstream() {
    let fake = FakeUpstream::start().await;
    let server = start_proxy(&fake, |_| {}, |c| c.prefetch.enabled = false).await;
    let mut out = prepare_outputs(&fake, b"no prefetch");
    let (_, result) = expect_success(execute(&server, out.action.request("")).await);
    out.check(&fake, &result);
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(metric(&server, "outpost_prefetch_jobs_total").await, 0);
    assert_eq!(metric(&server, "outpost_prefetched_blobs_total").await, 0);
    for d in out.files() {
        assert_eq!(fake.fetches_of(&d), 0, "{d:?} not fetched on its own");
    }

    fake.reset_stats();
    out.read_all(&server, &fake).await;
    assert_eq!(fake.count_naming(Method::Read, &out.large), 1);
    for d in out.files() {
        assert_eq!(fake.fetches_of(&d), 1, "{d:?} read from upstream");
    }
}

#[tokio::test]
async fn prefetch_skips_blobs_over_max_blob_size() {
    let fake = FakeUpstream::start().await;
    let server = start_proxy(
        &fake,
        |_| {},
        |c| {
            c.prefetch.mode = PrefetchMode::Always;
            c.prefetch.max_blob_size = MIB as u64;
        },
    )
    .await;
    let mut out = prepare_outputs(&fake, b"size limit");
    let (_, result) = expect_success(execute(&server, out.action.request("")).await);
    out.check(&fake, &result);
    wait_metric(&server, "outpost_prefetch_skipped_total", 1).await;
    wait_metric(&server, "outpost_prefetched_blobs_total", 5).await;
    assert_eq!(metric(&server, "outpost_prefetch_skipped_total").await, 1);
    assert_eq!(
        fake.fetches_of(&out.large),
        0,
        "over the limit: not prefetched"
    );

    fake.reset_stats();
    out.read_all(&server, &fake).await;
    assert_eq!(
        fake.count_naming(Method::Read, &out.large),
        1,
        "read on demand"
    );
    assert_eq!(fake.count(Method::Read), 1, "{}", fake.summary());
    assert_eq!(fake.count(Method::BatchReadBlobs), 0, "{}", fake.summary());
}

#[tokio::test]
async fn an_upstream_action_cache_hit_starts_the_prefetch() {
    let fake = FakeUpstream::start().await;
    let mut out = prepare_outputs(&fake, b"ac hit");
    // Someone else ran it straight on the upstream.
    let mut direct = re::execution_client::ExecutionClient::new(fake.channel().await)
        .max_decoding_message_size(64 << 20);
    let (ops, end) = drain(
        direct
            .execute(out.action.request(""))
            .await
            .unwrap()
            .into_inner(),
    )
    .await;
    end.unwrap();
    let result = operation_response(ops.last().unwrap())
        .unwrap()
        .result
        .unwrap();
    out.check(&fake, &result);

    let server = always_prefetching(&fake).await;
    let got = server
        .action_cache()
        .get_action_result(re::GetActionResultRequest {
            instance_name: String::new(),
            action_digest: Some(out.action.digest.clone()),
            ..Default::default()
        })
        .await
        .expect("GetActionResult")
        .into_inner();
    assert_eq!(got, fake.action_result("", &out.action.digest).unwrap());
    assert_eq!(fake.count(Method::GetActionResult), 1);
    wait_metric(&server, "outpost_prefetched_blobs_total", 1).await;
    assert_eq!(metric(&server, "outpost_prefetch_jobs_total").await, 1);
    // Wait until every output is local (each fetched upstream once).
    let deadline = Instant::now() + WAIT;
    while !out.all().iter().all(|d| fake.fetches_of(d) >= 1) {
        assert!(Instant::now() < deadline, "{}", fake.summary());
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    wait_metric(&server, "outpost_prefetched_blobs_total", 6).await;

    fake.reset_stats();
    out.read_all(&server, &fake).await;
    assert_eq!(fake.count(Method::Read), 0, "{}", fake.summary());
    assert_eq!(fake.count(Method::BatchReadBlobs), 0, "{}", fake.summary());
}

#[tokio::test]
async fn a_cached_execute_result_is_cached_locally_and_prefetched() {
    let fake = FakeUpstream::start().await;
    let mut out = prepare_outputs(&fake, b"cached result");
    // Someone else ran it straight on the upstream.
    let mut direct = re::execution_client::ExecutionClient::new(fake.channel().await)
        .max_decoding_message_size(64 << 20);
    let (_, end) = drain(
        direct
            .execute(out.action.request(""))
            .await
            .unwrap()
            .into_inner(),
    )
    .await;
    end.unwrap();

    let server = always_prefetching(&fake).await;
    fake.reset_stats();
    let ops = execute(&server, out.action.request("")).await.unwrap();
    assert_eq!(ops.len(), 1, "one done Operation from the upstream's cache");
    let resp = operation_response(&ops[0]).unwrap();
    assert!(resp.cached_result);
    let result = resp.result.unwrap();
    out.check(&fake, &result);
    assert_eq!(fake.execution_cache_hits(), 1);
    assert_eq!(stats(&server).await.action_result_count, 1);
    wait_metric(&server, "outpost_prefetched_blobs_total", 6).await;

    fake.reset_stats();
    let got = server
        .action_cache()
        .get_action_result(re::GetActionResultRequest {
            instance_name: String::new(),
            action_digest: Some(out.action.digest.clone()),
            ..Default::default()
        })
        .await
        .expect("GetActionResult")
        .into_inner();
    assert_eq!(got, result);
    out.read_all(&server, &fake).await;
    assert_eq!(fake.count(Method::GetActionResult), 0, "{}", fake.summary());
    assert_eq!(fake.count(Method::Read), 0, "{}", fake.summary());
    assert_eq!(fake.count(Method::BatchReadBlobs), 0, "{}", fake.summary());
}

#[tokio::test]
async fn a_client_read_joins_the_prefetch_in_flight() {
    let fake = FakeUpstream::start().await;
    let server = always_prefetching(&fake).await;
    let size = 3 * MIB;
    let action = TestAction::new(&["big"], &["big.bin"], &[("in", b"in")]);
    fake.put_test_action(&action);
    fake.set_output_size("big.bin", size);
    let want = output_content(&action.digest, "big.bin", size);
    let d = digest_of(&want);
    fake.pause_method(Method::Read);

    let (_, result) = expect_success(execute(&server, action.request("")).await);
    assert_eq!(result.output_files[0].digest.as_ref(), Some(&d));
    // The prefetch's upstream read is parked at the fake.
    assert!(fake.wait_parked(1, WAIT).await, "{}", fake.summary());
    assert_eq!(fake.count_naming(Method::Read, &d), 1);
    assert_eq!(
        metric(&server, "outpost_single_flight_joins_total").await,
        0
    );

    // A client read arrives meanwhile and joins it.
    let reader = tokio::spawn({
        let channel = server.channel();
        let d = d.clone();
        async move { read_blob(&mut channel.bytestream(), &read_name("", &d), 0, 0).await }
    });
    wait_metric(&server, "outpost_single_flight_joins_total", 1).await;
    assert_eq!(fake.parked(), 1, "no second upstream read");
    fake.resume();
    let (data, _) = reader.await.unwrap().expect("the client's read");
    assert!(data == want, "the client got the output's bytes");

    assert_eq!(
        fake.count_naming(Method::Read, &d),
        1,
        "one upstream transfer"
    );
    assert_eq!(fake.count_naming(Method::BatchReadBlobs, &d), 0);
    assert_eq!(fake.bytes_sent_by(Method::Read), size as u64);
    assert!(metric(&server, "outpost_single_flight_joins_total").await >= 1);
    wait_metric(&server, "outpost_prefetched_blobs_total", 3).await;
    // And it is local now.
    fake.reset_stats();
    assert!(bs_read(&server, &d).await == want);
    assert_eq!(fake.fetches_of(&d), 0);
}

// ---------------------------------------------------------------- action cache

#[tokio::test]
async fn executed_results_are_served_locally_by_get_action_result() {
    let fake = FakeUpstream::start().await;
    let server = proxy(&fake).await;
    let get = |action: &TestAction| {
        let mut ac = server.action_cache();
        let digest = action.digest.clone();
        async move {
            ac.get_action_result(re::GetActionResultRequest {
                instance_name: String::new(),
                action_digest: Some(digest),
                ..Default::default()
            })
            .await
            .map(|r| r.into_inner())
        }
    };

    // A successful execution is cached locally: no upstream lookup.
    let ok = TestAction::new(&["ok"], &["o"], &[("in", b"1")]);
    fake.put_test_action(&ok);
    let (_, result) = expect_success(execute(&server, ok.request("")).await);
    assert_eq!(stats(&server).await.action_result_count, 1);
    fake.reset_stats();
    let got = get(&ok).await.expect("a local hit");
    assert_eq!(got, result);
    assert_eq!(got, fake.action_result("", &ok.digest).unwrap());
    assert_eq!(fake.count(Method::GetActionResult), 0, "{}", fake.summary());

    // Inlined contents are not kept in the local copy.
    let inlined = ok.clone().salted(b"inline");
    fake.put_test_action(&inlined);
    let (_, result) = expect_success(
        execute(
            &server,
            re::ExecuteRequest {
                inline_stdout: true,
                inline_output_files: vec!["o".into()],
                ..inlined.request("")
            },
        )
        .await,
    );
    assert!(!result.stdout_raw.is_empty() && !result.output_files[0].contents.is_empty());
    fake.reset_stats();
    let got = get(&inlined).await.expect("a local hit");
    assert!(got.stdout_raw.is_empty() && got.output_files[0].contents.is_empty());
    assert_eq!(got, fake.action_result("", &inlined.digest).unwrap());
    assert_eq!(fake.count(Method::GetActionResult), 0);
    assert_eq!(stats(&server).await.action_result_count, 2);

    // A non-zero exit code is not cached.
    let failing = ok.clone().salted(b"exit 1");
    fake.put_test_action(&failing);
    fake.set_exit_code(1);
    let ops = execute(&server, failing.request("")).await.unwrap();
    let r = operation_response(ops.last().unwrap()).unwrap();
    assert_eq!(r.result.unwrap().exit_code, 1);
    fake.set_exit_code(0);
    assert_eq!(stats(&server).await.action_result_count, 2);
    fake.reset_stats();
    assert_code(get(&failing).await, Code::NotFound);
    assert_eq!(fake.count(Method::GetActionResult), 1, "asked upstream");

    // Nor is a do_not_cache action's.
    let volatile = ok.clone().salted(b"volatile").do_not_cache();
    fake.put_test_action(&volatile);
    expect_success(execute(&server, volatile.request("")).await);
    assert_eq!(stats(&server).await.action_result_count, 2);
    fake.reset_stats();
    assert_code(get(&volatile).await, Code::NotFound);
    assert_eq!(fake.count(Method::GetActionResult), 1, "asked upstream");
    // Sanity: the keys of everything above were distinct actions.
    assert_eq!(
        keys(&[
            ok.digest.clone(),
            inlined.digest.clone(),
            failing.digest.clone(),
            volatile.digest.clone()
        ])
        .len(),
        4
    );
}
