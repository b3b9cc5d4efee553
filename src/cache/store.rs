//! The content-addressed store and its action records.
//!
//! Layout under the cache root:
//! ```text
//! objects/ab/cdef…     output files, named by SHA-256 of their bytes; written once, read-only
//! actions/<key>.json   one record per cache key: output digests, metrics, provenance
//! names/<pipeline>/<h>.json  the key inputs of the last run of each instance label (for "why")
//! locks/<key>.lock     per-key file locks so concurrent runs compute each key once
//! logs/<key>.log       each run's stage log
//! tmp/                 scratch space; everything is written here first, then renamed
//! ```
//! Every write is atomic: a temporary file in `tmp/`, fsync, rename. A record is written
//! only after all its objects exist, so after a crash an entry is either whole or absent.
//! Objects are checked cheaply on lookup (size and mtime against the record) and fully
//! (SHA-256) when read or when `verify` runs; a mismatch deletes the object so the stage reruns.

use std::collections::BTreeMap;
use std::fs;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::time::UNIX_EPOCH;

use serde::{Deserialize, Serialize};
use serde_json::Value as Json;
use sha2::{Digest, Sha256};

use super::key::CacheKey;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("object {digest} is corrupt (its bytes hash to {actual}); it was removed")]
    Corrupt { digest: String, actual: String },
    #[error("object {0} is missing")]
    Missing(String),
}

pub type StoreResult<T> = Result<T, StoreError>;

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> StoreError + '_ {
    move |source| StoreError::Io { path: path.to_path_buf(), source }
}

/// Where an output lives, with what a cheap check compares.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ObjectRef {
    pub digest: String,
    pub size: u64,
    /// mtime of the object file in ns when it was recorded: a changed mtime triggers a rehash.
    pub mtime_ns: u128,
}

/// Written last, after every output object exists.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ActionRecord {
    pub key: String,
    pub label: String,
    pub kind: String,
    pub key_inputs: CacheKey,
    pub outputs: BTreeMap<String, ObjectRef>,
    pub metrics: Json,
    pub duration_s: f64,
    pub camflow_version: String,
    pub backend: String,
    pub bitwise_deterministic: bool,
    /// Seconds since the Unix epoch when the record was written.
    pub created: u64,
}

impl ActionRecord {
    /// The digest downstream keys see: a hash over output names and object digests.
    pub fn output_digest(&self) -> String {
        let m: BTreeMap<&String, &String> = self.outputs.iter().map(|(k, v)| (k, &v.digest)).collect();
        super::key::sha256_hex(&serde_json::to_vec(&m).expect("serialises"))
    }
}

/// Result of looking a key up.
#[derive(Debug, Clone)]
pub enum Lookup {
    Fresh(Box<ActionRecord>),
    Missing,
    Corrupt(String),
}

#[derive(Debug, Clone)]
pub struct Store {
    pub root: PathBuf,
}

fn mtime_ns(meta: &fs::Metadata) -> u128 {
    meta.modified().ok().and_then(|t| t.duration_since(UNIX_EPOCH).ok()).map(|d| d.as_nanos()).unwrap_or(0)
}

pub fn hash_file(path: &Path) -> StoreResult<String> {
    let mut f = fs::File::open(path).map_err(io(path))?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 16];
    loop {
        let n = f.read(&mut buf).map_err(io(path))?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(hex::encode(h.finalize()))
}

impl Store {
    pub fn open(root: &Path) -> StoreResult<Store> {
        for d in ["objects", "actions", "names", "locks", "logs", "tmp"] {
            let p = root.join(d);
            fs::create_dir_all(&p).map_err(io(&p))?;
        }
        Ok(Store { root: root.to_path_buf() })
    }

    pub fn object_path(&self, digest: &str) -> PathBuf {
        self.root.join("objects").join(&digest[..2.min(digest.len())]).join(&digest[2.min(digest.len())..])
    }

    pub fn record_path(&self, key: &str) -> PathBuf {
        self.root.join("actions").join(format!("{key}.json"))
    }

    pub fn tmp_dir(&self) -> PathBuf {
        self.root.join("tmp")
    }

    /// Writes `bytes` to `dest` atomically (tmp file in the cache, fsync, rename).
    pub fn write_atomic(&self, dest: &Path, bytes: &[u8]) -> StoreResult<()> {
        let tmpdir = self.tmp_dir();
        let mut tmp = tempfile::NamedTempFile::new_in(&tmpdir).map_err(io(&tmpdir))?;
        tmp.write_all(bytes).map_err(io(dest))?;
        tmp.as_file().sync_all().map_err(io(dest))?;
        if let Some(parent) = dest.parent() {
            fs::create_dir_all(parent).map_err(io(parent))?;
        }
        tmp.persist(dest).map_err(|e| StoreError::Io { path: dest.to_path_buf(), source: e.error })?;
        Ok(())
    }

