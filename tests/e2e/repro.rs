//! Reproducibility and data integrity: the lock file names every instance, `--locked` checks
//! results, `diff` compares them, keys hold data contents (never paths), the data read is the
//! data keyed, and bad files are errors or skipped as asked.

use std::path::Path;

use crate::support::{BIN, Project, Run, flip_byte, lock_of, write_folders, write_lgg};

/// Two stages doing the same work share one cache key (one record, written by one of them).
const SHARED: &str = r#"name: shared
seed: 3
stages:
  first:
    kind: data
    params: {source: synthetic, count: 8, image_size: 8, slices_per_patient: 2}
  second:
    kind: data
    params: {source: synthetic, count: 8, image_size: 8, slices_per_patient: 2}
"#;

fn plan_json(p: &Project, extra: &[&str]) -> serde_json::Value {
    let pl = p.pipeline();
    let mut a = vec!["plan", pl.to_str().unwrap(), "--json"];
    a.extend(extra);
    serde_json::from_str(&p.camflow(&a).ok().stdout()).expect("plan json")
}

fn key_of(plan: &serde_json::Value, label: &str) -> String {
    plan["instances"].as_array().unwrap().iter().find(|i| i["instance"] == label).unwrap_or_else(|| panic!("no {label}"))["key"]
        .as_str()
        .unwrap_or_else(|| panic!("{label} has no key: {plan}"))
        .to_string()
}

#[test]
fn instances_sharing_a_key_each_get_a_lock_entry() {
    let p = Project::new(SHARED);
    let r = p.run(&[]).ok();
    assert_eq!(r.summary("ran") + r.summary("cached") + r.summary("reused"), 2);
    let lock = lock_of(&p);
    let inst = lock["instances"].as_mapping().expect("instances");
    assert_eq!(inst.len(), 2, "one entry per instance: {lock:?}");
    assert_eq!(lock["instances"]["first"]["key"], lock["instances"]["second"]["key"], "they do share a key");
    let locked = p.run(&["--locked"]).ok();
    assert_eq!(locked.summary("cached"), 2);
    // The lock does not depend on which instance computed the shared key.
    let before = std::fs::read_to_string(p.path().join("p.lock.yaml")).unwrap();
    std::fs::remove_dir_all(p.cache()).unwrap();
    p.write(&SHARED.replace(
        "  first:",
        "  zeroth:\n    kind: data\n    params: {source: synthetic, count: 8, image_size: 8, slices_per_patient: 2}\n  first:",
    ));
    p.run(&[]).ok();
    p.write(SHARED);
    p.run(&[]).ok();
    assert_eq!(std::fs::read_to_string(p.path().join("p.lock.yaml")).unwrap(), before);
}

#[test]
fn locked_run_checks_outputs_and_metrics_not_only_keys() {
    let p = Project::new(SHARED);
    p.run(&[]).ok();
    let path = p.path().join("p.lock.yaml");
    let good = std::fs::read_to_string(&path).unwrap();
    let lock = lock_of(&p);
    let digest = lock["instances"]["second"]["outputs"]["dataset.bin"].as_str().unwrap().to_string();
    // An output digest that is not what this machine produces (as another CPU would give).
    let forged = good.replacen(&digest, &"0".repeat(64), 2);
    std::fs::write(&path, &forged).unwrap();
    let r = p.run(&["--locked"]);
    assert_eq!(r.code(), 4, "{}\n{}", r.stdout(), r.stderr());
    assert!(r.stderr().contains("output `dataset.bin` is"), "{}", r.stderr());
    assert!(r.stderr().contains("where the lock has 000000000000 (same key:"), "{}", r.stderr());
    // A metric that differs while the bytes agree.
    std::fs::write(&path, good.replace("images: 8", "images: 9")).unwrap();
    let r = p.run(&["--locked"]);
    assert_eq!(r.code(), 4, "{}", r.stderr());
    assert!(r.stderr().contains("metrics differ from the lock (images 9 -> 8)"), "{}", r.stderr());
    std::fs::write(&path, good).unwrap();
    p.run(&["--locked"]).ok();
}

