//! Runs one build as Bazel would: at most `jobs` actions in flight, an action
//! starts once every action it depends on has finished executing, and each
//! action is: inputs made present (FindMissingBlobs + uploads), Execute,
//! wait for the done Operation, then (after the think time) the reads its
//! [`ReadMode`] asks for. The job slot is held until the reads are done.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use anyhow::{Context, ensure};
use futures::StreamExt;
use futures::future::BoxFuture;
use futures::stream::FuturesUnordered;
use outpost_testkit::re;

use super::client::Client;
use super::workload::{Build, Shape, key};

/// Which outputs the client downloads.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReadMode {
    /// Every output file and stdout/stderr (`--remote_download_all`), after
    /// a think time (0: right after the done Operation, as Bazel does;
    /// longer: outputs consumed later).
    Everything(Duration),
    /// Stdout/stderr of every action and the output files of the last layer
    /// (`--remote_download_toplevel`), right after done.
    TopLevel,
    /// Stdout/stderr only (`--remote_download_minimal`, which still
    /// downloads them), right after done.
    Nothing,
}

impl ReadMode {
    /// Parses `everything:MS`, `everything` (0 ms), `toplevel`, `nothing`.
    pub fn parse(s: &str) -> anyhow::Result<Self> {
        let s = s.trim();
        Ok(match s.split_once(':') {
            Some(("everything", ms)) => ReadMode::Everything(Duration::from_millis(
                ms.parse().with_context(|| format!("think time in {s:?}"))?,
            )),
            None if s == "everything" => ReadMode::Everything(Duration::ZERO),
            None if s == "toplevel" => ReadMode::TopLevel,
            None if s == "nothing" => ReadMode::Nothing,
            _ => anyhow::bail!("unknown read mode {s:?} (everything:MS, toplevel, nothing)"),
        })
    }

    /// Its name in the tables.
    pub fn name(self) -> String {
        match self {
            ReadMode::Everything(t) => format!("everything, think {} ms", t.as_millis()),
            ReadMode::TopLevel => "toplevel".into(),
            ReadMode::Nothing => "nothing".into(),
        }
    }

    fn think(self) -> Duration {
        match self {
            ReadMode::Everything(t) => t,
            _ => Duration::ZERO,
        }
    }

    /// Whether the output files of action `i` are read.
    fn reads_outputs(self, shape: &Shape, i: usize) -> bool {
        match self {
            ReadMode::Everything(_) => true,
            ReadMode::TopLevel => shape.top_level(i),
            ReadMode::Nothing => false,
        }
    }

    /// Bytes the client reads in a build (std streams not included).
    pub fn output_bytes(self, shape: &Shape) -> u64 {
        (0..shape.actions.len())
            .filter(|&i| self.reads_outputs(shape, i))
            .flat_map(|i| shape.actions[i].outputs.iter().map(|(_, n)| n))
            .sum()
    }
}

/// Timings of one action.
pub struct ActionTiming {
    /// Start of FindMissingBlobs → done Operation.
    pub exec: Duration,
    /// First read → all read (after the think time).
    pub read: Duration,
}

/// What a build measured.
pub struct BuildOutcome {
    /// First call → last read.
    pub wall: Duration,
    /// Bytes the client read (and verified).
    pub bytes_read: u64,
    /// Digests FindMissingBlobs reported missing, summed over actions.
    pub missing_found: usize,
    /// One per action.
    pub timings: Vec<ActionTiming>,
}

enum Event {
    Executed {
        i: usize,
        result: Box<re::ActionResult>,
        exec: Duration,
        missing: usize,
    },
    Read {
        i: usize,
        bytes: u64,
        read: Duration,
    },
}

