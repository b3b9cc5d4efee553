//! Locks on the cache, in one of two modes chosen per process (see [`mode_for`]):
//!
//! - **flock** (a local disk): advisory `flock`s, released by the kernel when a process dies,
//!   so a `kill -9` never leaves a stale lock. A lock file that cannot be opened for writing
//!   (another user's file in a group-shared cache, a read-only mount) is opened read-only:
//!   `flock` needs no write access.
//! - **lease** (NFS, or several hosts): lease files with a heartbeat (`cache::lease`), because
//!   `flock` on NFS is emulated through lockd or is node-local depending on mount options.
//!   Stale leases (a dead process of this host at once; another host's after the TTL) are
//!   broken, so a killed process never leaves the cache locked either.
//!
//! The mode: [`set_mode`] (an executor that spreads one run over several hosts, such as the
//! Slurm executor, calls `cache::lock::set_mode(Locking::Lease)` before taking any lock), else
//! `CAMFLOW_LOCKING=flock|lease|auto`, default `auto`: lease when the cache is on NFS (statfs
//! magic 0x6969) or when a run holds a lease on it (`locks/runs/*.lease`: a Slurm run), else
//! flock. Every process sharing a cache must use the same mode; `auto`
//! gives that on its own, since they all see the same filesystem.
//!
//! - Per-key locks (`locks/<key>.lock` or `locks/<key>.lease`, exclusive): two runs sharing a
//!   cache compute each key once. The second waits on the lock, then finds the first one's
//!   record and reuses it. A key's scratch folder (`run-<key>-…`) exists only while its key
//!   lock is held.
//! - The cache lock (`locks/cache.lock`; in lease mode one lease per holder in `locks/runs/`
//!   and `locks/gc.lease`): `run` and `verify` hold it shared for their whole life, `gc`
//!   exclusive, so `gc` never removes a scratch folder, or an object stored before its record,
//!   from under a running job.

use std::fs::{File, TryLockError};
use std::io::ErrorKind;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU8, Ordering};
use std::time::Duration;

use super::lease::{self, Lease, Owner, Staleness};
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

/// How the cache is locked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Locking {
    /// `flock`: cheap, released by the kernel when a process dies; right on a local disk.
    Flock,
    /// Lease files with heartbeats (`cache::lease`): right on NFS and other shared filesystems.
    Lease,
    /// Lease on NFS (statfs magic 0x6969), flock elsewhere.
    Auto,
}

/// 0: not set (use `CAMFLOW_LOCKING`); else 1 + the index of a [`Locking`].
static FORCED: AtomicU8 = AtomicU8::new(0);

/// Chooses the locking of every cache this process opens from now on, over `CAMFLOW_LOCKING`.
/// An executor whose processes run on several hosts (Slurm) sets [`Locking::Lease`] before it
/// takes any lock; every process sharing a cache must use the same mode.
pub fn set_mode(m: Locking) {
    FORCED.store(1 + m as u8, Ordering::Relaxed);
}

/// The setting before resolution: [`set_mode`], else `CAMFLOW_LOCKING` (`flock`, `lease`,
/// `auto`; default `auto`).
pub fn setting() -> Result<Locking, String> {
    match FORCED.load(Ordering::Relaxed) {
        1 => return Ok(Locking::Flock),
        2 => return Ok(Locking::Lease),
        3 => return Ok(Locking::Auto),
        _ => {}
    }
    match std::env::var("CAMFLOW_LOCKING") {
        Err(_) => Ok(Locking::Auto),
        Ok(v) => parse_setting(&v),
    }
}

fn parse_setting(v: &str) -> Result<Locking, String> {
    match v.trim() {
        "flock" => Ok(Locking::Flock),
        "lease" => Ok(Locking::Lease),
        "auto" | "" => Ok(Locking::Auto),
        other => Err(format!("CAMFLOW_LOCKING={other:?}: expected flock, lease or auto")),
    }
}

/// True when `root` is on NFS (`statfs` f_type `NFS_SUPER_MAGIC`).
pub fn on_nfs(root: &Path) -> bool {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        use std::os::unix::ffi::OsStrExt;
        let Ok(c) = std::ffi::CString::new(root.as_os_str().as_bytes()) else { return false };
        let mut st: libc::statfs = unsafe { std::mem::zeroed() };
        // SAFETY: `c` is a NUL-terminated path and `st` a statfs the call fills in.
        if unsafe { libc::statfs(c.as_ptr(), &mut st) } == 0 {
            return st.f_type as i64 == 0x6969;
        }
    }
    let _ = root;
    false
}

