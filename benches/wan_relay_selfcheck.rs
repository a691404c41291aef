//! Self-check of the WAN simulator in `crates/outpost-testkit/src/relay.rs`: measures RTT
//! and throughput through the relay against plain TCP servers on loopback and
//! fails unless each is within ±25% of the configured link.
//!
//! Run: `cargo bench --bench wan_relay_selfcheck`
//! Knobs: `OUTPOST_WAN_RTT_MS` (default 40), `OUTPOST_WAN_MBIT` (default 50),
//! `OUTPOST_WAN_CHECK_MIB` (bytes per throughput run, default 8).

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::{Context, ensure};
use outpost_testkit::relay::{Relay, WanConfig};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const TOLERANCE: f64 = 0.25;

/// A loopback server speaking a one-byte command protocol:
/// `e` + byte: echo that byte (repeatedly); `u` + u64 n: read n bytes, answer `k`;
/// `d` + u64 n: send n bytes.
async fn test_server() -> anyhow::Result<SocketAddr> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            let _ = s.set_nodelay(true);
            tokio::spawn(async move {
                let mut buf = vec![0u8; 64 << 10];
                loop {
                    let mut cmd = [0u8; 1];
                    if s.read_exact(&mut cmd).await.is_err() {
                        return;
                    }
                    match cmd[0] {
                        b'e' => {
                            let mut b = [0u8; 1];
                            if s.read_exact(&mut b).await.is_err() || s.write_all(&b).await.is_err()
                            {
                                return;
                            }
                        }
                        b'u' => {
                            let Ok(mut left) = s.read_u64().await else {
                                return;
                            };
                            while left > 0 {
                                let want = buf.len().min(left as usize);
                                match s.read(&mut buf[..want]).await {
                                    Ok(0) | Err(_) => return,
                                    Ok(n) => left -= n as u64,
                                }
                            }
                            if s.write_all(b"k").await.is_err() {
                                return;
                            }
                        }
                        b'd' => {
                            let Ok(mut left) = s.read_u64().await else {
                                return;
                            };
                            while left > 0 {
                                let n = buf.len().min(left as usize);
                                if s.write_all(&buf[..n]).await.is_err() {
                                    return;
                                }
                                left -= n as u64;
                            }
                        }
                        _ => return,
                    }
                }
            });
        }
    });
    Ok(addr)
}

async fn connect(addr: SocketAddr) -> anyhow::Result<TcpStream> {
    let s = TcpStream::connect(addr).await?;
    s.set_nodelay(true)?;
    Ok(s)
}

async fn echo(s: &mut TcpStream) -> anyhow::Result<Duration> {
    let t = Instant::now();
    s.write_all(b"ex").await?;
    let mut b = [0u8; 1];
    s.read_exact(&mut b).await?;
    ensure!(b == *b"x", "bad echo");
    Ok(t.elapsed())
}

/// Sends `n` bytes; returns the time until the server confirmed them.
async fn upload(addr: SocketAddr, n: u64) -> anyhow::Result<Duration> {
    let mut s = connect(addr).await?;
    echo(&mut s).await?; // connection established before timing
    let data = vec![0x5au8; 256 << 10];
    let t = Instant::now();
    s.write_all(b"u").await?;
    s.write_u64(n).await?;
    let mut left = n;
    while left > 0 {
        let k = data.len().min(left as usize);
        s.write_all(&data[..k]).await?;
        left -= k as u64;
    }
    let mut ack = [0u8; 1];
    s.read_exact(&mut ack).await?;
    Ok(t.elapsed())
}

