//! Read-through: blobs are served from the local store; a miss is fetched
//! from the upstream once, verified and stored locally.
//!
//! - Concurrent readers of the same missing blob join one fetch
//!   ([`SingleFlight`]); the fetch finishes even if they all leave.
//! - Small misses that arrive together are fetched in one batched upstream
//!   read, then served locally; a large one streams over ByteStream on its
//!   own, and its readers (the one that started it and those that join)
//!   stream it as it is written, each holding back the end of its range
//!   until the blob verified ([`streaming`]).
//! - A blob larger than the whole local store streams straight from the
//!   upstream; so does one evicted again before it could be served.
//! - Prefetch brings blobs in through the same flights ([`ReadThrough::bring_in`]),
//!   so a client read arriving meanwhile joins the transfer in progress.
//!   A [`ReadHook`] is told of every client read, so prefetch can keep score
//!   without this layer knowing about it.
//! - A flight started for prefetch (`Priority::Prefetch`) yields to clients
//!   (see [`Traffic`]): it waits for its turn before calling the upstream,
//!   a streaming one pauses between chunks, and its small blobs go in
//!   batches of at most [`PREFETCH_BATCH`] (a batch cannot pause). A client
//!   read that joins it promotes it: it stops yielding at once.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, MutexGuard};

use bytes::Bytes;
use futures::TryStreamExt;

use crate::compression::{self, Compressor};
use crate::context::{Priority, RequestContext};
use crate::digest::Digest;
use crate::error::{Error, Result};
use crate::stats::Stats;
use crate::store::served::{count_many, range_len, served_locally};
use crate::store::single_flight::{Role, SingleFlight, Ticket};
use crate::store::{BlobStore, ChunkStream, SMALL_BLOB, read_to_bytes};
use crate::tasks::Background;
use crate::upstream::batcher::split_by_weight;
use crate::upstream::traffic::{Traffic, Yielding};

use self::streaming::{Joined, StreamingFlight, StreamingFlights};

mod streaming;

/// Most bytes of small blobs in one prefetch flight (one BatchReadBlobs,
/// which cannot pause once sent); larger blobs stream and pause between
/// chunks. With `traffic::PREFETCH_LANES` flights on the link, a client
/// call that starts meanwhile finds at most 2 × 256 KiB of prefetch ahead
/// of it (~85 ms at 50 Mbit/s).
pub const PREFETCH_BATCH: u64 = 256 << 10;

/// Prefetch flights still yielding, by digest, so a client read that joins
/// one can promote it.
type YieldingFlights = Arc<Mutex<HashMap<Digest, Arc<Yielding>>>>;

/// Where a client's read of a blob was served from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReadSource {
    /// The blob was in the local store.
    Local,
    /// The blob had to come from the upstream: the read started a transfer
    /// or joined one in flight (perhaps a prefetch's).
    Upstream,
}

/// Told about every client read, so a higher layer (prefetch's hit/waste
/// ledger, its read tracking) can keep score without `store/` depending on
/// it. Prefetch's own transfers ([`ReadThrough::bring_in`]) are no reads.
pub trait ReadHook: Send + Sync {
    /// A client read `digest`, served from `source`.
    fn client_read(&self, digest: &Digest, source: ReadSource);
}

/// The local store in front of the upstream, for reads.
pub struct ReadThrough {
    /// Where blobs are served from and fetched into.
    local: Arc<dyn BlobStore>,
    /// Where misses are fetched from.
    upstream: Arc<dyn BlobStore>,
    /// The local store's quota: a larger blob could never be stored there.
    local_capacity: u64,
    /// Fetches in progress, by digest.
    flights: SingleFlight<Digest, ()>,
    /// The prefetch flights among them, which a joining client promotes.
    yielding: YieldingFlights,
    /// The flights that stream one large blob, which readers follow.
    streaming: StreamingFlights,
    /// Client traffic on the upstream link, which prefetch flights yield to.
    traffic: Arc<Traffic>,
    /// Told of client reads (prefetch's ledger), if any.
    hook: Option<Arc<dyn ReadHook>>,
    stats: Arc<Stats>,
}

