//! The content-addressed store and its action records.
//!
//! Layout under the cache root:
//! ```text
//! objects/ab/cdef…     output files, named by SHA-256 of their bytes; written once, read-only
//! actions/<key>.json   one record per cache key: output digests, metrics, provenance
//! names/<pipeline>/<h>.json  the key inputs of the last run of each instance label (for "why")
//! locks/<key>.lock     per-key file locks so concurrent runs compute each key once
//! locks/cache.lock     the cache-wide lock: `run`/`verify` hold it shared, `gc` exclusive
//! logs/<key>.log       each run's stage log
//! tmp/                 scratch space; everything is written here first, then renamed
//! ```
//! Every write is atomic: a temporary file in `tmp/`, fsync, then a new name. Objects and
//! records are published with `link()`, which never replaces: an object is never rewritten
//! (a reader on another NFS client would get ESTALE), and a record is first-writer-wins
//! ([`Store::publish_record`]); only a `--force`d rerun replaces a record, by rename. A record
//! is written only after all its objects exist, so after a crash an entry is either whole or
//! absent. Scratch folders may live on node-local storage ([`Store::scratch_base`]); their
//! outputs are copied into `tmp/` before they are published, so an object is never partial.
//!
//! NFS silly-rename files (`.nfs…`: a file deleted while a client still had it open) may
//! appear in any folder; nothing here reports, lists or deletes them.
//! Objects are checked cheaply on lookup (size and mtime against the record) and fully
//! (SHA-256) when read or when `verify` runs; a mismatch deletes the object so the stage reruns.
//!
//! Records are checked like objects: each carries `record_digest`, the SHA-256 of its own
//! canonical JSON (compact, keys sorted, without that field). A record whose content does not
//! hash to it (an edited metric, a damaged file) is corrupt, exactly like an object whose bytes
//! do not hash to its name.
//!
//! Nothing read from the cache is trusted to build a path: a key or an object digest must be
//! 64 lowercase hex digits before it is joined to the cache root (a record saying
//! `xx/tmp/victim.txt` must never make camflow read or delete `/tmp/victim.txt`), and symbolic
//! links inside the cache are never followed.
//!
//! Files are created with mode 0666 and directories 0777, less the umask, so a cache shared by
//! a group (umask 002, setgid folder) stays usable by all its members; objects are then made
//! read-only for everyone.

use std::collections::BTreeMap;
use std::fs;
use std::io::{ErrorKind, Read, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use serde_json::Value as Json;
use sha2::{Digest, Sha256};

use super::key::CacheKey;
use super::lease::is_nfs_silly;
use super::verified::{Stamp, Verified};

/// How long `gc` and a starting `run` leave alone an entry of `tmp/`, or an object no record
/// references yet, that no lock says is abandoned: it may belong to a process that does not
/// take the cache lock (an older camflow, another host on a filesystem without `flock`).
pub const GRACE: Duration = Duration::from_secs(3600);

/// The field of a record file that holds the digest of the rest of the record.
pub const RECORD_DIGEST_FIELD: &str = "record_digest";

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("object {digest} is corrupt (its bytes hash to {actual}); it was removed")]
    Corrupt { digest: String, actual: String },
    #[error("object {0} is missing")]
    Missing(String),
    #[error("object {0} is not a regular file (links are never followed)")]
    NotAFile(String),
    #[error("{what} {name} is not a SHA-256 digest (64 lowercase hex digits); it is never used as a path")]
    BadName { what: &'static str, name: String },
}

pub type StoreResult<T> = Result<T, StoreError>;

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> StoreError + '_ {
    move |source| StoreError::Io { path: path.to_path_buf(), source }
}

/// True for a name the cache may turn into a path: 64 lowercase hex digits, as every key and
/// object digest is.
pub fn is_digest(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// True for an output name a record may hold: a plain file name (outputs are materialised
/// under their names, so `../x`, `a/b`, `\\`, NUL or an empty name could reach outside).
pub fn is_output_name(s: &str) -> bool {
    !s.is_empty() && s != "." && s != ".." && !s.contains("..") && !s.contains(['/', '\\', '\0'])
}

/// Reads a file of the cache that must be a regular file: a link is never followed and a
/// FIFO or device never opened (it would block or never end). `Ok(None)` when absent; a
/// folder is an I/O error (EISDIR); anything else that is not a file is `Err(Ok(what))`.
pub(crate) fn read_regular(p: &Path) -> Result<Option<Vec<u8>>, Result<&'static str, std::io::Error>> {
    match fs::symlink_metadata(p) {
        Err(e) if e.kind() == ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(Err(e)),
        Ok(m) if m.file_type().is_symlink() => return Err(Ok("is a symbolic link (never followed)")),
        Ok(m) if m.is_dir() => return Err(Err(std::io::Error::new(ErrorKind::IsADirectory, "is a folder, not a file"))),
        Ok(m) if !m.is_file() => return Err(Ok("is not a regular file (a FIFO, socket or device; never opened)")),
        Ok(_) => {}
    }
    match fs::read(p) {
        Ok(b) => Ok(Some(b)),
        Err(e) if e.kind() == ErrorKind::NotFound => Ok(None),
        Err(e) => Err(Err(e)),
    }
}

/// [`read_regular`], with the stamp of the file that was read (taken from the open file, so
/// it belongs to the bytes read even if the path is replaced meanwhile).
pub(crate) fn read_regular_stamped(p: &Path) -> Result<Option<(Vec<u8>, Stamp)>, Result<&'static str, std::io::Error>> {
    match fs::symlink_metadata(p) {
        Err(e) if e.kind() == ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(Err(e)),
        Ok(m) if m.file_type().is_symlink() => return Err(Ok("is a symbolic link (never followed)")),
        Ok(m) if m.is_dir() => return Err(Err(std::io::Error::new(ErrorKind::IsADirectory, "is a folder, not a file"))),
        Ok(m) if !m.is_file() => return Err(Ok("is not a regular file (a FIFO, socket or device; never opened)")),
        Ok(_) => {}
    }
    let mut opts = fs::OpenOptions::new();
    opts.read(true);
    // Replaced by a link or a FIFO since the check above: refused, never followed or waited on.
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    std::os::unix::fs::OpenOptionsExt::custom_flags(&mut opts, libc::O_NOFOLLOW | libc::O_NONBLOCK);
    let mut f = match opts.open(p) {
        Ok(f) => f,
        Err(e) if e.kind() == ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(Err(e)),
    };
    let meta = f.metadata().map_err(Err)?;
    if !meta.is_file() {
        return Err(Ok("is not a regular file (a FIFO, socket or device; never opened)"));
    }
    let mut bytes = Vec::with_capacity(meta.len() as usize + 1);
    f.read_to_end(&mut bytes).map_err(Err)?;
    Ok(Some((bytes, Stamp::of(&meta))))
}

/// `Ok` when `p` is a real folder or absent; an error naming it when it is a link or a file
/// (through a link, the cache would create, read or delete files outside its folder).
fn real_dir_or_absent(p: &Path) -> StoreResult<bool> {
    match fs::symlink_metadata(p) {
        Ok(m) if m.is_dir() => Ok(true),
        Ok(m) => Err(StoreError::Io {
            path: p.to_path_buf(),
            source: std::io::Error::other(if m.file_type().is_symlink() {
                "is a symbolic link where the cache needs a real folder (links in the cache are never followed); remove it"
            } else {
                "is not a folder; the cache needs a folder here"
            }),
        }),
        Err(e) if e.kind() == ErrorKind::NotFound => Ok(false),
        Err(e) => Err(StoreError::Io { path: p.to_path_buf(), source: e }),
    }
}

