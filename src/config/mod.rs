//! Configuration: built-in defaults, then the TOML file, then command-line
//! flags. `config.example.toml` documents every key; a test parses it, so the
//! example cannot drift from the code.
//!
//! The children are leaves that never import this file: [`defaults`] (every
//! default value), [`units`] (sizes and durations), [`file`] (the TOML as
//! written), [`upstream`], [`prefetch`], [`asset`] and [`security`] (the
//! listener's TLS, `[auth]`, `[limits]`) resolving those sections. This
//! file assembles them into one [`Config`].

pub mod asset;
pub mod defaults;
pub mod file;
pub mod prefetch;
pub mod security;
pub mod units;
pub mod upstream;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

pub use asset::AssetConfig;
pub use file::{
    AssetSection, AuthSection, ClientCertRule, FileConfig, HeaderSpec, LimitsSection,
    MetricsSection, PrefetchSection, ServerSection, StoreSection, UpstreamSection,
};
pub use prefetch::{PrefetchConfig, PrefetchMode};
pub use security::{AuthConfig, LimitsConfig, ServerTls};
pub use units::{ByteSize, HumanDuration};
pub use upstream::{EnvLookup, UpstreamConfig};

/// Settings given on the command line; they win over the file.
#[derive(Debug, Default, Clone)]
pub struct Overrides {
    /// `--listen`.
    pub listen: Option<SocketAddr>,
    /// `--allow-remote`.
    pub allow_remote: bool,
    /// `--unix-socket`.
    pub unix_socket: Option<PathBuf>,
    /// `--no-unix-socket`.
    pub no_unix_socket: bool,
    /// `--data-dir`.
    pub data_dir: Option<PathBuf>,
    /// `--quota`.
    pub quota: Option<ByteSize>,
    /// `--upstream`.
    pub upstream: Option<String>,
    /// `--metrics-listen`.
    pub metrics_listen: Option<SocketAddr>,
}

/// The resolved configuration the server runs with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    /// TCP listen address.
    pub listen: SocketAddr,
    /// Unix socket path, if enabled.
    pub unix_socket: Option<PathBuf>,
    /// Where the store lives.
    pub data_dir: PathBuf,
    /// Byte budget of the store.
    pub quota_bytes: u64,
    /// Inline threshold of the store.
    pub inline_limit: u64,
    /// fsync every commit.
    pub fsync: bool,
    /// Keep blobs zstd-compressed at rest where it pays (`[store] compression`).
    pub store_compression: bool,
    /// Advertised `max_batch_total_size_bytes`.
    pub max_batch_total_size_bytes: u64,
    /// The upstream to proxy, if any.
    pub upstream: Option<UpstreamConfig>,
    /// Where to serve Prometheus metrics (`[metrics] listen`), if anywhere.
    pub metrics_listen: Option<SocketAddr>,
    /// Output prefetch settings (used with an upstream).
    pub prefetch: PrefetchConfig,
    /// Remote Asset origin downloads (`[asset]`).
    pub asset: AssetConfig,
    /// TLS on the listener (`[server] tls_cert`, `tls_key`, `client_ca`).
    pub tls: Option<ServerTls>,
    /// Credentials and roles (`[auth]`).
    pub auth: AuthConfig,
    /// Per-client bounds (`[limits]`).
    pub limits: LimitsConfig,
}

/// `$XDG_CACHE_HOME/outpost`, else `~/.cache/outpost`.
pub fn default_data_dir() -> PathBuf {
    let cache = std::env::var_os("XDG_CACHE_HOME")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .unwrap_or_else(|| PathBuf::from(".cache"));
    cache.join("outpost")
}

impl Config {
    /// Merges defaults, the file and the flags, and checks the result.
    pub fn resolve(file: FileConfig, flags: Overrides) -> anyhow::Result<Self> {
        Self::resolve_with_env(file, flags, &upstream::process_env)
    }

