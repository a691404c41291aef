//! The running marker: tells a start after an unclean stop (kill -9, power
//! loss) from one after a clean stop, and when the last moments before it
//! were.
//!
//! `RUNNING` in the data directory is created when the store opens, its
//! modification time refreshed every [`REFRESH_INTERVAL`] while the server
//! runs, and removed after the final flush of a clean stop. Found at start,
//! it means the previous run did not stop cleanly: blob files written within
//! [`SUSPECT_WINDOW`] of its last refresh (or later) may hold bytes that never
//! reached the disk (`fsync = false`) and are verified before serving.

use std::fs::{self, File};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use crate::error::Result;

/// The marker's file name in the data directory.
pub const MARKER: &str = "RUNNING";

/// How often a running server refreshes the marker's modification time.
pub const REFRESH_INTERVAL: Duration = Duration::from_secs(30);

/// How far before the marker's last refresh files are suspect: the refresh
/// interval plus Linux's default write-back delay of dirty pages (30 s),
/// doubled for margin.
pub const SUSPECT_WINDOW: Duration = Duration::from_secs(2 * (30 + 30));

/// The marker of the running store (see the module doc).
pub struct RunningMarker {
    /// `DIR/RUNNING`.
    path: PathBuf,
}

impl RunningMarker {
    /// If the previous run over `dir` did not stop cleanly, the time from
    /// which its blob files are suspect (the marker's last refresh minus
    /// [`SUSPECT_WINDOW`]).
    pub fn unclean_stop(dir: &Path) -> Result<Option<SystemTime>> {
        match fs::metadata(dir.join(MARKER)) {
            Ok(meta) => {
                let refreshed = meta.modified()?;
                Ok(Some(
                    refreshed
                        .checked_sub(SUSPECT_WINDOW)
                        .unwrap_or(SystemTime::UNIX_EPOCH),
                ))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    /// Creates (or refreshes) the marker in `dir`.
    pub fn create(dir: &Path) -> Result<Self> {
        let path = dir.join(MARKER);
        fs::write(
            &path,
            "Outpost is running on this directory (or did not stop cleanly).\n",
        )?;
        File::open(dir)?.sync_all()?;
        Ok(RunningMarker { path })
    }

    /// Sets the marker's modification time to now.
    pub fn refresh(&self) -> Result<()> {
        let file = File::options().write(true).open(&self.path)?;
        file.set_modified(SystemTime::now())?;
        Ok(())
    }

    /// Removes the marker: the store was flushed and stops cleanly.
    pub fn remove(&self) -> Result<()> {
        match fs::remove_file(&self.path) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e.into()),
            _ => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_marker_left_behind_names_the_suspect_time() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(RunningMarker::unclean_stop(dir.path()).unwrap(), None);
        let marker = RunningMarker::create(dir.path()).unwrap();
        marker.refresh().unwrap();
        let since = RunningMarker::unclean_stop(dir.path()).unwrap().unwrap();
        let age = SystemTime::now().duration_since(since).unwrap();
        assert!(age >= SUSPECT_WINDOW && age < SUSPECT_WINDOW + Duration::from_secs(60));
        marker.remove().unwrap();
        assert_eq!(RunningMarker::unclean_stop(dir.path()).unwrap(), None);
    }
}
