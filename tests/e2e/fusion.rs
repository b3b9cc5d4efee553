//! Fused training (issue 10): same-shaped trainings run as one group give exactly the bytes
//! they give alone, so a fused run and an unfused run write the same lock file.

use crate::support::Project;

/// Two trainings (a seed axis) and six retrainings of one shape: enough to form groups.
const FUSABLE: &str = r#"name: fuse
seed: 7
stages:
  data:
    kind: data
    params: {source: synthetic, count: 48, image_size: 16, contrast: 0.8, slices_per_patient: 4}
  train:
    kind: train
    inputs: {data: data}
    params: {epochs: 1, batch_size: 16}
    seeds: 2
  cams:
    kind: gradcam
    inputs: {model: train, data: data}
  filtered:
    kind: filter
    inputs: {data: data, heatmaps: cams}
    sweep:
      grid:
        mode: [multiply, inverse, mask]
  retrain:
    kind: retrain
    inputs: {data: filtered}
    params: {epochs: 2, batch_size: 16}
  cls:
    kind: score
    inputs: {data: filtered, model: retrain}
"#;

/// Runs `yaml` in two projects, with `--fuse off` and with `fused_args`, and checks what
/// fusion must never change: the instances run and the lock file, byte for byte. Gives both
/// projects and the fused run's `fused   ...` lines.
fn unfused_and_fused(yaml: &str, fused_args: &[&str]) -> (Project, Project, Vec<String>) {
    let (off, on) = (Project::new(yaml), Project::new(yaml));
    let plain = off.run(&["--fuse", "off"]).ok();
    assert!(!plain.stdout().contains("fused   "), "--fuse off fused:\n{}", plain.stdout());
    let fused = on.run(fused_args).ok();
    let groups = fused.stdout().lines().filter(|l| l.starts_with("fused   ")).map(str::to_string).collect();
    for field in ["ran", "cached", "reused"] {
        assert_eq!(plain.summary(field), fused.summary(field), "{field}:\n{}\n{}", plain.stdout(), fused.stdout());
    }
    let lock = |p: &Project| std::fs::read(p.path().join("p.lock.yaml")).expect("lock file");
    assert!(lock(&off) == lock(&on), "the fused run's lock file differs from the unfused run's");
    (off, on, groups)
}

#[test]
fn fused_and_unfused_runs_write_identical_lock_files() {
    let (_, on, groups) = unfused_and_fused(FUSABLE, &["--fuse", "4"]);
    // Both trainings are ready at once (after the one data instance): they always fuse.
    assert!(groups.iter().any(|l| l.starts_with("fused   2 instances in one task: train")), "the trainings did not fuse:\n{groups:?}");
    // Each member was published under its own key: a second run finds all of them.
    assert_eq!(on.run(&["--fuse", "4"]).ok().summary("ran"), 0);
    // A member's log says it trained in a group.
    assert!(logs(&on).iter().any(|l| l.contains("fused: trained in a group of")), "no member log mentions its group");
}

/// Every instance log in a project's cache.
fn logs(p: &Project) -> Vec<String> {
    std::fs::read_dir(p.cache().join("logs")).expect("logs").flatten().filter_map(|e| std::fs::read_to_string(e.path()).ok()).collect()
}

#[test]
fn a_bad_fuse_setting_is_a_usage_error() {
    let p = Project::new(FUSABLE);
    for bad in ["0", "2.5", "many"] {
        let r = p.run(&["--fuse", bad]);
        assert_eq!(r.code(), 2, "--fuse {bad}: {}", r.stderr());
        assert!(r.stderr().contains("expected `off` or a group size"), "--fuse {bad}: {}", r.stderr());
    }
}

/// Fusion is the local executor's: under Slurm, `--fuse` says it does not apply.
#[test]
fn fuse_under_slurm_says_it_does_not_apply() {
    let p = Project::new(FUSABLE);
    let out = p.run(&["--executor", "slurm", "--fuse", "4", "--dry-run"]).ok();
    assert!(out.stdout().contains("note: --fuse applies to the local executor"), "{}", out.stdout());
    let local = p.run(&["--fuse", "4", "--dry-run"]).ok();
    assert!(!local.stdout().contains("--fuse applies"), "{}", local.stdout());
}

