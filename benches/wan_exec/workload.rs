//! The build: a DAG of actions in layers, like a C++ build. Layer 0 compiles
//! sources (each action: its own sources plus a few shared headers); every
//! later layer takes the output files of actions of the layer below as
//! inputs (archives, links; plus one small parameter file), so every output
//! below the last layer is consumed by a later action. The outputs of the last layer are the "top-level"
//! outputs (what `--remote_download_toplevel` downloads).
//!
//! The shape ([`Shape`]: layers, sizes, dependencies) is a pure function of
//! the seed. The actions themselves ([`Build`]) are made per run from the
//! shape and a salt: fresh source bytes, fresh action digests and so fresh
//! output bytes, so every run starts with an upstream and a proxy that have
//! never seen its sources. An output's bytes are known before it is produced
//! ([`output_content`] is what the fake writes), which is how a later
//! action's input tree can name them.

use std::collections::HashSet;

use outpost_testkit::Rng;
use outpost_testkit::fake::{TestAction, output_content};
use outpost_testkit::re;
use outpost_testkit::workload::digest;

use super::{KIB, MIB};

/// Shared "headers": a pool every layer-0 action includes a few of.
const HEADERS: usize = 24;
/// Headers included per layer-0 action.
const HEADERS_PER_ACTION: usize = 6;
/// Own source files per compile (layer-0) action, of 1 KiB–1.5 MiB
/// log-uniform (a few go up by ByteStream Write).
const SOURCES_PER_COMPILE: usize = 3;

/// What the workload knobs ask for.
pub struct WorkloadSettings {
    /// Actions in the build.
    pub actions: usize,
    /// Layers of the DAG.
    pub layers: usize,
    /// Actions of the layer below each later action depends on.
    pub deps: usize,
    /// Seed of the shape and the bytes.
    pub seed: u64,
}

/// One action of the shape.
pub struct ActionShape {
    pub layer: usize,
    /// Bazel's mnemonic for it (`RequestMetadata.action_mnemonic`).
    pub mnemonic: &'static str,
    /// Output files: globally unique paths (their sizes are set in the fake
    /// by path) and sizes.
    pub outputs: Vec<(String, u64)>,
    /// Own source files: path and length.
    pub sources: Vec<(String, usize)>,
    /// Indices into the header pool.
    pub headers: Vec<usize>,
    /// Earlier actions whose output files are inputs.
    pub deps: Vec<usize>,
}

/// The build's shape, the same in every run.
pub struct Shape {
    pub actions: Vec<ActionShape>,
    /// Header lengths.
    pub headers: Vec<usize>,
    pub layers: usize,
}

impl Shape {
    /// Layer sizes fall off towards the top (weights `layers, layers-1, …,
    /// 1`): many compiles, few links. Each action of layer `l > 0` depends on
    /// `deps` random actions of layer `l-1`, and every action of layer `l-1`
    /// no one picked is given to one of them, so no intermediate output is
    /// left unconsumed.
    pub fn new(s: &WorkloadSettings) -> Shape {
        let mut rng = Rng::new(s.seed);
        let layers = s.layers.clamp(1, s.actions.max(1));
        let weight_sum: usize = (1..=layers).sum();
        let mut sizes: Vec<usize> = (0..layers)
            .map(|l| (s.actions * (layers - l) / weight_sum).max(1))
            .collect();
        let assigned: usize = sizes.iter().sum();
        sizes[0] += s.actions.saturating_sub(assigned);
        let mut actions: Vec<ActionShape> = Vec::new();
        let mut previous: Vec<usize> = Vec::new();
        for (layer, &size) in sizes.iter().enumerate() {
            let first = actions.len();
            for _ in 0..size {
                let i = actions.len();
                let n_out = 1 + rng.below(3);
                let outputs = (0..n_out)
                    .map(|j| {
                        (
                            format!("bazel-out/k8-fastbuild/bin/a{i}/o{j}.bin"),
                            rng.log_uniform(4 * KIB, 4 * MIB),
                        )
                    })
                    .collect();
                // Compiles have sources; archives and links one small
                // generated parameter file.
                let sources = if layer == 0 {
                    (0..SOURCES_PER_COMPILE)
                        .map(|j| {
                            (
                                format!("src/a{i}/s{j}.cc"),
                                rng.log_uniform(KIB, 3 * MIB / 2) as usize,
                            )
                        })
                        .collect()
                } else {
                    vec![(
                        format!("bazel-out/k8-fastbuild/bin/a{i}.params"),
                        rng.log_uniform(KIB, 64 * KIB) as usize,
                    )]
                };
                let headers = if layer == 0 {
                    let mut h: Vec<usize> = (0..HEADERS_PER_ACTION)
                        .map(|_| rng.below(HEADERS))
                        .collect();
                    h.sort_unstable();
                    h.dedup();
                    h
                } else {
                    Vec::new()
                };
                let mut deps = Vec::new();
                if !previous.is_empty() {
                    for _ in 0..s.deps.min(previous.len()) {
                        let d = previous[rng.below(previous.len())];
                        if !deps.contains(&d) {
                            deps.push(d);
                        }
                    }
                }
                let mnemonic = match layer {
                    0 => "CppCompile",
                    l if l + 1 == layers => "CppLink",
                    _ => "CppArchive",
                };
                actions.push(ActionShape {
                    layer,
                    mnemonic,
                    outputs,
                    sources,
                    headers,
                    deps,
                });
            }
            // Every action of the layer below is consumed by someone.
            let picked: HashSet<usize> = actions[first..]
                .iter()
                .flat_map(|a| a.deps.iter().copied())
                .collect();
            let unpicked: Vec<usize> = previous
                .iter()
                .copied()
                .filter(|d| !picked.contains(d))
                .collect();
            for (k, d) in unpicked.into_iter().enumerate() {
                actions[first + k % size].deps.push(d);
            }
            previous = (first..actions.len()).collect();
        }
        let headers = (0..HEADERS)
            .map(|_| rng.log_uniform(KIB, 64 * KIB) as usize)
            .collect();
        Shape {
            actions,
            headers,
            layers,
        }
    }

