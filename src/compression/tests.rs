//! Unit tests of `compression`.

use super::*;
use futures::stream;

fn text(n: usize) -> Vec<u8> {
    (0..n)
        .map(|i| b"build outputs compress well "[i % 28])
        .collect()
}

async fn collect(s: ChunkStream) -> Result<Vec<u8>> {
    let mut out = Vec::new();
    let mut s = s;
    while let Some(c) = s.next().await {
        out.extend_from_slice(&c?);
    }
    Ok(out)
}

fn chunks(data: &[u8], n: usize) -> ChunkStream {
    let parts: Vec<Result<Bytes>> = data
        .chunks(n)
        .map(|c| Ok(Bytes::copy_from_slice(c)))
        .collect();
    stream::iter(parts).boxed()
}

#[tokio::test]
async fn streams_round_trip() {
    let data = text(3 << 20);
    let packed = collect(compress_stream(chunks(&data, 70_000)))
        .await
        .unwrap();
    assert!(packed.len() < data.len() / 10);
    assert_eq!(decompress(&packed, data.len() as u64).unwrap(), data);
    // Piece by piece, as a writer gets it.
    let mut decoder = Decompressor::new(data.len() as u64).unwrap();
    let mut plain = Vec::new();
    for piece in packed.chunks(999) {
        let mut piece = Bytes::copy_from_slice(piece);
        while let Some(chunk) = decoder.next_chunk(&mut piece).unwrap() {
            plain.extend_from_slice(&chunk);
        }
    }
    decoder.finish().unwrap();
    assert_eq!(plain, data);
}

/// Counts what a [`DecompressingWriter`] hands on.
struct Sink {
    received: u64,
}

#[async_trait]
impl BlobWriter for Sink {
    async fn write(&mut self, data: Bytes) -> Result<()> {
        assert!(data.len() <= OUT_CHUNK, "{} bytes at once", data.len());
        self.received += data.len() as u64;
        Ok(())
    }
    fn committed_size(&self) -> u64 {
        self.received
    }
    async fn commit(self: Box<Self>) -> Result<()> {
        Ok(())
    }
}

#[tokio::test]
async fn a_bomb_stops_at_the_declared_size_and_is_never_buffered_whole() {
    let packed = compress(&vec![0u8; 64 << 20]);
    assert!(packed.len() < 64 << 10);
    let err = decompress(&packed, 1 << 20).unwrap_err();
    assert!(err.to_string().contains("expands past"), "{err}");
    // One small message that expands to 64 MiB: a writer declared for
    // 32 MiB gets it a chunk at a time and fails at the declared size.
    let d = Digest::of(crate::digest::DigestFunction::Sha256, b"declared");
    let declared = Digest {
        size: 32 << 20,
        ..d
    };
    let sink = Sink { received: 0 };
    let mut writer = DecompressingWriter::new(Box::new(sink), declared).unwrap();
    let err = writer.write(packed).await.unwrap_err();
    assert!(err.to_string().contains("expands past"), "{err}");
    assert_eq!(writer.committed_size(), 32 << 20);
}

#[test]
fn a_frame_asking_for_a_huge_window_is_refused_for_a_small_blob() {
    let data = text(4 << 20);
    let mut encoder = Encoder::new(LEVEL).unwrap();
    encoder
        .set_parameter(zstd::stream::raw::CParameter::WindowLog(26))
        .unwrap();
    encoder
        .set_parameter(zstd::stream::raw::CParameter::EnableLongDistanceMatching(
            true,
        ))
        .unwrap();
    let mut out = vec![0u8; 8 << 20];
    let mut output = OutBuffer::around(&mut out[..]);
    let mut input = InBuffer::around(&data[..]);
    encoder.run(&mut input, &mut output).unwrap();
    while encoder.finish(&mut output, true).unwrap() > 0 {}
    let n = output.pos();
    // A 64 MiB window for 4 MiB of data: more than the limit allows.
    assert!(decompress(&out[..n], data.len() as u64).is_err());
    // The same data at a standard level decodes.
    assert_eq!(
        decompress(&compress(&data), data.len() as u64).unwrap(),
        data
    );
}

#[test]
fn short_truncated_and_garbage_input_are_refused() {
    let data = text(100_000);
    let packed = compress(&data);
    assert!(decompress(&packed, data.len() as u64 + 1).is_err());
    assert!(decompress(&packed[..packed.len() - 3], data.len() as u64).is_err());
    assert!(decompress(b"not zstd at all", 10).is_err());
}

#[test]
fn concatenated_frames_decode() {
    let (a, b) = (text(5000), text(7000));
    let mut packed = compress(&a).to_vec();
    packed.extend_from_slice(&compress(&b));
    let plain = decompress(&packed, 12_000).unwrap();
    assert_eq!(&plain[..5000], &a[..]);
}

#[test]
fn worth_it_needs_ten_percent() {
    assert!(worth_it(100, 90));
    assert!(!worth_it(100, 91));
    assert!(Compressor::from_proto(0).unwrap().is_none());
    assert_eq!(Compressor::from_proto(1).unwrap(), Some(Compressor::Zstd));
    assert!(Compressor::from_proto(2).is_err());
    assert_eq!(Compressor::from_name("zstd"), Some(Compressor::Zstd));
}
