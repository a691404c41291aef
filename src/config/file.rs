//! The TOML file as the user writes it: every section, every key optional,
//! unknown keys refused. Turning it into settings is the job of `mod.rs`,
//! `upstream.rs`, `prefetch.rs` and `asset.rs`.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use super::units::{ByteSize, HumanDuration};

/// The whole file. Every field is optional.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    /// `[server]`: how clients reach Outpost.
    #[serde(default)]
    pub server: ServerSection,
    /// `[store]`: the local store.
    #[serde(default)]
    pub store: StoreSection,
    /// `[upstream]`: the remote REAPI cluster to proxy (none: standalone cache).
    #[serde(default)]
    pub upstream: UpstreamSection,
    /// `[metrics]`: the Prometheus endpoint.
    #[serde(default)]
    pub metrics: MetricsSection,
    /// `[prefetch]`: pulling finished actions' outputs ahead of the client.
    #[serde(default)]
    pub prefetch: PrefetchSection,
    /// `[asset]`: Remote Asset downloads from origin URLs.
    #[serde(default)]
    pub asset: AssetSection,
    /// `[auth]`: who may call what on Outpost's own listener.
    #[serde(default)]
    pub auth: AuthSection,
    /// `[limits]`: per-client bounds, so one runaway client cannot starve the rest.
    #[serde(default)]
    pub limits: LimitsSection,
}

impl FileConfig {
    /// Reads and parses a TOML file.
    pub fn load(path: &Path) -> anyhow::Result<Self> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| anyhow::anyhow!("cannot read config file {}: {e}", path.display()))?;
        toml::from_str(&text).map_err(|e| {
            // toml's Display is a multi-line snippet; an operator wants one
            // line: where, and what is wrong.
            let at = e.span().map_or(String::new(), |span| {
                let before = &text[..span.start.min(text.len())];
                let line = before.matches('\n').count() + 1;
                let column = before.len() - before.rfind('\n').map_or(0, |i| i + 1) + 1;
                format!(", line {line} column {column}")
            });
            anyhow::anyhow!(
                "invalid config file {}{at}: {}",
                path.display(),
                e.message().trim_end()
            )
        })
    }
}

/// `[server]` keys.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerSection {
    /// TCP address to listen on.
    pub listen: Option<SocketAddr>,
    /// Permit a non-loopback `listen` address without TLS and credentials.
    pub allow_remote: Option<bool>,
    /// PEM certificate chain of the gRPC listener: it speaks TLS (`grpcs://`).
    pub tls_cert: Option<PathBuf>,
    /// PEM private key of `tls_cert`.
    pub tls_key: Option<PathBuf>,
    /// PEM CA certificates: mutual TLS, clients must present a certificate
    /// signed by one of them.
    pub client_ca: Option<PathBuf>,
    /// Unix socket path; `""` disables it.
    pub unix_socket: Option<String>,
    /// Largest total of a Batch* request, advertised in Capabilities.
    pub max_batch_total_size_bytes: Option<ByteSize>,
}

/// `[store]` keys.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StoreSection {
    /// Where the store lives.
    pub data_dir: Option<PathBuf>,
    /// Byte budget of the store.
    pub quota: Option<ByteSize>,
    /// Blobs up to this size live inside RocksDB; larger ones are files.
    pub inline_limit: Option<ByteSize>,
    /// fsync every commit.
    pub fsync: Option<bool>,
    /// Keep blobs zstd-compressed at rest where that saves at least 10%
    /// (default true).
    pub compression: Option<bool>,
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

/// `[upstream]` keys.
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
    /// Where the Remote Asset API (Fetch, Push) is served, if not at `endpoint`.
    pub asset_endpoint: Option<String>,
    /// Where Remote Logstream (CreateLogStream and log-stream ByteStream
    /// names) is served, if not at `endpoint`.
    pub logstream_endpoint: Option<String>,
    /// `back` (default): a verified write is acknowledged once stored
    /// locally and uploaded from a durable queue; `through`: once the
    /// upstream has it too.
    pub write_mode: Option<super::upstream::WriteMode>,
    /// Most bytes waiting in the upload queue; beyond it writes go through.
    pub write_back_max_bytes: Option<ByteSize>,
    /// How long a graceful stop keeps uploading the queue before it exits.
    pub write_back_drain_timeout: Option<HumanDuration>,
    /// `auto` (default): blobs cross the WAN zstd-compressed when the
    /// upstream advertises zstd; `off`: always plain.
    pub compression: Option<super::upstream::UpstreamCompression>,
    /// Blobs smaller than this cross the WAN plain even with compression on.
    pub compression_min_bytes: Option<ByteSize>,
}

