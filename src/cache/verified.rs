//! What this cache already knows about its records, so that a no-op rerun of a large sweep
//! does not check thousands of records from scratch.
//!
//! Checking a record means parsing its JSON into a tree, serialising that tree again and
//! hashing it (`record_digest`); on a no-op rerun of 10,000 instances that was the largest
//! part of the time. Two layers skip it, each only where something cheaper proves the record
//! unchanged:
//!
//! - **The stamp index**, on disk (`records-index`, like git's index): for each record
//!   checked before, the `(size, mtime, ctime, inode)` of its file and its `record_digest`.
//!   A record whose file has exactly that stamp now is the file that was checked: it is parsed
//!   straight into its struct, and the checks that guard paths (key = file name, plain output
//!   names, digest-shaped object names) still run. Anything else (another stamp, no entry, an
//!   index that is damaged or of another format) falls back to the full check. ctime cannot
//!   be set by a user: a rewrite in place, a `touch -d`, a `cp --preserve` or a rename all
//!   change it. A record is only entered when its ctime is at least [`SETTLED`] older than
//!   the check, so that a rewrite within the same timestamp tick (coarse on Linux) cannot
//!   keep the stamp of the content that was checked ("racy git").
//! - **The memo**, in memory for one process: records found fresh (objects included) by key.
//!   Instances that share a key (the same work reached from several sweep points) are looked
//!   up once. Writing or removing a record forgets its entry.
//!
//! Both are only speed-ups: losing the index costs time, never correctness, and it is written
//! atomically, only when it changed, with a digest of its own content that is checked when it
//! is read. `verify` and `run --verify` never use either.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use super::store::{ActionRecord, Store, is_digest};

/// How much older than its check a record's ctime must be before its stamp is trusted.
pub const SETTLED: Duration = Duration::from_secs(2);

const HEADER: &str = "camflow-records-index 1";
pub const INDEX_FILE: &str = "records-index";

/// What identifies one version of a file without reading it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Stamp {
    pub size: u64,
    pub mtime_ns: i128,
    pub ctime_ns: i128,
    pub ino: u64,
}

impl Stamp {
    #[cfg(unix)]
    pub fn of(meta: &std::fs::Metadata) -> Stamp {
        use std::os::unix::fs::MetadataExt;
        Stamp {
            size: meta.len(),
            mtime_ns: meta.mtime() as i128 * 1_000_000_000 + meta.mtime_nsec() as i128,
            ctime_ns: meta.ctime() as i128 * 1_000_000_000 + meta.ctime_nsec() as i128,
            ino: meta.ino(),
        }
    }

    /// Without ctime and inode a stamp proves nothing: the index is not used.
    #[cfg(not(unix))]
    pub fn of(_meta: &std::fs::Metadata) -> Stamp {
        Stamp { size: 0, mtime_ns: 0, ctime_ns: 0, ino: 0 }
    }

    pub fn usable(&self) -> bool {
        cfg!(unix) && self.ino != 0
    }

    /// Whether the file's last change is far enough in the past (see [`SETTLED`]).
    pub fn settled(&self, now: SystemTime) -> bool {
        let now_ns = now.duration_since(UNIX_EPOCH).map(|d| d.as_nanos() as i128).unwrap_or(0);
        now_ns - self.ctime_ns >= SETTLED.as_nanos() as i128
    }
}

#[derive(Debug, Clone, PartialEq)]
struct IndexEntry {
    stamp: Stamp,
    record_digest: String,
}

/// A record this process found fresh, with what is asked of it most.
struct Fresh {
    /// A copy of the record, kept only for callers that ask again for the whole record (the
    /// executor); a planner needs only the digests, and copying thousands of records cost more
    /// than reading them again through the index would.
    rec: Option<ActionRecord>,
    record_digest: String,
    output_digest: String,
}

#[derive(Default)]
struct State {
    /// Loaded on first use; `None` until then.
    index: Option<HashMap<String, IndexEntry>>,
    dirty: bool,
    /// Records found fresh by this process.
    memo: HashMap<String, Fresh>,
}

/// The two layers, shared by every clone of a [`Store`]; the index is saved when the last
/// clone goes (see [`Drop`]).
pub struct Verified {
    path: PathBuf,
    state: Mutex<State>,
}

impl std::fmt::Debug for Verified {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Verified").field("path", &self.path).finish_non_exhaustive()
    }
}

