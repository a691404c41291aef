//! Per-RPC added latency on the cold paths (issue 11): one call at a time,
//! each on fresh data, straight to the upstream across the WAN versus through
//! Outpost with `write_mode = "through"` and `"back"`. The difference of the
//! medians is what the proxy adds per call.
//!
//! Processes: the upstream is the in-process fake from the test kit (it
//! executes actions; execution delay 0), the WAN the relay (40 ms RTT,
//! 50 Mbit/s), each proxy a real `outpost serve --upstream grpc://RELAY`
//! with its own data directory. Targets take turns call by call (the order
//! rotates each round), so load on the machine hits them alike.
//!
//! Calls, each round with fresh digests:
//! - FindMissingBlobs of 10 digests nobody has;
//! - BatchUpdateBlobs of one 1 KiB blob;
//! - ByteStream Write of 2 MiB;
//! - GetActionResult, a miss;
//! - UpdateActionResult naming the two blobs just uploaded;
//! - GetActionResult, a cold hit: a result (and its 4 KiB output) put in the
//!   upstream directly, never seen by the proxy;
//! - Execute of a fresh action (its Action, Command, input Directory and one
//!   input uploaded before, untimed, through the same target) until done.
//!
//! Run: `cargo bench --bench cold_path`. Knobs: `OUTPOST_COLD_ROUNDS` (15),
//! `OUTPOST_COLD_ONLY` (direct,through,back), `OUTPOST_WAN_RTT_MS`,
//! `OUTPOST_WAN_MBIT`, `OUTPOST_COLD_BIN` (server binary).

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};
use outpost_testkit::client::{Clients, write_name, write_stream};
use outpost_testkit::env::{env_u64, server_binary};
use outpost_testkit::fake::{FakeUpstream, TestAction, operation_response};
use outpost_testkit::relay::{Relay, WanConfig};
use outpost_testkit::{ServerProcess, digest, re};
use tonic::transport::Channel;

/// The calls measured, in the order each round makes them.
const OPS: [&str; 7] = [
    "FindMissingBlobs (10 missing)",
    "BatchUpdateBlobs (1 × 1 KiB)",
    "ByteStream Write (2 MiB)",
    "GetActionResult (miss)",
    "UpdateActionResult",
    "GetActionResult (cold hit)",
    "Execute (until done)",
];
const WRITE_SIZE: usize = 2 << 20;
const WRITE_CHUNK: usize = 64 << 10;

/// Straight to the relay, or through a proxy with a write mode.
struct Target {
    name: &'static str,
    channel: Channel,
    /// The proxy and its directory (stopped first: fields drop in order).
    _proxy: Option<(ServerProcess, tempfile::TempDir)>,
    /// Per op: every measured latency.
    samples: Vec<Vec<Duration>>,
}

fn start_proxy(
    bin: &Path,
    upstream: &str,
    write_mode: &str,
) -> anyhow::Result<(ServerProcess, tempfile::TempDir)> {
    let dir = tempfile::Builder::new()
        .prefix("outpost-cold-path-")
        .tempdir()?;
    let config = dir.path().join("outpost.toml");
    std::fs::write(
        &config,
        format!("[upstream]\nwrite_mode = \"{write_mode}\"\n"),
    )?;
    let process = ServerProcess::command(bin, dir.path().join("data"))
        .args(["--quota", "4GiB", "--upstream", upstream])
        .args(["--metrics-listen", "127.0.0.1:0"])
        .arg("--config")
        .arg(&config)
        .log_file(&dir.path().join("outpost.log"))
        .rust_log(&std::env::var("OUTPOST_WAN_SERVER_LOG").unwrap_or_else(|_| "warn".into()))
        .start()
        .with_context(|| format!("outpost serve, write_mode = {write_mode}"))?;
    Ok((process, dir))
}

struct Chan(Channel);

impl Clients for Chan {
    fn channel(&self) -> Channel {
        self.0.clone()
    }
}

/// A fresh blob of `len` bytes, unique to (round, target, what).
fn fresh(round: u64, target: usize, what: u64, len: usize) -> Vec<u8> {
    outpost_testkit::blob(
        outpost_testkit::workload::mix(round << 16 | (target as u64) << 8 | what) ^ 0xc01d,
        len,
    )
}

