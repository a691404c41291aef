//! Loopback throughput of a real `outpost serve` process.
//!
//! Starts the `outpost` binary on 127.0.0.1 with a temporary data directory,
//! connects with `outpost::client::connect` and the bazel-remote-apis tonic
//! clients, and measures ByteStream Write/Read of one large blob, Batch
//! Update/Read of many small blobs and FindMissingBlobs. Every figure is the
//! median of several repetitions with min–max. Knobs are environment
//! variables; see benches/README.md.
//!
//! Run: `cargo bench --bench throughput`
//! Quick: `OUTPOST_BENCH_REPS=3 OUTPOST_BENCH_SIZE_MIB=64 cargo bench --bench throughput`

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, ensure};
use bazel_remote_apis::build::bazel::remote::execution::v2::{
    self as re, BatchReadBlobsRequest, BatchUpdateBlobsRequest, FindMissingBlobsRequest,
    GetCapabilitiesRequest, batch_update_blobs_request, capabilities_client::CapabilitiesClient,
    content_addressable_storage_client::ContentAddressableStorageClient,
};
use bazel_remote_apis::google::bytestream::{ReadRequest, byte_stream_client::ByteStreamClient};
use futures::StreamExt;
use outpost::digest::{Digest, DigestFunction};
use outpost_testkit::client::write_stream;
use outpost_testkit::env::{env_list, env_opt, env_usize, server_binary};
use outpost_testkit::{Rng, ServerProcess, pack};
use tonic::transport::Channel;

#[path = "throughput/compressed.rs"]
mod compressed;

/// Largest gRPC message the benchmark's clients accept or send: a full
/// 4 MiB batch plus per-entry framing, with room to spare.
const CLIENT_MAX_MESSAGE: usize = 16 << 20;

// ---------------------------------------------------------------- settings

/// Everything the environment can change.
struct Settings {
    reps: usize,
    warmup: usize,
    size_mib: usize,
    write_chunks_kib: Vec<usize>,
    small_count: usize,
    small_size: usize,
    fmb_rounds: usize,
    batch_rounds: usize,
    fmb_call_sizes: Vec<usize>,
    client_threads: usize,
    max_other_cpu: f64,
    min_plain_mbps: f64,
    quota: u64,
    client_stream_window_kib: Option<usize>,
    client_conn_window_kib: Option<usize>,
    client_frame_kib: Option<usize>,
    bin: PathBuf,
    dir: Option<PathBuf>,
    server: Option<String>,
    only: Option<Vec<String>>,
}

impl Settings {
    fn from_env() -> anyhow::Result<Self> {
        let bin = server_binary("OUTPOST_BENCH_BIN", option_env!("CARGO_BIN_EXE_outpost"));
        let size_mib = env_usize("OUTPOST_BENCH_SIZE_MIB", 256)?.max(1);
        let settings = Settings {
            reps: env_usize("OUTPOST_BENCH_REPS", 5)?.max(1),
            warmup: env_usize("OUTPOST_BENCH_WARMUP", 1)?,
            size_mib,
            write_chunks_kib: env_list("OUTPOST_BENCH_CHUNK_KIB", &[64, 1024])?,
            small_count: env_usize("OUTPOST_BENCH_SMALL_COUNT", 10_000)?.max(2),
            small_size: env_usize("OUTPOST_BENCH_SMALL_SIZE", 1024)?.max(1),
            fmb_rounds: env_usize("OUTPOST_BENCH_FMB_ROUNDS", 20)?.max(1),
            batch_rounds: env_usize("OUTPOST_BENCH_BATCH_ROUNDS", 5)?.max(1),
            fmb_call_sizes: env_list("OUTPOST_BENCH_FMB_CALL", &[10_000, 100])?,
            client_threads: env_usize("OUTPOST_BENCH_CLIENT_THREADS", 1)?,
            max_other_cpu: env_usize("OUTPOST_BENCH_MAX_OTHER_CPU", 25)? as f64,
            min_plain_mbps: env_usize("OUTPOST_BENCH_MIN_PLAIN_MBPS", 1000)? as f64,
            // Four large blobs by default, so the store evicts (see README).
            quota: env_usize("OUTPOST_BENCH_QUOTA_MIB", (4 * size_mib).max(1024))? as u64
                * (1 << 20),
            client_stream_window_kib: env_opt("OUTPOST_BENCH_CLIENT_STREAM_WINDOW_KIB")?,
            client_conn_window_kib: env_opt("OUTPOST_BENCH_CLIENT_CONN_WINDOW_KIB")?,
            client_frame_kib: env_opt("OUTPOST_BENCH_CLIENT_FRAME_KIB")?,
            bin,
            dir: std::env::var_os("OUTPOST_BENCH_DIR").map(PathBuf::from),
            server: std::env::var("OUTPOST_BENCH_SERVER").ok(),
            only: std::env::var("OUTPOST_BENCH_ONLY")
                .ok()
                .map(|v| v.split(',').map(|s| s.trim().to_lowercase()).collect()),
        };
        ensure!(
            settings.write_chunks_kib.iter().all(|&c| c > 0),
            "OUTPOST_BENCH_CHUNK_KIB sizes must be positive"
        );
        ensure!(
            settings.fmb_call_sizes.iter().all(|&c| c > 0),
            "OUTPOST_BENCH_FMB_CALL sizes must be positive"
        );
        Ok(settings)
    }

