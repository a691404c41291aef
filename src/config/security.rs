//! Resolving the listener's TLS (`[server] tls_*`), `[auth]` and `[limits]`,
//! and the rule for who may be served beyond loopback.

use std::path::PathBuf;
use std::time::Duration;

use super::defaults;
use super::file::{AuthSection, ClientCertRule, LimitsSection, ServerSection};

/// TLS on the gRPC listener (and the metrics listener).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServerTls {
    /// PEM certificate chain.
    pub cert: PathBuf,
    /// PEM private key.
    pub key: PathBuf,
    /// PEM CA certificates; when set, clients must present a certificate.
    pub client_ca: Option<PathBuf>,
}

impl ServerTls {
    /// `tls_cert` and `tls_key` together, or neither; `client_ca` needs both.
    pub fn resolve(server: &ServerSection) -> anyhow::Result<Option<Self>> {
        match (&server.tls_cert, &server.tls_key) {
            (Some(cert), Some(key)) => Ok(Some(ServerTls {
                cert: cert.clone(),
                key: key.clone(),
                client_ca: server.client_ca.clone(),
            })),
            (None, None) if server.client_ca.is_some() => {
                anyhow::bail!("[server] client_ca needs tls_cert and tls_key")
            }
            (None, None) => Ok(None),
            _ => anyhow::bail!("[server] tls_cert and tls_key go together"),
        }
    }
}

/// Who may call what (see `crate::auth`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct AuthConfig {
    /// Bearer tokens file (SHA-256 hashes).
    pub tokens_file: Option<PathBuf>,
    /// htpasswd file (bcrypt).
    pub htpasswd_file: Option<PathBuf>,
    /// Role and `write-ac` of htpasswd users.
    pub htpasswd_roles: crate::auth::htpasswd::HtpasswdRoles,
    /// Client certificate rules (mutual TLS).
    pub client_certificates: Vec<ClientCertRule>,
    /// Loopback and unix-socket clients need credentials too.
    pub require_on_loopback: bool,
}

impl AuthConfig {
    /// Checks the section against the listener's TLS settings.
    pub fn resolve(section: AuthSection, tls: Option<&ServerTls>) -> anyhow::Result<Self> {
        if !section.client_certificates.is_empty()
            && tls.and_then(|t| t.client_ca.as_ref()).is_none()
        {
            anyhow::bail!("[[auth.client_certificates]] need [server] client_ca (mutual TLS)");
        }
        for rule in &section.client_certificates {
            if rule.common_name.is_some() == rule.subject_alt_name.is_some() {
                anyhow::bail!(
                    "[[auth.client_certificates]] {:?}: set exactly one of common_name and subject_alt_name",
                    rule.name
                );
            }
            if !crate::auth::tokens::valid_name(&rule.name) {
                anyhow::bail!(
                    "[[auth.client_certificates]] name {:?}: use 1 to 64 letters, digits, '.', '_', '-'",
                    rule.name
                );
            }
            if rule.write_ac && rule.role < crate::auth::Role::Write {
                anyhow::bail!(
                    "[[auth.client_certificates]] {:?}: write_ac needs role write or execute",
                    rule.name
                );
            }
        }
        let htpasswd_role = section.htpasswd_role.unwrap_or(crate::auth::Role::Read);
        if !section.htpasswd_write_ac.is_empty() && htpasswd_role < crate::auth::Role::Write {
            anyhow::bail!("[auth] htpasswd_write_ac needs htpasswd_role write or execute");
        }
        Ok(AuthConfig {
            tokens_file: section.tokens_file,
            htpasswd_file: section.htpasswd_file,
            htpasswd_roles: crate::auth::htpasswd::HtpasswdRoles {
                role: htpasswd_role,
                write_ac: section.htpasswd_write_ac,
            },
            client_certificates: section.client_certificates,
            require_on_loopback: section
                .require_on_loopback
                .unwrap_or(defaults::REQUIRE_AUTH_ON_LOOPBACK),
        })
    }

    /// True when at least one source of credentials is configured.
    pub fn has_credentials(&self) -> bool {
        self.tokens_file.is_some()
            || self.htpasswd_file.is_some()
            || !self.client_certificates.is_empty()
    }
}

/// Per-client bounds.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LimitsConfig {
    /// Calls one client may have open at once.
    pub max_calls_per_client: usize,
    /// How long a call over the limit waits.
    pub queue_timeout: Duration,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        LimitsConfig {
            max_calls_per_client: defaults::MAX_CALLS_PER_CLIENT,
            queue_timeout: defaults::LIMIT_QUEUE_TIMEOUT,
        }
    }
}

impl LimitsConfig {
    /// Defaults for what the section leaves out.
    pub fn resolve(section: LimitsSection) -> anyhow::Result<Self> {
        let max = section
            .max_calls_per_client
            .unwrap_or(defaults::MAX_CALLS_PER_CLIENT);
        if max == 0 {
            anyhow::bail!("[limits] max_calls_per_client must be at least 1");
        }
        Ok(LimitsConfig {
            max_calls_per_client: max,
            queue_timeout: section
                .queue_timeout
                .map_or(defaults::LIMIT_QUEUE_TIMEOUT, |d| d.0),
        })
    }
}

/// Whether a listener on a non-loopback address may start: with TLS and at
/// least one credential source, or when the operator explicitly allowed it.
pub fn remote_listen_allowed(
    allow_remote: bool,
    tls: Option<&ServerTls>,
    auth: &AuthConfig,
) -> bool {
    allow_remote || (tls.is_some() && auth.has_credentials())
}
