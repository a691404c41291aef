//! Well-formed protobuf carrying invalid requests: digests, resource names,
//! read ranges and write sequences (the rest is in `messages.rs`).

use super::{Fuzz, bad_hashes, bad_names, entry};
use crate::common::*;

const INVALID: &[Code] = &[Code::InvalidArgument];
const RANGE: &[Code] = &[Code::InvalidArgument, Code::OutOfRange];

fn read(
    bs: &ByteStream,
    name: String,
    offset: i64,
    limit: i64,
) -> impl Future<Output = Result<(Vec<u8>, Vec<usize>), Status>> {
    let mut bs = bs.clone();
    async move { read_blob(&mut bs, &name, offset, limit).await }
}

fn send(
    bs: &ByteStream,
    requests: Vec<bs::WriteRequest>,
) -> impl Future<Output = Result<i64, Status>> {
    let mut bs = bs.clone();
    async move { write(&mut bs, requests).await }
}

/// A Batch* entry's code as a call result.
fn coded(code: Code) -> Result<(), Status> {
    match code {
        Code::Ok => Ok(()),
        code => Err(Status::new(code, "")),
    }
}

fn wr(name: &str, offset: i64, data: &[u8], finish: bool) -> bs::WriteRequest {
    bs::WriteRequest {
        resource_name: name.to_string(),
        write_offset: offset,
        finish_write: finish,
        data: data.to_vec(),
    }
}

/// Malformed hashes and sizes on every call that takes a digest.
pub async fn digests(f: &mut Fuzz) {
    let (mut cas, bs, mut ac) = (
        f.channel.cas(),
        f.channel.bytestream(),
        f.channel.action_cache(),
    );
    let good = f.good_digest();
    let mut bad: Vec<(&str, &str, re::Digest)> = bad_hashes(&good.hash)
        .into_iter()
        .map(|(what, h)| ("digest: bad hash", what, raw_digest(&h, good.size_bytes)))
        .collect();
    bad.push(("digest: bad size", "negative", raw_digest(&good.hash, -1)));
    bad.push((
        "digest: bad size",
        "i64::MIN",
        raw_digest(&good.hash, i64::MIN),
    ));
    for (class, what, d) in bad {
        let find = re::FindMissingBlobsRequest {
            blob_digests: vec![good.clone(), d.clone()],
            ..Default::default()
        };
        f.expect(
            class,
            &format!("FindMissingBlobs {what}"),
            cas.find_missing_blobs(find),
            INVALID,
        )
        .await;
        let batch = re::BatchReadBlobsRequest {
            digests: vec![d.clone()],
            ..Default::default()
        };
        let answer = cas
            .batch_read_blobs(batch)
            .await
            .map(|r| r.into_inner().responses);
        let first = answer.map(|r| entry(r.first().and_then(|e| e.status.as_ref())));
        f.expect(
            class,
            &format!("BatchReadBlobs {what}"),
            async { first? },
            INVALID,
        )
        .await;
        let updated = batch_update_raw(&mut cas, "", vec![(d.clone(), f.good.clone())]).await;
        let first = updated.map(|codes| coded(codes[0]));
        f.expect(
            class,
            &format!("BatchUpdateBlobs {what}"),
            async { first? },
            INVALID,
        )
        .await;
        if !d.hash.is_empty() {
            f.expect(
                class,
                &format!("Read {what}"),
                read(&bs, read_name("", &d), 0, 0),
                INVALID,
            )
            .await;
            let requests = write_requests(&write_name("", &d), &f.good, 0, 1000, true);
            f.expect(
                class,
                &format!("Write {what}"),
                send(&bs, requests),
                INVALID,
            )
            .await;
        }
        let tree = re::GetTreeRequest {
            root_digest: Some(d.clone()),
            ..Default::default()
        };
        f.expect(
            class,
            &format!("GetTree {what}"),
            cas.get_tree(tree),
            INVALID,
        )
        .await;
        let get = re::GetActionResultRequest {
            action_digest: Some(d.clone()),
            ..Default::default()
        };
        f.expect(
            class,
            &format!("GetActionResult {what}"),
            ac.get_action_result(get),
            INVALID,
        )
        .await;
        let update = re::UpdateActionResultRequest {
            action_digest: Some(d.clone()),
            action_result: Some(re::ActionResult::default()),
            ..Default::default()
        };
        f.expect(
            class,
            &format!("UpdateActionResult {what}"),
            ac.update_action_result(update),
            INVALID,
        )
        .await;
    }
    // Entries whose declared digest does not match their bytes.
    let g = &f.good;
    for (what, d, data) in [
        (
            "size + 1",
            raw_digest(&good.hash, good.size_bytes + 1),
            g.clone(),
        ),
        (
            "size - 1",
            raw_digest(&good.hash, good.size_bytes - 1),
            g.clone(),
        ),
        ("other bytes", good.clone(), blob(1, g.len())),
        ("one byte short", good.clone(), g[1..].to_vec()),
    ] {
        let updated = batch_update_raw(&mut cas, "", vec![(d, data)]).await;
        let first = updated.map(|codes| coded(codes[0]));
        f.expect(
            "digest: does not match the data",
            what,
            async { first? },
            INVALID,
        )
        .await;
    }
}

