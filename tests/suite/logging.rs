//! The binary as an operator meets it: log lines on stderr without colour
//! codes when stderr is not a terminal, `--log-format json` lines a log
//! shipper can parse, a config error as one line with exit status 2, and the
//! man pages and completions that packages install (`outpost generate`).

use std::path::Path;
use std::process::{Command, Output};

use crate::common::*;

/// Runs `outpost ARGS` with `env` set and returns what it did.
fn outpost(args: &[&str], env: &[(&str, &str)]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_outpost"))
        .args(args)
        .env_remove("OUTPOST_CONFIG")
        .env_remove("OUTPOST_LOG_FORMAT")
        .envs(env.iter().copied())
        .output()
        .unwrap()
}

/// The single line of `out`'s stderr (panics when there are more or none).
fn the_one_stderr_line(out: &Output) -> String {
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    let lines: Vec<&str> = stderr.lines().collect();
    assert_eq!(
        lines.len(),
        1,
        "one line expected on stderr, got:\n{stderr}"
    );
    lines[0].to_string()
}

fn write_bad_config(dir: &Path) -> String {
    let path = dir.join("outpost.toml");
    std::fs::write(&path, "[store]\nquota = \"1GiB\"\nquota_typo = 1\n").unwrap();
    path.display().to_string()
}

#[test]
fn a_config_error_is_one_line_and_exit_status_2() {
    let dir = tempfile::tempdir().unwrap();
    let config = write_bad_config(dir.path());
    let out = outpost(&["serve", "--config", &config], &[]);
    assert_eq!(out.status.code(), Some(2));
    let line = the_one_stderr_line(&out);
    assert!(
        line.starts_with(&format!(
            "outpost: error: invalid config file {config}, line 3 column 1: unknown field `quota_typo`"
        )),
        "{line}"
    );
    assert!(
        line.contains("config.example.toml"),
        "says where keys are documented: {line}"
    );

    // An unreadable file, a refused flag combination and a setting `serve`
    // refuses are config errors too.
    let missing = dir.path().join("missing.toml").display().to_string();
    for args in [
        vec!["serve", "--config", missing.as_str()],
        vec!["serve", "--unix-socket", "/tmp/x.sock", "--no-unix-socket"],
        vec![
            "serve",
            "--listen",
            "0.0.0.0:8980",
            "--data-dir",
            "/nonexistent",
        ],
        vec!["token", "list"],
    ] {
        let out = outpost(&args, &[]);
        assert_eq!(out.status.code(), Some(2), "outpost {args:?}");
        let line = the_one_stderr_line(&out);
        assert!(line.starts_with("outpost: error: "), "{line}");
    }
}

#[test]
fn a_runtime_failure_is_one_line_and_exit_status_1() {
    let dir = tempfile::tempdir().unwrap();
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let data = dir.path().join("data").display().to_string();
    let out = outpost(
        &[
            "serve",
            "--listen",
            &addr,
            "--data-dir",
            &data,
            "--no-unix-socket",
        ],
        &[("RUST_LOG", "off")],
    );
    assert_eq!(out.status.code(), Some(1));
    let line = the_one_stderr_line(&out);
    assert!(
        line.starts_with(&format!("outpost: error: cannot listen on {addr}")),
        "{line}"
    );
}

#[test]
fn a_config_error_in_json_mode_is_one_json_line() {
    let dir = tempfile::tempdir().unwrap();
    let config = write_bad_config(dir.path());
    let out = outpost(
        &["serve", "--config", &config],
        &[("OUTPOST_LOG_FORMAT", "json")],
    );
    assert_eq!(out.status.code(), Some(2));
    let line = the_one_stderr_line(&out);
    let event: serde_json::Value = serde_json::from_str(&line).expect("a JSON line");
    assert_eq!(event["level"], "ERROR", "{line}");
    assert_eq!(event["fields"]["exit_code"], 2, "{line}");
    let message = event["fields"]["message"].as_str().unwrap();
    assert!(message.contains("unknown field `quota_typo`"), "{line}");
}

