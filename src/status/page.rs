//! The HTML status page at `/` of the metrics listener: server-rendered
//! from a [`StatusReport`], self-contained (inline CSS, inline SVG charts,
//! a few lines of script for a pausable auto-refresh; no external assets).
//!
//! Layout: [`sections`] writes each part in page order, [`svg`] draws the
//! charts, [`format`] writes numbers and escapes every string taken from
//! the report (tool names and invocation ids come from clients).

mod format;
mod sections;
mod svg;
#[cfg(test)]
mod tests;

use std::fmt::Write;

use super::StatusReport;
use format::{escape, seconds};

/// Seconds between automatic reloads while auto-refresh is on.
const REFRESH_SECONDS: u32 = 10;

/// Renders `report` as a self-contained HTML page.
pub fn render(report: &StatusReport) -> String {
    let mut out = String::with_capacity(48 * 1024);
    let _ = write!(
        out,
        r#"<!doctype html><html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1"><title>Outpost {} · {}</title><style>{STYLE}</style></head><body>"#,
        escape(&report.version),
        escape(&report.mode),
    );
    header(&mut out, report);
    out.push_str("<main>");
    sections::savings(&mut out, report);
    out.push_str(r#"<div class="grid">"#);
    sections::hit_rates(&mut out, report);
    sections::store(&mut out, report);
    sections::upstream(&mut out, report);
    out.push_str(r#"</div><div class="grid two">"#);
    sections::charts(&mut out, report);
    out.push_str(r#"</div><div class="grid four">"#);
    sections::prefetch(&mut out, report);
    sections::uploads(&mut out, report);
    sections::compression(&mut out, report);
    sections::access(&mut out, report);
    out.push_str(r#"</div><div class="grid two">"#);
    sections::clients(&mut out, report);
    sections::errors(&mut out, report);
    out.push_str("</div></main>");
    let _ = write!(
        out,
        r#"<footer>The same figures as JSON at <a href="status">/status</a>, for Prometheus at <a href="metrics">/metrics</a>. Report taken <span id="generated" data-value="{at}">{when}</span>.</footer><script>{script}</script></body></html>"#,
        at = report.generated_unix,
        when = format::utc(report.generated_unix),
        script = SCRIPT.replace("REFRESH_MS", &(REFRESH_SECONDS * 1000).to_string()),
    );
    out
}

/// The title bar: name, mode, version, uptime, the refresh switch.
fn header(out: &mut String, r: &StatusReport) {
    let _ = write!(
        out,
        r#"<header><h1>Outpost</h1><span class="pill mode" id="mode" data-value="{mode}">{mode}</span><span class="meta">version <b id="version" data-value="{version}">{version}</b> · up <b id="uptime" data-value="{}">{}</b></span><label class="refresh"><input type="checkbox" id="refresh" checked> refresh every {REFRESH_SECONDS} s</label></header>"#,
        r.uptime_seconds,
        seconds(r.uptime_seconds),
        mode = escape(&r.mode),
        version = escape(&r.version),
    );
}

/// Reloads every [`REFRESH_SECONDS`] unless paused; the choice survives the
/// reload (localStorage).
const SCRIPT: &str = r#"
const box = document.getElementById('refresh');
box.checked = localStorage.getItem('outpost-refresh') !== 'off';
box.addEventListener('change', () => localStorage.setItem('outpost-refresh', box.checked ? 'on' : 'off'));
setInterval(() => { if (box.checked) location.reload(); }, REFRESH_MS);
"#;

/// The page's look: cards on a quiet background, light and dark.
const STYLE: &str = r#"
:root{--bg:#f4f6f9;--card:#fff;--text:#1d2430;--dim:#6b7686;--line:#e3e7ee;--accent:#0f766e;
--ok:#15803d;--bad:#b91c1c;--warn:#b45309;--cas:#2563eb;--ac:#16a34a;--asset:#d97706;
--local:#0f9d76;--upstream:#94a3b8;font:15px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif}
@media (prefers-color-scheme:dark){:root{--bg:#11151b;--card:#1a2029;--text:#e6e9ee;--dim:#98a2b3;
--line:#2a323e;--accent:#2dd4bf;--upstream:#64748b}}
*{box-sizing:border-box}body{margin:0;background:var(--bg);color:var(--text)}
header{display:flex;align-items:center;gap:14px;flex-wrap:wrap;padding:14px 28px;background:var(--card);
border-bottom:1px solid var(--line)}
h1{font-size:22px;margin:0;letter-spacing:.5px}
.meta{color:var(--dim)}.meta b{color:var(--text);font-weight:600}
.refresh{margin-left:auto;color:var(--dim);font-size:13px;cursor:pointer}
main{max-width:1240px;margin:0 auto;padding:20px 28px}
.grid{display:grid;grid-template-columns:repeat(auto-fit,minmax(330px,1fr));gap:16px;margin-bottom:16px}
.grid.two{grid-template-columns:repeat(auto-fit,minmax(480px,1fr))}
.grid.four{grid-template-columns:repeat(auto-fit,minmax(260px,1fr))}
.card,.hero{background:var(--card);border:1px solid var(--line);border-radius:12px;padding:16px 20px}
h2{font-size:13px;text-transform:uppercase;letter-spacing:.8px;color:var(--dim);margin:0 0 12px}
.hero{display:flex;gap:40px;align-items:center;flex-wrap:wrap;margin-bottom:16px;
border-left:6px solid var(--accent)}
.big .num{font-size:44px;font-weight:700;line-height:1.1;color:var(--accent)}
.num.dim{color:var(--dim)}.what{color:var(--dim);max-width:340px}
.hero .side{margin-left:auto;min-width:280px;grid-template-columns:1fr}
.rates{display:flex;justify-content:space-between;gap:12px;text-align:center}.rate{flex:1}
.rate .num{font-size:32px;font-weight:700}.rate .what{font-weight:600;color:var(--text);white-space:nowrap}
.sub{color:var(--dim);font-size:13px;margin:6px 0}
dl.figs{margin:8px 0 0;display:grid;grid-template-columns:repeat(auto-fill,minmax(210px,1fr));gap:4px 22px}
.fig{display:flex;justify-content:space-between;gap:12px;border-bottom:1px dashed var(--line);padding:3px 0}
dt{color:var(--dim)}dd{margin:0;font-weight:600;font-variant-numeric:tabular-nums;text-align:right;white-space:nowrap}
.meter{position:relative;display:flex;height:16px;border-radius:8px;background:var(--line);overflow:hidden}
.meter .fill{background:var(--accent)}.meter.high .fill{background:var(--warn)}
.meter .reserved{background:repeating-linear-gradient(45deg,var(--accent) 0 4px,transparent 4px 8px);opacity:.5}
.pill{display:inline-block;padding:2px 10px;border-radius:999px;font-size:13px;font-weight:600;
background:var(--line)}.pill.ok{background:#dcfce7;color:var(--ok)}.pill.bad{background:#fee2e2;color:var(--bad)}
.pill.mode{background:var(--accent);color:#fff}
.endpoint{margin:0 0 6px}.mono{font-family:ui-monospace,SFMono-Regular,Menlo,monospace;font-size:13px;
overflow-wrap:anywhere}
.error{color:var(--bad);font-size:13px}.empty{color:var(--dim);font-style:italic;margin:8px 0}
table{width:100%;border-collapse:collapse;font-size:14px}
th{text-align:left;color:var(--dim);font-weight:600;border-bottom:1px solid var(--line);padding:4px 6px}
td{border-bottom:1px solid var(--line);padding:5px 6px;vertical-align:top}
.tool{white-space:nowrap}.n{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}.warn{color:var(--bad);font-weight:600}
.code{font-family:ui-monospace,monospace;font-size:12px;background:#fee2e2;color:var(--bad);padding:1px 6px;border-radius:4px}
svg.chart{width:100%;height:auto;display:block}
.chart .gridline{stroke:var(--line);stroke-width:1}.chart .axis{fill:var(--dim);font-size:11px}
.chart .empty{fill:var(--dim);font-size:14px;font-style:italic}
.chart .line{fill:none;stroke-width:2}.chart .dot{stroke:none}
.s-cas{stroke:var(--cas);fill:var(--cas);background:var(--cas)}
.s-ac{stroke:var(--ac);fill:var(--ac);background:var(--ac)}
.s-asset{stroke:var(--asset);fill:var(--asset);background:var(--asset)}
.s-local{fill:var(--local);background:var(--local)}.s-upstream{fill:var(--upstream);background:var(--upstream)}
.chart .line.s-cas,.chart .line.s-ac,.chart .line.s-asset{fill:none}
.legend{color:var(--dim);font-size:13px;margin:6px 0 0}
.legend i{display:inline-block;width:10px;height:10px;border-radius:2px;margin:0 5px 0 12px}
.legend i:first-child{margin-left:0}
footer{max-width:1240px;margin:0 auto;padding:4px 28px 28px;color:var(--dim);font-size:13px}
a{color:var(--accent)}
"#;
