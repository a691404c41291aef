//! A WAN simulator for benchmarks: a TCP relay on `127.0.0.1:0` that forwards
//! every connection to a target address through a simulated link with a
//! one-way delay and a bandwidth limit per direction.
//!
//! The model is a pipe, not stop-and-wait: each direction is one link shared
//! by all connections. A chunk read from a socket is scheduled on its link
//! (serialization at the link rate, FIFO across connections: a token bucket
//! whose depth is one chunk) and delivered at `serialization end + delay`;
//! many chunks are in flight at once, so a single connection can fill the
//! link whatever the delay. Readers stay at most [`PACING_SLACK`] ahead of
//! the link, so a slow link pushes back on the sender through TCP.
//!
//! A new connection waits one RTT before any byte is forwarded (the TCP
//! handshake a real WAN would cost); turn that off with
//! [`WanConfig::model_handshake`].

use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// Largest piece read from a socket and scheduled as one unit.
const CHUNK: usize = 16 << 10;
/// How far ahead of the link a reader may schedule: covers timer granularity
/// (~1 ms) so the link never idles while data is waiting.
pub const PACING_SLACK: Duration = Duration::from_millis(5);
/// Chunks queued per connection and direction (bounds memory when the
/// bandwidth is unlimited).
const QUEUE_CHUNKS: usize = 4096;

/// The simulated link.
#[derive(Clone, Copy, Debug)]
pub struct WanConfig {
    /// Delay added to every byte in each direction (RTT = 2 × this).
    pub one_way_delay: Duration,
    /// Bits per second per direction, shared by all connections; 0 = unlimited.
    pub bandwidth_bits_per_sec: u64,
    /// Hold a new connection for one RTT before forwarding (TCP handshake).
    pub model_handshake: bool,
}

impl WanConfig {
    /// `rtt` split evenly between the directions, `mbit_per_sec` each way.
    pub fn new(rtt: Duration, mbit_per_sec: f64) -> Self {
        WanConfig {
            one_way_delay: rtt / 2,
            bandwidth_bits_per_sec: (mbit_per_sec * 1e6) as u64,
            model_handshake: true,
        }
    }

    /// 40 ms RTT, 50 Mbit/s: the reference WAN.
    pub fn reference() -> Self {
        Self::new(Duration::from_millis(40), 50.0)
    }

    /// `OUTPOST_WAN_RTT_MS` and `OUTPOST_WAN_MBIT` override `default`.
    pub fn from_env(default: WanConfig) -> Self {
        let mut cfg = default;
        if let Some(ms) = std::env::var("OUTPOST_WAN_RTT_MS")
            .ok()
            .and_then(|v| v.trim().parse::<f64>().ok())
        {
            cfg.one_way_delay = Duration::from_secs_f64(ms / 2000.0);
        }
        if let Some(mbit) = std::env::var("OUTPOST_WAN_MBIT")
            .ok()
            .and_then(|v| v.trim().parse::<f64>().ok())
        {
            cfg.bandwidth_bits_per_sec = (mbit * 1e6) as u64;
        }
        cfg
    }

    /// The round-trip time the link adds.
    pub fn rtt(&self) -> Duration {
        self.one_way_delay * 2
    }
}

impl std::fmt::Display for WanConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let bw = if self.bandwidth_bits_per_sec == 0 {
            "unlimited".to_string()
        } else {
            format!("{} Mbit/s", self.bandwidth_bits_per_sec as f64 / 1e6)
        };
        write!(f, "RTT {:?}, {bw} per direction", self.rtt())
    }
}

/// One direction of the link, shared by every connection.
struct Link {
    delay_ns: AtomicU64,
    bits_per_sec: AtomicU64,
    /// When the link finishes sending what is already scheduled.
    next_free: Mutex<Instant>,
    /// Bytes delivered to the far side.
    delivered: AtomicU64,
}

impl Link {
    fn new(cfg: &WanConfig) -> Self {
        Link {
            delay_ns: AtomicU64::new(cfg.one_way_delay.as_nanos() as u64),
            bits_per_sec: AtomicU64::new(cfg.bandwidth_bits_per_sec),
            next_free: Mutex::new(Instant::now()),
            delivered: AtomicU64::new(0),
        }
    }

    fn delay(&self) -> Duration {
        Duration::from_nanos(self.delay_ns.load(Ordering::Relaxed))
    }

    /// Schedules `n` bytes; returns when their serialization ends.
    fn reserve(&self, n: usize) -> Instant {
        let now = Instant::now();
        let bps = self.bits_per_sec.load(Ordering::Relaxed);
        if bps == 0 {
            return now;
        }
        let mut next_free = self.next_free.lock().unwrap_or_else(|e| e.into_inner());
        let start = (*next_free).max(now);
        let end = start + Duration::from_secs_f64(n as f64 * 8.0 / bps as f64);
        *next_free = end;
        end
    }
}

struct Shared {
    target: SocketAddr,
    up: Link,
    down: Link,
    connections: AtomicU64,
    handshake: AtomicBool,
    stop: CancellationToken,
}