    /// Whether a group (`bytestream`, `batch`, `fmb`) is selected.
    fn wants(&self, group: &str) -> bool {
        self.only
            .as_ref()
            .is_none_or(|only| only.iter().any(|g| g == group))
    }
}

// ---------------------------------------------------------------- server

/// The `outpost serve` child and its temporary data directory (the child is
/// stopped first: fields drop in order).
struct Server {
    process: ServerProcess,
    dir: tempfile::TempDir,
}

impl Server {
    fn start(settings: &Settings) -> anyhow::Result<Self> {
        ensure!(
            settings.bin.exists(),
            "server binary {} not found; run `cargo build --release` or set OUTPOST_BENCH_BIN",
            settings.bin.display()
        );
        let dir = match &settings.dir {
            Some(parent) => {
                std::fs::create_dir_all(parent)?;
                tempfile::Builder::new()
                    .prefix("outpost-bench-")
                    .tempdir_in(parent)?
            }
            None => tempfile::Builder::new()
                .prefix("outpost-bench-")
                .tempdir()?,
        };
        let process = ServerProcess::command(&settings.bin, dir.path())
            .args(["--quota", &settings.quota.to_string()])
            .rust_log(&std::env::var("OUTPOST_BENCH_SERVER_LOG").unwrap_or("warn".into()))
            .start()
            .with_context(|| format!("cannot start {}", settings.bin.display()))?;
        Ok(Server { process, dir })
    }

    fn pid(&self) -> u32 {
        self.process.pid()
    }

    fn data_dir(&self) -> &std::path::Path {
        self.dir.path()
    }
}

// ---------------------------------------------------------------- measuring

/// User + system CPU seconds of a process (all threads), from /proc.
fn cpu_seconds(pid: Option<u32>) -> f64 {
    let path = match pid {
        Some(pid) => format!("/proc/{pid}/stat"),
        None => "/proc/self/stat".to_string(),
    };
    let Ok(stat) = std::fs::read_to_string(path) else {
        return f64::NAN;
    };
    // Fields after the parenthesised command name; utime and stime are the
    // 14th and 15th fields overall, i.e. the 12th and 13th after `)`.
    let Some(rest) = stat.rsplit_once(')').map(|(_, r)| r) else {
        return f64::NAN;
    };
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| fields.get(i).and_then(|f| f.parse::<f64>().ok());
    match (ticks(11), ticks(12)) {
        // USER_HZ is 100 on every Linux this runs on.
        (Some(u), Some(s)) => (u + s) / 100.0,
        _ => f64::NAN,
    }
}

/// Busy CPU seconds of the whole machine (all cores), from /proc/stat.
fn machine_busy_seconds() -> f64 {
    let Ok(stat) = std::fs::read_to_string("/proc/stat") else {
        return f64::NAN;
    };
    let Some(line) = stat.lines().next() else {
        return f64::NAN;
    };
    // cpu user nice system idle iowait irq softirq steal ...
    let ticks: Vec<f64> = line
        .split_whitespace()
        .skip(1)
        .take(8)
        .filter_map(|f| f.parse().ok())
        .collect();
    if ticks.len() < 8 {
        return f64::NAN;
    }
    let idle = ticks[3] + ticks[4];
    let steal = ticks[7];
    (ticks.iter().sum::<f64>() - idle - steal) / 100.0
}

/// One timed repetition.
#[derive(Clone, Copy)]
struct Sample {
    secs: f64,
    server_cpu: f64,
    client_cpu: f64,
    /// Busy CPU of everything else (other processes, kernel writeback).
    other_cpu: f64,
}

impl Sample {
    /// CPU shares for the progress log.
    fn brief(&self) -> String {
        let pct = |cpu: f64| 100.0 * cpu / self.secs;
        format!(
            "server {:.0}%, client {:.0}%, other {:.0}%",
            pct(self.server_cpu),
            pct(self.client_cpu),
            pct(self.other_cpu)
        )
    }
}

/// Times a phase, with the CPU used meanwhile by the server and by this process.
struct Stopwatch {
    server_pid: Option<u32>,
    start: Instant,
    server0: f64,
    client0: f64,
    machine0: f64,
}

