//! Two runs on one cache, and a run killed midway.

use std::io::{BufRead, BufReader};
use std::process::Stdio;

use crate::support::{Project, TINY};

#[test]
fn two_concurrent_runs_compute_every_key_once() {
    let p = Project::new(TINY);
    let pl = p.pipeline();
    let cache = p.cache();
    let spawn = || {
        p.cmd(&["run", pl.to_str().unwrap(), "--cache-dir", cache.to_str().unwrap(), "--jobs", "1"])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn")
    };
    let (a, b) = (spawn(), spawn());
    let (a, b) = (a.wait_with_output().expect("a"), b.wait_with_output().expect("b"));
    assert!(a.status.success() && b.status.success());
    let count = |o: &std::process::Output, f: &str| {
        let s = String::from_utf8_lossy(&o.stdout).into_owned();
        let line = s.lines().find(|l| l.starts_with("summary:")).expect("summary").to_string();
        line.split_whitespace().find_map(|t| t.strip_prefix(&format!("{f}="))).and_then(|v| v.parse::<usize>().ok()).expect("count")
    };
    // Every key computed exactly once between the two processes; the other reused or found it.
    assert_eq!(count(&a, "ran") + count(&b, "ran"), 13);
    assert_eq!(count(&a, "ran") + count(&a, "reused") + count(&a, "cached"), 13);
    assert_eq!(count(&b, "ran") + count(&b, "reused") + count(&b, "cached"), 13);
    assert_eq!(std::fs::read_dir(cache.join("actions")).unwrap().count(), 13);
}

/// The still-open stdout of a run: dropping it would end the run by a broken pipe.
type Output = std::io::Lines<BufReader<std::process::ChildStdout>>;

/// A project whose training takes seconds, and a run of it followed until the training has
/// started; returns the running child, the rest of its stdout and the lines it printed.
fn start_long_training() -> (Project, std::process::Child, Output, Vec<String>) {
    let yaml = TINY.replace("params: {epochs: 1, batch_size: 16}\n  cams", "params: {epochs: 400, batch_size: 16}\n  cams");
    let p = Project::new(&yaml);
    let pl = p.pipeline();
    let cache = p.cache();
    let mut child = p
        .cmd(&["run", pl.to_str().unwrap(), "--cache-dir", cache.to_str().unwrap()])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
    let mut lines = BufReader::new(child.stdout.take().expect("stdout")).lines();
    let mut seen = Vec::new();
    for line in lines.by_ref() {
        let line = line.expect("line");
        let started_train = line.starts_with("run     train ");
        seen.push(line);
        if started_train {
            break;
        }
    }
    (p, child, lines, seen)
}

#[test]
fn kill_9_midway_then_rerun_resumes() {
    let (p, mut child, _stdout, seen) = start_long_training();
    assert!(seen.iter().any(|l| l.starts_with("done    data")), "{seen:?}");
    std::thread::sleep(std::time::Duration::from_millis(300));
    child.kill().expect("SIGKILL");
    let _ = child.wait();
    let r = p.run(&[]).ok();
    // data had finished before the kill: reused; everything else completes now.
    assert_eq!(r.summary("cached"), 1, "{}", r.stdout());
    assert_eq!(r.summary("ran"), 12);
    assert!(p.camflow(&["verify"]).ok().stdout().contains(", 0 problems"));
}

#[test]
fn ctrl_c_stops_cleanly_and_the_next_run_resumes() {
    let (p, child, stdout, _) = start_long_training();
    let cache = p.cache();
    let status = std::process::Command::new("kill").args(["-INT", &child.id().to_string()]).status().expect("kill -INT");
    assert!(status.success());
    let rest: Vec<String> = stdout.map(|l| l.expect("line")).collect();
    assert!(rest.iter().any(|l| l.starts_with("summary: ran=1 cached=0")), "{rest:?}");
    let out = child.wait_with_output().expect("wait");
    assert_eq!(out.status.code(), Some(130), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stderr).contains("interrupted; finished work is cached and the next run resumes"));
    // No partial entry: only the data stage has a record; the rerun does the rest.
    assert_eq!(std::fs::read_dir(cache.join("actions")).unwrap().count(), 1);
    let r = p.run(&[]).ok();
    assert_eq!((r.summary("cached"), r.summary("ran")), (1, 12));
    assert!(p.camflow(&["verify"]).ok().stdout().contains(", 0 problems"));
}
