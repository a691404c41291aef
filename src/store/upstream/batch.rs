//! The three batched upstream calls the batchers flush into:
//! FindMissingBlobs, BatchReadBlobs and BatchUpdateBlobs, each split to the
//! upstream's limits, with one answer per item in the order asked. Entries
//! cross zstd-compressed where the upstream takes it (see `encode_entry`,
//! `decode_entry`).

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use bazel_remote_apis::build::bazel::remote::execution::v2::{
    self as re, BatchReadBlobsRequest, BatchUpdateBlobsRequest, FindMissingBlobsRequest,
    batch_update_blobs_request,
};
use bazel_remote_apis::google::rpc;
use bytes::Bytes;
use tonic::{Code, Status};

use crate::compression::{self, Compressor};
use crate::context::RequestContext;
use crate::digest::{Digest, DigestFunction, verify};
use crate::error::{Error, Result, clip};
use crate::stats::{Stats, UpstreamMethod};
use crate::upstream::Upstream;
use crate::upstream::batcher::split_by_weight;
use crate::upstream::compressors::CompressedCall;

/// Digests per FindMissingBlobs call (about 0.8 MB of request).
pub const FMB_MAX_DIGESTS: usize = 10_000;

/// A digest as the upstream's answers name it.
type WireKey = (String, i64);

fn wire_key(d: &Digest) -> WireKey {
    (d.hash_hex(), d.size as i64)
}

/// The digests without repeats, in first-seen order.
fn unique(digests: &[Digest]) -> Vec<Digest> {
    let mut seen = HashSet::new();
    digests
        .iter()
        .filter(|d| seen.insert(**d))
        .copied()
        .collect()
}

/// FindMissingBlobs for merged digests: whether each one is missing.
pub async fn find_missing(
    up: Arc<Upstream>,
    ctx: RequestContext,
    digests: Vec<Digest>,
) -> Result<Vec<bool>> {
    let stats = up.stats();
    let mut missing = HashSet::new();
    let runs = same_function_runs(unique(&digests), |d| d.function);
    for chunk in runs.iter().flat_map(|run| run.chunks(FMB_MAX_DIGESTS)) {
        Stats::add(&stats.fmb_batches, 1);
        Stats::add(&stats.fmb_batched_digests, chunk.len() as u64);
        let message = FindMissingBlobsRequest {
            instance_name: up.instance(&ctx),
            blob_digests: chunk.iter().map(Digest::to_proto).collect(),
            digest_function: chunk[0].function.to_proto(),
        };
        let response = up
            .unary(&ctx, UpstreamMethod::FindMissingBlobs, || {
                let mut cas = up.cas(&ctx);
                let request = up.unary_request(&ctx, message.clone());
                async move { cas.find_missing_blobs(request).await }
            })
            .await?;
        for d in response.missing_blob_digests {
            missing.insert((d.hash, d.size_bytes));
        }
    }
    Ok(digests
        .iter()
        .map(|d| missing.contains(&wire_key(d)))
        .collect())
}

/// BatchReadBlobs for merged reads, in calls within the upstream's limit
/// (looked up now: the capabilities may have arrived since start-up).
pub async fn read(
    up: Arc<Upstream>,
    ctx: RequestContext,
    digests: Vec<Digest>,
) -> Result<Vec<Result<Bytes>>> {
    let mut out = Vec::with_capacity(digests.len());
    let runs = split_by_weight(digests, up.batch_limit(), |d| d.size);
    for run in runs
        .into_iter()
        .flat_map(|r| same_function_runs(r, |d| d.function))
    {
        out.extend(read_within_limit(&up, &ctx, run).await?);
    }
    Ok(out)
}

/// BatchUpdateBlobs for merged writes, in calls within the upstream's limit.
pub async fn write(
    up: Arc<Upstream>,
    ctx: RequestContext,
    blobs: Vec<(Digest, Bytes)>,
) -> Result<Vec<Result<()>>> {
    let mut out = Vec::with_capacity(blobs.len());
    let runs = split_by_weight(blobs, up.batch_limit(), |(d, _)| d.size);
    for run in runs
        .into_iter()
        .flat_map(|r| same_function_runs(r, |(d, _)| d.function))
    {
        out.extend(write_within_limit(&up, &ctx, run).await?);
    }
    Ok(out)
}