/// `s` when it is a digest, else the error naming it (quoted, shortened: it came from disk).
fn checked<'a>(what: &'static str, s: &'a str) -> StoreResult<&'a str> {
    if is_digest(s) {
        return Ok(s);
    }
    let shown: String = s.chars().take(80).collect();
    Err(StoreError::BadName { what, name: format!("{shown:?}") })
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

/// The digest of a record's canonical content: its JSON without [`RECORD_DIGEST_FIELD`],
/// compact, object keys sorted (serde_json's map is ordered). Reproducible with any JSON tool
/// that keeps numbers as written.
pub fn record_content_digest(without_digest: &Json) -> String {
    super::key::sha256_hex(&serde_json::to_vec(without_digest).expect("JSON value serialises"))
}

/// Result of looking a key up.
#[derive(Debug, Clone)]
pub enum Lookup {
    Fresh(Box<ActionRecord>),
    Missing,
    Corrupt(String),
}

/// Why a record could not be used.
#[derive(Debug, thiserror::Error)]
pub enum RecordError {
    /// The cache could not be read (permissions, I/O): an error, never a miss, or a second
    /// user of a shared cache would silently recompute and overwrite.
    #[error("{0}")]
    Io(StoreError),
    /// The record is damaged, edited or names something that is not a digest: it is removed
    /// and its instance reruns.
    #[error("record {path}: {detail}")]
    Invalid { path: PathBuf, detail: String },
}

/// The folders of a cache; each must be a real folder, never a link.
const SUBDIRS: [&str; 6] = ["objects", "actions", "names", "locks", "logs", "tmp"];

/// Folders only the Slurm executor makes (its job files, submission records, outcomes and its
/// jobs' logs), parents first: where they exist they must be real folders too, since through a
/// link a write, a listing or a removal in them would act outside the cache.
const SLURM_SUBDIRS: [&str; 5] = ["slurm", "slurm/jobs", "slurm/submitted", "slurm/outcomes", "logs/slurm"];

#[derive(Debug, Clone)]
pub struct Store {
    pub root: PathBuf,
    /// Where scratch folders go when not in the cache's `tmp/` ([`Store::with_scratch`]).
    scratch: Option<PathBuf>,
    /// Records this cache already checked (memo and stamp index; see `cache::verified`),
    /// shared by every clone; the index is saved when the last clone goes.
    verified: std::sync::Arc<Verified>,
}

impl Drop for Store {
    fn drop(&mut self) {
        // The last handle (jobs hold clones while they run): save what this process checked.
        if std::sync::Arc::strong_count(&self.verified) == 1 {
            self.verified.save(self);
        }
    }
}

/// What [`Store::publish_record`] did.
#[derive(Debug)]
pub enum Published {
    /// This record is now the key's record.
    Written,
    /// Another writer published a valid record for the key first; it is kept, and here it is.
    Kept(Box<ActionRecord>),
}

fn is_cross_device(e: &std::io::Error) -> bool {
    e.kind() == ErrorKind::CrossesDevices || e.raw_os_error() == Some(18)
}

/// A filesystem that cannot make hard links (EPERM, EOPNOTSUPP, ENOSYS, EMLINK).
fn link_unsupported(e: &std::io::Error) -> bool {
    e.kind() == ErrorKind::Unsupported || matches!(e.raw_os_error(), Some(1 | 95 | 38 | 31))
}

#[cfg(unix)]
fn same_file(a: &Path, b: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    match (fs::symlink_metadata(a), fs::symlink_metadata(b)) {
        (Ok(x), Ok(y)) => (x.dev(), x.ino()) == (y.dev(), y.ino()),
        _ => false,
    }
}

#[cfg(not(unix))]
fn same_file(_: &Path, _: &Path) -> bool {
    false
}

/// Gives the complete file `staged` the name `dest` unless `dest` exists: `Ok(true)` when it
/// did, `Ok(false)` when something was already there (it is left alone). `link()` never
/// replaces, on NFS too, so two writers of one name cannot both win, and a reader on another
/// host never has the file it opened replaced under it (which NFS answers with ESTALE). A lost
/// NFS reply that turns a successful link into EEXIST is recognised by the inode. Where links
/// are not supported, a rename after a look (the window between them is the old behaviour).
fn publish_no_replace(staged: &Path, dest: &Path) -> std::io::Result<bool> {
    match fs::hard_link(staged, dest) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == ErrorKind::AlreadyExists => Ok(same_file(staged, dest)),
        Err(e) if link_unsupported(&e) => {
            if fs::symlink_metadata(dest).is_ok() {
                return Ok(false);
            }
            fs::rename(staged, dest)?;
            Ok(true)
        }
        Err(e) => Err(e),
    }
}

fn mtime_ns(meta: &fs::Metadata) -> u128 {
    meta.modified().ok().and_then(|t| t.duration_since(UNIX_EPOCH).ok()).map(|d| d.as_nanos()).unwrap_or(0)
}

/// Syncs a finished file and makes it read-only for everyone who may read it (the umask
/// already chose who that is): objects are never written after they are stored.
fn make_read_only(p: &Path) -> StoreResult<()> {
    let f = fs::File::open(p).map_err(io(p))?;
    f.sync_all().map_err(io(p))?;
    let mut perm = f.metadata().map_err(io(p))?.permissions();
    perm.set_readonly(true);
    fs::set_permissions(p, perm).map_err(io(p))
}

/// True when `a` and `b` are on one filesystem (unknown counts as one: the cache's own tmp/).
fn same_filesystem(a: &Path, b: &Path) -> bool {
    #[cfg(unix)]
    {
        use std::os::unix::fs::MetadataExt;
        if let (Ok(x), Ok(y)) = (fs::metadata(a), fs::metadata(b)) {
            return x.dev() == y.dev();
        }
    }
    let _ = (a, b);
    true
}

pub fn hash_file(path: &Path) -> StoreResult<String> {
    let f = fs::File::open(path).map_err(io(path))?;
    hash_stream(f, |_| Ok(())).map_err(io(path))
}

/// The SHA-256 of everything `from` gives, handing each chunk to `sink` too (a copy that is
/// hashed as it is written reads the source once).
fn hash_stream(mut from: impl Read, mut sink: impl FnMut(&[u8]) -> std::io::Result<()>) -> std::io::Result<String> {
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 16];
    loop {
        let n = from.read(&mut buf)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
        sink(&buf[..n])?;
    }
    Ok(hex::encode(h.finalize()))
}

/// Permissions that let the umask decide (tempfile's default is 0600/0700, private to the
/// user, which breaks a cache shared by a group).
#[cfg(unix)]
fn umask_mode(mode: u32) -> fs::Permissions {
    use std::os::unix::fs::PermissionsExt;
    fs::Permissions::from_mode(mode)
}

/// Parses a record file and checks it: its digest, its key against its file name, and every
/// name in it that becomes a path. Returns the record and its `record_digest`.
fn parse_record(path: &Path, bytes: &[u8], expected_key: &str) -> Result<(ActionRecord, String), RecordError> {
    let bad = |detail: String| RecordError::Invalid { path: path.to_path_buf(), detail };
    let mut v: Json = serde_json::from_slice(bytes).map_err(|e| bad(format!("unreadable JSON: {e}")))?;
    let obj = v.as_object_mut().ok_or_else(|| bad("not a JSON object".into()))?;
    let stated = match obj.remove(RECORD_DIGEST_FIELD) {
        Some(Json::String(s)) => s,
        Some(_) => return Err(bad(format!("`{RECORD_DIGEST_FIELD}` is not a string"))),
        None => return Err(bad(format!("has no `{RECORD_DIGEST_FIELD}` (written by an older camflow, or edited)"))),
    };
    let actual = record_content_digest(&v);
    if stated != actual {
        return Err(bad(format!(
            "its content hashes to {}, not to its {RECORD_DIGEST_FIELD} {}: edited or damaged",
            short(&actual),
            short(&stated)
        )));
    }
    let rec: ActionRecord = serde_json::from_value(v).map_err(|e| bad(format!("unreadable: {e}")))?;
    check_names(path, &rec, expected_key)?;
    // A record whose key inputs are not those of its key (forged, resealed) would hand `plan`'s
    // reasons and the lock file inputs that were never computed. Checked here, with the full
    // check only: a record the stamp index holds passed it when it was entered, so a no-op
    // rerun hashes nothing more.
    let actual = rec.key_inputs.digest();
    if actual != rec.key {
        return Err(bad(format!("its key inputs hash to {}, not to its key {}", short(&actual), short(&rec.key))));
    }
    Ok((rec, stated))
}

/// Parses a record whose content is known to hash to its `record_digest` (its file still has
/// the stamp it had when it was fully checked): straight into the struct, without the tree,
/// the second serialisation and the hash. The names that become paths are still checked.
fn parse_known_record(path: &Path, bytes: &[u8], expected_key: &str) -> Result<ActionRecord, RecordError> {
    let rec: ActionRecord =
        serde_json::from_slice(bytes).map_err(|e| RecordError::Invalid { path: path.to_path_buf(), detail: format!("unreadable: {e}") })?;
    check_names(path, &rec, expected_key)?;
    Ok(rec)
}

/// The checks of a parsed record that keep names read from disk from becoming paths: its key
/// is a digest and the one of its file name, output names are plain file names, object names
/// are digests.
fn check_names(path: &Path, rec: &ActionRecord, expected_key: &str) -> Result<(), RecordError> {
    let bad = |detail: String| RecordError::Invalid { path: path.to_path_buf(), detail };
    checked("record key", &rec.key).map_err(|e| bad(e.to_string()))?;
    if rec.key != expected_key {
        return Err(bad(format!("holds key {}, not the key of its file name", short(&rec.key))));
    }
    for (name, o) in &rec.outputs {
        if !is_output_name(name) {
            let shown: String = name.chars().take(80).collect();
            return Err(bad(format!("output name {shown:?} is not a plain file name (it could be used as a path)")));
        }
        checked("object digest", &o.digest).map_err(|e| bad(format!("output `{name}`: {e}")))?;
    }
    Ok(())
}

/// What [`Store::existing_object`] found at an object's path.
enum Existing {
    Absent,
    /// The object, checked; the metadata of the file that was hashed.
    Sound(fs::Metadata),
    /// Something else under the object's name: other bytes, a link, a FIFO.
    Damaged,
}

/// A problem with one object of a record.
enum ObjectProblem {
    /// Missing, corrupt or not a file: the entry is stale.
    Corrupt(String),
    /// The object could not be read: an error.
    Io(StoreError),
}

/// Objects this process found corrupt and removed, with the digest their bytes had: another
/// reader of the same object in this process is told the same cause.
fn removed_as_corrupt() -> &'static std::sync::Mutex<std::collections::HashMap<String, String>> {
    static M: std::sync::OnceLock<std::sync::Mutex<std::collections::HashMap<String, String>>> = std::sync::OnceLock::new();
    M.get_or_init(Default::default)
}

impl Store {
    pub fn open(root: &Path) -> StoreResult<Store> {
        fs::create_dir_all(root).map_err(io(root))?;
        let store = Store { root: root.to_path_buf(), scratch: None, verified: std::sync::Arc::new(Verified::new(root)) };
        store.check_layout()?;
        Ok(store)
    }

