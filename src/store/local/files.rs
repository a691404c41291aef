//! Large blobs as plain files beside RocksDB.
//!
//! Blobs above the inline limit are streamed into `tmp/`, hashed on the way,
//! and renamed into `blobs/{function}/{xx}/{hash}-{size}` only after they
//! verified. A rename is atomic, so a reader never sees a partial file; what
//! a crash leaves in `tmp/` is deleted at the next start. Files keep the
//! write amplification at 1× and let reads come straight from the page cache.
//! Reads stream a file a block at a time on the blocking pool.

use std::fs::{self, File};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use bytes::Bytes;
use futures::stream;

use crate::digest::{Digest, DigestFunction, Hasher};
use crate::error::{Error, Result};
use crate::store::ChunkStream;

/// Size of each block read from a blob file.
const FILE_READ_BLOCK: usize = 1 << 20;

/// The directory tree that holds file-backed blobs.
pub struct FileArea {
    /// Root of committed blobs: `blobs/`.
    blobs_dir: PathBuf,
    /// Where writes in progress live until they verify: `tmp/`.
    tmp_dir: PathBuf,
    /// fsync each file (and its directory) before it becomes visible, so a
    /// power loss cannot leave a committed blob with missing contents.
    sync: bool,
    /// Makes temporary file names unique within this process.
    next_tmp: AtomicU64,
}

impl FileArea {
    /// Opens (creating if needed) the area under `root` and empties `tmp/`,
    /// which can only hold writes that never committed.
    pub fn open(root: &Path, sync: bool) -> Result<Self> {
        let blobs_dir = root.join("blobs");
        let tmp_dir = root.join("tmp");
        fs::create_dir_all(&blobs_dir)?;
        if tmp_dir.exists() {
            fs::remove_dir_all(&tmp_dir)?;
        }
        fs::create_dir_all(&tmp_dir)?;
        Ok(FileArea {
            blobs_dir,
            tmp_dir,
            sync,
            next_tmp: AtomicU64::new(0),
        })
    }

    /// Where the committed file for `digest` lives.
    pub fn path_for(&self, digest: &Digest) -> PathBuf {
        let hex = digest.hash_hex();
        self.blobs_dir
            .join(digest.function.name())
            .join(&hex[..2])
            .join(format!("{hex}-{}", digest.size))
    }

