//! Fuzz: classes of malformed input on every service. Every call must get a
//! status (within 10 s), never OK, never INTERNAL, UNKNOWN or UNAVAILABLE
//! (the client's mistake is not the server's failure, and clients retry
//! UNAVAILABLE forever), with a short message; where the REAPI says which
//! code, that code. The server must be healthy afterwards. The requests are
//! in `fuzz/requests.rs` and `fuzz/messages.rs`; raw-bytes bodies (garbage,
//! truncated, invalid UTF-8) in `fuzz/raw_bodies.rs`.

mod messages;
mod raw_bodies;
mod requests;

use std::collections::BTreeMap;
use std::fmt::Debug;
use std::future::Future;
use std::time::Duration;

use tonic::transport::Channel;

use crate::common::*;

/// A call without a status for this long is a failure.
const CALL_TIMEOUT: Duration = Duration::from_secs(10);
/// An error message longer than this is a failure (it may not even be
/// deliverable: HTTP/2 header limits).
const MAX_MESSAGE: usize = 1024;

/// The classes run so far, their calls, and the failed checks.
pub struct Fuzz {
    /// A channel to the server under test.
    pub channel: Channel,
    /// A blob the server holds (5000 bytes).
    pub good: Vec<u8>,
    /// Calls per class.
    calls: BTreeMap<&'static str, usize>,
    /// Codes answered, for the figures.
    codes: BTreeMap<String, usize>,
    /// Failed checks.
    pub failures: Failures,
}

impl Fuzz {
    /// The digest of [`Fuzz::good`].
    pub fn good_digest(&self) -> re::Digest {
        digest(&self.good)
    }

    /// Runs `call`, which sends invalid input of `class`, and checks its
    /// answer: a status, not OK, not a server-side code, in `allowed`
    /// (any client-side code when `allowed` is empty), with a short message.
    pub async fn expect<T: Debug>(
        &mut self,
        class: &'static str,
        what: &str,
        call: impl Future<Output = Result<T, Status>>,
        allowed: &[Code],
    ) {
        *self.calls.entry(class).or_default() += 1;
        let what = clip(what, 100);
        let result = match tokio::time::timeout(CALL_TIMEOUT, call).await {
            Ok(result) => result,
            Err(_) => {
                self.failures.add(format!(
                    "{class}: {what}: no status within {CALL_TIMEOUT:?}"
                ));
                return;
            }
        };
        let status = match result {
            Ok(answer) => {
                let answer = clip(&format!("{answer:?}"), 200);
                self.failures
                    .add(format!("{class}: {what}: OK for invalid input: {answer}"));
                return;
            }
            Err(status) => status,
        };
        let code = status.code();
        *self.codes.entry(format!("{code:?}")).or_default() += 1;
        let message = clip(status.message(), 160);
        if matches!(code, Code::Internal | Code::Unknown | Code::Unavailable) {
            self.failures.add(format!(
                "{class}: {what}: {code:?} for the client's mistake: {message}"
            ));
        } else if !allowed.is_empty() && !allowed.contains(&code) {
            self.failures.add(format!(
                "{class}: {what}: {code:?}, expected {allowed:?}: {message}"
            ));
        }
        if status.message().len() > MAX_MESSAGE {
            self.failures.add(format!(
                "{class}: {what}: a {}-byte error message (limit {MAX_MESSAGE})",
                status.message().len()
            ));
        }
    }
}

/// A Batch* entry's status as a call result, for [`Fuzz::expect`].
pub fn entry(status: Option<&bazel_remote_apis::google::rpc::Status>) -> Result<(), Status> {
    match status {
        Some(s) if s.code != 0 => Err(Status::new(Code::from(s.code), s.message.clone())),
        Some(_) => Ok(()),
        None => Err(Status::internal("the entry has no status")),
    }
}

/// Bad hashes, with what is wrong with each.
pub fn bad_hashes(good: &str) -> Vec<(&'static str, String)> {
    vec![
        ("non-hex", format!("{}zz", &good[..62])),
        ("63 chars", good[..63].to_string()),
        ("65 chars", format!("{good}0")),
        ("empty", String::new()),
        ("upper-case", good.to_uppercase()),
        ("non-ASCII", "é".repeat(32)),
        ("spaces", format!(" {} ", &good[..62])),
        ("10,000 chars", "a".repeat(10_000)),
    ]
}

