//! `outpost verify`: prints what the offline scrub of a store
//! ([`crate::store::local::scrub`]) finds, and with `--repair` removes.

use std::path::Path;

use super::human_bytes;
use crate::store::local::scrub::{self, ScrubReport};

/// Scrubs the store in `dir`, printing progress to stderr and the report to
/// stdout. Returns whether corrupt entries remain (the exit status).
pub fn run(dir: &Path, repair: bool) -> anyhow::Result<bool> {
    eprintln!(
        "verifying the store in {}{}",
        dir.display(),
        if repair { " (repairing)" } else { "" }
    );
    let mut progress = |r: &ScrubReport| {
        eprintln!(
            "  {}/{} entries, {} hashed at {}/s, {} corrupt so far",
            r.checked,
            r.entries,
            human_bytes(r.blob_bytes),
            human_bytes(r.bytes_per_sec() as u64),
            r.corrupt.len()
        );
    };
    let report = scrub::scrub(dir, repair, &mut progress)?;
    print!("{}", render(&report));
    Ok(report.corruption_remains())
}

/// The report as printed.
fn render(r: &ScrubReport) -> String {
    let mut out = format!(
        "blobs: {} inline, {} files ({} compressed), {} hashed in {:.1} s ({}/s)\n\
         action results: {} decoded; asset entries: {} decoded\n",
        r.inline_blobs,
        r.file_blobs,
        r.compressed_blobs,
        human_bytes(r.blob_bytes),
        r.elapsed.as_secs_f64(),
        human_bytes(r.bytes_per_sec() as u64),
        r.action_results,
        r.asset_records,
    );
    for c in &r.corrupt {
        out += &format!("corrupt: {}: {}\n", c.entry, c.why);
    }
    for path in &r.stray_files {
        out += &format!("stray file (no index entry): {}\n", path.display());
    }
    let (corrupt, stray) = (r.corrupt.len(), r.stray_files.len());
    out += &if corrupt + stray == 0 {
        "OK: no corrupt entries\n".to_string()
    } else if r.repaired {
        format!(
            "REPAIRED: removed {corrupt} corrupt entries, {stray} stray files and {} asset entries linked to them\n",
            r.asset_entries_dropped
        )
    } else if corrupt == 0 {
        format!(
            "OK: no corrupt entries; {stray} stray files (removed at the next start, or run with --repair)\n"
        )
    } else {
        format!("CORRUPT: {corrupt} entries; run again with --repair to remove them\n")
    };
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::local::scrub::CorruptEntry;

    #[test]
    fn the_report_names_each_corrupt_entry_and_what_to_do() {
        let mut r = ScrubReport {
            inline_blobs: 3,
            file_blobs: 1,
            blob_bytes: 2048,
            ..Default::default()
        };
        assert!(render(&r).ends_with("OK: no corrupt entries\n"));
        r.corrupt.push(CorruptEntry {
            entry: "file blob abc/5".into(),
            why: "does not hash".into(),
        });
        let text = render(&r);
        assert!(
            text.contains("corrupt: file blob abc/5: does not hash"),
            "{text}"
        );
        assert!(text.contains("--repair"), "{text}");
        r.repaired = true;
        assert!(render(&r).contains("REPAIRED: removed 1 corrupt entries"));
    }
}
