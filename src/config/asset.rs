//! The resolved `[asset]` settings: whether and how Outpost downloads Remote
//! Asset content from origin URLs itself.

use std::time::Duration;

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
