//! `outpost doctor`: checks the setup `serve` would run with (data
//! directory, listener, upstream) and prints one verdict per line with what
//! to do about it; `--bazelrc` prints the client lines for this setup.
//!
//! - this file: the report ([`Verdict`], [`Check`], [`Section`]), its text,
//!   the configuration section (a config that does not resolve is a FAIL,
//!   not a crash) and the run;
//! - [`data_dir`]: existence, write probe, free space against the quota,
//!   filesystem type, a store held by a running server;
//! - [`listener`]: loopback or not, TLS and credentials, whether the
//!   address is free or an Outpost (or something else) answers there;
//! - [`upstream`]: DNS, TCP connect, TLS, GetCapabilities; [`capabilities`]:
//!   what they mean for Outpost; [`probe`]: round-trip time, throughput and
//!   clock skew;
//! - [`bazelrc`]: the `.bazelrc` lines and the client section.
//!
//! Every network step has its own short timeout: a dead upstream or a
//! silent port makes doctor say so within seconds, never hang.

pub mod bazelrc;
pub mod capabilities;
pub mod data_dir;
pub mod listener;
pub mod probe;
pub mod upstream;

use std::fmt::Write as _;
use std::io::IsTerminal;
use std::path::PathBuf;
use std::time::Duration;

use crate::config::Config;

/// Bound on each network step (resolve, connect, one call): long enough for
/// a slow WAN, short enough that a dead peer is reported within seconds.
pub const STEP_TIMEOUT: Duration = Duration::from_secs(5);

/// What `outpost doctor` was asked to do besides the checks.
#[derive(Debug, Clone, Default)]
pub struct DoctorOptions {
    /// Print only the `.bazelrc` lines for this setup.
    pub bazelrc: bool,
    /// Skip the throughput probe (the one check that writes upstream).
    pub no_write: bool,
    /// The config file (`--config` or `OUTPOST_CONFIG`), named in the report.
    pub config_file: Option<PathBuf>,
}

/// How one check came out.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Fine as it is.
    Ok,
    /// Works, but probably not as intended (slow, unsafe, fragile).
    Warn,
    /// `serve` would fail or misbehave: doctor exits 1.
    Fail,
    /// Not checked (does not apply, or an earlier step failed).
    Skip,
}

impl Verdict {
    /// The word printed at the start of the line (FAIL shouts on purpose).
    pub fn word(self) -> &'static str {
        match self {
            Verdict::Ok => "ok",
            Verdict::Warn => "warn",
            Verdict::Fail => "FAIL",
            Verdict::Skip => "skip",
        }
    }

    /// ANSI colour of the word, used only when stdout is a terminal.
    fn colour(self) -> &'static str {
        match self {
            Verdict::Ok => "\x1b[32m",
            Verdict::Warn => "\x1b[33m",
            Verdict::Fail => "\x1b[1;31m",
            Verdict::Skip => "\x1b[2m",
        }
    }
}

/// One line of the report.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Check {
    /// The verdict.
    pub verdict: Verdict,
    /// What was checked, a few words ("free space").
    pub name: &'static str,
    /// What was found, in a sentence without its advice.
    pub finding: String,
    /// What to do about a warn or FAIL.
    pub advice: Option<String>,
}

impl Check {
    /// A passed check.
    pub fn ok(name: &'static str, finding: impl Into<String>) -> Self {
        Check::new(Verdict::Ok, name, finding, None)
    }

    /// A check that passed with a caveat, and what to do about it.
    pub fn warn(name: &'static str, finding: impl Into<String>, advice: impl Into<String>) -> Self {
        Check::new(Verdict::Warn, name, finding, Some(advice.into()))
    }

    /// A failed check, and what to do about it.
    pub fn fail(name: &'static str, finding: impl Into<String>, advice: impl Into<String>) -> Self {
        Check::new(Verdict::Fail, name, finding, Some(advice.into()))
    }

    /// A check not made, and why.
    pub fn skip(name: &'static str, why: impl Into<String>) -> Self {
        Check::new(Verdict::Skip, name, why, None)
    }

