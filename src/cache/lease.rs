//! Lease files: locks that hold on a shared filesystem (NFS) where `flock` cannot be trusted.
//!
//! On NFS, `flock` is either emulated through the lock daemon (lockd/NLM, lost when the server
//! restarts, hangs when lockd is unreachable) or node-local (`local_lock=flock`: two nodes both
//! "hold" it). A lease is a plain file whose *existence* is the lock, created atomically, with
//! what it takes to tell a live holder from a dead one:
//!
//! ```text
//! camflow lease v1
//! host=node17            who holds it (hostname, boot id and pid namespace: a rebooted host,
//! boot=0c2f…/pid:[4026…]   or a container with its own pids, is another host)
//! pid=4242               its process, and the process's start time (a reused pid is not it)
//! pid_start=881234
//! job=123456             $SLURM_JOB_ID, for humans
//! started_ms=17…
//! heartbeat_ms=0000017…  refreshed in place every `ttl / 6` by a background thread
//! ```
//!
//! - **Creation** is atomic and complete: the content is written and fsynced to a unique
//!   candidate file in the cache's `tmp/`, then `link()`ed to the lease's name; `link` fails if
//!   the name exists, on NFS too (unlike `O_EXCL` on old clients). A lost NFS reply that turns a
//!   successful link into `EEXIST` is recognised by the candidate's link count.
//! - **Heartbeat**: the holder keeps the file open and rewrites the fixed-width heartbeat in
//!   place through its descriptor (never by path, so it can never write over someone else's
//!   lease), then fsyncs so other NFS clients see it when they next open the file.
//! - **Stale**: a lease of this host (same hostname and boot id) is stale as soon as its process
//!   is dead (`/proc/<pid>` gone, a zombie, or another process under that pid); a lease of
//!   another host only once its heartbeat is older than the TTL (60 s; `CAMFLOW_LEASE_TTL` in
//!   seconds, or [`set_ttl`]). Unreadable content counts as a foreign lease whose heartbeat is
//!   its file's mtime. Hosts' clocks must agree to well within the TTL (NTP on a cluster).
//! - **Breaking** is race-free between breakers: the breaker renames the lease to a unique name
//!   in `tmp/` (only one rename can move a given file) and then checks that what it moved is
//!   the very lease it judged stale (same inode, same bytes, so also no heartbeat since). If it
//!   is not (another breaker won and a new holder created a fresh lease, or the holder woke
//!   up), it puts the file back with `link()`, which never replaces anything. The one window
//!   left: a third process creating the lease between that rename and that link; the moved
//!   holder then notices on its next heartbeat that it lost the lease (see [`Lease::is_lost`]).
//!   Camflow's callers tolerate that: records are published first-writer-wins and objects are
//!   content-addressed, so the worst case is a key computed twice, never a wrong entry.
//! - **Release** removes the file only if it is still this holder's (same check as breaking).
//!
//! Readers always `open()` a lease before looking at it: NFS revalidates attributes and data on
//! open (close-to-open consistency), whereas a bare `stat` may be served from a cache up to a
//! minute old.
//!
//! Files whose names start with `.nfs` are NFS "silly renames" (a file deleted while still open
//! on some client); see [`is_nfs_silly`].

use crate::host::{self, Process};
use std::ffi::OsStr;
use std::fs::File;
use std::io::{ErrorKind, Read};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

const MAGIC: &str = "camflow lease v1";
/// Digits of the heartbeat field: fixed, so the holder rewrites it in place without changing
/// the file's length (a reader never sees a half-written line of another length).
const BEAT_DIGITS: usize = 20;

/// The default time after which a foreign host's lease with no heartbeat is stale.
pub const DEFAULT_TTL: Duration = Duration::from_secs(60);

/// 0: not set by [`set_ttl`]; read `CAMFLOW_LEASE_TTL` or use [`DEFAULT_TTL`].
static TTL_MS: AtomicU64 = AtomicU64::new(0);