#[test]
fn locked_run_names_the_cause_of_a_key_change() {
    let p = Project::new(SHARED);
    p.run(&[]).ok();
    let r = p.run(&["--locked", "--set", "stages.second.params.count=10"]);
    assert_eq!(r.code(), 4);
    assert!(r.stderr().contains("second: cache key") && r.stderr().contains("params differ: count"), "{}", r.stderr());
}

#[test]
fn diff_reports_metric_deltas_with_a_tolerance() {
    let p = Project::new(SHARED);
    p.run(&[]).ok();
    let a = p.path().join("p.lock.yaml");
    let text = std::fs::read_to_string(&a).unwrap();
    let b = p.path().join("b.lock.yaml");
    let (a_s, b_s) = (a.to_str().unwrap(), b.to_str().unwrap());
    std::fs::write(&b, text.replacen("images: 8", "images: 8.0004", 1)).unwrap();
    let r = p.camflow(&["diff", a_s, b_s]).ok();
    assert!(r.stdout().contains("reproduced within 0.001 (2 instances)"), "{}", r.stdout());
    // A lock against the pipeline's cache as it is now.
    let r = p.camflow(&["diff", a_s, p.pipeline().to_str().unwrap()]).ok();
    assert!(r.stdout().contains("reproduced within 0.001 (2 instances)"), "{}", r.stdout());
    let r = p.camflow(&["diff", a_s, b_s, "--tol", "1e-5"]);
    assert_eq!(r.code(), 4, "{}", r.stdout());
    assert!(r.stdout().contains("diverged at first: images 8 -> 8.0004"), "{}", r.stdout());
    let r = p.camflow(&["diff", a_s, b_s, "--tol", "1e-5", "--json"]);
    assert_eq!(r.code(), 4);
    let js: serde_json::Value = serde_json::from_str(&r.stdout()).expect("json");
    assert_eq!(js["diverged"][0]["instance"], "first");
    assert_eq!(js["diverged"][0]["metrics"][0]["metric"], "images");
    assert_eq!(js["within_tolerance"], 1);
    // An instance present on one side only.
    let lock: serde_yaml::Value = serde_yaml::from_str(&text).unwrap();
    let mut one = lock.clone();
    one["instances"].as_mapping_mut().unwrap().remove("second");
    std::fs::write(&b, serde_yaml::to_string(&one).unwrap()).unwrap();
    let r = p.camflow(&["diff", a_s, b_s]);
    assert_eq!(r.code(), 4);
    assert!(r.stdout().contains(&format!("only in {a_s}: second")), "{}", r.stdout());
}

fn folders_spec(root: &str) -> String {
    format!(
        "name: fold\nseed: 5\nstages:\n  data:\n    kind: data\n    params: {{source: folders, root: {root}, positive: [sick], missing_masks: exclude, image_size: 8, val_fraction: 0.2, test_fraction: 0.2}}\n"
    )
}

fn copy_tree(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap().flatten() {
        let t = to.join(e.file_name());
        if e.path().is_dir() { copy_tree(&e.path(), &t) } else { std::fs::copy(e.path(), t).map(|_| ()).unwrap() }
    }
}

