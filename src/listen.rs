//! Binding Outpost's gRPC listeners: TCP (plaintext, or TLS through
//! `crate::tls`) and the unix socket. Every accepted connection is wrapped in
//! a [`PeerStream`], so each request knows its [`crate::peer::Peer`].

use std::path::Path;
use std::sync::Arc;

use anyhow::Context;
use tokio::net::{TcpListener, UnixListener, UnixStream};
use tokio::task::JoinSet;
use tokio_stream::StreamExt;
use tokio_stream::wrappers::UnixListenerStream;
use tokio_util::sync::CancellationToken;
use tonic::transport::server::{Router, TcpIncoming};

use crate::peer::PeerStream;
use crate::server::DecodeLayers;
use crate::stats::Stats;
use crate::tls::{Protocol, ReloadingTls, TlsListener};

/// Serves the routes on the TCP listener: plaintext gRPC, or with `tls`
/// every connection through the TLS handshake first.
pub(crate) fn serve_tcp(
    tasks: &mut JoinSet<anyhow::Result<()>>,
    listener: TcpListener,
    router: Router<DecodeLayers>,
    tls: Option<ReloadingTls>,
    stats: &Arc<Stats>,
    shutdown: &CancellationToken,
) -> anyhow::Result<()> {
    let addr = listener.local_addr()?;
    let token = shutdown.clone();
    let Some(tls) = tls else {
        let incoming = TcpIncoming::from(listener)
            .with_nodelay(Some(true))
            .map(|conn| conn.map(PeerStream::tcp));
        tasks.spawn(async move {
            router
                .serve_with_incoming_shutdown(incoming, token.cancelled_owned())
                .await
                .context("TCP server failed")
        });
        tracing::info!("serving REAPI on grpc://{addr}");
        return Ok(());
    };
    let mode = if tls.mutual() { "mutual TLS" } else { "TLS" };
    let incoming = TlsListener::spawn(
        listener,
        tls,
        Protocol::Grpc,
        stats.clone(),
        shutdown.clone(),
    )?
    .into_stream();
    tasks.spawn(async move {
        router
            .serve_with_incoming_shutdown(incoming, token.cancelled_owned())
            .await
            .context("TLS server failed")
    });
    tracing::info!("serving REAPI on grpcs://{addr} ({mode})");
    Ok(())
}

/// Binds the unix socket (replacing a stale socket file), readable and
/// writable by the owner only.
pub(crate) fn bind_unix(
    path: &Path,
) -> anyhow::Result<impl tokio_stream::Stream<Item = std::io::Result<PeerStream<UnixStream>>> + use<>>
{
    use std::os::unix::fs::PermissionsExt;
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    if path.exists() {
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            anyhow::bail!("{} is in use by another server", path.display());
        }
        std::fs::remove_file(path)?;
    }
    let listener = UnixListener::bind(path)
        .with_context(|| format!("cannot listen on unix socket {}", path.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    Ok(UnixListenerStream::new(listener).map(|conn| conn.map(PeerStream::unix)))
}
