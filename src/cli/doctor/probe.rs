//! Measurements against a reachable upstream: round-trip time (the median
//! of a few empty FindMissingBlobs calls: the median shrugs off one slow
//! call, a connection warming up or a GC pause), download throughput (one
//! random blob written with ByteStream Write and read back, the read timed),
//! and clock skew from the `date` header HTTP/2 servers send.

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bazel_remote_apis::build::bazel::remote::execution::v2::{
    FindMissingBlobsRequest, ServerCapabilities,
    content_addressable_storage_client::ContentAddressableStorageClient, digest_function,
};
use bazel_remote_apis::google::bytestream::{
    ReadRequest, WriteRequest, byte_stream_client::ByteStreamClient,
};
use tonic::Code;

use crate::cli::human_bytes;
use crate::digest::{Digest, DigestFunction};
use crate::reapi::resource::ResourceName;

use super::upstream::{Link, millis};
use super::{Check, STEP_TIMEOUT, status_text};

/// Round trips timed for the RTT.
const RTT_CALLS: usize = 5;
/// Size of the throughput probe's blob: a few round trips' worth on a fast
/// link, a few seconds on a slow one.
const PROBE_BYTES: usize = 4 << 20;
/// Bound on each half (write, read) of the throughput probe.
const PROBE_TIMEOUT: Duration = Duration::from_secs(20);
/// Chunk size of the probe's ByteStream messages.
const CHUNK: usize = 1 << 20;
/// Skew beyond which certificates and token expiry start to misbehave.
const SKEW_WARN: Duration = Duration::from_secs(60);

/// The RTT line, and the `date` header of the last answer (for [`clock`]).
pub async fn round_trip(link: &Link) -> (Check, Option<String>) {
    let mut cas = ContentAddressableStorageClient::new(link.channel.clone());
    let mut times = Vec::with_capacity(RTT_CALLS);
    let mut date = None;
    for _ in 0..RTT_CALLS {
        let request = link.request(FindMissingBlobsRequest {
            instance_name: link.instance.clone(),
            blob_digests: Vec::new(),
            digest_function: digest_function::Value::Sha256 as i32,
        });
        let started = Instant::now();
        match tokio::time::timeout(STEP_TIMEOUT, cas.find_missing_blobs(request)).await {
            Ok(Ok(response)) => {
                times.push(started.elapsed());
                date = response
                    .metadata()
                    .get("date")
                    .and_then(|v| v.to_str().ok())
                    .map(str::to_string);
            }
            Ok(Err(status)) => {
                let advice = if matches!(
                    status.code(),
                    Code::Unauthenticated | Code::PermissionDenied
                ) {
                    "the upstream refuses these credentials for the CAS: check [upstream] headers"
                } else {
                    "the upstream's CAS does not answer: is it a cache?"
                };
                let check = Check::fail(
                    "rtt",
                    format!("FindMissingBlobs failed: {}", status_text(&status)),
                    advice,
                );
                return (check, None);
            }
            Err(_) => {
                let check = Check::fail(
                    "rtt",
                    format!(
                        "FindMissingBlobs: no answer within {}s",
                        STEP_TIMEOUT.as_secs()
                    ),
                    "the upstream accepts connections but its CAS does not answer",
                );
                return (check, None);
            }
        }
    }
    times.sort();
    let check = Check::ok(
        "rtt",
        format!(
            "{} (median of {RTT_CALLS} empty FindMissingBlobs; min {}, max {})",
            millis(times[RTT_CALLS / 2]),
            millis(times[0]),
            millis(times[RTT_CALLS - 1])
        ),
    );
    (check, date)
}

