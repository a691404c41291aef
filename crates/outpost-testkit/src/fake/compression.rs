//! zstd in the fake: whether it is advertised (and so served), the one
//! encoder and decoder the cache services use, and a fault that garbles
//! what the fake sends compressed.
//!
//! Compression is off by default (nothing advertised: `compressed-blobs`
//! names are UNIMPLEMENTED, a compressed batch entry INVALID_ARGUMENT,
//! `acceptable_compressors` ignored), so tests that count bytes see what
//! they always saw. [`FakeUpstream::set_compression`] turns it on: ZSTD in
//! `supported_compressors` and `supported_batch_update_compressors`, served
//! both ways over ByteStream and in batches. Every compressed payload counts
//! in [`Call::compressed_blobs`](super::Call::compressed_blobs), and its
//! compressed size in the call's `bytes_sent` / `bytes_received` (what
//! crossed the wire).

use std::sync::atomic::{AtomicBool, Ordering};

use tonic::Status;

use super::FakeUpstream;
use super::state::{Shared, lock};
use crate::re;
use re::compressor::Value as CompressorValue;

/// The zstd level the fake compresses at (the level a real server picks
/// does not matter to Outpost).
const LEVEL: i32 = 1;

/// The fake's compression switches.
#[derive(Default)]
pub(super) struct CompressionState {
    /// Compressed payloads the fake sends are garbled (not zstd any more).
    corrupt: AtomicBool,
}

fn zstd() -> i32 {
    CompressorValue::Zstd as i32
}

impl Shared {
    /// Whether ZSTD is advertised for ByteStream and BatchReadBlobs.
    pub(super) fn zstd_on(&self) -> bool {
        self.caps()
            .cache_capabilities
            .is_some_and(|c| c.supported_compressors.contains(&zstd()))
    }

    /// Whether ZSTD is advertised for BatchUpdateBlobs entries.
    pub(super) fn zstd_batch_update_on(&self) -> bool {
        self.caps()
            .cache_capabilities
            .is_some_and(|c| c.supported_batch_update_compressors.contains(&zstd()))
    }

    /// `data` compressed for sending (garbled when the fault is on).
    pub(super) fn compress_out(&self, data: &[u8]) -> Vec<u8> {
        let mut out = zstd::bulk::compress(data, LEVEL).expect("zstd compression of a slice");
        if self.compression.corrupt.load(Ordering::Relaxed) {
            // Keep the frame header, garble the blocks: still looks like
            // zstd to a sniffer, fails to decode (or checks wrong).
            for b in out.iter_mut().skip(6) {
                *b ^= 0x5a;
            }
        }
        out
    }
}

/// Decodes a whole compressed upload that must expand to exactly `size`
/// bytes (never more is produced): INVALID_ARGUMENT otherwise.
pub(super) fn decompress_in(data: &[u8], size: i64) -> Result<Vec<u8>, Status> {
    let bad = |why: String| Status::invalid_argument(format!("fake upstream: {why}"));
    let size = usize::try_from(size).map_err(|_| bad("negative size".into()))?;
    let mut out = Vec::with_capacity(size.min(64 << 20));
    let mut decoder =
        zstd::stream::read::Decoder::new(data).map_err(|e| bad(format!("zstd decoder: {e}")))?;
    // Read one byte past the size: more means a bomb or a wrong digest.
    let mut limited = std::io::Read::take(&mut decoder, size as u64 + 1);
    std::io::Read::read_to_end(&mut limited, &mut out)
        .map_err(|e| bad(format!("the zstd data is corrupt: {e}")))?;
    if out.len() != size {
        return Err(bad(format!(
            "the zstd data expands to {} bytes or more, the digest says {size}",
            out.len()
        )));
    }
    Ok(out)
}

/// Switches for compression.
impl FakeUpstream {
    /// Advertises ZSTD (ByteStream, BatchRead and BatchUpdate) and serves it
    /// (`true`), or advertises and serves no compressor (`false`, the default).
    pub fn set_compression(&self, on: bool) {
        let list = if on { vec![zstd()] } else { Vec::new() };
        let mut caps = lock(&self.s.capabilities);
        let cache = caps.cache_capabilities.get_or_insert_with(Default::default);
        cache.supported_compressors = list.clone();
        cache.supported_batch_update_compressors = list;
    }

    /// Whether what the fake sends compressed (Read of `compressed-blobs`,
    /// compressed BatchReadBlobs entries) is garbled: a fault for tests of
    /// the reader's checks.
    pub fn set_corrupt_compressed(&self, on: bool) {
        self.s.compression.corrupt.store(on, Ordering::Relaxed);
    }

    /// Blobs that crossed compressed, either way, since the last reset.
    pub fn compressed_blobs(&self) -> u64 {
        lock(&self.s.log)
            .calls
            .iter()
            .map(|c| c.compressed_blobs)
            .sum()
    }
}
