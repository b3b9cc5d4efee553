//! `data`: the data source stage (synthetic phantoms, LGG, class folders, CSV manifest).

use std::path::{Path, PathBuf};

use serde_json::{Value as Json, json};

use super::io;
use super::params as p;
use crate::cache::file_digests::{UNREADABLE, combine};
use crate::ml::dataset::{Dataset, Normalize, Split, SplitConfig, assign_splits};
use crate::ml::loaders::{self, ChannelSelect, LoadOptions, MissingMasks};
use crate::ml::synthetic::{self, SyntheticConfig};
use crate::stage_kind::*;

pub struct Data;

const SOURCES: &[&str] = &["synthetic", "lgg", "folders", "manifest"];

fn resolve(base: &Path, s: &str) -> PathBuf {
    let p = Path::new(s);
    if p.is_absolute() { p.to_path_buf() } else { base.join(p) }
}

fn channel(params: &Params, source: &str) -> Result<ChannelSelect, StageError> {
    match params.get("channel") {
        Some(Json::Number(n)) => Ok(ChannelSelect::Index(n.as_u64().unwrap_or(0) as usize)),
        Some(Json::String(s)) => match (s.as_str(), source) {
            ("gray" | "grey", _) => Ok(ChannelSelect::Gray),
            ("rgb", _) => Ok(ChannelSelect::Rgb),
            // The LGG TIFFs hold pre-contrast, FLAIR and post-contrast in R, G, B.
            ("pre", "lgg") => Ok(ChannelSelect::Index(0)),
            ("flair", "lgg") => Ok(ChannelSelect::Index(1)),
            ("post", "lgg") => Ok(ChannelSelect::Index(2)),
            (other, _) => Err(StageError::new(format!(
                "channel `{other}` is not known for source `{source}` (use gray, rgb, an index, or pre/flair/post for lgg)"
            ))),
        },
        _ => Ok(ChannelSelect::Gray),
    }
}

/// The data name and exactly the files the source reads (the same walk its loader does), or
/// `None` for a source that reads nothing outside the cache.
fn listing(params: &Params, base: &Path) -> Option<(&'static str, Result<DataFiles, loaders::LoadError>)> {
    match p::opt_str(params, "source") {
        Some("lgg") => p::opt_str(params, "root").map(|r| ("root", loaders::lgg_files(&resolve(base, r)))),
        Some("folders") => p::opt_str(params, "root").map(|r| ("root", loaders::folder_files(&resolve(base, r)))),
        Some("manifest") => p::opt_str(params, "manifest").map(|m| ("manifest", loaders::manifest_files(&resolve(base, m)))),
        _ => None,
    }
}

/// Checks that the files the loader read have the digest the run was planned (and keyed)
/// with. The file digests memo trusts (size, mtime, ctime), and the data is read after it was
/// digested: without this, a file changed in between would be cached under the old key.
fn check_read(ctx: &RunContext<'_>, read: &std::collections::BTreeMap<PathBuf, Option<String>>) -> Result<(), StageError> {
    let Some((name, files)) = listing(ctx.params, ctx.base_dir) else { return Ok(()) };
    let files = files.map_err(StageError::new)?;
    let digests: Vec<(&str, String)> = files
        .iter()
        .map(|(rel, path)| {
            let d = match read.get(path) {
                Some(Some(d)) => d.clone(),
                Some(None) => UNREADABLE.to_string(),
                // Listed but not read (a slice skipped before its image was opened): it did not
                // shape the output, but it is in the key, so it is digested as it is now.
                None => crate::cache::file_digests::digest_now(path),
            };
            (rel.as_str(), d)
        })
        .collect();
    let got = combine(digests.iter().map(|(r, d)| (*r, d.as_str())));
    match ctx.planned_data.get(name) {
        Some(planned) if *planned != got => Err(StageError::new(format!(
            "data `{name}` changed since the run was planned: the files read digest to {}, the key has {} (a file changed during \
             the run, or was rewritten keeping its size and times); nothing was cached; run again, with --rehash if this repeats",
            &got[..12],
            &planned[..12.min(planned.len())]
        ))),
        Some(_) => Ok(()),
        None => Err(StageError::new(format!("data `{name}` has no planned digest (an internal error)"))),
    }
}

