//! The listener: who can reach it, TLS and credentials as configured (what
//! `serve` enforces, as verdicts), and whether the address is free, already
//! served by an Outpost, or taken by another program.

use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, SystemTime};

use bazel_remote_apis::build::bazel::remote::execution::v2::{
    GetCapabilitiesRequest, capabilities_client::CapabilitiesClient,
};
use tonic::Code;
use tonic::transport::Channel;

use crate::admin_proto::GetStatsRequest;
use crate::admin_proto::admin_client::AdminClient;
use crate::config::Config;

use super::{Check, STEP_TIMEOUT, Section, status_text};

/// A listener certificate expiring sooner than this is a warning.
const EXPIRY_WARN: Duration = Duration::from_secs(14 * 86400);

/// Checks the gRPC listener, the unix socket and the metrics listener.
pub async fn check(config: &Config) -> Section {
    let mut section = Section::new(format!("listener {}", config.listen));
    section.push(reach(config));
    section.push(tls(config));
    section.push(credentials(config));
    section.push(running(config).await);
    if let Some(path) = &config.unix_socket {
        section.push(unix_socket(path));
    }
    if let Some(addr) = config.metrics_listen {
        section.push(metrics(addr, config.tls.is_some()).await);
    }
    section
}

/// Loopback or reachable from other machines, and on what terms.
fn reach(config: &Config) -> Check {
    let addr = config.listen;
    if addr.ip().is_loopback() {
        return Check::ok("reach", "loopback: only this machine can connect");
    }
    if config.tls.is_some() && config.auth.has_credentials() {
        Check::ok(
            "reach",
            "reachable from other machines, over TLS and with credentials",
        )
    } else {
        Check::warn(
            "reach",
            "reachable from other machines without TLS and credentials (--allow-remote)",
            "anyone who can reach it may read and write the cache: configure [server] tls_cert, \
             tls_key and [auth], or listen on 127.0.0.1",
        )
    }
}

/// The listener's certificate and key load (as `serve` loads them).
fn tls(config: &Config) -> Check {
    let Some(files) = &config.tls else {
        return if config.listen.ip().is_loopback() {
            Check::ok("tls", "off: plaintext on loopback (clients use grpc://)")
        } else {
            Check::warn(
                "tls",
                "off: plaintext on the network",
                "anyone on the way reads the builds' traffic: set [server] tls_cert and tls_key",
            )
        };
    };
    match crate::tls::ReloadingTls::load(files) {
        Ok(tls) => {
            let mode = if tls.mutual() {
                "mutual TLS: clients need a certificate signed by client_ca"
            } else {
                "TLS"
            };
            let what = format!(
                "{mode}, certificate {} (clients use grpcs://)",
                files.cert.display()
            );
            match not_after(&files.cert) {
                Some(end) => expiry(&what, end, SystemTime::now()),
                None => Check::ok("tls", what),
            }
        }
        Err(e) => Check::fail(
            "tls",
            format!("the certificate or key does not load: {e}"),
            "fix [server] tls_cert / tls_key / client_ca (PEM files this user can read)",
        ),
    }
}

/// When the first certificate of the PEM file at `path` expires.
fn not_after(path: &Path) -> Option<SystemTime> {
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject;
    use x509_cert::der::Decode;
    let der = CertificateDer::from_pem_file(path).ok()?;
    let cert = x509_cert::Certificate::from_der(&der).ok()?;
    Some(cert.tbs_certificate.validity.not_after.to_system_time())
}

/// The TLS line for a certificate that expires at `end`: FAIL once expired
/// (clients refuse it), warn within [`EXPIRY_WARN`].
fn expiry(what: &str, end: SystemTime, now: SystemTime) -> Check {
    const DAY: u64 = 86400;
    match end.duration_since(now) {
        Err(past) => Check::fail(
            "tls",
            format!(
                "{what}: expired {} days ago",
                past.duration().as_secs() / DAY
            ),
            "clients refuse it: renew the certificate (serve picks up the new files by itself)",
        ),
        Ok(left) if left < EXPIRY_WARN => Check::warn(
            "tls",
            format!("{what}: expires in {} days", left.as_secs() / DAY),
            "renew it soon (serve picks up the new files by itself)",
        ),
        Ok(left) => Check::ok(
            "tls",
            format!("{what}, valid {} more days", left.as_secs() / DAY),
        ),
    }
}

