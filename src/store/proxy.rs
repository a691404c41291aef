//! The caching proxy CAS: the local store in front of the upstream.
//!
//! - Reads are served locally when possible; a miss is fetched from the
//!   upstream once (single-flight: concurrent readers of the same blob join
//!   the fetch in flight), verified, stored locally, then served locally.
//!   Small blobs are fetched through the upstream store's BatchReadBlobs
//!   batcher, so misses that arrive together share one call.
//! - FindMissingBlobs answers for the upstream, where the work runs. Blobs
//!   the upstream lacks but the local store holds are uploaded by the proxy
//!   and reported present, so the client does not send them again.
//! - Writes are verified and stored locally and written through to the
//!   upstream; a write succeeds only once both have the blob.
//! - Prefetch brings blobs a client is about to read (outputs of a finished
//!   action) into the local store through the same single-flight, and counts
//!   how many of them were read (hits) or evicted unread (waste).

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use bytes::{Bytes, BytesMut};
use futures::future::{BoxFuture, FutureExt, Shared};
use futures::{StreamExt, TryStreamExt};
use lru::LruCache;

use crate::context::RequestContext;
use crate::digest::Digest;
use crate::error::{Error, Result};
use crate::stats::Stats;
use crate::store::local::LocalStore;
use crate::store::{BlobStore, BlobWriter, ChunkStream};

/// Blobs up to this size travel in Batch* calls; larger ones over ByteStream.
const SMALL_BLOB: u64 = 1 << 20;
/// Large blobs uploaded from the local store at once during FindMissingBlobs.
const PARALLEL_UPLOADS: usize = 4;
/// Prefetched blobs remembered until first read or eviction (for metrics).
const PREFETCHED_MEMORY: usize = 1 << 20;

/// Prefetched blobs not read yet: digest → size.
type Prefetched = Arc<Mutex<LruCache<Digest, u64>>>;

type Flight = Shared<BoxFuture<'static, Result<()>>>;
/// One transfer of several blobs: a result per blob.
type GroupFlight = Shared<BoxFuture<'static, Result<Arc<Vec<Result<()>>>>>>;

/// Local store + upstream, as one CAS.
pub struct ProxyStore {
    local: LocalStore,
    /// The upstream CAS (normally behind an existence cache).
    upstream: Arc<dyn BlobStore>,
    /// Fetches in flight, by digest.
    flights: Arc<Mutex<HashMap<Digest, Flight>>>,
    /// Prefetched blobs no client has read yet.
    prefetched: Prefetched,
    stats: Arc<Stats>,
}

impl ProxyStore {
    /// Proxies `upstream` through `local`.
    pub fn new(local: LocalStore, upstream: Arc<dyn BlobStore>, stats: Arc<Stats>) -> Self {
        let capacity = std::num::NonZeroUsize::new(PREFETCHED_MEMORY).expect("non-zero");
        let prefetched: Prefetched = Arc::new(Mutex::new(LruCache::new(capacity)));
        let (unread, counters) = (prefetched.clone(), stats.clone());
        local.set_eviction_listener(Arc::new(move |digest, size| {
            if unread
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .pop(digest)
                .is_some()
            {
                Stats::add(&counters.prefetch_wasted_bytes, size);
            }
        }));
        ProxyStore {
            local,
            upstream,
            flights: Arc::new(Mutex::new(HashMap::new())),
            prefetched,
            stats,
        }
    }

