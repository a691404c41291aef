//! Who may call what on Outpost's own listener: credentials (bearer tokens,
//! HTTP basic against htpasswd, mutual-TLS client certificates), the role
//! each one has, and the check every RPC passes before anything else runs.
//!
//! - [`role`]: roles and the [`Principal`] an admitted request carries.
//! - [`tokens`]: bearer tokens and the tokens file (hashes only).
//! - [`htpasswd`]: HTTP basic against bcrypt entries, with a verification cache.
//! - [`certs`]: client certificates mapped to credentials by CN or SAN.
//! - [`rpc`]: the one table of what each RPC needs.
//! - [`throttle`]: brute-force slow-down per address.
//! - [`check`]: the [`Authenticator`] tying those together, reloaded on change.
//! - [`layer`]: the tower layer that runs it on every request.

pub mod certs;
pub mod check;
pub mod htpasswd;
pub mod layer;
pub mod role;
pub mod rpc;
pub mod throttle;
pub mod tokens;

pub use check::{Authenticator, Refusal};
pub use layer::AuthLayer;
pub use role::{Principal, Role};
