//! Load: 64 clients, each on its own connection, run every kind of RPC for
//! a bounded time against a server whose quota is a tenth of the working
//! set; 2 % of their operations are uploads abandoned half way. Every byte
//! read is checked; the only failures tolerated are misses (NOT_FOUND, and
//! FAILED_PRECONDITION for a PushBlob whose blob was evicted). The server's
//! memory is sampled throughout. The operations are in `load/ops.rs`.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use tokio::sync::Semaphore;

use crate::common::*;
use ops::*;

mod ops;

const CLIENTS: u64 = 64;
const QUOTA: u64 = 128 << 20;
/// Reads and writes of blobs over 1 MiB in flight at once: with the 1 MiB
/// cap on everything else, what is in flight stays well inside the quota
/// (6 × 6 MiB + 58 × 1 MiB < 128 MiB).
const LARGE_IN_FLIGHT: usize = 6;
/// The server's peak RSS may not exceed this.
const RSS_LIMIT: u64 = 1 << 30;
/// A call without an answer for this long is a failure.
const CALL_TIMEOUT: Duration = Duration::from_secs(60);

/// The blobs clients draw from: blob `i` has `sizes[i]` bytes of
/// `blob(SEED + i, size)`; 70 % small, 25 % medium, 5 % over 1 MiB.
struct Universe {
    sizes: Vec<usize>,
    /// Computed once: many calls name blobs without moving their bytes.
    digests: Vec<re::Digest>,
}

const SEED: u64 = 0x10ad_0000_0000;

impl Universe {
    /// Blobs until their total is ten times the quota.
    fn new() -> Self {
        let mut rng = Rng::new(42);
        let (mut sizes, mut total) = (Vec::new(), 0u64);
        while total < 10 * QUOTA {
            let size = match rng.below(100) {
                0..70 => rng.log_uniform(1, 64 << 10),
                70..95 => rng.log_uniform(64 << 10, 1 << 20),
                _ => rng.log_uniform((1 << 20) + 1, 6 << 20),
            } as usize;
            sizes.push(size);
            total += size as u64;
        }
        let digests = (0..sizes.len())
            .map(|i| digest(&blob(SEED + i as u64, sizes[i])))
            .collect();
        Universe { sizes, digests }
    }

    fn data(&self, id: usize) -> Vec<u8> {
        blob(SEED + id as u64, self.sizes[id])
    }

    fn digest(&self, id: usize) -> re::Digest {
        self.digests[id].clone()
    }

    fn large(&self, id: usize) -> bool {
        self.sizes[id] > 1 << 20
    }

    /// A random blob of at most `max` bytes.
    fn small(&self, rng: &mut Rng, max: usize) -> usize {
        loop {
            let id = rng.below(self.sizes.len());
            if self.sizes[id] <= max {
                return id;
            }
        }
    }
}

/// What the clients share.
struct Shared {
    universe: Universe,
    /// Blobs acknowledged at least once, in order.
    written: std::sync::Mutex<Vec<usize>>,
    large: Semaphore,
    figures: Figures,
    failures: Failures,
    corrupt: AtomicU64,
    bytes_read: AtomicU64,
    bytes_written: AtomicU64,
}

/// How one call ended, beyond success.
enum Fail {
    Miss,
    Error(String),
    Corrupt(String),
}

type Outcome = Result<(), Fail>;

fn status(what: &str, s: &Status) -> Fail {
    if s.code() == Code::NotFound {
        Fail::Miss
    } else {
        Fail::Error(format!("{what}: {:?} {}", s.code(), clip(s.message(), 300)))
    }
}

fn read_outcome(r: Read) -> Outcome {
    match r {
        Read::Exact => Ok(()),
        Read::Failed(Code::NotFound) => Err(Fail::Miss),
        Read::Failed(code) => Err(Fail::Error(format!("read: {code:?}"))),
        Read::Corrupt(what) => Err(Fail::Corrupt(what)),
    }
}

impl Shared {
    fn record(&self, kind: &'static str, started: Instant, outcome: Outcome) {
        let (miss, error) = match &outcome {
            Ok(()) => (false, false),
            Err(Fail::Miss) => (true, false),
            Err(Fail::Error(why)) => {
                self.failures.add(format!("{kind}: {why}"));
                (false, true)
            }
            Err(Fail::Corrupt(why)) => {
                self.corrupt.fetch_add(1, Ordering::Relaxed);
                self.failures.add(format!("{kind}: CORRUPT {why}"));
                (false, true)
            }
        };
        self.figures.record(kind, started.elapsed(), miss, error);
    }

