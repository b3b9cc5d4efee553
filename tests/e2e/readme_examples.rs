//! The README's worked examples, run as written: the `folders` layout of "Data sources"
//! (a breast-ultrasound set with patient folders, a union of two masks and ignored files).

use std::path::Path;

use crate::support::{Project, lock_of, root};

/// The README's `data:` block of the `folders` worked example, as a one-stage pipeline.
fn readme_folders_pipeline() -> String {
    let readme = std::fs::read_to_string(root().join("README.md")).expect("README.md");
    let at = readme.find("Worked example: a breast-ultrasound set").expect("the worked example in the README");
    let rest = &readme[at..];
    let start = rest.find("  data:\n    kind: data\n").expect("its data stage");
    let end = start + rest[start..].find("```").expect("end of the block");
    format!("name: busi\nstages:\n{}", &rest[start..end])
}

fn png(path: &Path, tumor: bool) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    let img = image::GrayImage::from_fn(20, 20, |x, y| image::Luma([if tumor && x > 8 && y > 8 { 220 } else { ((x * 7 + y * 3) % 90) as u8 }]));
    img.save(path).unwrap();
}

fn mask(path: &Path, x0: u32) {
    let img = image::GrayImage::from_fn(20, 20, |x, y| image::Luma([if x >= x0 && x < x0 + 4 && y > 8 { 255 } else { 0 }]));
    img.save(path).unwrap();
}

/// The tree the README draws.
fn write_busi(dir: &Path) {
    let d = dir.join("data/busi");
    std::fs::create_dir_all(&d).unwrap();
    std::fs::write(d.join("README.txt"), "not data").unwrap();
    png(&d.join("benign/p001/us1.png"), true);
    mask(&d.join("benign/p001/us1_mask.png"), 9);
    png(&d.join("benign/p002/us1.png"), true);
    mask(&d.join("benign/p002/us1_mask.png"), 9);
    mask(&d.join("benign/p002/us1_mask_1.png"), 14);
    png(&d.join("malignant/p003/us1.png"), true);
    mask(&d.join("malignant/p003/us1_mask.png"), 10);
    std::fs::write(d.join("malignant/p003/Thumbs.db"), b"\0\x01junk").unwrap();
    png(&d.join("normal/p001/us2.png"), false);
    png(&d.join("normal/p004/us1.png"), false);
}

#[test]
fn the_folders_worked_example_loads_as_the_readme_says() {
    let p = Project::new(&readme_folders_pipeline());
    write_busi(p.path());
    p.run(&[]).ok();
    let m = &lock_of(&p)["instances"]["data"]["metrics"];
    // "This loads 5 images ..., 3 of them positive, in 4 groups."
    assert_eq!(m["images"].as_u64(), Some(5), "{m:?}");
    let sum = |field: &str| -> u64 { ["train", "val", "test"].iter().map(|s| m[*s][field].as_u64().unwrap_or(0)).sum() };
    assert_eq!(sum("positive"), 3, "{m:?}");
    assert_eq!(sum("negative"), 2, "{m:?}");
    assert_eq!(sum("groups"), 4, "p001 holds a benign and a normal image and stays on one side: {m:?}");
    assert_eq!(m["skipped"].as_u64(), Some(0), "README.txt and Thumbs.db are ignored, not skipped: {m:?}");

    // "Were benign/p002/us1_mask.png and us1_mask_1.png missing, the run would fail naming the image."
    std::fs::remove_file(p.path().join("data/busi/benign/p002/us1_mask.png")).unwrap();
    std::fs::remove_file(p.path().join("data/busi/benign/p002/us1_mask_1.png")).unwrap();
    let r = p.run(&[]);
    assert_eq!(r.code(), 1, "{}\n{}", r.stdout(), r.stderr());
    let out = r.stdout() + &r.stderr();
    assert!(out.contains("data/busi/benign/p002/us1.png: positive image has no mask (expected `us1_mask.png` beside it)"), "{out}");
}
