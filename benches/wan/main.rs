//! WAN benchmark: a build-like workload from several concurrent clients,
//! straight to an upstream across a simulated WAN versus through an Outpost
//! proxy, cold (empty proxy) and warm (second run through the same proxy).
//!
//! Processes: the upstream is a standalone `outpost serve` (the real binary);
//! the WAN is the relay in `crates/outpost-testkit/src/relay.rs` (40 ms RTT, 50 Mbit/s per
//! direction by default) in front of it; the proxy is a second `outpost serve
//! --upstream grpc://RELAY`. The upstream is seeded directly (not across the
//! WAN) with every blob of the build and its action results, as if another
//! machine had built it. Each run then replays the build from `CLIENTS`
//! concurrent clients (each its own channel, `JOBS` actions in flight):
//!
//! - an unchanged action: GetActionResult (a hit), FindMissingBlobs for its
//!   inputs (all present; the popular inputs repeat across actions and
//!   clients), then reads of its outputs (BatchReadBlobs for small ones,
//!   ByteStream Read for large ones), verified;
//! - a changed action (a few per run): GetActionResult for a new key (a
//!   miss), FindMissingBlobs for its inputs plus one edited source, upload of
//!   the source, "execution", FindMissingBlobs + upload of its outputs
//!   (BatchUpdateBlobs / ByteStream Write), UpdateActionResult. The edited
//!   blobs are fresh in every run, so uploads happen in the warm run too.
//!
//! Measured per run: wall time, upstream RPCs (the clients' own calls when
//! direct; the proxy's `upstream_calls` from GetStats when proxied) and bytes
//! on the WAN (the relay's counters, both directions, gRPC framing included).
//!
//! A second workload, the cold cache-mode build (`cold_cache`), runs after
//! those three: an empty upstream, every action executed locally and uploaded,
//! direct vs through Outpost with `write_mode = "through"` and `"back"`.
//!
//! Run: `cargo bench --bench wan`. Knobs (environment): see benches/README.md.

mod cold_cache;
mod corpus;
mod zstd_runs;

use std::collections::{BTreeMap, HashSet};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};
use bazel_remote_apis::build::bazel::remote::execution::v2::{
    ActionResult, BatchReadBlobsRequest, BatchUpdateBlobsRequest, FindMissingBlobsRequest,
    GetActionResultRequest, GetCapabilitiesRequest, OutputFile, UpdateActionResultRequest,
    action_cache_client::ActionCacheClient, batch_update_blobs_request,
    capabilities_client::CapabilitiesClient,
    content_addressable_storage_client::ContentAddressableStorageClient,
};
use bazel_remote_apis::google::bytestream::{ReadRequest, byte_stream_client::ByteStreamClient};
use futures::{StreamExt, TryStreamExt};
use outpost::admin_proto::admin_client::AdminClient;
use outpost::admin_proto::{GetStatsRequest, GetStatsResponse};
use outpost::cli::human_bytes;
use outpost::digest::{Digest, DigestFunction, Hasher};
use outpost_testkit::client::write_stream;
use outpost_testkit::env::{env_u64, env_usize, server_binary};
use outpost_testkit::metrics::scrape;
use outpost_testkit::relay::{Relay, WanConfig};
use outpost_testkit::workload::{BATCH_ENTRY_OVERHEAD, mix};
use outpost_testkit::{Rng, ServerProcess, blob, pack};
use tonic::transport::Channel;

use cold_cache::CacheTarget;
use corpus::DataKind;

/// Largest gRPC message the clients accept or send (a 4 MiB batch + framing).
const CLIENT_MAX_MESSAGE: usize = 16 << 20;
/// Per-entry allowance for digest and framing when packing batches.
/// ByteStream Write chunk.
const WRITE_CHUNK: usize = 64 << 10;
/// Run-to-run noise allowed when checking "cold no slower than direct": both
/// runs move the same bytes over the same link, which is usually the bound.
const COLD_NOISE: f64 = 0.02;
const KIB: u64 = 1 << 10;
const MIB: u64 = 1 << 20;

// ---------------------------------------------------------------- settings

/// The three runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Mode {
    Direct,
    Cold,
    Warm,
}

impl Mode {
    fn name(self) -> &'static str {
        match self {
            Mode::Direct => "direct",
            Mode::Cold => "proxy cold",
            Mode::Warm => "proxy warm",
        }
    }

    /// Distinguishes the fresh blobs of each run.
    fn tag(self) -> u64 {
        match self {
            Mode::Direct => 1,
            Mode::Cold => 2,
            Mode::Warm => 3,
        }
    }
}

/// Everything the environment can change.
struct Settings {
    bin: PathBuf,
    wan: WanConfig,
    blobs: usize,
    actions: usize,
    source_pct: u64,
    medium_pct: u64,
    large_pct: u64,
    max_blob: u64,
    inputs: usize,
    deps: usize,
    changed: usize,
    clients: usize,
    jobs: usize,
    overlap: usize,
    batch_blob_max: u64,
    seed: u64,
    quota: String,
    run_timeout: Duration,
    only: Vec<Mode>,
    /// The cold cache-mode runs (`cold_cache`).
    cache_only: Vec<CacheTarget>,
    /// Compression off vs auto (`zstd_runs`; `OUTPOST_WAN_ONLY=zstd`).
    zstd: bool,
    /// "Local execution" of each action in the cold cache-mode build.
    think: Duration,
    /// Longest wait for the proxy's upload queue to drain after a build.
    drain_timeout: Duration,
    enforce: bool,
    /// Extra TOML config for the proxy (`--config`), e.g. `[prefetch]` settings.
    proxy_config: Option<PathBuf>,
}

