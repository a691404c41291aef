//! FetchBlob latency of a local hit, next to GetActionResult of a cached
//! result on the same server as the reference: both are "look up an index
//! entry, check its content is present, answer".
//!
//! Starts the `outpost` binary (release) on 127.0.0.1 over a temporary data
//! directory, pushes one asset and stores one action result, then issues
//! the two calls alternately, one at a time, over one channel, and prints
//! p50/p99/mean per call and the ratio.
//!
//! Run: `cargo bench --bench asset_fetch`
//! Knobs: `OUTPOST_BENCH_CALLS` (default 2000), `OUTPOST_BENCH_BIN`.

use std::time::{Duration, Instant};

use anyhow::ensure;
use bazel_remote_apis::build::bazel::remote::asset::v1::{
    FetchBlobRequest, PushBlobRequest, Qualifier, fetch_client::FetchClient,
    push_client::PushClient,
};
use bazel_remote_apis::build::bazel::remote::execution::v2::{
    self as re, GetActionResultRequest, UpdateActionResultRequest,
    action_cache_client::ActionCacheClient,
};
use outpost_testkit::client::{Clients, batch_update};
use outpost_testkit::env::{env_usize, server_binary};
use outpost_testkit::{ServerProcess, blob, digest};

/// Calls made before measuring (connection set-up, caches).
const WARMUP: usize = 200;

fn main() -> anyhow::Result<()> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?
        .block_on(run())
}

async fn run() -> anyhow::Result<()> {
    let calls = env_usize("OUTPOST_BENCH_CALLS", 2000)?.max(10);
    let bin = server_binary("OUTPOST_BENCH_BIN", option_env!("CARGO_BIN_EXE_outpost"));
    let dir = tempfile::tempdir()?;
    let server = ServerProcess::command(&bin, dir.path().join("data")).start()?;
    let channel = server.channel();

    // One asset: a 4 KiB blob under a URI with a checksum-like qualifier.
    let data = blob(1, 4096);
    let d = digest(&data);
    ensure!(batch_update(&mut server.cas(), "", &[&data]).await == vec![tonic::Code::Ok]);
    let uri = "https://example.com/archive.tar.gz".to_string();
    let qualifiers = vec![Qualifier {
        name: "bazel.canonical_id".into(),
        value: "archive".into(),
    }];
    PushClient::new(channel.clone())
        .push_blob(PushBlobRequest {
            uris: vec![uri.clone()],
            qualifiers: qualifiers.clone(),
            blob_digest: Some(d.clone()),
            ..Default::default()
        })
        .await?;

    // One action result with one output file of the same size.
    let action = digest(b"the action");
    let result = re::ActionResult {
        output_files: vec![re::OutputFile {
            path: "out".into(),
            digest: Some(d.clone()),
            ..Default::default()
        }],
        ..Default::default()
    };
    let mut ac = ActionCacheClient::new(channel.clone());
    ac.update_action_result(UpdateActionResultRequest {
        action_digest: Some(action.clone()),
        action_result: Some(result),
        ..Default::default()
    })
    .await?;

    let mut fetch = FetchClient::new(channel.clone());
    let fetch_request = FetchBlobRequest {
        uris: vec![uri],
        qualifiers,
        ..Default::default()
    };
    let ac_request = GetActionResultRequest {
        action_digest: Some(action),
        ..Default::default()
    };
    let (mut fetch_times, mut ac_times) = (Vec::new(), Vec::new());
    for i in 0..WARMUP + calls {
        let started = Instant::now();
        let answer = fetch.fetch_blob(fetch_request.clone()).await?.into_inner();
        let fetch_took = started.elapsed();
        ensure!(
            answer.status.is_some_and(|s| s.code == 0) && answer.blob_digest == Some(d.clone())
        );
        let started = Instant::now();
        ac.get_action_result(ac_request.clone()).await?;
        let ac_took = started.elapsed();
        if i >= WARMUP {
            fetch_times.push(fetch_took);
            ac_times.push(ac_took);
        }
    }
    let (f, a) = (Summary::of(fetch_times), Summary::of(ac_times));
    println!("{calls} calls each, alternating, one at a time, loopback, release build");
    println!("{:<28} {:>9} {:>9} {:>9}", "call", "p50", "p99", "mean");
    f.print("FetchBlob (local hit)");
    a.print("GetActionResult (hit)");
    println!(
        "ratio FetchBlob / GetActionResult: p50 {:.2}, p99 {:.2}",
        f.p50.as_secs_f64() / a.p50.as_secs_f64(),
        f.p99.as_secs_f64() / a.p99.as_secs_f64()
    );
    Ok(())
}

/// Percentiles of one call's latencies.
struct Summary {
    p50: Duration,
    p99: Duration,
    mean: Duration,
}

impl Summary {
    fn of(mut times: Vec<Duration>) -> Self {
        times.sort();
        let at = |q: f64| times[((times.len() - 1) as f64 * q).round() as usize];
        Summary {
            p50: at(0.50),
            p99: at(0.99),
            mean: times.iter().sum::<Duration>() / times.len() as u32,
        }
    }

    fn print(&self, name: &str) {
        let us = |d: Duration| format!("{:.0} µs", d.as_secs_f64() * 1e6);
        println!(
            "{name:<28} {:>9} {:>9} {:>9}",
            us(self.p50),
            us(self.p99),
            us(self.mean)
        );
    }
}
