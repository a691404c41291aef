//! Which hosts origin downloads may reach: `[asset] deny_hosts`, then
//! `allow_hosts`, then no loopback, private or link-local address unless
//! `origin_fetch_private` is on or the host is listed in `allow_hosts`.
//!
//! Names are checked by [`PolicyResolver`], the DNS resolver of the origin
//! HTTP client: every address a name resolves to is checked, and the
//! connection goes only to those addresses, so DNS rebinding cannot slip a
//! private address past the check. Literal IP hosts never reach a resolver;
//! [`HostPolicy::check_url`] checks them (before each request and each
//! redirect).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;

use reqwest::dns::{Addrs, Name, Resolve, Resolving};
use url::{Host, Url};

use crate::config::AssetConfig;

/// Why a host was refused (becomes PERMISSION_DENIED). It travels inside
/// the HTTP client's error chain, where the fetcher finds it again.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct Refused(pub String);

/// The host rules of `[asset]`.
#[derive(Clone, Debug)]
pub struct HostPolicy {
    /// `allow_hosts` (lower-case; `*.suffix` or exact).
    allow: Vec<String>,
    /// `deny_hosts` (same forms).
    deny: Vec<String>,
    /// `origin_fetch_private`.
    private_ok: bool,
}

impl HostPolicy {
    /// The policy of a resolved `[asset]` section.
    pub fn new(config: &AssetConfig) -> Self {
        let normalise = |list: &[String]| list.iter().map(|h| normalise_host(h)).collect();
        HostPolicy {
            allow: normalise(&config.allow_hosts),
            deny: normalise(&config.deny_hosts),
            private_ok: config.origin_fetch_private,
        }
    }

    /// Checks a host name (or IP literal, without brackets) against the
    /// lists. `Ok(true)` when `allow_hosts` names it, which also permits
    /// private addresses.
    pub fn check_name(&self, host: &str) -> Result<bool, Refused> {
        let host = normalise_host(host);
        if self.deny.iter().any(|p| pattern_matches(p, &host)) {
            return Err(Refused(format!("host {host} is in [asset] deny_hosts")));
        }
        let listed = self.allow.iter().any(|p| pattern_matches(p, &host));
        if !self.allow.is_empty() && !listed {
            return Err(Refused(format!(
                "host {host} is not in [asset] allow_hosts"
            )));
        }
        Ok(listed)
    }

    /// Checks one address `host` resolved to.
    pub fn check_addr(&self, host: &str, addr: IpAddr, listed: bool) -> Result<(), Refused> {
        if is_private(addr) && !self.private_ok && !listed {
            return Err(Refused(format!(
                "host {} has the loopback, private or link-local address {addr}; list it in \
                 [asset] allow_hosts or set origin_fetch_private = true",
                normalise_host(host)
            )));
        }
        Ok(())
    }

    /// Checks a URL about to be requested: its scheme, its host name and,
    /// for an IP literal (which skips DNS), its address.
    pub fn check_url(&self, url: &Url) -> Result<(), Refused> {
        if !matches!(url.scheme(), "http" | "https") {
            return Err(Refused(format!(
                "scheme {}: is not http or https",
                url.scheme()
            )));
        }
        match url.host() {
            None => Err(Refused("the URI has no host".into())),
            Some(Host::Domain(name)) => self.check_name(name).map(|_| ()),
            Some(Host::Ipv4(ip)) => self.check_literal(IpAddr::V4(ip)),
            Some(Host::Ipv6(ip)) => self.check_literal(IpAddr::V6(ip)),
        }
    }

    /// Checks an IP literal host.
    fn check_literal(&self, ip: IpAddr) -> Result<(), Refused> {
        let host = ip.to_string();
        let listed = self.check_name(&host)?;
        self.check_addr(&host, ip, listed)
    }

    /// Checks a name and every address it resolved to; all must pass.
    pub fn check_resolved(&self, host: &str, addrs: &[SocketAddr]) -> Result<(), Refused> {
        let listed = self.check_name(host)?;
        if addrs.is_empty() {
            return Err(Refused(format!("host {host} resolved to no address")));
        }
        addrs
            .iter()
            .try_for_each(|a| self.check_addr(host, a.ip(), listed))
    }
}

/// Lower case, no trailing dot, no IPv6 brackets.
fn normalise_host(host: &str) -> String {
    let host = host.trim().trim_end_matches('.');
    let host = host
        .strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host);
    match host.parse::<IpAddr>() {
        Ok(ip) => ip.to_string(),
        Err(_) => host.to_ascii_lowercase(),
    }
}

/// `*.example.com` matches every name below example.com (not example.com
/// itself); anything else matches exactly.
fn pattern_matches(pattern: &str, host: &str) -> bool {
    match pattern.strip_prefix("*.") {
        Some(suffix) => host
            .strip_suffix(suffix)
            .is_some_and(|rest| rest.len() > 1 && rest.ends_with('.')),
        None => pattern == host,
    }
}

/// Loopback, private, link-local, unspecified and other addresses that are
/// not the public internet.
pub fn is_private(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => is_private_v4(v4),
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => is_private_v4(v4),
            None => is_private_v6(v6),
        },
    }
}

fn is_private_v4(ip: Ipv4Addr) -> bool {
    let [a, b, ..] = ip.octets();
    ip.is_loopback()
        || ip.is_private()
        || ip.is_link_local()
        || ip.is_unspecified()
        || ip.is_broadcast()
        || ip.is_multicast()
        || a == 0
        // 100.64.0.0/10, carrier-grade NAT: private in practice.
        || (a == 100 && (b & 0xc0) == 64)
}

