//! The Remote Asset API (Fetch and Push), served from the local store with
//! the upstream's asset service and the origin URLs behind it.
//!
//! - [`sri`]: `checksum.sri` values, parsed and verified as bytes stream by.
//! - [`origin`]: downloads http(s) URIs into the CAS, verified, bounded.
//! - [`hosts`]: which hosts and addresses origin downloads may reach.
//! - [`spool`]: where a download waits until it is verified.

pub mod hosts;
pub mod origin;
pub mod spool;
pub mod sri;
