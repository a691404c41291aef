//! The cold cache-mode build (issue 11): an empty upstream, clients that
//! execute every action locally and upload what they produce, as Bazel does
//! with a remote cache and no remote execution. Run side by side: direct,
//! through Outpost with `write_mode = "through"` and with `write_mode =
//! "back"`, each with a fresh upstream, relay and proxy (own data dirs).
//!
//! Per action, once the actions it depends on are done: GetActionResult (a
//! miss), FindMissingBlobs of its inputs and upload of the missing ones, a
//! fixed think time ("running locally"), FindMissingBlobs + upload of its
//! outputs, UpdateActionResult. After each proxied build the bench waits for
//! the proxy's upload queue to drain (`/metrics` gauges
//! `outpost_write_back_queued_blobs` / `_queued_results` at 0) and then
//! checks the upstream directly: every action result is there and every blob
//! it names (and every input) is present.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};
use futures::{StreamExt, TryStreamExt};
use outpost::cli::human_bytes;
use outpost::digest::Digest;
use outpost_testkit::metrics::scrape;
use outpost_testkit::relay::Relay;
use tokio::sync::watch;

use super::{
    ActionSpec, BlobSpec, COLD_NOISE, Client, Counters, ProxyDelta, Server, Settings, Workload,
    action_result, calls_line, ratio, sha256,
};

/// Where the cold cache-mode clients send their calls.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CacheTarget {
    /// Straight to the upstream across the WAN.
    Direct,
    /// Through Outpost, `[upstream] write_mode = "through"`.
    Through,
    /// Through Outpost, `[upstream] write_mode = "back"`.
    Back,
}

impl CacheTarget {
    /// The names `OUTPOST_WAN_ONLY` accepts for the cold cache-mode runs.
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "cache-direct" => Some(CacheTarget::Direct),
            "cache-through" => Some(CacheTarget::Through),
            "cache-back" => Some(CacheTarget::Back),
            _ => None,
        }
    }

    /// Every target, in the order they run.
    pub const ALL: [CacheTarget; 3] =
        [CacheTarget::Direct, CacheTarget::Through, CacheTarget::Back];

    fn name(self) -> &'static str {
        match self {
            CacheTarget::Direct => "direct",
            CacheTarget::Through => "outpost through",
            CacheTarget::Back => "outpost back",
        }
    }

    fn write_mode(self) -> Option<&'static str> {
        match self {
            CacheTarget::Direct => None,
            CacheTarget::Through => Some("through"),
            CacheTarget::Back => Some("back"),
        }
    }
}

/// What one cold cache-mode run measured.
pub struct CacheReport {
    target: CacheTarget,
    /// First client call → last UpdateActionResult answered.
    pub wall: Duration,
    /// End of the build → upload queue empty (proxied runs).
    pub drained: Option<Duration>,
    /// WAN bytes when the clients were done, and after the drain.
    wan_at_end: (u64, u64),
    wan_total: (u64, u64),
    upstream_calls: BTreeMap<String, u64>,
}

impl CacheReport {
    fn rpcs(&self) -> u64 {
        self.upstream_calls.values().sum()
    }

    /// Bytes on the WAN, both directions, drain included.
    pub fn wan_bytes(&self) -> u64 {
        self.wan_total.0 + self.wan_total.1
    }
}

/// The actions each action waits for: the producers of its inputs.
fn dependencies(workload: &Workload) -> Vec<Vec<usize>> {
    let producer: HashMap<Digest, usize> = workload
        .actions
        .iter()
        .flat_map(|a| a.outputs.iter().map(move |o| (o.digest, a.index)))
        .collect();
    workload
        .actions
        .iter()
        .map(|a| {
            let deps: HashSet<usize> = a
                .inputs
                .iter()
                .filter_map(|d| producer.get(d).copied())
                .filter(|&p| p != a.index)
                .collect();
            deps.into_iter().collect()
        })
        .collect()
}

/// The action key of action `i` in the cold cache-mode build.
fn cold_key(s: &Settings, i: usize) -> Digest {
    sha256(format!("wan-bench cold cache action {} {i}", s.seed).as_bytes())
}

/// Shared by the clients of one cold build.
struct ColdBuild {
    workload: Arc<Workload>,
    /// Every blob of the build by digest (inputs and outputs).
    blobs: HashMap<Digest, BlobSpec>,
    deps: Vec<Vec<usize>>,
    /// Per action: set once its UpdateActionResult was answered.
    done: Vec<watch::Sender<bool>>,
    think: Duration,
}

