//! The gRPC services: thin adapters from protos to the store layers.
//!
//! Each service parses and validates its request, calls the [`Backend`], and
//! turns the crate's [`Error`](crate::error::Error) into a status in one place.

pub mod action_cache;
pub mod admin;
pub mod asset;
pub mod bytestream;
pub mod capabilities;
pub mod cas;
pub mod execution;
pub mod logstream;
pub mod operations;
pub mod parked;

use std::sync::Arc;

use crate::stats::Stats;
use crate::store::{ActionResultStore, BlobStore};

/// What the services call into.
#[derive(Clone)]
pub struct Backend {
    /// The CAS (today the local store; later a read-through stack).
    pub blobs: Arc<dyn BlobStore>,
    /// The action cache, already wrapped in the completeness check.
    pub actions: Arc<dyn ActionResultStore>,
    /// Counters.
    pub stats: Arc<Stats>,
    /// Largest total payload of one Batch* request.
    pub max_batch_total_size_bytes: u64,
}
