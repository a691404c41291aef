//! The page's charts: inline SVG drawn by the server from the per-minute
//! history (no script, no external assets). Each chart spans the last hour,
//! one slot per minute, newest at the right; minutes without samples stay
//! empty rather than being drawn as zero.

use std::fmt::Write;

use super::format::{escape, human_bytes};
use crate::status::MinuteSample;

/// Minutes a chart spans.
const SLOTS: u64 = 60;
/// The drawing's size in SVG units (it scales to the page's width).
const WIDTH: f64 = 600.0;
const HEIGHT: f64 = 190.0;
/// Room for the axis labels.
const LEFT: f64 = 54.0;
const RIGHT: f64 = 8.0;
const TOP: f64 = 10.0;
const BOTTOM: f64 = 24.0;

/// One line of the hit-rate chart.
struct Series {
    name: &'static str,
    class: &'static str,
    hits: fn(&MinuteSample) -> u64,
    misses: fn(&MinuteSample) -> u64,
}

const HIT_RATE_SERIES: [Series; 3] = [
    Series {
        name: "CAS",
        class: "s-cas",
        hits: |s| s.cas_hits,
        misses: |s| s.cas_misses,
    },
    Series {
        name: "Action cache",
        class: "s-ac",
        hits: |s| s.action_cache_hits,
        misses: |s| s.action_cache_misses,
    },
    Series {
        name: "Assets",
        class: "s-asset",
        hits: |s| s.asset_hits,
        misses: |s| s.asset_misses,
    },
];

/// Per-minute hit rates of the CAS, the action cache and assets, as lines
/// (a dot for a minute with lookups but no neighbour).
pub fn hit_rate_chart(history: &[MinuteSample]) -> String {
    let slots = place(history);
    let mut svg = open(
        "chart-hit-rate",
        "Hit rate per minute, last hour",
        slots.len(),
    );
    if slots.is_empty() {
        return close_empty(svg);
    }
    for pct in [0.0, 0.5, 1.0] {
        gridline(&mut svg, pct, &format!("{:.0}%", pct * 100.0));
    }
    for series in &HIT_RATE_SERIES {
        let points: Vec<(u64, f64, &MinuteSample)> = slots
            .iter()
            .filter_map(|&(slot, s)| {
                let (hits, misses) = ((series.hits)(s), (series.misses)(s));
                let total = hits + misses;
                (total > 0).then(|| (slot, hits as f64 / total as f64, s))
            })
            .collect();
        for run in points.chunk_by(|a, b| b.0 == a.0 + 1) {
            if run.len() > 1 {
                let coords: Vec<String> = run
                    .iter()
                    .map(|&(slot, rate, _)| format!("{:.1},{:.1}", x_mid(slot), y(rate)))
                    .collect();
                let _ = write!(
                    svg,
                    r#"<polyline class="line {}" points="{}"/>"#,
                    series.class,
                    coords.join(" ")
                );
            }
        }
        for &(slot, rate, s) in &points {
            let (hits, misses) = ((series.hits)(s), (series.misses)(s));
            let _ = write!(
                svg,
                r#"<circle class="dot {}" cx="{:.1}" cy="{:.1}" r="2.5"><title>{} {}: {:.1}% ({hits} of {})</title></circle>"#,
                series.class,
                x_mid(slot),
                y(rate),
                clock(s.minute_unix),
                series.name,
                rate * 100.0,
                hits + misses,
            );
        }
    }
    time_axis(&mut svg);
    svg.push_str("</svg>");
    svg
}

