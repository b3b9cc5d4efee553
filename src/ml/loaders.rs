//! Readers for data on disk: the LGG (Kaggle `kaggle_3m`) layout, class folders, and a CSV
//! manifest. Each returns samples already resized and normalised, with splits unassigned.
//!
//! Bad data is never silently dropped: each problem is an error naming the file, unless the
//! caller asked to skip, in which case the problem is listed in the returned report.

use std::path::{Path, PathBuf};

use super::dataset::{Normalize, Sample, Split, normalize_image};
use super::resize;

#[derive(Debug, Clone, PartialEq)]
pub enum ChannelSelect {
    /// Luma of RGB, or the only channel.
    Gray,
    /// One channel by index.
    Index(usize),
    /// All three RGB channels.
    Rgb,
}

#[derive(Debug, Clone)]
pub struct LoadOptions {
    pub channel: ChannelSelect,
    pub size: usize,
    pub normalize: Normalize,
    pub skip_errors: bool,
}

impl LoadOptions {
    pub fn channels(&self) -> usize {
        if self.channel == ChannelSelect::Rgb { 3 } else { 1 }
    }
}

#[derive(Debug, thiserror::Error)]
#[error("{path}: {reason}")]
pub struct LoadError {
    pub path: PathBuf,
    pub reason: String,
}

fn err(path: &Path, reason: impl Into<String>) -> LoadError {
    LoadError { path: path.to_path_buf(), reason: reason.into() }
}

#[derive(Debug, Default, Clone)]
pub struct LoadReport {
    /// Problems that were skipped because `on_error: skip` was asked for.
    pub skipped: Vec<String>,
}

/// Reads one image file and returns its selected channels, resized and normalised.
pub fn read_image(path: &Path, opts: &LoadOptions) -> Result<Vec<f32>, LoadError> {
    let img = image::open(path).map_err(|e| err(path, format!("cannot read image: {e}")))?;
    let rgb = img.to_rgb32f();
    let (w, h) = (rgb.width() as usize, rgb.height() as usize);
    if w == 0 || h == 0 {
        return Err(err(path, "image has no pixels"));
    }
    let raw = rgb.as_raw();
    let plane = |c: usize| -> Vec<f32> { (0..w * h).map(|i| raw[i * 3 + c]).collect() };
    let planes: Vec<Vec<f32>> = match &opts.channel {
        ChannelSelect::Gray => {
            vec![(0..w * h).map(|i| 0.299 * raw[i * 3] + 0.587 * raw[i * 3 + 1] + 0.114 * raw[i * 3 + 2]).collect()]
        }
        ChannelSelect::Index(c) => {
            if *c > 2 {
                return Err(err(path, format!("channel {c} requested, image has 3 (0..2)")));
            }
            vec![plane(*c)]
        }
        ChannelSelect::Rgb => vec![plane(0), plane(1), plane(2)],
    };
    let mut out = Vec::with_capacity(planes.len() * opts.size * opts.size);
    for p in planes {
        out.extend(resize::bilinear(&p, w, h, opts.size, opts.size));
    }
    normalize_image(&mut out, opts.channels(), opts.normalize);
    Ok(out)
}

/// Reads a mask file (any non-zero pixel is foreground) at its own size.
fn read_mask_raw(path: &Path) -> Result<(Vec<u8>, usize, usize), LoadError> {
    let img = image::open(path).map_err(|e| err(path, format!("cannot read mask: {e}")))?;
    let l = img.to_luma8();
    let (w, h) = (l.width() as usize, l.height() as usize);
    Ok((l.as_raw().iter().map(|&v| (v > 0) as u8).collect(), w, h))
}

fn image_dims(path: &Path) -> Result<(usize, usize), LoadError> {
    let (w, h) = image::image_dimensions(path).map_err(|e| err(path, format!("cannot read image: {e}")))?;
    Ok((w as usize, h as usize))
}

