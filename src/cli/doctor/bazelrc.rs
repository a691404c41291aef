//! The client side: the `.bazelrc` lines for this setup (`--bazelrc`) and
//! the report's client section. Flag names are Bazel 4.2.3's (the version
//! the end-to-end suite runs, `tests/e2e/*.sh`). Credentials appear as
//! placeholders only, never as values.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};

use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject;
use x509_cert::der::Decode;

use crate::config::Config;

use super::upstream::Capabilities;
use super::{Check, Section};

/// Where clients reach this Outpost, and whether a private CA signs it.
struct Endpoint {
    /// `grpc://127.0.0.1:8980` or `grpcs://name:port`.
    url: String,
    /// The listener's certificate when it signs itself (clients must trust
    /// exactly it).
    self_signed: Option<String>,
}

/// The URL clients use: the certificate's first DNS name for TLS (clients
/// check it), this machine's name for an all-interfaces listener.
fn endpoint(config: &Config) -> Endpoint {
    let scheme = if config.tls.is_some() {
        "grpcs"
    } else {
        "grpc"
    };
    let mut self_signed = None;
    let mut host = host_for(config.listen);
    if let Some(tls) = &config.tls
        && let Ok(der) = CertificateDer::from_pem_file(&tls.cert)
    {
        if let Some(name) = crate::tls::certificate::client_certificate(&der)
            .subject_alt_names
            .into_iter()
            .find(|n| !n.contains('@') && !n.contains(':'))
        {
            host = name;
        }
        if let Ok(cert) = x509_cert::Certificate::from_der(&der)
            && cert.tbs_certificate.issuer == cert.tbs_certificate.subject
        {
            self_signed = Some(tls.cert.display().to_string());
        }
    }
    Endpoint {
        url: format!("{scheme}://{host}:{}", config.listen.port()),
        self_signed,
    }
}

/// How a client names the listen address: loopback and specific addresses
/// as they are; for 0.0.0.0 / [::], this machine's host name.
fn host_for(addr: SocketAddr) -> String {
    match addr.ip() {
        ip if ip.is_unspecified() => std::fs::read_to_string("/proc/sys/kernel/hostname")
            .ok()
            .map(|h| h.trim().to_string())
            .filter(|h| !h.is_empty())
            .unwrap_or_else(|| IpAddr::V4(Ipv4Addr::LOCALHOST).to_string()),
        IpAddr::V6(ip) => format!("[{ip}]"),
        ip => ip.to_string(),
    }
}

/// Whether the upstream executes, or why that is unknown.
fn executes(capabilities: Option<&Capabilities>) -> Result<bool, String> {
    match capabilities {
        None => Ok(false),
        Some(Ok(caps)) => Ok(caps
            .execution_capabilities
            .as_ref()
            .is_some_and(|e| e.exec_enabled)),
        Some(Err(e)) => Err(e.clone()),
    }
}

/// The `.bazelrc` lines for this setup (`capabilities`: the upstream's
/// answer, `None` for a standalone cache).
pub fn lines(config: &Config, capabilities: Option<&Capabilities>) -> String {
    let Endpoint { url, self_signed } = endpoint(config);
    let mut out = String::new();
    let mut line = |text: &str| {
        out.push_str(text);
        out.push('\n');
    };
    line(&format!(
        "# .bazelrc for the Outpost at {url} (outpost doctor --bazelrc; Bazel 4.2.3 flag names)"
    ));
    match executes(capabilities) {
        Ok(true) => {
            line("# The upstream executes: Bazel runs actions remotely through Outpost, which");
            line("# also serves as its cache.");
            line(&format!("build --remote_executor={url}"));
        }
        Ok(false) => line(&format!("build --remote_cache={url}")),
        Err(e) => {
            line(&format!("build --remote_cache={url}"));
            line(&format!(
                "# The upstream did not answer ({e}): if it executes, use --remote_executor={url}"
            ));
        }
    }
    if config.upstream.is_some() || config.asset.origin_fetch {
        line("# Downloads (http_archive, http_file) through Outpost's Remote Asset API:");
        line(&format!("build --experimental_remote_downloader={url}"));
    }
    if let Some(upstream) = &config.upstream {
        let mut names: Vec<_> = upstream
            .instance_names
            .iter()
            .filter(|(client, _)| !client.is_empty())
            .map(|(client, theirs)| format!("{client:?} (upstream {theirs:?})"))
            .collect();
        names.sort();
        if !names.is_empty() {
            line(&format!(
                "# Instance names this Outpost maps: {}; to use one:",
                names.join(", ")
            ));
            line("# build --remote_instance_name=<name>");
        }
    }
    if let Some(path) = self_signed {
        line("# The listener's certificate signs itself: Bazel must trust it.");
        line(&format!("build --tls_certificate={path}"));
    } else if config.tls.is_some() {
        line("# If a private CA signed the listener's certificate:");
        line("# build --tls_certificate=/path/to/that-ca.pem");
    }
    if config
        .tls
        .as_ref()
        .is_some_and(|tls| tls.client_ca.is_some())
    {
        line("# Mutual TLS: each client presents a certificate signed by [server] client_ca.");
        line("build --tls_client_certificate=/path/to/client.pem");
        line("build --tls_client_key=/path/to/client.key");
    }
    let auth = &config.auth;
    let loopback_free = config.listen.ip().is_loopback() && !auth.require_on_loopback;
    if auth.tokens_file.is_some() || auth.htpasswd_file.is_some() {
        line(if loopback_free {
            "# Credentials (needed from other machines only: loopback clients need none):"
        } else {
            "# Credentials (put the real line in ~/.bazelrc or a CI secret, not in the repository):"
        });
    }
    if auth.tokens_file.is_some() {
        line("# build --remote_header=authorization=Bearer <token from outpost token add>");
    }
    if auth.htpasswd_file.is_some() {
        line("# build --remote_header=authorization=Basic <base64 of user:password>");
    }
    if let Some(path) = &config.unix_socket {
        line(
            "# On this machine, the unix socket works too (plaintext, no TCP), with a Bazel \
             whose build has unix-socket support (not Debian's 4.2.3; docs/clients/bazel.md):",
        );
        let flag = if executes(capabilities) == Ok(true) {
            "remote_executor"
        } else {
            "remote_cache"
        };
        line(&format!("# build --{flag}=unix://{}", path.display()));
    }
    out
}

