//! File locks on the cache. Locks are advisory `flock`s, released by the kernel when a process
//! dies, so a `kill -9` never leaves a stale lock.
//!
//! - Per-key locks (`locks/<key>.lock`, exclusive): two runs sharing a cache compute each key
//!   once. The second waits on the lock, then finds the first one's record and reuses it. A
//!   key's scratch folder (`tmp/run-<key>-…`) exists only while its key lock is held.
//! - The cache lock (`locks/cache.lock`): `run` and `verify` hold it shared for their whole
//!   life, `gc` exclusive, so `gc` never removes a scratch folder, or an object stored before
//!   its record, from under a running job.
//!
//! A lock file that cannot be opened for writing (another user's file in a group-shared cache,
//! a read-only mount) is opened read-only: `flock` needs no write access.

use std::fs::{File, TryLockError};
use std::io::ErrorKind;
use std::path::{Path, PathBuf};

use super::store::{StoreError, StoreResult, is_digest};

/// Options that refuse to follow a symbolic link in the last component: a lock file replaced
/// by a link (dangling or not) would otherwise create or open a file outside the cache.
fn no_follow(o: &mut std::fs::OpenOptions) -> &mut std::fs::OpenOptions {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        use std::os::unix::fs::OpenOptionsExt;
        o.custom_flags(libc::O_NOFOLLOW);
    }
    o
}

/// The error for a lock path that is not a regular file (a link, a FIFO, a folder).
fn not_a_lock_file(p: &Path, what: &str) -> StoreError {
    StoreError::Io {
        path: p.to_path_buf(),
        source: std::io::Error::other(format!("is {what}, not a lock file: links in the cache are never followed; remove it")),
    }
}

fn open_lock_file(p: &Path) -> StoreResult<File> {
    // Checked before opening too, for platforms without O_NOFOLLOW and for FIFOs (opening one
    // would block).
    if let Some(parent) = p.parent()
        && std::fs::symlink_metadata(parent).is_ok_and(|m| !m.is_dir())
    {
        return Err(not_a_lock_file(parent, "a link or a file where the locks folder should be"));
    }
    match std::fs::symlink_metadata(p) {
        Ok(m) if m.file_type().is_symlink() => return Err(not_a_lock_file(p, "a symbolic link")),
        Ok(m) if !m.is_file() => return Err(not_a_lock_file(p, "not a regular file")),
        _ => {}
    }
    let opened = match no_follow(File::options().read(true).write(true).create(true).truncate(false)).open(p) {
        Ok(f) => Ok(f),
        Err(e) if matches!(e.kind(), ErrorKind::PermissionDenied | ErrorKind::ReadOnlyFilesystem) => {
            no_follow(File::options().read(true)).open(p).map_err(|_| StoreError::Io { path: p.to_path_buf(), source: e })
        }
        Err(e) => Err(StoreError::Io { path: p.to_path_buf(), source: e }),
    };
    // O_NOFOLLOW on a link fails with ELOOP: say what it is.
    match opened {
        Err(StoreError::Io { .. }) if std::fs::symlink_metadata(p).is_ok_and(|m| m.file_type().is_symlink()) => {
            Err(not_a_lock_file(p, "a symbolic link"))
        }
        other => other,
    }
}

fn io_at(p: &Path) -> impl FnOnce(std::io::Error) -> StoreError + '_ {
    move |source| StoreError::Io { path: p.to_path_buf(), source }
}

/// `Ok(true)` when locked, `Ok(false)` when another holder has it.
fn try_locked(r: Result<(), TryLockError>, p: &Path) -> StoreResult<bool> {
    match r {
        Ok(()) => Ok(true),
        Err(TryLockError::WouldBlock) => Ok(false),
        Err(TryLockError::Error(e)) => Err(StoreError::Io { path: p.to_path_buf(), source: e }),
    }
}

pub struct KeyLock {
    _file: File,
}

fn key_lock_path(root: &Path, key: &str) -> StoreResult<PathBuf> {
    if !is_digest(key) {
        return Err(StoreError::BadName { what: "cache key", name: format!("{:?}", key.chars().take(80).collect::<String>()) });
    }
    Ok(root.join("locks").join(format!("{key}.lock")))
}

