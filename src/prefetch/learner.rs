//! Learns, per build invocation, whether the client reads the outputs it is
//! given, and answers prefetch's "fetch this one?" with [`policy::decide`].
//!
//! An invocation is the `tool_invocation_id` of the RequestMetadata header
//! of the call that produced a result (Execute, or GetActionResult for an
//! upstream cache hit); a client that sends none is keyed by its instance
//! name (`RequestContext` carries no peer address). Each finished action's
//! outputs are registered under their invocation ([`Registry`]); the
//! learner then hears
//! - every client read ([`ReadHook`]): a read of a registered output, be it
//!   prefetched, joined or not prefetched at all, credits the producing
//!   invocation and the output's path in the [`History`];
//! - every client FindMissingBlobs ([`ClientInputs`]): a registered output
//!   named by the same invocation is an input of a later action (needed by
//!   the upstream, not the client), recorded and no longer prefetched unless
//!   the invocation reads outputs.
//!
//! The per-invocation counts are kept in a bounded LRU map; the state is
//! recomputed from them on every change, logged when it changes and
//! exported as gauges.

use std::num::NonZeroUsize;
use std::sync::{Arc, Mutex, MutexGuard};

use bazel_remote_apis::build::bazel::remote::execution::v2::ActionResult;
use lru::LruCache;

use super::ClientInputs;
use super::policy::{self, Candidate, Counts, Kind, Skip, State};
use super::registry::{History, Output, PathKey, Registry};
use crate::config::PrefetchConfig;
use crate::context::{RequestContext, request_metadata};
use crate::digest::{Digest, DigestFunction};
use crate::error::Result;
use crate::stats::Stats;
use crate::store::read_through::{ReadHook, ReadSource};

/// Output blobs remembered (~150 bytes each).
const OUTPUTS: usize = 1 << 18;
/// Output paths remembered across invocations (~40 bytes each).
const PATHS: usize = 1 << 18;
/// Invocations remembered (a few builds at once, and the recent ones).
const INVOCATIONS: usize = 1 << 10;

/// One finished action's outputs as registered: what its prefetch job
/// decides about.
#[derive(Clone, Debug)]
pub struct Offer {
    /// The producing invocation.
    pub invocation: Arc<str>,
    /// The action's mnemonic, for its directories' files.
    pub mnemonic: String,
    /// Stdout and stderr.
    pub std: Vec<Digest>,
    /// Output files.
    pub files: Vec<Digest>,
    /// Output directories.
    pub dirs: Vec<OfferedDir>,
}

/// An output directory of an [`Offer`].
#[derive(Clone, Debug)]
pub struct OfferedDir {
    /// The Tree message's digest, if the result names one.
    pub tree: Option<Digest>,
    /// The root Directory's digest, if the result names one.
    pub root: Option<Digest>,
}

impl OfferedDir {
    /// The digest the directory is registered (and credited) under.
    pub fn key(&self) -> Option<Digest> {
        self.tree.or(self.root)
    }
}

/// What the learner knows of one invocation.
struct Invocation {
    counts: Counts,
    /// The state last computed (for the gauges and the log line).
    state: State,
}

struct Inner {
    registry: Registry,
    history: History,
    invocations: LruCache<Arc<str>, Invocation>,
}

/// The adaptive prefetch's memory and judge.
pub struct Learner {
    config: PrefetchConfig,
    stats: Arc<Stats>,
    inner: Mutex<Inner>,
}

/// The invocation a request belongs to, and its action's mnemonic.
pub fn invocation_of(ctx: &RequestContext) -> (Arc<str>, String) {
    match request_metadata(&ctx.headers) {
        Some(m) if !m.tool_invocation_id.is_empty() => (
            format!("invocation {}", m.tool_invocation_id).into(),
            m.action_mnemonic,
        ),
        m => (
            format!("instance {:?}", ctx.instance).into(),
            m.map(|m| m.action_mnemonic).unwrap_or_default(),
        ),
    }
}

impl Learner {
    /// An empty learner judging by `config`, counting into `stats`.
    pub fn new(config: PrefetchConfig, stats: Arc<Stats>) -> Self {
        let invocations = NonZeroUsize::new(INVOCATIONS).expect("non-zero");
        Learner {
            config,
            stats,
            inner: Mutex::new(Inner {
                registry: Registry::new(OUTPUTS),
                history: History::new(PATHS),
                invocations: LruCache::new(invocations),
            }),
        }
    }

