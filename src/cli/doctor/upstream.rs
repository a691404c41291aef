//! The upstream, step by step, so the first broken step is the one named:
//! DNS, TCP connect, TLS (through the same channel setup `serve` uses),
//! GetCapabilities (judged in [`super::capabilities`]); then the probes in
//! [`super::probe`].

use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bazel_remote_apis::build::bazel::remote::execution::v2::{
    GetCapabilitiesRequest, ServerCapabilities, capabilities_client::CapabilitiesClient,
};
use tonic::Code;
use tonic::transport::Channel;

use crate::config::UpstreamConfig;
use crate::context::{Priority, RequestContext};
use crate::stats::Stats;
use crate::upstream::Upstream;
use crate::upstream::channels::Channels;

use super::{Check, STEP_TIMEOUT, Section, capabilities, probe, status_text};

/// The upstream's capabilities, or why they could not be had.
pub type Capabilities = Result<ServerCapabilities, String>;

/// One connection to the upstream for the checks: the channel `serve` would
/// build (TLS, windows, timeouts) and the configured headers and instance.
pub struct Link {
    /// Builds requests with the configured headers (its own channels never
    /// connect: every call goes through `channel`).
    upstream: Upstream,
    /// The client channel, as `serve` sets it up.
    pub channel: Channel,
    /// No client headers: doctor speaks for itself.
    ctx: RequestContext,
    /// The upstream instance name a client without one maps to.
    pub instance: String,
}

impl Link {
    /// Sets up the channel for `config` (nothing connects yet).
    pub fn new(config: &UpstreamConfig) -> anyhow::Result<Self> {
        let channel = Channels::new(config)?.for_priority(Priority::Client);
        let ctx = RequestContext::for_instance("");
        let upstream = Upstream::new(config.clone(), Arc::new(Stats::default()))?;
        let instance = upstream.instance(&ctx);
        Ok(Link {
            upstream,
            channel,
            ctx,
            instance,
        })
    }

    /// `message` with the configured headers (values marked sensitive).
    pub fn request<T>(&self, message: T) -> tonic::Request<T> {
        self.upstream.request(&self.ctx, message)
    }

    /// One GetCapabilities call.
    async fn capabilities(&self) -> Result<ServerCapabilities, tonic::Status> {
        let request = self.request(GetCapabilitiesRequest {
            instance_name: self.instance.clone(),
        });
        let mut client = CapabilitiesClient::new(self.channel.clone());
        match tokio::time::timeout(STEP_TIMEOUT, client.get_capabilities(request)).await {
            Ok(result) => result.map(tonic::Response::into_inner),
            Err(_) => Err(tonic::Status::deadline_exceeded(format!(
                "no answer within {}s",
                STEP_TIMEOUT.as_secs()
            ))),
        }
    }
}

/// The capabilities alone (for `--bazelrc`), within a few seconds.
pub async fn fetch_capabilities(config: &UpstreamConfig) -> Capabilities {
    let link = Link::new(config).map_err(|e| format!("{e:#}"))?;
    link.capabilities().await.map_err(|s| status_text(&s))
}

