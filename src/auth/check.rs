//! The [`Authenticator`]: from a request's peer and `authorization` header to
//! a [`Principal`] allowed to call the method, or a [`Refusal`].
//!
//! The credential files are parsed into one immutable [`Credentials`]
//! snapshot, swapped whole when a file changes or on SIGHUP (the one
//! mechanism in `crate::reload`); a bad new file is logged and the previous
//! snapshot kept. Every call reads the current snapshot, so a revoked token
//! stops working at its next call, on open connections too.

use std::path::PathBuf;
use std::sync::{Arc, RwLock};

use anyhow::Context as _;
use base64::Engine as _;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tonic::Status;

use crate::config::AuthConfig;
use crate::peer::{ClientCertificate, Peer, Transport};
use crate::stats::Stats;

use super::htpasswd::Htpasswd;
use super::role::{Principal, Role};
use super::throttle::{self, Throttle};
use super::tokens::Tokens;
use super::{certs, rpc};

/// bcrypt checks running at once: each takes a core for tens of
/// milliseconds, so a flood of wrong passwords cannot take them all.
const BCRYPT_SLOTS: usize = 2;

/// One version of the credential files.
#[derive(Default)]
pub struct Credentials {
    tokens: Option<Tokens>,
    htpasswd: Option<Arc<Htpasswd>>,
}

impl Credentials {
    /// Reads and parses the configured files.
    pub fn load(config: &AuthConfig) -> anyhow::Result<Self> {
        let read = |path: &PathBuf| {
            std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))
        };
        let tokens = match &config.tokens_file {
            Some(path) => Some(
                Tokens::parse(&read(path)?)
                    .map_err(|e| anyhow::anyhow!("tokens file {}: {e}", path.display()))?,
            ),
            None => None,
        };
        let htpasswd = match &config.htpasswd_file {
            Some(path) => Some(Arc::new(
                Htpasswd::parse(&read(path)?, config.htpasswd_roles.clone())
                    .map_err(|e| anyhow::anyhow!("htpasswd file {}: {e}", path.display()))?,
            )),
            None => None,
        };
        Ok(Credentials { tokens, htpasswd })
    }

    /// "3 tokens, 2 htpasswd users", for log lines.
    fn summary(&self) -> String {
        let mut parts = Vec::new();
        if let Some(t) = &self.tokens {
            parts.push(format!("{} tokens", t.len()));
        }
        if let Some(h) = &self.htpasswd {
            parts.push(format!("{} htpasswd users", h.len()));
        }
        parts.join(", ")
    }
}

/// Why a call is refused. Messages name what is missing, never a secret.
#[derive(Debug)]
pub enum Refusal {
    /// No credential (or none of a supported kind) where one is required.
    Missing(String),
    /// A bearer token the tokens file does not list.
    UnknownToken,
    /// HTTP basic credentials that do not check out.
    BadPassword,
    /// A client certificate that no rule names.
    UnknownCertificate(String),
    /// Authenticated, but the role does not allow the method.
    Denied(Principal, String),
}

impl Refusal {
    /// The status the client gets.
    pub fn status(&self) -> Status {
        match self {
            Refusal::Missing(message) => Status::unauthenticated(message.clone()),
            Refusal::UnknownToken => {
                Status::unauthenticated("the bearer token is not known (revoked?)")
            }
            Refusal::BadPassword => {
                Status::unauthenticated("wrong user name or password (HTTP basic)")
            }
            Refusal::UnknownCertificate(cert) => Status::unauthenticated(format!(
                "the client certificate ({cert}) matches no [[auth.client_certificates]] rule"
            )),
            Refusal::Denied(_, message) => Status::permission_denied(message.clone()),
        }
    }

    fn count(&self, stats: &Stats) {
        let counter = match self {
            Refusal::Missing(_) => &stats.auth_failures_missing,
            Refusal::UnknownToken => &stats.auth_failures_unknown_token,
            Refusal::BadPassword => &stats.auth_failures_bad_password,
            Refusal::UnknownCertificate(_) => &stats.auth_failures_unknown_certificate,
            Refusal::Denied(..) => &stats.auth_denied,
        };
        Stats::add(counter, 1);
    }
}

