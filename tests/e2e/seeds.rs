//! Repetition over seeds: `seeds: 3` on a training, `show` aggregating each sweep point over
//! its seeds (mean, sd, 95% t interval, n) and `--per-seed` listing them, with the paired
//! comparisons (retrained vs original, Grad-CAM vs random) computed seed by seed.

use serde_json::Value;

use crate::support::Project;

/// 3 seeds x {gradcam, random}: 46 instances, 9 tiny trainings.
const SEEDS: &str = r#"name: seeds
seed: 7
stages:
  data:
    kind: data
    params: {source: synthetic, count: 48, image_size: 16, contrast: 0.8, slices_per_patient: 4}
  train:
    kind: train
    inputs: {data: data}
    params: {epochs: 1, batch_size: 16}
    seeds: 3
  # Sorts before `original` (stages at one depth run in name order), so a baseline taken
  # without matching the split would be this one.
  baseline_val:
    kind: score
    inputs: {data: data, model: train}
    params: {split: val}
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
    params: {value: 0.5}
  seg:
    kind: score
    inputs: {data: data, masks: masks}
  filtered:
    kind: filter
    inputs: {data: data, heatmaps: cams}
  retrain:
    kind: retrain
    inputs: {data: filtered}
  cls:
    kind: score
    inputs: {data: filtered, model: retrain}
"#;

/// scipy.stats.t.ppf(0.975, 2): the 95% interval's quantile for 3 values.
const T_975_DF2: f64 = 4.302652729749464;

fn show(p: &Project, args: &[&str]) -> String {
    let pl = p.pipeline();
    let mut a = vec!["show", pl.to_str().unwrap()];
    a.extend(args);
    p.camflow(&a).ok().stdout()
}

fn json_rows(p: &Project, args: &[&str]) -> Vec<Value> {
    let mut a = args.to_vec();
    a.extend(["--format", "json"]);
    serde_json::from_str::<Value>(&show(p, &a)).expect("json").as_array().expect("rows").clone()
}

fn f(v: &Value) -> f64 {
    v.as_f64().unwrap_or_else(|| panic!("not a number: {v}"))
}

/// Mean, sample sd and the t interval of three values, computed here from scratch.
fn recompute(xs: &[f64]) -> (f64, f64, f64, f64) {
    assert_eq!(xs.len(), 3, "{xs:?}");
    let m = xs.iter().sum::<f64>() / 3.0;
    let sd = (xs.iter().map(|x| (x - m).powi(2)).sum::<f64>() / 2.0).sqrt();
    let half = T_975_DF2 * sd / 3f64.sqrt();
    (m, sd, m - half, m + half)
}

#[track_caller]
fn assert_close(got: f64, want: f64, what: &str) {
    assert!((got - want).abs() <= 1e-12 * want.abs().max(1.0), "{what}: got {got}, recomputed {want}");
}

