//! Spool files for origin downloads: the digest of a download is known only
//! at its end, so the body is written here first and copied into the store
//! once verified. A spool file is removed when dropped, whatever ended the
//! download (success, failure, cancellation).

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};

use futures::StreamExt;
use tokio::io::{AsyncWriteExt, BufWriter};

use crate::context::RequestContext;
use crate::digest::Digest;
use crate::error::Result;
use crate::store::BlobStore;

/// Write buffer of a spool file, and chunk size of the copy into the store.
const CHUNK: usize = 1 << 20;

/// The spool directory: one file per download in progress.
pub struct Spool {
    /// The directory.
    dir: PathBuf,
    /// Next file number.
    next: AtomicU64,
}

impl Spool {
    /// Creates `dir` and removes what a crash left in it.
    pub fn open(dir: PathBuf) -> std::io::Result<Self> {
        std::fs::create_dir_all(&dir)?;
        for entry in std::fs::read_dir(&dir)? {
            let entry = entry?;
            if entry.file_type()?.is_file() {
                std::fs::remove_file(entry.path())?;
            }
        }
        Ok(Spool {
            dir,
            next: AtomicU64::new(0),
        })
    }

    /// A new, empty spool file.
    pub async fn create(&self) -> std::io::Result<SpoolFile> {
        let n = self.next.fetch_add(1, Ordering::Relaxed);
        let path = self.dir.join(format!("download-{n}"));
        let file = tokio::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&path)
            .await?;
        Ok(SpoolFile {
            file: BufWriter::with_capacity(CHUNK, file),
            path,
        })
    }
}

/// A spool file, removed when dropped (success, failure or cancellation).
pub struct SpoolFile {
    /// Where it is.
    path: PathBuf,
    /// The download is written here.
    file: BufWriter<tokio::fs::File>,
}

impl SpoolFile {
    /// Appends the next bytes of the download.
    pub async fn write(&mut self, data: &[u8]) -> std::io::Result<()> {
        self.file.write_all(data).await
    }

    /// Copies the complete download into `store` as `digest` (unless the
    /// store holds it already). The store verifies it again on commit.
    pub async fn copy_into(
        mut self,
        store: &dyn BlobStore,
        ctx: &RequestContext,
        digest: &Digest,
    ) -> Result<()> {
        self.file.flush().await?;
        if store.find_missing(ctx, &[*digest]).await?.is_empty() {
            return Ok(());
        }
        let file = tokio::fs::File::open(&self.path).await?;
        let mut chunks = tokio_util::io::ReaderStream::with_capacity(file, CHUNK);
        let mut writer = store.begin_write(ctx, digest).await?;
        while let Some(chunk) = chunks.next().await {
            writer.write(chunk?).await?;
        }
        writer.commit().await
    }
}

impl Drop for SpoolFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}
