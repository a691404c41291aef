//! Unit tests of `quota`.

use super::*;

fn blob(size: u64) -> Entry {
    Entry {
        kind: EntryKind::InlineBlob,
        size,
        persisted_atime: 0,
    }
}

#[test]
fn replacing_in_place_keeps_the_lru_order_and_counts_the_new_size() {
    let mut index = Index::new(100);
    index.insert(b"a".to_vec(), blob(40));
    index.insert(b"b".to_vec(), blob(40));
    let smaller = Entry {
        kind: EntryKind::FileZstd,
        ..blob(10)
    };
    index.replace_in_place(b"a", smaller);
    assert_eq!(index.occupancy().blob_bytes, 50);
    let victims = index.evict_until(45).unwrap();
    assert_eq!(
        victims,
        vec![(b"a".to_vec(), smaller)],
        "a is still the oldest"
    );
}

#[test]
fn evicts_least_recently_used_first() {
    let mut index = Index::new(100);
    index.insert(b"a".to_vec(), blob(40));
    index.insert(b"b".to_vec(), blob(40));
    index.touch(b"a");
    let victims = index.reserve(40).unwrap();
    assert_eq!(victims.len(), 1);
    assert_eq!(victims[0].0, b"b".to_vec());
    assert!(index.peek(b"a").is_some());
    assert_eq!(index.occupancy().reserved_bytes, 40);
}

#[test]
fn pinned_entries_are_never_evicted() {
    let mut index = Index::new(100);
    index.insert(b"a".to_vec(), blob(50));
    index.insert(b"b".to_vec(), blob(40));
    index.pin(b"a");
    let victims = index.reserve(50).unwrap();
    assert_eq!(victims[0].0, b"b".to_vec());
    let err = index.reserve(50).unwrap_err();
    assert!(matches!(err, Error::ResourceExhausted(_)));
    assert!(index.peek(b"a").is_some(), "pinned entry survives");
    index.unpin(b"a");
    index.release(50);
    assert_eq!(index.reserve(60).unwrap()[0].0, b"a".to_vec());
}

#[test]
fn failed_reservation_keeps_every_entry() {
    let mut index = Index::new(100);
    index.insert(b"a".to_vec(), blob(30));
    index.insert(b"b".to_vec(), blob(30));
    index.insert(b"c".to_vec(), blob(30));
    index.pin(b"c");
    assert!(index.reserve(80).is_err());
    assert_eq!(index.occupancy().blob_count, 3);
    assert_eq!(index.occupancy().blob_bytes, 90);
    // LRU order is unchanged: `a` is still the first victim.
    assert_eq!(index.reserve(20).unwrap()[0].0, b"a".to_vec());
}

#[test]
fn oversized_reservation_is_refused() {
    let mut index = Index::new(10);
    assert!(matches!(
        index.reserve(11),
        Err(Error::ResourceExhausted(_))
    ));
}

#[test]
fn replacing_an_entry_keeps_totals_right() {
    let mut index = Index::new(100);
    index.insert(b"a".to_vec(), blob(10));
    index.insert(b"a".to_vec(), blob(20));
    assert_eq!(index.occupancy().blob_count, 1);
    assert_eq!(index.occupancy().blob_bytes, 20);
    index.remove(b"a");
    assert_eq!(index.occupancy(), Occupancy::default());
}

#[test]
fn eviction_skips_pinned_and_takes_oldest_first() {
    let mut index = Index::new(100);
    for key in [b"a", b"b", b"c", b"d"] {
        index.insert(key.to_vec(), blob(25));
    }
    index.pin(b"a");
    let victims = index.evict_until(40).unwrap();
    let keys: Vec<_> = victims.iter().map(|(k, _)| k.clone()).collect();
    assert_eq!(keys, vec![b"b".to_vec(), b"c".to_vec(), b"d".to_vec()]);
    assert_eq!(index.occupancy().blob_bytes, 25);
}

#[test]
fn action_results_count_against_the_same_quota() {
    let mut index = Index::new(100);
    let action = Entry {
        kind: EntryKind::ActionResult,
        size: 70,
        persisted_atime: 0,
    };
    index.insert(b"r".to_vec(), action);
    index.insert(b"a".to_vec(), blob(20));
    assert_eq!(index.occupancy().action_count, 1);
    assert_eq!(index.occupancy().action_bytes, 70);
    let victims = index.reserve(20).unwrap();
    assert_eq!(victims[0].0, b"r".to_vec(), "the oldest entry goes first");
}

#[test]
fn asset_entries_are_counted_apart_against_the_same_quota() {
    let mut index = Index::new(100);
    let asset = |size| Entry {
        kind: EntryKind::Asset,
        size,
        persisted_atime: 0,
    };
    index.insert(b"s".to_vec(), asset(30));
    index.insert(b"s".to_vec(), asset(50));
    index.insert(b"a".to_vec(), blob(40));
    let o = index.occupancy();
    assert_eq!((o.asset_count, o.asset_bytes), (1, 50));
    assert_eq!((o.blob_count, o.blob_bytes), (1, 40));
    let victims = index.reserve(20).unwrap();
    assert_eq!(victims[0].0, b"s".to_vec(), "the oldest entry goes first");
    assert_eq!(index.occupancy().asset_count, 0);
}

#[test]
fn dropped_reservation_gives_its_bytes_back() {
    let shared = SharedIndex::new(100);
    shared.lock().reserve(60).unwrap();
    let reservation = shared.reservation(60);
    assert_eq!(shared.lock().occupancy().reserved_bytes, 60);
    drop(reservation);
    assert_eq!(shared.lock().occupancy().reserved_bytes, 0);
}

#[test]
fn consumed_reservation_is_not_given_back_twice() {
    let shared = SharedIndex::new(100);
    shared.lock().reserve(60).unwrap();
    let reservation = shared.reservation(60);
    {
        let mut index = shared.lock();
        reservation.consume(&mut index);
        index.insert(b"a".to_vec(), blob(60));
    }
    let occupancy = shared.lock().occupancy();
    assert_eq!(occupancy.reserved_bytes, 0);
    assert_eq!(occupancy.blob_bytes, 60);
}

#[test]
fn a_reservation_grows_and_shrinks_and_gives_back_what_it_holds() {
    let shared = SharedIndex::new(100);
    shared.lock().reserve(10).unwrap();
    let mut reservation = shared.reservation(10);
    shared.lock().reserve(30).unwrap();
    reservation.absorb(shared.reservation(30));
    assert_eq!(reservation.bytes(), 40);
    assert_eq!(shared.lock().occupancy().reserved_bytes, 40);
    reservation.shrink_to(25);
    assert_eq!(reservation.bytes(), 25);
    assert_eq!(shared.lock().occupancy().reserved_bytes, 25);
    reservation.shrink_to(30); // never grows by shrinking
    assert_eq!(shared.lock().occupancy().reserved_bytes, 25);
    drop(reservation);
    assert_eq!(shared.lock().occupancy().reserved_bytes, 0);
}

#[test]
fn pin_guard_protects_until_dropped() {
    let shared = SharedIndex::new(100);
    shared.lock().insert(b"a".to_vec(), blob(80));
    let pin = shared.pin(b"a");
    assert!(shared.lock().reserve(50).is_err());
    drop(pin);
    let victims = shared.lock().reserve(50).unwrap();
    assert_eq!(victims[0].0, b"a".to_vec());
}