#[test]
fn show_aggregates_three_seeds_with_intervals_and_paired_differences() {
    let p = Project::new(SEEDS);
    p.run(&[]).ok();

    // Three distinct trainings: `seeds: 3` is seed 7, 8, 9 (the pipeline seed onwards).
    let weights: Vec<Vec<u8>> =
        (7..=9).map(|s| std::fs::read(p.object_of(&format!("train[seed={s}]"), "model.safetensors")).expect("weights")).collect();
    assert!(weights[0] != weights[1] && weights[1] != weights[2] && weights[0] != weights[2], "seeds gave equal weights");
    // A retrain takes the seed of its own training.
    let plan: Value =
        serde_json::from_str(&p.camflow(&["plan", p.pipeline().to_str().unwrap(), "--json"]).ok().stdout()).expect("plan json");
    assert_eq!(plan["instances"].as_array().unwrap().len(), 46);
    assert_eq!(plan["cached"], 46);
    let retrains: Vec<&Value> = plan["instances"].as_array().unwrap().iter().filter(|i| i["kind"] == "retrain").collect();
    assert_eq!(retrains.len(), 6);
    for r in retrains {
        let label = r["instance"].as_str().unwrap();
        assert!(label.contains(&format!("seed={}", r["params"]["seed"])), "{label} trains with seed {}", r["params"]["seed"]);
    }

    for stage in ["seg", "cls", "original"] {
        let per_seed = json_rows(&p, &["--stage", stage, "--per-seed"]);
        let agg = json_rows(&p, &["--stage", stage]);
        // One aggregated row per point; three per-seed rows behind each.
        assert_eq!(per_seed.len(), 3 * agg.len(), "{stage}");
        assert_eq!(agg.len(), if stage == "original" { 1 } else { 2 }, "{stage}");
        for a in &agg {
            assert_eq!((a["n"].as_u64(), a["status"].as_str()), (Some(3), Some("done")), "{a}");
            assert_eq!(a["seeds"], serde_json::json!([7, 8, 9]));
            let rows: Vec<&Value> = per_seed.iter().filter(|r| stage == "original" || r["method"] == a["method"]).collect();
            assert_eq!(rows.len(), 3);
            let metrics = ["mean_dice", "dice_all", "accuracy", "auc", "mean_dice_vs_random", "accuracy_vs_original", "auc_vs_original"];
            for m in metrics.iter().filter(|m| rows.iter().all(|r| r[**m].is_number())) {
                let xs: Vec<f64> = rows.iter().map(|r| f(&r[*m])).collect();
                let (mean, sd, lo, hi) = recompute(&xs);
                assert_close(f(&a[*m]), mean, &format!("{stage} {m} mean"));
                assert_close(f(&a[format!("{m}_sd")]), sd, &format!("{stage} {m} sd"));
                assert_close(f(&a[format!("{m}_ci_lo")]), lo, &format!("{stage} {m} ci_lo"));
                assert_close(f(&a[format!("{m}_ci_hi")]), hi, &format!("{stage} {m} ci_hi"));
            }
        }
    }

    // Paired per seed: Grad-CAM minus the random heatmap of the same model and images...
    let seg = json_rows(&p, &["--stage", "seg", "--per-seed"]);
    let dice = |method: &str, seed: u64| {
        seg.iter().find(|r| r["method"] == method && r["seed"] == seed).map(|r| f(&r["mean_dice"])).expect("a seg row")
    };
    for s in 7..=9 {
        let row = seg.iter().find(|r| r["method"] == "gradcam" && r["seed"] == s).unwrap();
        assert_close(f(&row["mean_dice_vs_random"]), dice("gradcam", s) - dice("random", s), "mean_dice_vs_random");
        let random = seg.iter().find(|r| r["method"] == "random" && r["seed"] == s).unwrap();
        assert!(random.get("mean_dice_vs_random").is_none_or(|v| v.is_null()), "{random}");
    }
    // ...and a retrained model minus the original of the same seed.
    let orig = json_rows(&p, &["--stage", "original", "--per-seed"]);
    for r in json_rows(&p, &["--stage", "cls", "--per-seed"]) {
        let o = orig.iter().find(|o| o["seed"] == r["seed"]).expect("original of that seed");
        assert_eq!(r["original_accuracy"], o["accuracy"], "{r}");
        assert_close(f(&r["accuracy_vs_original"]), f(&r["accuracy"]) - f(&o["accuracy"]), "accuracy_vs_original");
    }
    // The validation-split score of the original, first in order, was passed over: it differs.
    let val = json_rows(&p, &["--stage", "baseline_val", "--per-seed"]);
    assert!(val.iter().any(|v| orig.iter().any(|o| o["seed"] == v["seed"] && o["accuracy"] != v["accuracy"])), "{val:?}");
    // The seeds differ somewhere, so the intervals above were not all of width zero.
    let widths: Vec<f64> = json_rows(&p, &["--stage", "original"])
        .iter()
        .chain(&json_rows(&p, &["--stage", "cls"]))
        .flat_map(|r| ["accuracy_sd", "auc_sd"].map(|c| r[c].as_f64().unwrap_or(0.0)))
        .collect();
    assert!(widths.iter().any(|w| *w > 0.0), "{widths:?}");

    // The table and the CSV carry the same columns; --per-seed lists each seed.
    let table = show(&p, &["--stage", "seg"]);
    let header: Vec<&str> = table.lines().next().unwrap().split_whitespace().collect();
    let csv = show(&p, &["--stage", "seg", "--format", "csv"]);
    let csv_header: Vec<&str> = csv.lines().next().unwrap().split(',').collect();
    assert_eq!(header, csv_header);
    for c in ["n", "mean_dice", "mean_dice_sd", "mean_dice_ci_lo", "mean_dice_ci_hi", "mean_dice_vs_random_ci_lo"] {
        assert!(header.contains(&c), "no {c} in {header:?}");
    }
    assert!(!header.contains(&"seed"), "{header:?}");
    let n_col = header.iter().position(|c| *c == "n").unwrap();
    assert_eq!(table.lines().skip(1).map(|l| l.split_whitespace().nth(n_col).unwrap()).collect::<Vec<_>>(), ["3", "3"]);
    let per_seed = show(&p, &["--stage", "seg", "--per-seed", "--where", "method=gradcam"]);
    assert_eq!(per_seed.lines().count(), 1 + 3, "{per_seed}");
    assert!(per_seed.lines().next().unwrap().split_whitespace().any(|c| c == "seed"), "{per_seed}");

    // --metric keeps one metric's columns; a seed filter on aggregated rows says where to look.
    let one = show(&p, &["--stage", "seg", "--metric", "mean_dice", "--format", "csv"]);
    assert_eq!(one.lines().next().unwrap(), "stage,method,n,mean_dice,mean_dice_sd,mean_dice_ci_lo,mean_dice_ci_hi,status");
    let pl = p.pipeline();
    let r = p.camflow(&["show", pl.to_str().unwrap(), "--where", "seed=7"]);
    assert_eq!(r.code(), 2, "{}", r.stderr());
    assert!(r.stderr().contains("--per-seed lists each"), "{}", r.stderr());
    let r = p.camflow(&["show", pl.to_str().unwrap(), "--metric", "dcie"]);
    assert!(r.code() != 0 && r.stderr().contains("--metric dcie: no such metric"), "{}", r.stderr());
}

