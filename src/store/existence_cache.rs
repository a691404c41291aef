//! A decorator that remembers which digests a store (the upstream) is known
//! to hold, so that repeated FindMissingBlobs checks cost no round trip.
//!
//! A digest is remembered for `ttl` after the store confirmed it (in a
//! FindMissingBlobs answer, a successful write or a read). The TTL must stay
//! below the upstream's minimum retention, so a remembered blob is really
//! still there. Memory is bounded by an LRU of `capacity` entries.
//!
//! A digest that is already being asked about (by a concurrent call) is not
//! asked again: the later caller joins that question ([`SingleFlight`]),
//! which runs to its end even if its first caller leaves.

use std::collections::hash_map::DefaultHasher;
use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::hash::{Hash, Hasher};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use bytes::Bytes;
use lru::LruCache;

use crate::compression::Compressor;
use crate::context::RequestContext;
use crate::digest::Digest;
use crate::error::{Result, each_fails};
use crate::stats::Stats;
use crate::store::single_flight::{Role, SingleFlight};
use crate::store::{BlobStore, BlobWriter, ChunkStream};
use crate::tasks::Background;

/// Known digests: (hash of instance name, digest) → when confirmed.
type Known = Arc<Mutex<LruCache<(u64, Digest), Instant>>>;

/// Remembers confirmed digests of an inner store for a while.
pub struct ExistenceCache {
    inner: Arc<dyn BlobStore>,
    ttl: Duration,
    /// (hash of instance name, digest) → when the store confirmed it.
    known: Known,
    /// Questions in progress: per (instance, digest), whether it is missing.
    asking: SingleFlight<(u64, Digest), bool>,
    stats: Arc<Stats>,
}

fn instance_key(ctx: &RequestContext) -> u64 {
    let mut h = DefaultHasher::new();
    ctx.instance.hash(&mut h);
    h.finish()
}

impl ExistenceCache {
    /// Caches existence for `inner`, at most `capacity` digests for `ttl`;
    /// questions to `inner` run on `background`.
    pub fn new(
        inner: Arc<dyn BlobStore>,
        ttl: Duration,
        capacity: usize,
        stats: Arc<Stats>,
        background: &Background,
    ) -> Self {
        let capacity = std::num::NonZeroUsize::new(capacity.max(1)).expect("non-zero");
        ExistenceCache {
            inner,
            ttl,
            known: Arc::new(Mutex::new(LruCache::new(capacity))),
            asking: SingleFlight::new(background.clone()),
            stats,
        }
    }

    /// Whether the inner store confirmed `digest` within the TTL (no call).
    pub fn knows(&self, ctx: &RequestContext, digest: &Digest) -> bool {
        let mut known = self.known.lock().unwrap_or_else(|e| e.into_inner());
        known
            .get(&(instance_key(ctx), *digest))
            .is_some_and(|at| at.elapsed() < self.ttl)
    }

    /// Records that the inner store holds `digests`.
    pub fn note_present(&self, ctx: &RequestContext, digests: impl IntoIterator<Item = Digest>) {
        note(&self.known, instance_key(ctx), digests);
    }

    /// One question to the inner store about `keys` (all of one instance):
    /// per key, whether it is missing. Present ones are recorded.
    fn ask(
        &self,
        ctx: &RequestContext,
        keys: Vec<(u64, Digest)>,
    ) -> impl Future<Output = Vec<Result<bool>>> + Send + use<> {
        let (inner, known, ctx) = (self.inner.clone(), self.known.clone(), ctx.clone());
        async move {
            let Some(&(instance, _)) = keys.first() else {
                return Vec::new();
            };
            let digests: Vec<Digest> = keys.into_iter().map(|(_, d)| d).collect();
            match inner.find_missing(&ctx, &digests).await {
                Ok(missing) => {
                    let missing: HashSet<Digest> = missing.into_iter().collect();
                    let present = digests.iter().filter(|d| !missing.contains(d));
                    note(&known, instance, present.copied());
                    digests.iter().map(|d| Ok(missing.contains(d))).collect()
                }
                Err(e) => each_fails(&e, digests.len()),
            }
        }
    }
}

