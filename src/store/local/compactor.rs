//! Compressing committed raw blob files behind the writes.
//!
//! Large plain writes stay plain while they stream (read-through readers
//! follow the writer's temp file plain, `BlobWriter::follow`). Once such a
//! file is committed, the store offers it here: one background thread, fed
//! by a bounded queue (a full queue skips the file: it stays raw), samples
//! the first MiB, and when that compresses by at least 10% compresses the
//! whole file into `tmp/` (hashing the plain bytes on the way: a file that
//! no longer hashes to its digest is left to the verified reads), then
//! swaps it in under the index lock ([`Catalog::swap_compressed`]).
//!
//! The thread is plain `std` (the work is blocking file I/O and CPU), holds
//! only a weak reference to the catalog, and ends when the store and its
//! writers are gone; [`Compactor::stop`] (the clean stop) waits for the
//! file in hand.

use std::fs::File;
use std::io::Read;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, SyncSender, sync_channel};
use std::sync::{Arc, Mutex, Weak};

use super::catalog::Catalog;
use super::files::Form;
use crate::compression::{self, StreamCompressor};
use crate::digest::{Digest, Hasher};
use crate::error::Result;

/// Files waiting to be compressed; more are skipped (they stay raw).
const QUEUE: usize = 256;

/// Bytes sampled (and read per block) to decide whether a file compresses.
const SAMPLE: usize = 1 << 20;

/// Files smaller than this are not worth a background pass.
pub const MIN_COMPACT: u64 = 64 << 10;

/// The background compressor of raw blob files.
pub struct Compactor {
    /// The queue of committed raw files.
    queue: SyncSender<Digest>,
    /// Set by the clean stop: no further swaps.
    stopped: Arc<AtomicBool>,
    /// Held while a file is in hand.
    busy: Arc<Mutex<()>>,
}

impl Compactor {
    /// Starts the thread, working for `catalog` while it lives.
    pub fn start(catalog: Weak<Catalog>) -> Result<Self> {
        let (queue, receiver) = sync_channel(QUEUE);
        let stopped = Arc::new(AtomicBool::new(false));
        let busy = Arc::new(Mutex::new(()));
        let worker = Worker {
            receiver,
            catalog,
            stopped: stopped.clone(),
            busy: busy.clone(),
        };
        std::thread::Builder::new()
            .name("outpost-compact".into())
            .spawn(move || worker.run())?;
        Ok(Compactor {
            queue,
            stopped,
            busy,
        })
    }

    /// Offers a committed raw file; skipped when the queue is full.
    pub fn offer(&self, digest: Digest) {
        if digest.size >= MIN_COMPACT {
            let _ = self.queue.try_send(digest);
        }
    }

    /// Stops swapping files in, waiting for the one in hand: after this
    /// the catalog is not changed from here.
    pub fn stop(&self) {
        self.stopped.store(true, Ordering::SeqCst);
        drop(self.busy.lock().unwrap_or_else(|e| e.into_inner()));
    }
}

impl Drop for Compactor {
    /// The store's last handle is gone: wait until the thread has let go of
    /// the catalog (it holds it while swapping a file in), so the store is
    /// closed, RocksDB's lock released, when the handles are dropped; a
    /// reopen in the same process must not find the lock still held.
    fn drop(&mut self) {
        self.stop();
    }
}

/// The thread's side.
struct Worker {
    /// Committed raw files.
    receiver: Receiver<Digest>,
    /// The store's contents, while the store lives.
    catalog: Weak<Catalog>,
    /// Set by [`Compactor::stop`].
    stopped: Arc<AtomicBool>,
    /// Held while a file is in hand.
    busy: Arc<Mutex<()>>,
}

impl Worker {
    fn run(self) {
        for digest in self.receiver.iter() {
            let _busy = self.busy.lock().unwrap_or_else(|e| e.into_inner());
            if self.stopped.load(Ordering::SeqCst) {
                return;
            }
            if let Err(e) = compact(&self.catalog, &digest) {
                tracing::warn!("cannot compress blob {digest} at rest: {e}");
            }
        }
    }
}

/// Compresses the raw file of `digest` and swaps it in, if it is still
/// stored raw and compresses by at least 10%. The catalog is held only to
/// start and to swap, not while compressing: a store closed meanwhile
/// (its RocksDB lock released) is left alone. The blob is not pinned: if
/// it is evicted meanwhile, the open file still reads and the swap finds
/// nothing to replace.
pub fn compact(catalog: &Weak<Catalog>, digest: &Digest) -> Result<()> {
    let (mut file, mut tmp) = {
        let Some(catalog) = catalog.upgrade() else {
            return Ok(());
        };
        if !catalog.is_raw_file(digest) {
            return Ok(()); // evicted, or already compressed
        }
        let path = catalog.files().path_of(digest, Form::Plain);
        let file = match File::open(&path) {
            Ok(file) => file,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(e.into()),
        };
        (file, catalog.create_temp()?)
    };
    let mut hasher = Hasher::new(digest.function);
    let sample = read_block(&mut file, digest.size, &mut hasher)?;
    let packed = compression::compress(&sample);
    if !compression::worth_it(sample.len() as u64, packed.len() as u64) {
        return Ok(());
    }
    let mut encoder = StreamCompressor::new()?;
    let mut len = 0u64;
    let mut block = sample;
    while !block.is_empty() {
        let out = encoder.feed(&block)?;
        tmp.write_all(&out)?;
        len += out.len() as u64;
        block = read_block(&mut file, digest.size - hasher.size(), &mut hasher)?;
    }
    let out = encoder.finish()?;
    tmp.write_all(&out)?;
    len += out.len() as u64;
    if hasher.finish() != *digest {
        return Ok(()); // damaged: the next verified read removes it
    }
    if !compression::worth_it(digest.size, len) {
        return Ok(());
    }
    match catalog.upgrade() {
        Some(catalog) => catalog.swap_compressed(digest, tmp, len),
        None => Ok(()),
    }
}

/// The next block of at most [`SAMPLE`] of the `left` bytes, hashed.
fn read_block(file: &mut File, left: u64, hasher: &mut Hasher) -> Result<Vec<u8>> {
    let mut buf = vec![0u8; left.min(SAMPLE as u64) as usize];
    file.read_exact(&mut buf)?;
    hasher.update(&buf);
    Ok(buf)
}
