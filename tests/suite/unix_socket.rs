//! Serving on a unix socket next to TCP.

use std::os::unix::fs::PermissionsExt;

use outpost::server::RunningServer;
use tonic::Code;

use crate::common::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serves_on_a_private_unix_socket_beside_tcp() {
    let sockets = tempfile::tempdir().unwrap();
    let path = sockets.path().join("run/outpost.sock");
    let socket = path.clone();
    let server = TestServer::start_with(|c| c.unix_socket = Some(socket)).await;
    let mode = std::fs::metadata(&path).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600, "only the owner may connect");

    let unix = outpost::client::connect(&format!("unix://{}", path.display()))
        .await
        .expect("connects over the unix socket");
    let caps = unix
        .capabilities()
        .get_capabilities(re::GetCapabilitiesRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert!(!caps.execution_capabilities.unwrap().exec_enabled);

    // Written over the socket, read over TCP, and the other way round.
    let small = blob(1, 1000);
    let large = blob(2, 3 << 20);
    assert_eq!(
        batch_update(&mut unix.cas(), "", &[&small]).await,
        vec![Code::Ok]
    );
    assert_eq!(
        upload(&mut server.bytestream(), "", &large, 1 << 20)
            .await
            .unwrap(),
        3 << 20
    );
    let (got, _) = read_blob(
        &mut server.bytestream(),
        &read_name("", &digest(&small)),
        0,
        0,
    )
    .await
    .unwrap();
    assert_eq!(got, small);
    assert_eq!(
        read_digest(&mut unix.bytestream(), &digest(&large))
            .await
            .unwrap(),
        digest(&large)
    );
    assert_eq!(stats(&unix).await.blob_count, 2);

    // A second server cannot take over a socket in use.
    let other_dir = tempfile::tempdir().unwrap();
    let mut other = outpost::config::Config::for_tests(other_dir.path());
    other.unix_socket = Some(path.clone());
    assert!(RunningServer::start(&other).await.is_err());
    assert!(path.exists());

    drop(unix);
    server.stop().await;
    assert!(!path.exists(), "the socket file is removed on shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stale_socket_file_left_by_a_crash_is_replaced() {
    let sockets = tempfile::tempdir().unwrap();
    let path = sockets.path().join("outpost.sock");
    // A socket file nobody listens on any more, as a killed server leaves.
    drop(std::os::unix::net::UnixListener::bind(&path).unwrap());
    assert!(path.exists());
    let socket = path.clone();
    let server = TestServer::start_with(|c| c.unix_socket = Some(socket)).await;
    let unix = outpost::client::connect(&format!("unix://{}", path.display()))
        .await
        .expect("connects over the replaced socket");
    assert_eq!(stats(&unix).await.blob_count, 0);
    drop(unix);
    server.stop().await;
}
