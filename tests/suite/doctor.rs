//! `outpost doctor`: the real binary against real setups: a healthy
//! standalone one, a running Outpost on the listen address, a fake upstream
//! over a real socket, a dead upstream, a quota larger than the disk, a data
//! directory that cannot be created, and the `--bazelrc` lines.

use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use outpost_testkit::fake::{FakeUpstream, Method};

use crate::common::*;

/// Bound on one doctor run: a hang guard, far above what any run takes
/// (each network step has its own 5 s timeout).
const RUN_LIMIT: Duration = Duration::from_secs(120);

/// Runs `outpost doctor ARGS` over `data_dir` (no unix socket) on a thread,
/// so a fake upstream in this runtime keeps serving; kills it past
/// [`RUN_LIMIT`].
async fn doctor(data_dir: &Path, args: &[&str]) -> (i32, String) {
    let mut command = Command::new(env!("CARGO_BIN_EXE_outpost"));
    command
        .arg("doctor")
        .arg("--data-dir")
        .arg(data_dir)
        .arg("--no-unix-socket")
        .args(args)
        .env_remove("OUTPOST_CONFIG")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let output = tokio::task::spawn_blocking(move || run_bounded(command))
        .await
        .expect("the doctor thread");
    let stdout = String::from_utf8(output.stdout).expect("UTF-8 output");
    let stderr = String::from_utf8_lossy(&output.stderr);
    eprintln!("--- outpost doctor {args:?}:\n{stdout}{stderr}");
    (output.status.code().unwrap_or(-1), stdout)
}

fn run_bounded(mut command: Command) -> Output {
    let mut child = command.spawn().expect("outpost doctor starts");
    let started = Instant::now();
    while child.try_wait().expect("wait").is_none() {
        if started.elapsed() > RUN_LIMIT {
            let _ = child.kill();
            panic!("outpost doctor hung for {RUN_LIMIT:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    child.wait_with_output().expect("doctor output")
}

/// The report line of check `name` in the section titled starting with
/// `section` (a check name can repeat across sections).
fn line<'a>(report: &'a str, section: &str, name: &str) -> &'a str {
    let mut in_section = false;
    for l in report.lines() {
        if !l.starts_with(' ') {
            in_section = l.starts_with(section);
        } else if in_section && l[8..].starts_with(&format!("{name} ")) {
            return l;
        }
    }
    panic!("no {name:?} line in section {section:?}:\n{report}")
}

/// A port nothing listens on (bound, then released).
fn dead_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.local_addr().unwrap().port()
}

#[tokio::test]
async fn a_healthy_standalone_setup_passes() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let listen = format!("127.0.0.1:{}", dead_port());
    let (code, report) = doctor(&data, &["--listen", &listen, "--quota", "1MiB"]).await;
    assert_eq!(code, 0, "{report}");
    assert!(!data.exists(), "doctor creates nothing; serve will");
    assert!(
        line(&report, "data directory", "exists")
            .contains("ok    exists         not yet: serve creates it")
    );
    assert!(line(&report, "data directory", "writable").starts_with("  ok  "));
    assert!(line(&report, "data directory", "store").contains("none yet"));
    assert!(line(&report, "data directory", "free space").starts_with("  ok  "));
    assert!(line(&report, "listener", "reach").contains("loopback"));
    assert!(line(&report, "listener", "address").contains(&format!("{listen} is free")));
    assert!(line(&report, "upstream", "mode").contains("standalone"));
    assert!(
        line(&report, "client", "bazel").contains(&format!("--remote_cache=grpc://{listen}")),
        "{report}"
    );
    assert!(
        report.contains("\nsummary: ") && report.contains(" 0 FAIL, "),
        "{report}"
    );
    assert!(
        !report.contains('\x1b'),
        "no colour when stdout is not a terminal"
    );
}

