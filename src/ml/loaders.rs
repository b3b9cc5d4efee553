//! Readers for data on disk: the LGG (Kaggle `kaggle_3m`) layout, class folders, and a CSV
//! manifest. Each returns samples already resized and normalised, with splits unassigned.
//!
//! Bad data is never silently dropped: each problem is an error naming the file, unless the
//! caller asked to skip, in which case the problem is listed in the returned report. A load
//! goes on past a bad file and reports every bad file at once, so a data set is fixed in one
//! pass, not one file per run. A positive image without a mask is bad data (its Dice would
//! be 0 against an empty truth), unless the caller opted to keep it without a mask
//! ([`MissingMasks::Exclude`]): its sample then has an empty `mask`, which scoring leaves out
//! of Dice.
//!
//! Each source has a *listing* (`lgg_files`, `folder_files`, `manifest_files`): exactly the
//! files its loader reads, found by the same code the loader walks with, so whoever digests
//! the data digests what is read: not a `Thumbs.db`, a lock file or a cache beside it, and
//! files a manifest names outside its folder. Every file is read once, and the report keeps
//! the SHA-256 of the bytes each read returned, so the caller can check that what was read is
//! what was planned.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

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

/// What a positive image without a mask is.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum MissingMasks {
    /// A bad file (the default).
    Error,
    /// Kept, without ground truth: an empty `Sample::mask`, left out of Dice.
    Exclude,
}

#[derive(Debug, Clone)]
pub struct LoadOptions {
    pub channel: ChannelSelect,
    pub size: usize,
    pub normalize: Normalize,
    pub skip_errors: bool,
    pub missing_masks: MissingMasks,
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
    /// Every problem (`path: reason`) when several files were bad; empty for one.
    pub problems: Vec<String>,
}

fn err(path: &Path, reason: impl Into<String>) -> LoadError {
    LoadError { path: path.to_path_buf(), reason: reason.into(), problems: Vec::new() }
}

/// How many bad files an error message names; the rest are counted (all are in `problems`).
pub const SHOWN_PROBLEMS: usize = 20;

/// One error for all the bad files of a load: the only one as it is, or, for several, their
/// count and the first [`SHOWN_PROBLEMS`], each `path: reason` on its own line.
fn all_errors(root: &Path, mut errors: Vec<LoadError>) -> LoadError {
    if errors.len() == 1 {
        return errors.remove(0);
    }
    let problems: Vec<String> = errors.iter().map(|e| e.to_string()).collect();
    let mut reason = format!("{} bad files (fix them, or set `on_error: skip` to leave them out):", problems.len());
    for p in problems.iter().take(SHOWN_PROBLEMS) {
        reason.push_str("\n  ");
        reason.push_str(p);
    }
    if problems.len() > SHOWN_PROBLEMS {
        reason.push_str(&format!("\n  ... and {} more (all in the stage log)", problems.len() - SHOWN_PROBLEMS));
    }
    LoadError { path: root.to_path_buf(), reason, problems }
}

#[derive(Debug, Default)]
pub struct LoadReport {
    /// Problems that were skipped because `on_error: skip` was asked for.
    pub skipped: Vec<String>,
    /// Problems found with `on_error: fail`: the load goes on, and fails at the end with all.
    errors: Vec<LoadError>,
    /// Ids of positive images kept without a mask ([`MissingMasks::Exclude`]).
    pub without_mask: Vec<String>,
    /// Images whose mask has tumor at full resolution but none once resized: no output pixel
    /// is at least half tumor (a small tumor, or one straddling pixel corners, at
    /// `image_size`). They keep their label (an LGG slice is positive): their truth at this
    /// size is empty, so they are out of mean-Dice and an empty truth in Dice-all.
    pub vanished: Vec<String>,
    /// Every file the loader tried to read: the SHA-256 (hex) of the bytes it got, or `None`
    /// when it could not be read.
    pub read: BTreeMap<PathBuf, Option<String>>,
}

impl LoadReport {
    /// Reads a whole file once, remembering the digest of what was read.
    fn read(&mut self, path: &Path) -> Result<Vec<u8>, LoadError> {
        // Only regular files (after following links) are opened: a FIFO named like a slice
        // would block forever and a link to /dev/zero would never end. It is a bad file.
        match std::fs::metadata(path) {
            Ok(m) if !m.is_file() => {
                self.read.insert(path.to_path_buf(), None);
                return Err(err(path, "cannot read: not a regular file (a FIFO, device or folder)"));
            }
            _ => {}
        }
        match std::fs::read(path) {
            Ok(bytes) => {
                let d = hex::encode(Sha256::digest(&bytes));
                if let Some(Some(prev)) = self.read.get(path)
                    && *prev != d
                {
                    return Err(err(path, "file changed while it was being read"));
                }
                self.read.insert(path.to_path_buf(), Some(d));
                Ok(bytes)
            }
            Err(e) => {
                self.read.insert(path.to_path_buf(), None);
                Err(err(path, format!("cannot read: {e}")))
            }
        }
    }
}

fn decode(path: &Path, bytes: &[u8], what: &str) -> Result<image::DynamicImage, LoadError> {
    image::ImageReader::new(std::io::Cursor::new(bytes))
        .with_guessed_format()
        .map_err(|e| err(path, format!("cannot read {what}: {e}")))?
        .decode()
        .map_err(|e| err(path, format!("cannot read {what}: {e}")))
}

/// Reads one image file and returns its selected channels, resized and normalised, with its
/// own width and height.
fn read_image(path: &Path, opts: &LoadOptions, report: &mut LoadReport) -> Result<(Vec<f32>, usize, usize), LoadError> {
    let img = decode(path, &report.read(path)?, "image")?;
    // A grey image would be silently replicated into R, G and B: asking it for channel 1 (the
    // LGG FLAIR) or for RGB is a mix-up of files, not data.
    let colour = img.color().has_color();
    match &opts.channel {
        ChannelSelect::Index(c) if *c > 0 && !colour => {
            return Err(err(path, format!("image has 1 channel (greyscale), but channel {c} was asked for")));
        }
        ChannelSelect::Rgb if !colour => return Err(err(path, "image has 1 channel (greyscale), but `rgb` was asked for")),
        _ => {}
    }
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
        // By area when shrinking (no aliasing), bilinear when enlarging; centred like the mask.
        out.extend(resize::image(&p, w, h, opts.size, opts.size));
    }
    normalize_image(&mut out, opts.channels(), opts.normalize);
    Ok((out, w, h))
}

