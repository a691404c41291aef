//! WAN remote-execution benchmark: actions executed by an upstream across a
//! simulated WAN, the client talking straight to it versus through an Outpost
//! proxy with and without output prefetch.
//!
//! Processes: the upstream is the in-process fake from the tests
//! (`outpost_testkit::fake`, which executes actions with deterministic
//! outputs); the WAN is the relay in `crates/outpost-testkit/src/relay.rs` (40 ms RTT,
//! 50 Mbit/s per direction by default) in front of it; the proxy is the real
//! `outpost serve --upstream grpc://RELAY` binary, once with prefetch on (the
//! default) and once with `[prefetch] enabled = false` (`--config`).
//!
//! Workload: `ACTIONS` actions, each with a few small inputs seeded in the
//! fake directly and 1–3 outputs of log-uniform sizes (4 KiB–4 MiB). Every run
//! salts the actions, so each run executes fresh actions with fresh output
//! bytes (and fresh input bytes, so the proxy starts every run without them).
//! `JOBS` actions are in flight at once over one channel; each one is:
//! FindMissingBlobs of its inputs (as Bazel does; all present), Execute,
//! wait for the done Operation, optionally "think" (sleep `THINK_MS`), then
//! read every output plus stdout/stderr (BatchReadBlobs for blobs ≤ 1 MiB,
//! ByteStream Read above), verified against its digest.
//!
//! Measured per action: FindMissingBlobs start → done Operation ("exec") and
//! read start → all outputs held ("read"); per run: wall time, bytes on the
//! WAN (relay counters) and the proxy's upstream calls and prefetch counters.
//!
//! Run: `cargo bench --bench wan_exec`. Knobs: see benches/README.md.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};
use futures::{StreamExt, TryStreamExt};
use outpost::admin_proto::GetStatsRequest;
use outpost::admin_proto::admin_client::AdminClient;
use outpost::cli::human_bytes;
use outpost_testkit::env::{env_u64, server_binary};
use outpost_testkit::fake::{FakeUpstream, TestAction, operation_response};
use outpost_testkit::metrics::scrape;
use outpost_testkit::relay::{Relay, WanConfig};
use outpost_testkit::{Rng, ServerProcess, bs, pack, re};
use sha2::{Digest as _, Sha256};
use tonic::transport::{Channel, Endpoint};

const KIB: u64 = 1 << 10;
const MIB: u64 = 1 << 20;
const CLIENT_MAX_MESSAGE: usize = 64 << 20;
/// Blobs up to this size are read with BatchReadBlobs, larger with ByteStream.
const BATCH_BLOB_MAX: u64 = MIB;

// ---------------------------------------------------------------- settings

struct Settings {
    bin: PathBuf,
    wan: WanConfig,
    actions: usize,
    jobs: usize,
    exec_delay: Duration,
    thinks: Vec<Duration>,
    seed: u64,
    runs: Vec<Target>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Target {
    Direct,
    NoPrefetch,
    Prefetch,
}

impl Target {
    fn name(self) -> &'static str {
        match self {
            Target::Direct => "direct",
            Target::NoPrefetch => "outpost, no prefetch",
            Target::Prefetch => "outpost, prefetch",
        }
    }
}

impl Settings {
    fn from_env() -> anyhow::Result<Self> {
        let bin = server_binary("OUTPOST_WAN_BIN", option_env!("CARGO_BIN_EXE_outpost"));
        let thinks = std::env::var("OUTPOST_WANX_THINK_MS")
            .unwrap_or_else(|_| "0,1000,2000".into())
            .split(',')
            .map(|v| {
                v.trim()
                    .parse::<u64>()
                    .map(Duration::from_millis)
                    .with_context(|| format!("OUTPOST_WANX_THINK_MS: {v:?}"))
            })
            .collect::<anyhow::Result<Vec<_>>>()?;
        let runs = std::env::var("OUTPOST_WANX_ONLY")
            .unwrap_or_else(|_| "direct,noprefetch,prefetch".into())
            .split(',')
            .map(|v| match v.trim() {
                "direct" => Ok(Target::Direct),
                "noprefetch" => Ok(Target::NoPrefetch),
                "prefetch" => Ok(Target::Prefetch),
                other => {
                    bail!("OUTPOST_WANX_ONLY: unknown {other:?} (direct, noprefetch, prefetch)")
                }
            })
            .collect::<anyhow::Result<Vec<_>>>()?;
        Ok(Settings {
            bin,
            wan: WanConfig::from_env(WanConfig::reference()),
            actions: env_u64("OUTPOST_WANX_ACTIONS", 30)?.max(1) as usize,
            jobs: env_u64("OUTPOST_WANX_JOBS", 6)?.max(1) as usize,
            exec_delay: Duration::from_millis(env_u64("OUTPOST_WANX_EXEC_MS", 2000)?),
            thinks,
            seed: env_u64("OUTPOST_WANX_SEED", 1)?,
            runs,
        })
    }
}

