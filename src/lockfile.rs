//! `<pipeline>.lock.yaml`: what a run produced, per instance, so a colleague holding the
//! spec and its lock can check they get the same result (`run --locked`, `diff`).
//!
//! Entries are named by the label of *each* instance of the spec, never by the label stored
//! in a cache record: two instances that share a key (two stages doing the same work) share a
//! record, and the lock must not depend on which of them happened to compute it.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use serde_json::Value as Json;

use crate::cache::verified::Stamp;
use crate::host::{self, Process};
use crate::cache::{ActionRecord, CacheKey, Store};

/// A kind's `key_params`: what of a params map its key holds.
pub type Keyed<'a> = dyn Fn(&BTreeMap<String, Json>) -> BTreeMap<String, Json> + 'a;

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct LockFile {
    pub pipeline: String,
    /// The pipeline seed: in every key, and the default of every seed a stage uses (absent in
    /// older lock files). Recorded so that `--locked` names a changed seed as the cause.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seed: Option<u64>,
    pub camflow_version: String,
    pub backend: String,
    /// Whether the backend gives the same bytes run after run (CPU: yes; CUDA: not promised).
    pub bitwise_deterministic: bool,
    #[serde(deserialize_with = "unique_labels")]
    pub instances: BTreeMap<String, LockedInstance>,
}

/// The entries of a lock by label, refusing a label given twice: read into a map, the last
/// one would silently win, and a lock edited or merged by hand could hide an entry that way.
fn unique_labels<'de, D: serde::Deserializer<'de>>(d: D) -> Result<BTreeMap<String, LockedInstance>, D::Error> {
    struct Visit;
    impl<'de> serde::de::Visitor<'de> for Visit {
        type Value = BTreeMap<String, LockedInstance>;
        fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("a map from instance label to its entry")
        }
        fn visit_map<A: serde::de::MapAccess<'de>>(self, mut m: A) -> Result<Self::Value, A::Error> {
            let mut out = BTreeMap::new();
            while let Some(label) = m.next_key::<String>()? {
                let entry: LockedInstance = m.next_value()?;
                if out.insert(label.clone(), entry).is_some() {
                    return Err(serde::de::Error::custom(format!(
                        "instance `{label}` has two entries in `instances` (a lock names each instance once: it was edited or \
                         merged by hand; keep one, or run without --locked to write a new lock)"
                    )));
                }
            }
            Ok(out)
        }
    }
    d.deserialize_map(Visit)
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct LockedInstance {
    pub key: String,
    pub kind: String,
    /// The kind's implementation version in the key (absent in older lock files).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kind_version: Option<u32>,
    /// The instance's resolved params, location params (a data folder) included for people,
    /// although those are not in the key.
    pub params: BTreeMap<String, Json>,
    pub inputs: BTreeMap<String, String>,
    /// Content digests of external data by name, as in the key.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub data: BTreeMap<String, String>,
    /// Numeric backend class in the key (backend-dependent kinds only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub numeric: Option<String>,
    pub outputs: BTreeMap<String, String>,
    pub metrics: Json,
    pub camflow_version: String,
    pub backend: String,
}

/// What the lock's fingerprint needs of one instance: its own label and params, and its key.
pub struct LockItem<'a> {
    pub label: &'a str,
    pub params: &'a BTreeMap<String, Json>,
    pub key: &'a str,
}

/// What a lock file says besides its entries.
pub struct LockHeader<'a> {
    pub pipeline: &'a str,
    pub seed: u64,
    pub backend: &'a str,
    pub deterministic: bool,
}

/// The file in `names/<pipeline>/` that says which lock file has which fingerprint.
pub const LOCK_STATE_FILE: &str = "lock-state";

/// "The lock file at `path`, while it has `stamp`, holds the lock whose inputs hash to
/// `fingerprint`."
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct LockState {
    format: u32,
    path: String,
    fingerprint: String,
    stamp: Stamp,
    settled: bool,
}

/// The lock state of `pipeline`: never read through a linked `names/<pipeline>` folder, never
/// through a link nor from a FIFO; anything unexpected is simply no state.
fn read_state(store: &Store, pipeline: &str) -> Option<LockState> {
    let p = store.readable_names_dir(pipeline)?.join(LOCK_STATE_FILE);
    let b = crate::cache::store::read_regular(&p).ok()??;
    serde_json::from_slice::<LockState>(&b).ok().filter(|s| s.format == 1 && s.stamp.usable())
}

fn canonical(path: &Path) -> Option<String> {
    std::fs::canonicalize(path).ok().map(|p| p.to_string_lossy().into_owned())
}

/// The stamp of the regular file at `path` (a link is not followed: it never matches).
fn file_stamp(path: &Path) -> Option<Stamp> {
    std::fs::symlink_metadata(path).ok().filter(|m| m.is_file()).map(|m| Stamp::of(&m))
}

