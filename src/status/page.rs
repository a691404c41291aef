//! The HTML status page at `/` of the metrics listener: server-rendered
//! from a [`StatusReport`], no external assets.

use super::StatusReport;

/// Renders `report` as a self-contained HTML page.
pub fn render(report: &StatusReport) -> String {
    let json = serde_json::to_string_pretty(report).unwrap_or_default();
    let escaped = json
        .replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;");
    format!(
        "<!doctype html><html><head><meta charset=\"utf-8\"><title>Outpost {}</title></head>\
         <body><pre>{escaped}</pre></body></html>",
        report.version
    )
}
