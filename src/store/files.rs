//! Large blobs as plain files beside RocksDB.
//!
//! Blobs above the inline limit are streamed into `tmp/`, hashed on the way,
//! and renamed into `blobs/{function}/{xx}/{hash}-{size}` only after they
//! verified. A rename is atomic, so a reader never sees a partial file; what
//! a crash leaves in `tmp/` is deleted at the next start. Files keep the
//! write amplification at 1× and let reads come straight from the page cache.

use std::fs::{self, File};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use crate::digest::{Digest, DigestFunction};
use crate::error::Result;

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
    pub fn create_temp(&self) -> Result<(File, PathBuf)> {
        let n = self.next_tmp.fetch_add(1, Ordering::Relaxed);
        let path = self.tmp_dir.join(format!("upload-{n}"));
        let file = File::options().write(true).create_new(true).open(&path)?;
        Ok((file, path))
    }

    /// Makes a verified temporary file the committed copy of `digest`.
    pub fn publish(&self, mut file: File, tmp: &Path, digest: &Digest) -> Result<()> {
        file.flush()?;
        if self.sync {
            file.sync_all()?;
        }
        drop(file);
        let dest = self.path_for(digest);
        let dir = dest.parent().expect("blob paths have a parent");
        fs::create_dir_all(dir)?;
        fs::rename(tmp, &dest)?;
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
        let (mut file, tmp) = area.create_temp().unwrap();
        file.write_all(data).unwrap();
        area.publish(file, &tmp, &digest).unwrap();
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
        let (_file, tmp) = area.create_temp().unwrap();
        assert!(tmp.exists());
        drop(area);
        let _area = FileArea::open(dir.path(), false).unwrap();
        assert!(!tmp.exists());
    }
}
