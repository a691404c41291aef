//! Action results through the queue: forwarded only after the blobs they
//! name that were queued (across a restart too), replaced by a later
//! result, given up with a blob that is lost or refused.

use super::*;

#[tokio::test]
async fn a_restart_resumes_the_queue_and_results_follow_their_outputs() {
    let dir = tempfile::tempdir().unwrap();
    let (cas, ac) = upstream_and_ac();
    cas.down.store(true, Ordering::SeqCst);
    let rig = start(dir.path(), 64 << 20, cas.clone(), &ac, 32 << 20);
    let a = rig.store(60, 1).await;
    let b = rig.store(2 << 20, 2).await;
    rig.queue.enqueue_blobs(&ctx(), &[a, b]).unwrap();
    let result = result_with(&[a, b], 0);
    rig.queue
        .enqueue_action_result(&ctx(), &action(1), &result, &[a, b])
        .unwrap();
    assert_eq!(rig.queue.state().blobs, 2);
    assert_eq!(rig.queue.state().results, 1);
    rig.stop().await;
    assert!(!cas.has(&a) && ac.puts.lock().unwrap().is_empty());

    cas.down.store(false, Ordering::SeqCst);
    let rig = start(dir.path(), 64 << 20, cas.clone(), &ac, 32 << 20);
    assert_eq!(rig.queue.queued(&ctx(), &[a, b]), [true, true]);
    let left = rig.queue.drain(SETTLE).await;
    assert!(left.is_empty(), "{left:?}");
    assert!(cas.has(&a) && cas.has(&b));
    let puts = ac.puts.lock().unwrap().clone();
    assert_eq!(puts.len(), 1);
    assert_eq!(
        (&puts[0].0, &puts[0].1, puts[0].2),
        (&action(1), &result, true)
    );
    assert!(rig.local.queue_records().unwrap().is_empty());
    assert_eq!(rig.count(|s| &s.write_back_results_forwarded), 1);
    rig.stop().await;
}

#[tokio::test]
async fn a_restart_gives_up_entries_whose_blob_is_gone() {
    let dir = tempfile::tempdir().unwrap();
    let (cas, ac) = upstream_and_ac();
    cas.down.store(true, Ordering::SeqCst);
    let rig = start(dir.path(), 64 << 20, cas.clone(), &ac, 32 << 20);
    let kept = rig.store(70, 1).await;
    let gone = rig.store(5000, 2).await;
    rig.queue.enqueue_blobs(&ctx(), &[kept, gone]).unwrap();
    let needs_gone = result_with(&[gone], 1);
    let needs_kept = result_with(&[kept], 2);
    rig.queue
        .enqueue_action_result(&ctx(), &action(1), &needs_gone, &[gone])
        .unwrap();
    rig.queue
        .enqueue_action_result(&ctx(), &action(2), &needs_kept, &[kept])
        .unwrap();
    rig.stop().await;
    let hex = gone.hash_hex();
    let file = dir
        .path()
        .join("blobs/sha256")
        .join(&hex[..2])
        .join(format!("{hex}-{}", gone.size));
    std::fs::remove_file(file).unwrap();

    cas.down.store(false, Ordering::SeqCst);
    let rig = start(dir.path(), 64 << 20, cas.clone(), &ac, 32 << 20);
    assert_eq!(rig.count(|s| &s.write_back_failed), 2);
    assert_eq!(rig.queue.state().blobs, 1);
    let left = rig.queue.drain(SETTLE).await;
    assert!(left.is_empty(), "{left:?}");
    let puts = ac.puts.lock().unwrap().clone();
    assert_eq!(puts.len(), 1);
    assert_eq!((&puts[0].0, puts[0].2), (&action(2), true));
    assert!(rig.local.queue_records().unwrap().is_empty());
    rig.stop().await;
}