impl ReadThrough {
    /// Serves `local` (holding at most `local_capacity` bytes) in front of
    /// `upstream`; fetches are spawned on `background`, and prefetch's yield
    /// to the client work counted in `traffic`.
    pub fn new(
        local: Arc<dyn BlobStore>,
        local_capacity: u64,
        upstream: Arc<dyn BlobStore>,
        traffic: Arc<Traffic>,
        stats: Arc<Stats>,
        background: &Background,
    ) -> Self {
        ReadThrough {
            local,
            upstream,
            local_capacity,
            flights: SingleFlight::new(background.clone()),
            yielding: Arc::default(),
            streaming: Arc::default(),
            traffic,
            hook: None,
            stats,
        }
    }

    /// Tells `hook` of every client read from now on.
    pub fn with_hook(mut self, hook: Arc<dyn ReadHook>) -> Self {
        self.hook = Some(hook);
        self
    }

    /// Streams a blob: locally, or on a miss as the fetch writes it (a
    /// large blob) or from the local store after the fetch (a small one).
    pub async fn read(
        &self,
        ctx: &RequestContext,
        digest: &Digest,
        offset: u64,
        limit: u64,
    ) -> Result<ChunkStream> {
        match self.local.read(ctx, digest, offset, limit).await {
            Err(Error::NotFound(_)) => {}
            Ok(stream) => {
                self.tell(ctx, digest, ReadSource::Local);
                served_locally(&self.stats, ctx, range_len(digest, offset, limit));
                return Ok(stream);
            }
            other => return other,
        }
        self.tell(ctx, digest, ReadSource::Upstream);
        if digest.size > self.local_capacity {
            return self.upstream.read(ctx, digest, offset, limit).await;
        }
        let ticket = self.claim(ctx, std::slice::from_ref(digest)).remove(0);
        // Looked up after the claim, so a streaming flight claimed or
        // joined here is found unless it already ended.
        match streaming::find(&self.streaming, digest) {
            Some(stage) => {
                let end = digest.read_end(offset, limit);
                if let Joined::Stream(stream) = streaming::join(stage, offset, end).await? {
                    return Ok(stream);
                }
            }
            None => ticket.wait().await?,
        }
        match self.local.read(ctx, digest, offset, limit).await {
            // Evicted again under heavy pressure: stream from upstream.
            Err(Error::NotFound(_)) => self.upstream.read(ctx, digest, offset, limit).await,
            other => other,
        }
    }

    /// Streams a blob compressed from plain byte `offset`: a local hit as
    /// the local store serves it (what it keeps compressed, as it is); a
    /// miss fetched as for [`ReadThrough::read`] (single flight, the first
    /// byte as soon as the fetch streams it) and compressed here; a blob
    /// too large for the local store straight from the upstream.
    pub async fn read_compressed(
        &self,
        ctx: &RequestContext,
        digest: &Digest,
        offset: u64,
        compressor: Compressor,
    ) -> Result<ChunkStream> {
        match self
            .local
            .read_compressed(ctx, digest, offset, compressor)
            .await
        {
            Err(Error::NotFound(_)) => {}
            Ok(stream) => {
                self.tell(ctx, digest, ReadSource::Local);
                served_locally(&self.stats, ctx, range_len(digest, offset, 0));
                return Ok(stream);
            }
            other => return other,
        }
        if digest.size > self.local_capacity {
            // Never kept here: the upstream's compressed bytes as they come
            // (the client verifies, as for the plain read of such a blob).
            self.tell(ctx, digest, ReadSource::Upstream);
            return self
                .upstream
                .read_compressed(ctx, digest, offset, compressor)
                .await;
        }
        let Compressor::Zstd = compressor;
        let plain = self.read(ctx, digest, offset, 0).await?;
        Ok(compression::compress_stream(plain))
    }

    /// Reads several small blobs: the local hits, then the misses fetched
    /// together.
    pub async fn read_many(&self, ctx: &RequestContext, digests: &[Digest]) -> Vec<Result<Bytes>> {
        let mut results = self.local.read_many(ctx, digests).await;
        count_many(&self.stats, ctx, &results);
        for (d, r) in digests.iter().zip(&results) {
            if r.is_ok() {
                self.tell(ctx, d, ReadSource::Local);
            }
        }
        let misses: Vec<usize> = (0..digests.len())
            .filter(|&i| matches!(results[i], Err(Error::NotFound(_))))
            .collect();
        let wanted: Vec<Digest> = misses.iter().map(|&i| digests[i]).collect();
        for d in &wanted {
            self.tell(ctx, d, ReadSource::Upstream);
        }
        let tickets = self.claim(ctx, &wanted);
        let fetched =
            futures::future::join_all(wanted.iter().zip(tickets).map(|(d, ticket)| async move {
                ticket.wait().await?;
                read_to_bytes(&*self.local, ctx, d).await
            }))
            .await;
        for (i, r) in misses.into_iter().zip(fetched) {
            results[i] = r;
        }
        results
    }