/// A digest of everything [`LockFile::from_run`] builds the lock from, or `None` when a
/// record's content is not known by its digest. Params shared by instances (one `Arc` per
/// sweep point) are hashed once.
fn fingerprint(store: &Store, h: &LockHeader<'_>, entries: &[LockItem<'_>]) -> Option<String> {
    use sha2::{Digest, Sha256};
    struct HashWriter<'a>(&'a mut Sha256);
    impl std::io::Write for HashWriter<'_> {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.update(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let mut hasher = Sha256::new();
    let field = |hs: &mut Sha256, b: &[u8]| {
        hs.update((b.len() as u64).to_le_bytes());
        hs.update(b);
    };
    let seed = h.seed.to_string();
    for part in ["camflow-lock-fingerprint 2", env!("CARGO_PKG_VERSION"), h.pipeline, &seed, h.backend, if h.deterministic { "1" } else { "0" }] {
        field(&mut hasher, part.as_bytes());
    }
    let mut params_digests: std::collections::HashMap<usize, Vec<u8>> = std::collections::HashMap::new();
    for e in entries {
        let record_digest = store.fresh_record_digest(e.key)?;
        let params = match params_digests.entry(e.params as *const _ as usize) {
            std::collections::hash_map::Entry::Occupied(o) => o.into_mut(),
            std::collections::hash_map::Entry::Vacant(v) => {
                let mut ph = Sha256::new();
                serde_json::to_writer(HashWriter(&mut ph), e.params).ok()?;
                v.insert(ph.finalize().to_vec())
            }
        };
        for part in [e.label.as_bytes(), e.key.as_bytes(), record_digest.as_bytes(), params.as_slice()] {
            field(&mut hasher, part);
        }
    }
    Some(hex::encode(hasher.finalize()))
}

const TMP_SUFFIX: &str = ".tmp";
/// How old a lock's temporary file must be before any writer removes it (its own writer
/// being alive or on another host): no lock takes an hour to write.
pub const TMP_GRACE: std::time::Duration = std::time::Duration::from_secs(3600);

/// The middle of this process's temporary names, `<host>.<boot>.<pid>-<start>`: what
/// [`clean_stale_tmp`] needs to tell whether their writer is alive ([`crate::host::Process`]).
fn tmp_writer(me: &Process) -> String {
    format!("{}.{}.{}-{}", host::segment(&me.host, "unknown"), me.boot_token(), me.pid, me.pid_start)
}

/// Removes the temporary files of lock `name` in `dir` that their writer left behind: older
/// than `grace`, or written by a process of this host (same host name, boot and pid namespace)
/// that is gone, a kill -9 during the write; a pid reused since is another process. Returns
/// how many it removed. Anything else in the folder is left alone, and so is a young file of a
/// writer that cannot be judged from here (another host or container, or an older camflow's
/// `<host>.<pid>.<random>` name).
pub fn clean_stale_tmp(dir: &Path, name: &str, grace: std::time::Duration) -> usize {
    let Ok(rd) = std::fs::read_dir(dir) else { return 0 };
    let prefix = format!(".{name}.");
    let (me, now) = (Process::me(), std::time::SystemTime::now());
    let (my_host, my_boot) = (host::segment(&me.host, "unknown"), me.boot_token());
    let mut removed = 0;
    for e in rd.flatten() {
        let file = e.file_name().to_string_lossy().into_owned();
        let Some(middle) = file.strip_prefix(&prefix).and_then(|r| r.strip_suffix(TMP_SUFFIX)) else { continue };
        let fields: Vec<&str> = middle.split('.').collect();
        // `<host>.<boot>.<pid>-<start>.<random>`, or an older camflow's `<host>.<pid>.<random>`.
        let writer = match fields.as_slice() {
            [h, boot, pid_start, _random] => {
                let Some((pid, start)) = pid_start.split_once('-') else { continue };
                let (Ok(pid), Ok(pid_start)) = (pid.parse::<u32>(), start.parse::<u64>()) else { continue };
                (*h == my_host && *boot == my_boot).then(|| Process { pid, pid_start, ..me.clone() })
            }
            [_h, pid, _random] if pid.parse::<u32>().is_ok() => None,
            _ => continue,
        };
        let Ok(meta) = e.path().symlink_metadata() else { continue };
        if !meta.is_file() {
            continue;
        }
        let old = meta.modified().ok().and_then(|m| now.duration_since(m).ok()).is_some_and(|age| age >= grace);
        let dead = writer.is_some_and(|w| w.alive_seen_from(&me) == Some(false));
        if (old || dead) && std::fs::remove_file(e.path()).is_ok() {
            removed += 1;
        }
    }
    removed
}

/// The lock file beside `pipeline`: `paper.yaml` -> `paper.lock.yaml`.
pub fn path_for(pipeline: &Path) -> PathBuf {
    let stem = pipeline.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_else(|| "pipeline".into());
    pipeline.with_file_name(format!("{stem}.lock.yaml"))
}

