//! Output prefetch: when an action finishes upstream, pull its outputs into
//! the local store before the client asks for them.
//!
//! Jobs go into a bounded queue; a full queue drops the job (counted) so no
//! RPC ever waits for prefetch. Each job walks the ActionResult (output
//! files, stdout/stderr, Trees and `root_directory_digest` hierarchies, read
//! through the proxy so they are fetched too) and fetches every blob up to
//! `max_blob_size` through the read-through's single-flight: a client read
//! that arrives meanwhile joins the transfer in flight instead of starting
//! another.
//!
//! - [`ledger`]: the hit/waste score of prefetched blobs.
//!
//! The prefetcher hears of finished actions as the action cache's
//! [`ResultObserver`] (and from execution); it reads trees through the proxy
//! CAS and brings blobs in with [`ReadThrough::bring_in`].

pub mod ledger;

use std::sync::Arc;

use bazel_remote_apis::build::bazel::remote::execution::v2::ActionResult;
use tokio::sync::{Semaphore, mpsc};

use crate::config::PrefetchConfig;
use crate::context::{Priority, RequestContext};
use crate::digest::{Digest, DigestFunction};
use crate::reapi::action::referenced_blobs;
use crate::stats::Stats;
use crate::store::BlobStore;
use crate::store::proxy_ac::ResultObserver;
use crate::store::read_through::ReadThrough;
use crate::tasks::Background;
use crate::upstream::batcher::split_by_weight;
use ledger::Ledger;

/// Finished actions' results whose outputs to fetch.
struct Job {
    ctx: RequestContext,
    function: DigestFunction,
    result: ActionResult,
}

/// The prefetch queue and its workers.
pub struct Prefetcher {
    tx: mpsc::Sender<Job>,
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
}

/// Prefetch jobs worked on at once.
const PARALLEL_JOBS: usize = 4;
/// Unit of the bytes-in-flight budget.
const MIB: u64 = 1 << 20;

impl Prefetcher {
    /// Starts the workers on `background`: trees are read through `blobs`,
    /// blobs brought in through `reads` and scored in `ledger`.
    pub fn start(
        blobs: Arc<dyn BlobStore>,
        reads: Arc<ReadThrough>,
        ledger: Arc<Ledger>,
        config: PrefetchConfig,
        stats: Arc<Stats>,
        background: &Background,
    ) -> Self {
        let (tx, rx) = mpsc::channel(config.queue_depth);
        let through = Arc::new(Through {
            blobs,
            reads,
            ledger,
        });
        let workers = background.clone();
        background.spawn(dispatch(rx, through, config, stats.clone(), workers));
        Prefetcher { tx, stats }
    }

    /// Queues the outputs of `result` for prefetch; never waits.
    pub fn submit(&self, ctx: &RequestContext, function: DigestFunction, result: &ActionResult) {
        let job = Job {
            ctx: ctx.clone().with_priority(Priority::Prefetch),
            function,
            result: result.clone(),
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
    let digests = match referenced_blobs(&*through.blobs, &job.ctx, job.function, &job.result).await
    {
        Ok(digests) => digests,
        Err(e) => {
            tracing::debug!("prefetch: cannot list outputs: {e}");
            return;
        }
    };
    let (wanted, skipped): (Vec<Digest>, Vec<Digest>) = digests
        .into_iter()
        .partition(|d| d.size <= config.max_blob_size);
    Stats::add(&stats.prefetch_skipped, skipped.len() as u64);
    // Fetch in groups that fit the bytes-in-flight budget.
    for group in split_by_weight(wanted, config.max_bytes_in_flight, |d| d.size) {
        fetch_group(through, stats, budget, budget_mib, &job.ctx, &group).await;
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