/// Every upstream check, and the capabilities for the client section.
pub async fn check(config: &UpstreamConfig, no_write: bool) -> (Section, Capabilities) {
    let mut section = Section::new(format!("upstream {}", shown_endpoint(config)));
    section.push(endpoint(config));
    let unreachable = |section: &mut Section, from: &[&'static str]| {
        for name in from {
            section.push(Check::skip(name, "the upstream is not reachable"));
        }
    };
    const AFTER_CONNECT: &[&str] = &["tls", "capabilities", "rtt", "throughput", "clock"];
    let (host, port) = match host_port(&config.uri) {
        Ok(hp) => hp,
        Err(e) => {
            section.push(Check::fail("dns", e, "fix [upstream] endpoint"));
            return (section, Err("invalid endpoint".into()));
        }
    };
    let addrs = match resolve(&host, port).await {
        Ok((addrs, check)) => {
            section.push(check);
            addrs
        }
        Err(check) => {
            section.push(check);
            section.push(Check::skip("connect", "the name does not resolve"));
            unreachable(&mut section, AFTER_CONNECT);
            return (section, Err("the upstream's name does not resolve".into()));
        }
    };
    let connect = connect(&addrs).await;
    let connected = connect.verdict == super::Verdict::Ok;
    section.push(connect);
    if !connected {
        unreachable(&mut section, AFTER_CONNECT);
        return (section, Err("the upstream is not reachable".into()));
    }
    let link = match Link::new(config) {
        Ok(link) => link,
        Err(e) => {
            section.push(Check::fail(
                "tls",
                format!("{e:#}"),
                "fix [upstream] ca_file / client_cert / client_key",
            ));
            unreachable(&mut section, &AFTER_CONNECT[1..]);
            return (section, Err(format!("{e:#}")));
        }
    };
    let started = Instant::now();
    let caps = match link.capabilities().await {
        Ok(caps) => {
            section.push(tls_ok(config, started.elapsed()));
            caps
        }
        Err(status) => {
            let text = status_text(&status);
            if config.tls && looks_like_tls(&text) {
                section.push(Check::fail(
                    "tls",
                    format!("the handshake failed: {text}"),
                    "set [upstream] ca_file to the CA that signed the upstream's certificate, \
                     or check the endpoint's host name against the certificate",
                ));
                unreachable(&mut section, &AFTER_CONNECT[1..]);
            } else {
                section.push(if config.tls {
                    Check::skip("tls", "the call failed after the connection was set up")
                } else {
                    Check::skip("tls", "grpc:// (plaintext)")
                });
                section.push(capabilities_failed(&status, &text));
                for name in &AFTER_CONNECT[2..] {
                    section.push(Check::skip(name, "GetCapabilities failed"));
                }
            }
            return (section, Err(text));
        }
    };
    for check in capabilities::judge(&caps, config) {
        section.push(check);
    }
    let (rtt, date) = probe::round_trip(&link).await;
    section.push(rtt);
    section.push(if no_write {
        Check::skip("throughput", "--no-write: nothing written to the upstream")
    } else {
        probe::throughput(&link, &caps).await
    });
    section.push(probe::clock(date.as_deref(), std::time::SystemTime::now()));
    (section, Ok(caps))
}

/// `grpcs://host:port` as the operator wrote it.
pub fn shown_endpoint(config: &UpstreamConfig) -> String {
    let rest = config
        .uri
        .split_once("://")
        .map_or(config.uri.as_str(), |(_, rest)| rest);
    format!("{}://{rest}", if config.tls { "grpcs" } else { "grpc" })
}

/// What is configured: TLS trust, client certificate, header names (never
/// values), instance mapping.
fn endpoint(config: &UpstreamConfig) -> Check {
    let mut parts = Vec::new();
    if config.tls {
        parts.push(match &config.ca_file {
            Some(path) => format!("TLS trusting {}", path.display()),
            None => "TLS trusting the system's roots".to_string(),
        });
        if let Some((cert, _)) = &config.client_identity {
            parts.push(format!("client certificate {}", cert.display()));
        }
    } else {
        parts.push("plaintext".to_string());
    }
    if !config.headers.is_empty() {
        let names: Vec<&str> = config.headers.iter().map(|(n, _)| n.as_str()).collect();
        parts.push(format!("headers {} (values not shown)", names.join(", ")));
    }
    let mapped = config.map_instance("");
    if !mapped.is_empty() {
        parts.push(format!("instance \"\" sent as {mapped:?}"));
    }
    Check::ok("endpoint", parts.join(", "))
}

/// `http[s]://host:port` → host (brackets of an IPv6 address removed) and port.
fn host_port(uri: &str) -> Result<(String, u16), String> {
    let parsed: tonic::codegen::http::Uri = uri
        .parse()
        .map_err(|e| format!("invalid endpoint {uri}: {e}"))?;
    let host = parsed
        .host()
        .ok_or_else(|| format!("no host in {uri}"))?
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_string();
    let port = parsed
        .port_u16()
        .unwrap_or(if parsed.scheme_str() == Some("https") {
            443
        } else {
            80
        });
    Ok((host, port))
}

/// DNS, within [`STEP_TIMEOUT`].
async fn resolve(host: &str, port: u16) -> Result<(Vec<std::net::SocketAddr>, Check), Check> {
    if let Ok(ip) = host.parse::<IpAddr>() {
        return Ok((
            vec![(ip, port).into()],
            Check::ok("dns", format!("{ip} is an address: nothing to resolve")),
        ));
    }
    let started = Instant::now();
    match tokio::time::timeout(STEP_TIMEOUT, tokio::net::lookup_host((host, port))).await {
        Ok(Ok(addrs)) => {
            let addrs: Vec<_> = addrs.collect();
            let shown: Vec<String> = addrs.iter().map(|a| a.ip().to_string()).collect();
            Ok((
                addrs,
                Check::ok(
                    "dns",
                    format!(
                        "{host} is {} ({} ms)",
                        shown.join(", "),
                        started.elapsed().as_millis()
                    ),
                ),
            ))
        }
        Ok(Err(e)) => Err(Check::fail(
            "dns",
            format!("cannot resolve {host}: {e}"),
            "check the host name in [upstream] endpoint and this machine's DNS (/etc/resolv.conf)",
        )),
        Err(_) => Err(Check::fail(
            "dns",
            format!("no answer for {host} within {}s", STEP_TIMEOUT.as_secs()),
            "check this machine's DNS (/etc/resolv.conf)",
        )),
    }
}

