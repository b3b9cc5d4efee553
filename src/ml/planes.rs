//! Per-image planes (heatmaps or masks) keyed by sample id, with a stable compact encoding.
//!
//! Heatmaps are quantised to u16: `q = round(h * 65535)`, `h = q / 65535` (max error
//! 7.7e-6, well under any threshold step). Masks are one byte per pixel, 0 or 1.

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PlaneKind {
    Heatmap,
    Mask,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Planes {
    pub kind: PlaneKind,
    pub height: usize,
    pub width: usize,
    pub ids: Vec<String>,
    /// One plane per id, values in [0, 1] (masks: exactly 0 or 1).
    pub data: Vec<Vec<f32>>,
}

#[derive(Serialize, Deserialize)]
struct Header {
    kind: PlaneKind,
    height: usize,
    width: usize,
    ids: Vec<String>,
    quantisation: String,
}

const MAGIC: &[u8; 8] = b"CAMPL01\n";

#[derive(Debug, thiserror::Error)]
pub enum PlanesError {
    #[error("not a camflow plane file (bad magic)")]
    BadMagic,
    #[error("plane file is truncated")]
    Truncated,
    #[error("plane header: {0}")]
    Header(#[from] serde_json::Error),
}

impl Planes {
    pub fn get(&self, id: &str) -> Option<&[f32]> {
        self.ids.iter().position(|x| x == id).map(|i| self.data[i].as_slice())
    }

    pub fn index(&self) -> std::collections::HashMap<&str, usize> {
        self.ids.iter().enumerate().map(|(i, s)| (s.as_str(), i)).collect()
    }

    pub fn encode(&self) -> Vec<u8> {
        let header = Header {
            kind: self.kind,
            height: self.height,
            width: self.width,
            ids: self.ids.clone(),
            quantisation: match self.kind {
                PlaneKind::Heatmap => "u16le: q = round(h * 65535)".into(),
                PlaneKind::Mask => "u8: 0 or 1".into(),
            },
        };
        let json = serde_json::to_vec(&header).expect("header serialises");
        let mut out = Vec::new();
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&(json.len() as u64).to_le_bytes());
        out.extend_from_slice(&json);
        for p in &self.data {
            for &v in p {
                match self.kind {
                    PlaneKind::Heatmap => out.extend_from_slice(&((v.clamp(0.0, 1.0) * 65535.0).round() as u16).to_le_bytes()),
                    PlaneKind::Mask => out.push((v > 0.5) as u8),
                }
            }
        }
        out
    }

    pub fn decode(bytes: &[u8]) -> Result<Planes, PlanesError> {
        if bytes.len() < 16 || &bytes[..8] != MAGIC {
            return Err(PlanesError::BadMagic);
        }
        let hlen = u64::from_le_bytes(bytes[8..16].try_into().map_err(|_| PlanesError::Truncated)?) as usize;
        let h: Header = serde_json::from_slice(bytes.get(16..16 + hlen).ok_or(PlanesError::Truncated)?)?;
        let npx = h.height * h.width;
        let per = match h.kind {
            PlaneKind::Heatmap => 2,
            PlaneKind::Mask => 1,
        };
        let body = &bytes[16 + hlen..];
        if body.len() != npx * per * h.ids.len() {
            return Err(PlanesError::Truncated);
        }
        let data = body
            .chunks(npx * per)
            .map(|c| match h.kind {
                PlaneKind::Heatmap => c.chunks_exact(2).map(|b| u16::from_le_bytes([b[0], b[1]]) as f32 / 65535.0).collect(),
                PlaneKind::Mask => c.iter().map(|&b| b as f32).collect(),
            })
            .collect();
        Ok(Planes { kind: h.kind, height: h.height, width: h.width, ids: h.ids, data })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantisation_error_is_bounded() {
        let p = Planes { kind: PlaneKind::Heatmap, height: 1, width: 3, ids: vec!["a".into()], data: vec![vec![0.0, 0.123456, 1.0]] };
        let back = Planes::decode(&p.encode()).unwrap();
        for (a, b) in p.data[0].iter().zip(&back.data[0]) {
            assert!((a - b).abs() <= 0.5 / 65535.0 + 1e-7);
        }
        let m = Planes { kind: PlaneKind::Mask, height: 1, width: 2, ids: vec!["a".into()], data: vec![vec![1.0, 0.0]] };
        assert_eq!(Planes::decode(&m.encode()).unwrap(), m);
    }
}
