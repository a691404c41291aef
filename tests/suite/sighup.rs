//! SIGHUP asks a running server to re-read its files (systemd's
//! `ExecReload=/bin/kill -HUP $MAINPID`, deploy/systemd/outpost.service); it
//! must never stop the server, even one that watches no file.

use std::time::{Duration, Instant};

use crate::common::*;

#[test]
fn a_sighup_does_not_stop_a_server_without_files_to_reload() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("log");
    let mut server = ServerProcess::command(env!("CARGO_BIN_EXE_outpost"), dir.path().join("data"))
        .log_file(&log)
        .rust_log("info")
        .start()
        .expect("outpost starts");
    let sent = std::process::Command::new("kill")
        .args(["-HUP", &server.pid().to_string()])
        .status()
        .expect("runs kill");
    assert!(sent.success());
    let deadline = Instant::now() + Duration::from_secs(10);
    while !server.log().contains("SIGHUP") {
        assert!(
            server.is_running(),
            "SIGHUP stopped the server:\n{}",
            server.log()
        );
        assert!(
            Instant::now() < deadline,
            "no SIGHUP line:\n{}",
            server.log()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    assert!(server.is_running(), "{}", server.log());
}