/// A TCP connection to the first address that accepts one, timed.
async fn connect(addrs: &[std::net::SocketAddr]) -> Check {
    let started = Instant::now();
    match tokio::time::timeout(STEP_TIMEOUT, tokio::net::TcpStream::connect(addrs)).await {
        Ok(Ok(stream)) => {
            let peer = stream
                .peer_addr()
                .map_or_else(|_| "it".to_string(), |a| a.to_string());
            Check::ok(
                "connect",
                format!("TCP to {peer} in {}", millis(started.elapsed())),
            )
        }
        Ok(Err(e)) if e.kind() == std::io::ErrorKind::ConnectionRefused => Check::fail(
            "connect",
            format!("connection refused by {}", addrs[0]),
            "is the upstream running, and is the port right?",
        ),
        Ok(Err(e)) => Check::fail(
            "connect",
            format!("cannot connect to {}: {e}", addrs[0]),
            "check the route and firewalls between this machine and the upstream",
        ),
        Err(_) => Check::fail(
            "connect",
            format!("no answer within {}s", STEP_TIMEOUT.as_secs()),
            "a firewall drops the packets, or the host is down",
        ),
    }
}

/// The TLS line once a first call succeeded over the channel.
fn tls_ok(config: &UpstreamConfig, first_call: Duration) -> Check {
    if !config.tls {
        return Check::skip("tls", "grpc:// (plaintext)");
    }
    Check::ok(
        "tls",
        format!(
            "handshake ok, certificate trusted (connect, handshake and first call {})",
            millis(first_call)
        ),
    )
}

/// Whether a failed first call failed in the TLS layer.
fn looks_like_tls(text: &str) -> bool {
    let text = text.to_ascii_lowercase();
    ["certificate", "tls", "handshake", "unknownissuer", "alert"]
        .iter()
        .any(|w| text.contains(w))
}

/// The capabilities line for a failed GetCapabilities, with advice by code.
fn capabilities_failed(status: &tonic::Status, text: &str) -> Check {
    let advice = match status.code() {
        Code::Unauthenticated | Code::PermissionDenied => {
            "the upstream refuses these credentials: check [upstream] headers (and the \
             environment variables they read) or client_cert"
        }
        Code::Unimplemented => "is this a REAPI server? check the endpoint's port",
        Code::NotFound | Code::InvalidArgument => {
            "the upstream does not know this instance name: check [upstream] instance_names"
        }
        _ => "check that the endpoint is the upstream's gRPC port",
    };
    Check::fail(
        "capabilities",
        format!("GetCapabilities failed: {text}"),
        advice,
    )
}

/// A measured time in milliseconds, as the status page writes them.
pub fn millis(d: Duration) -> String {
    crate::cli::human_millis(d.as_secs_f64() * 1000.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> UpstreamConfig {
        UpstreamConfig::resolve(
            Default::default(),
            Some("grpcs://cache.example.com:443".into()),
        )
        .unwrap()
        .unwrap()
    }

    #[test]
    fn endpoints_split_into_host_and_port_and_header_values_stay_hidden() {
        assert_eq!(
            host_port("https://h.example:443").unwrap(),
            ("h.example".into(), 443)
        );
        assert_eq!(
            host_port("http://[::1]:9000").unwrap(),
            ("::1".into(), 9000)
        );
        let mut c = config();
        c.headers = vec![("authorization".into(), "Bearer s3cret".into())];
        let line = endpoint(&c).finding;
        assert!(
            line.contains("authorization") && !line.contains("s3cret"),
            "{line}"
        );
        assert_eq!(shown_endpoint(&c), "grpcs://cache.example.com:443");
    }

    #[test]
    fn tls_failures_are_recognised() {
        assert!(looks_like_tls(
            "transport error: invalid peer certificate: UnknownIssuer"
        ));
        assert!(!looks_like_tls("transport error: connection reset"));
    }
}