async fn read_within_limit(
    up: &Upstream,
    ctx: &RequestContext,
    digests: Vec<Digest>,
) -> Result<Vec<Result<Bytes>>> {
    let stats = up.stats();
    Stats::add(&stats.read_batches, 1);
    Stats::add(&stats.read_batched_blobs, digests.len() as u64);
    // zstd is offered when a blob of the batch is worth it; the upstream
    // picks per entry.
    let largest = digests.iter().map(|d| d.size).max().unwrap_or(0);
    let offered = up.compressor(largest, CompressedCall::Stream);
    let message = BatchReadBlobsRequest {
        instance_name: up.instance(ctx),
        digests: unique(&digests).iter().map(Digest::to_proto).collect(),
        acceptable_compressors: offered.iter().map(|c| c.to_proto()).collect(),
        digest_function: digests[0].function.to_proto(),
    };
    let response = up
        .unary(ctx, UpstreamMethod::BatchReadBlobs, || {
            let mut cas = up.cas(ctx);
            let request = up.unary_request(ctx, message.clone());
            async move { cas.batch_read_blobs(request).await }
        })
        .await?;
    let found = by_digest(
        up,
        response
            .responses
            .into_iter()
            .map(|r| (r.digest, r.status, (r.compressor, Bytes::from(r.data)))),
    );
    let received: usize = found.values().flatten().map(|(_, data)| data.len()).sum();
    Stats::add(&stats.upstream_bytes_received, received as u64);
    Ok(digests
        .iter()
        .map(|d| {
            let (compressor, data) = match found.get(&wire_key(d)) {
                Some(answer) => crate::error::duplicate(answer)?,
                None => return Err(Error::NotFound(format!("upstream did not return blob {d}"))),
            };
            let data = decode_entry(up, d, compressor, offered, data)?;
            verify(d, &Digest::of(d.function, &data))
                .map_err(|e| Error::Unavailable(format!("upstream sent corrupt data: {e}")))?;
            Ok(data)
        })
        .collect())
}

/// A BatchReadBlobs entry in plain: decoded (bounded by the digest's
/// size) when the upstream sent it with the compressor offered; an entry
/// in a compressor not offered, or that does not decode, is the upstream's
/// fault (UNAVAILABLE).
fn decode_entry(
    up: &Upstream,
    d: &Digest,
    compressor: i32,
    offered: Option<Compressor>,
    data: Bytes,
) -> Result<Bytes> {
    if compressor == 0 {
        return Ok(data);
    }
    let stats = up.stats();
    match offered.filter(|c| c.to_proto() == compressor) {
        Some(_) => {
            let plain = compression::decompress(&data, d.size).map_err(|e| {
                Error::Unavailable(format!(
                    "upstream sent corrupt compressed data for {d}: {}",
                    clip(&e.to_string())
                ))
            })?;
            Stats::add(&stats.upstream_compressed_wire_bytes, data.len() as u64);
            Stats::add(&stats.upstream_compressed_plain_bytes, d.size);
            Ok(plain)
        }
        None => Err(Error::Unavailable(format!(
            "upstream sent blob {d} with compressor {compressor}, which was not offered"
        ))),
    }
}

/// A BatchUpdateBlobs entry: zstd-compressed when the upstream takes it
/// for a blob this size and it saves at least 10%, else plain.
fn encode_entry(up: &Upstream, d: &Digest, data: &Bytes) -> batch_update_blobs_request::Request {
    let plain = |data: &Bytes| batch_update_blobs_request::Request {
        digest: Some(d.to_proto()),
        data: data.to_vec(),
        compressor: 0,
    };
    let Some(compressor) = up.compressor(d.size, CompressedCall::BatchUpdate) else {
        return plain(data);
    };
    let packed = compression::compress(data);
    if !compression::worth_it(d.size, packed.len() as u64) {
        return plain(data);
    }
    let stats = up.stats();
    Stats::add(&stats.upstream_compressed_wire_bytes, packed.len() as u64);
    Stats::add(&stats.upstream_compressed_plain_bytes, d.size);
    batch_update_blobs_request::Request {
        digest: Some(d.to_proto()),
        data: packed.to_vec(),
        compressor: compressor.to_proto(),
    }
}

