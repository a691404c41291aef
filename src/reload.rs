//! Files that Outpost re-reads while it runs (the listener's certificate and
//! key, the client CA, the tokens and htpasswd files): when one changes on
//! disk, or when the process gets SIGHUP, the owner's reload runs.
//!
//! This is the one mechanism for it: each owner calls [`watch`] with its
//! paths and a reload function that parses the new files and swaps them in,
//! keeping the old ones (and logging why) when the new ones are bad.

use std::path::PathBuf;
use std::sync::OnceLock;
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
/// once, shared by every watcher.
fn hangups() -> signal_watch::Receiver<u64> {
    static HANGUPS: OnceLock<signal_watch::Receiver<u64>> = OnceLock::new();
    HANGUPS
        .get_or_init(|| {
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
            rx
        })
        .clone()
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
        // The SIGHUP task lives on the runtime that first installed it; when
        // that runtime is gone (tests run one per test), keep polling files.
        let mut hup_alive = true;
        loop {
            let forced = tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tick.tick() => false,
                changed = hup.changed(), if hup_alive => {
                    if changed.is_err() {
                        hup_alive = false;
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

    #[tokio::test]
    async fn a_changed_file_triggers_one_reload() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tokens");
        std::fs::write(&path, "a").unwrap();
        let count = Arc::new(AtomicUsize::new(0));
        let shutdown = CancellationToken::new();
        let seen = count.clone();
        let task = watch(
            vec![path.clone()],
            Duration::from_millis(20),
            shutdown.clone(),
            move || {
                seen.fetch_add(1, Ordering::SeqCst);
            },
        );
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
}
