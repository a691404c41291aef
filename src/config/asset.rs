//! The resolved `[asset]` settings: whether and how Outpost downloads Remote
//! Asset content from origin URLs itself.

use std::net::IpAddr;
use std::time::Duration;

use super::defaults;
use super::file::AssetSection;

/// The resolved `[asset]` settings.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AssetConfig {
    /// Whether a Fetch miss may be downloaded from its http(s) URI. Defaults
    /// to true only while Outpost listens on loopback alone: a box serving
    /// other machines must opt in, since it would fetch URLs for them.
    pub origin_fetch: bool,
    /// Bound on one origin download when the request gives no `timeout`.
    pub origin_timeout: Duration,
    /// Largest origin download accepted (bytes).
    pub max_size: u64,
    /// Hosts that may be fetched from (empty: any public host). Exact names
    /// or `*.suffix` patterns.
    pub allow_hosts: Vec<String>,
    /// Hosts never fetched from (checked before `allow_hosts`).
    pub deny_hosts: Vec<String>,
    /// Whether loopback, private and link-local addresses may be fetched
    /// from without being listed in `allow_hosts`.
    pub origin_fetch_private: bool,
}

impl AssetConfig {
    /// Applies the defaults (see [`defaults`]). `loopback_only`: whether the
    /// server listens on loopback alone (it decides `origin_fetch`);
    /// `max_size` is capped at `quota_bytes`, since no larger blob fits.
    pub fn resolve(
        section: AssetSection,
        loopback_only: bool,
        quota_bytes: u64,
    ) -> anyhow::Result<Self> {
        let origin_timeout = section
            .origin_timeout
            .map_or(defaults::ORIGIN_TIMEOUT, |d| d.0);
        if origin_timeout.is_zero() {
            anyhow::bail!("[asset] origin_timeout must be longer than 0");
        }
        let max_size = section.max_size.map_or(defaults::ASSET_MAX_SIZE, |b| b.0);
        if max_size == 0 {
            anyhow::bail!("[asset] max_size must be larger than 0");
        }
        for (key, list) in [
            ("allow_hosts", &section.allow_hosts),
            ("deny_hosts", &section.deny_hosts),
        ] {
            for pattern in list {
                validate_pattern(pattern).map_err(|e| anyhow::anyhow!("[asset] {key}: {e}"))?;
            }
        }
        Ok(AssetConfig {
            origin_fetch: section.origin_fetch.unwrap_or(loopback_only),
            origin_timeout,
            max_size: max_size.min(quota_bytes),
            allow_hosts: section.allow_hosts,
            deny_hosts: section.deny_hosts,
            origin_fetch_private: section
                .origin_fetch_private
                .unwrap_or(defaults::ORIGIN_FETCH_PRIVATE),
        })
    }

    /// The defaults of a loopback-only server with the default quota (what
    /// `Config::for_tests` uses): origin downloads on, private addresses
    /// refused.
    pub fn for_tests() -> Self {
        AssetConfig::resolve(AssetSection::default(), true, defaults::QUOTA)
            .expect("the defaults are valid")
    }
}

/// Whether an `allow_hosts` / `deny_hosts` entry is well formed: a host
/// name, an IP address (IPv6 with or without brackets) or `*.suffix`.
fn validate_pattern(pattern: &str) -> Result<(), String> {
    let bare = pattern.trim().trim_end_matches('.');
    let bare = bare
        .strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(bare);
    if bare.parse::<IpAddr>().is_ok() {
        return Ok(());
    }
    let name = bare.strip_prefix("*.").unwrap_or(bare);
    let ok = |c: char| c.is_ascii_alphanumeric() || c == '-' || c == '.' || c == '_';
    if name.is_empty() {
        return Err(format!("{pattern:?} names no host"));
    }
    if !name.chars().all(ok) {
        return Err(format!(
            "{pattern:?} is not a host name, an IP address or *.suffix (no scheme, port or path)"
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{ByteSize, HumanDuration};

    fn section(toml_text: &str) -> AssetSection {
        toml::from_str(toml_text).unwrap()
    }

    #[test]
    fn defaults_depend_on_the_listen_address() {
        let local = AssetConfig::resolve(AssetSection::default(), true, 1 << 40).unwrap();
        assert!(local.origin_fetch);
        assert!(!local.origin_fetch_private);
        assert_eq!(local.origin_timeout, defaults::ORIGIN_TIMEOUT);
        assert_eq!(local.max_size, defaults::ASSET_MAX_SIZE);
        assert!(local.allow_hosts.is_empty() && local.deny_hosts.is_empty());
        let remote = AssetConfig::resolve(AssetSection::default(), false, 1 << 40).unwrap();
        assert!(!remote.origin_fetch);
        let opted_in = AssetConfig::resolve(section("origin_fetch = true"), false, 1 << 40);
        assert!(opted_in.unwrap().origin_fetch);
        let opted_out = AssetConfig::resolve(section("origin_fetch = false"), true, 1 << 40);
        assert!(!opted_out.unwrap().origin_fetch);
    }

    #[test]
    fn max_size_never_exceeds_the_quota() {
        let c = AssetConfig::resolve(AssetSection::default(), true, 1 << 20).unwrap();
        assert_eq!(c.max_size, 1 << 20);
        let s = AssetSection {
            max_size: Some(ByteSize(1000)),
            ..Default::default()
        };
        assert_eq!(
            AssetConfig::resolve(s, true, 1 << 20).unwrap().max_size,
            1000
        );
    }

    #[test]
    fn keys_are_read() {
        let s = section(
            "origin_timeout = \"30s\"\nmax_size = \"1GiB\"\norigin_fetch_private = true\n\
             allow_hosts = [\"*.example.com\", \"10.0.0.7\"]\ndeny_hosts = [\"bad.example.com\"]",
        );
        let c = AssetConfig::resolve(s, true, 1 << 40).unwrap();
        assert_eq!(c.origin_timeout, Duration::from_secs(30));
        assert_eq!(c.max_size, 1 << 30);
        assert!(c.origin_fetch_private);
        assert_eq!(c.allow_hosts, ["*.example.com", "10.0.0.7"]);
        assert_eq!(c.deny_hosts, ["bad.example.com"]);
    }

    #[test]
    fn bad_values_are_refused() {
        let zero_timeout = AssetSection {
            origin_timeout: Some(HumanDuration(Duration::ZERO)),
            ..Default::default()
        };
        assert!(AssetConfig::resolve(zero_timeout, true, 1 << 40).is_err());
        let zero_size = section("max_size = 0");
        assert!(AssetConfig::resolve(zero_size, true, 1 << 40).is_err());
        let bad_host = section("allow_hosts = [\"https://example.com/\"]");
        let err = AssetConfig::resolve(bad_host, true, 1 << 40).unwrap_err();
        assert!(err.to_string().contains("allow_hosts"), "{err}");
        assert!(AssetConfig::resolve(section("deny_hosts = [\"\"]"), true, 1 << 40).is_err());
        assert!(toml::from_str::<AssetSection>("origin_fetch_typo = true").is_err());
    }

    #[test]
    fn host_patterns() {
        for ok in [
            "example.com",
            "*.example.com",
            "10.0.0.1",
            "[::1]",
            "::1",
            "my_host",
        ] {
            assert!(validate_pattern(ok).is_ok(), "{ok}");
        }
        for bad in [
            "",
            "*.",
            "http://example.com",
            "example.com:80",
            "a/b",
            "*x.com",
        ] {
            assert!(validate_pattern(bad).is_err(), "{bad}");
        }
    }
}