impl Settings {
    fn from_env() -> anyhow::Result<Self> {
        let bin = server_binary("OUTPOST_WAN_BIN", option_env!("CARGO_BIN_EXE_outpost"));
        let (mut only, mut cache_only, mut zstd) = (Vec::new(), Vec::new(), false);
        let list =
            std::env::var("OUTPOST_WAN_ONLY").unwrap_or_else(|_| "direct,cold,warm,cache".into());
        for name in list.split(',').map(str::trim) {
            match name {
                "direct" => only.push(Mode::Direct),
                "cold" => only.push(Mode::Cold),
                "warm" => only.push(Mode::Warm),
                "cache" => cache_only.extend(CacheTarget::ALL),
                "zstd" => zstd = true,
                other => match CacheTarget::parse(other) {
                    Some(t) => cache_only.push(t),
                    None => bail!(
                        "OUTPOST_WAN_ONLY: unknown run {other:?} (direct, cold, warm, \
                         cache-direct, cache-through, cache-back, cache = all three, zstd)"
                    ),
                },
            }
        }
        // Side by side in the order of CacheTarget::ALL, each once.
        cache_only = CacheTarget::ALL
            .into_iter()
            .filter(|t| cache_only.contains(t))
            .collect();
        let clients = env_usize("OUTPOST_WAN_CLIENTS", 4)?.max(1);
        let s = Settings {
            bin,
            wan: WanConfig::from_env(WanConfig::reference()),
            blobs: env_usize("OUTPOST_WAN_BLOBS", 2000)?,
            actions: env_usize("OUTPOST_WAN_ACTIONS", 200)?.max(1),
            source_pct: env_u64("OUTPOST_WAN_SOURCE_PCT", 40)?,
            medium_pct: env_u64("OUTPOST_WAN_MEDIUM_PCT", 15)?,
            large_pct: env_u64("OUTPOST_WAN_LARGE_PCT", 5)?,
            max_blob: env_u64("OUTPOST_WAN_MAX_BLOB_KIB", 4096)?.max(1) * KIB,
            inputs: env_usize("OUTPOST_WAN_INPUTS", 40)?,
            deps: env_usize("OUTPOST_WAN_DEPS", 2)?,
            changed: env_usize("OUTPOST_WAN_CHANGED", 4)?,
            clients,
            jobs: env_usize("OUTPOST_WAN_JOBS", 4)?.max(1),
            overlap: env_usize("OUTPOST_WAN_OVERLAP", 1)?.clamp(1, clients),
            batch_blob_max: env_u64("OUTPOST_WAN_BATCH_BLOB_KIB", 1024)?.max(1) * KIB,
            seed: env_u64("OUTPOST_WAN_SEED", 1)?,
            quota: std::env::var("OUTPOST_WAN_QUOTA").unwrap_or_else(|_| "8GiB".into()),
            run_timeout: Duration::from_secs(env_u64("OUTPOST_WAN_RUN_TIMEOUT_S", 900)?),
            only,
            cache_only,
            zstd,
            think: Duration::from_millis(env_u64("OUTPOST_WAN_THINK_MS", 100)?),
            drain_timeout: Duration::from_secs(env_u64("OUTPOST_WAN_DRAIN_TIMEOUT_S", 600)?),
            enforce: std::env::var("OUTPOST_WAN_ENFORCE").is_ok_and(|v| v == "1"),
            proxy_config: std::env::var_os("OUTPOST_WAN_PROXY_CONFIG").map(PathBuf::from),
        };
        ensure!(
            s.source_pct <= 90,
            "OUTPOST_WAN_SOURCE_PCT must be at most 90"
        );
        ensure!(
            s.medium_pct + s.large_pct <= 100,
            "OUTPOST_WAN_MEDIUM_PCT + OUTPOST_WAN_LARGE_PCT must be at most 100"
        );
        ensure!(
            s.blobs > s.actions,
            "OUTPOST_WAN_BLOBS must exceed OUTPOST_WAN_ACTIONS (each action has an output)"
        );
        ensure!(
            s.changed <= s.actions,
            "OUTPOST_WAN_CHANGED must not exceed OUTPOST_WAN_ACTIONS"
        );
        Ok(s)
    }
}

// ---------------------------------------------------------------- data

fn seed_of(parts: &[u64]) -> u64 {
    parts
        .iter()
        .fold(0x006f_7574_706f_7374, |acc, p| mix(acc ^ p))
}

/// The bytes of a blob: a pure function of its kind, seed and size.
fn blob_data(kind: DataKind, seed: u64, size: u64) -> Vec<u8> {
    match kind {
        DataKind::Random => blob(seed, size as usize),
        _ => corpus::blob(kind, seed, size as usize),
    }
}

fn sha256(data: &[u8]) -> Digest {
    Digest::of(DigestFunction::Sha256, data)
}

/// A blob of the workload: its digest and the seed its bytes come from.
#[derive(Clone, Copy)]
struct BlobSpec {
    digest: Digest,
    seed: u64,
    kind: DataKind,
}

impl BlobSpec {
    fn new(kind: DataKind, seed: u64, size: u64) -> Self {
        BlobSpec {
            digest: sha256(&blob_data(kind, seed, size)),
            seed,
            kind,
        }
    }

    fn data(&self) -> Vec<u8> {
        blob_data(self.kind, self.seed, self.digest.size)
    }
}

struct ActionSpec {
    index: usize,
    /// The action digest the upstream holds a result for.
    key: Digest,
    /// Input digests (sources and dependencies' outputs), all present upstream.
    inputs: Vec<Digest>,
    /// The outputs of the seeded result.
    outputs: Vec<BlobSpec>,
    /// Changed in every run: a new key, executed and uploaded.
    changed: bool,
}

struct Workload {
    sources: Vec<BlobSpec>,
    actions: Vec<ActionSpec>,
}

impl Workload {
    fn seeded_blobs(&self) -> impl Iterator<Item = &BlobSpec> {
        self.sources
            .iter()
            .chain(self.actions.iter().flat_map(|a| a.outputs.iter()))
    }
}

/// Source files: mostly 1–64 KiB, one in ten up to 256 KiB.
fn source_size(rng: &mut Rng, s: &Settings) -> u64 {
    let size = if rng.unit() < 0.9 {
        rng.log_uniform(KIB, 64 * KIB)
    } else {
        rng.log_uniform(64 * KIB, 256 * KIB)
    };
    size.clamp(1, s.max_blob)
}

/// Outputs: mostly 1–64 KiB, `medium_pct`% 64 KiB–1 MiB, `large_pct`% 1–4 MiB.
fn output_size(rng: &mut Rng, s: &Settings) -> u64 {
    let p = rng.unit() * 100.0;
    let size = if p < s.large_pct as f64 {
        rng.log_uniform(MIB, 4 * MIB + 1)
    } else if p < (s.large_pct + s.medium_pct) as f64 {
        rng.log_uniform(64 * KIB, MIB)
    } else {
        rng.log_uniform(KIB, 64 * KIB)
    };
    size.clamp(1, s.max_blob)
}

