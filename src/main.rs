//! The `outpost` binary: flags, logging, config, then the server or a client
//! command (those live in `outpost::cli`).

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};
use outpost::cli::human_bytes;
use outpost::config::{ByteSize, Config, FileConfig, Overrides};
use outpost::server::RunningServer;
use tracing_subscriber::EnvFilter;

/// Outpost: a local REAPI v2 cache that makes remote builds fast on slow links.
#[derive(Parser)]
#[command(name = "outpost", version, after_long_help = EXAMPLES)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

const EXAMPLES: &str = "\
Examples:
  outpost serve                              # 127.0.0.1:8980, data in ~/.cache/outpost, 10 GiB
  outpost serve --quota 50GiB --data-dir /srv/outpost
  outpost serve --config /etc/outpost.toml   # see config.example.toml for every key
  outpost serve --upstream grpcs://remote.example.com:443   # cache in front of a cluster
  bazel build --remote_cache=grpc://127.0.0.1:8980 //...
  bazel build --remote_executor=grpc://127.0.0.1:8980 //...   # with an executing --upstream
  outpost stats
  outpost verify --data-dir /srv/outpost --repair   # offline: hash every blob, remove corrupt ones
  outpost token add ci --role execute --write-ac --tokens-file /etc/outpost/tokens

Logging: set RUST_LOG (e.g. RUST_LOG=debug or RUST_LOG=outpost=trace); default info.";

#[derive(Subcommand)]
enum Command {
    /// Run the server: a local REAPI cache, or with --upstream a caching proxy
    /// (and execution passthrough) in front of a remote cluster.
    ///
    /// Listens on loopback TCP and on a unix socket in the data directory.
    /// Stops gracefully on Ctrl-C or SIGTERM: in-flight calls finish and the
    /// store is flushed.
    Serve(ServeArgs),
    /// Print counters and occupancy of a running server.
    Stats(StatsArgs),
    /// Check a stopped server's store: hash every blob, decode every action
    /// result and asset entry, report what is corrupt.
    ///
    /// Offline: stop the server first (it refuses a store in use). A running
    /// server already verifies every blob file it reads and, after an unclean
    /// stop, the files written last; this checks everything, e.g. after a
    /// disk error or a power loss with `fsync = false`. Prints progress,
    /// counts, bytes, throughput and each corrupt entry. With --repair,
    /// removes corrupt entries (and the asset entries that name them) and
    /// files no entry names; action results that name a removed blob are
    /// dropped at their next lookup. Exit status 1 while corrupt entries
    /// remain, 0 otherwise.
    Verify(VerifyArgs),
    /// Manage the bearer tokens file ([auth] tokens_file): add, list, revoke.
    ///
    /// The file holds only SHA-256 hashes; `add` prints the new token once,
    /// as the last line of its output. A running server re-reads the file
    /// within seconds (or on SIGHUP).
    Token(TokenArgs),
    /// Check this machine's setup for `serve` and explain what is wrong.
    ///
    /// Takes the same flags and config file as `serve`, and checks, one
    /// verdict per line with what to do: the data directory (free space
    /// against the quota, permissions, filesystem), the listener (loopback or
    /// not, TLS and credentials, whether an Outpost already answers there),
    /// and the upstream (DNS, connect, TLS, Capabilities, API versions,
    /// digest functions, batch limit, round-trip time, a short throughput
    /// probe, clock skew). Exit status 1 when something is broken.
    Doctor(DoctorArgs),
}

#[derive(Args)]
struct DoctorArgs {
    #[command(flatten)]
    config: ConfigArgs,
    /// Only print the `.bazelrc` lines for this setup (no checks).
    #[arg(long)]
    bazelrc: bool,
}

#[derive(Args)]
struct TokenArgs {
    #[command(subcommand)]
    action: TokenAction,
    /// Tokens file [default: [auth] tokens_file of --config].
    #[arg(long, value_name = "FILE", global = true)]
    tokens_file: Option<PathBuf>,
    /// TOML config file, for its [auth] tokens_file.
    #[arg(long, value_name = "FILE", env = "OUTPOST_CONFIG", global = true)]
    config: Option<PathBuf>,
}

