//! First byte of a large blob for a reader that joins a read-through fetch
//! in flight (issue 11).
//!
//! A standalone `outpost` holds one 100 MiB blob and serves as the upstream
//! behind the WAN relay (40 ms RTT, 50 Mbit/s: the blob takes ~17 s to
//! cross). Each round, side by side:
//! - **direct**: a client reads the blob straight through the relay (a
//!   warm connection): the time to its first byte is what a read that has
//!   to cross the WAN costs at best;
//! - **A**: a client reads the blob through a fresh proxy (the proxy's
//!   connection to the upstream already warm): its read starts the fetch;
//! - **B**: another client (its own connection) reads it ~2 s later, while
//!   the fetch runs: it joins.
//!
//! Printed per round: each reader's time to first byte (TTFB, from sending
//! the Read to the first ReadResponse) and to its last byte, B's TTFB over
//! direct's, and the bytes that crossed the WAN. Target (issue 11): B's
//! first byte within 2 RTTs of the fetch's own, which crosses the same link
//! as the direct read's (B ≤ direct + 2 RTT), printed PASS/MISS.
//!
//! Run: `cargo bench --bench first_byte`
//! Knobs: `OUTPOST_BENCH_ROUNDS` (default 3), `OUTPOST_BENCH_MIB` (100),
//! `OUTPOST_BENCH_JOIN_MS` (2000), `OUTPOST_WAN_RTT_MS` / `OUTPOST_WAN_MBIT`,
//! `OUTPOST_BENCH_BIN` (the server binary; default the release build).

use std::time::{Duration, Instant};

use anyhow::{Context, ensure};
use outpost::cli::human_bytes;
use outpost_testkit::client::{Clients, read_name, upload};
use outpost_testkit::env::{env_u64, env_usize, server_binary};
use outpost_testkit::relay::{Relay, WanConfig};
use outpost_testkit::{ServerProcess, blob, bs, digest, re};
use tonic::transport::Channel;

/// What one read measured.
#[derive(Clone, Copy)]
struct Timed {
    /// From sending the Read to the first ReadResponse.
    first_byte: Duration,
    /// From sending the Read to the end of the stream.
    last_byte: Duration,
}

/// Reads `[0, limit)` of `d` (0: all) over `channel`, timing it and
/// checking the bytes against `data`.
async fn timed_read(
    channel: Channel,
    d: re::Digest,
    limit: usize,
    data: &[u8],
) -> anyhow::Result<Timed> {
    let started = Instant::now();
    let mut stream = bs::byte_stream_client::ByteStreamClient::new(channel)
        .max_decoding_message_size(16 << 20)
        .read(bs::ReadRequest {
            resource_name: read_name("", &d),
            read_offset: 0,
            read_limit: limit as i64,
        })
        .await?
        .into_inner();
    let mut first_byte = None;
    let mut got = 0usize;
    while let Some(message) = stream.message().await? {
        first_byte.get_or_insert_with(|| started.elapsed());
        ensure!(
            data.get(got..got + message.data.len()) == Some(&message.data[..]),
            "wrong bytes at {got}"
        );
        got += message.data.len();
    }
    let want = if limit == 0 { data.len() } else { limit };
    ensure!(got == want, "read {got} bytes of {want}");
    Ok(Timed {
        first_byte: first_byte.context("no bytes")?,
        last_byte: started.elapsed(),
    })
}

/// A fresh connection to `url`, warmed by one call (so a read does not pay
/// for the connection set-up).
async fn warm_channel(url: &str) -> anyhow::Result<Channel> {
    let channel = outpost::client::connect(url).await?;
    re::capabilities_client::CapabilitiesClient::new(channel.clone())
        .get_capabilities(re::GetCapabilitiesRequest::default())
        .await?;
    Ok(channel)
}

fn ms(d: Duration) -> String {
    format!("{:.1} ms", d.as_secs_f64() * 1e3)
}

/// One round's figures.
struct Round {
    direct: Timed,
    a: Timed,
    b: Timed,
    /// When B sent its Read, after A sent its own.
    b_after: Duration,
    /// Bytes the relay delivered toward the proxy.
    wan_bytes: u64,
}