impl Workload {
    /// The build, its blobs random (`compressible` false) or slices of
    /// source text (sources) and machine code (outputs).
    fn build(s: &Settings, compressible: bool) -> Self {
        let (source_kind, output_kind) = if compressible {
            (DataKind::Text, DataKind::Code)
        } else {
            (DataKind::Random, DataKind::Random)
        };
        let mut rng = Rng::new(seed_of(&[s.seed, 0x10ad]));
        let n_sources = (s.blobs as u64 * s.source_pct / 100) as usize;
        let n_outputs = (s.blobs - n_sources).max(s.actions);
        let sources: Vec<BlobSpec> = (0..n_sources)
            .map(|i| {
                let seed = seed_of(&[s.seed, 1, i as u64]);
                BlobSpec::new(source_kind, seed, source_size(&mut rng, s))
            })
            .collect();
        // Every action gets one output, the rest are spread at random.
        let mut owner: Vec<usize> = (0..s.actions).collect();
        owner.extend((s.actions..n_outputs).map(|_| rng.below(s.actions)));
        let mut outputs: Vec<Vec<BlobSpec>> = vec![Vec::new(); s.actions];
        for (j, &a) in owner.iter().enumerate() {
            let size = output_size(&mut rng, s);
            outputs[a].push(BlobSpec::new(
                output_kind,
                seed_of(&[s.seed, 2, j as u64]),
                size,
            ));
        }
        // Changed actions spread over the build and (with the default
        // round-robin assignment) over the clients.
        let changed: HashSet<usize> = (0..s.changed)
            .map(|k| (k * (s.actions / s.changed.max(1)) + k + 7) % s.actions)
            .collect();
        let mut actions = Vec::with_capacity(s.actions);
        for (i, outs) in outputs.into_iter().enumerate() {
            let mut inputs = Vec::new();
            let mut seen = HashSet::new();
            // Popular sources (low indices: common headers) are picked far
            // more often: the same digests are checked again and again.
            for _ in 0..s.inputs.min(n_sources) {
                let u = rng.unit();
                let d = sources[((u * u) * n_sources as f64) as usize].digest;
                if seen.insert(d) {
                    inputs.push(d);
                }
            }
            if i > 0 {
                for _ in 0..s.deps {
                    let dep: &ActionSpec = &actions[rng.below(i)];
                    for o in &dep.outputs {
                        if seen.insert(o.digest) {
                            inputs.push(o.digest);
                        }
                    }
                }
            }
            let key = sha256(format!("wan-bench action {} {i}", s.seed).as_bytes());
            actions.push(ActionSpec {
                index: i,
                key,
                inputs,
                outputs: outs,
                changed: changed.contains(&i),
            });
        }
        Workload { sources, actions }
    }

    fn summary(&self, s: &Settings) -> String {
        let mut sizes: Vec<u64> = self.seeded_blobs().map(|b| b.digest.size).collect();
        sizes.sort_unstable();
        let total: u64 = sizes.iter().sum();
        let outputs: Vec<u64> = self
            .actions
            .iter()
            .filter(|a| !a.changed)
            .flat_map(|a| a.outputs.iter().map(|o| o.digest.size))
            .collect();
        let bucket = |lo: u64, hi: u64| sizes.iter().filter(|&&n| n >= lo && n < hi).count();
        let changed: Vec<&ActionSpec> = self.actions.iter().filter(|a| a.changed).collect();
        let changed_bytes: u64 = changed
            .iter()
            .flat_map(|a| a.outputs.iter().map(|o| o.digest.size))
            .sum();
        let inputs: usize = self.actions.iter().map(|a| a.inputs.len()).sum();
        format!(
            "{} blobs seeded upstream, {} ({} sources, {} outputs of {} actions)\n\
             sizes: {} < 64 KiB, {} 64 KiB–1 MiB, {} ≥ 1 MiB; median {}, largest {}\n\
             per run: {} action hits reading {} outputs ({}), {} inputs checked \
             (avg {:.0} per action), {} changed actions uploading ~{} of fresh outputs\n\
             {} clients × {} jobs, each action run by {} client(s)",
            sizes.len(),
            human_bytes(total),
            self.sources.len(),
            sizes.len() - self.sources.len(),
            self.actions.len(),
            bucket(0, 64 * KIB),
            bucket(64 * KIB, MIB),
            bucket(MIB, u64::MAX),
            human_bytes(sizes[sizes.len() / 2]),
            human_bytes(*sizes.last().unwrap_or(&0)),
            self.actions.len() - changed.len(),
            outputs.len(),
            human_bytes(outputs.iter().sum()),
            inputs,
            inputs as f64 / self.actions.len() as f64,
            changed.len(),
            human_bytes(changed_bytes),
            s.clients,
            s.jobs,
            s.overlap,
        )
    }
}

// ---------------------------------------------------------------- client

/// The client-side RPCs, named as in the proxy's `upstream_calls`.
const RPC_NAMES: [&str; 8] = [
    "GetCapabilities",
    "GetActionResult",
    "UpdateActionResult",
    "FindMissingBlobs",
    "BatchReadBlobs",
    "BatchUpdateBlobs",
    "ByteStream.Read",
    "ByteStream.Write",
];

#[derive(Clone, Copy)]
enum Rpc {
    GetCapabilities = 0,
    GetActionResult,
    UpdateActionResult,
    FindMissingBlobs,
    BatchReadBlobs,
    BatchUpdateBlobs,
    ByteStreamRead,
    ByteStreamWrite,
}

/// What the clients of one run did.
#[derive(Default)]
struct Counters {
    calls: [AtomicU64; 8],
    /// Total time in calls, by method.
    nanos: [AtomicU64; 8],
    bytes_read: AtomicU64,
    bytes_written: AtomicU64,
    action_hits: AtomicU64,
    action_misses: AtomicU64,
    digests_checked: AtomicU64,
    /// Inputs FindMissingBlobs reported missing although the upstream holds them.
    unexpected_missing: AtomicU64,
    blobs_uploaded: AtomicU64,
    next_upload: AtomicU64,
}

/// Counts one call and, when dropped, adds its duration (streams included).
struct CallTimer {
    counters: Arc<Counters>,
    rpc: Rpc,
    start: Instant,
}

impl Drop for CallTimer {
    fn drop(&mut self) {
        let nanos = self.start.elapsed().as_nanos() as u64;
        Counters::add(&self.counters.nanos[self.rpc as usize], nanos);
    }
}

impl Counters {
    fn time(counters: &Arc<Counters>, rpc: Rpc) -> CallTimer {
        Counters::add(&counters.calls[rpc as usize], 1);
        CallTimer {
            counters: counters.clone(),
            rpc,
            start: Instant::now(),
        }
    }

    /// Mean latency per method, for the methods called.
    fn latencies(&self) -> String {
        let parts: Vec<String> = RPC_NAMES
            .iter()
            .enumerate()
            .filter(|(i, _)| Self::get(&self.calls[*i]) > 0)
            .map(|(i, name)| {
                let mean = Self::get(&self.nanos[i]) as f64 / Self::get(&self.calls[i]) as f64;
                format!("{name} {:.0} ms", mean / 1e6)
            })
            .collect();
        parts.join(", ")
    }

    fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }

    fn get(counter: &AtomicU64) -> u64 {
        counter.load(Ordering::Relaxed)
    }

    fn calls(&self) -> BTreeMap<String, u64> {
        RPC_NAMES
            .iter()
            .zip(&self.calls)
            .map(|(name, n)| (name.to_string(), Self::get(n)))
            .collect()
    }
}

/// One build client: its own channel, counting every call.
#[derive(Clone)]
struct Client {
    ac: ActionCacheClient<Channel>,
    cas: ContentAddressableStorageClient<Channel>,
    bytestream: ByteStreamClient<Channel>,
    /// The server's max_batch_total_size_bytes.
    max_batch: u64,
    /// Blobs up to this size are read and written in batches.
    batch_blob_max: u64,
    counters: Arc<Counters>,
}

fn read_name(d: &Digest) -> String {
    format!("blobs/{}/{}", d.hash_hex(), d.size)
}

fn write_name(d: &Digest, n: u64) -> String {
    format!(
        "uploads/77616e62-656e-4000-8000-{n:012x}/blobs/{}/{}",
        d.hash_hex(),
        d.size
    )
}

impl Client {
    async fn connect(target: &str, s: &Settings, counters: Arc<Counters>) -> anyhow::Result<Self> {
        let channel = outpost::client::connect(target).await?;
        let _timer = Counters::time(&counters, Rpc::GetCapabilities);
        let caps = CapabilitiesClient::new(channel.clone())
            .get_capabilities(GetCapabilitiesRequest::default())
            .await?
            .into_inner();
        let max_batch = caps
            .cache_capabilities
            .map(|c| c.max_batch_total_size_bytes)
            .filter(|&n| n > 0)
            .unwrap_or(4 << 20) as u64;
        let max_batch = max_batch.min(4 << 20);
        Ok(Client {
            ac: ActionCacheClient::new(channel.clone())
                .max_decoding_message_size(CLIENT_MAX_MESSAGE)
                .max_encoding_message_size(CLIENT_MAX_MESSAGE),
            cas: ContentAddressableStorageClient::new(channel.clone())
                .max_decoding_message_size(CLIENT_MAX_MESSAGE)
                .max_encoding_message_size(CLIENT_MAX_MESSAGE),
            bytestream: ByteStreamClient::new(channel)
                .max_decoding_message_size(CLIENT_MAX_MESSAGE)
                .max_encoding_message_size(CLIENT_MAX_MESSAGE),
            max_batch,
            batch_blob_max: s.batch_blob_max.min(max_batch - BATCH_ENTRY_OVERHEAD),
            counters,
        })
    }

    async fn get_action_result(&self, key: &Digest) -> anyhow::Result<Option<ActionResult>> {
        let _timer = Counters::time(&self.counters, Rpc::GetActionResult);
        let request = GetActionResultRequest {
            action_digest: Some(key.to_proto()),
            digest_function: DigestFunction::Sha256.to_proto(),
            ..Default::default()
        };
        match self.ac.clone().get_action_result(request).await {
            Ok(r) => {
                Counters::add(&self.counters.action_hits, 1);
                Ok(Some(r.into_inner()))
            }
            Err(status) if status.code() == tonic::Code::NotFound => {
                Counters::add(&self.counters.action_misses, 1);
                Ok(None)
            }
            Err(status) => Err(status).context("GetActionResult"),
        }
    }

    async fn update_action_result(&self, key: &Digest, result: ActionResult) -> anyhow::Result<()> {
        let _timer = Counters::time(&self.counters, Rpc::UpdateActionResult);
        let request = UpdateActionResultRequest {
            action_digest: Some(key.to_proto()),
            action_result: Some(result),
            digest_function: DigestFunction::Sha256.to_proto(),
            ..Default::default()
        };
        self.ac
            .clone()
            .update_action_result(request)
            .await
            .context("UpdateActionResult")?;
        Ok(())
    }

    async fn find_missing(&self, digests: &[Digest]) -> anyhow::Result<Vec<Digest>> {
        let _timer = Counters::time(&self.counters, Rpc::FindMissingBlobs);
        Counters::add(&self.counters.digests_checked, digests.len() as u64);
        let request = FindMissingBlobsRequest {
            blob_digests: digests.iter().map(Digest::to_proto).collect(),
            digest_function: DigestFunction::Sha256.to_proto(),
            ..Default::default()
        };
        let response = self
            .cas
            .clone()
            .find_missing_blobs(request)
            .await
            .context("FindMissingBlobs")?
            .into_inner();
        response
            .missing_blob_digests
            .iter()
            .map(|d| Digest::parse(DigestFunction::Sha256, &d.hash, d.size_bytes))
            .collect::<Result<_, _>>()
            .map_err(|e| anyhow::anyhow!("FindMissingBlobs returned a bad digest: {e}"))
    }

    /// Reads and verifies `digests`: small ones batched, large ones streamed,
    /// all at once.
    async fn read_blobs(&self, digests: Vec<Digest>) -> anyhow::Result<()> {
        let (small, large): (Vec<Digest>, Vec<Digest>) = digests
            .into_iter()
            .partition(|d| d.size <= self.batch_blob_max);
        let batches = pack(small, self.max_batch, |d| d.size);
        let batch_reads = batches.into_iter().map(|b| self.batch_read(b));
        let stream_reads = large.into_iter().map(|d| self.bytestream_read(d));
        futures::future::try_join(
            futures::future::try_join_all(batch_reads),
            futures::future::try_join_all(stream_reads),
        )
        .await?;
        Ok(())
    }

    async fn batch_read(&self, digests: Vec<Digest>) -> anyhow::Result<()> {
        let _timer = Counters::time(&self.counters, Rpc::BatchReadBlobs);
        let request = BatchReadBlobsRequest {
            digests: digests.iter().map(Digest::to_proto).collect(),
            digest_function: DigestFunction::Sha256.to_proto(),
            ..Default::default()
        };
        let response = self
            .cas
            .clone()
            .batch_read_blobs(request)
            .await
            .context("BatchReadBlobs")?
            .into_inner();
        ensure!(
            response.responses.len() == digests.len(),
            "BatchReadBlobs answered {} of {} blobs",
            response.responses.len(),
            digests.len()
        );
        for (d, r) in digests.iter().zip(&response.responses) {
            let code = r.status.as_ref().map_or(0, |s| s.code);
            ensure!(
                code == 0,
                "BatchReadBlobs: {d}: code {code}: {}",
                r.status.as_ref().map_or("", |s| s.message.as_str())
            );
            ensure!(sha256(&r.data) == *d, "BatchReadBlobs: {d}: wrong bytes");
            Counters::add(&self.counters.bytes_read, r.data.len() as u64);
        }
        Ok(())
    }

