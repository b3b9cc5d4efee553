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

/// Applies `mode` to every image of every split; masks, labels and splits are kept.
pub fn apply(ds: &Dataset, heat: &Planes, mode: FilterMode) -> Result<Dataset, FilterError> {
    if (heat.height, heat.width) != (ds.height, ds.width) {
        return Err(FilterError::Size { hh: heat.height, hw: heat.width, ih: ds.height, iw: ds.width });
    }
    let index = heat.index();
    let npx = ds.pixels();
    let mut out = ds.clone();
    for s in &mut out.samples {
        let h = &heat.data[*index.get(s.id.as_str()).ok_or_else(|| FilterError::MissingHeatmap(s.id.clone()))?];
        for (i, v) in s.image.iter_mut().enumerate() {
            let hv = h[i % npx];
            let f = match mode {
                FilterMode::Multiply => hv,
                FilterMode::Inverse => 1.0 - hv,
                FilterMode::Mask(t) => (hv >= t) as u8 as f32,
                FilterMode::InverseMask(t) => (hv < t) as u8 as f32,
            };
            *v *= f;
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ml::dataset::{Sample, Split};
    use crate::ml::planes::PlaneKind;

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