    /// Moves a finished output file into the store; returns its reference. An object that
    /// already exists is never written again.
    pub fn put_file(&self, src: &Path) -> StoreResult<ObjectRef> {
        let digest = hash_file(src)?;
        let dest = self.object_path(&digest);
        if !dest.exists() {
            let f = fs::File::open(src).map_err(io(src))?;
            f.sync_all().map_err(io(src))?;
            let mut perm = f.metadata().map_err(io(src))?.permissions();
            perm.set_readonly(true);
            fs::set_permissions(src, perm).map_err(io(src))?;
            if let Some(parent) = dest.parent() {
                fs::create_dir_all(parent).map_err(io(parent))?;
            }
            // src lives in the cache's tmp/, on the same filesystem: rename is atomic.
            fs::rename(src, &dest).map_err(io(&dest))?;
        }
        let meta = fs::metadata(&dest).map_err(io(&dest))?;
        Ok(ObjectRef { digest, size: meta.len(), mtime_ns: mtime_ns(&meta) })
    }

    /// Path of a verified object: its bytes are hashed; a mismatch removes it.
    pub fn verified_object(&self, r: &ObjectRef) -> StoreResult<PathBuf> {
        let p = self.object_path(&r.digest);
        if !p.exists() {
            return Err(StoreError::Missing(r.digest.clone()));
        }
        let actual = hash_file(&p)?;
        if actual != r.digest {
            let _ = fs::remove_file(&p);
            return Err(StoreError::Corrupt { digest: r.digest.clone(), actual });
        }
        Ok(p)
    }

    /// Cheap check of one object: exists, same size and mtime as recorded; else rehash.
    fn check_object(&self, r: &ObjectRef, full: bool) -> Result<(), String> {
        let p = self.object_path(&r.digest);
        let meta = fs::metadata(&p).map_err(|_| format!("object {} is missing", short(&r.digest)))?;
        if !full && meta.len() == r.size && mtime_ns(&meta) == r.mtime_ns {
            return Ok(());
        }
        match self.verified_object(r) {
            Ok(_) => Ok(()),
            Err(e) => Err(e.to_string()),
        }
    }

    pub fn read_record(&self, key: &str) -> Option<Result<ActionRecord, String>> {
        let p = self.record_path(key);
        let bytes = fs::read(&p).ok()?;
        Some(serde_json::from_slice(&bytes).map_err(|e| format!("record {} is unreadable: {e}", p.display())))
    }

    /// Looks a key up. `full` hashes every object instead of trusting size and mtime.
    pub fn lookup(&self, key: &str, full: bool) -> Lookup {
        match self.read_record(key) {
            None => Lookup::Missing,
            Some(Err(e)) => Lookup::Corrupt(e),
            Some(Ok(rec)) => {
                for r in rec.outputs.values() {
                    if let Err(e) = self.check_object(r, full) {
                        return Lookup::Corrupt(e);
                    }
                }
                Lookup::Fresh(Box::new(rec))
            }
        }
    }

    pub fn write_record(&self, rec: &ActionRecord) -> StoreResult<()> {
        let bytes = serde_json::to_vec_pretty(rec).expect("record serialises");
        self.write_atomic(&self.record_path(&rec.key), &bytes)
    }

    /// Removes a record so that an interrupted rerun can never look fresh.
    pub fn invalidate(&self, key: &str) {
        let _ = fs::remove_file(self.record_path(key));
    }

    pub fn sidecar_path(&self, pipeline: &str, label: &str) -> PathBuf {
        let h = super::key::sha256_hex(label.as_bytes());
        self.root.join("names").join(sanitize(pipeline)).join(format!("{}.json", &h[..32]))
    }

    /// The key inputs of the last run of `label` in `pipeline`.
    pub fn read_sidecar(&self, pipeline: &str, label: &str) -> Option<Sidecar> {
        let bytes = fs::read(self.sidecar_path(pipeline, label)).ok()?;
        serde_json::from_slice(&bytes).ok()
    }

    pub fn write_sidecar(&self, pipeline: &str, s: &Sidecar) -> StoreResult<()> {
        let bytes = serde_json::to_vec_pretty(s).expect("sidecar serialises");
        self.write_atomic(&self.sidecar_path(pipeline, &s.label), &bytes)
    }