#[tokio::test]
async fn a_running_outpost_on_the_address_is_reported_as_running() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let server = ServerProcess::command(env!("CARGO_BIN_EXE_outpost"), &data)
        .args(["--metrics-listen", "127.0.0.1:0"])
        .log_file(&dir.path().join("log"))
        .start()
        .expect("outpost starts");
    let listen = server.addr().to_string();
    let metrics = server
        .metrics_addr()
        .expect("a metrics address")
        .to_string();
    let (code, report) = doctor(
        &data,
        &[
            "--listen",
            &listen,
            "--metrics-listen",
            &metrics,
            "--quota",
            "1MiB",
        ],
    )
    .await;
    assert_eq!(code, 0, "{report}");
    let address = line(&report, "listener", "address");
    assert!(
        address.contains(&format!(
            "Outpost {} running on {listen}, up ",
            env!("CARGO_PKG_VERSION")
        )),
        "{address}"
    );
    assert!(
        line(&report, "data directory", "store").contains("in use by a running Outpost"),
        "{report}"
    );
    assert!(
        line(&report, "listener", "metrics")
            .contains(&format!("an Outpost serves metrics on {metrics}")),
        "{report}"
    );
}

#[tokio::test]
async fn a_reachable_upstream_is_measured() {
    let fake = FakeUpstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    let (code, report) = doctor(
        &dir.path().join("data"),
        &[
            "--listen",
            "127.0.0.1:0",
            "--quota",
            "1MiB",
            "--upstream",
            &fake.url(),
        ],
    )
    .await;
    assert_eq!(code, 0, "{report}");
    let section = format!("upstream {}", fake.url());
    assert!(line(&report, &section, "connect").contains("TCP to 127.0.0.1:"));
    assert!(line(&report, &section, "tls").contains("plaintext"));
    assert!(line(&report, &section, "api versions").contains("ok    api versions   2.0-2.3"));
    assert!(line(&report, &section, "digests").contains("SHA256"));
    assert!(line(&report, &section, "batch limit").contains("4.0 MiB per batch call"));
    assert!(line(&report, &section, "execution").contains("disabled"));
    assert!(line(&report, &section, "rtt").contains("median of 5 empty FindMissingBlobs"));
    assert!(
        line(&report, &section, "throughput").contains("ok    throughput     read 4.0 MiB in "),
        "{report}"
    );
    assert!(
        line(&report, &section, "clock").starts_with("  ok  "),
        "{report}"
    );
    // The probes really went to the upstream.
    assert_eq!(fake.count(Method::FindMissingBlobs), 5);
    assert_eq!(fake.count(Method::Write), 1);
    assert!(fake.count(Method::GetCapabilities) >= 1);
}

#[tokio::test]
async fn no_write_skips_the_probe_that_writes_upstream() {
    let fake = FakeUpstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    let (code, report) = doctor(
        &dir.path().join("data"),
        &[
            "--listen",
            "127.0.0.1:0",
            "--quota",
            "1MiB",
            "--upstream",
            &fake.url(),
            "--no-write",
        ],
    )
    .await;
    assert_eq!(code, 0, "{report}");
    let section = format!("upstream {}", fake.url());
    assert!(
        line(&report, &section, "throughput").contains("skip  throughput     --no-write"),
        "{report}"
    );
    assert!(
        line(&report, &section, "rtt").starts_with("  ok  "),
        "{report}"
    );
    assert_eq!(fake.count(Method::Write), 0, "nothing written upstream");
}

#[tokio::test]
async fn a_dead_upstream_fails_at_connect_and_skips_the_rest() {
    let dir = tempfile::tempdir().unwrap();
    let upstream = format!("grpc://127.0.0.1:{}", dead_port());
    let (code, report) = doctor(
        &dir.path().join("data"),
        &[
            "--listen",
            "127.0.0.1:0",
            "--upstream",
            &upstream,
            "--quota",
            "1MiB",
        ],
    )
    .await;
    assert_eq!(code, 1, "{report}");
    let section = format!("upstream {upstream}");
    assert!(
        line(&report, &section, "connect").contains("FAIL  connect        connection refused"),
        "{report}"
    );
    assert!(line(&report, &section, "connect").contains(": is the upstream running"));
    for name in ["tls", "capabilities", "rtt", "throughput", "clock"] {
        assert!(
            line(&report, &section, name).starts_with("  skip"),
            "{name}: {report}"
        );
    }
    assert!(report.contains(" 1 FAIL, ") && report.ends_with("broken: fix the FAIL lines above\n"));
}