/// Authenticates callers and checks their role; shared by every listener.
pub struct Authenticator {
    config: AuthConfig,
    credentials: RwLock<Arc<Credentials>>,
    throttle: Throttle,
    bcrypt_slots: Semaphore,
    stats: Arc<Stats>,
}

impl Authenticator {
    /// Reads the configured credential files; a missing or bad file is an
    /// error (the server does not start half-protected).
    pub fn new(config: &AuthConfig, stats: Arc<Stats>) -> anyhow::Result<Self> {
        let credentials = Credentials::load(config)?;
        if config.has_credentials() {
            tracing::info!("authentication on: {}", credentials.summary());
        }
        Ok(Authenticator {
            config: config.clone(),
            credentials: RwLock::new(Arc::new(credentials)),
            throttle: Throttle::default(),
            bcrypt_slots: Semaphore::new(BCRYPT_SLOTS),
            stats,
        })
    }

    /// Whether any credential source is configured (otherwise every caller
    /// has full rights, as before authentication existed).
    pub fn enabled(&self) -> bool {
        self.config.has_credentials()
    }

    /// Re-reads the files and swaps them in; on error the old ones stay.
    pub fn reload(&self) -> anyhow::Result<()> {
        let fresh = Credentials::load(&self.config)?;
        tracing::info!("credentials re-read: {}", fresh.summary());
        *self.credentials.write().expect("not poisoned") = Arc::new(fresh);
        Ok(())
    }

    /// Re-reads the credential files whenever they change or on SIGHUP,
    /// until `shutdown`.
    pub fn watch(self: &Arc<Self>, shutdown: CancellationToken) {
        let paths: Vec<PathBuf> = [&self.config.tokens_file, &self.config.htpasswd_file]
            .into_iter()
            .flatten()
            .cloned()
            .collect();
        if paths.is_empty() {
            return;
        }
        let this = self.clone();
        crate::reload::watch(
            paths,
            crate::reload::POLL_INTERVAL,
            shutdown,
            move || match this.reload() {
                Ok(()) => Stats::add(&this.stats.auth_reloads, 1),
                Err(e) => {
                    Stats::add(&this.stats.auth_reload_failures, 1);
                    tracing::warn!("keeping the previous credentials: {e:#}");
                }
            },
        );
    }

    /// Who the caller is and whether it may call `path`. `authorization` is
    /// the header's value, `peer` the connection's other end.
    pub async fn admit(
        &self,
        peer: Option<&Peer>,
        authorization: Option<&[u8]>,
        path: &str,
    ) -> Result<Principal, Refusal> {
        if !self.enabled() {
            return Ok(open_principal(peer));
        }
        let certificate = peer.and_then(|p| p.certificate.as_deref());
        let local = peer.is_some_and(Peer::is_local);
        if authorization.is_none()
            && certificate.is_none()
            && local
            && !self.config.require_on_loopback
        {
            return Ok(open_principal(peer));
        }
        let key = peer.and_then(|p| p.addr).map(|a| a.ip());
        if let Some(delay) = self.throttle.delay(key) {
            Stats::add(&self.stats.auth_slowed_down, 1);
            tokio::time::sleep(delay).await;
        }
        let outcome = self.authenticate(authorization, certificate).await;
        let outcome = match outcome {
            Ok(principal) => {
                self.throttle.succeeded(key);
                match rpc::check(&principal, path) {
                    Ok(()) => Ok(principal),
                    Err(message) => Err(Refusal::Denied(principal, message)),
                }
            }
            Err(refusal) => {
                if self.throttle.failed(key) == throttle::FREE_FAILURES {
                    tracing::info!(
                        "{} failed authentications in a row from {}: slowing it down",
                        throttle::FREE_FAILURES,
                        key.map_or("the unix socket".to_string(), |ip| ip.to_string())
                    );
                }
                Err(refusal)
            }
        };
        match &outcome {
            Ok(_) => Stats::add(&self.stats.auth_accepted, 1),
            Err(refusal) => refusal.count(&self.stats),
        }
        outcome
    }

