//! kill -9 at random points of a real run, again and again on one cache: after each kill
//! `verify` is clean, and the run that finally completes writes a lock file equal, byte for
//! byte, to that of a run never interrupted (in another cache).
//!
//! CI kills 5 times; more on demand, e.g.
//!   CAMFLOW_KILL_LOOPS=50 cargo test --locked --test e2e kill_loop -- --nocapture
//! The kill points come from `CAMFLOW_KILL_SEED` (printed), so a failure can be replayed.

use std::io::{BufRead, BufReader};
use std::process::Stdio;
use std::time::{Duration, Instant};

use crate::support::{Project, Run, TINY};

/// `camflow <args> --cache-dir <cache>`.
fn in_cache(p: &Project, cache: &std::path::Path, args: &[&str]) -> Run {
    Run { out: p.cmd(args).args(["--cache-dir", cache.to_str().expect("utf-8")]).output().expect("camflow runs") }
}

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name).map(|v| v.trim().parse().unwrap_or_else(|_| panic!("{name}={v}: expected a number"))).unwrap_or(default)
}

/// splitmix64, as in the fuzzer: the same kill points on every machine for one seed.
fn next(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

#[test]
fn kill_9_loop_then_verify_is_clean_and_the_lock_equals_an_uninterrupted_run() {
    let seed = env_u64("CAMFLOW_KILL_SEED", 0x00C0_FFEE);
    let loops = env_u64("CAMFLOW_KILL_LOOPS", 5);
    // The reference: one run, never interrupted, in a cache of its own.
    // TINY with trainings long enough (about a second each) for kills to land inside them.
    let yaml = TINY.replace("params: {epochs: 1, batch_size: 16}", "params: {epochs: 15, batch_size: 16}");
    assert_ne!(yaml, TINY);
    let reference = Project::new(&yaml);
    let t = Instant::now();
    reference.run(&[]).ok();
    let full = t.elapsed();
    let want = std::fs::read_to_string(reference.path().join("p.lock.yaml")).expect("reference lock");

    let p = Project::new(&yaml);
    let pl = p.pipeline();
    let lock_path = p.path().join("p.lock.yaml");
    let mut state = seed;
    // Each cycle kills runs on one cache until a run completes; then a fresh cache.
    let (mut killed, mut finished, mut cycle) = (0, 0, 0);
    let mut points = Vec::new();
    let cache_of = |c: usize| p.path().join(format!("cache-{c}"));
    for i in 0..loops {
        let cache = cache_of(cycle);
        // A kill point: after `lines` lines of progress (`run`/`done` of an instance), then
        // up to a third of a whole run more, so kills land in start-up, planning, training
        // and writing, whatever the machine's speed.
        let lines = next(&mut state) % 7;
        let extra = Duration::from_micros(next(&mut state) % (full.as_micros() as u64 / 3 + 1));
        let mut child = p
            .cmd(&["run", pl.to_str().expect("utf-8"), "--cache-dir", cache.to_str().expect("utf-8")])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn");
        let mut out = BufReader::new(child.stdout.take().expect("stdout")).lines();
        let mut seen = 0;
        while seen < lines && out.next().is_some_and(|l| l.is_ok()) {
            seen += 1;
        }
        std::thread::sleep(extra);
        let point = format!("{seen} lines + {extra:.0?}");
        match child.try_wait().expect("try_wait") {
            Some(status) => {
                assert!(status.success(), "kill {i}: the run ended by itself, but failed: {status}");
                finished += 1;
                points.push(format!("{point} (finished first)"));
            }
            None => {
                child.kill().expect("SIGKILL");
                let _ = child.wait();
                killed += 1;
                points.push(point.clone());
            }
        }
        drop(out);
        let v = in_cache(&p, &cache, &["verify"]);
        assert!(
            v.out.status.success() && v.stdout().contains(", 0 problems"),
            "CAMFLOW_KILL_SEED={seed} kill {i} at {point}: verify after the kill:\n{}\n{}",
            v.stdout(),
            v.stderr()
        );
        // A lock file is only ever written whole, by a run that completed.
        if let Ok(lock) = std::fs::read_to_string(&lock_path) {
            assert_eq!(lock, want, "CAMFLOW_KILL_SEED={seed} kill {i}: a lock file that differs from the reference");
        }
        if points.last().is_some_and(|p| p.ends_with("(finished first)")) {
            cycle += 1;
        }
    }
    eprintln!(
        "kill loop: seed {seed:#x}, whole run {full:.2?}, {killed} killed, {finished} finished first, {} caches; points: {}",
        cycle + 1,
        points.join(", ")
    );
    let _ = std::fs::remove_file(&lock_path);
    let cache = cache_of(cycle);
    let r = in_cache(&p, &cache, &["run", pl.to_str().expect("utf-8")]).ok();
    assert_eq!(r.summary("failed"), 0);
    let got = std::fs::read_to_string(&lock_path).expect("lock after the final run");
    assert_eq!(got, want, "CAMFLOW_KILL_SEED={seed}: the lock after {killed} kills differs from an uninterrupted run's");
    assert!(in_cache(&p, &cache, &["verify"]).ok().stdout().contains(", 0 problems"));
    // The kills must have hit something, or the loop proves nothing.
    assert!(killed >= (loops / 4).max(1), "only {killed} of {loops} runs were killed before they finished");
}