impl Stopwatch {
    fn start(server_pid: Option<u32>) -> Self {
        Stopwatch {
            server_pid,
            server0: cpu_seconds(server_pid),
            client0: cpu_seconds(None),
            machine0: machine_busy_seconds(),
            start: Instant::now(),
        }
    }

    fn stop(self) -> Sample {
        let secs = self.start.elapsed().as_secs_f64();
        let server_cpu = cpu_seconds(self.server_pid) - self.server0;
        let client_cpu = cpu_seconds(None) - self.client0;
        let machine = machine_busy_seconds() - self.machine0;
        Sample {
            secs,
            server_cpu,
            client_cpu,
            other_cpu: (machine - server_cpu.max(0.0) - client_cpu).max(0.0),
        }
    }
}

/// One line of the result table.
struct Row {
    name: String,
    /// Payload bytes moved per repetition.
    bytes: u64,
    /// Operations per repetition (blobs, or digests for FindMissingBlobs).
    ops: u64,
    /// RPCs per repetition.
    calls: u64,
    samples: Vec<Sample>,
    /// Repetitions discarded because other processes were busy.
    noisy: usize,
}

/// Which repetitions count. Warm-ups never do. A repetition during which
/// other processes used more than `max_other` % of a core is repeated, at most
/// `reps` extra times per row, so a busy shared machine skews less.
struct Reps {
    warmup: usize,
    reps: usize,
    max_other: f64,
    seen: usize,
    kept: usize,
    noisy: usize,
}

impl Reps {
    fn new(settings: &Settings, warmup: usize) -> Self {
        Reps {
            warmup,
            reps: settings.reps,
            max_other: settings.max_other_cpu,
            seen: 0,
            kept: 0,
            noisy: 0,
        }
    }

    fn more(&self) -> bool {
        self.kept < self.reps
    }

    /// Judges a finished repetition (by the busiest of its samples): whether
    /// to keep it, and a note for the progress log.
    fn judge(&mut self, samples: &[Sample]) -> (bool, &'static str) {
        self.judge_env(samples, false)
    }

    /// [`Reps::judge`], where `slow_env` says an independent check found the
    /// machine itself slow during this repetition.
    fn judge_env(&mut self, samples: &[Sample], slow_env: bool) -> (bool, &'static str) {
        let index = self.seen;
        self.seen += 1;
        if index < self.warmup {
            return (false, " (warm-up)");
        }
        // CPU times come in 10 ms ticks: too coarse to judge short samples.
        let other = samples
            .iter()
            .filter(|s| s.secs >= 0.1)
            .map(|s| 100.0 * s.other_cpu / s.secs)
            .fold(0.0, f64::max);
        if (other > self.max_other || slow_env) && self.noisy < self.reps {
            self.noisy += 1;
            return (false, " (noisy: repeated)");
        }
        self.kept += 1;
        (true, "")
    }
}

fn median_min_max(mut values: Vec<f64>) -> (f64, f64, f64) {
    values.sort_by(f64::total_cmp);
    let n = values.len();
    let median = if n % 2 == 1 {
        values[n / 2]
    } else {
        (values[n / 2 - 1] + values[n / 2]) / 2.0
    };
    (median, values[0], values[n - 1])
}

fn fmt_rate(value: f64) -> String {
    if value >= 100_000.0 {
        format!("{:.0}k", value / 1000.0)
    } else if value >= 100.0 {
        format!("{value:.0}")
    } else {
        format!("{value:.1}")
    }
}

fn fmt_triple((median, min, max): (f64, f64, f64)) -> String {
    format!("{} [{}–{}]", fmt_rate(median), fmt_rate(min), fmt_rate(max))
}

impl Row {
    fn rates(&self, per_rep: u64) -> (f64, f64, f64) {
        median_min_max(
            self.samples
                .iter()
                .map(|s| per_rep as f64 / s.secs)
                .collect(),
        )
    }

    /// Average CPU of a process over the repetitions, in % of one core.
    fn cpu(&self, pick: fn(&Sample) -> f64) -> String {
        let cpu: f64 = self.samples.iter().map(pick).sum();
        let wall: f64 = self.samples.iter().map(|s| s.secs).sum();
        if cpu.is_nan() || wall <= 0.0 {
            "-".into()
        } else {
            format!("{:.0}%", 100.0 * cpu / wall)
        }
    }

    fn cells(&self) -> Vec<String> {
        let mb = if self.bytes > 0 {
            fmt_triple(self.rates(self.bytes).scaled(1e-6))
        } else {
            "-".into()
        };
        let (median_secs, _, _) = median_min_max(self.samples.iter().map(|s| s.secs).collect());
        vec![
            self.name.clone(),
            mb,
            fmt_triple(self.rates(self.ops)),
            if self.calls > 0 {
                fmt_rate(self.rates(self.calls).0)
            } else {
                "-".into()
            },
            format!("{:.1}", median_secs * 1000.0),
            self.cpu(|s| s.server_cpu),
            self.cpu(|s| s.client_cpu),
            self.cpu(|s| s.other_cpu),
            self.noisy.to_string(),
        ]
    }
}