    /// Brings `digests` into the local store (those not there yet), through
    /// the same single-flight as client reads: small ones in batched calls,
    /// large ones at most `parallel` at a time. Only transfers this call
    /// started count as prefetched; a client read joining one is a hit.
    /// Returns the number of blobs and bytes it fetched.
    pub async fn prefetch(
        &self,
        ctx: &RequestContext,
        digests: &[Digest],
        parallel: usize,
    ) -> Result<(u64, u64)> {
        let mut seen = HashSet::new();
        let unique: Vec<Digest> = digests
            .iter()
            .filter(|d| seen.insert(**d))
            .copied()
            .collect();
        let missing = self.local.find_missing(ctx, &unique).await?;
        let (small, large): (Vec<Digest>, Vec<Digest>) =
            missing.into_iter().partition(|d| d.size <= SMALL_BLOB);
        let mut claimed = self.claim(ctx, &small, true);
        for chunk in large.chunks(parallel.max(1)) {
            claimed.extend(self.claim(ctx, chunk, true));
        }
        let (mut blobs, mut bytes) = (0, 0);
        for (d, (flight, started)) in small.iter().chain(&large).zip(claimed) {
            let result = flight.await;
            if !started {
                continue;
            }
            match result {
                Ok(()) => {
                    blobs += 1;
                    bytes += d.size;
                }
                Err(e) => {
                    self.unread().pop(d);
                    tracing::debug!("prefetch of {d} failed: {e}");
                }
            }
        }
        Stats::add(&self.stats.prefetched_blobs, blobs);
        Stats::add(&self.stats.prefetched_bytes, bytes);
        Ok((blobs, bytes))
    }

    fn unread(&self) -> std::sync::MutexGuard<'_, LruCache<Digest, u64>> {
        self.prefetched.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Counts a client's first read of a prefetched blob.
    fn note_local_read(&self, digest: &Digest) {
        if self.unread().pop(digest).is_some() {
            Stats::add(&self.stats.prefetch_hits, 1);
        }
    }

    /// Whether the local store could hold a blob of this size at all.
    fn fits_locally(&self, digest: &Digest) -> bool {
        digest.size <= self.local.occupancy().1
    }

    /// Brings a blob into the local store, sharing a fetch already in flight.
    async fn fetch(&self, ctx: &RequestContext, digest: &Digest) -> Result<()> {
        let (flight, _) = self
            .claim(ctx, std::slice::from_ref(digest), false)
            .remove(0);
        flight.await
    }

    /// Returns a flight per digest (and whether this call started it): a
    /// fetch already in flight is joined; the others start now, the small
    /// ones together in one batched upstream read. Prefetched transfers are
    /// marked unread when they start, so a client joining one counts as a hit.
    fn claim(
        &self,
        ctx: &RequestContext,
        digests: &[Digest],
        prefetch: bool,
    ) -> Vec<(Flight, bool)> {
        let mut flights = self.flights.lock().unwrap_or_else(|e| e.into_inner());
        let mut out: Vec<Option<(Flight, bool)>> = vec![None; digests.len()];
        let mut group: Vec<(usize, Digest)> = Vec::new();
        for (i, d) in digests.iter().enumerate() {
            if let Some(flight) = flights.get(d) {
                Stats::add(&self.stats.single_flight_joins, 1);
                out[i] = Some((flight.clone(), false));
            } else if d.size <= SMALL_BLOB {
                if !group.iter().any(|(_, g)| g == d) {
                    group.push((i, *d));
                }
            } else {
                let flight = self.start_fetch(ctx, vec![*d]).remove(0);
                flights.insert(*d, flight.clone());
                out[i] = Some((flight, true));
            }
        }
        if !group.is_empty() {
            let started = self.start_fetch(ctx, group.iter().map(|(_, d)| *d).collect());
            for ((i, d), flight) in group.into_iter().zip(started) {
                flights.insert(d, flight.clone());
                out[i] = Some((flight, true));
            }
        }
        drop(flights);
        let mut result: Vec<(Flight, bool)> = Vec::with_capacity(digests.len());
        for (i, d) in digests.iter().enumerate() {
            // A digest repeated in `digests` shares its first occurrence's flight.
            let entry = match out[i].take() {
                Some(entry) => entry,
                None => {
                    let first = digests.iter().position(|x| x == d).expect("present");
                    (result[first].0.clone(), false)
                }
            };
            if prefetch && entry.1 {
                self.unread().put(*d, d.size);
            }
            result.push(entry);
        }
        result
    }

