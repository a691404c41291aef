//! TLS on Outpost's own listener (`[server] tls_cert`, `tls_key`,
//! `client_ca`): tonic clients over `grpcs://`, mutual TLS with good, foreign
//! and missing client certificates, certificate reload while connections
//! stay open, and `/metrics` over HTTPS. (`tls.rs` is about the upstream.)

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use outpost::config::{Config, ServerTls};
use outpost::server::RunningServer;
use outpost_testkit::pki::{Pem, TestCa};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

use crate::common::*;

/// How long a test waits for a reload (the files are polled every 2 s).
const RELOAD_WAIT: Duration = Duration::from_secs(15);

/// An in-process Outpost whose TCP listener speaks TLS with a server
/// certificate of `ca`, and with `mutual` requires client certificates of `ca`.
struct TlsServer {
    server: RunningServer,
    ca: TestCa,
    /// The files the server reads its certificate and key from.
    cert: PathBuf,
    key: PathBuf,
    dir: tempfile::TempDir,
}

impl TlsServer {
    async fn start(mutual: bool) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let ca = TestCa::new("office CA");
        let (cert, key) = ca.server().write(dir.path(), "server");
        let mut config = Config::for_tests(&dir.path().join("data"));
        config.tls = Some(ServerTls {
            cert: cert.clone(),
            key: key.clone(),
            client_ca: mutual.then(|| ca.write(dir.path(), "client-ca")),
        });
        config.metrics_listen = Some("127.0.0.1:0".parse().unwrap());
        let server = RunningServer::start(&config).await.expect("server starts");
        TlsServer {
            server,
            ca,
            cert,
            key,
            dir,
        }
    }

    fn addr(&self) -> SocketAddr {
        self.server.addr
    }

    /// Replaces the certificate and key files the way a deployment tool
    /// does: each written beside and renamed into place.
    fn replace_identity(&self, identity: &Pem) {
        let (cert, key) = identity.write(self.dir.path(), "new");
        std::fs::rename(key, &self.key).unwrap();
        std::fs::rename(cert, &self.cert).unwrap();
    }
}

/// A channel over TLS that trusts `ca` and, if given, presents `identity`.
/// Connecting lazily: a refusal shows in the first call.
fn tls_channel(addr: SocketAddr, ca: &str, identity: Option<&Pem>) -> Channel {
    let mut tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(ca))
        .domain_name("localhost");
    if let Some(id) = identity {
        tls = tls.identity(Identity::from_pem(&id.cert, &id.key));
    }
    Endpoint::from_shared(format!("https://{addr}"))
        .unwrap()
        .connect_timeout(Duration::from_secs(5))
        .tls_config(tls)
        .expect("client TLS settings")
        .connect_lazy()
}

/// Stores a blob with BatchUpdateBlobs and reads it back with ByteStream.
async fn round_trip(channel: &Channel, seed: u64) -> Result<(), String> {
    let data = blob(seed, 10_000);
    let codes = batch_update(&mut channel.cas(), "", &[&data]).await;
    if codes != vec![tonic::Code::Ok] {
        return Err(format!("BatchUpdateBlobs: {codes:?}"));
    }
    let (read, _) = read_blob(
        &mut channel.bytestream(),
        &read_name("", &digest(&data)),
        0,
        0,
    )
    .await
    .map_err(|s| format!("ByteStream.Read: {s}"))?;
    assert_eq!(read, data);
    Ok(())
}

/// GetCapabilities: the cheapest call that proves a connection works.
async fn capabilities(channel: &Channel) -> Result<(), tonic::Status> {
    channel
        .capabilities()
        .get_capabilities(re::GetCapabilitiesRequest::default())
        .await
        .map(drop)
}

async fn tls_metric(channel: &Channel, name: &str) -> u64 {
    stats(channel).await.metrics[name]
}

