//! The Remote Asset API (Fetch and Push), served from the local store with
//! the upstream's asset service and the origin URLs behind it.
//!
//! - [`request`]: a request validated once: URIs, qualifiers (credentials
//!   split off), checksums, origin headers.
//! - [`headers`]: origin request headers from the credential qualifiers.
//! - [`content`]: an entry's content (blobs and whole trees) and what a
//!   store lacks of it.
//! - [`local`]: entries in the local store: lookups that check content,
//!   records.
//! - [`fetch`]: FetchBlob/FetchDirectory: local, checksum, upstream, origin,
//!   one shared flight per identical request.
//! - [`push`]: PushBlob/PushDirectory: content check, upstream first, record.
//! - [`upstream`]: the upstream's asset endpoint and CAS, as used here.
//! - [`sri`]: `checksum.sri` values, parsed and verified as bytes stream by.
//! - [`origin`]: downloads http(s) URIs into the CAS, verified, bounded.
//! - [`hosts`]: which hosts and addresses origin downloads may reach.
//! - [`spool`]: where a download waits until it is verified.

pub mod content;
pub mod fetch;
pub mod headers;
pub mod hosts;
pub mod local;
pub mod origin;
pub mod push;
pub mod request;
pub mod spool;
pub mod sri;
pub mod upstream;