    /// Spawns one transfer for `digests` (several only when all are small,
    /// then as one batched read), so it finishes even if the first reader
    /// leaves. Returns one flight per digest.
    fn start_fetch(&self, ctx: &RequestContext, digests: Vec<Digest>) -> Vec<Flight> {
        let (local, upstream, flights) = (
            self.local.clone(),
            self.upstream.clone(),
            self.flights.clone(),
        );
        let ctx = ctx.clone();
        Stats::add(&self.stats.upstream_fetches, digests.len() as u64);
        let wanted = digests.clone();
        let task = tokio::spawn(async move {
            let results = fetch_into(&local, &*upstream, &ctx, &wanted).await;
            let mut flights = flights.lock().unwrap_or_else(|e| e.into_inner());
            for (d, r) in wanted.iter().zip(&results) {
                flights.remove(d);
                if let Err(e) = r {
                    tracing::debug!("fetching {d} from upstream failed: {e}");
                }
            }
            results
        });
        let all: GroupFlight = async move {
            task.await
                .map(Arc::new)
                .map_err(|e| Error::Internal(format!("fetch task failed: {e}")))
        }
        .boxed()
        .shared();
        (0..digests.len())
            .map(|i| {
                let all = all.clone();
                async move { all.await.and_then(|results| results[i].clone()) }
                    .boxed()
                    .shared()
            })
            .collect()
    }

    /// Uploads blobs the local store holds to the upstream; returns the ones
    /// that could not be uploaded.
    pub async fn upload_from_local(
        &self,
        ctx: &RequestContext,
        digests: Vec<Digest>,
    ) -> Vec<Digest> {
        let (small, large): (Vec<Digest>, Vec<Digest>) =
            digests.into_iter().partition(|d| d.size <= SMALL_BLOB);
        let mut failed = Vec::new();
        if !small.is_empty() {
            let reads = self.local.read_many(ctx, &small).await;
            let mut blobs = Vec::new();
            for (d, r) in small.iter().zip(reads) {
                match r {
                    Ok(data) => blobs.push((*d, data)),
                    Err(_) => failed.push(*d),
                }
            }
            let digests: Vec<Digest> = blobs.iter().map(|(d, _)| *d).collect();
            let results = self.upstream.write_many(ctx, blobs).await;
            for (d, r) in digests.into_iter().zip(results) {
                match r {
                    Ok(()) => Stats::add(&self.stats.uploads_from_local, 1),
                    Err(e) => {
                        tracing::debug!("uploading {d} from the local store failed: {e}");
                        failed.push(d);
                    }
                }
            }
        }
        let outcomes: Vec<(Digest, Result<()>)> = futures::stream::iter(large)
            .map(|d| async move { (d, copy_blob(&self.local, &*self.upstream, ctx, &d).await) })
            .buffer_unordered(PARALLEL_UPLOADS)
            .collect()
            .await;
        for (d, r) in outcomes {
            match r {
                Ok(()) => Stats::add(&self.stats.uploads_from_local, 1),
                Err(e) => {
                    tracing::debug!("uploading {d} from the local store failed: {e}");
                    failed.push(d);
                }
            }
        }
        failed
    }
}

/// Streams one blob from `from` into `to` (which verifies it).
async fn copy_blob(
    from: &dyn BlobStore,
    to: &dyn BlobStore,
    ctx: &RequestContext,
    digest: &Digest,
) -> Result<()> {
    let mut stream = from.read(ctx, digest, 0, 0).await?;
    let mut writer = to.begin_write(ctx, digest).await?;
    while let Some(chunk) = stream.try_next().await? {
        writer.write(chunk).await?;
    }
    writer.commit().await
}

/// Fetches blobs from the upstream into the local store: one blob over
/// ByteStream, or several small ones in one batched read. One result each.
async fn fetch_into(
    local: &LocalStore,
    upstream: &dyn BlobStore,
    ctx: &RequestContext,
    digests: &[Digest],
) -> Vec<Result<()>> {
    if let [digest] = digests
        && digest.size > SMALL_BLOB
    {
        return vec![fetch_large(local, upstream, ctx, digest).await];
    }
    let reads = upstream.read_many(ctx, digests).await;
    let mut results: Vec<Result<()>> = Vec::with_capacity(digests.len());
    let mut fetched = Vec::new();
    let mut positions = Vec::new();
    for (i, (d, read)) in digests.iter().zip(reads).enumerate() {
        match read {
            Ok(data) => {
                fetched.push((*d, data));
                positions.push(i);
                results.push(Ok(()));
            }
            Err(e) => results.push(Err(e)),
        }
    }
    for (i, stored) in positions
        .into_iter()
        .zip(local.write_many(ctx, fetched).await)
    {
        results[i] = stored;
    }
    results
}