    /// Whether action `i` is in the last layer (its outputs are top-level).
    pub fn top_level(&self, i: usize) -> bool {
        self.actions[i].layer + 1 == self.layers
    }

    /// Bytes of all output files.
    pub fn output_bytes(&self) -> u64 {
        self.actions
            .iter()
            .flat_map(|a| a.outputs.iter().map(|(_, n)| n))
            .sum()
    }

    /// Bytes of the top-level output files.
    pub fn top_level_bytes(&self) -> u64 {
        (0..self.actions.len())
            .filter(|&i| self.top_level(i))
            .flat_map(|i| self.actions[i].outputs.iter().map(|(_, n)| n))
            .sum()
    }

    /// Bytes of distinct source files (own sources and headers).
    pub fn source_bytes(&self) -> u64 {
        let own: usize = self
            .actions
            .iter()
            .flat_map(|a| a.sources.iter().map(|(_, n)| n))
            .sum();
        let used: HashSet<usize> = self
            .actions
            .iter()
            .flat_map(|a| a.headers.iter().copied())
            .collect();
        (own + used.iter().map(|&h| self.headers[h]).sum::<usize>()) as u64
    }

    /// Output files in total.
    pub fn output_files(&self) -> usize {
        self.actions.iter().map(|a| a.outputs.len()).sum()
    }

    /// Actions per layer.
    pub fn layer_sizes(&self) -> Vec<usize> {
        let mut sizes = vec![0; self.layers];
        for a in &self.actions {
            sizes[a.layer] += 1;
        }
        sizes
    }
}

/// One action of a run.
pub struct BuildAction {
    pub action: TestAction,
    /// Digests of its input files that are other actions' outputs: the
    /// client never uploads these (it may not even hold them).
    pub produced_inputs: HashSet<(String, i64)>,
    /// The digests of its own output files, as the fake will produce them.
    pub expected_outputs: Vec<re::Digest>,
}

/// A run's actions, in an order where dependencies come first.
pub struct Build {
    pub actions: Vec<BuildAction>,
}

fn salted(salt: &str, seed: u64, len: usize) -> Vec<u8> {
    let mut data = salt.as_bytes().to_vec();
    data.extend(Rng::new(seed).bytes(len));
    data
}

/// Key of a digest in sets.
pub fn key(d: &re::Digest) -> (String, i64) {
    (d.hash.clone(), d.size_bytes)
}

impl Build {
    /// The actions of `shape` for one run: sources and action digests are
    /// salted with `salt`.
    pub fn new(shape: &Shape, salt: &str, seed: u64) -> Build {
        let headers: Vec<Vec<u8>> = shape
            .headers
            .iter()
            .enumerate()
            .map(|(h, &len)| salted(salt, seed ^ (0x4eade7 + h as u64), len))
            .collect();
        let mut built: Vec<BuildAction> = Vec::with_capacity(shape.actions.len());
        for (i, a) in shape.actions.iter().enumerate() {
            let mut inputs: Vec<(String, Vec<u8>)> = Vec::new();
            for (j, (path, len)) in a.sources.iter().enumerate() {
                let data = salted(salt, seed ^ ((i as u64) << 20) ^ (j as u64 + 1), *len);
                inputs.push((path.clone(), data));
            }
            for &h in &a.headers {
                inputs.push((format!("include/h{h}.h"), headers[h].clone()));
            }
            let mut produced_inputs = HashSet::new();
            for &d in &a.deps {
                let dep_digest = &built[d].action.digest;
                for (path, size) in &shape.actions[d].outputs {
                    let data = output_content(dep_digest, path, *size as usize);
                    produced_inputs.insert(key(&digest(&data)));
                    inputs.push((path.clone(), data));
                }
            }
            let outs: Vec<&str> = a.outputs.iter().map(|(p, _)| p.as_str()).collect();
            let refs: Vec<(&str, &[u8])> = inputs
                .iter()
                .map(|(p, d)| (p.as_str(), d.as_slice()))
                .collect();
            let arg = format!("{}-{i}", a.mnemonic);
            let action = TestAction::new(&[&arg], &outs, &refs).salted(salt.as_bytes());
            let expected_outputs = a
                .outputs
                .iter()
                .map(|(path, size)| digest(&output_content(&action.digest, path, *size as usize)))
                .collect();
            built.push(BuildAction {
                action,
                produced_inputs,
                expected_outputs,
            });
        }
        Build { actions: built }
    }
}
