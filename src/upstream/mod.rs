//! Talking to the one upstream REAPI cluster.
//!
//! - [`client`]: the connection (headers, instance mapping), concurrency
//!   limit, retries with backoff, and capabilities.
//! - [`channels`]: its two HTTP/2 channels (TLS, windows): one for clients,
//!   one for prefetch.
//! - [`compressors`]: which blobs cross the WAN zstd-compressed.
//! - [`health`]: fail fast while the upstream is down, recover by itself.
//! - [`batcher`]: group commit that merges concurrent requests into few calls.
//! - [`link`]: the link's measured round-trip time and throughput.
//! - [`keyed_batchers`]: one batcher per (instance, credentials); idle ones
//!   retire.
//! - [`passthrough`]: Remote Logstream (CreateLogStream and non-CAS
//!   ByteStream names) forwarded unchanged to the logstream endpoint.
//! - [`traffic`]: client work in flight, and the gate where prefetch waits
//!   for the link to be free of it.

pub mod batcher;
pub mod channels;
pub mod client;
pub mod compressors;
pub mod health;
pub mod keyed_batchers;
pub mod link;
pub mod passthrough;
pub mod traffic;

pub use client::Upstream;
