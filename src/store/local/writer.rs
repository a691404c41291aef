//! The local store's [`BlobWriter`]: bytes go to a memory buffer (small
//! blobs) or a temporary file (large ones) and are hashed as they arrive;
//! `commit` verifies them and hands the payload to the store's commit.
//!
//! Quota is reserved as the bytes arrive, a window ahead of them ([`Room`]),
//! not for the declared size at once: a client that declares a large blob
//! and sends little holds little. A parked write gives back all but what it
//! received.
//!
//! Hashing and file writes run on the async worker that polls the write
//! (about 0.7 ms per MiB here); the renovation kept that as it was.
//!
//! A write into a temporary file can be followed ([`BlobWriter::follow`]):
//! readers read the file's bytes as they are written, through its shared
//! handle, on the blocking pool.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::sync::Arc;

use async_trait::async_trait;
use bytes::{Bytes, BytesMut};
use tokio::sync::watch;

use super::files::{Form, TempFile};
use super::quota::Reservation;
use crate::compression;
use crate::digest::{Digest, Hasher, verify};
use crate::error::{Error, Result};
use crate::stats::Stats;
use crate::store::{BlobWriter, WriteFollower, WrittenBytes};

/// Small blobs below this size stay plain at rest: a zstd frame's overhead
/// and the call cost more than they could save.
pub const MIN_COMPRESSED_INLINE: usize = 512;

/// The verified bytes of a blob, ready to be committed.
pub enum Payload {
    /// Small blob: becomes a RocksDB value.
    Inline(InlineBytes),
    /// Large blob: a verified temp file to rename into place, holding the
    /// blob in `form`, `len` bytes long.
    File {
        /// The verified file.
        tmp: TempFile,
        /// Plain or compressed.
        form: Form,
        /// Its length on disk.
        len: u64,
    },
}

impl Payload {
    /// A plain file payload of a `size`-byte blob.
    pub fn plain_file(tmp: TempFile, size: u64) -> Self {
        Payload::File {
            tmp,
            form: Form::Plain,
            len: size,
        }
    }
}

/// A small blob's bytes as they are stored: plain, or zstd-compressed.
pub struct InlineBytes {
    /// The bytes of the RocksDB value.
    pub bytes: Bytes,
    /// Whether they are a zstd frame of the blob.
    pub zstd: bool,
}

impl InlineBytes {
    /// A small blob's plain bytes as they will be stored: compressed when
    /// `compress` is on, the blob is not tiny and compressing saves at
    /// least 10% ([`compression::worth_it`]); plain otherwise.
    pub fn pack(plain: Bytes, compress: bool) -> Self {
        if compress && plain.len() >= MIN_COMPRESSED_INLINE {
            let packed = compression::compress(&plain);
            if compression::worth_it(plain.len() as u64, packed.len() as u64) {
                return InlineBytes {
                    bytes: packed,
                    zstd: true,
                };
            }
        }
        InlineBytes {
            bytes: plain,
            zstd: false,
        }
    }
}

/// Where a write's bytes go while they stream in.
pub enum Sink {
    /// Small blob: kept in memory until commit.
    Memory(BytesMut),
    /// Large blob: streamed into a file under `tmp/`.
    File(TempFile),
}

impl Sink {
    /// A memory buffer sized for a blob of `size` bytes.
    pub fn memory(size: u64) -> Self {
        Sink::Memory(BytesMut::with_capacity(size as usize))
    }

    /// Appends the next piece.
    pub fn append(&mut self, data: &[u8]) -> Result<()> {
        match self {
            Sink::Memory(buf) => buf.extend_from_slice(data),
            Sink::File(tmp) => tmp.write_all(data)?,
        }
        Ok(())
    }

    /// Cuts what was appended back to its first `len` bytes.
    pub fn truncate(&mut self, len: u64) -> Result<()> {
        match self {
            Sink::Memory(buf) => buf.truncate(len as usize),
            Sink::File(tmp) => tmp.truncate(len)?,
        }
        Ok(())
    }

    /// The plain bytes of a `size`-byte blob as a payload (inline bytes
    /// left plain: the store's commit decides whether to compress them).
    fn into_payload(self, size: u64) -> Payload {
        match self {
            Sink::Memory(buf) => Payload::Inline(InlineBytes {
                bytes: buf.freeze(),
                zstd: false,
            }),
            Sink::File(tmp) => Payload::plain_file(tmp, size),
        }
    }
}

/// Makes a verified payload visible, turning the write's reservation into
/// stored bytes (the store's commit). Called at most once.
pub type Commit = Box<dyn FnOnce(Payload, Reservation) -> Result<()> + Send>;

