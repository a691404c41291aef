//! What a server stored is there after a restart on the same directory.

use tonic::Code;

use crate::common::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn blobs_and_action_results_survive_a_restart() {
    let server = TestServer::start().await;
    let inline = blob(1, 10_000);
    let batched = blob(2, 700_000);
    let file_backed = blob(3, (5 << 20) + 3);
    assert_eq!(
        batch_update(&mut server.cas(), "", &[&batched]).await,
        vec![Code::Ok]
    );
    upload(&mut server.bytestream(), "", &inline, 4096)
        .await
        .unwrap();
    upload(&mut server.bytestream(), "", &file_backed, 1 << 20)
        .await
        .unwrap();
    let action = digest(b"persistent action");
    let result = re::ActionResult {
        output_files: vec![re::OutputFile {
            path: "out/big".into(),
            digest: Some(digest(&file_backed)),
            ..Default::default()
        }],
        stdout_digest: Some(digest(&inline)),
        stderr_raw: b"moved into the CAS".to_vec(),
        exit_code: 2,
        ..Default::default()
    };
    let stored = server
        .action_cache()
        .update_action_result(re::UpdateActionResultRequest {
            instance_name: "ci/linux".into(),
            action_digest: Some(digest(b"persistent action")),
            action_result: Some(result),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let before = stats(&server).await;
    assert_eq!((before.blob_count, before.action_result_count), (4, 1));

    let server = server.restart().await;

    let after = stats(&server).await;
    assert_eq!(
        (
            after.blob_count,
            after.blob_bytes,
            after.action_result_count
        ),
        (
            before.blob_count,
            before.blob_bytes,
            before.action_result_count
        )
    );
    let mut bs = server.bytestream();
    for data in [&inline, &batched, &file_backed] {
        let (got, _) = read_blob(&mut bs, &read_name("", &digest(data)), 0, 0)
            .await
            .unwrap();
        assert!(
            got == *data,
            "blob of {} bytes differs after restart",
            data.len()
        );
    }
    let (stderr, _) = read_blob(
        &mut bs,
        &read_name("", &digest(b"moved into the CAS")),
        0,
        0,
    )
    .await
    .unwrap();
    assert_eq!(stderr, b"moved into the CAS");
    let got = server
        .action_cache()
        .get_action_result(re::GetActionResultRequest {
            instance_name: "ci/linux".into(),
            action_digest: Some(action),
            inline_stderr: true,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(got.stderr_raw, b"moved into the CAS");
    assert_eq!(
        re::ActionResult {
            stderr_raw: vec![],
            ..got
        },
        stored
    );

    // And once more, after it was only read: nothing was lost or duplicated.
    let server = server.restart().await;
    let again = stats(&server).await;
    assert_eq!(
        (again.blob_count, again.blob_bytes),
        (after.blob_count, after.blob_bytes)
    );
    assert_eq!(list_files(&server.data_dir().join("blobs")).len(), 1);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_server_on_the_same_directory_is_refused_and_harms_nothing() {
    let server = TestServer::start().await;
    let mut bs = server.bytestream();
    let data = blob(1, 3 << 20);
    let d = digest(&data);
    let name = write_name("", &d);
    // An interrupted upload whose partial file sits in tmp/.
    let half = data.len() / 2;
    let first = write_requests(&name, &data[..half], 0, 1 << 20, false);
    assert_eq!(write(&mut bs, first).await.unwrap(), half as i64);
    assert_eq!(list_files(&server.data_dir().join("tmp")).len(), 1);

    let second = outpost::config::Config::for_tests(server.data_dir());
    assert!(
        outpost::server::RunningServer::start(&second)
            .await
            .is_err(),
        "two servers must not share a store"
    );

    // The first server's upload survived the attempt and can be finished.
    let rest = write_requests(&name, &data, half, 1 << 20, true);
    assert_eq!(write(&mut bs, rest).await.unwrap(), d.size_bytes);
    assert_eq!(read_digest(&mut bs, &d).await.unwrap(), d);
    server.stop().await;
}
