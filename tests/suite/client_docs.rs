//! Keeps the client docs honest: the Bazel flags `docs/clients/bazel.md`
//! shows are the ones the end-to-end suite runs (or are listed here as not
//! run, as the page says), BuildStream's cache configuration is the one
//! `tests/e2e/test_bst_asset_cache.sh` writes, and every relative link in
//! the README and `docs/` leads to a file and heading that exist.

use std::collections::BTreeSet;
use std::fs;
use std::path::{Path, PathBuf};

/// Flags `bazel.md` names that no `tests/e2e/*.sh` passes: each is marked
/// "not run by the suite" on the page (or, for `--remote_instance_name`,
/// passed by the lab's `bazel_build.sh` outside this repository).
const BAZEL_FLAGS_NOT_IN_E2E: &[&str] = &[
    "--bazelrc", // `outpost doctor --bazelrc`, not a Bazel flag
    "--experimental_remote_cache_compression",
    "--experimental_remote_downloader_local_fallback",
    "--noremote_upload_local_results",
    "--remote_cache_compression",
    "--remote_download_all",
    "--remote_instance_name",
    "--remote_local_fallback",
    "--remote_proxy",
    "--tls_client_certificate",
    "--tls_client_key",
];

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn read(path: &Path) -> String {
    fs::read_to_string(path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()))
}

/// Every `--flag_name` (lowercase, digits, `_`) in `text`.
fn double_dash_flags(text: &str) -> BTreeSet<String> {
    let bytes = text.as_bytes();
    let mut flags = BTreeSet::new();
    let mut i = 0;
    while i + 2 < bytes.len() {
        let starts = bytes[i] == b'-'
            && bytes[i + 1] == b'-'
            && bytes[i + 2].is_ascii_lowercase()
            && (i == 0 || !(bytes[i - 1].is_ascii_alphanumeric() || bytes[i - 1] == b'-'));
        if !starts {
            i += 1;
            continue;
        }
        let mut end = i + 2;
        while end < bytes.len()
            && (bytes[end].is_ascii_lowercase()
                || bytes[end].is_ascii_digit()
                || bytes[end] == b'_')
        {
            end += 1;
        }
        flags.insert(text[i..end].to_string());
        i = end;
    }
    flags
}

/// The text of every `tests/e2e/*.sh`.
fn e2e_scripts() -> String {
    let dir = root().join("tests/e2e");
    let mut all = String::new();
    for entry in fs::read_dir(&dir).expect("tests/e2e") {
        let path = entry.expect("dir entry").path();
        if path.extension().is_some_and(|e| e == "sh") {
            all.push_str(&read(&path));
        }
    }
    all
}

#[test]
fn bazel_page_flags_are_run_by_the_e2e_suite_or_listed_as_not_run() {
    let page = read(&root().join("docs/clients/bazel.md"));
    let scripts = e2e_scripts();
    let not_run: BTreeSet<&str> = BAZEL_FLAGS_NOT_IN_E2E.iter().copied().collect();
    let flags = double_dash_flags(&page);
    let unexplained: Vec<&String> = flags
        .iter()
        .filter(|f| !scripts.contains(f.as_str()) && !not_run.contains(f.as_str()))
        .collect();
    assert!(
        unexplained.is_empty(),
        "docs/clients/bazel.md shows flags no tests/e2e/*.sh runs: {unexplained:?}; \
         run them in the suite, or mark them \"not run by the suite\" on the page and list them \
         in BAZEL_FLAGS_NOT_IN_E2E"
    );
    let stale: Vec<&&str> = not_run.iter().filter(|f| !flags.contains(**f)).collect();
    assert!(
        stale.is_empty(),
        "BAZEL_FLAGS_NOT_IN_E2E lists flags the page no longer shows: {stale:?}"
    );
}

