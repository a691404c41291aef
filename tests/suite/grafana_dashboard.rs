//! `deploy/grafana/outpost.json` stays importable and queries only metrics a
//! real Outpost exports: every `outpost_*` name in the dashboard must be on
//! the `/metrics` page of a running server.

use std::collections::BTreeSet;

use serde_json::Value;

use crate::common::*;

fn dashboard() -> Value {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/deploy/grafana/outpost.json");
    let text = std::fs::read_to_string(path).expect("read the dashboard");
    serde_json::from_str(&text).expect("the dashboard is JSON")
}

/// Every `outpost_…` metric name in any string of `value`.
fn metric_names(value: &Value, names: &mut BTreeSet<String>) {
    match value {
        Value::String(s) => {
            for (at, _) in s.match_indices("outpost_") {
                let name: String = s[at..]
                    .chars()
                    .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                    .collect();
                names.insert(name);
            }
        }
        Value::Array(items) => items.iter().for_each(|v| metric_names(v, names)),
        Value::Object(map) => map.values().for_each(|v| metric_names(v, names)),
        _ => {}
    }
}

#[test]
fn the_dashboard_is_importable_with_a_prometheus_input() {
    let d = dashboard();
    assert_eq!(d["__inputs"][0]["name"], "DS_PROMETHEUS");
    assert_eq!(d["__inputs"][0]["pluginId"], "prometheus");
    let panels = d["panels"].as_array().expect("panels");
    let mut ids = BTreeSet::new();
    let mut queries = 0;
    for p in panels {
        assert!(
            ids.insert(p["id"].as_u64().expect("a panel id")),
            "duplicate id"
        );
        assert!(p["gridPos"]["w"].as_u64().is_some(), "{p}");
        if p["type"] == "row" {
            continue;
        }
        assert_eq!(p["datasource"]["uid"], "${DS_PROMETHEUS}", "{}", p["title"]);
        let targets = p["targets"].as_array().expect("targets");
        assert!(!targets.is_empty(), "{} has no query", p["title"]);
        for t in targets {
            let expr = t["expr"].as_str().expect("a PromQL expression");
            assert!(expr.contains("outpost_"), "{expr}");
            assert!(
                expr.contains("$instance"),
                "{expr} ignores the instance variable"
            );
            queries += 1;
        }
    }
    assert!(queries >= 20, "{queries} queries");
}

#[tokio::test]
async fn every_metric_the_dashboard_queries_is_exported() {
    let mut queried = BTreeSet::new();
    metric_names(&dashboard(), &mut queried);
    assert!(queried.len() >= 30, "{queried:?}");

    let dir = tempfile::tempdir().unwrap();
    let server = ServerProcess::command(env!("CARGO_BIN_EXE_outpost"), dir.path().join("data"))
        .args(["--metrics-listen", "127.0.0.1:0"])
        .log_file(&dir.path().join("log"))
        .start()
        .expect("outpost starts");
    let samples = outpost_testkit::metrics::scrape(server.metrics_addr().unwrap())
        .await
        .expect("scrape /metrics");
    let exported: BTreeSet<&str> = samples
        .keys()
        .map(|k| k.split('{').next().unwrap())
        .collect();

    let missing: Vec<&String> = queried
        .iter()
        .filter(|n| !exported.contains(n.as_str()))
        .collect();
    assert!(
        missing.is_empty(),
        "the dashboard queries unknown metrics: {missing:?}"
    );
}
