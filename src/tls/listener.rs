//! The TLS listener: accepts TCP connections, runs each TLS handshake in its
//! own task (bounded by [`HANDSHAKE_TIMEOUT`], so a slow or hostile client
//! holds up nobody else), and hands over the connections that completed it
//! as [`PeerStream`]s carrying the verified client certificate.
//!
//! tonic takes it as a stream ([`TlsListener::into_stream`]); the metrics
//! server (axum) as an [`axum::serve::Listener`].

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_rustls::server::TlsStream;
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::{Stream, StreamExt};
use tokio_util::sync::CancellationToken;

use super::acceptor::{Protocol, ReloadingTls};
use super::certificate::client_certificate;
use crate::peer::{Peer, PeerStream, Transport};
use crate::stats::Stats;

/// How long a client may take to complete the TLS handshake.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Connections that finished their handshake and wait to be served.
const READY_QUEUE: usize = 64;
/// Pause after a failed `accept` (e.g. out of file descriptors), so the loop
/// does not spin while the condition lasts.
const ACCEPT_ERROR_PAUSE: Duration = Duration::from_millis(100);

/// A connection that completed the TLS handshake.
pub type TlsConnection = PeerStream<TlsStream<TcpStream>>;

/// Connections that completed the TLS handshake, in the order they did.
pub struct TlsListener {
    ready: mpsc::Receiver<TlsConnection>,
    local_addr: SocketAddr,
}

impl TlsListener {
    /// Starts accepting on `listener` with the current settings of `tls`,
    /// until `shutdown` or until the listener is dropped.
    pub fn spawn(
        listener: TcpListener,
        tls: ReloadingTls,
        protocol: Protocol,
        stats: Arc<Stats>,
        shutdown: CancellationToken,
    ) -> io::Result<Self> {
        let local_addr = listener.local_addr()?;
        let (tx, ready) = mpsc::channel(READY_QUEUE);
        tokio::spawn(accept_loop(listener, tls, protocol, stats, tx, shutdown));
        Ok(TlsListener { ready, local_addr })
    }

    /// The connections as a stream, for tonic's `serve_with_incoming*`.
    pub fn into_stream(self) -> impl Stream<Item = io::Result<TlsConnection>> + use<> {
        ReceiverStream::new(self.ready).map(Ok)
    }
}

impl axum::serve::Listener for TlsListener {
    type Io = TlsConnection;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        match self.ready.recv().await {
            Some(conn) => {
                let addr = conn.peer().addr.unwrap_or(self.local_addr);
                (conn, addr)
            }
            // The accept loop stopped (shutdown): no more connections.
            None => std::future::pending().await,
        }
    }

    fn local_addr(&self) -> io::Result<Self::Addr> {
        Ok(self.local_addr)
    }
}

async fn accept_loop(
    listener: TcpListener,
    tls: ReloadingTls,
    protocol: Protocol,
    stats: Arc<Stats>,
    ready: mpsc::Sender<TlsConnection>,
    shutdown: CancellationToken,
) {
    loop {
        let accepted = tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = ready.closed() => return,
            accepted = listener.accept() => accepted,
        };
        let (tcp, addr) = match accepted {
            Ok(pair) => pair,
            Err(e) => {
                tracing::warn!("cannot accept a TLS connection: {e}");
                tokio::time::sleep(ACCEPT_ERROR_PAUSE).await;
                continue;
            }
        };
        let _ = tcp.set_nodelay(true);
        let acceptor = tokio_rustls::TlsAcceptor::from(tls.config(protocol));
        let (ready, stats) = (ready.clone(), stats.clone());
        tokio::spawn(async move {
            if let Some(conn) = handshake(acceptor, tcp, addr, &stats).await {
                // Fails only when the server stopped taking connections.
                let _ = ready.send(conn).await;
            }
        });
    }
}