async fn write_within_limit(
    up: &Upstream,
    ctx: &RequestContext,
    blobs: Vec<(Digest, Bytes)>,
) -> Result<Vec<Result<()>>> {
    let stats = up.stats();
    Stats::add(&stats.write_batches, 1);
    Stats::add(&stats.write_batched_blobs, blobs.len() as u64);
    let requests: Vec<_> = blobs
        .iter()
        .map(|(d, data)| encode_entry(up, d, data))
        .collect();
    let bytes: u64 = requests.iter().map(|r| r.data.len() as u64).sum();
    let message = BatchUpdateBlobsRequest {
        instance_name: up.instance(ctx),
        requests,
        digest_function: blobs[0].0.function.to_proto(),
    };
    let response = up
        .unary(ctx, UpstreamMethod::BatchUpdateBlobs, || {
            let mut cas = up.cas(ctx);
            let request = up.unary_request(ctx, message.clone());
            async move { cas.batch_update_blobs(request).await }
        })
        .await?;
    Stats::add(&stats.upstream_bytes_sent, bytes);
    let stored = by_digest(
        up,
        response
            .responses
            .into_iter()
            .map(|r| (r.digest, r.status, ())),
    );
    Ok(blobs
        .iter()
        .map(|(d, _)| match stored.get(&wire_key(d)) {
            Some(answer) => crate::error::duplicate(answer),
            None => Err(Error::Unavailable(format!(
                "upstream did not confirm blob {d}"
            ))),
        })
        .collect())
}

/// The per-blob answers of a Batch* call by digest: the payload where the
/// entry's status is OK (or absent), else that status as our error, naming
/// the upstream. Entries without a digest are skipped.
fn by_digest<X>(
    up: &Upstream,
    entries: impl IntoIterator<Item = (Option<re::Digest>, Option<rpc::Status>, X)>,
) -> HashMap<WireKey, Result<X>> {
    entries
        .into_iter()
        .filter_map(|(digest, status, payload)| {
            let digest = digest?;
            let status = status.unwrap_or_default();
            let answer = if status.code == Code::Ok as i32 {
                Ok(payload)
            } else {
                Err(up.error(&Status::new(Code::from_i32(status.code), status.message)))
            };
            Some(((digest.hash, digest.size_bytes), answer))
        })
        .collect()
}

/// Splits merged items into runs of one digest function, in order: a call
/// names one function (`digest_function`), and the batchers merge requests
/// of clients that may use different ones.
fn same_function_runs<T>(items: Vec<T>, function: impl Fn(&T) -> DigestFunction) -> Vec<Vec<T>> {
    let mut runs: Vec<Vec<T>> = Vec::new();
    for item in items {
        match runs.last_mut() {
            Some(run) if run.first().map(&function) == Some(function(&item)) => run.push(item),
            _ => runs.push(vec![item]),
        }
    }
    runs
}

#[cfg(test)]
mod function_tests {
    use super::*;

    #[test]
    fn merged_items_split_into_runs_of_one_function_in_order() {
        let (s, b) = (DigestFunction::Sha256, DigestFunction::Blake3);
        let items = vec![(s, 1), (s, 2), (b, 3), (s, 4)];
        let runs = same_function_runs(items, |(f, _)| *f);
        assert_eq!(runs, vec![vec![(s, 1), (s, 2)], vec![(b, 3)], vec![(s, 4)]]);
        assert!(same_function_runs(Vec::<(DigestFunction, u8)>::new(), |(f, _)| *f).is_empty());
    }
}