    /// The cache's subfolders, created if absent; an error naming the first that is a link
    /// or not a folder.
    fn check_layout(&self) -> StoreResult<()> {
        for d in SUBDIRS {
            let p = self.root.join(d);
            if !real_dir_or_absent(&p)? {
                fs::create_dir_all(&p).map_err(io(&p))?;
                real_dir_or_absent(&p)?;
            }
        }
        for d in SLURM_SUBDIRS {
            real_dir_or_absent(&self.root.join(d))?;
        }
        Ok(())
    }

    /// Path of an object; `digest` must be a digest (it may come from a record on disk).
    pub fn object_path(&self, digest: &str) -> StoreResult<PathBuf> {
        let d = checked("object digest", digest)?;
        Ok(self.root.join("objects").join(&d[..2]).join(&d[2..]))
    }

    /// [`Store::object_path`], refusing a shard folder (`objects/ab`) that is a link: through
    /// it, reading, writing or removing the object would act outside the cache.
    fn object_file(&self, digest: &str) -> StoreResult<PathBuf> {
        let p = self.object_path(digest)?;
        let shard = p.parent().expect("objects/ab/cd…");
        if fs::symlink_metadata(shard).is_ok_and(|m| !m.is_dir()) {
            return Err(StoreError::NotAFile(format!("{digest} (its folder {} is not a folder)", shard.display())));
        }
        Ok(p)
    }

    /// Path of the record of `key`; `key` must be a digest.
    pub fn record_path(&self, key: &str) -> StoreResult<PathBuf> {
        let k = checked("cache key", key)?;
        Ok(self.root.join("actions").join(format!("{k}.json")))
    }

    pub fn tmp_dir(&self) -> PathBuf {
        self.root.join("tmp")
    }

    /// A new empty file in the cache's `tmp/`, with the umask's permissions.
    fn new_tmp_file(&self) -> StoreResult<tempfile::NamedTempFile> {
        let tmpdir = self.tmp_dir();
        real_dir_or_absent(&tmpdir)?;
        let mut b = tempfile::Builder::new();
        #[cfg(unix)]
        b.permissions(umask_mode(0o666));
        b.tempfile_in(&tmpdir).map_err(io(&tmpdir))
    }

    /// `bytes` in a complete, synced file in `tmp/`, ready to be given `dest`'s name (whose
    /// folder is created).
    fn staged(&self, dest: &Path, bytes: &[u8]) -> StoreResult<tempfile::NamedTempFile> {
        let mut tmp = self.new_tmp_file()?;
        tmp.write_all(bytes).map_err(io(dest))?;
        tmp.as_file().sync_all().map_err(io(dest))?;
        if let Some(parent) = dest.parent() {
            // Every folder between the cache and `dest` (not only the last) must be real: a
            // link on the way would put the file outside the cache.
            let mut absent = !real_dir_or_absent(parent)?;
            for dir in parent.ancestors().skip(1).take_while(|d| d.starts_with(&self.root) && *d != self.root) {
                absent |= !real_dir_or_absent(dir)?;
            }
            if absent {
                fs::create_dir_all(parent).map_err(io(parent))?;
            }
        }
        Ok(tmp)
    }

    /// Writes `bytes` to `dest` atomically (tmp file in the cache, fsync, rename).
    pub fn write_atomic(&self, dest: &Path, bytes: &[u8]) -> StoreResult<()> {
        let tmp = self.staged(dest, bytes)?;
        tmp.persist(dest).map_err(|e| StoreError::Io { path: dest.to_path_buf(), source: e.error })?;
        Ok(())
    }

    /// The same store with scratch folders under `dir` (node-local storage) instead of the
    /// cache's `tmp/`; see [`Store::scratch_base`].
    pub fn with_scratch(mut self, dir: PathBuf) -> Store {
        self.scratch = Some(dir);
        self
    }

    /// The folder scratch folders go in: [`Store::with_scratch`], else `CAMFLOW_SCRATCH`, else
    /// under Slurm (`SLURM_JOB_ID` set) `$TMPDIR` when it is on another filesystem than the
    /// cache (node-local disk: faster, and no NFS traffic for files that are thrown away),
    /// else the cache's `tmp/`. Outside the cache, scratch folders go in a subfolder named
    /// after the cache (`camflow-<hash of its path>`), so two caches sharing one scratch disk
    /// never clean each other's. Outputs are copied into the cache when stored
    /// ([`Store::put_file`]). A scratch folder abandoned on a node's local disk can only be
    /// cleaned by a later run on that node (or by Slurm, which removes a job's `$TMPDIR`).
    pub fn scratch_base(&self) -> PathBuf {
        let outside =
            self.scratch.clone().or_else(|| std::env::var_os("CAMFLOW_SCRATCH").filter(|v| !v.is_empty()).map(PathBuf::from)).or_else(
                || {
                    let tmp = std::env::var_os("TMPDIR").filter(|v| !v.is_empty()).map(PathBuf::from)?;
                    (std::env::var_os("SLURM_JOB_ID").is_some() && !same_filesystem(&tmp, &self.root)).then_some(tmp)
                },
            );
        match outside {
            Some(dir) => {
                let root = fs::canonicalize(&self.root).unwrap_or_else(|_| self.root.clone());
                let h = super::key::sha256_hex(root.as_os_str().as_encoded_bytes());
                dir.join(format!("camflow-{}", &h[..16]))
            }
            None => self.tmp_dir(),
        }
    }

    /// A scratch folder for one run of `key`, created while its key lock is held: its name
    /// says which key, so a starting run can tell an abandoned one (key lock free) from one in use.
    pub fn scratch_dir(&self, key: &str) -> StoreResult<tempfile::TempDir> {
        let k = checked("cache key", key)?;
        let tmpdir = self.scratch_base();
        if tmpdir != self.tmp_dir() && !real_dir_or_absent(&tmpdir)? {
            fs::create_dir_all(&tmpdir).map_err(io(&tmpdir))?;
        }
        real_dir_or_absent(&tmpdir)?;
        let prefix = format!("run-{k}-");
        let mut b = tempfile::Builder::new();
        b.prefix(&prefix);
        #[cfg(unix)]
        b.permissions(umask_mode(0o777));
        b.tempdir_in(&tmpdir).map_err(io(&tmpdir))
    }

    /// Moves a finished output file into the store; returns its reference. An object that
    /// already exists is kept, never written again (see [`publish_no_replace`]), but only once
    /// checked: its size, then its bytes against the digest just computed. One that fails
    /// (damaged in place with its mtime put back, which the cheap check of a lookup cannot
    /// see) or is not a regular file (a link: the link itself goes, never its target) is
    /// replaced atomically by the new bytes: a record never trusts the stat of an object
    /// nobody checked. A file on another filesystem (node-local scratch) is first copied into
    /// the cache's `tmp/`, hashed as it is copied: a copy cut short is never an object.
    pub fn put_file(&self, src: &Path) -> StoreResult<ObjectRef> {
        let digest = hash_file(src)?;
        // Stored again: a later absence is no longer the corruption found before.
        if let Ok(mut m) = removed_as_corrupt().lock() {
            m.remove(&digest);
        }
        let size = fs::metadata(src).map_err(io(src))?.len();
        let dest = self.object_file(&digest)?;
        // Another writer may publish between the look and the link: look again (bounded).
        let mut found = None;
        for _ in 0..8 {
            let published = match self.existing_object(&dest, &digest, size)? {
                Existing::Sound(meta) => {
                    found = Some(meta);
                    break;
                }
                Existing::Absent => {
                    make_read_only(src)?;
                    if let Some(parent) = dest.parent() {
                        fs::create_dir_all(parent).map_err(io(parent))?;
                    }
                    match publish_no_replace(src, &dest) {
                        Ok(published) => published,
                        Err(e) if is_cross_device(&e) => self.copy_in(src, &digest, &dest, false)?,
                        Err(e) => return Err(StoreError::Io { path: dest, source: e }),
                    }
                }
                // rename() replaces the entry itself (a link is never followed), atomically: a
                // reader sees the damaged object or the good one, never a missing or partial one.
                Existing::Damaged => {
                    make_read_only(src)?;
                    match fs::rename(src, &dest) {
                        Ok(()) => true,
                        Err(e) if is_cross_device(&e) => self.copy_in(src, &digest, &dest, true)?,
                        Err(e) => return Err(StoreError::Io { path: dest, source: e }),
                    }
                }
            };
            if published {
                // The file just published is the one hashed above.
                let meta = fs::symlink_metadata(&dest).map_err(io(&dest))?;
                if !meta.is_file() {
                    return Err(StoreError::NotAFile(format!("{digest} ({})", dest.display())));
                }
                found = Some(meta);
                break;
            }
        }
        let Some(meta) = found else {
            return Err(StoreError::Io { path: dest, source: std::io::Error::other("kept changing while the object was stored") });
        };
        // Moved, not copied: the caller's file is gone (its scratch folder goes anyway).
        let _ = fs::remove_file(src);
        Ok(ObjectRef { digest, size: meta.len(), mtime_ns: mtime_ns(&meta) })
    }

