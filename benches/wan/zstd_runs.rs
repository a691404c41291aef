//! Compression over the WAN (issue 12), side by side in one run: the same
//! cold builds through Outpost with `[upstream] compression = "off"` and
//! `"auto"`, on compressible blobs (source text and machine code, see
//! `corpus`) and, as the control, on random ones.
//!
//! Two builds per setting, each with a fresh upstream (a standalone Outpost,
//! which advertises zstd), relay and proxy:
//! - *cold read*: the upstream seeded with the whole build, an empty proxy;
//!   the clients replay the build (hits, reads of every output), so every
//!   byte they read crosses the WAN once, downstream;
//! - *cold cache build*: an empty upstream, `write_mode = "back"`; the
//!   clients upload everything they build, and the queue drains upstream.
//!
//! Reported: WAN bytes (the relay's counters, both directions) and wall
//! time (for the cache build, until the queue has drained: until the bytes
//! are upstream). Targets: on compressible data ≥ 2.5× fewer WAN bytes and
//! ≥ 2× less wall time with compression on; on random data no measurable
//! loss (auto ≤ off + the cold-run noise allowance).

use std::sync::Arc;
use std::time::Duration;

use outpost::cli::human_bytes;
use outpost_testkit::relay::Relay;

use super::cold_cache::{self, CacheTarget};
use super::{COLD_NOISE, Mode, Server, Settings, Workload, corpus, measure, seed};

/// One measured build.
struct Row {
    data: &'static str,
    build: &'static str,
    compression: &'static str,
    wall: Duration,
    wan_bytes: u64,
}

/// The `[upstream]` line for a compression setting.
fn compression_line(compression: &str) -> String {
    format!("compression = \"{compression}\"")
}

/// A cold read of the seeded build through an empty proxy.
async fn cold_read(
    workload: &Arc<Workload>,
    s: &Arc<Settings>,
    compression: &str,
) -> anyhow::Result<(Duration, u64)> {
    let upstream = Server::start(s, "zstd-upstream", &[])?;
    seed(&upstream.url(), workload, s).await?;
    let relay = Relay::start(upstream.addr(), s.wan).await?;
    let line = compression_line(compression);
    let (proxy, _config) = cold_cache::start_proxy(s, &relay, "zstd-proxy", &line).await?;
    println!("\ncold read, compression = {compression}:");
    let report = measure(Mode::Cold, &proxy.url(), &relay, Some(&proxy), workload, s).await?;
    Ok((report.wall, report.wan_bytes()))
}

/// Runs every build for both settings on `workload`.
async fn run_data(
    data: &'static str,
    workload: &Arc<Workload>,
    s: &Arc<Settings>,
    rows: &mut Vec<Row>,
) -> anyhow::Result<()> {
    for compression in ["off", "auto"] {
        let (wall, wan_bytes) = cold_read(workload, s, compression).await?;
        rows.push(Row {
            data,
            build: "cold read",
            compression,
            wall,
            wan_bytes,
        });
    }
    for compression in ["off", "auto"] {
        println!("\ncold cache build, compression = {compression}:");
        let line = compression_line(compression);
        let r = cold_cache::run_one(CacheTarget::Back, workload, s, &line).await?;
        rows.push(Row {
            data,
            build: "cold cache build",
            compression,
            wall: r.wall + r.drained.unwrap_or_default(),
            wan_bytes: r.wan_bytes(),
        });
    }
    Ok(())
}

/// Runs the comparison; returns the targets missed.
pub async fn run(random: &Arc<Workload>, s: &Arc<Settings>) -> anyhow::Result<Vec<String>> {
    corpus::load(&s.bin)?;
    let compressible = Arc::new(
        tokio::task::spawn_blocking({
            let s = s.clone();
            move || Workload::build(&s, true)
        })
        .await?,
    );
    println!("\nCompression over the WAN: compression = \"off\" vs \"auto\", side by side");
    let mut rows = Vec::new();
    run_data("compressible", &compressible, s, &mut rows).await?;
    run_data("random", random, s, &mut rows).await?;
    print_rows(&rows);
    Ok(check(&rows))
}

fn print_rows(rows: &[Row]) {
    println!();
    println!("| data | build | compression | wall | WAN bytes |");
    println!("|---|---|---|---|---|");
    for r in rows {
        println!(
            "| {} | {} | {} | {:.2} s | {} |",
            r.data,
            r.build,
            r.compression,
            r.wall.as_secs_f64(),
            human_bytes(r.wan_bytes)
        );
    }
}

/// The pairs (off, auto) of each data and build.
fn pairs(rows: &[Row]) -> Vec<(&Row, &Row)> {
    rows.iter()
        .filter(|r| r.compression == "off")
        .filter_map(|off| {
            rows.iter()
                .find(|r| r.compression == "auto" && r.data == off.data && r.build == off.build)
                .map(|auto| (off, auto))
        })
        .collect()
}

fn check(rows: &[Row]) -> Vec<String> {
    let mut missed = Vec::new();
    println!();
    println!("| data | build | WAN bytes off / auto | wall off / auto |");
    println!("|---|---|---|---|");
    for (off, auto) in pairs(rows) {
        let fewer = off.wan_bytes as f64 / auto.wan_bytes.max(1) as f64;
        let faster = off.wall.as_secs_f64() / auto.wall.as_secs_f64();
        println!(
            "| {} | {} | {fewer:.2}× | {faster:.2}× |",
            off.data, off.build
        );
    }
    println!();
    for (off, auto) in pairs(rows) {
        let fewer = off.wan_bytes as f64 / auto.wan_bytes.max(1) as f64;
        let faster = off.wall.as_secs_f64() / auto.wall.as_secs_f64();
        let checks = if off.data == "compressible" {
            vec![
                (
                    format!("{} ≥ 2.5× fewer WAN bytes: {fewer:.2}×", off.build),
                    fewer >= 2.5,
                ),
                (
                    format!("{} ≥ 2× less wall time: {faster:.2}×", off.build),
                    faster >= 2.0,
                ),
            ]
        } else {
            let slower = 1.0 / faster;
            vec![(
                format!(
                    "{} on random data no slower with compression: auto/off = {slower:.3} \
                     (allowing {:.0}%)",
                    off.build,
                    COLD_NOISE * 100.0
                ),
                slower <= 1.0 + COLD_NOISE,
            )]
        };
        for (what, ok) in checks {
            let line = format!("{} data, {what}", off.data);
            println!("{} {line}", if ok { "PASS" } else { "MISS" });
            if !ok {
                missed.push(line);
            }
        }
    }
    missed
}