/// The credential files parse (as `serve` reads them); names, never secrets.
fn credentials(config: &Config) -> Check {
    let auth = &config.auth;
    if !auth.has_credentials() {
        return if config.listen.ip().is_loopback() {
            Check::ok(
                "credentials",
                "none: every local user may read and write the cache",
            )
        } else {
            Check::warn(
                "credentials",
                "none on a listener other machines reach",
                "add [auth] tokens_file (outpost token add) or htpasswd_file",
            )
        };
    }
    if let Err(e) = crate::auth::check::Credentials::load(auth) {
        return Check::fail(
            "credentials",
            format!("{e:#}"),
            "fix the path, or create the file with outpost token add",
        );
    }
    let mut sources = Vec::new();
    if let Some(path) = &auth.tokens_file {
        sources.push(format!("tokens file {}", path.display()));
    }
    if let Some(path) = &auth.htpasswd_file {
        sources.push(format!("htpasswd file {}", path.display()));
    }
    if !auth.client_certificates.is_empty() {
        sources.push(format!(
            "{} client certificate rule(s)",
            auth.client_certificates.len()
        ));
    }
    let loopback = if auth.require_on_loopback {
        "loopback clients need them too"
    } else {
        "loopback and unix-socket clients need none"
    };
    Check::ok(
        "credentials",
        format!("required: {}; {loopback}", sources.join(", ")),
    )
}

/// Whether the address is free, served by an Outpost, or taken.
async fn running(config: &Config) -> Check {
    let addr = config.listen;
    if let Some(path) = &config.unix_socket
        && std::os::unix::net::UnixStream::connect(path).is_ok()
    {
        let target = format!("unix://{}", path.display());
        return identify(&target, &format!("{addr} (asked over {})", path.display())).await;
    }
    if addr.port() == 0 {
        return Check::ok("address", "port 0: the kernel picks a free port at start");
    }
    match tokio::time::timeout(STEP_TIMEOUT, tokio::net::TcpStream::connect(addr)).await {
        Ok(Ok(_)) if config.tls.is_some() => Check::warn(
            "address",
            format!("something already listens on {addr} (TLS: doctor does not log in to it)"),
            "if it is not this Outpost, stop it or choose another --listen",
        ),
        Ok(Ok(_)) => identify(&format!("grpc://{addr}"), &addr.to_string()).await,
        _ => bindable(addr, "address", "--listen"),
    }
}

/// Asks whatever answers at `target` who it is: Outpost (Admin GetStats),
/// another REAPI server, or something that does not speak gRPC.
async fn identify(target: &str, shown: &str) -> Check {
    let channel = match tokio::time::timeout(STEP_TIMEOUT, crate::client::connect(target)).await {
        Ok(Ok(channel)) => channel,
        Ok(Err(e)) => return other_program(shown, &format!("{e:#}")),
        Err(_) => return other_program(shown, "it accepts connections but does not answer"),
    };
    let stats = tokio::time::timeout(
        STEP_TIMEOUT,
        AdminClient::new(channel.clone()).get_stats(GetStatsRequest {}),
    )
    .await;
    match stats {
        Ok(Ok(response)) => {
            let s = response.into_inner();
            Check::ok(
                "address",
                format!(
                    "Outpost {} running on {shown}, up {}: fine, this checks it as it runs",
                    s.version,
                    crate::cli::human_duration(s.uptime_seconds as f64)
                ),
            )
        }
        Ok(Err(status))
            if matches!(
                status.code(),
                Code::Unauthenticated | Code::PermissionDenied
            ) =>
        {
            reapi_server(channel, shown).await
        }
        Ok(Err(status)) if status.code() == Code::Unimplemented => {
            match reapi_server(channel, shown).await {
                check if check.verdict == super::Verdict::Ok => Check::fail(
                    "address",
                    format!("a REAPI server that is not Outpost answers on {shown}"),
                    "stop it or choose another --listen",
                ),
                check => check,
            }
        }
        Ok(Err(status)) => other_program(shown, &status_text(&status)),
        Err(_) => other_program(shown, "it accepts connections but does not answer"),
    }
}