/// Sets the lease TTL for this process (tests, or an executor that knows its cluster).
pub fn set_ttl(ttl: Duration) {
    TTL_MS.store(ttl.as_millis().clamp(1, u64::MAX as u128) as u64, Ordering::Relaxed);
}

/// The lease TTL: [`set_ttl`], else `CAMFLOW_LEASE_TTL` (seconds, may be fractional), else 60 s;
/// an error naming the variable when it is not a positive number.
pub fn checked_ttl() -> Result<Duration, String> {
    match TTL_MS.load(Ordering::Relaxed) {
        0 => match std::env::var("CAMFLOW_LEASE_TTL") {
            Err(_) => Ok(DEFAULT_TTL),
            Ok(v) => parse_ttl(&v),
        },
        ms => Ok(Duration::from_millis(ms)),
    }
}

fn parse_ttl(v: &str) -> Result<Duration, String> {
    v.trim()
        .parse::<f64>()
        .ok()
        .filter(|s| s.is_finite() && *s > 0.0 && *s < 1e9)
        .map(Duration::from_secs_f64)
        .ok_or_else(|| format!("CAMFLOW_LEASE_TTL={v:?}: expected a number of seconds above 0, such as 60"))
}

/// [`checked_ttl`], with the default where the setting is bad (`lock::mode_for` reports it).
pub fn ttl() -> Duration {
    checked_ttl().unwrap_or(DEFAULT_TTL)
}

/// How often a holder refreshes its heartbeat: six beats per TTL, so a few slow writes on a
/// loaded file server never let a live lease look stale.
fn beat_every(ttl: Duration) -> Duration {
    (ttl / 6).max(Duration::from_millis(5))
}

/// True for an NFS silly-rename file (`.nfs` followed by hex digits): a file deleted while a
/// client still had it open. It vanishes when that client closes it; deleting it from another
/// client would break the reader, and it is never corruption. camflow writes no name like it.
pub fn is_nfs_silly(name: &OsStr) -> bool {
    name.as_encoded_bytes().starts_with(b".nfs")
}

fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

/// Who holds a lease.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Owner {
    pub host: String,
    /// `/proc/sys/kernel/random/boot_id` and the pid namespace (`/proc/self/ns/pid`): empty
    /// parts where unknown.
    pub boot: String,
    pub pid: u32,
    /// The process's start time in clock ticks since boot (`/proc/<pid>/stat`, field 22); 0
    /// where unknown.
    pub pid_start: u64,
    pub job: String,
    pub started_ms: u64,
}

/// Keeps a value on one line of the lease file.
fn one_line(s: &str) -> String {
    s.chars().map(|c| if c.is_control() || c == '=' { '_' } else { c }).take(200).collect()
}

impl Owner {
    /// This process.
    pub fn me() -> Owner {
        let p = Process::me();
        Owner {
            host: one_line(&p.host),
            boot: one_line(&p.boot),
            pid: p.pid,
            pid_start: p.pid_start,
            job: one_line(&std::env::var("SLURM_JOB_ID").unwrap_or_default()),
            started_ms: now_ms(),
        }
    }

    /// The holding process, as [`crate::host`] judges processes.
    fn process(&self) -> Process {
        Process { host: self.host.clone(), boot: self.boot.clone(), pid: self.pid, pid_start: self.pid_start }
    }

    fn text(&self, beat_ms: u64) -> String {
        format!(
            "{MAGIC}\nhost={}\nboot={}\npid={}\npid_start={}\njob={}\nstarted_ms={}\nheartbeat_ms={:0w$}\n",
            self.host,
            self.boot,
            self.pid,
            self.pid_start,
            self.job,
            self.started_ms,
            beat_ms,
            w = BEAT_DIGITS
        )
    }
}