/// The locking used for the cache at `root`: [`Locking::Flock`] or [`Locking::Lease`].
pub fn mode_for(root: &Path) -> StoreResult<Locking> {
    let bad = |m: String| StoreError::Io { path: root.to_path_buf(), source: std::io::Error::other(m) };
    let mode = match setting().map_err(bad)? {
        Locking::Auto => auto_mode(root),
        m => m,
    };
    if mode == Locking::Lease {
        lease::checked_ttl().map_err(bad)?;
    }
    Ok(mode)
}

/// `auto`: lease on NFS, and wherever a run holds a lease on this cache now (a Slurm run,
/// which always locks with leases, on a filesystem that is not NFS: a `gc`, `verify` or local
/// `run` started beside it must see its leases, not only `flock`s); else flock.
fn auto_mode(root: &Path) -> Locking {
    let leased = std::fs::read_dir(root.join("locks").join("runs"))
        .map(|d| d.flatten().any(|e| e.file_name().to_string_lossy().ends_with(".lease")))
        .unwrap_or(false);
    if leased || on_nfs(root) { Locking::Lease } else { Locking::Flock }
}

/// What holds a lock: a locked file, or a lease file.
enum Held {
    Flock(#[allow(dead_code)] File),
    Lease(#[allow(dead_code)] Lease),
    /// A reader of a cache it cannot write, in lease mode (see `CacheLeases::shared`).
    Nothing,
}

fn lease_io(p: &Path) -> impl FnOnce(std::io::Error) -> StoreError + '_ {
    move |source| StoreError::Io { path: p.to_path_buf(), source }
}

/// Where lease candidates and broken leases are put: the cache's tmp/ (same filesystem).
fn lease_scratch(root: &Path) -> PathBuf {
    root.join("tmp")
}

pub struct KeyLock {
    _held: Held,
}

fn key_lock_path(root: &Path, key: &str, ext: &str) -> StoreResult<PathBuf> {
    if !is_digest(key) {
        return Err(StoreError::BadName { what: "cache key", name: format!("{:?}", key.chars().take(80).collect::<String>()) });
    }
    Ok(root.join("locks").join(format!("{key}.{ext}")))
}

/// `Some` always when `wait`: the error for the impossible case keeps callers free of `expect`.
fn waited<T>(r: StoreResult<Option<T>>, p: PathBuf) -> StoreResult<T> {
    r?.ok_or_else(|| StoreError::Io { path: p, source: std::io::Error::other("lock not granted") })
}

impl KeyLock {
    /// Blocks until the lock on `key` is held.
    pub fn acquire(root: &Path, key: &str) -> StoreResult<KeyLock> {
        let mode = mode_for(root)?;
        waited(Self::take(root, key, mode, true), root.join("locks"))
    }

    /// The lock on `key` if no one holds it, else `None`.
    pub fn try_acquire(root: &Path, key: &str) -> StoreResult<Option<KeyLock>> {
        Self::take(root, key, mode_for(root)?, false)
    }

    /// The lock on `key` in the given mode; waits for it when `wait`.
    pub fn take(root: &Path, key: &str, mode: Locking, wait: bool) -> StoreResult<Option<KeyLock>> {
        if mode == Locking::Lease {
            let p = key_lock_path(root, key, "lease")?;
            locks_dir_ok(&p)?;
            let l = Lease::acquire(&p, &lease_scratch(root), lease::ttl(), wait).map_err(lease_io(&p))?;
            return Ok(l.map(|l| KeyLock { _held: Held::Lease(l) }));
        }
        let p = key_lock_path(root, key, "lock")?;
        let file = open_lock_file(&p)?;
        if wait {
            file.lock().map_err(io_at(&p))?;
            return Ok(Some(KeyLock { _held: Held::Flock(file) }));
        }
        Ok(try_locked(file.try_lock(), &p)?.then_some(KeyLock { _held: Held::Flock(file) }))
    }
}

/// Refuses a locks folder (or `locks/runs`) that is a link or a file.
fn locks_dir_ok(lease: &Path) -> StoreResult<()> {
    if let Some(parent) = lease.parent()
        && std::fs::symlink_metadata(parent).is_ok_and(|m| !m.is_dir())
    {
        return Err(not_a_lock_file(parent, "a link or a file where a locks folder should be"));
    }
    Ok(())
}

/// The cache-wide lock: shared for `run` and `verify`, exclusive for `gc`.
///
/// In lease mode, a shared holder is a lease file of its own in `locks/runs/`; the exclusive
/// holder is `locks/gc.lease`. A run creates its lease and then looks for a live gc lease; gc
/// creates its lease and then looks for live run leases: whichever comes second sees the
/// other, so they never both proceed. Stale leases of either kind are broken on the way.
pub struct CacheLock {
    _held: Held,
}

/// Leases of a cache in lease mode.
struct CacheLeases {
    gc: PathBuf,
    runs: PathBuf,
    scratch: PathBuf,
    ttl: Duration,
}

/// How long a waiting lease holder sleeps between looks.
const POLL: Duration = Duration::from_millis(200);

impl CacheLeases {
    fn of(root: &Path) -> StoreResult<CacheLeases> {
        let locks = root.join("locks");
        let runs = locks.join("runs");
        locks_dir_ok(&runs)?;
        locks_dir_ok(&runs.join("x"))?;
        if std::fs::symlink_metadata(&runs).is_err() {
            match std::fs::create_dir_all(&runs) {
                // A cache this user cannot write: it may still read (see `shared`).
                Err(e) if matches!(e.kind(), ErrorKind::PermissionDenied | ErrorKind::ReadOnlyFilesystem) => {}
                r => r.map_err(io_at(&runs))?,
            }
        }
        Ok(CacheLeases { gc: locks.join("gc.lease"), runs, scratch: lease_scratch(root), ttl: lease::ttl() })
    }

