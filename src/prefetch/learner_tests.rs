//! Tests of the [`Learner`]: registration, crediting reads and inputs,
//! states and gauges.

use bazel_remote_apis::build::bazel::remote::execution::v2::{
    ActionResult, OutputDirectory, OutputFile, RequestMetadata,
};
use prost::Message;
use tonic::metadata::MetadataValue;

use super::*;
use crate::context::REQUEST_METADATA_HEADER;

fn config() -> PrefetchConfig {
    PrefetchConfig {
        learning_actions: 2,
        small_output_size: 100,
        read_percent: 50,
        ..PrefetchConfig::default()
    }
}

fn ctx(invocation: &str, mnemonic: &str) -> RequestContext {
    let mut ctx = RequestContext::for_instance("main");
    let metadata = RequestMetadata {
        tool_invocation_id: invocation.into(),
        action_mnemonic: mnemonic.into(),
        ..Default::default()
    };
    ctx.headers.insert_bin(
        REQUEST_METADATA_HEADER,
        MetadataValue::from_bytes(&metadata.encode_to_vec()),
    );
    ctx
}

fn blob(name: &str, size: usize) -> Digest {
    Digest::of(
        DigestFunction::Sha256,
        &name.repeat(size).as_bytes()[..size],
    )
}

/// A result with one output file `out/<name>` of `size` bytes, stdout, and
/// an output directory named by its Tree.
fn result(name: &str, size: usize) -> (ActionResult, Digest, Digest, Digest) {
    let (file, stdout, tree) = (
        blob(name, size),
        blob(&format!("stdout {name}"), 10),
        blob(&format!("tree {name}"), 10),
    );
    let result = ActionResult {
        output_files: vec![OutputFile {
            path: format!("out/{name}"),
            digest: Some(file.to_proto()),
            ..Default::default()
        }],
        output_directories: vec![OutputDirectory {
            path: format!("out/{name}.d"),
            tree_digest: Some(tree.to_proto()),
            ..Default::default()
        }],
        stdout_digest: Some(stdout.to_proto()),
        ..Default::default()
    };
    (result, file, stdout, tree)
}

fn learner() -> (Learner, Arc<Stats>) {
    let stats = Arc::new(Stats::default());
    (Learner::new(config(), stats.clone()), stats)
}

#[test]
fn invocations_are_keyed_by_tool_invocation_id_else_instance() {
    assert_eq!(&*invocation_of(&ctx("i-1", "Genrule")).0, "invocation i-1");
    assert_eq!(invocation_of(&ctx("i-1", "Genrule")).1, "Genrule");
    let bare = RequestContext::for_instance("main");
    assert_eq!(&*invocation_of(&bare).0, "instance \"main\"");
    assert_eq!(&*invocation_of(&ctx("", "M")).0, "instance \"main\"");
}

#[test]
fn offers_count_files_and_directories_not_std_streams() {
    let (learner, stats) = learner();
    let (r, _, _, _) = result("a", 50);
    let offer = learner
        .offer(&ctx("i", "M"), DigestFunction::Sha256, &r)
        .unwrap();
    assert_eq!(
        (offer.std.len(), offer.files.len(), offer.dirs.len()),
        (1, 1, 1)
    );
    let c = learner.counts("invocation i");
    assert_eq!((c.actions, c.offered, c.read), (1, 2, 0));
    assert_eq!(Stats::get(&stats.prefetch_outputs_offered), 2);
    assert_eq!(Stats::get(&stats.prefetch_invocations_learning), 1);
}

#[test]
fn reads_credit_the_producing_invocation_once_and_decide_its_state() {
    let (learner, stats) = learner();
    let (r, file, stdout, tree) = result("a", 500);
    let offer = learner
        .offer(&ctx("i", "M"), DigestFunction::Sha256, &r)
        .unwrap();
    let inner = blob("inner", 20);
    learner.add_dir_contents(&offer, &offer.dirs[0], &[tree], &[inner]);
    // Learning: std streams and trees, small files; the large one waits.
    let wanted = learner.decide(
        &offer,
        &[
            (stdout, Kind::Std),
            (tree, Kind::Metadata),
            (inner, Kind::DirFile),
            (file, Kind::File),
        ],
    );
    assert_eq!(wanted, vec![stdout, tree, inner]);
    assert_eq!(Stats::get(&stats.prefetch_skipped_learning), 1);
    // Reading stdout or the Tree is no evidence.
    learner.client_read(&stdout, ReadSource::Local);
    learner.client_read(&tree, ReadSource::Local);
    assert_eq!(learner.counts("invocation i").read, 0);
    // A file inside the directory credits the directory; twice counts once.
    learner.client_read(&inner, ReadSource::Local);
    learner.client_read(&inner, ReadSource::Local);
    assert_eq!(learner.counts("invocation i").read, 1);
    assert_eq!(learner.state("invocation i"), State::Reading, "1 of 2");
    // The skipped file read anyway: missed, and read.
    learner.client_read(&file, ReadSource::Upstream);
    assert_eq!(learner.counts("invocation i").read, 2);
    assert_eq!(Stats::get(&stats.prefetch_missed), 1);
    assert_eq!(Stats::get(&stats.prefetch_outputs_read), 2);
    assert_eq!(Stats::get(&stats.prefetch_invocations_reading), 1);
    assert_eq!(Stats::get(&stats.prefetch_invocations_learning), 0);
}