/// A lease file as a reader saw it.
#[derive(Debug, Clone)]
pub struct Seen {
    /// `None` when the content is not a lease (damaged, or written by something else).
    pub owner: Option<Owner>,
    /// The heartbeat, or the file's mtime when the content could not be read.
    pub beat_ms: u64,
    dev: u64,
    ino: u64,
    bytes: Vec<u8>,
}

fn parse(bytes: &[u8]) -> Option<(Owner, u64)> {
    let text = std::str::from_utf8(bytes).ok()?;
    let mut lines = text.lines();
    if lines.next()? != MAGIC {
        return None;
    }
    let mut f = std::collections::BTreeMap::new();
    for l in lines {
        let (k, v) = l.split_once('=')?;
        f.insert(k, v);
    }
    let num = |k: &str| f.get(k).and_then(|v| v.parse::<u64>().ok());
    let owner = Owner {
        host: f.get("host")?.to_string(),
        boot: f.get("boot")?.to_string(),
        pid: u32::try_from(num("pid")?).ok()?,
        pid_start: num("pid_start")?,
        job: f.get("job").map(|s| s.to_string()).unwrap_or_default(),
        started_ms: num("started_ms")?,
    };
    Some((owner, num("heartbeat_ms")?))
}

#[cfg(unix)]
fn dev_ino(m: &std::fs::Metadata) -> (u64, u64) {
    use std::os::unix::fs::MetadataExt;
    (m.dev(), m.ino())
}

#[cfg(not(unix))]
fn dev_ino(_: &std::fs::Metadata) -> (u64, u64) {
    (0, 0)
}

fn open_no_follow(p: &Path) -> std::io::Result<File> {
    let mut o = File::options();
    o.read(true);
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        use std::os::unix::fs::OpenOptionsExt;
        // O_NONBLOCK: a FIFO put in place of a lease never hangs the open.
        o.custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK);
    }
    // Checked before opening too, for platforms without O_NOFOLLOW.
    if std::fs::symlink_metadata(p).is_ok_and(|m| m.file_type().is_symlink()) {
        return Err(std::io::Error::new(ErrorKind::InvalidInput, "is a symbolic link"));
    }
    o.open(p)
}

/// Reads the lease at `p`; `Ok(None)` when there is none. Anything but a regular file is an
/// error naming it (links in the cache are never followed).
pub fn read(p: &Path) -> std::io::Result<Option<Seen>> {
    let mut f = match open_no_follow(p) {
        Ok(f) => f,
        Err(e) if e.kind() == ErrorKind::NotFound => return Ok(None),
        Err(e) if std::fs::symlink_metadata(p).is_ok_and(|m| m.file_type().is_symlink()) => {
            return Err(std::io::Error::new(
                e.kind(),
                "is a symbolic link, not a lease (links in the cache are never followed); remove it",
            ));
        }
        Err(e) => return Err(e),
    };
    let meta = f.metadata()?;
    if !meta.is_file() {
        return Err(std::io::Error::other("is not a regular file, not a lease; remove it"));
    }
    let mut bytes = Vec::new();
    f.by_ref().take(4096).read_to_end(&mut bytes)?;
    let (dev, ino) = dev_ino(&meta);
    let mtime = meta.modified().ok().and_then(|t| t.duration_since(UNIX_EPOCH).ok()).map(|d| d.as_millis() as u64).unwrap_or(0);
    Ok(Some(match parse(&bytes) {
        Some((owner, beat_ms)) => Seen { owner: Some(owner), beat_ms, dev, ino, bytes },
        None => Seen { owner: None, beat_ms: mtime, dev, ino, bytes },
    }))
}

/// Why a lease may be broken.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Staleness {
    Live,
    /// Held on this host by a process that no longer exists.
    DeadProcess,
    /// No heartbeat for longer than the TTL (another host, or a process that cannot be checked).
    Silent,
}

