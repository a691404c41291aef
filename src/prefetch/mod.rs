//! Output prefetch: when an action finishes upstream, pull its outputs into
//! the local store before the client asks for them.
//!
//! A finished action's outputs are registered with the [`Learner`] at once
//! (so client reads and FindMissingBlobs calls are credited from the first
//! moment), then the job goes into a bounded queue; a full queue drops the
//! job (counted) so no RPC ever waits for prefetch. Each job lists the
//! ActionResult's blobs (stdout/stderr, output files, Trees and
//! `root_directory_digest` hierarchies, read through the proxy so they are
//! fetched too: [`outputs`]), asks the learner which to fetch, group by
//! group right before fetching it (the `mode`, the invocation's state, the
//! outputs taken as input meanwhile: [`policy`]), and fetches those through
//! the read-through's single-flight: a client read that arrives meanwhile
//! joins the transfer in flight instead of starting another.
//!
//! - [`policy`]: the decisions, pure functions over counts.
//! - [`registry`]: output blob → producing invocation; path history.
//! - [`learner`]: per-invocation counts, fed by reads and FindMissingBlobs.
//! - [`outputs`]: a result's blobs with their kinds.
//! - [`ledger`]: the hit/waste score of prefetched blobs.
//!
//! The prefetcher hears of finished actions as the action cache's
//! [`ResultObserver`] (and from execution); it reads trees through the proxy
//! CAS and brings blobs in with [`ReadThrough::bring_in`]. [`Scores`] is the
//! [`ReadHook`] the read-through tells of client reads (ledger and learner).

pub mod learner;
pub mod ledger;
pub mod outputs;
pub mod policy;
pub mod registry;

use std::sync::Arc;

use bazel_remote_apis::build::bazel::remote::execution::v2::ActionResult;
use tokio::sync::{Semaphore, mpsc};

use crate::config::PrefetchConfig;
use crate::context::{Priority, RequestContext};
use crate::digest::{Digest, DigestFunction};
use crate::stats::Stats;
use crate::store::BlobStore;
use crate::store::local::LocalStore;
use crate::store::proxy_ac::ResultObserver;
use crate::store::read_through::{ReadHook, ReadSource, ReadThrough};
use crate::tasks::Background;
use crate::upstream::batcher::split_by_weight;
use learner::{Learner, Offer};
use ledger::Ledger;

/// Told of the digests a client names in FindMissingBlobs, so prefetch can
/// tell outputs that later actions take as inputs (Bazel asks for every
/// input before each Execute) without the CAS service knowing prefetch.
pub trait ClientInputs: Send + Sync {
    /// A client's FindMissingBlobs for `ctx` named `digests`.
    fn named(&self, ctx: &RequestContext, digests: &[Digest]);
}

/// What prefetch learns from clients: the hit/waste ledger and the
/// adaptive learner, told of every client read as one [`ReadHook`].
pub struct Scores {
    /// Hits, joins and waste of prefetched blobs.
    pub ledger: Arc<Ledger>,
    /// Per-invocation read tracking and the decisions.
    pub learner: Arc<Learner>,
}

impl Scores {
    /// Fresh scores; the ledger listens to `local`'s evictions.
    pub fn new(local: &LocalStore, config: &PrefetchConfig, stats: Arc<Stats>) -> Arc<Self> {
        Arc::new(Scores {
            ledger: Ledger::new(local, stats.clone()),
            learner: Arc::new(Learner::new(config.clone(), stats)),
        })
    }
}

impl ReadHook for Scores {
    /// Both keep score of every client read.
    fn client_read(&self, digest: &Digest, source: ReadSource) {
        self.ledger.client_read(digest, source);
        self.learner.client_read(digest, source);
    }
}

/// Finished actions' results whose outputs to fetch.
struct Job {
    ctx: RequestContext,
    function: DigestFunction,
    /// The outputs as registered with the learner.
    offer: Offer,
}

/// The prefetch queue and its workers.
pub struct Prefetcher {
    tx: mpsc::Sender<Job>,
    learner: Arc<Learner>,
    stats: Arc<Stats>,
}

/// What the workers prefetch through.
struct Through {
    /// The proxy CAS: Directory and Tree messages are read (and fetched) here.
    blobs: Arc<dyn BlobStore>,
    /// Brings blobs into the local store through the shared flights.
    reads: Arc<ReadThrough>,
    /// Scores what prefetch brought in.
    ledger: Arc<Ledger>,
    /// Decides what to bring in.
    learner: Arc<Learner>,
}

/// Prefetch jobs worked on at once.
const PARALLEL_JOBS: usize = 4;
/// Unit of the bytes-in-flight budget.
const MIB: u64 = 1 << 20;

