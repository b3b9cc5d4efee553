//! Strict, documented data loading, and a `retrain` that matches the classifier it is compared
//! with: the real binary on real image files.

use std::path::Path;

use crate::support::{Project, Run, lock_of, write_folders};

/// A `folders` data stage on `<project>/d` with `tumor` positive, and `extra` params.
fn data_spec(extra: &str) -> String {
    format!(
        "name: rules\nseed: 3\nstages:\n  data:\n    kind: data\n    params: {{source: folders, root: d, positive: [tumor], image_size: 16, val_fraction: 0.0, test_fraction: 0.5{extra}}}\n"
    )
}

/// A mask for `<dir>/<name>.png` (10x10, as `write_folders` writes): a 4x4 square.
fn write_mask(dir: &Path, name: &str) {
    image::GrayImage::from_fn(10, 10, |x, y| image::Luma([if (3..7).contains(&x) && (3..7).contains(&y) { 255 } else { 0 }]))
        .save(dir.join(format!("{name}_mask.png")))
        .expect("write mask");
}

fn output(r: &Run) -> String {
    format!("{}\n{}", r.stdout(), r.stderr())
}

#[test]
fn a_positive_image_without_a_mask_is_an_error_naming_the_file() {
    let p = Project::new(&data_spec(""));
    let d = p.path().join("d");
    write_folders(&d, &["normal", "tumor"], 3);
    write_mask(&d.join("tumor"), "img0");
    write_mask(&d.join("tumor"), "img1");
    let r = p.run(&[]);
    assert_eq!(r.code(), 1, "{}", output(&r));
    let out = output(&r);
    assert!(out.contains("tumor/img2.png: positive image has no mask (expected `img2_mask.png` beside it)"), "{out}");
    // Images with their masks, and negatives without one, are fine.
    assert!(!out.contains("img0.png") && !out.contains("normal/"), "{out}");
    // With every mask there, the same data loads.
    write_mask(&d.join("tumor"), "img2");
    p.run(&[]).ok();
}

const SEGMENT: &str = "  train:\n    kind: train\n    inputs: {data: data}\n    params: {epochs: 1, batch_size: 8}\n  cams:\n    kind: gradcam\n    inputs: {model: train, data: data}\n  masks:\n    kind: threshold\n    inputs: {heatmaps: cams}\n  seg:\n    kind: score\n    inputs: {data: data, masks: masks}\n    params: {split: all}\n";

#[test]
fn missing_masks_exclude_keeps_the_image_out_of_dice() {
    let p = Project::new(&(data_spec(", missing_masks: exclude") + SEGMENT));
    let d = p.path().join("d");
    write_folders(&d, &["normal", "tumor"], 6);
    for n in 0..4 {
        write_mask(&d.join("tumor"), &format!("img{n}"));
    }
    let r = p.run(&[]).ok();
    // The run says what was left out, with names.
    let out = output(&r);
    let warn = out.lines().find(|l| l.contains("no-mask")).unwrap_or_else(|| panic!("no no-mask warning in:\n{out}"));
    assert!(warn.contains("2 positive images without a mask") && warn.contains("tumor/img4") && warn.contains("tumor/img5"), "{warn}");
    let lock = lock_of(&p);
    assert_eq!(lock["instances"]["data"]["metrics"]["without_mask"].as_u64(), Some(2), "{lock:?}");
    // Scored over all 12 images: the 4 positives with a mask are the images with tumor; the
    // 2 without one are in no segmentation score, and their per-image Dice is empty.
    let seg = &lock["instances"]["seg"]["metrics"];
    assert_eq!(
        (seg["images"].as_u64(), seg["images_with_tumor"].as_u64(), seg["images_without_mask"].as_u64()),
        (Some(12), Some(4), Some(2))
    );
    let csv = std::fs::read_to_string(p.object_of("seg", "per_image.csv")).expect("per_image.csv");
    let rows: Vec<Vec<&str>> = csv.lines().skip(1).map(|l| l.split(',').collect()).collect();
    assert_eq!(rows.len(), 12);
    for row in rows {
        let (id, dice) = (row[0], row[4]);
        let excluded = id == "tumor/img4" || id == "tumor/img5";
        assert_eq!(dice.is_empty(), excluded, "{id}: dice `{dice}`");
    }
}

