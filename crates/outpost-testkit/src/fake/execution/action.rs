//! [`TestAction`]: an Action with its Command and input tree, built for
//! tests, and the directory builder the fake's outputs use too.

use std::collections::{BTreeMap, HashSet};

use bytes::Bytes;
use prost::Message;

use crate::re;
use crate::workload;

/// A directory being built: files and subdirectories by name.
#[derive(Default)]
pub(super) struct DirNode {
    files: BTreeMap<String, Bytes>,
    dirs: BTreeMap<String, DirNode>,
}

impl DirNode {
    /// Adds file `path` (slashes make subdirectories).
    pub(super) fn insert(&mut self, path: &str, data: Bytes) {
        match path.split_once('/') {
            Some((head, rest)) => self
                .dirs
                .entry(head.to_string())
                .or_default()
                .insert(rest, data),
            None => {
                self.files.insert(path.to_string(), data);
            }
        }
    }

    /// Encodes the tree bottom-up: every file and Directory goes to `blobs`,
    /// every Directory below the root to `children`. Returns the root.
    pub(super) fn encode(
        &self,
        blobs: &mut Vec<(re::Digest, Bytes)>,
        children: &mut Vec<re::Directory>,
    ) -> (re::Directory, re::Digest) {
        let mut dir = re::Directory::default();
        for (name, data) in &self.files {
            let d = workload::digest(data);
            blobs.push((d.clone(), data.clone()));
            dir.files.push(re::FileNode {
                name: name.clone(),
                digest: Some(d),
                is_executable: false,
                ..Default::default()
            });
        }
        for (name, node) in &self.dirs {
            let (child, d) = node.encode(blobs, children);
            children.push(child);
            dir.directories.push(re::DirectoryNode {
                name: name.clone(),
                digest: Some(d),
            });
        }
        let bytes = Bytes::from(dir.encode_to_vec());
        let d = workload::digest(&bytes);
        blobs.push((d.clone(), bytes));
        (dir, d)
    }
}

/// An Action with its Command and input root, built for tests: every blob a
/// server needs to run it is in [`TestAction::blobs`].
#[derive(Clone, Debug)]
pub struct TestAction {
    /// The Action.
    pub action: re::Action,
    /// Its digest.
    pub digest: re::Digest,
    /// The Command.
    pub command: re::Command,
    /// The Command's digest.
    pub command_digest: re::Digest,
    /// The input root Directory's digest.
    pub input_root: re::Digest,
    /// Input files by path, with their digests.
    pub inputs: Vec<(String, re::Digest)>,
    /// Action, Command, every input Directory and file (deduplicated).
    pub blobs: Vec<(re::Digest, Bytes)>,
    input_data: Vec<(String, Bytes)>,
}

impl TestAction {
    /// `arguments` run with outputs `output_paths` (REAPI 2.1+) over input
    /// files `(path, contents)` (paths with `/` make subdirectories).
    pub fn new(arguments: &[&str], output_paths: &[&str], inputs: &[(&str, &[u8])]) -> TestAction {
        let command = re::Command {
            arguments: arguments.iter().map(|s| s.to_string()).collect(),
            output_paths: output_paths.iter().map(|s| s.to_string()).collect(),
            ..Default::default()
        };
        let input_data = inputs
            .iter()
            .map(|(p, d)| (p.to_string(), Bytes::copy_from_slice(d)))
            .collect();
        TestAction::build(command, input_data, false, Vec::new())
    }

    /// The same action with REAPI 2.0 outputs (`output_files`,
    /// `output_directories`) instead of `output_paths`, as Bazel 4 sends.
    #[allow(deprecated)]
    pub fn with_legacy_outputs(self, files: &[&str], directories: &[&str]) -> TestAction {
        let mut command = self.command.clone();
        command.output_paths.clear();
        command.output_files = files.iter().map(|s| s.to_string()).collect();
        command.output_directories = directories.iter().map(|s| s.to_string()).collect();
        TestAction::build(
            command,
            self.input_data,
            self.action.do_not_cache,
            self.action.salt,
        )
    }

    /// The same action with `do_not_cache` set.
    pub fn do_not_cache(self) -> TestAction {
        TestAction::build(self.command, self.input_data, true, self.action.salt)
    }

    /// The same action with a salt (a different action digest).
    pub fn salted(self, salt: &[u8]) -> TestAction {
        TestAction::build(
            self.command,
            self.input_data,
            self.action.do_not_cache,
            salt.to_vec(),
        )
    }

    fn build(
        command: re::Command,
        input_data: Vec<(String, Bytes)>,
        do_not_cache: bool,
        salt: Vec<u8>,
    ) -> TestAction {
        let mut root = DirNode::default();
        for (p, d) in &input_data {
            root.insert(p, d.clone());
        }
        let mut blobs = Vec::new();
        let (_, input_root) = root.encode(&mut blobs, &mut Vec::new());
        let command_bytes = Bytes::from(command.encode_to_vec());
        let command_digest = workload::digest(&command_bytes);
        let action = re::Action {
            command_digest: Some(command_digest.clone()),
            input_root_digest: Some(input_root.clone()),
            do_not_cache,
            salt,
            ..Default::default()
        };
        let action_bytes = Bytes::from(action.encode_to_vec());
        let digest = workload::digest(&action_bytes);
        blobs.push((command_digest.clone(), command_bytes));
        blobs.push((digest.clone(), action_bytes));
        let mut seen = HashSet::new();
        blobs.retain(|(d, _)| seen.insert((d.hash.clone(), d.size_bytes)));
        let inputs = input_data
            .iter()
            .map(|(p, d)| (p.clone(), workload::digest(d)))
            .collect();
        TestAction {
            action,
            digest,
            command,
            command_digest,
            input_root,
            inputs,
            blobs,
            input_data,
        }
    }

    /// Every blob's digest.
    pub fn blob_digests(&self) -> Vec<re::Digest> {
        self.blobs.iter().map(|(d, _)| d.clone()).collect()
    }

    /// The digest of input file `path`.
    pub fn input(&self, path: &str) -> Option<re::Digest> {
        self.inputs
            .iter()
            .find(|(p, _)| p == path)
            .map(|(_, d)| d.clone())
    }

    /// An ExecuteRequest for it (instance `instance`, cache lookup on).
    pub fn request(&self, instance: &str) -> re::ExecuteRequest {
        re::ExecuteRequest {
            instance_name: instance.to_string(),
            action_digest: Some(self.digest.clone()),
            ..Default::default()
        }
    }
}
