//! The binary's log output on stderr: readable text (coloured only on a
//! terminal, so journald and log files hold no escape codes) or JSON lines
//! for log shippers; and the one line a fatal error is reported as.

use std::io::IsTerminal;

use tracing_subscriber::EnvFilter;

/// How log lines are written (`--log-format`, `OUTPOST_LOG_FORMAT`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// One readable line per event; ANSI colours only when stderr is a
    /// terminal (and `NO_COLOR` is unset).
    #[default]
    Text,
    /// One JSON object per line (`timestamp`, `level`, `target`, `fields`,
    /// spans), for journald forwarders, Loki, Elasticsearch and the like.
    Json,
}

/// Installs the process-wide subscriber writing to stderr in `format`, at the
/// level `RUST_LOG` asks for (default `info`).
pub fn init(format: LogFormat) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.with_ansi(colours()).init(),
        LogFormat::Json => builder.with_ansi(false).json().init(),
    }
}

/// Colours on a terminal, unless `NO_COLOR` (no-color.org) asks otherwise.
fn colours() -> bool {
    std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty())
}

/// Reports the error that ends the process (see [`one_line`]) as one line
/// on stderr: `outpost: error: <message>` in text, an `ERROR` event with
/// `exit_code` in JSON, so a log shipper sees why the service stopped.
pub fn fatal(format: LogFormat, message: &str, exit_code: u8) {
    match format {
        LogFormat::Text => eprintln!("outpost: error: {message}"),
        LogFormat::Json => tracing::error!(exit_code, "{message}"),
    }
}

/// `error` and its causes as `message: cause: cause` on one line (a cause
/// that spans lines, e.g. a parser's snippet, is joined with spaces; a cause
/// its parent already quotes is not repeated).
pub fn one_line(error: &anyhow::Error) -> String {
    error_chain(error.as_ref())
}

/// [`one_line`] for any error: the error, then each `source()` under it.
pub fn error_chain(error: &(dyn std::error::Error + 'static)) -> String {
    let mut parts: Vec<String> = Vec::new();
    let mut next = Some(error);
    while let Some(cause) = next {
        let text = cause
            .to_string()
            .lines()
            .map(str::trim)
            .filter(|line| !line.is_empty())
            .collect::<Vec<_>>()
            .join(" ");
        if !text.is_empty() && !parts.iter().any(|part| part.contains(&text)) {
            parts.push(text);
        }
        next = cause.source();
    }
    parts.join(": ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn causes_are_joined_on_one_line() {
        let error = anyhow::anyhow!("first line\n  second line\n")
            .context("cannot read config file /etc/outpost/outpost.toml");
        assert_eq!(
            one_line(&error),
            "cannot read config file /etc/outpost/outpost.toml: first line second line"
        );
    }

    #[test]
    fn a_cause_already_in_the_message_is_not_repeated() {
        let io = std::io::Error::new(std::io::ErrorKind::NotFound, "No such file");
        let error = anyhow::Error::new(io).context("cannot open x: No such file");
        assert_eq!(one_line(&error), "cannot open x: No such file");
    }
}