/// Reads and OR-merges masks; each must match the image size.
fn read_masks(image: &Path, masks: &[PathBuf], size: usize) -> Result<Vec<u8>, LoadError> {
    let (iw, ih) = image_dims(image)?;
    let mut merged = vec![0u8; iw * ih];
    for m in masks {
        let (px, w, h) = read_mask_raw(m)?;
        if (w, h) != (iw, ih) {
            return Err(err(m, format!("mask is {w}x{h} but its image {} is {iw}x{ih}", image.display())));
        }
        for (a, b) in merged.iter_mut().zip(px) {
            *a |= b;
        }
    }
    Ok(resize::nearest(&merged, iw, ih, size, size))
}

fn sample(id: String, group: String, label: u8, image: Vec<f32>, mask: Vec<u8>) -> Sample {
    Sample { id, group, label, split: Split::Train, image, mask }
}

/// Records `e` as skipped when allowed, otherwise returns it.
fn handle(report: &mut LoadReport, opts: &LoadOptions, e: LoadError) -> Result<(), LoadError> {
    if opts.skip_errors {
        report.skipped.push(e.to_string());
        Ok(())
    } else {
        Err(e)
    }
}

fn sorted_dir(dir: &Path) -> Result<Vec<PathBuf>, LoadError> {
    let rd = std::fs::read_dir(dir).map_err(|e| err(dir, format!("cannot list folder: {e}")))?;
    let mut v: Vec<PathBuf> = rd.filter_map(|e| e.ok().map(|e| e.path())).collect();
    v.sort();
    Ok(v)
}

fn is_image(p: &Path) -> bool {
    matches!(
        p.extension().and_then(|e| e.to_str()).map(|e| e.to_ascii_lowercase()).as_deref(),
        Some("png" | "jpg" | "jpeg" | "tif" | "tiff")
    )
}

fn stem(p: &Path) -> String {
    p.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default()
}

/// The Kaggle LGG layout: `<root>/<patient>/<patient>_<n>.tif` with `<patient>_<n>_mask.tif`.
/// `root` may be the `kaggle_3m` folder or its parent. Label = mask non-empty; group = patient.
pub fn load_lgg(root: &Path, opts: &LoadOptions) -> Result<(Vec<Sample>, LoadReport), LoadError> {
    let root = if root.join("kaggle_3m").is_dir() { root.join("kaggle_3m") } else { root.to_path_buf() };
    if !root.is_dir() {
        return Err(err(&root, "LGG root folder does not exist"));
    }
    let mut report = LoadReport::default();
    let mut out = Vec::new();
    for patient in sorted_dir(&root)?.into_iter().filter(|p| p.is_dir()) {
        let pname = stem(&patient);
        for file in sorted_dir(&patient)? {
            let s = stem(&file);
            if !is_image(&file) || s.ends_with("_mask") {
                continue;
            }
            let ext = file.extension().and_then(|e| e.to_str()).unwrap_or("tif");
            let mask_path = file.with_file_name(format!("{s}_mask.{ext}"));
            let res = (|| {
                if !mask_path.exists() {
                    return Err(err(&file, format!("missing mask {}", mask_path.display())));
                }
                let image = read_image(&file, opts)?;
                let mask = read_masks(&file, std::slice::from_ref(&mask_path), opts.size)?;
                let label = mask.iter().any(|&m| m > 0) as u8;
                Ok(sample(s.clone(), pname.clone(), label, image, mask))
            })();
            match res {
                Ok(x) => out.push(x),
                Err(e) => handle(&mut report, opts, e)?,
            }
        }
    }
    if out.is_empty() {
        return Err(err(&root, "no LGG slices found (expected <patient>/<patient>_<n>.tif with _mask.tif)"));
    }
    sort_natural(&mut out);
    Ok((out, report))
}

/// Orders by group then by the number in the id, so `_2` comes before `_10`.
fn sort_natural(samples: &mut [Sample]) {
    fn key(id: &str) -> (String, u64) {
        let digits: String = id.chars().rev().take_while(|c| c.is_ascii_digit()).collect::<Vec<_>>().into_iter().rev().collect();
        let head = id[..id.len() - digits.len()].to_string();
        (head, digits.parse().unwrap_or(0))
    }
    samples.sort_by(|a, b| (a.group.as_str(), key(&a.id)).cmp(&(b.group.as_str(), key(&b.id))));
}