#[test]
fn keys_hold_data_contents_not_paths() {
    let p = Project::new(&folders_spec("d1"));
    write_folders(&p.path().join("d1"), &["healthy", "sick"], 3);
    p.run(&[]).ok();
    let k1 = key_of(&plan_json(&p, &[]), "data");
    // The same data in another folder: same key, and the lock holds.
    copy_tree(&p.path().join("d1"), &p.path().join("elsewhere/d2"));
    let k2 = key_of(&plan_json(&p, &["--set", "stages.data.params.root=elsewhere/d2"]), "data");
    assert_eq!(k1, k2);
    let r = p.run(&["--locked", "--set", "stages.data.params.root=elsewhere/d2"]).ok();
    assert_eq!(r.summary("cached"), 1);
    // The root is still written down for people.
    assert_eq!(lock_of(&p)["instances"]["data"]["params"]["root"], "d1");
    // Files the loader does not read do not change the key.
    std::fs::write(p.path().join("d1/sick/Thumbs.db"), b"junk").unwrap();
    std::fs::write(p.path().join("d1/notes.txt"), b"junk").unwrap();
    assert_eq!(key_of(&plan_json(&p, &[]), "data"), k1);
    // Other contents: another key.
    write_folders(&p.path().join("elsewhere/d2"), &["sick"], 4);
    assert_ne!(key_of(&plan_json(&p, &["--set", "stages.data.params.root=elsewhere/d2"]), "data"), k1);
}

#[test]
fn a_cache_and_lock_inside_the_data_root_do_not_invalidate_it() {
    // The data root is the project folder: it holds the class folders, the pipeline, its lock
    // file and its cache, which all change with each run.
    let p = Project::new(&folders_spec("."));
    write_folders(p.path(), &["healthy", "sick"], 3);
    assert_eq!(p.run(&[]).ok().summary("ran"), 1);
    let again = p.run(&[]).ok();
    assert_eq!((again.summary("ran"), again.summary("cached")), (0, 1));
    p.run(&["--locked"]).ok();
}

#[test]
fn manifest_keys_exactly_the_files_it_names() {
    // The CSV sits in the project folder beside the pipeline, its lock file and its cache, and
    // names an image outside that folder.
    let p = Project::new(
        "name: man\nseed: 5\nstages:\n  data:\n    kind: data\n    params: {source: manifest, manifest: m.csv, missing_masks: exclude, image_size: 8, val_fraction: 0.2, test_fraction: 0.2}\n",
    );
    let outside = tempfile::tempdir().unwrap();
    write_folders(p.path(), &["imgs"], 4);
    write_folders(outside.path(), &["far"], 1);
    let far = outside.path().join("far/img0.png");
    std::fs::write(
        p.path().join("m.csv"),
        format!("image,label,group\nimgs/img0.png,1,a\nimgs/img1.png,0,b\nimgs/img2.png,1,c\nimgs/img3.png,0,d\n{},1,e\n", far.display()),
    )
    .unwrap();
    assert_eq!(p.run(&[]).ok().summary("ran"), 1);
    // Its own lock file and cache (which changed during the run) do not invalidate it.
    let again = p.run(&[]).ok();
    assert_eq!((again.summary("ran"), again.summary("cached")), (0, 1));
    // A file the CSV names outside its folder does.
    write_folders(outside.path(), &["far"], 2);
    std::fs::copy(outside.path().join("far/img1.png"), &far).unwrap();
    let plan = p.camflow(&["plan", p.pipeline().to_str().unwrap()]).ok();
    assert!(plan.stdout().contains("data changed: manifest"), "{}", plan.stdout());
}

#[test]
fn a_data_file_rewritten_with_the_same_size_and_mtime_is_noticed() {
    let p = Project::new(&folders_spec("d1"));
    write_folders(&p.path().join("d1"), &["healthy", "sick"], 3);
    p.run(&[]).ok();
    flip_byte(&p.path().join("d1/sick/img1.png"), true);
    let plan = p.camflow(&["plan", p.pipeline().to_str().unwrap()]).ok();
    assert!(plan.stdout().lines().any(|l| l.starts_with("run     data") && l.contains("data changed: root")), "{}", plan.stdout());
}

const EMPTY_TEST: &str = r#"name: empty
seed: 1
stages:
  data:
    kind: data
    params: {source: synthetic, count: 2, tumor_fraction: 0, test_fraction: 0, image_size: 8, slices_per_patient: 1}
  train:
    kind: train
    inputs: {data: data}
    params: {arch: vgg-small, epochs: 1, batch_size: 2}
  score:
    kind: score
    inputs: {data: data, model: train}
"#;

