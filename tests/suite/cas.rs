//! ContentAddressableStorage: FindMissingBlobs, Batch{Update,Read}Blobs, GetTree.

use prost::Message;
use tonic::Code;

use crate::common::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn find_missing_reports_absent_blobs_in_order_and_never_the_empty_blob() {
    let server = TestServer::start().await;
    let mut cas = server.cas();
    let present = blob(1, 100);
    let absent_a = blob(2, 100);
    let absent_b = blob(3, 5 << 20);
    let empty = digest(b"");
    assert_eq!(empty.hash, EMPTY_HASH);

    assert_eq!(
        batch_update(&mut cas, "", &[&present]).await,
        vec![Code::Ok]
    );
    let query = [
        digest(&absent_b),
        digest(&present),
        empty.clone(),
        digest(&absent_a),
    ];
    assert_eq!(
        find_missing(&mut cas, &query).await,
        vec![digest(&absent_b), digest(&absent_a)]
    );
    // The empty blob was never written, yet it is never missing.
    assert_eq!(find_missing(&mut cas, &[empty]).await, vec![]);
    // Same hash, different size: a different blob.
    let wrong_size = raw_digest(&digest(&present).hash, 99);
    assert_eq!(
        find_missing(&mut cas, std::slice::from_ref(&wrong_size)).await,
        vec![wrong_size]
    );
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batch_update_then_batch_read_round_trips_and_reports_per_entry_status() {
    let server = TestServer::start().await;
    let mut cas = server.cas();
    let small = blob(10, 10);
    let medium = blob(11, (2 << 20) + 1); // over the inline limit: a file
    let empty: Vec<u8> = Vec::new();
    let bad = blob(12, 64);
    let missing = blob(13, 64);

    // One entry with a hash that does not match its data: only it fails.
    let entries = vec![
        (digest(&small), small.clone()),
        (digest(&missing), bad.clone()),
        (digest(&medium), medium.clone()),
        (digest(&empty), empty.clone()),
    ];
    assert_eq!(
        batch_update_raw(&mut cas, "", entries).await.unwrap(),
        vec![Code::Ok, Code::InvalidArgument, Code::Ok, Code::Ok]
    );
    assert_eq!(
        find_missing(
            &mut cas,
            &[digest(&small), digest(&medium), digest(&missing)]
        )
        .await,
        vec![digest(&missing)]
    );

    let wanted = vec![
        digest(&medium),
        digest(&missing),
        digest(&empty),
        digest(&small),
        digest(&bad),
    ];
    let resp = cas
        .batch_read_blobs(re::BatchReadBlobsRequest {
            instance_name: "any/instance".into(),
            digests: wanted.clone(),
            acceptable_compressors: vec![],
            digest_function: 0,
        })
        .await
        .unwrap()
        .into_inner();
    let got: Vec<(re::Digest, Code, Vec<u8>)> = resp
        .responses
        .into_iter()
        .map(|r| (r.digest.clone().unwrap(), entry_code(&r.status), r.data))
        .collect();
    assert_eq!(
        got,
        vec![
            (digest(&medium), Code::Ok, medium),
            (digest(&missing), Code::NotFound, vec![]),
            (digest(&empty), Code::Ok, vec![]),
            (digest(&small), Code::Ok, small),
            (digest(&bad), Code::NotFound, vec![]),
        ]
    );
    let s = stats(&server).await;
    assert_eq!(
        (s.blob_count, s.blobs_written, s.digest_mismatches),
        (2, 2, 1)
    );
    assert_eq!(list_files(&server.data_dir().join("blobs")).len(), 1);
    server.stop().await;
}

/// Uploads a Directory message and returns its digest.
async fn put_dir(cas: &mut Cas, dir: &re::Directory) -> re::Digest {
    let bytes = dir.encode_to_vec();
    assert_eq!(batch_update(cas, "", &[&bytes]).await, vec![Code::Ok]);
    digest(&bytes)
}

fn dir_with(file_seed: u64, children: &[(&str, &re::Digest)]) -> re::Directory {
    re::Directory {
        files: vec![re::FileNode {
            name: format!("file-{file_seed}"),
            digest: Some(digest(&blob(file_seed, 10))),
            is_executable: false,
            node_properties: None,
        }],
        directories: children
            .iter()
            .map(|(name, d)| re::DirectoryNode {
                name: name.to_string(),
                digest: Some((*d).clone()),
            })
            .collect(),
        ..Default::default()
    }
}

async fn get_tree(
    cas: &mut Cas,
    root: &re::Digest,
    page_size: i32,
    token: &str,
) -> Result<Vec<(Vec<re::Directory>, String)>, tonic::Status> {
    let stream = cas
        .get_tree(re::GetTreeRequest {
            instance_name: "a/b".into(),
            root_digest: Some(root.clone()),
            page_size,
            page_token: token.to_string(),
            digest_function: 0,
        })
        .await?
        .into_inner();
    Ok(collect(stream)
        .await?
        .into_iter()
        .map(|page| (page.directories, page.next_page_token))
        .collect())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn get_tree_pages_breadth_first_and_resumes_from_page_tokens() {
    let server = TestServer::start().await;
    let mut cas = server.cas();
    // root -> {a, b}; a -> {a1, shared}; b -> {shared}. `shared` is listed once.
    let shared = dir_with(5, &[]);
    let a1 = dir_with(4, &[]);
    let shared_d = put_dir(&mut cas, &shared).await;
    let a1_d = put_dir(&mut cas, &a1).await;
    let a = dir_with(2, &[("a1", &a1_d), ("shared", &shared_d)]);
    let b = dir_with(3, &[("shared", &shared_d)]);
    let a_d = put_dir(&mut cas, &a).await;
    let b_d = put_dir(&mut cas, &b).await;
    let root = dir_with(1, &[("a", &a_d), ("b", &b_d)]);
    let root_d = put_dir(&mut cas, &root).await;

    let all = vec![
        root.clone(),
        a.clone(),
        b.clone(),
        a1.clone(),
        shared.clone(),
    ];
    // No page size: everything in one page, no token.
    assert_eq!(
        get_tree(&mut cas, &root_d, 0, "").await.unwrap(),
        vec![(all, String::new())]
    );

    // Pages of two, each with the token of the next.
    let pages = get_tree(&mut cas, &root_d, 2, "").await.unwrap();
    assert_eq!(pages.len(), 3, "{pages:?}");
    assert_eq!(pages[0].0, vec![root.clone(), a.clone()]);
    assert_eq!(pages[1].0, vec![b.clone(), a1.clone()]);
    assert_eq!(pages[2].0, vec![shared.clone()]);
    assert_eq!(pages[2].1, "", "the last page has no token");

    // Resuming from each token returns that page and the ones after it.
    let from_second = get_tree(&mut cas, &root_d, 2, &pages[0].1).await.unwrap();
    assert_eq!(from_second, pages[1..].to_vec());
    let from_third = get_tree(&mut cas, &root_d, 2, &pages[1].1).await.unwrap();
    assert_eq!(from_third, pages[2..].to_vec());

    // A malformed token is refused.
    assert_code(
        get_tree(&mut cas, &root_d, 2, "not-a-token").await,
        Code::InvalidArgument,
    );
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn get_tree_omits_missing_subtrees_and_fails_for_a_missing_root() {
    let server = TestServer::start().await;
    let mut cas = server.cas();
    let present = dir_with(2, &[]);
    let present_d = put_dir(&mut cas, &present).await;
    let lost = dir_with(3, &[]);
    let lost_d = digest(&lost.encode_to_vec()); // never uploaded
    let root = dir_with(1, &[("lost", &lost_d), ("present", &present_d)]);
    let root_d = put_dir(&mut cas, &root).await;

    assert_eq!(
        get_tree(&mut cas, &root_d, 0, "").await.unwrap(),
        vec![(vec![root, present], String::new())]
    );
    assert_code(get_tree(&mut cas, &lost_d, 0, "").await, Code::NotFound);
    server.stop().await;
}