trait Scaled {
    fn scaled(self, by: f64) -> Self;
}

impl Scaled for (f64, f64, f64) {
    fn scaled(self, by: f64) -> Self {
        (self.0 * by, self.1 * by, self.2 * by)
    }
}

fn print_table(rows: &[Row], settings: &Settings) {
    let header = [
        "operation",
        "MB/s median [min–max]",
        "ops/s median [min–max]",
        "calls/s",
        "ms/rep",
        "server CPU",
        "client CPU",
        "other CPU",
        "noisy",
    ];
    let mut table: Vec<Vec<String>> = vec![header.iter().map(|s| s.to_string()).collect()];
    table.extend(rows.iter().map(Row::cells));
    let widths: Vec<usize> = (0..header.len())
        .map(|c| {
            table
                .iter()
                .map(|r| r[c].chars().count())
                .max()
                .unwrap_or(0)
        })
        .collect();
    println!();
    println!(
        "Outpost loopback throughput: median [min–max] of {} reps (after {} warm-up; the first \
         write row also fills the {} MiB quota first); MB = 10^6 bytes.",
        settings.reps,
        settings.warmup,
        settings.quota >> 20,
    );
    println!(
        "CPU in % of one core, {} cores. `noisy`: reps redone because other processes used \
         > {}% of a core meanwhile.",
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        settings.max_other_cpu
    );
    for (i, row) in table.iter().enumerate() {
        let line: Vec<String> = row
            .iter()
            .zip(&widths)
            .enumerate()
            .map(|(c, (cell, w))| {
                let pad = w - cell.chars().count();
                if c == 0 {
                    format!("{cell}{}", " ".repeat(pad))
                } else {
                    format!("{}{cell}", " ".repeat(pad))
                }
            })
            .collect();
        println!("| {} |", line.join(" | "));
        if i == 0 {
            let rule: Vec<String> = widths.iter().map(|w| "-".repeat(*w)).collect();
            println!("|-{}-|", rule.join("-|-"));
        }
    }
}

// ---------------------------------------------------------------- data

fn sha256(data: &[u8]) -> Digest {
    Digest::of(DigestFunction::Sha256, data)
}

fn read_name(d: &Digest) -> String {
    format!("blobs/{}/{}", d.hash_hex(), d.size)
}

/// A fresh upload name for every write (REAPI wants a unique id per upload).
fn write_name(d: &Digest, n: u64) -> String {
    format!(
        "uploads/6f7574706f73-7400-4000-8000-{n:012x}/blobs/{}/{}",
        d.hash_hex(),
        d.size
    )
}

// ---------------------------------------------------------------- clients

struct Clients {
    bytestream: ByteStreamClient<Channel>,
    cas: ContentAddressableStorageClient<Channel>,
    max_batch: u64,
}

/// The channel: `outpost::client::connect`, unless a client HTTP/2 knob is
/// set, in which case the same tuning (16 MiB / 32 MiB windows, 1 MiB
/// frames) with those values replaced.
async fn channel(settings: &Settings, target: &str) -> anyhow::Result<Channel> {
    if settings.client_stream_window_kib.is_none()
        && settings.client_conn_window_kib.is_none()
        && settings.client_frame_kib.is_none()
    {
        return outpost::client::connect(target).await;
    }
    let kib = |v: Option<usize>, default: u32| v.map_or(default, |k| (k << 10) as u32);
    let address = target.replacen("grpc://", "http://", 1);
    let mut endpoint = tonic::transport::Endpoint::from_shared(address)?
        .connect_timeout(Duration::from_secs(5))
        .tcp_nodelay(true)
        .initial_stream_window_size(kib(settings.client_stream_window_kib, 16 << 20))
        .initial_connection_window_size(kib(settings.client_conn_window_kib, 32 << 20));
    let frame = settings.client_frame_kib.unwrap_or(1024);
    endpoint = endpoint.max_frame_size((frame << 10) as u32);
    Ok(endpoint.connect().await?)
}

async fn connect(settings: &Settings, target: &str) -> anyhow::Result<Clients> {
    let channel = channel(settings, target).await?;
    let caps = CapabilitiesClient::new(channel.clone())
        .get_capabilities(GetCapabilitiesRequest::default())
        .await?
        .into_inner();
    let max_batch = caps
        .cache_capabilities
        .map(|c| c.max_batch_total_size_bytes)
        .filter(|&n| n > 0)
        .unwrap_or(4 << 20) as u64;
    Ok(Clients {
        bytestream: ByteStreamClient::new(channel.clone())
            .max_decoding_message_size(CLIENT_MAX_MESSAGE)
            .max_encoding_message_size(CLIENT_MAX_MESSAGE),
        cas: ContentAddressableStorageClient::new(channel)
            .max_decoding_message_size(CLIENT_MAX_MESSAGE)
            .max_encoding_message_size(CLIENT_MAX_MESSAGE),
        max_batch,
    })
}

