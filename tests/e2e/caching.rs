//! Reruns, invalidation, early cutoff and corruption, on the real stage kinds.

use crate::support::{Project, TINY, flip_byte};

#[test]
fn second_run_of_unchanged_pipeline_runs_nothing() {
    let p = Project::new(TINY);
    let first = p.run(&[]).ok();
    assert_eq!((first.summary("ran"), first.summary("cached")), (13, 0));
    assert!(p.path().join("p.lock.yaml").exists(), "run writes the lock file");
    let second = p.run(&[]).ok();
    assert_eq!((second.summary("ran"), second.summary("cached")), (0, 13));
    let plan = p.camflow(&["plan", p.pipeline().to_str().unwrap()]).ok();
    assert!(plan.stdout().contains("plan: 0 to run, 0 after them, 13 cached (13 instances)"), "{}", plan.stdout());
}

#[test]
fn changing_one_threshold_reruns_exactly_what_depends_on_it() {
    // A fixed threshold on one stage beside a swept one.
    let yaml = TINY.replace("  seg:\n", "  fixed:\n    kind: threshold\n    inputs: {heatmaps: cams}\n    params: {value: 0.4}\n  fixed_seg:\n    kind: score\n    inputs: {data: data, masks: fixed}\n  seg:\n");
    let p = Project::new(&yaml);
    assert_eq!(p.run(&[]).ok().summary("ran"), 15);
    p.write(&yaml.replace("params: {value: 0.4}", "params: {value: 0.6}"));
    let plan = p.camflow(&["plan", p.pipeline().to_str().unwrap()]).ok();
    let out = plan.stdout();
    assert!(out.lines().any(|l| l.starts_with("run     fixed ") && l.ends_with("params changed: value 0.4 -> 0.6")), "{out}");
    assert!(out.lines().any(|l| l.starts_with("after   fixed_seg ") && l.ends_with("waits on fixed")), "{out}");
    assert!(out.contains("plan: 1 to run, 1 after them, 13 cached"), "{out}");
    let r = p.run(&[]).ok();
    assert_eq!(r.ran(), vec!["fixed", "fixed_seg"]);
    assert_eq!(r.summary("cached"), 13);
    // The same through --set, without editing the file: back to the cached 0.4 result.
    let s = p.run(&["--set", "stages.fixed.params.value=0.4"]).ok();
    assert_eq!((s.summary("ran"), s.summary("cached")), (0, 15));
}

#[test]
fn sweep_override_adds_only_the_new_points() {
    let p = Project::new(TINY);
    p.run(&[]).ok();
    let r = p.run(&["--set", "stages.masks.sweep.grid.value=[0.3, 0.5, 0.7]"]).ok();
    assert_eq!(r.ran(), vec!["masks[value=0.7]", "seg[value=0.7]"]);
}

#[test]
fn early_cutoff_when_upstream_reproduces_its_bytes() {
    let p = Project::new(TINY);
    p.run(&[]).ok();
    // A param change that cannot change the output: the data stage reruns, the rest stays.
    p.write(&TINY.replace("slices_per_patient: 4}", "slices_per_patient: 4, on_error: skip}"));
    let plan = p.camflow(&["plan", p.pipeline().to_str().unwrap()]).ok();
    assert!(plan.stdout().contains("params changed: on_error fail -> skip"), "{}", plan.stdout());
    let r = p.run(&[]).ok();
    assert_eq!(r.ran(), vec!["data"]);
    assert_eq!(r.summary("cached"), 12);
    // A forced rerun of a deterministic stage: same bytes, downstream cached.
    let f = p.run(&["--force", "cams"]).ok();
    assert_eq!(f.ran(), vec!["cams"]);
    assert_eq!(f.summary("cached"), 12);
}

