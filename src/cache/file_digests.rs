//! Content digests of data outside the cache (dataset folders and files), remembered by
//! (path, size, mtime) so a large dataset is not re-hashed on every run. `--rehash` ignores
//! the memo. The memo is only a speed-up: losing it costs time, never correctness.

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
    digest: String,
}

pub struct FileDigests {
    path: PathBuf,
    memo: BTreeMap<String, Entry>,
    rehash: bool,
    dirty: bool,
}

impl FileDigests {
    pub fn load(store: &Store, rehash: bool) -> FileDigests {
        let path = store.root.join("file-digests.json");
        let memo = fs::read(&path).ok().and_then(|b| serde_json::from_slice(&b).ok()).unwrap_or_default();
        FileDigests { path, memo, rehash, dirty: false }
    }

    fn file(&mut self, p: &Path) -> StoreResult<String> {
        let meta = fs::metadata(p).map_err(|source| StoreError::Io { path: p.to_path_buf(), source })?;
        let mtime_ns = meta.modified().ok().and_then(|t| t.duration_since(UNIX_EPOCH).ok()).map(|d| d.as_nanos()).unwrap_or(0);
        let key = fs::canonicalize(p).unwrap_or_else(|_| p.to_path_buf()).to_string_lossy().into_owned();
        if !self.rehash
            && let Some(e) = self.memo.get(&key)
            && e.size == meta.len()
            && e.mtime_ns == mtime_ns
        {
            return Ok(e.digest.clone());
        }
        let digest = hash_file(p)?;
        self.memo.insert(key, Entry { size: meta.len(), mtime_ns, digest: digest.clone() });
        self.dirty = true;
        Ok(digest)
    }

    /// Digest of a file's contents, or of a folder tree: each file's relative path and
    /// content digest, sorted. Paths outside the tree never enter it.
    pub fn digest(&mut self, p: &Path) -> StoreResult<String> {
        if p.is_file() {
            return self.file(p);
        }
        if !p.is_dir() {
            return Err(StoreError::Io {
                path: p.to_path_buf(),
                source: std::io::Error::new(std::io::ErrorKind::NotFound, "no such file or folder"),
            });
        }
        let mut files = Vec::new();
        walk(p, &mut files).map_err(|source| StoreError::Io { path: p.to_path_buf(), source })?;
        files.sort();
        let mut h = Sha256::new();
        for f in files {
            let rel = f.strip_prefix(p).unwrap_or(&f).to_string_lossy().replace('\\', "/");
            let d = self.file(&f)?;
            h.update(rel.as_bytes());
            h.update([0]);
            h.update(d.as_bytes());
            h.update([b'\n']);
        }
        Ok(hex::encode(h.finalize()))
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

fn walk(dir: &Path, out: &mut Vec<PathBuf>) -> std::io::Result<()> {
    for e in fs::read_dir(dir)? {
        let p = e?.path();
        if p.is_dir() {
            walk(&p, out)?;
        } else {
            out.push(p);
        }
    }
    Ok(())
}