#[tokio::test]
async fn a_quota_larger_than_the_disk_fails() {
    let dir = tempfile::tempdir().unwrap();
    let (code, report) = doctor(
        &dir.path().join("data"),
        &["--listen", "127.0.0.1:0", "--quota", "1000000TiB"],
    )
    .await;
    assert_eq!(code, 1, "{report}");
    let free = line(&report, "data directory", "free space");
    assert!(free.starts_with("  FAIL  free space "), "{free}");
    assert!(free.contains(": lower --quota (to at most "), "{free}");
}

#[tokio::test]
async fn a_data_directory_that_cannot_be_created_fails() {
    // Nobody, root included, creates directories in /proc.
    let (code, report) = doctor(
        Path::new("/proc/outpost-doctor-test"),
        &["--listen", "127.0.0.1:0"],
    )
    .await;
    assert_eq!(code, 1, "{report}");
    assert!(
        line(&report, "data directory", "writable")
            .contains("FAIL  writable       cannot write there"),
        "{report}"
    );
}

#[tokio::test]
async fn bazelrc_names_the_executor_of_an_executing_upstream() {
    let fake = FakeUpstream::start().await;
    let mut caps = fake.capabilities();
    caps.execution_capabilities
        .as_mut()
        .expect("the fake has execution capabilities")
        .exec_enabled = true;
    fake.set_capabilities(caps);
    let dir = tempfile::tempdir().unwrap();
    let listen = format!("127.0.0.1:{}", dead_port());
    let (code, text) = doctor(
        &dir.path().join("data"),
        &["--listen", &listen, "--upstream", &fake.url(), "--bazelrc"],
    )
    .await;
    assert_eq!(code, 0, "{text}");
    let flags: Vec<&str> = text.lines().filter(|l| !l.starts_with('#')).collect();
    assert_eq!(
        flags,
        [
            format!("build --remote_executor=grpc://{listen}"),
            format!("build --experimental_remote_downloader=grpc://{listen}"),
        ]
    );
    // --bazelrc only asks for the capabilities: no probes, no blob written.
    assert_eq!(fake.count(Method::Write), 0);
    assert_eq!(fake.count(Method::FindMissingBlobs), 0);
}

/// Adds a credential to `tokens` with the binary; returns the token.
fn add_token(tokens: &Path, name: &str, role: &str) -> String {
    let output = Command::new(env!("CARGO_BIN_EXE_outpost"))
        .args(["token", "add", name, "--role", role, "--tokens-file"])
        .arg(tokens)
        .output()
        .expect("outpost token add");
    assert!(output.status.success(), "{output:?}");
    let text = String::from_utf8(output.stdout).unwrap();
    text.lines().last().expect("the token").trim().to_string()
}

