//! The page's unit tests: escaping, formatting, charts with 0/1/60 samples,
//! empty and full reports. The browser test (`tests/suite/status_page.rs`)
//! checks the page a real server renders, in a real browser.

use super::format::{ago, count, duration, escape, percent, utc};
use super::render;
use super::svg::{bytes_chart, hit_rate_chart};
use crate::status::*;

/// `n` consecutive minutes ending at minute 1_000_000 (in minutes).
fn minutes(n: u64) -> Vec<MinuteSample> {
    (0..n)
        .map(|i| MinuteSample {
            minute_unix: (1_000_000 - n + 1 + i) * 60,
            cas_hits: 9,
            cas_misses: 1,
            action_cache_hits: 1,
            action_cache_misses: 1,
            asset_hits: 1,
            bytes_served_locally: 1000 + i,
            upstream_bytes_received: 10,
            ..MinuteSample::default()
        })
        .collect()
}

/// Every open tag of `name` is closed (the sections write raw HTML).
fn assert_balanced(html: &str, name: &str) {
    let opened =
        html.matches(&format!("<{name}>")).count() + html.matches(&format!("<{name} ")).count();
    let closed = html.matches(&format!("</{name}>")).count();
    assert_eq!(opened, closed, "<{name}> opened {opened}, closed {closed}");
}

fn full_report() -> StatusReport {
    StatusReport {
        version: "0.1.0".into(),
        uptime_seconds: 3 * 3600 + 125,
        generated_unix: 1_700_000_000,
        mode: "proxy".into(),
        store: StoreStatus {
            data_dir: "/var/lib/outpost".into(),
            used_bytes: 3 << 30,
            quota_bytes: 10 << 30,
            blobs: 12_345,
            ..StoreStatus::default()
        },
        hit_rates: HitRates {
            cas: Ratio::new(90, 10),
            action_cache: Ratio::new(3, 1),
            assets: Ratio::new(0, 0),
        },
        wan: WanSavings {
            bytes_served_locally: 5 << 30,
            bytes_from_upstream: 1 << 30,
            link_bytes_per_second: Some(2.0 * 1024.0 * 1024.0),
            link_rtt_ms: Some(38.0),
            seconds_saved: Some(2600.0),
        },
        upstream: Some(UpstreamStatus {
            endpoint: "grpcs://cache.example.com:443".into(),
            healthy: false,
            last_error: Some("connection refused".into()),
            rtt_ms: Some(38.0),
            throughput_bytes_per_second: Some(2.0 * 1024.0 * 1024.0),
            calls: 1000,
            ..UpstreamStatus::default()
        }),
        prefetch: PrefetchStatus {
            enabled: true,
            blobs: 200,
            hits: 150,
            joins: 10,
            ..PrefetchStatus::default()
        },
        uploads: Some(UploadQueueStatus {
            queued_blobs: 7,
            oldest_age_seconds: 95,
            ..UploadQueueStatus::default()
        }),
        clients: vec![ClientActivity {
            tool: "bazel 7.1.0".into(),
            invocation: "4f7c-11".into(),
            client: "ci".into(),
            calls: 1234,
            errors: 2,
            last_seen_seconds_ago: 3,
        }],
        errors: vec![ErrorCount {
            code: "NOT_FOUND".into(),
            method: "ByteStream/Read".into(),
            count: 2,
            last_seen_seconds_ago: 0,
        }],
        history: minutes(60),
        ..StatusReport::default()
    }
}