/// Whether a run of the spec `spec` (pipeline `name`) may write its lock at `lock`: refused
/// when another spec file beside it has the same lock (`P.yml` and `P.yaml` both lock to
/// `P.lock.yaml`; each run would overwrite the other's lock), or when the lock there names
/// another pipeline. Checked before anything runs; the error says what to do.
pub fn check_lock_target(spec: &Path, name: &str, lock: &Path) -> Result<(), String> {
    let dir = spec.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let own = spec.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    if let Some(stem) = spec.file_stem().map(|s| s.to_string_lossy().into_owned()) {
        for ext in ["yaml", "yml"] {
            let other = format!("{stem}.{ext}");
            // Same folder, same stem: the same lock file, however the spec's path was written
            // (`p.yml` and `./p.yaml` name one lock but compare unequal as paths).
            if other != own && dir.join(&other).is_file() {
                return Err(format!(
                    "{}: both {own} and {other} would write this lock file, each overwriting the other's; rename one of \
                     them (a lock is named after its spec file without the extension)",
                    lock.display()
                ));
            }
        }
    }
    let owner = lock_pipeline(lock);
    match owner {
        Some(o) if o != name => Err(format!(
            "{}: holds the lock of pipeline `{o}`, and {} is pipeline `{name}`: refusing to overwrite it. If the pipeline \
             was renamed, move or delete the old lock file; if it belongs to another spec file, give the specs different \
             file names",
            lock.display(),
            spec.display()
        )),
        _ => Ok(()),
    }
}

/// The `pipeline:` of the lock file at `path` (a regular file), from its head only: camflow
/// writes it first, and parsing a lock of 10,000 instances on every run would cost more than
/// the run of a cached study.
fn lock_pipeline(path: &Path) -> Option<String> {
    use std::io::Read;
    if !std::fs::symlink_metadata(path).ok()?.is_file() {
        return None;
    }
    let mut head = Vec::new();
    std::fs::File::open(path).ok()?.take(64 * 1024).read_to_end(&mut head).ok()?;
    let head = String::from_utf8_lossy(&head);
    let line = head.lines().find(|l| l.starts_with("pipeline:"))?;
    serde_yaml::from_str::<BTreeMap<String, String>>(line).ok()?.remove("pipeline")
}

/// One instance of a run, as the lock sees it: its own label and params, and the record of
/// its key (possibly written by another instance with the same key).
pub struct RunEntry<'a> {
    pub label: &'a str,
    pub params: &'a BTreeMap<String, Json>,
    pub record: &'a ActionRecord,
}

fn short(d: &str) -> &str {
    cut(d, 12)
}

/// The first `n` characters of `d` (all of it if shorter): a digest read from an edited lock
/// may hold any text, so never a byte index that could fall inside a character.
fn cut(d: &str, n: usize) -> &str {
    d.char_indices().nth(n).map_or(d, |(i, _)| &d[..i])
}

/// Two digests cut to as many characters as show where they differ (at least 12): cut to a
/// fixed length, digests that differ only further on would read as equal.
fn distinct<'a>(a: &'a str, b: &'a str) -> (&'a str, &'a str) {
    let common = a.chars().zip(b.chars()).take_while(|(x, y)| x == y).count();
    let n = (common + 4).max(12);
    (cut(a, n), cut(b, n))
}

fn output_digests(r: &ActionRecord) -> BTreeMap<String, String> {
    r.outputs.iter().map(|(k, v)| (k.clone(), v.digest.clone())).collect()
}

