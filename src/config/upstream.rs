//! The resolved `[upstream]` settings: where the remote REAPI cluster is and
//! how to talk to it (TLS, headers, timeouts, instance-name mapping).

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use super::defaults;
use super::file::{HeaderSpec, UpstreamSection};

/// Looks up an environment variable. Resolution takes it as an argument so
/// tests can supply values without mutating the process environment.
pub type EnvLookup<'a> = &'a dyn Fn(&str) -> Option<String>;

/// The process environment, for [`EnvLookup`].
pub fn process_env(name: &str) -> Option<String> {
    std::env::var(name).ok()
}

/// When a client's write is acknowledged: the `write_mode` key.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum WriteMode {
    /// Once it is verified and stored locally; a durable queue uploads it
    /// in the background (`store/write_back/`).
    #[default]
    Back,
    /// Once the upstream holds it too (a tee, `store/write_through.rs`).
    Through,
}

/// Whether blobs cross the WAN compressed: the `compression` key.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum UpstreamCompression {
    /// zstd when the upstream advertises it (ByteStream and batches), for
    /// blobs of at least `compression_min_bytes`.
    #[default]
    Auto,
    /// Always plain.
    Off,
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
    /// `http[s]://host:port` of the Remote Asset service (default: `uri`).
    pub asset_uri: String,
    /// `http[s]://host:port` of the Remote Logstream service (default: `uri`).
    pub logstream_uri: String,
    /// When writes are acknowledged.
    pub write_mode: WriteMode,
    /// Most bytes the upload queue holds; `None`: a share of the quota
    /// ([`defaults::WRITE_BACK_QUOTA_SHARE`]).
    pub write_back_max_bytes: Option<u64>,
    /// Bound on uploading the queue at a graceful stop.
    pub write_back_drain_timeout: Duration,
    /// Whether blobs cross the WAN compressed.
    pub compression: UpstreamCompression,
    /// Smallest blob sent or fetched compressed.
    pub compression_min_bytes: u64,
}

impl UpstreamConfig {
    /// Resolves the section; `endpoint_flag` (from `--upstream`) wins.
    /// `Ok(None)` when no upstream is configured. Header values named by
    /// `env` are read from the process environment.
    pub fn resolve(
        section: UpstreamSection,
        endpoint_flag: Option<String>,
    ) -> anyhow::Result<Option<Self>> {
        Self::resolve_with_env(section, endpoint_flag, &process_env)
    }

    /// [`UpstreamConfig::resolve`], reading header values through `env`.
    pub fn resolve_with_env(
        section: UpstreamSection,
        endpoint_flag: Option<String>,
        env: EnvLookup,
    ) -> anyhow::Result<Option<Self>> {
        let Some(endpoint) = endpoint_flag.or(section.endpoint) else {
            return Ok(None);
        };
        let (tls, rest) = split_endpoint(&endpoint)?;
        let uri = format!("{}://{rest}", if tls { "https" } else { "http" });
        let other_endpoint = |key: &str, value: Option<String>| -> anyhow::Result<String> {
            let Some(value) = value else {
                return Ok(uri.clone());
            };
            let (other_tls, rest) = split_endpoint(&value)?;
            if other_tls != tls {
                anyhow::bail!(
                    "[upstream] {key} must use the same scheme (grpc:// or grpcs://) as endpoint"
                );
            }
            Ok(format!("{}://{rest}", if tls { "https" } else { "http" }))
        };
        let asset_uri = other_endpoint("asset_endpoint", section.asset_endpoint.clone())?;
        let logstream_uri =
            other_endpoint("logstream_endpoint", section.logstream_endpoint.clone())?;
        let client_identity = match (section.client_cert, section.client_key) {
            (Some(cert), Some(key)) => Some((cert, key)),
            (None, None) => None,
            _ => anyhow::bail!("[upstream] client_cert and client_key must be set together"),
        };
        if !tls && (client_identity.is_some() || section.ca_file.is_some()) {
            anyhow::bail!("[upstream] ca_file / client_cert need a grpcs:// endpoint");
        }
        let headers = section
            .headers
            .iter()
            .map(|spec| header(spec, env))
            .collect::<anyhow::Result<_>>()?;
        let max_concurrent_calls = section
            .max_concurrent_calls
            .unwrap_or(defaults::MAX_CONCURRENT_CALLS);
        if max_concurrent_calls == 0 {
            anyhow::bail!("[upstream] max_concurrent_calls must be at least 1");
        }
        Ok(Some(UpstreamConfig {
            uri,
            asset_uri,
            logstream_uri,
            tls,
            ca_file: section.ca_file,
            client_identity,
            instance_names: section.instance_names,
            headers,
            forward_client_headers: section
                .forward_client_headers
                .unwrap_or(defaults::FORWARD_CLIENT_HEADERS),
            connect_timeout: section
                .connect_timeout
                .map_or(defaults::CONNECT_TIMEOUT, |d| d.0),
            rpc_timeout: section.rpc_timeout.map_or(defaults::RPC_TIMEOUT, |d| d.0),
            max_concurrent_calls,
            existence_ttl: section
                .existence_ttl
                .map_or(defaults::EXISTENCE_TTL, |d| d.0),
            max_attempts: section
                .max_attempts
                .unwrap_or(defaults::MAX_ATTEMPTS)
                .max(1),
            write_mode: section.write_mode.unwrap_or_default(),
            write_back_max_bytes: section.write_back_max_bytes.map(|b| b.0),
            write_back_drain_timeout: section
                .write_back_drain_timeout
                .map_or(defaults::WRITE_BACK_DRAIN_TIMEOUT, |d| d.0),
            compression: section.compression.unwrap_or_default(),
            compression_min_bytes: section
                .compression_min_bytes
                .map_or(defaults::COMPRESSION_MIN_BYTES, |b| b.0),
        }))
    }