#[derive(Subcommand)]
enum TokenAction {
    /// Create a credential NAME with a new random token and print the token
    /// (once: only its hash is stored).
    Add {
        /// The credential's name, shown in logs and metrics.
        name: String,
        /// read, write or execute.
        #[arg(long)]
        role: outpost::auth::Role,
        /// May also write action results (UpdateActionResult), which every
        /// other build trusts: for CI.
        #[arg(long)]
        write_ac: bool,
    },
    /// List the credentials (names and roles; tokens are never stored).
    List,
    /// Remove the credential NAME: its token stops working within seconds.
    Revoke {
        /// The credential's name.
        name: String,
    },
}

#[derive(Args)]
struct VerifyArgs {
    /// Data directory [default: the config file's, else $XDG_CACHE_HOME/outpost
    /// or ~/.cache/outpost].
    #[arg(long, value_name = "DIR")]
    data_dir: Option<PathBuf>,
    /// TOML config file, for its data directory.
    #[arg(long, value_name = "FILE", env = "OUTPOST_CONFIG")]
    config: Option<PathBuf>,
    /// Remove what is corrupt (and stray files) instead of only reporting it.
    #[arg(long)]
    repair: bool,
}

#[derive(Args)]
struct ServeArgs {
    #[command(flatten)]
    config: ConfigArgs,
    /// Once every listener is bound, write their addresses to FILE (atomically)
    /// as `grpc=ADDR`, `metrics=ADDR`, `unix=PATH` lines: with `--listen
    /// 127.0.0.1:0` a parent process learns the port without racing for it.
    #[arg(long, value_name = "FILE")]
    ready_file: Option<PathBuf>,
}

/// The flags `serve` and `doctor` share: the config file and what overrides it.
#[derive(Args)]
struct ConfigArgs {
    /// TOML config file (every key is documented in config.example.toml).
    #[arg(long, value_name = "FILE", env = "OUTPOST_CONFIG")]
    config: Option<PathBuf>,
    /// TCP address to listen on [default: 127.0.0.1:8980]. It speaks TLS
    /// (clients use grpcs://) when the config file sets [server] tls_cert and
    /// tls_key, mutual TLS with client_ca; the unix socket stays plaintext.
    #[arg(long, value_name = "ADDR")]
    listen: Option<std::net::SocketAddr>,
    /// Allow a --listen address other than loopback without TLS and
    /// credentials (anyone who can reach it may read and write the cache).
    #[arg(long)]
    allow_remote: bool,
    /// Data directory [default: $XDG_CACHE_HOME/outpost or ~/.cache/outpost].
    #[arg(long, value_name = "DIR")]
    data_dir: Option<PathBuf>,
    /// Byte quota of the local store, e.g. 500MiB, 10GiB [default: 10GiB].
    #[arg(long, value_name = "SIZE")]
    quota: Option<ByteSize>,
    /// Unix socket path [default: <data-dir>/outpost.sock].
    #[arg(long, value_name = "PATH", conflicts_with = "no_unix_socket")]
    unix_socket: Option<PathBuf>,
    /// Do not listen on a unix socket.
    #[arg(long)]
    no_unix_socket: bool,
    /// Proxy this upstream REAPI server: grpc://HOST:PORT or grpcs://HOST:PORT
    /// (TLS, headers and more in the config file's [upstream] section).
    #[arg(long, value_name = "URL")]
    upstream: Option<String>,
    /// Serve Prometheus metrics at http://ADDR/metrics (e.g. 127.0.0.1:9980);
    /// https:// with the listener's TLS settings when [server] tls_cert is set.
    #[arg(long, value_name = "ADDR")]
    metrics_listen: Option<std::net::SocketAddr>,
}

