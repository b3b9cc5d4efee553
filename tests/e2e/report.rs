//! `camflow report` writes a self-contained page that a browser renders with its images.

use crate::support::{Project, TINY};

fn chromium() -> String {
    for c in ["chromium", "chromium-browser", "google-chrome"] {
        if std::process::Command::new("which").arg(c).output().is_ok_and(|o| o.status.success()) {
            return c.to_string();
        }
    }
    panic!("headless Chromium is needed for this test: apt-get install chromium (.ci/run installs it)");
}

#[test]
fn report_renders_in_headless_chromium() {
    // TINY plus: a score of the original model, two heatmap methods (for the methods
    // gallery) and an Otsu threshold beside the fixed ones (for the Dice plot).
    let yaml = TINY
        .replace("  cams:\n", "  orig:\n    kind: score\n    inputs: {data: data, model: train}\n  cams:\n")
        .replace(
            "    inputs: {model: train, data: data}\n",
            "    inputs: {model: train, data: data}\n    sweep:\n      grid:\n        method: [gradcam, random]\n",
        )
        .replace(
            "      grid:\n        value: [0.3, 0.5]\n",
            "      zip:\n        method: [fixed, fixed, otsu]\n        value: [0.3, 0.5, 0.5]\n",
        );
    assert!(yaml.contains("otsu") && yaml.contains("random"), "TINY changed: {yaml}");
    let p = Project::new(&yaml);
    p.run(&[]).ok();
    let out = p.path().join("report");
    let pl = p.pipeline();
    let r = p.camflow(&["report", pl.to_str().unwrap(), "-o", out.to_str().unwrap()]).ok();
    assert!(r.stdout().contains("report: "), "{}", r.stdout());
    let html = std::fs::read_to_string(out.join("index.html")).expect("index.html");
    // Self-contained: every image is a local file that exists; nothing is fetched.
    assert!(!html.contains("http://") && !html.contains("https://"));
    let srcs: Vec<&str> = html.split("src=\"").skip(1).filter_map(|s| s.split('"').next()).collect();
    assert!(srcs.contains(&"img/dice_vs_threshold.svg") && srcs.contains(&"img/retrained_accuracy.svg"), "{srcs:?}");
    assert!(srcs.iter().filter(|s| s.ends_with(".png")).count() >= 2, "{srcs:?}");
    for s in &srcs {
        assert!(out.join(s).is_file(), "{s} missing");
    }
    // The new sections are there, with their pictures.
    for id in ["warnings", "data", "curves", "metric-charts", "methods-gallery"] {
        assert!(html.contains(&format!("id=\"{id}\"")), "no section {id}");
    }
    for f in [
        "img/curves_0.svg",
        "img/cls_accuracy.svg",
        "img/cls_auc.svg",
        "img/cls_sensitivity.svg",
        "img/cls_specificity.svg",
        "img/methods_0.png",
    ] {
        assert!(srcs.contains(&f), "{f} not in {srcs:?}");
    }
    // One training-curve plot per finished train/retrain instance (1 train + 2 methods x 2 modes).
    assert_eq!(srcs.iter().filter(|s| s.starts_with("img/curves_")).count(), 5, "{srcs:?}");
    // The methods gallery names both methods; the Dice plot marks Otsu.
    let methods = html.split("id=\"methods-gallery\"").nth(1).unwrap();
    assert!(methods.contains("gradcam, random"), "{}", &methods[..300.min(methods.len())]);
    let dice_svg = std::fs::read_to_string(out.join("img/dice_vs_threshold.svg")).unwrap();
    assert!(dice_svg.contains("(Otsu)"), "no Otsu level on the Dice plot");
    // The data summary is the data stage's counts, from the lock.
    let lock = crate::support::lock_of(&p);
    let dm = &lock["instances"]["data"]["metrics"];
    for split in ["train", "val", "test"] {
        let row = format!(
            "<tr><td>{split}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
            dm[split]["positive"].as_u64().unwrap(),
            dm[split]["negative"].as_u64().unwrap(),
            dm[split]["groups"].as_u64().unwrap()
        );
        assert!(html.contains(&row), "no {row}");
    }
    // The training curves hold the recorded per-epoch numbers: the train metrics have them.
    assert_eq!(lock["instances"]["train"]["metrics"]["epochs"].as_sequence().map(|e| e.len()), Some(1));
    // The table agrees with the records: one row per seg instance, with its mean-Dice.
    assert!(html.matches("<td>0.3000</td>").count() + html.matches("<td>0.5000</td>").count() >= 2);
    // Render it and look at the pixels: the gallery's green masks and the plots' blue lines
    // only appear if the browser loaded the images.
    let shot = p.path().join("shot.png");
    let status = std::process::Command::new(chromium())
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--window-size=1280,9000",
        ])
        .arg(format!("--user-data-dir={}", p.path().join("chrome-profile").display()))
        .arg(format!("--screenshot={}", shot.display()))
        .arg(format!("file://{}", out.join("index.html").display()))
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .expect("chromium runs");
    assert!(status.success());
    let img = image::open(&shot).expect("screenshot").to_rgb8();
    let count = |f: &dyn Fn(&image::Rgb<u8>) -> bool| img.pixels().filter(|p| f(p)).count();
    let green = count(&|p| p.0 == [51, 204, 51]);
    let blue = count(&|p| (p.0[0] as i32 - 31).abs() < 30 && (p.0[1] as i32 - 119).abs() < 30 && (p.0[2] as i32 - 180).abs() < 30);
    assert!(green > 50, "gallery masks not rendered ({green} green pixels)");
    // Colours only the new pictures use: the training curves' train and validation lines,
    // and the methods gallery's truth panel.
    let near = |p: &image::Rgb<u8>, c: [u8; 3]| p.0.iter().zip(c).all(|(a, b)| (*a as i32 - b as i32).abs() < 12);
    let purple = count(&|p| near(p, [148, 103, 189]));
    let teal = count(&|p| near(p, [23, 190, 207]));
    let magenta = count(&|p| p.0 == [255, 0, 255]);
    assert!(purple > 50 && teal > 50, "training curves not rendered ({purple} train, {teal} validation pixels)");
    assert!(magenta > 50, "methods gallery not rendered ({magenta} truth pixels)");
    assert!(blue > 50, "plots not rendered ({blue} blue pixels)");
}