impl LockFile {
    pub fn from_run(h: &LockHeader<'_>, entries: &[RunEntry<'_>]) -> LockFile {
        let instances = entries
            .iter()
            .map(|e| {
                let r = e.record;
                (
                    e.label.to_string(),
                    LockedInstance {
                        key: r.key.clone(),
                        kind: r.kind.clone(),
                        kind_version: Some(r.key_inputs.kind_version),
                        params: e.params.clone(),
                        inputs: r.key_inputs.inputs.clone(),
                        data: r.key_inputs.files.clone(),
                        numeric: r.key_inputs.backend.clone(),
                        outputs: output_digests(r),
                        metrics: r.metrics.clone(),
                        camflow_version: r.camflow_version.clone(),
                        backend: r.backend.clone(),
                    },
                )
            })
            .collect();
        LockFile {
            pipeline: h.pipeline.into(),
            seed: Some(h.seed),
            camflow_version: env!("CARGO_PKG_VERSION").into(),
            backend: h.backend.into(),
            bitwise_deterministic: h.deterministic,
            instances,
        }
    }

    pub fn read(path: &Path) -> Result<LockFile, String> {
        let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
        serde_yaml::from_str(&text).map_err(|e| format!("{}: not a camflow lock file: {e}", path.display()))
    }

    /// Lock entries that none of `labels` (the instances the spec produces now) has: a sweep
    /// point or stage removed or renamed since the lock was written, or an entry added by
    /// hand. `run --locked` refuses them, since checking only what the spec still produces
    /// would pass a lock of which part was never reproduced.
    pub fn entries_not_in<'a>(&'a self, labels: &BTreeSet<&str>) -> Vec<&'a str> {
        self.instances.keys().map(String::as_str).filter(|l| !labels.contains(l)).collect()
    }

    pub fn write(&self, path: &Path) -> Result<(), String> {
        let text = serde_yaml::to_string(self).map_err(|e| e.to_string())?;
        self.write_text(path, &text)
    }

    /// Writes `text` (this lock, serialised) at `path`, atomically: a temporary file beside
    /// it, flushed to disk, renamed over it. The temporary file is in the user's pipeline
    /// folder, so it is named after the lock (`.P.lock.yaml.<host>.<boot>.<pid>-<start>.<random>.tmp`) and one
    /// left by a killed writer is removed by the next write (see [`clean_stale_tmp`]).
    fn write_text(&self, path: &Path, text: &str) -> Result<(), String> {
        let dir = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
        let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        clean_stale_tmp(dir, &name, TMP_GRACE);
        let prefix = format!(".{name}.{}.", tmp_writer(&Process::me()));
        let mut tmp = tempfile::Builder::new()
            .prefix(&prefix)
            .suffix(TMP_SUFFIX)
            .tempfile_in(dir)
            .map_err(|e| format!("{}: {e}", dir.display()))?;
        std::io::Write::write_all(&mut tmp, text.as_bytes()).map_err(|e| format!("{}: {e}", path.display()))?;
        // On disk before the rename: after a crash the lock is the old one or the new one,
        // never a renamed file whose blocks were not written yet.
        tmp.as_file().sync_all().map_err(|e| format!("{}: {e}", path.display()))?;
        // A lock file is shared like the spec: readable by all, as a normal file would be.
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            tmp.as_file().set_permissions(std::fs::Permissions::from_mode(0o644)).map_err(|e| format!("{}: {e}", path.display()))?;
        }
        tmp.persist(path).map_err(|e| format!("{}: {}", path.display(), e.error))?;
        // The rename itself, durable; a folder that cannot be opened or synced loses nothing
        // more than without this.
        if let Ok(d) = std::fs::File::open(dir) {
            let _ = d.sync_all();
        }
        Ok(())
    }

    /// Whether the lock file at `path` provably holds the lock of `items` (each instance's
    /// label, params and key; every key's record found fresh by this process), without
    /// building it.
    ///
    /// Why: on a no-op rerun of a large sweep, building and serialising the lock (7 MB of YAML
    /// at 10,000 instances) was a third of the time, to rewrite the same bytes. A fingerprint
    /// of everything the lock is made of (camflow version, pipeline, backend, and per entry its
    /// label, params, key and record digest) is compared with the one the cache keeps beside
    /// the stamp of the lock file it describes (`names/<pipeline>/lock-state`); an equal
    /// fingerprint and an unchanged file (size, mtime, ctime, inode, settled as in
    /// `cache::verified`) mean equal bytes. `false` whenever anything is not known.
    pub fn unchanged(store: &Store, path: &Path, header: &LockHeader<'_>, items: &[LockItem<'_>]) -> bool {
        let Some(fp) = fingerprint(store, header, items) else { return false };
        let Some(st) = read_state(store, header.pipeline) else { return false };
        st.settled
            && st.fingerprint == fp
            && file_stamp(path).is_some_and(|s| s == st.stamp)
            && canonical(path).as_deref() == Some(st.path.as_str())
    }

    /// Writes the lock of a run at `path` unless the file already holds exactly these bytes
    /// (see [`LockFile::unchanged`]; otherwise the YAML is built and compared with the file's
    /// bytes); returns whether it wrote. `computed_nothing`: every entry's record was found
    /// fresh by this process (nothing ran, nothing was reused from another process), so its
    /// record digest is known.
    pub fn write_for_run(
        store: &Store,
        path: &Path,
        header: &LockHeader<'_>,
        entries: &[RunEntry<'_>],
        computed_nothing: bool,
    ) -> Result<bool, String> {
        let items: Vec<LockItem<'_>> = entries.iter().map(|e| LockItem { label: e.label, params: e.params, key: &e.record.key }).collect();
        if computed_nothing && LockFile::unchanged(store, path, header, &items) {
            return Ok(false);
        }
        let lf = LockFile::from_run(header, entries);
        let text = serde_yaml::to_string(&lf).map_err(|e| e.to_string())?;
        let same = crate::cache::store::read_regular(path).ok().flatten().is_some_and(|b| b == text.as_bytes());
        if !same {
            lf.write_text(path, &text)?;
        }
        // Kept only once the file's stamp is settled; until then every run compares bytes.
        if computed_nothing
            && let (Some(fp), Some(stamp), Some(p)) = (fingerprint(store, header, &items), file_stamp(path), canonical(path))
            && stamp.settled(std::time::SystemTime::now())
        {
            let state_path = store.names_dir(header.pipeline).join(LOCK_STATE_FILE);
            let state = LockState { format: 1, path: p, fingerprint: fp, stamp, settled: true };
            if read_state(store, header.pipeline).as_ref() != Some(&state)
                && let Ok(bytes) = serde_json::to_vec(&state)
            {
                let _ = store.write_atomic(&state_path, &bytes);
            }
        }
        Ok(!same)
    }

    /// Whether `label` may run with `key` under this lock. `upstream` are the (label, record)
    /// of the instances it reads; their results are checked first, since an upstream output
    /// that differs from the lock is what changes this key.
    /// `keyed` is the instance's kind's `key_params`: what of a params map its key holds (a
    /// param the kind ignores, at its default), so that the lock's params are compared with
    /// the key as this camflow keys them.
    pub fn check(
        &self,
        label: &str,
        key: &CacheKey,
        params: &BTreeMap<String, Json>,
        keyed: &Keyed<'_>,
        upstream: &[(&str, &ActionRecord)],
    ) -> Result<(), String> {
        for (ul, rec) in upstream {
            self.check_result(ul, rec)?;
        }
        let digest = key.digest();
        match self.instances.get(label) {
            None => Err(format!("{label}: not in the lock file (the spec has changed since it was locked)")),
            Some(l) if l.key != digest => Err(format!(
                "{label}: cache key {} differs from the locked {} ({})",
                short(&digest),
                short(&l.key),
                key_cause(l, key, keyed)
            )),
            Some(l) => match entry_differs(l, key, params, keyed) {
                None => Ok(()),
                Some(why) => Err(format!(
                    "{label}: the lock entry's {why}, although its key matches: the lock file was edited (its fields no longer \
                     describe its key)"
                )),
            },
        }
    }

    /// The header fields this run determines (pipeline name, backend and whether it is
    /// bitwise deterministic), against the lock's: a lock that claims another backend or
    /// determinism than the run that checks it must not pass as reproduced.
    pub fn check_header(&self, h: &LockHeader<'_>) -> Result<(), String> {
        let mut why = Vec::new();
        if self.pipeline != h.pipeline {
            why.push(format!("`pipeline` is `{}`, this spec is named `{}`", self.pipeline, h.pipeline));
        }
        if let Some(seed) = self.seed
            && seed != h.seed
        {
            why.push(format!("`seed` is {seed}, this spec's pipeline seed is {} (every key and every default seed depends on it)", h.seed));
        }
        if self.backend != h.backend {
            why.push(format!("`backend` is `{}`, this run uses `{}`", self.backend, h.backend));
        }
        if self.bitwise_deterministic != h.deterministic {
            why.push(format!(
                "`bitwise_deterministic` is {}, backend `{}` is {}",
                self.bitwise_deterministic,
                h.backend,
                if h.deterministic { "bitwise deterministic" } else { "not bitwise deterministic" }
            ));
        }
        if why.is_empty() { Ok(()) } else { Err(format!("the lock's {}", why.join("; its "))) }
    }

    /// Whether the result of `label` (its record) equals the locked one: output digests, then
    /// metrics. A backend that is not bitwise deterministic is not held to output bytes.
    pub fn check_result(&self, label: &str, rec: &ActionRecord) -> Result<(), String> {
        let Some(l) = self.instances.get(label) else { return Ok(()) };
        if l.key != rec.key {
            // Reported by `check` with its cause.
            return Ok(());
        }
        if !(self.bitwise_deterministic && rec.bitwise_deterministic) {
            return Ok(());
        }
        let now = output_digests(rec);
        let names: BTreeSet<&String> = l.outputs.keys().chain(now.keys()).collect();
        for name in names {
            let (a, b) = (l.outputs.get(name), now.get(name));
            if a != b {
                let (locked, here) = match (a, b) {
                    (Some(a), Some(b)) => distinct(a, b),
                    (a, b) => (a.map_or("absent", |d| short(d)), b.map_or("absent", |d| short(d))),
                };
                return Err(format!("{label}: output `{name}` is {here} where the lock has {locked} (same key: {})", result_cause(l, rec)));
            }
        }
        if l.metrics != rec.metrics {
            let what = crate::lockfile::metric_changes(&l.metrics, &rec.metrics, 0.0)
                .into_iter()
                .take(3)
                .map(|c| c.to_string())
                .collect::<Vec<_>>()
                .join(", ");
            // Equal numbers and flags: only a warning's text differs.
            let what = if what.is_empty() { "a warning's message".to_string() } else { what };
            return Err(format!(
                "{label}: metrics differ from the lock ({what}) while the output bytes agree: the cache record or the lock file was edited"
            ));
        }
        Ok(())
    }
}