/// Streams one large blob from the upstream into the local store.
async fn fetch_large(
    local: &LocalStore,
    upstream: &dyn BlobStore,
    ctx: &RequestContext,
    digest: &Digest,
) -> Result<()> {
    // The local writer verifies; a mismatch here is the upstream's fault,
    // not the client's, so it must not come back as INVALID_ARGUMENT.
    let corrupt = |e: Error| match e {
        Error::InvalidArgument(why) => {
            Error::Unavailable(format!("upstream sent corrupt data for {digest}: {why}"))
        }
        e => e,
    };
    let mut stream = upstream.read(ctx, digest, 0, 0).await?;
    let mut writer = local.begin_write(ctx, digest).await?;
    while let Some(chunk) = stream.try_next().await? {
        writer.write(chunk).await.map_err(corrupt)?;
    }
    writer.commit().await.map_err(corrupt)
}

#[async_trait]
impl BlobStore for ProxyStore {
    async fn find_missing(&self, ctx: &RequestContext, digests: &[Digest]) -> Result<Vec<Digest>> {
        let missing_upstream = self.upstream.find_missing(ctx, digests).await?;
        if missing_upstream.is_empty() {
            return Ok(missing_upstream);
        }
        let missing_locally: HashSet<Digest> = self
            .local
            .find_missing(ctx, &missing_upstream)
            .await?
            .into_iter()
            .collect();
        let held: Vec<Digest> = missing_upstream
            .iter()
            .filter(|d| !missing_locally.contains(d))
            .copied()
            .collect();
        let failed: HashSet<Digest> = self
            .upload_from_local(ctx, held)
            .await
            .into_iter()
            .collect();
        Ok(missing_upstream
            .into_iter()
            .filter(|d| missing_locally.contains(d) || failed.contains(d))
            .collect())
    }

    async fn read(
        &self,
        ctx: &RequestContext,
        digest: &Digest,
        offset: u64,
        limit: u64,
    ) -> Result<ChunkStream> {
        match self.local.read(ctx, digest, offset, limit).await {
            Err(Error::NotFound(_)) => {}
            Ok(stream) => {
                self.note_local_read(digest);
                return Ok(stream);
            }
            other => return other,
        }
        if !self.fits_locally(digest) {
            return self.upstream.read(ctx, digest, offset, limit).await;
        }
        self.fetch(ctx, digest).await?;
        match self.local.read(ctx, digest, offset, limit).await {
            // Evicted again under heavy pressure: stream from upstream.
            Err(Error::NotFound(_)) => self.upstream.read(ctx, digest, offset, limit).await,
            other => other,
        }
    }

    async fn begin_write(
        &self,
        ctx: &RequestContext,
        digest: &Digest,
    ) -> Result<Box<dyn BlobWriter>> {
        let local = if self.fits_locally(digest) {
            Some(self.local.begin_write(ctx, digest).await?)
        } else {
            None
        };
        let upstream = if digest.size <= SMALL_BLOB {
            Sink::Buffer(BytesMut::with_capacity(digest.size as usize))
        } else {
            Sink::Stream(self.upstream.begin_write(ctx, digest).await?)
        };
        Ok(Box::new(ProxyWriter {
            ctx: ctx.clone(),
            digest: *digest,
            local,
            upstream,
            upstream_store: self.upstream.clone(),
            written: 0,
        }))
    }

    async fn read_many(&self, ctx: &RequestContext, digests: &[Digest]) -> Vec<Result<Bytes>> {
        let mut results = self.local.read_many(ctx, digests).await;
        for (d, r) in digests.iter().zip(&results) {
            if r.is_ok() {
                self.note_local_read(d);
            }
        }
        let misses: Vec<usize> = (0..digests.len())
            .filter(|&i| matches!(results[i], Err(Error::NotFound(_))))
            .collect();
        let wanted: Vec<Digest> = misses.iter().map(|&i| digests[i]).collect();
        let flights = self.claim(ctx, &wanted, false);
        let fetched = futures::future::join_all(wanted.iter().zip(flights).map(
            |(d, (flight, _))| async move {
                flight.await?;
                crate::store::read_to_bytes(&self.local, ctx, d).await
            },
        ))
        .await;
        for (i, r) in misses.into_iter().zip(fetched) {
            results[i] = r;
        }
        results
    }