fn note(known: &Known, instance: u64, digests: impl IntoIterator<Item = Digest>) {
    let now = Instant::now();
    let mut known = known.lock().unwrap_or_else(|e| e.into_inner());
    for d in digests {
        known.put((instance, d), now);
    }
}

#[async_trait]
impl BlobStore for ExistenceCache {
    /// Known present within the TTL; the upstream is not asked.
    async fn holds(&self, ctx: &RequestContext, digest: &Digest) -> Result<bool> {
        Ok(self.knows(ctx, digest))
    }

    async fn find_missing(&self, ctx: &RequestContext, digests: &[Digest]) -> Result<Vec<Digest>> {
        let instance = instance_key(ctx);
        // The digests not known to be present, each once.
        let mut unknown: Vec<(u64, Digest)> = Vec::new();
        let tickets = {
            let mut known = self.known.lock().unwrap_or_else(|e| e.into_inner());
            let mut seen = HashSet::new();
            for d in digests {
                if !seen.insert(*d) {
                    continue;
                }
                match known.get(&(instance, *d)) {
                    Some(at) if at.elapsed() < self.ttl => continue,
                    Some(_) => {
                        known.pop(&(instance, *d));
                    }
                    None => {}
                }
                unknown.push((instance, *d));
            }
            // Joined questions and the new one (asked while `known` is held,
            // so no answer lands between the check and the claim).
            self.asking.claim(&unknown, |mine| self.ask(ctx, mine))
        };
        let asked = tickets.iter().filter(|t| t.role() == Role::Started).count();
        Stats::add(
            &self.stats.existence_cache_hits,
            (digests.len() - asked) as u64,
        );
        Stats::add(&self.stats.existence_cache_misses, asked as u64);
        let mut answers = HashMap::new();
        for ((_, d), ticket) in unknown.into_iter().zip(tickets) {
            answers.insert(d, ticket.wait().await?);
        }
        Ok(digests
            .iter()
            .filter(|d| answers.get(d) == Some(&true))
            .copied()
            .collect())
    }

    async fn read(
        &self,
        ctx: &RequestContext,
        digest: &Digest,
        offset: u64,
        limit: u64,
    ) -> Result<ChunkStream> {
        let stream = self.inner.read(ctx, digest, offset, limit).await?;
        self.note_present(ctx, [*digest]);
        Ok(stream)
    }

    async fn begin_write(
        &self,
        ctx: &RequestContext,
        digest: &Digest,
    ) -> Result<Box<dyn BlobWriter>> {
        Ok(Box::new(NotingWriter {
            inner: self.inner.begin_write(ctx, digest).await?,
            known: self.known.clone(),
            instance: instance_key(ctx),
            digest: *digest,
        }))
    }

    async fn read_compressed(
        &self,
        ctx: &RequestContext,
        digest: &Digest,
        offset: u64,
        compressor: Compressor,
    ) -> Result<ChunkStream> {
        let stream = self
            .inner
            .read_compressed(ctx, digest, offset, compressor)
            .await?;
        self.note_present(ctx, [*digest]);
        Ok(stream)
    }

    async fn begin_write_compressed(
        &self,
        ctx: &RequestContext,
        digest: &Digest,
        compressor: Compressor,
    ) -> Result<Box<dyn BlobWriter>> {
        Ok(Box::new(NotingWriter {
            inner: self
                .inner
                .begin_write_compressed(ctx, digest, compressor)
                .await?,
            known: self.known.clone(),
            instance: instance_key(ctx),
            digest: *digest,
        }))
    }

    fn prefers_compressed(&self, digest: &Digest) -> bool {
        self.inner.prefers_compressed(digest)
    }

    async fn read_many(&self, ctx: &RequestContext, digests: &[Digest]) -> Vec<Result<Bytes>> {
        let results = self.inner.read_many(ctx, digests).await;
        let found = digests.iter().zip(&results).filter(|(_, r)| r.is_ok());
        self.note_present(ctx, found.map(|(d, _)| *d));
        results
    }

    async fn write_many(
        &self,
        ctx: &RequestContext,
        blobs: Vec<(Digest, Bytes)>,
    ) -> Vec<Result<()>> {
        let digests: Vec<Digest> = blobs.iter().map(|(d, _)| *d).collect();
        let results = self.inner.write_many(ctx, blobs).await;
        let stored = digests.iter().zip(&results).filter(|(_, r)| r.is_ok());
        self.note_present(ctx, stored.map(|(d, _)| *d));
        results
    }
}

