//! Origin download throughput: `OriginFetcher::fetch` of one large random
//! blob from an HTTP server on 127.0.0.1 into a real LocalStore (with
//! `checksum.sri` verification), side by side with a plain reqwest download
//! of the same URL that throws the bytes away. The fetcher is measured on
//! both of its paths: a sha256 checksum (the digest is known, the body
//! streams straight into the store) and a sha512 one (spooled to a file
//! while hashed, then copied into the store). The ratios are the cost of
//! hashing, spooling and storing.
//!
//! Run: `cargo bench --bench asset_origin`
//! Knobs: `OUTPOST_BENCH_SIZE_MIB` (default 100), `OUTPOST_BENCH_REPS` (3),
//! `OUTPOST_BENCH_DIR` (where the stores go; default a temporary directory).

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, ensure};
use base64::Engine as _;
use bytes::Bytes;
use outpost::asset::origin::{OriginFetcher, OriginOutcome, OriginRequest};
use outpost::asset::sri::Sri;
use outpost::config::AssetConfig;
use outpost::context::RequestContext;
use outpost::digest::DigestFunction;
use outpost::stats::Stats;
use outpost::store::local::{LocalStore, LocalStoreOptions};
use outpost_testkit::Rng;
use outpost_testkit::env::env_usize;
use sha2::{Digest as _, Sha256, Sha512};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let size_mib = env_usize("OUTPOST_BENCH_SIZE_MIB", 100)?;
    let reps = env_usize("OUTPOST_BENCH_REPS", 3)?.max(1);
    let base = match std::env::var_os("OUTPOST_BENCH_DIR") {
        Some(dir) => tempfile::tempdir_in(dir)?,
        None => tempfile::tempdir()?,
    };
    let blob = Bytes::from(Rng::new(0xa55e7).bytes(size_mib << 20));
    let b64 = |hash: &[u8]| base64::engine::general_purpose::STANDARD.encode(hash);
    let sha256 = format!("sha256-{}", b64(&Sha256::digest(&blob)));
    let sha512 = format!("sha512-{}", b64(&Sha512::digest(&blob)));
    let url = serve(blob.clone()).await?;
    // The plain client needs a process-wide TLS provider (the fetcher
    // brings its own); only http is used here.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let plain = reqwest::Client::builder().no_proxy().build()?;

    println!("origin download of {size_mib} MiB from {url}, {reps} reps, median MB/s");
    let (mut plain_mbps, mut direct_mbps, mut spool_mbps) = (vec![], vec![], vec![]);
    for rep in 0..reps {
        let started = Instant::now();
        let n = plain_download(&plain, &url).await?;
        ensure!(n == blob.len() as u64, "plain download got {n} bytes");
        plain_mbps.push(mbps(n, started.elapsed()));
        let dir = base.path().join(format!("rep-{rep}"));
        direct_mbps.push(fetch(&dir.join("direct"), &url, &sha256, blob.len()).await?);
        spool_mbps.push(fetch(&dir.join("spool"), &url, &sha512, blob.len()).await?);
        std::fs::remove_dir_all(&dir)?;
        println!(
            "  rep {rep}: plain {:.0}, fetch sha256 {:.0}, fetch sha512 {:.0}",
            plain_mbps[rep], direct_mbps[rep], spool_mbps[rep]
        );
    }
    let p = median(&mut plain_mbps);
    let (d, s) = (median(&mut direct_mbps), median(&mut spool_mbps));
    println!("plain reqwest to /dev/null         : {p:>6.0} MB/s");
    println!(
        "OriginFetcher, sha256 (direct)     : {d:>6.0} MB/s  (ratio {:.2})",
        d / p
    );
    println!(
        "OriginFetcher, sha512 (spool file) : {s:>6.0} MB/s  (ratio {:.2})",
        s / p
    );
    Ok(())
}

/// One `OriginFetcher::fetch` of `url` into a new LocalStore under `dir`;
/// returns MB/s.
async fn fetch(dir: &Path, url: &str, checksum: &str, size: usize) -> anyhow::Result<f64> {
    let stats = Arc::new(Stats::default());
    let options = LocalStoreOptions {
        dir: dir.join("store"),
        quota_bytes: 4 * size as u64 + (1 << 30),
        inline_limit: 1 << 20,
        sync: false,
    };
    let store = Arc::new(LocalStore::open(options, stats.clone())?);
    let config = AssetConfig {
        origin_fetch_private: true,
        ..AssetConfig::for_tests()
    };
    let fetcher = OriginFetcher::new(config, store, stats, dir.join("spool"))?;
    let request = OriginRequest {
        uris: vec![url.to_string()],
        headers: vec![],
        checksums: Sri::parse_list(checksum)?,
        timeout: Duration::from_secs(600),
        digest_function: DigestFunction::Sha256,
    };
    let started = Instant::now();
    let outcome = fetcher
        .fetch(&RequestContext::for_instance(""), &request)
        .await?;
    let elapsed = started.elapsed();
    let OriginOutcome::Fetched { digest, .. } = outcome else {
        anyhow::bail!("the fetch failed: {outcome:?}");
    };
    ensure!(digest.size == size as u64);
    Ok(mbps(digest.size, elapsed))
}

/// Serves `blob` at `/blob` on 127.0.0.1; returns its URL.
async fn serve(blob: Bytes) -> anyhow::Result<String> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let url = format!("http://{}/blob", listener.local_addr()?);
    let app = axum::Router::new().route("/blob", axum::routing::get(move || async move { blob }));
    tokio::spawn(async move { axum::serve(listener, app).await });
    Ok(url)
}

/// Downloads `url`, discarding the bytes; returns how many arrived.
async fn plain_download(client: &reqwest::Client, url: &str) -> anyhow::Result<u64> {
    let mut response = client.get(url).send().await?.error_for_status()?;
    let mut n = 0u64;
    while let Some(chunk) = response.chunk().await.context("reading the body")? {
        n += std::hint::black_box(chunk).len() as u64;
    }
    Ok(n)
}

fn mbps(bytes: u64, elapsed: Duration) -> f64 {
    bytes as f64 / 1e6 / elapsed.as_secs_f64()
}

fn median(values: &mut [f64]) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}
