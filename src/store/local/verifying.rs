//! Reading a blob file from its start to its end, hashing every plain byte
//! of its blob, and handing out a range only once the whole file checked:
//! what makes every read of a file blob verified ([`super::files::FileArea::stream`]).
//!
//! A compressed file (`…-SIZE.zst`) is decoded as it is read, with
//! [`Decompressor`] bounded by the blob's size, a chunk at a time, so a
//! highly compressed block never expands whole into memory. The range is
//! counted in plain bytes ([`Serve::Plain`]: a plain read) or in the bytes
//! on disk ([`Serve::Stored`]: a compressed read served as stored, decoded
//! beside it only to hash).

use std::fs::File;
use std::io::Read;

use bytes::{Buf, Bytes, BytesMut};

use super::files::{BlobFile, Form};
use super::hash_pipe::PlainHasher;
use crate::compression::Decompressor;
use crate::digest::Digest;
use crate::error::{Error, Result};

/// Size of each block read from a blob file (and of each plain block a
/// compressed file is decoded into).
pub const FILE_READ_BLOCK: usize = 1 << 20;

/// What a read of a blob file hands out.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Serve {
    /// The blob's plain bytes (a compressed file is decoded).
    Plain,
    /// The bytes on disk as they are (the whole file).
    Stored,
}

/// The state of a verified read stream: the block being read ahead.
pub struct ReadAhead<G, C> {
    /// The blocking read of the next block, if the stream goes on.
    pub next: Option<tokio::task::JoinHandle<Result<(Step, VerifyingReader)>>>,
    /// The caller's pin, held while the stream lives.
    pub _guard: G,
    /// Told once about a mismatch.
    pub on_corrupt: Option<C>,
}

/// What one blocking step of a [`VerifyingReader`] yields.
pub enum Step {
    /// A piece of the range; more follow.
    More(Bytes),
    /// The piece that ends the range (maybe empty), sent only because the
    /// whole file hashed to its digest.
    Last(Bytes),
}

/// A compressed file's decoder and the compressed bytes read but not yet
/// decoded.
struct Decoding {
    /// Bounded by the blob's size.
    decoder: Decompressor,
    /// Read from the file, not yet fed.
    pending: Bytes,
}

/// Reads a blob file from its start to its end, hashing every plain byte,
/// and hands out the bytes of `[offset, end)` (in the coordinates `serve`
/// names).
pub struct VerifyingReader {
    /// The open file, positioned at `file_pos`.
    file: File,
    /// The file's length on disk.
    file_len: u64,
    /// File bytes read so far.
    file_pos: u64,
    /// Present for a compressed file.
    decoding: Option<Decoding>,
    /// Plain or stored bytes handed out.
    serve: Serve,
    /// Hash of the plain bytes so far (of a compressed file: on a thread
    /// beside the decoding).
    hasher: PlainHasher,
    /// What the plain bytes must hash to.
    digest: Digest,
    /// Bytes produced so far, in the served coordinates.
    pos: u64,
    /// First byte to hand out.
    offset: u64,
    /// One past the last byte to hand out.
    end: u64,
}

impl VerifyingReader {
    /// A reader of `opened` (at its start), the committed `file`, that
    /// hands out `[offset, end)` and checks the whole file.
    pub fn new(opened: File, file: &BlobFile, serve: Serve, offset: u64, end: u64) -> Result<Self> {
        let function = file.digest.function;
        let (decoding, hasher) = match file.form {
            Form::Plain => (None, PlainHasher::here(function)),
            Form::Zstd => (
                Some(Decoding {
                    decoder: Decompressor::new(file.digest.size)?,
                    pending: Bytes::new(),
                }),
                PlainHasher::beside(function),
            ),
        };
        Ok(VerifyingReader {
            file: opened,
            file_len: file.len,
            file_pos: 0,
            decoding,
            serve,
            hasher,
            digest: file.digest,
            pos: 0,
            offset,
            end,
        })
    }

    /// Bytes in the served coordinates: the blob's size, or the file's.
    fn total(&self) -> u64 {
        match self.serve {
            Serve::Plain => self.digest.size,
            Serve::Stored => self.file_len,
        }
    }

