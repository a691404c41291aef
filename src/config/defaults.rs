//! Every built-in default, in one place, so `config.example.toml`, the flag
//! help and the code can be checked against one list.

use std::time::Duration;

use super::prefetch::PrefetchMode;

/// TCP listen address: loopback only.
pub const LISTEN: &str = "127.0.0.1:8980";
/// Byte quota of the local store.
pub const QUOTA: u64 = 10 << 30;
/// Size up to which blobs are stored inside RocksDB.
pub const INLINE_LIMIT: u64 = 1 << 20;
/// `max_batch_total_size_bytes` advertised to clients.
pub const MAX_BATCH: u64 = 4 << 20;
/// Whether a non-loopback listen address is accepted without `--allow-remote`.
pub const ALLOW_REMOTE: bool = false;
/// Whether every commit is fsynced.
pub const FSYNC: bool = false;
/// Whether loopback and unix-socket clients must present credentials too
/// (off: the single-workstation setup needs no configuration).
pub const REQUIRE_AUTH_ON_LOOPBACK: bool = false;
/// Calls one client may have open at once. Bazel opens at most
/// `--remote_max_connections` (100 in 4.x) connections with many calls each;
/// 512 leaves a full build room and stops a runaway loop.
pub const MAX_CALLS_PER_CLIENT: usize = 512;
/// How long a call over the per-client limit waits for a slot.
pub const LIMIT_QUEUE_TIMEOUT: Duration = Duration::from_secs(10);
/// Name of the unix socket inside the data directory.
pub const UNIX_SOCKET_NAME: &str = "outpost.sock";

/// Whether the client's own headers are forwarded upstream.
pub const FORWARD_CLIENT_HEADERS: bool = true;
/// Upstream connect timeout.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Deadline of unary upstream calls.
pub const RPC_TIMEOUT: Duration = Duration::from_secs(60);
/// Upstream calls in flight at once.
pub const MAX_CONCURRENT_CALLS: usize = 64;
/// How long a digest confirmed present upstream is trusted.
pub const EXISTENCE_TTL: Duration = Duration::from_secs(300);
/// Attempts per upstream call on UNAVAILABLE.
pub const MAX_ATTEMPTS: u32 = 4;

/// Whether finished actions' outputs are prefetched (with an upstream).
pub const PREFETCH_ENABLED: bool = true;
/// Blobs larger than this are left for the client to pull.
pub const PREFETCH_MAX_BLOB_SIZE: u64 = 1 << 30;
/// Bytes being prefetched at once, across all actions.
pub const PREFETCH_MAX_BYTES_IN_FLIGHT: u64 = 256 << 20;
/// Blob fetches at once per action.
pub const PREFETCH_PARALLEL_FETCHES: usize = 16;
/// Finished actions waiting for prefetch.
pub const PREFETCH_QUEUE_DEPTH: usize = 1000;
/// What prefetch fetches: adaptive, so a client that builds without the
/// bytes (Bazel's `--remote_download_minimal`/`toplevel`) does not pay for
/// outputs it never reads (issue 14: 4.7x direct WAN bytes with `always`).
pub const PREFETCH_MODE: PrefetchMode = PrefetchMode::Adaptive;
/// Adaptive, while an invocation is learning: files up to this size are
/// prefetched. 16 KiB is ~6% of one round trip's worth of the reference WAN
/// (40 ms x 50 Mbit/s = 250 KB): for such a file the read time is all round
/// trip, so a reading client gains a round trip per file, while a client
/// that reads nothing loses at most `PREFETCH_LEARNING_ACTIONS` actions'
/// small files (a few KiB to a few hundred KiB per build, well inside the
/// issue's 1.1x-direct WAN byte budget).
pub const PREFETCH_SMALL_OUTPUT_SIZE: u64 = 16 << 10;
/// Adaptive: finished actions with no client read before an invocation is
/// judged by its read ratio (so judged "not reading"). A reading client
/// shows itself with its first read, usually within the first wave of
/// parallel actions; 8 bounds what a non-reading one costs (see above)
/// while leaving a reading client that reads late (e.g. 1 s after each
/// action, as the WAN bench does) time to read before it is judged.
pub const PREFETCH_LEARNING_ACTIONS: u64 = 8;
/// Adaptive: the share of offered outputs an invocation must read to keep
/// full prefetch. A client that downloads outputs reads all of them, but
/// late: outputs offered and not read yet count against it, and a client
/// that reads each action's outputs a while after it finished (the WAN
/// bench's `everything:1000`, Bazel's parallel jobs) lags by about one wave
/// of parallel actions, so its ratio is only ~1/2 when the second wave
/// finishes (2/3 at the third, ...). Bazel's `--remote_download_toplevel`
/// reads only the last layer's outputs: ~10% in the bench's DAG, far less in
/// real builds. One quarter sits between the two with room on both sides.
pub const PREFETCH_READ_RATIO: f64 = 0.25;

/// Bound on one origin download when the Fetch request gives no `timeout`.
pub const ORIGIN_TIMEOUT: Duration = Duration::from_secs(600);
/// Largest origin download accepted (never more than the store quota).
pub const ASSET_MAX_SIZE: u64 = 4 << 30;
/// Whether loopback, private and link-local addresses may be fetched from
/// without being listed in `allow_hosts`.
pub const ORIGIN_FETCH_PRIVATE: bool = false;
// `origin_fetch` has no constant: it defaults to whether `listen` is loopback.

/// `[upstream] write_back_drain_timeout`: a graceful stop uploads the queue
/// for at most this long; what is left is uploaded after the next start.
pub const WRITE_BACK_DRAIN_TIMEOUT: Duration = Duration::from_secs(30);
/// `[upstream] compression_min_bytes`: smaller blobs cross the WAN plain
/// (a zstd frame's overhead and the CPU are not worth it below this).
pub const COMPRESSION_MIN_BYTES: u64 = 1024;
/// `[store] compression`: blobs are kept zstd-compressed at rest when that
/// saves at least 10%.
pub const STORE_COMPRESSION: bool = true;
/// `[upstream] write_back_max_bytes` when unset: this share of the quota
/// (queued blobs are pinned, so the rest stays for the cache).
pub const WRITE_BACK_QUOTA_SHARE: f64 = 0.5;