    /// True when a live gc holds the cache (a stale gc lease is broken).
    fn gc_live(&self) -> StoreResult<bool> {
        let me = Owner::me();
        Ok(lease::break_if_stale(&self.gc, &self.scratch, &me, self.ttl).map_err(lease_io(&self.gc))? == Some(Staleness::Live))
    }

    /// The holders of live run leases (stale ones are broken).
    fn live_runs(&self) -> StoreResult<Vec<Owner>> {
        let me = Owner::me();
        let mut live = Vec::new();
        for e in std::fs::read_dir(&self.runs).map_err(io_at(&self.runs))?.flatten() {
            let name = e.file_name();
            if lease::is_nfs_silly(&name) || !name.to_string_lossy().ends_with(".lease") {
                continue;
            }
            let p = e.path();
            match lease::read(&p).map_err(lease_io(&p))? {
                None => {}
                Some(seen) => match lease::judge(&seen, &me, self.ttl) {
                    Staleness::Live => live.push(seen.owner.unwrap_or_else(|| unknown_owner(&p))),
                    _ => {
                        if lease::remove_if_unchanged(&p, &seen, &self.scratch).map_err(lease_io(&p))? == lease::Removed::Changed {
                            live.push(seen.owner.unwrap_or_else(|| unknown_owner(&p)));
                        }
                    }
                },
            }
        }
        Ok(live)
    }

    /// Breaks the stale key leases killed runs left (each would otherwise wait for the next
    /// run of its key); best effort, live ones are kept.
    fn sweep_key_leases(&self) {
        let (Some(locks), me) = (self.gc.parent(), Owner::me()) else { return };
        for e in std::fs::read_dir(locks).into_iter().flatten().flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if name.strip_suffix(".lease").is_some_and(is_digest) {
                let _ = lease::break_if_stale(&e.path(), &self.scratch, &me, self.ttl);
            }
        }
    }

    fn shared(&self, wait: bool) -> StoreResult<Option<Held>> {
        loop {
            if !self.gc_live()? {
                let name = format!("{}-{}-{}.lease", sanitize(&Owner::me().host), std::process::id(), unique_suffix());
                let p = self.runs.join(name);
                let me = Owner::me();
                let run = match Lease::try_create(&p, &self.scratch, &me, self.ttl) {
                    Ok(run) => run,
                    // A cache this user cannot write (a read-only mount, another user's cache):
                    // it can only read, and reads are verified, so it goes on without a lease,
                    // as a read-only `flock` holder would.
                    Err(e) if matches!(e.kind(), ErrorKind::PermissionDenied | ErrorKind::ReadOnlyFilesystem) => {
                        return Ok(Some(Held::Nothing));
                    }
                    Err(e) => return Err(lease_io(&p)(e)),
                };
                // Looked at again after creating ours: a gc that started meanwhile sees our lease
                // or we see its.
                if let Some(run) = run
                    && !self.gc_live()?
                {
                    // Sweep the leases of killed runs, so they do not pile up between gcs.
                    let _ = self.live_runs();
                    return Ok(Some(Held::Lease(run)));
                }
            }
            if !wait {
                return Ok(None);
            }
            std::thread::sleep(POLL);
        }
    }