/// Stages named as in the README (`train` sorts after `retrain`), both with seeds, and a score
/// of the original classifier on filtered images that sorts before `original`.
const TWO_SEED_AXES: &str = r#"name: two
seed: 5
stages:
  data:
    kind: data
    params: {source: synthetic, count: 40, image_size: 16, contrast: 1.0, slices_per_patient: 4}
  train:
    kind: train
    inputs: {data: data}
    params: {epochs: 1, widths: [4, 8]}
    seeds: 2
  original:
    kind: score
    inputs: {data: data, model: train}
  cams:
    kind: gradcam
    inputs: {model: train, data: data}
  filtered:
    kind: filter
    inputs: {data: data, heatmaps: cams}
  a_original_on_filtered:
    kind: score
    inputs: {data: filtered, model: train}
  retrain:
    kind: retrain
    inputs: {data: filtered}
    seeds: 2
  retrained:
    kind: score
    inputs: {data: filtered, model: retrain}
"#;

#[test]
fn rows_pool_the_most_upstream_seed_axis_and_the_baseline_is_scored_on_the_training_images() {
    let p = Project::new(TWO_SEED_AXES);
    p.run(&[]).ok();
    // Aggregated: one row per retrain seed (a coordinate), pooled over the 2 training seeds.
    let rows = json_rows(&p, &["--stage", "retrained"]);
    assert_eq!(rows.len(), 2, "{rows:?}");
    for r in &rows {
        assert!(r.get("retrain.seed").is_some_and(|v| !v.is_null()), "the retrain seed is the row's coordinate: {r}");
        assert!(r.get("train.seed").is_none(), "the training seed is pooled: {r}");
        assert_eq!(r["n"], 2, "{r}");
    }
    // Per seed: each retrained score's baseline is its own training's score on the data it was
    // trained from (`original`), never the score on filtered images.
    let per = json_rows(&p, &["--stage", "retrained", "--stage", "original", "--stage", "a_original_on_filtered", "--per-seed"]);
    // (Rows of a stage with one seed axis name it `seed`; with two, `train.seed`.)
    let of = |stage: &str, seed: &Value| -> f64 {
        f(&per.iter().find(|r| r["stage"] == stage && &r["seed"] == seed).unwrap_or_else(|| panic!("{stage} {seed}: {per:?}"))["auc"])
    };
    let retrained: Vec<&Value> = per.iter().filter(|r| r["stage"] == "retrained").collect();
    assert_eq!(retrained.len(), 4);
    let mut differs = false;
    for r in retrained {
        let seed = &r["train.seed"];
        assert_close(f(&r["original_auc"]), of("original", seed), "original_auc");
        assert_close(f(&r["auc_vs_original"]), f(&r["auc"]) - of("original", seed), "auc_vs_original");
        differs |= (of("original", seed) - of("a_original_on_filtered", seed)).abs() > 1e-9;
    }
    assert!(differs, "the two scores of the original differ somewhere, or the test shows nothing: {per:?}");
}