impl StageKind for Data {
    fn name(&self) -> &'static str {
        "data"
    }
    fn version(&self) -> u32 {
        // 2: synthetic phantoms use the pure-Rust `libm` (sinf, expf), not the platform's.
        // 3: a positive without a mask is an error (or, opted in, kept without truth); every
        //    bad file is reported at once; images in sub-folders of a class folder get their
        //    path in their id and the sub-folder as their group.
        // 4: an LGG label comes from the full-resolution mask; masks are resized by area and
        //    images by area averaging (bilinear when enlarging), centred on each other; a
        //    manifest listing one image twice and a `positive` naming no class folder are
        //    errors. Synthetic phantoms are made at image_size and are unchanged.
        // 5: skipped files are named relative to the data's own folder, however its path was
        //    written (records of v4 could hold a cwd-dependent path). Same dataset bytes.
        // 6: a mask pixel is tumor when any colour channel is above 0 in the file's own values
        //    (a 16-bit mask of 0/1 read as empty through 8-bit grey); class and patient folders
        //    keep their whole names (`grade.2` was `grade`); an LGG slice found twice, or a
        //    manifest image hard-linked under two names, is an error. Synthetic phantoms are
        //    unchanged.
        6
    }
    fn doc(&self) -> &'static str {
        "Loads or generates labelled images with ground-truth masks, resized and normalised, split into train/val/test by group (patient)."
    }
    fn inputs(&self) -> &'static [InputSlot] {
        &[]
    }
    fn output(&self) -> ArtifactType {
        ArtifactType::Dataset
    }
    fn params(&self) -> Vec<ParamSpec> {
        vec![
            ParamSpec {
                name: "source",
                ty: ParamType::Choice(SOURCES),
                default: || json!("synthetic"),
                optional: false,
                doc: "where the images come from",
            },
            ParamSpec {
                name: "root",
                ty: ParamType::Str,
                default: p::null,
                optional: true,
                doc: "data folder (lgg: the kaggle_3m folder or its parent; folders: the class folders' parent), relative to the pipeline file",
            },
            ParamSpec {
                name: "manifest",
                ty: ParamType::Str,
                default: p::null,
                optional: true,
                doc: "CSV with image,label[,mask][,group] columns (source: manifest)",
            },
            ParamSpec {
                name: "positive",
                ty: ParamType::StrList,
                default: || json!([]),
                optional: false,
                doc: "class folders labelled positive (source: folders)",
            },
            ParamSpec {
                name: "image_size",
                ty: ParamType::Int { min: 8, max: 1024 },
                default: || json!(32),
                optional: false,
                doc: "images are resized to image_size x image_size (area average when shrinking, bilinear when enlarging; masks by area)",
            },
            ParamSpec {
                name: "channel",
                ty: ParamType::IntOrStr,
                default: || json!("gray"),
                optional: false,
                doc: "gray, rgb, a channel index, or for lgg pre/flair/post",
            },
            ParamSpec {
                name: "normalize",
                ty: ParamType::Choice(&["minmax", "zscore", "none"]),
                default: || json!("minmax"),
                optional: false,
                doc: "per-image intensity normalisation",
            },
            ParamSpec {
                name: "val_fraction",
                ty: ParamType::Float { min: 0.0, max: 0.9 },
                default: || json!(0.15),
                optional: false,
                doc: "fraction of groups for validation",
            },
            ParamSpec {
                name: "test_fraction",
                ty: ParamType::Float { min: 0.0, max: 0.9 },
                default: || json!(0.25),
                optional: false,
                doc: "fraction of groups for test",
            },
            ParamSpec {
                name: "split_seed",
                ty: ParamType::Int { min: 0, max: i64::MAX },
                default: p::null,
                optional: true,
                doc: "seed of the group split (default: the pipeline seed)",
            },
            ParamSpec {
                name: "on_error",
                ty: ParamType::Choice(&["fail", "skip"]),
                default: || json!("fail"),
                optional: false,
                doc: "bad files stop the stage (all of them are listed), or are skipped and listed in the run output and the metrics",
            },
            ParamSpec {
                name: "missing_masks",
                ty: ParamType::Choice(&["error", "exclude"]),
                default: || json!("error"),
                optional: false,
                doc: "a positive image without a mask (folders, manifest) is a bad file, or is kept without ground truth and left out of Dice",
            },
            ParamSpec {
                name: "count",
                ty: ParamType::Int { min: 2, max: 1_000_000 },
                default: || json!(400),
                optional: false,
                doc: "synthetic: number of slices",
            },
            ParamSpec {
                name: "tumor_fraction",
                ty: ParamType::Float { min: 0.0, max: 1.0 },
                default: || json!(0.5),
                optional: false,
                doc: "synthetic: fraction of slices with a tumor",
            },
            ParamSpec {
                name: "contrast",
                ty: ParamType::Float { min: 0.0, max: 5.0 },
                default: || json!(0.3),
                optional: false,
                doc: "synthetic: tumor brightness over tissue",
            },
            ParamSpec {
                name: "noise",
                ty: ParamType::Float { min: 0.0, max: 5.0 },
                default: || json!(0.1),
                optional: false,
                doc: "synthetic: pixel noise standard deviation",
            },
            ParamSpec {
                name: "slices_per_patient",
                ty: ParamType::Int { min: 1, max: 10_000 },
                default: || json!(8),
                optional: false,
                doc: "synthetic: slices per synthetic patient (split group)",
            },
        ]
    }
    fn check(&self, params: &Params, _upstream: &dyn Fn(&str) -> Option<Json>) -> Vec<(String, String)> {
        let mut e = Vec::new();
        match p::opt_str(params, "source") {
            Some("lgg" | "folders") if p::opt_str(params, "root").is_none() => {
                e.push(("root".into(), "is required for this source".into()))
            }
            Some("manifest") if p::opt_str(params, "manifest").is_none() => {
                e.push(("manifest".into(), "is required for source `manifest`".into()))
            }
            _ => {}
        }
        let (v, t) = (
            params.get("val_fraction").and_then(|v| v.as_f64()).unwrap_or(0.0),
            params.get("test_fraction").and_then(|v| v.as_f64()).unwrap_or(0.0),
        );
        if v + t >= 1.0 {
            e.push(("test_fraction".into(), format!("val_fraction + test_fraction must be below 1, found {}", v + t)));
        }
        e
    }
    fn location_params(&self) -> &'static [&'static str] {
        // Where the data lives; what it holds is in the key through `external_files`.
        &["root", "manifest"]
    }
    /// Params the source does not read are keyed at their defaults (a phantom's `count` for a
    /// folder of files, `positive` outside `folders`), and `positive` as a set: changing them
    /// reruns nothing. Synthetic data reads every param it keys, so its keys are unchanged.
    fn key_params(&self, params: &Params) -> Params {
        let source = p::opt_str(params, "source").unwrap_or("synthetic");
        let mut ignored: Vec<&str> = Vec::new();
        if source != "synthetic" {
            ignored.extend(["count", "tumor_fraction", "contrast", "noise", "slices_per_patient"]);
        }
        if source != "folders" {
            ignored.push("positive");
        }
        if source == "lgg" {
            // A missing LGG mask is always a bad file (every LGG slice has one).
            ignored.push("missing_masks");
        }
        let mut out = without_locations(self, params);
        set_to_defaults(&mut out, &self.params(), &ignored);
        if let Some(Json::Array(classes)) = out.get_mut("positive") {
            classes.sort_by_key(|c| c.to_string());
            classes.dedup();
        }
        out
    }
    fn external_files(&self, params: &Params, base: &Path) -> Result<Vec<(String, DataFiles)>, StageError> {
        let Some((name, files)) = listing(params, base) else { return Ok(Vec::new()) };
        Ok(vec![(name.to_string(), files.map_err(StageError::new)?)])
    }
    fn run(&self, ctx: &mut RunContext<'_>) -> Result<Outcome, StageError> {
        let params = ctx.params;
        let source = p::str(params, "source")?;
        let size = p::usize(params, "image_size")?;
        let normalize = match p::str(params, "normalize")? {
            "zscore" => Normalize::ZScore,
            "none" => Normalize::None,
            _ => Normalize::MinMax,
        };
        let opts = LoadOptions {
            channel: channel(params, source)?,
            size,
            normalize,
            skip_errors: p::str(params, "on_error")? == "skip",
            missing_masks: if p::str(params, "missing_masks")? == "exclude" { MissingMasks::Exclude } else { MissingMasks::Error },
        };
        // Every bad file goes to the stage log; the error itself names the first few.
        let err = |e: loaders::LoadError| {
            for problem in &e.problems {
                (ctx.log)(format!("bad file: {problem}"));
            }
            StageError::new(e)
        };
        // Where the data lives: the root folder, or the manifest file (none for synthetic
        // data). The loaders name skipped files relative to it, so that the lock file does not
        // depend on the data's folder or on how its path was written.
        let location = match source {
            "synthetic" => PathBuf::new(),
            "manifest" => resolve(ctx.base_dir, p::str(params, "manifest")?),
            _ => resolve(ctx.base_dir, p::str(params, "root")?),
        };
        // Synthetic phantoms read no file and skip nothing: an empty report.
        let (mut samples, channels, report) = match source {
            "synthetic" => {
                let mut ds = synthetic::generate(&SyntheticConfig {
                    count: p::usize(params, "count")?,
                    size,
                    tumor_fraction: p::f64(params, "tumor_fraction")?,
                    contrast: p::f64(params, "contrast")? as f32,
                    noise: p::f64(params, "noise")? as f32,
                    slices_per_patient: p::usize(params, "slices_per_patient")?,
                    seed: ctx.seed,
                });
                for s in &mut ds.samples {
                    crate::ml::dataset::normalize_image(&mut s.image, 1, normalize);
                }
                (ds.samples, 1, loaders::LoadReport::default())
            }
            "lgg" => {
                let (s, r) = loaders::load_lgg(&location, &opts).map_err(err)?;
                (s, opts.channels(), r)
            }
            "folders" => {
                let (s, r) = loaders::load_folders(&location, &p::str_list(params, "positive"), &opts).map_err(err)?;
                (s, opts.channels(), r)
            }
            _ => {
                let (s, r) = loaders::load_manifest(&location, &opts).map_err(err)?;
                (s, opts.channels(), r)
            }
        };
        let loaders::LoadReport { skipped, read, without_mask, vanished, .. } = report;
        check_read(ctx, &read)?;
        for s in &skipped {
            (ctx.log)(format!("skipped: {s}"));
        }
        // A tumor that covers no pixel at this size by half: the image keeps its label, its
        // truth here is empty (out of mean-Dice, an empty truth in Dice-all).
        if !vanished.is_empty() {
            (ctx.log)(format!(
                "{} image{} with tumor at full resolution ha{} an empty mask at {size}x{size}: {}",
                vanished.len(),
                if vanished.len() == 1 { "" } else { "s" },
                if vanished.len() == 1 { "s" } else { "ve" },
                first_few(&vanished)
            ));
        }
        let warnings = data_warnings(&skipped, &without_mask);
        for w in &warnings {
            (ctx.log)(format!("warning: {}: {}", w["flag"].as_str().unwrap_or(""), w["message"].as_str().unwrap_or("")));
        }
        let split_seed = p::opt_u64(params, "split_seed").unwrap_or(ctx.seed);
        assign_splits(
            &mut samples,
            SplitConfig { val: p::f64(params, "val_fraction")?, test: p::f64(params, "test_fraction")?, seed: split_seed },
        );
        let ds = Dataset { channels, height: size, width: size, samples };
        let count = |sp: Split, l: u8| ds.samples.iter().filter(|s| s.split == sp && s.label == l).count();
        let groups = |sp: Split| {
            ds.samples.iter().filter(|s| s.split == sp).map(|s| s.group.as_str()).collect::<std::collections::BTreeSet<_>>().len()
        };
        let mut metrics = json!({
            "images": ds.samples.len(),
            "skipped": skipped.len(),
            "skipped_files": skipped,
            "without_mask": without_mask.len(),
            "warnings": warnings,
        });
        for sp in [Split::Train, Split::Val, Split::Test] {
            metrics[sp.name()] = json!({ "positive": count(sp, 1), "negative": count(sp, 0), "groups": groups(sp) });
        }
        (ctx.log)(format!("{} images ({} skipped), {}x{}x{}", ds.samples.len(), skipped.len(), channels, size, size));
        let f = io::write(ctx.out_dir, io::DATASET_FILE, &ds.encode())?;
        Ok(Outcome { files: vec![f], metrics })
    }
}