#[test]
fn escaping_covers_markup_quotes_and_controls() {
    assert_eq!(
        escape(r#"<a href="x">'&'</a>"#),
        "&lt;a href=&quot;x&quot;&gt;&#39;&amp;&#39;&lt;/a&gt;"
    );
    assert_eq!(escape("a\0b"), "a\u{fffd}b");
    assert_eq!(escape("bazel 7.1.0 ✓"), "bazel 7.1.0 ✓");
}

#[test]
fn strings_from_clients_are_escaped_everywhere_they_appear() {
    let evil = r#""><script>alert(1)</script>"#;
    let mut report = full_report();
    report.clients[0].tool = evil.into();
    report.clients[0].invocation = evil.into();
    report.clients[0].client = evil.into();
    report.errors[0].method = evil.into();
    report.store.data_dir = evil.into();
    report.upstream.as_mut().unwrap().last_error = Some(evil.into());
    let html = render(&report);
    assert!(!html.contains(evil), "an unescaped client string");
    assert!(!html.contains("<script>alert"), "{html}");
    // Exactly one script: the page's own refresh.
    assert_eq!(html.matches("<script>").count(), 1);
    assert!(html.contains("&quot;&gt;&lt;script&gt;alert(1)&lt;/script&gt;"));
}

#[test]
fn numbers_read_like_people_write_them() {
    assert_eq!(percent(Some(0.875)), "87.5%");
    assert_eq!(percent(None), "–");
    assert_eq!(count(1_234_567), "1\u{202f}234\u{202f}567");
    assert_eq!(count(999), "999");
    assert_eq!(duration(0.25), "250 ms");
    assert_eq!(duration(2.5), "2.5 s");
    assert_eq!(duration(200.0), "3 min 20 s");
    assert_eq!(duration(3.0 * 3600.0 + 420.0), "3 h 07 min");
    assert_eq!(duration(f64::NAN), "–");
    assert_eq!(ago(0), "just now");
    assert_eq!(ago(42), "42 s ago");
    assert_eq!(utc(0), "1970-01-01 00:00:00 UTC");
    assert_eq!(utc(951_782_400), "2000-02-29 00:00:00 UTC");
    assert_eq!(utc(1_796_018_853), "2026-11-30 06:07:33 UTC");
}

#[test]
fn charts_without_samples_say_so() {
    for svg in [hit_rate_chart(&[]), bytes_chart(&[])] {
        assert!(svg.contains(r#"data-samples="0""#), "{svg}");
        assert!(svg.contains("No samples yet"), "{svg}");
        assert!(!svg.contains("<circle") && !svg.contains("<rect") && !svg.contains("<polyline"));
        assert!(svg.ends_with("</svg>"));
    }
}

#[test]
fn one_sample_draws_dots_and_bars_but_no_lines() {
    let one = minutes(1);
    let rates = hit_rate_chart(&one);
    assert!(rates.contains(r#"data-samples="1""#));
    // CAS, AC and assets each had lookups in that minute.
    assert_eq!(rates.matches("<circle").count(), 3, "{rates}");
    assert_eq!(rates.matches("<polyline").count(), 0);
    // The newest minute sits at the right edge: CAS at 90% of the height.
    assert!(rates.contains("CAS: 90.0% (9 of 10)"), "{rates}");
    let bytes = bytes_chart(&one);
    assert_eq!(bytes.matches("<rect").count(), 2, "{bytes}");
}

#[test]
fn an_hour_of_samples_draws_one_line_per_series() {
    let hour = minutes(60);
    let rates = hit_rate_chart(&hour);
    assert!(rates.contains(r#"data-samples="60""#));
    assert_eq!(rates.matches("<polyline").count(), 3);
    assert_eq!(rates.matches("<circle").count(), 180);
    let bytes = bytes_chart(&hour);
    assert_eq!(bytes.matches("<rect").count(), 120);
    // The largest minute fills the height; its label is on the top line.
    assert!(bytes.contains(">1.0 KiB</text>"), "{bytes}");
}

#[test]
fn gaps_split_lines_and_old_samples_fall_off() {
    let mut samples = minutes(70);
    samples.remove(65); // a minute without a sample, five from the end
    for old in &mut samples[..10] {
        (old.cas_hits, old.cas_misses) = (0, 1); // more than an hour ago
    }
    let rates = hit_rate_chart(&samples);
    // 69 samples, of which 59 are within the hour shown.
    assert!(rates.contains(r#"data-samples="59""#), "{rates}");
    assert!(
        !rates.contains("CAS: 0.0%"),
        "a sample from over an hour ago is drawn"
    );
    assert_eq!(rates.matches("<polyline").count(), 6, "two runs per series");
    // A minute with no lookups at all draws nothing for that series.
    let mut quiet = minutes(2);
    quiet[1].asset_hits = 0;
    let rates = hit_rate_chart(&quiet);
    assert_eq!(rates.matches("class=\"dot s-asset\"").count(), 1);
}

#[test]
fn an_empty_report_reads_well() {
    let html = render(&StatusReport {
        mode: "standalone".into(),
        version: "0.1.0".into(),
        ..StatusReport::default()
    });
    for text in [
        "No upstream: standalone cache.",
        "no upstream: standalone cache, nothing crosses a WAN",
        "No client calls recorded yet.",
        "No errors.",
        "No samples yet",
        "Prefetch is off",
        "No upload queue",
        "no lookups yet",
    ] {
        assert!(html.contains(text), "missing {text:?}");
    }
    assert!(html.contains(r#"id="cas-hit-rate" data-hits="0" data-misses="0" data-value="">–<"#));
    for tag in ["div", "section", "dl", "table", "svg", "p"] {
        assert_balanced(&html, tag);
    }
    assert!(!html.contains("NaN") && !html.contains("inf"));
    assert!(
        !html.contains("wan-from-upstream"),
        "no WAN figures without an upstream"
    );
}

#[test]
fn a_full_report_shows_every_figure() {
    let html = render(&full_report());
    for text in [
        r#"id="cas-hit-rate" data-hits="90" data-misses="10" data-value="0.9">90.0%<"#,
        r#"id="ac-hit-rate" data-hits="3" data-misses="1" data-value="0.75">75.0%<"#,
        "3 of 4 lookups",
        r#"id="wan-served" data-value="5368709120">5.0 GiB<"#,
        r#"id="wan-saved" data-value="2600">43 min 20 s<"#,
        "of transfer time saved at 2.0 MiB/s and 38 ms round trip",
        r#"id="store-used" data-value="3221225472">3.0 GiB<"#,
        r#"style="width:30.00%""#,
        r#"id="upstream-health" data-value="false">unreachable<"#,
        r#"id="upstream-last-error">connection refused<"#,
        r#"id="prefetch-useful" data-value="0.8">80.0%<"#,
        r#"id="uploads-oldest" data-value="95">1 min 35 s<"#,
        r#"data-tool="bazel 7.1.0" data-invocation="4f7c-11" data-calls="1234" data-errors="2""#,
        r#"data-code="NOT_FOUND" data-method="ByteStream/Read" data-count="2""#,
        r#"id="uptime" data-value="10925">3 h 02 min<"#,
        r#"data-samples="60""#,
        r#"id="wan-from-upstream" data-value="1073741824">1.0 GiB<"#,
        r#"id="wan-local-share" data-value="0.8333333333333334">83.3%<"#,
    ] {
        assert!(html.contains(text), "missing {text}");
    }
    for text in [
        "No errors.",
        "No client calls",
        "No samples yet",
        "standalone",
    ] {
        assert!(!html.contains(text), "unexpected {text:?}");
    }
    for tag in ["div", "section", "dl", "table", "svg", "p", "tr"] {
        assert_balanced(&html, tag);
    }
}