/// Asks for `n` bytes; returns the time until the last one arrived.
async fn download(addr: SocketAddr, n: u64) -> anyhow::Result<Duration> {
    let mut s = connect(addr).await?;
    echo(&mut s).await?;
    let mut buf = vec![0u8; 256 << 10];
    let t = Instant::now();
    s.write_all(b"d").await?;
    s.write_u64(n).await?;
    let mut left = n;
    while left > 0 {
        let k = s.read(&mut buf).await?;
        ensure!(k > 0, "early EOF");
        left -= k as u64;
    }
    Ok(t.elapsed())
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

/// Mbit/s of `bytes` moved in `elapsed` minus the fixed cost of one RTT.
fn mbit(bytes: u64, elapsed: Duration, rtt: Duration) -> f64 {
    bytes as f64 * 8.0 / elapsed.saturating_sub(rtt).as_secs_f64() / 1e6
}

struct Checks {
    failed: Vec<String>,
}

impl Checks {
    fn check(&mut self, what: &str, measured: f64, expected: f64, unit: &str) {
        let ratio = measured / expected;
        let ok = (1.0 - TOLERANCE..=1.0 + TOLERANCE).contains(&ratio);
        println!(
            "{:<44} {measured:>9.2} {unit:<7} expected {expected:>8.2} ({:+.1}%) {}",
            what,
            (ratio - 1.0) * 100.0,
            if ok { "ok" } else { "OUT OF RANGE" }
        );
        if !ok {
            self.failed.push(what.to_string());
        }
    }
}

async fn run() -> anyhow::Result<()> {
    let cfg = WanConfig::from_env(WanConfig::reference());
    ensure!(
        cfg.bandwidth_bits_per_sec > 0,
        "the self-check needs a bandwidth limit"
    );
    let mib: u64 = std::env::var("OUTPOST_WAN_CHECK_MIB")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(8);
    let n = mib << 20;
    let rtt = cfg.rtt();
    let rtt_ms = rtt.as_secs_f64() * 1e3;
    let bw = cfg.bandwidth_bits_per_sec as f64 / 1e6;
    println!("WAN relay self-check: {cfg}, {mib} MiB per throughput run, tolerance ±25%");
    let server = test_server().await?;
    let relay = Relay::start(server, cfg).await?;
    let mut checks = Checks { failed: Vec::new() };

    // Connection set-up: handshake RTT + one echo RTT.
    let t = Instant::now();
    let mut s = connect(relay.addr()).await?;
    echo(&mut s).await?;
    let first = t.elapsed();
    checks.check(
        "connect + first echo (2 RTT)",
        first.as_secs_f64() * 1e3,
        2.0 * rtt_ms,
        "ms",
    );

    // RTT on an open connection.
    let mut samples = Vec::new();
    for _ in 0..20 {
        samples.push(echo(&mut s).await?);
    }
    checks.check(
        "echo RTT (median of 20)",
        median(samples).as_secs_f64() * 1e3,
        rtt_ms,
        "ms",
    );

    // One connection fills the link in each direction (a pipe, not stop-and-wait).
    let up = upload(relay.addr(), n).await?;
    checks.check("upload, 1 connection", mbit(n, up, rtt), bw, "Mbit/s");
    let down = download(relay.addr(), n).await?;
    checks.check("download, 1 connection", mbit(n, down, rtt), bw, "Mbit/s");

    // Four connections share one link: the aggregate stays at the limit.
    let t = Instant::now();
    let uploads: Vec<_> = (0..4)
        .map(|_| tokio::spawn(upload(relay.addr(), n / 4)))
        .collect();
    for u in uploads {
        u.await??;
    }
    // Fixed costs inside the timing: handshake (2 RTT), first echo, final ack.
    let aggregate = mbit(n, t.elapsed(), 4 * rtt);
    checks.check("upload, 4 connections (aggregate)", aggregate, bw, "Mbit/s");

    // The directions are independent: upload and download at once each get the link.
    let (u, d) = tokio::join!(upload(relay.addr(), n), download(relay.addr(), n));
    checks.check("upload while downloading", mbit(n, u?, rtt), bw, "Mbit/s");
    checks.check("download while uploading", mbit(n, d?, rtt), bw, "Mbit/s");

    // Three uploads and two downloads of n bytes, plus a few command bytes.
    ensure!(
        relay.bytes_up() >= 3 * n
            && relay.bytes_up() < 3 * n + 4096
            && relay.bytes_down() >= 2 * n
            && relay.bytes_down() < 2 * n + 4096,
        "byte counters: up {} down {}",
        relay.bytes_up(),
        relay.bytes_down()
    );
    println!(
        "relay counters: {} connections, {} B up, {} B down",
        relay.connections(),
        relay.bytes_up(),
        relay.bytes_down()
    );

    // Without limits the relay must not be the bottleneck.
    let fast = Relay::start(
        server,
        WanConfig {
            one_way_delay: Duration::ZERO,
            bandwidth_bits_per_sec: 0,
            model_handshake: false,
        },
    )
    .await?;
    let big = 64u64 << 20;
    let t = upload(fast.addr(), big).await?;
    println!(
        "{:<44} {:>9.2} Mbit/s (no limit configured)",
        "upload, unlimited relay",
        mbit(big, t, Duration::ZERO)
    );

    ensure!(
        checks.failed.is_empty(),
        "out of range: {:?}",
        checks.failed
    );
    println!("WAN relay self-check: all within ±25%");
    Ok(())
}

fn main() -> anyhow::Result<()> {
    // Cargo passes `--bench` (and filters) to harness-less benches; ignore them.
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("tokio runtime")?
        .block_on(run())
}
