//! The data directory: does it exist (or can serve create it), can this user
//! write there, is there room for the quota, is the filesystem a good home
//! for a cache, and does a running Outpost already hold the store.

use std::io::Write as _;
use std::path::Path;

use crate::cli::human_bytes;
use crate::config::Config;

use super::{Check, Section};

/// Entries walked at most to size an existing store: beyond this doctor
/// says it could not tell rather than take minutes.
const MAX_WALK: u64 = 2_000_000;

/// Checks `config.data_dir`; writes and removes one probe file, creates
/// nothing. A missing directory is fine when `serve` can create it: then
/// its nearest existing parent is checked instead (doctor often runs as
/// root before a service user's first start, and a directory it created
/// would belong to root).
pub fn check(config: &Config) -> Section {
    let dir = &config.data_dir;
    let mut section = Section::new(format!("data directory {}", dir.display()));
    let probed = match std::fs::metadata(dir) {
        Ok(meta) if meta.is_dir() => {
            section.push(Check::ok("exists", "a directory"));
            dir.clone()
        }
        Ok(_) => {
            section.push(Check::fail(
                "exists",
                "it exists but is not a directory",
                "choose another --data-dir",
            ));
            return section;
        }
        Err(_) => match dir.ancestors().skip(1).find(|a| a.is_dir()) {
            Some(parent) => {
                section.push(Check::ok(
                    "exists",
                    format!(
                        "not yet: serve creates it in {} (checked below instead)",
                        parent.display()
                    ),
                ));
                parent.to_path_buf()
            }
            None => {
                section.push(Check::fail(
                    "exists",
                    "missing, and no parent directory exists",
                    "create it for the user that runs outpost, or choose another --data-dir",
                ));
                return section;
            }
        },
    };
    section.push(writable(&probed));
    let store = dir.join("db").join("CURRENT").exists();
    section.push(in_use(dir, store));
    section.push(free_space(&probed, config.quota_bytes, store));
    section.push(filesystem(&probed));
    section
}

/// Creates, writes and removes a probe file.
fn writable(dir: &Path) -> Check {
    let probe = dir.join(format!(".outpost-doctor-{}", std::process::id()));
    let result = std::fs::File::create(&probe).and_then(|mut f| {
        f.write_all(b"outpost doctor probe")
            .and_then(|()| f.sync_all())
    });
    let removed = std::fs::remove_file(&probe);
    match (result, removed) {
        (Ok(()), Ok(())) => Check::ok("writable", "a probe file was written and removed"),
        (Err(e), _) => Check::fail(
            "writable",
            format!("cannot write there: {e}"),
            "give the user that runs outpost write access (chown/chmod), or choose another --data-dir",
        ),
        (Ok(()), Err(e)) => Check::fail(
            "writable",
            format!("a probe file was written but cannot be removed: {e}"),
            "give the user that runs outpost full access to the directory",
        ),
    }
}

/// Whether a server holds the store: RocksDB keeps a POSIX lock on `db/LOCK`
/// while it runs; a shared lock attempt conflicts with it.
fn in_use(dir: &Path, store: bool) -> Check {
    if !store {
        return Check::ok("store", "none yet: serve creates one");
    }
    let lock = dir.join("db").join("LOCK");
    let file = match std::fs::File::open(&lock) {
        Ok(file) => file,
        Err(e) => {
            return Check::warn(
                "store",
                format!("a store is there, but its lock file cannot be opened: {e}"),
                "check the ownership of the data directory",
            );
        }
    };
    use rustix::fs::{FlockOperation, fcntl_lock};
    match fcntl_lock(&file, FlockOperation::NonBlockingLockShared) {
        Ok(()) => {
            let _ = fcntl_lock(&file, FlockOperation::NonBlockingUnlock);
            Check::ok("store", "a store is there, not in use")
        }
        Err(e) if e == rustix::io::Errno::AGAIN || e == rustix::io::Errno::ACCESS => Check::ok(
            "store",
            "in use by a running Outpost (RocksDB's LOCK is held): fine, checking it as it runs",
        ),
        Err(e) => Check::warn(
            "store",
            format!("cannot tell whether the store is in use: {e}"),
            "make sure only one Outpost uses this directory",
        ),
    }
}

