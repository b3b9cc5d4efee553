//! This host and its processes: the host name, and whether a process that left its mark on
//! disk (a lease, a lock's temporary file, a Slurm submission record) is still alive.
//!
//! Why one module: a pid alone names a process only within one boot of one kernel and one pid
//! namespace, and only until it is reused. Every place that judges "the writer of this file is
//! gone, so its file may be removed" (or "these Slurm jobs are mine to cancel") needs the same
//! four facts, [`Process`]: host name, boot id with pid namespace, pid, start time. Judged with
//! fewer, two containers sharing a host name and a folder remove each other's files, and a
//! reused pid keeps a dead writer's file alive.

use sha2::{Digest, Sha256};
use std::path::Path;

/// The host name as the kernel has it (`/proc/sys/kernel/hostname`, else `$HOSTNAME`); empty
/// when neither says. Callers make it safe for their own use ([`segment`]).
pub fn name() -> String {
    let h = read_trimmed("/proc/sys/kernel/hostname");
    if !h.is_empty() {
        return h;
    }
    std::env::var("HOSTNAME").map(|h| h.trim().to_string()).unwrap_or_default()
}

/// `s` as one field of a file name: ASCII letters, digits, `-` and `_` kept, anything else
/// `_`, at most 64 characters; `fallback` when nothing is left. Dots are replaced because
/// callers use them to separate fields.
pub fn segment(s: &str, fallback: &str) -> String {
    let s: String = s.chars().map(|c| if c.is_ascii_alphanumeric() || c == '-' { c } else { '_' }).take(64).collect();
    if s.is_empty() { fallback.to_string() } else { s }
}

fn read_trimmed(p: &str) -> String {
    std::fs::read_to_string(p).map(|s| s.trim().to_string()).unwrap_or_default()
}

/// The boot id and the pid namespace (`/proc/self/ns/pid`): pids compare only within one boot
/// of one kernel and one pid namespace (a container sharing the host's name and kernel is
/// another "host"). Empty parts where unknown.
pub fn boot_and_pid_namespace() -> String {
    let ns = std::fs::read_link("/proc/self/ns/pid").map(|l| l.to_string_lossy().into_owned()).unwrap_or_default();
    format!("{}/{ns}", read_trimmed("/proc/sys/kernel/random/boot_id"))
}

/// Start time of process `pid` (clock ticks since boot) and whether it is a zombie; `None`
/// when it does not exist (or where `/proc` is not available).
pub fn proc_start(pid: u32) -> Option<(u64, bool)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name is in parentheses and may hold spaces: fields count after the last ')'.
    let rest = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // rest starts at field 3 (state); field 22 (starttime) is index 19.
    let zombie = fields.first().is_some_and(|s| *s == "Z" || *s == "X");
    Some((fields.get(19)?.parse().ok()?, zombie))
}

/// Whether a process with this pid exists: `kill(pid, 0)` succeeds, or fails only for lack of
/// permission (another user's process). A pid that does not fit a `pid_t` names none.
fn pid_exists(pid: u32) -> bool {
    let Ok(pid) = libc::pid_t::try_from(pid) else { return false };
    if pid <= 0 {
        return false;
    }
    // SAFETY: signal 0 sends nothing; it only checks that the pid exists and may be signalled.
    let r = unsafe { libc::kill(pid, 0) };
    r == 0 || std::io::Error::last_os_error().raw_os_error() == Some(libc::EPERM)
}

/// A process, named so that it can be told apart from every other process that ever ran.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Process {
    pub host: String,
    /// [`boot_and_pid_namespace`] of the process (empty in records written before it was kept:
    /// such a process cannot be judged).
    #[serde(default)]
    pub boot: String,
    pub pid: u32,
    /// Its start time in clock ticks since boot (`/proc/<pid>/stat`, field 22); 0 where unknown.
    #[serde(default)]
    pub pid_start: u64,
}

impl Process {
    /// This process.
    pub fn me() -> Process {
        let pid = std::process::id();
        Process { host: name(), boot: boot_and_pid_namespace(), pid, pid_start: proc_start(pid).map(|s| s.0).unwrap_or(0) }
    }