    /// What stands at the path of object `digest` of `size` bytes: `Sound` only when it is a
    /// regular file of that size whose bytes hash to `digest` (with the metadata of the file
    /// that was hashed); a folder is an error naming it (a tree is never removed to store a
    /// file).
    fn existing_object(&self, dest: &Path, digest: &str, size: u64) -> StoreResult<Existing> {
        match fs::symlink_metadata(dest) {
            Err(e) if e.kind() == ErrorKind::NotFound => return Ok(Existing::Absent),
            Err(e) => return Err(StoreError::Io { path: dest.to_path_buf(), source: e }),
            Ok(m) if m.is_dir() => return Err(StoreError::NotAFile(format!("{digest} ({} is a folder)", dest.display()))),
            Ok(m) if !m.is_file() || m.len() != size => return Ok(Existing::Damaged),
            Ok(_) => {}
        }
        let mut opts = fs::OpenOptions::new();
        opts.read(true);
        // Replaced by a link or a FIFO since the look above: never followed or waited on.
        #[cfg(all(target_os = "linux", target_env = "gnu"))]
        std::os::unix::fs::OpenOptionsExt::custom_flags(&mut opts, libc::O_NOFOLLOW | libc::O_NONBLOCK);
        let f = match opts.open(dest) {
            Ok(f) => f,
            Err(e) if e.kind() == ErrorKind::NotFound => return Ok(Existing::Absent),
            // ELOOP: it became a link meanwhile.
            Err(_) if fs::symlink_metadata(dest).is_ok_and(|m| !m.is_file() && !m.is_dir()) => return Ok(Existing::Damaged),
            // Unreadable to us (another user's object in a shared cache with odd permissions):
            // unverifiable, so replaced by the bytes we just made, as a damaged one is (a
            // rename needs rights on the folder, not on the file).
            Err(e) if e.kind() == ErrorKind::PermissionDenied => return Ok(Existing::Damaged),
            Err(e) => return Err(StoreError::Io { path: dest.to_path_buf(), source: e }),
        };
        let meta = f.metadata().map_err(io(dest))?;
        if !meta.is_file() || meta.len() != size {
            return Ok(Existing::Damaged);
        }
        let actual = hash_stream(&f, |_| Ok(())).map_err(io(dest))?;
        Ok(if actual == digest { Existing::Sound(meta) } else { Existing::Damaged })
    }

    /// Copies `src` (on another filesystem) into `tmp/`, checks it hashes to `digest`, then
    /// publishes it as `dest`: over whatever is there when `replace` (a damaged object), else
    /// only where nothing is. Returns whether it was published.
    fn copy_in(&self, src: &Path, digest: &str, dest: &Path, replace: bool) -> StoreResult<bool> {
        let mut tmp = self.new_tmp_file()?;
        let from = fs::File::open(src).map_err(io(src))?;
        let copied = hash_stream(from, |chunk| tmp.write_all(chunk)).map_err(io(src))?;
        if copied != digest {
            return Err(StoreError::Io {
                path: src.to_path_buf(),
                source: std::io::Error::other(format!("changed while it was stored (hashed {}, copied {})", short(digest), short(&copied))),
            });
        }
        make_read_only(tmp.path())?;
        if replace {
            tmp.persist(dest).map_err(|e| StoreError::Io { path: dest.to_path_buf(), source: e.error })?;
            return Ok(true);
        }
        publish_no_replace(tmp.path(), dest).map_err(io(dest))
    }

    /// Path of a verified object: its bytes are hashed; a mismatch removes it.
    pub fn verified_object(&self, r: &ObjectRef) -> StoreResult<PathBuf> {
        let p = self.object_file(&r.digest)?;
        match fs::symlink_metadata(&p) {
            Err(e) if e.kind() == ErrorKind::NotFound => {
                // Removed as corrupt by another instance of this run (fused members share
                // inputs): the same cause, not "missing".
                if let Some(actual) = removed_as_corrupt().lock().ok().and_then(|m| m.get(&r.digest).cloned()) {
                    return Err(StoreError::Corrupt { digest: r.digest.clone(), actual });
                }
                return Err(StoreError::Missing(r.digest.clone()));
            }
            Err(e) => return Err(StoreError::Io { path: p, source: e }),
            // A link (or anything but a file) is never followed: the link itself is removed.
            // A folder is left alone (removing a tree on the word of a record is too much).
            Ok(m) if !m.file_type().is_file() => {
                if !m.is_dir() {
                    let _ = fs::remove_file(&p);
                }
                return Err(StoreError::NotAFile(format!("{} ({})", r.digest, p.display())));
            }
            Ok(_) => {}
        }
        let actual = hash_file(&p)?;
        if actual != r.digest {
            if let Ok(mut m) = removed_as_corrupt().lock() {
                m.insert(r.digest.clone(), actual.clone());
            }
            let _ = fs::remove_file(&p);
            return Err(StoreError::Corrupt { digest: r.digest.clone(), actual });
        }
        Ok(p)
    }

    /// Cheap check of one object: exists, same size and mtime as recorded; else rehash.
    fn check_object(&self, r: &ObjectRef, full: bool) -> Result<(), ObjectProblem> {
        let p = self.object_file(&r.digest).map_err(|e| ObjectProblem::Corrupt(e.to_string()))?;
        let meta = match fs::symlink_metadata(&p) {
            Ok(m) => m,
            Err(e) if e.kind() == ErrorKind::NotFound => {
                return Err(ObjectProblem::Corrupt(format!("object {} is missing", short(&r.digest))));
            }
            Err(e) => return Err(ObjectProblem::Io(StoreError::Io { path: p, source: e })),
        };
        if !full && meta.file_type().is_file() && meta.len() == r.size && mtime_ns(&meta) == r.mtime_ns {
            return Ok(());
        }
        match self.verified_object(r) {
            Ok(_) => Ok(()),
            Err(e @ StoreError::Io { .. }) => Err(ObjectProblem::Io(e)),
            Err(e) => Err(ObjectProblem::Corrupt(e.to_string())),
        }
    }

    /// The record of `key`, fully checked: `Ok(None)` only when there is none.
    pub fn load_record(&self, key: &str) -> Result<Option<ActionRecord>, RecordError> {
        Ok(self.read_record_file(key, true)?.map(|(rec, _)| rec))
    }

    /// Reads and checks the record of `key`, with its `record_digest`. Unless `full`, a file
    /// whose stamp the index holds skips the digest check (see `cache::verified`); a file
    /// fully checked is entered in the index.
    fn read_record_file(&self, key: &str, full: bool) -> Result<Option<(ActionRecord, String)>, RecordError> {
        let p = self.record_path(key).map_err(RecordError::Io)?;
        let (bytes, stamp) = match read_regular_stamped(&p) {
            Ok(None) => return Ok(None),
            Ok(Some(b)) => b,
            Err(Ok(what)) => return Err(RecordError::Invalid { path: p, detail: what.into() }),
            Err(Err(e)) => return Err(RecordError::Io(StoreError::Io { path: p, source: e })),
        };
        if !full && let Some(digest) = self.verified.indexed_digest(key, &stamp) {
            return parse_known_record(&p, &bytes, key).map(|rec| Some((rec, digest)));
        }
        match parse_record(&p, &bytes, key) {
            Ok((rec, digest)) => {
                self.verified.checked(key, &stamp, &digest);
                Ok(Some((rec, digest)))
            }
            Err(e) => {
                self.verified.forget(key);
                Err(e)
            }
        }
    }

    #[cfg(test)]
    pub(crate) fn verified(&self) -> &Verified {
        &self.verified
    }

    /// The output digest of `key`'s record if this process already found it fresh (without
    /// `full`): what a planner needs of a cached instance, without copying its record.
    pub fn fresh_output_digest(&self, key: &str) -> Option<String> {
        self.verified.memo_output_digest(key)
    }

    /// The `record_digest` of `key`'s record if this process found it fresh without `full`:
    /// what a lock file's fingerprint is built from (`lockfile::write_if_changed`).
    pub fn fresh_record_digest(&self, key: &str) -> Option<String> {
        self.verified.memo_digest(key)
    }

    /// The record of `key`: `None` when there is none; an error when it cannot be read or is
    /// corrupt.
    pub fn read_record(&self, key: &str) -> Option<Result<ActionRecord, String>> {
        self.load_record(key).map_err(|e| e.to_string()).transpose()
    }

    /// Looks a key up. `full` hashes every object instead of trusting size and mtime. A cache
    /// that cannot be read is an error, not a miss.
    ///
    /// Without `full`, a key this process already found fresh is not looked up again (many
    /// instances of a sweep can share one key), and a record file unchanged since it was last
    /// checked is not hashed again (`cache::verified`); objects are still checked each time a
    /// record is read.
    pub fn try_lookup(&self, key: &str, full: bool) -> StoreResult<Lookup> {
        self.lookup_remembering(key, full, true)
    }

    /// [`Store::try_lookup`] for a caller that uses the record once (a planner): this process
    /// remembers the key as fresh, by its digests, without keeping a copy of the record.
    pub fn try_lookup_once(&self, key: &str, full: bool) -> StoreResult<Lookup> {
        self.lookup_remembering(key, full, false)
    }

