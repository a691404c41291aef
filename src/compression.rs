//! zstd, the one compressor Outpost speaks (REAPI `Compressor.ZSTD`): the
//! wire form of `compressed-blobs` and of compressed batch entries, the form
//! blobs take at rest when it pays, and the form they cross the WAN in when
//! the upstream speaks it.
//!
//! Everything here is push-style and bounded, on libzstd's streaming API
//! (the `zstd` crate): a [`Decompressor`] never produces more than the
//! digest's declared size, so a tiny upload that expands without end (a
//! zstd bomb) is cut off at that size instead of being buffered. The one
//! adapter from a compressed write to a plain one, [`DecompressingWriter`],
//! is what every store that has no native compressed write uses.

use async_trait::async_trait;
use bazel_remote_apis::build::bazel::remote::execution::v2::compressor::Value as CompressorProto;
use bytes::Buf;
use bytes::Bytes;
use futures::StreamExt;
use zstd::stream::raw::{DParameter, Decoder, Encoder, InBuffer, Operation, OutBuffer};

use crate::digest::Digest;
use crate::error::{Error, Result, clip};
use crate::store::{BlobWriter, ChunkStream, WriteFollower};

/// The zstd level of everything Outpost compresses itself: level 1 runs at
/// several hundred MB/s per core and already gets most of the gain on build
/// outputs.
pub const LEVEL: i32 = 1;

/// Output chunk size of the streaming coders.
const OUT_CHUNK: usize = 128 << 10;

/// The largest zstd window (log2) a decoder accepts for a small blob: 8 MiB
/// covers every standard level up to 19 in streaming mode. A frame header
/// can ask its decoder for a window of that size before any data arrives,
/// so an unbounded window (libzstd allows 128 MiB) would let a few bytes
/// reserve that much memory per upload.
const SMALL_WINDOW_LOG: u32 = 23;
/// libzstd's own limit.
const MAX_WINDOW_LOG: u32 = 27;

/// A compressor other than identity (identity is "no compressor": plain).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Compressor {
    /// Zstandard.
    Zstd,
}

impl Compressor {
    /// Every compressor this build serves, for Capabilities.
    pub const ALL: &'static [Compressor] = &[Compressor::Zstd];

    /// The resource-name segment (`compressed-blobs/zstd/…`).
    pub const fn name(self) -> &'static str {
        match self {
            Compressor::Zstd => "zstd",
        }
    }

    /// Inverse of [`Compressor::name`]; `None` for a compressor not served.
    pub fn from_name(name: &str) -> Option<Self> {
        Compressor::ALL.iter().copied().find(|c| c.name() == name)
    }

    /// The REAPI enum value.
    pub fn to_proto(self) -> i32 {
        match self {
            Compressor::Zstd => CompressorProto::Zstd as i32,
        }
    }

    /// Maps a request's `compressor` field: `Ok(None)` for identity,
    /// INVALID_ARGUMENT for one this server does not advertise.
    pub fn from_proto(value: i32) -> Result<Option<Self>> {
        match CompressorProto::try_from(value) {
            Ok(CompressorProto::Identity) => Ok(None),
            Ok(CompressorProto::Zstd) => Ok(Some(Compressor::Zstd)),
            Ok(other) => Err(Error::InvalidArgument(format!(
                "compressor {} is not supported by this server (supported: ZSTD)",
                other.as_str_name()
            ))),
            Err(_) => Err(Error::InvalidArgument(format!(
                "unknown compressor value {value} (supported: ZSTD)"
            ))),
        }
    }
}

/// Whether a compressed form of `compressed` bytes is worth keeping for
/// `plain` bytes: it saves at least 10%.
pub fn worth_it(plain: u64, compressed: u64) -> bool {
    compressed.saturating_mul(10) <= plain.saturating_mul(9)
}

/// Compresses a whole in-memory blob (batch entries, inline blobs).
pub fn compress(data: &[u8]) -> Bytes {
    // Compression of a slice into a Vec fails only on allocation failure.
    Bytes::from(zstd::bulk::compress(data, LEVEL).expect("zstd compression of a slice"))
}

/// Decompresses a whole in-memory compressed blob that must expand to
/// exactly `size` bytes. INVALID_ARGUMENT when it is not zstd, is cut
/// short, or expands to another size (never more than `size` is produced).
pub fn decompress(data: &[u8], size: u64) -> Result<Bytes> {
    let mut decoder = Decompressor::new(size)?;
    let mut out = Vec::with_capacity(size.min(16 << 20) as usize);
    for chunk in decoder.feed(data)? {
        out.extend_from_slice(&chunk);
    }
    decoder.finish()?;
    if decoder.produced() != size {
        return Err(short(decoder.produced(), size));
    }
    Ok(Bytes::from(out))
}

