//! The `outpost` binary: flags, logging, config, then the server or a client
//! command (those live in `outpost::cli`).

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, CommandFactory, Parser, Subcommand};
use outpost::cli::human_bytes;
use outpost::config::{ByteSize, Config, FileConfig, Overrides};
use outpost::logging::{self, LogFormat};
use outpost::server::RunningServer;

/// Outpost: a local REAPI v2 cache that makes remote builds fast on slow links.
#[derive(Parser)]
#[command(name = "outpost", version, after_long_help = EXAMPLES)]
struct Cli {
    #[command(subcommand)]
    command: Command,
    /// Log lines on stderr: `text` (coloured only on a terminal) or `json`
    /// (one object per line, for log shippers).
    #[arg(
        long,
        value_enum,
        value_name = "FORMAT",
        env = "OUTPOST_LOG_FORMAT",
        default_value_t = LogFormat::Text,
        global = true
    )]
    log_format: LogFormat,
}

const EXAMPLES: &str = "\
Examples:
  outpost serve                              # 127.0.0.1:8980, data in ~/.cache/outpost, 10 GiB
  outpost serve --quota 50GiB --data-dir /srv/outpost
  outpost serve --config /etc/outpost/outpost.toml   # see config.example.toml for every key
  outpost serve --upstream grpcs://remote.example.com:443   # cache in front of a cluster
  bazel build --remote_cache=grpc://127.0.0.1:8980 //...
  bazel build --remote_executor=grpc://127.0.0.1:8980 //...   # with an executing --upstream
  outpost serve --metrics-listen 127.0.0.1:9980   # status page at http://127.0.0.1:9980/
  outpost doctor --upstream grpcs://remote.example.com:443   # check the setup, explain what is wrong
  outpost doctor --bazelrc                   # the .bazelrc lines for this setup
  outpost stats
  outpost verify --data-dir /srv/outpost --repair   # offline: hash every blob, remove corrupt ones
  outpost token add ci --role execute --write-ac --tokens-file /etc/outpost/tokens

Logging: set RUST_LOG (e.g. RUST_LOG=debug or RUST_LOG=outpost=trace); default info.
--log-format json (or OUTPOST_LOG_FORMAT=json) writes one JSON object per line.
Exit status: 0 ok, 1 failure, 2 bad flags or config file (doctor: 1, with the
reason as its FAIL line).";

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
    /// Write the man pages and shell completions (for packaging).
    #[command(hide = true)]
    Generate(GenerateArgs),
}

#[derive(Args)]
struct GenerateArgs {
    /// Write `outpost.1` and one page per subcommand (`outpost-serve.1`, ...) here.
    #[arg(long, value_name = "DIR")]
    man: Option<PathBuf>,
    /// Write bash (`outpost.bash`), zsh (`_outpost`) and fish (`outpost.fish`)
    /// completions here.
    #[arg(long, value_name = "DIR")]
    completions: Option<PathBuf>,
}

#[derive(Args)]
struct DoctorArgs {
    #[command(flatten)]
    config: ConfigArgs,
    /// Only print the `.bazelrc` lines for this setup (no checks).
    #[arg(long)]
    bazelrc: bool,
    /// Skip the upstream throughput probe, which writes one random 4 MiB
    /// blob to the upstream's CAS and reads it back.
    #[arg(long)]
    no_write: bool,
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
    /// Serve the status page at http://ADDR/ (e.g. 127.0.0.1:9980), its
    /// figures as JSON at /status and Prometheus metrics at /metrics;
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

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(error) => return usage_error(&error),
    };
    logging::init(cli.log_format);
    match run(cli.command) {
        Ok(code) => code,
        Err(failure) => {
            let mut message = logging::one_line(&failure.error);
            if failure.exit_code == CONFIG_ERROR {
                message.push_str(" (see `outpost help`; config.example.toml documents every key)");
            }
            logging::fatal(cli.log_format, &message, failure.exit_code);
            ExitCode::from(failure.exit_code)
        }
    }
}

/// Why the process stops early: exit status 2 for a config error (bad file,
/// unknown key, bad flag combination: fix the setup), 1 for anything else.
struct Failure {
    error: anyhow::Error,
    exit_code: u8,
}

impl From<anyhow::Error> for Failure {
    fn from(error: anyhow::Error) -> Self {
        Failure {
            error,
            exit_code: 1,
        }
    }
}