// ---------------------------------------------------------------- workload

/// One action's shape: output paths (globally unique, so their sizes can be
/// set in the fake) and inputs.
struct ActionSpec {
    outputs: Vec<(String, u64)>,
    inputs: Vec<(String, Vec<u8>)>,
}

fn workload(s: &Settings) -> Vec<ActionSpec> {
    let mut rng = Rng::new(s.seed);
    (0..s.actions)
        .map(|i| {
            let n = 1 + (rng.next_u64() % 3) as usize;
            let outputs = (0..n)
                .map(|j| {
                    (
                        format!("out/a{i}/o{j}.bin"),
                        rng.log_uniform(4 * KIB, 4 * MIB),
                    )
                })
                .collect();
            let inputs = (0..3)
                .map(|j| {
                    let len = 1024 + (rng.next_u64() % 4096) as usize;
                    let data = (0..len)
                        .map(|k| (k as u64 ^ rng.next_u64()) as u8)
                        .collect();
                    (format!("src/a{i}/in{j}.c"), data)
                })
                .collect();
            ActionSpec { outputs, inputs }
        })
        .collect()
}

fn test_action(spec: &ActionSpec, i: usize, salt: &str) -> TestAction {
    let outs: Vec<&str> = spec.outputs.iter().map(|(p, _)| p.as_str()).collect();
    // Fresh input bytes per run: every run finds the proxy in the same state
    // (it has never seen this action's inputs; the upstream has them all).
    let data: Vec<Vec<u8>> = spec
        .inputs
        .iter()
        .map(|(_, d)| [salt.as_bytes(), d].concat())
        .collect();
    let inputs: Vec<(&str, &[u8])> = spec
        .inputs
        .iter()
        .zip(&data)
        .map(|((p, _), d)| (p.as_str(), d.as_slice()))
        .collect();
    let arg = format!("cc-{i}");
    TestAction::new(&[&arg], &outs, &inputs).salted(salt.as_bytes())
}

// ---------------------------------------------------------------- client

#[derive(Clone)]
struct Client {
    channel: Channel,
    max_batch: u64,
}

impl Client {
    async fn connect(target: SocketAddr) -> anyhow::Result<Self> {
        let channel = Endpoint::from_shared(format!("http://{target}"))?
            .initial_stream_window_size(16 << 20)
            .initial_connection_window_size(32 << 20)
            .connect()
            .await?;
        let caps = re::capabilities_client::CapabilitiesClient::new(channel.clone())
            .get_capabilities(re::GetCapabilitiesRequest::default())
            .await?
            .into_inner();
        let max_batch = caps
            .cache_capabilities
            .map(|c| c.max_batch_total_size_bytes as u64)
            .filter(|&m| m > 0)
            .unwrap_or(4 * MIB)
            .min(4 * MIB);
        Ok(Client { channel, max_batch })
    }

    /// What Bazel does before Execute: FindMissingBlobs of the Action, the
    /// Command and the whole input tree (all present: seeded upstream).
    async fn find_missing(&self, action: &TestAction) -> anyhow::Result<()> {
        let missing = re::content_addressable_storage_client::ContentAddressableStorageClient::new(
            self.channel.clone(),
        )
        .find_missing_blobs(re::FindMissingBlobsRequest {
            blob_digests: action.blob_digests(),
            ..Default::default()
        })
        .await?
        .into_inner()
        .missing_blob_digests;
        ensure!(missing.is_empty(), "{} inputs missing", missing.len());
        Ok(())
    }

