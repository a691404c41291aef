//! The read-through alone, over in-memory stores.

use super::*;
use crate::digest::DigestFunction;
use crate::store::memory::blob;
use crate::store::memory::{MemoryStore, count};
use futures::StreamExt;
use std::sync::Mutex;
use std::time::Duration;

fn read_through(
    local: &Arc<MemoryStore>,
    upstream: &Arc<MemoryStore>,
    stats: &Arc<Stats>,
) -> ReadThrough {
    ReadThrough::new(
        local.clone(),
        1 << 30,
        upstream.clone(),
        Traffic::new(stats.clone()),
        stats.clone(),
        &Background::new(),
    )
}

async fn read(store: &ReadThrough, d: &Digest) -> Result<Bytes> {
    let ctx = RequestContext::default();
    let stream = store.read(&ctx, d, 0, 0).await?;
    let chunks: Vec<Bytes> = stream.try_collect().await?;
    Ok(chunks.concat().into())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_reads_of_a_missing_blob_share_one_fetch() {
    let (local, upstream) = (
        Arc::new(MemoryStore::default()),
        Arc::new(MemoryStore::default()),
    );
    *upstream.read_delay.lock().unwrap() = Duration::from_millis(100);
    let data = blob(3 << 20, 1);
    let d = upstream.insert(&data);
    let stats = Arc::new(Stats::default());
    let store = Arc::new(read_through(&local, &upstream, &stats));
    let readers: Vec<_> = (0..50)
        .map(|_| {
            let store = store.clone();
            tokio::spawn(async move { read(&store, &d).await.unwrap() })
        })
        .collect();
    for r in readers {
        assert_eq!(r.await.unwrap(), data);
    }
    assert_eq!(count(&upstream.reads), 1, "one upstream transfer");
    assert_eq!(Stats::get(&stats.upstream_fetches), 1);
    assert_eq!(Stats::get(&stats.single_flight_joins), 49);
    assert!(local.has(&d), "stored locally");
    read(&store, &d).await.unwrap();
    assert_eq!(count(&upstream.reads), 1, "now served locally");
}

#[tokio::test]
async fn small_misses_are_fetched_in_one_batch() {
    let (local, upstream) = (
        Arc::new(MemoryStore::default()),
        Arc::new(MemoryStore::default()),
    );
    let digests: Vec<Digest> = (0..5u8).map(|i| upstream.insert(&blob(100, i))).collect();
    let stats = Arc::new(Stats::default());
    let store = read_through(&local, &upstream, &stats);
    let ctx = RequestContext::default();
    let results = store.read_many(&ctx, &digests).await;
    assert!(results.iter().all(Result::is_ok));
    assert_eq!(count(&upstream.read_many_calls), 1);
    assert!(digests.iter().all(|d| local.has(d)));
}

#[tokio::test]
async fn bring_in_reports_what_it_started_and_hits_reach_the_hook() {
    struct Hits(Mutex<Vec<(Digest, ReadSource)>>);
    impl ReadHook for Hits {
        fn client_read(&self, digest: &Digest, source: ReadSource) {
            self.0.lock().unwrap().push((*digest, source));
        }
    }
    let (local, upstream) = (
        Arc::new(MemoryStore::default()),
        Arc::new(MemoryStore::default()),
    );
    let held = local.insert(b"held");
    let small = upstream.insert(&blob(10, 1));
    let large = upstream.insert(&blob(2 << 20, 2));
    let absent = Digest::of(DigestFunction::Sha256, b"absent");
    let hits = Arc::new(Hits(Mutex::new(Vec::new())));
    let stats = Arc::new(Stats::default());
    let store = read_through(&local, &upstream, &stats).with_hook(hits.clone());
    let ctx = RequestContext::default();
    let started = Mutex::new(Vec::new());
    let outcomes = store
        .bring_in(&ctx, &[held, small, large, small, absent], |d| {
            started.lock().unwrap().push(*d)
        })
        .await
        .unwrap();
    assert_eq!(*started.lock().unwrap(), vec![small, large, absent]);
    let ok: Vec<(Digest, bool)> = outcomes.iter().map(|(d, r)| (*d, r.is_ok())).collect();
    assert_eq!(ok, vec![(small, true), (large, true), (absent, false)]);
    assert!(
        hits.0.lock().unwrap().is_empty(),
        "prefetch is no client read"
    );
    read(&store, &small).await.unwrap();
    let elsewhere = upstream.insert(&blob(10, 3));
    read(&store, &elsewhere).await.unwrap();
    assert_eq!(
        *hits.0.lock().unwrap(),
        vec![
            (small, ReadSource::Local),
            (elsewhere, ReadSource::Upstream)
        ]
    );
}

#[tokio::test(start_paused = true)]
async fn prefetch_waits_for_client_traffic_but_a_joining_client_does_not() {
    let (local, upstream) = (
        Arc::new(MemoryStore::default()),
        Arc::new(MemoryStore::default()),
    );
    let (small, large) = (
        upstream.insert(&blob(10, 1)),
        upstream.insert(&blob(2 << 20, 2)),
    );
    let stats = Arc::new(Stats::default());
    let traffic = Traffic::new(stats.clone());
    let store = Arc::new(ReadThrough::new(
        local.clone(),
        1 << 30,
        upstream.clone(),
        traffic.clone(),
        stats.clone(),
        &Background::new(),
    ));
    let busy = traffic.client_work();
    let prefetch = {
        let store = store.clone();
        tokio::spawn(async move {
            let ctx = RequestContext::default().with_priority(Priority::Prefetch);
            store.bring_in(&ctx, &[small, large], |_| {}).await
        })
    };
    tokio::time::sleep(Duration::from_secs(10)).await;
    assert_eq!(
        count(&upstream.reads),
        0,
        "no prefetch transfer while a client works"
    );
    assert_eq!(count(&upstream.read_many_calls), 0);
    // The client still works (`busy`): joining must not wait for the gate.
    // (A client that waited for the gate would wait forever: `busy` is held.)
    let joined = tokio::time::timeout(Duration::from_secs(3600), read(&store, &large));
    let joined = joined.await.expect("the client waited for the gate");
    assert_eq!(joined.unwrap(), blob(2 << 20, 2));
    assert_eq!(
        count(&upstream.reads),
        1,
        "the client joined the prefetch transfer"
    );
    assert_eq!(Stats::get(&stats.prefetch_promotions), 1);
    assert_eq!(Stats::get(&stats.single_flight_joins), 1);
    assert!(!prefetch.is_finished(), "the small blob still yields");
    drop(busy);
    let outcomes = prefetch.await.unwrap().unwrap();
    assert!(outcomes.iter().all(|(_, r)| r.is_ok()));
    assert!(local.has(&small) && local.has(&large));
    assert_eq!(
        traffic.client_work_in_flight(),
        0,
        "the promotion ended with the transfer"
    );
}

#[tokio::test]
async fn prefetch_reads_of_trees_are_no_client_reads() {
    struct Reads(Mutex<usize>);
    impl ReadHook for Reads {
        fn client_read(&self, _: &Digest, _: ReadSource) {
            *self.0.lock().unwrap() += 1;
        }
    }
    let (local, upstream) = (
        Arc::new(MemoryStore::default()),
        Arc::new(MemoryStore::default()),
    );
    let (held, missing) = (local.insert(b"tree"), upstream.insert(b"other tree"));
    let reads = Arc::new(Reads(Mutex::new(0)));
    let stats = Arc::new(Stats::default());
    let store = read_through(&local, &upstream, &stats).with_hook(reads.clone());
    let ctx = RequestContext::default().with_priority(Priority::Prefetch);
    for d in [held, missing] {
        let stream = store.read(&ctx, &d, 0, 0).await.unwrap();
        let _: Vec<Bytes> = stream.try_collect().await.unwrap();
    }
    assert!(
        store
            .read_many(&ctx, &[held, missing])
            .await
            .iter()
            .all(Result::is_ok)
    );
    assert_eq!(*reads.0.lock().unwrap(), 0);
    read(&store, &held).await.unwrap();
    assert_eq!(*reads.0.lock().unwrap(), 1);
}

#[tokio::test]
async fn local_hits_are_served_while_the_upstream_is_down() {
    let (local, upstream) = (
        Arc::new(MemoryStore::default()),
        Arc::new(MemoryStore::default()),
    );
    let d = local.insert(b"local");
    let store = read_through(&local, &upstream, &Arc::new(Stats::default()));
    upstream
        .down
        .store(true, std::sync::atomic::Ordering::SeqCst);
    assert_eq!(
        read(&store, &d).await.unwrap(),
        Bytes::from_static(b"local")
    );
    let other = Digest::of(DigestFunction::Sha256, b"elsewhere");
    let err = read(&store, &other).await;
    assert!(matches!(err, Err(Error::Unavailable(_))), "{err:?}");
}

#[tokio::test]
async fn prefetch_fetches_small_blobs_in_short_batches_and_streams_the_rest() {
    let (local, upstream) = (
        Arc::new(MemoryStore::default()),
        Arc::new(MemoryStore::default()),
    );
    let each = 100 << 10;
    let small: Vec<Digest> = (0..6u8).map(|i| upstream.insert(&blob(each, i))).collect();
    let medium = upstream.insert(&blob(PREFETCH_BATCH as usize + 1, 9));
    let stats = Arc::new(Stats::default());
    let store = read_through(&local, &upstream, &stats);
    let ctx = RequestContext::default().with_priority(Priority::Prefetch);
    let mut wanted = small.clone();
    wanted.push(medium);
    let outcomes = store.bring_in(&ctx, &wanted, |_| {}).await.unwrap();
    assert!(outcomes.iter().all(|(_, r)| r.is_ok()));
    let per_batch = (PREFETCH_BATCH / each as u64) as usize;
    assert_eq!(
        count(&upstream.read_many_calls) as usize,
        small.len().div_ceil(per_batch),
        "batches of at most PREFETCH_BATCH bytes"
    );
    // The memory store reads batched blobs one by one too: one more read
    // means the larger blob streamed on its own (it can pause), in no batch.
    assert_eq!(
        count(&upstream.reads) as usize,
        small.len() + 1,
        "a larger blob streams"
    );
    assert!(wanted.iter().all(|d| local.has(d)));
}

/// An upstream whose reads come in `chunk`-byte pieces, each after the
/// first waiting for a permit of the returned gate.
fn gated_upstream(chunk: usize) -> (Arc<MemoryStore>, Arc<tokio::sync::Semaphore>) {
    let upstream = Arc::new(MemoryStore::default());
    upstream
        .read_chunk
        .store(chunk, std::sync::atomic::Ordering::SeqCst);
    let gate = Arc::new(tokio::sync::Semaphore::new(0));
    *upstream.read_gate.lock().unwrap() = Some(gate.clone());
    (upstream, gate)
}

/// Opens a client read of `[offset, offset + limit)`.
async fn open(store: &ReadThrough, d: &Digest, offset: u64, limit: u64) -> ChunkStream {
    let ctx = RequestContext::default();
    store.read(&ctx, d, offset, limit).await.unwrap()
}

/// Whether `stream` yields nothing within a moment.
async fn holds_back(stream: &mut ChunkStream) -> bool {
    use futures::StreamExt;
    tokio::time::timeout(Duration::from_millis(100), stream.next())
        .await
        .is_err()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readers_of_a_large_miss_stream_it_while_it_is_fetched() {
    let chunk = 256 << 10;
    let (upstream, gate) = gated_upstream(chunk);
    let local = Arc::new(MemoryStore::default());
    let data = blob(3 << 20, 4);
    let d = upstream.insert(&data);
    let stats = Arc::new(Stats::default());
    let store = read_through(&local, &upstream, &stats);

    let mut first = open(&store, &d, 0, 0).await;
    let got = first.try_next().await.unwrap().unwrap();
    assert_eq!(
        got,
        data.slice(..chunk),
        "the starter streams the first chunk"
    );
    // The upstream holds the rest back: the fetch cannot have ended.
    assert!(!local.has(&d));
    let mut joined = open(&store, &d, 0, 0).await;
    let got = joined.try_next().await.unwrap().unwrap();
    assert_eq!(got, data.slice(..chunk), "a joiner streams before the end");
    assert!(!local.has(&d));
    assert_eq!(Stats::get(&stats.single_flight_joins), 1);

    gate.add_permits(1 << 20);
    let rest: Vec<Bytes> = first.try_collect().await.unwrap();
    assert_eq!(rest.concat(), data[chunk..]);
    let rest: Vec<Bytes> = joined.try_collect().await.unwrap();
    assert_eq!(rest.concat(), data[chunk..]);
    assert_eq!(count(&upstream.reads), 1, "one upstream transfer");
    assert!(local.has(&d), "written to the store once, verified");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_range_ends_only_once_the_blob_verified() {
    let chunk = 256 << 10;
    let (upstream, gate) = gated_upstream(chunk);
    let local = Arc::new(MemoryStore::default());
    let data = blob(2 << 20, 5);
    let d = upstream.insert(&data);
    let store = read_through(&local, &upstream, &Arc::new(Stats::default()));

    // Within the first chunk, which has arrived: still held back.
    let mut inside = open(&store, &d, 10, 100).await;
    assert!(
        holds_back(&mut inside).await,
        "the end waits for the commit"
    );
    // Across chunks: what has arrived streams; the end waits.
    let mut across = open(&store, &d, 1000, 1 << 20).await;
    let got = across.try_next().await.unwrap().unwrap();
    assert_eq!(got, data[1000..chunk]);

    gate.add_permits(1 << 20);
    let got: Vec<Bytes> = inside.try_collect().await.unwrap();
    assert_eq!(got.concat(), data[10..110]);
    let got: Vec<Bytes> = across.try_collect().await.unwrap();
    assert_eq!(got.concat(), data[chunk..1000 + (1 << 20)]);
    // An empty range at the end of the blob, once it is stored.
    let empty: Vec<Bytes> = open(&store, &d, d.size, 0)
        .await
        .try_collect()
        .await
        .unwrap();
    assert!(empty.concat().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_corrupt_fetch_fails_every_reader_and_stores_nothing() {
    let chunk = 256 << 10;
    let (upstream, gate) = gated_upstream(chunk);
    let local = Arc::new(MemoryStore::default());
    let data = blob(2 << 20, 6);
    let d = Digest::of(DigestFunction::Sha256, &data);
    let mut rotten = data.to_vec();
    rotten[(1 << 20) + 3] ^= 1;
    upstream.blobs.lock().unwrap().insert(d, rotten.into());
    let store = read_through(&local, &upstream, &Arc::new(Stats::default()));

    let mut first = open(&store, &d, 0, 0).await;
    first.try_next().await.unwrap().unwrap();
    let joined = open(&store, &d, 0, 0).await;
    gate.add_permits(1 << 20);
    for (stream, name) in [(first, "starter"), (joined, "joiner")] {
        let items: Vec<Result<Bytes>> = stream.collect().await;
        let (last, before) = items.split_last().unwrap();
        assert!(before.iter().all(Result::is_ok), "{name}");
        assert!(
            matches!(last, Err(Error::Unavailable(_))),
            "{name}: {last:?}"
        );
        let sent: usize = before.iter().map(|c| c.as_ref().unwrap().len()).sum();
        assert!(sent < data.len(), "{name}: the end was held back");
    }
    assert!(!local.has(&d), "nothing stored");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broken_transfer_fails_its_readers_and_the_next_read_fetches_again() {
    let (upstream, gate) = gated_upstream(256 << 10);
    let local = Arc::new(MemoryStore::default());
    let d = upstream.insert(&blob(2 << 20, 7));
    let store = read_through(&local, &upstream, &Arc::new(Stats::default()));
    let mut first = open(&store, &d, 0, 0).await;
    first.try_next().await.unwrap().unwrap();
    let mut joined = open(&store, &d, 0, 0).await;
    joined.try_next().await.unwrap().unwrap();
    // The transfer breaks: the local write is abandoned.
    gate.close();
    for stream in [first, joined] {
        let err = stream.try_collect::<Vec<Bytes>>().await.unwrap_err();
        assert!(matches!(err, Error::Unavailable(_)), "{err:?}");
    }
    assert!(!local.has(&d));
    // The next read starts a new fetch. The readers can see the failure a
    // moment before the flight has ended (its key is released after its
    // writer's readers are told); a read in that moment joins the dying
    // flight and shares its failure, as a retrying client would. Either
    // way exactly one new fetch follows.
    let (upstream_reads, data) = (count(&upstream.reads), blob(2 << 20, 7));
    *upstream.read_gate.lock().unwrap() = None;
    let mut tries = 0;
    let fetched = loop {
        match read(&store, &d).await {
            Err(Error::Unavailable(_)) if tries < 100 => {
                tries += 1;
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            other => break other,
        }
    };
    assert_eq!(fetched.unwrap(), data);
    assert_eq!(count(&upstream.reads), upstream_reads + 1);
}

#[tokio::test]
async fn compressed_reads_fetch_a_miss_once_and_serve_hits_locally() {
    let (local, upstream) = (
        Arc::new(MemoryStore::default()),
        Arc::new(MemoryStore::default()),
    );
    let data: Vec<u8> = (0..(3 << 20)).map(|i| b"abcd abce "[i % 10]).collect();
    let d = upstream.insert(&data);
    let stats = Arc::new(Stats::default());
    let store = read_through(&local, &upstream, &stats);
    let ctx = RequestContext::default();
    for offset in [0u64, 1000] {
        let packed: Vec<Bytes> = store
            .read_compressed(&ctx, &d, offset, Compressor::Zstd)
            .await
            .unwrap()
            .try_collect()
            .await
            .unwrap();
        let packed = packed.concat();
        assert!(packed.len() < data.len() / 10);
        let plain = crate::compression::decompress(&packed, d.size - offset).unwrap();
        assert!(plain[..] == data[offset as usize..]);
    }
    assert_eq!(count(&upstream.reads), 1, "fetched once, then local");
    assert!(local.has(&d));
    let absent = Digest::of(DigestFunction::Sha256, b"absent");
    let err = store
        .read_compressed(&ctx, &absent, 0, Compressor::Zstd)
        .await
        .err();
    assert!(matches!(err, Some(Error::NotFound(_))), "{err:?}");
}