/// `[prefetch]` keys.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PrefetchSection {
    /// Prefetch the outputs of finished actions (with an upstream).
    pub enabled: Option<bool>,
    /// Blobs larger than this are left for the client to pull.
    pub max_blob_size: Option<ByteSize>,
    /// Bytes being prefetched at once, across all actions.
    pub max_bytes_in_flight: Option<ByteSize>,
    /// Blob fetches at once per action.
    pub parallel_fetches: Option<usize>,
    /// Finished actions waiting for prefetch; more are dropped (and counted).
    pub queue_depth: Option<usize>,
    /// `adaptive`, `always` or `off`: what to prefetch (see `prefetch.rs`).
    pub mode: Option<super::prefetch::PrefetchMode>,
    /// Adaptive: outputs up to this size are prefetched while an invocation
    /// has not shown yet whether it reads outputs.
    pub small_output_size: Option<ByteSize>,
    /// Adaptive: finished actions an invocation is watched for before its
    /// read ratio decides (a client read decides sooner).
    pub learning_actions: Option<u64>,
    /// Adaptive: the share of offered outputs (0 to 1) an invocation must
    /// read to keep full prefetch.
    pub read_ratio: Option<f64>,
}

/// `[asset]` keys.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AssetSection {
    /// Download a Fetch miss from its http(s) URI (default: only while
    /// listening on loopback alone).
    pub origin_fetch: Option<bool>,
    /// Bound on one origin download when the request gives no `timeout`.
    pub origin_timeout: Option<HumanDuration>,
    /// Largest origin download accepted.
    pub max_size: Option<ByteSize>,
    /// Hosts that may be fetched from (empty: any public host).
    #[serde(default)]
    pub allow_hosts: Vec<String>,
    /// Hosts never fetched from (wins over `allow_hosts`).
    #[serde(default)]
    pub deny_hosts: Vec<String>,
    /// Fetch from loopback, private and link-local addresses without listing them.
    pub origin_fetch_private: Option<bool>,
}

/// `[auth]` keys.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuthSection {
    /// Bearer tokens, stored as SHA-256 hashes (`outpost token add`).
    pub tokens_file: Option<PathBuf>,
    /// HTTP basic credentials: an htpasswd file with bcrypt entries.
    pub htpasswd_file: Option<PathBuf>,
    /// The role of every htpasswd user (default `read`).
    pub htpasswd_role: Option<crate::auth::Role>,
    /// htpasswd users who may also write action results.
    #[serde(default)]
    pub htpasswd_write_ac: Vec<String>,
    /// Ask credentials of loopback and unix-socket clients too.
    pub require_on_loopback: Option<bool>,
    /// Client certificates (mutual TLS) mapped to names and roles.
    #[serde(default)]
    pub client_certificates: Vec<ClientCertRule>,
}

/// One `[[auth.client_certificates]]` entry: certificates matching it act as
/// the credential `name`. Exactly one of `common_name` and `subject_alt_name`
/// is set.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct ClientCertRule {
    /// The credential name (logs, metrics, limits).
    pub name: String,
    /// Matches a certificate whose subject CN is exactly this.
    pub common_name: Option<String>,
    /// Matches a certificate with this DNS name, e-mail or URI in its SAN.
    pub subject_alt_name: Option<String>,
    /// `read`, `write` or `execute`.
    pub role: crate::auth::Role,
    /// May also write action results.
    #[serde(default)]
    pub write_ac: bool,
}

/// `[limits]` keys.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LimitsSection {
    /// Calls one client (credential, or address when unauthenticated) may
    /// have open at once; more wait.
    pub max_calls_per_client: Option<usize>,
    /// How long a call over the limit waits before RESOURCE_EXHAUSTED.
    pub queue_timeout: Option<HumanDuration>,
}

/// `[metrics]` keys.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MetricsSection {
    /// HTTP address serving Prometheus text at `/metrics`; off when unset.
    pub listen: Option<SocketAddr>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_keys_are_rejected() {
        assert!(toml::from_str::<FileConfig>("[store]\nquota_typo = 1\n").is_err());
        assert!(toml::from_str::<FileConfig>("[upstream]\nendpont = \"grpc://h:1\"\n").is_err());
    }

    #[test]
    fn a_bad_file_is_reported_on_one_line_with_its_place() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("outpost.toml");
        std::fs::write(&path, "[store]\nquota = \"1GiB\"\nquota_typo = 1\n").unwrap();
        let message = FileConfig::load(&path).unwrap_err().to_string();
        assert!(!message.contains('\n'), "{message}");
        assert!(
            message.starts_with(&format!(
                "invalid config file {}, line 3 column 1: unknown field `quota_typo`",
                path.display()
            )),
            "{message}"
        );
    }
}