    async fn write_many(
        &self,
        ctx: &RequestContext,
        blobs: Vec<(Digest, Bytes)>,
    ) -> Vec<Result<()>> {
        let mut results = self.local.write_many(ctx, blobs.clone()).await;
        let (positions, verified): (Vec<usize>, Vec<(Digest, Bytes)>) = blobs
            .into_iter()
            .enumerate()
            .filter(|(i, _)| results[*i].is_ok())
            .unzip();
        let upstream_results = self.upstream.write_many(ctx, verified).await;
        for (i, r) in positions.into_iter().zip(upstream_results) {
            results[i] = r;
        }
        results
    }
}

/// Where a proxied write sends the upstream's copy.
enum Sink {
    /// Small blob: buffered, sent in a batched BatchUpdateBlobs on commit.
    Buffer(BytesMut),
    /// Large blob: streamed to the upstream alongside the local write.
    Stream(Box<dyn BlobWriter>),
}

/// Writes one blob to the local store and the upstream together.
struct ProxyWriter {
    ctx: RequestContext,
    digest: Digest,
    /// `None` when the blob is too large for the local store.
    local: Option<Box<dyn BlobWriter>>,
    upstream: Sink,
    upstream_store: Arc<dyn BlobStore>,
    written: u64,
}

#[async_trait]
impl BlobWriter for ProxyWriter {
    async fn write(&mut self, data: Bytes) -> Result<()> {
        if let Some(local) = &mut self.local {
            local.write(data.clone()).await?;
        } else if self.written + data.len() as u64 > self.digest.size {
            return Err(Error::InvalidArgument(format!(
                "size mismatch for {}: received more than {} bytes",
                self.digest, self.digest.size
            )));
        }
        match &mut self.upstream {
            Sink::Buffer(buf) => buf.extend_from_slice(&data),
            Sink::Stream(upstream) => upstream.write(data.clone()).await?,
        }
        self.written += data.len() as u64;
        Ok(())
    }

    fn committed_size(&self) -> u64 {
        self.written
    }