    async fn execute(&self, action: &TestAction) -> anyhow::Result<re::ActionResult> {
        let mut stream = re::execution_client::ExecutionClient::new(self.channel.clone())
            .max_decoding_message_size(CLIENT_MAX_MESSAGE)
            .execute(re::ExecuteRequest {
                skip_cache_lookup: true,
                ..action.request("")
            })
            .await?
            .into_inner();
        while let Some(op) = stream.message().await? {
            if op.done {
                let resp = operation_response(&op).context("done Operation without response")?;
                if let Some(st) = &resp.status {
                    ensure!(st.code == 0, "execution failed: {st:?}");
                }
                return resp.result.context("ExecuteResponse without result");
            }
        }
        bail!("Execute stream ended before done")
    }

    async fn read_all(&self, digests: Vec<re::Digest>) -> anyhow::Result<u64> {
        let (small, large): (Vec<_>, Vec<_>) = digests
            .into_iter()
            .partition(|d| (d.size_bytes as u64) <= BATCH_BLOB_MAX);
        let batches = pack(small, self.max_batch, |d| d.size_bytes as u64);
        let mut calls = Vec::new();
        for b in batches {
            calls.push(futures::future::Either::Left(self.batch_read(b)));
        }
        for d in large {
            calls.push(futures::future::Either::Right(self.bytestream_read(d)));
        }
        let sizes = futures::future::try_join_all(calls).await?;
        Ok(sizes.into_iter().sum())
    }

    async fn batch_read(&self, digests: Vec<re::Digest>) -> anyhow::Result<u64> {
        let resp = re::content_addressable_storage_client::ContentAddressableStorageClient::new(
            self.channel.clone(),
        )
        .max_decoding_message_size(CLIENT_MAX_MESSAGE)
        .batch_read_blobs(re::BatchReadBlobsRequest {
            digests: digests.clone(),
            ..Default::default()
        })
        .await?
        .into_inner();
        ensure!(resp.responses.len() == digests.len(), "short batch");
        let mut total = 0;
        for r in resp.responses {
            let d = r.digest.context("response without digest")?;
            ensure!(
                r.status.as_ref().is_none_or(|s| s.code == 0),
                "BatchReadBlobs {}: {:?}",
                d.hash,
                r.status
            );
            verify(&d, &r.data)?;
            total += r.data.len() as u64;
        }
        Ok(total)
    }

    async fn bytestream_read(&self, d: re::Digest) -> anyhow::Result<u64> {
        let stream = bs::byte_stream_client::ByteStreamClient::new(self.channel.clone())
            .max_decoding_message_size(CLIENT_MAX_MESSAGE)
            .read(bs::ReadRequest {
                resource_name: format!("blobs/{}/{}", d.hash, d.size_bytes),
                ..Default::default()
            })
            .await?
            .into_inner();
        let chunks: Vec<_> = stream.map_ok(|r| r.data).try_collect().await?;
        let data = chunks.concat();
        verify(&d, &data)?;
        Ok(data.len() as u64)
    }
}

fn verify(d: &re::Digest, data: &[u8]) -> anyhow::Result<()> {
    ensure!(
        data.len() as i64 == d.size_bytes && hex::encode(Sha256::digest(data)) == d.hash,
        "blob {}/{} read back wrong ({} bytes)",
        d.hash,
        d.size_bytes,
        data.len()
    );
    Ok(())
}

fn output_digests(r: &re::ActionResult) -> Vec<re::Digest> {
    let mut v: Vec<re::Digest> = r
        .output_files
        .iter()
        .filter_map(|f| f.digest.clone())
        .collect();
    v.extend(r.stdout_digest.clone());
    v.extend(r.stderr_digest.clone());
    v
}

// ---------------------------------------------------------------- a run

struct ActionTiming {
    exec: Duration,
    read: Duration,
}

struct RunReport {
    target: Target,
    think: Duration,
    wall: Duration,
    bytes_read: u64,
    timings: Vec<ActionTiming>,
    wan_up: u64,
    wan_down: u64,
    upstream_calls: Option<u64>,
    prefetch: BTreeMap<String, f64>,
}