/// Reads and OR-merges masks; each must match the image size (`iw` x `ih`). Returns the mask
/// resized to `size` x `size`, and whether the full-resolution mask has a tumor pixel: a label
/// taken from a mask comes from the full-resolution one, since a small tumor can vanish from
/// a shrunk mask.
fn read_masks(
    image: &Path,
    (iw, ih): (usize, usize),
    masks: &[PathBuf],
    size: usize,
    report: &mut LoadReport,
) -> Result<(Vec<u8>, bool), LoadError> {
    let mut merged = vec![0u8; iw * ih];
    for m in masks {
        let img = decode(m, &report.read(m)?, "mask")?;
        let (w, h) = (img.width() as usize, img.height() as usize);
        if (w, h) != (iw, ih) {
            return Err(err(m, format!("mask is {w}x{h} but its image {} is {iw}x{ih}", image.display())));
        }
        for (a, b) in merged.iter_mut().zip(marked_pixels(&img)) {
            *a |= b;
        }
    }
    let tumor = merged.iter().any(|&m| m > 0);
    // By area, centred as the image is: an output pixel is tumor when at least half of it is.
    let small = resize::mask(&merged, iw, ih, size, size);
    if tumor && !small.iter().any(|&m| m > 0) {
        report.vanished.push(image.display().to_string());
    }
    Ok((small, tumor))
}

/// 1 where a mask marks a pixel: any colour channel above 0 in the file's own sample values.
/// Not after a conversion to 8-bit grey, which reads a 16-bit mask of 0/1 (common in medical
/// data) as empty and rounds a faint colour to 0.
fn marked_pixels(img: &image::DynamicImage) -> Vec<u8> {
    use image::DynamicImage as D;
    fn any<T: PartialOrd + Default + Copy>(raw: &[T], channels: usize, colours: usize) -> Vec<u8> {
        raw.chunks_exact(channels).map(|px| px[..colours].iter().any(|&v| v > T::default()) as u8).collect()
    }
    match img {
        D::ImageLuma8(b) => any(b.as_raw(), 1, 1),
        D::ImageLumaA8(b) => any(b.as_raw(), 2, 1),
        D::ImageRgb8(b) => any(b.as_raw(), 3, 3),
        D::ImageRgba8(b) => any(b.as_raw(), 4, 3),
        D::ImageLuma16(b) => any(b.as_raw(), 1, 1),
        D::ImageLumaA16(b) => any(b.as_raw(), 2, 1),
        D::ImageRgb16(b) => any(b.as_raw(), 3, 3),
        D::ImageRgba16(b) => any(b.as_raw(), 4, 3),
        D::ImageRgb32F(b) => any(b.as_raw(), 3, 3),
        D::ImageRgba32F(b) => any(b.as_raw(), 4, 3),
        other => any(other.to_rgb32f().as_raw(), 3, 3),
    }
}

fn sample(id: String, group: String, label: u8, image: Vec<f32>, mask: Vec<u8>) -> Sample {
    Sample { id, group, label, split: Split::Train, image, mask }
}

/// Records `e` as skipped when allowed, otherwise as an error reported when the load ends.
fn handle(report: &mut LoadReport, opts: &LoadOptions, e: LoadError) {
    if opts.skip_errors {
        report.skipped.push(e.to_string());
    } else {
        report.errors.push(e);
    }
}

/// The end of a load: every recorded error at once, else the report, its skipped and vanished
/// files named relative to the data's folder (`root`'s, or a manifest's own folder), as the
/// key names them. What a load records (in a record, then in the lock) must not depend on
/// where the data lives or how its path was spelled (`data`, `./data/`, absolute, or the
/// parent of LGG's `kaggle_3m`), or two runs with one key would record different metrics.
fn finish(root: &Path, mut report: LoadReport) -> Result<LoadReport, LoadError> {
    if !report.errors.is_empty() {
        return Err(all_errors(root, std::mem::take(&mut report.errors)));
    }
    let dir = if root.is_file() { root.parent().unwrap_or(Path::new("")) } else { root };
    for name in report.skipped.iter_mut().chain(report.vanished.iter_mut()) {
        *name = relative_names(dir, name);
    }
    Ok(report)
}

/// `text` with every path under `dir` written relative to it: each `dir/` that starts a path
/// (at the start of the text, or after a blank, a quote, a backtick or a parenthesis) is
/// removed. `dir` is taken as written, since the loaders built every path from it by `join`
/// (`data/` joined with `P` is `data/P`, `././data` keeps its `././`).
fn relative_names(dir: &Path, text: &str) -> String {
    let mut prefix = dir.display().to_string();
    if prefix.is_empty() {
        return text.to_string();
    }
    if !prefix.ends_with('/') {
        prefix.push('/');
    }
    let boundary = |c: Option<char>| c.is_none_or(|c| c.is_whitespace() || "'\"`(".contains(c));
    let mut out = String::with_capacity(text.len());
    let mut at = 0;
    while let Some(i) = text[at..].find(&prefix).map(|i| at + i) {
        out.push_str(&text[at..i]);
        if !boundary(text[..i].chars().next_back()) {
            out.push_str(&prefix);
        }
        at = i + prefix.len();
    }
    let rest = &text[at..];
    out.push_str(rest);
    out
}

/// The truth of a positive image without a mask file: an error, or (opted in) no truth.
fn no_mask(image: &Path, expected: &str, opts: &LoadOptions) -> Result<Vec<u8>, LoadError> {
    match opts.missing_masks {
        MissingMasks::Exclude => Ok(Vec::new()),
        MissingMasks::Error => Err(err(
            image,
            format!(
                "positive image has no mask (expected {expected}); add it, or set `missing_masks: exclude` to keep the image out of Dice"
            ),
        )),
    }
}