impl Prefetcher {
    /// Starts the workers on `background`: trees are read through `blobs`,
    /// blobs brought in through `reads`, chosen and scored by `scores`.
    pub fn start(
        blobs: Arc<dyn BlobStore>,
        reads: Arc<ReadThrough>,
        scores: &Scores,
        config: PrefetchConfig,
        stats: Arc<Stats>,
        background: &Background,
    ) -> Self {
        let (tx, rx) = mpsc::channel(config.queue_depth);
        let learner = scores.learner.clone();
        let through = Arc::new(Through {
            blobs,
            reads,
            ledger: scores.ledger.clone(),
            learner: learner.clone(),
        });
        let workers = background.clone();
        background.spawn(dispatch(rx, through, config, stats.clone(), workers));
        Prefetcher { tx, learner, stats }
    }

    /// Registers the outputs of `result` with the learner and queues them
    /// for prefetch; never waits.
    pub fn submit(&self, ctx: &RequestContext, function: DigestFunction, result: &ActionResult) {
        let offer = match self.learner.offer(ctx, function, result) {
            Ok(offer) => offer,
            Err(e) => {
                tracing::debug!("prefetch: cannot list outputs: {e}");
                return;
            }
        };
        let job = Job {
            ctx: ctx.clone().with_priority(Priority::Prefetch),
            function,
            offer,
        };
        match self.tx.try_send(job) {
            Ok(()) => Stats::add(&self.stats.prefetch_jobs, 1),
            Err(_) => {
                Stats::add(&self.stats.prefetch_dropped, 1);
                tracing::debug!("prefetch queue full: dropping a job");
            }
        }
    }
}

impl ResultObserver for Prefetcher {
    /// An action result fetched from the upstream: its outputs are wanted next.
    fn fetched(&self, ctx: &RequestContext, function: DigestFunction, result: &ActionResult) {
        self.submit(ctx, function, result);
    }
}

async fn dispatch(
    mut rx: mpsc::Receiver<Job>,
    through: Arc<Through>,
    config: PrefetchConfig,
    stats: Arc<Stats>,
    background: Background,
) {
    let budget_mib = config.max_bytes_in_flight.div_ceil(MIB).max(1) as u32;
    let budget = Arc::new(Semaphore::new(budget_mib as usize));
    let jobs = Arc::new(Semaphore::new(PARALLEL_JOBS));
    while let Some(job) = rx.recv().await {
        let Ok(slot) = jobs.clone().acquire_owned().await else {
            return;
        };
        let (through, config, stats, budget) = (
            through.clone(),
            config.clone(),
            stats.clone(),
            budget.clone(),
        );
        background.spawn(async move {
            let _slot = slot;
            run(&through, &config, &stats, &budget, budget_mib, job).await;
        });
    }
}

async fn run(
    through: &Through,
    config: &PrefetchConfig,
    stats: &Stats,
    budget: &Semaphore,
    budget_mib: u32,
    job: Job,
) {
    let learner = &*through.learner;
    let listed = outputs::list(&*through.blobs, learner, &job.ctx, job.function, &job.offer);
    let blobs = match listed.await {
        Ok(blobs) => blobs,
        Err(e) => {
            tracing::debug!("prefetch: cannot list outputs: {e}");
            return;
        }
    };
    // Fetch in groups that fit the bytes-in-flight budget, each decided on
    // right before it is fetched (what was taken as input meanwhile, what
    // the invocation has shown since).
    for group in split_by_weight(blobs, config.max_bytes_in_flight, |(d, _)| d.size) {
        let wanted = learner.decide(&job.offer, &group);
        if !wanted.is_empty() {
            fetch_group(through, stats, budget, budget_mib, &job.ctx, &wanted).await;
        }
    }
}

/// Brings one group in once the budget allows, and counts what this
/// prefetch transferred (not what it joined).
async fn fetch_group(
    through: &Through,
    stats: &Stats,
    budget: &Semaphore,
    budget_mib: u32,
    ctx: &RequestContext,
    group: &[Digest],
) {
    let bytes: u64 = group.iter().map(|d| d.size).sum();
    let need = (bytes.div_ceil(MIB).max(1) as u32).min(budget_mib);
    let Ok(_permits) = budget.acquire_many(need).await else {
        return;
    };
    let ledger = &through.ledger;
    let outcomes = match through
        .reads
        .bring_in(ctx, group, |d| ledger.started(d))
        .await
    {
        Ok(outcomes) => outcomes,
        Err(e) => {
            tracing::debug!("prefetch failed: {e}");
            return;
        }
    };
    let (mut blobs, mut bytes) = (0, 0);
    for (d, result) in outcomes {
        match result {
            Ok(()) => {
                blobs += 1;
                bytes += d.size;
            }
            Err(e) => {
                ledger.failed(&d);
                tracing::debug!("prefetch of {d} failed: {e}");
            }
        }
    }
    Stats::add(&stats.prefetched_blobs, blobs);
    Stats::add(&stats.prefetched_bytes, bytes);
}