    /// A blob written earlier: mostly a recent one (likely still stored).
    fn written_id(&self, rng: &mut Rng) -> Option<usize> {
        let written = self.written.lock().unwrap();
        if written.is_empty() {
            return None;
        }
        let n = written.len();
        let i = if rng.below(5) > 0 && n > 300 {
            n - 1 - rng.below(300)
        } else {
            rng.below(n)
        };
        Some(written[i])
    }
}

/// One client's connection and clients.
struct Client {
    channel: tonic::transport::Channel,
    bs: ByteStream,
    cas: Cas,
    ac: ActionCache,
    rng: Rng,
}

async fn client(mut c: Client, s: Arc<Shared>, until: Instant) {
    while Instant::now() < until {
        let op = c.rng.below(100);
        let call = async {
            match op {
                0..25 => write_op(&mut c, &s).await,
                25..50 => read_op(&mut c, &s).await,
                50..60 => batch_read_op(&mut c, &s).await,
                60..67 => find_missing_op(&mut c, &s).await,
                67..77 => action_op(&mut c, &s).await,
                77..85 => tree_op(&mut c, &s).await,
                85..88 => capabilities_op(&mut c, &s).await,
                88..98 => asset_op(&mut c, &s).await,
                _ => abandon_op(&mut c, &s).await,
            }
        };
        if tokio::time::timeout(CALL_TIMEOUT, call).await.is_err() {
            s.failures
                .add(format!("operation {op}: no answer within {CALL_TIMEOUT:?}"));
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn load_with_a_small_quota_serves_every_byte_right() {
    let duration = Duration::from_secs(pick(20, 600));
    let dir = tempfile::tempdir().unwrap();
    let quota = format!("{}", QUOTA);
    let mut server = start(
        dir.path(),
        &dir.path().join("data"),
        &dir.path().join("log"),
        &["--quota", &quota],
    );
    let universe = Universe::new();
    let working_set: u64 = universe.sizes.iter().map(|&s| s as u64).sum();
    let shared = Arc::new(Shared {
        universe,
        written: Default::default(),
        large: Semaphore::new(LARGE_IN_FLIGHT),
        figures: Figures::default(),
        failures: Failures::default(),
        corrupt: AtomicU64::new(0),
        bytes_read: AtomicU64::new(0),
        bytes_written: AtomicU64::new(0),
    });
    let rss = RssSampler::start(server.pid());
    let started = Instant::now();
    let until = started + duration;
    let mut clients = tokio::task::JoinSet::new();
    for i in 0..CLIENTS {
        let channel = endpoint(server.addr()).connect_lazy();
        let c = Client {
            bs: channel.bytestream(),
            cas: channel.cas(),
            ac: channel.action_cache(),
            channel,
            rng: Rng::new(0x5eed_0000 + i),
        };
        clients.spawn(client(c, shared.clone(), until));
    }
    while let Some(joined) = clients.join_next().await {
        joined.expect("a client panicked");
    }
    let elapsed = started.elapsed();
    let max_rss = rss.stop();
    let peak = server.peak_rss_bytes();
    let s = &shared;
    s.figures.print("load");
    let (read, written) = (
        s.bytes_read.load(Ordering::Relaxed),
        s.bytes_written.load(Ordering::Relaxed),
    );
    eprintln!(
        "chaos load: {CLIENTS} clients for {elapsed:.1?}: {} calls, {} failed checks, {} corrupt; \
         working set {:.0} MiB over a {:.0} MiB quota ({:.1}x); written {:.0} MiB, read {:.0} MiB; \
         server max VmRSS {:.0} MiB, VmHWM {:.0} MiB",
        s.figures.calls(),
        s.failures.count(),
        s.corrupt.load(Ordering::Relaxed),
        mib(working_set),
        mib(QUOTA),
        working_set as f64 / QUOTA as f64,
        mib(written),
        mib(read),
        mib(max_rss),
        mib(peak),
    );
    assert!(working_set >= 10 * QUOTA);
    if peak > RSS_LIMIT {
        s.failures.add(format!(
            "server VmHWM {:.0} MiB over {:.0} MiB",
            mib(peak),
            mib(RSS_LIMIT)
        ));
    }
    assert_healthy(&mut server, &s.failures, "load").await;
    s.failures.assert_none("load");
}
