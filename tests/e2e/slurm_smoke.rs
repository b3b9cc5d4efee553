//! Smoke test of `run --executor slurm` against a real Slurm (the project's single-node test
//! cluster: `scripts/slurm-cluster.sh start`). Ignored by default; run it with
//! `cargo test --locked --test e2e -- --ignored slurm_smoke`. It fails, never skips, when no
//! Slurm answers.

use crate::support::{Project, TINY};

/// The tiny study through Slurm gives the same lock file, byte for byte, as a local run; the
/// Slurm run used arrays/batches (fewer jobs than instances) and a rerun submits nothing.
#[test]
#[ignore = "needs a running Slurm cluster"]
fn slurm_smoke_same_lock_as_local() {
    let sinfo = std::process::Command::new("sinfo").arg("-h").output().expect("sinfo on PATH (start the test cluster)");
    assert!(sinfo.status.success(), "sinfo fails: {}", String::from_utf8_lossy(&sinfo.stderr));

    let local = Project::new(TINY);
    local.run(&[]).ok();
    let remote = Project::new(TINY);
    let profile = remote.path().join("profile.yaml");
    std::fs::write(&profile, "executor:\n  kind: local\n  poll: {min_s: 0.2, max_s: 2}\n").unwrap();
    let r = remote.run(&["--executor", "slurm", "--profile", profile.to_str().unwrap()]).ok();
    let out = r.stdout();
    assert_eq!(r.summary("ran"), 13, "{out}");
    let jobs = r.summary("jobs");
    // 13 instances; the two thresholds and the two filters are batched (one job each).
    assert!((1..13).contains(&jobs), "jobs={jobs}: {out}");
    assert!(out.contains("submit  Slurm"), "{out}");
    let lock = |p: &Project| std::fs::read_to_string(p.path().join("p.lock.yaml")).expect("lock written");
    assert_eq!(lock(&remote), lock(&local), "the Slurm run's lock differs from the local run's");

    let again = remote.run(&["--executor", "slurm", "--profile", profile.to_str().unwrap()]).ok();
    assert_eq!((again.summary("cached"), again.summary("jobs")), (13, 0), "{}", again.stdout());
}
