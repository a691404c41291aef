//! The cost of authentication per call: FindMissingBlobs calls/s over N
//! concurrent clients against an in-process server, with no authentication,
//! with a bearer token, and with HTTP basic against htpasswd (bcrypt, served
//! from the verification cache after the first call), side by side in one
//! run, with each variant's ratio to the first.
//!
//! Each variant gets its own server (temporary store, loopback TCP,
//! `require_on_loopback = true` when credentials are on, so every call is
//! checked); the clients share one runtime with them, so the figure is the
//! whole machine's cost per call. Each call asks about 10 digests, half of
//! them stored. The variants take turns, one short round each, and each
//! reports its median round: on a shared machine, load that comes and goes
//! then hits every variant alike.
//!
//! The last two variants serve TLS (`config.tls`, a test CA's certificate
//! in the temporary directory) and connect the clients over https trusting
//! that CA: the cost of TLS alone, then of TLS with a bearer token, the
//! setup a branch office runs.
//!
//! Run: `cargo bench --bench auth_cost`
//! Knobs: `OUTPOST_BENCH_CLIENTS` (default 16), `OUTPOST_BENCH_ROUNDS`
//! (default 7), `OUTPOST_BENCH_SECONDS` per round (default 1).

use std::path::Path;
use std::time::Duration;

use base64::Engine as _;
use bazel_remote_apis::build::bazel::remote::execution::v2::{
    BatchUpdateBlobsRequest, FindMissingBlobsRequest, batch_update_blobs_request,
    content_addressable_storage_client::ContentAddressableStorageClient,
};
use outpost::auth::Role;
use outpost::config::{Config, ServerTls};
use outpost::server::RunningServer;
use outpost_testkit::env::env_usize;
use outpost_testkit::load::find_missing_rate;
use outpost_testkit::pki::TestCa;
use outpost_testkit::{blob, digest};
use tonic::metadata::MetadataValue;
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint};

/// Calls before measuring (connections, the bcrypt cache).
const WARMUP_CALLS: usize = 20;

