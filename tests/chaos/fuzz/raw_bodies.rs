//! Bodies that are not valid protobuf, sent with the test kit's raw codec:
//! garbage, truncated messages and invalid UTF-8 on every method; unknown
//! methods; Write streams that break after a good first message.

use bazel_remote_apis::build::bazel::remote::asset::v1 as asset;
use bytes::Bytes;
use prost::Message;

use super::Fuzz;
use crate::common::*;

const DECODE: &[Code] = &[Code::InvalidArgument, Code::Unimplemented];

/// Every method Outpost serves (or may answer UNIMPLEMENTED), with a valid
/// request body to truncate.
fn methods(f: &Fuzz) -> Vec<(&'static str, Vec<u8>)> {
    let good = f.good_digest();
    let cas = "/build.bazel.remote.execution.v2.ContentAddressableStorage";
    let ac = "/build.bazel.remote.execution.v2.ActionCache";
    let bs = "/google.bytestream.ByteStream";
    let uris = vec!["https://raw.example/file".to_string()];
    let path =
        |service: &str, method: &str| -> &'static str { format!("{service}/{method}").leak() };
    vec![
        (
            path(cas, "FindMissingBlobs"),
            re::FindMissingBlobsRequest {
                instance_name: "main".into(),
                blob_digests: vec![good.clone()],
                ..Default::default()
            }
            .encode_to_vec(),
        ),
        (
            path(cas, "BatchUpdateBlobs"),
            re::BatchUpdateBlobsRequest {
                instance_name: "main".into(),
                requests: vec![re::batch_update_blobs_request::Request {
                    digest: Some(good.clone()),
                    data: f.good.clone(),
                    compressor: 0,
                }],
                ..Default::default()
            }
            .encode_to_vec(),
        ),
        (
            path(cas, "BatchReadBlobs"),
            re::BatchReadBlobsRequest {
                instance_name: "main".into(),
                digests: vec![good.clone()],
                ..Default::default()
            }
            .encode_to_vec(),
        ),
        (
            path(cas, "GetTree"),
            re::GetTreeRequest {
                instance_name: "main".into(),
                root_digest: Some(good.clone()),
                ..Default::default()
            }
            .encode_to_vec(),
        ),
        (
            "/build.bazel.remote.execution.v2.Capabilities/GetCapabilities",
            re::GetCapabilitiesRequest {
                instance_name: "main".into(),
            }
            .encode_to_vec(),
        ),
        (
            path(ac, "GetActionResult"),
            re::GetActionResultRequest {
                instance_name: "main".into(),
                action_digest: Some(good.clone()),
                ..Default::default()
            }
            .encode_to_vec(),
        ),
        (
            path(ac, "UpdateActionResult"),
            re::UpdateActionResultRequest {
                instance_name: "main".into(),
                action_digest: Some(good.clone()),
                action_result: Some(re::ActionResult {
                    exit_code: 3,
                    ..Default::default()
                }),
                ..Default::default()
            }
            .encode_to_vec(),
        ),
        (
            path(bs, "Read"),
            bs::ReadRequest {
                resource_name: read_name("", &good),
                read_offset: 0,
                read_limit: 0,
            }
            .encode_to_vec(),
        ),
        (
            path(bs, "Write"),
            bs::WriteRequest {
                resource_name: write_name("", &good),
                write_offset: 0,
                finish_write: true,
                data: f.good.clone(),
            }
            .encode_to_vec(),
        ),
        (
            path(bs, "QueryWriteStatus"),
            bs::QueryWriteStatusRequest {
                resource_name: write_name("", &good),
            }
            .encode_to_vec(),
        ),
        (
            "/build.bazel.remote.asset.v1.Fetch/FetchBlob",
            asset::FetchBlobRequest {
                instance_name: "main".into(),
                uris: uris.clone(),
                ..Default::default()
            }
            .encode_to_vec(),
        ),
        (
            "/build.bazel.remote.asset.v1.Fetch/FetchDirectory",
            asset::FetchDirectoryRequest {
                instance_name: "main".into(),
                uris: uris.clone(),
                ..Default::default()
            }
            .encode_to_vec(),
        ),
        (
            "/build.bazel.remote.asset.v1.Push/PushBlob",
            asset::PushBlobRequest {
                instance_name: "main".into(),
                uris: uris.clone(),
                blob_digest: Some(good.clone()),
                ..Default::default()
            }
            .encode_to_vec(),
        ),
        (
            "/build.bazel.remote.asset.v1.Push/PushDirectory",
            asset::PushDirectoryRequest {
                instance_name: "main".into(),
                uris,
                root_directory_digest: Some(good.clone()),
                ..Default::default()
            }
            .encode_to_vec(),
        ),
        (
            "/build.bazel.remote.execution.v2.Execution/Execute",
            re::ExecuteRequest {
                instance_name: "main".into(),
                action_digest: Some(good.clone()),
                ..Default::default()
            }
            .encode_to_vec(),
        ),
        (
            "/build.bazel.remote.execution.v2.Execution/WaitExecution",
            re::WaitExecutionRequest {
                name: "operations/x".into(),
            }
            .encode_to_vec(),
        ),
        (
            "/build.bazel.remote.logstream.v1.LogStreamService/CreateLogStream",
            bazel_remote_apis::build::bazel::remote::logstream::v1::CreateLogStreamRequest {
                parent: "main/logs".into(),
            }
            .encode_to_vec(),
        ),
    ]
}