/// Judges a lease as seen, by the rules of the module doc.
pub fn judge(seen: &Seen, me: &Owner, ttl: Duration) -> Staleness {
    if let Some(o) = &seen.owner {
        match o.process().alive_seen_from(&me.process()) {
            Some(false) => return Staleness::DeadProcess,
            Some(true) => return Staleness::Live,
            None => {}
        }
    }
    // A heartbeat in the future (a clock ahead of ours) is as fresh as now.
    if now_ms().saturating_sub(seen.beat_ms) > ttl.as_millis() as u64 {
        return Staleness::Silent;
    }
    Staleness::Live
}

/// A unique name in `dir` for a candidate or a broken lease (`.lease-` prefix: `clean_tmp`
/// removes those a crash left behind after its grace period).
fn unique_in(dir: &Path, what: &str) -> PathBuf {
    static N: AtomicU64 = AtomicU64::new(0);
    let n = N.fetch_add(1, Ordering::Relaxed);
    dir.join(format!(".lease-{what}-{}-{}-{n}-{}", host::segment(&host::name(), "unknown"), std::process::id(), now_ms()))
}

/// Outcome of removing a lease that was judged in a given state.
#[derive(Debug, PartialEq, Eq)]
pub enum Removed {
    /// The very file judged was removed.
    Yes,
    /// The lease had changed (a new holder, a heartbeat): it was put back, or never touched.
    Changed,
    /// No lease there any more.
    Gone,
}

/// Removes the lease at `p` only if it is still exactly `seen` (same file, same bytes): rename
/// to a unique name in `scratch`, check, then delete or put back. See the module doc.
pub fn remove_if_unchanged(p: &Path, seen: &Seen, scratch: &Path) -> std::io::Result<Removed> {
    let moved = unique_in(scratch, "broken");
    match std::fs::rename(p, &moved) {
        Ok(()) => {}
        Err(e) if e.kind() == ErrorKind::NotFound => return Ok(Removed::Gone),
        Err(e) => return Err(e),
    }
    let now = read(&moved)?;
    let same = now.as_ref().is_some_and(|n| n.dev == seen.dev && n.ino == seen.ino && n.bytes == seen.bytes);
    if !same {
        // Not ours to break: put it back without replacing anything that appeared meanwhile.
        let _ = std::fs::hard_link(&moved, p);
        let _ = std::fs::remove_file(&moved);
        return Ok(Removed::Changed);
    }
    std::fs::remove_file(&moved)?;
    Ok(Removed::Yes)
}

/// Reads the lease at `p` and removes it if it is stale; returns the verdict (`None`: no lease).
pub fn break_if_stale(p: &Path, scratch: &Path, me: &Owner, ttl: Duration) -> std::io::Result<Option<Staleness>> {
    let Some(seen) = read(p)? else { return Ok(None) };
    match judge(&seen, me, ttl) {
        Staleness::Live => Ok(Some(Staleness::Live)),
        s => match remove_if_unchanged(p, &seen, scratch)? {
            Removed::Yes | Removed::Gone => Ok(Some(s)),
            Removed::Changed => Ok(Some(Staleness::Live)),
        },
    }
}

/// A held lease. Dropping it stops the heartbeat and removes the file if it is still ours.
pub struct Lease {
    path: PathBuf,
    scratch: PathBuf,
    /// Kept open: the heartbeat thread writes through it.
    _file: Arc<File>,
    dev_ino: (u64, u64),
    lost: Arc<AtomicBool>,
    stop: Option<mpsc::Sender<()>>,
    beat: Option<std::thread::JoinHandle<()>>,
}

/// Writes a complete candidate lease file in `scratch` and returns it open, with its path.
fn candidate(scratch: &Path, me: &Owner) -> std::io::Result<(File, PathBuf)> {
    let p = unique_in(scratch, "new");
    let mut o = File::options();
    o.read(true).write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        o.mode(0o666);
    }
    let f = o.open(&p)?;
    let written = (|| {
        use std::io::Write;
        (&f).write_all(me.text(now_ms()).as_bytes())?;
        f.sync_all()
    })();
    if let Err(e) = written {
        let _ = std::fs::remove_file(&p);
        return Err(e);
    }
    Ok((f, p))
}