#[test]
fn every_bad_file_is_named_in_one_run() {
    let p = Project::new(&data_spec(""));
    let d = p.path().join("d");
    write_folders(&d, &["normal", "tumor"], 2);
    write_mask(&d.join("tumor"), "img0");
    for name in ["normal/broken1.png", "normal/broken2.jpg", "tumor/broken3.png"] {
        std::fs::write(d.join(name), b"not an image").expect("write");
    }
    // tumor/img1.png has no mask: a fourth bad file, of another kind.
    let r = p.run(&[]);
    assert_eq!(r.code(), 1, "{}", output(&r));
    let out = output(&r);
    assert!(out.contains("4 bad files"), "{out}");
    for name in ["normal/broken1.png: cannot read image", "normal/broken2.jpg: cannot read image", "tumor/broken3.png: cannot read image"] {
        assert!(out.contains(name), "{name} not in:\n{out}");
    }
    assert!(out.contains("tumor/img1.png: positive image has no mask"), "{out}");
    // The stage log holds each one too.
    let logs: String = std::fs::read_dir(p.cache().join("logs"))
        .map(|rd| rd.flatten().map(|e| std::fs::read_to_string(e.path()).unwrap_or_default()).collect())
        .unwrap_or_default();
    assert_eq!(logs.matches("bad file: ").count(), 4, "{logs}");
}

#[test]
fn on_error_skip_prints_the_count_and_names_of_skipped_files() {
    let p = Project::new(&data_spec(", on_error: skip"));
    let d = p.path().join("d");
    write_folders(&d, &["normal", "tumor"], 3);
    for n in 0..3 {
        write_mask(&d.join("tumor"), &format!("img{n}"));
    }
    for name in ["normal/broken1.png", "tumor/broken2.png"] {
        std::fs::write(d.join(name), b"not an image").expect("write");
    }
    let r = p.run(&[]).ok();
    let out = output(&r);
    let warn = out.lines().find(|l| l.contains("skipped-files")).unwrap_or_else(|| panic!("no skipped-files warning in:\n{out}"));
    assert!(warn.contains("skipped 2 bad files") && warn.contains("broken1.png") && warn.contains("broken2.png"), "{warn}");
    let m = &lock_of(&p)["instances"]["data"]["metrics"];
    assert_eq!((m["images"].as_u64(), m["skipped"].as_u64()), (Some(6), Some(2)));
}

fn plan_json(p: &Project, extra: &[&str]) -> serde_json::Value {
    let pl = p.pipeline();
    let mut a = vec!["plan", pl.to_str().expect("utf-8"), "--json"];
    a.extend(extra);
    serde_json::from_str(&p.camflow(&a).ok().stdout()).expect("plan json")
}

fn instance<'a>(plan: &'a serde_json::Value, label: &str) -> &'a serde_json::Value {
    plan["instances"]
        .as_array()
        .expect("instances")
        .iter()
        .find(|i| i["instance"] == label)
        .unwrap_or_else(|| panic!("no {label} in {plan}"))
}

#[test]
fn files_that_are_not_images_neither_change_the_key_nor_break_the_load() {
    let p = Project::new(&data_spec(""));
    let d = p.path().join("d");
    write_folders(&d, &["normal", "tumor"], 3);
    for n in 0..3 {
        write_mask(&d.join("tumor"), &format!("img{n}"));
    }
    let key = |p: &Project| instance(&plan_json(p, &[]), "data")["key"].as_str().expect("key").to_string();
    let before = key(&p);
    for junk in ["Thumbs.db", "normal/Thumbs.db", "tumor/.DS_Store", "tumor/._img0.png", "tumor/notes.txt", "tumor/img0.png.bak"] {
        std::fs::write(d.join(junk), b"junk").expect("write");
    }
    assert_eq!(key(&p), before);
    let r = p.run(&[]).ok();
    assert_eq!(lock_of(&p)["instances"]["data"]["metrics"]["images"].as_u64(), Some(6), "{}", r.stdout());
}

