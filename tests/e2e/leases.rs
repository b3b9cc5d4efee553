//! The cache in lease mode (`CAMFLOW_LOCKING=lease`, what a cache on NFS gets): two runs on
//! one cache, a run killed with SIGKILL, gc against a run, and a lease of another host.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::support::{Project, TINY};

/// The still-open stdout of a run: dropping it would end the run by a broken pipe.
type Lines = std::io::Lines<BufReader<std::process::ChildStdout>>;

/// `camflow <args> --cache-dir <cache>` in lease mode, with a TTL long enough that a test which
/// had to wait for it would time out.
fn lease_cmd(p: &Project, args: &[&str]) -> Command {
    let cache = p.cache();
    let mut a = args.to_vec();
    a.extend(["--cache-dir", cache.to_str().expect("utf-8")]);
    let mut c = p.cmd(&a);
    c.env("CAMFLOW_LOCKING", "lease").env("CAMFLOW_LEASE_TTL", "600").stdout(Stdio::piped()).stderr(Stdio::piped());
    c
}

/// TINY with a training of `epochs` epochs.
fn with_training(epochs: u32) -> String {
    TINY.replace("params: {epochs: 1, batch_size: 16}\n  cams", &format!("params: {{epochs: {epochs}, batch_size: 16}}\n  cams"))
}

/// Starts a lease-mode run and follows it until `train` has started.
fn start_training(p: &Project) -> (Child, Lines) {
    let pl = p.pipeline();
    let mut child = lease_cmd(p, &["run", pl.to_str().unwrap()]).spawn().expect("spawn");
    let mut lines = BufReader::new(child.stdout.take().expect("stdout")).lines();
    let mut seen = Vec::new();
    for line in lines.by_ref() {
        let line = line.expect("line");
        let started = line.starts_with("run     train ");
        seen.push(line);
        if started {
            return (child, lines);
        }
    }
    let _ = child.kill();
    let _ = child.wait();
    panic!("train never started: {seen:?}");
}

fn summary(stdout: &str, field: &str) -> usize {
    let line = stdout.lines().find(|l| l.starts_with("summary:")).unwrap_or_else(|| panic!("no summary in {stdout}"));
    line.split_whitespace().find_map(|t| t.strip_prefix(&format!("{field}="))).and_then(|v| v.parse().ok()).expect("count")
}

/// Lease files left in the cache (key leases, run leases, a gc lease).
fn leases_left(cache: &Path) -> Vec<String> {
    let mut v = Vec::new();
    for dir in [cache.join("locks"), cache.join("locks").join("runs")] {
        for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
            let n = e.file_name().to_string_lossy().into_owned();
            if n.ends_with(".lease") {
                v.push(n);
            }
        }
    }
    v
}

fn verify_clean(p: &Project) {
    let v = lease_cmd(p, &["verify"]).output().expect("verify");
    let out = String::from_utf8_lossy(&v.stdout);
    assert!(v.status.success() && out.contains(", 0 problems"), "{out}\n{}", String::from_utf8_lossy(&v.stderr));
}

#[test]
fn two_lease_mode_runs_compute_every_key_once() {
    let p = Project::new(TINY);
    let pl = p.pipeline();
    let spawn = || lease_cmd(&p, &["run", pl.to_str().unwrap(), "--jobs", "1"]).spawn().expect("spawn");
    let (a, b) = (spawn(), spawn());
    let (a, b) = (a.wait_with_output().expect("a"), b.wait_with_output().expect("b"));
    let (sa, sb) = (String::from_utf8_lossy(&a.stdout), String::from_utf8_lossy(&b.stdout));
    assert!(
        a.status.success() && b.status.success(),
        "{sa}\n{}\n{sb}\n{}",
        String::from_utf8_lossy(&a.stderr),
        String::from_utf8_lossy(&b.stderr)
    );
    // Every key computed exactly once between the two processes; the other reused or found it.
    assert_eq!(summary(&sa, "ran") + summary(&sb, "ran"), 13, "{sa}\n{sb}");
    for s in [&sa, &sb] {
        assert_eq!(summary(s, "ran") + summary(s, "reused") + summary(s, "cached"), 13, "{s}");
    }
    assert_eq!(std::fs::read_dir(p.cache().join("actions")).unwrap().count(), 13);
    // One log per key: no key was run by both.
    assert_eq!(std::fs::read_dir(p.cache().join("logs")).unwrap().count(), 13);
    assert_eq!(leases_left(&p.cache()), Vec::<String>::new(), "every lease released");
    verify_clean(&p);
}

