//! The method works on the data: a classifier far above chance, Grad-CAM masks far above a
//! random heatmap, and the LGG layout end to end. Small sizes keep these to seconds.

use crate::support::Project;

const SYNTH: &str = r#"name: science
seed: 42
stages:
  data:
    kind: data
    params: {source: synthetic, count: 400, image_size: 32, contrast: 0.5, normalize: zscore}
  train:
    kind: train
    inputs: {data: data}
    params: {arch: vgg, widths: [16, 32, 64], epochs: 12, lr: 0.002}
  original:
    kind: score
    inputs: {data: data, model: train}
  cams:
    kind: gradcam
    inputs: {model: train, data: data}
    sweep:
      grid:
        method: [gradcam, random]
  masks:
    kind: threshold
    inputs: {heatmaps: cams}
    sweep:
      grid:
        value: [0.3, 0.5, 0.7, 0.9]
  seg:
    kind: score
    inputs: {data: data, masks: masks}
"#;

fn rows(p: &Project, stage: &str) -> Vec<serde_json::Value> {
    let pl = p.pipeline();
    let js = p.camflow(&["show", pl.to_str().unwrap(), "--stage", stage, "--format", "json"]).ok().stdout();
    serde_json::from_str::<serde_json::Value>(&js).expect("json").as_array().expect("rows").clone()
}

#[test]
fn synthetic_classifier_and_gradcam_beat_chance() {
    let p = Project::new(SYNTH);
    p.run(&[]).ok();
    let orig = rows(&p, "original");
    let acc = orig[0]["accuracy"].as_f64().expect("accuracy");
    let auc = orig[0]["auc"].as_f64().expect("auc");
    eprintln!("synthetic vgg: test accuracy {acc:.3}, AUC {auc:.3}");
    assert!(acc >= 0.75 && auc >= 0.85, "accuracy {acc}, AUC {auc}");
    let seg = rows(&p, "seg");
    let best = |m: &str| seg.iter().filter(|r| r["method"] == m).filter_map(|r| r["mean_dice"].as_f64()).fold(0.0, f64::max);
    let (cam, random) = (best("gradcam"), best("random"));
    eprintln!("synthetic vgg: best mean-Dice gradcam {cam:.3}, random {random:.3}");
    assert!(cam > 2.0 * random && cam > 0.25, "gradcam {cam} vs random {random}");
}

/// Needs the real LGG subset (12 patients, not in the repository): opt in with
/// `CAMFLOW_LGG_SUBSET=/path/to/lgg-subset cargo test --locked --test e2e -- --ignored lgg`.
/// Run without the variable it fails: an opted-in check never passes by skipping.
#[test]
#[ignore = "needs the real LGG subset: set CAMFLOW_LGG_SUBSET and run with --ignored lgg"]
fn lgg_subset_runs_end_to_end() {
    let root = std::env::var_os("CAMFLOW_LGG_SUBSET")
        .map(std::path::PathBuf::from)
        .expect("CAMFLOW_LGG_SUBSET must name the LGG subset folder (the one holding kaggle_3m/) for this opt-in test");
    assert!(root.join("kaggle_3m").is_dir(), "CAMFLOW_LGG_SUBSET={}: no kaggle_3m/ folder there", root.display());
    let pipeline = std::fs::read_to_string(std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("pipelines/lgg.yaml")).expect("lgg.yaml");
    let p = Project::new(&pipeline);
    // The shipped pipeline, shrunk with --set to one model, one CAM method and one filter; 3
    // epochs, as 2 at 32x32 can leave a classifier answering one class, whose equal heatmaps
    // make the 10 thresholds share keys.
    let sets: Vec<String> = [
        format!("stages.data.params.root={}", root.display()),
        "stages.data.params.image_size=32".into(),
        "stages.train.params.epochs=3".into(),
        "stages.train.seeds=1".into(),
        "stages.train.sweep.grid.arch=[vgg-small]".into(),
        "stages.cams.sweep.grid.method=[gradcam]".into(),
        "stages.filtered.sweep.grid.mode=[multiply]".into(),
    ]
    .into_iter()
    .flat_map(|s| ["--set".to_string(), s])
    .collect();
    let args: Vec<&str> = sets.iter().map(|s| s.as_str()).collect();
    let r = p.run(&args).ok();
    // data, train, original, cams, 10 masks, 10 scores, filtered, retrain, retrained.
    assert_eq!(r.summary("ran"), 27);
    let pl = p.pipeline();
    let mut show = vec!["show", pl.to_str().unwrap(), "--stage", "segmentation", "--format", "json"];
    show.extend(&args);
    let seg: serde_json::Value = serde_json::from_str(&p.camflow(&show).ok().stdout()).expect("json");
    let seg = seg.as_array().expect("rows");
    assert_eq!(seg.len(), 10);
    assert!(seg.iter().all(|r| r["mean_dice"].is_number() && r["images_with_tumor"].as_u64().unwrap_or(0) > 0), "{seg:?}");
    // Patients never straddle splits: the data stage's metrics count groups per split, 12 in all.
    let rec: serde_json::Value = std::fs::read_dir(p.cache().join("actions"))
        .unwrap()
        .flatten()
        .map(|e| serde_json::from_slice::<serde_json::Value>(&std::fs::read(e.path()).unwrap()).unwrap())
        .find(|v| v["label"] == "data")
        .expect("data record");
    let m = &rec["metrics"];
    assert_eq!(m["images"], 386);
    let groups: u64 = ["train", "val", "test"].iter().map(|s| m[*s]["groups"].as_u64().unwrap()).sum();
    assert_eq!(groups, 12);
}