    /// [`Config::resolve`], reading `[upstream]` header values through `env`.
    pub fn resolve_with_env(
        file: FileConfig,
        flags: Overrides,
        env: EnvLookup,
    ) -> anyhow::Result<Self> {
        let listen = flags
            .listen
            .or(file.server.listen)
            .unwrap_or_else(|| defaults::LISTEN.parse().expect("valid default"));
        let allow_remote =
            flags.allow_remote || file.server.allow_remote.unwrap_or(defaults::ALLOW_REMOTE);
        let tls = ServerTls::resolve(&file.server)?;
        let auth = AuthConfig::resolve(file.auth, tls.as_ref())?;
        let limits = LimitsConfig::resolve(file.limits)?;
        if !listen.ip().is_loopback()
            && !security::remote_listen_allowed(allow_remote, tls.as_ref(), &auth)
        {
            anyhow::bail!(
                "refusing to listen on {listen}: it is reachable from other machines; configure \
                 TLS ([server] tls_cert, tls_key) and credentials ([auth] tokens_file, \
                 htpasswd_file or client_certificates), or pass --allow-remote \
                 (`allow_remote = true`) to serve it without authentication"
            );
        }
        let metrics_listen = flags.metrics_listen.or(file.metrics.listen);
        if let Some(addr) = metrics_listen
            && !addr.ip().is_loopback()
            && !allow_remote
            && tls.is_none()
        {
            anyhow::bail!(
                "refusing to serve metrics on {addr}: not loopback; configure TLS or pass \
                 --allow-remote to do it anyway"
            );
        }
        let upstream = UpstreamConfig::resolve_with_env(file.upstream, flags.upstream, env)?;
        let data_dir = flags
            .data_dir
            .or(file.store.data_dir)
            .unwrap_or_else(default_data_dir);
        let unix_socket = if flags.no_unix_socket {
            None
        } else if let Some(path) = flags.unix_socket {
            Some(path)
        } else {
            match file.server.unix_socket.as_deref() {
                Some("") => None,
                Some(path) => Some(PathBuf::from(path)),
                None => Some(data_dir.join(defaults::UNIX_SOCKET_NAME)),
            }
        };
        let quota_bytes = flags
            .quota
            .or(file.store.quota)
            .map_or(defaults::QUOTA, |q| q.0);
        let inline_limit = file
            .store
            .inline_limit
            .map_or(defaults::INLINE_LIMIT, |q| q.0);
        let max_batch = file
            .server
            .max_batch_total_size_bytes
            .map_or(defaults::MAX_BATCH, |q| q.0);
        if quota_bytes == 0 {
            anyhow::bail!("the store quota must be larger than 0");
        }
        if !(1024..=(64 << 20)).contains(&max_batch) {
            anyhow::bail!("max_batch_total_size_bytes must be between 1KiB and 64MiB");
        }
        if inline_limit > (16 << 20) {
            anyhow::bail!("inline_limit must be at most 16MiB");
        }
        Ok(Config {
            listen,
            unix_socket,
            data_dir,
            quota_bytes,
            inline_limit,
            fsync: file.store.fsync.unwrap_or(defaults::FSYNC),
            store_compression: file
                .store
                .compression
                .unwrap_or(defaults::STORE_COMPRESSION),
            max_batch_total_size_bytes: max_batch,
            upstream,
            metrics_listen,
            prefetch: PrefetchConfig::resolve(file.prefetch),
            asset: AssetConfig::resolve(file.asset, listen.ip().is_loopback(), quota_bytes)?,
            tls,
            auth,
            limits,
        })
    }