fn is_private_v6(ip: Ipv6Addr) -> bool {
    let first = ip.segments()[0];
    ip.is_loopback()
        || ip.is_unspecified()
        || ip.is_multicast()
        // fc00::/7 unique local, fe80::/10 link-local.
        || (first & 0xfe00) == 0xfc00
        || (first & 0xffc0) == 0xfe80
        // ::a.b.c.d (IPv4-compatible, deprecated): judge the IPv4 address.
        || (ip.segments()[..6].iter().all(|&s| s == 0) && is_private_v4(ip_v4_tail(ip)))
}

/// The last 32 bits of an IPv6 address as IPv4.
fn ip_v4_tail(ip: Ipv6Addr) -> Ipv4Addr {
    let o = ip.octets();
    Ipv4Addr::new(o[12], o[13], o[14], o[15])
}

/// The origin client's DNS resolver: the system resolver, then
/// [`HostPolicy::check_resolved`]. Only checked addresses are returned, so
/// only they are connected to.
pub struct PolicyResolver {
    /// The rules.
    pub policy: Arc<HostPolicy>,
}

impl Resolve for PolicyResolver {
    fn resolve(&self, name: Name) -> Resolving {
        let policy = self.policy.clone();
        Box::pin(async move {
            let host = name.as_str().to_string();
            policy.check_name(&host)?;
            let addrs: Vec<SocketAddr> =
                tokio::net::lookup_host((host.as_str(), 0)).await?.collect();
            policy.check_resolved(&host, &addrs)?;
            let addrs: Addrs = Box::new(addrs.into_iter());
            Ok(addrs)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(allow: &[&str], deny: &[&str], private_ok: bool) -> HostPolicy {
        let list = |l: &[&str]| l.iter().map(|s| s.to_string()).collect();
        HostPolicy::new(&AssetConfig {
            allow_hosts: list(allow),
            deny_hosts: list(deny),
            origin_fetch_private: private_ok,
            ..AssetConfig::for_tests()
        })
    }

    fn addrs(list: &[&str]) -> Vec<SocketAddr> {
        list.iter()
            .map(|a| SocketAddr::new(a.parse().unwrap(), 0))
            .collect()
    }

    #[test]
    fn private_ranges() {
        let private = [
            "127.0.0.1",
            "127.255.0.9",
            "10.1.2.3",
            "172.16.0.1",
            "172.31.255.255",
            "192.168.1.1",
            "169.254.169.254",
            "0.0.0.0",
            "100.64.0.1",
            "::1",
            "::",
            "fc00::1",
            "fd12:3456::1",
            "fe80::1",
            "febf::1",
            "::ffff:127.0.0.1",
            "::ffff:10.0.0.1",
            "::127.0.0.1",
        ];
        for ip in private {
            assert!(is_private(ip.parse().unwrap()), "{ip}");
        }
        let public = [
            "8.8.8.8",
            "172.32.0.1",
            "172.15.255.255",
            "192.169.0.1",
            "100.128.0.1",
            "2001:4860:4860::8888",
            "fec0::1",
            "::ffff:8.8.8.8",
        ];
        for ip in public {
            assert!(!is_private(ip.parse().unwrap()), "{ip}");
        }
    }

    #[test]
    fn patterns() {
        assert!(pattern_matches("*.example.com", "a.example.com"));
        assert!(pattern_matches("*.example.com", "a.b.example.com"));
        assert!(!pattern_matches("*.example.com", "example.com"));
        assert!(!pattern_matches("*.example.com", "badexample.com"));
        assert!(pattern_matches("example.com", "example.com"));
        assert!(!pattern_matches("example.com", "a.example.com"));
    }

    #[test]
    fn deny_wins_over_allow() {
        let p = policy(&["*.example.com"], &["bad.example.com"], false);
        assert!(p.check_name("good.example.com").unwrap());
        assert!(p.check_name("BAD.Example.com.").is_err());
        assert!(p.check_name("other.org").is_err());
    }

    #[test]
    fn empty_allow_list_allows_public_hosts_but_not_private_addresses() {
        let p = policy(&[], &[], false);
        assert!(!p.check_name("example.com").unwrap());
        assert!(
            p.check_resolved("example.com", &addrs(&["93.184.216.34"]))
                .is_ok()
        );
        assert!(
            p.check_resolved("example.com", &addrs(&["10.0.0.1"]))
                .is_err()
        );
        // Every address counts: one private address among public ones refuses.
        let mixed = addrs(&["93.184.216.34", "127.0.0.1"]);
        assert!(p.check_resolved("rebind.example", &mixed).is_err());
        assert!(p.check_resolved("example.com", &[]).is_err());
    }

    #[test]
    fn listed_or_switched_on_private_addresses_pass() {
        let listed = policy(&["localhost", "127.0.0.1"], &[], false);
        assert!(
            listed
                .check_resolved("localhost", &addrs(&["127.0.0.1", "::1"]))
                .is_ok()
        );
        let url = Url::parse("http://127.0.0.1:8080/x").unwrap();
        assert!(listed.check_url(&url).is_ok());
        assert!(policy(&[], &[], false).check_url(&url).is_err());
        assert!(policy(&[], &[], true).check_url(&url).is_ok());
        let v6 = Url::parse("http://[::1]:8080/x").unwrap();
        assert!(policy(&[], &[], false).check_url(&v6).is_err());
        assert!(policy(&["[::1]"], &[], false).check_url(&v6).is_ok());
    }

    #[test]
    fn only_http_and_https() {
        let url = Url::parse("ftp://example.com/x").unwrap();
        assert!(policy(&[], &[], true).check_url(&url).is_err());
    }
}