async fn round(
    bin: &std::path::Path,
    relay: &Relay,
    d: &re::Digest,
    data: &[u8],
    join_after: Duration,
) -> anyhow::Result<Round> {
    // The whole blob: the upstream holds back the chunk that ends a range
    // until it has hashed the whole file, so a short range would time that.
    let direct = timed_read(warm_channel(&relay.url()).await?, d.clone(), 0, data).await?;

    let dir = tempfile::tempdir()?;
    let proxy = ServerProcess::command(bin, dir.path().join("data"))
        .args(["--quota", "1GiB", "--upstream", &relay.url()])
        .start()
        .context("outpost serve (proxy)")?;
    // The start-up capabilities probe warms the proxy's upstream connection.
    let (a_channel, b_channel) = (
        warm_channel(&proxy.url()).await?,
        warm_channel(&proxy.url()).await?,
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    relay.reset_counters();

    let started = Instant::now();
    let a = tokio::spawn({
        let (d, data) = (d.clone(), data.to_vec());
        async move { timed_read(a_channel, d, 0, &data).await }
    });
    tokio::time::sleep(join_after).await;
    let b_after = started.elapsed();
    let b = timed_read(b_channel, d.clone(), 0, data).await?;
    let a = a.await??;
    Ok(Round {
        direct,
        a,
        b,
        b_after,
        wan_bytes: relay.bytes_down(),
    })
}

async fn run() -> anyhow::Result<()> {
    let rounds = env_usize("OUTPOST_BENCH_ROUNDS", 3)?.max(1);
    let size = env_usize("OUTPOST_BENCH_MIB", 100)? << 20;
    let join_after = Duration::from_millis(env_u64("OUTPOST_BENCH_JOIN_MS", 2000)?);
    let wan = WanConfig::from_env(WanConfig::reference());
    let bin = server_binary("OUTPOST_BENCH_BIN", option_env!("CARGO_BIN_EXE_outpost"));
    ensure!(bin.exists(), "server binary {} not found", bin.display());

    let dir = tempfile::tempdir()?;
    let upstream = ServerProcess::command(&bin, dir.path().join("data"))
        .args(["--quota", "1GiB"])
        .start()
        .context("outpost serve (upstream)")?;
    let data = blob(7, size);
    let d = digest(&data);
    upload(&mut upstream.bytestream(), "", &data, 1 << 20).await?;
    let relay = Relay::start(upstream.addr(), wan).await?;
    println!(
        "first byte of a {} blob: upstream {} behind the WAN relay ({wan}); \
         B joins {} ms after A; {rounds} round(s), a fresh proxy each",
        human_bytes(size as u64),
        upstream.url(),
        join_after.as_millis()
    );
    println!(
        "{:<6} {:>10} {:>10} {:>10} {:>9} {:>10} {:>11} {:>10} {:>9} {:>10}",
        "round",
        "direct",
        "A first",
        "B first",
        "B/direct",
        "B joined",
        "direct last",
        "A last",
        "B last",
        "WAN bytes"
    );
    let mut results = Vec::new();
    for i in 0..rounds {
        let r = round(&bin, &relay, &d, &data, join_after).await?;
        println!(
            "{:<6} {:>10} {:>10} {:>10} {:>8.2}x {:>10} {:>11} {:>10} {:>9} {:>10}",
            i + 1,
            ms(r.direct.first_byte),
            ms(r.a.first_byte),
            ms(r.b.first_byte),
            r.b.first_byte.as_secs_f64() / r.direct.first_byte.as_secs_f64(),
            ms(r.b_after),
            format!("{:.2} s", r.direct.last_byte.as_secs_f64()),
            format!("{:.2} s", r.a.last_byte.as_secs_f64()),
            format!("{:.2} s", r.b.last_byte.as_secs_f64()),
            human_bytes(r.wan_bytes)
        );
        results.push(r);
    }
    let median = |f: &dyn Fn(&Round) -> Duration| {
        let mut v: Vec<Duration> = results.iter().map(f).collect();
        v.sort();
        v[v.len() / 2]
    };
    let (direct, a, b) = (
        median(&|r| r.direct.first_byte),
        median(&|r| r.a.first_byte),
        median(&|r| r.b.first_byte),
    );
    println!(
        "median: direct {}, A (starts the fetch) {}, B (joins) {}: B/direct {:.2}x",
        ms(direct),
        ms(a),
        ms(b),
        b.as_secs_f64() / direct.as_secs_f64()
    );
    // The fetch's own first byte crosses the same link as a direct read's
    // (A's can come only at the end, when readers wait for the fetch).
    let target = direct + 2 * wan.rtt();
    println!(
        "target B's first byte within 2 RTTs of the fetch's own (direct {} + 2 × {}): {} {}",
        ms(direct),
        ms(wan.rtt()),
        ms(b),
        if b <= target { "PASS" } else { "MISS" }
    );
    Ok(())
}

fn main() -> anyhow::Result<()> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?
        .block_on(run())
}