/// Per-minute blob bytes served locally against bytes fetched from the
/// upstream, as pairs of bars.
pub fn bytes_chart(history: &[MinuteSample]) -> String {
    let slots = place(history);
    let mut svg = open(
        "chart-bytes",
        "Bytes served locally and fetched from the upstream per minute, last hour",
        slots.len(),
    );
    if slots.is_empty() {
        return close_empty(svg);
    }
    let max = slots
        .iter()
        .map(|(_, s)| s.bytes_served_locally.max(s.upstream_bytes_received))
        .max()
        .unwrap_or(0)
        .max(1);
    gridline(&mut svg, 0.0, "0");
    gridline(&mut svg, 0.5, &human_bytes(max / 2));
    gridline(&mut svg, 1.0, &human_bytes(max));
    let slot_width = (WIDTH - LEFT - RIGHT) / SLOTS as f64;
    let bar = slot_width * 0.42;
    for &(slot, s) in &slots {
        let left = LEFT + slot as f64 * slot_width + slot_width * 0.08;
        for (i, (class, what, value)) in [
            ("s-local", "served locally", s.bytes_served_locally),
            ("s-upstream", "from the upstream", s.upstream_bytes_received),
        ]
        .into_iter()
        .enumerate()
        {
            if value == 0 {
                continue;
            }
            let top = y(value as f64 / max as f64);
            let _ = write!(
                svg,
                r#"<rect class="bar {class}" x="{:.1}" y="{top:.1}" width="{bar:.1}" height="{:.1}"><title>{} {what}: {}</title></rect>"#,
                left + i as f64 * bar,
                (y(0.0) - top).max(0.5),
                clock(s.minute_unix),
                human_bytes(value),
            );
        }
    }
    time_axis(&mut svg);
    svg.push_str("</svg>");
    svg
}

/// Samples of the last hour with their slot (0 = an hour ago, 59 = the
/// newest minute), oldest first. The newest sample anchors the hour.
fn place(history: &[MinuteSample]) -> Vec<(u64, &MinuteSample)> {
    let Some(newest) = history.iter().map(|s| s.minute_unix).max() else {
        return Vec::new();
    };
    let mut slots: Vec<(u64, &MinuteSample)> = history
        .iter()
        .filter_map(|s| {
            let age = (newest - s.minute_unix) / 60;
            (age < SLOTS).then(|| (SLOTS - 1 - age, s))
        })
        .collect();
    slots.sort_by_key(|&(slot, _)| slot);
    slots.dedup_by_key(|&mut (slot, _)| slot);
    slots
}

/// The opening tag, with the id and sample count the browser test reads.
fn open(id: &str, label: &str, samples: usize) -> String {
    format!(
        r#"<svg id="{id}" class="chart" data-samples="{samples}" viewBox="0 0 {WIDTH} {HEIGHT}" role="img" aria-label="{}"><title>{}</title>"#,
        escape(label),
        escape(label)
    )
}

/// An empty chart says why it is empty.
fn close_empty(mut svg: String) -> String {
    let _ = write!(
        svg,
        r#"<text class="empty" x="{}" y="{}" text-anchor="middle">No samples yet: the chart fills in minute by minute.</text></svg>"#,
        WIDTH / 2.0,
        HEIGHT / 2.0
    );
    svg
}

/// A horizontal line at `level` (0..=1 of the height) with its label.
fn gridline(svg: &mut String, level: f64, label: &str) {
    let at = y(level);
    let _ = write!(
        svg,
        r#"<line class="gridline" x1="{LEFT}" x2="{}" y1="{at:.1}" y2="{at:.1}"/><text class="axis" x="{}" y="{:.1}" text-anchor="end">{}</text>"#,
        WIDTH - RIGHT,
        LEFT - 6.0,
        at + 4.0,
        escape(label)
    );
}

/// Labels under the time axis.
fn time_axis(svg: &mut String) {
    let base = HEIGHT - 6.0;
    for (slot, anchor, label) in [
        (0, "start", "60 min ago"),
        (30, "middle", "30 min ago"),
        (SLOTS, "end", "now"),
    ] {
        let x = LEFT + slot as f64 * (WIDTH - LEFT - RIGHT) / SLOTS as f64;
        let _ = write!(
            svg,
            r#"<text class="axis" x="{x:.1}" y="{base}" text-anchor="{anchor}">{label}</text>"#
        );
    }
}

/// The x of a slot's middle.
fn x_mid(slot: u64) -> f64 {
    LEFT + (slot as f64 + 0.5) * (WIDTH - LEFT - RIGHT) / SLOTS as f64
}

/// The y of `level` (0..=1, clamped).
fn y(level: f64) -> f64 {
    let plot = HEIGHT - TOP - BOTTOM;
    TOP + plot * (1.0 - level.clamp(0.0, 1.0))
}

/// `HH:MM UTC` of a minute.
fn clock(unix: u64) -> String {
    let day = unix % 86_400;
    format!("{:02}:{:02} UTC", day / 3600, day % 3600 / 60)
}