/// Runs the build; fails on any error or wrong output.
pub async fn run_build(
    client: &Client,
    shape: &Shape,
    build: &Build,
    jobs: usize,
    mode: ReadMode,
) -> anyhow::Result<BuildOutcome> {
    let n = build.actions.len();
    let mut waiting: Vec<usize> = shape.actions.iter().map(|a| a.deps.len()).collect();
    let mut dependents: HashMap<usize, Vec<usize>> = HashMap::new();
    for (i, a) in shape.actions.iter().enumerate() {
        for &d in &a.deps {
            dependents.entry(d).or_default().push(i);
        }
    }
    let mut ready: Vec<usize> = (0..n).filter(|&i| waiting[i] == 0).collect();
    ready.reverse(); // pop() takes the lowest index first
    let mut running: FuturesUnordered<BoxFuture<'_, anyhow::Result<Event>>> =
        FuturesUnordered::new();
    let mut in_flight = 0;
    let mut finished = 0;
    let mut exec_times = vec![Duration::ZERO; n];
    let mut timings = Vec::with_capacity(n);
    let (mut bytes_read, mut missing_found) = (0, 0);
    let t0 = Instant::now();
    while finished < n {
        while in_flight < jobs {
            let Some(i) = ready.pop() else { break };
            in_flight += 1;
            running.push(Box::pin(execute(client, shape, build, i)));
        }
        let event = running
            .next()
            .await
            .context("build stalled: nothing running, actions left")??;
        match event {
            Event::Executed {
                i,
                result,
                exec,
                missing,
            } => {
                exec_times[i] = exec;
                missing_found += missing;
                let got: Vec<_> = result
                    .output_files
                    .iter()
                    .filter_map(|f| f.digest.as_ref().map(key))
                    .collect();
                let want: Vec<_> = build.actions[i].expected_outputs.iter().map(key).collect();
                ensure!(
                    got == want,
                    "action {i}: outputs differ from the expected ones"
                );
                for &j in dependents.get(&i).map_or(&[][..], |v| v.as_slice()) {
                    waiting[j] -= 1;
                    if waiting[j] == 0 {
                        // Keep the lowest index at the end.
                        let at = ready.partition_point(|&r| r > j);
                        ready.insert(at, j);
                    }
                }
                let mut digests = Vec::new();
                if mode.reads_outputs(shape, i) {
                    digests.extend(result.output_files.iter().filter_map(|f| f.digest.clone()));
                }
                digests.extend(result.stdout_digest.clone());
                digests.extend(result.stderr_digest.clone());
                running.push(Box::pin(read(client, shape, build, i, mode, digests)));
            }
            Event::Read { i, bytes, read } => {
                bytes_read += bytes;
                timings.push(ActionTiming {
                    exec: exec_times[i],
                    read,
                });
                in_flight -= 1;
                finished += 1;
            }
        }
    }
    Ok(BuildOutcome {
        wall: t0.elapsed(),
        bytes_read,
        missing_found,
        timings,
    })
}

async fn execute(client: &Client, shape: &Shape, build: &Build, i: usize) -> anyhow::Result<Event> {
    let a = &build.actions[i];
    let meta = client.meta(i, shape.actions[i].mnemonic, &a.action.digest);
    let start = Instant::now();
    let missing = client
        .ensure_inputs(a, &meta)
        .await
        .with_context(|| format!("action {i}: inputs"))?;
    let result = client
        .execute(a, &meta)
        .await
        .with_context(|| format!("action {i}: Execute"))?;
    Ok(Event::Executed {
        i,
        result: Box::new(result),
        exec: start.elapsed(),
        missing,
    })
}

async fn read(
    client: &Client,
    shape: &Shape,
    build: &Build,
    i: usize,
    mode: ReadMode,
    digests: Vec<re::Digest>,
) -> anyhow::Result<Event> {
    tokio::time::sleep(mode.think()).await;
    let meta = client.meta(
        i,
        shape.actions[i].mnemonic,
        &build.actions[i].action.digest,
    );
    let start = Instant::now();
    let bytes = client
        .read_all(digests, &meta)
        .await
        .with_context(|| format!("action {i}: reads"))?;
    Ok(Event::Read {
        i,
        bytes,
        read: start.elapsed(),
    })
}