impl Verified {
    pub fn new(root: &Path) -> Verified {
        Verified { path: root.join(INDEX_FILE), state: Mutex::new(State::default()) }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // A panic elsewhere while holding it leaves plain data: still usable.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn with_index<T>(&self, f: impl FnOnce(&mut HashMap<String, IndexEntry>, &mut bool) -> T) -> T {
        let mut st = self.lock();
        let st = &mut *st;
        let index = st.index.get_or_insert_with(|| read_index(&self.path));
        f(index, &mut st.dirty)
    }

    /// The `record_digest` the index holds for `key` if its file still has `stamp`.
    pub fn indexed_digest(&self, key: &str, stamp: &Stamp) -> Option<String> {
        if !stamp.usable() {
            return None;
        }
        self.with_index(|idx, _| idx.get(key).filter(|e| e.stamp == *stamp).map(|e| e.record_digest.clone()))
    }

    /// Notes that the record of `key`, whose file has `stamp`, was fully checked and has
    /// `record_digest`.
    pub fn checked(&self, key: &str, stamp: &Stamp, record_digest: &str) {
        if !stamp.usable() {
            return;
        }
        let settled = stamp.settled(SystemTime::now());
        self.with_index(|idx, dirty| {
            let entry = IndexEntry { stamp: *stamp, record_digest: record_digest.to_string() };
            if !settled {
                // Too young to be trusted by its stamp: any older entry is dropped.
                *dirty |= idx.remove(key).is_some();
            } else if idx.get(key) != Some(&entry) {
                idx.insert(key.to_string(), entry);
                *dirty = true;
            }
        })
    }

    /// Drops what is known of `key` (its record was found missing, corrupt, or was written
    /// or removed by this process).
    pub fn forget(&self, key: &str) {
        let mut st = self.lock();
        st.memo.remove(key);
        if let Some(idx) = &mut st.index
            && idx.remove(key).is_some()
        {
            st.dirty = true;
        }
    }

    pub fn memo_get(&self, key: &str) -> Option<ActionRecord> {
        self.lock().memo.get(key).and_then(|f| f.rec.clone())
    }

    /// Remembers `rec` as fresh; with a copy of it when `keep_copy`.
    pub fn memo_put(&self, rec: &ActionRecord, record_digest: &str, keep_copy: bool) {
        let fresh =
            Fresh { rec: keep_copy.then(|| rec.clone()), record_digest: record_digest.to_string(), output_digest: rec.output_digest() };
        self.lock().memo.insert(rec.key.clone(), fresh);
    }

    /// The `record_digest` of `key` if this process found its record fresh.
    pub fn memo_digest(&self, key: &str) -> Option<String> {
        self.lock().memo.get(key).map(|f| f.record_digest.clone())
    }

    /// The output digest of `key`'s record if this process found it fresh.
    pub fn memo_output_digest(&self, key: &str) -> Option<String> {
        self.lock().memo.get(key).map(|f| f.output_digest.clone())
    }

    /// Writes the index (atomically) if it changed. Errors are ignored: it is a speed-up.
    pub fn save(&self, store: &Store) {
        let mut st = self.lock();
        if !st.dirty {
            return;
        }
        let Some(idx) = &st.index else { return };
        if store.write_atomic(&self.path, &encode(idx)).is_ok() {
            st.dirty = false;
        }
    }
}

/// `HEADER`, one `key digest size mtime ctime ino` line per entry (sorted, so equal indexes
/// are equal bytes), then `end <sha256 of everything before>`.
fn encode(idx: &HashMap<String, IndexEntry>) -> Vec<u8> {
    let mut keys: Vec<&String> = idx.keys().collect();
    keys.sort();
    let mut s = String::with_capacity(64 + idx.len() * 180);
    s.push_str(HEADER);
    s.push('\n');
    for k in keys {
        let e = &idx[k];
        let t = &e.stamp;
        s.push_str(&format!("{k} {} {} {} {} {}\n", e.record_digest, t.size, t.mtime_ns, t.ctime_ns, t.ino));
    }
    let digest = super::key::sha256_hex(s.as_bytes());
    s.push_str(&format!("end {digest}\n"));
    s.into_bytes()
}