    /// Registers the outputs of `result`, produced for `ctx`, and counts one
    /// finished action of its invocation.
    pub fn offer(
        &self,
        ctx: &RequestContext,
        function: DigestFunction,
        result: &ActionResult,
    ) -> Result<Offer> {
        let (invocation, mnemonic) = invocation_of(ctx);
        let parse = |d| Digest::from_proto(function, Some(d));
        let mut offer = Offer {
            invocation: invocation.clone(),
            mnemonic,
            std: Vec::new(),
            files: Vec::new(),
            dirs: Vec::new(),
        };
        let mut outputs = Vec::new();
        for (digest, name) in [
            (&result.stdout_digest, "stdout"),
            (&result.stderr_digest, "stderr"),
        ] {
            if let Some(d) = digest {
                let d = parse(d)?;
                offer.std.push(d);
                outputs.push((d, Kind::Std, format!("<{name}>")));
            }
        }
        for file in &result.output_files {
            let d = Digest::from_proto(function, file.digest.as_ref())?;
            offer.files.push(d);
            outputs.push((d, Kind::File, file.path.clone()));
        }
        for dir in &result.output_directories {
            let tree = dir.tree_digest.as_ref().map(parse).transpose()?;
            let root = dir.root_directory_digest.as_ref().map(parse).transpose()?;
            let offered = OfferedDir { tree, root };
            if let Some(key) = offered.key() {
                outputs.push((key, Kind::Metadata, dir.path.clone()));
            }
            offer.dirs.push(offered);
        }
        let mut inner = self.inner();
        let mut offered = 0;
        for (digest, kind, path) in outputs {
            let path = PathKey::new(&offer.mnemonic, &path);
            let output = Output::new(invocation.clone(), kind, path, None);
            if output.offered() && digest.size > 0 {
                inner.history.offer(path);
                offered += 1;
            }
            inner.registry.put(digest, output);
        }
        Stats::add(&self.stats.prefetch_outputs_offered, offered);
        self.update(&mut inner, &invocation, |c| {
            c.actions += 1;
            c.offered += offered;
        });
        Ok(offer)
    }

    /// Registers what reading directory `dir` of `offer` found: its
    /// Directory messages and its files, all credited to the directory.
    pub fn add_dir_contents(
        &self,
        offer: &Offer,
        dir: &OfferedDir,
        directories: &[Digest],
        files: &[Digest],
    ) {
        let Some(key) = dir.key() else {
            return;
        };
        let mut inner = self.inner();
        let Some(path) = inner.registry.peek(&key).map(|o| o.path) else {
            return;
        };
        let inv = &offer.invocation;
        for (digests, kind) in [(directories, Kind::Metadata), (files, Kind::DirFile)] {
            for d in digests.iter().filter(|d| **d != key) {
                let output = Output::new(inv.clone(), kind, path, Some(key));
                inner.registry.put(*d, output);
            }
        }
    }

    /// Of `digests` (outputs of `offer`, with their kinds), the ones to
    /// fetch now: decided with the invocation's current state, so outputs
    /// taken as input meanwhile are left out. Counts the decisions.
    pub fn decide(&self, offer: &Offer, digests: &[(Digest, Kind)]) -> Vec<Digest> {
        let mut inner = self.inner();
        let state = inner
            .invocations
            .peek(&offer.invocation)
            .map_or(State::Learning, |i| i.state);
        let mut wanted = Vec::new();
        let (mut fetch, mut skip) = (0, 0);
        for &(digest, kind) in digests {
            let (consumed, path) = inner
                .registry
                .peek(&digest)
                .filter(|o| o.invocation == offer.invocation)
                .map_or((false, None), |o| (o.consumed, Some(o.path)));
            let history_read = path.is_some_and(|p| {
                let mut before = inner.history.get(p);
                // This invocation's own offer is not history yet.
                before.offered = before.offered.saturating_sub(1);
                policy::history_reads(&before, &self.config)
            });
            let candidate = Candidate {
                kind,
                size: digest.size,
                history_read,
                consumed,
            };
            match policy::decide(&self.config, state, &candidate) {
                Ok(()) => {
                    fetch += 1;
                    wanted.push(digest);
                }
                Err(reason) => {
                    skip += 1;
                    self.count_skip(reason);
                    if let Some(o) = inner.registry.get_mut(&digest) {
                        o.skipped = true;
                    }
                }
            }
        }
        self.update(&mut inner, &offer.invocation, |c| {
            c.prefetched += fetch;
            c.skipped += skip;
        });
        wanted
    }