/// Resource names of every shape that is not a valid read or write name,
/// for a stored blob `d`; each with the codes it may get (UNIMPLEMENTED for
/// a known compressor, NOT_FOUND for a well-formed name of no blob).
pub fn bad_names(d: &re::Digest) -> Vec<(String, &'static [Code])> {
    const INVALID: &[Code] = &[Code::InvalidArgument];
    let (h, n) = (&d.hash, d.size_bytes);
    let mut names: Vec<(String, &'static [Code])> = [
        String::new(),
        "/".into(),
        "blobs".into(),
        "blobs/".into(),
        format!("blobs/{h}"),
        format!("blobs/{h}/"),
        format!("blobs/{h}/abc"),
        format!("blobs/{h}/-1"),
        format!("blobs/{h}/+{n}"),
        format!("blobs/{h}/ {n}"),
        format!("blobs/{h}/99999999999999999999999"),
        format!("blobs//{n}"),
        format!("blobs/{h}/{n}/extra/../.."),
        format!("blobs/{}/{n}", h.to_uppercase()),
        format!("blobs/md5/{h}/{n}"),
        format!("blobs/nosuchfunction/{h}/{n}"),
        format!("uploads/blobs/{h}/{n}"),
        format!("uploads//blobs/{h}/{n}"),
        format!("\0/blobs/{h}/{n}\0"),
        format!("blobs/{}/1234", "a".repeat(10_000)),
        format!("{}/blobs/{h}", "x".repeat(10_000)),
        "y".repeat(10_000),
        "/".repeat(10_000),
        format!("uploads/{}/blobs/{h}", "u".repeat(10_000)),
    ]
    .into_iter()
    .map(|name| (name, INVALID))
    .collect();
    // Compressors: unknown ones, deflate (which Outpost does not offer),
    // and zstd names that are malformed.
    for name in [
        format!("compressed-blobs/deflate/{h}/{n}"),
        format!("compressed-blobs/snappy9/{h}/{n}"),
        format!("compressed-blobs/{h}/{n}"),
        format!("compressed-blobs/zstd/{h}/x{n}"),
        format!("compressed-blobs/zstd/{h}"),
    ] {
        names.push((name, &[Code::Unimplemented, Code::InvalidArgument]));
    }
    names
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_input_gets_a_client_error_and_the_server_stays_healthy() {
    let dir = tempfile::tempdir().unwrap();
    let mut server = start(
        dir.path(),
        &dir.path().join("data"),
        &dir.path().join("log"),
        &[],
    );
    let good = blob(0xf022, 5000);
    let codes = batch_update(&mut server.cas(), "", &[&good]).await;
    assert_eq!(codes, [Code::Ok]);
    let mut fuzz = Fuzz {
        channel: server.channel(),
        good,
        calls: BTreeMap::new(),
        codes: BTreeMap::new(),
        failures: Failures::default(),
    };
    requests::digests(&mut fuzz).await;
    requests::names(&mut fuzz).await;
    requests::read_ranges(&mut fuzz).await;
    requests::write_sequences(&mut fuzz).await;
    messages::batches(&mut fuzz).await;
    messages::functions_and_compressors(&mut fuzz).await;
    messages::trees(&mut fuzz).await;
    messages::actions(&mut fuzz).await;
    messages::assets(&mut fuzz).await;
    raw_bodies::garbage(&mut fuzz).await;
    raw_bodies::unknown_methods(&mut fuzz).await;
    raw_bodies::broken_write_streams(&mut fuzz).await;

    let total: usize = fuzz.calls.values().sum();
    eprintln!(
        "chaos fuzz: {} classes, {total} calls, {} failed checks; codes answered: {:?}",
        fuzz.calls.len(),
        fuzz.failures.count(),
        fuzz.codes
    );
    for (class, n) in &fuzz.calls {
        eprintln!("chaos fuzz:   {class:<40} {n:>5} calls");
    }
    assert!(fuzz.calls.len() >= 20, "only {} classes", fuzz.calls.len());
    // The server is healthy, and still holds the blob stored first.
    let mut bs = server.bytestream();
    if read_verified(&mut bs, &fuzz.good_digest(), &fuzz.good, 0, 0).await != Read::Exact {
        fuzz.failures
            .add("the blob stored before the fuzzing no longer reads");
    }
    assert_healthy(&mut server, &fuzz.failures, "fuzz").await;
    fuzz.failures.assert_none("fuzz");
}