#[tokio::test]
async fn a_tls_upstream_with_tokens_is_checked_step_by_step() {
    use outpost_testkit::pki::TestCa;
    let dir = tempfile::tempdir().unwrap();
    let ca = TestCa::new("doctor test CA");
    let ca_file = ca.write(dir.path(), "ca");
    let (cert, key) = ca.server().write(dir.path(), "server");
    let tokens = dir.path().join("tokens");
    let token = add_token(&tokens, "reader", "read");
    // The upstream: a second real Outpost, TLS and tokens even on loopback.
    let up_config = dir.path().join("upstream.toml");
    std::fs::write(
        &up_config,
        format!(
            "[server]\ntls_cert = {cert:?}\ntls_key = {key:?}\n\
             [auth]\ntokens_file = {tokens:?}\nrequire_on_loopback = true\n"
        ),
    )
    .unwrap();
    let upstream = ServerProcess::command(env!("CARGO_BIN_EXE_outpost"), dir.path().join("up"))
        .args([std::ffi::OsStr::new("--config"), up_config.as_os_str()])
        .log_file(&dir.path().join("up.log"))
        .start()
        .expect("the TLS upstream starts");
    let endpoint = format!("grpcs://localhost:{}", upstream.addr().port());
    let config = |ca: bool, header: bool| {
        let path = dir.path().join(format!("doctor-{ca}-{header}.toml"));
        let mut text = format!("[upstream]\nendpoint = {endpoint:?}\n");
        if ca {
            text += &format!("ca_file = {ca_file:?}\n");
        }
        if header {
            text += &format!(
                "headers = [{{ name = \"authorization\", value = \"Bearer {token}\" }}]\n"
            );
        }
        std::fs::write(&path, text).unwrap();
        path.to_str().unwrap().to_string()
    };
    let section = format!("upstream {endpoint}");
    let data = dir.path().join("data");
    let run = |config: String| {
        let data = data.clone();
        async move { doctor(&data, &["--listen", "127.0.0.1:0", "--config", &config]).await }
    };

    // All configured: every step passes; a read token may not write the probe blob.
    let (code, report) = run(config(true, true)).await;
    assert_eq!(code, 0, "{report}");
    assert!(line(&report, &section, "endpoint").contains(&format!(
        "TLS trusting {}, headers authorization (values not shown)",
        ca_file.display()
    )));
    assert!(line(&report, &section, "dns").contains("localhost is "));
    assert!(line(&report, &section, "tls").contains("ok    tls            handshake ok"));
    assert!(line(&report, &section, "api versions").starts_with("  ok  "));
    assert!(
        line(&report, &section, "rtt").starts_with("  ok  "),
        "{report}"
    );
    assert!(
        line(&report, &section, "throughput")
            .contains("skip  throughput     these credentials may not write"),
        "{report}"
    );
    assert!(!report.contains(&token), "the token never shows");

    // Without the CA: the TLS step fails and says what to set.
    let (code, report) = run(config(false, true)).await;
    assert_eq!(code, 1, "{report}");
    let tls = line(&report, &section, "tls");
    assert!(
        tls.contains("FAIL  tls            the handshake failed: "),
        "{tls}"
    );
    assert!(tls.contains("set [upstream] ca_file"), "{tls}");
    assert!(line(&report, &section, "capabilities").starts_with("  skip"));

    // Without the token: GetCapabilities is refused, and doctor says why.
    let (code, report) = run(config(true, false)).await;
    assert_eq!(code, 1, "{report}");
    let caps = line(&report, &section, "capabilities");
    assert!(
        caps.contains("FAIL  capabilities   GetCapabilities failed: "),
        "{caps}"
    );
    assert!(caps.contains("refuses these credentials"), "{caps}");
}

#[tokio::test]
async fn a_silent_upstream_fails_on_its_timeout_instead_of_hanging() {
    // Connections complete in the kernel's backlog; nothing ever answers.
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let upstream = format!("grpc://{}", silent.local_addr().unwrap());
    let dir = tempfile::tempdir().unwrap();
    let (code, report) = doctor(
        &dir.path().join("data"),
        &[
            "--listen",
            "127.0.0.1:0",
            "--upstream",
            &upstream,
            "--quota",
            "1MiB",
        ],
    )
    .await;
    assert_eq!(code, 1, "{report}");
    let section = format!("upstream {upstream}");
    assert!(line(&report, &section, "connect").starts_with("  ok  "));
    let caps = line(&report, &section, "capabilities");
    assert!(
        caps.contains(
            "FAIL  capabilities   GetCapabilities failed: DeadlineExceeded: no answer within 5s"
        ),
        "{caps}"
    );
    assert!(line(&report, &section, "rtt").starts_with("  skip"));
    drop(silent);
}

#[tokio::test]
async fn a_configuration_that_does_not_resolve_is_a_fail_line() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    // A refused combination: reachable from other machines, no TLS, no consent.
    let (code, report) = doctor(&data, &["--listen", "0.0.0.0:0"]).await;
    assert_eq!(code, 1, "{report}");
    assert!(
        line(&report, "configuration", "file").contains("none: built-in defaults and the flags")
    );
    let resolve = line(&report, "configuration", "resolve");
    assert!(
        resolve.contains("FAIL  resolve        refusing to listen on 0.0.0.0:0"),
        "{resolve}"
    );
    assert!(
        !report.contains("\nlistener"),
        "no other check runs: {report}"
    );
    // An unknown key in the file.
    let file = dir.path().join("bad.toml");
    std::fs::write(&file, "[store]\nquota_typo = \"1GiB\"\n").unwrap();
    let (code, report) = doctor(&data, &["--config", file.to_str().unwrap()]).await;
    assert_eq!(code, 1, "{report}");
    assert!(line(&report, "configuration", "file").contains("bad.toml, then the flags"));
    assert!(
        line(&report, "configuration", "resolve").contains("quota_typo"),
        "{report}"
    );
}