    /// Brings `digests` into the local store (those not there yet) through
    /// the same flights as client reads. `started` is told of each transfer
    /// this call starts, before any of them is awaited, so a client read
    /// landing on one can be told apart. Returns the outcome of each transfer
    /// this call started.
    pub async fn bring_in(
        &self,
        ctx: &RequestContext,
        digests: &[Digest],
        started: impl Fn(&Digest),
    ) -> Result<Vec<(Digest, Result<()>)>> {
        let mut seen = HashSet::new();
        let unique: Vec<Digest> = digests
            .iter()
            .filter(|d| seen.insert(**d))
            .copied()
            .collect();
        let missing = self.local.find_missing(ctx, &unique).await?;
        let tickets = self.claim(ctx, &missing);
        let mine: Vec<bool> = tickets.iter().map(|t| t.role() == Role::Started).collect();
        for (d, _) in missing.iter().zip(&mine).filter(|(_, mine)| **mine) {
            started(d);
        }
        let mut outcomes = Vec::new();
        for ((d, ticket), mine) in missing.into_iter().zip(tickets).zip(mine) {
            let result = ticket.wait().await;
            if mine {
                outcomes.push((d, result));
            }
        }
        Ok(outcomes)
    }

    /// Tells the hook of a client's read (prefetch's own reads of Tree and
    /// Directory messages are none).
    fn tell(&self, ctx: &RequestContext, digest: &Digest, source: ReadSource) {
        if let Some(hook) = &self.hook
            && ctx.priority == Priority::Client
        {
            hook.client_read(digest, source);
        }
    }

    /// A ticket per digest: a fetch in progress is joined; the others start
    /// now, the small ones together in batched reads (one for a client;
    /// [`PREFETCH_BATCH`] bytes each for prefetch), each large one alone.
    fn claim(&self, ctx: &RequestContext, digests: &[Digest]) -> Vec<Ticket<()>> {
        let (small_blob, batch) = batch_limits(ctx.priority);
        let mut tickets: Vec<Option<Ticket<()>>> = digests.iter().map(|_| None).collect();
        let small: Vec<usize> = (0..digests.len())
            .filter(|&i| digests[i].size <= small_blob)
            .collect();
        for run in split_by_weight(small, batch, |&i| digests[i].size) {
            let wanted: Vec<Digest> = run.iter().map(|&i| digests[i]).collect();
            for (i, ticket) in run.into_iter().zip(self.start_or_join(ctx, &wanted)) {
                tickets[i] = Some(ticket);
            }
        }
        for (i, d) in digests.iter().enumerate() {
            if d.size > small_blob {
                tickets[i] = self.start_or_join(ctx, std::slice::from_ref(d)).pop();
            }
        }
        tickets
            .into_iter()
            .map(|t| t.expect("a ticket per digest"))
            .collect()
    }

