//! Per-key file locks: two runs sharing a cache compute each key once. The second waits on
//! the lock, then finds the first one's record and reuses it. Locks are advisory `flock`s,
//! released by the kernel when a process dies, so a `kill -9` never leaves a stale lock.

use std::fs::File;
use std::path::Path;

pub struct KeyLock {
    _file: File,
}

impl KeyLock {
    /// Blocks until the lock on `key` is held.
    pub fn acquire(root: &Path, key: &str) -> std::io::Result<KeyLock> {
        let p = root.join("locks").join(format!("{key}.lock"));
        let file = File::options().create(true).truncate(false).write(true).open(&p)?;
        file.lock()?;
        Ok(KeyLock { _file: file })
    }
}