/// Notes the digest as present once the inner write commits.
struct NotingWriter {
    inner: Box<dyn BlobWriter>,
    known: Known,
    instance: u64,
    digest: Digest,
}

#[async_trait]
impl BlobWriter for NotingWriter {
    async fn write(&mut self, data: Bytes) -> Result<()> {
        self.inner.write(data).await
    }

    fn committed_size(&self) -> u64 {
        self.inner.committed_size()
    }

    fn park(&mut self) -> bool {
        self.inner.park()
    }

    async fn commit(self: Box<Self>) -> Result<()> {
        self.inner.commit().await?;
        note(&self.known, self.instance, [self.digest]);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::memory::{MemoryStore, count};

    fn cache(inner: Arc<MemoryStore>, ttl: Duration) -> ExistenceCache {
        ExistenceCache::new(
            inner,
            ttl,
            1000,
            Arc::new(Stats::default()),
            &Background::new(),
        )
    }

    #[tokio::test]
    async fn repeated_checks_within_the_ttl_cost_no_inner_call() {
        let inner = Arc::new(MemoryStore::default());
        let present = inner.insert(b"present");
        let absent = Digest::of(crate::digest::DigestFunction::Sha256, b"absent");
        let cache = cache(inner.clone(), Duration::from_secs(60));
        let ctx = RequestContext::for_instance("i");
        for _ in 0..3 {
            assert_eq!(
                cache.find_missing(&ctx, &[present, absent]).await.unwrap(),
                vec![absent]
            );
        }
        // First call asks about both; later calls only about the absent one.
        assert_eq!(count(&inner.find_missing_calls), 3);
        assert_eq!(count(&inner.find_missing_digests), 4);
        // Another instance name is asked separately.
        let other = RequestContext::for_instance("j");
        cache.find_missing(&other, &[present]).await.unwrap();
        assert_eq!(count(&inner.find_missing_digests), 5);
    }

    #[tokio::test]
    async fn concurrent_checks_share_one_question() {
        let inner = Arc::new(MemoryStore::default());
        *inner.read_delay.lock().unwrap() = Duration::from_millis(50);
        let digests: Vec<Digest> = (0..100u32)
            .map(|i| inner.insert(&i.to_le_bytes()))
            .collect();
        let cache = Arc::new(cache(inner.clone(), Duration::from_secs(60)));
        let tasks: Vec<_> = (0..20)
            .map(|_| {
                let (cache, digests) = (cache.clone(), digests.clone());
                tokio::spawn(async move {
                    cache
                        .find_missing(&RequestContext::default(), &digests)
                        .await
                        .unwrap()
                })
            })
            .collect();
        for t in tasks {
            assert!(t.await.unwrap().is_empty());
        }
        assert_eq!(count(&inner.find_missing_calls), 1);
        assert_eq!(count(&inner.find_missing_digests), 100);
    }

    #[tokio::test]
    async fn entries_expire_after_the_ttl() {
        let inner = Arc::new(MemoryStore::default());
        let present = inner.insert(b"present");
        let cache = cache(inner.clone(), Duration::from_millis(50));
        let ctx = RequestContext::default();
        cache.find_missing(&ctx, &[present]).await.unwrap();
        cache.find_missing(&ctx, &[present]).await.unwrap();
        assert_eq!(count(&inner.find_missing_calls), 1);
        tokio::time::sleep(Duration::from_millis(80)).await;
        cache.find_missing(&ctx, &[present]).await.unwrap();
        assert_eq!(count(&inner.find_missing_calls), 2);
    }

    #[tokio::test]
    async fn committed_writes_are_remembered() {
        let inner = Arc::new(MemoryStore::default());
        let cache = cache(inner.clone(), Duration::from_secs(60));
        let ctx = RequestContext::default();
        let data = Bytes::from_static(b"new blob");
        let d = Digest::of(crate::digest::DigestFunction::Sha256, &data);
        crate::store::write_bytes(&cache, &ctx, &d, data)
            .await
            .unwrap();
        assert!(cache.find_missing(&ctx, &[d]).await.unwrap().is_empty());
        assert_eq!(count(&inner.find_missing_calls), 0);
    }
}