    async fn bytestream_read(&self, digest: Digest) -> anyhow::Result<()> {
        let _timer = Counters::time(&self.counters, Rpc::ByteStreamRead);
        let mut stream = self
            .bytestream
            .clone()
            .read(ReadRequest {
                resource_name: read_name(&digest),
                read_offset: 0,
                read_limit: 0,
            })
            .await
            .with_context(|| format!("ByteStream.Read {digest}"))?
            .into_inner();
        let mut hasher = Hasher::new(DigestFunction::Sha256);
        while let Some(message) = stream.next().await {
            let message = message.with_context(|| format!("ByteStream.Read {digest}"))?;
            hasher.update(&message.data);
            Counters::add(&self.counters.bytes_read, message.data.len() as u64);
        }
        ensure!(
            hasher.finish() == digest,
            "ByteStream.Read {digest}: wrong bytes"
        );
        Ok(())
    }

    /// Uploads blobs: small ones batched, large ones streamed, all at once.
    async fn upload(&self, blobs: Vec<(Digest, Vec<u8>)>) -> anyhow::Result<()> {
        Counters::add(&self.counters.blobs_uploaded, blobs.len() as u64);
        let (small, large): (Vec<_>, Vec<_>) = blobs
            .into_iter()
            .partition(|(d, _)| d.size <= self.batch_blob_max);
        let batches = pack(small, self.max_batch, |(d, _)| d.size);
        let batch_writes = batches.into_iter().map(|b| self.batch_update(b));
        let stream_writes = large
            .into_iter()
            .map(|(d, data)| self.bytestream_write(d, data));
        futures::future::try_join(
            futures::future::try_join_all(batch_writes),
            futures::future::try_join_all(stream_writes),
        )
        .await?;
        Ok(())
    }

    async fn batch_update(&self, blobs: Vec<(Digest, Vec<u8>)>) -> anyhow::Result<()> {
        let _timer = Counters::time(&self.counters, Rpc::BatchUpdateBlobs);
        let bytes: u64 = blobs.iter().map(|(d, _)| d.size).sum();
        let digests: Vec<Digest> = blobs.iter().map(|(d, _)| *d).collect();
        let request = BatchUpdateBlobsRequest {
            requests: blobs
                .into_iter()
                .map(|(d, data)| batch_update_blobs_request::Request {
                    digest: Some(d.to_proto()),
                    data,
                    compressor: 0,
                })
                .collect(),
            digest_function: DigestFunction::Sha256.to_proto(),
            ..Default::default()
        };
        let response = self
            .cas
            .clone()
            .batch_update_blobs(request)
            .await
            .context("BatchUpdateBlobs")?
            .into_inner();
        ensure!(
            response.responses.len() == digests.len(),
            "BatchUpdateBlobs answered {} of {} blobs",
            response.responses.len(),
            digests.len()
        );
        for (d, r) in digests.iter().zip(&response.responses) {
            let code = r.status.as_ref().map_or(0, |s| s.code);
            ensure!(
                code == 0,
                "BatchUpdateBlobs: {d}: code {code}: {}",
                r.status.as_ref().map_or("", |s| s.message.as_str())
            );
        }
        Counters::add(&self.counters.bytes_written, bytes);
        Ok(())
    }

    async fn bytestream_write(&self, digest: Digest, data: Vec<u8>) -> anyhow::Result<()> {
        let _timer = Counters::time(&self.counters, Rpc::ByteStreamWrite);
        let upload = self.counters.next_upload.fetch_add(1, Ordering::Relaxed);
        let name = write_name(&digest, upload);
        let size = data.len();
        let data = Arc::new(data);
        let requests = write_stream(name, data, WRITE_CHUNK);
        let response = self
            .bytestream
            .clone()
            .write(requests)
            .await
            .with_context(|| format!("ByteStream.Write {digest}"))?
            .into_inner();
        ensure!(
            response.committed_size == size as i64,
            "ByteStream.Write {digest}: committed {} of {size} bytes",
            response.committed_size
        );
        Counters::add(&self.counters.bytes_written, size as u64);
        Ok(())
    }
}

fn action_result(outputs: &[BlobSpec], index: usize) -> ActionResult {
    ActionResult {
        output_files: outputs
            .iter()
            .enumerate()
            .map(|(k, o)| OutputFile {
                path: format!("bazel-out/k8-opt/bin/pkg{}/out{k}", index),
                digest: Some(o.digest.to_proto()),
                is_executable: k == 0,
                ..Default::default()
            })
            .collect(),
        exit_code: 0,
        ..Default::default()
    }
}

// ---------------------------------------------------------------- the build

/// One action, as a build client does it.
async fn run_action(client: &Client, action: &ActionSpec, tag: u64) -> anyhow::Result<()> {
    if action.changed {
        return run_changed_action(client, action, tag).await;
    }
    let result = client
        .get_action_result(&action.key)
        .await?
        .with_context(|| format!("action {} should be a cache hit", action.index))?;
    let missing = client.find_missing(&action.inputs).await?;
    Counters::add(&client.counters.unexpected_missing, missing.len() as u64);
    let outputs = result
        .output_files
        .iter()
        .map(|f| Digest::from_proto(DigestFunction::Sha256, f.digest.as_ref()))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| anyhow::anyhow!("bad output digest: {e}"))?;
    ensure!(
        outputs.len() == action.outputs.len(),
        "action {}: {} outputs, expected {}",
        action.index,
        outputs.len(),
        action.outputs.len()
    );
    client.read_blobs(outputs).await
}

/// A changed action: a cache miss, executed "locally", uploaded. Its blobs
/// are fresh in every run (`tag`), with the same sizes.
async fn run_changed_action(client: &Client, action: &ActionSpec, tag: u64) -> anyhow::Result<()> {
    let i = action.index as u64;
    let key = sha256(format!("wan-bench changed action {tag} {i}").as_bytes());
    if client.get_action_result(&key).await?.is_some() {
        // Another client ran it first (OUTPOST_WAN_OVERLAP > 1): a hit.
        return Ok(());
    }
    // The edited source: same size every run, new bytes.
    let source_size = action.inputs.first().map_or(4 * KIB, |d| d.size).max(1);
    let kind = action.outputs.first().map_or(DataKind::Random, |o| o.kind);
    let source = BlobSpec::new(kind, seed_of(&[tag, i, 0x5]), source_size);
    let mut inputs = action.inputs.clone();
    inputs.push(source.digest);
    let missing = client.find_missing(&inputs).await?;
    let unexpected = missing.iter().filter(|d| **d != source.digest).count();
    Counters::add(&client.counters.unexpected_missing, unexpected as u64);
    if missing.contains(&source.digest) {
        client.upload(vec![(source.digest, source.data())]).await?;
    }
    // "Execution" produces fresh outputs of the seeded outputs' sizes.
    let outputs: Vec<BlobSpec> = action
        .outputs
        .iter()
        .enumerate()
        .map(|(k, o)| BlobSpec::new(o.kind, seed_of(&[tag, i, 0x0, k as u64]), o.digest.size))
        .collect();
    let digests: Vec<Digest> = outputs.iter().map(|o| o.digest).collect();
    let missing: HashSet<Digest> = client.find_missing(&digests).await?.into_iter().collect();
    let uploads = outputs
        .iter()
        .filter(|o| missing.contains(&o.digest))
        .map(|o| (o.digest, o.data()))
        .collect();
    client.upload(uploads).await?;
    client
        .update_action_result(&key, action_result(&outputs, action.index))
        .await
}