fn sorted_dir(dir: &Path) -> Result<Vec<PathBuf>, LoadError> {
    let rd = std::fs::read_dir(dir).map_err(|e| err(dir, format!("cannot list folder: {e}")))?;
    let mut v: Vec<PathBuf> = rd.filter_map(|e| e.ok().map(|e| e.path())).collect();
    v.sort();
    Ok(v)
}

/// An image file by its extension. Hidden files (`.DS_Store`, macOS's AppleDouble `._x.png`
/// beside every copied image) are never images, whatever their extension.
fn is_image(p: &Path) -> bool {
    let hidden = p.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.starts_with('.'));
    !hidden
        && matches!(
            p.extension().and_then(|e| e.to_str()).map(|e| e.to_ascii_lowercase()).as_deref(),
            Some("png" | "jpg" | "jpeg" | "tif" | "tiff")
        )
}

/// A camflow cache kept inside a data folder is not data (it holds `objects/` and `actions/`).
fn is_cache(dir: &Path) -> bool {
    dir.join("objects").is_dir() && dir.join("actions").is_dir()
}

/// Sub-folders of `dir` (symlinks to folders included), sorted, without caches.
fn sub_dirs(dir: &Path) -> Result<Vec<PathBuf>, LoadError> {
    Ok(sorted_dir(dir)?.into_iter().filter(|p| p.is_dir() && !is_cache(p)).collect())
}

fn stem(p: &Path) -> String {
    p.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default()
}

/// Claims sample id `id` for `path`; the path that claimed it first, if another did. Ids must
/// be unique: one image under two groups could land in train and in test.
fn claimed_before(ids: &mut BTreeMap<String, PathBuf>, id: &str, path: &Path) -> Option<PathBuf> {
    match ids.entry(id.to_string()) {
        std::collections::btree_map::Entry::Occupied(first) => Some(first.get().clone()),
        std::collections::btree_map::Entry::Vacant(v) => {
            v.insert(path.to_path_buf());
            None
        }
    }
}

/// A folder's whole name: a folder has no extension (`grade.2` is not `grade`).
fn dir_name(p: &Path) -> String {
    p.file_name().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default()
}

/// `path` relative to `root`, with `/` separators: a name for the key that no location enters.
fn rel(root: &Path, path: &Path) -> String {
    path.strip_prefix(root).unwrap_or(path).to_string_lossy().replace('\\', "/")
}

/// One image the loaders read, with the mask files that go with it.
struct Item {
    image: PathBuf,
    masks: Vec<PathBuf>,
}

fn flatten(root: &Path, items: &[Item]) -> Vec<(String, PathBuf)> {
    let mut out = Vec::new();
    for it in items {
        out.push((rel(root, &it.image), it.image.clone()));
        out.extend(it.masks.iter().map(|m| (rel(root, m), m.clone())));
    }
    out
}

fn lgg_root(root: &Path) -> Result<PathBuf, LoadError> {
    let root = if root.join("kaggle_3m").is_dir() { root.join("kaggle_3m") } else { root.to_path_buf() };
    if !root.is_dir() {
        return Err(err(&root, "LGG root folder does not exist"));
    }
    Ok(root)
}

/// Per patient folder: its slices, each an image and its `_mask` (which may be missing).
fn lgg_items(root: &Path) -> Result<Vec<(String, Vec<Item>)>, LoadError> {
    let mut out = Vec::new();
    for patient in sub_dirs(root)? {
        let mut items = Vec::new();
        for file in sorted_dir(&patient)? {
            let s = stem(&file);
            if !is_image(&file) || s.ends_with("_mask") {
                continue;
            }
            // From the file's own bytes: a name that is not UTF-8 must still find its mask.
            let mut name = file.file_stem().unwrap_or_default().to_os_string();
            name.push("_mask.");
            name.push(file.extension().unwrap_or_else(|| std::ffi::OsStr::new("tif")));
            let mask = file.with_file_name(name);
            items.push(Item { image: file, masks: vec![mask] });
        }
        out.push((dir_name(&patient), items));
    }
    Ok(out)
}

/// The files `load_lgg` reads, by name relative to the LGG folder.
pub fn lgg_files(root: &Path) -> Result<Vec<(String, PathBuf)>, LoadError> {
    let root = lgg_root(root)?;
    let items: Vec<Item> = lgg_items(&root)?.into_iter().flat_map(|(_, v)| v).collect();
    Ok(flatten(&root, &items))
}

