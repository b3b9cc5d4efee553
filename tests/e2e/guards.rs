//! Sanity guards on classifiers, end to end: a classifier that predicts one class, whose
//! loss does not fall, or whose accuracy does not beat the majority-class rate is warned
//! about in `run`, flagged in `show` and in the report.

use crate::support::Project;

/// A study whose data and training are given; `orig` scores the model on the test split.
fn study(data: &str, train: &str) -> String {
    format!(
        r#"name: guards
seed: 3
stages:
  data:
    kind: data
    params: {{source: synthetic, image_size: 16, slices_per_patient: 4, {data}}}
  train:
    kind: train
    inputs: {{data: data}}
    params: {{batch_size: 8, {train}}}
  orig:
    kind: score
    inputs: {{data: data, model: train}}
"#
    )
}

fn warn_lines(stdout: &str) -> Vec<&str> {
    stdout.lines().filter(|l| l.starts_with("warn    ")).collect()
}

/// The `flags` cell of `show`'s row for `stage`, from its CSV output.
fn show_flags(p: &Project, stage: &str) -> String {
    let pl = p.pipeline();
    let out = p.camflow(&["show", pl.to_str().unwrap(), "--stage", stage, "--format", "csv"]).ok().stdout();
    let mut lines = out.lines();
    let header: Vec<&str> = lines.next().unwrap_or_default().split(',').collect();
    let col = header.iter().position(|c| *c == "flags").unwrap_or_else(|| panic!("no flags column in:\n{out}"));
    let row = lines.next().unwrap_or_else(|| panic!("no row in:\n{out}"));
    // Flags hold commas, so the cell is quoted: split on the quotes first.
    let cells: Vec<String> = if row.contains('"') {
        let (a, rest) = row.split_once('"').unwrap();
        let (quoted, b) = rest.split_once('"').unwrap();
        let mut v: Vec<String> = a.trim_end_matches(',').split(',').map(String::from).collect();
        v.push(quoted.to_string());
        v.extend(b.trim_start_matches(',').split(',').filter(|s| !s.is_empty()).map(String::from));
        v
    } else {
        row.split(',').map(String::from).collect()
    };
    cells.get(col).cloned().unwrap_or_default()
}

fn report_html(p: &Project) -> String {
    let out = p.path().join("report");
    let pl = p.pipeline();
    p.camflow(&["report", pl.to_str().unwrap(), "-o", out.to_str().unwrap()]).ok();
    std::fs::read_to_string(out.join("index.html")).expect("index.html")
}

#[test]
fn all_positive_data_is_flagged_as_a_one_class_split_not_as_a_bad_classifier() {
    // Every image has a tumor: accuracy cannot beat the majority rate (1.0) and any
    // classifier predicts one class; the problem is the data, and the guards say so instead
    // of blaming the classifier with `single-class` / `below-majority`.
    let p = Project::new(&study("count: 32, tumor_fraction: 1.0", "epochs: 2, lr: 0.01"));
    let r = p.run(&[]).ok();
    let out = r.stdout();
    let warns = warn_lines(&out);
    assert!(warns.iter().any(|l| l.starts_with("warn    train  one-class-split: all") && l.contains("test images are positive")), "{out}");
    assert!(warns.iter().any(|l| l.starts_with("warn    orig  one-class-split:")), "{out}");
    assert!(!warns.iter().any(|l| l.contains("single-class") || l.contains("below-majority")), "{out}");
    // The metrics hold the numbers the warning is about.
    let lock = crate::support::lock_of(&p);
    let m = &lock["instances"]["orig"]["metrics"];
    assert_eq!(m["majority_rate"].as_f64(), Some(1.0), "{m:?}");
    assert_eq!(m["balanced_accuracy"], serde_yaml::Value::Null, "no negatives: specificity and balance undefined");
    // show marks the score row with its own flags and its model's.
    let flags = show_flags(&p, "orig");
    assert!(flags.contains("one-class-split"), "{flags}");
    // A no-op rerun computes nothing and repeats no warning.
    assert!(warn_lines(&p.run(&[]).ok().stdout()).is_empty());
    let html = report_html(&p);
    let warnings = html.split("id=\"warnings\"").nth(1).expect("a warnings section");
    assert!(warnings.contains("one-class-split"), "{warnings}");
}

#[test]
fn a_training_with_lr_zero_has_a_flat_loss() {
    // lr 0 over two epochs: the weights never move, the loss cannot fall.
    let p = Project::new(&study("count: 32, tumor_fraction: 0.5, contrast: 0.8", "epochs: 2, lr: 0.0, flip: false"));
    let out = p.run(&[]).ok().stdout();
    assert!(warn_lines(&out).iter().any(|l| l.starts_with("warn    train  loss-flat: training loss did not fall")), "{out}");
    // Its untrained weights answer one class on data holding both: single-class and
    // below-majority, for the training and for the score of its model.
    let warns = warn_lines(&out);
    for stage in ["train", "orig"] {
        assert!(warns.iter().any(|l| l.starts_with(&format!("warn    {stage}  single-class: predicts"))), "{out}");
        assert!(warns.iter().any(|l| l.starts_with(&format!("warn    {stage}  below-majority: test accuracy"))), "{out}");
    }
    assert!(!warns.iter().any(|l| l.contains("one-class-split")), "{out}");
    assert!(show_flags(&p, "train").contains("loss-flat"));
    let html = report_html(&p);
    assert!(html.split("id=\"warnings\"").nth(1).expect("a warnings section").contains("loss-flat"));
}