    fn exclusive(&self, wait: bool) -> StoreResult<Option<Lease>> {
        let Some(gc) = Lease::acquire(&self.gc, &self.scratch, self.ttl, wait).map_err(lease_io(&self.gc))? else { return Ok(None) };
        // Held while waiting, so new runs wait for this gc instead of starving it.
        loop {
            if self.live_runs()?.is_empty() {
                self.sweep_key_leases();
                return Ok(Some(gc));
            }
            if !wait {
                return Ok(None);
            }
            std::thread::sleep(POLL);
        }
    }
}

fn unknown_owner(p: &Path) -> Owner {
    Owner {
        host: format!("(unreadable lease {})", p.display()),
        boot: String::new(),
        pid: 0,
        pid_start: 0,
        job: String::new(),
        started_ms: 0,
    }
}

fn unique_suffix() -> String {
    static N: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let t = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0);
    format!("{t:x}-{}", N.fetch_add(1, Ordering::Relaxed))
}

fn sanitize(s: &str) -> String {
    s.chars().map(|c| if c.is_ascii_alphanumeric() || c == '-' || c == '.' { c } else { '_' }).take(64).collect()
}

impl CacheLock {
    pub fn path(root: &Path) -> PathBuf {
        root.join("locks").join("cache.lock")
    }

    fn take(root: &Path, shared: bool, wait: bool) -> StoreResult<Option<CacheLock>> {
        Self::take_in(root, mode_for(root)?, shared, wait)
    }

    /// The cache lock in the given mode (`Flock` or `Lease`): shared or exclusive, waiting or not.
    pub fn take_in(root: &Path, mode: Locking, shared: bool, wait: bool) -> StoreResult<Option<CacheLock>> {
        if mode == Locking::Lease {
            let leases = CacheLeases::of(root)?;
            let l = if shared { leases.shared(wait)? } else { leases.exclusive(wait)?.map(Held::Lease) };
            return Ok(l.map(|l| CacheLock { _held: l }));
        }
        let p = Self::path(root);
        let file = open_lock_file(&p)?;
        let got = match (shared, wait) {
            (true, true) => file.lock_shared().map(|()| true).map_err(io_at(&p))?,
            (false, true) => file.lock().map(|()| true).map_err(io_at(&p))?,
            (true, false) => try_locked(file.try_lock_shared(), &p)?,
            (false, false) => try_locked(file.try_lock(), &p)?,
        };
        Ok(got.then_some(CacheLock { _held: Held::Flock(file) }))
    }

    /// Blocks until a shared hold is granted (that is, until no `gc` holds it).
    pub fn shared(root: &Path) -> StoreResult<CacheLock> {
        waited(Self::take(root, true, true), Self::path(root))
    }

    pub fn try_shared(root: &Path) -> StoreResult<Option<CacheLock>> {
        Self::take(root, true, false)
    }

    /// Blocks until no one else holds the lock.
    pub fn exclusive(root: &Path) -> StoreResult<CacheLock> {
        waited(Self::take(root, false, true), Self::path(root))
    }

    pub fn try_exclusive(root: &Path) -> StoreResult<Option<CacheLock>> {
        Self::take(root, false, false)
    }

    /// Who holds the cache shared, for a message: in lease mode the live run leases (host, pid,
    /// Slurm job), else the lock file.
    pub fn holders(root: &Path) -> String {
        Self::holders_in(root, mode_for(root).unwrap_or(Locking::Flock))
    }