#[tokio::test]
async fn a_result_waits_for_its_queued_outputs_only() {
    let dir = tempfile::tempdir().unwrap();
    let (cas, ac) = upstream_and_ac();
    cas.down.store(true, Ordering::SeqCst);
    let rig = start(dir.path(), 64 << 20, cas.clone(), &ac, 32 << 20);
    let out = rig.store(90, 1).await;
    rig.queue.enqueue_blobs(&ctx(), &[out]).unwrap();
    let present = cas.insert(b"already upstream");
    let waiting = result_with(&[out, present], 1);
    let free = result_with(&[present], 2);
    rig.queue
        .enqueue_action_result(&ctx(), &action(1), &waiting, &[out, present])
        .unwrap();
    // Nothing it names is queued: forwarded at once (the CAS is down, the AC is not).
    rig.queue
        .enqueue_action_result(&ctx(), &action(2), &free, &[present])
        .unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let puts = ac.puts.lock().unwrap().clone();
    assert_eq!(puts.len(), 1);
    assert_eq!(puts[0].0, action(2));
    assert_eq!(rig.queue.state().results, 1);

    cas.down.store(false, Ordering::SeqCst);
    assert!(rig.queue.drain(SETTLE).await.is_empty());
    let puts = ac.puts.lock().unwrap().clone();
    assert_eq!(puts.len(), 2);
    assert_eq!(
        (&puts[1].0, &puts[1].1, puts[1].2),
        (&action(1), &waiting, true)
    );
    rig.stop().await;
}

#[tokio::test]
async fn a_later_result_replaces_a_waiting_one() {
    let dir = tempfile::tempdir().unwrap();
    let (cas, ac) = upstream_and_ac();
    ac.down.store(true, Ordering::SeqCst);
    let rig = start(dir.path(), 64 << 20, cas.clone(), &ac, 32 << 20);
    let first = result_with(&[], 1);
    let second = result_with(&[], 2);
    rig.queue
        .enqueue_action_result(&ctx(), &action(1), &first, &[])
        .unwrap();
    tokio::time::sleep(Duration::from_millis(150)).await;
    rig.queue
        .enqueue_action_result(&ctx(), &action(1), &second, &[])
        .unwrap();
    assert_eq!(rig.queue.state().results, 1);
    ac.down.store(false, Ordering::SeqCst);
    assert!(rig.queue.drain(SETTLE).await.is_empty());
    let puts = ac.puts.lock().unwrap().clone();
    assert_eq!(puts.last().map(|p| &p.1), Some(&second));
    assert!(rig.local.queue_records().unwrap().is_empty());
    assert!(rig.count(|s| &s.write_back_retries) >= 1);
    rig.stop().await;
}

#[tokio::test]
async fn a_refused_blob_is_given_up_with_the_results_waiting_for_it() {
    let dir = tempfile::tempdir().unwrap();
    let (cas, ac) = upstream_and_ac();
    let refused_data: Bytes = blob(50, 9);
    let refused = Digest::of(DigestFunction::Sha256, &refused_data);
    let upstream = Arc::new(Refusing {
        inner: cas.clone(),
        refused,
    });
    let rig = start(dir.path(), 64 << 20, upstream, &ac, 32 << 20);
    write_bytes(&rig.local, &ctx(), &refused, refused_data)
        .await
        .unwrap();
    let fine = rig.store(51, 1).await;
    rig.queue.enqueue_blobs(&ctx(), &[refused, fine]).unwrap();
    let result = result_with(&[refused, fine], 0);
    rig.queue
        .enqueue_action_result(&ctx(), &action(1), &result, &[refused, fine])
        .unwrap();
    assert!(rig.queue.drain(SETTLE).await.is_empty());
    assert!(cas.has(&fine) && !cas.has(&refused));
    assert!(ac.puts.lock().unwrap().is_empty());
    assert_eq!(rig.count(|s| &s.write_back_failed), 2);
    assert_eq!(
        rig.count(|s| &s.write_back_retries),
        u64::from(state::REFUSALS - 1)
    );
    assert!(rig.local.queue_records().unwrap().is_empty());
    // Given up, it is no longer pinned nor reported queued.
    assert_eq!(rig.queue.queued(&ctx(), &[refused]), [false]);
    rig.stop().await;
}
