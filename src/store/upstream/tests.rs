//! The upstream store's compressed calls against the testkit's fake
//! upstream: what crosses the wire is what the caller handed over.

use std::sync::Arc;

use bytes::Bytes;
use futures::TryStreamExt;
use outpost_testkit::fake::{FakeUpstream, Method};

use super::UpstreamStore;
use crate::compression::{self, Compressor};
use crate::config::{UpstreamConfig, UpstreamSection};
use crate::context::RequestContext;
use crate::digest::{Digest, DigestFunction};
use crate::error::Error;
use crate::stats::Stats;
use crate::store::BlobStore;
use crate::tasks::Background;
use crate::upstream::Upstream;

/// The store over `fake`, its capabilities fetched.
async fn store(fake: &FakeUpstream) -> UpstreamStore {
    let config = UpstreamConfig::resolve(UpstreamSection::default(), Some(fake.url()))
        .unwrap()
        .unwrap();
    let upstream = Arc::new(Upstream::new(config, Arc::new(Stats::default())).unwrap());
    upstream
        .capabilities(&RequestContext::default())
        .await
        .unwrap();
    UpstreamStore::new(upstream, &Background::new())
}

fn text(len: usize) -> Vec<u8> {
    (0..len).map(|i| b"upstream bytes "[i % 15]).collect()
}

#[tokio::test]
async fn compressed_calls_pass_the_bytes_as_they_are() {
    let fake = FakeUpstream::start().await;
    fake.set_compression(true);
    let store = store(&fake).await;
    let ctx = RequestContext::default();
    let data = text(3 << 20);
    let d = Digest::of(DigestFunction::Sha256, &data);

    let packed = compression::compress(&data);
    let mut writer = store
        .begin_write_compressed(&ctx, &d, Compressor::Zstd)
        .await
        .unwrap();
    writer.write(packed.clone()).await.unwrap();
    writer.commit().await.unwrap();
    let write = fake.last_call(Method::Write).unwrap();
    assert_eq!(write.compressed_blobs, 1);
    assert_eq!(
        write.bytes_received,
        packed.len() as u64,
        "sent as handed over"
    );
    assert!(fake.blob(&outpost_testkit::digest(&data)).unwrap() == data);

    let chunks: Vec<Bytes> = store
        .read_compressed(&ctx, &d, 10, Compressor::Zstd)
        .await
        .unwrap()
        .try_collect()
        .await
        .unwrap();
    let got = chunks.concat();
    let read = fake.last_call(Method::Read).unwrap();
    assert_eq!(read.compressed_blobs, 1);
    assert_eq!(read.bytes_sent, got.len() as u64, "handed on as received");
    let plain = compression::decompress(&got, d.size - 10).unwrap();
    assert!(plain[..] == data[10..]);
}

#[tokio::test]
async fn without_zstd_upstream_compressed_calls_are_coded_here() {
    let fake = FakeUpstream::start().await;
    let store = store(&fake).await;
    let ctx = RequestContext::default();
    let data = text(2 << 20);
    let d = Digest::of(DigestFunction::Sha256, &data);
    let mut writer = store
        .begin_write_compressed(&ctx, &d, Compressor::Zstd)
        .await
        .unwrap();
    writer.write(compression::compress(&data)).await.unwrap();
    writer.commit().await.unwrap();
    assert_eq!(fake.bytes_received(), data.len() as u64);
    let chunks: Vec<Bytes> = store
        .read_compressed(&ctx, &d, 0, Compressor::Zstd)
        .await
        .unwrap()
        .try_collect()
        .await
        .unwrap();
    assert!(compression::decompress(&chunks.concat(), d.size).unwrap()[..] == data[..]);
    assert_eq!(fake.compressed_blobs(), 0);

    // A compressed upload that is not the blob: refused, nothing stored.
    let other = text(2 << 20 | 1);
    let mut writer = store
        .begin_write_compressed(&ctx, &d, Compressor::Zstd)
        .await
        .unwrap();
    let err = writer.write(compression::compress(&other)).await.err();
    assert!(matches!(err, Some(Error::InvalidArgument(_))), "{err:?}");
}
