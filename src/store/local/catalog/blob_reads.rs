//! Reading stored blobs: plain (decoded when stored compressed) or as
//! stored, pinned while the stream lives, files verified as they stream.

use std::sync::Arc;

use bytes::Bytes;
use futures::stream;

use super::{Catalog, damaged, file_form, not_found};
use crate::compression;
use crate::digest::Digest;
use crate::error::Result;
use crate::store::ChunkStream;
use crate::store::local::files::BlobFile;
use crate::store::local::quota::{Entry, EntryKind};
use crate::store::local::verifying::Serve;

impl Catalog {
    /// Streams `[offset, end)` of a stored blob's plain bytes, pinned
    /// against eviction while the stream lives; a compressed one is decoded
    /// as it streams. NOT_FOUND means its bytes are missing or damaged (see
    /// [`Catalog::forget_broken`]). A file blob is verified as it streams
    /// ([`FileArea::stream`]): one that does not hash to its digest ends
    /// the stream with DATA_LOSS and is removed ([`Catalog::forget_corrupt`]).
    /// Inline blobs are not hashed again: RocksDB checks each block's
    /// checksum when it reads it from disk, and they were hashed right
    /// before their write batch.
    pub fn read_blob(
        self: &Arc<Self>,
        digest: &Digest,
        key: &[u8],
        entry: Entry,
        offset: u64,
        end: u64,
    ) -> Result<ChunkStream> {
        if entry.kind.is_file() {
            return self.stream_file(digest, key, entry, Serve::Plain, offset, end);
        }
        let _pin = self.index.pin(key);
        let data = self.inline_plain(digest, key, entry)?;
        let data = data.slice(offset as usize..end as usize);
        Ok(Box::pin(stream::iter([Ok(data)])))
    }

    /// Streams a compressed blob's bytes as they are stored (a zstd
    /// stream of the whole blob), pinned while the stream lives; a file is
    /// decoded beside the sending only to verify it, as
    /// [`Catalog::read_blob`]. `None` when the blob is stored plain.
    pub fn read_stored(
        self: &Arc<Self>,
        digest: &Digest,
        key: &[u8],
        entry: Entry,
    ) -> Option<Result<ChunkStream>> {
        match entry.kind {
            EntryKind::FileZstd => {
                Some(self.stream_file(digest, key, entry, Serve::Stored, 0, entry.size))
            }
            EntryKind::InlineZstd => Some(self.inline_stored(digest, key, entry).map(|data| {
                let stream: ChunkStream = Box::pin(stream::iter([Ok(data)]));
                stream
            })),
            _ => None,
        }
    }

    /// A verified stream of a blob file (see [`FileArea::stream`]).
    fn stream_file(
        self: &Arc<Self>,
        digest: &Digest,
        key: &[u8],
        entry: Entry,
        serve: Serve,
        offset: u64,
        end: u64,
    ) -> Result<ChunkStream> {
        let pin = self.index.pin(key);
        let file = BlobFile {
            digest: *digest,
            form: file_form(entry.kind),
            len: entry.size,
        };
        let catalog = Arc::downgrade(self);
        let key = key.to_vec();
        let on_corrupt = move |why: &str| {
            if let Some(catalog) = catalog.upgrade() {
                catalog.forget_corrupt(&key, why);
            }
        };
        self.files
            .stream(&file, serve, offset, end, pin, on_corrupt)
    }

    /// The bytes of an inline blob as stored: NOT_FOUND (damaged) when
    /// they are missing or not as long as its entry says.
    fn inline_stored(&self, digest: &Digest, key: &[u8], entry: Entry) -> Result<Bytes> {
        let value = self.db.inline(key)?.ok_or_else(|| not_found(digest))?;
        if !entry.kind.is_blob() || entry.kind.is_file() || value.len() as u64 != entry.size {
            return Err(damaged(digest));
        }
        Ok(Bytes::copy_from_slice(&value))
    }

    /// The plain bytes of an inline blob, decoded when stored compressed
    /// (bounded by its size): NOT_FOUND (damaged) when they do not decode
    /// to its size.
    fn inline_plain(&self, digest: &Digest, key: &[u8], entry: Entry) -> Result<Bytes> {
        let stored = self.inline_stored(digest, key, entry)?;
        let plain = match entry.kind {
            EntryKind::InlineZstd => {
                compression::decompress(&stored, digest.size).map_err(|_| damaged(digest))?
            }
            _ => stored,
        };
        if plain.len() as u64 != digest.size {
            return Err(damaged(digest));
        }
        Ok(plain)
    }
}
