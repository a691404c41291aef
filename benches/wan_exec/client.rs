//! The build client: what Bazel sends for a remotely executed action, over
//! one tonic channel. Every call carries the action's `RequestMetadata`
//! (tool invocation id, action id, mnemonic, target) in the
//! `build.bazel.remote.execution.v2.requestmetadata-bin` header, as Bazel
//! does; the proxy's adaptive prefetch keys its learning on it.
//!
//! Inputs: one FindMissingBlobs naming every input digest (Action, Command,
//! input Directories, every input file including earlier actions'
//! outputs), then an upload of what is missing (BatchUpdateBlobs up to
//! [`BATCH_BLOB_MAX`], ByteStream Write above). Uploads are deduplicated
//! across the build as Bazel does: a blob another action is already
//! uploading is waited for, not sent twice.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use anyhow::{Context, bail, ensure};
use futures::TryStreamExt;
use outpost_testkit::fake::{REQUEST_METADATA_HEADER, operation_response};
use outpost_testkit::workload::pack;
use outpost_testkit::{bs, re};
use prost::Message;
use sha2::{Digest as _, Sha256};
use tokio::sync::watch;
use tonic::metadata::MetadataValue;
use tonic::transport::{Channel, Endpoint};

use super::workload::{BuildAction, key};
use super::{KIB, MIB};

const CLIENT_MAX_MESSAGE: usize = 64 << 20;
/// Blobs up to this size are read and written with Batch* calls, larger ones
/// with ByteStream.
pub const BATCH_BLOB_MAX: u64 = MIB;
/// ByteStream Write chunk.
const WRITE_CHUNK: usize = 64 * KIB as usize;

type Cas = re::content_addressable_storage_client::ContentAddressableStorageClient<Channel>;
type ByteStream = bs::byte_stream_client::ByteStreamClient<Channel>;

/// Uploads of this build: digest → "done" signal, for deduplication.
#[derive(Default)]
struct Uploads {
    started: Mutex<HashMap<(String, i64), watch::Receiver<bool>>>,
}

/// One build's client.
#[derive(Clone)]
pub struct Client {
    channel: Channel,
    max_batch: u64,
    uploads: Arc<Uploads>,
    invocation: String,
    /// Bytes this client uploaded.
    pub uploaded: Arc<std::sync::atomic::AtomicU64>,
}

/// What Bazel sends in `RequestMetadata` for one action.
pub struct ActionMeta {
    header: MetadataValue<tonic::metadata::Binary>,
}

impl Client {
    /// Connects (large windows, as Bazel's netty client) and reads the batch
    /// limit from GetCapabilities.
    pub async fn connect(target: SocketAddr, invocation: &str) -> anyhow::Result<Self> {
        let channel = Endpoint::from_shared(format!("http://{target}"))?
            .initial_stream_window_size(16 << 20)
            .initial_connection_window_size(32 << 20)
            .connect()
            .await?;
        let caps = re::capabilities_client::CapabilitiesClient::new(channel.clone())
            .get_capabilities(re::GetCapabilitiesRequest::default())
            .await?
            .into_inner();
        let max_batch = caps
            .cache_capabilities
            .map(|c| c.max_batch_total_size_bytes as u64)
            .filter(|&m| m > 0)
            .unwrap_or(4 * MIB)
            .min(4 * MIB);
        Ok(Client {
            channel,
            max_batch,
            uploads: Arc::default(),
            invocation: invocation.to_string(),
            uploaded: Arc::default(),
        })
    }

    /// The metadata of action `index` (`mnemonic`) of this invocation.
    pub fn meta(&self, index: usize, mnemonic: &str, action: &re::Digest) -> ActionMeta {
        let md = re::RequestMetadata {
            tool_details: Some(re::ToolDetails {
                tool_name: "bazel".into(),
                tool_version: "7.4.1".into(),
            }),
            action_id: action.hash.clone(),
            tool_invocation_id: self.invocation.clone(),
            correlated_invocations_id: format!("{}-build", self.invocation),
            action_mnemonic: mnemonic.to_string(),
            target_id: format!("//pkg:t{index}"),
            configuration_id: "k8-fastbuild".into(),
        };
        ActionMeta {
            header: MetadataValue::from_bytes(&md.encode_to_vec()),
        }
    }