    /// Reads blocks until one holds bytes of the range: `More` with them, or,
    /// once the range is complete, the rest of the file is hashed and `Last`
    /// returned (DATA_LOSS on a mismatch). Blocks the thread.
    pub fn step(mut self) -> Result<(Step, Self)> {
        loop {
            let block = self.next_block()?;
            if block.is_empty() && self.pos < self.total().min(self.end.max(self.offset)) {
                return Err(self.data_loss("is shorter than its size"));
            }
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

    /// The next block in the served coordinates, its plain bytes hashed
    /// (empty once the file is read and decoded to its end).
    fn next_block(&mut self) -> Result<Bytes> {
        let block = match (self.decoding.is_some(), self.serve) {
            (false, _) => {
                let block = self.read_file()?;
                self.hasher.update(block.clone());
                block
            }
            (true, Serve::Stored) => {
                let block = self.read_file()?;
                self.decode(block.clone(), usize::MAX)?;
                block
            }
            (true, Serve::Plain) => self.decode(Bytes::new(), FILE_READ_BLOCK)?,
        };
        self.pos += block.len() as u64;
        Ok(block)
    }

    /// The next block of the file as it is on disk (empty at its end).
    fn read_file(&mut self) -> Result<Bytes> {
        let n = (self.file_len - self.file_pos).min(FILE_READ_BLOCK as u64) as usize;
        let mut buf = vec![0u8; n];
        if let Err(e) = self.file.read_exact(&mut buf) {
            if e.kind() == std::io::ErrorKind::UnexpectedEof {
                return Err(self.data_loss("is shorter than its size"));
            }
            return Err(e.into());
        }
        self.file_pos += n as u64;
        Ok(Bytes::from(buf))
    }

    /// Decodes `input`, then (while fewer than `keep` plain bytes were
    /// produced) more of the file, hashing what comes out; returns the
    /// plain bytes produced, up to `keep` of them plus a chunk (none are
    /// kept when `keep` is `usize::MAX`: only hashed).
    fn decode(&mut self, input: Bytes, keep: usize) -> Result<Bytes> {
        let mut out = BytesMut::new();
        let mut decoding = self.decoding.take().expect("a compressed file");
        if !input.is_empty() {
            decoding.pending = input;
        }
        let result = loop {
            if keep != usize::MAX && out.len() >= keep {
                break Ok(());
            }
            if decoding.pending.is_empty() && keep != usize::MAX && self.file_pos < self.file_len {
                match self.read_file() {
                    Ok(more) => decoding.pending = more,
                    Err(e) => break Err(e),
                }
            }
            let (used, plain, more) = match decoding.decoder.step(&decoding.pending) {
                Ok(stepped) => stepped,
                Err(e) => break Err(self.data_loss(&format!("does not decompress: {e}"))),
            };
            decoding.pending.advance(used);
            if keep != usize::MAX {
                out.extend_from_slice(&plain);
            }
            let produced = !plain.is_empty();
            if produced {
                self.hasher.update(plain);
            }
            if decoding.pending.is_empty() && !more {
                if keep == usize::MAX || self.file_pos == self.file_len {
                    break Ok(());
                }
            } else if used == 0 && !produced {
                break Ok(()); // no progress: the end checks say why
            }
        };
        self.decoding = Some(decoding);
        result.map(|()| out.freeze())
    }

    /// Reads and hashes the rest of the file and checks the digest (and, for
    /// a compressed file, that it ends with a whole frame).
    fn finish(&mut self) -> Result<()> {
        while !self.next_block()?.is_empty() {}
        if let Some(decoding) = &self.decoding {
            if decoding.decoder.finish().is_err() {
                return Err(self.data_loss("ends in the middle of a zstd frame"));
            }
            if decoding.decoder.produced() != self.digest.size {
                return Err(self.data_loss("decompresses to another size"));
            }
        }
        let function = self.digest.function;
        let hasher = std::mem::replace(&mut self.hasher, PlainHasher::here(function));
        if hasher.finish()? != self.digest {
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