    fn holders_in(root: &Path, mode: Locking) -> String {
        if mode == Locking::Lease
            && let Ok(leases) = CacheLeases::of(root)
            && let Ok(live) = leases.live_runs()
            && !live.is_empty()
        {
            let who: Vec<String> =
                live.iter()
                    .map(|o| {
                        if o.job.is_empty() {
                            format!("{} pid {}", o.host, o.pid)
                        } else {
                            format!("{} pid {} job {}", o.host, o.pid, o.job)
                        }
                    })
                    .collect();
            return format!("run leases in {}: {}", leases.runs.display(), who.join(", "));
        }
        Self::path(root).display().to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn auto_follows_the_leases_of_runs_in_progress() {
        let d = tempfile::tempdir().unwrap();
        assert_eq!(auto_mode(d.path()), Locking::Flock);
        let runs = d.path().join("locks").join("runs");
        std::fs::create_dir_all(&runs).unwrap();
        std::fs::write(runs.join("notes.txt"), b"").unwrap();
        assert_eq!(auto_mode(d.path()), Locking::Flock);
        std::fs::write(runs.join("vm-1234.lease"), b"").unwrap();
        assert_eq!(auto_mode(d.path()), Locking::Lease);
    }

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

    fn lease_cache() -> tempfile::TempDir {
        let d = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(d.path().join("locks")).unwrap();
        std::fs::create_dir_all(d.path().join("tmp")).unwrap();
        d
    }

    fn lease_lock(root: &Path, shared: bool) -> Option<CacheLock> {
        CacheLock::take_in(root, Locking::Lease, shared, false).unwrap()
    }

    /// A lease file as a process of this host that has exited would have left it.
    fn plant_dead(p: &Path) {
        let mut c = std::process::Command::new("true").spawn().unwrap();
        let pid = c.id();
        c.wait().unwrap();
        let me = Owner::me();
        let text = format!(
            "camflow lease v1\nhost={}\nboot={}\npid={pid}\npid_start=1\njob=\nstarted_ms=0\nheartbeat_ms={:020}\n",
            me.host,
            me.boot,
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis()
        );
        std::fs::write(p, text).unwrap();
    }

    #[test]
    fn in_lease_mode_runs_share_and_gc_excludes_them() {
        let d = lease_cache();
        let a = lease_lock(d.path(), true).expect("first run");
        let b = lease_lock(d.path(), true).expect("second run");
        assert_eq!(std::fs::read_dir(d.path().join("locks/runs")).unwrap().count(), 2, "one lease per run");
        assert!(lease_lock(d.path(), false).is_none(), "gc must wait for runs");
        assert!(!d.path().join("locks/gc.lease").exists(), "a gc that gave up leaves no lease");
        let who = CacheLock::holders_in(d.path(), Locking::Lease);
        assert!(who.contains(&format!("pid {}", std::process::id())) && who.contains("run leases"), "{who}");
        drop((a, b));
        let gc = lease_lock(d.path(), false).expect("free");
        assert!(lease_lock(d.path(), true).is_none(), "a run must wait for gc");
        assert_eq!(std::fs::read_dir(d.path().join("locks/runs")).unwrap().count(), 0, "a run that gave up leaves no lease");
        // A waiting run gets in once gc is done.
        std::thread::scope(|s| {
            let waiter = s.spawn(|| CacheLock::take_in(d.path(), Locking::Lease, true, true).unwrap().is_some());
            std::thread::sleep(Duration::from_millis(300));
            drop(gc);
            assert!(waiter.join().unwrap());
        });
    }

    #[test]
    fn leases_of_killed_runs_and_a_killed_gc_block_nothing() {
        let d = lease_cache();
        std::fs::create_dir_all(d.path().join("locks/runs")).unwrap();
        plant_dead(&d.path().join("locks/runs/dead.lease"));
        // A silly-renamed file in the runs folder is not a run.
        std::fs::write(d.path().join("locks/runs/.nfs0000000000abcdef00000001"), b"x").unwrap();
        let gc = lease_lock(d.path(), false).expect("a dead run's lease is broken");
        assert!(!d.path().join("locks/runs/dead.lease").exists());
        assert!(d.path().join("locks/runs/.nfs0000000000abcdef00000001").exists(), "never removed");
        drop(gc);
        plant_dead(&d.path().join("locks/gc.lease"));
        assert!(lease_lock(d.path(), true).is_some(), "a dead gc's lease is broken");
        let dead_key = key_lock_path(d.path(), &"d".repeat(64), "lease").unwrap();
        plant_dead(&dead_key);
        let live = KeyLock::take(d.path(), &"e".repeat(64), Locking::Lease, false).unwrap().expect("free");
        drop(lease_lock(d.path(), false).expect("gc"));
        assert!(!dead_key.exists(), "gc sweeps the key leases of dead processes");
        assert!(key_lock_path(d.path(), &"e".repeat(64), "lease").unwrap().exists(), "and keeps live ones");
        drop(live);
        let k = "c".repeat(64);
        plant_dead(&key_lock_path(d.path(), &k, "lease").unwrap());
        let held = KeyLock::take(d.path(), &k, Locking::Lease, false).unwrap().expect("a dead holder's key lease is broken");
        assert!(KeyLock::take(d.path(), &k, Locking::Lease, false).unwrap().is_none());
        drop(held);
        assert!(KeyLock::take(d.path(), &k, Locking::Lease, false).unwrap().is_some());
    }

    #[test]
    fn the_locking_setting_is_checked() {
        assert_eq!(parse_setting("lease"), Ok(Locking::Lease));
        assert_eq!(parse_setting(" flock "), Ok(Locking::Flock));
        assert_eq!(parse_setting(""), Ok(Locking::Auto));
        assert!(parse_setting("nfs").unwrap_err().contains("expected flock, lease or auto"));
        // A local temporary folder is not NFS.
        assert!(!on_nfs(&std::env::temp_dir()));
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
