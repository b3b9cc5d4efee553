//! `run --locked` against lock files that the spec no longer matches, or that were edited:
//! every entry of the lock must be produced by the spec, and every field the run computes
//! must agree with it.

use crate::support::{Project, lock_of};

/// Three cheap instances of one stage, by a sweep.
const SWEEP: &str = r#"name: sweep
seed: 3
stages:
  d:
    kind: data
    params: {source: synthetic, image_size: 8, slices_per_patient: 2}
    sweep:
      grid:
        count: [8, 10, 12]
"#;

fn labels(p: &Project) -> Vec<String> {
    lock_of(p)["instances"].as_mapping().expect("instances").keys().map(|k| k.as_str().expect("label").to_string()).collect()
}

#[test]
fn locked_refuses_lock_entries_the_spec_no_longer_produces() {
    let p = Project::new(SWEEP);
    p.run(&[]).ok();
    let all = labels(&p);
    assert_eq!(all.len(), 3, "{all:?}");
    // One sweep point dropped: the two left are reproduced, the third never is.
    p.write(&SWEEP.replace("[8, 10, 12]", "[8, 10]"));
    let r = p.run(&["--locked"]);
    assert_eq!(r.code(), 4, "{}\n{}", r.stdout(), r.stderr());
    let dropped = all.iter().find(|l| l.contains("12")).expect("the count=12 entry");
    assert!(r.stderr().contains("1 locked instance(s) that the spec does not produce") && r.stderr().contains(dropped.as_str()), "{}", r.stderr());
    assert!(!r.stdout().contains("done "), "refused before running anything: {}", r.stdout());
    // A ghost entry: a copy of a real one under a label no instance has.
    p.write(SWEEP);
    let path = p.path().join("p.lock.yaml");
    let text = std::fs::read_to_string(&path).unwrap();
    let mut lock = lock_of(&p);
    let entry = lock["instances"][all[0].as_str()].clone();
    lock["instances"].as_mapping_mut().unwrap().insert("ghost".into(), entry);
    std::fs::write(&path, serde_yaml::to_string(&lock).unwrap()).unwrap();
    let r = p.run(&["--locked"]);
    assert_eq!(r.code(), 4, "{}", r.stderr());
    assert!(r.stderr().contains("does not produce: ghost"), "{}", r.stderr());
    std::fs::write(&path, text).unwrap();
    p.run(&["--locked"]).ok();
}

#[test]
fn a_lock_with_an_instance_twice_is_refused_naming_the_file_and_the_label() {
    let p = Project::new(SWEEP);
    p.run(&[]).ok();
    let path = p.path().join("p.lock.yaml");
    let text = std::fs::read_to_string(&path).unwrap();
    // The last entry again, with another key: read into a map, it would silently win.
    let label = labels(&p).pop().unwrap();
    let start = text.find(&format!("  {label}:\n")).expect("entry in the lock");
    let entry = text[start..].to_string();
    let key = lock_of(&p)["instances"][label.as_str()]["key"].as_str().unwrap().to_string();
    std::fs::write(&path, format!("{text}{}", entry.replace(&key, &"0".repeat(64)))).unwrap();
    let r = p.run(&["--locked"]);
    assert_eq!(r.code(), 2, "{}\n{}", r.stdout(), r.stderr());
    let err = r.stderr();
    assert!(err.contains(&format!("{}: not a camflow lock file", path.display())), "{err}");
    assert!(err.contains(&format!("instance `{label}` has two entries")), "{err}");
    // `diff` given that lock says the same, not a pipeline spec's complaint.
    let pl = p.pipeline();
    let r = p.camflow(&["diff", path.to_str().unwrap(), pl.to_str().unwrap()]);
    assert_eq!(r.code(), 2, "{}\n{}", r.stdout(), r.stderr());
    assert!(r.stderr().contains(&format!("instance `{label}` has two entries")), "{}", r.stderr());
}

/// A data stage and a training on it: an entry with an input and a numeric class.
const TRAINED: &str = r#"name: trained
seed: 5
stages:
  d:
    kind: data
    params: {source: synthetic, count: 16, image_size: 16, slices_per_patient: 2}
  t:
    kind: train
    inputs: {data: d}
    params: {epochs: 1, batch_size: 8}
"#;

