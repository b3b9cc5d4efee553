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
    let yaml = TINY.replace("  cams:\n", "  orig:\n    kind: score\n    inputs: {data: data, model: train}\n  cams:\n");
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
            "--window-size=1280,4000",
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
    assert!(blue > 50, "plots not rendered ({blue} blue pixels)");
}
