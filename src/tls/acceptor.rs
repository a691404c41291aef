//! The listener's TLS settings, read from `[server] tls_cert`, `tls_key` and
//! `client_ca`, and kept current: [`ReloadingTls`] holds the rustls
//! `ServerConfig`s behind a lock that each new connection reads once, and
//! re-reads the files with [`crate::reload::watch`] when they change or on
//! SIGHUP. A bad new file is logged and the old settings stay; connections
//! already open keep the settings they were made with.

use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use rustls::ServerConfig;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use tokio_util::sync::CancellationToken;

use crate::config::ServerTls;
use crate::stats::Stats;

/// Why the TLS files could not be used; names the file and the reason.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A PEM file could not be read or holds nothing usable.
    #[error("cannot read {path}: {reason}")]
    Pem {
        /// The file.
        path: PathBuf,
        /// What was wrong with it.
        reason: String,
    },
    /// rustls refused the certificate, key or CA (e.g. a key that does not
    /// match the certificate).
    #[error("{what}: {reason}")]
    Rejected {
        /// Which files.
        what: String,
        /// rustls's reason.
        reason: String,
    },
}

/// What the connection speaks inside TLS, announced with ALPN.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Protocol {
    /// gRPC over HTTP/2 (the REAPI listener): ALPN `h2`.
    Grpc,
    /// HTTP/1.1 (the metrics listener): ALPN `http/1.1`.
    Http1,
}

/// One reading of the files: a `ServerConfig` per [`Protocol`].
struct Configs {
    grpc: Arc<ServerConfig>,
    http1: Arc<ServerConfig>,
}

/// The listener's TLS settings, re-read when their files change. Cheap to
/// clone: clones share the current settings.
#[derive(Clone)]
pub struct ReloadingTls {
    /// Where the certificate, key and client CA are read from.
    files: Arc<ServerTls>,
    /// The latest good reading; every new connection takes it.
    current: Arc<RwLock<Arc<Configs>>>,
}

impl ReloadingTls {
    /// Reads the files once; fails (so the server does not start) when they
    /// are unusable.
    pub fn load(files: &ServerTls) -> Result<Self, TlsError> {
        let configs = read(files)?;
        Ok(ReloadingTls {
            files: Arc::new(files.clone()),
            current: Arc::new(RwLock::new(Arc::new(configs))),
        })
    }

    /// True when clients must present a certificate signed by `client_ca`.
    pub fn mutual(&self) -> bool {
        self.files.client_ca.is_some()
    }

    /// The settings a connection accepted now uses.
    pub fn config(&self, protocol: Protocol) -> Arc<ServerConfig> {
        let configs = self.current.read().unwrap_or_else(|e| e.into_inner());
        match protocol {
            Protocol::Grpc => configs.grpc.clone(),
            Protocol::Http1 => configs.http1.clone(),
        }
    }

    /// Re-reads the files: on success new connections use them; on failure
    /// the current settings stay and the reason is logged. Returns whether
    /// the new files took effect.
    pub fn reload(&self, stats: &Stats) -> bool {
        match read(&self.files) {
            Ok(configs) => {
                *self.current.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(configs);
                Stats::add(&stats.tls_reloads, 1);
                tracing::info!(
                    "TLS: new connections use {} (re-read)",
                    self.files.cert.display()
                );
                true
            }
            Err(e) => {
                Stats::add(&stats.tls_reload_failures, 1);
                tracing::warn!("TLS: keeping the current certificate: {e}");
                false
            }
        }
    }

    /// Reloads whenever the certificate, key or client CA file changes, or
    /// on SIGHUP, until `shutdown`.
    pub fn watch(&self, stats: Arc<Stats>, shutdown: CancellationToken) {
        let mut paths = vec![self.files.cert.clone(), self.files.key.clone()];
        paths.extend(self.files.client_ca.clone());
        let this = self.clone();
        crate::reload::watch(paths, crate::reload::POLL_INTERVAL, shutdown, move || {
            this.reload(&stats);
        });
    }
}

/// Reads and checks the three files into one `ServerConfig` per protocol.
fn read(files: &ServerTls) -> Result<Configs, TlsError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let chain = certificates(&files.cert)?;
    let key = PrivateKeyDer::from_pem_file(&files.key).map_err(|e| pem_error(&files.key, e))?;
    let builder = ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| rejected("TLS protocol versions", e))?;
    let builder = match &files.client_ca {
        None => builder.with_no_client_auth(),
        Some(ca) => {
            let mut roots = rustls::RootCertStore::empty();
            for cert in certificates(ca)? {
                roots
                    .add(cert)
                    .map_err(|e| rejected(&format!("client CA {}", ca.display()), e))?;
            }
            // Requires a certificate: anonymous clients fail the handshake.
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                .build()
                .map_err(|e| rejected(&format!("client CA {}", ca.display()), e))?;
            builder.with_client_cert_verifier(verifier)
        }
    };
    let mut grpc = builder.with_single_cert(chain, key).map_err(|e| {
        rejected(
            &format!(
                "certificate {} with key {}",
                files.cert.display(),
                files.key.display()
            ),
            e,
        )
    })?;
    let mut http1 = grpc.clone();
    grpc.alpn_protocols = vec![b"h2".to_vec()];
    http1.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Configs {
        grpc: Arc::new(grpc),
        http1: Arc::new(http1),
    })
}

