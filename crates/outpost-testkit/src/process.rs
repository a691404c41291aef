//! The real `outpost` binary as a child process. It listens on
//! `127.0.0.1:0` and reports the bound addresses through `--ready-file`, so
//! there is no "find a free port, release it, start the child" race.

use std::ffi::{OsStr, OsString};
use std::io;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use tonic::transport::Channel;

use crate::client::{Clients, endpoint};

/// How long the binary may take to bind its listeners.
const START_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a stopped server may take to exit before it is killed.
const STOP_TIMEOUT: Duration = Duration::from_secs(30);

/// How to start `outpost serve`: the binary, the data directory, extra flags.
pub struct ServerCommand {
    bin: PathBuf,
    data_dir: PathBuf,
    args: Vec<OsString>,
    /// `--listen` (default `127.0.0.1:0`).
    listen: String,
    /// Where stderr goes; inherited when `None`.
    log: Option<PathBuf>,
    /// `RUST_LOG` of the child.
    rust_log: String,
}

impl ServerCommand {
    /// An extra flag (e.g. `--upstream URL`, `--metrics-listen 127.0.0.1:0`).
    pub fn arg(mut self, arg: impl AsRef<OsStr>) -> Self {
        self.args.push(arg.as_ref().to_owned());
        self
    }

    /// Extra flags.
    pub fn args(mut self, args: impl IntoIterator<Item = impl AsRef<OsStr>>) -> Self {
        self.args
            .extend(args.into_iter().map(|a| a.as_ref().to_owned()));
        self
    }

    /// Listens on `addr` instead of `127.0.0.1:0` (to restart a server on
    /// the port it had, e.g. an upstream that clients keep pointing at).
    pub fn listen(mut self, addr: SocketAddr) -> Self {
        self.listen = addr.to_string();
        self
    }

    /// Sends the child's stderr to `path` (see [`ServerProcess::log`]).
    pub fn log_file(mut self, path: &Path) -> Self {
        self.log = Some(path.to_path_buf());
        self
    }

    /// The child's `RUST_LOG` (default `warn`).
    pub fn rust_log(mut self, filter: &str) -> Self {
        self.rust_log = filter.to_string();
        self
    }

    /// Starts the child and waits until its ready file names its addresses.
    pub fn start(self) -> io::Result<ServerProcess> {
        if !self.bin.exists() {
            return Err(io::Error::new(
                io::ErrorKind::NotFound,
                format!("server binary {} not found", self.bin.display()),
            ));
        }
        let mut ready = self.data_dir.clone().into_os_string();
        ready.push(".ready");
        let ready = PathBuf::from(ready);
        match std::fs::remove_file(&ready) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
            _ => {}
        }
        let stderr = match &self.log {
            Some(path) => Stdio::from(std::fs::File::create(path)?),
            None => Stdio::inherit(),
        };
        let child = Command::new(&self.bin)
            .arg("serve")
            .args(["--listen", &self.listen, "--no-unix-socket"])
            .arg("--data-dir")
            .arg(&self.data_dir)
            .arg("--ready-file")
            .arg(&ready)
            .args(&self.args)
            .env("RUST_LOG", &self.rust_log)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr)
            .spawn()
            .map_err(|e| {
                io::Error::new(
                    e.kind(),
                    format!("cannot start {}: {e}", self.bin.display()),
                )
            })?;
        let mut server = ServerProcess {
            child,
            addr: SocketAddr::from(([127, 0, 0, 1], 0)),
            metrics: None,
            ready,
            log: self.log,
            channel: OnceLock::new(),
        };
        server.wait_ready()?;
        Ok(server)
    }
}

/// A running `outpost serve` child; stopped (SIGTERM, then SIGKILL after
/// 30 s) when dropped.
pub struct ServerProcess {
    child: Child,
    /// The gRPC address it bound.
    addr: SocketAddr,
    /// The metrics address it bound, with `--metrics-listen`.
    metrics: Option<SocketAddr>,
    /// The ready file (removed on drop).
    ready: PathBuf,
    /// Its stderr, when sent to a file.
    log: Option<PathBuf>,
    /// One channel for [`Clients`], made on first use.
    channel: OnceLock<Channel>,
}