    fn lookup_remembering(&self, key: &str, full: bool, keep_copy: bool) -> StoreResult<Lookup> {
        if !full && let Some(rec) = self.verified.memo_get(key) {
            return Ok(Lookup::Fresh(Box::new(rec)));
        }
        let (rec, digest) = match self.read_record_file(key, full) {
            Ok(None) => {
                self.verified.forget(key);
                return Ok(Lookup::Missing);
            }
            Ok(Some(r)) => r,
            Err(RecordError::Io(e)) => return Err(e),
            Err(e @ RecordError::Invalid { .. }) => return Ok(Lookup::Corrupt(e.to_string())),
        };
        for r in rec.outputs.values() {
            match self.check_object(r, full) {
                Ok(()) => {}
                Err(ObjectProblem::Corrupt(e)) => {
                    self.verified.forget(key);
                    return Ok(Lookup::Corrupt(e));
                }
                Err(ObjectProblem::Io(e)) => return Err(e),
            }
        }
        if !full {
            self.verified.memo_put(&rec, &digest, keep_copy);
        }
        Ok(Lookup::Fresh(Box::new(rec)))
    }

    /// [`Store::try_lookup`] for views that only explain (`plan`, `status`): an unreadable
    /// entry shows as corrupt, with the error.
    pub fn lookup(&self, key: &str, full: bool) -> Lookup {
        self.try_lookup(key, full).unwrap_or_else(|e| Lookup::Corrupt(e.to_string()))
    }

    /// Writes a record with its `record_digest`, atomically, replacing any record of its key
    /// (last writer wins): what a `--force`d rerun needs. Everything else publishes with
    /// [`Store::publish_record`].
    pub fn write_record(&self, rec: &ActionRecord) -> StoreResult<()> {
        let path = self.record_path(&rec.key)?;
        let bytes = self.record_bytes(rec, &path)?;
        // What this process knew of the key's old record no longer holds.
        self.verified.forget(&rec.key);
        self.write_atomic(&path, &bytes)
    }

    /// The bytes of a record file: its JSON with its `record_digest`.
    fn record_bytes(&self, rec: &ActionRecord, path: &Path) -> StoreResult<Vec<u8>> {
        let mut v = serde_json::to_value(rec).map_err(|e| StoreError::Io { path: path.to_path_buf(), source: std::io::Error::other(e) })?;
        let digest = record_content_digest(&v);
        if let Json::Object(m) = &mut v {
            m.insert(RECORD_DIGEST_FIELD.to_string(), Json::String(digest));
        }
        Ok(serde_json::to_vec_pretty(&v).expect("record serialises"))
    }

    /// Publishes a record first-writer-wins: if the key already has a valid record (another
    /// process, on another host, finished it first) that one is kept and returned, and this
    /// one is dropped; a corrupt one, or one whose objects are gone, is replaced atomically. Use it for every record but a
    /// `--force`d rerun's, which must replace the old one ([`Store::write_record`]). Without a
    /// lock that excludes other hosts (a lease lost to a stalled node), two writers of one key
    /// thus agree on one record, and whoever lost uses the winner's outputs.
    pub fn publish_record(&self, rec: &ActionRecord) -> StoreResult<Published> {
        let path = self.record_path(&rec.key)?;
        let bytes = self.record_bytes(rec, &path)?;
        // A record removed between our link and our look (gc, verify) is simply tried again.
        for _ in 0..8 {
            // What this process knew of the key's old record no longer holds.
            self.verified.forget(&rec.key);
            let tmp = self.staged(&path, &bytes)?;
            if publish_no_replace(tmp.path(), &path).map_err(io(&path))? {
                return Ok(Published::Written);
            }
            match self.load_record(&rec.key) {
                Ok(Some(existing)) => match existing.outputs.values().map(|r| self.check_object(r, false)).find(Result::is_err) {
                    None => return Ok(Published::Kept(Box::new(existing))),
                    Some(Err(ObjectProblem::Io(e))) => return Err(e),
                    // Its objects are gone or damaged (gc, a disk error): no result to hand a
                    // writer, so it is replaced like a corrupt record, below.
                    Some(_) => {}
                },
                Ok(None) => continue,
                Err(RecordError::Invalid { .. }) => {}
                Err(RecordError::Io(e)) => return Err(e),
            }
            tmp.persist(&path).map_err(|e| StoreError::Io { path: path.clone(), source: e.error })?;
            return Ok(Published::Written);
        }
        Err(StoreError::Io { path, source: std::io::Error::other("the record kept disappearing while it was published") })
    }

    /// Forgets what this process knew of `key`'s record: another process (a cluster job) has
    /// just written it, so the next lookup reads it from disk.
    pub fn forget_checked(&self, key: &str) {
        self.verified.forget(key);
    }

    /// Removes a record so that an interrupted rerun can never look fresh.
    pub fn invalidate(&self, key: &str) {
        self.verified.forget(key);
        if let Ok(p) = self.record_path(key) {
            let _ = fs::remove_file(p);
        }
    }

    /// The folder of what the cache remembers per pipeline name (sidecars, the lock state).
    pub fn names_dir(&self, pipeline: &str) -> PathBuf {
        self.root.join("names").join(sanitize(pipeline))
    }

    /// [`Store::names_dir`] when what is in it may be read: a real folder, or absent. A link
    /// there (only `names/` itself is checked when the store opens) would have sidecars and the
    /// lock state read from outside the cache, since [`read_regular`] checks only the last
    /// component; writes through it are refused by [`Store::write_atomic`].
    pub fn readable_names_dir(&self, pipeline: &str) -> Option<PathBuf> {
        let d = self.names_dir(pipeline);
        real_dir_or_absent(&d).ok().map(|_| d)
    }

    fn sidecar_name(label: &str) -> String {
        let h = super::key::sha256_hex(label.as_bytes());
        format!("{}.json", &h[..32])
    }

    pub fn sidecar_path(&self, pipeline: &str, label: &str) -> PathBuf {
        self.names_dir(pipeline).join(Self::sidecar_name(label))
    }

    /// The key inputs of the last run of `label` in `pipeline`.
    pub fn read_sidecar(&self, pipeline: &str, label: &str) -> Option<Sidecar> {
        // Only an explanation: anything but a readable regular file is simply no sidecar.
        let bytes = read_regular(&self.readable_names_dir(pipeline)?.join(Self::sidecar_name(label))).ok()??;
        serde_json::from_slice(&bytes).ok()
    }

    pub fn write_sidecar(&self, pipeline: &str, s: &Sidecar) -> StoreResult<()> {
        let bytes = serde_json::to_vec_pretty(s).expect("sidecar serialises");
        self.write_atomic(&self.sidecar_path(pipeline, &s.label), &bytes)
    }

    pub fn log_path(&self, key: &str) -> StoreResult<PathBuf> {
        let k = checked("cache key", key)?;
        Ok(self.root.join("logs").join(format!("{k}.log")))
    }