async fn run_actions(
    target: SocketAddr,
    actions: Arc<Vec<TestAction>>,
    jobs: usize,
    think: Duration,
) -> anyhow::Result<(Duration, u64, Vec<ActionTiming>)> {
    let client = Client::connect(target).await?;
    let t0 = Instant::now();
    let results: Vec<(u64, ActionTiming)> = futures::stream::iter(0..actions.len())
        .map(|i| {
            let client = client.clone();
            let actions = actions.clone();
            async move {
                let start = Instant::now();
                client.find_missing(&actions[i]).await?;
                let result = client.execute(&actions[i]).await?;
                let done = Instant::now();
                tokio::time::sleep(think).await;
                let read_start = Instant::now();
                let bytes = client.read_all(output_digests(&result)).await?;
                let held = Instant::now();
                anyhow::Ok((
                    bytes,
                    ActionTiming {
                        exec: done - start,
                        read: held - read_start,
                    },
                ))
            }
        })
        .buffer_unordered(jobs)
        .try_collect()
        .await?;
    let wall = t0.elapsed();
    let bytes = results.iter().map(|(b, _)| b).sum();
    Ok((wall, bytes, results.into_iter().map(|(_, t)| t).collect()))
}

// ---------------------------------------------------------------- processes

/// The proxy under test with its temporary directory (the child is stopped
/// first: fields drop in order).
struct Proxy {
    process: ServerProcess,
    _dir: tempfile::TempDir,
}

impl Proxy {
    fn start(s: &Settings, upstream: &str, prefetch: bool) -> anyhow::Result<Self> {
        ensure!(
            s.bin.exists(),
            "server binary {} not found; run `cargo build --release` or set OUTPOST_WAN_BIN",
            s.bin.display()
        );
        let dir = tempfile::Builder::new()
            .prefix("outpost-wanx-proxy-")
            .tempdir()?;
        let mut command = ServerProcess::command(&s.bin, dir.path().join("data"))
            .args(["--quota", "8GiB", "--upstream", upstream])
            .args(["--metrics-listen", "127.0.0.1:0"]);
        if !prefetch {
            let config = dir.path().join("outpost.toml");
            std::fs::write(&config, "[prefetch]\nenabled = false\n")?;
            command = command.arg("--config").arg(&config);
        }
        let process = command
            .rust_log(&std::env::var("OUTPOST_WAN_SERVER_LOG").unwrap_or_else(|_| "warn".into()))
            .start()
            .with_context(|| format!("cannot start {}", s.bin.display()))?;
        Ok(Proxy { process, _dir: dir })
    }

    fn addr(&self) -> SocketAddr {
        self.process.addr()
    }

    async fn upstream_calls(&self) -> anyhow::Result<BTreeMap<String, u64>> {
        let channel = outpost::client::connect(&self.process.url()).await?;
        let stats = AdminClient::new(channel)
            .get_stats(GetStatsRequest {})
            .await?
            .into_inner();
        Ok(stats.upstream_calls.into_iter().collect())
    }

    async fn prefetch_metrics(&self) -> anyhow::Result<BTreeMap<String, f64>> {
        let addr = self.process.metrics_addr().context("no metrics address")?;
        Ok(scrape(addr)
            .await?
            .into_iter()
            .filter(|(name, _)| name.contains("prefetch"))
            .map(|(name, value)| {
                let short = name
                    .trim_start_matches("outpost_")
                    .trim_end_matches("_total");
                (short.to_string(), value)
            })
            .collect())
    }
}

// ---------------------------------------------------------------- reporting

struct Dist {
    mean: f64,
    p50: f64,
    p90: f64,
    sum: f64,
}

fn dist(v: impl Iterator<Item = Duration>) -> Dist {
    let mut v: Vec<f64> = v.map(|d| d.as_secs_f64()).collect();
    v.sort_by(f64::total_cmp);
    let n = v.len().max(1);
    let sum: f64 = v.iter().sum();
    let at = |q: f64| {
        v.get(((n as f64 * q).ceil() as usize).saturating_sub(1))
            .copied()
    };
    Dist {
        mean: sum / n as f64,
        p50: at(0.5).unwrap_or(0.0),
        p90: at(0.9).unwrap_or(0.0),
        sum,
    }
}