    fn request<T>(&self, msg: T, meta: &ActionMeta) -> tonic::Request<T> {
        let mut r = tonic::Request::new(msg);
        r.metadata_mut()
            .insert_bin(REQUEST_METADATA_HEADER, meta.header.clone());
        r
    }

    fn cas(&self) -> Cas {
        Cas::new(self.channel.clone())
            .max_decoding_message_size(CLIENT_MAX_MESSAGE)
            .max_encoding_message_size(CLIENT_MAX_MESSAGE)
    }

    fn bytestream(&self) -> ByteStream {
        ByteStream::new(self.channel.clone()).max_decoding_message_size(CLIENT_MAX_MESSAGE)
    }

    /// Makes every input of `a` present upstream: FindMissingBlobs of all of
    /// them, then uploads of the missing ones (deduplicated across the
    /// build). Returns the number of digests found missing.
    pub async fn ensure_inputs(&self, a: &BuildAction, meta: &ActionMeta) -> anyhow::Result<usize> {
        let missing = self
            .cas()
            .find_missing_blobs(self.request(
                re::FindMissingBlobsRequest {
                    blob_digests: a.action.blob_digests(),
                    ..Default::default()
                },
                meta,
            ))
            .await
            .context("FindMissingBlobs")?
            .into_inner()
            .missing_blob_digests;
        let n = missing.len();
        let missing: HashSet<(String, i64)> = missing.iter().map(key).collect();
        if let Some(d) = missing.iter().find(|d| a.produced_inputs.contains(*d)) {
            bail!(
                "an earlier action's output {}/{} is missing upstream",
                d.0,
                d.1
            );
        }
        let mut mine = Vec::new();
        let mut theirs = Vec::new();
        {
            let mut started = self.uploads.started.lock().expect("uploads lock");
            for (d, data) in &a.action.blobs {
                if !missing.contains(&key(d)) {
                    continue;
                }
                match started.get(&key(d)) {
                    Some(rx) => theirs.push(rx.clone()),
                    None => {
                        let (tx, rx) = watch::channel(false);
                        started.insert(key(d), rx);
                        mine.push((d.clone(), data.clone(), tx));
                    }
                }
            }
        }
        let (small, large): (Vec<_>, Vec<_>) = mine
            .into_iter()
            .partition(|(d, _, _)| d.size_bytes as u64 <= BATCH_BLOB_MAX);
        let batches = pack(small, self.max_batch, |(d, _, _)| d.size_bytes as u64);
        let writes = batches
            .into_iter()
            .map(|b| futures::future::Either::Left(self.batch_update(b, meta)))
            .chain(
                large
                    .into_iter()
                    .map(|b| futures::future::Either::Right(self.bytestream_write(b, meta))),
            );
        futures::future::try_join_all(writes).await?;
        for mut rx in theirs {
            rx.wait_for(|&done| done)
                .await
                .context("another action's upload of a shared input failed")?;
        }
        Ok(n)
    }

    async fn batch_update(
        &self,
        blobs: Vec<(re::Digest, bytes::Bytes, watch::Sender<bool>)>,
        meta: &ActionMeta,
    ) -> anyhow::Result<()> {
        let bytes: u64 = blobs.iter().map(|(d, _, _)| d.size_bytes as u64).sum();
        let resp = self
            .cas()
            .batch_update_blobs(
                self.request(
                    re::BatchUpdateBlobsRequest {
                        requests: blobs
                            .iter()
                            .map(|(d, data, _)| re::batch_update_blobs_request::Request {
                                digest: Some(d.clone()),
                                data: data.to_vec(),
                                compressor: 0,
                            })
                            .collect(),
                        ..Default::default()
                    },
                    meta,
                ),
            )
            .await
            .context("BatchUpdateBlobs")?
            .into_inner();
        for r in &resp.responses {
            ensure!(
                r.status.as_ref().is_none_or(|s| s.code == 0),
                "BatchUpdateBlobs entry failed: {:?}",
                r.status
            );
        }
        ensure!(
            resp.responses.len() == blobs.len(),
            "short BatchUpdateBlobs"
        );
        self.uploaded
            .fetch_add(bytes, std::sync::atomic::Ordering::Relaxed);
        for (_, _, tx) in blobs {
            let _ = tx.send(true);
        }
        Ok(())
    }