/// Writes one random [`PROBE_BYTES`] blob and reads it back, timing both.
pub async fn throughput(link: &Link, caps: &ServerCapabilities) -> Check {
    let sha256 = digest_function::Value::Sha256 as i32;
    let functions = caps
        .cache_capabilities
        .as_ref()
        .map(|c| c.digest_functions.clone())
        .unwrap_or_default();
    if !functions.is_empty() && !functions.contains(&sha256) {
        return Check::skip("throughput", "the upstream does not take SHA-256 blobs");
    }
    let mut data = vec![0u8; PROBE_BYTES];
    if getrandom::fill(&mut data).is_err() {
        return Check::skip("throughput", "no randomness for a fresh probe blob");
    }
    let digest = Digest::of(DigestFunction::Sha256, &data);
    let mut upload_id = [0u8; 16];
    let _ = getrandom::fill(&mut upload_id);
    let mut bytestream = ByteStreamClient::new(link.channel.clone())
        .max_decoding_message_size(64 << 20)
        .max_encoding_message_size(64 << 20);

    let write_name =
        ResourceName::upload(&link.instance, &hex::encode(upload_id), digest).to_string();
    let chunks: Vec<WriteRequest> = data
        .chunks(CHUNK)
        .enumerate()
        .map(|(i, chunk)| WriteRequest {
            resource_name: if i == 0 {
                write_name.clone()
            } else {
                String::new()
            },
            write_offset: (i * CHUNK) as i64,
            finish_write: (i + 1) * CHUNK >= data.len(),
            data: chunk.to_vec(),
        })
        .collect();
    let started = Instant::now();
    let write = bytestream.write(link.request(tokio_stream::iter(chunks)));
    let written = match tokio::time::timeout(PROBE_TIMEOUT, write).await {
        Ok(Ok(_)) => started.elapsed(),
        Ok(Err(status))
            if matches!(
                status.code(),
                Code::PermissionDenied | Code::Unauthenticated
            ) =>
        {
            return Check::skip(
                "throughput",
                format!(
                    "these credentials may not write, so no probe blob ({})",
                    status.message()
                ),
            );
        }
        Ok(Err(status)) => {
            return Check::warn(
                "throughput",
                format!("writing a probe blob failed: {}", status_text(&status)),
                "uploads to the upstream may fail too: check its logs",
            );
        }
        Err(_) => return too_slow("writing"),
    };

    let read_name = ResourceName::read(&link.instance, digest).to_string();
    let started = Instant::now();
    let read = async {
        let mut stream = bytestream
            .read(link.request(ReadRequest {
                resource_name: read_name,
                read_offset: 0,
                read_limit: 0,
            }))
            .await?
            .into_inner();
        let mut got = Vec::with_capacity(PROBE_BYTES);
        while let Some(message) = stream.message().await? {
            got.extend_from_slice(&message.data);
        }
        Ok::<_, tonic::Status>(got)
    };
    let got = match tokio::time::timeout(PROBE_TIMEOUT, read).await {
        Ok(Ok(got)) => got,
        Ok(Err(status)) => {
            return Check::warn(
                "throughput",
                format!(
                    "reading the probe blob back failed: {}",
                    status_text(&status)
                ),
                "reads from the upstream may fail too: check its logs",
            );
        }
        Err(_) => return too_slow("reading"),
    };
    let read = started.elapsed();
    if got != data {
        return Check::fail(
            "throughput",
            format!(
                "the probe blob came back different ({} of {} bytes)",
                got.len(),
                data.len()
            ),
            "the upstream corrupts blobs: do not use it",
        );
    }
    Check::ok(
        "throughput",
        format!(
            "read {} in {}: {}/s (wrote it in {}: {}/s; this left one random {} blob in the \
             upstream's CAS)",
            human_bytes(PROBE_BYTES as u64),
            millis(read),
            human_bytes(rate(PROBE_BYTES, read)),
            millis(written),
            human_bytes(rate(PROBE_BYTES, written)),
            human_bytes(PROBE_BYTES as u64)
        ),
    )
}

/// Bytes per second.
fn rate(bytes: usize, elapsed: Duration) -> u64 {
    (bytes as f64 / elapsed.as_secs_f64().max(1e-6)) as u64
}

/// The probe did not finish in [`PROBE_TIMEOUT`].
fn too_slow(what: &str) -> Check {
    Check::warn(
        "throughput",
        format!(
            "{what} {} took longer than {}s: under {}/s",
            human_bytes(PROBE_BYTES as u64),
            PROBE_TIMEOUT.as_secs(),
            human_bytes(PROBE_BYTES as u64 / PROBE_TIMEOUT.as_secs())
        ),
        "a very slow link: expect long first builds; Outpost's local hits help most here",
    )
}

