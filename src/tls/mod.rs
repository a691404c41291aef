//! TLS on Outpost's own listeners (`[server] tls_cert`, `tls_key`,
//! `client_ca`): the gRPC port speaks `grpcs://` and the metrics port
//! `https://`; with `client_ca`, clients must present a certificate it
//! signed (mutual TLS). The unix socket stays plaintext.
//!
//! - [`acceptor`]: the rustls settings, re-read when the files change.
//! - [`listener`]: accepting connections, handshakes off the accept loop.
//! - [`certificate`]: the names of a verified client certificate.

pub mod acceptor;
pub mod certificate;
pub mod listener;

pub use acceptor::{Protocol, ReloadingTls, TlsError};
pub use listener::{TlsConnection, TlsListener};