#[test]
fn an_empty_test_split_is_an_error_naming_stage_and_params() {
    let p = Project::new(EMPTY_TEST);
    let r = p.run(&[]);
    assert_eq!(r.code(), 1, "{}\n{}", r.stdout(), r.stderr());
    let out = r.stdout() + &r.stderr();
    assert!(out.contains("score: split `test` holds no images"), "{out}");
    assert!(out.contains("test_fraction=0"), "{out}");
    assert!(!p.path().join("p.lock.yaml").exists());
}

fn lgg_spec(extra: &str) -> String {
    format!(
        "name: lgg\nseed: 5\nstages:\n  data:\n    kind: data\n    params: {{source: lgg, root: lgg, channel: flair, image_size: 8{extra}}}\n"
    )
}

#[cfg(unix)]
#[test]
fn on_error_skip_skips_a_broken_symlink() {
    let p = Project::new(&lgg_spec(", on_error: skip"));
    write_lgg(&p.path().join("lgg"), &["P1", "P2", "P3"], 2, 0);
    std::os::unix::fs::symlink(p.path().join("nowhere.tif"), p.path().join("lgg/P1/P1_3.tif")).unwrap();
    std::fs::copy(p.path().join("lgg/P1/P1_1_mask.tif"), p.path().join("lgg/P1/P1_3_mask.tif")).unwrap();
    let r = p.run(&[]).ok();
    assert_eq!(r.summary("ran"), 1);
    let lock = std::fs::read_to_string(p.path().join("p.lock.yaml")).unwrap();
    assert!(lock.contains("skipped: 1") && lock.contains("P1_3.tif: cannot read"), "{lock}");
    // Without skip, the broken link is a stage error naming the file (not a spec error).
    let q = Project::new(&lgg_spec(""));
    write_lgg(&q.path().join("lgg"), &["P1", "P2"], 2, 0);
    std::os::unix::fs::symlink(q.path().join("nowhere.tif"), q.path().join("lgg/P1/P1_3.tif")).unwrap();
    let r = q.run(&[]);
    assert_eq!(r.code(), 1, "{}\n{}", r.stdout(), r.stderr());
    assert!((r.stdout() + &r.stderr()).contains("P1_3.tif"), "{}", r.stderr());
}

#[test]
fn what_a_data_stage_records_does_not_depend_on_how_its_root_is_written() {
    // An LGG set inside `kaggle_3m`, with a slice whose mask is missing and one that is not an
    // image, skipped. Its root written five ways (the set's parent, `kaggle_3m` itself, a
    // trailing slash, `./`, absolute, and a `--set`) is one key: the same metrics and lock.
    let p = Project::new(&lgg_spec(", on_error: skip"));
    let set = p.path().join("lgg/kaggle_3m");
    write_lgg(&set, &["P1", "P2", "P3"], 2, 0);
    std::fs::write(set.join("P1/P1_3.tif"), b"no mask beside it").unwrap();
    std::fs::write(set.join("P2/P2_3.tif"), b"not a tif").unwrap();
    std::fs::write(set.join("P2/P2_3_mask.tif"), b"not a tif").unwrap();
    let abs = p.path().join("lgg").display().to_string();
    let mut locks = Vec::new();
    for (i, root) in ["lgg", "lgg/kaggle_3m", "lgg/", "./lgg/kaggle_3m/", abs.as_str()].into_iter().enumerate() {
        p.write(&lgg_spec(", on_error: skip").replace("root: lgg", &format!("root: '{root}'")));
        let cache = p.path().join(format!("cache{i}"));
        let r = Run { out: p.cmd(&["run", "p.yaml", "--cache-dir", cache.to_str().unwrap()]).output().unwrap() }.ok();
        assert_eq!(r.summary("ran"), 1, "{root}: {}", r.stdout());
        let lock = lock_of(&p);
        locks.push((root.to_string(), lock["instances"]["data"]["key"].clone(), lock["instances"]["data"]["metrics"].clone()));
    }
    let metrics = &locks[0].2;
    let skipped: Vec<&str> = metrics["skipped_files"].as_sequence().expect("skipped_files").iter().filter_map(|v| v.as_str()).collect();
    assert_eq!(skipped.len(), 2, "{metrics:?}");
    assert!(skipped.iter().any(|s| s.starts_with("P1/P1_3.tif: missing mask P1/P1_3_mask.tif")), "{skipped:?}");
    assert!(skipped.iter().all(|s| !s.contains(&abs) && !s.contains("kaggle_3m") && !s.contains("lgg/")), "{skipped:?}");
    for (root, key, m) in &locks {
        assert_eq!((key, m), (&locks[0].1, metrics), "root `{root}` recorded otherwise");
    }
    // A run whose only --set is the data's location writes the lock; any other --set does not.
    p.write(&lgg_spec(", on_error: skip").replace("root: lgg", "root: elsewhere"));
    std::fs::remove_file(p.path().join("p.lock.yaml")).unwrap();
    let r = p.run(&["--set", &format!("stages.data.params.root={abs}")]).ok();
    assert!(r.stdout().contains("lock: "), "{}", r.stdout());
    assert_eq!(lock_of(&p)["instances"]["data"]["metrics"], *metrics);
    assert_eq!(lock_of(&p)["instances"]["data"]["params"]["root"].as_str(), Some(abs.as_str()), "the lock says where the data was");
    std::fs::remove_file(p.path().join("p.lock.yaml")).unwrap();
    let r = p.run(&["--set", &format!("stages.data.params.root={abs}"), "--set", "stages.data.params.image_size=10"]).ok();
    assert!(!r.stdout().contains("lock: ") && !p.path().join("p.lock.yaml").exists(), "{}", r.stdout());
}

