//! How the page writes numbers, durations and untrusted text: one place, so
//! every figure reads the same and every client-supplied string is escaped.

pub use crate::cli::human_bytes;
pub use crate::cli::{human_duration as duration, human_millis as millis};

/// `text` safe inside HTML text and double- or single-quoted attributes.
/// Tool names and invocation ids come from clients: everything taken from
/// the report goes through here.
pub fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            // NUL and other controls are not allowed in HTML text.
            c if c.is_control() => out.push('\u{fffd}'),
            c => out.push(c),
        }
    }
    out
}

/// A rate in 0..=1 as `"87.5%"`, `"–"` before the first lookup.
pub fn percent(rate: Option<f64>) -> String {
    match rate {
        Some(r) if r.is_finite() => format!("{:.1}%", r * 100.0),
        _ => "–".to_string(),
    }
}

/// A count with thin separators: `1 234 567`.
pub fn count(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::with_capacity(digits.len() + digits.len() / 3);
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push('\u{202f}');
        }
        out.push(c);
    }
    out
}

/// Whole seconds: `"0 s"`, `"42 s"`, `"3 min 20 s"`.
pub fn seconds(s: u64) -> String {
    if s < 60 {
        format!("{s} s")
    } else {
        duration(s as f64)
    }
}

/// How long ago: `"just now"`, `"42 s ago"`, `"3 min 20 s ago"`.
pub fn ago(s: u64) -> String {
    if s == 0 {
        "just now".to_string()
    } else {
        format!("{} ago", seconds(s))
    }
}

/// A throughput: `"12.5 MiB/s"`.
pub fn bytes_per_second(rate: f64) -> String {
    if !rate.is_finite() || rate < 0.0 {
        return "–".to_string();
    }
    format!("{}/s", human_bytes(rate as u64))
}

/// A ratio `part / whole` in 0..=1, 0 when `whole` is 0.
pub fn fraction(part: u64, whole: u64) -> f64 {
    if whole == 0 {
        0.0
    } else {
        (part as f64 / whole as f64).clamp(0.0, 1.0)
    }
}

/// A Unix time as `2026-11-30 06:10:53 UTC` (the civil calendar from days
/// since 1970, Howard Hinnant's `civil_from_days`).
pub fn utc(unix: u64) -> String {
    let (days, secs) = (unix / 86_400, unix % 86_400);
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02} {:02}:{:02}:{:02} UTC",
        secs / 3600,
        secs % 3600 / 60,
        secs % 60
    )
}
