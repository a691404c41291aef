//! Crash: rounds of mixed writes (file blobs, inline blobs through
//! ByteStream and BatchUpdateBlobs, action results) ended by kill -9. After
//! every restart on the same data directory, every write ever acknowledged
//! is present and intact, and whatever FindMissingBlobs calls present among
//! the interrupted writes reads back intact too.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::common::*;

const WORKERS: u64 = 8;

/// An acknowledged write.
#[derive(Clone)]
enum Acked {
    Blob(re::Digest),
    Action(re::Digest, Box<re::ActionResult>),
}

/// Write `i` of worker `w` in round `r`: its kind cycles through file blob,
/// inline ByteStream blob, a batch of small blobs and an action result.
fn data(r: u64, w: u64, i: u64, n: u64) -> Vec<u8> {
    let seed = (r << 40) | (w << 32) | (i << 8) | n;
    let mut rng = Rng::new(seed);
    let len = match i % 4 {
        0 => rng.log_uniform((1 << 20) + 1, 4 << 20),
        1 => rng.log_uniform(1, 1 << 20),
        _ => rng.log_uniform(1, 64 << 10),
    };
    blob(seed, len as usize)
}

/// One write; the acknowledged things on success.
async fn write_one(
    bs: &mut ByteStream,
    cas: &mut Cas,
    ac: &mut ActionCache,
    r: u64,
    w: u64,
    i: u64,
    attempted: &Mutex<Vec<re::Digest>>,
) -> Result<Vec<Acked>, String> {
    match i % 4 {
        0 | 1 => {
            let blob = Arc::new(data(r, w, i, 0));
            let d = digest(&blob);
            attempted.lock().unwrap().push(d.clone());
            match upload_blob(bs, blob).await {
                Ok(n) if n == d.size_bytes => Ok(vec![Acked::Blob(d)]),
                other => Err(format!("Write: {other:?}")),
            }
        }
        2 => {
            let blobs: Vec<_> = (0..1 + i % 5).map(|n| data(r, w, i, n)).collect();
            let entries: Vec<_> = blobs.into_iter().map(|b| (digest(&b), b)).collect();
            let digests: Vec<_> = entries.iter().map(|(d, _)| d.clone()).collect();
            attempted.lock().unwrap().extend(digests.iter().cloned());
            match batch_update_raw(cas, "", entries).await {
                Ok(codes) if codes.iter().all(|c| *c == Code::Ok) => {
                    Ok(digests.into_iter().map(Acked::Blob).collect())
                }
                other => Err(format!("BatchUpdateBlobs: {other:?}")),
            }
        }
        _ => {
            let output = data(r, w, i, 0);
            let d = digest(&output);
            attempted.lock().unwrap().push(d.clone());
            match batch_update_raw(cas, "", vec![(d.clone(), output)]).await {
                Ok(codes) if codes == [Code::Ok] => {}
                other => return Err(format!("BatchUpdateBlobs: {other:?}")),
            }
            let action = digest(format!("crash action {r}/{w}/{i}").as_bytes());
            let result = re::ActionResult {
                output_files: vec![re::OutputFile {
                    path: format!("out/{i}"),
                    digest: Some(d.clone()),
                    ..Default::default()
                }],
                exit_code: (i % 7) as i32,
                ..Default::default()
            };
            let update = re::UpdateActionResultRequest {
                action_digest: Some(action.clone()),
                action_result: Some(result.clone()),
                ..Default::default()
            };
            match ac.update_action_result(update).await {
                Ok(_) => Ok(vec![
                    Acked::Blob(d),
                    Acked::Action(action, Box::new(result)),
                ]),
                Err(e) => Err(format!("UpdateActionResult: {e}")),
            }
        }
    }
}