#[test]
fn a_greyscale_slice_among_rgb_is_an_error_for_flair() {
    let p = Project::new(&lgg_spec(""));
    let root = p.path().join("lgg");
    write_lgg(&root, &["P1", "P2"], 2, 0);
    image::GrayImage::from_pixel(12, 12, image::Luma([90])).save(root.join("P2/P2_2.tif")).unwrap();
    let r = p.run(&[]);
    assert_eq!(r.code(), 1, "{}\n{}", r.stdout(), r.stderr());
    let out = r.stdout() + &r.stderr();
    assert!(out.contains("P2_2.tif: image has 1 channel (greyscale), but channel 1 was asked for"), "{out}");
    p.write(&lgg_spec(", on_error: skip"));
    let r = p.run(&[]).ok();
    assert_eq!(r.summary("ran"), 1);
    let lock = std::fs::read_to_string(p.path().join("p.lock.yaml")).unwrap();
    assert!(lock.contains("skipped: 1"), "{lock}");
}

#[test]
fn skipped_files_are_named_relative_to_the_data_root_so_the_lock_moves_with_the_data() {
    let p = Project::new(&lgg_spec(", on_error: skip"));
    let root = p.path().join("lgg");
    write_lgg(&root, &["P1", "P2", "P3"], 2, 0);
    std::fs::write(root.join("P1/P1_3.tif"), b"not a tiff").unwrap();
    std::fs::copy(root.join("P1/P1_1_mask.tif"), root.join("P1/P1_3_mask.tif")).unwrap();
    p.run(&[]).ok();
    let skipped = lock_of(&p)["instances"]["data"]["metrics"]["skipped_files"].clone();
    let names: Vec<String> = skipped.as_sequence().unwrap().iter().map(|v| v.as_str().unwrap().to_string()).collect();
    assert_eq!(names.len(), 1);
    assert!(names[0].starts_with("P1/P1_3.tif: "), "{names:?}");
    // The same data in another folder, run from another directory with another cache: the
    // lock holds, metrics included.
    copy_tree(&root, &p.path().join("elsewhere/moved"));
    let other = tempfile::tempdir().unwrap();
    let cache = other.path().join("cache");
    let r = std::process::Command::new(BIN)
        .current_dir(other.path())
        .env_remove("CAMFLOW_CACHE")
        .args(["run", p.pipeline().to_str().unwrap(), "--locked", "--cache-dir", cache.to_str().unwrap()])
        .args(["--set", &format!("stages.data.params.root={}", p.path().join("elsewhere/moved").display())])
        .output()
        .unwrap();
    assert!(r.status.success(), "{}\n{}", String::from_utf8_lossy(&r.stdout), String::from_utf8_lossy(&r.stderr));
}