#[test]
fn locked_checks_every_lock_field_the_run_computes() {
    let p = Project::new(TRAINED);
    p.run(&[]).ok();
    let path = p.path().join("p.lock.yaml");
    let good = std::fs::read_to_string(&path).unwrap();
    type Edit = fn(&mut serde_yaml::Value);
    let edits: Vec<(&str, Edit, &str)> = vec![
        ("a param", |l| l["instances"]["t"]["params"]["epochs"] = 2.into(), "t: the lock entry's param `epochs` is 2, the run resolved 1"),
        ("an input digest", |l| l["instances"]["t"]["inputs"]["data"] = "0".repeat(64).into(), "t: the lock entry's `inputs.data` is `000"),
        ("the numeric class", |l| l["instances"]["t"]["numeric"] = "other".into(), "t: the lock entry's `numeric` is `other`"),
        ("the kind version", |l| l["instances"]["t"]["kind_version"] = 99.into(), "t: the lock entry's `kind_version` is 99"),
        ("the backend", |l| l["backend"] = "cuda".into(), "the lock's `backend` is `cuda`, this run uses `cpu`"),
        ("determinism", |l| l["bitwise_deterministic"] = false.into(), "the lock's `bitwise_deterministic` is false"),
        ("the pipeline", |l| l["pipeline"] = "other".into(), "the lock's `pipeline` is `other`, this spec is named `trained`"),
    ];
    for (what, edit, expected) in edits {
        let mut lock = lock_of(&p);
        edit(&mut lock);
        std::fs::write(&path, serde_yaml::to_string(&lock).unwrap()).unwrap();
        let r = p.run(&["--locked"]);
        assert_eq!(r.code(), 4, "{what}: {}\n{}", r.stdout(), r.stderr());
        assert!(r.stderr().contains(expected), "{what}: expected `{expected}` in:\n{}", r.stderr());
        std::fs::write(&path, &good).unwrap();
    }
    p.run(&["--locked"]).ok();
}

#[test]
fn a_changed_digest_is_shown_far_enough_to_differ_and_a_changed_key_names_tampering() {
    let p = Project::new(SWEEP);
    p.run(&[]).ok();
    let path = p.path().join("p.lock.yaml");
    let good = std::fs::read_to_string(&path).unwrap();
    let label = labels(&p).remove(0);
    let entry = &lock_of(&p)["instances"][label.as_str()];
    let digest = entry["outputs"]["dataset.bin"].as_str().unwrap().to_string();
    // The same first 12 characters: cut there, both would read alike.
    let flipped = if digest.as_bytes()[12] == b'0' { '1' } else { '0' };
    let forged = format!("{}{flipped}{}", &digest[..12], &digest[13..]);
    std::fs::write(&path, good.replace(&digest, &forged)).unwrap();
    let r = p.run(&["--locked"]);
    assert_eq!(r.code(), 4, "{}", r.stderr());
    let (here, locked) = (&digest[..16], &forged[..16]);
    assert!(r.stderr().contains(&format!("output `dataset.bin` is {here} where the lock has {locked}")), "{}", r.stderr());
    assert!(r.stderr().contains("the lock file's digest was edited"), "{}", r.stderr());
    assert!(!r.stderr().contains("CPU numeric profile"), "{}", r.stderr());
    // A key edited by hand: nothing else in the entry differs.
    let key = entry["key"].as_str().unwrap().to_string();
    std::fs::write(&path, good.replace(&key, &"e".repeat(64))).unwrap();
    let r = p.run(&["--locked"]);
    assert_eq!(r.code(), 4, "{}", r.stderr());
    assert!(r.stderr().contains("the lock's key was edited, the lock was written by a camflow that computes keys otherwise"), "{}", r.stderr());
}

#[test]
fn a_lock_write_removes_temporary_files_a_killed_writer_left_in_the_pipeline_folder() {
    let p = Project::new(SWEEP);
    // What a writer killed mid-write left: a partial lock under the lock's temporary name.
    let stale = p.path().join(".p.lock.yaml.otherhost.4242.Ab12Cd.tmp");
    std::fs::write(&stale, "pipeline: sweep\ninstances:\n  d[co").unwrap();
    let two_hours_ago = std::time::SystemTime::now() - std::time::Duration::from_secs(7200);
    std::fs::File::options().write(true).open(&stale).unwrap().set_modified(two_hours_ago).unwrap();
    let mine = p.path().join("notes.tmp");
    std::fs::write(&mine, "the user's").unwrap();
    p.run(&[]).ok();
    assert!(!stale.exists(), "the stale temporary file is removed by the next lock write");
    assert!(mine.exists(), "other files are the user's");
    let left: Vec<String> = std::fs::read_dir(p.path()).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    assert!(!left.iter().any(|f| f.starts_with(".p.lock.yaml.")), "the writer's own temporary file is renamed: {left:?}");
}

