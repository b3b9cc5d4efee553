//! Gallery pictures: image with the true contour, heatmap overlay, predicted mask.

use std::path::Path;

use image::{Rgb, RgbImage};

use crate::ml::dataset::Sample;

/// One gallery section: the instance it shows and the samples to draw.
pub struct GalleryInput {
    pub title: String,
    pub height: usize,
    pub width: usize,
    /// (sample, heatmap, predicted mask, caption)
    pub items: Vec<(Sample, Vec<f32>, Vec<f32>, String)>,
}

pub struct GalleryItem {
    pub title: String,
    /// (file name in img/, caption)
    pub images: Vec<(String, String)>,
}

const SCALE: u32 = 4;

fn jet(v: f32) -> [f32; 3] {
    let v = v.clamp(0.0, 1.0);
    let r = (1.5 - (4.0 * v - 3.0).abs()).clamp(0.0, 1.0);
    let g = (1.5 - (4.0 * v - 2.0).abs()).clamp(0.0, 1.0);
    let b = (1.5 - (4.0 * v - 1.0).abs()).clamp(0.0, 1.0);
    [r, g, b]
}

fn contour(mask: &[u8], w: usize, h: usize, x: usize, y: usize) -> bool {
    // An empty mask is an image without ground truth (`missing_masks: exclude`): no outline.
    if mask.get(y * w + x).is_none_or(|&m| m == 0) {
        return false;
    }
    let at = |xx: isize, yy: isize| xx < 0 || yy < 0 || xx >= w as isize || yy >= h as isize || mask[yy as usize * w + xx as usize] == 0;
    at(x as isize - 1, y as isize) || at(x as isize + 1, y as isize) || at(x as isize, y as isize - 1) || at(x as isize, y as isize + 1)
}

/// Three panels side by side, each scaled up `SCALE` times.
fn picture(s: &Sample, heat: &[f32], pred: &[f32], w: usize, h: usize) -> RgbImage {
    let npx = w * h;
    let plane = &s.image[..npx.min(s.image.len())];
    let (lo, hi) = plane.iter().fold((f32::MAX, f32::MIN), |a, &v| (a.0.min(v), a.1.max(v)));
    let gray = |i: usize| if hi > lo { (plane[i] - lo) / (hi - lo) } else { 0.0 };
    let mut img = RgbImage::new(3 * w as u32 * SCALE + 2 * SCALE, h as u32 * SCALE);
    for y in 0..h {
        for x in 0..w {
            let i = y * w + x;
            let g = gray(i);
            let edge = contour(&s.mask, w, h, x, y);
            let p1 = if edge { [1.0, 0.0, 0.0] } else { [g, g, g] };
            let j = jet(heat[i]);
            let p2 = [0.5 * g + 0.5 * j[0], 0.5 * g + 0.5 * j[1], 0.5 * g + 0.5 * j[2]];
            let p3 = if edge {
                [1.0, 0.0, 0.0]
            } else if pred[i] > 0.5 {
                [0.2, 0.8, 0.2]
            } else {
                [g * 0.6, g * 0.6, g * 0.6]
            };
            for (k, p) in [p1, p2, p3].into_iter().enumerate() {
                let px = Rgb([(p[0] * 255.0) as u8, (p[1] * 255.0) as u8, (p[2] * 255.0) as u8]);
                let ox = k as u32 * (w as u32 * SCALE + SCALE);
                for dy in 0..SCALE {
                    for dx in 0..SCALE {
                        img.put_pixel(ox + x as u32 * SCALE + dx, y as u32 * SCALE + dy, px);
                    }
                }
            }
        }
    }
    img
}

pub fn render(sections: &[GalleryInput], dir: &Path) -> Result<Vec<GalleryItem>, String> {
    let mut out = Vec::new();
    for (si, sec) in sections.iter().enumerate() {
        let mut images = Vec::new();
        for (k, (s, heat, pred, caption)) in sec.items.iter().enumerate() {
            let file = format!("gallery_{si}_{k}.png");
            picture(s, heat, pred, sec.width, sec.height).save(dir.join(&file)).map_err(|e| format!("{file}: {e}"))?;
            images.push((file, caption.clone()));
        }
        out.push(GalleryItem { title: sec.title.clone(), images });
    }
    Ok(out)
}

/// The same test images under every heatmap method: one row per image, panels image |
/// heatmap per method | truth.
pub struct MethodGallery {
    pub title: String,
    pub height: usize,
    pub width: usize,
    /// Column names: the heatmap methods, in panel order.
    pub methods: Vec<String>,
    /// (sample, one heatmap per method)
    pub items: Vec<(Sample, Vec<Vec<f32>>)>,
}

/// The truth panel's colour (used by no other picture, so the pixel test can find it).
pub const TRUTH: [u8; 3] = [255, 0, 255];

fn row_picture(s: &Sample, heats: &[Vec<f32>], w: usize, h: usize) -> RgbImage {
    let npx = w * h;
    let plane = &s.image[..npx.min(s.image.len())];
    let (lo, hi) = plane.iter().fold((f32::MAX, f32::MIN), |a, &v| (a.0.min(v), a.1.max(v)));
    let gray = |i: usize| if hi > lo { (plane[i] - lo) / (hi - lo) } else { 0.0 };
    let panels = heats.len() as u32 + 2;
    let mut img = RgbImage::new(panels * (w as u32 * SCALE + SCALE) - SCALE, h as u32 * SCALE);
    for y in 0..h {
        for x in 0..w {
            let i = y * w + x;
            let g = gray(i);
            let gp = Rgb([(g * 255.0) as u8; 3]);
            let mut px = vec![gp];
            for heat in heats {
                let j = jet(heat.get(i).copied().unwrap_or(0.0));
                px.push(Rgb([0.5 * g + 0.5 * j[0], 0.5 * g + 0.5 * j[1], 0.5 * g + 0.5 * j[2]].map(|c| (c * 255.0) as u8)));
            }
            px.push(if s.mask.get(i).is_some_and(|&m| m > 0) { Rgb(TRUTH) } else { Rgb([(g * 96.0) as u8; 3]) });
            for (k, p) in px.into_iter().enumerate() {
                let ox = k as u32 * (w as u32 * SCALE + SCALE);
                for dy in 0..SCALE {
                    for dx in 0..SCALE {
                        img.put_pixel(ox + x as u32 * SCALE + dx, y as u32 * SCALE + dy, p);
                    }
                }
            }
        }
    }
    img
}

/// Writes `methods_<k>.png` per image; returns (file, caption) pairs.
pub fn render_methods(g: &MethodGallery, dir: &Path) -> Result<Vec<(String, String)>, String> {
    let mut out = Vec::new();
    for (k, (s, heats)) in g.items.iter().enumerate() {
        let file = format!("methods_{k}.png");
        row_picture(s, heats, g.width, g.height).save(dir.join(&file)).map_err(|e| format!("{file}: {e}"))?;
        out.push((file, s.id.clone()));
    }
    Ok(out)
}