impl ServerProcess {
    /// `bin serve` over `data_dir`, on loopback port 0, without a unix socket.
    pub fn command(bin: impl AsRef<Path>, data_dir: impl AsRef<Path>) -> ServerCommand {
        ServerCommand {
            bin: bin.as_ref().to_path_buf(),
            data_dir: data_dir.as_ref().to_path_buf(),
            args: Vec::new(),
            listen: "127.0.0.1:0".to_string(),
            log: None,
            rust_log: "warn".to_string(),
        }
    }

    /// Polls for the ready file; fails if the child exits or takes too long.
    fn wait_ready(&mut self) -> io::Result<()> {
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if let Ok(text) = std::fs::read_to_string(&self.ready) {
                return self.read_addresses(&text);
            }
            if let Some(status) = self.child.try_wait()? {
                return Err(io::Error::other(format!(
                    "outpost serve exited early ({status}): {}",
                    self.log()
                )));
            }
            if Instant::now() > deadline {
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!("outpost serve did not start within {START_TIMEOUT:?}"),
                ));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Takes `grpc=` and `metrics=` from the ready file's `key=value` lines.
    fn read_addresses(&mut self, text: &str) -> io::Result<()> {
        let parse = |value: &str| {
            value
                .parse::<SocketAddr>()
                .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, format!("{value:?}: {e}")))
        };
        let mut grpc = None;
        for (key, value) in text.lines().filter_map(|l| l.split_once('=')) {
            match key {
                "grpc" => grpc = Some(parse(value)?),
                "metrics" => self.metrics = Some(parse(value)?),
                _ => {}
            }
        }
        self.addr = grpc.ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                "the ready file has no grpc= line",
            )
        })?;
        Ok(())
    }

    /// The gRPC address it serves on.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `grpc://ADDR`.
    pub fn url(&self) -> String {
        format!("grpc://{}", self.addr)
    }

    /// The Prometheus address, when started with `--metrics-listen`.
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics
    }

    /// The child's process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The peak resident set size of the process (VmHWM), in bytes.
    pub fn peak_rss_bytes(&self) -> u64 {
        self.proc_status_bytes("VmHWM")
    }

    /// The current resident set size of the process (VmRSS), in bytes.
    pub fn rss_bytes(&self) -> u64 {
        self.proc_status_bytes("VmRSS")
    }

    /// A `kB` field of `/proc/PID/status`, in bytes.
    fn proc_status_bytes(&self, field: &str) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id()))
            .expect("read /proc/PID/status");
        let kib: u64 = status
            .lines()
            .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
            .unwrap_or_else(|| panic!("no {field} in /proc/PID/status"));
        kib * 1024
    }

    /// Whether the process is still running (it has not exited or crashed).
    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// The process's stderr so far (empty unless sent to a log file).
    pub fn log(&self) -> String {
        self.log
            .as_ref()
            .and_then(|p| std::fs::read_to_string(p).ok())
            .unwrap_or_default()
    }

    /// SIGKILLs the process and reaps it (a crash).
    pub fn kill(mut self) {
        self.child.kill().expect("SIGKILL");
        self.child.wait().expect("reap");
    }

    /// SIGTERM, then waits up to 30 s for a graceful exit, then SIGKILL.
    fn terminate(&mut self) {
        if matches!(self.child.try_wait(), Ok(Some(_))) {
            return;
        }
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let deadline = Instant::now() + STOP_TIMEOUT;
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Clients for ServerProcess {
    fn channel(&self) -> Channel {
        self.channel
            .get_or_init(|| endpoint(self.addr).connect_lazy())
            .clone()
    }
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        self.terminate();
        let _ = std::fs::remove_file(&self.ready);
    }
}
