//! Who may call what on Outpost's own listener: credentials (bearer tokens,
//! HTTP basic against htpasswd, mutual-TLS client certificates), the role
//! each one has, and the check every RPC passes before anything else runs.

pub mod role;

pub use role::{Principal, Role};
