//! `outpost serve --ready-file`: with `--listen 127.0.0.1:0` and
//! `--metrics-listen 127.0.0.1:0` the file names the ports actually bound,
//! so a parent process never has to guess a free port.

use crate::common::*;

#[tokio::test]
async fn the_ready_file_names_the_bound_grpc_and_metrics_addresses() {
    let dir = tempfile::tempdir().unwrap();
    let server = ServerProcess::command(env!("CARGO_BIN_EXE_outpost"), dir.path().join("data"))
        .args(["--metrics-listen", "127.0.0.1:0"])
        .log_file(&dir.path().join("log"))
        .start()
        .expect("outpost starts");
    let (grpc, metrics) = (
        server.addr(),
        server.metrics_addr().expect("a metrics= line"),
    );
    assert_ne!(grpc.port(), 0);
    assert_ne!(metrics.port(), 0);
    assert_ne!(grpc, metrics);
    let text = std::fs::read_to_string(dir.path().join("data.ready")).expect("ready file");
    assert_eq!(text, format!("grpc={grpc}\nmetrics={metrics}\n"));

    // Both addresses answer.
    server
        .capabilities()
        .get_capabilities(re::GetCapabilitiesRequest::default())
        .await
        .expect("GetCapabilities on the gRPC address");
    let samples = outpost_testkit::metrics::scrape(metrics)
        .await
        .expect("scrape the metrics address");
    assert!(!samples.is_empty(), "the metrics page has samples");
}