/// How many names a warning line shows; the metrics list them all.
const SHOWN_NAMES: usize = 5;

/// `a, b, c and 7 more`: the first few of a list, for one line of run output.
fn first_few(names: &[String]) -> String {
    let mut s = names.iter().take(SHOWN_NAMES).cloned().collect::<Vec<_>>().join(", ");
    if names.len() > SHOWN_NAMES {
        s.push_str(&format!(" and {} more", names.len() - SHOWN_NAMES));
    }
    s
}

/// Warnings (`{flag, message}`, as the classifier guards write them) for what a load left
/// out: skipped files (`on_error: skip`) and positives without a mask (`missing_masks:
/// exclude`), with the count and the first few names, so they show in the run output.
fn data_warnings(skipped: &[String], without_mask: &[String]) -> Vec<Json> {
    let mut v = Vec::new();
    if !skipped.is_empty() {
        v.push(json!({
            "flag": "skipped-files",
            "message": format!("skipped {} bad file{} (on_error: skip): {}", skipped.len(), if skipped.len() == 1 { "" } else { "s" }, first_few(skipped)),
        }));
    }
    if !without_mask.is_empty() {
        v.push(json!({
            "flag": "no-mask",
            "message": format!(
                "{} positive image{} without a mask, left out of Dice (missing_masks: exclude): {}",
                without_mask.len(),
                if without_mask.len() == 1 { "" } else { "s" },
                first_few(without_mask)
            ),
        }));
    }
    v
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    fn params(root: &Path) -> Params {
        let mut p: Params = Data.params().into_iter().map(|s| (s.name.to_string(), (s.default)())).collect();
        p.insert("source".into(), json!("folders"));
        p.insert("root".into(), json!(root.to_str().unwrap()));
        p.insert("image_size".into(), json!(8));
        // Class `b` is positive; its images have no masks.
        p.insert("positive".into(), json!(["b"]));
        p.insert("missing_masks".into(), json!("exclude"));
        p
    }

    #[test]
    fn params_a_source_does_not_read_are_keyed_at_their_defaults() {
        let base = params(Path::new("/data"));
        let key = |edit: &dyn Fn(&mut Params)| {
            let mut p = base.clone();
            edit(&mut p);
            Data.key_params(&p)
        };
        let k = key(&|_| {});
        assert!(!k.contains_key("root"), "a location is never keyed");
        assert_eq!(key(&|p| drop(p.insert("count".into(), json!(7)))), k, "folders read no phantom count");
        assert_eq!(key(&|p| drop(p.insert("positive".into(), json!(["b", "b"])))), k, "positive is a set");
        assert_ne!(key(&|p| drop(p.insert("positive".into(), json!(["a", "b"])))), k);
        let mut ab = base.clone();
        ab.insert("positive".into(), json!(["a", "b"]));
        let mut ba = base.clone();
        ba.insert("positive".into(), json!(["b", "a"]));
        assert_eq!(Data.key_params(&ab), Data.key_params(&ba));
        // LGG reads no `positive` and always needs masks; synthetic data reads what it keys.
        let lgg = |edit: &dyn Fn(&mut Params)| key(&|p| {
            p.insert("source".into(), json!("lgg"));
            edit(p)
        });
        assert_eq!(lgg(&|p| drop(p.insert("positive".into(), json!(["x"])))), lgg(&|_| {}));
        assert_eq!(lgg(&|p| drop(p.insert("missing_masks".into(), json!("error")))), lgg(&|_| {}));
        let synthetic = |edit: &dyn Fn(&mut Params)| key(&|p| {
            p.insert("source".into(), json!("synthetic"));
            edit(p)
        });
        assert_ne!(synthetic(&|p| drop(p.insert("count".into(), json!(7)))), synthetic(&|_| {}));
    }

    fn run(params: &Params, planned: &BTreeMap<String, String>, out: &Path) -> Result<Outcome, StageError> {
        let inputs = BTreeMap::new();
        let mut log = |_l: String| {};
        let mut progress = |_p: Progress| {};
        let mut ctx = RunContext {
            params,
            inputs: &inputs,
            out_dir: out,
            base_dir: Path::new("/"),
            seed: 1,
            backend: "cpu",
            device: 0,
            planned_data: planned,
            log: &mut log,
            progress: &mut progress,
        };
        Data.run(&mut ctx)
    }

    #[test]
    fn data_read_must_have_the_planned_digest() {
        let d = tempfile::tempdir().unwrap();
        for (c, v) in [("a", 10u8), ("b", 200)] {
            std::fs::create_dir_all(d.path().join(c)).unwrap();
            for n in 0..3u8 {
                image::GrayImage::from_fn(9, 9, |x, y| image::Luma([v ^ (x as u8 * 3 + y as u8 + n)]))
                    .save(d.path().join(c).join(format!("{n}.png")))
                    .unwrap();
            }
        }
        let p = params(d.path());
        let (name, files) = Data.external_files(&p, Path::new("/")).unwrap().remove(0);
        assert_eq!(files.len(), 6);
        let digests: Vec<(String, String)> =
            files.iter().map(|(r, f)| (r.clone(), crate::cache::key::sha256_hex(&std::fs::read(f).unwrap()))).collect();
        let planned: BTreeMap<String, String> = [(name.clone(), combine(digests.iter().map(|(a, b)| (a.as_str(), b.as_str()))))].into();
        let out = tempfile::tempdir().unwrap();
        assert!(run(&p, &planned, out.path()).is_ok());
        // The data changed between planning (the key) and reading: nothing may be cached.
        image::GrayImage::from_pixel(9, 9, image::Luma([7])).save(d.path().join("b/1.png")).unwrap();
        let e = run(&p, &planned, out.path()).err().expect("a changed file is refused").to_string();
        assert!(e.contains("data `root` changed since the run was planned"), "{e}");
    }
}