#[test]
fn corrupt_object_is_detected_by_run_and_recomputed() {
    let p = Project::new(TINY);
    p.run(&[]).ok();
    let obj = p.object_of("masks[value=0.3]", "masks.bin");
    flip_byte(&obj, false);
    let plan = p.camflow(&["plan", p.pipeline().to_str().unwrap()]).ok();
    assert!(
        plan.stdout()
            .lines()
            .any(|l| l.starts_with("run     masks[value=0.3]") && l.contains("cache entry corrupt: object") && l.contains("is corrupt")),
        "{}",
        plan.stdout()
    );
    let r = p.run(&[]).ok();
    // The recomputed masks have the original bytes, so the score below stays cached.
    assert_eq!(r.ran(), vec!["masks[value=0.3]"]);
    assert!(p.camflow(&["verify"]).ok().stdout().contains(", 0 problems"));
}

#[test]
fn corrupt_object_with_forged_mtime_is_found_by_verify() {
    let p = Project::new(TINY);
    p.run(&[]).ok();
    let obj = p.object_of("train", "model.safetensors");
    flip_byte(&obj, true);
    // size and mtime unchanged: a plain run trusts the record; verify hashes everything.
    let v = p.camflow(&["verify"]);
    assert_eq!(v.code(), 3, "{}", v.stdout());
    assert!(v.stdout().contains("train output `model.safetensors`: object") && v.stdout().contains("is corrupt"), "{}", v.stdout());
    let r = p.run(&[]).ok();
    assert_eq!(r.ran(), vec!["train"], "only the model is recomputed; its bytes are the same");
    assert!(p.camflow(&["verify"]).ok().stdout().contains(", 0 problems"));
    // `run --verify` hashes every object on lookup too.
    let obj = p.object_of("cams", "heatmaps.bin");
    flip_byte(&obj, true);
    assert_eq!(p.run(&["--verify"]).ok().ran(), vec!["cams"]);
}

#[test]
fn locked_run_refuses_a_changed_key() {
    let p = Project::new(TINY);
    p.run(&[]).ok();
    assert_eq!(p.run(&["--locked"]).ok().summary("cached"), 13);
    p.write(&TINY.replace("value: [0.3, 0.5]", "value: [0.3, 0.55]"));
    let r = p.run(&["--locked"]);
    assert_eq!(r.code(), 4, "{}{}", r.stdout(), r.stderr());
    assert!(r.stderr().contains("error: --locked: masks[value=0.55]: not in the lock file"), "{}", r.stderr());
}

#[test]
fn show_lists_one_row_per_sweep_point() {
    let p = Project::new(TINY);
    p.run(&[]).ok();
    let pl = p.pipeline();
    let csv = p.camflow(&["show", pl.to_str().unwrap(), "--stage", "seg", "--format", "csv"]).ok().stdout();
    let lines: Vec<&str> = csv.lines().collect();
    assert!(lines[0].starts_with("stage,value,mean_dice,dice_all,iou,precision,recall"), "{csv}");
    assert_eq!(lines.len(), 3);
    let js = p.camflow(&["show", pl.to_str().unwrap(), "--format", "json", "--where", "mode=inverse"]).ok().stdout();
    let rows: serde_json::Value = serde_json::from_str(&js).unwrap();
    assert_eq!(rows.as_array().unwrap().len(), 1);
    assert!(rows[0]["accuracy"].is_number());
    // The table agrees with the metrics.json object of that instance.
    let m: serde_json::Value = serde_json::from_slice(&std::fs::read(p.object_of("cls[mode=inverse]", "metrics.json")).unwrap()).unwrap();
    assert_eq!(rows[0]["accuracy"], m["accuracy"]);
}

#[test]
fn dag_prints_dot_and_mermaid() {
    let p = Project::new(TINY);
    let pl = p.pipeline();
    let dot = p.camflow(&["dag", pl.to_str().unwrap()]).ok().stdout();
    assert!(dot.starts_with("digraph camflow {"));
    assert_eq!(dot.matches("->").count(), 19, "{dot}");
    let mm = p.camflow(&["dag", pl.to_str().unwrap(), "--format", "mermaid"]).ok().stdout();
    assert!(mm.contains("-->|heatmaps|"), "{mm}");
}