/// Uploads `data` (whose digest is `digest`) in `chunk`-byte WriteRequests.
/// Each request's `data` is a fresh Vec, as the generated types require.
async fn bytestream_write(
    client: &mut ByteStreamClient<Channel>,
    digest: &Digest,
    data: Arc<Vec<u8>>,
    chunk: usize,
    upload: u64,
) -> anyhow::Result<()> {
    let size = data.len();
    let name = write_name(digest, upload);
    let requests = write_stream(name, data, chunk);
    let response = client.write(requests).await?.into_inner();
    ensure!(
        response.committed_size == size as i64,
        "Write committed {} of {size} bytes",
        response.committed_size
    );
    Ok(())
}

/// Reads a whole blob; returns its bytes' digest when `verify`, else just the size.
async fn bytestream_read(
    client: &mut ByteStreamClient<Channel>,
    digest: &Digest,
    verify: bool,
) -> anyhow::Result<u64> {
    let mut stream = client
        .read(ReadRequest {
            resource_name: read_name(digest),
            read_offset: 0,
            read_limit: 0,
        })
        .await?
        .into_inner();
    let mut hasher = verify.then(|| outpost::digest::Hasher::new(DigestFunction::Sha256));
    let mut total = 0u64;
    let mut messages = 0u64;
    while let Some(response) = stream.next().await {
        let response = response?;
        total += response.data.len() as u64;
        messages += 1;
        if let Some(h) = hasher.as_mut() {
            h.update(&response.data);
        }
    }
    ensure!(
        total == digest.size,
        "Read returned {total} of {} bytes",
        digest.size
    );
    if let Some(h) = hasher {
        ensure!(h.finish() == *digest, "Read returned different bytes");
    }
    Ok(messages)
}

fn small_blobs(count: usize, size: usize, seed: u64) -> Vec<(Digest, Vec<u8>)> {
    let mut rng = Rng::new(seed);
    (0..count)
        .map(|_| {
            let mut data = vec![0u8; size];
            rng.fill(&mut data);
            (sha256(&data), data)
        })
        .collect()
}

// ---------------------------------------------------------------- scenarios

/// The page-cache ceiling: plain write(2) of a new file of the same size on
/// the same file system, evicting its own oldest files at the same quota as
/// the server, so it sees the same memory conditions.
struct FileBaseline {
    dir: tempfile::TempDir,
    files: std::collections::VecDeque<(PathBuf, u64)>,
    used: u64,
    quota: u64,
    next: u64,
}

impl FileBaseline {
    fn new(near: &std::path::Path, quota: u64) -> anyhow::Result<Self> {
        let parent = near.parent().unwrap_or(near);
        Ok(FileBaseline {
            dir: tempfile::Builder::new()
                .prefix("outpost-bench-baseline-")
                .tempdir_in(parent)?,
            files: Default::default(),
            used: 0,
            quota,
            next: 0,
        })
    }

    fn write(&mut self, data: &[u8], block: usize) -> anyhow::Result<()> {
        use std::io::Write;
        let size = data.len() as u64;
        while self.used + size > self.quota {
            let Some((path, n)) = self.files.pop_front() else {
                break;
            };
            std::fs::remove_file(path)?;
            self.used -= n;
        }
        self.next += 1;
        let path = self.dir.path().join(format!("blob-{}", self.next));
        let mut file = std::fs::File::create(&path)?;
        for piece in data.chunks(block) {
            file.write_all(piece)?;
        }
        drop(file);
        self.files.push_back((path, size));
        self.used += size;
        Ok(())
    }
}

