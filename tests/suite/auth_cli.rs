//! `outpost token` and `outpost stats --token` through the real binary,
//! against the real binary, and nothing secret in its trace-level log.

use std::process::Command;
use std::time::{Duration, Instant};

use tonic::Code;

use super::auth::{basic, bearer, code};
use crate::common::*;

/// `text` without ANSI colour sequences (`ESC [ ... m`).
fn without_colours(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for c in chars.by_ref() {
                if c == 'm' {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// Runs `outpost ARGS` and returns its stdout (panics on failure).
fn outpost(args: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_outpost"))
        .args(args)
        .env_remove("OUTPOST_CONFIG")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "outpost {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_cli_round_trip_and_nothing_secret_in_the_log() {
    let dir = tempfile::tempdir().unwrap();
    let tokens = dir.path().join("tokens");
    let htpasswd = dir.path().join("htpasswd");
    std::fs::write(
        &htpasswd,
        format!("alice:{}\n", bcrypt::hash("s3cret-pass", 4).unwrap()),
    )
    .unwrap();
    let config = dir.path().join("outpost.toml");
    std::fs::write(
        &config,
        format!(
            "[auth]\ntokens_file = {:?}\nhtpasswd_file = {:?}\nrequire_on_loopback = true\n",
            tokens.display().to_string(),
            htpasswd.display().to_string()
        ),
    )
    .unwrap();
    let config_arg = config.to_str().unwrap();
    let out = outpost(&[
        "token",
        "add",
        "ci",
        "--role",
        "execute",
        "--write-ac",
        "--config",
        config_arg,
    ]);
    let token = out.lines().last().unwrap().to_string();
    assert!(token.starts_with("opt_") && !token.contains(' '), "{out}");
    let listed = outpost(&["token", "list", "--tokens-file", tokens.to_str().unwrap()]);
    assert!(
        listed.contains("ci") && listed.contains("execute"),
        "{listed}"
    );
    assert!(!listed.contains(&token));

    let log = dir.path().join("server.log");
    let server = ServerProcess::command(env!("CARGO_BIN_EXE_outpost"), dir.path().join("data"))
        .arg("--config")
        .arg(&config)
        .log_file(&log)
        .rust_log("trace")
        .start()
        .unwrap();
    let channel = server.channel();
    let fmb = "/build.bazel.remote.execution.v2.ContentAddressableStorage/FindMissingBlobs";
    let wrong_token = "opt_wrongwrongwrongwrongwrong";
    assert_eq!(code(&channel, fmb, Some(&bearer(&token))).await, Code::Ok);
    assert_eq!(
        code(&channel, fmb, Some(&bearer(wrong_token))).await,
        Code::Unauthenticated
    );
    let alice = basic("alice", "s3cret-pass");
    assert_eq!(code(&channel, fmb, Some(&alice)).await, Code::Ok);
    assert_eq!(
        code(&channel, fmb, Some(&basic("alice", "wrong-pass"))).await,
        Code::Unauthenticated
    );

    // `outpost stats` sends the token from the environment.
    let stats = Command::new(env!("CARGO_BIN_EXE_outpost"))
        .args(["stats", "--server", &server.url()])
        .env("OUTPOST_TOKEN", &token)
        .output()
        .unwrap();
    let printed = String::from_utf8_lossy(&stats.stdout);
    assert!(
        stats.status.success(),
        "{printed} {}",
        String::from_utf8_lossy(&stats.stderr)
    );
    assert!(
        printed.contains("\nauth:            3 accepted; 2 refused (0 no credential, 1 unknown token, 1 bad password"),
        "{printed}"
    );
    let anonymous = Command::new(env!("CARGO_BIN_EXE_outpost"))
        .args(["stats", "--server", &server.url()])
        .env_remove("OUTPOST_TOKEN")
        .output()
        .unwrap();
    assert!(!anonymous.status.success());
    assert!(String::from_utf8_lossy(&anonymous.stderr).contains("requires credentials"));

    outpost(&["token", "revoke", "ci", "--config", config_arg]);
    let deadline = Instant::now() + Duration::from_secs(10);
    while code(&channel, fmb, Some(&bearer(&token))).await == Code::Ok {
        assert!(Instant::now() < deadline, "the revoked token still works");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    drop(server);

    let text = without_colours(&std::fs::read_to_string(&log).unwrap());
    // The log does show who called (a positive control for the grep below).
    assert!(text.contains("client=\"ci\""), "{text}");
    assert!(text.contains("client=\"alice\""), "{text}");
    for secret in [
        token.as_str(),
        &token[4..],
        wrong_token,
        "s3cret-pass",
        "wrong-pass",
        alice.trim_start_matches("Basic "),
    ] {
        assert!(!text.contains(secret), "{secret:?} is in the log");
    }
    let file = std::fs::read_to_string(&tokens).unwrap();
    assert!(!file.contains(&token[4..]));
}
