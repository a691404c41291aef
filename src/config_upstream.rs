//! The `[upstream]` and `[metrics]` sections: where the remote REAPI cluster
//! is and how to talk to it.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

use serde::Deserialize;

/// A duration written as `"500ms"`, `"30s"`, `"5m"` or `"1h"`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HumanDuration(pub Duration);

impl FromStr for HumanDuration {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let s = s.trim();
        let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
        let (number, unit) = s.split_at(split);
        let n: u64 = number
            .parse()
            .map_err(|_| format!("{s:?} is not a duration (examples: 500ms, 30s, 5m)"))?;
        let d = match unit {
            "ms" => Duration::from_millis(n),
            "s" => Duration::from_secs(n),
            "m" => Duration::from_secs(n * 60),
            "h" => Duration::from_secs(n * 3600),
            _ => return Err(format!("{s:?}: a duration needs a unit: ms, s, m or h")),
        };
        Ok(HumanDuration(d))
    }
}

impl<'de> Deserialize<'de> for HumanDuration {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d)?
            .parse()
            .map_err(serde::de::Error::custom)
    }
}

/// One header to add to every upstream call. Exactly one of `value` and
/// `env` is set; `env` names an environment variable holding the value, so
/// secrets need not be written into the file.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct HeaderSpec {
    /// Header name, e.g. `authorization` or `x-buildbuddy-api-key`.
    pub name: String,
    /// Literal value.
    pub value: Option<String>,
    /// Environment variable to read the value from.
    pub env: Option<String>,
}

/// `[upstream]` as written in the file.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpstreamSection {
    /// `grpc://host:port` or `grpcs://host:port`.
    pub endpoint: Option<String>,
    /// PEM file of CA certificates to trust instead of the system roots.
    pub ca_file: Option<PathBuf>,
    /// PEM client certificate for mTLS (with `client_key`).
    pub client_cert: Option<PathBuf>,
    /// PEM private key for mTLS (with `client_cert`).
    pub client_key: Option<PathBuf>,
    /// Client instance name → upstream instance name; unmapped names pass unchanged.
    #[serde(default)]
    pub instance_names: BTreeMap<String, String>,
    /// Headers added to every upstream call (they replace a client's header of the same name).
    #[serde(default)]
    pub headers: Vec<HeaderSpec>,
    /// Forward the client's own headers (credentials, request metadata).
    pub forward_client_headers: Option<bool>,
    /// Connect timeout.
    pub connect_timeout: Option<HumanDuration>,
    /// Deadline of unary upstream calls.
    pub rpc_timeout: Option<HumanDuration>,
    /// Upstream calls in flight at once; more wait their turn.
    pub max_concurrent_calls: Option<usize>,
    /// How long a digest confirmed present upstream is trusted without asking again.
    pub existence_ttl: Option<HumanDuration>,
    /// Attempts per call when the upstream answers UNAVAILABLE.
    pub max_attempts: Option<u32>,
}

/// `[prefetch]` as written in the file.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PrefetchSection {
    /// Prefetch the outputs of finished actions (with an upstream).
    pub enabled: Option<bool>,
    /// Blobs larger than this are left for the client to pull.
    pub max_blob_size: Option<crate::config::ByteSize>,
    /// Bytes being prefetched at once, across all actions.
    pub max_bytes_in_flight: Option<crate::config::ByteSize>,
    /// Blob fetches at once per action.
    pub parallel_fetches: Option<usize>,
    /// Finished actions waiting for prefetch; more are dropped (and counted).
    pub queue_depth: Option<usize>,
}

/// The resolved prefetch settings.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PrefetchConfig {
    /// Prefetch at all.
    pub enabled: bool,
    /// Size limit per blob.
    pub max_blob_size: u64,
    /// Bytes in flight across all prefetches.
    pub max_bytes_in_flight: u64,
    /// Fetches at once per action.
    pub parallel_fetches: usize,
    /// Queue length in actions.
    pub queue_depth: usize,
}

impl PrefetchConfig {
    /// Applies defaults: on, 1 GiB per blob, 256 MiB in flight, 16 fetches, 1,000 actions.
    pub fn resolve(section: PrefetchSection) -> Self {
        PrefetchConfig {
            enabled: section.enabled.unwrap_or(true),
            max_blob_size: section.max_blob_size.map_or(1 << 30, |b| b.0),
            max_bytes_in_flight: section
                .max_bytes_in_flight
                .map_or(256 << 20, |b| b.0.max(1)),
            parallel_fetches: section.parallel_fetches.unwrap_or(16).max(1),
            queue_depth: section.queue_depth.unwrap_or(1000).max(1),
        }
    }
}

/// `[metrics]` as written in the file.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MetricsSection {
    /// HTTP address serving Prometheus text at `/metrics`; off when unset.
    pub listen: Option<SocketAddr>,
}

/// The resolved upstream settings.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UpstreamConfig {
    /// `http://host:port` or `https://host:port` (normalised from grpc/grpcs).
    pub uri: String,
    /// Whether the connection uses TLS.
    pub tls: bool,
    /// CA certificates to trust instead of the system roots.
    pub ca_file: Option<PathBuf>,
    /// Client certificate and key for mTLS.
    pub client_identity: Option<(PathBuf, PathBuf)>,
    /// Instance-name mapping.
    pub instance_names: BTreeMap<String, String>,
    /// Headers to add: (name, value), values already read from the environment.
    pub headers: Vec<(String, String)>,
    /// Forward the client's headers.
    pub forward_client_headers: bool,
    /// Connect timeout.
    pub connect_timeout: Duration,
    /// Unary call deadline.
    pub rpc_timeout: Duration,
    /// Concurrency limit.
    pub max_concurrent_calls: usize,
    /// Existence-cache TTL.
    pub existence_ttl: Duration,
    /// Attempts on UNAVAILABLE.
    pub max_attempts: u32,
}