/// Reserves this many more bytes of quota, evicting as needed (the store's
/// reserve).
pub type Reserve = Arc<dyn Fn(u64) -> Result<Reservation> + Send + Sync>;

/// The quota a storing write holds, and how it gets more.
pub struct Room {
    /// What is held: at least the bytes received, at most the blob's size.
    pub held: Reservation,
    /// Asks for more.
    pub reserve: Reserve,
    /// How far ahead of the received bytes a growth reserves.
    pub window: u64,
}

impl Room {
    /// Makes sure `received` bytes of a `size`-byte blob are covered,
    /// reserving up to a window beyond them when they are not.
    pub fn cover(&mut self, received: u64, size: u64) -> Result<()> {
        let held = self.held.bytes();
        if received <= held {
            return Ok(());
        }
        let wanted = size.min(received.saturating_add(self.window));
        let more = (self.reserve)(wanted - held)?;
        self.held.absorb(more);
        Ok(())
    }
}

/// Writes one blob into the local store, hashing as it goes.
pub struct LocalWriter {
    /// What the bytes must hash to.
    digest: Digest,
    /// Hash and size of the bytes so far.
    hasher: Hasher,
    /// Counts digest mismatches.
    stats: Arc<Stats>,
    /// Bytes written so far, for the readers that follow the write.
    written: watch::Sender<u64>,
    /// Where the bytes go, the quota they hold and how they become
    /// visible; `None` when nothing will be stored (the blob is already
    /// there, or empty): only verify.
    target: Option<(Sink, Room, Commit)>,
}

impl LocalWriter {
    /// A writer that stores the blob: bytes go to `sink` within the quota
    /// of `room`, and `commit` receives them once they verified.
    pub fn storing(
        digest: Digest,
        stats: Arc<Stats>,
        sink: Sink,
        room: Room,
        commit: Commit,
    ) -> Self {
        LocalWriter {
            digest,
            hasher: Hasher::new(digest.function),
            stats,
            written: watch::Sender::new(0),
            target: Some((sink, room, commit)),
        }
    }

    /// A writer for a blob that needs no storing: it still verifies what the
    /// client sends.
    pub fn verifying_only(digest: Digest, stats: Arc<Stats>) -> Self {
        LocalWriter {
            digest,
            hasher: Hasher::new(digest.function),
            stats,
            written: watch::Sender::new(0),
            target: None,
        }
    }
}

#[async_trait]
impl BlobWriter for LocalWriter {
    async fn write(&mut self, data: Bytes) -> Result<()> {
        if self.hasher.size() + data.len() as u64 > self.digest.size {
            Stats::add(&self.stats.digest_mismatches, 1);
            return Err(Error::InvalidArgument(format!(
                "size mismatch for {}: received more than {} bytes",
                self.digest, self.digest.size
            )));
        }
        if let Some((sink, room, _)) = &mut self.target {
            room.cover(self.hasher.size() + data.len() as u64, self.digest.size)?;
            sink.append(&data)?;
        }
        self.hasher.update(&data);
        self.written.send_replace(self.hasher.size());
        Ok(())
    }

    fn committed_size(&self) -> u64 {
        self.hasher.size()
    }

    fn park(&mut self) -> bool {
        if let Some((_, room, _)) = &mut self.target {
            room.held.shrink_to(self.hasher.size());
        }
        true
    }

    async fn commit(self: Box<Self>) -> Result<()> {
        let LocalWriter {
            digest,
            hasher,
            stats,
            target,
            ..
        } = *self;
        if let Err(e) = verify(&digest, &hasher.finish()) {
            Stats::add(&stats.digest_mismatches, 1);
            return Err(e);
        }
        match target {
            Some((sink, room, commit)) => commit(sink.into_payload(digest.size), room.held),
            None => Ok(()), // already stored, or the empty blob
        }
    }

    /// Followable when the bytes go to a temporary file (small blobs,
    /// buffered in memory, and writes that store nothing are not).
    fn follow(&self) -> Option<WriteFollower> {
        let Some((Sink::File(tmp), _, _)) = &self.target else {
            return None;
        };
        let bytes = Arc::new(SharedFile(tmp.shared()));
        Some(WriteFollower::new(bytes, self.written.subscribe()))
    }
}

/// A write's temporary file, read by the readers that follow it.
struct SharedFile(Arc<File>);

