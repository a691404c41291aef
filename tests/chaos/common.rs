//! Shared by every chaos class: the run length (short in CI, long by hand),
//! starting the `outpost` binary, a failure list that reports every broken
//! check at once, latency figures, memory sampling and verified reads.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

pub use outpost_testkit::client::*;
pub use outpost_testkit::{Rng, ServerProcess, blob, bs, digest, raw, re};
use sha2::{Digest as _, Sha256};
pub use tonic::{Code, Status};

/// Whether `OUTPOST_CHAOS=long` asks for the long run (see README.md).
pub fn long() -> bool {
    std::env::var("OUTPOST_CHAOS").is_ok_and(|v| v == "long")
}

/// `short` in the CI run, `long` with `OUTPOST_CHAOS=long`.
pub fn pick<T>(short: T, long_value: T) -> T {
    if long() { long_value } else { short }
}

/// The `outpost` binary under test.
pub fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_outpost")
}

/// A configuration file that turns origin downloads off, so a Remote Asset
/// miss is answered at once instead of going to the network.
pub fn config_file(dir: &Path) -> PathBuf {
    let path = dir.join("outpost.toml");
    std::fs::write(&path, "[asset]\norigin_fetch = false\n").expect("write config");
    path
}

/// Starts `outpost serve` over `data`, stderr to `log`, with `args` and the
/// config of [`config_file`].
pub fn start(dir: &Path, data: &Path, log: &Path, args: &[&str]) -> ServerProcess {
    start_at(dir, data, log, args, None)
}

/// [`start`], listening on `listen` when given (a restart on the old port).
pub fn start_at(
    dir: &Path,
    data: &Path,
    log: &Path,
    args: &[&str],
    listen: Option<SocketAddr>,
) -> ServerProcess {
    let mut command = ServerProcess::command(bin(), data)
        .arg("--config")
        .arg(config_file(dir))
        .args(args)
        .log_file(log);
    if let Some(addr) = listen {
        command = command.listen(addr);
    }
    command.start().expect("outpost starts")
}

/// Failed checks, collected so that one run lists every one of them.
#[derive(Clone, Default)]
pub struct Failures(Arc<Mutex<Vec<String>>>);

impl Failures {
    /// Records `what` as a failed check.
    pub fn add(&self, what: impl Into<String>) {
        self.0.lock().unwrap().push(what.into());
    }

    /// How many checks failed so far.
    pub fn count(&self) -> usize {
        self.0.lock().unwrap().len()
    }

    /// Panics listing every failed check (the first 60 in full), if any.
    #[track_caller]
    pub fn assert_none(&self, class: &str) {
        let list = self.0.lock().unwrap();
        if list.is_empty() {
            return;
        }
        // All of them on stderr (shown for a failing test), the first 60 in
        // the panic message.
        for line in list.iter() {
            eprintln!("chaos {class}: FAILED {}", clip(line, 400));
        }
        let mut text = format!("{class}: {} failed checks:\n", list.len());
        for line in list.iter().take(60) {
            text.push_str("  - ");
            text.push_str(&clip(line, 400));
            text.push('\n');
        }
        panic!("{text}");
    }
}

/// `text` cut to `max` characters (error messages may echo huge inputs).
pub fn clip(text: &str, max: usize) -> String {
    if text.chars().count() <= max {
        return text.to_string();
    }
    let cut: String = text.chars().take(max).collect();
    format!("{cut}… ({} chars)", text.chars().count())
}

