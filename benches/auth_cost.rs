//! The cost of authentication per call: FindMissingBlobs calls/s over N
//! concurrent clients against an in-process server, with no authentication,
//! with a bearer token, and with HTTP basic against htpasswd (bcrypt, served
//! from the verification cache after the first call), side by side in one
//! run, with each variant's ratio to the first.
//!
//! Each variant gets its own server (temporary store, loopback TCP,
//! `require_on_loopback = true` when credentials are on, so every call is
//! checked); the clients share one runtime with it, so the figure is the
//! whole machine's cost per call. Each call asks about 10 digests, half of
//! them stored.
//!
//! TLS: the variants below are plain TCP. After the listener-TLS branch is
//! merged, add variants that set `config.tls` (rcgen certificates in the
//! temporary directory) and connect the clients with the test CA: see the
//! `// TLS:` mark in `variants()`.
//!
//! Run: `cargo bench --bench auth_cost`
//! Knobs: `OUTPOST_BENCH_CLIENTS` (default 16), `OUTPOST_BENCH_SECONDS`
//! per variant (default 5).

use std::path::Path;
use std::time::{Duration, Instant};

use base64::Engine as _;
use bazel_remote_apis::build::bazel::remote::execution::v2::{
    BatchUpdateBlobsRequest, FindMissingBlobsRequest, batch_update_blobs_request,
    content_addressable_storage_client::ContentAddressableStorageClient,
};
use outpost::auth::Role;
use outpost::config::Config;
use outpost::server::RunningServer;
use outpost_testkit::env::env_usize;
use outpost_testkit::{blob, digest};
use tonic::metadata::MetadataValue;

/// Calls per client before measuring (connections, the bcrypt cache).
const WARMUP_CALLS: usize = 20;

/// One way of running the server and of calling it.
struct Variant {
    name: &'static str,
    /// The `authorization` header the clients send, if any.
    authorization: Option<String>,
    /// Adjusts the server's configuration (files go in the directory given).
    configure: Box<dyn Fn(&mut Config, &Path)>,
}

fn variants(dir: &Path) -> anyhow::Result<Vec<Variant>> {
    let tokens = dir.join("tokens");
    let token = outpost::cli::token::add(&tokens, "bench", Role::Write, false)?;
    let htpasswd = dir.join("htpasswd");
    // bcrypt's default cost, as `htpasswd -B` writes it (5) is cheaper; the
    // cache makes the cost irrelevant after the first call anyway.
    std::fs::write(
        &htpasswd,
        format!(
            "bench:{}\n",
            bcrypt::hash("password", bcrypt::DEFAULT_COST)?
        ),
    )?;
    let basic = base64::engine::general_purpose::STANDARD.encode("bench:password");
    Ok(vec![
        Variant {
            name: "no auth",
            authorization: None,
            configure: Box::new(|_, _| {}),
        },
        Variant {
            name: "bearer token",
            authorization: Some(format!("Bearer {token}")),
            configure: Box::new(move |c, _| {
                c.auth.tokens_file = Some(tokens.clone());
                c.auth.require_on_loopback = true;
            }),
        },
        Variant {
            name: "htpasswd (cached)",
            authorization: Some(format!("Basic {basic}")),
            configure: Box::new(move |c, _| {
                c.auth.htpasswd_file = Some(htpasswd.clone());
                c.auth.htpasswd_roles.role = Role::Write;
                c.auth.require_on_loopback = true;
            }),
        },
        // TLS: "TLS, no auth" and "TLS + bearer token" go here once
        // `config.tls` is served (set c.tls = Some(ServerTls { .. }) with
        // rcgen files written to the directory, and connect over https).
    ])
}

fn main() -> anyhow::Result<()> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?
        .block_on(run())
}

async fn run() -> anyhow::Result<()> {
    let clients = env_usize("OUTPOST_BENCH_CLIENTS", 16)?.max(1);
    let seconds = env_usize("OUTPOST_BENCH_SECONDS", 5)?.max(1) as u64;
    let dir = tempfile::tempdir()?;
    println!(
        "FindMissingBlobs (10 digests) calls/s, {clients} concurrent clients, {seconds} s per variant"
    );
    let mut baseline = None;
    for variant in variants(dir.path())? {
        let rate = measure(&variant, dir.path(), clients, Duration::from_secs(seconds)).await?;
        let base = *baseline.get_or_insert(rate);
        println!(
            "{:<20} {:>9.0} calls/s  {:>5.2}x of no auth  ({:.1} µs per call)",
            variant.name,
            rate,
            rate / base,
            1e6 / rate
        );
    }
    Ok(())
}

/// Calls per second of `variant` over `clients` concurrent callers.
async fn measure(
    variant: &Variant,
    dir: &Path,
    clients: usize,
    duration: Duration,
) -> anyhow::Result<f64> {
    let data = tempfile::tempdir_in(dir)?;
    let mut config = Config::for_tests(data.path());
    (variant.configure)(&mut config, dir);
    let server = RunningServer::start(&config).await?;
    let channel = outpost::client::connect(&format!("grpc://{}", server.addr)).await?;
    let header: Option<MetadataValue<_>> = variant
        .authorization
        .as_deref()
        .map(str::parse)
        .transpose()?;
    let cas = ContentAddressableStorageClient::with_interceptor(
        channel,
        move |mut request: tonic::Request<()>| {
            if let Some(value) = &header {
                request
                    .metadata_mut()
                    .insert("authorization", value.clone());
            }
            Ok(request)
        },
    );
    let blobs: Vec<Vec<u8>> = (0..10).map(|i| blob(i, 100)).collect();
    // Half of the digests asked about are stored (by the same client).
    let upload = BatchUpdateBlobsRequest {
        requests: blobs[..5]
            .iter()
            .map(|b| batch_update_blobs_request::Request {
                digest: Some(digest(b)),
                data: b.clone().into(),
                ..Default::default()
            })
            .collect(),
        ..Default::default()
    };
    let stored = cas.clone().batch_update_blobs(upload).await?.into_inner();
    anyhow::ensure!(
        stored
            .responses
            .iter()
            .all(|r| r.status.as_ref().is_none_or(|s| s.code == 0))
    );
    let request = FindMissingBlobsRequest {
        blob_digests: blobs.iter().map(|b| digest(b)).collect(),
        ..Default::default()
    };
    let mut tasks = Vec::new();
    let deadline = Instant::now() + duration;
    for _ in 0..clients {
        let mut cas = cas.clone();
        let request = request.clone();
        tasks.push(tokio::spawn(async move {
            for _ in 0..WARMUP_CALLS {
                cas.find_missing_blobs(request.clone()).await?;
            }
            let start = Instant::now();
            let mut calls = 0u64;
            while Instant::now() < deadline {
                cas.find_missing_blobs(request.clone()).await?;
                calls += 1;
            }
            anyhow::Ok((calls, start.elapsed()))
        }));
    }
    let mut rate = 0.0;
    for task in tasks {
        let (calls, elapsed) = task.await??;
        rate += calls as f64 / elapsed.as_secs_f64();
    }
    server.stop().await?;
    Ok(rate)
}
