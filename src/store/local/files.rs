//! Large blobs as files beside RocksDB.
//!
//! Blobs above the inline limit are streamed into `tmp/`, hashed on the way,
//! and renamed into `blobs/{function}/{xx}/{hash}-{size}` (plain) or
//! `…-{size}.zst` (zstd-compressed: a distinct name, so a reader never takes
//! one form for the other) only after they verified. A rename is atomic, so a reader never sees a partial file; what
//! a crash leaves in `tmp/` is deleted at the next start. Files keep the
//! write amplification at 1× and let reads come straight from the page cache.
//! Reads stream a file a block at a time on the blocking pool.

use std::fs::{self, File};
use std::io::{Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use futures::stream;

use super::verifying::{ReadAhead, Serve, Step, VerifyingReader};
use crate::digest::{Digest, DigestFunction};
use crate::error::{Error, Result};
use crate::store::ChunkStream;

/// The form a blob file holds its blob in.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Form {
    /// The blob's bytes as they are: `{hash}-{size}`.
    Plain,
    /// One or more zstd frames of the blob: `{hash}-{size}.zst`.
    Zstd,
}

/// A file found under `blobs/`: its blob and form when its name parses.
pub type Listed = (Option<(Digest, Form)>, PathBuf);

/// A committed blob file: which blob, in which form, how many bytes on disk.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BlobFile {
    /// The blob it holds.
    pub digest: Digest,
    /// Plain or compressed.
    pub form: Form,
    /// Its length on disk (the blob's size when plain).
    pub len: u64,
}

impl BlobFile {
    /// The plain file of `digest`.
    pub fn plain(digest: Digest) -> Self {
        BlobFile {
            digest,
            form: Form::Plain,
            len: digest.size,
        }
    }
}

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

    /// Where the committed file of `digest` in `form` lives.
    pub fn path_of(&self, digest: &Digest, form: Form) -> PathBuf {
        let path = self.path_for(digest);
        match form {
            Form::Plain => path,
            Form::Zstd => {
                let mut name = path.into_os_string();
                name.push(ZSTD_SUFFIX);
                name.into()
            }
        }
    }

    /// Where the committed plain file for `digest` lives.
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

    /// Makes a verified temporary file the committed copy of `digest` in
    /// `form`. On failure the temporary file is deleted.
    pub fn publish(&self, mut tmp: TempFile, digest: &Digest, form: Form) -> Result<()> {
        let file = tmp.file.take().expect("temp file is open until publish");
        if self.sync {
            file.sync_all()?;
        }
        drop(file);
        let dest = self.path_of(digest, form);
        let dir = dest.parent().expect("blob paths have a parent");
        fs::create_dir_all(dir)?;
        fs::rename(&tmp.path, &dest)?;
        if self.sync {
            File::open(dir)?.sync_all()?;
        }
        Ok(())
    }

    /// Deletes the committed file of `digest` in `form`, if any. The file is renamed
    /// into `tmp/` at once (so the blob is gone from `blobs/`), and unlinked
    /// on the blocking pool when there is one: unlinking a large file takes
    /// tens of milliseconds, and callers hold the index lock.
    pub fn remove(&self, digest: &Digest, form: Form) -> Result<()> {
        let n = self.next_tmp.fetch_add(1, Ordering::Relaxed);
        let trash = self.tmp_dir.join(format!("evicted-{n}"));
        match fs::rename(self.path_of(digest, form), &trash) {
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

    /// Lists every committed file as (digest and form, path). Files whose
    /// names do not parse are returned with `None` so the caller can remove
    /// them.
    pub fn list(&self) -> Result<Vec<Listed>> {
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

    /// Streams `[offset, end)` of the committed `file`, verified: the whole
    /// file is read and its blob hashed (bytes outside the range are
    /// hashed, not sent; a compressed file is decoded as it is read) on the
    /// blocking pool, one block ahead of the consumer, and the chunk that
    /// ends the range is held back until the hash checks. `serve` says
    /// whether the range counts (and the chunks carry) the blob's plain
    /// bytes or the bytes on disk as they are. On a mismatch the stream ends
    /// with DATA_LOSS instead of that chunk and `on_corrupt` is called
    /// (once) with the reason. `guard` (the caller's pin) is held until the
    /// stream is dropped. NOT_FOUND if the file is missing or has the wrong
    /// length.
    pub fn stream<G, C>(
        &self,
        file: &BlobFile,
        serve: Serve,
        offset: u64,
        end: u64,
        guard: G,
        on_corrupt: C,
    ) -> Result<ChunkStream>
    where
        G: Send + 'static,
        C: FnOnce(&str) + Send + 'static,
    {
        let reader = VerifyingReader::new(self.open_checked(file)?, file, serve, offset, end)?;
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

    /// Opens the committed `file`; NOT_FOUND if it is missing or has the
    /// wrong length.
    fn open_checked(&self, file: &BlobFile) -> Result<File> {
        let digest = &file.digest;
        let path = self.path_of(digest, file.form);
        let opened = match File::open(&path) {
            Ok(opened) => opened,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(Error::NotFound(format!("blob {digest} file is missing")));
            }
            Err(e) => return Err(e.into()),
        };
        if opened.metadata()?.len() != file.len {
            return Err(Error::NotFound(format!(
                "blob {digest} file has the wrong size"
            )));
        }
        Ok(opened)
    }

    /// Reads the whole committed `file` and hashes its blob (blocking):
    /// DATA_LOSS if it does not hash to its digest (or does not decode),
    /// NOT_FOUND as [`FileArea::stream`]. For scrubs and start-up checks.
    pub fn verify(&self, file: &BlobFile) -> Result<()> {
        let reader = VerifyingReader::new(self.open_checked(file)?, file, Serve::Plain, 0, 0)?;
        reader.step().map(|_| ())
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

    /// Cuts the file back to its first `len` bytes and goes on writing
    /// there (a parked compressed upload drops a partial frame).
    pub fn truncate(&mut self, len: u64) -> Result<()> {
        let mut file = self.file.as_deref().expect("open until publish");
        file.set_len(len)?;
        file.seek(SeekFrom::Start(len))?;
        Ok(())
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

/// What ends the name of a compressed blob file.
const ZSTD_SUFFIX: &str = ".zst";

fn parse_file_name(function: DigestFunction, path: &Path) -> Option<(Digest, Form)> {
    let name = path.file_name()?.to_str()?;
    let (name, form) = match name.strip_suffix(ZSTD_SUFFIX) {
        Some(name) => (name, Form::Zstd),
        None => (name, Form::Plain),
    };
    let (hash, size) = name.split_once('-')?;
    let digest = Digest::parse(function, hash, size.parse().ok()?).ok()?;
    Some((digest, form))
}

#[cfg(test)]
mod tests;
