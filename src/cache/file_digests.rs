//! Content digests of data outside the cache (exactly the files a stage lists as read),
//! remembered by (path, size, mtime, ctime, inode) so a large dataset is not re-hashed on
//! every run. `--rehash` ignores the memo. The memo is only a speed-up: losing it costs time,
//! never correctness; and the stage that reads the files digests what it read and fails if
//! that differs from the planned digest, so even a memo fooled by a rewrite between plan and
//! read never caches a result under the old data's key.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::time::UNIX_EPOCH;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::store::{Store, StoreError, StoreResult, hash_file};

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
struct Entry {
    size: u64,
    mtime_ns: u128,
    /// Inode change time and inode number: a file rewritten in place with its size and mtime
    /// put back (`touch -d`, `cp --preserve`, a restore) still changes its ctime, so the memo
    /// does not hand out the old data's digest for it.
    #[serde(default)]
    ctime_ns: i128,
    #[serde(default)]
    ino: u64,
    digest: String,
}

/// The digest given to a listed file that cannot be read (a broken link, no permission): the
/// stage that reads it reports the error, or skips the file if asked to; either way the key
/// sees the same value at plan time and at run time.
pub const UNREADABLE: &str = "unreadable";

/// One digest over (relative name, content digest) pairs, sorted by name: what a key holds
/// for a data name. The stage that reads the files computes it again from what it read.
pub fn combine<'a>(entries: impl IntoIterator<Item = (&'a str, &'a str)>) -> String {
    let mut v: Vec<(&str, &str)> = entries.into_iter().collect();
    v.sort();
    v.dedup();
    let mut h = Sha256::new();
    for (rel, d) in v {
        h.update(rel.as_bytes());
        h.update([0]);
        h.update(d.as_bytes());
        h.update([b'\n']);
    }
    hex::encode(h.finalize())
}

/// The content digest of `p` as it is now, without the memo: [`UNREADABLE`] when it cannot
/// be read or is not a regular file after following links (a FIFO would block the reader
/// forever, /dev/zero never ends).
pub fn digest_now(p: &Path) -> String {
    match fs::metadata(p) {
        Ok(m) if m.is_file() => hash_file(p).unwrap_or_else(|_| UNREADABLE.to_string()),
        _ => UNREADABLE.to_string(),
    }
}

pub struct FileDigests {
    path: PathBuf,
    memo: BTreeMap<String, Entry>,
    rehash: bool,
    dirty: bool,
}

#[cfg(unix)]
fn change_stamp(meta: &fs::Metadata) -> (i128, u64) {
    use std::os::unix::fs::MetadataExt;
    (meta.ctime() as i128 * 1_000_000_000 + meta.ctime_nsec() as i128, meta.ino())
}

#[cfg(not(unix))]
fn change_stamp(_meta: &fs::Metadata) -> (i128, u64) {
    (0, 0)
}

impl FileDigests {
    pub fn load(store: &Store, rehash: bool) -> FileDigests {
        let path = store.root.join("file-digests.json");
        // Never follows a link nor opens a FIFO in its place: the memo is only a speed-up.
        let memo = super::store::read_regular(&path).ok().flatten().and_then(|b| serde_json::from_slice(&b).ok()).unwrap_or_default();
        FileDigests { path, memo, rehash, dirty: false }
    }

    fn file(&mut self, p: &Path) -> StoreResult<String> {
        let meta = fs::metadata(p).map_err(|source| StoreError::Io { path: p.to_path_buf(), source })?;
        // Only regular files are opened (after following links): a FIFO would block forever
        // and a device such as /dev/zero never ends. The reading stage refuses them too.
        if !meta.is_file() {
            return Err(StoreError::Io { path: p.to_path_buf(), source: std::io::Error::other("is not a regular file") });
        }
        let mtime_ns = meta.modified().ok().and_then(|t| t.duration_since(UNIX_EPOCH).ok()).map(|d| d.as_nanos()).unwrap_or(0);
        let (ctime_ns, ino) = change_stamp(&meta);
        let key = fs::canonicalize(p).unwrap_or_else(|_| p.to_path_buf()).to_string_lossy().into_owned();
        if !self.rehash
            && let Some(e) = self.memo.get(&key)
            && e.size == meta.len()
            && e.mtime_ns == mtime_ns
            && e.ctime_ns == ctime_ns
            && e.ino == ino
        {
            return Ok(e.digest.clone());
        }
        let digest = hash_file(p)?;
        self.memo.insert(key, Entry { size: meta.len(), mtime_ns, ctime_ns, ino, digest: digest.clone() });
        self.dirty = true;
        Ok(digest)
    }

