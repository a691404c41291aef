//! WAN remote-execution benchmark: a build-like DAG of actions executed by an
//! upstream across a simulated WAN, the client talking straight to it versus
//! through Outpost with prefetch `always`, `adaptive` (the default) and `off`,
//! for clients that download every output, only top-level outputs, or
//! nothing but stdout/stderr (issue 14).
//!
//! Processes: the upstream is the in-process fake from the tests
//! (`outpost_testkit::fake`, which executes actions with deterministic
//! outputs); the WAN is the relay in `crates/outpost-testkit/src/relay.rs`
//! (40 ms RTT, 50 Mbit/s per direction by default) in front of it; each
//! proxied run starts a fresh `outpost serve --upstream grpc://RELAY`
//! (see `proxy`).
//!
//! Workload (`workload`): actions in layers, later layers taking earlier
//! outputs as inputs; the client uploads its sources across the WAN the first
//! time they are needed (FindMissingBlobs naming every input, then
//! BatchUpdateBlobs / ByteStream Write), executes, and reads what its read
//! mode asks for (`schedule`, `client`). Every run is salted: fresh sources,
//! fresh actions, fresh outputs.
//!
//! Measured per run: wall time, WAN bytes both ways (relay counters, counted
//! until the link is quiet after the build, so prefetch still running is
//! included), client read time after completion, the proxy's upstream calls
//! and prefetch counters (`/metrics`). `report` checks the targets
//! against the direct run of the same read mode.
//!
//! Run: `cargo bench --bench wan_exec`. Knobs: see benches/README.md.

mod client;
mod proxy;
mod report;
mod schedule;
mod workload;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use outpost::cli::human_bytes;
use outpost_testkit::env::{env_u64, server_binary};
use outpost_testkit::fake::FakeUpstream;
use outpost_testkit::relay::{Relay, WanConfig};

use client::Client;
use proxy::{Proxy, Target};
use report::RunReport;
use schedule::{ReadMode, run_build};
use workload::{Build, Shape, WorkloadSettings};

const KIB: u64 = 1 << 10;
const MIB: u64 = 1 << 20;
/// stdout / stderr sizes of every action.
const STDOUT: usize = 2000;
const STDERR: usize = 200;
/// The link counts as quiet after this long with less than [`QUIET_BYTES`].
const QUIET_FOR: Duration = Duration::from_secs(1);
const QUIET_BYTES: u64 = 4 * KIB;
/// Longest wait for the link to fall quiet after a build.
const QUIET_MAX: Duration = Duration::from_secs(120);

struct Settings {
    bin: PathBuf,
    wan: WanConfig,
    workload: WorkloadSettings,
    jobs: usize,
    exec_delay: Duration,
    reads: Vec<ReadMode>,
    targets: Vec<Target>,
    /// Extra lines for every proxy's `[prefetch]` section.
    prefetch_extra: String,
    enforce: bool,
    /// A build that takes longer fails (a stall must not hang the bench).
    run_timeout: Duration,
}

impl Settings {
    fn from_env() -> anyhow::Result<Self> {
        if std::env::var_os("OUTPOST_WANX_THINK_MS").is_some() {
            bail!(
                "OUTPOST_WANX_THINK_MS is gone: use OUTPOST_WANX_READS=everything:0,everything:1000,…"
            );
        }
        let list = |var: &str, default: &str| {
            std::env::var(var)
                .unwrap_or_else(|_| default.into())
                .split(',')
                .filter(|s| !s.trim().is_empty())
                .map(str::to_string)
                .collect::<Vec<_>>()
        };
        let reads = list(
            "OUTPOST_WANX_READS",
            "everything:0,everything:1000,everything:2000,toplevel,nothing",
        )
        .iter()
        .map(|s| ReadMode::parse(s))
        .collect::<anyhow::Result<Vec<_>>>()?;
        let targets = list("OUTPOST_WANX_ONLY", "direct,always,adaptive,off")
            .iter()
            .map(|s| Target::parse(s))
            .collect::<anyhow::Result<Vec<_>>>()?;
        Ok(Settings {
            bin: server_binary("OUTPOST_WAN_BIN", option_env!("CARGO_BIN_EXE_outpost")),
            wan: WanConfig::from_env(WanConfig::reference()),
            workload: WorkloadSettings {
                actions: env_u64("OUTPOST_WANX_ACTIONS", 40)?.max(1) as usize,
                layers: env_u64("OUTPOST_WANX_LAYERS", 4)?.max(1) as usize,
                deps: env_u64("OUTPOST_WANX_DEPS", 2)? as usize,
                seed: env_u64("OUTPOST_WANX_SEED", 1)?,
            },
            jobs: env_u64("OUTPOST_WANX_JOBS", 6)?.max(1) as usize,
            exec_delay: Duration::from_millis(env_u64("OUTPOST_WANX_EXEC_MS", 2000)?),
            reads,
            targets,
            prefetch_extra: std::env::var("OUTPOST_WANX_PREFETCH")
                .unwrap_or_default()
                .split(';')
                .map(|l| format!("{}\n", l.trim()))
                .collect(),
            enforce: std::env::var("OUTPOST_WANX_ENFORCE").is_ok_and(|v| v == "1"),
            run_timeout: Duration::from_secs(env_u64("OUTPOST_WANX_RUN_TIMEOUT_S", 600)?),
        })
    }
}

