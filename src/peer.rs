//! Who is on the other end of a connection: its address, the transport, and
//! (with mutual TLS) the client certificate it presented.
//!
//! Every listener wraps its accepted streams in [`PeerStream`]; tonic then puts
//! the stream's [`Peer`] into the extensions of every request on that
//! connection, where authentication, per-client limits and logs find it with
//! [`Peer::of`].

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpStream, UnixStream};
use tonic::codegen::http;
use tonic::transport::server::Connected;

/// How a connection reached Outpost.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Transport {
    /// Plain TCP (`grpc://`).
    Tcp,
    /// TLS over TCP (`grpcs://`), with or without a client certificate.
    Tls,
    /// The unix socket; its file permissions guard it.
    Unix,
}

/// What a verified client certificate says about its holder, for mapping it
/// to a credential name (`[[auth.client_certificates]]`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ClientCertificate {
    /// The subject's common name (CN), if it has one.
    pub common_name: Option<String>,
    /// DNS names, e-mail addresses and URIs of the subjectAltName extension.
    pub subject_alt_names: Vec<String>,
    /// SHA-256 of the DER certificate, lower-case hex (for logs: never secret).
    pub sha256: String,
}

/// The other end of one connection.
#[derive(Clone, Debug)]
pub struct Peer {
    /// The remote address (None on the unix socket).
    pub addr: Option<SocketAddr>,
    /// Plain TCP, TLS or the unix socket.
    pub transport: Transport,
    /// The client certificate the TLS handshake verified, if any.
    pub certificate: Option<Arc<ClientCertificate>>,
}

impl Peer {
    /// A peer without a certificate, for unit tests of the layers that read it.
    #[cfg(test)]
    pub(crate) fn for_tests(addr: Option<&str>, transport: Transport) -> Peer {
        Peer {
            addr: addr.map(|a| a.parse().expect("a socket address")),
            transport,
            certificate: None,
        }
    }

    /// The peer of a request, put there by the listener's [`PeerStream`].
    /// None only for requests that did not come through a listener (tests
    /// calling a service directly).
    pub fn of<B>(request: &http::Request<B>) -> Option<&Peer> {
        request.extensions().get::<Peer>()
    }

    /// True on the unix socket and for loopback addresses: the same machine.
    pub fn is_local(&self) -> bool {
        match self.transport {
            Transport::Unix => true,
            Transport::Tcp | Transport::Tls => self.addr.is_some_and(|a| a.ip().is_loopback()),
        }
    }
}

/// An accepted connection and who is on the other end of it.
pub struct PeerStream<IO> {
    io: IO,
    peer: Peer,
}

impl<IO> PeerStream<IO> {
    /// Wraps `io`, whose other end is `peer`.
    pub fn new(io: IO, peer: Peer) -> Self {
        PeerStream { io, peer }
    }

    /// The other end.
    pub fn peer(&self) -> &Peer {
        &self.peer
    }
}

impl PeerStream<TcpStream> {
    /// A plain TCP connection.
    pub fn tcp(io: TcpStream) -> Self {
        let peer = Peer {
            addr: io.peer_addr().ok(),
            transport: Transport::Tcp,
            certificate: None,
        };
        PeerStream { io, peer }
    }
}

impl PeerStream<UnixStream> {
    /// A connection on the unix socket.
    pub fn unix(io: UnixStream) -> Self {
        let peer = Peer {
            addr: None,
            transport: Transport::Unix,
            certificate: None,
        };
        PeerStream { io, peer }
    }
}

impl<IO> Connected for PeerStream<IO> {
    type ConnectInfo = Peer;

    fn connect_info(&self) -> Peer {
        self.peer.clone()
    }
}

impl<IO: AsyncRead + Unpin> AsyncRead for PeerStream<IO> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl<IO: AsyncWrite + Unpin> AsyncWrite for PeerStream<IO> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn peer(addr: Option<&str>, transport: Transport) -> Peer {
        Peer::for_tests(addr, transport)
    }

    #[test]
    fn local_means_loopback_or_the_unix_socket() {
        assert!(peer(Some("127.0.0.1:1"), Transport::Tcp).is_local());
        assert!(peer(Some("[::1]:1"), Transport::Tls).is_local());
        assert!(peer(None, Transport::Unix).is_local());
        assert!(!peer(Some("10.0.0.7:1"), Transport::Tcp).is_local());
        assert!(!peer(None, Transport::Tcp).is_local());
    }
}
