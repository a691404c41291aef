//! Outage: Outpost proxies an upstream that is itself a real `outpost
//! serve`. Under load the upstream is killed with SIGKILL and, a while
//! later, restarted on the same port over the same data. Local hits keep
//! succeeding throughout; upstream-bound calls fail fast (p99 < 2 s); once
//! the upstream is back they succeed again, with the same proxy process.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use crate::common::*;

const LOCAL_CLIENTS: usize = 16;
const UPSTREAM_CLIENTS: usize = 8;
/// Upstream-bound calls during an outage must fail within this (p99).
const FAIL_FAST_P99: Duration = Duration::from_secs(2);
/// How long the proxy may take to notice the upstream is back.
const RECOVERY_LIMIT: Duration = Duration::from_secs(40);

/// Phases of a cycle: the upstream is up (and the proxy knows it), down, or
/// restarted but not yet seen back by the proxy. A call that spans two
/// phases counts as "down".
const UP: u8 = 0;
const DOWN: u8 = 1;
const BACK: u8 = 2;

/// What the clients share.
struct Shared {
    /// Blobs stored through the proxy (so held locally too).
    local: Vec<Vec<u8>>,
    /// An action result stored through the proxy.
    action: re::Digest,
    /// Blobs only the upstream holds, and whether the proxy fetched each.
    remote: Vec<(Vec<u8>, AtomicBool)>,
    phase: AtomicU8,
    stop: AtomicBool,
    fresh: AtomicU64,
    figures: Figures,
    failures: Failures,
}

impl Shared {
    /// Records a call; a local call must always succeed, an upstream-bound
    /// one whenever the upstream was up for all of it.
    fn record(&self, local: bool, began: u8, started: Instant, result: Result<(), String>) {
        let ended = self.phase.load(Ordering::SeqCst);
        let phase = if began == ended { began } else { DOWN };
        let kind = match (local, phase) {
            (true, UP) => "local hit, upstream up",
            (true, DOWN) => "local hit, upstream down",
            (true, _) => "local hit, upstream back",
            (false, UP) => "upstream-bound, up",
            (false, DOWN) => "upstream-bound, down",
            (false, _) => "upstream-bound, back",
        };
        let error = result.is_err();
        if let Err(why) = result
            && (local || phase == UP)
        {
            self.failures.add(format!("{kind}: {why}"));
        }
        self.figures.record(kind, started.elapsed(), false, error);
    }
}

async fn local_client(channel: tonic::transport::Channel, s: Arc<Shared>, seed: u64) {
    let (mut bs, mut cas, mut ac) = (channel.bytestream(), channel.cas(), channel.action_cache());
    let mut rng = Rng::new(seed);
    while !s.stop.load(Ordering::SeqCst) {
        let data = &s.local[rng.below(s.local.len())];
        let d = digest(data);
        let began = s.phase.load(Ordering::SeqCst);
        let started = Instant::now();
        let result = match rng.below(4) {
            0 => match read_verified(&mut bs, &d, data, 0, 0).await {
                Read::Exact => Ok(()),
                other => Err(format!("ByteStream.Read: {other:?}")),
            },
            1 if data.len() < 1 << 20 => {
                let request = re::BatchReadBlobsRequest {
                    digests: vec![d],
                    ..Default::default()
                };
                match cas.batch_read_blobs(request).await {
                    Ok(r)
                        if r.get_ref()
                            .responses
                            .first()
                            .is_some_and(|e| e.data == *data) =>
                    {
                        Ok(())
                    }
                    other => Err(format!("BatchReadBlobs: {other:?}")),
                }
            }
            2 => {
                let get = re::GetActionResultRequest {
                    action_digest: Some(s.action.clone()),
                    ..Default::default()
                };
                ac.get_action_result(get)
                    .await
                    .map(|_| ())
                    .map_err(|e| format!("GetActionResult: {e}"))
            }
            _ => Capabilities::new(channel.clone())
                .get_capabilities(re::GetCapabilitiesRequest::default())
                .await
                .map(|_| ())
                .map_err(|e| format!("GetCapabilities: {e}")),
        };
        s.record(true, began, started, result);
    }
}