#[async_trait]
impl WrittenBytes for SharedFile {
    async fn read_at(&self, offset: u64, len: usize) -> Result<Bytes> {
        let file = self.0.clone();
        let read = tokio::task::spawn_blocking(move || -> Result<Bytes> {
            let mut buf = vec![0u8; len];
            file.read_exact_at(&mut buf, offset)?;
            Ok(Bytes::from(buf))
        });
        match read.await {
            Ok(result) => result,
            Err(e) => Err(Error::Internal(format!("read task failed: {e}"))),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use super::*;
    use crate::digest::DigestFunction;
    use crate::store::local::files::FileArea;
    use crate::store::local::quota::SharedIndex;

    /// A commit that records what it was given.
    fn recorder() -> (Commit, Arc<Mutex<Option<Payload>>>) {
        let got = Arc::new(Mutex::new(None));
        let sink = got.clone();
        let commit: Commit = Box::new(move |payload, _| {
            *sink.lock().unwrap() = Some(payload);
            Ok(())
        });
        (commit, got)
    }

    /// Room in `index` starting with `first` bytes, growing by `window`.
    fn room_in(index: &SharedIndex, first: u64, window: u64) -> Room {
        index.lock().reserve(first).unwrap();
        let shared = index.clone();
        Room {
            held: index.reservation(first),
            reserve: Arc::new(move |bytes| {
                shared.lock().reserve(bytes)?;
                Ok(shared.reservation(bytes))
            }),
            window,
        }
    }

    /// Plenty of room, for tests about something else.
    fn room() -> Room {
        room_in(&SharedIndex::new(1 << 20), 0, 1 << 20)
    }

    fn reserved(index: &SharedIndex) -> u64 {
        index.lock().occupancy().reserved_bytes
    }

    #[tokio::test]
    async fn quota_is_reserved_a_window_ahead_as_bytes_arrive() {
        let index = SharedIndex::new(100);
        let data = Bytes::from(vec![7u8; 50]);
        let digest = Digest::of(DigestFunction::Sha256, &data);
        let (commit, got) = recorder();
        let room = room_in(&index, 10, 10);
        let mut writer = LocalWriter::storing(digest, stats(), Sink::memory(50), room, commit);
        assert_eq!(reserved(&index), 10);
        writer.write(data.slice(..5)).await.unwrap();
        assert_eq!(reserved(&index), 10, "within the first window");
        writer.write(data.slice(5..15)).await.unwrap();
        assert_eq!(reserved(&index), 25, "received plus a window");
        assert!(writer.park());
        assert_eq!(reserved(&index), 15, "parked: only what was received");
        writer.write(data.slice(15..45)).await.unwrap();
        assert_eq!(reserved(&index), 50, "never beyond the blob's size");
        writer.write(data.slice(45..)).await.unwrap();
        Box::new(writer).commit().await.unwrap();
        assert!(got.lock().unwrap().is_some());
    }

    #[tokio::test]
    async fn a_write_that_cannot_grow_its_reservation_fails() {
        let index = SharedIndex::new(30);
        let data = Bytes::from(vec![7u8; 50]);
        let digest = Digest::of(DigestFunction::Sha256, &data);
        let (commit, _) = recorder();
        let room = room_in(&index, 10, 10);
        let mut writer = LocalWriter::storing(digest, stats(), Sink::memory(50), room, commit);
        writer.write(data.slice(..20)).await.unwrap();
        let err = writer.write(data.slice(20..40)).await.unwrap_err();
        assert!(matches!(err, Error::ResourceExhausted(_)), "{err:?}");
        assert_eq!(
            writer.committed_size(),
            20,
            "the refused piece was not taken"
        );
        drop(writer);
        assert_eq!(reserved(&index), 0);
    }

    fn stats() -> Arc<Stats> {
        Arc::new(Stats::default())
    }

    #[tokio::test]
    async fn verified_bytes_reach_the_commit() {
        let digest = Digest::of(DigestFunction::Sha256, b"hello world");
        let (commit, got) = recorder();
        let mut writer = LocalWriter::storing(digest, stats(), Sink::memory(11), room(), commit);
        writer.write(Bytes::from_static(b"hello ")).await.unwrap();
        writer.write(Bytes::from_static(b"world")).await.unwrap();
        assert_eq!(writer.committed_size(), 11);
        Box::new(writer).commit().await.unwrap();
        let payload = got.lock().unwrap().take().unwrap();
        assert!(matches!(payload, Payload::Inline(b) if b.bytes == "hello world" && !b.zstd));
    }

    #[tokio::test]
    async fn large_blobs_stream_into_a_temp_file() {
        let dir = tempfile::tempdir().unwrap();
        let area = FileArea::open(dir.path(), false).unwrap();
        let digest = Digest::of(DigestFunction::Sha256, b"large");
        let (commit, got) = recorder();
        let sink = Sink::File(area.create_temp().unwrap());
        let mut writer = LocalWriter::storing(digest, stats(), sink, room(), commit);
        writer.write(Bytes::from_static(b"large")).await.unwrap();
        Box::new(writer).commit().await.unwrap();
        let Some(Payload::File { tmp, .. }) = got.lock().unwrap().take() else {
            panic!("expected a file payload");
        };
        area.publish(tmp, &digest, Form::Plain).unwrap();
        assert_eq!(std::fs::read(area.path_for(&digest)).unwrap(), b"large");
    }

    #[tokio::test]
    async fn a_file_write_can_be_followed_after_its_commit_too() {
        let dir = tempfile::tempdir().unwrap();
        let area = FileArea::open(dir.path(), false).unwrap();
        let data = Bytes::from_static(b"followed while written");
        let digest = Digest::of(DigestFunction::Sha256, &data);
        let (commit, got) = recorder();
        let sink = Sink::File(area.create_temp().unwrap());
        let mut writer = LocalWriter::storing(digest, stats(), sink, room(), commit);
        let follower = writer.follow().expect("a file write is followable");
        let mut written = follower.written();
        writer.write(data.slice(..8)).await.unwrap();
        assert_eq!(*written.borrow_and_update(), 8);
        assert_eq!(follower.read_at(2, 6).await.unwrap(), data.slice(2..8));
        assert!(follower.read_at(2, 7).await.is_err(), "not written yet");
        writer.write(data.slice(8..)).await.unwrap();
        Box::new(writer).commit().await.unwrap();
        let Some(Payload::File { tmp, .. }) = got.lock().unwrap().take() else {
            panic!("expected a file payload");
        };
        area.publish(tmp, &digest, Form::Plain).unwrap();
        assert_eq!(*written.borrow_and_update(), data.len() as u64);
        assert!(written.changed().await.is_err(), "the writer is gone");
        let all = follower.read_at(0, data.len()).await.unwrap();
        assert_eq!(all, data, "readable after the rename");
        area.remove(&digest, Form::Plain).unwrap();
        assert_eq!(follower.read_at(9, 5).await.unwrap(), data.slice(9..14));
    }

    #[tokio::test]
    async fn memory_and_verifying_writes_are_not_followable() {
        let digest = Digest::of(DigestFunction::Sha256, b"abc");
        let (commit, _) = recorder();
        let writer = LocalWriter::storing(digest, stats(), Sink::memory(3), room(), commit);
        assert!(writer.follow().is_none());
        assert!(
            LocalWriter::verifying_only(digest, stats())
                .follow()
                .is_none()
        );
    }

    #[tokio::test]
    async fn too_many_bytes_fail_at_once() {
        let digest = Digest::of(DigestFunction::Sha256, b"abc");
        let stats = stats();
        let (commit, _) = recorder();
        let mut writer =
            LocalWriter::storing(digest, stats.clone(), Sink::memory(3), room(), commit);
        let err = writer.write(Bytes::from_static(b"abcd")).await.unwrap_err();
        assert!(matches!(err, Error::InvalidArgument(_)));
        assert_eq!(Stats::get(&stats.digest_mismatches), 1);
    }

    #[tokio::test]
    async fn a_mismatch_commits_nothing() {
        let digest = Digest::of(DigestFunction::Sha256, b"abc");
        let stats = stats();
        let (commit, got) = recorder();
        let mut writer =
            LocalWriter::storing(digest, stats.clone(), Sink::memory(3), room(), commit);
        writer.write(Bytes::from_static(b"abd")).await.unwrap();
        let err = Box::new(writer).commit().await.unwrap_err();
        assert!(matches!(err, Error::InvalidArgument(_)));
        assert!(got.lock().unwrap().is_none());
        assert_eq!(Stats::get(&stats.digest_mismatches), 1);
    }

    #[tokio::test]
    async fn verifying_only_still_verifies() {
        let digest = Digest::of(DigestFunction::Sha256, b"abc");
        let mut writer = LocalWriter::verifying_only(digest, stats());
        writer.write(Bytes::from_static(b"abc")).await.unwrap();
        Box::new(writer).commit().await.unwrap();
        let mut writer = LocalWriter::verifying_only(digest, stats());
        writer.write(Bytes::from_static(b"xyz")).await.unwrap();
        assert!(Box::new(writer).commit().await.is_err());
    }
}