    async fn commit(self: Box<Self>) -> Result<()> {
        let ProxyWriter {
            ctx,
            digest,
            local,
            upstream,
            upstream_store,
            ..
        } = *self;
        // The local commit verifies the data; nothing goes upstream unverified
        // (an unfinished upstream stream is cancelled when dropped).
        match local {
            Some(local) => local.commit().await?,
            None => {
                if let Sink::Buffer(buf) = &upstream {
                    crate::digest::verify(&digest, &Digest::of(digest.function, buf))?;
                }
            }
        }
        match upstream {
            Sink::Buffer(buf) => upstream_store
                .write_many(&ctx, vec![(digest, buf.freeze())])
                .await
                .pop()
                .expect("one result per blob"),
            Sink::Stream(upstream) => upstream.commit().await,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::digest::DigestFunction;
    use crate::store::local::LocalStoreOptions;
    use crate::store::memory::{MemoryStore, count};
    use std::time::Duration;

    fn local(dir: &std::path::Path) -> LocalStore {
        let options = LocalStoreOptions {
            dir: dir.to_path_buf(),
            quota_bytes: 1 << 30,
            inline_limit: 1 << 20,
            sync: false,
        };
        LocalStore::open(options, Arc::new(Stats::default())).unwrap()
    }

    fn blob(len: usize, seed: u8) -> Bytes {
        (0..len)
            .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
            .collect()
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_reads_of_a_missing_blob_share_one_fetch() {
        let dir = tempfile::tempdir().unwrap();
        let upstream = Arc::new(MemoryStore::default());
        *upstream.read_delay.lock().unwrap() = Duration::from_millis(100);
        let data = blob(3 << 20, 1);
        let d = upstream.insert(&data);
        let stats = Arc::new(Stats::default());
        let proxy = Arc::new(ProxyStore::new(
            local(dir.path()),
            upstream.clone(),
            stats.clone(),
        ));
        let readers: Vec<_> = (0..50)
            .map(|_| {
                let proxy = proxy.clone();
                tokio::spawn(async move {
                    let ctx = RequestContext::default();
                    crate::store::read_to_bytes(&*proxy, &ctx, &d)
                        .await
                        .unwrap()
                })
            })
            .collect();
        for r in readers {
            assert_eq!(r.await.unwrap(), data);
        }
        assert_eq!(count(&upstream.reads), 1, "one upstream transfer");
        assert_eq!(Stats::get(&stats.upstream_fetches), 1);
        assert_eq!(Stats::get(&stats.single_flight_joins), 49);
        // Now local: no further upstream reads.
        let ctx = RequestContext::default();
        crate::store::read_to_bytes(&*proxy, &ctx, &d)
            .await
            .unwrap();
        assert_eq!(count(&upstream.reads), 1);
    }

    #[tokio::test]
    async fn find_missing_uploads_what_only_the_proxy_holds() {
        let dir = tempfile::tempdir().unwrap();
        let upstream = Arc::new(MemoryStore::default());
        let local = local(dir.path());
        let ctx = RequestContext::default();
        let small = blob(100, 2);
        let large = blob(2 << 20, 3);
        let ds = Digest::of(DigestFunction::Sha256, &small);
        let dl = Digest::of(DigestFunction::Sha256, &large);
        let nowhere = Digest::of(DigestFunction::Sha256, b"nowhere");
        local.write_many(&ctx, vec![(ds, small), (dl, large)]).await;
        let stats = Arc::new(Stats::default());
        let proxy = ProxyStore::new(local, upstream.clone(), stats.clone());
        let missing = proxy.find_missing(&ctx, &[ds, dl, nowhere]).await.unwrap();
        assert_eq!(missing, vec![nowhere]);
        assert!(upstream.has(&ds) && upstream.has(&dl));
        assert_eq!(Stats::get(&stats.uploads_from_local), 2);
    }

    #[tokio::test]
    async fn writes_go_to_both_and_bad_data_to_neither() {
        let dir = tempfile::tempdir().unwrap();
        let upstream = Arc::new(MemoryStore::default());
        let proxy = ProxyStore::new(
            local(dir.path()),
            upstream.clone(),
            Arc::new(Stats::default()),
        );
        let ctx = RequestContext::default();
        for len in [10, 3 << 20] {
            let data = blob(len, 4);
            let d = Digest::of(DigestFunction::Sha256, &data);
            crate::store::write_bytes(&proxy, &ctx, &d, data.clone())
                .await
                .unwrap();
            assert!(upstream.has(&d));
            assert!(
                proxy
                    .local
                    .find_missing(&ctx, &[d])
                    .await
                    .unwrap()
                    .is_empty()
            );
            let mut wrong = data.to_vec();
            wrong[0] ^= 1;
            let dw = Digest::of(DigestFunction::Sha256, &blob(len, 5));
            let err = crate::store::write_bytes(&proxy, &ctx, &dw, Bytes::from(wrong)).await;
            assert!(matches!(err, Err(Error::InvalidArgument(_))), "{err:?}");
            assert!(!upstream.has(&dw));
        }
    }

    #[tokio::test]
    async fn local_hits_are_served_while_the_upstream_is_down() {
        let dir = tempfile::tempdir().unwrap();
        let upstream = Arc::new(MemoryStore::default());
        let proxy = ProxyStore::new(
            local(dir.path()),
            upstream.clone(),
            Arc::new(Stats::default()),
        );
        let ctx = RequestContext::default();
        let data = blob(1000, 6);
        let d = Digest::of(DigestFunction::Sha256, &data);
        crate::store::write_bytes(&proxy, &ctx, &d, data.clone())
            .await
            .unwrap();
        upstream
            .down
            .store(true, std::sync::atomic::Ordering::SeqCst);
        assert_eq!(
            crate::store::read_to_bytes(&proxy, &ctx, &d).await.unwrap(),
            data
        );
        let other = Digest::of(DigestFunction::Sha256, b"elsewhere");
        let err = crate::store::read_to_bytes(&proxy, &ctx, &other).await;
        assert!(matches!(err, Err(Error::Unavailable(_))), "{err:?}");
    }
}