    /// The same settings aimed at another endpoint of the cluster (the asset
    /// or logstream service): same TLS, headers, timeouts and mapping.
    pub fn with_endpoint(&self, uri: &str) -> Self {
        UpstreamConfig {
            uri: uri.to_string(),
            ..self.clone()
        }
    }

    /// The upload queue's byte cap for a store of `quota` bytes.
    pub fn write_back_cap(&self, quota: u64) -> u64 {
        self.write_back_max_bytes
            .unwrap_or((quota as f64 * defaults::WRITE_BACK_QUOTA_SHARE) as u64)
    }

    /// The upstream instance name for a client's instance name.
    pub fn map_instance<'a>(&'a self, client: &'a str) -> &'a str {
        self.instance_names
            .get(client)
            .map(String::as_str)
            .unwrap_or(client)
    }
}

/// `grpc[s]://host:port` (or `http[s]://`) → (TLS?, `host:port`).
fn split_endpoint(endpoint: &str) -> anyhow::Result<(bool, &str)> {
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
    if rest.contains('@') {
        // Not echoed: the part before '@' is a credential.
        anyhow::bail!(
            "the upstream endpoint must not carry credentials (user:password@): \
             send them in [upstream] headers (e.g. authorization, read from an env variable)"
        );
    }
    if rest.is_empty() || rest.contains('/') {
        anyhow::bail!("upstream endpoint {endpoint:?} must be grpc[s]://host:port");
    }
    Ok((tls, rest))
}

/// One configured header as (lower-case name, value).
fn header(spec: &HeaderSpec, env: EnvLookup) -> anyhow::Result<(String, String)> {
    let value = match (&spec.value, &spec.env) {
        (Some(v), None) => v.clone(),
        (None, Some(var)) => env(var).ok_or_else(|| {
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
    Ok((spec.name.to_ascii_lowercase(), value))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoint_forms() {
        let r = |e: &str| UpstreamConfig::resolve(UpstreamSection::default(), Some(e.into()));
        let c = r("grpcs://cache.example.com:443").unwrap().unwrap();
        assert!(c.tls);
        assert_eq!(c.uri, "https://cache.example.com:443");
        assert!(!r("grpc://127.0.0.1:9000").unwrap().unwrap().tls);
        assert!(r("ftp://x:1").is_err());
        assert!(r("grpc://x:1/path").is_err());
        // Credentials belong in headers; the error never echoes them.
        let userinfo = r("grpcs://user:hunter2@cache.example.com:443").unwrap_err();
        assert!(!format!("{userinfo:#}").contains("hunter2"), "{userinfo:#}");
        assert_eq!(c.asset_uri, c.uri);
        assert_eq!(c.logstream_uri, c.uri);
        let section: UpstreamSection =
            toml::from_str("endpoint = \"grpc://h:1\"\nasset_endpoint = \"grpc://assets:2\"")
                .unwrap();
        let c = UpstreamConfig::resolve(section, None).unwrap().unwrap();
        assert_eq!(c.asset_uri, "http://assets:2");
        assert_eq!(c.with_endpoint(&c.asset_uri).uri, "http://assets:2");
        let mixed: UpstreamSection =
            toml::from_str("endpoint = \"grpc://h:1\"\nlogstream_endpoint = \"grpcs://logs:2\"")
                .unwrap();
        assert!(UpstreamConfig::resolve(mixed, None).is_err());
        assert!(
            UpstreamConfig::resolve(UpstreamSection::default(), None)
                .unwrap()
                .is_none()
        );
    }

    #[test]
    fn headers_from_env_and_instance_mapping() {
        let env = |name: &str| (name == "OUTPOST_TEST_TOKEN_X").then(|| "secret".to_string());
        let section: UpstreamSection = toml::from_str(
            r#"
            endpoint = "grpc://h:1"
            headers = [{ name = "Authorization", env = "OUTPOST_TEST_TOKEN_X" }]
            instance_names = { "" = "main", "ci" = "ci/linux" }
            "#,
        )
        .unwrap();
        let c = UpstreamConfig::resolve_with_env(section, None, &env)
            .unwrap()
            .unwrap();
        assert_eq!(c.headers, vec![("authorization".into(), "secret".into())]);
        assert_eq!(c.map_instance(""), "main");
        assert_eq!(c.map_instance("other"), "other");
        let missing: UpstreamSection = toml::from_str(
            "endpoint = \"grpc://h:1\"\nheaders = [{ name = \"a\", env = \"OUTPOST_TEST_UNSET_Y\" }]",
        )
        .unwrap();
        assert!(UpstreamConfig::resolve_with_env(missing, None, &env).is_err());
    }
}