/// Bytes that no protobuf decoder accepts, whatever the message.
fn garbage_bytes() -> Vec<(&'static str, Vec<u8>)> {
    vec![
        ("wire type 7", vec![0x0f, 1, 2, 3]),
        ("field number 0", vec![0x00, 0x01]),
        ("varint overflow", vec![0xff; 11]),
        ("length past the end", vec![0x0a, 0x7f, b'a']),
        ("end group without start", vec![0x0c]),
    ]
}

/// Where to cut `body` so it no longer decodes: one byte short, and half
/// way through its first length-delimited field (when it starts with one).
fn truncations(body: &[u8]) -> Vec<(&'static str, Vec<u8>)> {
    let mut out = vec![("one byte short", body[..body.len() - 1].to_vec())];
    if body.len() > 3 && body[0] & 7 == 2 && body[1] < 0x80 && body[1] >= 2 {
        out.push((
            "half of the first field",
            body[..2 + body[1] as usize / 2].to_vec(),
        ));
    }
    out
}

/// Garbage, truncated and invalid-UTF-8 bodies on every method.
pub async fn garbage(f: &mut Fuzz) {
    for (path, body) in methods(f) {
        let method = path.rsplit('/').next().unwrap_or(path);
        for (what, bytes) in garbage_bytes() {
            let call = raw::call(f.channel.clone(), path, vec![Bytes::from(bytes)]);
            f.expect("garbage body", &format!("{method}: {what}"), call, DECODE)
                .await;
        }
        for (what, bytes) in truncations(&body) {
            let call = raw::call(f.channel.clone(), path, vec![Bytes::from(bytes)]);
            f.expect("truncated body", &format!("{method}: {what}"), call, DECODE)
                .await;
        }
        // Field 1 is a string in every request above.
        let utf8 = vec![0x0a, 0x03, 0xff, 0xfe, b'a'];
        let call = raw::call(f.channel.clone(), path, vec![Bytes::from(utf8)]);
        f.expect("invalid UTF-8 string", method, call, DECODE).await;
    }
}

/// Methods and services that do not exist.
pub async fn unknown_methods(f: &mut Fuzz) {
    for path in [
        "/build.bazel.remote.execution.v2.ContentAddressableStorage/NoSuchMethod",
        "/google.bytestream.ByteStream/Delete",
        "/no.such.Service/Call",
    ] {
        let call = raw::call(f.channel.clone(), path, vec![Bytes::new()]);
        f.expect("unknown method", path, call, &[Code::Unimplemented])
            .await;
    }
}

/// Write streams whose later messages do not decode.
pub async fn broken_write_streams(f: &mut Fuzz) {
    let data = blob(0xb20c, 4000);
    let name = write_name("", &digest(&data));
    let first = bs::WriteRequest {
        resource_name: name,
        write_offset: 0,
        finish_write: false,
        data: data[..1000].to_vec(),
    };
    let rest = bs::WriteRequest {
        resource_name: String::new(),
        write_offset: 1000,
        finish_write: true,
        data: data[1000..].to_vec(),
    }
    .encode_to_vec();
    let mut cases = garbage_bytes();
    cases.extend(truncations(&rest));
    for (what, bytes) in cases {
        let messages = vec![Bytes::from(first.encode_to_vec()), Bytes::from(bytes)];
        let call = raw::call(
            f.channel.clone(),
            "/google.bytestream.ByteStream/Write",
            messages,
        );
        f.expect(
            "write: undecodable later message",
            what,
            call,
            &[Code::InvalidArgument],
        )
        .await;
    }
}
