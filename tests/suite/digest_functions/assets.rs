//! Remote Asset entries and checksum lookups per digest function.

use re::digest_function::Value as Function;
use tonic::Code;

use super::{batch_update_in, digest_in};
use crate::common::*;

/// FetchBlob of `uri` in function `f` with an optional `checksum.sri`.
async fn fetch_in(
    fetch: &mut crate::suite::asset::Fetch,
    f: Function,
    uri: &str,
    sri: Option<String>,
) -> bazel_remote_apis::build::bazel::remote::asset::v1::FetchBlobResponse {
    use crate::suite::asset::{q, uris};
    fetch
        .fetch_blob(
            bazel_remote_apis::build::bazel::remote::asset::v1::FetchBlobRequest {
                uris: uris(&[uri]),
                qualifiers: sri.map(|v| q("checksum.sri", &v)).into_iter().collect(),
                digest_function: f as i32,
                ..Default::default()
            },
        )
        .await
        .expect("FetchBlob answers")
        .into_inner()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn assets_are_kept_and_found_per_digest_function() {
    use crate::suite::asset::{asset_clients, inline, uris};
    use base64::Engine as _;
    let server = TestServer::start_with(|c| c.asset.origin_fetch = false).await;
    let (mut fetch, mut push) = asset_clients(&server);
    let mut cas = server.cas();
    let data = blob(50, 3000);

    // A `sha512-` checksum finds a blob stored in SHA-512.
    let sha512 = digest_in(Function::Sha512, &data);
    batch_update_in(&mut cas, Function::Sha512, true, &[&data])
        .await
        .unwrap();
    let raw = hex::decode(&sha512.hash).unwrap();
    let sri = format!(
        "sha512-{}",
        base64::engine::general_purpose::STANDARD.encode(raw)
    );
    let hit = fetch_in(
        &mut fetch,
        Function::Sha512,
        "https://x/a",
        Some(sri.clone()),
    )
    .await;
    assert_eq!(inline(&hit.status), Code::Ok, "{hit:?}");
    assert_eq!(hit.blob_digest, Some(sha512.clone()));
    assert_eq!(hit.digest_function, Function::Sha512 as i32);
    // Asked in SHA-256 (no origin fetch here): no SHA-512 digest comes back.
    let miss = fetch_in(&mut fetch, Function::Sha256, "https://x/a", Some(sri)).await;
    assert_ne!(inline(&miss.status), Code::Ok, "{miss:?}");

    // A BLAKE3 push is found by a BLAKE3 fetch only.
    let blake3 = digest_in(Function::Blake3, &data);
    batch_update_in(&mut cas, Function::Blake3, true, &[&data])
        .await
        .unwrap();
    push.push_blob(
        bazel_remote_apis::build::bazel::remote::asset::v1::PushBlobRequest {
            uris: uris(&["https://x/b"]),
            blob_digest: Some(blake3.clone()),
            digest_function: Function::Blake3 as i32,
            ..Default::default()
        },
    )
    .await
    .unwrap();
    let hit = fetch_in(&mut fetch, Function::Blake3, "https://x/b", None).await;
    assert_eq!(inline(&hit.status), Code::Ok, "{hit:?}");
    assert_eq!(hit.blob_digest, Some(blake3));
    let miss = fetch_in(&mut fetch, Function::Sha256, "https://x/b", None).await;
    assert_ne!(inline(&miss.status), Code::Ok, "{miss:?}");
}