/// train (batch_norm on, swept over two architectures) -> gradcam -> filter -> retrain.
const RETRAIN: &str = r#"name: inherit
seed: 7
stages:
  data:
    kind: data
    params: {source: synthetic, count: 24, image_size: 16, slices_per_patient: 4}
  train:
    kind: train
    inputs: {data: data}
    params: {batch_norm: true, widths: [8, 16], epochs: 1, batch_size: 8, lr: 0.003, flip: false}
    sweep:
      grid:
        arch: [vgg, vgg-small]
  cams:
    kind: gradcam
    inputs: {model: train, data: data}
  filtered:
    kind: filter
    inputs: {data: data, heatmaps: cams}
  retrain:
    kind: retrain
    inputs: {data: filtered}
"#;

#[test]
fn retrain_inherits_its_train_params_and_an_override_is_flagged() {
    let p = Project::new(RETRAIN);
    let plan = plan_json(&p, &[]);
    for arch in ["vgg", "vgg-small"] {
        let t = &instance(&plan, &format!("train[arch={arch}]"))["params"];
        let r = &instance(&plan, &format!("retrain[arch={arch}]"))["params"];
        // Nothing forwarded by hand: every model and training param is the train's.
        for name in ["arch", "batch_norm", "widths", "epochs", "batch_size", "lr", "flip", "optimizer", "seed"] {
            assert_eq!(r[name], t[name], "retrain[arch={arch}].{name}");
        }
        assert_eq!(r["batch_norm"], true);
    }
    let show = |p: &Project| -> serde_json::Value {
        let pl = p.pipeline();
        serde_json::from_str(&p.camflow(&["show", pl.to_str().expect("utf-8"), "--stage", "retrain", "--format", "json"]).ok().stdout())
            .expect("show json")
    };
    // Nothing overridden: no mismatch to show.
    let rows = show(&p);
    assert!(rows.as_array().expect("rows").iter().all(|r| r.get("mismatch").is_none_or(|m| m.is_null())), "{rows}");
    // `${train.x}` references still work, and an explicit value wins over the train's (here
    // as a --set and a sweep), and is flagged.
    let sets = ["--set", "stages.retrain.params.batch_norm=false", "--set", "stages.retrain.params.arch=${train.arch}"];
    let plan = plan_json(&p, &sets);
    let r = &instance(&plan, "retrain[arch=vgg]")["params"];
    assert_eq!((r["batch_norm"].as_bool(), r["arch"].as_str(), r["lr"].as_f64()), (Some(false), Some("vgg"), Some(0.003)));
    let mut yaml = RETRAIN.to_string();
    yaml.push_str("    params: {batch_norm: false}\n    sweep:\n      grid:\n        epochs: [1, 2]\n");
    p.write(&yaml);
    let rows = show(&p);
    let rows = rows.as_array().expect("rows");
    assert_eq!(rows.len(), 4);
    for row in rows {
        let arch = row["arch"].as_str().expect("arch");
        // vgg-small has no batch norm to switch off: no difference there.
        if arch == "vgg-small" && row["epochs"] == 1 {
            assert!(row.get("mismatch").is_none_or(|m| m.is_null()), "{row}");
            continue;
        }
        let m = row["mismatch"].as_str().unwrap_or_else(|| panic!("no mismatch in {row}"));
        assert_eq!(m.contains(&format!("batch_norm=false (train[arch={arch}]: true)")), arch == "vgg", "{m}");
        assert_eq!(m.contains("epochs=2"), row["epochs"] == 2, "{m}");
    }
}

