//! Deterministic MRI-like phantoms with exact tumor masks: the embedded data set.
//!
//! Each slice is a head ellipse with a bright skull ring, smooth textured tissue, two darker
//! ventricles and Gaussian noise. Positive slices add an irregular blob (a union of a few
//! discs with soft edges) of random size and place inside the brain, brighter by `contrast`.
//! Negatives carry small bright distractor spots too, so that "any bright pixel" is not
//! enough: a classifier needs a few epochs, and Grad-CAM masks are far from perfect.
//!
//! Sines and exponentials come from the pure-Rust `libm`: glibc picks an FMA variant of
//! `sinf`/`expf` per CPU, and these pixels are data whose bytes must be the same everywhere.

use super::dataset::{Dataset, Sample, Split};
use super::rng::Rng;

#[derive(Debug, Clone)]
pub struct SyntheticConfig {
    pub count: usize,
    pub size: usize,
    /// Fraction of slices that carry a tumor.
    pub tumor_fraction: f64,
    /// Brightness added inside the tumor, relative to tissue (about 0.5).
    pub contrast: f32,
    /// Standard deviation of the pixel noise.
    pub noise: f32,
    /// Slices per synthetic patient (the split groups).
    pub slices_per_patient: usize,
    pub seed: u64,
}

pub fn generate(cfg: &SyntheticConfig) -> Dataset {
    let n = cfg.size;
    let patients = cfg.count.div_ceil(cfg.slices_per_patient.max(1));
    let mut samples = Vec::with_capacity(cfg.count);
    for i in 0..cfg.count {
        let mut rng = Rng::derive(cfg.seed, &format!("phantom/{i}"));
        let positive = rng.uniform() < cfg.tumor_fraction as f32;
        let (image, mask) = phantom(&mut rng, n, positive, cfg.contrast, cfg.noise);
        let patient = i % patients.max(1);
        samples.push(Sample {
            id: format!("syn{i:05}"),
            group: format!("patient{patient:03}"),
            label: positive as u8,
            split: Split::Train,
            image,
            mask,
        });
    }
    Dataset { channels: 1, height: n, width: n, samples }
}

// 6.28 (not TAU) is part of the frozen generator: changing it would change every synthetic
// data set, and with it every cache key and lock file made from one.
#[allow(clippy::approx_constant)]
fn phantom(rng: &mut Rng, n: usize, positive: bool, contrast: f32, noise: f32) -> (Vec<f32>, Vec<u8>) {
    let nf = n as f32;
    let cx = nf * rng.range(0.46, 0.54);
    let cy = nf * rng.range(0.46, 0.54);
    let ax = nf * rng.range(0.36, 0.43);
    let ay = nf * rng.range(0.40, 0.46);
    // Texture: a few random low-frequency waves.
    let waves: Vec<(f32, f32, f32, f32)> =
        (0..4).map(|_| (rng.range(1.0, 4.0) / nf, rng.range(1.0, 4.0) / nf, rng.range(0.0, 6.28), rng.range(0.03, 0.08))).collect();
    let vent: Vec<(f32, f32, f32, f32)> = (0..2)
        .map(|k| {
            let side = if k == 0 { -1.0 } else { 1.0 };
            (cx + side * ax * rng.range(0.12, 0.22), cy + rng.range(-0.1, 0.1) * ay, ax * rng.range(0.08, 0.14), ay * rng.range(0.15, 0.25))
        })
        .collect();
    // Distractors: small bright spots present in both classes.
    let spots: Vec<(f32, f32, f32)> = (0..rng.below(3) + 1)
        .map(|_| {
            let (x, y) = point_in_head(rng, cx, cy, ax * 0.8, ay * 0.8);
            (x, y, nf * rng.range(0.015, 0.035))
        })
        .collect();
    let blob: Vec<(f32, f32, f32)> = if positive {
        let (bx, by) = point_in_head(rng, cx, cy, ax * 0.6, ay * 0.6);
        let r = nf * rng.range(0.06, 0.13);
        let mut discs = vec![(bx, by, r)];
        for _ in 0..rng.below(3) + 1 {
            let ang = rng.range(0.0, 6.28);
            let d = r * rng.range(0.3, 0.9);
            discs.push((bx + d * libm::cosf(ang), by + d * libm::sinf(ang), r * rng.range(0.4, 0.8)));
        }
        discs
    } else {
        Vec::new()
    };
    let tumor_gain = contrast * rng.range(0.7, 1.3);
    let mut image = vec![0f32; n * n];
    let mut mask = vec![0u8; n * n];
    for y in 0..n {
        for x in 0..n {
            let (xf, yf) = (x as f32 + 0.5, y as f32 + 0.5);
            let r = ((xf - cx) / ax).powi(2) + ((yf - cy) / ay).powi(2);
            let mut v = 0.0;
            if r <= 1.0 {
                v = 0.45;
                for &(fx, fy, ph, amp) in &waves {
                    v += amp * libm::sinf(6.28 * (fx * xf + fy * yf) + ph);
                }
                for &(vx, vy, rx, ry) in &vent {
                    if ((xf - vx) / rx).powi(2) + ((yf - vy) / ry).powi(2) <= 1.0 {
                        v -= 0.2;
                    }
                }
                for &(sx, sy, sr) in &spots {
                    let d2 = (xf - sx).powi(2) + (yf - sy).powi(2);
                    v += 0.35 * libm::expf(-d2 / (2.0 * sr * sr));
                }
                let mut inside = false;
                let mut soft = 0f32;
                for &(bx, by, br) in &blob {
                    let d = ((xf - bx).powi(2) + (yf - by).powi(2)).sqrt();
                    inside |= d <= br;
                    soft = soft.max((1.0 - (d - br) / 1.5).clamp(0.0, 1.0));
                }
                if inside && r <= 0.92 {
                    mask[y * n + x] = 1;
                }
                if r <= 0.92 {
                    v += tumor_gain * soft;
                }
            }
            // Skull ring just outside the brain ellipse.
            if (1.0..1.18).contains(&r) {
                v = 0.9;
            }
            v += noise * rng.normal();
            image[y * n + x] = v;
        }
    }
    (image, mask)
}

fn point_in_head(rng: &mut Rng, cx: f32, cy: f32, ax: f32, ay: f32) -> (f32, f32) {
    loop {
        let u = rng.range(-1.0, 1.0);
        let v = rng.range(-1.0, 1.0);
        if u * u + v * v <= 1.0 {
            return (cx + u * ax, cy + v * ay);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> SyntheticConfig {
        SyntheticConfig { count: 20, size: 32, tumor_fraction: 0.5, contrast: 0.5, noise: 0.1, slices_per_patient: 4, seed: 1 }
    }

    #[test]
    fn deterministic_and_labelled_by_mask() {
        let a = generate(&cfg());
        assert_eq!(a, generate(&cfg()));
        for s in &a.samples {
            let has = s.mask.contains(&1);
            assert_eq!(has, s.label == 1, "{}", s.id);
        }
        assert!(a.samples.iter().any(|s| s.label == 1) && a.samples.iter().any(|s| s.label == 0));
    }
}