    fn new(
        verdict: Verdict,
        name: &'static str,
        finding: impl Into<String>,
        advice: Option<String>,
    ) -> Self {
        Check {
            verdict,
            name,
            finding: finding.into(),
            advice,
        }
    }
}

/// A titled group of checks (data directory, listener, upstream, client).
#[derive(Clone, Debug, Default)]
pub struct Section {
    /// Printed above its checks.
    pub title: String,
    /// In the order they were made.
    pub checks: Vec<Check>,
}

impl Section {
    /// An empty section.
    pub fn new(title: impl Into<String>) -> Self {
        Section {
            title: title.into(),
            checks: Vec::new(),
        }
    }

    /// Appends a check.
    pub fn push(&mut self, check: Check) {
        self.checks.push(check);
    }
}

/// The whole report: `render` prints it, `broken` decides the exit status.
#[derive(Clone, Debug, Default)]
pub struct Report {
    /// In print order.
    pub sections: Vec<Section>,
}

impl Report {
    /// True when any check failed.
    pub fn broken(&self) -> bool {
        self.count(Verdict::Fail) > 0
    }

    fn count(&self, verdict: Verdict) -> usize {
        self.sections
            .iter()
            .flat_map(|s| &s.checks)
            .filter(|c| c.verdict == verdict)
            .count()
    }

    /// The text doctor prints: a heading per section, one line per check
    /// (`  ok    name          finding: advice`), a summary line. With
    /// `colour`, the verdict words are coloured (for a terminal only).
    pub fn render(&self, colour: bool) -> String {
        let mut out = String::new();
        for section in &self.sections {
            let _ = writeln!(out, "{}", section.title);
            for check in &section.checks {
                let word = check.verdict.word();
                let word = if colour {
                    format!("{}{word:<4}\x1b[0m", check.verdict.colour())
                } else {
                    format!("{word:<4}")
                };
                let _ = write!(out, "  {word}  {:<14} {}", check.name, check.finding);
                if let Some(advice) = &check.advice {
                    let _ = write!(out, ": {advice}");
                }
                out.push('\n');
            }
            out.push('\n');
        }
        let (ok, warn, fail, skip) = (
            self.count(Verdict::Ok),
            self.count(Verdict::Warn),
            self.count(Verdict::Fail),
            self.count(Verdict::Skip),
        );
        let verdict = if fail > 0 {
            "broken: fix the FAIL lines above"
        } else if warn > 0 {
            "usable: read the warn lines above"
        } else {
            "all good"
        };
        let _ = writeln!(
            out,
            "summary: {ok} ok, {warn} warn, {fail} FAIL, {skip} skip: {verdict}"
        );
        out
    }
}

/// Runs the checks against `config` and prints the report; `Ok(false)` when
/// something is broken (the binary then exits 1). With `options.bazelrc`,
/// prints only the `.bazelrc` lines.
pub async fn run(config: &Config, options: &DoctorOptions) -> anyhow::Result<bool> {
    if options.bazelrc {
        let capabilities = match &config.upstream {
            Some(upstream) => Some(upstream::fetch_capabilities(upstream).await),
            None => None,
        };
        print!("{}", bazelrc::lines(config, capabilities.as_ref()));
        return Ok(true);
    }
    let mut report = check(config, options).await;
    report
        .sections
        .insert(0, config_section(Check::ok("file", config_source(options))));
    print!("{}", report.render(std::io::stdout().is_terminal()));
    Ok(!report.broken())
}

/// For a configuration that does not resolve (bad TOML, an unknown key, a
/// refused combination): the report says so as its one FAIL, instead of
/// the checks; returns false (exit 1). With `--bazelrc`, one line on stderr.
pub fn config_failed(error: &anyhow::Error, options: &DoctorOptions) -> bool {
    if options.bazelrc {
        eprintln!("outpost doctor: the configuration does not resolve: {error:#}");
        return false;
    }
    let check = Check::fail(
        "resolve",
        crate::logging::one_line(error),
        "fix it (config.example.toml documents every key); no other check runs until it resolves",
    );
    let mut section = config_section(Check::ok("file", config_source(options)));
    section.push(check);
    let report = Report {
        sections: vec![section],
    };
    print!("{}", report.render(std::io::stdout().is_terminal()));
    false
}

