//! Heatmap-filtered images: what the classifier is left with when only (or all but) the
//! regions a heatmap marks are kept.

use super::dataset::Dataset;
use super::planes::Planes;

#[derive(Debug, Clone, Copy, PartialEq)]
pub enum FilterMode {
    /// image x h
    Multiply,
    /// image x (1 - h)
    Inverse,
    /// image x [h >= t]
    Mask(f32),
    /// image x [h < t]
    InverseMask(f32),
}

#[derive(Debug, thiserror::Error)]
pub enum FilterError {
    #[error("no heatmap for sample `{0}`")]
    MissingHeatmap(String),
    #[error("heatmaps are {hh}x{hw} but images are {ih}x{iw}")]
    Size { hh: usize, hw: usize, ih: usize, iw: usize },
}

impl FilterMode {
    /// The factor a pixel is multiplied by where the heatmap is `h`.
    fn factor(self, h: f32) -> f32 {
        match self {
            FilterMode::Multiply => h,
            FilterMode::Inverse => 1.0 - h,
            FilterMode::Mask(t) => (h >= t) as u8 as f32,
            FilterMode::InverseMask(t) => (h < t) as u8 as f32,
        }
    }
}

/// Applies `mode` to every image of every split; masks, labels and splits are kept.
pub fn apply(ds: &Dataset, heat: &Planes, mode: FilterMode) -> Result<Dataset, FilterError> {
    let index = heatmap_index(ds, heat)?;
    let npx = ds.pixels();
    let mut out = ds.clone();
    for (s, &h) in out.samples.iter_mut().zip(&index) {
        let h = &heat.data[h];
        for (i, v) in s.image.iter_mut().enumerate() {
            *v *= mode.factor(h[i % npx]);
        }
    }
    Ok(out)
}

/// Each sample's heatmap (its index in `heat`), after checking the sizes agree.
fn heatmap_index(ds: &Dataset, heat: &Planes) -> Result<Vec<usize>, FilterError> {
    if (heat.height, heat.width) != (ds.height, ds.width) {
        return Err(FilterError::Size { hh: heat.height, hw: heat.width, ih: ds.height, iw: ds.width });
    }
    let index = heat.index();
    ds.samples.iter().map(|s| index.get(s.id.as_str()).copied().ok_or_else(|| FilterError::MissingHeatmap(s.id.clone()))).collect()
}

/// What filtering did to a whole image. A classifier retrained on filtered images tells a
/// wholly blanked or wholly untouched image from a partly filtered one at a glance, whatever
/// the heatmap kept: with the tumor class as Grad-CAM's target, the ReLU leaves an all-zero map
/// on most tumor-free images (kept all-zero by the per-image scaling), so `multiply` and `mask`
/// blank them and `inverse` and `inverse-mask` leave them as they were, and the class can be
/// read off the filtering itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum WholeImage {
    /// Every pixel's factor is 0: the image is a constant 0.
    Blanked,
    /// Every pixel's factor is 1: the image is unchanged.
    Untouched,
    /// Anything between.
    Partly,
}

impl WholeImage {
    pub const ALL: [WholeImage; 3] = [WholeImage::Blanked, WholeImage::Untouched, WholeImage::Partly];

    pub fn name(self) -> &'static str {
        match self {
            WholeImage::Blanked => "blanked",
            WholeImage::Untouched => "untouched",
            WholeImage::Partly => "partly",
        }
    }
}

/// How far the label can be read off [`WholeImage`] alone: the simplest classifier a retrained
/// one could learn without looking at what the heatmap kept.
#[derive(Debug, Clone, PartialEq)]
pub struct Leak {
    /// Test images per (effect, label 0/1).
    pub test_counts: std::collections::BTreeMap<(WholeImage, u8), usize>,
    /// Test accuracy of the rule "answer the class most train images with this effect have"
    /// (learnt on the train split, as a retrained classifier would learn it); NaN without test
    /// images.
    pub rule_accuracy: f64,
    /// Test accuracy of always answering the class most train images have: what the rule gives
    /// when the effect says nothing.
    pub baseline_accuracy: f64,
}