async fn bench_bytestream(
    settings: &Settings,
    clients: &mut Clients,
    server: Option<&Server>,
    rows: &mut Vec<Row>,
) -> anyhow::Result<()> {
    let pid = server.map(Server::pid);
    let mut baseline = match server {
        Some(server) => Some(FileBaseline::new(server.data_dir(), settings.quota)?),
        None => None,
    };
    let mut baseline_samples = Vec::new();
    let mut hash_samples = Vec::new();
    let size = settings.size_mib << 20;
    eprintln!("generating {} MiB of random data…", settings.size_mib);
    let mut data = vec![0u8; size];
    Rng::new(1).fill(&mut data);
    let mut data = Arc::new(data);
    let mut upload = 0u64;
    let mut last: Option<Digest> = None;
    // Fill the store to its quota before timing, so that every timed write
    // evicts an older blob (a long-running cache's steady state) and the page
    // cache stops growing; see README ("Memory and the page cache").
    let fill = (settings.quota as usize).div_ceil(size);
    for (i, &chunk_kib) in settings.write_chunks_kib.iter().enumerate() {
        let chunk = chunk_kib << 10;
        let mut samples = Vec::new();
        let warmup = if i == 0 {
            settings.warmup.max(fill)
        } else {
            settings.warmup
        };
        let mut reps = Reps::new(settings, warmup);
        while reps.more() {
            // A new blob every time: an existing one completes early.
            upload += 1;
            Arc::make_mut(&mut data)[..8].copy_from_slice(&upload.to_le_bytes());
            let watch = Stopwatch::start(pid);
            let digest = sha256(&data);
            let hashed = watch.stop();
            let watch = Stopwatch::start(pid);
            bytestream_write(
                &mut clients.bytestream,
                &digest,
                data.clone(),
                chunk,
                upload,
            )
            .await
            .with_context(|| format!("ByteStream.Write, {chunk_kib} KiB chunks"))?;
            let sample = watch.stop();
            // Same bytes through plain write(2), right after, for comparison.
            let plain = match baseline.as_mut() {
                Some(b) => {
                    let watch = Stopwatch::start(pid);
                    b.write(&data, chunk)?;
                    Some(watch.stop())
                }
                None => None,
            };
            // A slow plain write means the VM was handing out memory it
            // first had to get from the host (see README): not Outpost's doing.
            let slow_env =
                plain.is_some_and(|p| size as f64 / p.secs / 1e6 < settings.min_plain_mbps);
            let (keep, note) = reps.judge_env(&[sample], slow_env);
            if keep {
                samples.push(sample);
                hash_samples.push(hashed);
                baseline_samples.extend(plain);
            }
            last = Some(digest);
            eprintln!(
                "  write {chunk_kib:>5} KiB chunks{note}: {:.0} MB/s ({}){}",
                size as f64 / sample.secs / 1e6,
                sample.brief(),
                plain.map_or(String::new(), |p| format!(
                    "; plain file write {:.0} MB/s",
                    size as f64 / p.secs / 1e6
                ))
            );
        }
        rows.push(Row {
            name: format!(
                "ByteStream.Write {} MiB, {chunk_kib} KiB chunks",
                settings.size_mib
            ),
            bytes: size as u64,
            ops: 1,
            calls: 1,
            samples,
            noisy: reps.noisy,
        });
    }
    if !hash_samples.is_empty() {
        rows.push(Row {
            name: format!("  baseline: SHA-256 of {} MiB, 1 core", settings.size_mib),
            bytes: size as u64,
            ops: 1,
            calls: 0,
            samples: hash_samples,
            noisy: 0,
        });
    }
    if !baseline_samples.is_empty() {
        rows.push(Row {
            name: format!("  baseline: write(2) new {} MiB file", settings.size_mib),
            bytes: size as u64,
            ops: 1,
            calls: 0,
            samples: baseline_samples,
            noisy: 0,
        });
    }
    drop(baseline);
    // Read the last blob written (it is in the page cache, as a fresh upload would be).
    let digest = match last {
        Some(d) => d,
        None => {
            let d = sha256(&data);
            bytestream_write(&mut clients.bytestream, &d, data.clone(), 1 << 20, 0).await?;
            d
        }
    };
    drop(data);
    let mut samples = Vec::new();
    let mut messages = 0;
    let mut reps = Reps::new(settings, settings.warmup.max(1));
    while reps.more() {
        // The first (warm-up) read also checks the bytes.
        let verify = reps.seen == 0;
        let watch = Stopwatch::start(pid);
        messages = bytestream_read(&mut clients.bytestream, &digest, verify)
            .await
            .context("ByteStream.Read")?;
        let sample = watch.stop();
        let (keep, note) = reps.judge(&[sample]);
        if keep {
            samples.push(sample);
        }
        eprintln!(
            "  read{}{note}: {:.0} MB/s ({})",
            if verify { ", verified" } else { "" },
            size as f64 / sample.secs / 1e6,
            sample.brief()
        );
    }
    rows.push(Row {
        name: format!(
            "ByteStream.Read {} MiB ({} KiB/msg)",
            settings.size_mib,
            (size as u64 / messages.max(1)) >> 10
        ),
        bytes: size as u64,
        ops: 1,
        calls: 1,
        samples,
        noisy: reps.noisy,
    });
    Ok(())
}

