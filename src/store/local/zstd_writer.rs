//! The local store's native compressed write: a client's (or the
//! upstream's) zstd bytes are kept as they are, decoded only to hash.
//!
//! The decoder is bounded by the digest's size, so a bomb is cut off there
//! and nothing is stored. The compressed bytes go to the same sinks as a
//! plain write (memory for a small blob, a `tmp/` file for a large one)
//! within the same quota [`Room`], counted in bytes received. At commit the
//! plain digest is verified; a small blob whose compressed form saves less
//! than 10% is stored plain (decoded in memory), a file stays compressed.
//!
//! Resumable: `committed_size` counts plain bytes up to the last complete
//! frame. Parking cuts the stored bytes back to that frame boundary and
//! rewinds the hash there, so the resumed upload's new frame follows a
//! whole one and the stored stream stays valid zstd.

use std::sync::Arc;

use async_trait::async_trait;
use bytes::Bytes;

use super::files::Form;
use super::writer::{Commit, InlineBytes, Payload, Room, Sink};
use crate::compression::{self, Decompressor};
use crate::digest::{Digest, Hasher, verify};
use crate::error::{Error, Result, clip};
use crate::stats::Stats;
use crate::store::BlobWriter;

/// Most compressed bytes a write of a `size`-byte blob may send: zstd's
/// worst case for one frame plus room for the frames of resumed uploads.
pub fn compressed_bound(size: u64) -> u64 {
    size.saturating_add(size / 128).saturating_add(64 << 10)
}

/// Where a parked upload resumes: the last frame boundary.
struct Boundary {
    /// Compressed bytes stored up to it.
    stored: u64,
    /// The hash of the plain bytes up to it.
    hasher: Hasher,
}

/// Stores a blob's zstd bytes as they arrive, verifying the plain digest.
pub struct CompressedWriter {
    /// What the plain bytes must hash to.
    digest: Digest,
    /// Counts digest mismatches.
    stats: Arc<Stats>,
    /// Decodes what arrives, bounded by the plain bytes still expected.
    decoder: Decompressor,
    /// Hash and size of the plain bytes so far.
    hasher: Hasher,
    /// Compressed bytes stored so far.
    stored: u64,
    /// The last frame boundary.
    boundary: Boundary,
    /// Where the compressed bytes go.
    sink: Sink,
    /// The quota they hold.
    room: Room,
    /// Makes the verified payload visible.
    commit: Commit,
}

impl CompressedWriter {
    /// A writer of `digest` whose compressed bytes go to `sink` within
    /// `room`, committed by `commit`.
    pub fn new(
        digest: Digest,
        stats: Arc<Stats>,
        sink: Sink,
        room: Room,
        commit: Commit,
    ) -> Result<Self> {
        Ok(CompressedWriter {
            digest,
            stats,
            decoder: Decompressor::new(digest.size)?,
            hasher: Hasher::new(digest.function),
            stored: 0,
            boundary: Boundary {
                stored: 0,
                hasher: Hasher::new(digest.function),
            },
            sink,
            room,
            commit,
        })
    }

    fn invalid(&self, why: &str) -> Error {
        Error::InvalidArgument(format!("compressed upload of {}: {why}", self.digest))
    }

    /// Decodes `data` a chunk at a time, hashing the plain bytes.
    fn decode(&mut self, data: &[u8]) -> Result<()> {
        let mut at = 0;
        loop {
            let (used, plain, more) = self
                .decoder
                .step(&data[at..])
                .map_err(|e| self.invalid(&clip(&e.to_string())))?;
            at += used;
            self.hasher.update(&plain);
            if self.decoder.at_frame_end() {
                // A frame ended here (possibly mid-piece): where a parked
                // upload resumes.
                self.boundary = Boundary {
                    stored: self.stored + at as u64,
                    hasher: self.hasher.clone(),
                };
            }
            if at == data.len() && !more {
                return Ok(());
            }
            if used == 0 && plain.is_empty() {
                return Err(self.invalid("the zstd data does not decode"));
            }
        }
    }
}

#[async_trait]
impl BlobWriter for CompressedWriter {
    async fn write(&mut self, data: Bytes) -> Result<()> {
        let stored = self.stored + data.len() as u64;
        let bound = compressed_bound(self.digest.size);
        if stored > bound {
            Stats::add(&self.stats.digest_mismatches, 1);
            return Err(self.invalid(&format!(
                "more than {bound} compressed bytes for a {}-byte blob",
                self.digest.size
            )));
        }
        self.room.cover(stored, bound)?;
        self.decode(&data)?;
        self.sink.append(&data)?;
        self.stored = stored;
        Ok(())
    }

    fn committed_size(&self) -> u64 {
        self.hasher.size()
    }

    fn park(&mut self) -> bool {
        let boundary = &self.boundary;
        let Ok(decoder) = Decompressor::new(self.digest.size - boundary.hasher.size()) else {
            return false;
        };
        if self.sink.truncate(boundary.stored).is_err() {
            return false;
        }
        self.decoder = decoder;
        self.hasher = boundary.hasher.clone();
        self.stored = boundary.stored;
        self.room.held.shrink_to(self.stored);
        true
    }

    async fn commit(self: Box<Self>) -> Result<()> {
        if let Err(e) = self.decoder.finish() {
            return Err(self.invalid(&e.to_string()));
        }
        let CompressedWriter {
            digest,
            stats,
            hasher,
            stored,
            sink,
            mut room,
            commit,
            ..
        } = *self;
        if let Err(e) = verify(&digest, &hasher.finish()) {
            Stats::add(&stats.digest_mismatches, 1);
            return Err(e);
        }
        let payload = match sink {
            Sink::Memory(buf) if compression::worth_it(digest.size, stored) => {
                Payload::Inline(InlineBytes {
                    bytes: buf.freeze(),
                    zstd: true,
                })
            }
            Sink::Memory(buf) => {
                // Kept plain: the reservation must cover the plain size.
                room.cover(digest.size, digest.size)?;
                Payload::Inline(InlineBytes {
                    bytes: compression::decompress(&buf, digest.size)?,
                    zstd: false,
                })
            }
            Sink::File(tmp) => Payload::File {
                tmp,
                form: Form::Zstd,
                len: stored,
            },
        };
        commit(payload, room.held)
    }
}