    /// Every record in the store, checked as [`Store::load_record`] checks one.
    pub fn records(&self) -> Vec<(PathBuf, Result<ActionRecord, RecordError>)> {
        let dir = self.root.join("actions");
        let mut out = Vec::new();
        if let Ok(rd) = fs::read_dir(&dir) {
            let mut paths: Vec<PathBuf> = rd
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.extension().is_some_and(|e| e == "json") && !p.file_name().is_some_and(is_nfs_silly))
                .collect();
            paths.sort();
            for p in paths {
                let stem = p.file_stem().and_then(|s| s.to_str()).unwrap_or("").to_string();
                let r = if !is_digest(&stem) {
                    Err(RecordError::Invalid { path: p.clone(), detail: "its file name is not a cache key".into() })
                } else {
                    match self.load_record(&stem) {
                        Ok(Some(rec)) => Ok(rec),
                        Ok(None) => continue, // removed meanwhile
                        Err(e) => Err(e),
                    }
                };
                out.push((p, r));
            }
        }
        out
    }

    /// Every object file: (digest, path, size). Entries whose names do not form a digest, and
    /// symbolic links, are listed by [`Store::strays`] instead.
    pub fn objects(&self) -> Vec<(String, PathBuf, u64)> {
        self.scan_objects().0
    }

    /// What lies in `objects/` that is not an object: a wrong name, a link, a folder. NFS
    /// silly-rename files (`.nfs…`, an object deleted while open on some host) are not listed:
    /// they vanish by themselves.
    pub fn strays(&self) -> Vec<PathBuf> {
        self.scan_objects().1
    }

    /// Removes what stands in `objects/` that is neither a file nor a folder (a link, a FIFO,
    /// a socket): never an object, and it would stand in the way of the object of its name. The
    /// entry itself goes, never what a link points to; folders and files with wrong names are
    /// left alone (harmless, never read). Returns what was removed (with `dry_run`: what would be).
    pub fn remove_special_strays(&self, dry_run: bool) -> Vec<PathBuf> {
        let special = |p: &PathBuf| fs::symlink_metadata(p).is_ok_and(|m| !m.is_file() && !m.is_dir());
        self.strays().into_iter().filter(special).filter(|p| dry_run || fs::remove_file(p).is_ok()).collect()
    }

    fn scan_objects(&self) -> (Vec<(String, PathBuf, u64)>, Vec<PathBuf>) {
        let (mut out, mut strays) = (Vec::new(), Vec::new());
        let dir = self.root.join("objects");
        if let Ok(rd) = fs::read_dir(&dir) {
            for sub in rd.filter_map(|e| e.ok()) {
                if is_nfs_silly(&sub.file_name()) {
                    continue;
                }
                if !sub.file_type().is_ok_and(|t| t.is_dir()) {
                    strays.push(sub.path());
                    continue;
                }
                let prefix = sub.file_name().to_string_lossy().into_owned();
                if let Ok(rd2) = fs::read_dir(sub.path()) {
                    for f in rd2.filter_map(|e| e.ok()).filter(|f| !is_nfs_silly(&f.file_name())) {
                        let digest = format!("{prefix}{}", f.file_name().to_string_lossy());
                        match f.metadata() {
                            Ok(m) if m.file_type().is_file() && is_digest(&digest) && prefix.len() == 2 => {
                                out.push((digest, f.path(), m.len()))
                            }
                            _ => strays.push(f.path()),
                        }
                    }
                }
            }
        }
        out.sort();
        strays.sort();
        (out, strays)
    }

    /// Removes what interrupted runs left in `tmp/`: a scratch folder `run-<key>-…` whose key
    /// lock is free (no live run owns it, since one is created and used only under its key
    /// lock), and any other entry older than `grace`. Scratch folders of this cache outside it
    /// ([`Store::scratch_base`]) are cleaned by the first rule only. NFS silly-rename files are
    /// never touched: deleting one breaks the process that still has it open, and it vanishes
    /// when that process closes it. Returns how many entries were removed.
    pub fn clean_tmp(&self, grace: Duration) -> usize {
        let base = self.scratch_base();
        let outside = (base != self.tmp_dir()).then_some(base);
        self.clean_dir(&self.tmp_dir(), Some(grace)) + outside.map_or(0, |d| self.clean_dir(&d, None))
    }

    /// [`Store::clean_tmp`] for one folder; `grace: None` leaves everything but scratch folders.
    fn clean_dir(&self, dir: &Path, grace: Option<Duration>) -> usize {
        // A folder that is a link is never listed: its entries are elsewhere.
        if !real_dir_or_absent(dir).unwrap_or(false) {
            return 0;
        }
        let Ok(rd) = fs::read_dir(dir) else { return 0 };
        let now = SystemTime::now();
        let mut removed = 0;
        for e in rd.flatten() {
            if is_nfs_silly(&e.file_name()) {
                continue;
            }
            let p = e.path();
            let Ok(meta) = fs::symlink_metadata(&p) else { continue };
            let name = e.file_name().to_string_lossy().into_owned();
            let key =
                name.strip_prefix("run-").and_then(|r| r.get(..64)).filter(|k| is_digest(k) && name.as_bytes().get(68) == Some(&b'-'));
            // Held while the folder is removed.
            let mut _key_lock = None;
            let abandoned = match key {
                Some(k) if meta.is_dir() => {
                    _key_lock = super::lock::KeyLock::try_acquire(&self.root, k).ok().flatten();
                    _key_lock.is_some()
                }
                _ => grace.is_some_and(|g| meta.modified().ok().and_then(|m| now.duration_since(m).ok()).is_some_and(|age| age > g)),
            };
            if !abandoned {
                continue;
            }
            // remove_dir_all never follows links; a link itself is removed by remove_file.
            let r = if meta.is_dir() { fs::remove_dir_all(&p) } else { fs::remove_file(&p) };
            if r.is_ok() {
                removed += 1;
            }
        }
        removed
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
        let p = s.object_path(&r.digest).unwrap();
        let mut perm = fs::metadata(&p).unwrap().permissions();
        #[allow(clippy::permissions_set_readonly_false)]
        perm.set_readonly(false);
        fs::set_permissions(&p, perm).unwrap();
        fs::write(&p, b"jello").unwrap();
        assert!(matches!(s.verified_object(&r), Err(StoreError::Corrupt { .. })));
        assert!(!p.exists());
        // A second reader in this process (a fused member sharing the input) is told the same
        // cause, not "missing"; once stored again, the object reads.
        assert!(matches!(s.verified_object(&r), Err(StoreError::Corrupt { .. })));
        fs::write(&src, b"hello").unwrap();
        let r = s.put_file(&src).unwrap();
        assert!(s.verified_object(&r).is_ok());
    }

    #[test]
    fn an_object_damaged_in_place_is_replaced_by_the_next_put() {
        let d = tempfile::tempdir().unwrap();
        let s = Store::open(d.path()).unwrap();
        let src = s.tmp_dir().join("a");
        fs::write(&src, b"hello").unwrap();
        let r = s.put_file(&src).unwrap();
        let p = s.object_path(&r.digest).unwrap();
        // One byte changed, size and mtime put back: a lookup's cheap check cannot see it.
        let mtime = fs::metadata(&p).unwrap().modified().unwrap();
        let mut perm = fs::metadata(&p).unwrap().permissions();
        #[allow(clippy::permissions_set_readonly_false)]
        perm.set_readonly(false);
        fs::set_permissions(&p, perm).unwrap();
        fs::write(&p, b"jello").unwrap();
        fs::File::options().write(true).open(&p).unwrap().set_modified(mtime).unwrap();
        fs::write(&src, b"hello").unwrap();
        let again = s.put_file(&src).unwrap();
        assert_eq!(fs::read(&p).unwrap(), b"hello");
        assert!(fs::metadata(&p).unwrap().permissions().readonly());
        assert!(s.verified_object(&again).is_ok());
        // A sound object is kept as it is, never written twice.
        use std::os::unix::fs::MetadataExt;
        let ino = fs::metadata(&p).unwrap().ino();
        fs::write(&src, b"hello").unwrap();
        assert_eq!(s.put_file(&src).unwrap(), again);
        assert_eq!(fs::metadata(&p).unwrap().ino(), ino);
    }

    #[cfg(unix)]
    #[test]
    fn a_link_at_an_objects_path_is_replaced_never_followed() {
        let outside = tempfile::tempdir().unwrap();
        let victim = outside.path().join("victim");
        fs::write(&victim, b"precious").unwrap();
        let d = tempfile::tempdir().unwrap();
        let s = Store::open(d.path()).unwrap();
        let p = s.object_path(&super::super::key::sha256_hex(b"hello")).unwrap();
        fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::os::unix::fs::symlink(&victim, &p).unwrap();
        let src = s.tmp_dir().join("a");
        fs::write(&src, b"hello").unwrap();
        let r = s.put_file(&src).unwrap();
        assert!(fs::symlink_metadata(&p).unwrap().is_file());
        assert_eq!(fs::read(&p).unwrap(), b"hello");
        assert_eq!(fs::read(&victim).unwrap(), b"precious");
        assert!(s.verified_object(&r).is_ok());
        // A folder in its place is never removed: an error naming it.
        fs::remove_file(&p).unwrap();
        fs::create_dir(&p).unwrap();
        fs::write(&src, b"hello").unwrap();
        let e = s.put_file(&src).unwrap_err().to_string();
        assert!(e.contains(&p.display().to_string()), "{e}");
        // A link no record names: removed by remove_special_strays, its target kept.
        let stray = p.with_file_name("0".repeat(62));
        std::os::unix::fs::symlink(&victim, &stray).unwrap();
        assert_eq!(s.remove_special_strays(true), [stray.clone()]);
        assert!(fs::symlink_metadata(&stray).is_ok());
        assert_eq!(s.remove_special_strays(false), [stray.clone()]);
        assert!(fs::symlink_metadata(&stray).is_err() && victim.exists());
        assert_eq!(s.strays(), [p]);
    }

    #[cfg(unix)]
    #[test]
    fn a_linked_names_folder_is_never_read_nor_written() {
        let outside = tempfile::tempdir().unwrap();
        let d = tempfile::tempdir().unwrap();
        let s = Store::open(d.path()).unwrap();
        let side = Sidecar { label: "l".into(), key: "a".repeat(64), key_inputs: sample(&s).key_inputs };
        s.write_sidecar("p", &side).unwrap();
        assert_eq!(s.read_sidecar("p", "l").as_ref(), Some(&side));
        // names/p moved outside the cache and linked back: its sidecar is no longer seen.
        fs::rename(s.names_dir("p"), outside.path().join("p")).unwrap();
        std::os::unix::fs::symlink(outside.path().join("p"), s.names_dir("p")).unwrap();
        assert!(s.readable_names_dir("p").is_none() && s.readable_names_dir("q").is_some());
        assert!(s.read_sidecar("p", "l").is_none());
        assert!(s.write_sidecar("p", &Sidecar { label: "m".into(), ..side }).is_err());
        assert_eq!(fs::read_dir(outside.path().join("p")).unwrap().count(), 1);
    }

    #[test]
    fn a_record_whose_key_inputs_are_not_its_keys_is_corrupt() {
        let d = tempfile::tempdir().unwrap();
        let s = Store::open(d.path()).unwrap();
        let rec = sample(&s);
        s.write_record(&rec).unwrap();
        // Resealed: the record digest holds, the key inputs are another key's.
        edit_record(&s, &rec.key, true, |v| v["key_inputs"]["seed"] = Json::from(2));
        for full in [false, true] {
            match s.lookup(&rec.key, full) {
                Lookup::Corrupt(m) => assert!(m.contains("key inputs hash to"), "{m}"),
                other => panic!("{other:?}"),
            }
        }
        assert!(matches!(s.records()[0].1, Err(RecordError::Invalid { .. })));
    }

    fn sample(s: &Store) -> ActionRecord {
        let src = s.tmp_dir().join("out");
        fs::write(&src, b"output bytes").unwrap();
        let o = s.put_file(&src).unwrap();
        let key_inputs = CacheKey {
            format: 1,
            kind: "k".into(),
            kind_version: 1,
            params: BTreeMap::new(),
            inputs: BTreeMap::new(),
            files: BTreeMap::new(),
            seed: 1,
            backend: None,
        };
        ActionRecord {
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
        }
    }

    /// Rewrites a record file through `edit`, with a valid `record_digest` when `reseal`.
    fn edit_record(s: &Store, key: &str, reseal: bool, edit: impl FnOnce(&mut Json)) {
        let p = s.record_path(key).unwrap();
        let mut v: Json = serde_json::from_slice(&fs::read(&p).unwrap()).unwrap();
        edit(&mut v);
        if reseal {
            let m = v.as_object_mut().unwrap();
            m.remove(RECORD_DIGEST_FIELD);
            let d = record_content_digest(&v);
            v.as_object_mut().unwrap().insert(RECORD_DIGEST_FIELD.into(), Json::String(d));
        }
        fs::write(&p, serde_json::to_vec_pretty(&v).unwrap()).unwrap();
    }

    #[test]
    fn an_edited_record_is_corrupt() {
        let d = tempfile::tempdir().unwrap();
        let s = Store::open(d.path()).unwrap();
        let rec = sample(&s);
        s.write_record(&rec).unwrap();
        assert!(matches!(s.lookup(&rec.key, true), Lookup::Fresh(_)));
        edit_record(&s, &rec.key, false, |v| v["metrics"]["accuracy"] = Json::from(0.99));
        match s.lookup(&rec.key, false) {
            Lookup::Corrupt(m) => assert!(m.contains("edited or damaged"), "{m}"),
            other => panic!("{other:?}"),
        }
        // Without a digest at all: corrupt too.
        edit_record(&s, &rec.key, false, |v| {
            v.as_object_mut().unwrap().remove(RECORD_DIGEST_FIELD);
        });
        assert!(matches!(s.lookup(&rec.key, false), Lookup::Corrupt(_)));
    }

    #[test]
    fn names_from_disk_never_become_paths_outside_the_cache() {
        let outside = tempfile::tempdir().unwrap();
        let victim = outside.path().join("victim.txt");
        fs::write(&victim, b"keep me").unwrap();
        let d = tempfile::tempdir().unwrap();
        let s = Store::open(d.path()).unwrap();
        let rec = sample(&s);
        s.write_record(&rec).unwrap();
        let bad = format!("xx{}", victim.display());
        for digest in [bad.as_str(), "é", "../../../../etc/passwd", &"A".repeat(64)] {
            // A record that passes its own digest check (whoever wrote it recomputed it).
            edit_record(&s, &rec.key, true, |v| v["outputs"]["out"]["digest"] = Json::from(digest));
            match s.lookup(&rec.key, true) {
                Lookup::Corrupt(m) => assert!(m.contains("not a SHA-256 digest"), "{m}"),
                other => panic!("{digest}: {other:?}"),
            }
            let r = ObjectRef { digest: digest.into(), size: 7, mtime_ns: 0 };
            assert!(matches!(s.verified_object(&r), Err(StoreError::BadName { .. })));
            assert!(s.object_path(digest).is_err() && s.record_path(digest).is_err() && s.log_path(digest).is_err());
            s.invalidate(digest);
        }
        assert_eq!(fs::read(&victim).unwrap(), b"keep me");
    }

    #[test]
    fn an_unreadable_record_is_an_error_not_a_miss() {
        let d = tempfile::tempdir().unwrap();
        let s = Store::open(d.path()).unwrap();
        let key = "b".repeat(64);
        assert!(matches!(s.try_lookup(&key, false), Ok(Lookup::Missing)));
        // A folder where the record should be: reading it fails with something else than
        // "not found" (works as root too, unlike a chmod).
        fs::create_dir(s.record_path(&key).unwrap()).unwrap();
        assert!(matches!(s.try_lookup(&key, false), Err(StoreError::Io { .. })));
        assert!(s.read_record(&key).is_some_and(|r| r.is_err()));
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn records_respect_the_umask_and_objects_are_read_only() {
        use std::os::unix::fs::PermissionsExt;
        let status = fs::read_to_string("/proc/self/status").unwrap_or_default();
        let umask = status.lines().find_map(|l| l.strip_prefix("Umask:")).and_then(|u| u32::from_str_radix(u.trim(), 8).ok());
        let umask = umask.expect("Linux reports the umask in /proc/self/status");
        let d = tempfile::tempdir().unwrap();
        let s = Store::open(d.path()).unwrap();
        let rec = sample(&s);
        s.write_record(&rec).unwrap();
        let mode = |p: &Path| fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&s.record_path(&rec.key).unwrap()), 0o666 & !umask);
        assert_eq!(mode(&s.object_path(&rec.outputs["out"].digest).unwrap()) & 0o222, 0, "objects are read-only");
    }

    #[test]
    fn clean_tmp_removes_only_abandoned_scratch() {
        let d = tempfile::tempdir().unwrap();
        let s = Store::open(d.path()).unwrap();
        let (k1, k2) = ("c".repeat(64), "d".repeat(64));
        let held = super::super::lock::KeyLock::acquire(d.path(), &k1).unwrap();
        let live = s.scratch_dir(&k1).unwrap();
        let dead = s.scratch_dir(&k2).unwrap().keep();
        let young = s.tmp_dir().join(".tmpyoung");
        fs::write(&young, b"x").unwrap();
        assert_eq!(s.clean_tmp(GRACE), 1);
        assert!(live.path().exists() && !dead.exists() && young.exists());
        drop(held);
        assert_eq!(s.clean_tmp(Duration::ZERO), 2);
        assert!(!live.path().exists() && !young.exists());
    }

    #[cfg(unix)]
    #[test]
    fn a_linked_object_or_shard_is_never_followed() {
        let outside = tempfile::tempdir().unwrap();
        let d = tempfile::tempdir().unwrap();
        let s = Store::open(d.path()).unwrap();
        let digest = super::super::key::sha256_hex(b"x");
        let victim = outside.path().join(&digest[2..]);
        fs::write(&victim, b"x").unwrap();
        // objects/ab -> a folder outside the cache.
        std::os::unix::fs::symlink(outside.path(), d.path().join("objects").join(&digest[..2])).unwrap();
        let r = ObjectRef { digest: digest.clone(), size: 1, mtime_ns: 0 };
        assert!(matches!(s.verified_object(&r), Err(StoreError::NotAFile(_))));
        let src = s.tmp_dir().join("x");
        fs::write(&src, b"x").unwrap();
        assert!(s.put_file(&src).is_err(), "never stores through a link");
        assert!(s.objects().is_empty() && s.strays().len() == 1);
        assert_eq!(fs::read(&victim).unwrap(), b"x");
    }

    #[test]
    fn output_names_that_could_be_paths_make_a_record_corrupt() {
        let d = tempfile::tempdir().unwrap();
        let s = Store::open(d.path()).unwrap();
        let rec = sample(&s);
        s.write_record(&rec).unwrap();
        for name in ["../../../../tmp/x", "a/b", "a\\b", "..", "", "x\0y"] {
            edit_record(&s, &rec.key, true, |v| {
                let o = v["outputs"].as_object_mut().unwrap();
                let r = o.remove("out").or_else(|| o.values().next().cloned()).unwrap();
                o.clear();
                o.insert(name.to_string(), r);
            });
            match s.lookup(&rec.key, true) {
                Lookup::Corrupt(m) => assert!(m.contains("not a plain file name"), "{name:?}: {m}"),
                other => panic!("{name:?}: {other:?}"),
            }
        }
        assert!(is_output_name("model.safetensors") && is_output_name("metrics.json"));
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn a_fifo_record_or_sidecar_is_corrupt_and_never_opened() {
        let d = tempfile::tempdir().unwrap();
        let s = Store::open(d.path()).unwrap();
        let key = "f".repeat(64);
        let p = s.record_path(&key).unwrap();
        assert!(std::process::Command::new("mkfifo").arg(&p).status().unwrap().success());
        // Opening it would block forever.
        match s.try_lookup(&key, false) {
            Ok(Lookup::Corrupt(m)) => assert!(m.contains("not a regular file"), "{m}"),
            other => panic!("{other:?}"),
        }
        assert!(matches!(s.records()[0].1, Err(RecordError::Invalid { .. })));
        let side = s.sidecar_path("p", "l");
        fs::create_dir_all(side.parent().unwrap()).unwrap();
        assert!(std::process::Command::new("mkfifo").arg(&side).status().unwrap().success());
        assert!(s.read_sidecar("p", "l").is_none());
    }

    #[cfg(unix)]
    #[test]
    fn linked_cache_folders_are_refused_and_never_cleaned() {
        let outside = tempfile::tempdir().unwrap();
        let old = outside.path().join("old-file");
        fs::write(&old, b"keep").unwrap();
        let scratch = outside.path().join(format!("run-{}-X", "a".repeat(64)));
        fs::create_dir(&scratch).unwrap();
        let d = tempfile::tempdir().unwrap();
        let s = Store::open(d.path()).unwrap();
        fs::remove_dir(s.tmp_dir()).unwrap();
        std::os::unix::fs::symlink(outside.path(), s.tmp_dir()).unwrap();
        assert_eq!(s.clean_tmp(Duration::ZERO), 0);
        assert!(old.exists() && scratch.exists());
        let e = Store::open(d.path()).expect_err("a linked tmp/ is refused").to_string();
        assert!(e.contains("tmp") && e.contains("symbolic link"), "{e}");
        assert!(s.write_atomic(&d.path().join("actions").join("x"), b"x").is_err());
        for sub in ["objects", "actions", "names", "locks", "logs"] {
            let d = tempfile::tempdir().unwrap();
            std::os::unix::fs::symlink(outside.path(), d.path().join(sub)).unwrap();
            let e = Store::open(d.path()).expect_err("a linked folder is refused").to_string();
            assert!(e.contains(sub), "{e}");
        }
        assert_eq!(fs::read_dir(outside.path()).unwrap().count(), 2);
        // The Slurm executor's folders, and any folder on the way to a file written.
        for sub in ["slurm", "logs/slurm"] {
            let d = tempfile::tempdir().unwrap();
            let s = Store::open(d.path()).unwrap();
            std::os::unix::fs::symlink(outside.path(), d.path().join(sub)).unwrap();
            let e = Store::open(d.path()).expect_err("a linked Slurm folder is refused").to_string();
            assert!(e.contains(sub), "{e}");
            let deep = d.path().join(sub).join("jobs").join("x.json");
            assert!(s.write_atomic(&deep, b"x").is_err(), "{sub}: written through a link");
        }
        assert_eq!(fs::read_dir(outside.path()).unwrap().count(), 2);
    }

    /// Two records of one key that differ (a stage that is not bitwise deterministic).
    fn rival_records(s: &Store) -> (ActionRecord, ActionRecord) {
        let a = sample(s);
        let mut b = a.clone();
        b.metrics = serde_json::json!({"accuracy": 0.5});
        (a, b)
    }

    #[test]
    fn records_are_published_first_writer_wins() {
        for _ in 0..10 {
            let d = tempfile::tempdir().unwrap();
            let s = Store::open(d.path()).unwrap();
            let (a, b) = rival_records(&s);
            let barrier = std::sync::Barrier::new(2);
            let outcomes: Vec<(ActionRecord, Published)> = std::thread::scope(|sc| {
                let hs: Vec<_> = [&a, &b]
                    .into_iter()
                    .map(|r| {
                        let (s, barrier) = (&s, &barrier);
                        sc.spawn(move || {
                            barrier.wait();
                            (r.clone(), s.publish_record(r).unwrap())
                        })
                    })
                    .collect();
                hs.into_iter().map(|h| h.join().unwrap()).collect()
            });
            let winners: Vec<&ActionRecord> = outcomes.iter().filter(|o| matches!(o.1, Published::Written)).map(|o| &o.0).collect();
            assert_eq!(winners.len(), 1, "{outcomes:?}");
            let stored = s.load_record(&a.key).unwrap().unwrap();
            assert_eq!(&stored, winners[0], "the first writer's record stays");
            for (_, p) in &outcomes {
                if let Published::Kept(r) = p {
                    assert_eq!(**r, stored, "the loser is handed the winner's record");
                }
            }
            assert_eq!(fs::read_dir(s.tmp_dir()).unwrap().count(), 0, "no staged file left");
        }
    }

    #[test]
    fn a_forced_write_replaces_and_a_corrupt_record_is_replaced_by_a_publish() {
        let d = tempfile::tempdir().unwrap();
        let s = Store::open(d.path()).unwrap();
        let (a, b) = rival_records(&s);
        assert!(matches!(s.publish_record(&a).unwrap(), Published::Written));
        assert!(matches!(s.publish_record(&b).unwrap(), Published::Kept(r) if *r == a));
        s.write_record(&b).unwrap();
        assert_eq!(s.load_record(&a.key).unwrap().unwrap(), b, "--force replaces");
        edit_record(&s, &a.key, false, |v| v["metrics"]["accuracy"] = Json::from(0.99));
        assert!(matches!(s.publish_record(&a).unwrap(), Published::Written));
        assert_eq!(s.load_record(&a.key).unwrap().unwrap(), a);
    }

    #[test]
    fn a_published_record_whose_objects_are_gone_is_replaced_by_the_next_publisher() {
        let d = tempfile::tempdir().unwrap();
        let s = Store::open(d.path()).unwrap();
        let a = sample(&s);
        assert!(matches!(s.publish_record(&a).unwrap(), Published::Written));
        fs::remove_file(s.object_path(&a.outputs["out"].digest).unwrap()).unwrap();
        let mut b = a.clone();
        let src = s.tmp_dir().join("out2");
        fs::write(&src, b"other output bytes").unwrap();
        b.outputs.insert("out".into(), s.put_file(&src).unwrap());
        assert!(matches!(s.publish_record(&b).unwrap(), Published::Written), "a record without its objects was kept");
        assert_eq!(s.load_record(&a.key).unwrap().unwrap(), b);
        // With its objects in place, a record is kept as before.
        assert!(matches!(s.publish_record(&a).unwrap(), Published::Kept(r) if *r == b));
    }

    #[test]
    fn one_object_stored_by_two_writers_at_once_is_written_once() {
        let d = tempfile::tempdir().unwrap();
        let s = Store::open(d.path()).unwrap();
        let srcs: Vec<PathBuf> = (0..4).map(|i| s.tmp_dir().join(format!("o{i}"))).collect();
        for p in &srcs {
            fs::write(p, b"same bytes").unwrap();
        }
        let refs: Vec<ObjectRef> = std::thread::scope(|sc| {
            let hs: Vec<_> = srcs.iter().map(|p| sc.spawn(|| s.put_file(p).unwrap())).collect();
            hs.into_iter().map(|h| h.join().unwrap()).collect()
        });
        assert!(refs.windows(2).all(|w| w[0] == w[1]), "{refs:?}");
        assert_eq!(s.objects().len(), 1);
        assert!(s.verified_object(&refs[0]).is_ok());
        assert!(srcs.iter().all(|p| !p.exists()), "moved into the store");
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn scratch_on_another_filesystem_is_copied_in_whole() {
        use std::os::unix::fs::{MetadataExt, PermissionsExt};
        // /dev/shm is a tmpfs on Linux: another filesystem than the temporary folder's disk.
        let shm = tempfile::tempdir_in("/dev/shm").expect("/dev/shm exists on Linux");
        let d = tempfile::tempdir().unwrap();
        assert_ne!(fs::metadata(shm.path()).unwrap().dev(), fs::metadata(d.path()).unwrap().dev(), "the test needs two filesystems");
        let s = Store::open(d.path()).unwrap().with_scratch(shm.path().to_path_buf());
        let key = "a".repeat(64);
        let scratch = s.scratch_dir(&key).unwrap();
        assert!(scratch.path().starts_with(shm.path()), "{}", scratch.path().display());
        let out = scratch.path().join("out.bin");
        fs::write(&out, vec![7u8; 300_000]).unwrap();
        let r = s.put_file(&out).unwrap();
        let obj = s.object_path(&r.digest).unwrap();
        assert_eq!(fs::metadata(&obj).unwrap().dev(), fs::metadata(d.path()).unwrap().dev());
        assert_eq!(r.size, 300_000);
        assert!(s.verified_object(&r).is_ok() && !out.exists());
        assert_eq!(fs::metadata(&obj).unwrap().permissions().mode() & 0o222, 0, "read-only");
        assert_eq!(fs::read_dir(s.tmp_dir()).unwrap().count(), 0, "the copy became the object");
        // An abandoned scratch folder out there is cleaned like one in tmp/ (its key lock is free).
        let dead = s.scratch_dir(&key).unwrap().keep();
        let held = super::super::lock::KeyLock::acquire(d.path(), &"b".repeat(64)).unwrap();
        let live = s.scratch_dir(&"b".repeat(64)).unwrap();
        assert_eq!(s.clean_tmp(GRACE), 2, "the abandoned one and the scratch folder the test kept open");
        assert!(!dead.exists() && live.path().exists());
        drop((held, scratch));
    }

    #[test]
    fn a_copy_that_does_not_hash_to_its_digest_is_never_an_object() {
        let d = tempfile::tempdir().unwrap();
        let s = Store::open(d.path()).unwrap();
        let src = d.path().join("elsewhere");
        fs::write(&src, b"changed bytes").unwrap();
        let claimed = super::super::key::sha256_hex(b"original bytes");
        let dest = s.object_path(&claimed).unwrap();
        let e = s.copy_in(&src, &claimed, &dest, false).unwrap_err().to_string();
        assert!(e.contains("changed while it was stored"), "{e}");
        assert!(!dest.exists() && s.objects().is_empty());
        assert_eq!(fs::read_dir(s.tmp_dir()).unwrap().count(), 0);
    }

    #[test]
    fn nfs_silly_rename_files_are_never_listed_reported_or_removed() {
        let d = tempfile::tempdir().unwrap();
        let s = Store::open(d.path()).unwrap();
        let rec = sample(&s);
        s.write_record(&rec).unwrap();
        let shard = s.object_path(&rec.outputs["out"].digest).unwrap().parent().unwrap().to_path_buf();
        let silly = ".nfs000000000012345600000001";
        let places =
            [shard.join(silly), d.path().join("objects").join(silly), d.path().join("actions").join(silly), s.tmp_dir().join(silly)];
        for p in &places {
            fs::write(p, b"deleted while open").unwrap();
            let f = fs::File::options().write(true).open(p).unwrap();
            f.set_modified(SystemTime::now() - 2 * GRACE).unwrap();
        }
        assert!(s.strays().is_empty(), "{:?}", s.strays());
        assert_eq!(s.objects().len(), 1);
        assert_eq!(s.records().len(), 1);
        assert_eq!(s.clean_tmp(Duration::ZERO), 0);
        assert!(places.iter().all(|p| p.exists()));
    }
}