#[test]
fn buildstream_page_shows_the_cache_config_the_e2e_suite_writes() {
    let script = read(&root().join("tests/e2e/test_bst_asset_cache.sh"));
    let start = script
        .find("artifacts:\n")
        .expect("the test writes an artifacts: section");
    let rest = &script[start..];
    let end = rest.find("\nEOF").expect("the heredoc ends with EOF");
    let written = rest[..end].replace("$port", "8980");
    let page = read(&root().join("docs/clients/buildstream.md"));
    assert!(
        page.contains(&written),
        "docs/clients/buildstream.md must show the artifacts/source-caches entries \
         test_bst_asset_cache.sh writes (with port 8980):\n{written}"
    );
}

/// GitHub's anchor for a heading: lowercase, punctuation other than `-` and
/// `_` dropped, spaces as `-`.
fn anchor(heading: &str) -> String {
    heading
        .trim()
        .to_lowercase()
        .chars()
        .filter(|c| c.is_alphanumeric() || *c == ' ' || *c == '-' || *c == '_')
        .map(|c| if c == ' ' { '-' } else { c })
        .collect()
}

/// The lines of a markdown file outside ``` code fences.
fn prose_lines(text: &str) -> Vec<&str> {
    let mut in_code = false;
    let mut lines = Vec::new();
    for line in text.lines() {
        if line.trim_start().starts_with("```") {
            in_code = !in_code;
        } else if !in_code {
            lines.push(line);
        }
    }
    lines
}

fn anchors(text: &str) -> BTreeSet<String> {
    prose_lines(text)
        .into_iter()
        .filter_map(|line| line.strip_prefix('#'))
        .map(|h| anchor(h.trim_start_matches('#')))
        .collect()
}

/// The targets of `[text](target)` links in the prose of `text`.
fn link_targets(text: &str) -> Vec<String> {
    let mut targets = Vec::new();
    for line in prose_lines(text) {
        let mut rest = line;
        while let Some(at) = rest.find("](") {
            let after = &rest[at + 2..];
            match after.find(')') {
                Some(close) => {
                    targets.push(after[..close].to_string());
                    rest = &after[close..];
                }
                None => break,
            }
        }
    }
    targets
}

#[test]
fn relative_links_in_readme_and_docs_lead_somewhere() {
    let mut pages = vec![root().join("README.md"), root().join("docs/operations.md")];
    for entry in fs::read_dir(root().join("docs/clients")).expect("docs/clients") {
        pages.push(entry.expect("dir entry").path());
    }
    let mut broken = Vec::new();
    for page in &pages {
        let text = read(page);
        for target in link_targets(&text) {
            if target.contains("://") || target.starts_with("mailto:") {
                continue;
            }
            let (file, fragment) = match target.split_once('#') {
                Some((file, fragment)) => (file, Some(fragment)),
                None => (target.as_str(), None),
            };
            let path = if file.is_empty() {
                page.clone()
            } else {
                page.parent().expect("page has a directory").join(file)
            };
            if !path.exists() {
                broken.push(format!("{}: {target} (no such file)", page.display()));
                continue;
            }
            if let Some(fragment) = fragment
                && !anchors(&read(&path)).contains(fragment)
            {
                broken.push(format!("{}: {target} (no such heading)", page.display()));
            }
        }
    }
    assert!(broken.is_empty(), "broken links:\n{}", broken.join("\n"));
}

#[test]
fn the_link_checker_notices_a_broken_anchor_and_a_flag() {
    // The helpers above, on text made to fail: a test that could not fail
    // would prove nothing.
    let text = "# Remote downloader (Remote Asset API)\n```\n# not a heading\n```\n";
    assert!(anchors(text).contains("remote-downloader-remote-asset-api"));
    assert!(!anchors(text).contains("not-a-heading"));
    assert_eq!(
        link_targets("see [x](a.md#b) and [y](c.md)"),
        ["a.md#b", "c.md"]
    );
    let flags = double_dash_flags("bazel build --remote_cache=grpc://x a--b --x2_y");
    assert_eq!(
        flags.into_iter().collect::<Vec<_>>(),
        ["--remote_cache", "--x2_y"]
    );
}
