//! What Execute does once a call is through the prologue: the input check,
//! the operation it makes, the job that "runs" in the background and the
//! deterministic outputs it stores.

use std::collections::{HashSet, VecDeque};
use std::sync::Arc;
use std::sync::atomic::Ordering;

use bazel_remote_apis::google::longrunning::Operation;
use bytes::Bytes;
use prost::Message;
use tokio::sync::watch;
use tonic::{Code, Status};

use super::action::DirNode;
use super::wire::{done_op, failure_result, meta, output_content, response_result, stdio_content};
use super::{InjectedFailure, OpEntry};
use crate::fake::state::{Shared, lock, rpc_status};
use crate::re;
use crate::workload::digest;
use re::execution_stage::Value as Stage;

type ActionAndCommand = (re::Action, re::Command);

/// What a job needs to "run" an action.
pub(super) struct Job {
    pub(super) name: String,
    pub(super) instance: String,
    pub(super) action_digest: re::Digest,
    pub(super) action: re::Action,
    pub(super) command: re::Command,
    pub(super) function: i32,
    pub(super) request: re::ExecuteRequest,
    pub(super) failure: Option<InjectedFailure>,
}

impl Shared {
    /// Reads Action and Command; walks the input root. Returns what is
    /// missing (the Action alone if it is missing).
    pub(super) fn check_inputs(
        &self,
        action_digest: &re::Digest,
    ) -> Result<(Option<ActionAndCommand>, Vec<re::Digest>), Status> {
        let Some(action_bytes) = self.blob(action_digest) else {
            return Ok((None, vec![action_digest.clone()]));
        };
        let action = re::Action::decode(action_bytes)
            .map_err(|e| Status::invalid_argument(format!("fake upstream: bad Action: {e}")))?;
        let command_digest = action.command_digest.clone().ok_or_else(|| {
            Status::invalid_argument("fake upstream: Action without command_digest")
        })?;
        let root = action.input_root_digest.clone().ok_or_else(|| {
            Status::invalid_argument("fake upstream: Action without input_root_digest")
        })?;
        let mut missing = Vec::new();
        let mut seen = HashSet::new();
        let mut note = |d: &re::Digest, missing: &mut Vec<re::Digest>| {
            if seen.insert((d.hash.clone(), d.size_bytes)) {
                missing.push(d.clone());
            }
        };
        let command = match self.blob(&command_digest) {
            Some(b) => Some(re::Command::decode(b).map_err(|e| {
                Status::invalid_argument(format!("fake upstream: bad Command: {e}"))
            })?),
            None => {
                note(&command_digest, &mut missing);
                None
            }
        };
        let mut queue = VecDeque::from([root]);
        let mut visited = HashSet::new();
        while let Some(d) = queue.pop_front() {
            if !visited.insert((d.hash.clone(), d.size_bytes)) {
                continue;
            }
            let Some(bytes) = self.blob(&d) else {
                note(&d, &mut missing);
                continue;
            };
            let dir = re::Directory::decode(bytes).map_err(|e| {
                Status::invalid_argument(format!("fake upstream: bad Directory: {e}"))
            })?;
            for f in &dir.files {
                if let Some(fd) = &f.digest
                    && !self.has(fd)
                {
                    note(fd, &mut missing);
                }
            }
            queue.extend(dir.directories.iter().filter_map(|n| n.digest.clone()));
        }
        Ok((command.map(|c| (action, c)), missing))
    }