    /// Creates a new, empty temporary file for a write in progress.
    pub fn create_temp(&self) -> Result<TempFile> {
        let n = self.next_tmp.fetch_add(1, Ordering::Relaxed);
        let path = self.tmp_dir.join(format!("upload-{n}"));
        // Readable too: readers follow a read-through fetch through it.
        let file = File::options()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&path)?;
        Ok(TempFile {
            file: Some(Arc::new(file)),
            path,
        })
    }

    /// Makes a verified temporary file the committed copy of `digest`. On
    /// failure the temporary file is deleted.
    pub fn publish(&self, mut tmp: TempFile, digest: &Digest) -> Result<()> {
        let file = tmp.file.take().expect("temp file is open until publish");
        if self.sync {
            file.sync_all()?;
        }
        drop(file);
        let dest = self.path_for(digest);
        let dir = dest.parent().expect("blob paths have a parent");
        fs::create_dir_all(dir)?;
        fs::rename(&tmp.path, &dest)?;
        if self.sync {
            File::open(dir)?.sync_all()?;
        }
        Ok(())
    }

    /// Deletes the committed file of `digest`, if any. The file is renamed
    /// into `tmp/` at once (so the blob is gone from `blobs/`), and unlinked
    /// on the blocking pool when there is one: unlinking a large file takes
    /// tens of milliseconds, and callers hold the index lock.
    pub fn remove(&self, digest: &Digest) -> Result<()> {
        let n = self.next_tmp.fetch_add(1, Ordering::Relaxed);
        let trash = self.tmp_dir.join(format!("evicted-{n}"));
        match fs::rename(self.path_for(digest), &trash) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(e.into()),
            Ok(()) => {}
        }
        let unlink = move || {
            // Leftovers are removed with the rest of tmp/ at the next start.
            let _ = fs::remove_file(&trash);
        };
        match tokio::runtime::Handle::try_current() {
            Ok(runtime) => drop(runtime.spawn_blocking(unlink)),
            Err(_) => unlink(),
        }
        Ok(())
    }

    /// Lists every committed file as (digest, path). Files whose names do not
    /// parse are returned with `None` so the caller can remove them.
    pub fn list(&self) -> Result<Vec<(Option<Digest>, PathBuf)>> {
        let mut out = Vec::new();
        for function in DigestFunction::ALL {
            let dir = self.blobs_dir.join(function.name());
            if !dir.exists() {
                continue;
            }
            for shard in fs::read_dir(&dir)? {
                let shard = shard?.path();
                if !shard.is_dir() {
                    out.push((None, shard));
                    continue;
                }
                for file in fs::read_dir(&shard)? {
                    let path = file?.path();
                    let digest = parse_file_name(function, &path);
                    out.push((digest, path));
                }
            }
        }
        Ok(out)
    }

    /// Streams `[offset, end)` of the committed file of `digest`, verified:
    /// the whole file is read and hashed (bytes outside the range are hashed,
    /// not sent) on the blocking pool, one block ahead of the consumer, and
    /// the chunk that ends the range is held back until the hash checks. On
    /// a mismatch the stream ends with DATA_LOSS instead of that chunk and
    /// `on_corrupt` is called (once) with the reason. `guard` (the caller's
    /// pin) is held until the stream is dropped. NOT_FOUND if the file is
    /// missing or has the wrong size.
    pub fn stream<G, C>(
        &self,
        digest: &Digest,
        offset: u64,
        end: u64,
        guard: G,
        on_corrupt: C,
    ) -> Result<ChunkStream>
    where
        G: Send + 'static,
        C: FnOnce(&str) + Send + 'static,
    {
        let reader = VerifyingReader::new(self.open_checked(digest)?, digest, offset, end);
        let state = ReadAhead {
            next: Some(tokio::task::spawn_blocking(move || reader.step())),
            _guard: guard,
            on_corrupt: Some(on_corrupt),
        };
        Ok(Box::pin(stream::unfold(state, |mut state| async move {
            let task = state.next.take()?;
            let (item, reader) = match task.await {
                Ok(Ok((Step::More(chunk), reader))) => (Ok(chunk), Some(reader)),
                Ok(Ok((Step::Last(chunk), _))) if chunk.is_empty() => return None,
                Ok(Ok((Step::Last(chunk), _))) => (Ok(chunk), None),
                Ok(Err(e)) => (Err(e), None),
                Err(e) => (Err(Error::Internal(format!("read task failed: {e}"))), None),
            };
            if let Err(Error::DataLoss(why)) = &item
                && let Some(on_corrupt) = state.on_corrupt.take()
            {
                on_corrupt(why);
            }
            // Read (and hash) the next block while this one is sent.
            state.next = reader.map(|r| tokio::task::spawn_blocking(move || r.step()));
            Some((item, state))
        })))
    }

    /// Opens the committed file of `digest`; NOT_FOUND if it is missing or
    /// has the wrong size.
    fn open_checked(&self, digest: &Digest) -> Result<File> {
        let path = self.path_for(digest);
        let file = match File::open(&path) {
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
        Ok(file)
    }

    /// Reads and hashes the whole committed file of `digest` (blocking):
    /// DATA_LOSS if it does not hash to `digest`, NOT_FOUND as
    /// [`FileArea::stream`]. For scrubs and start-up checks.
    pub fn verify(&self, digest: &Digest) -> Result<()> {
        let reader = VerifyingReader::new(self.open_checked(digest)?, digest, 0, 0);
        reader.step().map(|_| ())
    }
}

/// The state of a verified read stream: the block being read ahead.
struct ReadAhead<G, C> {
    /// The blocking read of the next block, if the stream goes on.
    next: Option<tokio::task::JoinHandle<Result<(Step, VerifyingReader)>>>,
    /// The caller's pin, held while the stream lives.
    _guard: G,
    /// Told once about a mismatch.
    on_corrupt: Option<C>,
}

/// What one blocking step of a [`VerifyingReader`] yields.
enum Step {
    /// A piece of the range; more follow.
    More(Bytes),
    /// The piece that ends the range (maybe empty), sent only because the
    /// whole file hashed to its digest.
    Last(Bytes),
}

/// Reads a blob file from its start to its end, hashing every byte, and
/// hands out the bytes of `[offset, end)`.
struct VerifyingReader {
    /// The open file, positioned at `pos`.
    file: File,
    /// Hash of `[0, pos)`.
    hasher: Hasher,
    /// What the file must hash to.
    digest: Digest,
    /// Bytes read so far.
    pos: u64,
    /// First byte to hand out.
    offset: u64,
    /// One past the last byte to hand out.
    end: u64,
}

impl VerifyingReader {
    /// A reader of `file` (opened at its start) that hands out
    /// `[offset, end)` and checks the whole file against `digest`.
    fn new(file: File, digest: &Digest, offset: u64, end: u64) -> Self {
        VerifyingReader {
            file,
            hasher: Hasher::new(digest.function),
            digest: *digest,
            pos: 0,
            offset,
            end,
        }
    }

