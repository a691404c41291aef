//! Hashing beside the decoding: a verified read of a compressed blob file
//! decodes (zstd) and hashes every plain byte. One core hashes SHA-256 at
//! about 1.2 GB/s here, so doing both in turn on one thread caps such a
//! read below 1 GB/s (benches/README.md, "throughput"); handing the plain
//! chunks to a thread of their own puts the two on two cores.

use std::sync::mpsc::{SyncSender, sync_channel};
use std::thread::JoinHandle;

use bytes::Bytes;

use crate::digest::{Digest, DigestFunction, Hasher};
use crate::error::{Error, Result};

/// Chunks (of up to 128 KiB) waiting for the hashing thread: bounds the
/// memory a read holds ahead of its hash.
const DEPTH: usize = 8;

/// A running hash of a blob's plain bytes, here or on a thread beside.
pub enum PlainHasher {
    /// Hashed by the caller, as it goes.
    Here(Hasher),
    /// Hashed by a thread of its own; the chunks go through a bounded queue.
    Beside {
        /// Where the chunks go (dropped to end the thread).
        sender: SyncSender<Bytes>,
        /// The thread, which returns the hash of everything sent.
        thread: JoinHandle<Hasher>,
    },
}

impl PlainHasher {
    /// A hash computed by the caller.
    pub fn here(function: DigestFunction) -> Self {
        PlainHasher::Here(Hasher::new(function))
    }

    /// A hash computed on a new thread (by the caller when no thread can
    /// be started).
    pub fn beside(function: DigestFunction) -> Self {
        let (sender, receiver) = sync_channel::<Bytes>(DEPTH);
        let spawned = std::thread::Builder::new()
            .name("outpost-hash".into())
            .spawn(move || {
                let mut hasher = Hasher::new(function);
                for chunk in receiver {
                    hasher.update(&chunk);
                }
                hasher
            });
        match spawned {
            Ok(thread) => PlainHasher::Beside { sender, thread },
            Err(_) => PlainHasher::here(function),
        }
    }

    /// Adds the next plain bytes (waits while the thread is `DEPTH`
    /// chunks behind).
    pub fn update(&mut self, chunk: Bytes) {
        match self {
            PlainHasher::Here(hasher) => hasher.update(&chunk),
            // A thread that is gone is reported by `finish`.
            PlainHasher::Beside { sender, .. } => {
                let _ = sender.send(chunk);
            }
        }
    }

    /// The digest of everything added.
    pub fn finish(self) -> Result<Digest> {
        match self {
            PlainHasher::Here(hasher) => Ok(hasher.finish()),
            PlainHasher::Beside { sender, thread } => {
                drop(sender);
                let hasher = thread
                    .join()
                    .map_err(|_| Error::Internal("the hashing thread of a read failed".into()))?;
                Ok(hasher.finish())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn both_ways_hash_alike() {
        let data: Vec<u8> = (0..3_000_000u32).map(|i| (i % 251) as u8).collect();
        let f = DigestFunction::Sha256;
        let (mut here, mut beside) = (PlainHasher::here(f), PlainHasher::beside(f));
        assert!(matches!(beside, PlainHasher::Beside { .. }));
        for chunk in data.chunks(100_000) {
            here.update(Bytes::copy_from_slice(chunk));
            beside.update(Bytes::copy_from_slice(chunk));
        }
        let want = Digest::of(f, &data);
        assert_eq!(here.finish().unwrap(), want);
        assert_eq!(beside.finish().unwrap(), want);
    }
}