/// Every certificate in a PEM file; at least one.
fn certificates(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = CertificateDer::pem_file_iter(path)
        .and_then(|iter| iter.collect::<Result<Vec<_>, _>>())
        .map_err(|e| pem_error(path, e))?;
    if certs.is_empty() {
        return Err(pem_error(path, "no CERTIFICATE block found"));
    }
    Ok(certs)
}

fn pem_error(path: &Path, reason: impl std::fmt::Display) -> TlsError {
    TlsError::Pem {
        path: path.to_path_buf(),
        reason: reason.to_string(),
    }
}

fn rejected(what: &str, reason: impl std::fmt::Display) -> TlsError {
    TlsError::Rejected {
        what: what.to_string(),
        reason: reason.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A self-signed certificate for localhost, written as PEM files.
    fn write_identity(dir: &Path, name: &str) -> (PathBuf, PathBuf) {
        let key = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).unwrap();
        let (cert, key_path) = (
            dir.join(format!("{name}.pem")),
            dir.join(format!("{name}.key")),
        );
        std::fs::write(&cert, key.cert.pem()).unwrap();
        std::fs::write(&key_path, key.signing_key.serialize_pem()).unwrap();
        (cert, key_path)
    }

    fn files(cert: PathBuf, key: PathBuf, client_ca: Option<PathBuf>) -> ServerTls {
        ServerTls {
            cert,
            key,
            client_ca,
        }
    }

    #[test]
    fn each_protocol_announces_its_alpn() {
        let dir = tempfile::tempdir().unwrap();
        let (cert, key) = write_identity(dir.path(), "server");
        let tls = ReloadingTls::load(&files(cert.clone(), key, Some(cert))).unwrap();
        assert!(tls.mutual());
        assert_eq!(
            tls.config(Protocol::Grpc).alpn_protocols,
            vec![b"h2".to_vec()]
        );
        assert_eq!(
            tls.config(Protocol::Http1).alpn_protocols,
            vec![b"http/1.1".to_vec()]
        );
    }

    #[test]
    fn unusable_files_are_named_in_the_error() {
        let dir = tempfile::tempdir().unwrap();
        let (cert, key) = write_identity(dir.path(), "a");
        let (other_cert, _) = write_identity(dir.path(), "b");
        let missing = dir.path().join("missing.pem");
        let garbage = dir.path().join("garbage.pem");
        std::fs::write(&garbage, "not PEM at all\n").unwrap();

        let err = ReloadingTls::load(&files(missing.clone(), key.clone(), None))
            .err()
            .unwrap();
        assert!(err.to_string().contains("missing.pem"), "{err}");
        let err = ReloadingTls::load(&files(garbage, key.clone(), None))
            .err()
            .unwrap();
        assert!(err.to_string().contains("no CERTIFICATE block"), "{err}");
        // A key that belongs to another certificate.
        let err = ReloadingTls::load(&files(other_cert, key.clone(), None))
            .err()
            .unwrap();
        assert!(err.to_string().contains("b.pem"), "{err}");
        let err = ReloadingTls::load(&files(cert, key, Some(missing)))
            .err()
            .unwrap();
        assert!(err.to_string().contains("missing.pem"), "{err}");
    }

    #[test]
    fn a_bad_reload_keeps_the_current_settings() {
        let dir = tempfile::tempdir().unwrap();
        let (cert, key) = write_identity(dir.path(), "server");
        let tls = ReloadingTls::load(&files(cert.clone(), key.clone(), None)).unwrap();
        let stats = Stats::default();
        let before = tls.config(Protocol::Grpc);
        std::fs::write(&key, "truncated").unwrap();
        assert!(!tls.reload(&stats));
        assert!(Arc::ptr_eq(&before, &tls.config(Protocol::Grpc)));
        assert_eq!(Stats::get(&stats.tls_reload_failures), 1);
        // A new, consistent pair takes effect.
        write_identity(dir.path(), "server");
        assert!(tls.reload(&stats));
        assert!(!Arc::ptr_eq(&before, &tls.config(Protocol::Grpc)));
        assert_eq!(Stats::get(&stats.tls_reloads), 1);
    }
}