#[test]
fn gc_keeps_what_the_pipeline_references() {
    let p = Project::new(TINY);
    p.run(&[]).ok();
    p.run(&["--set", "stages.masks.sweep.grid.value=[0.9]"]).ok();
    let pl = p.pipeline();
    let g = p.camflow(&["gc", pl.to_str().unwrap()]).ok().stdout();
    assert!(g.starts_with("gc: removed 2 records and"), "{g}");
    assert_eq!(p.run(&[]).ok().summary("cached"), 13);
    assert!(p.camflow(&["verify"]).ok().stdout().contains(", 0 problems"));
}

#[test]
fn gc_max_size_with_pipelines_trims_only_what_they_do_not_reference() {
    let p = Project::new(TINY);
    p.run(&[]).ok();
    // Two entries the pipeline does not reference: masks and seg at value 0.9.
    p.run(&["--set", "stages.masks.sweep.grid.value=[0.9]"]).ok();
    let pl = p.pipeline();
    let pl = pl.to_str().unwrap();
    // Room for everything: nothing goes, not even the unreferenced entries.
    let g = p.camflow(&["gc", pl, "--max-size", "1G"]).ok().stdout();
    assert!(g.starts_with("gc: removed 0 records and 0 objects") && g.contains("15 records kept"), "{g}");
    // Room for less than the pipeline's own results: the others go, the pipeline's stay.
    let g = p.camflow(&["gc", pl, "--max-size", "1K"]).ok().stdout();
    assert!(g.starts_with("gc: removed 2 records and") && g.contains("13 records kept"), "{g}");
    assert!(g.contains("exceeds --max-size and is kept"), "{g}");
    assert_eq!(p.run(&[]).ok().summary("cached"), 13);
}

#[test]
fn gc_keeps_the_entries_below_a_missing_record_that_a_rerun_reuses() {
    let p = Project::new(TINY);
    p.run(&[]).ok();
    // The data record is gone (`verify` removed it as corrupt, or a crash lost it): every other
    // instance waits on data and has no key yet.
    let data_rec = std::fs::read_dir(p.cache().join("actions"))
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .find(|f| serde_json::from_slice::<serde_json::Value>(&std::fs::read(f).unwrap()).unwrap()["label"] == "data")
        .expect("data's record");
    std::fs::remove_file(&data_rec).unwrap();
    let pl = p.pipeline();
    let g = p.camflow(&["gc", pl.to_str().unwrap()]).ok().stdout();
    assert!(g.starts_with("gc: removed 0 records") && g.contains("12 records kept"), "{g}");
    // data gives the same bytes again, and early cutoff reuses everything below it.
    let r = p.run(&[]).ok();
    assert_eq!(r.ran(), ["data"], "{}", r.stdout());
    assert_eq!(r.summary("ran"), 1);
}

#[test]
fn a_forced_rerun_replaces_an_object_damaged_in_place() {
    let p = Project::new(TINY);
    p.run(&[]).ok();
    // Size and mtime kept: only hashing tells.
    flip_byte(&p.object_of("train", "model.safetensors"), true);
    p.run(&["--force", "train"]).ok();
    let v = p.camflow(&["verify"]).ok().stdout();
    assert!(v.contains(", 0 problems"), "{v}");
}

#[test]
fn training_gives_the_same_weight_bytes_in_two_processes() {
    // Two separate caches, two separate processes: the trained model's file is the same
    // object, byte for byte (burn's own record formats are not byte-stable; ours are).
    let a = Project::new(TINY);
    let b = Project::new(TINY);
    a.run(&[]).ok();
    b.run(&[]).ok();
    let digest = |p: &Project| p.object_of("train", "model.safetensors").file_name().unwrap().to_owned();
    assert_eq!(digest(&a), digest(&b));
    let lock_a = std::fs::read_to_string(a.path().join("p.lock.yaml")).unwrap();
    let lock_b = std::fs::read_to_string(b.path().join("p.lock.yaml")).unwrap();
    assert_eq!(lock_a, lock_b, "the same spec gives the same lock file, keys and output digests");
}