/// Replays the build from every client at once; returns the wall time.
async fn run_build(
    target: &str,
    workload: &Arc<Workload>,
    s: &Arc<Settings>,
    tag: u64,
    counters: &Arc<Counters>,
) -> anyhow::Result<Duration> {
    let start = Instant::now();
    let mut tasks = Vec::new();
    for c in 0..s.clients {
        let (target, workload, s, counters) = (
            target.to_string(),
            workload.clone(),
            s.clone(),
            counters.clone(),
        );
        tasks.push(tokio::spawn(async move {
            let client = Client::connect(&target, &s, counters).await?;
            // Action i is run by clients i, i+1, … (mod clients), `overlap` of them.
            let mine: Vec<usize> = (0..workload.actions.len())
                .filter(|i| (c + s.clients - i % s.clients) % s.clients < s.overlap)
                .collect();
            futures::stream::iter(mine)
                .map(|i| {
                    let (client, workload) = (&client, &workload);
                    async move {
                        run_action(client, &workload.actions[i], tag)
                            .await
                            .with_context(|| format!("client {c}, action {i}"))
                    }
                })
                .buffer_unordered(s.jobs)
                .try_collect::<Vec<()>>()
                .await?;
            anyhow::Ok(())
        }));
    }
    for task in tasks {
        task.await??;
    }
    Ok(start.elapsed())
}

/// Writes the workload straight into the upstream (no WAN), as another
/// machine's build would have.
async fn seed(target: &str, workload: &Arc<Workload>, s: &Arc<Settings>) -> anyhow::Result<()> {
    let counters = Arc::new(Counters::default());
    let client = Client::connect(target, s, counters).await?;
    let blobs: Vec<BlobSpec> = workload.seeded_blobs().copied().collect();
    // Groups of about one batch, uploaded a few at a time.
    let groups = pack(blobs, client.max_batch, |b| b.digest.size);
    futures::stream::iter(groups)
        .map(|group| {
            let client = &client;
            async move {
                let data = group.iter().map(|b| (b.digest, b.data())).collect();
                client.upload(data).await
            }
        })
        .buffer_unordered(8)
        .try_collect::<Vec<()>>()
        .await?;
    futures::stream::iter(&workload.actions)
        .map(|a| client.update_action_result(&a.key, action_result(&a.outputs, a.index)))
        .buffer_unordered(16)
        .try_collect::<Vec<()>>()
        .await?;
    // Every seeded blob must be there.
    let all: Vec<Digest> = workload.seeded_blobs().map(|b| b.digest).collect();
    let missing = client.find_missing(&all).await?;
    ensure!(
        missing.is_empty(),
        "{} seeded blobs missing upstream",
        missing.len()
    );
    Ok(())
}

// ---------------------------------------------------------------- processes

/// An `outpost serve` child and its temporary data directory (the child is
/// stopped first: fields drop in order).
struct Server {
    process: ServerProcess,
    _dir: tempfile::TempDir,
}

impl Server {
    fn start(s: &Settings, name: &str, extra: &[String]) -> anyhow::Result<Self> {
        ensure!(
            s.bin.exists(),
            "server binary {} not found; run `cargo build --release` or set OUTPOST_WAN_BIN",
            s.bin.display()
        );
        let dir = tempfile::Builder::new()
            .prefix(&format!("outpost-wan-{name}-"))
            .tempdir()?;
        let process = ServerProcess::command(&s.bin, dir.path())
            .args(["--quota", &s.quota])
            .args(extra)
            .rust_log(&std::env::var("OUTPOST_WAN_SERVER_LOG").unwrap_or_else(|_| "warn".into()))
            .start()
            .with_context(|| format!("outpost serve ({name})"))?;
        Ok(Server { process, _dir: dir })
    }

    fn addr(&self) -> SocketAddr {
        self.process.addr()
    }

    fn url(&self) -> String {
        self.process.url()
    }

    async fn stats(&self) -> anyhow::Result<GetStatsResponse> {
        let channel = outpost::client::connect(&self.url()).await?;
        Ok(AdminClient::new(channel)
            .get_stats(GetStatsRequest {})
            .await?
            .into_inner())
    }
}

// ---------------------------------------------------------------- reporting

/// The proxy's counters over one run.
struct ProxyDelta {
    upstream_calls: BTreeMap<String, u64>,
    upstream_errors: u64,
    bytes_sent: u64,
    bytes_received: u64,
    existence_hits: u64,
    existence_misses: u64,
    fetches: u64,
    joins: u64,
    uploads_from_local: u64,
    fmb_batches: u64,
    fmb_digests: u64,
    read_batches: u64,
    read_blobs: u64,
    write_batches: u64,
    write_blobs: u64,
    cas_hits: u64,
    cas_misses: u64,
    ac_hits: u64,
    ac_misses: u64,
}

impl ProxyDelta {
    fn between(a: &GetStatsResponse, b: &GetStatsResponse) -> Self {
        let upstream_calls = b
            .upstream_calls
            .iter()
            .map(|(m, n)| {
                let before = a.upstream_calls.get(m).copied().unwrap_or(0);
                (m.clone(), n - before)
            })
            .collect();
        ProxyDelta {
            upstream_calls,
            upstream_errors: b.upstream_errors - a.upstream_errors,
            bytes_sent: b.upstream_bytes_sent - a.upstream_bytes_sent,
            bytes_received: b.upstream_bytes_received - a.upstream_bytes_received,
            existence_hits: b.existence_cache_hits - a.existence_cache_hits,
            existence_misses: b.existence_cache_misses - a.existence_cache_misses,
            fetches: b.upstream_fetches - a.upstream_fetches,
            joins: b.single_flight_joins - a.single_flight_joins,
            uploads_from_local: b.uploads_from_local - a.uploads_from_local,
            fmb_batches: b.fmb_batches - a.fmb_batches,
            fmb_digests: b.fmb_batched_digests - a.fmb_batched_digests,
            read_batches: b.read_batches - a.read_batches,
            read_blobs: b.read_batched_blobs - a.read_batched_blobs,
            write_batches: b.write_batches - a.write_batches,
            write_blobs: b.write_batched_blobs - a.write_batched_blobs,
            cas_hits: b.cas_hits - a.cas_hits,
            cas_misses: b.cas_misses - a.cas_misses,
            ac_hits: b.action_cache_hits - a.action_cache_hits,
            ac_misses: b.action_cache_misses - a.action_cache_misses,
        }
    }