/// Runs the handshake; logs and counts a failure.
async fn handshake(
    acceptor: tokio_rustls::TlsAcceptor,
    tcp: TcpStream,
    addr: SocketAddr,
    stats: &Stats,
) -> Option<TlsConnection> {
    let reason = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
        Ok(Ok(stream)) => {
            Stats::add(&stats.tls_handshakes, 1);
            let certificate = stream
                .get_ref()
                .1
                .peer_certificates()
                .and_then(|chain| chain.first())
                .map(|der| Arc::new(client_certificate(der)));
            if let Some(cert) = &certificate {
                tracing::debug!(
                    "TLS client {addr}: certificate CN={:?} SAN={:?} sha256={}",
                    cert.common_name,
                    cert.subject_alt_names,
                    cert.sha256
                );
            }
            let peer = Peer {
                addr: Some(addr),
                transport: Transport::Tls,
                certificate,
            };
            return Some(PeerStream::new(stream, peer));
        }
        // Closed before finishing: port probes and health checks, mostly.
        Ok(Err(e)) if e.kind() == io::ErrorKind::UnexpectedEof => {
            Stats::add(&stats.tls_handshake_failures, 1);
            tracing::debug!("TLS handshake with {addr} failed: {e}");
            return None;
        }
        Ok(Err(e)) => e.to_string(),
        Err(_) => format!("no handshake within {HANDSHAKE_TIMEOUT:?}"),
    };
    Stats::add(&stats.tls_handshake_failures, 1);
    tracing::info!("TLS handshake with {addr} failed: {reason}");
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::ServerTls;
    use outpost_testkit::pki::{Pem, TestCa};
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
    use std::time::Instant;

    /// A TLS listener on 127.0.0.1 with a server certificate of `ca`,
    /// requiring client certificates signed by `ca`.
    async fn listen(dir: &std::path::Path, ca: &TestCa) -> (SocketAddr, TlsListener, Arc<Stats>) {
        let (cert, key) = ca.server().write(dir, "server");
        let files = ServerTls {
            cert,
            key,
            client_ca: Some(ca.write(dir, "ca")),
        };
        let tcp = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = tcp.local_addr().unwrap();
        let stats = Arc::new(Stats::default());
        let tls = ReloadingTls::load(&files).unwrap();
        let listener = TlsListener::spawn(
            tcp,
            tls,
            Protocol::Grpc,
            stats.clone(),
            CancellationToken::new(),
        )
        .unwrap();
        (addr, listener, stats)
    }

    /// Connects with rustls, trusting `ca` and presenting `identity`.
    async fn connect(
        addr: SocketAddr,
        ca: &TestCa,
        identity: &Pem,
    ) -> io::Result<tokio_rustls::client::TlsStream<TcpStream>> {
        let mut roots = rustls::RootCertStore::empty();
        roots
            .add(CertificateDer::from_pem_slice(ca.cert.as_bytes()).unwrap())
            .unwrap();
        let config = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_client_auth_cert(
            vec![CertificateDer::from_pem_slice(identity.cert.as_bytes()).unwrap()],
            PrivateKeyDer::from_pem_slice(identity.key.as_bytes()).unwrap(),
        )
        .unwrap();
        let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
        let tcp = TcpStream::connect(addr).await?;
        connector
            .connect(ServerName::try_from("localhost").unwrap(), tcp)
            .await
    }

    #[tokio::test]
    async fn the_peer_carries_the_verified_client_certificate() {
        let dir = tempfile::tempdir().unwrap();
        let ca = TestCa::new("office CA");
        let (addr, mut listener, stats) = listen(dir.path(), &ca).await;
        let client = ca.client("ci-runner-7", &["runner7.office.example"]);
        let (_client, (conn, peer_addr)) = tokio::join!(
            async { connect(addr, &ca, &client).await.expect("handshake") },
            axum::serve::Listener::accept(&mut listener)
        );
        let peer = conn.peer();
        assert_eq!(peer.transport, Transport::Tls);
        assert_eq!(peer.addr, Some(peer_addr));
        assert!(peer_addr.ip().is_loopback());
        let cert = peer.certificate.as_ref().expect("a client certificate");
        assert_eq!(cert.common_name.as_deref(), Some("ci-runner-7"));
        assert_eq!(cert.subject_alt_names, vec!["runner7.office.example"]);
        assert_eq!(Stats::get(&stats.tls_handshakes), 1);
    }

    #[tokio::test]
    async fn a_certificate_from_another_ca_fails_the_handshake_and_is_counted() {
        let dir = tempfile::tempdir().unwrap();
        let ca = TestCa::new("office CA");
        let (addr, _listener, stats) = listen(dir.path(), &ca).await;
        let stranger = TestCa::new("someone else").client("intruder", &[]);
        // The client sees the refusal when it first reads (TLS 1.3 sends the
        // server's verdict on the client certificate after the handshake).
        let outcome = async {
            let mut stream = connect(addr, &ca, &stranger).await?;
            tokio::io::AsyncReadExt::read(&mut stream, &mut [0u8; 1]).await
        }
        .await;
        assert!(outcome.is_err(), "{outcome:?}");
        let deadline = Instant::now() + Duration::from_secs(5);
        while Stats::get(&stats.tls_handshake_failures) == 0 {
            assert!(Instant::now() < deadline, "failure never counted");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(Stats::get(&stats.tls_handshakes), 0);
    }

    #[tokio::test]
    async fn a_silent_client_does_not_hold_up_the_next_one() {
        let dir = tempfile::tempdir().unwrap();
        let ca = TestCa::new("office CA");
        let (addr, mut listener, _stats) = listen(dir.path(), &ca).await;
        // Connects and never sends a ClientHello.
        let _silent = TcpStream::connect(addr).await.unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
        let started = Instant::now();
        let client = ca.client("dev", &[]);
        let (_client, (conn, _)) = tokio::join!(
            async { connect(addr, &ca, &client).await.expect("handshake") },
            axum::serve::Listener::accept(&mut listener)
        );
        assert!(started.elapsed() < HANDSHAKE_TIMEOUT / 2);
        let cert = conn.peer().certificate.as_ref().unwrap();
        assert_eq!(cert.common_name.as_deref(), Some("dev"));
    }
}