#[test]
fn report_shows_seed_intervals() {
    // Two seeds per training: tables and plots show the mean with its 95% interval.
    let yaml =
        TINY.replace("    params: {epochs: 1, batch_size: 16}\n  cams:", "    params: {epochs: 1, batch_size: 16}\n    seeds: 2\n  cams:");
    assert!(yaml.contains("seeds: 2"), "TINY changed");
    let p = Project::new(&yaml);
    p.run(&[]).ok();
    let out = p.path().join("report");
    let pl = p.pipeline();
    p.camflow(&["report", pl.to_str().unwrap(), "-o", out.to_str().unwrap()]).ok();
    let html = std::fs::read_to_string(out.join("index.html")).expect("index.html");
    for col in ["mean_dice_ci_lo", "mean_dice_ci_hi", "accuracy_ci_lo", "accuracy_sd"] {
        assert!(html.contains(&format!("<th>{col}</th>")), "no {col} column");
    }
    // Whiskers: the accuracy chart draws one black 2-px segment per aggregated row with an
    // interval (besides nothing else drawn black at that width).
    let svg = std::fs::read_to_string(out.join("img/cls_accuracy.svg")).expect("accuracy chart");
    let whiskers = svg.matches("stroke=\"#000000\" stroke-width=\"2\"").count();
    assert!(whiskers >= 2, "{whiskers} whiskers in:\n{svg}");
    // One curve plot per training instance, not per point: 2 seeds x (train + 2 retrains).
    assert_eq!(html.matches("src=\"img/curves_").count(), 6);
}

/// A report written into the cache would leave files there that `verify` then reports for
/// ever: an output folder inside the cache is refused before anything is written.
#[test]
fn report_refuses_an_output_folder_inside_the_cache() {
    let p = Project::new(TINY);
    let pl = p.pipeline();
    p.camflow(&["run", pl.to_str().unwrap()]).ok();
    let inside = p.cache().join("objects").join("report");
    let r = p.camflow(&["report", pl.to_str().unwrap(), "-o", inside.to_str().unwrap()]);
    assert_eq!(r.code(), 2, "{}", r.stderr());
    assert!(r.stderr().contains("that folder is inside the cache"), "{}", r.stderr());
    assert!(!inside.exists(), "nothing written");
    p.camflow(&["verify"]).ok();
}