#[test]
fn data_files_are_hashed_by_content_memoised_by_size_and_mtime() {
    // A class-folder data set on disk.
    let yaml = "name: folders\nstages:\n  data:\n    kind: data\n    params: {source: folders, root: imgs, positive: [tumor], missing_masks: exclude, image_size: 8, val_fraction: 0.0, test_fraction: 0.0}\n";
    let p = Project::new(yaml);
    for (class, n) in [("tumor", 3u8), ("normal", 3u8)] {
        let dir = p.path().join("imgs").join(class);
        std::fs::create_dir_all(&dir).unwrap();
        for i in 0..n {
            image::GrayImage::from_fn(8, 8, |x, y| image::Luma([(x * 20 + y * 3 + i as u32 * 7) as u8]))
                .save(dir.join(format!("img{i}.png")))
                .unwrap();
        }
    }
    assert_eq!(p.run(&[]).ok().summary("ran"), 1);
    assert_eq!(p.run(&[]).ok().summary("cached"), 1);
    // Same size and mtime, other content: the memo also compares ctime and inode, which a
    // rewrite cannot put back, so the data stage reruns under its new key.
    let f = p.path().join("imgs/normal/img0.png");
    let mtime = std::fs::metadata(&f).unwrap().modified().unwrap();
    let other = p.path().join("imgs/normal/img1.png");
    let (a, b) = (std::fs::read(&f).unwrap(), std::fs::read(&other).unwrap());
    assert_eq!(a.len(), b.len(), "fixture images must have equal sizes");
    std::fs::write(&f, &b).unwrap();
    std::fs::File::options().write(true).open(&f).unwrap().set_modified(mtime).unwrap();
    let plan = p.camflow(&["plan", p.pipeline().to_str().unwrap()]).ok();
    assert!(plan.stdout().contains("run     data  data changed: root"), "{}", plan.stdout());
    assert_eq!(p.run(&[]).ok().summary("ran"), 1);
    assert_eq!(p.run(&["--rehash"]).ok().summary("cached"), 1);
    // A changed mtime is noticed without --rehash: put the original bytes back.
    std::fs::write(&f, &a).unwrap();
    assert_eq!(p.run(&[]).ok().summary("cached"), 1, "original content, original key");
}

#[test]
fn status_counts_and_gc_max_size() {
    let p = Project::new(TINY);
    let pl = p.pipeline();
    let before = p.camflow(&["status", pl.to_str().unwrap()]).ok().stdout();
    assert!(before.contains("0 of 13 instances cached"), "{before}");
    p.run(&[]).ok();
    let after = p.camflow(&["status", pl.to_str().unwrap()]).ok().stdout();
    assert!(after.lines().any(|l| l.split_whitespace().collect::<Vec<_>>() == ["masks", "2", "2", "0"]), "{after}");
    assert!(after.contains("13 of 13 instances cached"), "{after}");
    // Without pipelines, --max-size drops the oldest entries until the cache fits.
    let g = p.camflow(&["gc", "--max-size", "1K"]).ok().stdout();
    assert!(g.starts_with("gc: removed ") && g.contains("records kept"), "{g}");
    let kept: usize = g.split("; ").nth(1).and_then(|t| t.split_whitespace().next()).and_then(|n| n.parse().ok()).expect("kept count");
    assert!(kept < 13, "{g}");
    assert!(p.camflow(&["verify"]).ok().stdout().contains(", 0 problems"));
    assert_eq!(p.run(&[]).ok().summary("ran"), 13 - kept);
}