/// Uploads and reads back `small_count` blobs, `batch_rounds` times per rep
/// (fresh blobs every round); returns the digests of the last set (present on
/// the server) for FindMissingBlobs.
async fn bench_batches(
    settings: &Settings,
    clients: &mut Clients,
    pid: Option<u32>,
    rows: &mut Vec<Row>,
) -> anyhow::Result<Vec<Digest>> {
    let count = settings.small_count;
    let size = settings.small_size;
    let rounds = settings.batch_rounds;
    let total = (count * size) as u64;
    let mut update_samples = Vec::new();
    let mut read_samples = Vec::new();
    let mut update_calls = 0;
    let mut read_calls = 0;
    let mut present = Vec::new();
    let mut seed = 1000;
    let mut reps = Reps::new(settings, settings.warmup);
    while reps.more() {
        // Fresh blobs every round, so every update really stores them.
        // Requests are built outside the clock.
        let mut sets = Vec::with_capacity(rounds);
        for _ in 0..rounds {
            seed += 1;
            let blobs = small_blobs(count, size, seed);
            let digests: Vec<Digest> = blobs.iter().map(|(d, _)| *d).collect();
            let updates: Vec<BatchUpdateBlobsRequest> =
                pack(blobs, clients.max_batch, |(d, _)| d.size)
                    .into_iter()
                    .map(|batch| BatchUpdateBlobsRequest {
                        digest_function: re::digest_function::Value::Sha256 as i32,
                        requests: batch
                            .into_iter()
                            .map(|(d, data)| batch_update_blobs_request::Request {
                                digest: Some(d.to_proto()),
                                data,
                                compressor: re::compressor::Value::Identity as i32,
                            })
                            .collect(),
                        ..Default::default()
                    })
                    .collect();
            let reads: Vec<BatchReadBlobsRequest> =
                pack(digests.clone(), clients.max_batch, |d| d.size)
                    .into_iter()
                    .map(|batch| BatchReadBlobsRequest {
                        digests: batch.iter().map(Digest::to_proto).collect(),
                        digest_function: re::digest_function::Value::Sha256 as i32,
                        ..Default::default()
                    })
                    .collect();
            update_calls = updates.len() as u64;
            read_calls = reads.len() as u64;
            sets.push((digests, updates, reads));
        }
        let reads: Vec<_> = sets
            .iter_mut()
            .map(|(_, _, reads)| std::mem::take(reads))
            .collect();

        let watch = Stopwatch::start(pid);
        for (_, updates, _) in &mut sets {
            for request in std::mem::take(updates) {
                let response = clients
                    .cas
                    .batch_update_blobs(request)
                    .await
                    .context("BatchUpdateBlobs")?
                    .into_inner();
                for r in &response.responses {
                    let code = r.status.as_ref().map_or(0, |s| s.code);
                    ensure!(code == 0, "BatchUpdateBlobs entry failed: {:?}", r.status);
                }
            }
        }
        let update = watch.stop();

        let watch = Stopwatch::start(pid);
        for round in reads {
            let mut got = 0u64;
            for request in round {
                let response = clients
                    .cas
                    .batch_read_blobs(request)
                    .await
                    .context("BatchReadBlobs")?
                    .into_inner();
                for r in &response.responses {
                    let code = r.status.as_ref().map_or(0, |s| s.code);
                    ensure!(code == 0, "BatchReadBlobs entry failed: {:?}", r.status);
                    got += r.data.len() as u64;
                }
            }
            ensure!(
                got == total,
                "BatchReadBlobs returned {got} of {total} bytes"
            );
        }
        let read = watch.stop();

        let (keep, note) = reps.judge(&[update, read]);
        if keep {
            update_samples.push(update);
            read_samples.push(read);
        }
        let blobs = (count * rounds) as f64;
        eprintln!(
            "  batches{note}: update {:.0} blobs/s ({}), read {:.0} blobs/s ({})",
            blobs / update.secs,
            update.brief(),
            blobs / read.secs,
            read.brief()
        );
        present = sets
            .pop()
            .map(|(digests, _, _)| digests)
            .unwrap_or_default();
    }
    let per_rep = if rounds > 1 {
        format!(", ×{rounds} per rep")
    } else {
        String::new()
    };
    rows.push(Row {
        name: format!("BatchUpdateBlobs {count} × {size} B ({update_calls} calls{per_rep})"),
        bytes: total * rounds as u64,
        ops: (count * rounds) as u64,
        calls: update_calls * rounds as u64,
        samples: update_samples,
        noisy: reps.noisy,
    });
    rows.push(Row {
        name: format!("BatchReadBlobs {count} × {size} B ({read_calls} calls{per_rep})"),
        bytes: total * rounds as u64,
        ops: (count * rounds) as u64,
        calls: read_calls * rounds as u64,
        samples: read_samples,
        noisy: reps.noisy,
    });
    Ok(present)
}