    fn describe(&self) -> String {
        let avg = |n: u64, calls: u64| {
            if calls == 0 {
                0.0
            } else {
                n as f64 / calls as f64
            }
        };
        format!(
            "  proxy: existence cache {} hits / {} asked upstream; {} fetches into the local store, \
             {} reads joined one in flight; {} uploads from local\n  \
             proxy batching: FindMissingBlobs {} calls (avg {:.1} digests), BatchRead {} (avg {:.1} blobs), \
             BatchUpdate {} (avg {:.1} blobs)\n  \
             proxy local: CAS {} hits / {} misses, action cache {} hits / {} misses; \
             upstream blob bytes {} sent, {} received, {} upstream errors",
            self.existence_hits,
            self.existence_misses,
            self.fetches,
            self.joins,
            self.uploads_from_local,
            self.fmb_batches,
            avg(self.fmb_digests, self.fmb_batches),
            self.read_batches,
            avg(self.read_blobs, self.read_batches),
            self.write_batches,
            avg(self.write_blobs, self.write_batches),
            self.cas_hits,
            self.cas_misses,
            self.ac_hits,
            self.ac_misses,
            human_bytes(self.bytes_sent),
            human_bytes(self.bytes_received),
            self.upstream_errors,
        )
    }
}

struct RunReport {
    mode: Mode,
    wall: Duration,
    upstream_calls: BTreeMap<String, u64>,
    wan_up: u64,
    wan_down: u64,
}

impl RunReport {
    fn rpcs(&self) -> u64 {
        self.upstream_calls.values().sum()
    }

    fn wan_bytes(&self) -> u64 {
        self.wan_up + self.wan_down
    }
}

fn calls_line(calls: &BTreeMap<String, u64>) -> String {
    let parts: Vec<String> = calls
        .iter()
        .filter(|(_, n)| **n > 0)
        .map(|(m, n)| format!("{m} {n}"))
        .collect();
    if parts.is_empty() {
        "none".into()
    } else {
        parts.join(", ")
    }
}

fn ratio(a: f64, b: f64) -> String {
    if b == 0.0 {
        "∞".into()
    } else {
        format!("{:.1}×", a / b)
    }
}

fn print_table(reports: &[RunReport], wan: &WanConfig) {
    // How much of the run the busier direction of the link was sending.
    let busy = |r: &RunReport| {
        if wan.bandwidth_bits_per_sec == 0 {
            return "-".to_string();
        }
        let seconds = r.wan_up.max(r.wan_down) as f64 * 8.0 / wan.bandwidth_bits_per_sec as f64;
        format!("{:.0}%", 100.0 * seconds / r.wall.as_secs_f64())
    };
    println!();
    println!(
        "| run        |   wall time | upstream RPCs | WAN up     | WAN down   | WAN total  | link busy |"
    );
    println!(
        "|------------|-------------|---------------|------------|------------|------------|-----------|"
    );
    for r in reports {
        println!(
            "| {:<10} | {:>9.2} s | {:>13} | {:>10} | {:>10} | {:>10} | {:>9} |",
            r.mode.name(),
            r.wall.as_secs_f64(),
            r.rpcs(),
            human_bytes(r.wan_up),
            human_bytes(r.wan_down),
            human_bytes(r.wan_bytes()),
            busy(r),
        );
    }
    let Some(direct) = reports.iter().find(|r| r.mode == Mode::Direct) else {
        return;
    };
    println!();
    println!("| ratio          | wall time | upstream RPCs | WAN bytes |");
    println!("|----------------|-----------|---------------|-----------|");
    for r in reports.iter().filter(|r| r.mode != Mode::Direct) {
        println!(
            "| direct / {:<5} | {:>9} | {:>13} | {:>9} |",
            if r.mode == Mode::Cold { "cold" } else { "warm" },
            ratio(direct.wall.as_secs_f64(), r.wall.as_secs_f64()),
            ratio(direct.rpcs() as f64, r.rpcs() as f64),
            ratio(direct.wan_bytes() as f64, r.wan_bytes() as f64),
        );
    }
}

/// Checks the targets; returns the ones missed.
fn check_targets(reports: &[RunReport]) -> Vec<String> {
    let mut missed = Vec::new();
    let find = |m| reports.iter().find(|r| r.mode == m);
    let Some(direct) = find(Mode::Direct) else {
        return missed;
    };
    println!();
    let mut verdict = |what: String, ok: bool| {
        println!("{} {what}", if ok { "PASS" } else { "MISS" });
        if !ok {
            missed.push(what);
        }
    };
    if let Some(warm) = find(Mode::Warm) {
        let speedup = direct.wall.as_secs_f64() / warm.wall.as_secs_f64();
        verdict(
            format!("warm ≥ 10× faster than direct: {speedup:.1}×"),
            speedup >= 10.0,
        );
        let fewer = direct.rpcs() as f64 / warm.rpcs().max(1) as f64;
        verdict(
            format!("warm ≥ 20× fewer upstream RPCs: {fewer:.1}×"),
            fewer >= 20.0,
        );
    }
    if let Some(cold) = find(Mode::Cold) {
        let slowdown = cold.wall.as_secs_f64() / direct.wall.as_secs_f64();
        verdict(
            format!(
                "cold no slower than direct: cold/direct wall = {slowdown:.3} \
                 (allowing {:.0}% for noise)",
                COLD_NOISE * 100.0
            ),
            slowdown <= 1.0 + COLD_NOISE,
        );
    }
    missed
}

// ---------------------------------------------------------------- main