/// The first field of a lock entry that its key determines (kind, kind version, params in the
/// key, input and data digests, numeric class) and that differs from what this run computed;
/// `None` when all agree. Location params are not in the key and may differ.
fn entry_differs(l: &LockedInstance, key: &CacheKey, params: &BTreeMap<String, Json>, keyed: &Keyed<'_>) -> Option<String> {
    let show = |v: Option<&String>| v.map_or_else(|| "absent".to_string(), |d| format!("`{d}`"));
    if l.kind != key.kind {
        return Some(format!("`kind` is `{}`, the run computed `{}`", l.kind, key.kind));
    }
    if let Some(v) = l.kind_version
        && v != key.kind_version
    {
        return Some(format!("`kind_version` is {v}, the run computed {}", key.kind_version));
    }
    if let Some(n) = keyed_param_changes(l, key, keyed).into_iter().next() {
        let show = |v: Option<&Json>| v.map_or_else(|| "absent".to_string(), |v| v.to_string());
        return Some(format!("param `{n}` is {}, the run resolved {}", show(l.params.get(&n)), show(params.get(&n))));
    }
    for (what, locked, now) in [("inputs", &l.inputs, &key.inputs), ("data", &l.data, &key.files)] {
        let names: BTreeSet<&String> = locked.keys().chain(now.keys()).collect();
        if let Some(n) = names.into_iter().find(|n| locked.get(*n) != now.get(*n)) {
            return Some(format!("`{what}.{n}` is {}, the run computed {}", show(locked.get(n)), show(now.get(n))));
        }
    }
    if l.numeric != key.backend {
        return Some(format!("`numeric` is {}, the run computed {}", show(l.numeric.as_ref()), show(key.backend.as_ref())));
    }
    None
}