/// Polls until `check` is true, for at most [`RELOAD_WAIT`].
async fn eventually<F: Future<Output = bool>>(what: &str, mut check: impl FnMut() -> F) {
    let deadline = Instant::now() + RELOAD_WAIT;
    while !check().await {
        assert!(Instant::now() < deadline, "timed out waiting until {what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tls_client_round_trips_a_blob() {
    let server = TlsServer::start(false).await;
    let channel = tls_channel(server.addr(), &server.ca.cert, None);
    round_trip(&channel, 1).await.expect("round trip over TLS");
    assert!(tls_metric(&channel, "outpost_tls_handshakes_total").await >= 1);
    server.server.stop().await.expect("stops cleanly");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plaintext_client_cannot_use_the_tls_port() {
    let server = TlsServer::start(false).await;
    let plain = Endpoint::from_shared(format!("http://{}", server.addr()))
        .unwrap()
        .connect_timeout(Duration::from_secs(5))
        .timeout(Duration::from_secs(5))
        .connect_lazy();
    assert!(capabilities(&plain).await.is_err());
    let tls = tls_channel(server.addr(), &server.ca.cert, None);
    assert!(tls_metric(&tls, "outpost_tls_handshake_failures_total").await >= 1);
    // A client that does not trust the server's CA refuses it.
    let stranger = TestCa::new("someone else");
    let untrusting = tls_channel(server.addr(), &stranger.cert, None);
    assert!(capabilities(&untrusting).await.is_err());
    capabilities(&tls).await.expect("a TLS client still works");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mutual_tls_needs_a_certificate_signed_by_the_client_ca() {
    let server = TlsServer::start(true).await;
    let ca = &server.ca.cert;
    let good = server.ca.client("ci-runner-7", &["runner7.office.example"]);
    let trusted = tls_channel(server.addr(), ca, Some(&good));
    round_trip(&trusted, 2).await.expect("a client of the CA");

    let foreign = TestCa::new("someone else").client("ci-runner-7", &[]);
    let failures = tls_metric(&trusted, "outpost_tls_handshake_failures_total").await;
    let err = capabilities(&tls_channel(server.addr(), ca, Some(&foreign))).await;
    assert!(err.is_err(), "a certificate of another CA: {err:?}");
    let err = capabilities(&tls_channel(server.addr(), ca, None)).await;
    assert!(err.is_err(), "no certificate: {err:?}");
    // Each refusal is counted (the server sees the failure on its side).
    eventually("both refusals are counted", || async {
        tls_metric(&trusted, "outpost_tls_handshake_failures_total").await >= failures + 2
    })
    .await;
    capabilities(&trusted)
        .await
        .expect("the good client still works");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_certificate_serves_new_connections_while_open_ones_go_on() {
    let server = TlsServer::start(false).await;
    let old_ca = server.ca.cert.clone();
    let opened_before = tls_channel(server.addr(), &old_ca, None);
    round_trip(&opened_before, 3)
        .await
        .expect("before the reload");

    let next_ca = TestCa::new("next year's CA");
    server.replace_identity(&next_ca.server());
    eventually("a client of the new CA is served", || async {
        capabilities(&tls_channel(server.addr(), &next_ca.cert, None))
            .await
            .is_ok()
    })
    .await;
    // New connections get the new certificate: the old CA no longer vouches.
    let err = capabilities(&tls_channel(server.addr(), &old_ca, None)).await;
    assert!(err.is_err(), "old CA after the reload: {err:?}");
    // The connection made before the reload is still open and served (had it
    // dropped, reconnecting with only the old CA trusted would fail).
    round_trip(&opened_before, 4)
        .await
        .expect("after the reload");
    assert!(tls_metric(&opened_before, "outpost_tls_reloads_total").await >= 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_new_certificate_keeps_the_old_one() {
    let server = TlsServer::start(false).await;
    let channel = tls_channel(server.addr(), &server.ca.cert, None);
    capabilities(&channel).await.expect("before");
    let broken = server.dir.path().join("broken.pem");
    std::fs::write(&broken, "-----BEGIN CERTIFICATE-----\ntruncated\n").unwrap();
    std::fs::rename(&broken, &server.cert).unwrap();
    eventually("the bad file is refused", || async {
        tls_metric(&channel, "outpost_tls_reload_failures_total").await >= 1
    })
    .await;
    assert_eq!(tls_metric(&channel, "outpost_tls_reloads_total").await, 0);
    // A new connection still gets the old, good certificate.
    let fresh = tls_channel(server.addr(), &server.ca.cert, None);
    round_trip(&fresh, 5)
        .await
        .expect("served with the old certificate");
}

/// A reqwest client trusting `ca` and presenting `identity`, if any.
fn https_client(ca: &str, identity: Option<&Pem>) -> reqwest::Client {
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(CertificateDer::from_pem_slice(ca.as_bytes()).unwrap())
        .unwrap();
    let builder = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots);
    let tls = match identity {
        None => builder.with_no_client_auth(),
        Some(id) => builder
            .with_client_auth_cert(
                vec![CertificateDer::from_pem_slice(id.cert.as_bytes()).unwrap()],
                PrivateKeyDer::from_pem_slice(id.key.as_bytes()).unwrap(),
            )
            .unwrap(),
    };
    reqwest::Client::builder()
        .tls_backend_preconfigured(tls)
        .timeout(Duration::from_secs(5))
        .build()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_are_served_over_https_with_the_same_rules() {
    let server = TlsServer::start(true).await;
    let addr = server.server.metrics_addr.expect("metrics listener");
    let url = format!("https://localhost:{}/metrics", addr.port());
    let good = server.ca.client("prometheus", &[]);
    let page = https_client(&server.ca.cert, Some(&good))
        .get(&url)
        .send()
        .await
        .expect("HTTPS with a client certificate")
        .text()
        .await
        .unwrap();
    assert!(page.contains("\noutpost_tls_handshakes_total "), "{page}");
    let anonymous = https_client(&server.ca.cert, None).get(&url).send().await;
    assert!(anonymous.is_err(), "no client certificate: {anonymous:?}");
    // Plaintext HTTP gets no page: the server wants a TLS handshake.
    let mut plain = tokio::net::TcpStream::connect(addr).await.unwrap();
    plain
        .write_all(b"GET /metrics HTTP/1.1\r\nHost: localhost\r\n\r\n")
        .await
        .unwrap();
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), plain.read_to_end(&mut answer)).await;
    assert!(
        !String::from_utf8_lossy(&answer).contains("outpost_"),
        "plaintext HTTP was served"
    );
}
