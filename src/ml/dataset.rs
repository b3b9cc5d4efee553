//! In-memory labelled image set with ground-truth masks, and its stable binary encoding.
//!
//! A `Dataset` is what every data source produces and what `filter` produces again: images
//! already resized and normalised, one binary mask per image, a label, a group (patient) and a
//! split. The encoding is a fixed little-endian layout so that equal datasets have equal bytes
//! (the cache hashes these bytes).

use serde::{Deserialize, Serialize};

use super::rng::Rng;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Hash, PartialOrd, Ord)]
#[serde(rename_all = "lowercase")]
pub enum Split {
    Train,
    Val,
    Test,
}

impl Split {
    pub fn name(self) -> &'static str {
        match self {
            Split::Train => "train",
            Split::Val => "val",
            Split::Test => "test",
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    pub id: String,
    pub group: String,
    /// 1 = positive (tumor), 0 = negative.
    pub label: u8,
    pub split: Split,
    /// Channel-major pixels, `channels * height * width`.
    pub image: Vec<f32>,
    /// `height * width` values, each 0 or 1; empty when the image has no ground truth (a
    /// positive kept without a mask by `missing_masks: exclude`), which Dice leaves out.
    pub mask: Vec<u8>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Dataset {
    pub channels: usize,
    pub height: usize,
    pub width: usize,
    pub samples: Vec<Sample>,
}

#[derive(Serialize, Deserialize)]
struct Header {
    channels: usize,
    height: usize,
    width: usize,
    samples: Vec<SampleMeta>,
}

#[derive(Serialize, Deserialize)]
struct SampleMeta {
    id: String,
    group: String,
    label: u8,
    split: Split,
    /// No ground truth: its mask bytes are zeros and decode to an empty mask. Absent when
    /// false, so data sets with every mask encode as before.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    no_mask: bool,
}

const MAGIC: &[u8; 8] = b"CAMDS01\n";

#[derive(Debug, thiserror::Error)]
pub enum DatasetError {
    #[error("not a camflow dataset (bad magic)")]
    BadMagic,
    #[error("dataset file is truncated")]
    Truncated,
    #[error("dataset header: {0}")]
    Header(#[from] serde_json::Error),
}

impl Dataset {
    pub fn pixels(&self) -> usize {
        self.height * self.width
    }

    pub fn indices(&self, split: Split) -> Vec<usize> {
        (0..self.samples.len()).filter(|&i| self.samples[i].split == split).collect()
    }

    pub fn count(&self, split: Split) -> usize {
        self.samples.iter().filter(|s| s.split == split).count()
    }

    /// Stable binary encoding: magic, header length, JSON header, then per sample the f32
    /// image and the u8 mask.
    pub fn encode(&self) -> Vec<u8> {
        let header = Header {
            channels: self.channels,
            height: self.height,
            width: self.width,
            samples: self
                .samples
                .iter()
                .map(|s| SampleMeta { id: s.id.clone(), group: s.group.clone(), label: s.label, split: s.split, no_mask: s.mask.is_empty() })
                .collect(),
        };
        let json = serde_json::to_vec(&header).expect("header serialises");
        let per = self.channels * self.pixels() * 4 + self.pixels();
        let mut out = Vec::with_capacity(16 + json.len() + per * self.samples.len());
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&(json.len() as u64).to_le_bytes());
        out.extend_from_slice(&json);
        for s in &self.samples {
            for v in &s.image {
                out.extend_from_slice(&v.to_le_bytes());
            }
            if s.mask.is_empty() {
                out.resize(out.len() + self.pixels(), 0);
            } else {
                out.extend_from_slice(&s.mask);
            }
        }
        out
    }

    pub fn decode(bytes: &[u8]) -> Result<Dataset, DatasetError> {
        if bytes.len() < 16 || &bytes[..8] != MAGIC {
            return Err(DatasetError::BadMagic);
        }
        let hlen = u64::from_le_bytes(bytes[8..16].try_into().map_err(|_| DatasetError::Truncated)?) as usize;
        let body = bytes.get(16..16 + hlen).ok_or(DatasetError::Truncated)?;
        let header: Header = serde_json::from_slice(body)?;
        let npx = header.height * header.width;
        let nimg = header.channels * npx;
        let mut pos = 16 + hlen;
        let mut samples = Vec::with_capacity(header.samples.len());
        for m in header.samples {
            let img = bytes.get(pos..pos + nimg * 4).ok_or(DatasetError::Truncated)?;
            pos += nimg * 4;
            let image = img.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect();
            let mask = bytes.get(pos..pos + npx).ok_or(DatasetError::Truncated)?;
            let mask = if m.no_mask { Vec::new() } else { mask.to_vec() };
            pos += npx;
            samples.push(Sample { id: m.id, group: m.group, label: m.label, split: m.split, image, mask });
        }
        if pos != bytes.len() {
            return Err(DatasetError::Truncated);
        }
        Ok(Dataset { channels: header.channels, height: header.height, width: header.width, samples })
    }
}

/// Fractions of groups that go to validation and test; the rest trains.
#[derive(Debug, Clone, Copy)]
pub struct SplitConfig {
    pub val: f64,
    pub test: f64,
    pub seed: u64,
}

/// Assigns every sample a split **by group**, so no patient is on two sides, stratified by
/// whether a group holds any positive sample (groups with tumors are split separately from
/// groups without, where there are enough of each).
pub fn assign_splits(samples: &mut [Sample], cfg: SplitConfig) {
    let mut groups: Vec<(String, bool)> = Vec::new();
    {
        let mut seen = std::collections::BTreeMap::<&str, bool>::new();
        for s in samples.iter() {
            let e = seen.entry(s.group.as_str()).or_insert(false);
            *e |= s.label == 1;
        }
        for (g, pos) in seen {
            groups.push((g.to_string(), pos));
        }
    }
    let mut rng = Rng::derive(cfg.seed, "split");
    let mut assignment = std::collections::BTreeMap::<String, Split>::new();
    let strata: [Vec<String>; 2] =
        [groups.iter().filter(|g| g.1).map(|g| g.0.clone()).collect(), groups.iter().filter(|g| !g.1).map(|g| g.0.clone()).collect()];
    for mut stratum in strata {
        rng.shuffle(&mut stratum);
        let n = stratum.len();
        let mut n_test = (n as f64 * cfg.test).round() as usize;
        let mut n_val = (n as f64 * cfg.val).round() as usize;
        // Keep at least one group in test and one in train wherever the stratum allows it.
        if cfg.test > 0.0 && n_test == 0 && n >= 2 {
            n_test = 1;
        }
        if cfg.val > 0.0 && n_val == 0 && n >= 3 {
            n_val = 1;
        }
        while n_test + n_val >= n && n > 0 && (n_test + n_val) > 0 {
            if n_val > 0 {
                n_val -= 1;
            } else {
                n_test -= 1;
            }
        }
        for (i, g) in stratum.into_iter().enumerate() {
            let split = if i < n_test {
                Split::Test
            } else if i < n_test + n_val {
                Split::Val
            } else {
                Split::Train
            };
            assignment.insert(g, split);
        }
    }
    for s in samples.iter_mut() {
        s.split = assignment[&s.group];
    }
}

/// Per-image intensity normalisation, applied channel by channel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Normalize {
    None,
    MinMax,
    ZScore,
}

pub fn normalize_image(image: &mut [f32], channels: usize, how: Normalize) {
    if how == Normalize::None || channels == 0 {
        return;
    }
    let n = image.len() / channels;
    for c in image.chunks_mut(n) {
        match how {
            Normalize::MinMax => {
                let (lo, hi) = c.iter().fold((f32::MAX, f32::MIN), |(a, b), &v| (a.min(v), b.max(v)));
                let span = hi - lo;
                for v in c.iter_mut() {
                    *v = if span > 0.0 { (*v - lo) / span } else { 0.0 };
                }
            }
            Normalize::ZScore => {
                let mean = c.iter().sum::<f32>() / n as f32;
                let var = c.iter().map(|v| (v - mean) * (v - mean)).sum::<f32>() / n as f32;
                let sd = var.sqrt().max(1e-6);
                for v in c.iter_mut() {
                    *v = (*v - mean) / sd;
                }
            }
            Normalize::None => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(id: &str, group: &str, label: u8) -> Sample {
        Sample { id: id.into(), group: group.into(), label, split: Split::Train, image: vec![0.5; 4], mask: vec![label; 4] }
    }

    #[test]
    fn encode_roundtrip() {
        let ds = Dataset { channels: 1, height: 2, width: 2, samples: vec![sample("a", "g", 1), sample("b", "h", 0)] };
        assert_eq!(Dataset::decode(&ds.encode()).unwrap(), ds);
        let mut bytes = ds.encode();
        bytes.pop();
        assert!(matches!(Dataset::decode(&bytes), Err(DatasetError::Truncated)));
    }

    #[test]
    fn a_sample_without_ground_truth_round_trips_and_others_encode_as_before() {
        let ds = Dataset { channels: 1, height: 2, width: 2, samples: vec![sample("a", "g", 1), sample("b", "h", 0)] };
        assert!(!String::from_utf8_lossy(&ds.encode()).contains("no_mask"));
        let mut none = ds.clone();
        none.samples[0].mask.clear();
        let bytes = none.encode();
        assert_eq!(bytes.len(), ds.encode().len() + r#","no_mask":true"#.len(), "the fixed layout keeps its size");
        assert_eq!(Dataset::decode(&bytes).unwrap(), none);
    }

    #[test]
    fn split_keeps_groups_together() {
        let mut s: Vec<Sample> = (0..60).map(|i| sample(&format!("s{i}"), &format!("p{}", i / 5), (i % 3 == 0) as u8)).collect();
        assign_splits(&mut s, SplitConfig { val: 0.2, test: 0.2, seed: 3 });
        let mut by_group = std::collections::BTreeMap::new();
        for x in &s {
            let prev = by_group.insert(x.group.clone(), x.split);
            assert!(prev.is_none() || prev == Some(x.split), "group {} on two sides", x.group);
        }
        assert!(s.iter().any(|x| x.split == Split::Test));
        assert!(s.iter().any(|x| x.split == Split::Val));
        assert!(s.iter().any(|x| x.split == Split::Train));
    }
}