/// Why a key differs from the locked one, from what the lock remembers of its inputs.
/// The params whose keyed value differs between the lock's entry and this run's key: the
/// lock's params as this camflow keys them (`keyed`) against the key's. A location param, or
/// one the kind ignores, may differ in the lock without counting.
fn keyed_param_changes(l: &LockedInstance, key: &CacheKey, keyed: &Keyed<'_>) -> Vec<String> {
    let locked = keyed(&l.params);
    let names: BTreeSet<&String> = locked.keys().chain(key.params.keys()).collect();
    names.into_iter().filter(|n| locked.get(*n) != key.params.get(*n)).cloned().collect()
}

fn key_cause(l: &LockedInstance, key: &CacheKey, keyed: &Keyed<'_>) -> String {
    let mut why = Vec::new();
    if l.kind != key.kind {
        why.push(format!("kind {} -> {}", l.kind, key.kind));
    } else if let Some(v) = l.kind_version
        && v != key.kind_version
    {
        why.push(format!("kind version differs: locked v{v}, this camflow v{}", key.kind_version));
    }
    // Location params are not in the key, and params the kind ignores are keyed at their
    // defaults: a change of them alone changes nothing.
    let changed = keyed_param_changes(l, key, keyed);
    if !changed.is_empty() {
        why.push(format!("params differ: {}", changed.join(", ")));
    }
    let inputs: Vec<&String> = l.inputs.keys().chain(key.inputs.keys()).filter(|n| l.inputs.get(*n) != key.inputs.get(*n)).collect();
    if !inputs.is_empty() {
        let mut v: Vec<String> = inputs.into_iter().map(|s| format!("`{s}`")).collect();
        v.dedup();
        why.push(format!("input {} differs (an upstream result changed)", v.join(", ")));
    }
    let data: Vec<&String> = l.data.keys().chain(key.files.keys()).filter(|n| l.data.get(*n) != key.files.get(*n)).collect();
    if !data.is_empty() {
        let mut v: Vec<String> = data.into_iter().map(|s| format!("`{s}`")).collect();
        v.dedup();
        why.push(format!("data digest of {} differs: the data's contents are not the locked ones", v.join(", ")));
    }
    if l.numeric.is_some() && l.numeric != key.backend {
        why.push(format!(
            "numeric backend differs: locked {}, here {} (another backend, or one built with other kernels: \
             `camflow --version` names this build's)",
            l.numeric.as_deref().unwrap_or("none"),
            key.backend.as_deref().unwrap_or("none")
        ));
    }
    if why.is_empty() {
        format!(
            "nothing the lock records about the inputs differs as this camflow keys them: the lock's key was edited, the \
             lock was written by a camflow that computes keys otherwise (locked by {}, this is {}; for one, camflow now keys \
             the params an architecture or a data source ignores at their defaults), or the pipeline seed differs (a lock \
             from before camflow recorded it)",
            l.camflow_version,
            env!("CARGO_PKG_VERSION")
        )
    } else {
        why.join("; ")
    }
}

/// The likely cause of equal keys giving other bytes.
fn result_cause(l: &LockedInstance, rec: &ActionRecord) -> String {
    if l.backend != rec.backend {
        format!("the backend differs: locked `{}`, here `{}`", l.backend, rec.backend)
    } else if l.camflow_version != rec.camflow_version {
        format!(
            "camflow differs (locked {}, here {}): a change of the kind that did not bump its version, or the numeric profile",
            l.camflow_version, rec.camflow_version
        )
    } else {
        // Same camflow, backend and key: a deterministic backend gives these bytes on any CPU
        // of the key's numeric class, so an edited lock comes first.
        format!(
            "the lock file's digest was edited, or this machine computed other bytes with backend `{}` and the same camflow \
             (a cache object altered outside camflow: `camflow verify`; or a non-deterministic stage: a bug to report)",
            rec.backend
        )
    }
}