/// Call latencies and outcomes per kind of call, for the printed figures.
#[derive(Clone, Default)]
pub struct Figures(Arc<Mutex<BTreeMap<&'static str, Kind>>>);

/// The figures of one kind of call.
#[derive(Default)]
pub struct Kind {
    /// Latency of every call, in microseconds.
    pub micros: Vec<u64>,
    /// Calls answered as misses (NOT_FOUND and the like).
    pub misses: u64,
    /// Calls that failed otherwise.
    pub errors: u64,
}

impl Figures {
    /// Records one call of `kind` that took `took`; `miss`/`error` say how it ended.
    pub fn record(&self, kind: &'static str, took: Duration, miss: bool, error: bool) {
        let mut map = self.0.lock().unwrap();
        let entry = map.entry(kind).or_default();
        entry.micros.push(took.as_micros() as u64);
        entry.misses += u64::from(miss);
        entry.errors += u64::from(error);
    }

    /// The `q` quantile (0..=1) of `kind`'s latencies, if it has any.
    pub fn quantile(&self, kind: &str, q: f64) -> Option<Duration> {
        let mut map = self.0.lock().unwrap();
        let micros = &mut map.get_mut(kind)?.micros;
        quantile(micros, q).map(Duration::from_micros)
    }

    /// Total calls recorded.
    pub fn calls(&self) -> u64 {
        self.0
            .lock()
            .unwrap()
            .values()
            .map(|k| k.micros.len() as u64)
            .sum()
    }

    /// Prints one line per kind: calls, misses, errors, p50, p99, max.
    pub fn print(&self, class: &str) {
        let mut map = self.0.lock().unwrap();
        for (kind, k) in map.iter_mut() {
            let calls = k.micros.len();
            let mut ms = |q| quantile(&mut k.micros, q).unwrap_or(0) as f64 / 1000.0;
            let (p50, p99, max) = (ms(0.5), ms(0.99), ms(1.0));
            eprintln!(
                "chaos {class}: {kind:<22} calls {:>7} misses {:>6} errors {:>4} p50 {:>8.2} ms p99 {:>8.2} ms max {:>8.2} ms",
                calls, k.misses, k.errors, p50, p99, max
            );
        }
    }
}

/// The `q` quantile of `values` (sorted in place).
pub fn quantile(values: &mut [u64], q: f64) -> Option<u64> {
    if values.is_empty() {
        return None;
    }
    values.sort_unstable();
    let i = ((values.len() - 1) as f64 * q).round() as usize;
    Some(values[i])
}

/// Samples a process's VmRSS every 100 ms on a thread, keeping the maximum.
pub struct RssSampler {
    stop: Arc<AtomicBool>,
    max: Arc<AtomicU64>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl RssSampler {
    /// Starts sampling process `pid`.
    pub fn start(pid: u32) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let max = Arc::new(AtomicU64::new(0));
        let (s, m) = (stop.clone(), max.clone());
        let thread = std::thread::spawn(move || {
            while !s.load(Ordering::Relaxed) {
                if let Some(rss) = vm_rss(pid) {
                    m.fetch_max(rss, Ordering::Relaxed);
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        });
        RssSampler {
            stop,
            max,
            thread: Some(thread),
        }
    }

    /// Stops sampling; returns the largest VmRSS seen, in bytes.
    pub fn stop(mut self) -> u64 {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        self.max.load(Ordering::Relaxed)
    }
}

/// VmRSS of `pid` in bytes (None once the process is gone).
fn vm_rss(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()?;
    Some(kib * 1024)
}

/// MiB, for figures.
pub fn mib(bytes: u64) -> f64 {
    bytes as f64 / (1 << 20) as f64
}

/// How a verified read ended.
#[derive(Debug, PartialEq, Eq)]
pub enum Read {
    /// The exact bytes expected.
    Exact,
    /// A miss or a refusal with this code; no wrong byte was delivered.
    Failed(Code),
    /// Bytes arrived that are not the expected ones.
    Corrupt(String),
}

/// Reads `d[offset..offset+limit]` through ByteStream and compares it with
/// `expected` (the whole blob) as it streams; wrong bytes are `Corrupt`
/// even if the stream then fails.
pub async fn read_verified(
    bs: &mut ByteStream,
    d: &re::Digest,
    expected: &[u8],
    offset: usize,
    limit: usize,
) -> Read {
    let end = if limit == 0 {
        expected.len()
    } else {
        (offset + limit).min(expected.len())
    };
    let want = &expected[offset..end];
    let request = bs::ReadRequest {
        resource_name: read_name("", d),
        read_offset: offset as i64,
        read_limit: limit as i64,
    };
    let mut stream = match bs.read(request).await {
        Ok(s) => s.into_inner(),
        Err(status) => return Read::Failed(status.code()),
    };
    let mut at = 0usize;
    loop {
        match stream.message().await {
            Ok(Some(msg)) => {
                let got = &msg.data;
                if at + got.len() > want.len() || want[at..at + got.len()] != got[..] {
                    return Read::Corrupt(format!(
                        "{}/{} at {offset}+{at}: {} wrong bytes",
                        d.hash,
                        d.size_bytes,
                        got.len()
                    ));
                }
                at += got.len();
            }
            Ok(None) if at == want.len() => return Read::Exact,
            Ok(None) => {
                return Read::Corrupt(format!(
                    "{}/{}: ended OK after {at} of {} bytes",
                    d.hash,
                    d.size_bytes,
                    want.len()
                ));
            }
            Err(status) => return Read::Failed(status.code()),
        }
    }
}

/// Reads a whole blob through ByteStream, hashing it; `Corrupt` unless the
/// digest matches `d` (for blobs whose bytes the test does not keep).
pub async fn read_hashed(bs: &mut ByteStream, d: &re::Digest) -> Read {
    let mut stream = match bs
        .read(bs::ReadRequest {
            resource_name: read_name("", d),
            read_offset: 0,
            read_limit: 0,
        })
        .await
    {
        Ok(s) => s.into_inner(),
        Err(status) => return Read::Failed(status.code()),
    };
    let mut hasher = Sha256::new();
    let mut size = 0i64;
    loop {
        match stream.message().await {
            Ok(Some(msg)) => {
                hasher.update(&msg.data);
                size += msg.data.len() as i64;
            }
            Ok(None) => break,
            Err(status) => return Read::Failed(status.code()),
        }
    }
    let hash = hex::encode(hasher.finalize());
    if hash == d.hash && size == d.size_bytes {
        Read::Exact
    } else {
        Read::Corrupt(format!("{}/{} read as {hash}/{size}", d.hash, d.size_bytes))
    }
}

/// Uploads `data` through ByteStream in 256 KiB pieces, without a copy.
pub async fn upload_blob(bs: &mut ByteStream, data: Arc<Vec<u8>>) -> Result<i64, Status> {
    let name = write_name("", &digest(&data));
    Ok(bs
        .write(write_stream(name, data, 256 << 10))
        .await?
        .into_inner()
        .committed_size)
}

/// Waits up to `timeout` for `check` to hold, polling every 50 ms.
pub async fn eventually<F, Fut>(timeout: Duration, mut check: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if check().await {
            return true;
        }
        if Instant::now() > deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// After a class: the server still stores and serves a fresh blob, answers
/// GetCapabilities, and its process is alive.
pub async fn assert_healthy(server: &mut ServerProcess, failures: &Failures, class: &str) {
    if !server.is_running() {
        failures.add(format!(
            "{class}: the server process died: {}",
            server.log()
        ));
        return;
    }
    let data = Arc::new(blob(0xc4a0_5000 + failures.count() as u64, 3000));
    let d = digest(&data);
    let mut bs = server.bytestream();
    match upload_blob(&mut bs, data.clone()).await {
        Ok(n) if n == d.size_bytes => {}
        other => failures.add(format!(
            "{class}: a normal write after the class: {other:?}"
        )),
    }
    match read_verified(&mut bs, &d, &data, 0, 0).await {
        Read::Exact => {}
        other => failures.add(format!("{class}: a normal read after the class: {other:?}")),
    }
    if let Err(e) = server
        .capabilities()
        .get_capabilities(re::GetCapabilitiesRequest::default())
        .await
    {
        failures.add(format!("{class}: GetCapabilities after the class: {e}"));
    }
}