/// Waits until the link carries less than [`QUIET_BYTES`] in [`QUIET_FOR`];
/// returns how long that took.
async fn wait_quiet(relay: &Relay) -> Duration {
    let start = Instant::now();
    let total = || relay.bytes_up() + relay.bytes_down();
    let mut last = total();
    loop {
        tokio::time::sleep(QUIET_FOR).await;
        let now = total();
        if now - last < QUIET_BYTES || start.elapsed() > QUIET_MAX {
            return start.elapsed() - QUIET_FOR;
        }
        last = now;
    }
}

async fn one_run(
    s: &Settings,
    fake: &FakeUpstream,
    relay: &Relay,
    shape: &Shape,
    mode: ReadMode,
    target: Target,
) -> anyhow::Result<RunReport> {
    let salt = format!("{}/{}/{}", target.name(), mode.name(), s.workload.seed);
    let build = Build::new(shape, &salt, s.workload.seed);
    let proxy = match target {
        Target::Direct => None,
        _ => Some(Proxy::start(
            &s.bin,
            &relay.url(),
            target,
            &s.prefetch_extra,
        )?),
    };
    // Let the proxy's start-up GetCapabilities cross the WAN.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let before_calls = match &proxy {
        Some(p) => Some(p.upstream_calls().await?),
        None => None,
    };
    relay.reset_counters();
    let addr = proxy.as_ref().map_or(relay.addr(), |p| p.addr());
    // A fresh tool invocation id per run, UUID-shaped as Bazel's.
    let h = outpost_testkit::sha256_hex(salt.as_bytes());
    let invocation = format!(
        "{}-{}-{}-{}-{}",
        &h[..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..32]
    );
    let client = Client::connect(addr, &invocation).await?;
    let outcome = match tokio::time::timeout(
        s.run_timeout,
        run_build(&client, shape, &build, s.jobs, mode),
    )
    .await
    {
        Ok(outcome) => outcome?,
        Err(_) => {
            let mut state = String::new();
            if let Some(p) = &proxy {
                let metrics = p.prefetch_metrics().await.unwrap_or_default();
                state = format!("\nproxy prefetch metrics: {metrics:?}{}", p.log_tail());
            }
            bail!(
                "the build did not finish in {:?} (OUTPOST_WANX_RUN_TIMEOUT_S){state}",
                s.run_timeout
            );
        }
    };
    let tail = wait_quiet(relay).await;
    let (wan_up, wan_down) = (relay.bytes_up(), relay.bytes_down());
    let expected = mode.output_bytes(shape) + (shape.actions.len() * (STDOUT + STDERR)) as u64;
    anyhow::ensure!(
        outcome.bytes_read == expected,
        "read {} bytes, expected {expected}",
        outcome.bytes_read
    );
    let mut upstream_calls = None;
    let mut prefetch = BTreeMap::new();
    let mut detail = String::new();
    if let (Some(p), Some(before)) = (&proxy, before_calls) {
        let after = p.upstream_calls().await?;
        let delta: Vec<String> = after
            .iter()
            .map(|(k, v)| (k, v - before.get(k).copied().unwrap_or(0)))
            .filter(|(_, v)| *v > 0)
            .map(|(k, v)| format!("{k} {v}"))
            .collect();
        upstream_calls = Some(after.values().sum::<u64>() - before.values().sum::<u64>());
        detail.push_str(&format!("  upstream RPCs (proxy): {}\n", delta.join(", ")));
        prefetch = p.prefetch_metrics().await?;
        let line: Vec<String> = prefetch
            .iter()
            .filter(|(_, v)| **v != 0.0)
            .map(|(k, v)| {
                if k.contains("bytes") {
                    format!("{k} {}", human_bytes(*v as u64))
                } else {
                    format!("{k} {v}")
                }
            })
            .collect();
        detail.push_str(&format!("  proxy /metrics: {}\n", line.join(", ")));
        detail.push_str(&p.stats_lines(&s.bin));
    }
    let uploaded = client.uploaded.load(std::sync::atomic::Ordering::Relaxed);
    println!(
        "\n{} / {}: wall {:.2} s, read {} (Σ {:.2} s), uploaded {} ({} digests missing), \
         WAN {} up, {} down, quiet after {:.1} s",
        mode.name(),
        target.name(),
        outcome.wall.as_secs_f64(),
        human_bytes(outcome.bytes_read),
        outcome
            .timings
            .iter()
            .map(|t| t.read.as_secs_f64())
            .sum::<f64>(),
        human_bytes(uploaded),
        outcome.missing_found,
        human_bytes(wan_up),
        human_bytes(wan_down),
        tail.as_secs_f64(),
    );
    print!("{detail}");
    drop(proxy);
    fake.clear_store();
    Ok(RunReport {
        mode,
        target,
        wall: outcome.wall,
        bytes_read: outcome.bytes_read,
        uploaded,
        timings: outcome.timings,
        wan_up,
        wan_down,
        tail,
        upstream_calls,
        prefetch,
    })
}