async fn bench_find_missing(
    settings: &Settings,
    clients: &mut Clients,
    pid: Option<u32>,
    present: Vec<Digest>,
    rows: &mut Vec<Row>,
) -> anyhow::Result<()> {
    let count = settings.small_count;
    let present = if present.len() >= count / 2 {
        present
    } else {
        // The batch scenario was skipped: upload a present half first.
        let blobs = small_blobs(count / 2, settings.small_size, 77);
        let digests = blobs.iter().map(|(d, _)| *d).collect();
        for batch in pack(blobs, clients.max_batch, |(d, _)| d.size) {
            clients
                .cas
                .batch_update_blobs(BatchUpdateBlobsRequest {
                    requests: batch
                        .into_iter()
                        .map(|(d, data)| batch_update_blobs_request::Request {
                            digest: Some(d.to_proto()),
                            data,
                            ..Default::default()
                        })
                        .collect(),
                    ..Default::default()
                })
                .await?;
        }
        digests
    };
    // Half present, half missing, interleaved.
    let mut rng = Rng::new(4242);
    let mut digests = Vec::with_capacity(count);
    for i in 0..count {
        if i % 2 == 0 {
            digests.push(present[i / 2].to_proto());
        } else {
            let mut hash = [0u8; 32];
            rng.fill(&mut hash);
            digests.push(re::Digest {
                hash: hex::encode(hash),
                size_bytes: settings.small_size as i64,
            });
        }
    }
    let expected_missing = count / 2;
    for &per_call in &settings.fmb_call_sizes {
        let calls: Vec<FindMissingBlobsRequest> = digests
            .chunks(per_call)
            .map(|c| FindMissingBlobsRequest {
                blob_digests: c.to_vec(),
                digest_function: re::digest_function::Value::Sha256 as i32,
                ..Default::default()
            })
            .collect();
        let mut samples = Vec::new();
        let mut reps = Reps::new(settings, settings.warmup);
        while reps.more() {
            // Requests are cloned outside the clock; one rep = `fmb_rounds` passes.
            let rounds: Vec<Vec<FindMissingBlobsRequest>> =
                (0..settings.fmb_rounds).map(|_| calls.clone()).collect();
            let watch = Stopwatch::start(pid);
            for round in rounds {
                let mut missing = 0;
                for request in round {
                    missing += clients
                        .cas
                        .find_missing_blobs(request)
                        .await
                        .context("FindMissingBlobs")?
                        .into_inner()
                        .missing_blob_digests
                        .len();
                }
                ensure!(
                    missing == expected_missing,
                    "FindMissingBlobs reported {missing} missing, expected {expected_missing}"
                );
            }
            let sample = watch.stop();
            if reps.judge(&[sample]).0 {
                samples.push(sample);
            }
        }
        let calls_per_pass = calls.len() as u64;
        rows.push(Row {
            name: format!(
                "FindMissingBlobs {count} digests, {} per call (½ missing)",
                per_call.min(count)
            ),
            bytes: 0,
            ops: (count * settings.fmb_rounds) as u64,
            calls: calls_per_pass * settings.fmb_rounds as u64,
            samples,
            noisy: reps.noisy,
        });
    }
    Ok(())
}

// ---------------------------------------------------------------- main

fn main() -> anyhow::Result<()> {
    // `cargo bench` passes `--bench`. Under `cargo test --benches` (no
    // `--bench`) or `--list`, do nothing rather than run for minutes.
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.iter().any(|a| a == "--list") || !args.iter().any(|a| a == "--bench") {
        eprintln!("throughput: run it with `cargo bench --bench throughput`");
        return Ok(());
    }
    let settings = Settings::from_env()?;
    let (server, target) = match &settings.server {
        Some(target) => (None, target.clone()),
        None => {
            let server = Server::start(&settings)?;
            let target = server.process.url();
            (Some(server), target)
        }
    };
    let pid = server.as_ref().map(Server::pid);
    eprintln!(
        "server {target} (pid {pid:?}, binary {}); client runtime: {}",
        settings.bin.display(),
        match settings.client_threads {
            0 | 1 => "current_thread".to_string(),
            n => format!("multi_thread({n})"),
        }
    );
    let runtime = match settings.client_threads {
        0 | 1 => tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?,
        n => tokio::runtime::Builder::new_multi_thread()
            .worker_threads(n)
            .enable_all()
            .build()?,
    };
    let rows = runtime.block_on(async {
        let mut clients = connect(&settings, &target).await?;
        let mut rows = Vec::new();
        if settings.wants("bytestream") {
            bench_bytestream(&settings, &mut clients, server.as_ref(), &mut rows).await?;
        }
        let mut present = Vec::new();
        if settings.wants("batch") {
            present = bench_batches(&settings, &mut clients, pid, &mut rows).await?;
        }
        if settings.wants("fmb") {
            bench_find_missing(&settings, &mut clients, pid, present, &mut rows).await?;
        }
        if settings.wants("zstd") {
            compressed::bench_compressed(&settings, &mut clients, pid, &mut rows).await?;
        }
        anyhow::Ok(rows)
    })?;
    // Close the client's connection first so the server can drain at once.
    drop(runtime);
    print_table(&rows, &settings);
    drop(server);
    Ok(())
}