impl From<std::io::Error> for Failure {
    fn from(error: std::io::Error) -> Self {
        anyhow::Error::from(error).into()
    }
}

/// The exit status of a config error.
const CONFIG_ERROR: u8 = 2;

/// A config error: exit status 2, and the message says where to look keys up.
fn config_error(error: anyhow::Error) -> Failure {
    Failure {
        error,
        exit_code: CONFIG_ERROR,
    }
}

/// Help and version as clap prints them; any other command-line error as
/// one `outpost: error:` line, exit status 2.
fn usage_error(error: &clap::Error) -> ExitCode {
    use clap::error::ErrorKind;
    if matches!(
        error.kind(),
        ErrorKind::DisplayHelp
            | ErrorKind::DisplayVersion
            | ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand
    ) {
        error.exit();
    }
    let text = error.render().to_string();
    let first = text.lines().next().unwrap_or_default();
    let message = first.strip_prefix("error: ").unwrap_or(first);
    eprintln!("outpost: error: {message} (see `outpost help`)");
    ExitCode::from(CONFIG_ERROR)
}

fn run(command: Command) -> Result<ExitCode, Failure> {
    let runtime = tokio::runtime::Runtime::new()?;
    match command {
        Command::Serve(args) => {
            let config = args.config.resolve().map_err(config_error)?;
            runtime.block_on(serve(config, args.ready_file))?;
        }
        Command::Stats(args) => runtime.block_on(outpost::cli::stats::run(
            &args.server,
            args.token.as_deref(),
        ))?,
        Command::Verify(args) => return verify(args),
        Command::Token(args) => token(args)?,
        Command::Doctor(args) => {
            let options = outpost::cli::doctor::DoctorOptions {
                bazelrc: args.bazelrc,
                no_write: args.no_write,
                config_file: args.config.config.clone(),
            };
            // A configuration that does not resolve is doctor's finding, not a crash.
            let healthy = match args.config.resolve() {
                Ok(config) => runtime.block_on(outpost::cli::doctor::run(&config, &options))?,
                Err(e) => outpost::cli::doctor::config_failed(&e, &options),
            };
            if !healthy {
                return Ok(ExitCode::FAILURE);
            }
        }
        Command::Generate(args) => {
            if let Some(dir) = &args.man {
                outpost::cli::generate::man_pages(Cli::command(), dir)?;
            }
            if let Some(dir) = &args.completions {
                outpost::cli::generate::completions(Cli::command(), dir)?;
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn token(args: TokenArgs) -> Result<(), Failure> {
    use outpost::cli::token;
    let path = match (args.tokens_file, &args.config) {
        (Some(path), _) => path,
        (None, Some(config)) => FileConfig::load(config)
            .map_err(config_error)?
            .auth
            .tokens_file
            .ok_or_else(|| {
                config_error(anyhow::anyhow!(
                    "{} sets no [auth] tokens_file",
                    config.display()
                ))
            })?,
        (None, None) => {
            return Err(config_error(anyhow::anyhow!(
                "which tokens file? pass --tokens-file or --config"
            )));
        }
    };
    match args.action {
        TokenAction::Add {
            name,
            role,
            write_ac,
        } => token::run_add(&path, &name, role, write_ac)?,
        TokenAction::List => token::run_list(&path)?,
        TokenAction::Revoke { name } => token::run_revoke(&path, &name)?,
    }
    Ok(())
}

fn verify(args: VerifyArgs) -> Result<ExitCode, Failure> {
    let file = match &args.config {
        Some(path) => FileConfig::load(path).map_err(config_error)?,
        None => FileConfig::default(),
    };
    let flags = Overrides {
        data_dir: args.data_dir,
        ..Overrides::default()
    };
    let config = Config::resolve(file, flags).map_err(config_error)?;
    if outpost::cli::verify::run(&config.data_dir, args.repair)? {
        return Ok(ExitCode::FAILURE);
    }
    Ok(ExitCode::SUCCESS)
}

async fn serve(config: Config, ready_file: Option<PathBuf>) -> anyhow::Result<()> {
    tracing::info!(
        "outpost {} starting: data in {}, quota {}",
        env!("CARGO_PKG_VERSION"),
        config.data_dir.display(),
        human_bytes(config.quota_bytes)
    );
    // SIGHUP asks for a reload (systemd's ExecReload); it must never kill us.
    outpost::reload::handle_sighup();
    let server = RunningServer::start(&config).await?;
    if let Some(path) = &ready_file {
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