/// After GetStats was refused: a server that answers GetCapabilities is a
/// REAPI server (an Outpost that wants credentials, most likely).
async fn reapi_server(channel: Channel, shown: &str) -> Check {
    let caps = tokio::time::timeout(
        STEP_TIMEOUT,
        CapabilitiesClient::new(channel).get_capabilities(GetCapabilitiesRequest::default()),
    )
    .await;
    match caps {
        Ok(Ok(_)) => Check::ok(
            "address",
            format!("a REAPI server (an Outpost asking for credentials?) is running on {shown}"),
        ),
        Ok(Err(status)) if status.code() == Code::Unauthenticated => Check::ok(
            "address",
            format!("a server asking for credentials (an Outpost?) is running on {shown}"),
        ),
        Ok(Err(status)) => other_program(shown, &status_text(&status)),
        Err(_) => other_program(shown, "it accepts connections but does not answer"),
    }
}

/// FAIL: something that is not Outpost holds the address.
fn other_program(shown: &str, detail: &str) -> Check {
    Check::fail(
        "address",
        format!("another program listens on {shown}, not Outpost ({detail})"),
        "stop it or choose another --listen",
    )
}

/// Whether `addr` can be bound now (then released at once).
fn bindable(addr: SocketAddr, name: &'static str, flag: &str) -> Check {
    match std::net::TcpListener::bind(addr) {
        Ok(_) => Check::ok(name, format!("{addr} is free: serve can bind it")),
        Err(e) => Check::fail(
            name,
            format!("cannot bind {addr}: {e}"),
            format!("choose another {flag} (ports below 1024 need privileges)"),
        ),
    }
}

/// The unix socket: its directory, and a stale socket file `serve` replaces.
fn unix_socket(path: &Path) -> Check {
    if path.exists() {
        return if std::os::unix::net::UnixStream::connect(path).is_ok() {
            Check::ok("unix socket", format!("{} answers", path.display()))
        } else {
            Check::ok(
                "unix socket",
                format!(
                    "{} is a stale socket file: serve replaces it",
                    path.display()
                ),
            )
        };
    }
    let dir = path.parent().unwrap_or(Path::new("/"));
    let what = if dir.is_dir() {
        "created at start"
    } else {
        "created at start, with its directory"
    };
    Check::ok("unix socket", format!("{} ({what})", path.display()))
}