    /// The credential the header or the certificate proves; the header wins
    /// when both are there.
    async fn authenticate(
        &self,
        authorization: Option<&[u8]>,
        certificate: Option<&ClientCertificate>,
    ) -> Result<Principal, Refusal> {
        if let Some(value) = authorization {
            return self.check_header(value).await;
        }
        if let Some(cert) = certificate {
            return certs::principal_for(&self.config.client_certificates, cert)
                .ok_or_else(|| Refusal::UnknownCertificate(certs::describe(cert)));
        }
        Err(Refusal::Missing(self.missing_message()))
    }

    async fn check_header(&self, value: &[u8]) -> Result<Principal, Refusal> {
        let credentials = self.credentials.read().expect("not poisoned").clone();
        let text = std::str::from_utf8(value).unwrap_or("");
        let (scheme, rest) = text.split_once(' ').unwrap_or((text, ""));
        let rest = rest.trim();
        if scheme.eq_ignore_ascii_case("bearer") {
            let tokens = credentials.tokens.as_ref().ok_or(Refusal::UnknownToken)?;
            return tokens.lookup(rest).cloned().ok_or(Refusal::UnknownToken);
        }
        if scheme.eq_ignore_ascii_case("basic") {
            let htpasswd = credentials.htpasswd.clone().ok_or(Refusal::BadPassword)?;
            if let Some(principal) = htpasswd.cached(value) {
                return Ok(principal);
            }
            let decoded = base64::engine::general_purpose::STANDARD
                .decode(rest)
                .ok()
                .and_then(|d| String::from_utf8(d).ok())
                .ok_or(Refusal::BadPassword)?;
            let (user, password) = decoded.split_once(':').ok_or(Refusal::BadPassword)?;
            let (user, password, header) = (user.to_string(), password.to_string(), value.to_vec());
            let _slot = self.bcrypt_slots.acquire().await.expect("never closed");
            let checked =
                tokio::task::spawn_blocking(move || htpasswd.verify(&header, &user, &password))
                    .await
                    .ok()
                    .flatten();
            return checked.ok_or(Refusal::BadPassword);
        }
        // Not echoed: a client that forgot the scheme sends its secret here.
        Err(Refusal::Missing(format!(
            "unsupported authorization scheme; {}",
            self.missing_message()
        )))
    }

    /// What a caller without credentials is told to send.
    fn missing_message(&self) -> String {
        let mut ways = Vec::new();
        if self.config.tokens_file.is_some() {
            ways.push(
                "authorization: Bearer <token> (Bazel: --remote_header=authorization=Bearer <token>)",
            );
        }
        if self.config.htpasswd_file.is_some() {
            ways.push("authorization: Basic <user:password> (HTTP basic)");
        }
        if !self.config.client_certificates.is_empty() {
            ways.push("a client certificate (mutual TLS)");
        }
        format!(
            "this server requires credentials: send {}",
            ways.join(", or ")
        )
    }
}