/// The Kaggle LGG layout: `<root>/<patient>/<patient>_<n>.tif` with `<patient>_<n>_mask.tif`.
/// `root` may be the `kaggle_3m` folder or its parent. Label = the full-resolution mask is
/// non-empty; group = patient.
pub fn load_lgg(root: &Path, opts: &LoadOptions) -> Result<(Vec<Sample>, LoadReport), LoadError> {
    let root = lgg_root(root)?;
    let mut report = LoadReport::default();
    let mut out = Vec::new();
    // A slice's id is its file name: a patient folder copied or linked under another name would
    // put the same slices in two groups, and so in two splits (train and test).
    let mut ids: BTreeMap<String, PathBuf> = BTreeMap::new();
    for (pname, items) in lgg_items(&root)? {
        for Item { image: file, masks } in items {
            let s = stem(&file);
            let res = (|| {
                if let Some(first) = claimed_before(&mut ids, &s, &file) {
                    return Err(err(
                        &file,
                        format!(
                            "slice `{s}` again (first {}): a patient folder copied or linked under another name? each slice must appear once",
                            first.display()
                        ),
                    ));
                }
                if !masks[0].exists() {
                    return Err(err(&file, format!("missing mask {}", masks[0].display())));
                }
                let (image, w, h) = read_image(&file, opts, &mut report)?;
                // The label is the full-resolution mask's: any tumor pixel (GUIDE.md).
                let (mask, tumor) = read_masks(&file, (w, h), &masks, opts.size, &mut report)?;
                let label = tumor as u8;
                Ok(sample(s.clone(), pname.clone(), label, image, mask))
            })();
            match res {
                Ok(x) => out.push(x),
                Err(e) => handle(&mut report, opts, e),
            }
        }
    }
    let report = finish(&root, report)?;
    if out.is_empty() && !report.skipped.is_empty() {
        let first = &report.skipped[0];
        return Err(err(&root, format!("all {} LGG slices found are bad files, skipped (on_error: skip); the first: {first}", report.skipped.len())));
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

/// Per class folder: its name and its images with their masks.
fn folder_items(root: &Path) -> Result<Vec<(PathBuf, Vec<Item>)>, LoadError> {
    if !root.is_dir() {
        return Err(err(root, "data folder does not exist"));
    }
    let classes = sub_dirs(root)?;
    if classes.is_empty() {
        return Err(err(root, "no class folders inside"));
    }
    let mut seen = BTreeSet::new();
    let mut out = Vec::new();
    for class in classes {
        let mut files = Vec::new();
        walk(&class, &mut files, &mut seen)?;
        let items = files
            .iter()
            .filter(|f| is_image(f) && !stem(f).contains("_mask"))
            .map(|img| {
                let s = stem(img);
                let masks = files
                    .iter()
                    .filter(|f| f.parent() == img.parent() && is_image(f) && stem(f).starts_with(&format!("{s}_mask")))
                    .cloned()
                    .collect();
                Item { image: img.clone(), masks }
            })
            .collect();
        out.push((class, items));
    }
    Ok(out)
}

/// The files `load_folders` reads, by name relative to `root`.
pub fn folder_files(root: &Path) -> Result<Vec<(String, PathBuf)>, LoadError> {
    let items: Vec<Item> = folder_items(root)?.into_iter().flat_map(|(_, v)| v).collect();
    Ok(flatten(root, &items))
}

/// The id and group of an image of class folder `class` named `cname`: the id is
/// `<class>/<path under the class folder, without extension>`; the group is the first
/// sub-folder under the class folder (a patient: `tumor/p1/a.png` and `normal/p1/b.png` are
/// one group), or, for an image directly in the class folder, its id (each image its own
/// group).
fn folder_id(class: &Path, cname: &str, img: &Path) -> (String, String) {
    let r = rel(class, img);
    let under = match r.rsplit_once('/') {
        Some((dir, _)) => format!("{dir}/{}", stem(img)),
        None => stem(img),
    };
    let id = format!("{cname}/{under}");
    let group = match r.split_once('/') {
        Some((first, _)) => first.to_string(),
        None => id.clone(),
    };
    (id, group)
}

/// `positive` must name at least one class folder, and only class folders that exist: a typo
/// (`tumour`) or an empty list would quietly make every image negative.
fn check_positive(root: &Path, positive: &[String], classes: &[String]) -> Result<(), LoadError> {
    let found = classes.iter().map(|c| format!("`{c}`")).collect::<Vec<_>>().join(", ");
    if positive.is_empty() {
        return Err(err(
            root,
            format!("`positive` lists no class, so every image would be negative; list the positive class folders (found: {found})"),
        ));
    }
    let unknown: Vec<String> = positive
        .iter()
        .filter(|p| !classes.contains(p))
        .map(|p| match crate::suggest::did_you_mean(p, classes.iter().map(String::as_str)) {
            Some(s) => format!("`{p}` (did you mean `{s}`?)"),
            None => format!("`{p}`"),
        })
        .collect();
    if unknown.is_empty() {
        return Ok(());
    }
    Err(err(root, format!("`positive` names no class folder {}; class folders found: {found}", unknown.join(", "))))
}

/// Class folders: `<root>/<class>/[<group>/...]<name>.png` with optional `<name>_mask*.png`
/// beside it (OR-merged: the union). The label is 1 when the class is in `positive`, which
/// must name existing class folders; see [`folder_id`] for ids and groups.
pub fn load_folders(root: &Path, positive: &[String], opts: &LoadOptions) -> Result<(Vec<Sample>, LoadReport), LoadError> {
    let mut report = LoadReport::default();
    let mut out = Vec::new();
    let mut ids: BTreeMap<String, PathBuf> = BTreeMap::new();
    let classes = folder_items(root)?;
    check_positive(root, positive, &classes.iter().map(|(c, _)| dir_name(c)).collect::<Vec<_>>())?;
    for (class, items) in classes {
        let cname = dir_name(&class);
        let label = positive.iter().any(|p| p == &cname) as u8;
        if items.is_empty() {
            handle(&mut report, opts, err(&class, "class folder holds no images"));
        }
        for Item { image: img, masks } in items {
            let (id, group) = folder_id(&class, &cname, &img);
            let res = (|| {
                if let Some(first) = claimed_before(&mut ids, &id, &img) {
                    return Err(err(&img, format!("has the same name as {} (image ids must be unique)", first.display())));
                }
                let (image, w, h) = read_image(&img, opts, &mut report)?;
                let mask = if !masks.is_empty() {
                    read_masks(&img, (w, h), &masks, opts.size, &mut report)?.0
                } else if label == 1 {
                    let m = no_mask(&img, &format!("`{}_mask.png` beside it", stem(&img)), opts)?;
                    report.without_mask.push(id.clone());
                    m
                } else {
                    vec![0u8; opts.size * opts.size]
                };
                Ok(sample(id.clone(), group, label, image, mask))
            })();
            match res {
                Ok(x) => out.push(x),
                Err(e) => handle(&mut report, opts, e),
            }
        }
    }
    let report = finish(root, report)?;
    if out.is_empty() {
        return Err(err(root, "no images found"));
    }
    Ok((out, report))
}

/// Every file under `dir`, sorted; a folder reached twice (a symlink loop) is walked once.
fn walk(dir: &Path, out: &mut Vec<PathBuf>, seen: &mut BTreeSet<PathBuf>) -> Result<(), LoadError> {
    let real = std::fs::canonicalize(dir).map_err(|e| err(dir, format!("cannot list folder: {e}")))?;
    if !seen.insert(real) {
        return Ok(());
    }
    for p in sorted_dir(dir)? {
        if p.is_dir() {
            if !is_cache(&p) {
                walk(&p, out, seen)?;
            }
        } else {
            out.push(p);
        }
    }
    Ok(())
}

/// One row of a manifest, as far as it parses.
struct Row {
    line: usize,
    image: String,
    label: String,
    mask: Option<String>,
    group: Option<String>,
}

/// The rows of a manifest; a row that does not parse is an error at its line.
fn manifest_rows(csv_path: &Path, bytes: &[u8]) -> Result<Vec<Result<Row, LoadError>>, LoadError> {
    let mut rdr = csv::Reader::from_reader(bytes);
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
    Ok(rdr
        .records()
        .enumerate()
        .map(|(i, rec)| {
            // Where the record starts in the file (csv skips blank lines, and a quoted field
            // may span lines); the count is a fallback for an error without a position.
            let line = match &rec {
                Ok(r) => r.position().map(|p| p.line() as usize),
                Err(e) => e.position().map(|p| p.line() as usize),
            }
            .unwrap_or(i + 2);
            let rec = rec.map_err(|e| err(csv_path, format!("line {line}: {e}")))?;
            let field = |c: usize| rec.get(c).unwrap_or("").trim().to_string();
            Ok(Row {
                line,
                image: field(ci),
                label: field(cl),
                mask: cm.map(field).filter(|m| !m.is_empty()),
                group: cg.map(field).filter(|g| !g.is_empty()),
            })
        })
        .collect())
}

/// The name the manifest itself has among its files (its path is not data).
pub const MANIFEST_NAME: &str = "<manifest>";

/// The files `load_manifest` reads: the CSV, and every image and mask it names (wherever
/// they are), by the name the CSV gives them. A CSV that cannot be parsed lists only itself:
/// the loader reports the error.
pub fn manifest_files(csv_path: &Path) -> Result<Vec<(String, PathBuf)>, LoadError> {
    if !csv_path.is_file() {
        return Err(err(csv_path, "manifest file does not exist"));
    }
    let base = csv_path.parent().unwrap_or(Path::new("."));
    let mut out = vec![(MANIFEST_NAME.to_string(), csv_path.to_path_buf())];
    if let Ok(bytes) = std::fs::read(csv_path)
        && let Ok(rows) = manifest_rows(csv_path, &bytes)
    {
        for r in rows.into_iter().flatten() {
            out.push((r.image.clone(), base.join(&r.image)));
            if let Some(m) = r.mask {
                out.push((m.clone(), base.join(&m)));
            }
        }
    }
    Ok(out)
}

/// A CSV with columns `image`, `label`, and optionally `mask` and `group`; paths relative
/// to the CSV's folder. A missing group defaults to the image path. An image file listed on
/// two rows (by any path that resolves to it) is a bad file at the second row.
pub fn load_manifest(csv_path: &Path, opts: &LoadOptions) -> Result<(Vec<Sample>, LoadReport), LoadError> {
    let base = csv_path.parent().unwrap_or(Path::new("."));
    let mut report = LoadReport::default();
    let bytes = report.read(csv_path).map_err(|e| err(csv_path, format!("cannot read CSV: {}", e.reason)))?;
    let rows = manifest_rows(csv_path, &bytes)?;
    let mut out = Vec::new();
    // Each image file by its device and inode (the same file under any name: symbolic and hard
    // links, `./`, `..`): the line and the name of the row that listed it first.
    let mut listed: BTreeMap<(u64, u64), (usize, String)> = BTreeMap::new();
    for row in rows {
        let res = (|| {
            let Row { line, image: img_rel, label, mask, group } = row?;
            let img = base.join(&img_rel);
            if !img.is_file() {
                return Err(err(csv_path, format!("line {line}: image `{img_rel}` does not exist")));
            }
            // One file on two rows could land in train and in test: a silent leak.
            let meta = std::fs::metadata(&img).map_err(|e| err(&img, format!("cannot read image: {e}")))?;
            let file_id = (std::os::unix::fs::MetadataExt::dev(&meta), std::os::unix::fs::MetadataExt::ino(&meta));
            if let Some((first, name)) = listed.get(&file_id) {
                return Err(err(
                    csv_path,
                    format!("line {line}: image `{img_rel}` is the same file as `{name}` on line {first} (list each image once)"),
                ));
            }
            let label: u8 = match label.as_str() {
                "1" | "true" | "yes" | "positive" => 1,
                "0" | "false" | "no" | "negative" => 0,
                other => return Err(err(csv_path, format!("line {line}: label `{other}` is not 0/1"))),
            };
            let (image, w, h) = read_image(&img, opts, &mut report)?;
            let mask = match mask {
                Some(m) => {
                    let mp = base.join(&m);
                    if !mp.is_file() {
                        return Err(err(csv_path, format!("line {line}: mask `{m}` does not exist")));
                    }
                    read_masks(&img, (w, h), &[mp], opts.size, &mut report)?.0
                }
                None if label == 1 => {
                    let m = no_mask(&img, &format!("a `mask` on line {line} of {}", csv_path.display()), opts)?;
                    report.without_mask.push(img_rel.clone());
                    m
                }
                None => vec![0u8; opts.size * opts.size],
            };
            let group = group.unwrap_or_else(|| img_rel.clone());
            Ok((sample(img_rel.clone(), group, label, image, mask), file_id, line))
        })();
        match res {
            // Listed only once accepted: a row rejected for itself (a bad label, a missing
            // mask) is no first listing for a later, good row to be a duplicate of.
            Ok((x, file_id, line)) => {
                listed.insert(file_id, (line, x.id.clone()));
                out.push(x)
            }
            Err(e) => handle(&mut report, opts, e),
        }
    }
    let report = finish(csv_path, report)?;
    if out.is_empty() {
        return Err(err(csv_path, "manifest lists no usable images"));
    }
    Ok((out, report))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opts() -> LoadOptions {
        LoadOptions {
            channel: ChannelSelect::Gray,
            size: 8,
            normalize: Normalize::MinMax,
            skip_errors: false,
            missing_masks: MissingMasks::Error,
        }
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
        // The bottom-right 2x2 corner: all of what the last 8x8 pixel covers.
        let m2 = image::GrayImage::from_fn(10, 12, |x, y| image::Luma([if x >= 8 && y >= 10 { 255 } else { 0 }]));
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
    fn a_positive_without_a_mask_is_an_error_unless_excluded() {
        let d = tempfile::tempdir().unwrap();
        for c in ["tumor", "normal"] {
            std::fs::create_dir_all(d.path().join(c)).unwrap();
            write_png(&d.path().join(c).join("a.png"), 8, 8, 40);
        }
        write_png(&d.path().join("tumor/b.png"), 8, 8, 90);
        write_png(&d.path().join("tumor/b_mask.png"), 8, 8, 255);
        let pos = ["tumor".to_string()];
        let e = load_folders(d.path(), &pos, &opts()).unwrap_err().to_string();
        assert!(e.contains("tumor/a.png: positive image has no mask (expected `a_mask.png` beside it)"), "{e}");
        // A negative needs no mask.
        assert!(!e.contains("normal/a.png"), "{e}");
        let mut o = opts();
        o.missing_masks = MissingMasks::Exclude;
        let (s, r) = load_folders(d.path(), &pos, &o).unwrap();
        let a = s.iter().find(|x| x.id == "tumor/a").unwrap();
        assert_eq!((a.label, a.mask.len()), (1, 0), "kept, without ground truth");
        assert_eq!(s.iter().find(|x| x.id == "tumor/b").unwrap().mask, vec![1u8; 64]);
        assert_eq!(s.iter().find(|x| x.id == "normal/a").unwrap().mask, vec![0u8; 64]);
        assert_eq!(r.without_mask, ["tumor/a"]);
    }

    #[test]
    fn every_bad_file_is_reported_at_once() {
        let d = tempfile::tempdir().unwrap();
        let c = d.path().join("x");
        std::fs::create_dir_all(&c).unwrap();
        write_png(&c.join("good.png"), 8, 8, 10);
        for n in 0..25 {
            std::fs::write(c.join(format!("bad{n:02}.png")), b"not a png").unwrap();
        }
        let x = ["x".to_string()];
        let mut o = opts();
        o.missing_masks = MissingMasks::Exclude;
        let e = load_folders(d.path(), &x, &o).unwrap_err();
        assert_eq!(e.problems.len(), 25);
        let text = e.to_string();
        assert!(text.contains("25 bad files"), "{text}");
        assert!(text.contains("bad00.png: cannot read image") && text.contains("bad19.png: cannot read image"), "{text}");
        assert!(!text.contains("bad20.png") && text.contains("... and 5 more"), "{text}");
        o.skip_errors = true;
        let (s, r) = load_folders(d.path(), &x, &o).unwrap();
        assert_eq!((s.len(), r.skipped.len()), (1, 25));
    }

    #[test]
    fn sub_folders_of_a_class_folder_are_groups() {
        let d = tempfile::tempdir().unwrap();
        for (dir, name) in [("tumor/p1", "a"), ("normal/p1", "a"), ("normal/p2", "a"), ("normal", "c")] {
            std::fs::create_dir_all(d.path().join(dir)).unwrap();
            write_png(&d.path().join(dir).join(format!("{name}.png")), 8, 8, 10);
        }
        write_png(&d.path().join("tumor/p1/a_mask.png"), 8, 8, 255);
        let (s, _) = load_folders(d.path(), &["tumor".into()], &opts()).unwrap();
        let got: Vec<(&str, &str)> = s.iter().map(|x| (x.id.as_str(), x.group.as_str())).collect();
        assert_eq!(got, [("normal/c", "normal/c"), ("normal/p1/a", "p1"), ("normal/p2/a", "p2"), ("tumor/p1/a", "p1")]);
        // Two images of one name in one folder would share an id.
        write_png(&d.path().join("normal/c.jpg"), 8, 8, 10);
        let e = load_folders(d.path(), &["tumor".into()], &opts()).unwrap_err().to_string();
        assert!(e.contains("c.png: has the same name as") || e.contains("c.jpg: has the same name as"), "{e}");
    }

    #[test]
    fn manifest_positive_without_mask() {
        let d = tempfile::tempdir().unwrap();
        write_png(&d.path().join("a.png"), 8, 8, 10);
        write_png(&d.path().join("b.png"), 8, 8, 10);
        std::fs::write(d.path().join("m.csv"), "image,label\na.png,1\nb.png,0\n").unwrap();
        let e = load_manifest(&d.path().join("m.csv"), &opts()).unwrap_err().to_string();
        assert!(e.contains("a.png: positive image has no mask (expected a `mask` on line 2 of"), "{e}");
        let mut o = opts();
        o.missing_masks = MissingMasks::Exclude;
        let (s, r) = load_manifest(&d.path().join("m.csv"), &o).unwrap();
        assert_eq!((s[0].mask.len(), s[1].mask.len(), r.without_mask.len()), (0, 64, 1));
    }

    #[test]
    fn truncated_image_is_named() {
        let d = tempfile::tempdir().unwrap();
        let c = d.path().join("x");
        std::fs::create_dir_all(&c).unwrap();
        std::fs::write(c.join("bad.png"), b"\x89PNG\r\n\x1a\nshort").unwrap();
        let e = load_folders(d.path(), &["x".into()], &opts()).unwrap_err().to_string();
        assert!(e.contains("bad.png: cannot read image"), "{e}");
    }

    #[test]
    fn lgg_label_comes_from_the_full_resolution_mask() {
        // A 64x64 slice shrunk to 8x8: its tumor, one pixel (under half of an 8x8 block and
        // off the pixels corner sampling reads), vanishes from the mask, not from the label.
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("kaggle_3m/P1");
        std::fs::create_dir_all(&p).unwrap();
        for n in 1..=2 {
            let img = image::RgbImage::from_fn(64, 64, |x, y| image::Rgb([(x * 3) as u8, (y * 3) as u8, 9]));
            img.save(p.join(format!("P1_{n}.tif"))).unwrap();
            let tumor = |x: u32, y: u32| n == 1 && (x, y) == (3, 5);
            image::GrayImage::from_fn(64, 64, |x, y| image::Luma([if tumor(x, y) { 255 } else { 0 }]))
                .save(p.join(format!("P1_{n}_mask.tif")))
                .unwrap();
        }
        let (s, r) = load_lgg(d.path(), &opts()).unwrap();
        let got: Vec<(&str, u8, usize)> = s.iter().map(|x| (x.id.as_str(), x.label, x.mask.iter().filter(|&&v| v > 0).count())).collect();
        assert_eq!(got, [("P1_1", 1, 0), ("P1_2", 0, 0)]);
        assert_eq!(r.vanished, ["P1/P1_1.tif"], "named under the kaggle_3m folder, wherever it is");
    }

    #[test]
    fn recorded_names_do_not_depend_on_how_the_data_path_was_spelled() {
        assert_eq!(relative_names(Path::new("data/"), "data/P/a.tif: missing mask data/P/a_mask.tif"), "P/a.tif: missing mask P/a_mask.tif");
        assert_eq!(relative_names(Path::new("./data"), "./data/P/a.tif: x `./data/b`"), "P/a.tif: x `b`");
        assert_eq!(relative_names(Path::new("././data/"), "././data/P/a.tif: x ../data/b"), "P/a.tif: x ../data/b");
        assert_eq!(relative_names(Path::new("."), "./m.csv: line 2: `./a.png`"), "m.csv: line 2: `a.png`");
        // A path that merely ends like the folder is another path.
        assert_eq!(relative_names(Path::new("data"), "data/a: see /old/mydata/b and data/c"), "a: see /old/mydata/b and c");
        assert_eq!(relative_names(Path::new(""), "data/a"), "data/a");
        assert_eq!(relative_names(Path::new("data"), "data/data/x: `data/y`"), "data/x: `y`");
        // One LGG set named by its parent, by `kaggle_3m` itself, with a trailing slash or
        // absolutely: the same skipped and vanished names.
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("kaggle_3m/P1");
        std::fs::create_dir_all(&p).unwrap();
        image::GrayImage::from_fn(16, 16, |x, _| image::Luma([x as u8])).save(p.join("P1_1.tif")).unwrap();
        image::GrayImage::from_fn(16, 16, |_, _| image::Luma([0])).save(p.join("P1_1_mask.tif")).unwrap();
        std::fs::write(p.join("P1_2.tif"), b"not a tif").unwrap();
        std::fs::write(p.join("P1_3.tif"), b"no mask beside it").unwrap();
        let skip = LoadOptions { skip_errors: true, ..opts() };
        let roots = [d.path().to_path_buf(), d.path().join("kaggle_3m"), PathBuf::from(format!("{}/", d.path().display()))];
        let skipped: Vec<Vec<String>> = roots.iter().map(|r| load_lgg(r, &skip).unwrap().1.skipped).collect();
        assert_eq!(skipped[0].len(), 2, "{skipped:?}");
        assert!(skipped[0].iter().all(|s| s.starts_with("P1/P1_") && !s.contains(&d.path().display().to_string())), "{skipped:?}");
        assert!(skipped[0].iter().any(|s| s.contains("missing mask P1/P1_3_mask.tif")), "{skipped:?}");
        assert!(skipped.iter().all(|s| s == &skipped[0]), "{skipped:?}");
    }

    #[test]
    fn positive_must_name_existing_class_folders() {
        let d = tempfile::tempdir().unwrap();
        for c in ["normal", "tumor"] {
            std::fs::create_dir_all(d.path().join(c)).unwrap();
            write_png(&d.path().join(c).join("a.png"), 8, 8, 40);
            write_png(&d.path().join(c).join("a_mask.png"), 8, 8, 255);
        }
        let e = load_folders(d.path(), &["tumour".into()], &opts()).unwrap_err().to_string();
        let want = "`positive` names no class folder `tumour` (did you mean `tumor`?); class folders found: `normal`, `tumor`";
        assert!(e.contains(want), "{e}");
        let e = load_folders(d.path(), &["tumor".into(), "cancer".into()], &opts()).unwrap_err().to_string();
        assert!(e.contains("`positive` names no class folder `cancer`; class folders found"), "{e}");
        let e = load_folders(d.path(), &[], &opts()).unwrap_err().to_string();
        assert!(e.contains("`positive` lists no class, so every image would be negative") && e.contains("`normal`, `tumor`"), "{e}");
        // Not a bad file to skip: the whole load is misconfigured.
        let mut o = opts();
        o.skip_errors = true;
        assert!(load_folders(d.path(), &["tumour".into()], &o).is_err());
        let (s, _) = load_folders(d.path(), &["tumor".into()], &opts()).unwrap();
        assert_eq!(s.iter().map(|x| x.label).collect::<Vec<_>>(), [0, 1]);
    }

    #[test]
    fn manifest_lists_each_image_once() {
        let d = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(d.path().join("a")).unwrap();
        write_png(&d.path().join("a/b.png"), 8, 8, 10);
        write_png(&d.path().join("c.png"), 8, 8, 20);
        write_png(&d.path().join("e.png"), 8, 8, 30);
        std::fs::hard_link(d.path().join("e.png"), d.path().join("hard.png")).unwrap();
        let csv = d.path().join("m.csv");
        let rows = "a/b.png,0,p1\nc.png,0,p2\n./a/b.png,0,p3\nc.png,0,p2\ne.png,0,p4\na/../c.png,0,p5\nhard.png,1,p6\n";
        std::fs::write(&csv, format!("image,label,group\n{rows}")).unwrap();
        let e = load_manifest(&csv, &opts()).unwrap_err();
        let text = e.to_string();
        assert_eq!(e.problems.len(), 4, "{text}");
        assert!(text.contains("m.csv: line 8: image `hard.png` is the same file as `e.png` on line 6"), "{text}");
        assert!(text.contains("m.csv: line 4: image `./a/b.png` is the same file as `a/b.png` on line 2"), "{text}");
        assert!(text.contains("m.csv: line 5: image `c.png` is the same file as `c.png` on line 3"), "{text}");
        assert!(text.contains("m.csv: line 7: image `a/../c.png` is the same file as `c.png` on line 3"), "{text}");
        let mut o = opts();
        o.skip_errors = true;
        let (s, r) = load_manifest(&csv, &o).unwrap();
        assert_eq!(s.iter().map(|x| x.id.as_str()).collect::<Vec<_>>(), ["a/b.png", "c.png", "e.png"]);
        assert_eq!(r.skipped.len(), 4);
    }

    #[test]
    fn manifest_row_pointing_nowhere() {
        let d = tempfile::tempdir().unwrap();
        write_png(&d.path().join("a.png"), 8, 8, 10);
        std::fs::write(d.path().join("m.csv"), "image,label,group\na.png,0,p1\nmissing.png,0,p2\n").unwrap();
        let e = load_manifest(&d.path().join("m.csv"), &opts()).unwrap_err().to_string();
        assert!(e.contains("m.csv: line 3: image `missing.png` does not exist"), "{e}");
    }

    /// One LGG slice of 16x16 (`P/P_n.tif`) with the given mask image.
    fn lgg_slice(dir: &Path, patient: &str, n: u32, mask: image::DynamicImage) {
        let p = dir.join("kaggle_3m").join(patient);
        std::fs::create_dir_all(&p).unwrap();
        image::RgbImage::from_pixel(16, 16, image::Rgb([40, 80, 120])).save(p.join(format!("{patient}_{n}.tif"))).unwrap();
        mask.save(p.join(format!("{patient}_{n}_mask.tif"))).unwrap();
    }

    /// A mask pixel is tumor when any colour channel is above 0 in the file's own values: a
    /// 16-bit mask of 0/1 and a faint colour count (8-bit grey read them as empty).
    #[test]
    fn masks_mark_what_is_above_zero_in_their_own_sample_values() {
        let d = tempfile::tempdir().unwrap();
        let block = |v: u16| image::ImageBuffer::from_fn(16, 16, move |x, y| image::Luma([if x < 8 && y < 8 { v } else { 0 }]));
        lgg_slice(d.path(), "P1", 1, image::DynamicImage::ImageLuma16(block(1)));
        let faint = image::RgbImage::from_fn(16, 16, |x, _| image::Rgb([0, 0, (x < 8) as u8]));
        lgg_slice(d.path(), "P1", 2, image::DynamicImage::ImageRgb8(faint));
        lgg_slice(d.path(), "P1", 3, image::DynamicImage::ImageLuma16(block(0)));
        let (s, _) = load_lgg(d.path(), &opts()).unwrap();
        let got: Vec<(&str, u8, usize)> = s.iter().map(|x| (x.id.as_str(), x.label, x.mask.iter().filter(|&&v| v > 0).count())).collect();
        assert_eq!(got, [("P1_1", 1, 16), ("P1_2", 1, 32), ("P1_3", 0, 0)]);
    }

    /// With `on_error: skip` and every slice bad, the error says so (not "no slices found").
    #[test]
    fn every_lgg_slice_skipped_is_told_as_such() {
        let d = tempfile::tempdir().unwrap();
        lgg_slice(d.path(), "P1", 1, image::DynamicImage::ImageLuma8(image::GrayImage::new(4, 4)));
        let mut o = opts();
        o.skip_errors = true;
        let e = load_lgg(d.path(), &o).unwrap_err().to_string();
        assert!(e.contains("all 1 LGG slices found are bad files, skipped (on_error: skip); the first: ") && e.contains("mask is 4x4"), "{e}");
    }

    /// A patient folder linked under another name would put its slices in two groups (and
    /// two splits): refused, naming both files.
    #[test]
    fn an_lgg_slice_found_twice_is_an_error() {
        let d = tempfile::tempdir().unwrap();
        lgg_slice(d.path(), "P1", 1, image::DynamicImage::ImageLuma8(image::GrayImage::new(16, 16)));
        let k = d.path().join("kaggle_3m");
        std::os::unix::fs::symlink(k.join("P1"), k.join("P9")).unwrap();
        let e = load_lgg(d.path(), &opts()).unwrap_err().to_string();
        assert!(e.contains("P9/P1_1.tif: slice `P1_1` again (first ") && e.contains("P1/P1_1.tif"), "{e}");
    }

    /// A folder's whole name is its class or patient: `grade.2` is not `grade`.
    #[test]
    fn folder_names_keep_their_dots() {
        let d = tempfile::tempdir().unwrap();
        for c in ["grade.2", "grade.3"] {
            std::fs::create_dir_all(d.path().join(c)).unwrap();
            write_png(&d.path().join(c).join("a.png"), 8, 8, 40);
        }
        write_png(&d.path().join("grade.3").join("a_mask.png"), 8, 8, 255);
        let (s, _) = load_folders(d.path(), &["grade.3".into()], &opts()).unwrap();
        let got: Vec<(&str, u8)> = s.iter().map(|x| (x.id.as_str(), x.label)).collect();
        assert_eq!(got, [("grade.2/a", 0), ("grade.3/a", 1)]);
    }

    /// Manifest errors name the line the record starts on, after blank lines and quoted
    /// fields that span lines.
    #[test]
    fn manifest_errors_name_the_file_line() {
        let d = tempfile::tempdir().unwrap();
        write_png(&d.path().join("a.png"), 8, 8, 40);
        std::fs::write(d.path().join("m.csv"), "image,label\n\na.png,0\n\"multi\nline.png\",0\n").unwrap();
        let e = load_manifest(&d.path().join("m.csv"), &opts()).unwrap_err().to_string();
        assert!(e.contains("m.csv: line 4: image `multi\nline.png` does not exist"), "{e}");
    }
}
