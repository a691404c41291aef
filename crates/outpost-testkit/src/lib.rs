//! Black-box test and bench infrastructure for Outpost. It talks to the
//! server only over the wire (gRPC, the ready file, `/proc`), never through
//! the `outpost` crate, so what it checks does not trust the code under test.
//!
//! # Layout
//! - [`fake`]: an in-process fake REAPI upstream (CAS, ByteStream, action
//!   cache, execution) with a call log and injectable latency, faults,
//!   outages and a pause gate.
//! - [`process`]: [`ServerProcess`], the real `outpost` binary as a child
//!   process on `127.0.0.1:0`, its addresses read from `--ready-file`.
//! - [`workload`]: deterministic data ([`Rng`], [`blob`]), SHA-256 digests,
//!   batch packing ([`pack`]).
//! - [`client`]: REAPI client helpers (resource names, ByteStream reads and
//!   writes, batch calls) over a plain tonic channel.
//! - [`env`](mod@env): bench knobs from environment variables.
//! - [`load`]: call-rate load for the per-call cost benches.
//! - [`metrics`]: a scrape of the server's Prometheus page.
//! - [`pki`]: a private test CA issuing server and client certificates.
//! - [`raw`]: calls with raw-bytes messages (garbage, truncated bodies).
//! - [`relay`]: a WAN simulator (delay and bandwidth per direction) for the
//!   WAN benches.

pub mod client;
pub mod digests;
pub mod env;
pub mod fake;
pub mod load;
pub mod metrics;
pub mod pki;
pub mod process;
pub mod raw;
pub mod relay;
pub mod workload;

pub use bazel_remote_apis::build::bazel::remote::execution::v2 as re;
pub use bazel_remote_apis::google::bytestream as bs;
pub use process::ServerProcess;
pub use workload::{Rng, blob, digest, pack, sha256_hex};