    /// Produces the outputs of `job`, stores them, returns the ActionResult.
    #[allow(deprecated)]
    pub(super) fn produce_outputs(&self, job: &Job) -> re::ActionResult {
        let cfg = self.exec.cfg();
        let size_of = |path: &str| {
            cfg.output_sizes
                .get(path)
                .copied()
                .unwrap_or(cfg.default_output_size)
        };
        let (files, dirs): (Vec<String>, Vec<String>) = if !job.command.output_paths.is_empty() {
            job.command
                .output_paths
                .iter()
                .cloned()
                .partition(|p| !cfg.directory_paths.contains(p))
        } else {
            (
                job.command.output_files.clone(),
                job.command.output_directories.clone(),
            )
        };
        let a = &job.action_digest;
        let mut blobs: Vec<(re::Digest, Bytes)> = Vec::new();
        let mut result = re::ActionResult {
            exit_code: cfg.exit_code,
            ..Default::default()
        };
        for path in files {
            let data = Bytes::from(output_content(a, &path, size_of(&path)));
            let d = digest(&data);
            blobs.push((d.clone(), data));
            result.output_files.push(re::OutputFile {
                path,
                digest: Some(d),
                ..Default::default()
            });
        }
        for path in dirs {
            let mut node = DirNode::default();
            for (rel, size) in &cfg.directory_layout {
                let full = format!("{path}/{rel}");
                node.insert(rel, Bytes::from(output_content(a, &full, *size)));
            }
            let mut children = Vec::new();
            let (root, root_digest) = node.encode(&mut blobs, &mut children);
            let tree = Bytes::from(
                re::Tree {
                    root: Some(root),
                    children,
                }
                .encode_to_vec(),
            );
            let tree_digest = digest(&tree);
            blobs.push((tree_digest.clone(), tree));
            result.output_directories.push(re::OutputDirectory {
                path,
                tree_digest: Some(tree_digest),
                is_topologically_sorted: false,
                root_directory_digest: cfg.root_directory_digests.then_some(root_digest),
            });
        }
        for (stream, size) in [("stdout", cfg.stdout_size), ("stderr", cfg.stderr_size)] {
            let data = Bytes::from(stdio_content(a, stream, size));
            let d = digest(&data);
            blobs.push((d.clone(), data));
            if stream == "stdout" {
                result.stdout_digest = Some(d);
            } else {
                result.stderr_digest = Some(d);
            }
        }
        result.execution_metadata = Some(re::ExecutedActionMetadata {
            worker: "fake-worker".to_string(),
            ..Default::default()
        });
        drop(cfg);
        for (d, data) in blobs {
            self.store(&d, data);
        }
        result
    }

    /// Inlines what the request asked for (stdout, stderr, output files).
    pub(super) fn inline_for(
        &self,
        req: &re::ExecuteRequest,
        mut result: re::ActionResult,
    ) -> re::ActionResult {
        if req.inline_stdout
            && let Some(data) = result.stdout_digest.as_ref().and_then(|d| self.blob(d))
        {
            result.stdout_raw = data.to_vec();
        }
        if req.inline_stderr
            && let Some(data) = result.stderr_digest.as_ref().and_then(|d| self.blob(d))
        {
            result.stderr_raw = data.to_vec();
        }
        for f in &mut result.output_files {
            if req.inline_output_files.contains(&f.path)
                && let Some(data) = f.digest.as_ref().and_then(|d| self.blob(d))
            {
                f.contents = data.to_vec();
            }
        }
        result
    }

    /// Makes operation `name` with its first state.
    pub(super) fn new_op(&self, name: &str, instance: &str, action: &re::Digest, first: Operation) {
        let (version, _) = watch::channel(1);
        lock(&self.exec.ops).insert(
            name.to_string(),
            OpEntry {
                seq: self.exec.next_op.load(Ordering::Relaxed),
                instance: instance.to_string(),
                action: action.clone(),
                history: vec![first],
                version,
                job: None,
            },
        );
    }

    /// A fresh operation name.
    pub(super) fn op_name(&self) -> String {
        let n = self.exec.next_op.fetch_add(1, Ordering::Relaxed) + 1;
        format!("{}{n}", self.exec.cfg().name_prefix)
    }

    /// The job's life: QUEUED, EXECUTING, held, done.
    pub(super) async fn run_job(self: Arc<Self>, job: Job) {
        let (queue_delay, exec_delay) = {
            let c = self.exec.cfg();
            (c.queue_delay, c.exec_delay)
        };
        if !queue_delay.is_zero() {
            tokio::time::sleep(queue_delay).await;
        }
        self.exec.push(
            &job.name,
            Operation {
                name: job.name.clone(),
                metadata: Some(meta(
                    Stage::Executing,
                    &job.name,
                    &job.action_digest,
                    job.function,
                )),
                done: false,
                result: None,
            },
        );
        if !exec_delay.is_zero() {
            tokio::time::sleep(exec_delay).await;
        }
        self.exec.wait_released().await;
        let result = match &job.failure {
            Some(f) => failure_result(rpc_status(f.code, &f.message), f.delivery),
            None => {
                let result = self.produce_outputs(&job);
                if !job.action.do_not_cache && result.exit_code == 0 {
                    lock(&self.data).actions.insert(
                        (
                            job.instance.clone(),
                            job.action_digest.hash.clone(),
                            job.action_digest.size_bytes,
                        ),
                        result.clone(),
                    );
                }
                response_result(&re::ExecuteResponse {
                    result: Some(self.inline_for(&job.request, result)),
                    cached_result: false,
                    status: Some(rpc_status(Code::Ok, "")),
                    ..Default::default()
                })
            }
        };
        self.exec.counters.completed.fetch_add(1, Ordering::Relaxed);
        self.exec.push(
            &job.name,
            done_op(&job.name, &job.action_digest, job.function, result),
        );
    }
}