impl UpstreamConfig {
    /// Resolves the section; `endpoint_flag` (from `--upstream`) wins.
    /// `Ok(None)` when no upstream is configured.
    pub fn resolve(
        section: UpstreamSection,
        endpoint_flag: Option<String>,
    ) -> anyhow::Result<Option<Self>> {
        let Some(endpoint) = endpoint_flag.or(section.endpoint) else {
            return Ok(None);
        };
        let (tls, rest) = if let Some(rest) = endpoint.strip_prefix("grpcs://") {
            (true, rest)
        } else if let Some(rest) = endpoint.strip_prefix("https://") {
            (true, rest)
        } else if let Some(rest) = endpoint.strip_prefix("grpc://") {
            (false, rest)
        } else if let Some(rest) = endpoint.strip_prefix("http://") {
            (false, rest)
        } else {
            anyhow::bail!("upstream endpoint {endpoint:?} must start with grpc:// or grpcs://");
        };
        if rest.is_empty() || rest.contains('/') {
            anyhow::bail!("upstream endpoint {endpoint:?} must be grpc[s]://host:port");
        }
        let client_identity = match (section.client_cert, section.client_key) {
            (Some(cert), Some(key)) => Some((cert, key)),
            (None, None) => None,
            _ => anyhow::bail!("[upstream] client_cert and client_key must be set together"),
        };
        if !tls && (client_identity.is_some() || section.ca_file.is_some()) {
            anyhow::bail!("[upstream] ca_file / client_cert need a grpcs:// endpoint");
        }
        let mut headers = Vec::new();
        for spec in section.headers {
            let value = match (&spec.value, &spec.env) {
                (Some(v), None) => v.clone(),
                (None, Some(var)) => std::env::var(var).map_err(|_| {
                    anyhow::anyhow!(
                        "[upstream] header {:?} reads environment variable {var}, which is not set",
                        spec.name
                    )
                })?,
                _ => anyhow::bail!(
                    "[upstream] header {:?} needs exactly one of `value` and `env`",
                    spec.name
                ),
            };
            headers.push((spec.name.to_ascii_lowercase(), value));
        }
        let max_concurrent_calls = section.max_concurrent_calls.unwrap_or(64);
        if max_concurrent_calls == 0 {
            anyhow::bail!("[upstream] max_concurrent_calls must be at least 1");
        }
        Ok(Some(UpstreamConfig {
            uri: format!("{}://{rest}", if tls { "https" } else { "http" }),
            tls,
            ca_file: section.ca_file,
            client_identity,
            instance_names: section.instance_names,
            headers,
            forward_client_headers: section.forward_client_headers.unwrap_or(true),
            connect_timeout: section
                .connect_timeout
                .map_or(Duration::from_secs(5), |d| d.0),
            rpc_timeout: section.rpc_timeout.map_or(Duration::from_secs(60), |d| d.0),
            max_concurrent_calls,
            existence_ttl: section
                .existence_ttl
                .map_or(Duration::from_secs(300), |d| d.0),
            max_attempts: section.max_attempts.unwrap_or(4).max(1),
        }))
    }

    /// The upstream instance name for a client's instance name.
    pub fn map_instance<'a>(&'a self, client: &'a str) -> &'a str {
        self.instance_names
            .get(client)
            .map(String::as_str)
            .unwrap_or(client)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_parse() {
        assert_eq!(
            "500ms".parse::<HumanDuration>().unwrap().0,
            Duration::from_millis(500)
        );
        assert_eq!(
            "5m".parse::<HumanDuration>().unwrap().0,
            Duration::from_secs(300)
        );
        assert!("5".parse::<HumanDuration>().is_err());
    }

    #[test]
    fn endpoint_forms() {
        let r = |e: &str| UpstreamConfig::resolve(UpstreamSection::default(), Some(e.into()));
        let c = r("grpcs://cache.example.com:443").unwrap().unwrap();
        assert!(c.tls);
        assert_eq!(c.uri, "https://cache.example.com:443");
        assert!(!r("grpc://127.0.0.1:9000").unwrap().unwrap().tls);
        assert!(r("ftp://x:1").is_err());
        assert!(r("grpc://x:1/path").is_err());
        assert!(
            UpstreamConfig::resolve(UpstreamSection::default(), None)
                .unwrap()
                .is_none()
        );
    }

    #[test]
    fn headers_from_env_and_instance_mapping() {
        // SAFETY: test-only variable with a unique name.
        unsafe { std::env::set_var("OUTPOST_TEST_TOKEN_X", "secret") };
        let section: UpstreamSection = toml::from_str(
            r#"
            endpoint = "grpc://h:1"
            headers = [{ name = "Authorization", env = "OUTPOST_TEST_TOKEN_X" }]
            instance_names = { "" = "main", "ci" = "ci/linux" }
            "#,
        )
        .unwrap();
        let c = UpstreamConfig::resolve(section, None).unwrap().unwrap();
        assert_eq!(c.headers, vec![("authorization".into(), "secret".into())]);
        assert_eq!(c.map_instance(""), "main");
        assert_eq!(c.map_instance("other"), "other");
        let missing: UpstreamSection = toml::from_str(
            "endpoint = \"grpc://h:1\"\nheaders = [{ name = \"a\", env = \"OUTPOST_TEST_UNSET_Y\" }]",
        )
        .unwrap();
        assert!(UpstreamConfig::resolve(missing, None).is_err());
    }
}
