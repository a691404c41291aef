//! The targets and the proxy under test: a real `outpost serve --upstream
//! grpc://RELAY --metrics-listen …` process with its own data directory and
//! a `--config` file that sets the prefetch mode, started fresh for every run
//! (so no run learns from another: the adaptive policy keeps history across
//! invocations).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::Path;

use anyhow::{Context, bail, ensure};
use outpost::admin_proto::GetStatsRequest;
use outpost::admin_proto::admin_client::AdminClient;
use outpost_testkit::ServerProcess;
use outpost_testkit::metrics::scrape;

/// Where the client sends its calls.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Target {
    /// Straight to the upstream across the WAN.
    Direct,
    /// Through Outpost, `[prefetch] mode = "always"` (prefetch every output:
    /// the behaviour before issue 14).
    Always,
    /// Through Outpost with its default configuration (adaptive prefetch).
    Adaptive,
    /// Through Outpost, `[prefetch] enabled = false` (no prefetch; the key
    /// that means "off" before and after issue 14).
    Off,
}

impl Target {
    /// A name of `OUTPOST_WANX_ONLY`.
    pub fn parse(s: &str) -> anyhow::Result<Self> {
        Ok(match s.trim() {
            "direct" => Target::Direct,
            "always" => Target::Always,
            "adaptive" => Target::Adaptive,
            "off" => Target::Off,
            other => bail!("OUTPOST_WANX_ONLY: unknown {other:?} (direct, always, adaptive, off)"),
        })
    }

    /// Its name in the tables.
    pub fn name(self) -> &'static str {
        match self {
            Target::Direct => "direct",
            Target::Always => "outpost always",
            Target::Adaptive => "outpost adaptive",
            Target::Off => "outpost off",
        }
    }

    /// The `[prefetch]` line of the proxy's config file.
    fn prefetch_line(self) -> &'static str {
        match self {
            Target::Always => "mode = \"always\"\n",
            Target::Off => "enabled = false\n",
            Target::Direct | Target::Adaptive => "",
        }
    }
}

/// The proxy under test with its temporary directory (the child is stopped
/// first: fields drop in order).
pub struct Proxy {
    process: ServerProcess,
    _dir: tempfile::TempDir,
}

impl Proxy {
    /// Starts the proxy for `target` (not [`Target::Direct`]); `extra` are
    /// more lines for its `[prefetch]` section (`OUTPOST_WANX_PREFETCH`).
    pub fn start(bin: &Path, upstream: &str, target: Target, extra: &str) -> anyhow::Result<Self> {
        ensure!(
            bin.exists(),
            "server binary {} not found; run `cargo build --release` or set OUTPOST_WAN_BIN",
            bin.display()
        );
        let dir = tempfile::Builder::new()
            .prefix("outpost-wanx-proxy-")
            .tempdir()?;
        let config = dir.path().join("outpost.toml");
        std::fs::write(
            &config,
            format!("[prefetch]\n{}{extra}\n", target.prefetch_line()),
        )?;
        let process = ServerProcess::command(bin, dir.path().join("data"))
            .args(["--quota", "8GiB", "--upstream", upstream])
            .args(["--metrics-listen", "127.0.0.1:0"])
            .arg("--config")
            .arg(&config)
            .log_file(&dir.path().join("outpost.log"))
            .rust_log(&std::env::var("OUTPOST_WAN_SERVER_LOG").unwrap_or_else(|_| "warn".into()))
            .start()
            .with_context(|| {
                format!(
                    "cannot start {} as {} (config: {:?}); `mode` needs issue 14's config, \
                     on older builds run OUTPOST_WANX_ONLY=direct,adaptive,off",
                    bin.display(),
                    target.name(),
                    std::fs::read_to_string(&config).unwrap_or_default()
                )
            })?;
        Ok(Proxy { process, _dir: dir })
    }

    /// The end of the proxy's log, for errors.
    pub fn log_tail(&self) -> String {
        let log = self.process.log();
        let start = log.len().saturating_sub(4000);
        let start = (start..log.len())
            .find(|&i| log.is_char_boundary(i))
            .unwrap_or(0);
        format!("\nproxy log (end):\n{}", &log[start..])
    }

    /// Where the client connects.
    pub fn addr(&self) -> SocketAddr {
        self.process.addr()
    }

    /// Upstream calls by method (GetStats).
    pub async fn upstream_calls(&self) -> anyhow::Result<BTreeMap<String, u64>> {
        let channel = outpost::client::connect(&self.process.url()).await?;
        let stats = AdminClient::new(channel)
            .get_stats(GetStatsRequest {})
            .await?
            .into_inner();
        Ok(stats.upstream_calls.into_iter().collect())
    }

    /// Every `/metrics` sample whose name mentions prefetch (with labels),
    /// without the `outpost_` prefix and `_total` suffix.
    pub async fn prefetch_metrics(&self) -> anyhow::Result<BTreeMap<String, f64>> {
        let addr = self.process.metrics_addr().context("no metrics address")?;
        Ok(scrape(addr)
            .await?
            .into_iter()
            .filter(|(name, _)| name.contains("prefetch"))
            .map(|(name, value)| {
                let short = name
                    .trim_start_matches("outpost_")
                    .replacen("_total", "", 1);
                (short, value)
            })
            .collect())
    }

    /// `outpost stats` of the proxy (the lines that mention prefetch).
    pub fn stats_lines(&self, bin: &Path) -> String {
        let out = std::process::Command::new(bin)
            .args(["stats", "--server", &self.process.url()])
            .output();
        match out {
            Ok(o) if o.status.success() => String::from_utf8_lossy(&o.stdout)
                .lines()
                .filter(|l| l.to_lowercase().contains("prefetch"))
                .map(|l| format!("  {}\n", l.trim_end()))
                .collect(),
            Ok(o) => format!(
                "  (outpost stats failed: {})\n",
                String::from_utf8_lossy(&o.stderr).trim()
            ),
            Err(e) => format!("  (outpost stats: {e})\n"),
        }
    }
}
