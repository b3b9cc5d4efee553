//! A small builder around the real binary: a temp project, a pipeline file, a cache.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

pub const BIN: &str = env!("CARGO_BIN_EXE_camflow");

/// The repository root (README, pipelines).
pub fn root() -> std::path::PathBuf {
    std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The smallest complete study: data -> train -> gradcam -> threshold -> score, and
/// filter -> retrain -> score. 13 instances.
pub const TINY: &str = r#"name: tiny
seed: 7
stages:
  data:
    kind: data
    params: {source: synthetic, count: 48, image_size: 16, contrast: 0.8, slices_per_patient: 4}
  train:
    kind: train
    inputs: {data: data}
    params: {epochs: 1, batch_size: 16}
  cams:
    kind: gradcam
    inputs: {model: train, data: data}
  masks:
    kind: threshold
    inputs: {heatmaps: cams}
    sweep:
      grid:
        value: [0.3, 0.5]
  seg:
    kind: score
    inputs: {data: data, masks: masks}
  filtered:
    kind: filter
    inputs: {data: data, heatmaps: cams}
    sweep:
      grid:
        mode: [multiply, inverse]
  retrain:
    kind: retrain
    inputs: {data: filtered}
    params: {epochs: 1, batch_size: 16}
  cls:
    kind: score
    inputs: {data: filtered, model: retrain}
"#;

pub struct Project {
    pub dir: tempfile::TempDir,
}

pub struct Run {
    pub out: Output,
}

impl Run {
    pub fn stdout(&self) -> String {
        String::from_utf8_lossy(&self.out.stdout).into_owned()
    }
    pub fn stderr(&self) -> String {
        String::from_utf8_lossy(&self.out.stderr).into_owned()
    }
    pub fn code(&self) -> i32 {
        self.out.status.code().unwrap_or(-1)
    }
    #[track_caller]
    pub fn ok(self) -> Self {
        assert!(self.out.status.success(), "camflow failed ({}):\nstdout:\n{}\nstderr:\n{}", self.code(), self.stdout(), self.stderr());
        self
    }
    /// The `summary:` counts of a run.
    #[track_caller]
    pub fn summary(&self, field: &str) -> usize {
        let line = self
            .stdout()
            .lines()
            .find(|l| l.starts_with("summary:"))
            .map(String::from)
            .unwrap_or_else(|| panic!("no summary line in:\n{}", self.stdout()));
        let tok = line.split_whitespace().find(|t| t.starts_with(&format!("{field}="))).unwrap_or_else(|| panic!("no {field} in {line}"));
        tok[field.len() + 1..].parse().expect("a count")
    }
    /// Labels of the instances this run executed (`done` lines).
    pub fn ran(&self) -> Vec<String> {
        let mut v: Vec<String> = self
            .stdout()
            .lines()
            .filter_map(|l| l.strip_prefix("done    "))
            .map(|l| l.rsplit_once("  ").map(|x| x.0).unwrap_or(l).to_string())
            .collect();
        v.sort();
        v
    }
}

impl Project {
    pub fn new(yaml: &str) -> Project {
        let dir = tempfile::tempdir().expect("temp dir");
        std::fs::write(dir.path().join("p.yaml"), yaml).expect("write pipeline");
        Project { dir }
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    pub fn pipeline(&self) -> PathBuf {
        self.path().join("p.yaml")
    }

    pub fn cache(&self) -> PathBuf {
        self.path().join("cache")
    }

    pub fn write(&self, yaml: &str) {
        std::fs::write(self.pipeline(), yaml).expect("write pipeline");
    }

    pub fn cmd(&self, args: &[&str]) -> Command {
        let mut c = Command::new(BIN);
        c.current_dir(self.path()).env_remove("CAMFLOW_CACHE").env_remove("RUST_LOG").args(args);
        c
    }

    /// `camflow <args>` with the project's cache.
    pub fn camflow(&self, args: &[&str]) -> Run {
        let mut a: Vec<&str> = args.to_vec();
        let cache = self.cache();
        let cache = cache.to_str().expect("utf-8 path");
        a.extend(["--cache-dir", cache]);
        Run { out: self.cmd(&a).output().expect("camflow runs") }
    }

    pub fn run(&self, extra: &[&str]) -> Run {
        let p = self.pipeline();
        let mut a = vec!["run", p.to_str().expect("utf-8")];
        a.extend(extra);
        self.camflow(&a)
    }

    /// Path of the object file of `output` of the instance `label`.
    pub fn object_of(&self, label: &str, output: &str) -> PathBuf {
        for e in std::fs::read_dir(self.cache().join("actions")).expect("actions dir").flatten() {
            let v: serde_json::Value = serde_json::from_slice(&std::fs::read(e.path()).expect("read")).expect("json");
            if v["label"] == label {
                let d = v["outputs"][output]["digest"].as_str().expect("digest").to_string();
                return self.cache().join("objects").join(&d[..2]).join(&d[2..]);
            }
        }
        panic!("no record for {label}");
    }
}

/// Flips one byte of a read-only file, keeping or not its mtime.
pub fn flip_byte(path: &Path, keep_mtime: bool) {
    let meta = std::fs::metadata(path).expect("object exists");
    let mtime = meta.modified().expect("mtime");
    let mut perm = meta.permissions();
    #[allow(clippy::permissions_set_readonly_false)]
    perm.set_readonly(false);
    std::fs::set_permissions(path, perm).expect("chmod");
    let mut bytes = std::fs::read(path).expect("read");
    let i = bytes.len() / 2;
    bytes[i] ^= 0x55;
    std::fs::write(path, bytes).expect("write");
    if keep_mtime {
        let f = std::fs::File::options().write(true).open(path).expect("open");
        f.set_modified(mtime).expect("set mtime");
    }
}

/// An LGG-style folder: `<dir>/<patient>/<patient>_<n>.tif` (RGB) with `_mask.tif`, for each
/// patient and slice; every other slice has a tumor square. Pixel values vary with `seed`.
pub fn write_lgg(dir: &Path, patients: &[&str], slices: usize, seed: u8) {
    for (pi, p) in patients.iter().enumerate() {
        let d = dir.join(p);
        std::fs::create_dir_all(&d).expect("patient folder");
        for n in 1..=slices {
            let img = image::RgbImage::from_fn(12, 12, |x, y| {
                let v = (x * 7 + y * 3) as u8 ^ seed ^ (pi as u8 * 31 + n as u8);
                image::Rgb([v, v.wrapping_add(40), v.wrapping_add(80)])
            });
            img.save(d.join(format!("{p}_{n}.tif"))).expect("write tif");
            let mask = image::GrayImage::from_fn(12, 12, |x, y| image::Luma([if n % 2 == 0 && (3..7).contains(&x) && (3..7).contains(&y) { 255 } else { 0 }]));
            mask.save(d.join(format!("{p}_{n}_mask.tif"))).expect("write mask");
        }
    }
}

/// Class folders `<dir>/<class>/<name>.png` with a few small grey images each.
pub fn write_folders(dir: &Path, classes: &[&str], per_class: usize) {
    for (ci, c) in classes.iter().enumerate() {
        let d = dir.join(c);
        std::fs::create_dir_all(&d).expect("class folder");
        for n in 0..per_class {
            let img = image::GrayImage::from_fn(10, 10, |x, y| image::Luma([((x + y) as u8 * 9) ^ (ci as u8 * 50 + n as u8)]));
            img.save(d.join(format!("img{n}.png"))).expect("write png");
        }
    }
}

/// The lock file of the project's pipeline, parsed.
/// Every file under `dir`, at any depth (links are listed, never followed).
pub fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut files = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            if e.file_type().is_ok_and(|t| t.is_dir()) { stack.push(e.path()) } else { files.push(e.path()) }
        }
    }
    files
}

pub fn lock_of(p: &Project) -> serde_yaml::Value {
    let text = std::fs::read_to_string(p.path().join("p.lock.yaml")).expect("lock file");
    serde_yaml::from_str(&text).expect("lock yaml")
}