impl ConfigArgs {
    /// The config file merged with the flags, as `serve` runs with it.
    fn resolve(self) -> anyhow::Result<Config> {
        let file = match &self.config {
            Some(path) => FileConfig::load(path)?,
            None => FileConfig::default(),
        };
        let flags = Overrides {
            listen: self.listen,
            allow_remote: self.allow_remote,
            unix_socket: self.unix_socket,
            no_unix_socket: self.no_unix_socket,
            data_dir: self.data_dir,
            quota: self.quota,
            upstream: self.upstream,
            metrics_listen: self.metrics_listen,
        };
        Config::resolve(file, flags)
    }
}

#[derive(Args)]
struct StatsArgs {
    /// Server to ask: grpc://HOST:PORT or unix:///PATH.
    #[arg(long, value_name = "URL", default_value = "grpc://127.0.0.1:8980")]
    server: String,
    /// Bearer token, for a server that asks this client for credentials
    /// (prefer the variable: a flag shows in `ps`).
    #[arg(
        long,
        value_name = "TOKEN",
        env = "OUTPOST_TOKEN",
        hide_env_values = true
    )]
    token: Option<String>,
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let runtime = tokio::runtime::Runtime::new()?;
    match cli.command {
        Command::Serve(args) => runtime.block_on(serve(args)),
        Command::Stats(args) => runtime.block_on(outpost::cli::stats::run(
            &args.server,
            args.token.as_deref(),
        )),
        Command::Verify(args) => verify(args),
        Command::Token(args) => token(args),
        Command::Doctor(args) => {
            let options = outpost::cli::doctor::DoctorOptions {
                bazelrc: args.bazelrc,
                config_file: args.config.config.clone(),
            };
            // A configuration that does not resolve is doctor's finding, not a crash.
            let healthy = match args.config.resolve() {
                Ok(config) => runtime.block_on(outpost::cli::doctor::run(&config, &options))?,
                Err(e) => outpost::cli::doctor::config_failed(&e, &options),
            };
            if !healthy {
                std::process::exit(1);
            }
            Ok(())
        }
    }
}

fn token(args: TokenArgs) -> anyhow::Result<()> {
    use outpost::cli::token;
    let path = match (args.tokens_file, &args.config) {
        (Some(path), _) => path,
        (None, Some(config)) => FileConfig::load(config)?
            .auth
            .tokens_file
            .ok_or_else(|| anyhow::anyhow!("{} sets no [auth] tokens_file", config.display()))?,
        (None, None) => anyhow::bail!("which tokens file? pass --tokens-file or --config"),
    };
    match args.action {
        TokenAction::Add {
            name,
            role,
            write_ac,
        } => token::run_add(&path, &name, role, write_ac),
        TokenAction::List => token::run_list(&path),
        TokenAction::Revoke { name } => token::run_revoke(&path, &name),
    }
}

fn verify(args: VerifyArgs) -> anyhow::Result<()> {
    let file = match &args.config {
        Some(path) => FileConfig::load(path)?,
        None => FileConfig::default(),
    };
    let flags = Overrides {
        data_dir: args.data_dir,
        ..Overrides::default()
    };
    let config = Config::resolve(file, flags)?;
    if outpost::cli::verify::run(&config.data_dir, args.repair)? {
        std::process::exit(1);
    }
    Ok(())
}

async fn serve(args: ServeArgs) -> anyhow::Result<()> {
    let config = args.config.resolve()?;
    tracing::info!(
        "outpost {} starting: data in {}, quota {}",
        env!("CARGO_PKG_VERSION"),
        config.data_dir.display(),
        human_bytes(config.quota_bytes)
    );
    // SIGHUP asks for a reload (systemd's ExecReload); it must never kill us.
    outpost::reload::handle_sighup();
    let server = RunningServer::start(&config).await?;
    if let Some(path) = &args.ready_file {
        server.write_ready_file(path)?;
    }
    server.run_until(shutdown_signal()).await?;
    tracing::info!("stopped");
    Ok(())
}

/// Completes on Ctrl-C or SIGTERM.
async fn shutdown_signal() {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .expect("can install a SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}