fn print_tables(reports: &[RunReport], s: &Settings) {
    println!(
        "\n## Results ({}; {} actions, {} in flight, execution {:?})\n",
        s.wan, s.actions, s.jobs, s.exec_delay
    );
    println!(
        "| run | think | wall | exec mean | read mean | read p50 | read p90 | read Σ | WAN up | WAN down | upstream RPCs |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|---|");
    for r in reports {
        let e = dist(r.timings.iter().map(|t| t.exec));
        let d = dist(r.timings.iter().map(|t| t.read));
        println!(
            "| {} | {} ms | {:.2} s | {:.2} s | {:.0} ms | {:.0} ms | {:.0} ms | {:.2} s | {} | {} | {} |",
            r.target.name(),
            r.think.as_millis(),
            r.wall.as_secs_f64(),
            e.mean,
            d.mean * 1e3,
            d.p50 * 1e3,
            d.p90 * 1e3,
            d.sum,
            human_bytes(r.wan_up),
            human_bytes(r.wan_down),
            r.upstream_calls.map_or("-".into(), |n| n.to_string()),
        );
    }
    println!(
        "\n| run | think | read by client | prefetch jobs | prefetched | hits | wasted | dropped |"
    );
    println!("|---|---|---|---|---|---|---|---|");
    for r in reports.iter().filter(|r| r.target != Target::Direct) {
        let m = |k: &str| r.prefetch.get(k).copied().unwrap_or(0.0);
        println!(
            "| {} | {} ms | {} | {} | {} blobs / {} | {} | {} | {} |",
            r.target.name(),
            r.think.as_millis(),
            human_bytes(r.bytes_read),
            m("prefetch_jobs"),
            m("prefetched_blobs"),
            human_bytes(m("prefetched_bytes") as u64),
            m("prefetch_hits"),
            human_bytes(m("prefetch_wasted_bytes") as u64),
            m("prefetch_dropped"),
        );
    }
    println!(
        "\n| think | read Σ direct / no prefetch | read Σ direct / prefetch | target (≥ 10×) |"
    );
    println!("|---|---|---|---|");
    for &think in &s.thinks {
        let sum = |t: Target| {
            reports
                .iter()
                .find(|r| r.target == t && r.think == think)
                .map(|r| dist(r.timings.iter().map(|t| t.read)).sum)
        };
        let ratio = |t: Target| match (sum(Target::Direct), sum(t)) {
            (Some(a), Some(b)) if b > 0.0 => Some(a / b),
            _ => None,
        };
        let fmt = |r: Option<f64>| r.map_or("-".into(), |r| format!("{r:.1}×"));
        let pf = ratio(Target::Prefetch);
        println!(
            "| {} ms | {} | {} | {} |",
            think.as_millis(),
            fmt(ratio(Target::NoPrefetch)),
            fmt(pf),
            match pf {
                Some(r) if r >= 10.0 => "PASS",
                Some(_) => "MISS",
                None => "-",
            }
        );
    }
}

// ---------------------------------------------------------------- main