    /// Digest of exactly the listed files ([`combine`] of each relative name and content
    /// digest). A file that cannot be read counts as [`UNREADABLE`]: whether that is an error
    /// is the reading stage's business (`on_error: skip`).
    pub fn digest_files(&mut self, files: &[(String, PathBuf)]) -> String {
        let digests: Vec<(String, String)> =
            files.iter().map(|(rel, p)| (rel.clone(), self.file(p).unwrap_or_else(|_| UNREADABLE.to_string()))).collect();
        combine(digests.iter().map(|(a, b)| (a.as_str(), b.as_str())))
    }

    /// Saves the memo (atomically) if it changed.
    pub fn save(&self, store: &Store) {
        if self.dirty
            && let Ok(bytes) = serde_json::to_vec(&self.memo)
        {
            let _ = store.write_atomic(&self.path, &bytes);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_rewrite_keeping_size_and_mtime_is_rehashed() {
        let d = tempfile::tempdir().unwrap();
        let store = Store::open(&d.path().join("cache")).unwrap();
        let f = d.path().join("a.png");
        fs::write(&f, b"aaaa").unwrap();
        let mtime = fs::metadata(&f).unwrap().modified().unwrap();
        let files = vec![("a.png".to_string(), f.clone())];
        let mut fd = FileDigests::load(&store, false);
        let before = fd.digest_files(&files);
        std::thread::sleep(std::time::Duration::from_millis(20));
        fs::write(&f, b"bbbb").unwrap();
        fs::File::options().write(true).open(&f).unwrap().set_modified(mtime).unwrap();
        assert_ne!(fd.digest_files(&files), before);
    }

    #[test]
    fn unreadable_files_and_order() {
        let d = tempfile::tempdir().unwrap();
        let store = Store::open(&d.path().join("cache")).unwrap();
        fs::write(d.path().join("a"), b"x").unwrap();
        let mut fd = FileDigests::load(&store, false);
        let a = ("a".to_string(), d.path().join("a"));
        let gone = ("b".to_string(), d.path().join("missing"));
        let x = fd.digest_files(&[a.clone(), gone.clone()]);
        assert_eq!(x, fd.digest_files(&[gone, a.clone()]));
        assert_eq!(x, combine([("a", hash_file(&a.1).unwrap().as_str()), ("b", UNREADABLE)]));
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn fifos_and_devices_are_unreadable_not_opened() {
        let d = tempfile::tempdir().unwrap();
        let store = Store::open(&d.path().join("cache")).unwrap();
        let fifo = d.path().join("x_40.tif");
        assert!(std::process::Command::new("mkfifo").arg(&fifo).status().unwrap().success());
        let zero = d.path().join("z.tif");
        std::os::unix::fs::symlink("/dev/zero", &zero).unwrap();
        let mut fd = FileDigests::load(&store, false);
        // Would block (FIFO) or never end (/dev/zero) if opened.
        let got = fd.digest_files(&[("f".into(), fifo), ("z".into(), zero), ("dev".into(), "/dev/zero".into())]);
        assert_eq!(got, combine([("f", UNREADABLE), ("z", UNREADABLE), ("dev", UNREADABLE)]));
        for p in [d.path().join("x_40.tif"), d.path().join("z.tif")] {
            assert_eq!(digest_now(&p), UNREADABLE);
        }
    }
}