/// The index in `bytes`, or `None` if anything about it is off (then it is not used at all).
fn decode(bytes: &[u8]) -> Option<HashMap<String, IndexEntry>> {
    let text = std::str::from_utf8(bytes).ok()?;
    let body_end = text.strip_suffix('\n')?.rfind('\n')? + 1;
    let (body, trailer) = text.split_at(body_end);
    let stated = trailer.strip_prefix("end ")?.strip_suffix('\n')?;
    if super::key::sha256_hex(body.as_bytes()) != stated {
        return None;
    }
    let mut lines = body.lines();
    if lines.next()? != HEADER {
        return None;
    }
    let mut idx = HashMap::new();
    for line in lines {
        let f: Vec<&str> = line.split(' ').collect();
        let [key, digest, size, mtime, ctime, ino] = f[..] else { return None };
        if !is_digest(key) || !is_digest(digest) {
            return None;
        }
        let stamp =
            Stamp { size: size.parse().ok()?, mtime_ns: mtime.parse().ok()?, ctime_ns: ctime.parse().ok()?, ino: ino.parse().ok()? };
        idx.insert(key.to_string(), IndexEntry { stamp, record_digest: digest.to_string() });
    }
    Some(idx)
}

fn read_index(path: &Path) -> HashMap<String, IndexEntry> {
    // Never follows a link nor opens a FIFO in its place.
    super::store::read_regular(path).ok().flatten().and_then(|b| decode(&b)).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cache::Lookup;

    fn entry(n: u64) -> IndexEntry {
        IndexEntry {
            stamp: Stamp { size: n, mtime_ns: -5, ctime_ns: 1_700_000_000_123_456_789, ino: 42 + n },
            record_digest: "d".repeat(64),
        }
    }

    #[test]
    fn the_index_reads_back_and_refuses_any_damage() {
        let idx: HashMap<String, IndexEntry> = [("a".repeat(64), entry(1)), ("b".repeat(64), entry(2))].into_iter().collect();
        let bytes = encode(&idx);
        assert_eq!(decode(&bytes), Some(idx.clone()));
        assert_eq!(decode(&encode(&HashMap::new())), Some(HashMap::new()));
        // Any changed byte, a missing trailer, another header or a bad line: not used at all.
        let text = String::from_utf8(bytes.clone()).unwrap();
        for i in 0..bytes.len() {
            let mut b = bytes.clone();
            b[i] ^= 1;
            assert_eq!(decode(&b), None, "byte {i} flipped");
        }
        assert_eq!(decode(&bytes[..bytes.len() - 1]), None);
        let body = text[..text.rfind("end ").unwrap()].to_string();
        assert_eq!(decode(body.as_bytes()), None);
        let reseal = |body: &str| format!("{body}end {}\n", super::super::key::sha256_hex(body.as_bytes()));
        assert!(decode(reseal(&body).as_bytes()).is_some());
        assert_eq!(decode(reseal(&body.replace(" 1\n", " 2\n")).as_bytes()), None, "another format version");
        assert_eq!(decode(reseal(&format!("{body}../../x {} 1 1 1 1\n", "d".repeat(64))).as_bytes()), None, "a key that is not a digest");
        assert_eq!(decode(reseal(&format!("{body}{} {} 1 1 x 1\n", "c".repeat(64), "d".repeat(64))).as_bytes()), None);
    }

    /// A record with one output, written to a fresh cache; and its `record_digest`.
    fn stored_record(s: &Store) -> (ActionRecord, String) {
        let src = s.tmp_dir().join("out");
        std::fs::write(&src, b"output bytes").unwrap();
        let o = s.put_file(&src).unwrap();
        let key_inputs = super::super::CacheKey {
            format: 1,
            kind: "k".into(),
            kind_version: 1,
            params: Default::default(),
            inputs: Default::default(),
            files: Default::default(),
            seed: 1,
            backend: None,
        };
        let rec = ActionRecord {
            key: key_inputs.digest(),
            label: "k".into(),
            kind: "k".into(),
            key_inputs,
            outputs: [("out".to_string(), o)].into_iter().collect(),
            metrics: serde_json::json!({"accuracy": 0.75}),
            duration_s: 0.1,
            camflow_version: "0".into(),
            backend: "cpu".into(),
            bitwise_deterministic: true,
            created: 0,
        };
        s.write_record(&rec).unwrap();
        s.try_lookup(&rec.key, true).unwrap();
        let v: serde_json::Value = serde_json::from_slice(&std::fs::read(s.record_path(&rec.key).unwrap()).unwrap()).unwrap();
        let digest = v[super::super::store::RECORD_DIGEST_FIELD].as_str().unwrap().to_string();
        (rec, digest)
    }

    /// Enters `key` in the store's index as checked with `digest`, with its file's stamp now.
    fn vouch(s: &Store, key: &str, digest: &str) {
        let stamp = Stamp::of(&std::fs::symlink_metadata(s.record_path(key).unwrap()).unwrap());
        s.verified().with_index(|idx, dirty| {
            idx.insert(key.to_string(), IndexEntry { stamp, record_digest: digest.to_string() });
            *dirty = true;
        });
    }

    #[cfg(unix)]
    #[test]
    fn the_index_vouches_only_for_the_file_it_saw_and_never_for_a_full_check() {
        let d = tempfile::tempdir().unwrap();
        let (rec, digest) = stored_record(&Store::open(d.path()).unwrap());
        let path = Store::open(d.path()).unwrap().record_path(&rec.key).unwrap();
        // An entry for the file as it is: used (its stated digest is taken, not recomputed),
        // and saved when the last handle goes.
        let s = Store::open(d.path()).unwrap();
        vouch(&s, &rec.key, &"0".repeat(64));
        drop(s);
        let s = Store::open(d.path()).unwrap();
        assert!(matches!(s.try_lookup_once(&rec.key, false), Ok(Lookup::Fresh(_))));
        assert_eq!(s.fresh_record_digest(&rec.key), Some("0".repeat(64)), "trusted by its stamp");
        drop(s);
        // The same bytes written again: a new ctime, so the full check runs (and finds the
        // true digest); a record this young is not entered again.
        let bytes = std::fs::read(&path).unwrap();
        std::fs::write(&path, &bytes).unwrap();
        let s = Store::open(d.path()).unwrap();
        assert!(matches!(s.try_lookup_once(&rec.key, false), Ok(Lookup::Fresh(_))));
        assert_eq!(s.fresh_record_digest(&rec.key), Some(digest.clone()));
        assert_eq!(s.verified().indexed_digest(&rec.key, &Stamp::of(&std::fs::metadata(&path).unwrap())), None);
        drop(s);
        // An edited record that the index vouches for: a plain lookup takes the index's word,
        // `--verify` (full), `verify` (`load_record`) and the executor's full look never do.
        let text = String::from_utf8(bytes).unwrap();
        std::fs::write(&path, text.replace("0.75", "0.25")).unwrap();
        let s = Store::open(d.path()).unwrap();
        vouch(&s, &rec.key, &digest);
        assert!(matches!(s.try_lookup(&rec.key, true), Ok(Lookup::Corrupt(m)) if m.contains("edited or damaged")));
        assert!(s.load_record(&rec.key).is_err());
        vouch(&s, &rec.key, &digest);
        match s.try_lookup(&rec.key, false) {
            Ok(Lookup::Fresh(r)) => assert_eq!(r.metrics["accuracy"], 0.25),
            other => panic!("{other:?}"),
        }
        // Names that would become paths are checked whatever the index says.
        std::fs::write(&path, text.replace("\"out\"", "\"../out\"")).unwrap();
        let s = Store::open(d.path()).unwrap();
        vouch(&s, &rec.key, &digest);
        assert!(matches!(s.try_lookup(&rec.key, false), Ok(Lookup::Corrupt(m)) if m.contains("not a plain file name")));
        // A missing object is found whatever the index says.
        std::fs::write(&path, &text).unwrap();
        let s = Store::open(d.path()).unwrap();
        vouch(&s, &rec.key, &digest);
        let obj = s.object_path(&rec.outputs["out"].digest).unwrap();
        std::fs::remove_file(obj).unwrap();
        assert!(matches!(s.try_lookup(&rec.key, false), Ok(Lookup::Corrupt(m)) if m.contains("missing")));
    }

    #[test]
    fn only_settled_records_are_entered() {
        let d = tempfile::tempdir().unwrap();
        let v = Verified::new(d.path());
        let now_ns = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_nanos() as i128;
        let young = Stamp { size: 1, mtime_ns: now_ns, ctime_ns: now_ns, ino: 7 };
        let old = Stamp { ctime_ns: now_ns - 3_000_000_000, ..young };
        let (k, dg) = ("a".repeat(64), "d".repeat(64));
        v.checked(&k, &young, &dg);
        assert_eq!(v.indexed_digest(&k, &young), None);
        v.checked(&k, &old, &dg);
        assert_eq!(v.indexed_digest(&k, &old), Some(dg.clone()));
        assert_eq!(v.indexed_digest(&k, &Stamp { ino: 8, ..old }), None, "another inode");
        assert_eq!(v.indexed_digest(&k, &Stamp { ctime_ns: old.ctime_ns + 1, ..old }), None, "changed since");
        // Checked again while young (rewritten just now): the old entry goes.
        v.checked(&k, &young, &dg);
        assert_eq!(v.indexed_digest(&k, &old), None);
    }
}