/// [`Leak`] of `mode` applied to `ds` with `heat`.
pub fn leak(ds: &Dataset, heat: &Planes, mode: FilterMode) -> Result<Leak, FilterError> {
    use super::dataset::Split;
    use std::collections::BTreeMap;
    let index = heatmap_index(ds, heat)?;
    let npx = ds.pixels();
    let effect = |h: &[f32]| {
        let f: Vec<f32> = h[..npx].iter().map(|&v| mode.factor(v)).collect();
        if f.iter().all(|&x| x == 0.0) {
            WholeImage::Blanked
        } else if f.iter().all(|&x| x == 1.0) {
            WholeImage::Untouched
        } else {
            WholeImage::Partly
        }
    };
    let mut train: BTreeMap<(WholeImage, u8), usize> = BTreeMap::new();
    let mut test: BTreeMap<(WholeImage, u8), usize> = BTreeMap::new();
    for (s, &h) in ds.samples.iter().zip(&index) {
        let counts = match s.split {
            Split::Train => &mut train,
            Split::Test => &mut test,
            _ => continue,
        };
        *counts.entry((effect(&heat.data[h]), s.label.min(1))).or_default() += 1;
    }
    let n = |c: &BTreeMap<(WholeImage, u8), usize>, e: Option<WholeImage>, l: u8| -> usize {
        c.iter().filter(|((ce, cl), _)| *cl == l && e.is_none_or(|e| e == *ce)).map(|(_, &k)| k).sum()
    };
    // Ties go to the positive class, as a classifier's p >= 0.5 does.
    let majority = |e: Option<WholeImage>| -> u8 { (n(&train, e, 1) >= n(&train, e, 0)) as u8 };
    let n_test: usize = test.values().sum();
    let (mut rule, mut base) = (0usize, 0usize);
    for (&(e, l), &k) in &test {
        // An effect no train image had: the rule falls back to the overall majority.
        let seen = n(&train, Some(e), 0) + n(&train, Some(e), 1) > 0;
        rule += k * ((if seen { majority(Some(e)) } else { majority(None) }) == l) as usize;
        base += k * (majority(None) == l) as usize;
    }
    let frac = |k: usize| if n_test == 0 { f64::NAN } else { k as f64 / n_test as f64 };
    Ok(Leak { test_counts: test, rule_accuracy: frac(rule), baseline_accuracy: frac(base) })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ml::dataset::{Sample, Split};
    use crate::ml::planes::PlaneKind;

    /// A dataset of 1x2 images with these (split, label, heatmap) rows, and the heatmaps.
    fn split_set(rows: &[(Split, u8, [f32; 2])]) -> (Dataset, Planes) {
        let samples: Vec<Sample> = rows
            .iter()
            .enumerate()
            .map(|(i, &(split, label, _))| Sample {
                id: format!("s{i}"),
                group: format!("g{i}"),
                label,
                split,
                image: vec![1.0, 2.0],
                mask: vec![0, 0],
            })
            .collect();
        let ids = samples.iter().map(|s| s.id.clone()).collect();
        let data = rows.iter().map(|r| r.2.to_vec()).collect();
        (Dataset { channels: 1, height: 1, width: 2, samples }, Planes { kind: PlaneKind::Heatmap, height: 1, width: 2, ids, data })
    }

    #[test]
    fn leak_reads_the_class_off_blanked_and_untouched_images() {
        use Split::*;
        let zero = [0.0, 0.0];
        let some = [0.2, 0.9];
        // Negatives get all-zero maps (as Grad-CAM's ReLU gives them), positives do not; the
        // train split has more negatives, the test split more positives.
        let rows = [
            (Train, 0, zero),
            (Train, 0, zero),
            (Train, 0, zero),
            (Train, 1, some),
            (Val, 1, zero),
            (Test, 0, zero),
            (Test, 1, some),
            (Test, 1, some),
            (Test, 1, zero),
        ];
        let (ds, h) = split_set(&rows);
        for mode in [FilterMode::Multiply, FilterMode::Mask(0.5), FilterMode::Inverse, FilterMode::InverseMask(0.5)] {
            let l = leak(&ds, &h, mode).unwrap();
            // Blanked (or untouched) -> negative, partly -> positive: 3 of 4 test images right;
            // always answering the train majority (negative): 1 of 4. Val is not counted.
            assert_eq!(l.rule_accuracy, 0.75, "{mode:?}");
            assert_eq!(l.baseline_accuracy, 0.25, "{mode:?}");
            let whole = if matches!(mode, FilterMode::Multiply | FilterMode::Mask(_)) { WholeImage::Blanked } else { WholeImage::Untouched };
            assert_eq!(l.test_counts.get(&(whole, 0)), Some(&1), "{mode:?}");
            assert_eq!(l.test_counts.get(&(whole, 1)), Some(&1), "{mode:?}");
            assert_eq!(l.test_counts.get(&(WholeImage::Partly, 1)), Some(&2), "{mode:?}");
        }
        // No map is all zero: every image is filtered partly, and the rule is the majority.
        let rows: Vec<_> = rows.iter().map(|&(s, l, _)| (s, l, some)).collect();
        let (ds, h) = split_set(&rows);
        let l = leak(&ds, &h, FilterMode::Multiply).unwrap();
        assert_eq!((l.rule_accuracy, l.baseline_accuracy), (0.25, 0.25));
        // A mask whose cut no pixel reaches blanks every image: no effect tells classes apart.
        let l = leak(&ds, &h, FilterMode::Mask(0.95)).unwrap();
        assert_eq!(l.rule_accuracy, l.baseline_accuracy);
    }

    #[test]
    fn modes() {
        let ds = Dataset {
            channels: 1,
            height: 1,
            width: 2,
            samples: vec![Sample {
                id: "a".into(),
                group: "g".into(),
                label: 1,
                split: Split::Test,
                image: vec![2.0, 4.0],
                mask: vec![0, 1],
            }],
        };
        let h = Planes { kind: PlaneKind::Heatmap, height: 1, width: 2, ids: vec!["a".into()], data: vec![vec![0.25, 0.75]] };
        let img = |m| apply(&ds, &h, m).unwrap().samples[0].image.clone();
        assert_eq!(img(FilterMode::Multiply), vec![0.5, 3.0]);
        assert_eq!(img(FilterMode::Inverse), vec![1.5, 1.0]);
        assert_eq!(img(FilterMode::Mask(0.5)), vec![0.0, 4.0]);
        assert_eq!(img(FilterMode::InverseMask(0.5)), vec![2.0, 0.0]);
    }
}