/// Free space on the filesystem against what the quota still needs.
fn free_space(dir: &Path, quota: u64, store: bool) -> Check {
    let stat = match rustix::fs::statvfs(dir) {
        Ok(stat) => stat,
        Err(e) => {
            return Check::warn(
                "free space",
                format!("statvfs failed: {e}"),
                "check the directory",
            );
        }
    };
    let free = stat.f_bavail.saturating_mul(stat.f_frsize);
    let total = stat.f_blocks.saturating_mul(stat.f_frsize);
    let used = if store { directory_bytes(dir) } else { Some(0) };
    let Some(used) = used else {
        return Check::warn(
            "free space",
            format!(
                "{} free of {}, quota {}; the store is too large to size quickly",
                human_bytes(free),
                human_bytes(total),
                human_bytes(quota)
            ),
            "make sure the free space plus the store's size covers the quota",
        );
    };
    let needed = quota.saturating_sub(used);
    let held = if store {
        format!(" (the store holds {} of it)", human_bytes(used))
    } else {
        String::new()
    };
    if free >= needed {
        Check::ok(
            "free space",
            format!(
                "{} free of {}: room for the quota of {}{held}",
                human_bytes(free),
                human_bytes(total),
                human_bytes(quota)
            ),
        )
    } else {
        Check::fail(
            "free space",
            if store {
                format!(
                    "{} free < the {} the quota of {} still needs{held}",
                    human_bytes(free),
                    human_bytes(needed),
                    human_bytes(quota)
                )
            } else {
                format!("{} free < quota {}", human_bytes(free), human_bytes(quota))
            },
            format!(
                "lower --quota (to at most {}) or free space",
                human_bytes(free.saturating_add(used))
            ),
        )
    }
}

/// Bytes of the files under `dir` (`None` past [`MAX_WALK`] entries).
fn directory_bytes(dir: &Path) -> Option<u64> {
    let (mut bytes, mut entries) = (0u64, 0u64);
    let mut pending = vec![dir.to_path_buf()];
    while let Some(dir) = pending.pop() {
        let Ok(read) = std::fs::read_dir(&dir) else {
            continue;
        };
        for entry in read.flatten() {
            entries += 1;
            if entries > MAX_WALK {
                return None;
            }
            match entry.file_type() {
                Ok(t) if t.is_dir() => pending.push(entry.path()),
                Ok(t) if t.is_file() => {
                    bytes += entry.metadata().map_or(0, |m| m.len());
                }
                _ => {}
            }
        }
    }
    Some(bytes)
}

/// Filesystems a cache should not live on, by `statfs` magic number: why,
/// and what to do. Everything else is fine.
const POOR_HOMES: &[(i64, &str, &str, &str)] = &[
    (
        0x0102_1994,
        "tmpfs",
        "the cache lives in memory and is lost at every reboot",
        "use a directory on a disk",
    ),
    (
        0x6969,
        "NFS",
        "a network filesystem: every read crosses the network and RocksDB's locks and fsync are unreliable there",
        "use a local disk",
    ),
    (
        0xFF53_4D42,
        "CIFS",
        "a network filesystem: every read crosses the network and RocksDB's locks are unreliable there",
        "use a local disk",
    ),
    (
        0xFE53_4D42,
        "SMB2",
        "a network filesystem: every read crosses the network and RocksDB's locks are unreliable there",
        "use a local disk",
    ),
    (
        0x794C_7630,
        "overlayfs",
        "a container's writable layer: slow, and gone with the container",
        "mount a volume for the data directory",
    ),
    (
        0x6573_5546,
        "FUSE",
        "a userspace filesystem: slow, and its locking may not be what RocksDB needs",
        "use a local disk",
    ),
];