#[test]
fn a_lease_mode_run_killed_with_sigkill_is_resumed_without_waiting_for_the_ttl() {
    let p = Project::new(&with_training(400));
    let (mut child, _stdout) = start_training(&p);
    std::thread::sleep(Duration::from_millis(300));
    child.kill().expect("SIGKILL");
    let _ = child.wait();
    // The dead run's leases (its run lease and train's key lease) are still there.
    let left = leases_left(&p.cache());
    assert_eq!(left.len(), 2, "{left:?}");
    // The TTL is 600 s: a rerun that waited for it would never finish within this test.
    p.write(&with_training(1));
    let started = Instant::now();
    let mut rerun = lease_cmd(&p, &["run", p.pipeline().to_str().unwrap()]).spawn().expect("rerun");
    let status = loop {
        if let Some(s) = rerun.try_wait().expect("wait") {
            break s;
        }
        if started.elapsed() > Duration::from_secs(240) {
            let _ = rerun.kill();
            panic!("the rerun waited on the killed run's leases");
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let out = rerun.wait_with_output().expect("output");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(status.success(), "{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    // data had finished before the kill: reused; everything else completes now.
    assert_eq!((summary(&stdout, "cached"), summary(&stdout, "ran")), (1, 12), "{stdout}");
    assert_eq!(leases_left(&p.cache()), Vec::<String>::new());
    verify_clean(&p);
}

#[test]
fn gc_against_a_lease_mode_run_refuses_or_waits() {
    let p = Project::new(&with_training(100));
    let (run, rest) = start_training(&p);
    let g = lease_cmd(&p, &["gc"]).output().expect("gc");
    let stderr = String::from_utf8_lossy(&g.stderr);
    assert_eq!(g.status.code(), Some(6), "{stderr}");
    assert!(stderr.contains("is in use by a running `camflow run`") && stderr.contains(&format!("pid {}", run.id())), "{stderr}");
    assert!(!p.cache().join("locks").join("gc.lease").exists(), "a gc that refused leaves no lease");
    let waiting = lease_cmd(&p, &["gc", "--wait"]).spawn().expect("gc --wait");
    let rest: Vec<String> = rest.map(|l| l.expect("line")).collect();
    let out = run.wait_with_output().expect("run");
    assert!(out.status.success(), "{rest:?}\n{}", String::from_utf8_lossy(&out.stderr));
    assert!(rest.iter().any(|l| l.starts_with("summary: ran=13 ")), "{rest:?}");
    let g = waiting.wait_with_output().expect("gc --wait");
    let gout = String::from_utf8_lossy(&g.stdout);
    assert!(g.status.success() && gout.contains("gc: removed 0 records"), "{gout}\n{}", String::from_utf8_lossy(&g.stderr));
    verify_clean(&p);
    assert_eq!(leases_left(&p.cache()), Vec::<String>::new());
}

/// A run lease as a run on another node would hold it, with a heartbeat `age` ago.
fn plant_foreign_run(cache: &Path, age: Duration) {
    let runs = cache.join("locks").join("runs");
    std::fs::create_dir_all(&runs).expect("runs folder");
    let beat = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).expect("clock").as_millis() - age.as_millis();
    let text = format!(
        "camflow lease v1\nhost=node-elsewhere\nboot=x\npid=4242\npid_start=1\njob=987654\nstarted_ms=0\nheartbeat_ms={beat:020}\n"
    );
    std::fs::write(runs.join("node-elsewhere-4242-1.lease"), text).expect("plant lease");
}

#[test]
fn another_hosts_run_lease_blocks_gc_until_its_heartbeat_is_older_than_the_ttl() {
    let p = Project::new(TINY);
    std::fs::create_dir_all(p.cache()).expect("cache");
    plant_foreign_run(&p.cache(), Duration::from_secs(5));
    let mut gc = lease_cmd(&p, &["gc"]);
    gc.env("CAMFLOW_LEASE_TTL", "30");
    let g = gc.output().expect("gc");
    let stderr = String::from_utf8_lossy(&g.stderr);
    assert_eq!(g.status.code(), Some(6), "{stderr}");
    assert!(stderr.contains("node-elsewhere pid 4242 job 987654"), "{stderr}");
    // The same lease silent for longer than the TTL belongs to a run that is gone.
    plant_foreign_run(&p.cache(), Duration::from_secs(31));
    let g = gc.output().expect("gc");
    assert!(g.status.success(), "{}", String::from_utf8_lossy(&g.stderr));
    assert_eq!(leases_left(&p.cache()), Vec::<String>::new(), "the stale lease was broken");
}

#[test]
fn a_bad_locking_setting_is_a_clear_error() {
    let p = Project::new(TINY);
    let mut c = lease_cmd(&p, &["run", p.pipeline().to_str().unwrap()]);
    c.env("CAMFLOW_LOCKING", "nfs");
    let out = c.output().expect("run");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(5), "{stderr}");
    assert!(stderr.contains("CAMFLOW_LOCKING=\"nfs\": expected flock, lease or auto"), "{stderr}");
    let mut c = lease_cmd(&p, &["run", p.pipeline().to_str().unwrap()]);
    c.env("CAMFLOW_LEASE_TTL", "soon");
    let out = c.output().expect("run");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(5), "{stderr}");
    assert!(stderr.contains("CAMFLOW_LEASE_TTL=\"soon\": expected a number of seconds"), "{stderr}");
}