/// Two models (one with batch norm) each explained by four methods at two layers: per model,
/// the three gradient methods at both layers share one pass; the random baseline needs no
/// model and runs alone.
const CAM_METHODS: &str = r#"name: cams
seed: 3
stages:
  data:
    kind: data
    params: {source: synthetic, count: 24, image_size: 16, contrast: 0.8, slices_per_patient: 4}
  train:
    kind: train
    inputs: {data: data}
    params: {epochs: 1, batch_size: 8, widths: [4, 8]}
    sweep:
      grid:
        arch: [vgg-small, resnet]
  cams:
    kind: gradcam
    inputs: {model: train, data: data}
    params: {batch_size: 5}
    sweep:
      grid:
        layer: [last, conv1]
        method: [gradcam, gradcam++, hirescam, random]
  masks:
    kind: threshold
    inputs: {heatmaps: cams}
  seg:
    kind: score
    inputs: {data: data, masks: masks}
"#;

/// Heatmaps from a shared pass are the bytes each layer and method give alone: by default
/// they share it, `--fuse off` runs each alone, and the lock files (every output digest and
/// metric) are identical.
#[test]
fn heatmap_methods_share_one_pass_by_default_with_the_bytes_they_give_alone() {
    let (off, on, groups) = unfused_and_fused(CAM_METHODS, &[]);
    assert_eq!(groups.len(), 2, "expected one group per model: {groups:?}");
    for (g, arch) in groups.iter().zip(["vgg-small", "resnet"]) {
        assert!(g.starts_with(&format!("fused   6 instances in one task: cams[arch={arch},")), "{g}");
        assert!(!g.contains("random"), "the random baseline joined the group: {g}");
    }
    let shared_logs = logs(&on).into_iter().filter(|l| l.contains("fused: heatmaps from one pass shared by 6 instances")).count();
    assert_eq!(shared_logs, 12, "each of the twelve members' logs says it shared a pass");
    // Each member was published under its own key: nothing is left to run, either way.
    assert_eq!(on.run(&["--fuse", "off"]).ok().summary("ran"), 0);
    assert_eq!(off.run(&[]).ok().summary("ran"), 0);
}

#[test]
fn bench_fuse_runs_a_pipeline_whose_data_path_is_relative_and_checks_its_stage_first() {
    let p = Project::new(
        "name: rel\nseed: 2\nstages:\n  data:\n    kind: data\n    params: {source: folders, root: imgs, positive: [b], missing_masks: exclude, image_size: 16}\n  train:\n    kind: train\n    inputs: {data: data}\n    params: {epochs: 1, batch_size: 8}\n",
    );
    crate::support::write_folders(&p.path().join("imgs"), &["a", "b"], 6);
    let pl = p.pipeline();
    let bench = |stage: &str| p.camflow(&["bench", "fuse", "--k", "1", "--size", "16", "--images", "8", "--pipeline", pl.to_str().unwrap(), "--stage", stage]);
    let bad = bench("nope");
    assert_eq!(bad.code(), 2, "{}", bad.stderr());
    assert!(bad.stderr().contains("--stage nope: no such stage") && bad.stdout().is_empty(), "refused before timing: {}", bad.stdout());
    let r = bench("train").ok();
    let row: serde_json::Value = serde_json::from_str(r.stdout().lines().last().unwrap()).expect("json row");
    assert_eq!(row["locks_identical"], true, "{row}");
    assert!(!p.path().join("p.lock.yaml").exists(), "the user's folder gets no lock");
}

#[test]
fn members_with_one_key_count_as_cached_fused_or_not() {
    // vgg-small reads no `widths`: both points of this axis are one training, computed once.
    let yaml = FUSABLE.replace("    seeds: 2\n", "    seeds: 2\n    sweep:\n      grid:\n        widths: [[16, 32, 64, 64], [4, 8]]\n");
    let (off, _, groups) = unfused_and_fused(&yaml, &["--fuse", "4"]);
    assert!(groups.iter().any(|l| l.starts_with("fused   4 instances in one task: train")), "{groups:?}");
    let plain = off.run(&["--fuse", "off"]).ok();
    assert_eq!(plain.summary("ran"), 0, "{}", plain.stdout());
}