    pub fn log_path(&self, key: &str) -> PathBuf {
        self.root.join("logs").join(format!("{key}.log"))
    }

    /// Every record in the store.
    pub fn records(&self) -> Vec<(PathBuf, Result<ActionRecord, String>)> {
        let dir = self.root.join("actions");
        let mut out = Vec::new();
        if let Ok(rd) = fs::read_dir(&dir) {
            let mut paths: Vec<PathBuf> =
                rd.filter_map(|e| e.ok().map(|e| e.path())).filter(|p| p.extension().is_some_and(|e| e == "json")).collect();
            paths.sort();
            for p in paths {
                let r = fs::read(&p).map_err(|e| e.to_string()).and_then(|b| serde_json::from_slice(&b).map_err(|e| e.to_string()));
                out.push((p, r));
            }
        }
        out
    }

    /// Every object file: (digest, path, size).
    pub fn objects(&self) -> Vec<(String, PathBuf, u64)> {
        let mut out = Vec::new();
        let dir = self.root.join("objects");
        if let Ok(rd) = fs::read_dir(&dir) {
            for sub in rd.filter_map(|e| e.ok()) {
                let prefix = sub.file_name().to_string_lossy().into_owned();
                if let Ok(rd2) = fs::read_dir(sub.path()) {
                    for f in rd2.filter_map(|e| e.ok()) {
                        let size = f.metadata().map(|m| m.len()).unwrap_or(0);
                        out.push((format!("{prefix}{}", f.file_name().to_string_lossy()), f.path(), size));
                    }
                }
            }
        }
        out.sort();
        out
    }
}

/// Key inputs of the last run of one instance label, kept to explain why it is stale.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Sidecar {
    pub label: String,
    pub key: String,
    pub key_inputs: CacheKey,
}

pub fn short(d: &str) -> &str {
    &d[..12.min(d.len())]
}

fn sanitize(s: &str) -> String {
    s.chars().map(|c| if c.is_ascii_alphanumeric() || c == '-' || c == '_' { c } else { '_' }).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_read_back_exactly() {
        // Floats must survive the JSON round trip bit for bit, or a key read back from its
        // record would hash differently and a lock file written after a no-op run would differ.
        let d = tempfile::tempdir().unwrap();
        let s = Store::open(d.path()).unwrap();
        let params: BTreeMap<String, Json> = [("lr", 0.002), ("value", 0.7), ("x", 35.0 / 71.0), ("y", 0.9833746898263028)]
            .into_iter()
            .map(|(k, v)| (k.to_string(), Json::from(v)))
            .collect();
        let key_inputs = CacheKey {
            format: 1,
            kind: "k".into(),
            kind_version: 1,
            params: params.clone(),
            inputs: BTreeMap::new(),
            files: BTreeMap::new(),
            seed: 1,
            backend: None,
        };
        let rec = ActionRecord {
            key: key_inputs.digest(),
            label: "k".into(),
            kind: "k".into(),
            key_inputs,
            outputs: BTreeMap::new(),
            metrics: Json::Object(params.into_iter().collect()),
            duration_s: 0.1,
            camflow_version: "0".into(),
            backend: "cpu".into(),
            bitwise_deterministic: true,
            created: 0,
        };
        s.write_record(&rec).unwrap();
        let back = s.read_record(&rec.key).unwrap().unwrap();
        assert_eq!(back, rec);
        assert_eq!(back.key_inputs.digest(), rec.key);
    }

    #[test]
    fn objects_are_written_once_and_verified() {
        let d = tempfile::tempdir().unwrap();
        let s = Store::open(d.path()).unwrap();
        let src = s.tmp_dir().join("a");
        fs::write(&src, b"hello").unwrap();
        let r = s.put_file(&src).unwrap();
        assert_eq!(r.digest, super::super::key::sha256_hex(b"hello"));
        assert!(s.verified_object(&r).is_ok());
        // Flip a byte: the next verified read reports and removes it.
        let p = s.object_path(&r.digest);
        let mut perm = fs::metadata(&p).unwrap().permissions();
        #[allow(clippy::permissions_set_readonly_false)]
        perm.set_readonly(false);
        fs::set_permissions(&p, perm).unwrap();
        fs::write(&p, b"jello").unwrap();
        assert!(matches!(s.verified_object(&r), Err(StoreError::Corrupt { .. })));
        assert!(!p.exists());
    }
}