/// Checks everything acknowledged so far, and the interrupted writes that
/// FindMissingBlobs calls present. Returns (blobs, bytes, actions) checked.
async fn verify(
    server: &ServerProcess,
    acked: &[Acked],
    interrupted: &[re::Digest],
    failures: &Failures,
    round: u64,
) -> (usize, u64, usize) {
    let (mut cas, mut bs, mut ac) = (server.cas(), server.bytestream(), server.action_cache());
    let blobs: Vec<re::Digest> = acked
        .iter()
        .filter_map(|a| match a {
            Acked::Blob(d) => Some(d.clone()),
            Acked::Action(..) => None,
        })
        .collect();
    for chunk in blobs.chunks(5000) {
        for lost in find_missing(&mut cas, chunk).await {
            failures.add(format!(
                "round {round}: acknowledged blob {lost:?} reported missing"
            ));
        }
    }
    let present: Vec<re::Digest> = {
        let missing = find_missing(&mut cas, interrupted).await;
        interrupted
            .iter()
            .filter(|d| !missing.contains(d))
            .cloned()
            .collect()
    };
    let mut bytes = 0;
    for d in blobs.iter().chain(&present) {
        match read_hashed(&mut bs, d).await {
            Read::Exact => bytes += d.size_bytes as u64,
            other => failures.add(format!(
                "round {round}: blob {}/{}: {other:?}",
                d.hash, d.size_bytes
            )),
        }
    }
    let mut actions = 0;
    for a in acked {
        let Acked::Action(action, result) = a else {
            continue;
        };
        actions += 1;
        let get = re::GetActionResultRequest {
            action_digest: Some(action.clone()),
            ..Default::default()
        };
        match ac.get_action_result(get).await {
            Ok(r)
                if r.get_ref().output_files == result.output_files
                    && r.get_ref().exit_code == result.exit_code => {}
            Ok(r) => failures.add(format!(
                "round {round}: action {} changed: {:?}",
                action.hash,
                r.get_ref()
            )),
            Err(e) => failures.add(format!(
                "round {round}: acknowledged action {}: {e}",
                action.hash
            )),
        }
    }
    (blobs.len() + present.len(), bytes, actions)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_rounds_lose_nothing_acknowledged() {
    let rounds = pick(5, 20);
    let dir = tempfile::tempdir().unwrap();
    let data_dir = dir.path().join("data");
    let failures = Failures::default();
    let mut acked: Vec<Acked> = Vec::new();
    let mut interrupted: Vec<re::Digest> = Vec::new();
    let mut rng = Rng::new(9);
    let mut restarts = Vec::new();
    for round in 0..=rounds {
        let started = Instant::now();
        let server = start(
            dir.path(),
            &data_dir,
            &dir.path().join(format!("log-{round}")),
            &[],
        );
        restarts.push(started.elapsed());
        let checking = Instant::now();
        let (blobs, bytes, actions) = verify(&server, &acked, &interrupted, &failures, round).await;
        eprintln!(
            "chaos crash: round {round}: restart {:.0?}; checked {blobs} blobs ({:.0} MiB) and {actions} action results in {:.1?}",
            restarts[round as usize],
            mib(bytes),
            checking.elapsed()
        );
        if round == rounds {
            assert_healthy(&mut { server }, &failures, "crash").await;
            break;
        }

        let attempted = Arc::new(Mutex::new(Vec::new()));
        let round_acked = Arc::new(Mutex::new(Vec::new()));
        let killed = Arc::new(AtomicBool::new(false));
        let mut workers = tokio::task::JoinSet::new();
        for w in 0..WORKERS {
            let channel = endpoint(server.addr()).connect_lazy();
            let (attempted, round_acked, killed, failures) = (
                attempted.clone(),
                round_acked.clone(),
                killed.clone(),
                failures.clone(),
            );
            workers.spawn(async move {
                let (mut bs, mut cas, mut ac) =
                    (channel.bytestream(), channel.cas(), channel.action_cache());
                for i in 0.. {
                    match write_one(&mut bs, &mut cas, &mut ac, round, w, i, &attempted).await {
                        Ok(done) => round_acked.lock().unwrap().extend(done),
                        Err(why) => {
                            if !killed.load(Ordering::SeqCst) {
                                failures.add(format!("round {round}: before the kill: {why}"));
                            }
                            return;
                        }
                    }
                }
            });
        }
        // Kill after a random number of acknowledged writes, at a random moment.
        let target = 20 + rng.below(60);
        let enough = eventually(Duration::from_secs(60), || {
            let n = round_acked.lock().unwrap().len();
            async move { n >= target }
        })
        .await;
        if !enough {
            failures.add(format!("round {round}: fewer than {target} writes in 60 s"));
        }
        tokio::time::sleep(Duration::from_millis(rng.below(300) as u64)).await;
        killed.store(true, Ordering::SeqCst);
        server.kill();
        while let Some(joined) = workers.join_next().await {
            joined.expect("a worker panicked");
        }
        let done = round_acked.lock().unwrap().clone();
        let blobs: Vec<&re::Digest> = done
            .iter()
            .filter_map(|a| match a {
                Acked::Blob(d) => Some(d),
                Acked::Action(..) => None,
            })
            .collect();
        let lost_in_flight: Vec<re::Digest> = attempted
            .lock()
            .unwrap()
            .iter()
            .filter(|d| !blobs.contains(d))
            .cloned()
            .collect();
        eprintln!(
            "chaos crash: round {round}: killed after {} acknowledged writes, {} in flight",
            done.len(),
            lost_in_flight.len()
        );
        interrupted = lost_in_flight;
        acked.extend(done);
    }
    let blobs = acked.iter().filter(|a| matches!(a, Acked::Blob(_))).count();
    let mut restart_ms: Vec<u64> = restarts.iter().map(|d| d.as_millis() as u64).collect();
    eprintln!(
        "chaos crash: {rounds} kill -9 rounds: {blobs} acknowledged blobs, {} action results, all intact: {}; restart p50 {} ms max {} ms",
        acked.len() - blobs,
        failures.count() == 0,
        quantile(&mut restart_ms, 0.5).unwrap_or(0),
        quantile(&mut restart_ms, 1.0).unwrap_or(0),
    );
    failures.assert_none("crash");
}