#[test]
fn a_positive_class_that_is_not_a_folder_is_an_error_with_a_suggestion() {
    let p = Project::new(&data_spec("").replace("positive: [tumor]", "positive: [tumour]"));
    let d = p.path().join("d");
    write_folders(&d, &["normal", "tumor"], 2);
    let r = p.run(&[]);
    assert_eq!(r.code(), 1, "{}", output(&r));
    let out = output(&r);
    let want = "`positive` names no class folder `tumour` (did you mean `tumor`?); class folders found: `normal`, `tumor`";
    assert!(out.contains(want), "{out}");
    let p = Project::new(&data_spec("").replace("positive: [tumor]", "positive: []"));
    write_folders(&p.path().join("d"), &["normal", "tumor"], 2);
    let out = output(&p.run(&[]));
    assert!(out.contains("`positive` lists no class, so every image would be negative"), "{out}");
}

/// The LGG subset's folder (holding kaggle_3m/), from CAMFLOW_LGG_SUBSET; an opted-in test
/// without it fails rather than passing by skipping.
fn lgg_subset() -> std::path::PathBuf {
    let root = std::env::var_os("CAMFLOW_LGG_SUBSET")
        .map(std::path::PathBuf::from)
        .expect("CAMFLOW_LGG_SUBSET must name the LGG subset folder (the one holding kaggle_3m/) for this opt-in test");
    assert!(root.join("kaggle_3m").is_dir(), "CAMFLOW_LGG_SUBSET={}: no kaggle_3m/ folder there", root.display());
    root
}

/// Labels come from the full-resolution masks: the subset has 132 tumor slices at any size
/// (with labels from shrunk masks it had 131 at 32x32 and 130 at 16x16).
#[test]
#[ignore = "needs the real LGG subset: set CAMFLOW_LGG_SUBSET and run with --ignored lgg"]
fn lgg_subset_labels_come_from_full_resolution_masks() {
    let root = lgg_subset();
    for size in [16, 32] {
        let p = Project::new(&format!(
            "name: lgg\nseed: 5\nstages:\n  data:\n    kind: data\n    params: {{source: lgg, root: {}, image_size: {size}}}\n",
            root.display()
        ));
        p.run(&[]).ok();
        let m = &lock_of(&p)["instances"]["data"]["metrics"];
        let count = |l: &str| ["train", "val", "test"].iter().map(|s| m[*s][l].as_u64().expect("count")).sum::<u64>();
        assert_eq!((count("positive"), count("negative")), (132, 254), "image_size {size}: {m:?}");
    }
}