    async fn bytestream_write(
        &self,
        (d, data, tx): (re::Digest, bytes::Bytes, watch::Sender<bool>),
        meta: &ActionMeta,
    ) -> anyhow::Result<()> {
        let name = outpost_testkit::client::write_name("", &d);
        let requests = outpost_testkit::client::write_stream(name, data, WRITE_CHUNK);
        let committed = self
            .bytestream()
            .write(self.request(requests, meta))
            .await
            .context("ByteStream Write")?
            .into_inner()
            .committed_size;
        ensure!(
            committed == d.size_bytes,
            "Write committed {committed} of {}",
            d.size_bytes
        );
        self.uploaded
            .fetch_add(d.size_bytes as u64, std::sync::atomic::Ordering::Relaxed);
        let _ = tx.send(true);
        Ok(())
    }

    /// Execute (no cache lookup) until the done Operation; its result.
    pub async fn execute(
        &self,
        a: &BuildAction,
        meta: &ActionMeta,
    ) -> anyhow::Result<re::ActionResult> {
        let mut stream = re::execution_client::ExecutionClient::new(self.channel.clone())
            .max_decoding_message_size(CLIENT_MAX_MESSAGE)
            .execute(self.request(
                re::ExecuteRequest {
                    skip_cache_lookup: true,
                    ..a.action.request("")
                },
                meta,
            ))
            .await?
            .into_inner();
        while let Some(op) = stream.message().await? {
            if op.done {
                let resp = operation_response(&op).context("done Operation without response")?;
                if let Some(st) = &resp.status {
                    ensure!(st.code == 0, "execution failed: {st:?}");
                }
                return resp.result.context("ExecuteResponse without result");
            }
        }
        bail!("Execute stream ended before done")
    }

    /// Reads `digests` (BatchReadBlobs up to [`BATCH_BLOB_MAX`], packed to
    /// the batch limit; ByteStream Read above), all at once, each verified.
    /// Returns the bytes read.
    pub async fn read_all(
        &self,
        digests: Vec<re::Digest>,
        meta: &ActionMeta,
    ) -> anyhow::Result<u64> {
        let (small, large): (Vec<_>, Vec<_>) = digests
            .into_iter()
            .partition(|d| (d.size_bytes as u64) <= BATCH_BLOB_MAX);
        let batches = pack(small, self.max_batch, |d| d.size_bytes as u64);
        let calls = batches
            .into_iter()
            .map(|b| futures::future::Either::Left(self.batch_read(b, meta)))
            .chain(
                large
                    .into_iter()
                    .map(|d| futures::future::Either::Right(self.bytestream_read(d, meta))),
            );
        let sizes = futures::future::try_join_all(calls).await?;
        Ok(sizes.into_iter().sum())
    }

    async fn batch_read(&self, digests: Vec<re::Digest>, meta: &ActionMeta) -> anyhow::Result<u64> {
        let resp = self
            .cas()
            .batch_read_blobs(self.request(
                re::BatchReadBlobsRequest {
                    digests: digests.clone(),
                    ..Default::default()
                },
                meta,
            ))
            .await?
            .into_inner();
        ensure!(resp.responses.len() == digests.len(), "short batch");
        let mut total = 0;
        for r in resp.responses {
            let d = r.digest.context("response without digest")?;
            ensure!(
                r.status.as_ref().is_none_or(|s| s.code == 0),
                "BatchReadBlobs {}: {:?}",
                d.hash,
                r.status
            );
            verify(&d, &r.data)?;
            total += r.data.len() as u64;
        }
        Ok(total)
    }

    async fn bytestream_read(&self, d: re::Digest, meta: &ActionMeta) -> anyhow::Result<u64> {
        let stream = self
            .bytestream()
            .read(self.request(
                bs::ReadRequest {
                    resource_name: format!("blobs/{}/{}", d.hash, d.size_bytes),
                    ..Default::default()
                },
                meta,
            ))
            .await?
            .into_inner();
        let chunks: Vec<_> = stream.map_ok(|r| r.data).try_collect().await?;
        let data = chunks.concat();
        verify(&d, &data)?;
        Ok(data.len() as u64)
    }
}

fn verify(d: &re::Digest, data: &[u8]) -> anyhow::Result<()> {
    ensure!(
        data.len() as i64 == d.size_bytes && hex::encode(Sha256::digest(data)) == d.hash,
        "blob {}/{} read back wrong ({} bytes)",
        d.hash,
        d.size_bytes,
        data.len()
    );
    Ok(())
}
