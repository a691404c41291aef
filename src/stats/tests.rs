//! Unit tests of the counter table.

use super::*;

#[test]
fn methods_are_listed_in_enum_order() {
    for (i, m) in UpstreamMethod::ALL.iter().enumerate() {
        assert_eq!(m.index(), i, "{m:?}");
    }
}

#[test]
fn the_table_reads_the_fields_it_names() {
    let stats = Stats::default();
    Stats::add(&stats.prefetch_hits, 7);
    stats.upstream_call(UpstreamMethod::Execute);
    let read = |name: &str| {
        let c = Stats::COUNTERS.iter().find(|c| c.metric == name).unwrap();
        (c.read)(&stats)
    };
    assert_eq!(read("outpost_prefetch_hits_total"), 7);
    assert_eq!(read("outpost_cas_hits_total"), 0);
    let calls = &Stats::BY_METHOD[0];
    assert_eq!(calls.metric, "outpost_upstream_calls_total");
    assert_eq!((calls.read)(&stats, UpstreamMethod::Execute), 1);
    let mut response = GetStatsResponse::default();
    Stats::add(&stats.evicted_entries, 3);
    stats.fill_admin_fields(&mut response);
    assert_eq!(response.evicted_blobs, 3);
    assert_eq!(response.upstream_calls["Execute"], 1);
}