async fn run(s: Settings) -> anyhow::Result<()> {
    println!("Outpost WAN execution benchmark: {}", s.wan);
    let fake = FakeUpstream::start().await;
    fake.set_execution_enabled(true);
    fake.set_execution_delay(s.exec_delay);
    fake.set_stdio_sizes(STDOUT, STDERR);
    let shape = Shape::new(&s.workload);
    for a in &shape.actions {
        for (path, size) in &a.outputs {
            fake.set_output_size(path, *size as usize);
        }
    }
    let header = format!(
        "{}; {} actions in layers {:?}, {} output files, {} of outputs ({} top-level), {} of sources; \
         execution {:?}, {} in flight",
        s.wan,
        shape.actions.len(),
        shape.layer_sizes(),
        shape.output_files(),
        human_bytes(shape.output_bytes()),
        human_bytes(shape.top_level_bytes()),
        human_bytes(shape.source_bytes()),
        s.exec_delay,
        s.jobs
    );
    println!("workload: {header}");
    let relay = Relay::start(fake.addr(), s.wan).await?;
    println!("WAN relay {} → fake upstream {}", relay.url(), fake.addr());

    let mut reports = Vec::new();
    for &mode in &s.reads {
        for &target in &s.targets {
            let report = one_run(&s, &fake, &relay, &shape, mode, target)
                .await
                .with_context(|| format!("{} / {}", mode.name(), target.name()))?;
            reports.push(report);
        }
    }
    let verdicts = report::print_tables(&reports, &header);
    let misses = verdicts
        .iter()
        .filter(|v| v.target == Target::Adaptive && !v.pass)
        .count();
    let checked = verdicts
        .iter()
        .filter(|v| v.target == Target::Adaptive)
        .count();
    println!(
        "\nissue 14 targets, outpost adaptive (the default): {} of {checked} PASS",
        checked - misses
    );
    let (cold_passed, cold_checked) = report::print_cold_exec(&reports);
    println!(
        "\nissue 11 target (cold remote execution ≤ 1.0× direct), outpost adaptive: \
         {cold_passed} of {cold_checked} PASS"
    );
    if s.enforce && misses > 0 {
        bail!("{misses} target(s) missed (OUTPOST_WANX_ENFORCE=1)");
    }
    Ok(())
}

fn main() -> anyhow::Result<()> {
    let settings = Settings::from_env()?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(run(settings))
}