    fn count_skip(&self, reason: Skip) {
        let s = &self.stats;
        let counter = match reason {
            Skip::TooLarge => &s.prefetch_skipped,
            Skip::Learning => &s.prefetch_skipped_learning,
            Skip::NotReading => &s.prefetch_skipped_not_reading,
            Skip::Input => &s.prefetch_skipped_input,
        };
        Stats::add(counter, 1);
    }

    /// The current state of `invocation` (Learning if unknown).
    pub fn state(&self, invocation: &str) -> State {
        self.inner()
            .invocations
            .peek(invocation)
            .map_or(State::Learning, |i| i.state)
    }

    /// The counts of `invocation` (zero if unknown).
    pub fn counts(&self, invocation: &str) -> Counts {
        self.inner()
            .invocations
            .peek(invocation)
            .map_or_else(Counts::default, |i| i.counts)
    }

    /// Changes the counts of `invocation` with `change`, then recomputes its
    /// state (gauges and a log line when it changes).
    fn update(&self, inner: &mut Inner, invocation: &Arc<str>, change: impl FnOnce(&mut Counts)) {
        if !inner.invocations.contains(invocation) {
            let fresh = Invocation {
                counts: Counts::default(),
                state: State::Learning,
            };
            Stats::add(self.gauge(State::Learning), 1);
            if let Some((_, gone)) = inner.invocations.push(invocation.clone(), fresh) {
                self.gauge_sub(gone.state);
            }
        }
        let entry = inner
            .invocations
            .get_mut(invocation)
            .expect("just inserted");
        change(&mut entry.counts);
        let state = policy::state(&entry.counts, &self.config);
        if state != entry.state {
            let c = entry.counts;
            tracing::info!(
                "prefetch: {invocation} is now {} (was {}): read {} of {} outputs offered by {} actions",
                state.name(),
                entry.state.name(),
                c.read,
                c.offered,
                c.actions
            );
            self.gauge_sub(entry.state);
            Stats::add(self.gauge(state), 1);
            entry.state = state;
        }
    }

    fn gauge(&self, state: State) -> &std::sync::atomic::AtomicU64 {
        match state {
            State::Learning => &self.stats.prefetch_invocations_learning,
            State::Reading => &self.stats.prefetch_invocations_reading,
            State::NotReading => &self.stats.prefetch_invocations_not_reading,
        }
    }

    fn gauge_sub(&self, state: State) {
        self.gauge(state)
            .fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
    }

    fn inner(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl ReadHook for Learner {
    /// Credits the invocation that produced `digest` (and its path) with
    /// one read output, once per output.
    fn client_read(&self, digest: &Digest, _source: ReadSource) {
        let mut inner = self.inner();
        let Some(output) = inner.registry.get_mut(digest) else {
            return;
        };
        if output.skipped {
            output.skipped = false;
            Stats::add(&self.stats.prefetch_missed, 1);
        }
        let credited = match (output.kind, output.parent) {
            (Kind::File, _) => *digest,
            (Kind::DirFile, Some(dir)) => dir,
            // Std streams and Trees: clients read them anyway.
            _ => return,
        };
        let Some(target) = inner.registry.get_mut(&credited) else {
            return;
        };
        if target.read {
            return;
        }
        target.read = true;
        let (invocation, path) = (target.invocation.clone(), target.path);
        inner.history.read(path);
        Stats::add(&self.stats.prefetch_outputs_read, 1);
        self.update(&mut inner, &invocation, |c| c.read += 1);
    }
}

impl ClientInputs for Learner {
    /// Marks the output files of the same invocation among `digests` as
    /// taken as input (each once).
    fn named(&self, ctx: &RequestContext, digests: &[Digest]) {
        let (invocation, _) = invocation_of(ctx);
        let mut inner = self.inner();
        let mut consumed = 0;
        for digest in digests {
            let Some(output) = inner.registry.get_mut(digest) else {
                continue;
            };
            // Files only: stdout/stderr and Trees are fetched regardless.
            let file = matches!(output.kind, Kind::File | Kind::DirFile);
            if output.invocation != invocation || output.consumed || !file {
                continue;
            }
            output.consumed = true;
            let path = output.path;
            inner.history.consumed(path);
            consumed += 1;
        }
        if consumed > 0 {
            Stats::add(&self.stats.prefetch_outputs_consumed, consumed);
            self.update(&mut inner, &invocation, |c| c.consumed += consumed);
        }
    }
}

#[cfg(test)]
#[path = "learner_tests.rs"]
mod tests;