    /// Joins or starts one transfer for `digests`. A transfer started for
    /// prefetch yields to clients until a client joins it.
    fn start_or_join(&self, ctx: &RequestContext, digests: &[Digest]) -> Vec<Ticket<()>> {
        if digests.is_empty() {
            return Vec::new();
        }
        let (local, upstream, traffic) = (
            self.local.clone(),
            self.upstream.clone(),
            self.traffic.clone(),
        );
        let ctx = ctx.clone();
        let priority = ctx.priority;
        let tickets = self.flights.claim(digests, |wanted| {
            Stats::add(&self.stats.upstream_fetches, wanted.len() as u64);
            // Registered before the flight is visible to other claims, so a
            // client that joins it always finds it here (and so does every
            // reader of a streaming flight).
            let yielding = (priority == Priority::Prefetch)
                .then(|| YieldingFlight::register(&self.yielding, &wanted));
            let streaming = streams_alone(priority, &wanted)
                .then(|| StreamingFlight::register(&self.streaming, wanted[0]));
            async move {
                let gate = yielding.as_ref().map(|y| (&*traffic, &*y.transfer));
                let _turn = match gate {
                    Some((traffic, transfer)) => Some(traffic.turn(transfer).await),
                    None => None,
                };
                let results = match &streaming {
                    Some(flight) => {
                        let result =
                            fetch_large(&*local, &*upstream, &ctx, &wanted[0], gate, flight);
                        let result = result.await;
                        flight.end(&result);
                        vec![result]
                    }
                    None => fetch_many(&*local, &*upstream, &ctx, &wanted).await,
                };
                for (d, r) in wanted.iter().zip(&results) {
                    if let Err(e) = r {
                        tracing::debug!("fetching {d} from upstream failed: {e}");
                    }
                }
                results
            }
        });
        let joins = tickets.iter().filter(|t| t.role() == Role::Joined).count();
        Stats::add(&self.stats.single_flight_joins, joins as u64);
        if priority == Priority::Client && joins > 0 {
            let yielding = lock(&self.yielding);
            for (d, ticket) in digests.iter().zip(&tickets) {
                if ticket.role() == Role::Joined
                    && let Some(transfer) = yielding.get(d)
                {
                    transfer.promote(&self.traffic);
                }
            }
        }
        tickets
    }
}

/// For work at `priority`: the largest blob fetched in a batched read, and
/// the most bytes in one. A client's small misses go in one batch; prefetch
/// keeps its batches short, as one cannot pause once sent.
fn batch_limits(priority: Priority) -> (u64, u64) {
    match priority {
        Priority::Client => (SMALL_BLOB, u64::MAX),
        Priority::Prefetch => (PREFETCH_BATCH, PREFETCH_BATCH),
    }
}

/// Whether a flight for `digests` at `priority` streams one large blob over
/// ByteStream (rather than a batched read of small ones).
fn streams_alone(priority: Priority, digests: &[Digest]) -> bool {
    matches!(digests, [digest] if digest.size > batch_limits(priority).0)
}

fn lock(flights: &YieldingFlights) -> MutexGuard<'_, HashMap<Digest, Arc<Yielding>>> {
    flights.lock().unwrap_or_else(|e| e.into_inner())
}

/// A prefetch flight's entry in the yielding table, removed (and the
/// transfer ended) when the flight ends however it ends.
struct YieldingFlight {
    /// The table it is entered in.
    table: YieldingFlights,
    /// The digests it answers.
    keys: Vec<Digest>,
    /// Its standing: yielding, or promoted by a joining client.
    transfer: Arc<Yielding>,
}

impl YieldingFlight {
    fn register(table: &YieldingFlights, keys: &[Digest]) -> Self {
        let transfer = Arc::new(Yielding::default());
        let mut entries = lock(table);
        for d in keys {
            entries.insert(*d, transfer.clone());
        }
        YieldingFlight {
            table: table.clone(),
            keys: keys.to_vec(),
            transfer,
        }
    }
}

impl Drop for YieldingFlight {
    fn drop(&mut self) {
        {
            let mut entries = lock(&self.table);
            for d in &self.keys {
                if entries
                    .get(d)
                    .is_some_and(|t| Arc::ptr_eq(t, &self.transfer))
                {
                    entries.remove(d);
                }
            }
        }
        self.transfer.end();
    }
}

/// Fetches small blobs from the upstream into the local store, in one
/// batched read. One result each.
async fn fetch_many(
    local: &dyn BlobStore,
    upstream: &dyn BlobStore,
    ctx: &RequestContext,
    digests: &[Digest],
) -> Vec<Result<()>> {
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

/// Streams one large blob from the upstream into the local store, offering
/// readers the local writer's follower through `flight`; with a `gate`,
/// waits between chunks while clients use the link (not reading lets
/// HTTP/2 flow control stop the upstream after one window).
async fn fetch_large(
    local: &dyn BlobStore,
    upstream: &dyn BlobStore,
    ctx: &RequestContext,
    digest: &Digest,
    gate: Option<(&Traffic, &Yielding)>,
    flight: &StreamingFlight,
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
    flight.publish(writer.follow());
    loop {
        if let Some((traffic, transfer)) = gate {
            traffic.pause(transfer).await;
        }
        let Some(chunk) = stream.try_next().await? else {
            break;
        };
        writer.write(chunk).await.map_err(corrupt)?;
    }
    writer.commit().await.map_err(corrupt)
}

#[cfg(test)]
mod tests;