    /// Reads blocks until one holds bytes of the range: `More` with them, or,
    /// once the range is complete, the rest of the file is hashed and `Last`
    /// returned (DATA_LOSS on a mismatch). Blocks the thread.
    fn step(mut self) -> Result<(Step, Self)> {
        loop {
            let block = self.read_block()?;
            let start = self.pos - block.len() as u64;
            let from = self.offset.clamp(start, self.pos) - start;
            let to = self.end.clamp(start, self.pos) - start;
            let piece = block.slice(from as usize..to as usize);
            if self.pos >= self.end.max(self.offset) {
                self.finish()?;
                return Ok((Step::Last(piece), self));
            }
            if !piece.is_empty() {
                return Ok((Step::More(piece), self));
            }
        }
    }

    /// The next block of the file, hashed (empty at the end of the file).
    fn read_block(&mut self) -> Result<Bytes> {
        let n = (self.digest.size - self.pos).min(FILE_READ_BLOCK as u64) as usize;
        let mut buf = vec![0u8; n];
        if let Err(e) = self.file.read_exact(&mut buf) {
            if e.kind() == std::io::ErrorKind::UnexpectedEof {
                return Err(self.data_loss("is shorter than its size"));
            }
            return Err(e.into());
        }
        self.hasher.update(&buf);
        self.pos += n as u64;
        Ok(Bytes::from(buf))
    }

    /// Hashes the rest of the file and checks the digest.
    fn finish(&mut self) -> Result<()> {
        while self.pos < self.digest.size {
            self.read_block()?;
        }
        let hasher = std::mem::replace(&mut self.hasher, Hasher::new(self.digest.function));
        if hasher.finish() != self.digest {
            return Err(self.data_loss("does not hash to its digest"));
        }
        Ok(())
    }

    fn data_loss(&self, what: &str) -> Error {
        Error::DataLoss(format!(
            "blob {} is corrupt in the local store (its file {what}); it was removed",
            self.digest
        ))
    }
}

/// A temporary file for a write in progress, deleted unless it was renamed
/// into place by [`FileArea::publish`].
pub struct TempFile {
    /// The open file (read-write), shared with the readers that follow the
    /// write ([`TempFile::shared`]); taken by `publish`.
    file: Option<Arc<File>>,
    /// Its path under `tmp/`.
    path: PathBuf,
}

impl TempFile {
    /// Appends the next piece of the blob.
    pub fn write_all(&mut self, data: &[u8]) -> Result<()> {
        let file = self.file.as_deref().expect("open until publish");
        Ok((&*file).write_all(data)?)
    }

    /// The open file, for positional reads of what is written so far. The
    /// handle stays valid after the file is renamed into place or deleted.
    pub fn shared(&self) -> Arc<File> {
        self.file.clone().expect("open until publish")
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        // After a successful rename the path is gone and this is a no-op.
        let _ = std::fs::remove_file(&self.path);
    }
}