#[cfg(unix)]
fn link_count(f: &File) -> u64 {
    use std::os::unix::fs::MetadataExt;
    f.metadata().map(|m| m.nlink()).unwrap_or(0)
}

#[cfg(not(unix))]
fn link_count(_: &File) -> u64 {
    0
}

impl Lease {
    /// Creates the lease `p` if no one holds it (`Ok(None)` when someone does); candidates are
    /// written in `scratch`, which must be on the same filesystem.
    pub fn try_create(p: &Path, scratch: &Path, me: &Owner, ttl: Duration) -> std::io::Result<Option<Lease>> {
        let (file, cand) = candidate(scratch, me)?;
        let linked = match std::fs::hard_link(&cand, p) {
            Ok(()) => Ok(true),
            // NFS: a retransmitted link whose first try succeeded answers EEXIST.
            Err(e) if e.kind() == ErrorKind::AlreadyExists => Ok(link_count(&file) == 2),
            Err(e) => Err(e),
        };
        let _ = std::fs::remove_file(&cand);
        if !linked? {
            return Ok(None);
        }
        let dev_ino = dev_ino(&file.metadata()?);
        Ok(Some(Lease::hold(p.to_path_buf(), scratch.to_path_buf(), file, dev_ino, ttl)))
    }

    /// Takes the lease `p`, breaking a stale one. With `wait`, polls until it is free;
    /// without, returns `Ok(None)` while a live holder has it.
    pub fn acquire(p: &Path, scratch: &Path, ttl: Duration, wait: bool) -> std::io::Result<Option<Lease>> {
        let me = Owner::me();
        let mut pause = Duration::from_millis(10);
        loop {
            if let Some(l) = Lease::try_create(p, scratch, &me, ttl)? {
                return Ok(Some(l));
            }
            match break_if_stale(p, scratch, &me, ttl)? {
                // Gone or broken: try again at once.
                None | Some(Staleness::DeadProcess | Staleness::Silent) => continue,
                Some(Staleness::Live) if !wait => return Ok(None),
                Some(Staleness::Live) => {}
            }
            std::thread::sleep(pause);
            pause = (pause * 2).min(Duration::from_millis(500));
        }
    }

    fn hold(path: PathBuf, scratch: PathBuf, file: File, ours: (u64, u64), ttl: Duration) -> Lease {
        let file = Arc::new(file);
        let lost = Arc::new(AtomicBool::new(false));
        let (stop, stopped) = mpsc::channel::<()>();
        let beat = {
            let (file, lost, path) = (file.clone(), lost.clone(), path.clone());
            std::thread::Builder::new().name("camflow-lease".into()).spawn(move || {
                let every = beat_every(ttl);
                while let Err(mpsc::RecvTimeoutError::Timeout) = stopped.recv_timeout(every) {
                    if let Err(e) = heartbeat(&file) {
                        tracing::warn!("lease {}: heartbeat failed: {e}", path.display());
                    }
                    let still_ours = open_no_follow(&path).and_then(|f| f.metadata()).is_ok_and(|m| dev_ino(&m) == ours);
                    if !still_ours && !lost.swap(true, Ordering::Relaxed) {
                        tracing::warn!("lease {} was broken by another process (this one was judged dead or silent)", path.display());
                    }
                }
            })
        };
        Lease { path, scratch, _file: file, dev_ino: ours, lost, stop: Some(stop), beat: beat.ok() }
    }

    /// The lease's file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// True once a heartbeat found the lease file replaced or removed by another process.
    pub fn is_lost(&self) -> bool {
        self.lost.load(Ordering::Relaxed)
    }
}