/// Class folders: `<root>/<class>/.../<name>.png` with optional `<name>_mask*.png` (OR-merged).
/// The label is 1 when the class is in `positive`; the group is the image name (no patients).
pub fn load_folders(root: &Path, positive: &[String], opts: &LoadOptions) -> Result<(Vec<Sample>, LoadReport), LoadError> {
    if !root.is_dir() {
        return Err(err(root, "data folder does not exist"));
    }
    let mut report = LoadReport::default();
    let mut out = Vec::new();
    let classes: Vec<PathBuf> = sorted_dir(root)?.into_iter().filter(|p| p.is_dir()).collect();
    if classes.is_empty() {
        return Err(err(root, "no class folders inside"));
    }
    for class in classes {
        let cname = stem(&class);
        let label = positive.iter().any(|p| p == &cname) as u8;
        let mut files = Vec::new();
        walk(&class, &mut files)?;
        let images: Vec<&PathBuf> = files.iter().filter(|f| is_image(f) && !stem(f).contains("_mask")).collect();
        if images.is_empty() {
            handle(&mut report, opts, err(&class, "class folder holds no images"))?;
        }
        for img in images {
            let s = stem(img);
            let masks: Vec<PathBuf> = files
                .iter()
                .filter(|f| f.parent() == img.parent() && is_image(f) && stem(f).starts_with(&format!("{s}_mask")))
                .cloned()
                .collect();
            let res = (|| {
                let image = read_image(img, opts)?;
                let mask = if masks.is_empty() { vec![0u8; opts.size * opts.size] } else { read_masks(img, &masks, opts.size)? };
                Ok(sample(format!("{cname}/{s}"), format!("{cname}/{s}"), label, image, mask))
            })();
            match res {
                Ok(x) => out.push(x),
                Err(e) => handle(&mut report, opts, e)?,
            }
        }
    }
    if out.is_empty() {
        return Err(err(root, "no images found"));
    }
    Ok((out, report))
}

fn walk(dir: &Path, out: &mut Vec<PathBuf>) -> Result<(), LoadError> {
    for p in sorted_dir(dir)? {
        if p.is_dir() {
            walk(&p, out)?;
        } else {
            out.push(p);
        }
    }
    Ok(())
}