/// A push-style, bounded zstd decoder: feed compressed bytes, get plain
/// chunks. Accepts several concatenated frames.
pub struct Decompressor {
    decoder: Decoder<'static>,
    /// Most plain bytes this decoder may produce.
    limit: u64,
    /// Plain bytes produced so far.
    produced: u64,
    /// Whether the last frame fed is complete (true before any input).
    at_frame_end: bool,
}

impl Decompressor {
    /// A decoder that fails once its output would pass `limit` bytes; its
    /// window is bounded by the limit too (never below 8 MiB, which every
    /// standard level fits in).
    pub fn new(limit: u64) -> Result<Self> {
        let internal = |e: std::io::Error| Error::Internal(format!("zstd decoder: {e}"));
        let mut decoder = Decoder::new().map_err(internal)?;
        let needed = u64::BITS - limit.saturating_sub(1).leading_zeros();
        let window_log = needed.clamp(SMALL_WINDOW_LOG, MAX_WINDOW_LOG);
        decoder
            .set_parameter(DParameter::WindowLogMax(window_log))
            .map_err(internal)?;
        Ok(Decompressor {
            decoder,
            limit,
            produced: 0,
            at_frame_end: true,
        })
    }

    /// Plain bytes produced so far.
    pub fn produced(&self) -> u64 {
        self.produced
    }

    /// Decodes from the front of `input` until one chunk of plain bytes is
    /// ready (returned; `input` is advanced past what was consumed) or the
    /// input is used up with nothing pending (`None`). Callers hand each
    /// chunk on before asking for the next, so no more than a chunk is ever
    /// held, however far the input expands (a zstd bomb).
    pub fn next_chunk(&mut self, input: &mut Bytes) -> Result<Option<Bytes>> {
        loop {
            let (used, out, _) = self.step(input)?;
            input.advance(used);
            if !out.is_empty() {
                return Ok(Some(out));
            }
            if input.is_empty() {
                return Ok(None);
            }
            if used == 0 {
                return Err(Error::InvalidArgument(
                    "the zstd data does not decode".into(),
                ));
            }
        }
    }

    /// Decodes a whole in-memory input, returning its plain bytes (all of
    /// them at once: only for inputs whose limit is small, see [`decompress`]).
    fn feed(&mut self, input: &[u8]) -> Result<Vec<Bytes>> {
        let mut chunks = Vec::new();
        let mut at = 0;
        loop {
            let (used, out, more) = self.step(&input[at..])?;
            at += used;
            if !out.is_empty() {
                chunks.push(out);
            }
            if at == input.len() && !more {
                return Ok(chunks);
            }
        }
    }

    /// One bounded decoding step, for callers that must not hold more than
    /// a chunk of output at a time (a highly compressed input can expand a
    /// thousandfold): decodes from the start of `input` into at most one
    /// output chunk. Returns the input bytes consumed, the plain bytes
    /// produced, and whether more output may be pending (the chunk was full:
    /// call again, with the rest of the input or none).
    pub fn step(&mut self, input: &[u8]) -> Result<(usize, Bytes, bool)> {
        let mut input = InBuffer::around(input);
        let mut buf = vec![0u8; OUT_CHUNK];
        let mut output = OutBuffer::around(&mut buf[..]);
        let hint = self
            .decoder
            .run(&mut input, &mut output)
            .map_err(|e| Error::InvalidArgument(format!("the zstd data is corrupt: {e}")))?;
        let written = output.pos();
        let consumed = input.pos();
        if hint == 0 {
            self.at_frame_end = true;
        } else if written > 0 || consumed > 0 {
            self.at_frame_end = false;
        }
        self.produced += written as u64;
        if self.produced > self.limit {
            return Err(Error::InvalidArgument(format!(
                "the zstd data expands past the declared size of {} bytes",
                self.limit
            )));
        }
        buf.truncate(written);
        Ok((consumed, Bytes::from(buf), written == OUT_CHUNK))
    }

    /// Whether the input so far ends at the end of a frame (where a
    /// resumed upload may start a new one).
    pub fn at_frame_end(&self) -> bool {
        self.at_frame_end
    }

    /// Checks that the input ended at the end of a frame.
    pub fn finish(&self) -> Result<()> {
        if self.at_frame_end {
            Ok(())
        } else {
            Err(Error::InvalidArgument(
                "the zstd data ends in the middle of a frame".into(),
            ))
        }
    }
}

/// A push-style zstd encoder: feed plain bytes, get compressed ones; one
/// frame per encoder.
pub struct StreamCompressor {
    encoder: Encoder<'static>,
}

impl StreamCompressor {
    /// An encoder at [`LEVEL`].
    pub fn new() -> Result<Self> {
        Ok(StreamCompressor {
            encoder: Encoder::new(LEVEL)
                .map_err(|e| Error::Internal(format!("zstd encoder: {e}")))?,
        })
    }