async fn run(s: Settings) -> anyhow::Result<()> {
    println!("Outpost WAN execution benchmark: {}", s.wan);
    let fake = FakeUpstream::start().await;
    fake.set_execution_enabled(true);
    fake.set_execution_delay(s.exec_delay);
    fake.set_stdio_sizes(2000, 200);
    let specs = workload(&s);
    for spec in &specs {
        for (path, size) in &spec.outputs {
            fake.set_output_size(path, *size as usize);
        }
    }
    let out_bytes: u64 = specs
        .iter()
        .flat_map(|a| a.outputs.iter().map(|(_, n)| n))
        .sum();
    let out_files: usize = specs.iter().map(|a| a.outputs.len()).sum();
    println!(
        "workload: {} actions, {} output files, {} of outputs per run (4 KiB–4 MiB log-uniform), \
         execution {:?}, {} in flight",
        s.actions,
        out_files,
        human_bytes(out_bytes),
        s.exec_delay,
        s.jobs
    );

    let relay = Relay::start(fake.addr(), s.wan).await?;
    println!("WAN relay {} → fake upstream {}", relay.url(), fake.addr());

    let mut reports = Vec::new();
    for &target in &s.runs {
        let proxy = match target {
            Target::Direct => None,
            Target::NoPrefetch => Some(Proxy::start(&s, &relay.url(), false)?),
            Target::Prefetch => Some(Proxy::start(&s, &relay.url(), true)?),
        };
        // Let the proxy's start-up GetCapabilities cross the WAN.
        tokio::time::sleep(Duration::from_millis(500)).await;
        for &think in &s.thinks {
            let salt = format!("{}-{}-{}", target.name(), think.as_millis(), s.seed);
            let actions: Vec<TestAction> = specs
                .iter()
                .enumerate()
                .map(|(i, spec)| test_action(spec, i, &salt))
                .collect();
            for a in &actions {
                fake.put_test_action(a);
            }
            let before_calls = match &proxy {
                Some(p) => Some(p.upstream_calls().await?),
                None => None,
            };
            let before_pf = match &proxy {
                Some(p) => p.prefetch_metrics().await?,
                None => BTreeMap::new(),
            };
            relay.reset_counters();
            let addr = proxy.as_ref().map_or(relay.addr(), |p| p.addr());
            let (wall, bytes_read, timings) = run_actions(addr, Arc::new(actions), s.jobs, think)
                .await
                .with_context(|| format!("{} (think {think:?})", target.name()))?;
            // Prefetches still running when the client is done are counted too.
            tokio::time::sleep(Duration::from_millis(300)).await;
            let (wan_up, wan_down) = (relay.bytes_up(), relay.bytes_down());
            let mut by_method = String::new();
            let upstream_calls = match (&proxy, before_calls) {
                (Some(p), Some(b)) => {
                    let after = p.upstream_calls().await?;
                    let delta: Vec<String> = after
                        .iter()
                        .map(|(k, v)| (k, v - b.get(k).copied().unwrap_or(0)))
                        .filter(|(_, v)| *v > 0)
                        .map(|(k, v)| format!("{k} {v}"))
                        .collect();
                    by_method = delta.join(", ");
                    Some(after.values().sum::<u64>() - b.values().sum::<u64>())
                }
                _ => None,
            };
            let prefetch = match &proxy {
                Some(p) => p
                    .prefetch_metrics()
                    .await?
                    .into_iter()
                    .map(|(k, v)| {
                        let d = v - before_pf.get(&k).copied().unwrap_or(0.0);
                        (k, d)
                    })
                    .collect(),
                None => BTreeMap::new(),
            };
            ensure!(
                bytes_read >= out_bytes,
                "read {bytes_read} bytes, expected at least {out_bytes}"
            );
            let e = dist(timings.iter().map(|t| t.exec));
            let d = dist(timings.iter().map(|t| t.read));
            println!(
                "\n{} (think {} ms): wall {:.2} s, {} read and verified; exec mean {:.2} s; \
                 read mean {:.0} ms, p50 {:.0} ms, p90 {:.0} ms, Σ {:.2} s; WAN {} up, {} down",
                target.name(),
                think.as_millis(),
                wall.as_secs_f64(),
                human_bytes(bytes_read),
                e.mean,
                d.mean * 1e3,
                d.p50 * 1e3,
                d.p90 * 1e3,
                d.sum,
                human_bytes(wan_up),
                human_bytes(wan_down),
            );
            if let Some(n) = upstream_calls {
                println!("  upstream RPCs (proxy): {n}: {by_method}");
            }
            if !prefetch.is_empty() {
                let line: Vec<String> = prefetch
                    .iter()
                    .map(|(k, v)| {
                        if k.contains("bytes") {
                            format!("{k} {}", human_bytes(*v as u64))
                        } else {
                            format!("{k} {v}")
                        }
                    })
                    .collect();
                println!("  proxy /metrics: {}", line.join(", "));
            }
            reports.push(RunReport {
                target,
                think,
                wall,
                bytes_read,
                timings,
                wan_up,
                wan_down,
                upstream_calls,
                prefetch,
            });
        }
    }
    print_tables(&reports, &s);
    Ok(())
}

fn main() -> anyhow::Result<()> {
    let settings = Settings::from_env()?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(run(settings))
}
