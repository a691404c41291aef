//! Raw gRPC calls: messages as bytes, sent and received without protobuf,
//! so tests can send bodies that are garbage or truncated and see what
//! status the server answers. [`RawCodec`] is the `tonic` codec; [`call`]
//! drives any method (unary or streaming either way).

use bytes::{Buf, BufMut, Bytes};
use futures::StreamExt;
use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};
use tonic::codegen::http::uri::PathAndQuery;
use tonic::transport::Channel;
use tonic::{Request, Status};

use crate::client::CLIENT_MAX_MESSAGE;

/// A codec whose messages are their encoded bytes, unchecked.
#[derive(Clone, Copy, Debug, Default)]
pub struct RawCodec;

/// Encodes bytes as they are.
#[derive(Clone, Copy, Debug, Default)]
pub struct RawEncoder;

/// Decodes a message into its bytes.
#[derive(Clone, Copy, Debug, Default)]
pub struct RawDecoder;

impl Codec for RawCodec {
    type Encode = Bytes;
    type Decode = Bytes;
    type Encoder = RawEncoder;
    type Decoder = RawDecoder;

    fn encoder(&mut self) -> RawEncoder {
        RawEncoder
    }

    fn decoder(&mut self) -> RawDecoder {
        RawDecoder
    }
}

impl Encoder for RawEncoder {
    type Item = Bytes;
    type Error = Status;

    fn encode(&mut self, item: Bytes, dst: &mut EncodeBuf<'_>) -> Result<(), Status> {
        dst.put(item);
        Ok(())
    }
}

impl Decoder for RawDecoder {
    type Item = Bytes;
    type Error = Status;

    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<Bytes>, Status> {
        Ok(Some(src.copy_to_bytes(src.remaining())))
    }
}

/// Calls `path` (e.g. `/google.bytestream.ByteStream/Write`) sending
/// `messages` as they are, and returns every response message, or the
/// status the call ended with. Works for unary and streaming methods alike
/// (a unary method gets its one message as a one-element stream).
pub async fn call(
    channel: Channel,
    path: &str,
    messages: Vec<Bytes>,
) -> Result<Vec<Bytes>, Status> {
    let path = PathAndQuery::try_from(path.to_string())
        .map_err(|e| Status::internal(format!("bad path {path:?}: {e}")))?;
    let mut grpc = tonic::client::Grpc::new(channel).max_decoding_message_size(CLIENT_MAX_MESSAGE);
    grpc.ready()
        .await
        .map_err(|e| Status::unavailable(format!("channel not ready: {e}")))?;
    let request = Request::new(futures::stream::iter(messages));
    let mut responses = grpc.streaming(request, path, RawCodec).await?.into_inner();
    let mut out = Vec::new();
    while let Some(message) = responses.next().await {
        out.push(message?);
    }
    Ok(out)
}
