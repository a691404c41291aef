//! Output prefetch: when an action finishes upstream, pull its outputs into
//! the local store before the client asks for them.
//!
//! Jobs go into a bounded queue; a full queue drops the job (counted) so no
//! RPC ever waits for prefetch. Each job walks the ActionResult (output
//! files, stdout/stderr, Trees and `root_directory_digest` hierarchies, read
//! through the proxy so they are fetched too) and fetches every blob up to
//! `max_blob_size` through the proxy's single-flight: a client read that
//! arrives meanwhile joins the transfer in flight instead of starting another.

use std::sync::Arc;

use bazel_remote_apis::build::bazel::remote::execution::v2::ActionResult;
use tokio::sync::{Semaphore, mpsc};

use crate::config::PrefetchConfig;
use crate::context::RequestContext;
use crate::digest::{Digest, DigestFunction};
use crate::stats::Stats;
use crate::store::complete::referenced_blobs;
use crate::store::proxy::ProxyStore;
use crate::upstream::batcher::split_by_weight;

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

/// Prefetch jobs worked on at once.
const PARALLEL_JOBS: usize = 4;
/// Unit of the bytes-in-flight budget.
const MIB: u64 = 1 << 20;

impl Prefetcher {
    /// Starts the workers.
    pub fn start(proxy: Arc<ProxyStore>, config: PrefetchConfig, stats: Arc<Stats>) -> Self {
        let (tx, rx) = mpsc::channel(config.queue_depth);
        tokio::spawn(dispatch(rx, proxy, config, stats.clone()));
        Prefetcher { tx, stats }
    }

    /// Queues the outputs of `result` for prefetch; never waits.
    pub fn submit(&self, ctx: &RequestContext, function: DigestFunction, result: &ActionResult) {
        let job = Job {
            ctx: ctx.clone(),
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

async fn dispatch(
    mut rx: mpsc::Receiver<Job>,
    proxy: Arc<ProxyStore>,
    config: PrefetchConfig,
    stats: Arc<Stats>,
) {
    let budget_mib = config.max_bytes_in_flight.div_ceil(MIB).max(1) as u32;
    let budget = Arc::new(Semaphore::new(budget_mib as usize));
    let jobs = Arc::new(Semaphore::new(PARALLEL_JOBS));
    while let Some(job) = rx.recv().await {
        let Ok(slot) = jobs.clone().acquire_owned().await else {
            return;
        };
        let (proxy, config, stats, budget) =
            (proxy.clone(), config.clone(), stats.clone(), budget.clone());
        tokio::spawn(async move {
            let _slot = slot;
            run(&proxy, &config, &stats, &budget, budget_mib, job).await;
        });
    }
}

async fn run(
    proxy: &ProxyStore,
    config: &PrefetchConfig,
    stats: &Stats,
    budget: &Semaphore,
    budget_mib: u32,
    job: Job,
) {
    let digests = match referenced_blobs(proxy, &job.ctx, job.function, &job.result).await {
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
        fetch_group(proxy, config, budget, budget_mib, &job.ctx, &group).await;
    }
}

async fn fetch_group(
    proxy: &ProxyStore,
    config: &PrefetchConfig,
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
    if let Err(e) = proxy.prefetch(ctx, group, config.parallel_fetches).await {
        tracing::debug!("prefetch failed: {e}");
    }
}