/// A running relay. Dropping it closes the listener and every connection.
pub struct Relay {
    addr: SocketAddr,
    shared: Arc<Shared>,
    accept: JoinHandle<()>,
}

impl Relay {
    /// Listens on `127.0.0.1:0` and forwards to `target` through `cfg`'s link.
    pub async fn start(target: SocketAddr, cfg: WanConfig) -> io::Result<Relay> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let shared = Arc::new(Shared {
            target,
            up: Link::new(&cfg),
            down: Link::new(&cfg),
            connections: AtomicU64::new(0),
            handshake: AtomicBool::new(cfg.model_handshake),
            stop: CancellationToken::new(),
        });
        let accept = tokio::spawn(accept_loop(listener, shared.clone()));
        Ok(Relay {
            addr,
            shared,
            accept,
        })
    }

    /// Where clients connect.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `grpc://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("grpc://{}", self.addr)
    }

    /// Where the relay forwards to.
    pub fn target(&self) -> SocketAddr {
        self.shared.target
    }

    /// Bytes delivered client → target.
    pub fn bytes_up(&self) -> u64 {
        self.shared.up.delivered.load(Ordering::Relaxed)
    }

    /// Bytes delivered target → client.
    pub fn bytes_down(&self) -> u64 {
        self.shared.down.delivered.load(Ordering::Relaxed)
    }

    /// Connections accepted.
    pub fn connections(&self) -> u64 {
        self.shared.connections.load(Ordering::Relaxed)
    }

    /// Zeroes the delivered-byte counters (between runs).
    pub fn reset_counters(&self) {
        self.shared.up.delivered.store(0, Ordering::Relaxed);
        self.shared.down.delivered.store(0, Ordering::Relaxed);
        self.shared.connections.store(0, Ordering::Relaxed);
    }

    /// Changes the link for data scheduled from now on.
    pub fn set_config(&self, cfg: WanConfig) {
        for link in [&self.shared.up, &self.shared.down] {
            link.delay_ns
                .store(cfg.one_way_delay.as_nanos() as u64, Ordering::Relaxed);
            link.bits_per_sec
                .store(cfg.bandwidth_bits_per_sec, Ordering::Relaxed);
        }
        self.shared
            .handshake
            .store(cfg.model_handshake, Ordering::Relaxed);
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.shared.stop.cancel();
        self.accept.abort();
    }
}

async fn accept_loop(listener: TcpListener, shared: Arc<Shared>) {
    loop {
        let client = match listener.accept().await {
            Ok((s, _)) => s,
            Err(_) => {
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        shared.connections.fetch_add(1, Ordering::Relaxed);
        let shared = shared.clone();
        tokio::spawn(async move {
            let stop = shared.stop.clone();
            tokio::select! {
                _ = stop.cancelled() => {}
                _ = relay_connection(client, shared) => {}
            }
        });
    }
}

async fn relay_connection(client: TcpStream, shared: Arc<Shared>) {
    if shared.handshake.load(Ordering::Relaxed) {
        tokio::time::sleep(shared.up.delay() + shared.down.delay()).await;
    }
    let Ok(server) = TcpStream::connect(shared.target).await else {
        return; // dropping the client closes it, as a refused connection would
    };
    let _ = client.set_nodelay(true);
    let _ = server.set_nodelay(true);
    let (client_r, client_w) = client.into_split();
    let (server_r, server_w) = server.into_split();
    tokio::join!(
        pump(client_r, server_w, &shared.up),
        pump(server_r, client_w, &shared.down),
    );
}

enum Item {
    Data(Vec<u8>, Instant),
    Eof,
}

/// Moves bytes `src` → `dst` through `link`.
async fn pump(
    mut src: tokio::net::tcp::OwnedReadHalf,
    mut dst: tokio::net::tcp::OwnedWriteHalf,
    link: &Link,
) {
    let (tx, mut rx) = mpsc::channel::<Item>(QUEUE_CHUNKS);
    let reader = async move {
        let mut buf = vec![0u8; CHUNK];
        loop {
            let n = match src.read(&mut buf).await {
                Ok(0) | Err(_) => {
                    let _ = tx.send(Item::Eof).await;
                    return;
                }
                Ok(n) => n,
            };
            let sent = link.reserve(n);
            let arrive = sent + link.delay();
            if tx
                .send(Item::Data(buf[..n].to_vec(), arrive))
                .await
                .is_err()
            {
                return;
            }
            // Stay close to the link so a slow link slows the sender down.
            if sent > Instant::now() + PACING_SLACK {
                tokio::time::sleep_until(sent - PACING_SLACK).await;
            }
        }
    };
    let writer = async move {
        while let Some(item) = rx.recv().await {
            match item {
                Item::Data(data, arrive) => {
                    tokio::time::sleep_until(arrive).await;
                    if dst.write_all(&data).await.is_err() {
                        return; // drops rx: the reader stops at its next send
                    }
                    link.delivered
                        .fetch_add(data.len() as u64, Ordering::Relaxed);
                }
                Item::Eof => {
                    let _ = dst.shutdown().await;
                    return;
                }
            }
        }
    };
    tokio::join!(reader, writer);
}
