//! Which blobs cross the WAN compressed: the one decision, from the
//! `[upstream] compression` settings and the upstream's advertised
//! compressors, that the upstream store asks before every transfer.

use crate::compression::Compressor;
use crate::config::upstream::UpstreamCompression;
use crate::upstream::Upstream;

/// Which of the upstream's compressor lists applies to a call (REAPI
/// advertises BatchUpdateBlobs apart from the rest).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CompressedCall {
    /// ByteStream Read/Write and BatchReadBlobs: `supported_compressors`.
    Stream,
    /// BatchUpdateBlobs: `supported_batch_update_compressors`.
    BatchUpdate,
}

impl Upstream {
    /// The compressor a blob of `size` bytes crosses the WAN with for a
    /// call of kind `call`: zstd when `[upstream] compression = "auto"`, the
    /// blob is at least `compression_min_bytes` and the upstream's cached
    /// capabilities advertise zstd for that kind of call (unknown
    /// capabilities: plain). `None`: plain.
    pub fn compressor(&self, size: u64, call: CompressedCall) -> Option<Compressor> {
        let config = self.config();
        if config.compression != UpstreamCompression::Auto || size < config.compression_min_bytes {
            return None;
        }
        let cache = self.cached_capabilities()?.cache_capabilities?;
        let advertised = match call {
            CompressedCall::Stream => &cache.supported_compressors,
            CompressedCall::BatchUpdate => &cache.supported_batch_update_compressors,
        };
        Compressor::ALL
            .iter()
            .copied()
            .find(|c| advertised.contains(&c.to_proto()))
    }
}