/// The client section of the report: the endpoint clients use, pointing
/// at `--bazelrc` for the full lines.
pub fn client_section(config: &Config, capabilities: Option<&Capabilities>) -> Section {
    let mut section = Section::new("client");
    let url = endpoint(config).url;
    let flag = match executes(capabilities) {
        Ok(true) => "--remote_executor",
        _ => "--remote_cache",
    };
    section.push(Check::ok(
        "bazel",
        format!("{flag}={url} (outpost doctor --bazelrc prints the lines for .bazelrc)"),
    ));
    section
}

#[cfg(test)]
mod tests {
    use super::*;
    use bazel_remote_apis::build::bazel::remote::execution::v2::{
        ExecutionCapabilities, ServerCapabilities,
    };

    fn config() -> Config {
        let mut config = Config::for_tests(std::path::Path::new("/d"));
        config.listen = "127.0.0.1:8980".parse().unwrap();
        config
    }

    fn flags(text: &str) -> Vec<&str> {
        text.lines().filter(|l| l.starts_with("build ")).collect()
    }

    #[test]
    fn a_standalone_cache_gets_remote_cache_and_the_downloader() {
        let text = lines(&config(), None);
        assert_eq!(
            flags(&text),
            [
                "build --remote_cache=grpc://127.0.0.1:8980",
                "build --experimental_remote_downloader=grpc://127.0.0.1:8980"
            ]
        );
        assert!(!text.contains("remote_header"));
    }

    #[test]
    fn an_executing_upstream_gets_remote_executor() {
        let mut config = config();
        config.upstream =
            crate::config::UpstreamConfig::resolve(Default::default(), Some("grpc://up:1".into()))
                .unwrap();
        config.unix_socket = Some("/d/outpost.sock".into());
        let caps = Ok(ServerCapabilities {
            execution_capabilities: Some(ExecutionCapabilities {
                exec_enabled: true,
                ..Default::default()
            }),
            ..Default::default()
        });
        let text = lines(&config, Some(&caps));
        assert_eq!(
            flags(&text)[0],
            "build --remote_executor=grpc://127.0.0.1:8980"
        );
        assert!(
            text.contains("\n# build --remote_executor=unix:///d/outpost.sock\n"),
            "{text}"
        );
        let down = lines(&config, Some(&Err("connection refused".into())));
        assert_eq!(
            flags(&down)[0],
            "build --remote_cache=grpc://127.0.0.1:8980"
        );
        assert!(
            down.contains("did not answer (connection refused)"),
            "{down}"
        );
    }

    #[test]
    fn tokens_are_placeholders_and_a_self_signed_listener_is_trusted_by_path() {
        let dir = tempfile::tempdir().unwrap();
        let key =
            rcgen::generate_simple_self_signed(vec!["outpost.office.example.com".into()]).unwrap();
        let cert = dir.path().join("server.pem");
        std::fs::write(&cert, key.cert.pem()).unwrap();
        let mut config = config();
        config.listen = "0.0.0.0:8980".parse().unwrap();
        config.tls = Some(crate::config::ServerTls {
            cert: cert.clone(),
            key: dir.path().join("server.key"),
            client_ca: None,
        });
        config.auth.tokens_file = Some("/etc/outpost/tokens".into());
        let text = lines(&config, None);
        assert_eq!(
            flags(&text),
            [
                "build --remote_cache=grpcs://outpost.office.example.com:8980",
                "build --experimental_remote_downloader=grpcs://outpost.office.example.com:8980",
                &format!("build --tls_certificate={}", cert.display()),
            ]
        );
        assert!(text.contains(
            "\n# build --remote_header=authorization=Bearer <token from outpost token add>\n"
        ));
    }
}