/// Scratch on another filesystem (a tmpfs): outputs are copied into the cache whole, the
/// results are those of a run with scratch in the cache, and no scratch folder is left.
#[cfg(target_os = "linux")]
#[test]
fn scratch_on_another_filesystem_gives_the_same_results() {
    let local = Project::new(TINY);
    local.run(&[]).ok();
    let p = Project::new(TINY);
    let shm = tempfile::tempdir_in("/dev/shm").expect("/dev/shm exists on Linux");
    let out = lease_cmd(&p, &["run", p.pipeline().to_str().unwrap()]).env("CAMFLOW_SCRATCH", shm.path()).output().expect("run");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(summary(&String::from_utf8_lossy(&out.stdout), "ran"), 13);
    let read = |p: &Project| std::fs::read_to_string(p.path().join("p.lock.yaml")).expect("lock file");
    assert_eq!(read(&p), read(&local), "same lock file with node-local scratch");
    // Only the cache's own scratch subfolder was made out there, and it is empty again.
    let made: Vec<std::path::PathBuf> = std::fs::read_dir(shm.path()).expect("scratch").flatten().map(|e| e.path()).collect();
    assert_eq!(made.len(), 1, "{made:?}");
    assert!(made[0].file_name().is_some_and(|n| n.to_string_lossy().starts_with("camflow-")));
    assert_eq!(std::fs::read_dir(&made[0]).expect("cache scratch").count(), 0);
    verify_clean(&p);
}

/// NFS leaves `.nfs…` files where a file was deleted while a client still had it open: they
/// are neither corruption for `verify` nor garbage for `gc`, which leave them alone.
#[test]
fn nfs_silly_rename_files_are_left_alone_by_verify_and_gc() {
    let p = Project::new(TINY);
    p.run(&[]).ok();
    let shard = std::fs::read_dir(p.cache().join("objects")).expect("objects").flatten().next().expect("a shard").path();
    let name = ".nfs00000000001a2b3c00000004";
    let places = [shard.join(name), p.cache().join("actions").join(name), p.cache().join("tmp").join(name)];
    for f in &places {
        std::fs::write(f, b"deleted while open").expect("plant");
        let old = std::time::SystemTime::now() - Duration::from_secs(3 * 3600);
        std::fs::File::options().write(true).open(f).expect("open").set_modified(old).expect("mtime");
    }
    verify_clean(&p);
    let g = lease_cmd(&p, &["gc", "--max-size", "0"]).output().expect("gc");
    assert!(g.status.success(), "{}", String::from_utf8_lossy(&g.stderr));
    assert!(places.iter().all(|f| f.exists()), "gc removed a silly-rename file");
    assert!(std::fs::read_dir(p.cache().join("actions")).expect("actions").count() == 1, "every record but the silly file collected");
}