#[test]
fn an_instance_that_found_its_key_computed_by_another_is_explained_like_it() {
    // `second` shares `first`'s key and is found cached on the first run. After a change to
    // both, `plan` names the change for both: neither is "never run" nor a "new sweep point".
    let p = Project::new(SHARED);
    p.run(&[]).ok();
    p.write(&SHARED.replace("count: 8", "count: 10"));
    let pl = p.pipeline();
    let out = p.camflow(&["plan", pl.to_str().unwrap()]).ok().stdout();
    for label in ["first", "second"] {
        let line = out.lines().find(|l| l.split_whitespace().nth(1) == Some(label)).unwrap_or_else(|| panic!("no {label} in:\n{out}"));
        assert!(line.contains("params changed: count 8 -> 10"), "{line}\n{out}");
    }
}

#[test]
fn diff_against_a_pipeline_names_its_instances_not_computed_yet() {
    let p = Project::new(SHARED);
    p.run(&[]).ok();
    // The lock as it was before the new stage (the next run rewrites p.lock.yaml).
    let a = p.path().join("old.lock.yaml");
    std::fs::copy(p.path().join("p.lock.yaml"), &a).unwrap();
    // A new stage that has not run: neither side has its result.
    p.write(&format!("{SHARED}  third:\n    kind: data\n    params: {{source: synthetic, count: 10, image_size: 8, slices_per_patient: 2}}\n"));
    let r = p.camflow(&["diff", a.to_str().unwrap(), p.pipeline().to_str().unwrap()]);
    assert_eq!(r.code(), 4, "{}\n{}", r.stdout(), r.stderr());
    let out = r.stdout();
    assert!(out.contains(&format!("not computed in {}: third", p.pipeline().display())), "{out}");
    assert!(!out.contains("reproduced within 0.001 (2 instances)"), "no claim of a full reproduction: {out}");
    assert!(out.contains("2 instance(s) reproduced within 0.001") && out.contains("1 not computed"), "{out}");
    let r = p.camflow(&["diff", a.to_str().unwrap(), p.pipeline().to_str().unwrap(), "--json"]);
    let js: serde_json::Value = serde_json::from_str(&r.stdout()).expect("json");
    assert_eq!(js["reproduced"], false);
    assert_eq!(js["not_computed_in_b"][0], "third");
    // Once run, the lock and the cache agree on what both have, and the lock lacks `third`.
    p.run(&[]).ok();
    let r = p.camflow(&["diff", a.to_str().unwrap(), p.pipeline().to_str().unwrap()]);
    assert!(r.stdout().contains(&format!("only in {}: third", p.pipeline().display())), "{}", r.stdout());
    // Against a cache where nothing ran (none there yet): the lock's instances are not
    // computed on the pipeline's side, not "only in" the lock; and no cache folder is made.
    let empty = p.path().join("no-cache-here");
    let r = Run {
        out: p.cmd(&["diff", a.to_str().unwrap(), p.pipeline().to_str().unwrap(), "--cache-dir", empty.to_str().unwrap()]).output().unwrap(),
    };
    assert_eq!(r.code(), 4, "{}\n{}", r.stdout(), r.stderr());
    let out = r.stdout();
    assert!(out.contains(&format!("not computed in {}: first", p.pipeline().display())), "{out}");
    assert!(!out.contains(&format!("only in {}", a.display())), "{out}");
    assert!(out.contains("0 only in A, 0 only in B, 3 not computed"), "{out}");
    assert!(r.stderr().contains("no cache at") && !empty.exists(), "{}", r.stderr());
}