/// The metrics listener: free, an Outpost's metrics, or another program.
/// With `tls` the listener serves HTTPS, which this plain probe cannot
/// read: then something listening is only a warning, as for the gRPC port.
async fn metrics(addr: SocketAddr, tls: bool) -> Check {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let stream = tokio::time::timeout(STEP_TIMEOUT, tokio::net::TcpStream::connect(addr)).await;
    let Ok(Ok(mut stream)) = stream else {
        return bindable(addr, "metrics", "--metrics-listen");
    };
    if tls {
        return Check::warn(
            "metrics",
            format!("something already listens on {addr} (HTTPS: doctor does not log in to it)"),
            "if it is not this Outpost, stop it or choose another --metrics-listen",
        );
    }
    let ask = async {
        stream
            .write_all(b"GET /metrics HTTP/1.0\r\nHost: outpost\r\n\r\n")
            .await?;
        let mut body = Vec::new();
        stream.take(64 << 10).read_to_end(&mut body).await?;
        Ok::<_, std::io::Error>(body)
    };
    match tokio::time::timeout(STEP_TIMEOUT, ask).await {
        Ok(Ok(body)) if String::from_utf8_lossy(&body).contains("outpost_") => {
            Check::ok("metrics", format!("an Outpost serves metrics on {addr}"))
        }
        _ => Check::fail(
            "metrics",
            format!("another program listens on {addr} (no Outpost metrics there)"),
            "stop it or choose another --metrics-listen",
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cli::doctor::Verdict;

    #[test]
    fn certificates_expiring_soon_warn_and_expired_ones_fail() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000);
        let day = Duration::from_secs(86400);
        let check = expiry("TLS", now + 90 * day, now);
        assert_eq!(check, Check::ok("tls", "TLS, valid 90 more days"));
        assert_eq!(expiry("TLS", now + 3 * day, now).verdict, Verdict::Warn);
        let expired = expiry("TLS", now - 2 * day, now);
        assert_eq!(expired.verdict, Verdict::Fail);
        assert_eq!(expired.finding, "TLS: expired 2 days ago");
    }

    #[test]
    fn a_loadable_certificate_shows_its_remaining_validity() {
        let dir = tempfile::tempdir().unwrap();
        let key = rcgen::generate_simple_self_signed(vec!["localhost".into()]).unwrap();
        let (cert, key_path) = (dir.path().join("c.pem"), dir.path().join("k.pem"));
        std::fs::write(&cert, key.cert.pem()).unwrap();
        std::fs::write(&key_path, key.signing_key.serialize_pem()).unwrap();
        let mut config = Config::for_tests(dir.path());
        config.tls = Some(crate::config::ServerTls {
            cert,
            key: key_path,
            client_ca: None,
        });
        let check = tls(&config);
        assert_eq!(check.verdict, Verdict::Ok, "{check:?}");
        assert!(check.finding.contains(" more days"), "{check:?}");
    }

    #[test]
    fn a_remote_listener_without_tls_is_a_warning() {
        let dir = tempfile::tempdir().unwrap();
        let mut config = Config::for_tests(dir.path());
        assert_eq!(reach(&config).verdict, Verdict::Ok);
        assert_eq!(tls(&config).verdict, Verdict::Ok);
        config.listen = "0.0.0.0:8980".parse().unwrap();
        assert_eq!(reach(&config).verdict, Verdict::Warn);
        assert_eq!(tls(&config).verdict, Verdict::Warn);
        assert_eq!(credentials(&config).verdict, Verdict::Warn);
    }

    #[test]
    fn unreadable_tls_files_and_tokens_fail() {
        let dir = tempfile::tempdir().unwrap();
        let mut config = Config::for_tests(dir.path());
        config.tls = Some(crate::config::ServerTls {
            cert: dir.path().join("missing.pem"),
            key: dir.path().join("missing.key"),
            client_ca: None,
        });
        assert_eq!(tls(&config).verdict, Verdict::Fail);
        config.auth.tokens_file = Some(dir.path().join("no-tokens"));
        let check = credentials(&config);
        assert_eq!(check.verdict, Verdict::Fail, "{check:?}");
        std::fs::write(dir.path().join("no-tokens"), "").unwrap();
        let check = credentials(&config);
        assert_eq!(check.verdict, Verdict::Ok, "{check:?}");
        assert!(
            check
                .finding
                .contains("loopback and unix-socket clients need none")
        );
    }

    #[tokio::test]
    async fn a_port_held_by_a_plain_tcp_program_fails() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        // Accepts, reads nothing, answers garbage: not gRPC.
        std::thread::spawn(move || {
            use std::io::Write;
            for mut conn in listener.incoming().flatten().take(4) {
                let _ = conn.write_all(b"SSH-2.0-OpenSSH_9.6\r\n");
            }
        });
        let dir = tempfile::tempdir().unwrap();
        let mut config = Config::for_tests(dir.path());
        config.listen = addr;
        let check = running(&config).await;
        assert_eq!(check.verdict, Verdict::Fail, "{check:?}");
        assert!(
            check.finding.starts_with("another program listens on"),
            "{check:?}"
        );
    }
}
