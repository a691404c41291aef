//! Files that Outpost re-reads while it runs (the listener's certificate and
//! key, the client CA, the tokens and htpasswd files): when one changes on
//! disk, or when the process gets SIGHUP, the owner's reload runs.
//!
//! This is the one mechanism for it: each owner calls [`watch`] with its
//! paths and a reload function that parses the new files and swaps them in,
//! keeping the old ones (and logging why) when the new ones are bad.

use std::path::PathBuf;
use std::sync::Mutex;
use std::time::{Duration, SystemTime};

use tokio::sync::watch as signal_watch;
use tokio_util::sync::CancellationToken;

/// How often the files' modification stamps are compared.
pub const POLL_INTERVAL: Duration = Duration::from_secs(2);

/// What identifies one version of a file: modification time, size and inode
/// (an editor or `mv` that replaces the file changes the inode).
type Stamp = Option<(SystemTime, u64, u64)>;

fn stamp(path: &std::path::Path) -> Stamp {
    use std::os::unix::fs::MetadataExt;
    let meta = std::fs::metadata(path).ok()?;
    Some((meta.modified().ok()?, meta.len(), meta.ino()))
}

/// A counter that goes up on every SIGHUP the process receives; installed
/// once, shared by every watcher. The handler is a task of the runtime that
/// installed it; once that runtime has shut down (in-process tests run one
/// runtime per test), the next caller installs a new one in its own.
fn hangups() -> signal_watch::Receiver<u64> {
    static HANGUPS: Mutex<Option<signal_watch::Receiver<u64>>> = Mutex::new(None);
    let mut installed = HANGUPS.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(rx) = installed.as_ref() {
        // An error means the handler (the sender) is gone.
        if rx.has_changed().is_ok() {
            return rx.clone();
        }
    }
    let (tx, rx) = signal_watch::channel(0u64);
    match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) {
        Ok(mut hup) => {
            tokio::spawn(async move {
                while hup.recv().await.is_some() {
                    tracing::info!("SIGHUP: re-reading certificates and credentials");
                    tx.send_modify(|n| *n += 1);
                }
            });
        }
        Err(e) => tracing::warn!("cannot handle SIGHUP ({e}); files reload on change only"),
    }
    *installed = Some(rx.clone());
    rx
}

/// Takes SIGHUP over from its default action (terminating the process)
/// for good, so that a reload request (`systemctl reload`, `kill -HUP`)
/// never stops a server that watches no file. Called once by `outpost
/// serve`, inside its runtime.
pub fn handle_sighup() {
    drop(hangups());
}

/// Calls `reload` whenever one of `paths` changes (checked every `interval`)
/// or the process gets SIGHUP, until `shutdown`. `reload` runs on a blocking
/// thread's worth of budget: it may read and parse files, but it must not
/// block for long. Must be called inside a tokio runtime.
pub fn watch(
    paths: Vec<PathBuf>,
    interval: Duration,
    shutdown: CancellationToken,
    mut reload: impl FnMut() + Send + 'static,
) -> tokio::task::JoinHandle<()> {
    let mut hup = hangups();
    hup.mark_unchanged();
    tokio::spawn(async move {
        let mut stamps: Vec<Stamp> = paths.iter().map(|p| stamp(p)).collect();
        let mut tick = tokio::time::interval(interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // Without a SIGHUP handler (none could be installed, or its runtime
        // is gone) files are still polled.
        let mut signals = true;
        loop {
            let forced = tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tick.tick() => false,
                changed = hup.changed(), if signals => {
                    if changed.is_err() {
                        signals = false;
                        continue;
                    }
                    true
                }
            };
            let now: Vec<Stamp> = paths.iter().map(|p| stamp(p)).collect();
            if forced || now != stamps {
                stamps = now;
                reload();
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// Watches `path` every 20 ms; the counter is the number of reloads.
    fn counting_watch(
        path: &std::path::Path,
    ) -> (
        Arc<AtomicUsize>,
        CancellationToken,
        tokio::task::JoinHandle<()>,
    ) {
        let count = Arc::new(AtomicUsize::new(0));
        let shutdown = CancellationToken::new();
        let seen = count.clone();
        let task = watch(
            vec![path.to_path_buf()],
            Duration::from_millis(20),
            shutdown.clone(),
            move || {
                seen.fetch_add(1, Ordering::SeqCst);
            },
        );
        (count, shutdown, task)
    }

    #[tokio::test]
    async fn a_changed_file_triggers_one_reload() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tokens");
        std::fs::write(&path, "a").unwrap();
        let (count, shutdown, task) = counting_watch(&path);
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(count.load(Ordering::SeqCst), 0, "nothing changed yet");
        // A replaced file (new inode, new size) is a change.
        let tmp = dir.path().join("tokens.new");
        std::fs::write(&tmp, "bb").unwrap();
        std::fs::rename(&tmp, &path).unwrap();
        tokio::time::sleep(Duration::from_millis(150)).await;
        assert_eq!(count.load(Ordering::SeqCst), 1);
        shutdown.cancel();
        task.await.unwrap();
    }

    #[test]
    fn a_watcher_in_a_later_runtime_still_sees_changes() {
        // In-process tests run one runtime per test: the SIGHUP handler the
        // first one installed is gone when the second one watches.
        for round in 0..2 {
            let runtime = tokio::runtime::Runtime::new().unwrap();
            let reloads = runtime.block_on(async {
                let dir = tempfile::tempdir().unwrap();
                let path = dir.path().join("tokens");
                std::fs::write(&path, "a").unwrap();
                let (count, shutdown, task) = counting_watch(&path);
                tokio::time::sleep(Duration::from_millis(100)).await;
                std::fs::write(&path, "bbb").unwrap();
                let deadline = std::time::Instant::now() + Duration::from_secs(5);
                while count.load(Ordering::SeqCst) == 0 && std::time::Instant::now() < deadline {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
                shutdown.cancel();
                task.await.unwrap();
                count.load(Ordering::SeqCst)
            });
            assert_eq!(reloads, 1, "round {round}");
        }
    }
}