    /// Whether pids of `self` and `other` are comparable: same host name, boot and pid
    /// namespace (a known host name; a boot and namespace read, not both unknown).
    pub fn same_host(&self, other: &Process) -> bool {
        // Both the boot id and the pid namespace known: with either unknown, a pid may name
        // a process of another boot or container.
        let known = self.boot.split_once('/').is_some_and(|(boot, ns)| !boot.is_empty() && !ns.is_empty());
        self.host == other.host && self.boot == other.boot && !self.host.is_empty() && known
    }

    /// Whether this process is alive, judged from a process on the same host
    /// ([`Process::same_host`]): `Some(false)` when it is certainly gone (no such pid, a zombie,
    /// or another process under its pid), `None` when it cannot be told from here (another
    /// host, or no `/proc`).
    pub fn alive_seen_from(&self, me: &Process) -> Option<bool> {
        if !self.same_host(me) || !Path::new("/proc/self/stat").exists() {
            return None;
        }
        Some(match proc_start(self.pid) {
            Some((_, true)) => false,
            Some((start, false)) => self.pid_start == 0 || start == self.pid_start,
            // Not in /proc: gone, unless /proc hides other users' processes (`hidepid`, as
            // on many cluster nodes). The kernel still answers whether the pid exists.
            None => pid_exists(self.pid),
        })
    }

    /// A short file-name token for `(boot, pid namespace)`: the first 12 hex digits of their
    /// SHA-256. Enough to tell boots and containers apart; the full text does not fit in a
    /// name.
    pub fn boot_token(&self) -> String {
        hex::encode(&Sha256::digest(self.boot.as_bytes())[..6])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn this_process_is_alive_and_a_dead_or_reused_pid_is_not() {
        let me = Process::me();
        assert_eq!(me.pid, std::process::id());
        assert!(me.pid_start > 0, "start time read from /proc");
        assert_eq!(me.alive_seen_from(&me), Some(true));
        // A process that existed and exited.
        let mut child = std::process::Command::new("true").spawn().expect("spawn true");
        let pid = child.id();
        child.wait().expect("wait");
        let gone = Process { pid, ..me.clone() };
        assert_eq!(gone.alive_seen_from(&me), Some(false));
        // Our pid, but started at another time: a reused pid is another process.
        let reused = Process { pid_start: me.pid_start + 1, ..me.clone() };
        assert_eq!(reused.alive_seen_from(&me), Some(false));
    }

    #[test]
    fn a_pid_hidden_from_proc_is_asked_of_the_kernel() {
        assert!(pid_exists(std::process::id()));
        assert!(pid_exists(1), "init exists (and may be another user's: EPERM counts as alive)");
        assert!(!pid_exists(u32::MAX - 1) && !pid_exists(0));
    }

    #[test]
    fn another_boot_or_namespace_cannot_be_judged() {
        let me = Process::me();
        let other_ns = Process { boot: format!("{}x", me.boot), pid: 1, ..me.clone() };
        assert_eq!(other_ns.alive_seen_from(&me), None);
        assert_ne!(other_ns.boot_token(), me.boot_token());
        let other_host = Process { host: format!("{}x", me.host), ..me.clone() };
        assert_eq!(other_host.alive_seen_from(&me), None);
        assert_eq!(me.boot_token().len(), 12);
        // A boot id without a pid namespace (or the reverse) is not enough to compare pids.
        let half = Process { boot: format!("{}/", me.boot.split('/').next().unwrap_or("")), ..me.clone() };
        assert_eq!(Process { pid: 1, ..half.clone() }.alive_seen_from(&half), None);
    }

    #[test]
    fn segments_are_one_safe_field() {
        assert_eq!(segment("node17.cluster.local", "unknown"), "node17_cluster_local");
        assert_eq!(segment("", "unknown"), "unknown");
        assert_eq!(segment("a/b c", "x"), "a_b_c");
        assert_eq!(segment(&"x".repeat(100), "u").len(), 64);
    }
}