#[test]
fn an_invocation_that_reads_nothing_stops_getting_files() {
    let (learner, stats) = learner();
    let c = ctx("quiet", "M");
    // Learning until 2 actions finished: the first one's small file only.
    for (i, expect) in [(0, true), (1, false), (2, false), (3, false)] {
        let (r, file, _, _) = result(&format!("f{i}"), 50);
        let offer = learner.offer(&c, DigestFunction::Sha256, &r).unwrap();
        let wanted = learner.decide(&offer, &[(file, Kind::File)]);
        assert_eq!(!wanted.is_empty(), expect, "action {i}");
    }
    assert_eq!(learner.state("invocation quiet"), State::NotReading);
    assert_eq!(Stats::get(&stats.prefetch_skipped_not_reading), 3);
    assert_eq!(Stats::get(&stats.prefetch_invocations_not_reading), 1);
}

#[test]
fn outputs_taken_as_input_are_skipped_unless_the_invocation_reads() {
    let (learner, stats) = learner();
    let (r, file, stdout, tree) = result("lib", 50);
    let offer = learner
        .offer(&ctx("i", "M"), DigestFunction::Sha256, &r)
        .unwrap();
    // Std streams and Trees are fetched regardless: not counted.
    learner.named(&ctx("i", "M2"), &[stdout, tree]);
    assert_eq!(Stats::get(&stats.prefetch_outputs_consumed), 0);
    // Another invocation naming it changes nothing.
    learner.named(&ctx("other", "M"), &[file]);
    assert_eq!(Stats::get(&stats.prefetch_outputs_consumed), 0);
    learner.named(&ctx("i", "M2"), &[file, blob("unknown", 3)]);
    learner.named(&ctx("i", "M2"), &[file]);
    assert_eq!(Stats::get(&stats.prefetch_outputs_consumed), 1);
    assert_eq!(learner.counts("invocation i").consumed, 1);
    assert!(learner.decide(&offer, &[(file, Kind::File)]).is_empty());
    assert_eq!(Stats::get(&stats.prefetch_skipped_input), 1);

    // A reading invocation gets its inputs all the same.
    let (r, file, _, _) = result("lib2", 50);
    let offer = learner
        .offer(&ctx("r", "M"), DigestFunction::Sha256, &r)
        .unwrap();
    learner.client_read(&file, ReadSource::Local);
    learner.named(&ctx("r", "M2"), &[file]);
    assert_eq!(learner.state("invocation r"), State::Reading);
    assert_eq!(learner.decide(&offer, &[(file, Kind::File)]), vec![file]);
}

#[test]
fn history_carries_reads_of_a_path_into_later_invocations() {
    let (learner, _) = learner();
    // Invocation 1 reads out/top (a large file).
    let (r, top, _, _) = result("top", 500);
    learner
        .offer(&ctx("one", "Link"), DigestFunction::Sha256, &r)
        .unwrap();
    learner.client_read(&top, ReadSource::Upstream);
    // Invocation 2 does not read in general...
    let c = ctx("two", "Link");
    for i in 0..4 {
        let (r, _, _, _) = result(&format!("mid{i}"), 500);
        learner.offer(&c, DigestFunction::Sha256, &r).unwrap();
    }
    assert_eq!(learner.state("invocation two"), State::NotReading);
    // ...but out/top (new bytes, same path and mnemonic) is wanted.
    let (mut r, _, _, _) = result("top", 500);
    let new_top = blob("new top", 500);
    r.output_files[0].digest = Some(new_top.to_proto());
    let offer = learner.offer(&c, DigestFunction::Sha256, &r).unwrap();
    assert_eq!(
        learner.decide(&offer, &[(new_top, Kind::File)]),
        vec![new_top]
    );
    // Another mnemonic writing that path has no such history.
    let (r, other, _, _) = result("top2", 500);
    let mut r = r;
    r.output_files[0].path = "out/top".into();
    let offer = learner
        .offer(&ctx("two", "Genrule"), DigestFunction::Sha256, &r)
        .unwrap();
    assert!(learner.decide(&offer, &[(other, Kind::File)]).is_empty());
}