impl ColdBuild {
    fn new(workload: &Arc<Workload>, think: Duration) -> Self {
        ColdBuild {
            workload: workload.clone(),
            blobs: workload.seeded_blobs().map(|b| (b.digest, *b)).collect(),
            deps: dependencies(workload),
            done: workload
                .actions
                .iter()
                .map(|_| watch::channel(false).0)
                .collect(),
            think,
        }
    }

    /// Uploads the blobs of `digests` that FindMissingBlobs reports missing.
    async fn upload_missing(&self, client: &Client, digests: &[Digest]) -> anyhow::Result<()> {
        let missing = client.find_missing(digests).await?;
        let uploads = missing
            .iter()
            .map(|d| {
                let spec = self.blobs.get(d).context("a digest outside the build")?;
                Ok((*d, spec.data()))
            })
            .collect::<anyhow::Result<Vec<_>>>()?;
        client.upload(uploads).await
    }

    /// One action of a cold cache-mode build, as Bazel does it.
    async fn run_action(
        &self,
        client: &Client,
        s: &Settings,
        action: &ActionSpec,
    ) -> anyhow::Result<()> {
        for &dep in &self.deps[action.index] {
            let mut done = self.done[dep].subscribe();
            done.wait_for(|d| *d).await?;
        }
        let key = cold_key(s, action.index);
        ensure!(
            client.get_action_result(&key).await?.is_none(),
            "action {}: a hit in a cold build",
            action.index
        );
        self.upload_missing(client, &action.inputs).await?;
        tokio::time::sleep(self.think).await;
        let outputs: Vec<Digest> = action.outputs.iter().map(|o| o.digest).collect();
        self.upload_missing(client, &outputs).await?;
        client
            .update_action_result(&key, action_result(&action.outputs, action.index))
            .await?;
        self.done[action.index].send_replace(true);
        Ok(())
    }
}