/// Starts a server logging at debug level with `args`, makes one call, stops
/// it gracefully and returns its stderr.
async fn log_of_a_short_run(args: &[&str]) -> String {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("log");
    let server = ServerProcess::command(env!("CARGO_BIN_EXE_outpost"), dir.path().join("data"))
        .args(args)
        .rust_log("debug")
        .log_file(&log)
        .start()
        .expect("outpost starts");
    server
        .capabilities()
        .get_capabilities(re::GetCapabilitiesRequest::default())
        .await
        .expect("GetCapabilities");
    drop(server);
    std::fs::read_to_string(&log).unwrap()
}

#[tokio::test]
async fn json_logs_are_one_object_per_line() {
    let log = log_of_a_short_run(&["--log-format", "json"]).await;
    let mut messages = Vec::new();
    for line in log.lines() {
        let event: serde_json::Value =
            serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"));
        assert!(event["timestamp"].is_string(), "{line}");
        assert!(event["level"].is_string(), "{line}");
        messages.push(
            event["fields"]["message"]
                .as_str()
                .unwrap_or("")
                .to_string(),
        );
    }
    assert!(
        messages
            .iter()
            .any(|m| m.starts_with("outpost 0.1.0 starting")),
        "the start line is among {messages:?}"
    );
    assert!(
        messages.iter().any(|m| m == "stopped"),
        "the stop line is among {messages:?}"
    );
}

#[tokio::test]
async fn text_logs_to_a_file_have_no_colour_codes() {
    let log = log_of_a_short_run(&[]).await;
    assert!(log.contains(" INFO "), "{log}");
    assert!(log.contains(" DEBUG "), "debug lines too: {log}");
    assert!(!log.contains('\u{1b}'), "an escape code in:\n{log}");
}

#[test]
fn man_pages_and_completions_name_every_command() {
    let dir = tempfile::tempdir().unwrap();
    let (man, completions) = (dir.path().join("man"), dir.path().join("completions"));
    let out = outpost(
        &[
            "generate",
            "--man",
            man.to_str().unwrap(),
            "--completions",
            completions.to_str().unwrap(),
        ],
        &[],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let read = |path: &Path| {
        std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
    };
    let main_page = read(&man.join("outpost.1"));
    assert!(main_page.starts_with(".ie"), "roff: {main_page}");
    for command in ["serve", "stats", "verify", "token", "doctor"] {
        assert!(
            main_page.contains(&format!("outpost\\-{command}(1)")),
            "outpost.1 names {command}"
        );
        let page = read(&man.join(format!("outpost-{command}.1")));
        // Title, section, (no) date, source with the version, manual.
        let title = format!(".TH outpost-{command} 1 \\& \"outpost 0.1.0\" \"Outpost Manual\"\n");
        assert!(page.contains(&title), "{title} in {page}");
    }
    assert!(read(&man.join("outpost-serve.1")).contains("\\-\\-data\\-dir"));
    assert!(man.join("outpost-token-add.1").exists());
    for file in ["outpost.bash", "_outpost", "outpost.fish"] {
        let script = read(&completions.join(file));
        for command in ["serve", "doctor", "verify", "data-dir"] {
            assert!(script.contains(command), "{file} completes {command}");
        }
    }
}

#[test]
fn text_logs_on_a_terminal_keep_their_colours() {
    // util-linux `script` runs the command on a pseudo-terminal.
    if Command::new("script").arg("--version").output().is_err() {
        eprintln!("skipped: no `script` command to give outpost a terminal");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    // Starts (an INFO line), then fails to bind the taken port.
    let command = format!(
        "{} serve --listen {} --no-unix-socket --data-dir {}",
        env!("CARGO_BIN_EXE_outpost"),
        taken.local_addr().unwrap(),
        dir.path().join("data").display()
    );
    let out = Command::new("script")
        .args(["--quiet", "--return", "--command", &command, "/dev/null"])
        .env_remove("OUTPOST_LOG_FORMAT")
        .env_remove("NO_COLOR")
        .env("RUST_LOG", "info")
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap();
    let terminal = String::from_utf8_lossy(&out.stdout);
    assert!(terminal.contains("starting"), "{terminal}");
    assert!(
        terminal.contains("\u{1b}["),
        "colour codes on a terminal: {terminal:?}"
    );
}