/// A CSV with columns `image`, `label`, and optionally `mask` and `group`; paths relative
/// to the CSV's folder. A missing group defaults to the image path.
pub fn load_manifest(csv_path: &Path, opts: &LoadOptions) -> Result<(Vec<Sample>, LoadReport), LoadError> {
    let base = csv_path.parent().unwrap_or(Path::new("."));
    let mut rdr = csv::Reader::from_path(csv_path).map_err(|e| err(csv_path, format!("cannot read CSV: {e}")))?;
    let headers = rdr.headers().map_err(|e| err(csv_path, format!("cannot read CSV header: {e}")))?.clone();
    let col = |name: &str| headers.iter().position(|h| h.trim() == name);
    let (ci, cl) = match (col("image"), col("label")) {
        (Some(i), Some(l)) => (i, l),
        _ => {
            return Err(err(
                csv_path,
                format!("CSV header must have `image` and `label` columns, found: {}", headers.iter().collect::<Vec<_>>().join(",")),
            ));
        }
    };
    let (cm, cg) = (col("mask"), col("group"));
    let mut report = LoadReport::default();
    let mut out = Vec::new();
    for (i, rec) in rdr.records().enumerate() {
        let line = i + 2;
        let res = (|| {
            let rec = rec.map_err(|e| err(csv_path, format!("line {line}: {e}")))?;
            let field = |c: usize| rec.get(c).unwrap_or("").trim().to_string();
            let img_rel = field(ci);
            let img = base.join(&img_rel);
            if !img.is_file() {
                return Err(err(csv_path, format!("line {line}: image `{img_rel}` does not exist")));
            }
            let label: u8 = match field(cl).as_str() {
                "1" | "true" | "yes" | "positive" => 1,
                "0" | "false" | "no" | "negative" => 0,
                other => return Err(err(csv_path, format!("line {line}: label `{other}` is not 0/1"))),
            };
            let image = read_image(&img, opts)?;
            let mask = match cm.map(field).filter(|m| !m.is_empty()) {
                Some(m) => {
                    let mp = base.join(&m);
                    if !mp.is_file() {
                        return Err(err(csv_path, format!("line {line}: mask `{m}` does not exist")));
                    }
                    read_masks(&img, &[mp], opts.size)?
                }
                None => vec![0u8; opts.size * opts.size],
            };
            let group = cg.map(field).filter(|g| !g.is_empty()).unwrap_or_else(|| img_rel.clone());
            Ok(sample(img_rel.clone(), group, label, image, mask))
        })();
        match res {
            Ok(x) => out.push(x),
            Err(e) => handle(&mut report, opts, e)?,
        }
    }
    if out.is_empty() {
        return Err(err(csv_path, "manifest lists no usable images"));
    }
    Ok((out, report))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opts() -> LoadOptions {
        LoadOptions { channel: ChannelSelect::Gray, size: 8, normalize: Normalize::MinMax, skip_errors: false }
    }

    fn write_png(path: &Path, w: u32, h: u32, v: u8) {
        image::GrayImage::from_pixel(w, h, image::Luma([v])).save(path).unwrap();
    }

    #[test]
    fn folders_merge_masks_and_report_size_mismatch() {
        let d = tempfile::tempdir().unwrap();
        let c = d.path().join("malignant");
        std::fs::create_dir_all(&c).unwrap();
        write_png(&c.join("a.png"), 10, 12, 100);
        let mut m1 = image::GrayImage::new(10, 12);
        m1.put_pixel(0, 0, image::Luma([255]));
        m1.save(c.join("a_mask.png")).unwrap();
        let mut m2 = image::GrayImage::new(10, 12);
        m2.put_pixel(8, 10, image::Luma([255]));
        m2.save(c.join("a_mask_1.png")).unwrap();
        let n = d.path().join("normal");
        std::fs::create_dir_all(&n).unwrap();
        write_png(&n.join("b.png"), 20, 20, 50);
        let (s, _) = load_folders(d.path(), &["malignant".into()], &opts()).unwrap();
        assert_eq!(s.len(), 2);
        assert_eq!(s[0].label, 1);
        assert_eq!(s[0].mask[0], 1);
        assert_eq!(s[0].mask[63], 1);
        assert_eq!(s[1].label, 0);
        write_png(&n.join("b_mask.png"), 5, 5, 255);
        let e = load_folders(d.path(), &["malignant".into()], &opts()).unwrap_err().to_string();
        assert!(e.contains("b_mask.png: mask is 5x5 but its image"), "{e}");
        let mut o = opts();
        o.skip_errors = true;
        let (s, r) = load_folders(d.path(), &["malignant".into()], &o).unwrap();
        assert_eq!((s.len(), r.skipped.len()), (1, 1));
    }

    #[test]
    fn truncated_image_is_named() {
        let d = tempfile::tempdir().unwrap();
        let c = d.path().join("x");
        std::fs::create_dir_all(&c).unwrap();
        std::fs::write(c.join("bad.png"), b"\x89PNG\r\n\x1a\nshort").unwrap();
        let e = load_folders(d.path(), &[], &opts()).unwrap_err().to_string();
        assert!(e.contains("bad.png: cannot read image"), "{e}");
    }

    #[test]
    fn manifest_row_pointing_nowhere() {
        let d = tempfile::tempdir().unwrap();
        write_png(&d.path().join("a.png"), 8, 8, 10);
        std::fs::write(d.path().join("m.csv"), "image,label,group\na.png,1,p1\nmissing.png,0,p2\n").unwrap();
        let e = load_manifest(&d.path().join("m.csv"), &opts()).unwrap_err().to_string();
        assert!(e.contains("m.csv: line 3: image `missing.png` does not exist"), "{e}");
    }
}