    /// Compresses `input`; returns what the encoder emitted (may be empty).
    pub fn feed(&mut self, input: &[u8]) -> Result<Bytes> {
        let mut input = InBuffer::around(input);
        let mut out = Vec::new();
        while input.pos() < input.src.len() {
            let mut buf = vec![0u8; OUT_CHUNK];
            let mut output = OutBuffer::around(&mut buf[..]);
            self.encoder
                .run(&mut input, &mut output)
                .map_err(|e| Error::Internal(format!("zstd compression: {e}")))?;
            let n = output.pos();
            out.extend_from_slice(&buf[..n]);
        }
        Ok(Bytes::from(out))
    }

    /// Ends the frame; returns the last compressed bytes.
    pub fn finish(mut self) -> Result<Bytes> {
        let mut out = Vec::new();
        loop {
            let mut buf = vec![0u8; OUT_CHUNK];
            let mut output = OutBuffer::around(&mut buf[..]);
            let remaining = self
                .encoder
                .finish(&mut output, true)
                .map_err(|e| Error::Internal(format!("zstd compression: {e}")))?;
            let n = output.pos();
            out.extend_from_slice(&buf[..n]);
            if remaining == 0 {
                return Ok(Bytes::from(out));
            }
        }
    }
}

/// Compresses a plain chunk stream into one zstd frame, as it streams.
pub fn compress_stream(input: ChunkStream) -> ChunkStream {
    let state = (input, StreamCompressor::new().map(Some));
    futures::stream::unfold(state, |(mut input, encoder)| async move {
        let mut encoder = match encoder {
            Ok(Some(encoder)) => encoder,
            Ok(None) => return None,
            Err(e) => return Some((Err(e), (input, Ok(None)))),
        };
        loop {
            match input.next().await {
                Some(Ok(chunk)) => match encoder.feed(&chunk) {
                    Ok(out) if out.is_empty() => continue,
                    Ok(out) => return Some((Ok(out), (input, Ok(Some(encoder))))),
                    Err(e) => return Some((Err(e), (input, Ok(None)))),
                },
                Some(Err(e)) => return Some((Err(e), (input, Ok(None)))),
                None => return Some((encoder.finish(), (input, Ok(None)))),
            }
        }
    })
    .boxed()
}

fn short(produced: u64, size: u64) -> Error {
    Error::InvalidArgument(format!(
        "the zstd data expands to {produced} bytes, the digest declares {size}"
    ))
}

/// A compressed write on top of a plain one: decodes each piece (bounded by
/// the digest's size) and writes the plain bytes to the inner writer, which
/// verifies the digest at commit as for any write. Every store without a
/// native compressed write uses it (`BlobStore::begin_write_compressed`).
///
/// `committed_size` is the inner writer's, in plain bytes: where a client
/// resumes a compressed upload (REAPI: the first `write_offset` of a
/// compressed Write is an uncompressed offset). A resumed upload starts a
/// new zstd frame, so parking resets the decoder.
pub struct DecompressingWriter {
    inner: Box<dyn BlobWriter>,
    digest: Digest,
    decoder: Decompressor,
}

impl DecompressingWriter {
    /// Wraps the plain writer `inner` of `digest`.
    pub fn new(inner: Box<dyn BlobWriter>, digest: Digest) -> Result<Self> {
        let decoder = Decompressor::new(digest.size.saturating_sub(inner.committed_size()))?;
        Ok(DecompressingWriter {
            inner,
            digest,
            decoder,
        })
    }
}

#[async_trait]
impl BlobWriter for DecompressingWriter {
    async fn write(&mut self, data: Bytes) -> Result<()> {
        let mut data = data;
        loop {
            let chunk = self.decoder.next_chunk(&mut data).map_err(|e| {
                Error::InvalidArgument(format!(
                    "compressed upload of {}: {}",
                    self.digest,
                    clip(&e.to_string())
                ))
            })?;
            match chunk {
                Some(chunk) => self.inner.write(chunk).await?,
                None => return Ok(()),
            }
        }
    }

    fn committed_size(&self) -> u64 {
        self.inner.committed_size()
    }

    fn park(&mut self) -> bool {
        if !self.inner.park() {
            return false;
        }
        match Decompressor::new(self.digest.size.saturating_sub(self.inner.committed_size())) {
            Ok(decoder) => {
                self.decoder = decoder;
                true
            }
            Err(_) => false,
        }
    }

    async fn commit(self: Box<Self>) -> Result<()> {
        self.decoder.finish().map_err(|e| {
            Error::InvalidArgument(format!("compressed upload of {}: {e}", self.digest))
        })?;
        self.inner.commit().await
    }

    fn follow(&self) -> Option<WriteFollower> {
        self.inner.follow()
    }
}

#[cfg(test)]
mod tests;
