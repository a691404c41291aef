//! The upstream connection over TLS (`grpcs://`): a custom CA is trusted,
//! and a server certificate nobody vouches for is refused.

use std::time::Duration;

use bazel_remote_apis::build::bazel::remote::execution::v2::GetCapabilitiesRequest;
use bazel_remote_apis::build::bazel::remote::execution::v2::capabilities_server::CapabilitiesServer;
use outpost::config::{UpstreamConfig, UpstreamSection};
use outpost::service::capabilities::CapabilitiesService;
use tonic::transport::server::TcpIncoming;
use tonic::transport::{Identity, Server, ServerTlsConfig};

use crate::common::{Clients, TestServer};

/// A TLS REAPI server on 127.0.0.1 answering only GetCapabilities, with a
/// batch limit of 1 MiB so that Outpost's merged answer shows whether it
/// really talked to it. Returns its port and its certificate (PEM).
async fn tls_upstream() -> (u16, String) {
    let key =
        rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).expect("certificate");
    let cert_pem = key.cert.pem();
    let identity = Identity::from_pem(&cert_pem, key.signing_key.serialize_pem());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let router = Server::builder()
        .tls_config(ServerTlsConfig::new().identity(identity))
        .expect("TLS config")
        .add_service(CapabilitiesServer::new(CapabilitiesService::new(
            1 << 20,
            None,
        )));
    tokio::spawn(router.serve_with_incoming(TcpIncoming::from(listener)));
    (port, cert_pem)
}

/// Outpost's advertised batch limit, once its upstream probe had time to run.
async fn advertised_batch_limit(server: &TestServer) -> i64 {
    let caps = server
        .channel()
        .capabilities()
        .get_capabilities(GetCapabilitiesRequest::default())
        .await
        .expect("GetCapabilities")
        .into_inner();
    caps.cache_capabilities.unwrap().max_batch_total_size_bytes
}

async fn proxy(port: u16, ca_file: Option<std::path::PathBuf>) -> TestServer {
    let section = UpstreamSection {
        ca_file,
        connect_timeout: Some("2s".parse().unwrap()),
        ..Default::default()
    };
    let upstream = UpstreamConfig::resolve(section, Some(format!("grpcs://localhost:{port}")))
        .expect("valid upstream settings")
        .expect("an upstream");
    TestServer::start_with(|c| c.upstream = Some(upstream)).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tls_upstream_signed_by_the_configured_ca_is_used() {
    let (port, cert_pem) = tls_upstream().await;
    let dir = tempfile::tempdir().unwrap();
    let ca = dir.path().join("ca.pem");
    std::fs::write(&ca, cert_pem).unwrap();
    let server = proxy(port, Some(ca)).await;
    // The upstream's 1 MiB limit narrows Outpost's own 4 MiB.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while advertised_batch_limit(&server).await != 1 << 20 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "never reached the TLS upstream"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_untrusted_tls_upstream_is_refused() {
    let (port, _) = tls_upstream().await;
    // No ca_file: the system roots do not vouch for a self-signed certificate.
    let server = proxy(port, None).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    // Outpost could not ask the upstream, so it answers with its own limits.
    assert_eq!(advertised_batch_limit(&server).await, 4 << 20);
}