/// Measures how well masks shrunk from the subset's 256x256 masks sit on their images, the
/// old way (corner-sampled nearest neighbour, source row y*256/size) and camflow's (by area),
/// against an area-correct reference computed here independently (an output pixel is tumor
/// when at least half of its k x k block is). Prints the figures:
/// `CAMFLOW_LGG_SUBSET=... cargo test --test e2e -- --ignored lgg_subset_mask_alignment --nocapture`.
#[test]
#[ignore = "needs the real LGG subset: set CAMFLOW_LGG_SUBSET and run with --ignored lgg"]
fn lgg_subset_mask_alignment_figures() {
    use camflow::ml::resize;
    let root = lgg_subset().join("kaggle_3m");
    let mut masks: Vec<Vec<u8>> = Vec::new();
    let mut patients: Vec<_> = std::fs::read_dir(&root).expect("kaggle_3m").flatten().map(|e| e.path()).collect();
    patients.sort();
    for pdir in patients.iter().filter(|p| p.is_dir()) {
        let mut files: Vec<_> = std::fs::read_dir(pdir).expect("patient").flatten().map(|e| e.path()).collect();
        files.sort();
        for f in files.iter().filter(|f| f.to_string_lossy().ends_with("_mask.tif")) {
            let l = image::open(f).expect("mask").to_luma8();
            assert_eq!(l.dimensions(), (256, 256), "{}", f.display());
            masks.push(l.as_raw().iter().map(|&v| (v > 0) as u8).collect());
        }
    }
    assert_eq!(masks.len(), 386);
    let n = 256usize;
    let dice = |a: &[u8], b: &[u8]| {
        let tp = a.iter().zip(b).filter(|(x, y)| **x > 0 && **y > 0).count();
        let s = a.iter().filter(|x| **x > 0).count() + b.iter().filter(|x| **x > 0).count();
        if s == 0 { 1.0 } else { 2.0 * tp as f64 / s as f64 }
    };
    // Centroid in pixel units with pixel centres at i + 0.5.
    let centroid = |m: &[u8], w: usize| {
        let (mut sx, mut sy, mut c) = (0.0, 0.0, 0.0);
        for (i, &v) in m.iter().enumerate() {
            if v > 0 {
                sx += (i % w) as f64 + 0.5;
                sy += (i / w) as f64 + 0.5;
                c += 1.0;
            }
        }
        (sx / c, sy / c)
    };
    let full_pos = masks.iter().filter(|m| m.iter().any(|&v| v > 0)).count();
    eprintln!("LGG subset: {} masks, {full_pos} with tumor at 256x256", masks.len());
    eprintln!("size | Dice vs area reference (old, new) | centroid offset x, y, output px (old; new)");
    eprintln!("     | Dice mask vs image path (old; new) | non-empty masks (old, new)");
    for size in [16usize, 32, 64, 128] {
        let k = n / size;
        let (mut d_old, mut d_new, mut im_old, mut im_new, mut cnt) = (0.0, 0.0, 0.0, 0.0, 0usize);
        let (mut off_old, mut off_new, mut n_old, mut n_new) = ((0.0, 0.0), (0.0, 0.0), 0usize, 0usize);
        let (mut pos_old, mut pos_new) = (0, 0);
        for m in &masks {
            let reference: Vec<u8> = (0..size * size)
                .map(|i| {
                    let (x, y) = (i % size, i / size);
                    let block = (0..k).flat_map(|dy| (0..k).map(move |dx| (dx, dy)));
                    let c: usize = block.map(|(dx, dy)| m[(y * k + dy) * n + x * k + dx] as usize).sum();
                    (2 * c >= k * k) as u8
                })
                .collect();
            let old: Vec<u8> = (0..size * size).map(|i| m[((i / size) * n / size) * n + (i % size) * n / size]).collect();
            let new = resize::mask(m, n, n, size, size);
            pos_old += old.iter().any(|&v| v > 0) as usize;
            pos_new += new.iter().any(|&v| v > 0) as usize;
            if !m.iter().any(|&v| v > 0) {
                continue;
            }
            let (fx, fy) = centroid(m, n);
            let (fx, fy) = (fx / k as f64, fy / k as f64);
            for (s, off, c) in [(&old, &mut off_old, &mut n_old), (&new, &mut off_new, &mut n_new)] {
                if s.iter().any(|&v| v > 0) {
                    let (x, y) = centroid(s, size);
                    off.0 += x - fx;
                    off.1 += y - fy;
                    *c += 1;
                }
            }
            // The image path applied to the mask as an image, thresholded at a half.
            let f: Vec<f32> = m.iter().map(|&v| v as f32).collect();
            let via_old: Vec<u8> = resize::bilinear(&f, n, n, size, size).iter().map(|&v| (v >= 0.5) as u8).collect();
            let via_new: Vec<u8> = resize::image(&f, n, n, size, size).iter().map(|&v| (v >= 0.5) as u8).collect();
            if reference.iter().any(|&v| v > 0) {
                d_old += dice(&old, &reference);
                d_new += dice(&new, &reference);
                im_old += dice(&old, &via_old);
                im_new += dice(&new, &via_new);
                cnt += 1;
            }
        }
        let c = cnt as f64;
        eprintln!(
            "{size:4} | {:.3}, {:.3} | {:+.3}, {:+.3}; {:+.3}, {:+.3} | {:.3}; {:.3} | {pos_old}, {pos_new} ({cnt} references)",
            d_old / c,
            d_new / c,
            off_old.0 / n_old as f64,
            off_old.1 / n_old as f64,
            off_new.0 / n_new as f64,
            off_new.1 / n_new as f64,
            im_old / c,
            im_new / c
        );
        assert_eq!(d_new / c, 1.0, "camflow's mask is the area reference at {size}");
        assert!((off_new.0 / n_new as f64).abs() < 0.05 && (off_new.1 / n_new as f64).abs() < 0.05, "centred at {size}");
    }
    assert_eq!(full_pos, 132);
}
