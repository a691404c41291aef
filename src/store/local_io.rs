//! Streaming I/O for the local store: verified writers, quota reservations
//! and file read streams.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::PathBuf;
use std::sync::Arc;

use async_trait::async_trait;
use bytes::{Bytes, BytesMut};
use futures::stream;

use crate::digest::{Digest, Hasher, verify};
use crate::error::{Error, Result};
use crate::stats::Stats;
use crate::store::files::FileArea;
use crate::store::index::Index;
use crate::store::keys::blob_key;
use crate::store::local::{Inner, PinGuard};
use crate::store::{BlobWriter, ChunkStream};

/// Size of each block read from a blob file.
const FILE_READ_BLOCK: usize = 1 << 20;

/// Quota held by a write in progress; given back on drop unless consumed by
/// the commit that turns it into stored bytes.
pub(crate) struct Reservation {
    inner: Option<Arc<Inner>>,
    bytes: u64,
}

impl Reservation {
    pub(crate) fn new(inner: Arc<Inner>, bytes: u64) -> Self {
        Reservation {
            inner: Some(inner),
            bytes,
        }
    }

    /// Releases the reservation under a lock the caller already holds.
    pub(crate) fn consume(mut self, index: &mut Index) {
        index.release(self.bytes);
        self.inner = None;
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        if let Some(inner) = self.inner.take() {
            inner.lock_index().release(self.bytes);
        }
    }
}

/// A temporary file that is deleted unless it was renamed into place.
pub(crate) struct TempFile {
    /// The open file; taken by `publish`.
    pub(crate) file: Option<File>,
    /// Its path under `tmp/`.
    pub(crate) path: PathBuf,
}

impl Drop for TempFile {
    fn drop(&mut self) {
        // After a successful rename the path is gone and this is a no-op.
        let _ = std::fs::remove_file(&self.path);
    }
}

/// The verified bytes of a blob, ready to be committed.
pub(crate) enum Payload {
    /// Small blob: becomes a RocksDB value.
    Inline(Bytes),
    /// Large blob: a verified temp file to rename into place.
    File(TempFile),
}

/// Where a write's bytes go while they stream in.
enum Sink {
    Memory(BytesMut),
    File(TempFile),
    /// The blob is already stored (or is the empty blob): only verify.
    Discard,
}

/// Writes one blob into the local store, hashing as it goes.
pub(crate) struct LocalWriter {
    inner: Arc<Inner>,
    digest: Digest,
    hasher: Hasher,
    sink: Sink,
    /// `None` when nothing will be stored: the blob is already there, or empty.
    reservation: Option<Reservation>,
}

impl LocalWriter {
    /// Reserves quota (evicting if needed) and opens the sink. A blob that is
    /// already stored needs no room, so writing it again evicts nothing.
    pub(crate) fn new(inner: &Arc<Inner>, digest: Digest) -> Result<Self> {
        let present = digest.size == 0 || inner.lock_index().touch(&blob_key(&digest)).is_some();
        let (sink, reservation) = if present {
            (Sink::Discard, None)
        } else {
            let reservation = inner.reserve(digest.size)?;
            let sink = if digest.size <= inner.inline_limit {
                Sink::Memory(BytesMut::with_capacity(digest.size as usize))
            } else {
                let (file, path) = inner.files.create_temp()?;
                Sink::File(TempFile {
                    file: Some(file),
                    path,
                })
            };
            (sink, Some(reservation))
        };
        Ok(LocalWriter {
            inner: inner.clone(),
            digest,
            hasher: Hasher::new(digest.function),
            sink,
            reservation,
        })
    }
}

#[async_trait]
impl BlobWriter for LocalWriter {
    async fn write(&mut self, data: Bytes) -> Result<()> {
        if self.hasher.size() + data.len() as u64 > self.digest.size {
            Stats::add(&self.inner.stats.digest_mismatches, 1);
            return Err(Error::InvalidArgument(format!(
                "size mismatch for {}: received more than {} bytes",
                self.digest, self.digest.size
            )));
        }
        self.hasher.update(&data);
        match &mut self.sink {
            Sink::Memory(buf) => buf.extend_from_slice(&data),
            Sink::File(tmp) => tmp
                .file
                .as_mut()
                .expect("open until commit")
                .write_all(&data)?,
            Sink::Discard => {}
        }
        Ok(())
    }

    fn committed_size(&self) -> u64 {
        self.hasher.size()
    }

    async fn commit(self: Box<Self>) -> Result<()> {
        let LocalWriter {
            inner,
            digest,
            hasher,
            sink,
            reservation,
        } = *self;
        if let Err(e) = verify(&digest, &hasher.finish()) {
            Stats::add(&inner.stats.digest_mismatches, 1);
            return Err(e);
        }
        let Some(reservation) = reservation else {
            return Ok(()); // already stored, or the empty blob
        };
        let payload = match sink {
            Sink::Memory(buf) => Payload::Inline(buf.freeze()),
            Sink::File(tmp) => Payload::File(tmp),
            Sink::Discard => unreachable!("a discarding writer holds no reservation"),
        };
        inner.commit_blob(&digest, payload, reservation)
    }
}

/// Streams `[offset, end)` of a file-backed blob in blocks, reading on the
/// blocking pool one block at a time. The pin keeps the blob from being
/// evicted until the stream is dropped.
pub(crate) fn file_stream(
    files: &FileArea,
    digest: &Digest,
    offset: u64,
    end: u64,
    pin: PinGuard,
) -> Result<ChunkStream> {
    let path = files.path_for(digest);
    let mut file = match File::open(&path) {
        Ok(file) => file,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(Error::NotFound(format!("blob {digest} file is missing")));
        }
        Err(e) => return Err(e.into()),
    };
    if file.metadata()?.len() != digest.size {
        return Err(Error::NotFound(format!(
            "blob {digest} file has the wrong size"
        )));
    }
    file.seek(SeekFrom::Start(offset))?;
    let state = Some((file, offset, pin));
    Ok(Box::pin(stream::unfold(state, move |state| async move {
        let (mut file, pos, pin) = state?;
        if pos >= end {
            return None;
        }
        let n = (end - pos).min(FILE_READ_BLOCK as u64) as usize;
        let read = tokio::task::spawn_blocking(move || {
            let mut buf = vec![0u8; n];
            file.read_exact(&mut buf).map(|_| (file, buf))
        })
        .await;
        match read {
            Ok(Ok((file, buf))) => Some((Ok(Bytes::from(buf)), Some((file, pos + n as u64, pin)))),
            Ok(Err(e)) => Some((Err(e.into()), None)),
            Err(e) => Some((Err(Error::Internal(format!("read task failed: {e}"))), None)),
        }
    })))
}