/// One way of running the server and of calling it.
struct Variant {
    name: &'static str,
    /// The `authorization` header the clients send, if any.
    authorization: Option<String>,
    /// Adjusts the server's configuration.
    configure: Box<dyn Fn(&mut Config)>,
    /// The CA certificate (PEM) the clients trust when the server speaks TLS.
    tls_ca: Option<String>,
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
    let ca = TestCa::new("auth-cost CA");
    let (cert, key) = ca.server().write(dir, "server");
    let tls = ServerTls {
        cert,
        key,
        client_ca: None,
    };
    let tls_tokens = tokens.clone();
    let tls_plain = tls.clone();
    Ok(vec![
        Variant {
            name: "no auth",
            authorization: None,
            configure: Box::new(|_| {}),
            tls_ca: None,
        },
        Variant {
            name: "bearer token",
            authorization: Some(format!("Bearer {token}")),
            configure: Box::new(move |c| {
                c.auth.tokens_file = Some(tokens.clone());
                c.auth.require_on_loopback = true;
            }),
            tls_ca: None,
        },
        Variant {
            name: "htpasswd (cached)",
            authorization: Some(format!("Basic {basic}")),
            configure: Box::new(move |c| {
                c.auth.htpasswd_file = Some(htpasswd.clone());
                c.auth.htpasswd_roles.role = Role::Write;
                c.auth.require_on_loopback = true;
            }),
            tls_ca: None,
        },
        Variant {
            name: "TLS, no auth",
            authorization: None,
            configure: Box::new(move |c| c.tls = Some(tls_plain.clone())),
            tls_ca: Some(ca.cert.clone()),
        },
        Variant {
            name: "TLS + bearer token",
            authorization: Some(format!("Bearer {token}")),
            configure: Box::new(move |c| {
                c.tls = Some(tls.clone());
                c.auth.tokens_file = Some(tls_tokens.clone());
                c.auth.require_on_loopback = true;
            }),
            tls_ca: Some(ca.cert.clone()),
        },
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
    let rounds = env_usize("OUTPOST_BENCH_ROUNDS", 7)?.max(1);
    let seconds = env_usize("OUTPOST_BENCH_SECONDS", 1)?.max(1) as u64;
    let dir = tempfile::tempdir()?;
    println!(
        "FindMissingBlobs (10 digests) calls/s, {clients} concurrent clients; \
         median of {rounds} rounds of {seconds} s, variants taking turns"
    );
    let mut setups = Vec::new();
    for variant in variants(dir.path())? {
        setups.push(Setup::start(variant, dir.path()).await?);
    }
    let mut rates: Vec<Vec<f64>> = vec![Vec::new(); setups.len()];
    for _ in 0..rounds {
        for (setup, rates) in setups.iter().zip(&mut rates) {
            rates.push(setup.round(clients, Duration::from_secs(seconds)).await?);
        }
    }
    let mut baseline = None;
    for (setup, mut rates) in setups.into_iter().zip(rates) {
        rates.sort_by(f64::total_cmp);
        let median = rates[rates.len() / 2];
        let base = *baseline.get_or_insert(median);
        println!(
            "{:<20} {:>9.0} calls/s  {:>5.2}x of no auth  ({:.1} µs per call; rounds {:.0}..{:.0})",
            setup.name,
            median,
            median / base,
            1e6 / median,
            rates[0],
            rates[rates.len() - 1]
        );
        setup.server.stop().await?;
    }
    Ok(())
}

/// Adds the variant's `authorization` header to every call.
#[derive(Clone)]
struct Header(Option<MetadataValue<tonic::metadata::Ascii>>);

impl tonic::service::Interceptor for Header {
    fn call(
        &mut self,
        mut request: tonic::Request<()>,
    ) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(value) = &self.0 {
            request
                .metadata_mut()
                .insert("authorization", value.clone());
        }
        Ok(request)
    }
}

/// The CAS client of one variant.
type Cas = ContentAddressableStorageClient<
    tonic::service::interceptor::InterceptedService<tonic::transport::Channel, Header>,
>;

/// A running server of one variant, its client and the request it repeats.
struct Setup {
    name: &'static str,
    server: RunningServer,
    cas: Cas,
    request: FindMissingBlobsRequest,
    /// Owns the store's directory.
    _data: tempfile::TempDir,
}

impl Setup {
    async fn start(variant: Variant, dir: &Path) -> anyhow::Result<Self> {
        let data = tempfile::tempdir_in(dir)?;
        let mut config = Config::for_tests(data.path());
        (variant.configure)(&mut config);
        let server = RunningServer::start(&config).await?;
        let channel = match &variant.tls_ca {
            None => outpost::client::connect(&format!("grpc://{}", server.addr)).await?,
            Some(ca) => {
                let tls = ClientTlsConfig::new()
                    .ca_certificate(Certificate::from_pem(ca))
                    .domain_name("localhost");
                Endpoint::from_shared(format!("https://{}", server.addr))?
                    .tls_config(tls)?
                    .connect()
                    .await?
            }
        };
        let header: Option<MetadataValue<_>> = variant
            .authorization
            .as_deref()
            .map(str::parse)
            .transpose()?;
        let mut cas: Cas =
            ContentAddressableStorageClient::with_interceptor(channel, Header(header));
        let blobs: Vec<Vec<u8>> = (0..10).map(|i| blob(i, 100)).collect();
        // Half of the digests asked about are stored (by the same client).
        let upload = BatchUpdateBlobsRequest {
            requests: blobs[..5]
                .iter()
                .map(|b| batch_update_blobs_request::Request {
                    digest: Some(digest(b)),
                    data: b.clone(),
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        };
        let stored = cas.batch_update_blobs(upload).await?.into_inner();
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
        for _ in 0..WARMUP_CALLS {
            cas.find_missing_blobs(request.clone()).await?;
        }
        Ok(Setup {
            name: variant.name,
            server,
            cas,
            request,
            _data: data,
        })
    }

    /// Calls per second over `clients` concurrent callers for `duration`.
    async fn round(&self, clients: usize, duration: Duration) -> anyhow::Result<f64> {
        Ok(find_missing_rate(&self.cas, &self.request, clients, duration).await?)
    }
}
