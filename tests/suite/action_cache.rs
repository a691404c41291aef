//! ActionCache: GetActionResult and UpdateActionResult.

use prost::Message;
use tonic::Code;

use crate::common::*;

fn get(instance: &str, action: &re::Digest) -> re::GetActionResultRequest {
    re::GetActionResultRequest {
        instance_name: instance.to_string(),
        action_digest: Some(action.clone()),
        ..Default::default()
    }
}

async fn update(
    ac: &mut ActionCache,
    instance: &str,
    action: &re::Digest,
    result: re::ActionResult,
) -> Result<re::ActionResult, tonic::Status> {
    Ok(ac
        .update_action_result(re::UpdateActionResultRequest {
            instance_name: instance.to_string(),
            action_digest: Some(action.clone()),
            action_result: Some(result),
            results_cache_policy: None,
            digest_function: 0,
        })
        .await?
        .into_inner())
}

fn output_file(path: &str, data: &[u8]) -> re::OutputFile {
    re::OutputFile {
        path: path.to_string(),
        digest: Some(digest(data)),
        is_executable: true,
        contents: Vec::new(),
        node_properties: None,
    }
}

fn file_node(name: &str, data: &[u8]) -> re::FileNode {
    re::FileNode {
        name: name.to_string(),
        digest: Some(digest(data)),
        is_executable: false,
        node_properties: None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn results_are_stored_per_instance_and_action_digest() {
    let server = TestServer::start().await;
    let mut ac = server.action_cache();
    let out = blob(1, 100);
    assert_eq!(
        batch_update(&mut server.cas(), "", &[&out]).await,
        vec![Code::Ok]
    );
    let action = digest(b"action 1");
    let result = re::ActionResult {
        output_files: vec![output_file("bazel-out/bin/a.o", &out)],
        exit_code: 0,
        execution_metadata: Some(re::ExecutedActionMetadata {
            worker: "worker-7".into(),
            ..Default::default()
        }),
        ..Default::default()
    };
    assert_eq!(
        update(&mut ac, "main/x", &action, result.clone())
            .await
            .unwrap(),
        result
    );

    assert_eq!(
        ac.get_action_result(get("main/x", &action))
            .await
            .unwrap()
            .into_inner(),
        result
    );
    for other in ["", "main", "main/x/y", "other"] {
        assert_code(
            ac.get_action_result(get(other, &action)).await,
            Code::NotFound,
        );
    }
    assert_code(
        ac.get_action_result(get("main/x", &digest(b"action 2")))
            .await,
        Code::NotFound,
    );

    // The same action under another instance is a separate entry.
    let other = re::ActionResult {
        exit_code: 1,
        ..result.clone()
    };
    update(&mut ac, "other", &action, other.clone())
        .await
        .unwrap();
    assert_eq!(
        ac.get_action_result(get("other", &action))
            .await
            .unwrap()
            .into_inner(),
        other
    );
    assert_eq!(
        ac.get_action_result(get("main/x", &action))
            .await
            .unwrap()
            .into_inner(),
        result
    );

    let s = stats(&server).await;
    assert_eq!(s.action_result_count, 2);
    assert_eq!((s.action_cache_hits, s.action_cache_misses), (3, 5));
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inline_flags_choose_which_contents_come_back() {
    let server = TestServer::start().await;
    let mut ac = server.action_cache();
    let (stdout, stderr, f1, f2) = (blob(1, 50), blob(2, 60), blob(3, 70), blob(4, 80));
    assert_eq!(
        batch_update(&mut server.cas(), "", &[&stdout, &stderr, &f1, &f2]).await,
        vec![Code::Ok; 4]
    );
    let action = digest(b"inline action");
    let result = re::ActionResult {
        output_files: vec![output_file("out/f1", &f1), output_file("out/f2", &f2)],
        stdout_digest: Some(digest(&stdout)),
        stderr_digest: Some(digest(&stderr)),
        ..Default::default()
    };
    update(&mut ac, "", &action, result.clone()).await.unwrap();

    let plain = ac
        .get_action_result(get("", &action))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(plain, result, "nothing inlined unless asked");

    let mut req = get("", &action);
    req.inline_stdout = true;
    req.inline_output_files = vec!["out/f2".into()];
    let got = ac.get_action_result(req).await.unwrap().into_inner();
    assert_eq!(got.stdout_raw, stdout);
    assert_eq!(got.stderr_raw, b"");
    assert_eq!(got.output_files[0].contents, b"");
    assert_eq!(got.output_files[1].contents, f2);
    // Digests stay set next to inlined contents.
    assert_eq!(got.stdout_digest, Some(digest(&stdout)));
    assert_eq!(got.output_files[1].digest, Some(digest(&f2)));

    let mut req = get("", &action);
    req.inline_stderr = true;
    req.inline_output_files = vec!["out/f1".into()];
    let got = ac.get_action_result(req).await.unwrap().into_inner();
    assert_eq!((got.stdout_raw, got.stderr_raw), (vec![], stderr));
    assert_eq!(got.output_files[0].contents, f1);
    assert_eq!(got.output_files[1].contents, b"");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inlining_stays_within_the_message_size_limit() {
    let server = TestServer::start().await;
    let mut ac = server.action_cache();
    let big = blob(1, (3 << 20) + 1); // over the server's 3 MiB inline budget alone
    let (mid_a, mid_b) = (blob(2, 2 << 20), blob(3, 2 << 20)); // one fits, not both
    let small = blob(4, 1000);
    for data in [&big, &mid_a, &mid_b, &small] {
        upload(&mut server.bytestream(), "", data, 1 << 20)
            .await
            .unwrap();
    }
    let action = digest(b"large outputs");
    let result = re::ActionResult {
        output_files: vec![
            output_file("out/big", &big),
            output_file("out/mid_a", &mid_a),
            output_file("out/mid_b", &mid_b),
            output_file("out/small", &small),
        ],
        stdout_digest: Some(digest(&big)),
        ..Default::default()
    };
    update(&mut ac, "", &action, result.clone()).await.unwrap();
    let mut req = get("", &action);
    req.inline_stdout = true;
    req.inline_output_files = result.output_files.iter().map(|f| f.path.clone()).collect();
    // A client with gRPC's default 4 MiB message limit can decode the answer.
    let got = ActionCache::new(server.channel())
        .get_action_result(req)
        .await
        .unwrap()
        .into_inner();
    let inlined: Vec<usize> = got.output_files.iter().map(|f| f.contents.len()).collect();
    assert_eq!(got.stdout_raw.len(), 0, "too large to inline");
    assert_eq!(inlined, vec![0, 2 << 20, 0, 1000]);
    assert!(got.output_files[1].contents == mid_a);
    assert_eq!(got.output_files[3].contents, small);
    // Digests are always there, inlined or not.
    let digests: Vec<_> = got.output_files.iter().map(|f| f.digest.clone()).collect();
    let want: Vec<_> = result
        .output_files
        .iter()
        .map(|f| f.digest.clone())
        .collect();
    assert_eq!(digests, want);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inlined_contents_of_an_update_are_moved_into_the_cas() {
    let server = TestServer::start().await;
    let mut ac = server.action_cache();
    let (stdout, stderr, contents) = (
        b"compiling...\n".to_vec(),
        b"warning: x\n".to_vec(),
        blob(1, 2000),
    );
    let action = digest(b"inlined update");
    let sent = re::ActionResult {
        output_files: vec![re::OutputFile {
            path: "out/gen.h".into(),
            digest: None, // the server fills it in
            contents: contents.clone(),
            ..Default::default()
        }],
        stdout_raw: stdout.clone(),
        stderr_raw: stderr.clone(),
        stderr_digest: Some(digest(&stderr)), // a correct claimed digest is fine
        ..Default::default()
    };
    let stored = re::ActionResult {
        output_files: vec![re::OutputFile {
            path: "out/gen.h".into(),
            digest: Some(digest(&contents)),
            ..Default::default()
        }],
        stdout_digest: Some(digest(&stdout)),
        stderr_digest: Some(digest(&stderr)),
        ..Default::default()
    };
    assert_eq!(update(&mut ac, "i", &action, sent).await.unwrap(), stored);
    assert_eq!(
        ac.get_action_result(get("i", &action))
            .await
            .unwrap()
            .into_inner(),
        stored
    );

    let mut bs = server.bytestream();
    for data in [&stdout, &stderr, &contents] {
        let (got, _) = read_blob(&mut bs, &read_name("", &digest(data)), 0, 0)
            .await
            .unwrap();
        assert_eq!(&got, data);
    }
    // Only the digests are kept with the result: it is much smaller than the contents.
    let s = stats(&server).await;
    assert_eq!((s.blob_count, s.action_result_count), (3, 1));

    // Inlined contents that disagree with their claimed digest are refused.
    let lying = re::ActionResult {
        stdout_raw: b"real output".to_vec(),
        stdout_digest: Some(digest(b"other output")),
        ..Default::default()
    };
    let other_action = digest(b"lying update");
    assert_code(
        update(&mut ac, "i", &other_action, lying).await,
        Code::InvalidArgument,
    );
    assert_code(
        ac.get_action_result(get("i", &other_action)).await,
        Code::NotFound,
    );
    assert_eq!(stats(&server).await.action_result_count, 1);
    server.stop().await;
}

/// Every blob a complete ActionResult references, by role, and the result.
struct Outputs {
    blobs: Vec<(&'static str, Vec<u8>)>,
    result: re::ActionResult,
}

/// A result with an output file, stdout, stderr, an output directory as a
/// Tree (with a file in its root and one in a child) and one as a
/// `root_directory_digest` hierarchy. `seed` makes every blob distinct.
fn outputs(seed: u64) -> Outputs {
    let b = |i: u64| blob(seed * 100 + i, 100);
    let (file, stdout, stderr, in_tree, in_child, in_dir) = (b(1), b(2), b(3), b(4), b(5), b(6));
    let child = re::Directory {
        files: vec![file_node("c", &in_child)],
        ..Default::default()
    };
    let tree = re::Tree {
        root: Some(re::Directory {
            files: vec![file_node("t", &in_tree)],
            directories: vec![re::DirectoryNode {
                name: "sub".into(),
                digest: Some(digest(&child.encode_to_vec())),
            }],
            ..Default::default()
        }),
        children: vec![child],
    }
    .encode_to_vec();
    let root_dir = re::Directory {
        files: vec![file_node("d", &in_dir)],
        ..Default::default()
    }
    .encode_to_vec();
    let result = re::ActionResult {
        output_files: vec![output_file("out/f", &file)],
        output_directories: vec![
            re::OutputDirectory {
                path: "out/tree".into(),
                tree_digest: Some(digest(&tree)),
                ..Default::default()
            },
            re::OutputDirectory {
                path: "out/dir".into(),
                root_directory_digest: Some(digest(&root_dir)),
                ..Default::default()
            },
        ],
        stdout_digest: Some(digest(&stdout)),
        stderr_digest: Some(digest(&stderr)),
        ..Default::default()
    };
    Outputs {
        blobs: vec![
            ("output file", file),
            ("stdout", stdout),
            ("stderr", stderr),
            ("tree blob", tree),
            ("file in a tree's root", in_tree),
            ("file in a tree's child", in_child),
            ("root directory", root_dir),
            ("file under root_directory_digest", in_dir),
        ],
        result,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn results_with_missing_outputs_are_not_found_and_stay_gone() {
    let server = TestServer::start().await;
    let mut ac = server.action_cache();
    let mut cas = server.cas();

    // With every blob present, the result is served.
    let all = outputs(0);
    let blobs: Vec<&[u8]> = all.blobs.iter().map(|(_, b)| b.as_slice()).collect();
    assert_eq!(batch_update(&mut cas, "", &blobs).await, vec![Code::Ok; 8]);
    let action = digest(b"complete action");
    update(&mut ac, "", &action, all.result.clone())
        .await
        .unwrap();
    assert_eq!(
        ac.get_action_result(get("", &action))
            .await
            .unwrap()
            .into_inner(),
        all.result
    );

    // Each case: the same shape of result with one referenced blob absent.
    for case in 0..8 {
        let o = outputs(case as u64 + 1);
        let (what, missing) = &o.blobs[case];
        let present: Vec<&[u8]> = o
            .blobs
            .iter()
            .enumerate()
            .filter(|(i, _)| *i != case)
            .map(|(_, (_, b))| b.as_slice())
            .collect();
        assert_eq!(
            batch_update(&mut cas, "", &present).await,
            vec![Code::Ok; 7]
        );

        let action = digest(format!("action {case}").as_bytes());
        update(&mut ac, "", &action, o.result.clone())
            .await
            .unwrap();
        assert_code(ac.get_action_result(get("", &action)).await, Code::NotFound);
        // Uploading the missing blob later does not resurrect the result.
        assert_eq!(
            batch_update(&mut cas, "", &[missing]).await,
            vec![Code::Ok],
            "{what}"
        );
        let again = ac.get_action_result(get("", &action)).await;
        assert!(again.is_err(), "{what}: the result came back");
        assert_code(again, Code::NotFound);
    }

    let s = stats(&server).await;
    assert_eq!(s.stale_action_results, 8);
    assert_eq!(s.action_result_count, 1);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn empty_outputs_never_make_a_result_incomplete() {
    let server = TestServer::start().await;
    let mut ac = server.action_cache();
    let empty_dir = re::Directory::default().encode_to_vec();
    let tree = re::Tree {
        root: Some(re::Directory {
            files: vec![file_node("empty", b"")],
            ..Default::default()
        }),
        children: vec![],
    }
    .encode_to_vec();
    assert_eq!(
        batch_update(&mut server.cas(), "", &[&tree]).await,
        vec![Code::Ok]
    );
    let action = digest(b"empty outputs");
    let result = re::ActionResult {
        output_files: vec![output_file("out/empty", b"")],
        output_directories: vec![
            re::OutputDirectory {
                path: "out/tree".into(),
                tree_digest: Some(digest(&tree)),
                ..Default::default()
            },
            re::OutputDirectory {
                path: "out/nothing".into(),
                root_directory_digest: Some(digest(&empty_dir)), // the empty blob
                ..Default::default()
            },
        ],
        stdout_digest: Some(digest(b"")),
        ..Default::default()
    };
    update(&mut ac, "", &action, result.clone()).await.unwrap();
    let mut req = get("", &action);
    req.inline_stdout = true;
    req.inline_output_files = vec!["out/empty".into()];
    assert_eq!(
        ac.get_action_result(req).await.unwrap().into_inner(),
        result
    );
    assert_eq!(stats(&server).await.stale_action_results, 0);
    server.stop().await;
}