#[test]
fn a_classifier_that_learns_is_not_flagged() {
    // High contrast, balanced classes, enough epochs: no guard may fire (no false alarms).
    let p = Project::new(&study("count: 96, tumor_fraction: 0.5, contrast: 1.0, noise: 0.02", "epochs: 8, lr: 0.003"));
    let out = p.run(&[]).ok().stdout();
    assert!(warn_lines(&out).is_empty(), "{out}");
    let lock = crate::support::lock_of(&p);
    let m = &lock["instances"]["train"]["metrics"];
    assert!(m["accuracy"].as_f64().unwrap() > m["majority_rate"].as_f64().unwrap(), "{m:?}");
    // Curves are recorded per epoch, train and validation.
    let epochs = m["epochs"].as_sequence().expect("epochs");
    assert_eq!(epochs.len(), 8);
    for e in epochs {
        for k in ["loss", "accuracy", "val_loss", "val_accuracy"] {
            assert!(e[k].as_f64().is_some_and(f64::is_finite), "{k} in {e:?}");
        }
    }
}

#[test]
fn an_empty_test_split_is_warned_about_and_flagged_not_passed_off_as_a_result() {
    // The issue's example: two images, no test split, no tumors. Training runs; its test
    // scores are null, which the run output and `show` must say.
    let p = Project::new(
        r#"name: empty
seed: 3
stages:
  data:
    kind: data
    params: {source: synthetic, image_size: 16, count: 2, test_fraction: 0, tumor_fraction: 0}
  train:
    kind: train
    inputs: {data: data}
    params: {batch_size: 8, epochs: 1}
"#,
    );
    let out = p.run(&[]).ok().stdout();
    let warns = warn_lines(&out);
    assert!(warns.iter().any(|l| l.contains("train") && l.contains("empty-split") && l.contains("split `test` holds no images")), "{out}");
    assert!(show_flags(&p, "train").contains("empty-split"));
}

/// A study whose Grad-CAM maps are all zero on most tumor-free images (the ReLU of the tumor
/// class's evidence), so the `multiply` filter blanks them: the filtering alone tells the
/// classes apart, and the guard says so where the retrained classifier's numbers are read.
const LEAK: &str = r#"name: leak
seed: 42
stages:
  data:
    kind: data
    params: {source: synthetic, count: 200, image_size: 16, contrast: 0.5, noise: 0.1, normalize: zscore}
  train:
    kind: train
    inputs: {data: data}
    params: {epochs: 6, lr: 0.002}
  cams:
    kind: gradcam
    inputs: {model: train, data: data}
    sweep:
      grid:
        method: [gradcam, random]
  filtered:
    kind: filter
    inputs: {data: data, heatmaps: cams}
    params: {mode: multiply}
  retrain:
    kind: retrain
    inputs: {data: filtered}
  retrained:
    kind: score
    inputs: {data: filtered, model: retrain}
"#;

#[test]
fn a_filter_that_gives_the_class_away_is_flagged_up_to_the_retrained_scores() {
    let p = Project::new(LEAK);
    let out = p.run(&[]).ok().stdout();
    let warns = warn_lines(&out);
    let leak = |l: &&str| l.contains("label-leak: the filtering gives the class away: it blanks (every factor 0)");
    assert!(warns.iter().any(|l| l.starts_with("warn    filtered[method=gradcam]") && leak(l)), "{out}");
    // Random maps are never all zero: nothing to read the class off.
    assert!(!warns.iter().any(|l| l.starts_with("warn    filtered[method=random]")), "{out}");

    // The metrics behind it: per class counts of the test split, and the rule's accuracy
    // clearly above the majority's.
    let lock = crate::support::lock_of(&p);
    let m = &lock["instances"]["filtered[method=gradcam]"]["metrics"];
    let count = |effect: &str, class: &str| m["whole_images"][effect][class].as_u64().expect("a count");
    let test: u64 = ["blanked", "untouched", "partly"].iter().flat_map(|e| [count(e, "negative"), count(e, "positive")]).sum();
    let split = &lock["instances"]["data"]["metrics"]["test"];
    assert_eq!(test, split["negative"].as_u64().unwrap() + split["positive"].as_u64().unwrap());
    assert!(count("blanked", "negative") > count("blanked", "positive"), "{m:?}");
    let (rule, base) = (m["leak_accuracy"].as_f64().unwrap(), m["leak_baseline"].as_f64().unwrap());
    assert!(rule >= base + 0.05, "{rule} vs {base}");
    let r = &lock["instances"]["filtered[method=random]"]["metrics"];
    assert_eq!((count_of(r, "blanked"), count_of(r, "untouched")), (0, 0), "{r:?}");

    // `show` carries the filter's flag to the retrained classifier's rows (its data input).
    let pl = p.pipeline();
    let show = p.camflow(&["show", pl.to_str().unwrap(), "--stage", "retrained", "--format", "csv"]).ok().stdout();
    let row = |method: &str| show.lines().find(|l| l.contains(&format!(",{method},"))).unwrap_or_else(|| panic!("{show}")).to_string();
    assert!(row("gradcam").contains("label-leak"), "{show}");
    assert!(!row("random").contains("label-leak"), "{show}");
    assert!(report_html(&p).contains("label-leak"));
}

/// Blanked plus untouched test images of both classes in a filter's metrics.
fn count_of(m: &serde_yaml::Value, effect: &str) -> u64 {
    ["negative", "positive"].iter().map(|c| m["whole_images"][effect][*c].as_u64().expect("a count")).sum()
}
