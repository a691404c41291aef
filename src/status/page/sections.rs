//! The page's sections, one function each, in page order. Every figure has a
//! stable `id` and its raw value in `data-value` (or `data-*` on table
//! rows), so scripts and the browser test read numbers, not formatted text.

use std::fmt::{Display, Write};

use super::format::{
    ago, bytes_per_second, count, duration, escape, fraction, human_bytes, millis, percent, seconds,
};
use super::svg;
use crate::status::{Ratio, StatusReport};

/// One figure of a card: label, formatted value, raw value.
fn fig(out: &mut String, id: &str, label: &str, text: &str, raw: impl Display) {
    let _ = write!(
        out,
        r#"<div class="fig"><dt>{label}</dt><dd id="{id}" data-value="{}">{text}</dd></div>"#,
        escape(&raw.to_string())
    );
}

/// A byte figure: `1.5 GiB`, raw bytes in `data-value`.
fn bytes_fig(out: &mut String, id: &str, label: &str, bytes: u64) {
    fig(out, id, label, &human_bytes(bytes), bytes);
}

/// A count figure.
fn count_fig(out: &mut String, id: &str, label: &str, n: u64) {
    fig(out, id, label, &count(n), n);
}

/// A card with a heading; `body` writes its content.
fn card(out: &mut String, id: &str, title: &str, body: impl FnOnce(&mut String)) {
    let _ = write!(out, r#"<section class="card" id="{id}"><h2>{title}</h2>"#);
    body(out);
    out.push_str("</section>");
}

/// An empty state: one quiet sentence where figures would be.
fn empty(out: &mut String, id: &str, text: &str) {
    let _ = write!(out, r#"<p class="empty" id="{id}">{text}</p>"#);
}

/// The headline: bytes served locally that would otherwise have crossed the
/// WAN, and the time that saved.
pub fn savings(out: &mut String, r: &StatusReport) {
    let w = &r.wan;
    out.push_str(r#"<section class="hero" id="wan">"#);
    let _ = write!(
        out,
        r#"<div class="big"><div class="num" id="wan-served" data-value="{}">{}</div><div class="what">served from the local store{}</div></div>"#,
        w.bytes_served_locally,
        human_bytes(w.bytes_served_locally),
        if r.upstream.is_some() {
            " that would otherwise have crossed the WAN"
        } else {
            ""
        }
    );
    match (&r.upstream, w.seconds_saved) {
        (None, _) => {
            out.push_str(r#"<div class="big"><div class="num dim" id="wan-saved" data-value="">–</div><div class="what">no upstream: standalone cache, nothing crosses a WAN</div></div>"#);
        }
        (Some(_), Some(saved)) => {
            let _ = write!(
                out,
                r#"<div class="big"><div class="num" id="wan-saved" data-value="{saved}">{}</div><div class="what">of transfer time saved{}</div></div>"#,
                duration(saved),
                link_words(w.link_bytes_per_second, w.link_rtt_ms)
            );
        }
        (Some(_), None) => {
            out.push_str(r#"<div class="big"><div class="num dim" id="wan-saved" data-value="">–</div><div class="what">time saved: the link is not measured yet</div></div>"#);
        }
    }
    if r.upstream.is_none() {
        out.push_str("</section>");
        return;
    }
    out.push_str(r#"<dl class="figs side">"#);
    bytes_fig(
        out,
        "wan-from-upstream",
        "Fetched from the upstream",
        w.bytes_from_upstream,
    );
    let total = w.bytes_served_locally + w.bytes_from_upstream;
    let share = (total > 0).then(|| fraction(w.bytes_served_locally, total));
    let text = percent(share);
    fig(
        out,
        "wan-local-share",
        "Share served locally",
        &text,
        opt(share),
    );
    out.push_str("</dl></section>");
}

/// " at 12.0 MiB/s and 38 ms round trip", or nothing.
fn link_words(rate: Option<f64>, rtt: Option<f64>) -> String {
    match (rate, rtt) {
        (Some(b), Some(ms)) => format!(" at {} and {} round trip", bytes_per_second(b), millis(ms)),
        (Some(b), None) => format!(" at {}", bytes_per_second(b)),
        (None, Some(ms)) => format!(" at {} round trip", millis(ms)),
        (None, None) => String::new(),
    }
}

/// The three hit rates as big numbers.
pub fn hit_rates(out: &mut String, r: &StatusReport) {
    card(out, "hit-rates", "Hit rates since start", |out| {
        out.push_str(r#"<div class="rates">"#);
        let h = &r.hit_rates;
        for (id, label, ratio) in [
            ("cas-hit-rate", "CAS", h.cas),
            ("ac-hit-rate", "Action cache", h.action_cache),
            ("asset-hit-rate", "Assets", h.assets),
        ] {
            rate(out, id, label, ratio);
        }
        out.push_str("</div>");
    });
}

fn rate(out: &mut String, id: &str, label: &str, ratio: Ratio) {
    let _ = write!(
        out,
        r#"<div class="rate"><div class="num" id="{id}" data-hits="{}" data-misses="{}" data-value="{}">{}</div><div class="what">{label}</div><div class="sub">{}</div></div>"#,
        ratio.hits,
        ratio.misses,
        ratio.rate.map(|r| r.to_string()).unwrap_or_default(),
        percent(ratio.rate),
        lookups(ratio),
    );
}

/// `"90 of 100 lookups"`, `"no lookups yet"`.
fn lookups(ratio: Ratio) -> String {
    match ratio.hits + ratio.misses {
        0 => "no lookups yet".to_string(),
        1 => format!("{} of 1 lookup", ratio.hits),
        total => format!("{} of {} lookups", count(ratio.hits), count(total)),
    }
}

/// The local store against its quota.
pub fn store(out: &mut String, r: &StatusReport) {
    let s = &r.store;
    card(out, "store", "Local store", |out| {
        let used = fraction(s.used_bytes, s.quota_bytes);
        let reserved = fraction(s.reserved_bytes, s.quota_bytes).min(1.0 - used);
        let _ = write!(
            out,
            r#"<div class="meter{}" id="store-bar" role="meter" aria-valuemin="0" aria-valuemax="{}" aria-valuenow="{}" data-used="{}" data-quota="{}"><div class="fill" style="width:{:.2}%"></div><div class="reserved" style="width:{:.2}%"></div></div>"#,
            if used >= 0.9 { " high" } else { "" },
            s.quota_bytes,
            s.used_bytes,
            s.used_bytes,
            s.quota_bytes,
            used * 100.0,
            reserved * 100.0,
        );
        let _ = write!(
            out,
            r#"<p class="sub"><span id="store-used" data-value="{}">{}</span> of <span id="store-quota" data-value="{}">{}</span> ({:.1}%)</p><dl class="figs">"#,
            s.used_bytes,
            human_bytes(s.used_bytes),
            s.quota_bytes,
            human_bytes(s.quota_bytes),
            used * 100.0
        );
        count_fig(out, "store-blobs", "CAS blobs", s.blobs);
        count_fig(out, "store-actions", "Action results", s.action_results);
        count_fig(out, "store-assets", "Asset entries", s.asset_entries);
        bytes_fig(
            out,
            "store-reserved",
            "Reserved by writes",
            s.reserved_bytes,
        );
        count_fig(out, "store-evicted", "Evicted entries", s.evicted_entries);
        bytes_fig(out, "store-evicted-bytes", "Evicted bytes", s.evicted_bytes);
        count_fig(
            out,
            "store-corrupt",
            "Corrupt blobs removed",
            s.corrupt_blobs,
        );
        let _ = write!(
            out,
            r#"</dl><p class="sub mono" title="data directory">{}</p>"#,
            escape(&s.data_dir)
        );
    });
}

/// The upstream's health and link, or the standalone note.
pub fn upstream(out: &mut String, r: &StatusReport) {
    card(out, "upstream", "Upstream", |out| {
        let Some(u) = &r.upstream else {
            empty(out, "upstream-none", "No upstream: standalone cache.");
            return;
        };
        let _ = write!(
            out,
            r#"<p class="endpoint"><span class="pill {}" id="upstream-health" data-value="{}">{}</span> <span class="mono" id="upstream-endpoint">{}</span></p>"#,
            if u.healthy { "ok" } else { "bad" },
            u.healthy,
            if u.healthy { "healthy" } else { "unreachable" },
            escape(&u.endpoint),
        );
        if let Some(e) = u.last_error.as_deref().filter(|_| !u.healthy) {
            let _ = write!(
                out,
                r#"<p class="error" id="upstream-last-error">{}</p>"#,
                escape(e)
            );
        }
        out.push_str(r#"<dl class="figs">"#);
        let rtt = u.rtt_ms.map_or("not measured yet".to_string(), millis);
        fig(out, "upstream-rtt", "Round trip", &rtt, opt(u.rtt_ms));
        let tput = u
            .throughput_bytes_per_second
            .map_or("not measured yet".to_string(), bytes_per_second);
        let raw = opt(u.throughput_bytes_per_second);
        fig(
            out,
            "upstream-throughput",
            "Download throughput",
            &tput,
            raw,
        );
        count_fig(out, "upstream-calls", "Calls", u.calls);
        count_fig(out, "upstream-errors", "Failed calls", u.errors);
        count_fig(out, "upstream-retries", "Retried attempts", u.retries);
        bytes_fig(out, "upstream-received", "Received", u.bytes_received);
        bytes_fig(out, "upstream-sent", "Sent", u.bytes_sent);
        out.push_str("</dl>");
    });
}

/// An optional number as a `data-value` (empty when absent).
fn opt(value: Option<f64>) -> String {
    value.map(|v| v.to_string()).unwrap_or_default()
}

/// The two charts over the last hour.
pub fn charts(out: &mut String, r: &StatusReport) {
    card(out, "chart-rates", "Hit rate per minute", |out| {
        out.push_str(&svg::hit_rate_chart(&r.history));
        out.push_str(r#"<p class="legend"><i class="s-cas"></i>CAS <i class="s-ac"></i>Action cache <i class="s-asset"></i>Assets</p>"#);
    });
    card(out, "chart-traffic", "Bytes per minute", |out| {
        out.push_str(&svg::bytes_chart(&r.history));
        out.push_str(r#"<p class="legend"><i class="s-local"></i>Served locally <i class="s-upstream"></i>Fetched from the upstream</p>"#);
    });
}

/// How well prefetch works.
pub fn prefetch(out: &mut String, r: &StatusReport) {
    let p = &r.prefetch;
    card(out, "prefetch", "Prefetch", |out| {
        if !p.enabled && p.blobs == 0 {
            let why = if r.upstream.is_some() {
                "Prefetch is off (disabled in the configuration)."
            } else {
                "Prefetch is off: it runs in proxy mode."
            };
            empty(out, "prefetch-off", why);
            return;
        }
        let used = p.hits + p.joins;
        let useful = (p.blobs > 0).then(|| fraction(used, p.blobs));
        let _ = write!(
            out,
            r#"<p class="sub"><b id="prefetch-useful" data-value="{}">{}</b> of prefetched blobs were read by a client</p><dl class="figs">"#,
            opt(useful),
            percent(useful)
        );
        count_fig(out, "prefetch-blobs", "Blobs prefetched", p.blobs);
        bytes_fig(out, "prefetch-bytes", "Bytes prefetched", p.bytes);
        count_fig(out, "prefetch-hits", "Reads served by prefetch", p.hits);
        count_fig(out, "prefetch-joins", "Reads that joined one", p.joins);
        count_fig(out, "prefetch-missed", "Skipped, then read", p.missed);
        bytes_fig(out, "prefetch-wasted", "Evicted unread", p.wasted_bytes);
        count_fig(
            out,
            "prefetch-reading",
            "Invocations reading outputs",
            p.invocations_reading,
        );
        count_fig(
            out,
            "prefetch-not-reading",
            "Invocations not reading",
            p.invocations_not_reading,
        );
        count_fig(
            out,
            "prefetch-learning",
            "Invocations still learning",
            p.invocations_learning,
        );
        out.push_str("</dl>");
    });
}

/// The write-back upload queue, when there is one.
pub fn uploads(out: &mut String, r: &StatusReport) {
    card(out, "uploads", "Upload queue", |out| {
        let Some(q) = &r.uploads else {
            let why = if r.upstream.is_some() {
                "No upload queue: writes go through to the upstream (write-back is off)."
            } else {
                "No upload queue: standalone cache."
            };
            empty(out, "uploads-none", why);
            return;
        };
        out.push_str(r#"<dl class="figs">"#);
        count_fig(out, "uploads-queued", "Blobs waiting", q.queued_blobs);
        bytes_fig(out, "uploads-queued-bytes", "Bytes waiting", q.queued_bytes);
        count_fig(out, "uploads-results", "Results waiting", q.queued_results);
        let age = seconds(q.oldest_age_seconds);
        fig(
            out,
            "uploads-oldest",
            "Oldest entry",
            &age,
            q.oldest_age_seconds,
        );
        count_fig(out, "uploads-uploaded", "Uploaded", q.uploaded);
        bytes_fig(
            out,
            "uploads-uploaded-bytes",
            "Bytes uploaded",
            q.uploaded_bytes,
        );
        count_fig(out, "uploads-failed", "Given up", q.failed);
        out.push_str("</dl>");
    });
}

/// What zstd saves at rest and on the wire.
pub fn compression(out: &mut String, r: &StatusReport) {
    let c = &r.compression;
    card(out, "compression", "Compression", |out| {
        out.push_str(r#"<dl class="figs">"#);
        let disk_saved = c.stored_plain_bytes.saturating_sub(c.stored_disk_bytes);
        bytes_fig(out, "compression-disk-saved", "Disk saved", disk_saved);
        count_fig(
            out,
            "compression-stored",
            "Blobs stored compressed",
            c.stored_blobs,
        );
        let wan_saved = c.upstream_plain_bytes.saturating_sub(c.upstream_wire_bytes);
        bytes_fig(out, "compression-wan-saved", "WAN bytes saved", wan_saved);
        count_fig(
            out,
            "compression-clients",
            "Client blobs compressed",
            c.client_blobs,
        );
        out.push_str("</dl>");
    });
}

/// Authentication failures and limit refusals.
pub fn access(out: &mut String, r: &StatusReport) {
    let a = &r.auth;
    card(out, "auth", "Access", |out| {
        out.push_str(r#"<dl class="figs">"#);
        count_fig(
            out,
            "auth-accepted",
            "Admitted with a credential",
            a.accepted,
        );
        count_fig(out, "auth-failures", "Refused: unauthenticated", a.failures);
        count_fig(out, "auth-denied", "Refused: not allowed", a.denied);
        count_fig(
            out,
            "auth-limit-refusals",
            "Refused: over the client limit",
            a.limit_refusals,
        );
        out.push_str("</dl>");
    });
}

/// The busiest clients.
pub fn clients(out: &mut String, r: &StatusReport) {
    card(out, "clients", "Busiest clients", |out| {
        if r.clients.is_empty() {
            empty(out, "clients-empty", "No client calls recorded yet.");
            return;
        }
        out.push_str(r#"<table><thead><tr><th>Tool</th><th>Invocation</th><th>Client</th><th class="n">Calls</th><th class="n">Errors</th><th class="n">Last seen</th></tr></thead><tbody>"#);
        for c in &r.clients {
            let (tool, invocation, client) =
                (escape(&c.tool), escape(&c.invocation), escape(&c.client));
            let _ = write!(
                out,
                r#"<tr class="client" data-tool="{tool}" data-invocation="{invocation}" data-calls="{}" data-errors="{}"><td class="tool">{tool}</td><td class="mono">{}</td><td>{}</td><td class="n">{}</td><td class="n{}">{}</td><td class="n">{}</td></tr>"#,
                c.calls,
                c.errors,
                if invocation.is_empty() {
                    "–"
                } else {
                    &invocation
                },
                if client.is_empty() { "–" } else { &client },
                count(c.calls),
                if c.errors > 0 { " warn" } else { "" },
                count(c.errors),
                ago(c.last_seen_seconds_ago),
            );
        }
        out.push_str("</tbody></table>");
    });
}

/// Recent errors by code and method.
pub fn errors(out: &mut String, r: &StatusReport) {
    card(out, "errors", "Recent errors", |out| {
        if r.errors.is_empty() {
            empty(out, "errors-empty", "No errors.");
            return;
        }
        out.push_str(r#"<table><thead><tr><th>Code</th><th>Method</th><th class="n">Count</th><th class="n">Last seen</th></tr></thead><tbody>"#);
        for e in &r.errors {
            let (code, method) = (escape(&e.code), escape(&e.method));
            // Long service names wrap after the slash, not mid-word.
            let shown = method.replace('/', "/<wbr>");
            let _ = write!(
                out,
                r#"<tr class="error-row" data-code="{code}" data-method="{method}" data-count="{}"><td><span class="code">{code}</span></td><td class="mono">{shown}</td><td class="n">{}</td><td class="n">{}</td></tr>"#,
                e.count,
                count(e.count),
                ago(e.last_seen_seconds_ago),
            );
        }
        out.push_str("</tbody></table>");
    });
}
