//! Large blobs as plain files beside RocksDB.
//!
//! Blobs above the inline limit are streamed into `tmp/`, hashed on the way,
//! and renamed into `blobs/{function}/{xx}/{hash}-{size}` only after they
//! verified. A rename is atomic, so a reader never sees a partial file; what
//! a crash leaves in `tmp/` is deleted at the next start. Files keep the
//! write amplification at 1× and let reads come straight from the page cache.
//! Reads stream a file a block at a time on the blocking pool.

use std::fs::{self, File};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use bytes::Bytes;
use futures::stream;

use crate::digest::{Digest, DigestFunction};
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
        let file = File::options().write(true).create_new(true).open(&path)?;
        Ok(TempFile {
            file: Some(file),
            path,
        })
    }

    /// Makes a verified temporary file the committed copy of `digest`. On
    /// failure the temporary file is deleted.
    pub fn publish(&self, mut tmp: TempFile, digest: &Digest) -> Result<()> {
        let mut file = tmp.file.take().expect("temp file is open until publish");
        file.flush()?;
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
        for function in [DigestFunction::Sha256] {
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

    /// Streams `[offset, end)` of the committed file of `digest` in blocks,
    /// reading on the blocking pool one block at a time. `guard` (the
    /// caller's pin) is held until the stream is dropped. NOT_FOUND if the
    /// file is missing or has the wrong size.
    pub fn stream<G: Send + 'static>(
        &self,
        digest: &Digest,
        offset: u64,
        end: u64,
        guard: G,
    ) -> Result<ChunkStream> {
        let path = self.path_for(digest);
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
        let state = Some((file, offset, guard));
        Ok(Box::pin(stream::unfold(state, move |state| async move {
            let (mut file, pos, guard) = state?;
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
                Ok(Ok((file, buf))) => {
                    Some((Ok(Bytes::from(buf)), Some((file, pos + n as u64, guard))))
                }
                Ok(Err(e)) => Some((Err(e.into()), None)),
                Err(e) => Some((Err(Error::Internal(format!("read task failed: {e}"))), None)),
            }
        })))
    }
}

/// A temporary file for a write in progress, deleted unless it was renamed
/// into place by [`FileArea::publish`].
pub struct TempFile {
    /// The open file; taken by `publish`.
    file: Option<File>,
    /// Its path under `tmp/`.
    path: PathBuf,
}

impl TempFile {
    /// Appends the next piece of the blob.
    pub fn write_all(&mut self, data: &[u8]) -> Result<()> {
        let file = self.file.as_mut().expect("open until publish");
        Ok(file.write_all(data)?)
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

    #[tokio::test]
    async fn stream_reads_a_range_and_holds_the_guard() {
        use futures::StreamExt;
        let dir = tempfile::tempdir().unwrap();
        let area = FileArea::open(dir.path(), false).unwrap();
        let data: Vec<u8> = (0..3 * FILE_READ_BLOCK as u32).map(|i| i as u8).collect();
        let digest = Digest::of(DigestFunction::Sha256, &data);
        let mut tmp = area.create_temp().unwrap();
        tmp.write_all(&data).unwrap();
        area.publish(tmp, &digest).unwrap();
        let guard = std::sync::Arc::new(());
        let (offset, end) = (10, 2 * FILE_READ_BLOCK as u64 + 5);
        let stream = area.stream(&digest, offset, end, guard.clone()).unwrap();
        assert_eq!(std::sync::Arc::strong_count(&guard), 2);
        let chunks: Vec<Bytes> = stream.map(|c| c.unwrap()).collect().await;
        assert_eq!(chunks.concat(), data[offset as usize..end as usize]);
        assert_eq!(
            std::sync::Arc::strong_count(&guard),
            1,
            "released at the end"
        );
        area.remove(&digest).unwrap();
        let err = area.stream(&digest, 0, 1, ()).err().unwrap();
        assert!(matches!(err, Error::NotFound(_)));
    }
}