async fn measure(
    mode: Mode,
    target: &str,
    relay: &Relay,
    proxy: Option<&Server>,
    workload: &Arc<Workload>,
    s: &Arc<Settings>,
) -> anyhow::Result<RunReport> {
    let before = match proxy {
        Some(p) => Some(p.stats().await?),
        None => None,
    };
    let metrics_addr = proxy.and_then(|p| p.process.metrics_addr());
    let metrics_before = match metrics_addr {
        Some(addr) => scrape(addr).await.ok(),
        None => None,
    };
    relay.reset_counters();
    let counters = Arc::new(Counters::default());
    let wall = tokio::time::timeout(
        s.run_timeout,
        run_build(target, workload, s, mode.tag(), &counters),
    )
    .await
    .with_context(|| {
        format!(
            "{} run did not finish within {:?}",
            mode.name(),
            s.run_timeout
        )
    })?
    .with_context(|| format!("{} run failed", mode.name()))?;
    let (wan_up, wan_down, wan_connections) =
        (relay.bytes_up(), relay.bytes_down(), relay.connections());
    let c = &counters;
    ensure!(
        Counters::get(&c.unexpected_missing) == 0,
        "{}: FindMissingBlobs reported {} present inputs missing",
        mode.name(),
        Counters::get(&c.unexpected_missing)
    );
    let client_calls = c.calls();
    println!(
        "\n{}: {:.2} s; client calls: {} ({} total)",
        mode.name(),
        wall.as_secs_f64(),
        calls_line(&client_calls),
        client_calls.values().sum::<u64>()
    );
    println!("  mean client call latency: {}", c.latencies());
    println!(
        "  clients: {} action hits, {} misses, {} digests checked, {} read, {} blobs / {} uploaded",
        Counters::get(&c.action_hits),
        Counters::get(&c.action_misses),
        Counters::get(&c.digests_checked),
        human_bytes(Counters::get(&c.bytes_read)),
        Counters::get(&c.blobs_uploaded),
        human_bytes(Counters::get(&c.bytes_written)),
    );
    let upstream_calls = match (proxy, before) {
        (Some(p), Some(before)) => {
            let delta = ProxyDelta::between(&before, &p.stats().await?);
            println!(
                "  upstream calls (proxy): {} ({} total)",
                calls_line(&delta.upstream_calls),
                delta.upstream_calls.values().sum::<u64>()
            );
            println!("{}", delta.describe());
            // Counters only /metrics has (e.g. prefetch), when the proxy has them.
            if let (Some(addr), Some(a)) = (metrics_addr, &metrics_before)
                && let Ok(b) = scrape(addr).await
            {
                let extra: Vec<String> = b
                    .iter()
                    .filter(|(name, _)| name.contains("prefetch"))
                    .map(|(name, v)| {
                        let delta = v - a.get(name).copied().unwrap_or(0.0);
                        let short = name
                            .trim_start_matches("outpost_")
                            .trim_end_matches("_total");
                        format!("{short} {delta}")
                    })
                    .collect();
                if !extra.is_empty() {
                    println!("  proxy /metrics: {}", extra.join(", "));
                }
            }
            delta.upstream_calls
        }
        _ => client_calls,
    };
    println!(
        "  WAN: {} up, {} down, {} new connections",
        human_bytes(wan_up),
        human_bytes(wan_down),
        wan_connections
    );
    Ok(RunReport {
        mode,
        wall,
        upstream_calls,
        wan_up,
        wan_down,
    })
}

/// Waits until the proxy has fetched the upstream's capabilities (its start-up
/// call), so that call does not land in the cold run's counts.
async fn wait_for_capabilities(proxy: &Server) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let stats = proxy.stats().await?;
        if stats
            .upstream_calls
            .get("GetCapabilities")
            .is_some_and(|&n| n > 0)
        {
            // Let the answer cross the WAN back.
            tokio::time::sleep(Duration::from_millis(200)).await;
            return Ok(());
        }
        ensure!(
            Instant::now() < deadline,
            "the proxy did not call GetCapabilities upstream within 10 s"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The seeded build (direct, proxy cold, proxy warm) against one upstream
/// seeded with the whole build.
async fn run_seeded(workload: &Arc<Workload>, s: &Arc<Settings>) -> anyhow::Result<Vec<RunReport>> {
    let (workload, s) = (workload.clone(), s.clone());
    let upstream = Server::start(&s, "upstream", &[])?;
    let t = Instant::now();
    seed(&upstream.url(), &workload, &s).await?;
    let seeded = upstream.stats().await?;
    println!(
        "upstream {} seeded directly in {:.1} s: {} blobs, {}, {} action results",
        upstream.url(),
        t.elapsed().as_secs_f64(),
        seeded.blob_count,
        human_bytes(seeded.blob_bytes),
        seeded.action_result_count
    );

    let relay = Relay::start(upstream.addr(), s.wan).await?;
    println!("WAN relay {} → {}", relay.url(), upstream.addr());

    let mut reports = Vec::new();
    if s.only.contains(&Mode::Direct) {
        reports.push(measure(Mode::Direct, &relay.url(), &relay, None, &workload, &s).await?);
    }
    if s.only.contains(&Mode::Cold) || s.only.contains(&Mode::Warm) {
        let mut args = vec![
            "--upstream".to_string(),
            relay.url(),
            "--metrics-listen".into(),
            "127.0.0.1:0".into(),
        ];
        if let Some(config) = &s.proxy_config {
            args.push("--config".into());
            args.push(config.display().to_string());
        }
        let proxy = Server::start(&s, "proxy", &args)?;
        wait_for_capabilities(&proxy).await?;
        println!("\nproxy {} → upstream {}", proxy.url(), relay.url());
        for mode in [Mode::Cold, Mode::Warm] {
            if s.only.contains(&mode) {
                reports
                    .push(measure(mode, &proxy.url(), &relay, Some(&proxy), &workload, &s).await?);
            }
        }
        // The proxy's own summary, as an operator would see it.
        if let Ok(out) = Command::new(&s.bin)
            .args(["stats", "--server", &proxy.url()])
            .output()
        {
            println!("\n$ outpost stats (proxy, after all runs)");
            print!("{}", String::from_utf8_lossy(&out.stdout));
        }
    }

    Ok(reports)
}

async fn run(s: Arc<Settings>) -> anyhow::Result<()> {
    println!("Outpost WAN benchmark: {}", s.wan);
    let t = Instant::now();
    let workload = Arc::new(
        tokio::task::spawn_blocking({
            let s = s.clone();
            move || Workload::build(&s, false)
        })
        .await?,
    );
    println!("{}", workload.summary(&s));
    println!("workload generated in {:.1} s", t.elapsed().as_secs_f64());

    let reports = if s.only.is_empty() {
        Vec::new()
    } else {
        run_seeded(&workload, &s).await?
    };
    if !reports.is_empty() {
        print_table(&reports, &s.wan);
    }
    let mut missed = check_targets(&reports);
    if !s.cache_only.is_empty() {
        missed.extend(cold_cache::run(&s.cache_only, &workload, &s).await?);
    }
    if s.zstd {
        missed.extend(zstd_runs::run(&workload, &s).await?);
    }
    if s.enforce && !missed.is_empty() {
        bail!("targets missed: {}", missed.join("; "));
    }
    Ok(())
}

fn main() -> anyhow::Result<()> {
    let settings = Arc::new(Settings::from_env()?);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(run(settings))
}