/// The filesystem type, and a warning for the poor homes above.
fn filesystem(dir: &Path) -> Check {
    let stat = match rustix::fs::statfs(dir) {
        Ok(stat) => stat,
        Err(e) => return Check::skip("filesystem", format!("statfs failed: {e}")),
    };
    #[allow(clippy::unnecessary_cast)] // f_type's width differs between targets
    let magic = stat.f_type as i64;
    judge_filesystem(magic)
}

/// [`filesystem`] for a magic number.
fn judge_filesystem(magic: i64) -> Check {
    if let Some((_, name, why, advice)) = POOR_HOMES.iter().find(|(m, ..)| *m == magic) {
        return Check::warn("filesystem", format!("{name}: {why}"), *advice);
    }
    let name = match magic {
        0xEF53 => "ext4",
        0x5846_5342 => "xfs",
        0x9123_683E => "btrfs",
        0x2FC1_2FC1 => "zfs",
        0xF2F5_2010 => "f2fs",
        _ => {
            return Check::ok(
                "filesystem",
                format!("type 0x{magic:x}, a local filesystem"),
            );
        }
    };
    Check::ok("filesystem", format!("{name}, a local filesystem"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cli::doctor::Verdict;

    #[test]
    fn tmpfs_nfs_and_overlay_are_warned_about_and_ext4_is_fine() {
        for (magic, word) in [
            (0x0102_1994, "tmpfs"),
            (0x6969, "NFS"),
            (0x794C_7630, "overlayfs"),
        ] {
            let check = judge_filesystem(magic);
            assert_eq!(check.verdict, Verdict::Warn, "{word}");
            assert!(check.finding.starts_with(word), "{check:?}");
            assert!(check.advice.is_some());
        }
        assert_eq!(
            judge_filesystem(0xEF53),
            Check::ok("filesystem", "ext4, a local filesystem")
        );
    }

    #[test]
    fn a_quota_larger_than_the_disk_fails_and_says_what_fits() {
        let dir = tempfile::tempdir().unwrap();
        let check = free_space(dir.path(), u64::MAX / 2, false);
        assert_eq!(check.verdict, Verdict::Fail, "{check:?}");
        assert!(
            check
                .advice
                .unwrap()
                .starts_with("lower --quota (to at most ")
        );
        let check = free_space(dir.path(), 1024, false);
        assert_eq!(check.verdict, Verdict::Ok, "{check:?}");
    }

    #[test]
    fn an_existing_store_counts_towards_the_quota() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("db")).unwrap();
        std::fs::write(dir.path().join("db/blob"), vec![1u8; 8 << 20]).unwrap();
        assert_eq!(directory_bytes(dir.path()), Some(8 << 20));
        let free = {
            let s = rustix::fs::statvfs(dir.path()).unwrap();
            s.f_bavail * s.f_frsize
        };
        // A quota above free space is fine when the store holds the rest
        // (4 MiB of slack for what other processes write meanwhile).
        let check = free_space(dir.path(), free + (4 << 20), true);
        assert_eq!(check.verdict, Verdict::Ok, "{check:?}");
        assert!(
            check.finding.contains("the store holds 8.0 MiB"),
            "{check:?}"
        );
    }

    #[test]
    fn a_file_where_the_directory_should_be_fails() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("f");
        std::fs::write(&file, b"x").unwrap();
        let section = check(&Config::for_tests(&file));
        assert_eq!(section.checks.len(), 1);
        assert_eq!(section.checks[0].verdict, Verdict::Fail);
    }

    #[test]
    fn a_missing_directory_is_checked_in_its_parent_and_not_created() {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("a/b");
        let section = check(&Config::for_tests(&data));
        assert!(!data.exists(), "doctor creates nothing");
        let names: Vec<_> = section.checks.iter().map(|c| c.name).collect();
        assert_eq!(
            names,
            ["exists", "writable", "store", "free space", "filesystem"]
        );
        assert!(
            section.checks[0]
                .finding
                .starts_with("not yet: serve creates it in")
        );
        assert_eq!(section.checks[1].verdict, Verdict::Ok);
        assert_eq!(
            std::fs::read_dir(dir.path()).unwrap().count(),
            0,
            "the probe is gone"
        );
    }
}