impl KeyLock {
    /// Blocks until the lock on `key` is held.
    pub fn acquire(root: &Path, key: &str) -> StoreResult<KeyLock> {
        let p = key_lock_path(root, key)?;
        let file = open_lock_file(&p)?;
        file.lock().map_err(io_at(&p))?;
        Ok(KeyLock { _file: file })
    }

    /// The lock on `key` if no one holds it, else `None`.
    pub fn try_acquire(root: &Path, key: &str) -> StoreResult<Option<KeyLock>> {
        let p = key_lock_path(root, key)?;
        let file = open_lock_file(&p)?;
        Ok(try_locked(file.try_lock(), &p)?.then_some(KeyLock { _file: file }))
    }
}

/// The cache-wide lock: shared for `run` and `verify`, exclusive for `gc`.
pub struct CacheLock {
    _file: File,
}

impl CacheLock {
    pub fn path(root: &Path) -> PathBuf {
        root.join("locks").join("cache.lock")
    }

    /// Blocks until a shared hold is granted (that is, until no `gc` holds it).
    pub fn shared(root: &Path) -> StoreResult<CacheLock> {
        let p = Self::path(root);
        let file = open_lock_file(&p)?;
        file.lock_shared().map_err(io_at(&p))?;
        Ok(CacheLock { _file: file })
    }

    pub fn try_shared(root: &Path) -> StoreResult<Option<CacheLock>> {
        let p = Self::path(root);
        let file = open_lock_file(&p)?;
        Ok(try_locked(file.try_lock_shared(), &p)?.then_some(CacheLock { _file: file }))
    }

    /// Blocks until no one else holds the lock.
    pub fn exclusive(root: &Path) -> StoreResult<CacheLock> {
        let p = Self::path(root);
        let file = open_lock_file(&p)?;
        file.lock().map_err(io_at(&p))?;
        Ok(CacheLock { _file: file })
    }

    pub fn try_exclusive(root: &Path) -> StoreResult<Option<CacheLock>> {
        let p = Self::path(root);
        let file = open_lock_file(&p)?;
        Ok(try_locked(file.try_lock(), &p)?.then_some(CacheLock { _file: file }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shared_holders_coexist_and_exclude_an_exclusive_one() {
        let d = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(d.path().join("locks")).unwrap();
        let a = CacheLock::try_shared(d.path()).unwrap().expect("first shared");
        let b = CacheLock::try_shared(d.path()).unwrap().expect("second shared");
        assert!(CacheLock::try_exclusive(d.path()).unwrap().is_none(), "gc must wait for runs");
        drop((a, b));
        let x = CacheLock::try_exclusive(d.path()).unwrap().expect("free");
        assert!(CacheLock::try_shared(d.path()).unwrap().is_none(), "a run must wait for gc");
        drop(x);
    }

    #[test]
    fn key_locks_refuse_names_that_are_not_digests() {
        let d = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(d.path().join("locks")).unwrap();
        assert!(matches!(KeyLock::acquire(d.path(), "../../etc/x"), Err(StoreError::BadName { .. })));
        let k = "a".repeat(64);
        let held = KeyLock::try_acquire(d.path(), &k).unwrap().expect("free");
        assert!(KeyLock::try_acquire(d.path(), &k).unwrap().is_none());
        drop(held);
    }

    #[cfg(unix)]
    #[test]
    fn a_linked_lock_file_is_refused_and_nothing_is_created_outside() {
        let outside = tempfile::tempdir().unwrap();
        let d = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(d.path().join("locks")).unwrap();
        let k = "e".repeat(64);
        // Dangling links into a victim folder: following them would create the files there.
        std::os::unix::fs::symlink(outside.path().join("c"), CacheLock::path(d.path())).unwrap();
        std::os::unix::fs::symlink(outside.path().join("k"), d.path().join("locks").join(format!("{k}.lock"))).unwrap();
        let e = CacheLock::try_shared(d.path()).err().expect("a link is refused").to_string();
        assert!(e.contains("cache.lock") && e.contains("symbolic link"), "{e}");
        assert!(CacheLock::exclusive(d.path()).is_err());
        let e = KeyLock::acquire(d.path(), &k).err().expect("a link is refused").to_string();
        assert!(e.contains(&k) && e.contains("symbolic link"), "{e}");
        assert_eq!(std::fs::read_dir(outside.path()).unwrap().count(), 0, "nothing created outside the cache");
    }
}