/// Resource names of every shape and length on Read, Write and QueryWriteStatus.
pub async fn names(f: &mut Fuzz) {
    let bs = f.channel.bytestream();
    let good = f.good_digest();
    let mut write_names = bad_names(&good);
    write_names.push((read_name("", &good), INVALID));
    for (name, allowed) in bad_names(&good) {
        f.expect(
            "resource name: Read",
            &name,
            read(&bs, name.clone(), 0, 0),
            allowed,
        )
        .await;
    }
    for (name, allowed) in write_names {
        let requests = vec![wr(&name, 0, &f.good, true)];
        f.expect("resource name: Write", &name, send(&bs, requests), allowed)
            .await;
        let query = bs::QueryWriteStatusRequest {
            resource_name: name.clone(),
        };
        f.expect(
            "resource name: QueryWriteStatus",
            &name,
            bs.clone().query_write_status(query),
            allowed,
        )
        .await;
    }
    // A compressor Outpost does not offer, on an upload name of a stored blob.
    let name = format!(
        "uploads/{}/compressed-blobs/deflate/{}/{}",
        "3f0c2a8e-0000-4000-8000-00000000c0de", good.hash, good.size_bytes
    );
    let query = bs::QueryWriteStatusRequest {
        resource_name: name.clone(),
    };
    f.expect(
        "compressor: QueryWriteStatus",
        &name,
        bs.clone().query_write_status(query),
        &[Code::Unimplemented],
    )
    .await;
    f.expect(
        "compressor: Write",
        &name,
        send(&bs, vec![wr(&name, 0, &f.good, true)]),
        &[Code::Unimplemented],
    )
    .await;
}

/// Read offsets and limits outside the blob.
pub async fn read_ranges(f: &mut Fuzz) {
    let bs = f.channel.bytestream();
    let name = read_name("", &f.good_digest());
    let size = f.good.len() as i64;
    for (what, offset, limit) in [
        ("negative offset", -1, 0),
        ("offset past the end", size + 1, 0),
        ("offset i64::MAX", i64::MAX, 0),
        ("offset i64::MIN", i64::MIN, 0),
        ("negative limit", 0, -1),
        ("limit i64::MIN", 10, i64::MIN),
    ] {
        f.expect(
            "read: offset or limit out of range",
            what,
            read(&bs, name.clone(), offset, limit),
            RANGE,
        )
        .await;
    }
}

/// Write sequences the ByteStream protocol forbids, each on a fresh blob.
pub async fn write_sequences(f: &mut Fuzz) {
    let bs = f.channel.bytestream();
    let mut n = 0u64;
    let mut fresh = || {
        n += 1;
        let data = blob(0x3717_e000 + n, 3000);
        let name = write_name("", &digest(&data));
        (data, name)
    };
    let (d, rn) = fresh();
    f.expect(
        "write: first offset not 0",
        "offset 5",
        send(&bs, vec![wr(&rn, 5, &d[5..], true)]),
        RANGE,
    )
    .await;
    let (d, rn) = fresh();
    let gap = vec![
        wr(&rn, 0, &d[..1000], false),
        wr("", 2000, &d[2000..], true),
    ];
    f.expect("write: offsets skip bytes", "gap", send(&bs, gap), RANGE)
        .await;
    let (d, rn) = fresh();
    let back = vec![wr(&rn, 0, &d[..1000], false), wr("", 500, &d[500..], true)];
    f.expect("write: offsets go back", "overlap", send(&bs, back), RANGE)
        .await;
    let (d, rn) = fresh();
    let negative = vec![wr(&rn, 0, &d[..1000], false), wr("", -1, &d[1000..], true)];
    f.expect("write: negative offset", "-1", send(&bs, negative), RANGE)
        .await;
    let (d, rn) = fresh();
    let after = vec![wr(&rn, 0, &d, true), wr("", d.len() as i64, b"more", false)];
    f.expect(
        "write: data after finish_write",
        "4 more bytes",
        send(&bs, after),
        INVALID,
    )
    .await;
    let (d, rn) = fresh();
    let twice = vec![wr(&rn, 0, &d, true), wr("", d.len() as i64, b"", true)];
    f.expect(
        "write: second finish_write",
        "empty second",
        send(&bs, twice),
        INVALID,
    )
    .await;
    let (d, rn) = fresh();
    let (_, other) = fresh();
    let switched = vec![
        wr(&rn, 0, &d[..1000], false),
        wr(&other, 1000, &d[1000..], true),
    ];
    f.expect(
        "write: resource name changes",
        "second name",
        send(&bs, switched),
        INVALID,
    )
    .await;
    let (mut d, rn) = fresh();
    d.extend_from_slice(b"extra");
    f.expect(
        "write: more bytes than declared",
        "5 extra",
        send(&bs, vec![wr(&rn, 0, &d, true)]),
        RANGE,
    )
    .await;
    let (d, rn) = fresh();
    f.expect(
        "write: fewer bytes than declared",
        "1 short",
        send(&bs, vec![wr(&rn, 0, &d[1..], true)]),
        INVALID,
    )
    .await;
    let (d, rn) = fresh();
    let wrong = blob(99, d.len());
    f.expect(
        "write: bytes of another blob",
        "same size",
        send(&bs, vec![wr(&rn, 0, &wrong, true)]),
        INVALID,
    )
    .await;
    f.expect(
        "write: no messages",
        "empty stream",
        send(&bs, vec![]),
        INVALID,
    )
    .await;
    let (d, _) = fresh();
    f.expect(
        "write: no resource name",
        "first message",
        send(&bs, vec![wr("", 0, &d, true)]),
        INVALID,
    )
    .await;
}
