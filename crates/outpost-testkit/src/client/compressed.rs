//! Helpers for zstd-compressed blobs (`compressed-blobs` names, compressed
//! writes, compressed batch entries). They take bytes the test compressed
//! itself (with the `zstd` crate): the kit does not compress, so a test
//! never trusts a codec it shares with the code under test.

use tonic::{Code, Status};

use super::{Cas, entry_code, write_name, write_requests};
use crate::{bs, re};

/// REAPI's `Compressor.ZSTD`.
pub const ZSTD: i32 = re::compressor::Value::Zstd as i32;

/// `{instance}/compressed-blobs/zstd/{hash}/{size}`.
pub fn compressed_read_name(instance: &str, d: &re::Digest) -> String {
    let blob = format!("compressed-blobs/zstd/{}/{}", d.hash, d.size_bytes);
    if instance.is_empty() {
        blob
    } else {
        format!("{instance}/{blob}")
    }
}

/// `{instance}/uploads/{fresh uuid}/compressed-blobs/zstd/{hash}/{size}`.
pub fn compressed_write_name(instance: &str, d: &re::Digest) -> String {
    // The plain name's last `/blobs/` is the one after the upload id.
    let plain = write_name(instance, d);
    let at = plain
        .rfind("/blobs/")
        .expect("an upload name has `/blobs/`");
    format!(
        "{}/compressed-blobs/zstd/{}",
        &plain[..at],
        &plain[at + 7..]
    )
}

/// The WriteRequests of a compressed upload: `compressed` in `chunk`-byte
/// pieces, the first at the uncompressed offset `first_offset`, each later
/// one at `first_offset` plus the compressed bytes sent before it (REAPI's
/// rule for compressed writes); the resource name in the first one only.
pub fn compressed_write_requests(
    resource: &str,
    compressed: &[u8],
    first_offset: i64,
    chunk: usize,
    finish: bool,
) -> Vec<bs::WriteRequest> {
    let mut out = write_requests(resource, compressed, 0, chunk, finish);
    for request in &mut out {
        request.write_offset += first_offset;
    }
    out
}

/// BatchUpdateBlobs of `(digest, data, compressor)` entries (instance `""`);
/// returns each entry's code.
pub async fn batch_update_compressed(
    cas: &mut Cas,
    entries: Vec<(re::Digest, Vec<u8>, i32)>,
) -> Result<Vec<Code>, Status> {
    let resp = cas
        .batch_update_blobs(re::BatchUpdateBlobsRequest {
            requests: entries
                .into_iter()
                .map(
                    |(digest, data, compressor)| re::batch_update_blobs_request::Request {
                        digest: Some(digest),
                        data,
                        compressor,
                    },
                )
                .collect(),
            ..Default::default()
        })
        .await?
        .into_inner();
    Ok(resp
        .responses
        .iter()
        .map(|r| entry_code(&r.status))
        .collect())
}

/// BatchReadBlobs (instance `""`) accepting `acceptable` compressors;
/// returns each entry's code, compressor and data, as sent.
pub async fn batch_read_compressed(
    cas: &mut Cas,
    digests: &[re::Digest],
    acceptable: &[i32],
) -> Result<Vec<(Code, i32, Vec<u8>)>, Status> {
    let resp = cas
        .batch_read_blobs(re::BatchReadBlobsRequest {
            digests: digests.to_vec(),
            acceptable_compressors: acceptable.to_vec(),
            ..Default::default()
        })
        .await?
        .into_inner();
    Ok(resp
        .responses
        .into_iter()
        .map(|r| (entry_code(&r.status), r.compressor, r.data))
        .collect())
}