/// Clock skew against the upstream's `date` header (one-second resolution).
pub fn clock(date: Option<&str>, now: SystemTime) -> Check {
    let Some(date) = date else {
        return Check::skip("clock", "the upstream sends no Date header");
    };
    let Some(theirs) = parse_http_date(date) else {
        return Check::skip("clock", format!("cannot read its Date header {date:?}"));
    };
    let (skew, direction) = match theirs.duration_since(now) {
        Ok(ahead) => (ahead, "ahead of"),
        Err(behind) => (behind.duration(), "behind"),
    };
    let secs = skew.as_secs();
    if skew < Duration::from_secs(2) {
        Check::ok(
            "clock",
            "in step with the upstream's (within a second or two)",
        )
    } else if skew < SKEW_WARN {
        Check::ok(
            "clock",
            format!("the upstream's is {secs} s {direction} ours"),
        )
    } else {
        Check::warn(
            "clock",
            format!("the upstream's is {secs} s {direction} ours"),
            "certificate and token expiry depend on clocks: run NTP here (timedatectl \
             set-ntp true) or tell the upstream's operator",
        )
    }
}

/// An IMF-fixdate (`Sun, 06 Nov 1994 08:49:37 GMT`), the form HTTP servers send.
fn parse_http_date(text: &str) -> Option<SystemTime> {
    let parts: Vec<&str> = text.split_whitespace().collect();
    let [_, day, month, year, time, "GMT"] = parts.as_slice() else {
        return None;
    };
    const MONTHS: [&str; 12] = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ];
    let month = MONTHS.iter().position(|m| m == month)? as i64 + 1;
    let (day, year): (i64, i64) = (day.parse().ok()?, year.parse().ok()?);
    let hms: Vec<i64> = time
        .split(':')
        .map(|p| p.parse().ok())
        .collect::<Option<_>>()?;
    let [h, m, s] = hms.as_slice() else {
        return None;
    };
    if !(1..=31).contains(&day) || *h > 23 || *m > 59 || *s > 60 {
        return None;
    }
    let seconds = days_from_civil(year, month, day) * 86400 + h * 3600 + m * 60 + s;
    UNIX_EPOCH.checked_add(Duration::from_secs(u64::try_from(seconds).ok()?))
}

/// Days since 1970-01-01 of a proleptic Gregorian date (Howard Hinnant's
/// `days_from_civil`).
fn days_from_civil(year: i64, month: i64, day: i64) -> i64 {
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (month + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cli::doctor::Verdict;

    #[test]
    fn http_dates_parse() {
        let t = parse_http_date("Sun, 06 Nov 1994 08:49:37 GMT").unwrap();
        assert_eq!(t.duration_since(UNIX_EPOCH).unwrap().as_secs(), 784_111_777);
        let t = parse_http_date("Mon, 30 Nov 2026 05:53:59 GMT").unwrap();
        assert_eq!(
            t.duration_since(UNIX_EPOCH).unwrap().as_secs(),
            1_796_018_039
        );
        assert!(parse_http_date("Sun, 06 Nov 1994 08:49:37 PST").is_none());
        assert!(parse_http_date("yesterday").is_none());
    }

    #[test]
    fn skew_is_judged_both_ways() {
        let date = "Sun, 06 Nov 1994 08:49:37 GMT";
        let at = parse_http_date(date).unwrap();
        assert_eq!(clock(Some(date), at).verdict, Verdict::Ok);
        let later = at + Duration::from_secs(30);
        let check = clock(Some(date), later);
        assert_eq!(check.finding, "the upstream's is 30 s behind ours");
        let check = clock(Some(date), at - Duration::from_secs(300));
        assert_eq!(check.verdict, Verdict::Warn);
        assert_eq!(check.finding, "the upstream's is 300 s ahead of ours");
        assert_eq!(clock(None, at).verdict, Verdict::Skip);
    }
}