/// One round of every call against one target; returns each call's latency.
async fn round(
    c: &Chan,
    fake: &FakeUpstream,
    round: u64,
    t: usize,
) -> anyhow::Result<Vec<Duration>> {
    let mut out = Vec::with_capacity(OPS.len());
    // FindMissingBlobs of fresh digests.
    let digests: Vec<re::Digest> = (0..10)
        .map(|k| digest(&fresh(round, t, 100 + k, 64)))
        .collect();
    let start = Instant::now();
    let missing = c
        .cas()
        .find_missing_blobs(re::FindMissingBlobsRequest {
            blob_digests: digests.clone(),
            ..Default::default()
        })
        .await?
        .into_inner()
        .missing_blob_digests;
    out.push(start.elapsed());
    ensure!(
        missing.len() == 10,
        "FindMissingBlobs: {} of 10 missing",
        missing.len()
    );

    // BatchUpdateBlobs of one small blob.
    let small = fresh(round, t, 1, 1024);
    let small_digest = digest(&small);
    let start = Instant::now();
    let resp = c
        .cas()
        .batch_update_blobs(re::BatchUpdateBlobsRequest {
            requests: vec![re::batch_update_blobs_request::Request {
                digest: Some(small_digest.clone()),
                data: small,
                compressor: 0,
            }],
            ..Default::default()
        })
        .await?
        .into_inner();
    out.push(start.elapsed());
    ensure!(
        resp.responses
            .iter()
            .all(|r| r.status.as_ref().is_none_or(|s| s.code == 0)),
        "BatchUpdateBlobs failed: {resp:?}"
    );

    // ByteStream Write of 2 MiB.
    let large = fresh(round, t, 2, WRITE_SIZE);
    let large_digest = digest(&large);
    let start = Instant::now();
    let committed = c
        .bytestream()
        .write(write_stream(
            write_name("", &large_digest),
            large,
            WRITE_CHUNK,
        ))
        .await?
        .into_inner()
        .committed_size;
    out.push(start.elapsed());
    ensure!(
        committed == WRITE_SIZE as i64,
        "Write committed {committed}"
    );

    // GetActionResult, a miss.
    let key = digest(&fresh(round, t, 3, 32));
    let start = Instant::now();
    let miss = c
        .action_cache()
        .get_action_result(re::GetActionResultRequest {
            action_digest: Some(key.clone()),
            ..Default::default()
        })
        .await;
    out.push(start.elapsed());
    match miss {
        Err(s) if s.code() == tonic::Code::NotFound => {}
        other => bail!("GetActionResult of a fresh key: {other:?}"),
    }

    // UpdateActionResult naming the two blobs.
    let result = re::ActionResult {
        output_files: vec![
            re::OutputFile {
                path: "out/small".into(),
                digest: Some(small_digest),
                ..Default::default()
            },
            re::OutputFile {
                path: "out/large".into(),
                digest: Some(large_digest),
                ..Default::default()
            },
        ],
        ..Default::default()
    };
    let start = Instant::now();
    c.action_cache()
        .update_action_result(re::UpdateActionResultRequest {
            action_digest: Some(key),
            action_result: Some(result),
            ..Default::default()
        })
        .await?;
    out.push(start.elapsed());

    // GetActionResult, a cold hit: put in the upstream directly.
    let output = fake.put_blob(fresh(round, t, 4, 4096));
    let seeded_key = digest(&fresh(round, t, 5, 32));
    fake.put_action_result(
        "",
        &seeded_key,
        re::ActionResult {
            output_files: vec![re::OutputFile {
                path: "out/seeded".into(),
                digest: Some(output),
                ..Default::default()
            }],
            ..Default::default()
        },
    );
    let start = Instant::now();
    c.action_cache()
        .get_action_result(re::GetActionResultRequest {
            action_digest: Some(seeded_key),
            ..Default::default()
        })
        .await
        .context("GetActionResult of a result seeded upstream")?;
    out.push(start.elapsed());

    // Execute a fresh action, its inputs uploaded first (untimed).
    let input = fresh(round, t, 6, 2048);
    let action = TestAction::new(&["cc", "-c", "in.c"], &["in.o"], &[("in.c", &input)])
        .salted(&(round << 8 | t as u64).to_le_bytes());
    c.cas()
        .batch_update_blobs(re::BatchUpdateBlobsRequest {
            requests: action
                .blobs
                .iter()
                .map(|(d, data)| re::batch_update_blobs_request::Request {
                    digest: Some(d.clone()),
                    data: data.to_vec(),
                    compressor: 0,
                })
                .collect(),
            ..Default::default()
        })
        .await?;
    let start = Instant::now();
    let mut stream = re::execution_client::ExecutionClient::new(c.channel())
        .max_decoding_message_size(64 << 20)
        .execute(re::ExecuteRequest {
            skip_cache_lookup: true,
            ..action.request("")
        })
        .await?
        .into_inner();
    let mut done = false;
    while let Some(op) = stream.message().await? {
        if op.done {
            let resp = operation_response(&op).context("done Operation without response")?;
            ensure!(
                resp.status.as_ref().is_none_or(|s| s.code == 0),
                "execution failed: {:?}",
                resp.status
            );
            done = true;
            break;
        }
    }
    out.push(start.elapsed());
    ensure!(done, "Execute stream ended before done");
    Ok(out)
}