/// One metric that differs between two results.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct MetricChange {
    /// Dotted path in the metrics object, e.g. `test.positive`.
    pub metric: String,
    pub old: Json,
    pub new: Json,
    /// `new - old` where both are numbers.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub delta: Option<f64>,
}

impl std::fmt::Display for MetricChange {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let show = |v: &Json| if v.is_null() { "null".to_string() } else { v.to_string() };
        write!(f, "{} {} -> {}", self.metric, show(&self.old), show(&self.new))
    }
}

/// Leaf values by path: `test.positive`, `epochs[3].loss`. Lists are walked item by item so
/// that each number in them is compared within the tolerance (a training's per-epoch losses on
/// another backend). A `warnings` list counts its flags (`warnings.label-leak: 1`): a message
/// repeats numbers that are metrics of their own, with fewer digits, and would otherwise
/// diverge on text where the numbers are within the tolerance.
fn flatten(prefix: &str, v: &Json, out: &mut BTreeMap<String, Json>) {
    let join = |k: &str| if prefix.is_empty() { k.to_string() } else { format!("{prefix}.{k}") };
    match v {
        Json::Object(m) => {
            for (k, x) in m {
                match (k.as_str(), x) {
                    ("warnings", Json::Array(ws)) if ws.iter().all(|w| w.get("flag").is_some_and(Json::is_string)) => {
                        // By flag, counted: two `single-class` warnings becoming one is a change.
                        for w in ws {
                            let flag = w["flag"].as_str().unwrap_or_default();
                            let n = out.entry(format!("{}.{flag}", join(k))).or_insert(Json::from(0u64));
                            *n = Json::from(n.as_u64().unwrap_or(0) + 1);
                        }
                    }
                    _ => flatten(&join(k), x, out),
                }
            }
        }
        Json::Array(xs) if !xs.is_empty() => {
            for (i, x) in xs.iter().enumerate() {
                flatten(&format!("{prefix}[{i}]"), x, out);
            }
        }
        other => {
            out.insert(prefix.to_string(), other.clone());
        }
    }
}