/// The principal of a caller that needs no credential: full rights, named
/// after where it comes from (`local:127.0.0.1`, `local:unix`, and
/// `anonymous:<ip>` for other addresses, served only with --allow-remote
/// and no credential source).
pub fn open_principal(peer: Option<&Peer>) -> Principal {
    let name = match peer {
        Some(p) if p.transport == Transport::Unix => "local:unix".to_string(),
        Some(p) => match p.addr {
            Some(addr) if addr.ip().is_loopback() => format!("local:{}", addr.ip()),
            Some(addr) => format!("anonymous:{}", addr.ip()),
            None => "anonymous:unknown".to_string(),
        },
        None => "anonymous:unknown".to_string(),
    };
    Principal {
        name: Arc::from(name),
        role: Role::Execute,
        write_ac: true,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::ClientCertRule;

    fn peer(addr: &str, certificate: Option<ClientCertificate>) -> Peer {
        Peer {
            addr: Some(addr.parse().unwrap()),
            transport: if certificate.is_some() {
                Transport::Tls
            } else {
                Transport::Tcp
            },
            certificate: certificate.map(Arc::new),
        }
    }

    fn cert(cn: &str) -> ClientCertificate {
        ClientCertificate {
            common_name: Some(cn.into()),
            subject_alt_names: vec![],
            sha256: "ab".repeat(32),
        }
    }

    const UAR: &str = "/build.bazel.remote.execution.v2.ActionCache/UpdateActionResult";
    const FMB: &str = "/build.bazel.remote.execution.v2.ContentAddressableStorage/FindMissingBlobs";

    #[tokio::test]
    async fn certificates_headers_and_addresses_decide_who_calls() {
        let dir = tempfile::tempdir().unwrap();
        let tokens = dir.path().join("tokens");
        let token = crate::cli::token::add(&tokens, "reader", Role::Read, false).unwrap();
        let config = AuthConfig {
            tokens_file: Some(tokens),
            client_certificates: vec![ClientCertRule {
                name: "ci".into(),
                common_name: Some("ci-runner".into()),
                subject_alt_name: None,
                role: Role::Execute,
                write_ac: true,
            }],
            ..AuthConfig::default()
        };
        let stats = Arc::new(Stats::default());
        let auth = Authenticator::new(&config, stats.clone()).unwrap();
        let remote = |c: Option<&str>| peer("10.0.0.7:4000", c.map(cert));

        // mTLS: the rule's credential, with its role and write-ac.
        let ci = auth
            .admit(Some(&remote(Some("ci-runner"))), None, UAR)
            .await
            .unwrap();
        assert_eq!(
            (&*ci.name, ci.role, ci.write_ac),
            ("ci", Role::Execute, true)
        );
        let unknown = auth.admit(Some(&remote(Some("intruder"))), None, FMB).await;
        match unknown {
            Err(r @ Refusal::UnknownCertificate(_)) => {
                assert!(
                    r.status().message().contains("CN=intruder"),
                    "{:?}",
                    r.status()
                )
            }
            other => panic!("{other:?}"),
        }
        // A header wins over the certificate.
        let bearer = format!("Bearer {token}");
        let header = Some(bearer.as_bytes());
        let reader = auth
            .admit(Some(&remote(Some("ci-runner"))), header, FMB)
            .await;
        assert_eq!(&*reader.unwrap().name, "reader");
        assert!(matches!(
            auth.admit(Some(&remote(Some("ci-runner"))), header, UAR)
                .await,
            Err(Refusal::Denied(..))
        ));
        // Another machine without a credential is refused even though
        // loopback needs none; loopback gets the local principal.
        assert!(matches!(
            auth.admit(Some(&remote(None)), None, FMB).await,
            Err(Refusal::Missing(_))
        ));
        let local = auth
            .admit(Some(&peer("127.0.0.1:5", None)), None, UAR)
            .await
            .unwrap();
        assert_eq!((&*local.name, local.write_ac), ("local:127.0.0.1", true));
        assert_eq!(Stats::get(&stats.auth_failures_unknown_certificate), 1);
        assert_eq!(Stats::get(&stats.auth_failures_missing), 1);
        assert_eq!(Stats::get(&stats.auth_denied), 1);
        assert_eq!(Stats::get(&stats.auth_accepted), 2);
    }

    #[tokio::test]
    async fn without_credential_sources_everyone_is_named_by_address_with_full_rights() {
        let auth = Authenticator::new(&AuthConfig::default(), Arc::new(Stats::default())).unwrap();
        let names = [
            (peer("10.0.0.7:1", None), "anonymous:10.0.0.7"),
            (peer("[::1]:1", None), "local:::1"),
            (
                Peer {
                    addr: None,
                    transport: Transport::Unix,
                    certificate: None,
                },
                "local:unix",
            ),
        ];
        for (peer, name) in names {
            let who = auth
                .admit(Some(&peer), Some(b"Bearer junk"), UAR)
                .await
                .unwrap();
            assert_eq!(
                (&*who.name, who.role, who.write_ac),
                (name, Role::Execute, true)
            );
        }
    }
}