/// Rewrites the heartbeat field in place through the held descriptor, then syncs it.
fn heartbeat(f: &File) -> std::io::Result<()> {
    let len = f.metadata()?.len();
    let at = len.checked_sub(BEAT_DIGITS as u64 + 1).ok_or_else(|| std::io::Error::other("lease file too short"))?;
    let digits = format!("{:0w$}", now_ms(), w = BEAT_DIGITS);
    #[cfg(unix)]
    {
        use std::os::unix::fs::FileExt;
        f.write_all_at(digits.as_bytes(), at)?;
    }
    #[cfg(not(unix))]
    let _ = (at, digits);
    f.sync_data()
}

impl Drop for Lease {
    fn drop(&mut self) {
        drop(self.stop.take());
        if let Some(t) = self.beat.take() {
            let _ = t.join();
        }
        // Remove it only if the file under our name is still ours (a breaker may have replaced it).
        if let Ok(Some(seen)) = read(&self.path)
            && (seen.dev, seen.ino) == self.dev_ino
        {
            let _ = remove_if_unchanged(&self.path, &seen, &self.scratch);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Dirs {
        _d: tempfile::TempDir,
        locks: PathBuf,
        tmp: PathBuf,
    }

    fn dirs() -> Dirs {
        let d = tempfile::tempdir().unwrap();
        let (locks, tmp) = (d.path().join("locks"), d.path().join("tmp"));
        std::fs::create_dir_all(&locks).unwrap();
        std::fs::create_dir_all(&tmp).unwrap();
        Dirs { _d: d, locks, tmp }
    }

    const TTL: Duration = Duration::from_secs(60);

    /// A lease file written as `owner` would have, with heartbeat `beat_ms`.
    fn plant(p: &Path, owner: &Owner, beat_ms: u64) {
        std::fs::write(p, owner.text(beat_ms)).unwrap();
    }

    fn foreign() -> Owner {
        Owner { host: "some-other-node".into(), boot: "b".into(), pid: 1, pid_start: 1, job: "77".into(), started_ms: now_ms() }
    }

    /// A process that has exited: a pid no one has (the child is reaped).
    fn dead_owner() -> Owner {
        let mut c = std::process::Command::new("true").spawn().unwrap();
        let pid = c.id();
        c.wait().unwrap();
        Owner { pid, pid_start: 12345, ..Owner::me() }
    }

    #[test]
    fn a_lease_excludes_others_until_dropped_and_records_its_holder() {
        let d = dirs();
        let p = d.locks.join("k.lease");
        let a = Lease::acquire(&p, &d.tmp, TTL, false).unwrap().expect("free");
        assert!(Lease::acquire(&p, &d.tmp, TTL, false).unwrap().is_none(), "held by a live process of this host");
        let seen = read(&p).unwrap().unwrap();
        let o = seen.owner.clone().unwrap();
        assert_eq!((o.pid, o.host.clone()), (std::process::id(), Owner::me().host));
        assert_eq!(judge(&seen, &Owner::me(), TTL), Staleness::Live);
        drop(a);
        assert!(!p.exists());
        assert!(Lease::acquire(&p, &d.tmp, TTL, false).unwrap().is_some());
        // No candidate or broken file is left behind.
        assert_eq!(std::fs::read_dir(&d.tmp).unwrap().count(), 0);
    }

    #[test]
    fn threads_contending_for_a_lease_never_hold_it_together() {
        let d = dirs();
        let p = d.locks.join("k.lease");
        let inside = AtomicU64::new(0);
        let total = AtomicU64::new(0);
        std::thread::scope(|s| {
            for _ in 0..4 {
                s.spawn(|| {
                    for _ in 0..10 {
                        let l = Lease::acquire(&p, &d.tmp, TTL, true).unwrap().expect("waits");
                        assert_eq!(inside.fetch_add(1, Ordering::SeqCst), 0, "two holders at once");
                        std::thread::sleep(Duration::from_millis(1));
                        inside.fetch_sub(1, Ordering::SeqCst);
                        total.fetch_add(1, Ordering::SeqCst);
                        drop(l);
                    }
                });
            }
        });
        assert_eq!(total.load(Ordering::SeqCst), 40);
    }

    #[test]
    fn a_dead_process_lease_on_this_host_is_broken_at_once() {
        let d = dirs();
        let p = d.locks.join("k.lease");
        plant(&p, &dead_owner(), now_ms());
        assert_eq!(judge(&read(&p).unwrap().unwrap(), &Owner::me(), TTL), Staleness::DeadProcess);
        let l = Lease::acquire(&p, &d.tmp, TTL, false).unwrap().expect("stale lease broken without waiting for the TTL");
        assert_eq!(read(&p).unwrap().unwrap().owner.unwrap().pid, std::process::id());
        drop(l);
    }

    #[test]
    fn a_reused_pid_is_not_the_holder() {
        // Our own pid with another start time: the process that took the lease is gone.
        let o = Owner { pid_start: Owner::me().pid_start + 1, ..Owner::me() };
        let d = dirs();
        let p = d.locks.join("k.lease");
        plant(&p, &o, now_ms());
        assert_eq!(judge(&read(&p).unwrap().unwrap(), &Owner::me(), TTL), Staleness::DeadProcess);
    }

    #[test]
    fn a_foreign_lease_is_stale_only_once_its_heartbeat_is_older_than_the_ttl() {
        let d = dirs();
        let p = d.locks.join("k.lease");
        plant(&p, &foreign(), now_ms() - 5_000);
        assert!(Lease::acquire(&p, &d.tmp, TTL, false).unwrap().is_none(), "a fresh foreign heartbeat is live");
        assert_eq!(read(&p).unwrap().unwrap().owner.unwrap().host, "some-other-node", "left alone");
        plant(&p, &foreign(), now_ms() - 61_000);
        let l = Lease::acquire(&p, &d.tmp, TTL, false).unwrap().expect("silent for longer than the TTL");
        drop(l);
        // Same host name, another boot: another host (the node rebooted), so the TTL rule.
        plant(&p, &Owner { boot: "another-boot".into(), ..dead_owner() }, now_ms());
        assert!(Lease::acquire(&p, &d.tmp, TTL, false).unwrap().is_none());
        // Garbage content counts as foreign, its heartbeat the file's mtime.
        std::fs::write(&p, b"not a lease").unwrap();
        assert!(Lease::acquire(&p, &d.tmp, TTL, false).unwrap().is_none());
        std::thread::sleep(Duration::from_millis(20));
        assert!(Lease::acquire(&p, &d.tmp, Duration::from_millis(10), false).unwrap().is_some());
    }

    #[test]
    fn a_held_lease_keeps_beating_and_a_short_ttl_does_not_break_it() {
        let d = dirs();
        let p = d.locks.join("k.lease");
        let ttl = Duration::from_millis(120);
        let held = Lease::acquire(&p, &d.tmp, ttl, false).unwrap().unwrap();
        let first = read(&p).unwrap().unwrap().beat_ms;
        std::thread::sleep(Duration::from_millis(400));
        let later = read(&p).unwrap().unwrap();
        assert!(later.beat_ms > first, "heartbeat refreshed");
        // Judged as a foreign host would judge it: still live.
        assert_eq!(judge(&later, &foreign(), ttl), Staleness::Live);
        assert!(!held.is_lost());
    }

    #[test]
    fn two_breakers_of_one_stale_lease_one_winner() {
        for _ in 0..20 {
            let d = dirs();
            let p = d.locks.join("k.lease");
            plant(&p, &foreign(), now_ms() - 120_000);
            let seen = read(&p).unwrap().unwrap();
            let barrier = std::sync::Barrier::new(2);
            let results: Vec<Removed> = std::thread::scope(|s| {
                let hs: Vec<_> = (0..2)
                    .map(|_| {
                        s.spawn(|| {
                            barrier.wait();
                            remove_if_unchanged(&p, &seen, &d.tmp).unwrap()
                        })
                    })
                    .collect();
                hs.into_iter().map(|h| h.join().unwrap()).collect()
            });
            assert_eq!(results.iter().filter(|r| **r == Removed::Yes).count(), 1, "{results:?}");
        }
    }

    #[test]
    fn a_breaker_that_judged_an_old_lease_never_removes_the_new_one() {
        let d = dirs();
        let p = d.locks.join("k.lease");
        plant(&p, &foreign(), now_ms() - 120_000);
        let stale = read(&p).unwrap().unwrap();
        // Another breaker won meanwhile, and a new holder took the lease.
        assert_eq!(remove_if_unchanged(&p, &stale, &d.tmp).unwrap(), Removed::Yes);
        let holder = Lease::acquire(&p, &d.tmp, TTL, false).unwrap().unwrap();
        // The late breaker acts on what it saw before: the new lease is put back.
        assert_eq!(remove_if_unchanged(&p, &stale, &d.tmp).unwrap(), Removed::Changed);
        assert_eq!(read(&p).unwrap().unwrap().owner.unwrap().pid, std::process::id());
        assert!(Lease::acquire(&p, &d.tmp, TTL, false).unwrap().is_none());
        // A holder that wakes up after being judged silent (a heartbeat since) is kept too.
        drop(holder);
        plant(&p, &foreign(), now_ms() - 120_000);
        let judged = read(&p).unwrap().unwrap();
        plant(&p, &foreign(), now_ms());
        assert_eq!(remove_if_unchanged(&p, &judged, &d.tmp).unwrap(), Removed::Changed);
        assert!(p.exists());
    }

    #[test]
    fn a_holder_whose_lease_was_broken_knows_it_and_leaves_the_new_one() {
        let d = dirs();
        let p = d.locks.join("k.lease");
        let ttl = Duration::from_millis(60);
        let old = Lease::acquire(&p, &d.tmp, ttl, false).unwrap().unwrap();
        // Someone judged it dead and replaced it.
        std::fs::remove_file(&p).unwrap();
        plant(&p, &foreign(), now_ms());
        std::thread::sleep(Duration::from_millis(200));
        assert!(old.is_lost());
        drop(old);
        assert_eq!(read(&p).unwrap().unwrap().owner.unwrap().host, "some-other-node", "release never removes another's lease");
    }

    #[cfg(unix)]
    #[test]
    fn a_linked_lease_is_never_followed() {
        let outside = tempfile::tempdir().unwrap();
        let victim = outside.path().join("v");
        std::fs::write(&victim, foreign().text(0)).unwrap();
        let d = dirs();
        let p = d.locks.join("k.lease");
        std::os::unix::fs::symlink(&victim, &p).unwrap();
        let e = Lease::acquire(&p, &d.tmp, Duration::from_millis(1), false).err().expect("refused").to_string();
        assert!(e.contains("symbolic link"), "{e}");
        assert!(victim.exists());
    }

    #[test]
    fn the_ttl_setting_is_checked() {
        assert_eq!(parse_ttl("1.5"), Ok(Duration::from_millis(1500)));
        for bad in ["0", "-3", "soon", "inf", ""] {
            assert!(parse_ttl(bad).unwrap_err().contains("CAMFLOW_LEASE_TTL"), "{bad}");
        }
    }

    #[test]
    fn silly_rename_names_are_recognised() {
        assert!(is_nfs_silly(OsStr::new(".nfs000000000012345600000001")));
        assert!(!is_nfs_silly(OsStr::new("nfs")) && !is_nfs_silly(OsStr::new(".tmpabc")));
    }
}