/// Leaf metrics that differ: numbers by more than `tol` (absolute), anything else when not
/// equal (a number against null diverges whatever the tolerance).
pub fn metric_changes(old: &Json, new: &Json, tol: f64) -> Vec<MetricChange> {
    let (mut a, mut b) = (BTreeMap::new(), BTreeMap::new());
    flatten("", old, &mut a);
    flatten("", new, &mut b);
    let names: BTreeSet<&String> = a.keys().chain(b.keys()).collect();
    let mut out = Vec::new();
    for n in names {
        let (x, y) = (a.get(n).cloned().unwrap_or(Json::Null), b.get(n).cloned().unwrap_or(Json::Null));
        let change = match (x.as_f64(), y.as_f64()) {
            (Some(p), Some(q)) => ((q - p).abs() > tol || (p.is_nan() != q.is_nan())).then_some(Some(q - p)),
            _ => (x != y).then_some(None),
        };
        if let Some(delta) = change {
            out.push(MetricChange { metric: n.clone(), old: x, new: y, delta });
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn numbers_in_lists_and_warning_messages_are_compared_within_the_tolerance() {
        let warn = |acc: &str| json!([{"flag": "label-leak", "message": format!("scores test accuracy {acc} against 0.488")}]);
        let a = json!({"epochs": [{"loss": 0.6966003550598953}, {"loss": 0.5}], "warnings": warn("0.929"), "w": []});
        let b = json!({"epochs": [{"loss": 0.6966003550598954}, {"loss": 0.5}], "warnings": warn("0.930"), "w": []});
        assert!(metric_changes(&a, &b, 1e-3).is_empty(), "{:?}", metric_changes(&a, &b, 1e-3));
        let c = metric_changes(&a, &b, 0.0);
        assert_eq!(c.iter().map(|c| c.metric.as_str()).collect::<Vec<_>>(), ["epochs[0].loss"]);
        // A third epoch, a flag gone and a loss beyond the tolerance all count.
        let d = json!({"epochs": [{"loss": 0.7}, {"loss": 0.5}, {"loss": 0.4}], "warnings": [], "w": []});
        let names: Vec<String> = metric_changes(&a, &d, 1e-3).into_iter().map(|c| c.metric).collect();
        assert_eq!(names, ["epochs[0].loss", "epochs[2].loss", "warnings.label-leak"]);
    }

    #[test]
    fn metric_changes_respect_the_tolerance() {
        let a = json!({"accuracy": 0.78, "test": {"positive": 3}, "auc": null, "note": "x"});
        let b = json!({"accuracy": 0.7805, "test": {"positive": 4}, "auc": 0.5, "note": "x"});
        let c = metric_changes(&a, &b, 1e-3);
        let names: Vec<&str> = c.iter().map(|c| c.metric.as_str()).collect();
        assert_eq!(names, ["auc", "test.positive"]);
        assert_eq!(c[1].to_string(), "test.positive 3 -> 4");
        assert_eq!(metric_changes(&a, &b, 0.0).len(), 3);
        assert!(metric_changes(&a, &a, 0.0).is_empty());
    }

    #[test]
    fn a_lock_is_written_through_a_named_temporary_file_and_stale_ones_are_removed() {
        let d = tempfile::tempdir().unwrap();
        let path = d.path().join("p.lock.yaml");
        let me = Process::me();
        let writer = |p: &Process| format!(".p.lock.yaml.{}.abc123.tmp", tmp_writer(p));
        // A writer killed mid-write on this host (no such pid), one whose pid was reused since
        // (this pid, another start time), one of a live process (this one, young), one of
        // another container on this host (young: cannot be judged), one of another host
        // (young), one of another host an hour old, an older camflow's name of a pid that is
        // gone (young: kept), and files that are not a lock's temporary files.
        let dead = writer(&Process { pid: u32::MAX - 1, ..me.clone() });
        let reused = writer(&Process { pid_start: me.pid_start + 7, ..me.clone() });
        let live = writer(&me);
        let container = writer(&Process { boot: format!("{}-other-ns", me.boot), pid: u32::MAX - 1, ..me.clone() });
        let remote = ".p.lock.yaml.elsewhere.0123456789ab.12-5.abc123.tmp".to_string();
        let remote_old = ".p.lock.yaml.elsewhere.0123456789ab.13-5.abc123.tmp".to_string();
        let legacy = format!(".p.lock.yaml.{}.{}.abc123.tmp", host::segment(&me.host, "unknown"), u32::MAX - 1);
        let others = [".q.lock.yaml.x.1.a.tmp", "p.lock.yaml.tmp", ".tmpABC", "notes.txt", ".p.lock.yaml.a.b.c.d.e.tmp"];
        for f in [&dead, &reused, &live, &container, &remote, &remote_old, &legacy].into_iter().map(String::as_str).chain(others) {
            std::fs::write(d.path().join(f), "partial").unwrap();
        }
        let hour_ago = std::time::SystemTime::now() - TMP_GRACE - std::time::Duration::from_secs(5);
        std::fs::File::options().write(true).open(d.path().join(&remote_old)).unwrap().set_modified(hour_ago).unwrap();
        let lock = LockFile::from_run(&LockHeader { pipeline: "p", seed: 1, backend: "cpu", deterministic: true }, &[]);
        lock.write(&path).unwrap();
        let mut left: Vec<String> = std::fs::read_dir(d.path()).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
        left.sort();
        let mut expected: Vec<String> =
            [live, container, remote, legacy.clone(), "p.lock.yaml".into()].into_iter().chain(others.map(String::from)).collect();
        expected.sort();
        assert_eq!(left, expected);
        assert_eq!(LockFile::read(&path).unwrap(), lock);
        // The writer's own temporary name: recognisable as this lock's, with its writer.
        let tmp = tempfile::Builder::new().prefix(&format!(".p.lock.yaml.{}.", tmp_writer(&me))).suffix(TMP_SUFFIX).tempfile_in(d.path()).unwrap();
        let n = tmp.path().file_name().unwrap().to_string_lossy().into_owned();
        drop(tmp);
        std::fs::write(d.path().join(&n), "x").unwrap();
        // With no grace, every temporary file of this lock counts: the live, container, remote
        // and legacy ones, and the writer's own; nothing else.
        assert_eq!(clean_stale_tmp(d.path(), "p.lock.yaml", std::time::Duration::ZERO), 5, "{n}: any age counts with no grace");
        assert!(!d.path().join(&legacy).exists());
    }

    #[test]
    fn digests_are_shown_far_enough_to_differ() {
        let a = format!("9b7d394bbce2{}", "0".repeat(52));
        let b = format!("9b7d394bbce2ab{}", "1".repeat(50));
        let (x, y) = distinct(&a, &b);
        assert_ne!(x, y);
        assert_eq!((x, y), ("9b7d394bbce20000", "9b7d394bbce2ab11"));
        assert_eq!(distinct("abcdef0123456789", "bbcdef0123456789"), ("abcdef012345", "bbcdef012345"));
        assert_eq!(distinct("abc", "abd"), ("abc", "abd"));
        // An edited lock's "digest" may hold any text: cut by characters, never mid-character.
        assert_eq!(distinct("ééééééééééééééé", "éééééééééééééééx"), ("ééééééééééééééé", "éééééééééééééééx"));
        assert_eq!(short("日本語のダイジェストです、長い"), "日本語のダイジェストです");
    }
}