fn median(v: &[Duration]) -> f64 {
    let mut ms: Vec<f64> = v.iter().map(|d| d.as_secs_f64() * 1e3).collect();
    ms.sort_by(f64::total_cmp);
    match ms.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => ms[n / 2],
        n => (ms[n / 2 - 1] + ms[n / 2]) / 2.0,
    }
}

fn print_table(targets: &[Target], rtt_ms: f64) {
    let direct = targets.iter().find(|t| t.name == "direct");
    print!("\n| call |");
    for t in targets {
        print!(" {} p50 |", t.name);
    }
    for t in targets.iter().filter(|t| t.name != "direct") {
        print!(" {} added |", t.name);
    }
    println!();
    println!(
        "|---|{}",
        "---|".repeat(targets.len() * 2 - usize::from(direct.is_some()))
    );
    for (i, op) in OPS.iter().enumerate() {
        print!("| {op} |");
        for t in targets {
            print!(" {:.1} ms |", median(&t.samples[i]));
        }
        for t in targets.iter().filter(|t| t.name != "direct") {
            match direct {
                Some(d) => {
                    let added = median(&t.samples[i]) - median(&d.samples[i]);
                    print!(" {added:+.1} ms ({:+.2} RTT) |", added / rtt_ms);
                }
                None => print!(" - |"),
            }
        }
        println!();
    }
}

async fn run() -> anyhow::Result<()> {
    let bin = server_binary("OUTPOST_COLD_BIN", option_env!("CARGO_BIN_EXE_outpost"));
    ensure!(
        bin.exists(),
        "server binary {} not found; cargo build --release",
        bin.display()
    );
    let wan = WanConfig::from_env(WanConfig::reference());
    let rounds = env_u64("OUTPOST_COLD_ROUNDS", 15)?.max(1);
    let only = std::env::var("OUTPOST_COLD_ONLY").unwrap_or_else(|_| "direct,through,back".into());
    println!("Outpost cold-path latency: {wan}, {rounds} rounds, one call at a time");

    let fake = FakeUpstream::start().await;
    fake.set_execution_enabled(true);
    fake.set_execution_delay(Duration::ZERO);
    let relay = Relay::start(fake.addr(), wan).await?;
    let mut targets = Vec::new();
    for name in only.split(',').map(str::trim) {
        let (name, proxy) = match name {
            "direct" => ("direct", None),
            "through" => ("through", Some(start_proxy(&bin, &relay.url(), "through")?)),
            "back" => ("back", Some(start_proxy(&bin, &relay.url(), "back")?)),
            other => bail!("OUTPOST_COLD_ONLY: unknown {other:?} (direct, through, back)"),
        };
        let addr = proxy.as_ref().map_or(relay.addr(), |(p, _)| p.addr());
        let channel = outpost_testkit::client::endpoint(addr).connect().await?;
        targets.push(Target {
            name,
            channel,
            _proxy: proxy,
            samples: vec![Vec::new(); OPS.len()],
        });
    }
    // Warm-up: connections (relay handshakes) and the proxies' capabilities.
    for (t, target) in targets.iter().enumerate() {
        round(&Chan(target.channel.clone()), &fake, u64::MAX >> 20, t).await?;
    }
    let n = targets.len();
    for r in 0..rounds {
        for k in 0..n {
            let t = (r as usize + k) % n;
            let c = Chan(targets[t].channel.clone());
            let times = round(&c, &fake, r, t)
                .await
                .with_context(|| format!("round {r}, {}", targets[t].name))?;
            for (i, d) in times.into_iter().enumerate() {
                targets[t].samples[i].push(d);
            }
        }
    }
    print_table(&targets, wan.rtt().as_secs_f64() * 1e3);
    Ok(())
}

fn main() -> anyhow::Result<()> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?
        .block_on(run())
}