/// Runs the cold build from every client at once (action i belongs to client
/// i mod clients; an action starts once its dependencies are done); returns
/// the wall time.
async fn run_cold_build(
    target: &str,
    build: &Arc<ColdBuild>,
    s: &Arc<Settings>,
    counters: &Arc<Counters>,
) -> anyhow::Result<Duration> {
    let start = Instant::now();
    let mut tasks = Vec::new();
    for c in 0..s.clients {
        let (target, build, s, counters) = (
            target.to_string(),
            build.clone(),
            s.clone(),
            counters.clone(),
        );
        tasks.push(tokio::spawn(async move {
            let client = Client::connect(&target, &s, counters).await?;
            let mine: Vec<usize> = (0..build.workload.actions.len())
                .filter(|i| i % s.clients == c)
                .collect();
            futures::stream::iter(mine)
                .map(|i| {
                    let (client, build, s) = (&client, &build, &s);
                    async move {
                        build
                            .run_action(client, s, &build.workload.actions[i])
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

/// The proxy's config file: `lines` (keys of `[upstream]`) added to the
/// user's `OUTPOST_WAN_PROXY_CONFIG` if any.
pub fn proxy_config(s: &Settings, lines: &str) -> anyhow::Result<String> {
    let line = format!("{lines}\n");
    let user = match &s.proxy_config {
        Some(path) => {
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?
        }
        None => String::new(),
    };
    Ok(match user.find("[upstream]") {
        Some(at) => {
            let end = at + "[upstream]".len();
            format!("{}\n{line}{}", &user[..end], &user[end..])
        }
        None => format!("{user}\n[upstream]\n{line}"),
    })
}

/// A proxy in front of `relay` with `upstream_lines` in its `[upstream]`
/// section (and `/metrics`), once it has the upstream's capabilities; the
/// config file lives as long as the returned path.
pub async fn start_proxy(
    s: &Settings,
    relay: &Relay,
    name: &str,
    upstream_lines: &str,
) -> anyhow::Result<(Server, tempfile::TempPath)> {
    let config = tempfile::Builder::new()
        .prefix("outpost-wan-proxy-")
        .suffix(".toml")
        .tempfile()?
        .into_temp_path();
    std::fs::write(&config, proxy_config(s, upstream_lines)?)?;
    let args = [
        "--upstream".to_string(),
        relay.url(),
        "--metrics-listen".into(),
        "127.0.0.1:0".into(),
        "--config".into(),
        config.display().to_string(),
    ];
    let proxy = Server::start(s, name, &args)?;
    super::wait_for_capabilities(&proxy).await?;
    Ok((proxy, config))
}

/// Queued blobs + queued action results of the proxy's write-back queue.
async fn queued(proxy: &Server) -> anyhow::Result<f64> {
    let addr = proxy.process.metrics_addr().context("no metrics address")?;
    let page = scrape(addr).await?;
    Ok([
        "outpost_write_back_queued_blobs",
        "outpost_write_back_queued_results",
    ]
    .iter()
    .map(|name| page.get(*name).copied().unwrap_or(0.0))
    .sum())
}

/// Waits until the proxy's upload queue is empty; returns how long it took.
async fn wait_for_drain(proxy: &Server, timeout: Duration) -> anyhow::Result<Duration> {
    let start = Instant::now();
    loop {
        let left = queued(proxy).await?;
        if left == 0.0 {
            return Ok(start.elapsed());
        }
        if start.elapsed() > timeout {
            bail!("the upload queue still held {left} entries after {timeout:?}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Checks the upstream directly (not across the WAN): every action result of
/// the build is there, and every blob it names and every input is present.
async fn check_upstream(
    upstream: &Server,
    workload: &Workload,
    s: &Arc<Settings>,
) -> anyhow::Result<()> {
    let client = Client::connect(&upstream.url(), s, Arc::new(Counters::default())).await?;
    let mut named: HashSet<Digest> = HashSet::new();
    for a in &workload.actions {
        let result = client
            .get_action_result(&cold_key(s, a.index))
            .await?
            .with_context(|| format!("action {}: no action result upstream", a.index))?;
        for f in &result.output_files {
            let d = Digest::from_proto(outpost::digest::DigestFunction::Sha256, f.digest.as_ref())
                .map_err(|e| anyhow::anyhow!("action {}: bad output digest: {e}", a.index))?;
            named.insert(d);
        }
        named.extend(a.inputs.iter().copied());
    }
    let named: Vec<Digest> = named.into_iter().collect();
    let mut missing = Vec::new();
    for chunk in named.chunks(4096) {
        missing.extend(client.find_missing(chunk).await?);
    }
    ensure!(
        missing.is_empty(),
        "{} of {} blobs named by the build missing upstream, e.g. {}",
        missing.len(),
        named.len(),
        missing[0]
    );
    println!(
        "  upstream check: {} action results, {} blobs named, all present",
        workload.actions.len(),
        named.len()
    );
    Ok(())
}

/// One cold cache-mode run: a fresh upstream, relay and (proxied) proxy;
/// `upstream_lines` are extra `[upstream]` keys for the proxy.
pub async fn run_one(
    target: CacheTarget,
    workload: &Arc<Workload>,
    s: &Arc<Settings>,
    upstream_lines: &str,
) -> anyhow::Result<CacheReport> {
    let upstream = Server::start(s, "cold-upstream", &[])?;
    let relay = Relay::start(upstream.addr(), s.wan).await?;
    let (proxy, _config) = match target.write_mode() {
        None => (None, None),
        Some(mode) => {
            let lines = format!("write_mode = \"{mode}\"\n{upstream_lines}");
            let (proxy, config) = start_proxy(s, &relay, "cold-proxy", &lines).await?;
            (Some(proxy), Some(config))
        }
    };
    let before = match &proxy {
        Some(p) => Some(p.stats().await?),
        None => None,
    };
    let url = proxy.as_ref().map_or_else(|| relay.url(), |p| p.url());
    relay.reset_counters();
    let counters = Arc::new(Counters::default());
    let build = Arc::new(ColdBuild::new(workload, s.think));
    let wall = tokio::time::timeout(s.run_timeout, run_cold_build(&url, &build, s, &counters))
        .await
        .with_context(|| format!("cold cache {} did not finish", target.name()))?
        .with_context(|| format!("cold cache {} failed", target.name()))?;
    let wan_at_end = (relay.bytes_up(), relay.bytes_down());
    let client_calls = counters.calls();
    println!(
        "\ncold cache, {}: {:.2} s; client calls: {} ({} total)",
        target.name(),
        wall.as_secs_f64(),
        calls_line(&client_calls),
        client_calls.values().sum::<u64>()
    );
    println!("  mean client call latency: {}", counters.latencies());
    println!(
        "  clients: {} misses, {} digests checked, {} blobs / {} uploaded",
        Counters::get(&counters.action_misses),
        Counters::get(&counters.digests_checked),
        Counters::get(&counters.blobs_uploaded),
        human_bytes(Counters::get(&counters.bytes_written)),
    );
    let (drained, upstream_calls) = match (&proxy, before) {
        (Some(p), Some(before)) => {
            let drained = wait_for_drain(p, s.drain_timeout).await?;
            println!(
                "  upload queue empty {:.2} s after the build",
                drained.as_secs_f64()
            );
            let delta = ProxyDelta::between(&before, &p.stats().await?);
            println!(
                "  upstream calls (proxy): {} ({} total)",
                calls_line(&delta.upstream_calls),
                delta.upstream_calls.values().sum::<u64>()
            );
            println!("{}", delta.describe());
            (Some(drained), delta.upstream_calls)
        }
        _ => (None, client_calls),
    };
    let wan_total = (relay.bytes_up(), relay.bytes_down());
    println!(
        "  WAN: {} up, {} down ({} up, {} down when the clients were done)",
        human_bytes(wan_total.0),
        human_bytes(wan_total.1),
        human_bytes(wan_at_end.0),
        human_bytes(wan_at_end.1),
    );
    check_upstream(&upstream, workload, s).await?;
    Ok(CacheReport {
        target,
        wall,
        drained,
        wan_at_end,
        wan_total,
        upstream_calls,
    })
}

fn print_table(reports: &[CacheReport]) {
    println!();
    println!(
        "| cold cache build | client wall | queue drained | WAN up | WAN down | WAN at client end | upstream RPCs |"
    );
    println!("|---|---|---|---|---|---|---|");
    for r in reports {
        println!(
            "| {} | {:.2} s | {} | {} | {} | {} | {} |",
            r.target.name(),
            r.wall.as_secs_f64(),
            r.drained
                .map_or("-".into(), |d| format!("+{:.2} s", d.as_secs_f64())),
            human_bytes(r.wan_total.0),
            human_bytes(r.wan_total.1),
            human_bytes(r.wan_at_end.0 + r.wan_at_end.1),
            r.rpcs(),
        );
    }
    let Some(direct) = reports.iter().find(|r| r.target == CacheTarget::Direct) else {
        return;
    };
    println!();
    println!(
        "| cold cache build | wall / direct | (wall + drain) / direct | WAN bytes / direct | upstream RPCs / direct |"
    );
    println!("|---|---|---|---|---|");
    for r in reports.iter().filter(|r| r.target != CacheTarget::Direct) {
        let with_drain = r.wall + r.drained.unwrap_or_default();
        println!(
            "| {} | {:.2}× | {:.2}× | {} | {} |",
            r.target.name(),
            r.wall.as_secs_f64() / direct.wall.as_secs_f64(),
            with_drain.as_secs_f64() / direct.wall.as_secs_f64(),
            ratio(r.wan_bytes() as f64, direct.wan_bytes() as f64),
            ratio(r.rpcs() as f64, direct.rpcs() as f64),
        );
    }
}

/// The targets for the cold cache-mode build; returns the missed ones.
fn check_targets(reports: &[CacheReport]) -> Vec<String> {
    let mut missed = Vec::new();
    let Some(direct) = reports.iter().find(|r| r.target == CacheTarget::Direct) else {
        return missed;
    };
    println!();
    for r in reports.iter().filter(|r| r.target != CacheTarget::Direct) {
        let x = r.wall.as_secs_f64() / direct.wall.as_secs_f64();
        let (limit, what) = match r.target {
            CacheTarget::Back => (0.8, "≤ 0.8× direct".to_string()),
            _ => (
                1.0 + COLD_NOISE,
                format!("≤ 1.0× direct (+{:.0}% noise)", COLD_NOISE * 100.0),
            ),
        };
        let line = format!(
            "cold cache build, {}: client wall {x:.3}× direct, target {what}",
            r.target.name()
        );
        println!("{} {line}", if x <= limit { "PASS" } else { "MISS" });
        if x > limit {
            missed.push(line);
        }
    }
    missed
}

/// Runs the cold cache-mode build for `targets`, prints its tables and
/// returns the targets missed.
pub async fn run(
    targets: &[CacheTarget],
    workload: &Arc<Workload>,
    s: &Arc<Settings>,
) -> anyhow::Result<Vec<String>> {
    let deps = dependencies(workload);
    println!(
        "\nCold cache-mode build: empty upstream, {} actions executed locally ({} ms each, \
         {} dependency edges), every input and output uploaded",
        workload.actions.len(),
        s.think.as_millis(),
        deps.iter().map(Vec::len).sum::<usize>()
    );
    let mut reports = Vec::new();
    for &target in targets {
        reports.push(run_one(target, workload, s, "").await?);
    }
    print_table(&reports);
    Ok(check_targets(&reports))
}