fn parse_file_name(function: DigestFunction, path: &Path) -> Option<Digest> {
    let name = path.file_name()?.to_str()?;
    let (hash, size) = name.split_once('-')?;
    Digest::parse(function, hash, size.parse().ok()?).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn publish_list_remove() {
        let dir = tempfile::tempdir().unwrap();
        let area = FileArea::open(dir.path(), false).unwrap();
        let data = b"some large blob";
        let digest = Digest::of(DigestFunction::Sha256, data);
        let mut tmp = area.create_temp().unwrap();
        tmp.write_all(data).unwrap();
        area.publish(tmp, &digest).unwrap();
        assert_eq!(fs::read(area.path_for(&digest)).unwrap(), data);
        let listed = area.list().unwrap();
        assert_eq!(listed.len(), 1);
        assert_eq!(listed[0].0, Some(digest));
        area.remove(&digest).unwrap();
        assert!(area.list().unwrap().is_empty());
    }

    #[test]
    fn reopening_clears_uncommitted_writes() {
        let dir = tempfile::tempdir().unwrap();
        let area = FileArea::open(dir.path(), false).unwrap();
        let tmp = area.create_temp().unwrap();
        let path = tmp.path.clone();
        std::mem::forget(tmp); // as if the process died mid-write
        assert!(path.exists());
        drop(area);
        let _area = FileArea::open(dir.path(), false).unwrap();
        assert!(!path.exists());
    }

    #[test]
    fn dropped_temp_file_is_deleted() {
        let dir = tempfile::tempdir().unwrap();
        let area = FileArea::open(dir.path(), false).unwrap();
        let tmp = area.create_temp().unwrap();
        let path = tmp.path.clone();
        drop(tmp);
        assert!(!path.exists());
    }

    fn publish_blob(area: &FileArea, data: &[u8]) -> Digest {
        let digest = Digest::of(DigestFunction::Sha256, data);
        let mut tmp = area.create_temp().unwrap();
        tmp.write_all(data).unwrap();
        area.publish(tmp, &digest).unwrap();
        digest
    }

    /// Every chunk the stream yields, and the reason `on_corrupt` was given.
    async fn drain(
        area: &FileArea,
        digest: &Digest,
        offset: u64,
        end: u64,
    ) -> (Vec<Result<Bytes>>, Option<String>) {
        use futures::StreamExt;
        let told = std::sync::Arc::new(std::sync::Mutex::new(None));
        let sink = told.clone();
        let stream = area
            .stream(digest, offset, end, (), move |why: &str| {
                *sink.lock().unwrap() = Some(why.to_string())
            })
            .unwrap();
        let items = stream.collect().await;
        let why = told.lock().unwrap().take();
        (items, why)
    }

    #[tokio::test]
    async fn stream_reads_a_range_and_holds_the_guard() {
        use futures::StreamExt;
        let dir = tempfile::tempdir().unwrap();
        let area = FileArea::open(dir.path(), false).unwrap();
        let data: Vec<u8> = (0..3 * FILE_READ_BLOCK as u32).map(|i| i as u8).collect();
        let digest = publish_blob(&area, &data);
        let guard = std::sync::Arc::new(());
        let (offset, end) = (10, 2 * FILE_READ_BLOCK as u64 + 5);
        let stream = area
            .stream(&digest, offset, end, guard.clone(), |_: &str| {})
            .unwrap();
        assert_eq!(std::sync::Arc::strong_count(&guard), 2);
        let chunks: Vec<Bytes> = stream.map(|c| c.unwrap()).collect().await;
        assert_eq!(chunks.concat(), data[offset as usize..end as usize]);
        assert_eq!(
            std::sync::Arc::strong_count(&guard),
            1,
            "released at the end"
        );
        area.remove(&digest).unwrap();
        let err = area.stream(&digest, 0, 1, (), |_: &str| {}).err().unwrap();
        assert!(matches!(err, Error::NotFound(_)));
    }

    #[tokio::test]
    async fn every_range_of_an_intact_file_reads_back() {
        let dir = tempfile::tempdir().unwrap();
        let area = FileArea::open(dir.path(), false).unwrap();
        let size = 2 * FILE_READ_BLOCK + 7;
        let data: Vec<u8> = (0..size as u32).map(|i| (i * 7) as u8).collect();
        let digest = publish_blob(&area, &data);
        let block = FILE_READ_BLOCK as u64;
        let size = size as u64;
        for (offset, end) in [
            (0, size),
            (0, 0),
            (size, size),
            (block, block),
            (block - 1, block + 1),
            (block, 2 * block),
            (5, 6),
            (size - 1, size),
        ] {
            let (items, why) = drain(&area, &digest, offset, end).await;
            let bytes: Vec<Bytes> = items.into_iter().map(|c| c.unwrap()).collect();
            assert!(bytes.iter().all(|b| !b.is_empty()), "no empty chunks");
            assert_eq!(bytes.concat(), data[offset as usize..end as usize]);
            assert_eq!(why, None);
        }
        area.verify(&digest).unwrap();
    }

    #[tokio::test]
    async fn a_corrupt_file_ends_the_stream_with_data_loss_before_its_last_chunk() {
        let dir = tempfile::tempdir().unwrap();
        let area = FileArea::open(dir.path(), false).unwrap();
        let data = vec![3u8; 3 * FILE_READ_BLOCK];
        let digest = publish_blob(&area, &data);
        let mut rotten = data.clone();
        rotten[2 * FILE_READ_BLOCK + 100] ^= 1; // in the last block
        fs::write(area.path_for(&digest), &rotten).unwrap();

        let (items, why) = drain(&area, &digest, 0, digest.size).await;
        assert_eq!(items.len(), 3, "two blocks, then the error");
        assert!(items[..2].iter().all(|c| c.is_ok()));
        assert!(matches!(items[2], Err(Error::DataLoss(_))));
        assert!(why.unwrap().contains("does not hash"));

        // A range that does not cover the damage fails all the same.
        let (items, why) = drain(&area, &digest, 0, 10).await;
        assert_eq!(items.len(), 1);
        assert!(matches!(items[0], Err(Error::DataLoss(_))));
        assert!(why.is_some());
        assert!(matches!(area.verify(&digest), Err(Error::DataLoss(_))));
    }
}