    /// A configuration for tests: loopback port 0, no unix socket.
    pub fn for_tests(data_dir: &Path) -> Self {
        Config {
            listen: "127.0.0.1:0".parse().expect("valid"),
            unix_socket: None,
            data_dir: data_dir.to_path_buf(),
            quota_bytes: defaults::QUOTA,
            inline_limit: defaults::INLINE_LIMIT,
            fsync: defaults::FSYNC,
            store_compression: defaults::STORE_COMPRESSION,
            max_batch_total_size_bytes: defaults::MAX_BATCH,
            upstream: None,
            metrics_listen: None,
            prefetch: PrefetchConfig::default(),
            asset: AssetConfig::for_tests(),
            tls: None,
            auth: AuthConfig::default(),
            limits: LimitsConfig::default(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn example_config_parses_and_sets_every_key() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("config.example.toml");
        // The example reads one header value from this variable.
        let env = |name: &str| (name == "BUILDBUDDY_API_KEY").then(|| "example-key".to_string());
        let file = FileConfig::load(&path).unwrap();
        assert!(file.upstream.endpoint.is_some());
        assert!(file.upstream.ca_file.is_some());
        assert!(file.upstream.client_cert.is_some() && file.upstream.client_key.is_some());
        assert!(!file.upstream.instance_names.is_empty());
        assert_eq!(file.upstream.headers.len(), 2);
        assert!(file.upstream.forward_client_headers.is_some());
        assert!(file.upstream.connect_timeout.is_some() && file.upstream.rpc_timeout.is_some());
        assert!(file.upstream.max_concurrent_calls.is_some());
        assert!(file.upstream.existence_ttl.is_some() && file.upstream.max_attempts.is_some());
        assert!(file.upstream.write_mode.is_some() && file.upstream.write_back_max_bytes.is_some());
        assert!(
            file.upstream.compression.is_some() && file.upstream.compression_min_bytes.is_some()
        );
        assert!(file.store.compression.is_some());
        assert!(file.upstream.write_back_drain_timeout.is_some());
        assert!(file.metrics.listen.is_some());
        let p = &file.prefetch;
        assert!(
            p.enabled.is_some() && p.max_blob_size.is_some() && p.max_bytes_in_flight.is_some()
        );
        assert!(p.parallel_fetches.is_some() && p.queue_depth.is_some());
        assert!(p.mode.is_some() && p.small_output_size.is_some());
        assert!(p.learning_actions.is_some() && p.read_ratio.is_some());
        assert!(file.server.listen.is_some());
        assert!(file.server.allow_remote.is_some());
        assert!(file.server.tls_cert.is_some() && file.server.tls_key.is_some());
        assert!(file.server.client_ca.is_some());
        assert!(file.server.unix_socket.is_some());
        assert!(file.server.max_batch_total_size_bytes.is_some());
        assert!(file.store.data_dir.is_some());
        assert!(file.store.quota.is_some());
        assert!(file.store.inline_limit.is_some());
        assert!(file.store.fsync.is_some());
        let a = &file.asset;
        assert!(a.origin_fetch.is_some() && a.origin_timeout.is_some());
        assert!(a.max_size.is_some() && a.origin_fetch_private.is_some());
        assert!(!a.allow_hosts.is_empty() && !a.deny_hosts.is_empty());
        let auth = &file.auth;
        assert!(auth.tokens_file.is_some() && auth.htpasswd_file.is_some());
        assert!(auth.htpasswd_role.is_some() && !auth.htpasswd_write_ac.is_empty());
        assert!(auth.require_on_loopback.is_some());
        assert!(!auth.client_certificates.is_empty());
        let l = &file.limits;
        assert!(l.max_calls_per_client.is_some() && l.queue_timeout.is_some());
        Config::resolve_with_env(file, Overrides::default(), &env).unwrap();
    }

    #[test]
    fn the_team_example_config_resolves() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/outpost.toml");
        let config = Config::resolve(FileConfig::load(&path).unwrap(), Overrides::default())
            .expect("a shared box: TLS and tokens allow the non-loopback listen");
        assert!(!config.listen.ip().is_loopback());
        assert!(config.tls.is_some() && config.auth.has_credentials());
        assert_eq!(config.limits.max_calls_per_client, 256);
    }

    #[test]
    fn defaults_are_safe() {
        let config = Config::resolve(
            FileConfig::default(),
            Overrides {
                data_dir: Some("/d".into()),
                ..Default::default()
            },
        )
        .unwrap();
        assert!(config.listen.ip().is_loopback());
        assert_eq!(config.unix_socket, Some(PathBuf::from("/d/outpost.sock")));
        assert_eq!(config.quota_bytes, defaults::QUOTA);
        assert!(config.asset.origin_fetch && !config.asset.origin_fetch_private);
    }

    #[test]
    fn remote_listen_needs_explicit_consent() {
        let flags = Overrides {
            listen: Some("0.0.0.0:8980".parse().unwrap()),
            ..Default::default()
        };
        assert!(Config::resolve(FileConfig::default(), flags.clone()).is_err());
        let allowed = Overrides {
            allow_remote: true,
            ..flags
        };
        let config = Config::resolve(FileConfig::default(), allowed).unwrap();
        // Serving other machines: origin downloads only when asked for.
        assert!(!config.asset.origin_fetch);
    }

    #[test]
    fn remote_listen_with_tls_and_credentials_needs_no_flag() {
        let flags = Overrides {
            listen: Some("0.0.0.0:8980".parse().unwrap()),
            ..Default::default()
        };
        let tls_only: FileConfig =
            toml::from_str("[server]\ntls_cert = \"c.pem\"\ntls_key = \"k.pem\"\n").unwrap();
        assert!(
            Config::resolve(tls_only, flags.clone()).is_err(),
            "TLS without credentials"
        );
        let tokens_only: FileConfig = toml::from_str("[auth]\ntokens_file = \"t\"\n").unwrap();
        assert!(
            Config::resolve(tokens_only, flags.clone()).is_err(),
            "credentials in clear"
        );
        let both: FileConfig = toml::from_str(
            "[server]\ntls_cert = \"c.pem\"\ntls_key = \"k.pem\"\n[auth]\ntokens_file = \"t\"\n",
        )
        .unwrap();
        let config = Config::resolve(both, flags).unwrap();
        assert!(config.tls.is_some() && config.auth.has_credentials());
    }

    #[test]
    fn tls_settings_must_be_complete() {
        let half: FileConfig = toml::from_str("[server]\ntls_cert = \"c.pem\"\n").unwrap();
        assert!(Config::resolve(half, Overrides::default()).is_err());
        let ca_only: FileConfig = toml::from_str("[server]\nclient_ca = \"ca.pem\"\n").unwrap();
        assert!(Config::resolve(ca_only, Overrides::default()).is_err());
        let certs_without_mtls: FileConfig = toml::from_str(
            "[server]\ntls_cert = \"c\"\ntls_key = \"k\"\n\
             [[auth.client_certificates]]\nname = \"ci\"\ncommon_name = \"ci\"\nrole = \"read\"\n",
        )
        .unwrap();
        assert!(Config::resolve(certs_without_mtls, Overrides::default()).is_err());
    }

    #[test]
    fn flags_win_over_the_file() {
        let file: FileConfig = toml::from_str("[store]\nquota = \"1GiB\"\n").unwrap();
        let flags = Overrides {
            quota: Some(ByteSize(5)),
            ..Default::default()
        };
        assert_eq!(Config::resolve(file, flags).unwrap().quota_bytes, 5);
    }
}