/// Where the settings come from.
fn config_source(options: &DoctorOptions) -> String {
    match &options.config_file {
        Some(path) => format!("{}, then the flags", path.display()),
        None => "none: built-in defaults and the flags".to_string(),
    }
}

/// The first section: the configuration's source and `check`.
fn config_section(check: Check) -> Section {
    let mut section = Section::new("configuration");
    section.push(check);
    section
}

/// Makes every check, in print order.
pub async fn check(config: &Config, options: &DoctorOptions) -> Report {
    let data = data_dir::check(config);
    let listener = listener::check(config).await;
    let (upstream, capabilities) = match &config.upstream {
        Some(upstream) => {
            let (section, capabilities) = upstream::check(upstream, options.no_write).await;
            (section, Some(capabilities))
        }
        None => {
            let mut section = Section::new("upstream");
            section.push(Check::ok(
                "mode",
                "none configured: a standalone cache (--upstream makes it a proxy)",
            ));
            (section, None)
        }
    };
    let client = bazelrc::client_section(config, capabilities.as_ref());
    Report {
        sections: vec![data, listener, upstream, client],
    }
}

/// A failed call in a few words: its code and message, or, when the
/// message says nothing ("transport error"), the causes under it.
pub fn status_text(status: &tonic::Status) -> String {
    let message = status.message();
    let detail = match std::error::Error::source(status) {
        Some(source) if message.is_empty() || message == "transport error" => {
            crate::logging::error_chain(source)
        }
        _ => message.to_string(),
    };
    format!("{:?}: {detail}", status.code())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report(checks: Vec<Check>) -> Report {
        Report {
            sections: vec![Section {
                title: "data directory".into(),
                checks,
            }],
        }
    }

    #[test]
    fn one_line_per_check_with_verdict_finding_and_advice() {
        let r = report(vec![
            Check::ok("exists", "/d exists"),
            Check::fail(
                "free space",
                "3.1 GiB free < quota 10.0 GiB",
                "lower --quota or free space",
            ),
            Check::skip("store", "no store yet"),
        ]);
        let text = r.render(false);
        assert_eq!(
            text,
            "data directory\n\
             \x20 ok    exists         /d exists\n\
             \x20 FAIL  free space     3.1 GiB free < quota 10.0 GiB: lower --quota or free space\n\
             \x20 skip  store          no store yet\n\
             \n\
             summary: 1 ok, 0 warn, 1 FAIL, 1 skip: broken: fix the FAIL lines above\n"
        );
        assert!(r.broken());
        assert!(!text.contains('\x1b'), "no colour unless asked");
        assert!(r.render(true).contains("\x1b[1;31mFAIL\x1b[0m"));
    }

    #[test]
    fn warnings_do_not_break_the_setup() {
        let r = report(vec![
            Check::ok("a", "fine"),
            Check::warn("b", "tmpfs", "use a disk"),
        ]);
        assert!(!r.broken());
        assert!(
            r.render(false)
                .ends_with("1 ok, 1 warn, 0 FAIL, 0 skip: usable: read the warn lines above\n")
        );
        let good = report(vec![Check::ok("a", "fine")]);
        assert!(good.render(false).ends_with(": all good\n"));
    }

    #[test]
    fn an_error_chain_names_the_cause_once() {
        let inner = std::io::Error::other("connection refused");
        let outer = anyhow::Error::new(inner).context("transport error");
        let chain = crate::logging::error_chain(outer.as_ref());
        assert_eq!(chain, "transport error: connection refused");
    }

    #[test]
    fn a_status_reads_as_code_and_message() {
        let status = tonic::Status::unauthenticated("send a token");
        assert_eq!(status_text(&status), "Unauthenticated: send a token");
    }
}