#[test]
fn two_spec_files_with_one_lock_name_are_refused_before_running() {
    let p = Project::new(SWEEP);
    p.run(&[]).ok();
    let lock = std::fs::read_to_string(p.path().join("p.lock.yaml")).unwrap();
    // `p.yml` beside `p.yaml`: both would write `p.lock.yaml`.
    let other = SWEEP.replace("name: sweep", "name: other").replace("[8, 10, 12]", "[9]");
    std::fs::write(p.path().join("p.yml"), &other).unwrap();
    let r = p.camflow(&["run", p.path().join("p.yml").to_str().unwrap()]);
    assert_eq!(r.code(), 2, "{}\n{}", r.stdout(), r.stderr());
    assert!(r.stderr().contains("p.lock.yaml: both p.yml and p.yaml would write this lock file"), "{}", r.stderr());
    assert!(!r.stdout().contains("done "), "nothing ran: {}", r.stdout());
    assert_eq!(std::fs::read_to_string(p.path().join("p.lock.yaml")).unwrap(), lock, "the lock is untouched");
    // The same, named as most users type it: relative, from the spec's own folder.
    let r = p.camflow(&["run", "p.yml"]);
    assert_eq!(r.code(), 2, "{}\n{}", r.stdout(), r.stderr());
    assert!(r.stderr().contains("both p.yml and p.yaml would write this lock file"), "{}", r.stderr());
    assert_eq!(std::fs::read_to_string(p.path().join("p.lock.yaml")).unwrap(), lock, "the lock is untouched");
    // Alone, a spec whose lock file names another pipeline does not overwrite it either.
    std::fs::remove_file(p.path().join("p.yml")).unwrap();
    p.write(&other);
    let r = p.run(&[]);
    assert_eq!(r.code(), 2, "{}\n{}", r.stdout(), r.stderr());
    assert!(r.stderr().contains("p.lock.yaml: holds the lock of pipeline `sweep`") && r.stderr().contains("refusing to overwrite it"), "{}", r.stderr());
    assert_eq!(std::fs::read_to_string(p.path().join("p.lock.yaml")).unwrap(), lock, "the lock is untouched");
    std::fs::remove_file(p.path().join("p.lock.yaml")).unwrap();
    p.run(&[]).ok();
}

#[test]
fn locked_names_both_new_instances_and_dropped_entries_before_running() {
    let p = Project::new(SWEEP);
    p.run(&[]).ok();
    // A changed sweep value: one new instance the lock lacks, one entry the spec lost.
    p.write(&SWEEP.replace("[8, 10, 12]", "[8, 10, 14]"));
    let r = p.run(&["--locked"]);
    assert_eq!(r.code(), 4, "{}\n{}", r.stdout(), r.stderr());
    let err = r.stderr();
    assert!(err.contains("d[count=14]: not in the lock file"), "{err}");
    assert!(err.contains("1 locked instance(s) that the spec does not produce: d[count=12]"), "{err}");
    assert!(!r.stdout().contains("done "), "nothing ran: {}", r.stdout());
}

#[test]
fn the_lock_records_the_pipeline_seed_and_locked_names_a_changed_one() {
    let p = Project::new(SWEEP);
    p.run(&[]).ok();
    assert_eq!(lock_of(&p)["seed"].as_u64(), Some(3), "the pipeline seed is in the lock");
    // Another seed changes every key; `--locked` says why before anything runs.
    p.write(&SWEEP.replace("seed: 3", "seed: 4"));
    let r = p.run(&["--locked"]);
    assert_eq!(r.code(), 4, "{}\n{}", r.stdout(), r.stderr());
    assert!(r.stderr().contains("`seed` is 3, this spec's pipeline seed is 4"), "{}", r.stderr());
    assert!(!r.stdout().contains("done "), "refused before running anything: {}", r.stdout());
    // A lock written before the seed was recorded is still read, and reproduced.
    p.write(SWEEP);
    let path = p.path().join("p.lock.yaml");
    let text = std::fs::read_to_string(&path).unwrap();
    assert!(text.contains("\nseed: 3\n"), "{text}");
    std::fs::write(&path, text.replace("\nseed: 3\n", "\n")).unwrap();
    p.run(&["--locked"]).ok();
}