async fn upstream_client(channel: tonic::transport::Channel, s: Arc<Shared>, seed: u64) {
    let (mut bs, mut cas) = (channel.bytestream(), channel.cas());
    let mut rng = Rng::new(seed);
    while !s.stop.load(Ordering::SeqCst) {
        let began = s.phase.load(Ordering::SeqCst);
        let started = Instant::now();
        let result = match rng.below(3) {
            // A blob only the upstream has (read through, verified).
            0 => {
                let (data, fetched) = &s.remote[rng.below(s.remote.len())];
                if fetched.load(Ordering::SeqCst) {
                    continue;
                }
                match read_verified(&mut bs, &digest(data), data, 0, 0).await {
                    Read::Exact => {
                        fetched.store(true, Ordering::SeqCst);
                        Ok(())
                    }
                    other => Err(format!("read-through: {other:?}")),
                }
            }
            // A fresh blob, written through to the upstream.
            1 => {
                let n = s.fresh.fetch_add(1, Ordering::SeqCst);
                let data = Arc::new(blob(
                    0x07a9_e000_0000 + n,
                    1000 + (n as usize % 5) * 300_000,
                ));
                match upload_blob(&mut bs, data.clone()).await {
                    Ok(n) if n == data.len() as i64 => Ok(()),
                    other => Err(format!("write-through: {other:?}")),
                }
            }
            // FindMissingBlobs of digests nobody has: asks the upstream.
            _ => {
                let n = s.fresh.fetch_add(1, Ordering::SeqCst);
                let d = digest(format!("never stored {n}").as_bytes());
                let request = re::FindMissingBlobsRequest {
                    blob_digests: vec![d.clone()],
                    ..Default::default()
                };
                match cas.find_missing_blobs(request).await {
                    Ok(r) if r.get_ref().missing_blob_digests == [d] => Ok(()),
                    other => Err(format!("FindMissingBlobs: {other:?}")),
                }
            }
        };
        s.record(false, began, started, result);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Starts the upstream over `data` (on `addr` when restarting).
fn upstream(dir: &Path, data: &Path, n: usize, addr: Option<SocketAddr>) -> ServerProcess {
    start_at(dir, data, &dir.join(format!("upstream-{n}.log")), &[], addr)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_killed_under_load_fails_fast_and_recovers() {
    let cycles = pick(1, 5);
    let (steady, outage) = (
        Duration::from_secs(pick(3, 30)),
        Duration::from_secs(pick(4, 20)),
    );
    let dir = tempfile::tempdir().unwrap();
    let up_data = dir.path().join("upstream");
    let mut up = Some(upstream(dir.path(), &up_data, 0, None));
    let addr = up.as_ref().unwrap().addr();
    let url = format!("grpc://{addr}");
    let mut proxy = start(
        dir.path(),
        &dir.path().join("proxy"),
        &dir.path().join("proxy.log"),
        &["--upstream", &url],
    );

    // Local blobs and an action result, through the proxy; remote-only blobs
    // straight to the upstream.
    let local: Vec<Vec<u8>> = (0..40u64)
        .map(|i| {
            blob(
                0x10ca1 + i,
                if i % 5 == 0 {
                    2 << 20
                } else {
                    100 + i as usize * 997
                },
            )
        })
        .collect();
    let mut bs = proxy.bytestream();
    for data in &local {
        upload_blob(&mut bs, Arc::new(data.clone()))
            .await
            .expect("upload through the proxy");
    }
    let action = digest(b"outage action");
    let result = re::ActionResult {
        output_files: vec![re::OutputFile {
            path: "out".into(),
            digest: Some(digest(&local[1])),
            ..Default::default()
        }],
        ..Default::default()
    };
    proxy
        .action_cache()
        .update_action_result(re::UpdateActionResultRequest {
            action_digest: Some(action.clone()),
            action_result: Some(result),
            ..Default::default()
        })
        .await
        .expect("UpdateActionResult through the proxy");
    let remote: Vec<Vec<u8>> = (0..pick(600, 3000))
        .map(|i| blob(0x7e30_7e00 + i, 50 + (i as usize * 7919) % 30_000))
        .collect();
    // One blob per cycle that only the recovery check reads.
    let probes: Vec<Vec<u8>> = (0..cycles as u64)
        .map(|i| blob(0x940b_e000 + i, 5000))
        .collect();
    let mut up_cas = up.as_ref().unwrap().cas();
    for batch in remote.chunks(100).chain(probes.chunks(100)) {
        let refs: Vec<&[u8]> = batch.iter().map(|b| b.as_slice()).collect();
        assert!(
            batch_update(&mut up_cas, "", &refs)
                .await
                .iter()
                .all(|c| *c == Code::Ok)
        );
    }

    let s = Arc::new(Shared {
        local,
        action,
        remote: remote
            .into_iter()
            .map(|b| (b, AtomicBool::new(false)))
            .collect(),
        phase: AtomicU8::new(UP),
        stop: AtomicBool::new(false),
        fresh: AtomicU64::new(0),
        figures: Figures::default(),
        failures: Failures::default(),
    });
    let mut clients = tokio::task::JoinSet::new();
    for i in 0..LOCAL_CLIENTS + UPSTREAM_CLIENTS {
        let channel = endpoint(proxy.addr()).connect_lazy();
        if i < LOCAL_CLIENTS {
            clients.spawn(local_client(channel, s.clone(), i as u64));
        } else {
            clients.spawn(upstream_client(channel, s.clone(), i as u64));
        }
    }
    let mut recoveries = Vec::new();
    for (cycle, probe) in probes.iter().enumerate() {
        tokio::time::sleep(steady).await;
        s.phase.store(DOWN, Ordering::SeqCst);
        up.take().unwrap().kill();
        tokio::time::sleep(outage).await;
        up = Some(upstream(dir.path(), &up_data, cycle + 1, Some(addr)));
        s.phase.store(BACK, Ordering::SeqCst);
        // Back: an upstream-only blob reads through the same proxy process.
        let restarted = Instant::now();
        let bs = proxy.bytestream();
        let recovered = eventually(RECOVERY_LIMIT, || {
            let mut bs = bs.clone();
            async move { read_verified(&mut bs, &digest(probe), probe, 0, 0).await == Read::Exact }
        })
        .await;
        recoveries.push(restarted.elapsed());
        if !recovered {
            s.failures.add(format!(
                "cycle {cycle}: no recovery within {RECOVERY_LIMIT:?}"
            ));
        }
        s.phase.store(UP, Ordering::SeqCst);
        eprintln!(
            "chaos outage: cycle {cycle}: upstream down {outage:?}, proxy recovered {:.1?} after the restart",
            restarted.elapsed()
        );
    }
    tokio::time::sleep(steady).await;
    s.stop.store(true, Ordering::SeqCst);
    while let Some(joined) = clients.join_next().await {
        joined.expect("a client panicked");
    }
    s.figures.print("outage");
    let p99 = s
        .figures
        .quantile("upstream-bound, down", 0.99)
        .unwrap_or_default();
    eprintln!(
        "chaos outage: {cycles} cycles: {} calls; upstream-bound p99 while down {p99:.2?}; recovery {recoveries:.1?}; {} failed checks",
        s.figures.calls(),
        s.failures.count()
    );
    if p99 >= FAIL_FAST_P99 {
        s.failures.add(format!(
            "upstream-bound calls while down: p99 {p99:?} (limit {FAIL_FAST_P99:?})"
        ));
    }
    assert_healthy(&mut proxy, &s.failures, "outage").await;
    s.failures.assert_none("outage");
}
